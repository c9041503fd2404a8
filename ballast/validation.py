"""The validation gate: a Great Expectations 1.x suite built from a :class:`DatasetSpec`.

The suite is declared once, engine-neutral, as :class:`Check` objects (:func:`suite_checks`); each
is a Great Expectations expectation (class name and arguments). Two engines evaluate it:

* **every row** — a vectorised numpy/pandas twin of each expectation (:func:`evaluate_all_rows`)
  with Great Expectations' pandas semantics (nulls ignored by range and set checks, its
  ``mostly`` rule, ``duplicated(keep=False)`` for compound uniqueness, checked through a 64-bit
  row hash and confirmed exactly with pandas on the colliding rows). ``ballast bench data``: 0.13
  CPU-s for 1M rows where GE needs 3.5 s (2.4 s of it compound uniqueness, which at 10M rows
  took over two minutes);
* **Great Expectations** runs the very same suite on the whole frame when it has at most
  ``ge_sample_rows`` rows (``spec.min_rows`` at least), else on a seeded random sample of that
  many rows plus the offending rows the first engine found, so GE independently sees every kind
  of failure. Its results sit beside the first engine's in the report (``ValidationReport``,
  rendered into the Prefect artifact).

An expectation passes only if both engines pass it: a sample can only add failures, never hide
one found on the full frame. (The one aggregate a sample can move is the label mean: data whose
positive share sits within sampling error, about ±1 % at 20k rows, of its band's edge may fail.) ``ValidationFailed`` raised here is an :class:`ExpectationsFailed`
carrying the report. Observed values in reports are aggregates (counts, min/max, mean, dtype;
distinct unexpected values only for set-membership checks), never individual rows: reports leave
the plaintext boundary (Prefect artifacts, quarantine records, logs). Column names the data
brings and the spec lacks are only counted, with a few short non-numeric ones shown: without
a header they are a row.

Great Expectations is imported lazily (its import costs several seconds) and runs in an ephemeral
context: nothing is written to disk.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from ballast.data import DatasetSpec, ValidatedDataset, parse_csv, sha256_bytes
from ballast.errors import ValidationFailed

__all__ = [
    "DEFAULT_GE_SAMPLE_ROWS",
    "Check",
    "ExpectationResult",
    "ExpectationsFailed",
    "ValidationReport",
    "build_expectations",
    "duplicated_rows",
    "evaluate_all_rows",
    "ge_rows",
    "row_hashes",
    "run_great_expectations",
    "suite_checks",
    "validate_bytes",
    "validate_frame",
]

_NUMERIC = ("float64", "float32", "int64", "int32")
# Features without an explicit range must still be finite: inf is never a measurement. The bound
# is float32's, the type features are handed over in (ValidatedDataset.features): a larger value
# would pass in float64 and become inf in the cast.
FLOAT_MAX = float(np.finfo(np.float32).max)
# GE's cost is mostly fixed (about 0.2 s a run, a few ms per expectation, ~96 here) plus per-row
# work: on 20k rows the suite takes about 0.5 s, while every check still runs on every row in
# the first engine.
DEFAULT_GE_SAMPLE_ROWS = 20_000
# Offending rows per failed check handed to GE, so its report shows the failure too.
_OFFENDERS_PER_CHECK = 20
_SAMPLE_SEED = 20_261_127
_MAX_DISTINCT_SHOWN = 5
# Column names the data brought that the spec does not know: without a header they are the first
# row's values, so reports show only a few that do not look like numbers, each cut short.
_MAX_NAMES_SHOWN = 3
_NAME_CHARS = 24


# -- the suite, engine-neutral --------------------------------------------------------------------


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass(frozen=True)
class Check:
    """One expectation: a Great Expectations class name and its arguments (lists as tuples)."""

    expectation: str
    kwargs: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, expectation: str, **kwargs: Any) -> Check:
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return cls(expectation, tuple(frozen.items()))

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def type(self) -> str:
        """The snake-case name Great Expectations reports, e.g. ``expect_column_values_to_...``."""
        return _snake(self.expectation)

    @property
    def column(self) -> str | None:
        col = self.args.get("column")
        return None if col is None else str(col)

    @property
    def label(self) -> str:
        return f"{self.type}({self.column})" if self.column else self.type

    def parameters(self) -> str:
        """A short human summary of the arguments (column lists are only counted)."""
        parts = []
        for key, value in self.kwargs:
            if key == "column":
                continue
            if key == "column_list":
                parts.append(f"{len(value)} columns")
            elif isinstance(value, float):
                parts.append(f"{key}={_num(value)}")
            elif isinstance(value, tuple):
                parts.append(f"{key}={list(value)}")
            else:
                parts.append(f"{key}={value}")
        return ", ".join(parts)


def suite_checks(spec: DatasetSpec) -> tuple[Check, ...]:
    """The suite's expectations, in the order they are reported."""
    columns = [*spec.features, spec.label]
    out = [
        Check.of("ExpectTableColumnsToMatchOrderedList", column_list=columns),
        Check.of(
            "ExpectTableRowCountToBeBetween", min_value=spec.min_rows, max_value=spec.max_rows
        ),
        Check.of(
            "ExpectCompoundColumnsToBeUnique",
            column_list=columns,
            mostly=1.0 - spec.max_duplicate_fraction,
        ),
        Check.of("ExpectColumnValuesToNotBeNull", column=spec.label),
        Check.of("ExpectColumnValuesToBeInSet", column=spec.label, value_set=list(spec.classes)),
        # Label balance: the positive class's share must stay in a plausible band.
        Check.of(
            "ExpectColumnMeanToBeBetween",
            column=spec.label,
            min_value=spec.label_share[0],
            max_value=spec.label_share[1],
        ),
    ]
    for col in spec.features:
        lo, hi = spec.ranges.get(col, (-FLOAT_MAX, FLOAT_MAX))
        out += [
            Check.of("ExpectColumnValuesToBeInTypeList", column=col, type_list=list(_NUMERIC)),
            Check.of(
                "ExpectColumnValuesToNotBeNull", column=col, mostly=1.0 - spec.max_null_fraction
            ),
            Check.of("ExpectColumnValuesToBeBetween", column=col, min_value=lo, max_value=hi),
        ]
    return tuple(out)


def to_gx(check: Check) -> Any:
    """The Great Expectations expectation object for a check."""
    import great_expectations as gx

    cls = getattr(gx.expectations, check.expectation)
    return cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in check.kwargs})


def build_expectations(spec: DatasetSpec) -> list[Any]:
    """The suite as Great Expectations expectation objects."""
    return [to_gx(c) for c in suite_checks(spec)]


# -- results and the report ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectationResult:
    """One expectation's outcome: on every row (``observed``) and in Great Expectations."""

    expectation: str  # GE snake-case type
    column: str | None
    parameters: str
    success: bool  # both engines passed
    all_rows_success: bool  # ballast's every-row evaluation
    observed: str  # on every row
    unexpected_count: int | None  # rows breaking a row-level check (all rows)
    ge_success: bool | None  # None when GE did not run (e.g. the CSV did not parse)
    ge_observed: str

    @property
    def label(self) -> str:
        return f"{self.expectation}({self.column})" if self.column else self.expectation

    def detail(self) -> str:
        """What was observed, with Great Expectations' view where it failed."""
        if self.ge_success is False and self.ge_observed:
            return f"{self.observed} [great_expectations: {self.ge_observed}]"
        return self.observed

    def describe(self) -> str:
        """One line for error messages and logs."""
        return f"{self.label}: {self.detail()}"


@dataclass(frozen=True)
class ValidationReport:
    """The structured result of one validation, pass or fail."""

    dataset: str
    rows: int
    ge_rows: int  # rows Great Expectations evaluated
    success: bool
    results: tuple[ExpectationResult, ...]
    sha256: str  # plaintext bytes that were validated
    ciphertext_sha256: str | None = None
    notes: tuple[str, ...] = ()  # whole-dataset remarks, e.g. how the columns differ
    seconds: float = 0.0

    @property
    def failed(self) -> tuple[ExpectationResult, ...]:
        return tuple(r for r in self.results if not r.success)

    def failure_lines(self) -> list[str]:
        return [*self.notes, *(r.describe() for r in self.failed)]

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.success else "FAILED"
        sampled = (
            f"all {self.ge_rows:,} rows"
            if self.ge_rows >= self.rows
            else f"{self.ge_rows:,} rows (seeded sample + offending rows)"
        )
        lines = [
            f"# Validation of `{_md(self.dataset)}`: **{verdict}**",
            "",
            f"{len(self.results)} expectations, {len(self.failed)} failed.",
            "",
            "| | |",
            "|---|---|",
            f"| rows | {self.rows:,} |",
            "| checked on every row by | ballast's vectorised twin of each expectation |",
            f"| Great Expectations evaluated | {sampled} |",
            f"| plaintext sha256 | `{self.sha256}` |",
            f"| ciphertext sha256 | `{self.ciphertext_sha256 or 'n/a'}` |",
            f"| seconds | {self.seconds:.2f} |",
            "",
        ]
        if self.notes:
            lines += [*(f"- {_md(n)}" for n in self.notes), ""]
        if self.failed:
            lines += ["## Failed", ""]
            lines += [f"- `{_md(r.label)}`: {_md(r.detail())}" for r in self.failed]
            lines.append("")
        lines += [
            "## Expectations",
            "",
            "| # | expectation | column | parameters | every row | Great Expectations | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(self.results, 1):
            ge = "n/a" if r.ge_success is None else ("pass" if r.ge_success else "FAIL")
            every = "pass" if r.all_rows_success else "FAIL"
            lines.append(
                f"| {i} | {_md(r.expectation)} | {_md(r.column or '')} | {_md(r.parameters)} "
                f"| {every}: {_md(r.observed)} | {ge}: {_md(r.ge_observed)} "
                f"| {'pass' if r.success else '**FAIL**'} |"
            )
        return "\n".join(lines) + "\n"


class ExpectationsFailed(ValidationFailed):
    """The dataset failed its suite; ``report`` holds every expectation's outcome."""

    def __init__(self, message: str, report: ValidationReport) -> None:
        self.summary = message
        self.report = report
        # Whether its quarantine record was written (None: none was attempted).
        self.quarantined: bool | None = None
        super().__init__(message, report.failure_lines())

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); ours needs the report back, not the formatted text,
        # and any notes added on the way (e.g. a quarantine record that could not be written).
        state: dict[str, Any] = {"quarantined": self.quarantined}
        notes = getattr(self, "__notes__", None)
        if notes:
            state["__notes__"] = notes
        return (type(self), (self.summary, self.report), state)


def _md(text: str) -> str:
    # Keep user-controlled text (column names, messages) inside its table cell.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _num(x: float) -> str:
    if isinstance(x, float) and abs(x) == FLOAT_MAX:  # the default bound, not an observation
        return "max" if x > 0 else "-max"
    return f"{x:.6g}" if isinstance(x, float) else str(x)


# -- engine 1: every row, vectorised ----------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A check's result on every row; ``offenders`` are a few offending row positions."""

    success: bool
    observed: str
    unexpected: int | None = None
    offenders: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


@dataclass
class _ColumnStats:
    nulls: int
    minimum: float
    maximum: float


class _Frame:
    """Per-column statistics computed once and shared by the checks that need them."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.n = len(frame)
        self._stats: dict[str, _ColumnStats] = {}

    def has(self, column: str) -> bool:
        return column in self.frame.columns and isinstance(self.frame[column], pd.Series)

    def series(self, column: str) -> pd.Series:
        return self.frame[column]

    def numeric(self, column: str) -> np.ndarray | None:
        s = self.frame[column]
        if s.dtype.kind not in "iuf":
            return None
        if isinstance(s.dtype, np.dtype):
            return s.to_numpy()
        # pandas' nullable Int64/Float64: nulls become NaN, as in a CSV-parsed float column.
        return s.to_numpy(dtype=np.float64, na_value=np.nan)

    def stats(self, column: str) -> _ColumnStats:
        """Null count and min/max of the non-null values (numeric columns only)."""
        if column in self._stats:
            return self._stats[column]
        v = self.numeric(column)
        assert v is not None
        if self.n == 0:
            st = _ColumnStats(0, math.nan, math.nan)
        elif v.dtype.kind == "f":
            # min/max propagate NaN: one pass each, and a NaN count only when there are NaNs.
            lo, hi = float(v.min()), float(v.max())
            nulls = 0
            if math.isnan(lo) or math.isnan(hi):
                nulls = int(np.count_nonzero(np.isnan(v)))
                if nulls < self.n:
                    lo, hi = float(np.fmin.reduce(v)), float(np.fmax.reduce(v))
            st = _ColumnStats(nulls, lo, hi)
        else:
            st = _ColumnStats(0, float(v.min()), float(v.max()))
        self._stats[column] = st
        return st


def _first(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask)[:_OFFENDERS_PER_CHECK].astype(np.int64)


def _missing(column: str) -> Outcome:
    return Outcome(False, f"column {column!r} is missing")


def _pct(k: int, n: int) -> str:
    return f"{100.0 * k / n:.4g}%" if n else "0%"


def _mostly_ok(considered: int, unexpected: int, mostly: float) -> bool:
    # Great Expectations' own rule (expectation._mostly_success); vacuous on no rows.
    if considered == 0:
        return True
    return (float(considered) - float(unexpected)) / float(considered) >= mostly


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.I)


def _numeric_looking(name: str) -> bool:
    """A name that reads as a value: a number (pandas appends ``.1``, ``.2`` to repeated names),
    or mostly digits, as dates, phone and id numbers are."""
    text = name.strip()
    if _NUMBER.fullmatch(text) or _NUMBER.fullmatch(re.sub(r"\.\d+$", "", text)):
        return True
    alnum = [ch for ch in text if ch.isalnum()]
    return bool(alnum) and 2 * sum(ch.isdigit() for ch in alnum) >= len(alnum)


def _unexpected_names(extra: Sequence[str], actual: Sequence[str]) -> str:
    """A safe summary of the data's column names the spec does not have: their count and a few
    names that do not look like values, truncated. Never the header row when it looks like data."""
    numbers = sum(_numeric_looking(c) for c in actual)
    if 2 * numbers > len(actual):
        return (
            f"{len(extra)} columns, names withheld: the header row looks like data "
            f"({numbers} of {len(actual)} names are numbers)"
        )
    shown = [
        c if len(c) <= _NAME_CHARS else c[: _NAME_CHARS - 1] + "…"
        for c in extra
        if not _numeric_looking(c)
    ][:_MAX_NAMES_SHOWN]
    more = len(extra) - len(shown)
    if not shown:
        return f"{len(extra)} columns, names withheld (they look like values)"
    return f"{shown} and {more} more" if more else f"{shown}"


def _columns_difference(expected: Sequence[str], actual: Sequence[str]) -> str:
    """How the data's columns differ from the spec's (spec names in full, the data's summarised)."""
    known, seen = set(expected), set(actual)
    missing = [c for c in expected if c not in seen]
    extra = [c for c in actual if c not in known]
    parts = []
    if missing and len(missing) == len(expected) > _MAX_NAMES_SHOWN:
        parts.append(f"missing all {len(expected)} columns of the spec")
    elif missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {_unexpected_names(extra, actual)}")
    return ", ".join(parts) or "order differs"


def _columns_ordered(f: _Frame, a: Mapping[str, Any]) -> Outcome:
    expected = [str(c) for c in a["column_list"]]
    actual = [str(c) for c in f.frame.columns]
    if actual == expected:
        return Outcome(True, f"{len(actual)} columns in order")
    return Outcome(False, f"{len(actual)} columns: {_columns_difference(expected, actual)}")


def _row_count(f: _Frame, a: Mapping[str, Any]) -> Outcome:
    ok = a["min_value"] <= f.n <= a["max_value"]
    return Outcome(ok, f"{f.n:,} rows")


def _not_null(f: _Frame, a: Mapping[str, Any]) -> Outcome:
    col = a["column"]
    if not f.has(col):
        return _missing(col)
    # Numeric columns: the null count comes with the min/max pass (no extra pass).
    nulls = f.stats(col).nulls if f.numeric(col) is not None else None
    if nulls is None:
        nulls = int(f.series(col).isna().sum())
    ok = _mostly_ok(f.n, nulls, float(a.get("mostly", 1.0)))
    offenders = np.empty(0, dtype=np.int64)
    if nulls and not ok:
        offenders = _first(f.series(col).isna().to_numpy())
    return Outcome(ok, f"{nulls:,} nulls ({_pct(nulls, f.n)})", nulls, offenders)


def _between(f: _Frame, a: Mapping[str, Any]) -> Outcome:
    col = a["column"]
    if not f.has(col):
        return _missing(col)
    lo, hi = a["min_value"], a["max_value"]
    v = f.numeric(col)
    if v is None:
        return Outcome(False, f"not numeric (dtype {f.series(col).dtype})")
    st = f.stats(col)
    span = f"min {_num(st.minimum)}, max {_num(st.maximum)}"
    if f.n - st.nulls == 0 or (lo <= st.minimum and st.maximum <= hi):
        return Outcome(True, f"0 outside; {span}", 0)
    # NaN compares False both ways, so nulls are ignored as in Great Expectations.
    mask = (v < lo) | (v > hi)
    bad = int(np.count_nonzero(mask))
    ok = _mostly_ok(f.n - st.nulls, bad, float(a.get("mostly", 1.0)))
    return Outcome(ok, f"{bad:,} outside; {span}", bad, _first(mask))


def _in_set(f: _Frame, a: Mapping[str, Any]) -> Outcome:
    col = a["column"]
    if not f.has(col):
        return _missing(col)
    s = f.series(col)
    allowed = list(a["value_set"])
    mask = (~s.isin(allowed) & s.notna()).to_numpy()
    bad = int(np.count_nonzero(mask))
    considered = f.n - int(s.isna().sum()) if bad else f.n
    ok = _mostly_ok(considered, bad, float(a.get("mostly", 1.0)))
    if not bad:
        return Outcome(ok, f"0 outside {allowed}", 0)
    # Categorical values (a label): a few distinct ones say what went wrong.
    distinct = pd.unique(s.to_numpy()[mask])[:_MAX_DISTINCT_SHOWN]
    shown = [x.item() if isinstance(x, np.generic) else x for x in distinct]
    return Outcome(ok, f"{bad:,} outside {allowed}, e.g. {shown}", bad, _first(mask))


def _mean_between(f: _Frame, a: Mapping[str, Any]) -> Outcome:
    col = a["column"]
    if not f.has(col):
        return _missing(col)
    v = f.numeric(col)
    if v is None:
        return Outcome(False, f"not numeric (dtype {f.series(col).dtype})")
    st = f.stats(col)
    if f.n - st.nulls == 0:
        return Outcome(False, "no values")
    mean = float(f.series(col).mean())  # pandas' skipna mean, as Great Expectations uses
    ok = a["min_value"] <= mean <= a["max_value"]
    return Outcome(ok, f"mean {mean:.6g}")


def _in_type_list(f: _Frame, a: Mapping[str, Any]) -> Outcome:
    col = a["column"]
    if not f.has(col):
        return _missing(col)
    allowed = tuple(a["type_list"])
    dtypes = {np.dtype(t) for t in allowed}
    s = f.series(col)
    if s.dtype != np.dtype(object):
        return Outcome(s.dtype in dtypes, f"dtype {s.dtype}")
    # object columns: Great Expectations checks each non-null value's type.
    scalars = tuple(d.type for d in dtypes)
    present = s.notna().to_numpy()
    mask = np.zeros(len(s), dtype=bool)
    mask[present] = [not isinstance(x, scalars) for x in s.to_numpy()[present]]
    bad = int(np.count_nonzero(mask))
    return Outcome(bad == 0, f"dtype object, {bad:,} values of other types", bad, _first(mask))


_K1 = np.uint64(0xBF58476D1CE4E5B9)
_K2 = np.uint64(0x94D049BB133111EB)
_SEED = np.uint64(0x9E3779B97F4A7C15)
_CANONICAL_NAN = np.float64("nan").view(np.uint64)


def row_hashes(
    frame: pd.DataFrame, columns: Sequence[str], nan_free: Collection[str] = ()
) -> np.ndarray:
    """A 64-bit hash per row such that rows pandas considers equal hash equal (0.0 == -0.0,
    NaN == NaN). Collisions only cost an exact re-check, never a wrong answer. ``nan_free`` names
    float columns known to hold no NaN (skips a pass each)."""
    n = len(frame)
    h = np.full(n, _SEED, dtype=np.uint64)
    buf = np.empty(n, dtype=np.float64)
    t = np.empty(n, dtype=np.uint64)
    for col in columns:
        s = frame[col]
        if s.dtype.kind == "f":
            np.add(s.to_numpy(dtype=np.float64, copy=False), 0.0, out=buf)  # -0.0 -> 0.0
            bits = buf.view(np.uint64)
            if col not in nan_free:
                nan = np.isnan(buf)
                if nan.any():
                    bits[nan] = _CANONICAL_NAN
        elif s.dtype.kind in "iub":
            bits = s.to_numpy().astype(np.int64, copy=False).view(np.uint64)
        else:  # anything else: pandas' own equality, through factorize codes
            codes, _ = pd.factorize(s, use_na_sentinel=False)
            bits = codes.astype(np.int64, copy=False).view(np.uint64)
        # Fold the value in, then multiply-xorshift (moves high bits down and low bits up).
        np.bitwise_xor(h, bits, out=h)
        np.multiply(h, _K1, out=h)
        np.right_shift(h, np.uint64(29), out=t)
        np.bitwise_xor(h, t, out=h)
    np.multiply(h, _K2, out=h)
    np.right_shift(h, np.uint64(32), out=t)
    np.bitwise_xor(h, t, out=h)
    return h


def duplicated_rows(
    frame: pd.DataFrame, columns: Sequence[str], nan_free: Collection[str] = ()
) -> np.ndarray:
    """Positions of rows that have an exact duplicate over ``columns`` (pandas'
    ``duplicated(keep=False)``): hash, sort, then an exact pandas check on colliding rows."""
    h = row_hashes(frame, columns, nan_free)
    s = np.sort(h)
    same = s[1:] == s[:-1]
    if not same.any():
        return np.empty(0, dtype=np.int64)
    candidates = np.flatnonzero(np.isin(h, np.unique(s[1:][same])))
    exact = frame.iloc[candidates][list(columns)].duplicated(keep=False).to_numpy()
    return candidates[exact].astype(np.int64)


def _compound_unique(f: _Frame, a: Mapping[str, Any]) -> Outcome:
    columns = [str(c) for c in a["column_list"]]
    missing = [c for c in columns if not f.has(c)]
    if missing:
        return Outcome(False, f"columns missing: {missing}")
    frame = f.frame
    nan_free = [c for c in columns if f.numeric(c) is not None and f.stats(c).nulls == 0]
    considered = f.n
    if f.n and len(nan_free) == 0 and all(f.series(c).isna().any() for c in columns):
        # Great Expectations' default ignore_row_if="all_values_are_missing".
        keep = ~frame[columns].isna().all(axis=1).to_numpy()
        idx = np.flatnonzero(keep)
        frame = frame.iloc[idx]
        considered = int(idx.size)
        dup_rows = idx[duplicated_rows(frame, columns)]
    else:
        dup_rows = duplicated_rows(frame, columns, nan_free)
    bad = int(dup_rows.size)
    ok = _mostly_ok(considered, bad, float(a.get("mostly", 1.0)))
    return Outcome(
        ok,
        f"{bad:,} duplicated rows ({_pct(bad, considered)})",
        bad,
        dup_rows[:_OFFENDERS_PER_CHECK],
    )


_EVALUATORS: dict[str, Callable[[_Frame, Mapping[str, Any]], Outcome]] = {
    "ExpectTableColumnsToMatchOrderedList": _columns_ordered,
    "ExpectTableRowCountToBeBetween": _row_count,
    "ExpectCompoundColumnsToBeUnique": _compound_unique,
    "ExpectColumnValuesToNotBeNull": _not_null,
    "ExpectColumnValuesToBeInSet": _in_set,
    "ExpectColumnMeanToBeBetween": _mean_between,
    "ExpectColumnValuesToBeInTypeList": _in_type_list,
    "ExpectColumnValuesToBeBetween": _between,
}


def evaluate_all_rows(frame: pd.DataFrame, checks: Iterable[Check]) -> list[Outcome]:
    """Every check on every row of ``frame`` (no Great Expectations involved)."""
    f = _Frame(frame)
    out = []
    for check in checks:
        fn = _EVALUATORS.get(check.expectation)
        if fn is None:
            raise ValueError(f"no every-row evaluator for {check.expectation}")
        try:
            out.append(fn(f, check.args))
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            # Data the check cannot even evaluate fails it (closed), as in Great Expectations.
            out.append(Outcome(False, f"could not evaluate ({type(exc).__name__}: {exc})"[:200]))
    return out


# -- engine 2: Great Expectations -----------------------------------------------------------


@dataclass(frozen=True)
class GeResult:
    success: bool
    observed: str


def _ge_exception(info: Any) -> str | None:
    """The first exception message in GE's exception_info, flat or keyed by metric."""
    if not isinstance(info, dict):
        return None
    candidates = [info, *(v for v in info.values() if isinstance(v, dict))]
    for c in candidates:
        if c.get("raised_exception"):
            lines = str(c.get("exception_message") or "").splitlines()
            return (lines[0] if lines else "an exception")[:160]
    return None


def _ge_observed(result: Any) -> str:
    error = _ge_exception(result.exception_info)
    if error is not None:
        return f"could not evaluate ({error})"
    r = result.result or {}
    if "unexpected_count" in r and r["unexpected_count"] is not None:
        count = int(r["unexpected_count"])
        return f"{count:,} unexpected of {int(r.get('element_count') or 0):,}"
    value = r.get("observed_value")
    if isinstance(value, list):
        return f"{len(value)} columns"
    if isinstance(value, float):
        return _num(value)
    return str(value)


def run_great_expectations(
    frame: pd.DataFrame, checks: Sequence[Check], name: str
) -> list[GeResult]:
    """The suite in Great Expectations (ephemeral context), one result per check, in order."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        ctx.data_sources.add_pandas(name=f"{name}-source")
        .add_dataframe_asset(name=name)
        .add_batch_definition_whole_dataframe("whole")
    )
    expectations = [to_gx(c) for c in checks]
    # All at once: suite.add_expectation() re-serialises the whole suite on every call (O(n^2),
    # 2.5 s for this suite's ~96 expectations, more than the validation itself).
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{name}-suite", expectations=expectations))
    position = {str(e.id): i for i, e in enumerate(suite.expectations)}
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name}-validation", data=batch, suite=suite)
    )
    # BASIC: counts and observed values without SUMMARY's per-value tallies (about 35% faster).
    result = definition.run(batch_parameters={"dataframe": frame}, result_format="BASIC")
    out: list[GeResult | None] = [None] * len(checks)
    for r in result.results:
        config = r.expectation_config
        i = position[str(config.id)] if config is not None else -1
        if config is None or config.type != checks[i].type:  # a mix-up would misreport, so refuse
            raise RuntimeError(f"Great Expectations result {config} does not match the suite")
        out[i] = GeResult(bool(r.success), _ge_observed(r))
    missing = [checks[i].label for i, r in enumerate(out) if r is None]
    if missing:
        raise RuntimeError(f"Great Expectations returned no result for {missing}")
    return [r for r in out if r is not None]


def ge_rows(n: int, offenders: Iterable[np.ndarray], sample_rows: int) -> np.ndarray | None:
    """Row positions Great Expectations evaluates: None for all rows when ``n`` is small enough,
    else a seeded random sample plus the offending rows (sorted, so frame order is kept)."""
    if n <= sample_rows:
        return None
    rng = np.random.default_rng(_SAMPLE_SEED)
    picked = rng.choice(n, size=sample_rows, replace=False)
    extra = [o for o in offenders if o.size]
    return np.unique(np.concatenate([picked, *extra])) if extra else np.sort(picked)


def validate_frame(
    frame: pd.DataFrame,
    spec: DatasetSpec,
    *,
    sha256: str = "",
    ciphertext_sha256: str | None = None,
    ge_sample_rows: int = DEFAULT_GE_SAMPLE_ROWS,
) -> ValidationReport:
    """Run the suite on ``frame``: return the report, or raise :class:`ExpectationsFailed`."""
    t0 = time.perf_counter()
    checks = suite_checks(spec)
    every_row = evaluate_all_rows(frame, checks)
    # Never below the row-count minimum: GE's row-count verdict on a sample must not be a lie.
    sample = max(ge_sample_rows, spec.min_rows)
    rows = ge_rows(len(frame), (o.offenders for o in every_row), sample)
    ge_frame = frame if rows is None else frame.take(rows)
    try:
        ge = run_great_expectations(ge_frame, checks, spec.name)
    except Exception as exc:  # GE choking on the data is a failed gate, never a crash
        note = f"Great Expectations could not run ({type(exc).__name__}: {exc})"[:300]
        ge = [GeResult(False, note) for _ in checks]
    results = tuple(
        ExpectationResult(
            expectation=c.type,
            column=c.column,
            parameters=c.parameters(),
            success=o.success and g.success,
            all_rows_success=o.success,
            observed=o.observed,
            unexpected_count=o.unexpected,
            ge_success=g.success,
            ge_observed=g.observed,
        )
        for c, o, g in zip(checks, every_row, ge, strict=True)
    )
    notes = []
    expected = [*spec.features, spec.label]
    actual = [str(c) for c in frame.columns]
    if set(actual) != set(expected):
        # Name the difference, which is what a person needs, ahead of the per-check lines.
        notes.append(f"columns differ from the spec: {_columns_difference(expected, actual)}")
    report = ValidationReport(
        dataset=spec.name,
        rows=len(frame),
        ge_rows=len(ge_frame),
        success=all(r.success for r in results),
        results=results,
        sha256=sha256,
        ciphertext_sha256=ciphertext_sha256,
        notes=tuple(notes),
        seconds=time.perf_counter() - t0,
    )
    if not report.success:
        raise ExpectationsFailed(
            f"dataset {spec.name!r} failed {len(report.failed)} of {len(results)} expectations",
            report,
        )
    return report


def _unreadable_report(
    spec: DatasetSpec, exc: ValidationFailed, sha256: str, ciphertext_sha256: str | None
) -> ValidationReport:
    result = ExpectationResult(
        expectation="parse_csv",
        column=None,
        parameters="pandas.read_csv",
        success=False,
        all_rows_success=False,
        observed="; ".join([exc.message, *exc.failures])[:300],
        unexpected_count=None,
        ge_success=None,
        ge_observed="not run: no frame",
    )
    return ValidationReport(
        dataset=spec.name,
        rows=0,
        ge_rows=0,
        success=False,
        results=(result,),
        sha256=sha256,
        ciphertext_sha256=ciphertext_sha256,
    )


def _overflow_report(
    report: ValidationReport, spec: DatasetSpec, overflow: np.ndarray
) -> ValidationReport:
    """``report`` failed by one more check: feature values that overflow the float32 cast (a
    spec whose declared range goes beyond float32's)."""
    rows = int(np.count_nonzero(overflow.any(axis=1)))
    columns = [spec.features[i] for i in np.flatnonzero(overflow.any(axis=0))]
    shown = f"{columns[:_MAX_DISTINCT_SHOWN]}" + (
        f" and {len(columns) - _MAX_DISTINCT_SHOWN} more"
        if len(columns) > _MAX_DISTINCT_SHOWN
        else ""
    )
    result = ExpectationResult(
        expectation="features_finite_as_float32",
        column=None,
        parameters=f"|value| <= {FLOAT_MAX:.6g} (float32 max)",
        success=False,
        all_rows_success=False,
        observed=f"{rows:,} rows overflow to inf in {len(columns)} columns: {shown}",
        unexpected_count=rows,
        ge_success=None,
        ge_observed="not run: checked after the suite, on the cast",
    )
    return replace(report, success=False, results=(*report.results, result))


def validate_bytes(
    data: bytes,
    spec: DatasetSpec,
    *,
    ciphertext_sha256: str | None = None,
    ge_sample_rows: int = DEFAULT_GE_SAMPLE_ROWS,
) -> ValidatedDataset:
    """Parse and validate plaintext CSV bytes into typed arrays: the only way to get a dataset."""
    digest = sha256_bytes(data)
    try:
        frame = parse_csv(data)
    except ValidationFailed as exc:
        report = _unreadable_report(spec, exc, digest, ciphertext_sha256)
        raise ExpectationsFailed(f"dataset {spec.name!r} could not be parsed", report) from exc
    report = validate_frame(
        frame,
        spec,
        sha256=digest,
        ciphertext_sha256=ciphertext_sha256,
        ge_sample_rows=ge_sample_rows,
    )
    with np.errstate(over="ignore"):  # overflow is checked right below, as a failed gate
        features = frame[list(spec.features)].to_numpy(dtype=np.float32)
    overflow = np.isinf(features)  # finite in float64 (the suite saw to that), not in float32
    if overflow.any():
        report = _overflow_report(report, spec, overflow)
        raise ExpectationsFailed(f"dataset {spec.name!r} has values beyond float32's range", report)
    labels = frame[spec.label].to_numpy(dtype=np.int64)
    return ValidatedDataset(
        name=spec.name,
        features=features,
        labels=labels,
        feature_names=spec.features,
        sha256=digest,
        n_rows=len(frame),
        checks=tuple(r.expectation for r in report.results),
        ciphertext_sha256=ciphertext_sha256,
        report=report,
        n_classes=max(spec.classes) + 1,
    )

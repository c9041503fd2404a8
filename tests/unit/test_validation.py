"""The validation gate: good data becomes typed arrays; each kind of bad data is refused by name.

Every GE-running test also checks that ballast's every-row engine and Great Expectations agree
expectation by expectation (the bundled frame is small enough for GE to see every row), so the
vectorised twin cannot drift from GE's semantics unnoticed.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import asdict, replace

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ballast.data import (
    DatasetSpec,
    bundled_csv_bytes,
    bundled_frame,
    bundled_spec,
    parse_csv,
    sha256_bytes,
)
from ballast.errors import ValidationFailed
from ballast.quarantine import record_for
from ballast.validation import (
    FLOAT_MAX,
    ExpectationsFailed,
    ValidationReport,
    duplicated_rows,
    evaluate_all_rows,
    ge_rows,
    row_hashes,
    suite_checks,
    validate_bytes,
    validate_frame,
)


def _csv(frame: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue().encode()


@pytest.fixture(scope="module")
def spec() -> DatasetSpec:
    return bundled_spec()


def _assert_engines_agree(report: ValidationReport) -> None:
    assert report.ge_rows == report.rows, "GE must have seen every row for a parity check"
    disagree = [
        (r.label, r.observed, r.ge_observed)
        for r in report.results
        if r.ge_success is not r.all_rows_success
    ]
    assert not disagree, f"every-row engine and Great Expectations disagree: {disagree}"


def test_bundled_dataset_passes_and_becomes_typed_arrays(spec: DatasetSpec) -> None:
    data = bundled_csv_bytes()
    ds = validate_bytes(data, spec, ciphertext_sha256="c" * 64)

    assert ds.n_rows == 569
    assert ds.features.shape == (569, 30) and ds.features.dtype == np.float32
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == {0, 1}
    assert ds.sha256 == sha256_bytes(data)
    assert ds.ciphertext_sha256 == "c" * 64
    assert len(ds.checks) > 60, "every feature should have type, null and range checks"
    report = ds.report
    assert report is not None and report.success and not report.failed
    assert len(report.results) == len(suite_checks(spec)) == len(ds.checks)
    assert report.sha256 == ds.sha256 and report.ciphertext_sha256 == "c" * 64
    _assert_engines_agree(report)


def test_report_markdown_lists_every_expectation_with_observed_values(spec: DatasetSpec) -> None:
    ds = validate_bytes(bundled_csv_bytes(), spec)
    assert ds.report is not None
    md = ds.report.to_markdown()

    table = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == len(ds.report.results), "one table row per expectation"
    assert "**PASSED**" in md and ds.sha256 in md
    assert "| expect_column_values_to_be_between | mean_radius |" in md
    assert "569 rows" in md and "mean 0.627" in md, "observed values must be in the report"


def _broken(kind: str) -> pd.DataFrame:
    f = bundled_frame()
    if kind == "null":
        f.loc[3, "mean_radius"] = None
    elif kind == "range":
        f.loc[5, "mean_area"] = -1.0
    elif kind == "label":
        f.loc[7, "label"] = 2
    elif kind == "missing-column":
        f = f.drop(columns=["worst_area"])
    elif kind == "extra-column":
        f["patient_name"] = "x"
    elif kind == "reordered-columns":
        cols = list(f.columns)
        cols[0], cols[1] = cols[1], cols[0]
        f = f[cols]
    elif kind == "type":
        f["mean_texture"] = f["mean_texture"].astype(str)
        f.loc[0, "mean_texture"] = "twelve"
    elif kind == "few-rows":
        f = f.head(20)
    elif kind == "label-balance":
        f = f[f["label"] == 1]
    elif kind == "duplicates":
        f = pd.concat([f, f.head(60)], ignore_index=True)
    elif kind == "nan":
        f.loc[11, "worst_symmetry"] = np.nan
    elif kind == "inf":
        f.loc[12, "mean_perimeter"] = np.inf
    elif kind == "-inf":
        f.loc[13, "mean_smoothness"] = -np.inf
    elif kind == "inf-label":
        f["label"] = f["label"].astype(float)
        f.loc[14, "label"] = np.inf
    else:
        raise AssertionError(kind)
    return f


@pytest.mark.parametrize(
    ("kind", "expect_in_message"),
    [
        ("null", "not_be_null(mean_radius)"),
        ("range", "be_between(mean_area)"),
        ("label", "be_in_set(label)"),
        ("missing-column", "missing ['worst_area']"),
        ("extra-column", "unexpected ['patient_name']"),
        ("reordered-columns", "order differs"),
        ("type", "type_list(mean_texture)"),
        ("few-rows", "row_count"),
        ("label-balance", "mean_to_be_between(label)"),
        ("duplicates", "compound_columns_to_be_unique"),
        ("nan", "not_be_null(worst_symmetry): 1 nulls"),
        ("inf", "be_between(mean_perimeter): 1 outside; min 43.79, max inf"),
        ("-inf", "be_between(mean_smoothness): 1 outside; min -inf"),
        ("inf-label", "be_in_set(label): 1 outside [0, 1], e.g. [inf]"),
    ],
)
def test_each_kind_of_bad_data_is_refused_naming_the_check(
    spec: DatasetSpec, kind: str, expect_in_message: str
) -> None:
    with pytest.raises(ExpectationsFailed) as info:
        validate_bytes(_csv(_broken(kind)), spec)

    assert isinstance(info.value, ValidationFailed) and info.value.stage == "validate"
    assert str(info.value).startswith("[validate] ")
    assert expect_in_message in str(info.value), str(info.value)
    report = info.value.report
    assert not report.success and report.failed
    assert info.value.failures == report.failure_lines()
    _assert_engines_agree(report)


def test_a_feature_without_a_declared_range_must_still_be_finite() -> None:
    # Given a spec that declares no ranges at all.
    frame = bundled_frame()
    loose = replace(bundled_spec(), ranges={})
    frame.loc[3, "mean_radius"] = np.inf
    checks = suite_checks(loose)

    outcomes = dict(zip([c.label for c in checks], evaluate_all_rows(frame, checks), strict=True))

    between = outcomes["expect_column_values_to_be_between(mean_radius)"]
    assert not between.success and between.unexpected == 1
    bounds = {
        (c.args["min_value"], c.args["max_value"])
        for c in checks
        if c.expectation == "ExpectColumnValuesToBeBetween"
    }
    assert bounds == {(-FLOAT_MAX, FLOAT_MAX)}, "every feature gets finite bounds"


def test_the_default_bound_is_float32s_so_a_value_that_would_overflow_the_cast_is_refused() -> None:
    # Given a spec without ranges and a value finite in float64 but beyond float32 (3.4e38).
    loose = replace(bundled_spec(), ranges={})
    frame = bundled_frame()
    frame.loc[3, "mean_radius"] = 1e39

    with pytest.raises(ExpectationsFailed) as info:
        validate_bytes(_csv(frame), loose)

    assert float(np.finfo(np.float32).max) == FLOAT_MAX, "features are float32"
    (failed,) = info.value.report.failed
    assert failed.label == "expect_column_values_to_be_between(mean_radius)", str(info.value)
    assert "max 1e+39" in failed.observed, "an observed maximum is printed, not called 'max'"
    _assert_engines_agree(info.value.report)


def test_features_that_overflow_float32_in_the_cast_are_refused_even_within_a_declared_range(
    spec: DatasetSpec,
) -> None:
    # Given a spec whose declared range goes beyond float32, and values the suite lets through.
    wide = replace(spec, ranges={**spec.ranges, "mean_area": (0.0, 1e300)})
    frame = bundled_frame()
    frame.loc[[5, 9], "mean_area"] = 1e39

    with pytest.raises(ExpectationsFailed, match=r"^\[validate\] .*beyond float32") as info:
        validate_bytes(_csv(frame), wide)

    report = info.value.report
    assert not report.success
    (failed,) = report.failed
    assert failed.expectation == "features_finite_as_float32"
    assert failed.observed == "2 rows overflow to inf in 1 columns: ['mean_area']"
    assert len(report.results) == len(suite_checks(wide)) + 1, "the suite's results are kept"
    assert pickle.loads(pickle.dumps(info.value)).report == report


def _wider_rows(junk: str) -> bytes:
    header, *rows = bundled_csv_bytes().decode().splitlines()
    return (
        "\n".join([header] + [f"{junk.format(i=i)},{r}" for i, r in enumerate(rows)]) + "\n"
    ).encode()


@pytest.mark.parametrize(
    ("junk", "extra"),
    [
        ("999", 1),
        ("Jane Doe", 1),
        ("{i}", 1),  # a row id 0, 1, 2, ...: read as the very index read_csv would make anyway
        ("", 1),
        ("7,Jane Doe", 2),
        ("x,y", 2),
        ("{i},{i}", 2),
    ],
)
def test_rows_with_more_fields_than_the_header_are_refused_not_silently_indexed(
    spec: DatasetSpec, junk: str, extra: int
) -> None:
    # Given every row with `extra` leading fields the header does not name.
    with pytest.raises(ExpectationsFailed, match=r"^\[validate\] .*more fields than") as info:
        validate_bytes(_wider_rows(junk), spec)

    report = info.value.report
    assert [r.expectation for r in report.failed] == ["parse_csv"]
    assert f"the header names 31 columns, the rows carry {extra} more field" in str(info.value)
    assert "Jane" not in str(info.value) and "Jane" not in report.to_markdown()


def test_trailing_delimiters_make_rows_wider_than_the_header() -> None:
    data = b"a,b\n1,2,\n3,4,\n"

    with pytest.raises(ValidationFailed, match="rows carry 1 more field"):
        parse_csv(data)


def _headerless(first_row: list[str]) -> bytes:
    _, _, *rows = bundled_csv_bytes().decode().splitlines()
    return ("\n".join([",".join(first_row), *rows]) + "\n").encode()


@pytest.mark.parametrize(
    ("first_row", "numbers"),
    [
        # A data row with distinctive values (the bundled first row is a patient's too).
        ([f"{17.9912345 + k:.7f}" for k in range(30)] + ["0"], 31),
        (["Jane Doe", "123-45-6789"] + [f"{k + 0.5123}" for k in range(28)] + ["1"], 30),
    ],
)
def test_a_headerless_file_keeps_its_first_row_out_of_report_message_and_quarantine(
    spec: DatasetSpec, first_row: list[str], numbers: int
) -> None:
    # Given a CSV without a header: its first data row is read as the column names.
    with pytest.raises(ExpectationsFailed) as info:
        validate_bytes(_headerless(first_row), spec)

    report = info.value.report
    record = json.dumps(asdict(record_for(report, "s3://bucket/x.csv.enc")))
    texts = {
        "exception": str(info.value),
        "failures": " ".join(info.value.failures),
        "markdown": report.to_markdown(),
        "quarantine record": record,
    }
    for where, text in texts.items():
        leaked = [v for v in first_row if len(v) > 1 and v in text]
        assert not leaked, f"row values {leaked} reached the {where}"
    said = f"the header row looks like data ({numbers} of 31 names are numbers)"
    assert said in str(info.value) and said in report.to_markdown(), str(info.value)
    assert "missing all 31 columns of the spec" in report.notes[0]


def test_unexpected_column_names_are_summarised_a_few_short_non_numeric_ones_only(
    spec: DatasetSpec,
) -> None:
    # Given a proper header plus extra columns, one of them named like a value.
    frame = bundled_frame()
    for name in ["123-45-6789", "patient_name_with_a_long_suffix", "notes", "ward", "zipcode"]:
        frame[name] = 1.0

    with pytest.raises(ExpectationsFailed) as info:
        validate_bytes(_csv(frame), spec)

    message = str(info.value)
    assert "unexpected ['patient_name_with_a_lon…', 'notes', 'ward'] and 2 more" in message
    assert "123-45-6789" not in message and "zipcode" not in message
    assert "123-45-6789" not in info.value.report.to_markdown()


@pytest.mark.parametrize("data", [b"", b"\n", b"\x00\xff\xfe garbage"])
def test_unparseable_or_empty_bytes_are_a_validation_failure_with_a_report(
    spec: DatasetSpec, data: bytes
) -> None:
    with pytest.raises(ExpectationsFailed, match=r"^\[validate\] ") as info:
        validate_bytes(data, spec)

    report = info.value.report
    assert [r.expectation for r in report.failed] == ["parse_csv"]
    assert report.sha256 == sha256_bytes(data)


def test_header_only_csv_has_no_rows(spec: DatasetSpec) -> None:
    header = _csv(bundled_frame().head(0))

    with pytest.raises(ExpectationsFailed, match=r"\[validate\] .*no rows"):
        validate_bytes(header, spec)


def test_the_gate_fails_on_rows_great_expectations_did_not_sample(spec: DatasetSpec) -> None:
    # Given a frame larger than GE's sample, and a spec its row count breaks.
    strict = replace(spec, max_rows=500)

    with pytest.raises(ExpectationsFailed) as info:
        validate_frame(bundled_frame(), strict, ge_sample_rows=100)

    report = info.value.report
    assert report.ge_rows == 100 and report.rows == 569
    (row_count,) = report.failed
    assert row_count.expectation == "expect_table_row_count_to_be_between"
    assert row_count.ge_success is True, "GE saw only 100 rows, within the bounds"
    assert row_count.all_rows_success is False, "the every-row engine saw all 569"


def test_offending_rows_join_the_great_expectations_sample(spec: DatasetSpec) -> None:
    # Given one bad value at a row the seeded sample would most likely miss.
    frame = bundled_frame()
    frame.loc[555, "mean_area"] = -1.0

    sampled = ge_rows(569, [], 100)
    assert sampled is not None and 555 not in sampled

    with pytest.raises(ExpectationsFailed) as info:
        validate_frame(frame, spec, ge_sample_rows=100)

    (bad,) = info.value.report.failed
    assert bad.label == "expect_column_values_to_be_between(mean_area)"
    assert bad.all_rows_success is False and bad.ge_success is False
    assert info.value.report.ge_rows == 101, "100 sampled rows plus the offending one"


def test_the_sample_never_drops_below_the_row_count_minimum(spec: DatasetSpec) -> None:
    report = validate_frame(bundled_frame(), spec, ge_sample_rows=10)

    assert report.success and report.ge_rows == spec.min_rows


def test_ge_rows_is_all_rows_when_small_else_a_seeded_sample_plus_offenders() -> None:
    assert ge_rows(100, [], 100) is None
    a = ge_rows(10_000, [np.array([9_999])], 100)
    b = ge_rows(10_000, [np.array([9_999])], 100)

    assert a is not None and b is not None
    assert np.array_equal(a, b), "the sample is reproducible"
    assert 9_999 in a and len(a) in (100, 101)
    assert np.all(np.diff(a) > 0), "sorted and unique: frame order is kept"


def test_expectations_failed_survives_pickling(spec: DatasetSpec) -> None:
    with pytest.raises(ExpectationsFailed) as info:
        validate_bytes(_csv(_broken("range")), spec)

    again = pickle.loads(pickle.dumps(info.value))

    assert str(again) == str(info.value)
    assert again.report == info.value.report


# -- the every-row engine on its own (no Great Expectations) -----------------------------------


def test_row_hashes_follow_pandas_equality_for_zero_signs_and_nan_payloads() -> None:
    odd_nan = np.array([0x7FF8000000000123], dtype=np.uint64).view(np.float64)[0]
    frame = pd.DataFrame({"a": [0.0, -0.0, np.nan, odd_nan], "b": [1, 1, 2, 2]})

    h = row_hashes(frame, ["a", "b"])

    assert h[0] == h[1] and h[2] == h[3] and h[0] != h[2]
    assert set(duplicated_rows(frame, ["a", "b"])) == {0, 1, 2, 3}
    assert frame.duplicated(keep=False).all(), "pandas agrees these are duplicates"


_cells = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 2.5, np.nan, np.inf]),
    st.integers(-3, 3).map(float),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    rows=st.lists(st.tuples(_cells, _cells, st.sampled_from(["x", "y", None])), max_size=40),
)
def test_duplicated_rows_matches_pandas(rows: list[tuple[float, float, str | None]]) -> None:
    frame = pd.DataFrame(rows, columns=["a", "b", "c"])
    if frame.empty:
        frame = frame.astype({"a": float, "b": float})
    expected = np.flatnonzero(frame.duplicated(keep=False).to_numpy())

    assert np.array_equal(np.sort(duplicated_rows(frame, ["a", "b", "c"])), expected)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=64),
            st.none(),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_every_row_checks_match_a_direct_pandas_reading(values: list[float | None]) -> None:
    # The between/not-null twins, compared with the definition written plainly in pandas.
    s = pd.Series(values, dtype="float64")
    frame = pd.DataFrame({"x": s})
    spec = DatasetSpec(name="t", features=("x",), label="x", ranges={"x": (-5.0, 5.0)})
    checks = [c for c in suite_checks(spec) if c.column == "x" and "Values" in c.expectation]

    got = {c.expectation: o for c, o in zip(checks, evaluate_all_rows(frame, checks), strict=True)}

    nonnull = s.dropna()
    outside = int(((nonnull < -5.0) | (nonnull > 5.0)).sum())
    assert got["ExpectColumnValuesToBeBetween"].unexpected == outside
    assert got["ExpectColumnValuesToBeBetween"].success == (outside == 0)
    assert got["ExpectColumnValuesToNotBeNull"].unexpected == int(s.isna().sum())


def test_values_no_check_can_evaluate_fail_the_gate_instead_of_crashing(
    spec: DatasetSpec,
) -> None:
    # Given a frame (not from CSV) whose label holds an unhashable object.
    frame = bundled_frame()
    frame["label"] = frame["label"].astype(object)
    frame.at[3, "label"] = [1, 2]

    with pytest.raises(ExpectationsFailed) as info:
        validate_frame(frame, spec)

    failed = {r.label: r for r in info.value.report.failed}
    unique = failed["expect_compound_columns_to_be_unique"]
    assert unique.observed.startswith("could not evaluate (TypeError")
    assert unique.ge_observed.startswith("could not evaluate (unhashable")
    assert "expect_column_mean_to_be_between(label)" in failed

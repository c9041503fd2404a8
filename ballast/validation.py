"""The validation gate: a Great Expectations 1.x suite built from a :class:`DatasetSpec`.

Failing data raises :class:`ValidationFailed` listing every broken expectation; passing data comes
back as a :class:`ValidatedDataset` of typed arrays. Great Expectations is imported lazily (its
import costs several seconds) and runs in an ephemeral context: nothing is written to disk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ballast.data import DatasetSpec, ValidatedDataset, parse_csv, sha256_bytes
from ballast.errors import ValidationFailed

_NUMERIC = ["float64", "float32", "int64", "int32"]


def build_expectations(spec: DatasetSpec) -> list[Any]:
    """The suite's expectations, in the order they are reported."""
    import great_expectations as gx

    e = gx.expectations
    columns = [*spec.features, spec.label]
    out: list[Any] = [
        e.ExpectTableColumnsToMatchOrderedList(column_list=columns),
        e.ExpectTableRowCountToBeBetween(min_value=spec.min_rows, max_value=spec.max_rows),
        e.ExpectCompoundColumnsToBeUnique(
            column_list=columns, mostly=1.0 - spec.max_duplicate_fraction
        ),
        e.ExpectColumnValuesToNotBeNull(column=spec.label),
        e.ExpectColumnValuesToBeInSet(column=spec.label, value_set=list(spec.classes)),
        # Label balance: the positive class's share must stay in a plausible band.
        e.ExpectColumnMeanToBeBetween(
            column=spec.label, min_value=spec.label_share[0], max_value=spec.label_share[1]
        ),
    ]
    for col in spec.features:
        out.append(e.ExpectColumnValuesToBeInTypeList(column=col, type_list=_NUMERIC))
        out.append(e.ExpectColumnValuesToNotBeNull(column=col, mostly=1.0 - spec.max_null_fraction))
        if col in spec.ranges:
            lo, hi = spec.ranges[col]
            out.append(e.ExpectColumnValuesToBeBetween(column=col, min_value=lo, max_value=hi))
    return out


def _describe(result: Any) -> str:
    cfg = result.expectation_config
    where = cfg.kwargs.get("column") or ""
    name = f"{cfg.type}({where})" if where else cfg.type
    if result.exception_info and result.exception_info.get("raised_exception"):
        msg = str(result.exception_info.get("exception_message", "")).splitlines()[0][:160]
        return f"{name}: could not evaluate ({msg})"
    r = result.result or {}
    if "unexpected_count" in r:
        sample = r.get("partial_unexpected_list", [])[:3]
        return f"{name}: {r['unexpected_count']} unexpected values, e.g. {sample}"
    return f"{name}: observed {r.get('observed_value')!r}"


def validate_frame(frame: pd.DataFrame, spec: DatasetSpec) -> tuple[str, ...]:
    """Run the suite on ``frame``; return the passed checks or raise ValidationFailed."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        ctx.data_sources.add_pandas(name=f"{spec.name}-source")
        .add_dataframe_asset(name=spec.name)
        .add_batch_definition_whole_dataframe("whole")
    )
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{spec.name}-suite"))
    for expectation in build_expectations(spec):
        suite.add_expectation(expectation)
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"{spec.name}-validation", data=batch, suite=suite)
    )
    result = definition.run(batch_parameters={"dataframe": frame})
    failures = [_describe(r) for r in result.results if not r.success]
    n_failed = len(failures)
    expected = [*spec.features, spec.label]
    missing = [c for c in expected if c not in frame.columns]
    extra = [c for c in frame.columns if c not in expected]
    if missing or extra:
        # GE reports the whole observed list; name the difference, which is what a person needs.
        failures.insert(0, f"columns differ from the spec: missing {missing}, unexpected {extra}")
    if failures or not result.success:
        raise ValidationFailed(
            f"dataset {spec.name!r} failed {n_failed} of {len(result.results)} expectations",
            failures,
        )
    return tuple(r.expectation_config.type for r in result.results if r.expectation_config)


def validate_bytes(data: bytes, spec: DatasetSpec) -> ValidatedDataset:
    """Parse and validate plaintext CSV bytes into typed arrays: the only way to get a dataset."""
    frame = parse_csv(data)
    checks = validate_frame(frame, spec)
    features = frame[list(spec.features)].to_numpy(dtype=np.float32)
    labels = frame[spec.label].to_numpy(dtype=np.int64)
    return ValidatedDataset(
        name=spec.name,
        features=features,
        labels=labels,
        feature_names=spec.features,
        sha256=sha256_bytes(data),
        n_rows=len(frame),
        checks=checks,
    )

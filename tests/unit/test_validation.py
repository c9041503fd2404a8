"""The validation gate: good data becomes typed arrays; each kind of bad data is refused by name."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from ballast.data import bundled_csv_bytes, bundled_frame, bundled_spec, sha256_bytes
from ballast.errors import ValidationFailed
from ballast.validation import validate_bytes


def _csv(frame: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue().encode()


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return bundled_spec()


def test_bundled_dataset_passes_and_becomes_typed_arrays(spec) -> None:  # type: ignore[no-untyped-def]
    data = bundled_csv_bytes()
    ds = validate_bytes(data, spec)
    assert ds.n_rows == 569
    assert ds.features.shape == (569, 30) and ds.features.dtype == np.float32
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == {0, 1}
    assert ds.sha256 == sha256_bytes(data)
    assert len(ds.checks) > 60, "every feature should have type, null and range checks"


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
    elif kind == "type":
        f["mean_texture"] = f["mean_texture"].astype(str)
        f.loc[0, "mean_texture"] = "twelve"
    elif kind == "few-rows":
        f = f.head(20)
    elif kind == "label-balance":
        f = f[f["label"] == 1]
    elif kind == "duplicates":
        f = pd.concat([f, f.head(60)], ignore_index=True)
    return f


@pytest.mark.parametrize(
    ("kind", "expect_in_message"),
    [
        ("null", "not_be_null(mean_radius)"),
        ("range", "be_between(mean_area)"),
        ("label", "be_in_set(label)"),
        ("missing-column", "missing ['worst_area']"),
        ("type", "type_list(mean_texture)"),
        ("few-rows", "row_count"),
        ("label-balance", "mean_to_be_between(label)"),
        ("duplicates", "compound_columns_to_be_unique"),
    ],
)
def test_each_kind_of_bad_data_is_refused_naming_the_check(
    spec, kind: str, expect_in_message: str
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationFailed) as info:
        validate_bytes(_csv(_broken(kind)), spec)
    assert info.value.stage == "validate"
    assert expect_in_message in str(info.value), str(info.value)


def test_unparseable_bytes_are_a_validation_failure_not_a_crash(spec) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationFailed, match=r"\[validate\]"):
        validate_bytes(b"\x00\xff\xfe garbage", spec)

"""Datasets: the bundled public dataset, its spec, and the typed frame that validation produces.

The raw bytes of a dataset are CSV. Nothing downstream of :func:`load_validated` ever sees a frame
that did not pass its expectation suite: decrypt → parse → validate → typed arrays, in that order.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ballast.errors import ValidationFailed

if TYPE_CHECKING:
    from ballast.validation import ValidationReport

LABEL = "label"


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset must look like. The expectation suite is built from this (ballast.validation)."""

    name: str
    features: tuple[str, ...]
    label: str = LABEL
    classes: tuple[int, ...] = (0, 1)
    min_rows: int = 100
    max_rows: int = 10_000_000
    # Inclusive bounds per feature; physical measurements here are non-negative and bounded.
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    max_null_fraction: float = 0.0
    # Share of the positive class (label == classes[-1]) a healthy sample may have.
    label_share: tuple[float, float] = (0.2, 0.8)
    max_duplicate_fraction: float = 0.01


@dataclass(frozen=True)
class ValidatedDataset:
    """Data that passed validation, as typed arrays. Only ballast.validation constructs these."""

    name: str
    features: np.ndarray  # float32 [n, f]
    labels: np.ndarray  # int64 [n]
    feature_names: tuple[str, ...]
    sha256: str  # of the plaintext bytes that were validated
    n_rows: int
    checks: tuple[str, ...]  # the expectations that passed, for the report
    # Lineage: sha256 of the encrypted bytes as read from storage (None if validated from
    # plaintext), and the Prefect artifact holding the validation report (set by the task).
    ciphertext_sha256: str | None = None
    validation_artifact_id: str | None = None
    report: ValidationReport | None = field(default=None, repr=False, compare=False)
    # The classes the dataset's spec declares (its largest + 1): a sample may lack some, and the
    # model must still have one output each. None: as many as the labels show.
    n_classes: int | None = None


def _snake(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def bundled_frame() -> pd.DataFrame:
    """scikit-learn's bundled Wisconsin breast-cancer data (569 rows, 30 features): no download."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.rename(columns=_snake).rename(columns={"target": LABEL})
    return frame.astype({LABEL: "int64"})


def bundled_spec(name: str = "breast-cancer") -> DatasetSpec:
    frame = bundled_frame()
    features = tuple(c for c in frame.columns if c != LABEL)
    # Ranges are deliberately wide (0 .. 4x the observed maximum): they catch unit mistakes and
    # corrupt rows, not natural variation.
    ranges = {c: (0.0, float(frame[c].max()) * 4.0) for c in features}
    return DatasetSpec(name=name, features=features, ranges=ranges)


def bundled_csv_bytes() -> bytes:
    buf = io.StringIO()
    bundled_frame().to_csv(buf, index=False)
    return buf.getvalue().encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_csv(data: bytes) -> pd.DataFrame:
    """Parse plaintext CSV; anything unparseable is a validation failure, not a crash.

    Rows with more fields than the header are refused: pandas would quietly turn their leading
    fields into the frame's index, which no expectation sees and nothing downstream keeps.
    """
    try:
        frame = pd.read_csv(io.BytesIO(data))
        wider = _rows_wider_than_header(data, frame)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValidationFailed("dataset is not readable CSV", [str(exc)]) from exc
    if wider:
        extra = frame.index.nlevels
        raise ValidationFailed(
            "dataset rows have more fields than its header",
            [
                f"the header names {len(frame.columns)} columns, the rows carry {extra} more "
                f"field{'s' if extra != 1 else ''} (leading fields would become an unvalidated "
                "index)"
            ],
        )
    if frame.empty:
        raise ValidationFailed("dataset has no rows")
    return frame


def _rows_wider_than_header(data: bytes, frame: pd.DataFrame) -> bool:
    """Whether ``read_csv`` took leading fields as an index (its rule: the first data row has
    more fields than the header)."""
    index = frame.index
    if not (isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1):
        return True  # without leading fields read_csv always numbers the rows 0, 1, 2, ...
    # Leading fields that happen to read 0, 1, 2, ... (a row id) also make such an index, so ask
    # the tokenizer itself: with no header row, a second record wider than the first is an error
    # (on_bad_lines="error"). Only the first two records are read.
    try:
        pd.read_csv(io.BytesIO(data), header=None, nrows=2, dtype=str, on_bad_lines="error")
    except pd.errors.ParserError:
        return True
    return False

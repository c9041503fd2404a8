"""A second bundled dataset: scikit-learn's 8×8 handwritten digits (1,797 rows, 64 pixels, 10 classes).

Shaped like the breast-cancer data in :mod:`ballast.data` (a CSV of numeric feature columns and an
integer ``label``) so the same encrypt → validate → train path carries it; the image model
(``small-cnn``) reshapes the 64 flat pixels itself, so the serving contract stays
``[batch, features] → logits``.

Meant to move into :mod:`ballast.data` beside ``bundled_frame``/``bundled_spec`` (see the module's
owner); it lives here until then. :func:`bundled_dataset` builds a :class:`ValidatedDataset` from
the packaged arrays without running the expectation suite: for benchmarks, the training CLI and
tests that need trusted, packaged data without paying Great Expectations' import.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import pandas as pd

from ballast.data import LABEL, DatasetSpec, ValidatedDataset, bundled_csv_bytes, sha256_bytes
from ballast.errors import ConfigError

DIGITS = "digits"
BREAST_CANCER = "breast-cancer"
BundledName = Literal["breast-cancer", "digits"]
#: Side of the square digit images; 64 = 8 × 8 features.
DIGITS_SIDE = 8
DIGITS_MAX_PIXEL = 16.0


def digits_frame() -> pd.DataFrame:
    """The digits as a frame: ``pixel_<row>_<col>`` float columns and an int64 ``label``."""
    from sklearn.datasets import load_digits

    frame = load_digits(as_frame=True).frame.rename(columns={"target": LABEL})
    return frame.astype({LABEL: "int64"})


def digits_spec(name: str = DIGITS) -> DatasetSpec:
    features = tuple(c for c in digits_frame().columns if c != LABEL)
    return DatasetSpec(
        name=name,
        features=features,
        classes=tuple(range(10)),
        min_rows=500,
        # Pixel intensities are counts of set bits in a 4×4 block: 0..16, nothing else.
        ranges=dict.fromkeys(features, (0.0, DIGITS_MAX_PIXEL)),
        # The suite checks the label's mean (for binary data, the positive share); ten roughly
        # balanced classes 0..9 average about 4.5, and a band around it catches a lost class.
        label_share=(3.5, 5.5),
    )


def digits_csv_bytes() -> bytes:
    buf = io.StringIO()
    digits_frame().to_csv(buf, index=False)
    return buf.getvalue().encode()


def bundled_dataset(name: BundledName) -> ValidatedDataset:
    """A packaged dataset as typed arrays, hashed over the same CSV bytes ``data prepare`` encrypts.

    No expectation suite runs: the data is scikit-learn's own, not input from outside. Anything
    that reads a dataset from storage must go through :func:`ballast.validation.validate_bytes`.
    """
    from ballast.data import bundled_frame, bundled_spec

    if name == DIGITS:
        frame, raw, spec = digits_frame(), digits_csv_bytes(), digits_spec()
    elif name == BREAST_CANCER:
        frame, raw, spec = bundled_frame(), bundled_csv_bytes(), bundled_spec()
    else:
        raise ConfigError(f"unknown bundled dataset {name!r}; known: {BREAST_CANCER}, {DIGITS}")
    features = tuple(c for c in frame.columns if c != LABEL)
    return ValidatedDataset(
        name=name,
        features=frame[list(features)].to_numpy(dtype=np.float32),
        labels=frame[LABEL].to_numpy(dtype=np.int64),
        feature_names=features,
        sha256=sha256_bytes(raw),
        n_rows=len(frame),
        checks=(),
        n_classes=max(spec.classes) + 1,
    )

"""Does the compiled artefact compute what eager PyTorch computes?

Compared on the real held-out rows and on fresh random rows drawn to their scale (per-feature normal
with the rows' mean and std), because held-out rows alone cover only the data seen so far.

The metric, per row: ``max_j |compiled_j - eager_j| / max(max_j |eager_j|, mean |eager|, floor)``.
The error is measured against the row's largest logit rather than element-wise, so a logit that
happens to sit near zero (a row near the decision boundary) does not turn float rounding into a
huge relative error; the batch's mean absolute logit and a tiny absolute floor keep the denominator
away from zero when a whole row is near zero.

A row where either side has a NaN or an infinity is an infinite error, even where eager PyTorch and
the artefact are non-finite at the same places: matching NaNs cannot show that the two compute the
same thing, and a model that yields non-finite logits on rows drawn to the data's scale is not
fit to serve. So ``passed`` needs a finite maximum relative error within ``rtol``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from ballast.errors import ParityError

if TYPE_CHECKING:
    import torch

    from ballast.runtime import Predictor

#: Lower bound of the denominator: only matters for an all-zero model.
ATOL_FLOOR = 1e-6


@dataclass(frozen=True)
class ParityReport:
    max_abs_err: float
    max_rel_err: float
    rtol: float
    n_rows: int
    n_random: int
    passed: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def relative_errors(
    actual: np.ndarray, reference: np.ndarray, *, atol_floor: float = ATOL_FLOOR
) -> np.ndarray:
    """Per-row relative error of ``actual`` against ``reference`` (see the module docstring)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ParityError(f"compiled output shape {a.shape} differs from eager {b.shape}")
    if a.ndim == 0:
        raise ParityError("expected a batch of outputs, got a scalar")
    if a.ndim != 2:  # one row of outputs per input row
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    # NaN compares false against any tolerance: a non-finite value on either side (the artefact's
    # or eager's) makes its row an infinite error, and is left out of the batch's scale so it
    # cannot turn every other row's error into NaN.
    finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    rel = np.full(len(a), np.inf)
    if finite.any():
        fa, fb = a[finite], b[finite]
        diff = np.abs(fa - fb).max(axis=1)
        scale = np.maximum(np.abs(fb).max(axis=1), max(float(np.abs(fb).mean()), atol_floor))
        rel[finite] = diff / scale
    return rel


def eager_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of the eager model (eval mode, on whatever device it lives) as float32 numpy."""
    import torch

    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device))
    finally:
        model.train(was_training)
    return np.asarray(out.detach().float().cpu().numpy(), dtype=np.float32)


def random_rows(rows: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` rows drawn per feature from a normal with the mean and std of ``rows``."""
    rows = np.asarray(rows, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draw = rng.normal(rows.mean(axis=0), rows.std(axis=0), size=(n, rows.shape[1]))
    return draw.astype(np.float32)


def check_parity(
    model: torch.nn.Module,
    predictor: Predictor,
    rows: np.ndarray,
    *,
    rtol: float,
    n_random: int = 256,
    seed: int = 0,
    n_single: int = 4,
) -> ParityReport:
    """Compare ``predictor`` with eager ``model`` on ``rows``, ``n_random`` random rows, and the
    first ``n_single`` rows sent one at a time (batch 1).

    Raises :class:`ParityError` naming the worst error, where it occurred and the limit; on success
    returns the report (``passed`` is then True).
    """
    if not 0 < rtol < 1:  # NaN fails this too; inf would pass any finite error
        raise ParityError(f"parity tolerance must lie in (0, 1), got {rtol!r}")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or len(rows) == 0:
        raise ParityError(f"parity needs a non-empty [rows, features] array, got {rows.shape}")
    sets = {"held-out": rows}
    if n_random > 0:
        sets["random"] = random_rows(rows, n_random, seed=seed)
    # Batch 1 is what serving sends most, and where a dynamic batch axis or a shape
    # specialisation goes wrong: a few held-out rows, one call each.
    singles = rows[:n_single]
    sets["held-out one at a time"] = singles

    def run(source: str, x: np.ndarray) -> np.ndarray:
        if source == "held-out one at a time":
            return np.concatenate(
                [np.asarray(predictor.predict(x[i : i + 1])) for i in range(len(x))]
            )
        return np.asarray(predictor.predict(x))

    max_abs, max_rel, where = 0.0, 0.0, ""
    for source, x in sets.items():
        if len(x) == 0:
            continue
        reference = eager_logits(model, x)
        actual = run(source, x)
        rel = relative_errors(actual, reference)
        i = int(np.argmax(rel))
        if rel[i] > max_rel or not where:
            max_rel, where = float(rel[i]), f"{source} row {i}"
            if not np.isfinite(reference[i]).all():
                where += ", where eager PyTorch itself is not finite"
        with np.errstate(invalid="ignore"):
            diff = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
            max_abs = max(max_abs, float(np.nan_to_num(diff, nan=np.inf).max()))

    report = ParityReport(
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        rtol=rtol,
        n_rows=len(rows),
        n_random=max(n_random, 0),
        passed=bool(np.isfinite(max_rel)) and max_rel <= rtol,
    )
    if not report.passed:
        err = ParityError(
            f"{predictor.backend} output differs from eager PyTorch: max relative error "
            f"{max_rel:.3g} ({where}) exceeds rtol {rtol:.3g}; max abs error {max_abs:.3g}"
        )
        err.report = report  # type: ignore[attr-defined]  # for callers that log the numbers
        raise err
    return report

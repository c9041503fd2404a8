"""Online anomaly detection on a champion's live metrics: pure functions, no I/O, no clocks.

The champion watchdog (:mod:`ballast.watchdog`, run every few minutes by ``flows/watchdog.py``)
sees one *window* per run: the requests since the last run, with their error rate, the
gateway's recent p99 latency and, where the gateway reports them, the share of each predicted
class. Each metric is one scalar series, watched by one :class:`MetricState`:

Method (robust CUSUM on an EWMA baseline)
-----------------------------------------

1. **Warm-up.** The first ``warmup`` windows with at least ``min_count`` requests set the
   baseline: level = median, scale = 1.4826 × MAD (the median absolute deviation, scaled to
   estimate a standard deviation under normal noise and unmoved by a few wild windows).
   Windows with fewer requests are *insufficient data*: they change nothing.
2. **Standardise.** Each later window's value ``x`` becomes ``z = (x - level) / scale``. For a
   rate or a share the scale is taken at *this* window's ``n`` requests: the recent residuals'
   spread (1.4826 x MAD) is split into the binomial noise of the windows it came from and the
   windows' own wobble ``tau`` beyond it, and put together again as
   ``sqrt(p (1 - p) / n + tau^2)``, so a quiet night's window is judged by its own noise and a
   busy afternoon's by its own (the spread of quiet windows applied to busy ones made a doubled
   error rate read as z 1.3). For a value (latency), the spread itself. The scale is never
   below a floor (a fraction of the level for a value; the binomial noise, kept off p = 0, for
   a rate): without it a metric that never moved (0 errors for an hour) would have scale 0 and
   the first error would page.
3. **Accumulate.** Page's one-sided CUSUM on the clipped score,
   ``S = max(0, S + min(z, z_clip) - k)`` (and the mirror image for metrics that may not move
   either way, such as class shares), breaches when ``S > h``. Clipping bounds what one window can
   add (``z_clip - k`` < ``h``): **one noisy window never pages**; two grossly bad ones in a row
   do, and a small sustained shift adds up over more windows. ``k`` is the slack: drifts below
   ``k`` standard deviations are not worth a page.
4. **Adapt.** A window with ``|z| <= z_update`` moves the EWMA level by ``alpha`` of its
   residual and joins the last ``mad_window`` residuals whose MAD is the scale. Windows beyond
   ``z_update`` on a watched side do not, so a fault does not become the new normal while it
   accumulates. Nor does a window that leaves the CUSUM on its side above ``freeze_share`` of
   ``h`` (5 of 8): a sustained step of two to three standard deviations stays within
   ``z_update``, and learnt window by window it shrank its own score faster than the sum grew,
   so it never paged. In ``benchmarks/anomaly_bench.py`` (two seeds, 120 runs per rate), a
   doubled 1 % error rate went unpaged for 8 h in 19 and 10 runs at 10 and 100 requests/s
   before, 14 and 5 now; a 5-point drift of class shares at 10/s in 16, now 8; false alarms are
   as before (11 in 2,520 simulated days). Freezing earlier pays in false alarms: at any positive
   sum the level stayed low and they came 100 to 400 times as often; at half of ``h``, 15
   instead of 11. When the sum falls back below, learning resumes. A ramp slower than the
   EWMA's memory (about ``1/alpha`` windows) is still partly absorbed, which is what hard
   ceilings are for.
   For a metric watched for increases only (``up``), a window far *below* the level is no fault:
   it moves the level by ``alpha`` of its residual clipped to ``-z_update`` × scale (so the level
   walks down at most ``alpha × z_update`` scales per window and settles on a new, lower plateau
   after a high warm-up, instead of freezing above it for good), but does not join the scale's
   residuals (a run of clipped residuals would inflate the scale, and blind the detector, until
   they left the window).
5. **Hard ceiling** (optional, per metric): a value above an absolute limit in ``hard_consecutive``
   windows in a row breaches even during warm-up (a new champion has no baseline yet). A window
   short of ``min_count`` requests still counts for a ``rate`` when it is conclusive on its own:
   a one-sided binomial test says its errors are too many for a true rate at the ceiling (p <
   ``hard_alpha``), so a champion failing every request at low traffic is caught. Any other
   window breaks the run: "in a row" means consecutive windows, quiet ones included.

References: E. S. Page, "Continuous inspection schemes", Biometrika 41 (1954) (CUSUM);
D. M. Hawkins and D. H. Olwell, *Cumulative Sum Charts and Charting for Quality Improvement*,
Springer 1998 (ARL, the choice of k and h, winsorised scores); S. W. Roberts, "Control chart
tests based on geometric moving averages", Technometrics 1 (1959) (EWMA); P. J. Huber, *Robust
Statistics* (1981) and Rousseeuw & Croux, JASA 88 (1993) (MAD as a robust scale).

State is plain data (:meth:`DetectorState.to_dict` / :meth:`DetectorState.from_dict`), because
each watchdog run is a separate process: the caller persists it between runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "MAD_TO_SD",
    "SCHEMA",
    "DetectorPolicy",
    "DetectorState",
    "MetricSpec",
    "MetricState",
    "MetricVerdict",
    "median",
    "update_metric",
]

#: 1.4826 × MAD estimates the standard deviation of normal noise (1 / Φ⁻¹(0.75)).
MAD_TO_SD = 1.482602218505602
#: Version of the serialised state; a state of another schema is discarded (a fresh warm-up).
SCHEMA = 2  # 2: the request counts of warm-up and residual windows are kept

Kind = Literal["rate", "share", "value"]
Direction = Literal["up", "both"]
Status = Literal["insufficient", "warmup", "ok", "breach"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """How one metric is judged.

    ``kind``: ``rate`` and ``share`` are proportions of a window's requests (binomial noise
    floor); ``value`` is a measurement (latency) whose floor is ``rel_floor`` of its level.
    ``direction``: ``up`` watches increases only (errors, latency); ``both`` also decreases
    (class shares). ``abs_floor``: the scale's absolute minimum. ``hard_ceiling``: see the module.
    """

    name: str
    kind: Kind
    direction: Direction = "up"
    abs_floor: float = 0.0
    rel_floor: float = 0.0
    hard_ceiling: float | None = None


@dataclass(frozen=True, slots=True)
class DetectorPolicy:
    """The detector's knobs. Defaults: tuned with ``benchmarks/anomaly_bench.py`` for a 5-minute
    cadence (see its docstring for the measured false-alarm rate and detection delay)."""

    warmup: int = 12  # windows: one hour at a 5-minute cadence
    min_count: int = 100  # requests in a window for it to count
    alpha: float = 0.05  # EWMA weight of a new window: a memory of about 20 windows
    mad_window: int = 48  # residuals kept for the scale: four hours
    cusum_k: float = 1.5  # slack, in scale units
    cusum_h: float = 8.0  # decision interval
    z_clip: float = 5.0  # a window adds at most z_clip - k (3.5) to the sum: three to reach h
    z_update: float = 3.0  # windows further out do not move the baseline
    # Nor do windows that leave the CUSUM on their side above this share of cusum_h (5 of 8):
    # a shift is well on its way to a page, and learning from it would absorb it first (step
    # 4). 1 or more: never.
    freeze_share: float = 0.625
    hard_consecutive: int = 2  # windows in a row above a hard ceiling
    # A window short of min_count counts above a rate's ceiling only at this significance.
    hard_alpha: float = 1e-3

    def __post_init__(self) -> None:
        if self.warmup < 3 or self.min_count < 1 or self.mad_window < self.warmup:
            raise ValueError("need warmup >= 3, min_count >= 1 and mad_window >= warmup")
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must lie in (0, 1]")
        if not (0 <= self.cusum_k < self.z_clip and self.cusum_h > 0 and self.z_update > 0):
            raise ValueError("need 0 <= cusum_k < z_clip, cusum_h > 0 and z_update > 0")
        if self.z_clip - self.cusum_k >= self.cusum_h:
            raise ValueError("z_clip - cusum_k must stay below cusum_h: one window must not page")
        if self.hard_consecutive < 1:
            raise ValueError("hard_consecutive must be >= 1")
        if not 0 < self.hard_alpha < 0.5:
            raise ValueError("hard_alpha must be in (0, 0.5)")
        if not self.freeze_share >= 0:
            raise ValueError("freeze_share must be >= 0 (1 or more: never freeze)")


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median of nothing")
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2.0


def _mad_scale(residuals: list[float]) -> float:
    """1.4826 × the median absolute residual (residuals are already deviations from the level)."""
    return MAD_TO_SD * median([abs(r) for r in residuals]) if residuals else 0.0


@dataclass(frozen=True, slots=True)
class MetricState:
    """One metric's baseline and accumulators. ``level`` is None until the warm-up is over."""

    warm: tuple[float, ...] = ()
    warm_counts: tuple[int, ...] = ()  # each warm-up window's requests
    level: float | None = None
    residuals: tuple[float, ...] = ()
    residual_counts: tuple[int, ...] = ()  # each residual window's requests (see _scale)
    cusum_hi: float = 0.0
    cusum_lo: float = 0.0
    hard_run: int = 0
    windows: int = 0  # windows that counted (enough requests)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["warm"], d["residuals"] = list(self.warm), list(self.residuals)
        d["warm_counts"], d["residual_counts"] = list(self.warm_counts), list(self.residual_counts)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricState:
        level = d.get("level")
        return cls(
            warm=tuple(float(v) for v in d.get("warm", ())),
            warm_counts=tuple(int(v) for v in d.get("warm_counts", ())),
            level=None if level is None else float(level),
            residuals=tuple(float(v) for v in d.get("residuals", ())),
            residual_counts=tuple(int(v) for v in d.get("residual_counts", ())),
            cusum_hi=float(d.get("cusum_hi", 0.0)),
            cusum_lo=float(d.get("cusum_lo", 0.0)),
            hard_run=int(d.get("hard_run", 0)),
            windows=int(d.get("windows", 0)),
        )


@dataclass(frozen=True, slots=True)
class MetricVerdict:
    """What one window did to one metric: the evidence a report shows."""

    metric: str
    status: Status
    value: float | None
    count: int
    baseline: float | None = None
    scale: float | None = None
    z: float | None = None
    cusum: float = 0.0
    threshold: float = 0.0  # the CUSUM's h, or the hard ceiling when that is what breached
    reason: str = ""
    rule: Literal["", "cusum", "hard_ceiling"] = ""  # what breached, when it did

    @property
    def severity(self) -> float:
        """How far past its threshold a breach is (1 = just at it); 0 when not breached.

        A hard ceiling at or below 0 has no ratio to measure the excess by: any breach of it is
        ``inf``, the most severe (the watchdog reports the most severe breach).
        """
        if not self.breached:
            return 0.0
        measure = self.cusum if self.rule == "cusum" else (self.value or 0.0)
        return measure / self.threshold if self.threshold > 0 else math.inf

    @property
    def breached(self) -> bool:
        return self.status == "breach"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _binomial_sd(level: float, count: int) -> float:
    """The sd of a proportion ``level`` over ``count`` requests; p is kept off 0 and 1 so that a
    metric that never moved still has a finite scale (one event in ``count`` is about 1 sd)."""
    n = max(count, 1)
    p = min(max(level, 1.0 / n), 1.0 - 1.0 / n)
    return math.sqrt(p * (1.0 - p) / n)


def _scale(
    spec: MetricSpec, level: float, count: int, residuals: list[float], counts: list[int]
) -> float:
    """The sd a window of ``count`` requests is judged by: 1.4826 x the MAD of the recent
    residuals, and for a rate or a share that spread taken apart into the binomial noise of
    the windows it came from and the windows' own wobble beyond it (``tau``, the same at any
    traffic), put together again at this window's traffic: sqrt(binomial(count)^2 + tau^2).

    So a busy window is judged by a busy window's noise and a quiet night's by its own. Before,
    the MAD was applied as it was: four hours of quiet night windows (their spread mostly
    binomial noise of ~150 requests) set the scale of the busy morning's windows of 2000, and an
    error rate four times the baseline read as z 0.5. Never below the metric's floors."""
    spread = _mad_scale(residuals)
    if spec.kind in ("rate", "share"):
        own = _binomial_sd(level, count)
        if len(counts) == len(residuals) and counts:
            pool = median([_binomial_sd(level, c) ** 2 for c in counts])
            tau2 = max(0.0, spread * spread - pool)
            noise = math.sqrt(own * own + tau2)
        else:  # residuals without their counts: the old rule
            noise = max(spread, own)
    else:
        noise = spread
    return max(spec.abs_floor, spec.rel_floor * abs(level), noise, 1e-12)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _hard_breach(
    spec: MetricSpec, value: float, count: int, hard_run: int, note: str
) -> MetricVerdict:
    assert spec.hard_ceiling is not None
    return MetricVerdict(
        spec.name,
        "breach",
        value,
        count,
        threshold=spec.hard_ceiling,
        reason=f"{spec.name} {_fmt(value)} above the hard ceiling {_fmt(spec.hard_ceiling)} "
        f"for {hard_run} windows ({note})",
        rule="hard_ceiling",
    )


def _conclusively_above(spec: MetricSpec, value: float | None, count: int, alpha: float) -> bool:
    """A short window of a ``rate`` whose errors a true rate at the hard ceiling would produce
    with probability below ``alpha`` (one-sided binomial test)."""
    if spec.kind != "rate" or spec.hard_ceiling is None or value is None or count < 1:
        return False
    if not math.isfinite(value) or value <= spec.hard_ceiling:
        return False
    from scipy.stats import binom

    errors = round(value * count)
    return bool(binom.sf(errors - 1, count, spec.hard_ceiling) < alpha)


def update_metric(
    state: MetricState,
    spec: MetricSpec,
    value: float | None,
    count: int,
    policy: DetectorPolicy,
    overlap: float = 0.0,
) -> tuple[MetricState, MetricVerdict]:
    """One window of one metric: the new state and the verdict. Pure.

    ``overlap``: the share of this window's value that came from requests the previous window's
    value already covered (the gateway's p99 spans its last 2048 requests, more than one window
    at low traffic). Overlapping windows are correlated, and a CUSUM sums them: the scale is
    inflated by sqrt((1 + r) / (1 - r)), the long-run factor of an AR(1) series with
    correlation r (capped at 0.9), so correlation alone does not accumulate into a breach.
    """
    if value is None or not math.isfinite(value) or count < policy.min_count:
        if value is None:
            why = "no value"
        elif not math.isfinite(value):
            why = f"non-finite value ({value})"
        else:
            why = f"{count} requests < {policy.min_count}"
        if _conclusively_above(spec, value, count, policy.hard_alpha):
            assert spec.hard_ceiling is not None and value is not None
            hard_run = state.hard_run + 1
            new = replace(state, hard_run=hard_run)
            if hard_run >= policy.hard_consecutive:
                why = f"{why}, but conclusive: binomial p < {policy.hard_alpha:g}"
                return new, _hard_breach(spec, value, count, hard_run, why)
            return new, MetricVerdict(
                spec.name, "insufficient", value, count, reason=f"{why}; above the hard ceiling"
            )
        # Not evidence of a breach: a run of windows above the ceiling is broken here.
        return replace(state, hard_run=0), MetricVerdict(
            spec.name, "insufficient", value, count, reason=why
        )

    # Hard ceiling first: it needs no baseline.
    hard_run = (
        state.hard_run + 1 if (spec.hard_ceiling is not None and value > spec.hard_ceiling) else 0
    )
    hard_breach = spec.hard_ceiling is not None and hard_run >= policy.hard_consecutive

    if state.level is None:
        warm = (*state.warm, value)
        counts = (*state.warm_counts, count)
        if len(counts) != len(warm):  # values without their counts: start the warm-up again
            warm, counts = (value,), (count,)
        if len(warm) < policy.warmup:
            new = replace(
                state, warm=warm, warm_counts=counts, hard_run=hard_run, windows=state.windows + 1
            )
            if hard_breach:
                return new, _hard_breach(spec, value, count, hard_run, "baseline warming up")
            return new, MetricVerdict(
                spec.name,
                "warmup",
                value,
                count,
                reason=f"warm-up {len(warm)}/{policy.warmup}",
            )
        level = median(list(warm))
        residuals = tuple(w - level for w in warm)
        new = MetricState(
            warm=(),
            level=level,
            residuals=residuals,
            residual_counts=counts,
            hard_run=hard_run,
            windows=state.windows + 1,
        )
        scale = _scale(spec, level, count, list(residuals), list(counts))
        status: Status = "breach" if hard_breach else "ok"
        reason = "baseline set" if not hard_breach else f"{spec.name} above the hard ceiling"
        return new, MetricVerdict(
            spec.name,
            status,
            value,
            count,
            baseline=level,
            scale=scale,
            z=0.0,
            threshold=(
                spec.hard_ceiling
                if hard_breach and spec.hard_ceiling is not None
                else policy.cusum_h
            ),
            reason=reason,
            rule="hard_ceiling" if hard_breach else "",
        )

    level = state.level
    r = min(max(overlap, 0.0), 0.9)
    inflation = math.sqrt((1.0 + r) / (1.0 - r))
    scale = (
        _scale(spec, level, count, list(state.residuals), list(state.residual_counts)) * inflation
    )
    z = (value - level) / scale
    zc = max(min(z, policy.z_clip), -policy.z_clip)
    hi = max(0.0, state.cusum_hi + zc - policy.cusum_k)
    lo = max(0.0, state.cusum_lo - zc - policy.cusum_k) if spec.direction == "both" else 0.0
    residuals, counts = state.residuals, state.residual_counts
    resid = value - level
    building = (hi if z >= 0 else lo) > policy.freeze_share * policy.cusum_h
    if abs(z) <= policy.z_update and not building:
        level = level + policy.alpha * resid
        residuals = (*residuals, resid)[-policy.mad_window :]
        counts = (*counts, count)[-policy.mad_window :]
    elif spec.direction == "up" and z < 0:
        # Far below an up-only metric's level: no fault, so the level follows, one clipped step
        # at a time; the scale does not learn from it (see step 4 of the module docstring).
        level = level + policy.alpha * max(resid, -policy.z_update * scale)
    new = MetricState(
        warm=(),
        level=level,
        residuals=residuals,
        residual_counts=counts,
        cusum_hi=hi,
        cusum_lo=lo,
        hard_run=hard_run,
        windows=state.windows + 1,
    )
    cusum = max(hi, lo)
    side = "above" if hi >= lo else "below"
    if cusum > policy.cusum_h:
        return new, MetricVerdict(
            spec.name,
            "breach",
            value,
            count,
            baseline=state.level,
            scale=scale,
            z=z,
            cusum=cusum,
            threshold=policy.cusum_h,
            reason=f"{spec.name} {_fmt(value)} {side} its baseline {_fmt(state.level)} "
            f"(z={z:.1f}, CUSUM {cusum:.1f} > {policy.cusum_h:g})",
            rule="cusum",
        )
    if hard_breach:
        assert spec.hard_ceiling is not None
        return new, MetricVerdict(
            spec.name,
            "breach",
            value,
            count,
            baseline=state.level,
            scale=scale,
            z=z,
            cusum=cusum,
            threshold=spec.hard_ceiling,
            reason=f"{spec.name} {_fmt(value)} above the hard ceiling {_fmt(spec.hard_ceiling)} "
            f"for {hard_run} windows",
            rule="hard_ceiling",
        )
    return new, MetricVerdict(
        spec.name,
        "ok",
        value,
        count,
        baseline=state.level,
        scale=scale,
        z=z,
        cusum=cusum,
        threshold=policy.cusum_h,
    )


@dataclass(frozen=True, slots=True)
class DetectorState:
    """Everything the watchdog keeps between runs for one model.

    ``version``: the champion the baseline belongs to (a new champion starts a fresh warm-up).
    ``snapshot``: the gateway's cumulative counters at the last run, to take differences from.
    ``metrics``: one :class:`MetricState` per metric name.
    """

    model: str
    version: str | None = None
    snapshot: dict[str, Any] | None = None
    metrics: dict[str, MetricState] = field(default_factory=dict)
    checks: int = 0
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "version": self.version,
            "snapshot": self.snapshot,
            "checks": self.checks,
            "metrics": {k: v.to_dict() for k, v in sorted(self.metrics.items())},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], model: str) -> DetectorState:
        """The state in ``d``, or a fresh one when ``d`` is another model's or another schema's."""
        # Schema 1 had no request counts: its residuals are judged by the old rule until
        # counted ones replace them (see _scale), its baseline and snapshot kept.
        if d.get("schema") not in (1, SCHEMA) or d.get("model") != model:
            return cls(model=model)
        snap = d.get("snapshot")
        return cls(
            model=model,
            version=None if d.get("version") is None else str(d["version"]),
            snapshot=dict(snap) if isinstance(snap, Mapping) else None,
            metrics={str(k): MetricState.from_dict(v) for k, v in d.get("metrics", {}).items()},
            checks=int(d.get("checks", 0)),
        )

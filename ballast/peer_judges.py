"""Peers' canary rules as judges, for side-by-side comparison (``ballast canary simulate``).

Both follow the :class:`~ballast.judge.StreamJudge` protocol and are pure (no I/O, no clocks).
Each :meth:`judge` call is one of their periodic checks over the traffic seen since the previous
call, so the caller sets their cadence by how often it asks (Flagger's ``interval``, Kayenta's
analysis interval; 60 s in the simulator).

* :class:`FlaggerJudge`: Flagger's built-in checks (fluxcd/flagger ``analysis``): request
  success rate >= 99 % and p99 latency <= 500 ms over the interval, on the canary alone (no
  baseline); the canary is rolled back once ``threshold`` checks failed (the count is never
  reset) and promoted after ``iterations`` passed ones (``maxWeight / stepWeight``; a failed
  check holds the weight, as Flagger does).
* :class:`KayentaJudge`: the Netflix ACA judge of spinnaker/kayenta on a fixed window: per metric
  a Mann-Whitney confidence interval for the canary-minus-baseline shift at 98 %, "High" when its
  lower end exceeds 0.25 x the Hodges-Lehmann estimate's magnitude and the canary's mean is
  higher; score = share of metrics that pass; a failing critical metric scores 0; below the
  marginal score (75) the canary fails, at or above the pass score (95) it may go on to 100 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ballast.judge import (
    READY_KEY,
    ObservationBatch,
    StreamJudgeBase,
    Verdict,
    VersionStats,
)

__all__ = ["FlaggerJudge", "KayentaJudge", "MannWhitneyShift", "mann_whitney_shift"]


def _check_weight(step_weight: int) -> None:
    if not 0 < step_weight <= 100:
        raise ValueError(f"step_weight must lie in 1..100, got {step_weight}")


class FlaggerJudge(StreamJudgeBase):
    """Flagger's default analysis as a judge (see the module docstring).

    A check with no canary traffic fails, as a Flagger metric query that finds no values does.
    """

    def __init__(
        self,
        *,
        min_success_rate: float = 0.99,
        max_p99_ms: float = 500.0,
        threshold: int = 5,
        iterations: int = 5,
    ) -> None:
        super().__init__()
        if not 0 < min_success_rate <= 1 or not max_p99_ms > 0:
            raise ValueError("min_success_rate must lie in (0, 1] and max_p99_ms be > 0")
        if threshold < 1 or iterations < 1:
            raise ValueError("threshold and iterations must be >= 1")
        self.min_success_rate = min_success_rate
        self.max_p99_ms = max_p99_ms
        self.threshold = threshold
        self.iterations = iterations
        self._reset()

    def _reset(self) -> None:
        self.failed_checks = 0
        self.passed_checks = 0
        self._ok: list[np.ndarray] = []
        self._latency: list[np.ndarray] = []

    def observe_batch(self, batch: ObservationBatch, step_weight: int) -> None:
        _check_weight(step_weight)
        self._ok.append(batch.ok[batch.canary])
        self._latency.append(batch.latency_s[batch.canary])

    def judge(
        self, baseline: VersionStats | None, canary: VersionStats, step_weight: int
    ) -> Verdict:
        """One check over the canary's traffic since the previous call."""
        _check_weight(step_weight)
        if step_weight >= 100 and self.passed_checks >= self.iterations:
            # Flagger promotes right after the passing check at maxWeight; 100 % is the
            # promotion itself, not another interval of analysis.
            self._ok, self._latency = [], []
            ev = self._evidence(step_weight, 0, 0.0, -1.0, canary)
            return Verdict("promote", (f"{self.passed_checks} passed checks",), ev)
        ok = np.concatenate(self._ok) if self._ok else np.zeros(0, dtype=bool)
        latency = np.concatenate(self._latency) if self._latency else np.zeros(0)
        self._ok, self._latency = [], []
        n = int(ok.size)
        rate = float(ok.mean()) if n else 0.0
        p99 = float(np.percentile(latency[ok], 99) * 1000.0) if ok.any() else math.inf
        failures = []
        if n == 0:
            failures.append("no canary requests in the interval")
        else:
            if rate < self.min_success_rate:
                failures.append(f"success rate {rate:.2%} < {self.min_success_rate:.0%}")
            if p99 > self.max_p99_ms:
                failures.append(f"p99 {p99:.0f} ms > {self.max_p99_ms:.0f} ms")
        if failures:
            self.failed_checks += 1
        else:
            self.passed_checks += 1
        ev = self._evidence(step_weight, n, rate, p99 if math.isfinite(p99) else -1.0, canary)
        head = f"check {self.failed_checks + self.passed_checks}: " + (
            "; ".join(failures) if failures else "passed"
        )
        if self.failed_checks >= self.threshold:
            return Verdict("rollback", (f"{self.failed_checks} failed checks", head), ev)
        if self.passed_checks >= self.iterations and step_weight >= 100:
            return Verdict("promote", (f"{self.passed_checks} passed checks", head), ev)
        return Verdict("continue", (head,), ev)

    def _evidence(
        self, step_weight: int, n: int, rate: float, p99_ms: float, canary: VersionStats
    ) -> dict[str, float]:
        return {
            "step_weight": float(step_weight),
            "check_n": float(n),
            "check_success_rate": rate,
            "check_p99_ms": p99_ms,
            "min_success_rate": self.min_success_rate,
            "max_p99_ms": self.max_p99_ms,
            "failed_checks": float(self.failed_checks),
            "passed_checks": float(self.passed_checks),
            "threshold": float(self.threshold),
            "iterations": float(self.iterations),
            READY_KEY: float(self.passed_checks >= self.iterations),
            **canary.as_evidence("canary"),
        }


@dataclass(frozen=True, slots=True)
class MannWhitneyShift:
    """Hodges-Lehmann estimate of the shift ``x - y`` and its distribution-free interval."""

    estimate: float
    lower: float
    upper: float


def mann_whitney_shift(x: np.ndarray, y: np.ndarray, conf_level: float) -> MannWhitneyShift:
    """The shift interval that inverts the Mann-Whitney U test (Bauer 1972; R's ``wilcox.test``
    with ``conf.int``, normal approximation): order statistics ``k`` and ``nm - k + 1`` of the
    ``nm`` pairwise differences, ``k = floor(nm/2 - z sqrt(nm(n+m+1)/12))``."""
    from scipy import stats  # only the comparison judge needs it

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples need at least one value")
    diffs = np.sort((x[:, None] - y[None, :]).ravel())
    n, m = x.size, y.size
    z = float(stats.norm.ppf(1 - (1 - conf_level) / 2))
    k = math.floor(n * m / 2 - z * math.sqrt(n * m * (n + m + 1) / 12))
    k = min(max(k, 0), diffs.size - 1)
    return MannWhitneyShift(
        estimate=float(np.median(diffs)),
        lower=float(diffs[k]),
        upper=float(diffs[diffs.size - 1 - k]),
    )


class KayentaJudge(StreamJudgeBase):
    """Kayenta-style fixed-window Mann-Whitney judgement (see the module docstring).

    Each window's metric series: the canary's requests split into ``points`` consecutive buckets
    (at least ``min_bucket`` requests each) and as many champion buckets of the same size from
    the window's latest champion requests (Kayenta's advice: a baseline as large as the canary).
    Metrics: ``error_rate`` (critical), ``latency_p99`` (of successful requests) and, when labels
    arrive, ``miss_rate``; direction "increase" for all.
    """

    def __init__(
        self,
        *,
        conf_level: float = 0.98,
        tolerance: float = 0.25,
        pass_score: float = 95.0,
        marginal_score: float = 75.0,
        points: int = 30,
        min_bucket: int = 5,
        critical: tuple[str, ...] = ("error_rate",),
    ) -> None:
        super().__init__()
        if not 0.5 < conf_level < 1 or tolerance < 0:
            raise ValueError("conf_level must lie in (0.5, 1) and tolerance be >= 0")
        if not 0 <= marginal_score <= pass_score <= 100:
            raise ValueError("need 0 <= marginal_score <= pass_score <= 100")
        if points < 3 or min_bucket < 1:
            raise ValueError("points must be >= 3 and min_bucket >= 1")
        self.conf_level = conf_level
        self.tolerance = tolerance
        self.pass_score = pass_score
        self.marginal_score = marginal_score
        self.points = points
        self.min_bucket = min_bucket
        self.critical = critical
        self._reset()

    def _reset(self) -> None:
        self._batches: list[ObservationBatch] = []
        self.last_score: float | None = None
        self.windows = 0

    def observe_batch(self, batch: ObservationBatch, step_weight: int) -> None:
        _check_weight(step_weight)
        self._batches.append(batch)

    @staticmethod
    def _series(
        ok: np.ndarray, latency: np.ndarray, correct: np.ndarray, buckets: int, size: int
    ) -> dict[str, np.ndarray]:
        take = buckets * size
        ok, latency, correct = ok[-take:], latency[-take:], correct[-take:]
        err, p99, miss = [], [], []
        for i in range(buckets):
            sl = slice(i * size, (i + 1) * size)
            o = ok[sl]
            err.append(1.0 - o.mean())
            good = latency[sl][o]
            p99.append(float(np.percentile(good, 99)) if good.size else math.nan)
            lab = correct[sl][o]
            lab = lab[lab >= 0]
            miss.append(float((lab == 0).mean()) if lab.size else math.nan)
        return {
            "error_rate": np.array(err),
            "latency_p99": np.array(p99),
            "miss_rate": np.array(miss),
        }

    def _classify(self, canary: np.ndarray, baseline: np.ndarray) -> str:
        c = canary[~np.isnan(canary)]
        b = baseline[~np.isnan(baseline)]
        if c.size == 0 or b.size == 0:
            return "Nodata"
        if np.array_equal(np.sort(c), np.sort(b)) or np.unique(np.concatenate([c, b])).size == 1:
            return "Pass"
        shift = mann_whitney_shift(c, b, self.conf_level)
        bound = self.tolerance * abs(shift.estimate)
        # Kayenta's effect-size check: the canary's mean must be at least the baseline's.
        if shift.lower > bound and c.mean() >= b.mean():
            return "High"
        return "Pass"

    def judge(
        self, baseline: VersionStats | None, canary: VersionStats, step_weight: int
    ) -> Verdict:
        """Judge the window since the previous call (a window without both arms keeps the last
        score)."""
        _check_weight(step_weight)
        batches, self._batches = self._batches, []
        ev: dict[str, float] = {
            "step_weight": float(step_weight),
            "conf_level": self.conf_level,
            "tolerance": self.tolerance,
            "pass_score": self.pass_score,
            "marginal_score": self.marginal_score,
            **canary.as_evidence("canary"),
        }
        if baseline is not None:
            ev.update(baseline.as_evidence("baseline"))
        window = _concat(batches)
        can, cham = window.canary, ~window.canary
        n_c, n_b = int(np.count_nonzero(can)), int(np.count_nonzero(cham))
        size = max(self.min_bucket, n_c // self.points)
        buckets = min(self.points, n_c // size, n_b // size)
        reasons: list[str] = []
        if buckets >= 3:
            self.windows += 1
            cs = self._series(
                window.ok[can], window.latency_s[can], window.correct[can], buckets, size
            )
            bs = self._series(
                window.ok[cham], window.latency_s[cham], window.correct[cham], buckets, size
            )
            labels = {name: self._classify(cs[name], bs[name]) for name in cs}
            judged = [k for k, v in labels.items() if v != "Nodata"]
            passed = [k for k in judged if labels[k] == "Pass"]
            score = 100.0 * len(passed) / len(judged) if judged else 0.0
            critical = [k for k in judged if labels[k] != "Pass" and k in self.critical]
            if critical:
                score = 0.0
            self.last_score = score
            ev.update({f"{k}_high": float(v == "High") for k, v in labels.items() if v != "Nodata"})
            ev.update({"window_buckets": float(buckets), "bucket_size": float(size)})
            reasons.append(
                f"window {self.windows}: score {score:.0f} ("
                + ", ".join(f"{k} {v}" for k, v in labels.items())
                + ")"
            )
        else:
            reasons.append("window without enough traffic on both arms: last score kept")
        ev["windows"] = float(self.windows)
        ready = self.last_score is not None and self.last_score >= self.pass_score
        ev[READY_KEY] = float(ready)
        if self.last_score is not None:
            ev["score"] = self.last_score
        if self.last_score is not None and self.last_score < self.marginal_score:
            return Verdict("rollback", (f"score {self.last_score:.0f} < marginal", *reasons), ev)
        if step_weight >= 100:
            if ready:
                return Verdict("promote", (f"score {self.last_score:.0f} >= pass", *reasons), ev)
            return Verdict("rollback", ("final score below pass", *reasons), ev)
        return Verdict("continue", tuple(reasons), ev)


def _concat(batches: list[ObservationBatch]) -> ObservationBatch:
    if not batches:
        empty = np.zeros(0)
        return ObservationBatch(
            empty.astype(bool),
            empty.astype(bool),
            empty,
            empty.astype(np.int8),
            empty.astype(np.int64),
        )
    return ObservationBatch(
        canary=np.concatenate([b.canary for b in batches]),
        ok=np.concatenate([b.ok for b in batches]),
        latency_s=np.concatenate([b.latency_s for b in batches]),
        correct=np.concatenate([b.correct for b in batches]),
        prediction=np.concatenate([b.prediction for b in batches]),
    )

"""Canary analysis: per-version statistics from observed requests, and the judges that read them.

Pure: no I/O, no clocks. The controller in :mod:`ballast.canary` gathers :class:`Observation`
records, summarises each side with :class:`VersionStats` and asks a :class:`Judge` for a
:class:`Verdict`.

* :class:`ThresholdJudge`: the foundation judge (fixed thresholds, a minimum-sample rule), called
  once per step on cumulative statistics.
* :class:`SequentialJudge`: an always-valid sequential test per metric (error rate, latency
  tail, accuracy, prediction mix) against the champion serving at the same time, with a bounded
  false-rollback rate however often it is asked (the statistics are in
  :mod:`ballast.sequential`). It is a :class:`StreamJudge`: besides the :class:`Judge` call it
  takes the time-ordered observations (:meth:`StreamJudge.observe`), which the controller feeds
  it batch by batch.

A stream judge is stateful: :meth:`StreamJudge.start` begins a canary and forgets the last one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

from ballast import sequential as sq

if TYPE_CHECKING:
    from ballast.settings import Settings

__all__ = [
    "READY_KEY",
    "UNKNOWN_VERSION",
    "Decision",
    "Judge",
    "MetricPolicy",
    "Observation",
    "ObservationBatch",
    "SequentialConfig",
    "SequentialJudge",
    "StreamJudge",
    "StreamJudgeBase",
    "ThresholdJudge",
    "Verdict",
    "VersionStats",
    "clustered_effective_n",
    "is_ready",
    "stats_by_version",
]

Decision = Literal["continue", "promote", "rollback"]

# Version recorded when a request failed before any version answered (connection refused, timeout).
UNKNOWN_VERSION = "unknown"


@dataclass(frozen=True, slots=True)
class Observation:
    """One request as the client saw it.

    ``correct`` is None when the label is unknown or the request failed (nothing to compare);
    ``prediction`` is the predicted class when the answer carried one.

    ``latency_s`` must be a finite number >= 0, else :class:`ValueError`: a NaN latency would
    make every percentile NaN and every ``p95 > limit`` check False, so a broken measurement
    would pass as a fast one. Refusing it (rather than counting the request as failed) stops the
    canary at its source with the reason in the message; the controller then restores the
    deployment that was in force, so a broken measurement can never promote.
    """

    version: str
    ok: bool
    latency_s: float
    correct: bool | None = None
    prediction: int | None = None
    # The routing key's pseudonym when the request carried one (sticky routing: every request
    # of a key went to the same version), else None. See :class:`ballast.sequential.KeyedArms`.
    key: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ValueError(
                f"latency_s must be a finite number >= 0, got {self.latency_s!r} "
                f"(version {self.version})"
            )


def _percentile_ms(latencies_s: list[float], q: float) -> float | None:
    if not latencies_s:
        return None
    return float(np.percentile(np.asarray(latencies_s) * 1000.0, q))


@dataclass(frozen=True, slots=True)
class VersionStats:
    """Summary of one version's observations.

    Latency percentiles are over successful requests only: a fast 500 must not make a broken
    version look quick, and failures are already counted by ``error_rate``.
    """

    version: str
    n: int
    errors: int
    error_rate: float
    n_ok: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    n_labelled: int
    n_correct: int
    accuracy: float | None
    # The error rate's effective sample size when some requests carried a routing key (sticky
    # traffic: a client's requests fail together); None: every request an independent draw.
    # See clustered_effective_n.
    n_effective: float | None = None

    @classmethod
    def from_observations(cls, version: str, observations: Iterable[Observation]) -> VersionStats:
        """Summarise the observations whose ``version`` matches (others are ignored)."""
        n = errors = n_labelled = n_correct = 0
        ok_latencies: list[float] = []
        by_key: dict[str, list[int]] = {}  # key -> [requests, errors]
        for o in observations:
            if o.version != version:
                continue
            n += 1
            if o.ok:
                ok_latencies.append(o.latency_s)
            else:
                errors += 1
            if o.correct is not None:
                n_labelled += 1
                n_correct += int(o.correct)
            if o.key:
                cell = by_key.setdefault(o.key, [0, 0])
                cell[0] += 1
                cell[1] += int(not o.ok)
        n_effective = None
        if by_key:
            sizes = np.array(list(by_key.values()), dtype=np.float64)
            keyed_n, keyed_e = sizes.sum(axis=0)
            n_effective = clustered_effective_n(
                sizes[:, 0], sizes[:, 1], free_n=n - keyed_n, free_e=errors - keyed_e
            )
        return cls(
            version=version,
            n=n,
            errors=errors,
            error_rate=errors / n if n else 0.0,
            n_ok=len(ok_latencies),
            latency_p50_ms=_percentile_ms(ok_latencies, 50),
            latency_p95_ms=_percentile_ms(ok_latencies, 95),
            latency_p99_ms=_percentile_ms(ok_latencies, 99),
            n_labelled=n_labelled,
            n_correct=n_correct,
            accuracy=n_correct / n_labelled if n_labelled else None,
            n_effective=n_effective,
        )

    def as_evidence(self, prefix: str) -> dict[str, float]:
        """Flat ``{prefix}_{field}`` numbers; undefined values (no samples) are left out."""
        values: dict[str, float | None] = {
            "n": self.n,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "n_ok": self.n_ok,
            "p50_ms": self.latency_p50_ms,
            "p95_ms": self.latency_p95_ms,
            "p99_ms": self.latency_p99_ms,
            "n_labelled": self.n_labelled,
            "accuracy": self.accuracy,
            "n_effective": self.n_effective,
        }
        return {f"{prefix}_{k}": float(v) for k, v in values.items() if v is not None}


def clustered_effective_n(
    key_n: np.ndarray,
    key_e: np.ndarray,
    *,
    free_n: float = 0.0,
    free_e: float = 0.0,
    leverage_power: float = 2.0,
) -> float:
    """How many independent requests a version's keyed and unkeyed requests are worth for its
    error rate: ``n`` over the design effect (Kish), from the ratio estimator's cluster-robust
    variance against the binomial ``r (1 - r) / n``.

    ``key_n[c]``/``key_e[c]`` are the requests and errors of routing key ``c`` (sticky traffic:
    a client's requests fail together); ``free_n``/``free_e`` the unkeyed ones, each its own
    cluster. The variance is ``sum_c (e_c - r n_c)^2 / (1 - n_c/n)^p / n^2``: with ``p = 2``
    the cluster jackknife (CR3), with ``p = 1`` Bell and McCaffrey's CR2. The plain sandwich
    (CR1) reads a client that carries most of the traffic as nearly certain, since the rate it
    is measured against is mostly that client's own: one slow or failing client on the canary
    side then rolled back an identical canary (``ballast canary simulate --judge threshold
    --keys 200 --key-skew 2``). Dividing each cluster's residual by its leverage ``1 - n_c/n``
    undoes that.

    Never more than ``n``: clusters that happen to agree better than independent draws would
    are not read as extra evidence. Never less than the clusters' effective number
    ``n^2 / sum_c n_c^2`` (Kish): the design effect of clients that each always or never fail
    (intra-cluster correlation 1), the most that binomial outcomes allow. Without that floor the
    ratio to the binomial variance, which vanishes as the rate nears 100 %, read a canary
    failing nearly every request of its heaviest client (and answering one request elsewhere)
    as worth a thousandth of a request, and promoted it. A single client (one key, nothing
    unkeyed) counts as ``n`` independent requests, as before: nothing says how clients differ,
    and counted as one draw a canary failing 20 % of the requests of a deployment's only client
    was promoted in 62 % of simulated canaries (rolled back in 97 % as ``n``); one draw would
    have cut the false rollbacks of identical canaries over 10 keys from 3.5 % to none.
    """
    kn = np.asarray(key_n, dtype=np.float64)
    ke = np.asarray(key_e, dtype=np.float64)
    n = float(kn.sum()) + free_n
    errors = float(ke.sum()) + free_e
    clusters = int(np.count_nonzero(kn)) + int(free_n)
    if n <= 0:
        return 0.0
    if clusters < 2 or errors <= 0 or errors >= n:
        return float(n)
    r = errors / n
    seen = kn > 0
    kn, ke = kn[seen], ke[seen]
    # Leverage below 1 whenever there are two clusters; the floor only guards rounding.
    keep = np.maximum(1.0 - kn / n, 1e-12) ** leverage_power
    spread = float(np.sum((ke - r * kn) ** 2 / keep))
    if free_n:
        # Unkeyed requests: clusters of one (n_c = 1, e_c = 0 or 1).
        one = max(1.0 - 1.0 / n, 1e-12) ** leverage_power
        spread += (free_e * (1.0 - r) ** 2 + (free_n - free_e) * r * r) / one
    var_clustered = spread / (n * n)
    var_binomial = r * (1.0 - r) / n
    if var_clustered <= var_binomial:
        return float(n)
    floor = min(n, n * n / (float(np.sum(kn * kn)) + free_n))
    return max(floor, n * var_binomial / var_clustered)


def stats_by_version(observations: Iterable[Observation]) -> dict[str, VersionStats]:
    """One :class:`VersionStats` per version seen (``"unknown"`` included when present)."""
    obs = list(observations)
    versions = sorted({o.version for o in obs})
    return {v: VersionStats.from_observations(v, obs) for v in versions}


@dataclass(frozen=True, slots=True)
class Verdict:
    """A judge's answer for one step.

    ``evidence`` holds plain numbers (both sides' statistics, every threshold and the limit it
    produced) so a report or an MLflow run can log it as is.
    """

    decision: Decision
    reasons: tuple[str, ...]
    evidence: Mapping[str, float] = field(default_factory=dict)


class Judge(Protocol):
    """Decides a canary step from both sides' statistics.

    ``baseline`` is None on a first release (nothing to compare against). ``step_weight`` is the
    canary's traffic share in percent; a judge answers "promote" only at 100.
    """

    def judge(
        self, baseline: VersionStats | None, canary: VersionStats, step_weight: int
    ) -> Verdict: ...


@dataclass(frozen=True, slots=True)
class ThresholdJudge:
    """Fixed thresholds, applied only once the canary has ``min_samples`` requests.

    Rollback when any of these holds (with enough samples):

    * error rate above ``max(max_error_rate, baseline error rate + error_margin)`` and at least
      ``min_errors`` failures, so a single failed request never decides alone — judged on the
      lower ``error_confidence`` Wilson bound of the canary's error rate, not its point
      estimate (simulated, at 20 req/s: an identical canary rolled back in 2.2 % of runs
      instead of 11.9 %, a canary failing 3 % against a 1 % champion still in 93 %); with
      sticky traffic, on the clients' effective sample size (:func:`clustered_effective_n`);
    * p95 latency above ``baseline p95 x max_latency_ratio + latency_slack_ms`` (the slack keeps
      sub-millisecond baselines from turning jitter into rollbacks), or above ``max_p95_ms``;
      a p95 on either side that is not a finite number (statistics not built from checked
      :class:`Observation` records) fails closed: nothing was measured, so nothing may pass;
    * accuracy below ``baseline accuracy - max_accuracy_drop`` when both sides have
      ``min_samples`` labelled answers, or below ``min_accuracy`` when set — judged on the upper
      ``accuracy_confidence`` Wilson bound of the canary's accuracy, not its point estimate.

    Without a usable baseline (first release, or fewer than ``min_samples`` baseline requests) only
    the absolute limits apply. Otherwise "continue" below 100 % and "promote" at 100 %.
    """

    max_error_rate: float = 0.02
    max_latency_ratio: float = 2.0
    latency_slack_ms: float = 5.0
    max_accuracy_drop: float = 0.05
    min_samples: int = 40
    error_margin: float = 0.01
    min_errors: int = 2
    max_p95_ms: float | None = None
    min_accuracy: float | None = None
    accuracy_confidence: float = 0.95
    error_confidence: float = 0.9

    def __post_init__(self) -> None:
        if not 0.5 <= self.accuracy_confidence < 1 or not 0.5 <= self.error_confidence < 1:
            raise ValueError("accuracy_confidence and error_confidence must lie in [0.5, 1)")
        if self.min_samples < 1 or self.min_errors < 1:
            raise ValueError("min_samples and min_errors must be at least 1")
        if not 0 <= self.max_error_rate <= 1 or not 0 <= self.max_accuracy_drop <= 1:
            raise ValueError("max_error_rate and max_accuracy_drop must lie in [0, 1]")
        if self.max_latency_ratio <= 0 or self.latency_slack_ms < 0 or self.error_margin < 0:
            raise ValueError("latency ratio must be > 0; slack and error margin >= 0")

    @classmethod
    def from_settings(cls, settings: Settings) -> ThresholdJudge:
        """The judge configured by ``BALLAST_JUDGE_*`` and ``BALLAST_CANARY_MIN_SAMPLES``."""
        return cls(
            max_error_rate=settings.judge_max_error_rate,
            max_latency_ratio=settings.judge_max_latency_ratio,
            latency_slack_ms=settings.judge_latency_slack_ms,
            max_accuracy_drop=settings.judge_max_accuracy_drop,
            error_confidence=settings.judge_error_confidence,
            min_samples=settings.canary_min_samples,
        )

    def judge(
        self, baseline: VersionStats | None, canary: VersionStats, step_weight: int
    ) -> Verdict:
        """Apply the thresholds; see the class docstring for the rules."""
        evidence: dict[str, float] = {
            "step_weight": float(step_weight),
            "min_samples": float(self.min_samples),
            "min_errors": float(self.min_errors),
            "max_error_rate": self.max_error_rate,
            "error_margin": self.error_margin,
            "max_latency_ratio": self.max_latency_ratio,
            "latency_slack_ms": self.latency_slack_ms,
            "max_accuracy_drop": self.max_accuracy_drop,
            **canary.as_evidence("canary"),
        }
        if self.max_p95_ms is not None:
            evidence["max_p95_ms"] = self.max_p95_ms
        if self.min_accuracy is not None:
            evidence["min_accuracy"] = self.min_accuracy
        if baseline is not None:
            evidence.update(baseline.as_evidence("baseline"))

        if canary.n < self.min_samples:
            evidence["sufficient_samples"] = 0.0
            return Verdict(
                "continue",
                (f"canary {canary.version} has {canary.n} of {self.min_samples} samples",),
                evidence,
            )
        evidence["sufficient_samples"] = 1.0

        notes: list[str] = []
        compare = baseline is not None and baseline.n >= self.min_samples
        if baseline is None:
            notes.append("no baseline: absolute thresholds only")
        elif not compare:
            notes.append(
                f"baseline {baseline.version} has {baseline.n} of {self.min_samples} samples: "
                "absolute thresholds only"
            )
        usable = baseline if compare else None
        evidence["compared_to_baseline"] = 1.0 if usable is not None else 0.0

        failures = [
            *self._errors(usable, canary, evidence),
            *self._latency(usable, canary, evidence),
            *self._accuracy(usable, canary, evidence),
        ]
        if canary.n_ok == 0:
            # Fails closed: a champion that fails everything too lifts the error limit past
            # 100 %, and latency and accuracy then have nothing to measure.
            failures.append(f"canary {canary.version} answered none of {canary.n} requests")
        if failures:
            return Verdict("rollback", tuple(failures), evidence)
        decision: Decision = "promote" if step_weight >= 100 else "continue"
        passed = f"all checks passed at {step_weight}% on {canary.n} canary samples"
        return Verdict(decision, (passed, *notes), evidence)

    def _errors(
        self, baseline: VersionStats | None, canary: VersionStats, evidence: dict[str, float]
    ) -> list[str]:
        limit = self.max_error_rate
        if baseline is not None:
            # A baseline that already fails sometimes is not the canary's fault: compare to it.
            limit = max(limit, baseline.error_rate + self.error_margin)
        evidence["limit_error_rate"] = limit
        # As for accuracy: roll back only when even the lower end of the canary's error-rate
        # interval is above the limit. On the point estimate, 2 errors in 60 requests of a
        # canary exactly as good as a 1 % champion read 3.3 % > 2 %, and an identical canary
        # was rolled back in about one run in ten (``ballast canary simulate --judge threshold``).
        # Sticky traffic: as many independent requests as its clusters are worth.
        if canary.n_effective is None:
            lower = wilson_lower(canary.errors, canary.n, self.error_confidence)
        else:
            n = canary.n_effective
            lower = wilson_lower(canary.error_rate * n, n, self.error_confidence)
        evidence["canary_error_rate_lower"] = lower
        evidence["error_confidence"] = self.error_confidence
        if lower > limit and canary.errors >= self.min_errors:
            return [
                f"error rate {canary.error_rate:.3f} ({canary.errors}/{canary.n}) "
                f"above limit {limit:.3f} (lower {self.error_confidence:.0%} bound {lower:.3f})"
            ]
        return []

    def _latency(
        self, baseline: VersionStats | None, canary: VersionStats, evidence: dict[str, float]
    ) -> list[str]:
        p95 = canary.latency_p95_ms
        if p95 is None:
            return []  # no successful request: the error check speaks for this canary
        for side in (canary, baseline):
            value = None if side is None else side.latency_p95_ms
            # Every comparison with NaN is False: without this a NaN p95 passed every limit.
            if side is not None and value is not None and not math.isfinite(value):
                return [f"p95 latency of {side.version} is not a finite number ({value})"]
        limits: list[float] = []
        if baseline is not None and baseline.latency_p95_ms is not None:
            relative = baseline.latency_p95_ms * self.max_latency_ratio + self.latency_slack_ms
            evidence["limit_p95_ms_relative"] = relative
            limits.append(relative)
        if self.max_p95_ms is not None:
            limits.append(self.max_p95_ms)
        if not limits:
            return []
        limit = min(limits)
        evidence["limit_p95_ms"] = limit
        if p95 > limit:
            return [f"p95 latency {p95:.1f} ms above limit {limit:.1f} ms"]
        return []

    def _accuracy(
        self, baseline: VersionStats | None, canary: VersionStats, evidence: dict[str, float]
    ) -> list[str]:
        if canary.accuracy is None or canary.n_labelled < self.min_samples:
            return []  # too few labelled answers to say anything about accuracy
        limits: list[float] = []
        if (
            baseline is not None
            and baseline.accuracy is not None
            and baseline.n_labelled >= self.min_samples
        ):
            relative = baseline.accuracy - self.max_accuracy_drop
            evidence["limit_accuracy_relative"] = relative
            limits.append(relative)
        if self.min_accuracy is not None:
            limits.append(self.min_accuracy)
        if not limits:
            return []
        limit = max(limits)
        evidence["limit_accuracy"] = limit
        # A point estimate on a few dozen labels swings by several points: 27/30 right is 0.90
        # for a model that is 0.97 accurate about 6 % of the time. Roll back only when even the
        # upper end of the canary's accuracy interval is below the limit.
        upper = wilson_upper(canary.n_correct, canary.n_labelled, self.accuracy_confidence)
        evidence["canary_accuracy_upper"] = upper
        evidence["accuracy_confidence"] = self.accuracy_confidence
        if upper < limit:
            return [
                f"accuracy {canary.accuracy:.3f} below limit {limit:.3f} "
                f"(upper {self.accuracy_confidence:.0%} bound {upper:.3f}, "
                f"{canary.n_correct}/{canary.n_labelled} right)"
            ]
        return []


def _wilson(successes: float, n: float, confidence: float) -> tuple[float, float]:
    """Centre and half-width of the one-sided Wilson score interval (Wilson, JASA 22(158), 1927)."""
    z = NormalDist().inv_cdf(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre, half


def wilson_upper(successes: float, n: float, confidence: float) -> float:
    """One-sided upper confidence bound of a binomial proportion: the true rate is below it
    with probability ``confidence``."""
    if n <= 0 or successes >= n:
        return 1.0
    centre, half = _wilson(successes, n, confidence)
    return min(1.0, centre + half)


def wilson_lower(successes: float, n: float, confidence: float) -> float:
    """One-sided lower confidence bound of a binomial proportion: the true rate is above it
    with probability ``confidence``."""
    if n <= 0 or successes <= 0:
        return 0.0
    centre, half = _wilson(successes, n, confidence)
    return max(0.0, centre - half)


# ------------------------------------------------------------------------------ stream judges

# Evidence key a judge sets to 0.0 while the canary is not yet clearly good enough to take all
# traffic; a controller holds the step before 100 % until it reads 1.0.
READY_KEY = "ready_to_promote"


def is_ready(verdict: Verdict) -> bool:
    """Whether ``verdict`` lets a controller move to 100 %: judges without the notion always do."""
    return verdict.evidence.get(READY_KEY, 1.0) >= 1.0


def _check_weight(step_weight: int) -> None:
    if not 0 < step_weight <= 100:
        raise ValueError(f"step_weight must lie in 1..100, got {step_weight}")


@dataclass(frozen=True, slots=True)
class ObservationBatch:
    """Time-ordered observations of one canary as columns, one entry per request.

    ``canary`` tells the arm; ``correct`` is 1 right, 0 wrong, -1 unlabelled; ``prediction`` is
    the class or -1. Requests no version answered are not in a batch: they cannot be pinned on
    an arm (a canary that crashes its worker shows up in the champion's errors, not here).
    Every ``latency_s`` must be finite and >= 0, else :class:`ValueError` (as for
    :class:`Observation`: a NaN is below no reference, so it would count as a fast answer).
    """

    canary: np.ndarray
    ok: np.ndarray
    latency_s: np.ndarray
    correct: np.ndarray
    prediction: np.ndarray
    # Routing keys (str; "" for a request without one), or None when no request had one.
    key: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.canary)
        columns = (self.ok, self.latency_s, self.correct, self.prediction)
        if any(len(a) != n for a in columns) or (self.key is not None and len(self.key) != n):
            raise ValueError("every column of an ObservationBatch must have the same length")
        lat = np.asarray(self.latency_s)
        if n and not (np.isfinite(lat).all() and (lat >= 0).all()):
            bad = lat[~(np.isfinite(lat) & (lat >= 0))]
            raise ValueError(f"latency_s must be finite numbers >= 0, got {bad[:3].tolist()}")

    def __len__(self) -> int:
        return len(self.canary)

    @classmethod
    def from_observations(
        cls,
        observations: Iterable[Observation],
        *,
        canary_version: str,
        champion_version: str | None,
    ) -> ObservationBatch:
        """Columns for the two arms' observations; every other version is dropped."""
        kept = [
            o
            for o in observations
            if o.version == canary_version
            or (champion_version is not None and o.version == champion_version)
        ]
        n = len(kept)
        return cls(
            canary=np.fromiter((o.version == canary_version for o in kept), dtype=bool, count=n),
            ok=np.fromiter((o.ok for o in kept), dtype=bool, count=n),
            latency_s=np.fromiter((o.latency_s for o in kept), dtype=np.float64, count=n),
            correct=np.fromiter(
                (-1 if o.correct is None else int(o.correct) for o in kept), dtype=np.int8, count=n
            ),
            prediction=np.fromiter(
                (-1 if o.prediction is None else o.prediction for o in kept),
                dtype=np.int64,
                count=n,
            ),
            key=(
                np.array([o.key or "" for o in kept], dtype=object)
                if any(o.key for o in kept)
                else None
            ),
        )


@runtime_checkable
class StreamJudge(Judge, Protocol):
    """A judge that also reads the time-ordered observations, batch by batch.

    The controller calls :meth:`start` once per canary, :meth:`observe` with each batch of
    traffic at the weight it was routed under, and :meth:`Judge.judge` whenever it wants a
    verdict (as often as it likes: a stream judge's verdicts stay valid under repeated looks).
    """

    def start(self, champion: str | None, candidate: str) -> None: ...

    def observe(self, observations: Iterable[Observation], step_weight: int) -> None: ...

    def observe_batch(self, batch: ObservationBatch, step_weight: int) -> None: ...


class StreamJudgeBase(ABC):
    """The :meth:`start` / :meth:`observe` plumbing shared by stream judges.

    Subclasses implement ``_reset`` (forget everything), ``observe_batch`` and ``judge``.
    """

    def __init__(self) -> None:
        self._champion: str | None = None
        self._candidate: str | None = None

    def start(self, champion: str | None, candidate: str) -> None:
        """Begin a canary of ``candidate`` against ``champion`` (None: a first release)."""
        if not candidate or candidate == champion:
            raise ValueError("candidate must be a version other than the champion")
        self._champion, self._candidate = champion, candidate
        self._reset()

    def observe(self, observations: Iterable[Observation], step_weight: int) -> None:
        """Feed one batch of observations, all routed at ``step_weight`` percent."""
        if self._candidate is None:
            raise RuntimeError("call start() before observe()")
        batch = ObservationBatch.from_observations(
            observations, canary_version=self._candidate, champion_version=self._champion
        )
        self.observe_batch(batch, step_weight)

    @abstractmethod
    def _reset(self) -> None:
        """Forget everything observed (a new canary starts)."""

    @abstractmethod
    def observe_batch(self, batch: ObservationBatch, step_weight: int) -> None:
        """Take in one batch routed at ``step_weight`` percent."""


@dataclass(frozen=True, slots=True)
class MetricPolicy:
    """How :class:`SequentialJudge` tests one metric. Ratios are canary over champion rates of
    the metric's bad event (a failure, an answer slower than the champion's p95, a wrong answer).

    * ``alpha``: bound on the chance that this metric ever crosses its rollback boundary while
      the canary is no worse than the champion, however often the judge is asked.
    * ``effect``: the ratio the test is tuned for (the centre of its prior); any worse ratio is
      caught too, a weaker one more slowly.
    * ``margin``: below this ratio the canary is good enough on this metric (tested always-valid
      at ``SequentialConfig.alpha_promote``).
    * ``abs_tolerance``: a bad-event rate under which the canary is good enough whatever the
      champion does (None: ratio only); it settles metrics whose events are too rare for a ratio.
    * ``critical``: a critical metric rolls the canary back on its own (as Kayenta's critical
      metrics fail a canary); a non-critical one only blocks promotion.
    """

    alpha: float
    effect: float
    margin: float
    abs_tolerance: float | None = None
    critical: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if not self.effect > 1 or not self.margin > 1:
            raise ValueError("effect and margin must be ratios above 1")
        if self.abs_tolerance is not None and not 0 < self.abs_tolerance < 1:
            raise ValueError("abs_tolerance must lie in (0, 1)")


@dataclass(frozen=True, slots=True)
class SequentialConfig:
    """Settings of :class:`SequentialJudge`; the defaults are the measured ones (see README).

    The false-rollback bound is the sum of the critical metrics' ``alpha`` (1 % by default:
    0.6 % on errors, the signal users feel first, 0.2 % each on latency and accuracy). ``alpha_promote`` bounds, per metric, the
    chance of calling a canary good enough when its ratio is at or beyond the margin.
    ``early_promote`` lets the judge answer "promote" below 100 % once every metric is good
    enough (the controller then goes straight to the candidate alone); by default it only
    promotes at 100 %.
    """

    errors: MetricPolicy = MetricPolicy(alpha=0.006, effect=4.0, margin=2.0, abs_tolerance=0.005)
    latency: MetricPolicy = MetricPolicy(alpha=0.002, effect=2.0, margin=1.5)
    accuracy: MetricPolicy = MetricPolicy(alpha=0.002, effect=2.0, margin=1.5, abs_tolerance=0.01)
    prediction_mix: MetricPolicy = MetricPolicy(
        alpha=0.001, effect=1.5, margin=1.25, critical=False
    )
    alpha_promote: float = 0.05
    prior_spread: float = 0.5
    latency_quantiles: tuple[float, float] = (0.95, 0.99)
    min_reference: int = 200
    n_classes: int = 2
    first_release_max_error_rate: float = 0.02
    early_promote: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.alpha_promote < 1 or not self.prior_spread > 0:
            raise ValueError("alpha_promote must lie in (0, 1) and prior_spread be > 0")
        near, far = self.latency_quantiles
        if not 0.5 <= near < far < 1:
            raise ValueError("latency_quantiles must be (near, far) with 0.5 <= near < far < 1")
        if self.min_reference < 1 or self.n_classes < 2:
            raise ValueError("min_reference must be >= 1 and n_classes >= 2")
        if not 0 < self.first_release_max_error_rate < 1:
            raise ValueError("first_release_max_error_rate must lie in (0, 1)")

    def policies(self) -> dict[str, MetricPolicy]:
        return {
            "errors": self.errors,
            "latency": self.latency,
            "accuracy": self.accuracy,
            "prediction_mix": self.prediction_mix,
        }

    @property
    def alpha_rollback(self) -> float:
        """The false-rollback bound: the critical metrics' alphas added up (a union bound)."""
        return sum(p.alpha for p in self.policies().values() if p.critical)


class _Tally:
    """One metric's bad events: likelihoods of the arm test (rollback, good enough, estimate),
    canary totals for the one-sample tests, and what its bad events revealed of sticky keys'
    arms."""

    __slots__ = (
        "canary_events",
        "canary_trials",
        "champion_events",
        "champion_trials",
        "comparable",
        "first_bad",
        "first_trial",
        "free_events",
        "free_trials",
        "harm",
        "mle",
        "ready",
    )

    def __init__(self, harm: sq.RatioPrior, ready: sq.RatioPrior | None, margin: float) -> None:
        self.harm = sq.ArmLikelihood(harm.ratios, 1.0)
        self.ready = sq.ArmLikelihood(ready.ratios, margin) if ready is not None else None
        self.mle = sq.ArmLikelihood(sq.MLE_RATIOS, 1.0) if ready is not None else None
        self.canary_events = self.canary_trials = 0
        self.champion_events = self.champion_trials = 0
        self.comparable = 0  # canary trials seen while the champion served too
        # The canary's unkeyed events and trials: a one-sample test of its rate needs requests
        # drawn independently, which sticky keys are not (a client's requests err together).
        self.free_events = self.free_trials = 0
        # Sticky keys (KeyedArms): each key's first bad answer feeds the rollback test, its
        # first answer the good-enough test and the estimate.
        self.first_bad = sq.KeyedArms()
        self.first_trial = sq.KeyedArms()

    def add(
        self,
        w: float,
        c_events: int,
        c_trials: int,
        b_events: int,
        b_trials: int,
        cells: tuple[list[sq.CellCounts], list[sq.CellCounts]],
        free: tuple[int, int] | None = None,
    ) -> None:
        """Totals at weight ``w``, the arm test's cells (for the rollback test, for the
        good-enough test and the estimate: see :meth:`cells`), and the canary's unkeyed
        (events, trials) when some were keyed (None: all were unkeyed)."""
        self.canary_events += c_events
        self.canary_trials += c_trials
        f_events, f_trials = (c_events, c_trials) if free is None else free
        self.free_events += f_events
        self.free_trials += f_trials
        self.champion_events += b_events
        self.champion_trials += b_trials
        if not 0 < w < 1:
            return
        self.comparable += c_trials
        harm_cells, ready_cells = cells
        for cell in harm_cells:
            if cell.canary or cell.champion:
                self.harm.add(cell.weight, cell.canary, cell.champion, cell.tier)
        if self.ready is None or self.mle is None:
            return
        for cell in ready_cells:
            if cell.canary or cell.champion:
                self.ready.add(cell.weight, cell.canary, cell.champion, cell.tier)
                self.mle.add(cell.weight, cell.canary, cell.champion, cell.tier)

    def cells(
        self,
        w: float,
        can: np.ndarray,
        trials: np.ndarray,
        bad: np.ndarray,
        keys: np.ndarray | None,
        keyed: np.ndarray | None,
        tier: np.ndarray | None = None,
    ) -> tuple[list[sq.CellCounts], list[sq.CellCounts]]:
        """The arm test's cells for bad events ``bad`` among ``trials``, for the rollback test
        and for the good-enough test: an unkeyed event is a draw at ``w`` in both; keyed ones
        count as :class:`ballast.sequential.KeyedArms` says (first bad answer of a key for the
        rollback test, first answer for the other)."""
        free = bad if keyed is None else bad & ~keyed
        # The good-enough test (and the estimate) count every bad event at tier 1: its null
        # is "the ratio of bad events is the margin", and the tier-2 null (the margin squared)
        # holds only for a tail stretched in exactly that shape. A canary at the margin above
        # the champion's p95 whose p99 share was not 2.25 times the champion's read as good
        # enough in 22-54 % of runs against the 5 % bound. The rollback test keeps the tiers:
        # its null ratio is 1 for both, so they only add power there.
        flat = [sq.CellCounts(w, _count(can & free), _count(~can & free))]
        if tier is None:
            harm_out = flat
        else:
            harm_out = [
                sq.CellCounts(
                    w, _count(can & free & (tier == t)), _count(~can & free & (tier == t)), t
                )
                for t in (1.0, 2.0)
            ]
        if keys is None or keyed is None:
            return harm_out, flat
        keyed_bad = bad & keyed
        harm = self.first_bad.events(w, can, keys, keyed_bad, bad, tier)
        ready = self.first_trial.events(w, can, keys, trials & keyed, bad, None)
        return harm_out + harm, flat + ready


def _count(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask))


@dataclass(slots=True)
class _Assessment:
    name: str
    critical: bool
    has_data: bool
    failed: bool
    ready: bool
    summary: str


def _e_text(log_e: float) -> str:
    """An e-value for a reason line; huge ones as a power of ten (exp would overflow)."""
    return f"{math.exp(log_e):.3g}" if log_e < 40 else f"1e{log_e / math.log(10):.0f}"


_DESCRIBE = {
    "errors": "failed",
    "latency": "slower than the champion's p95",
    "accuracy": "wrong",
    "prediction_mix": "in an over-represented class",
}


class SequentialJudge(StreamJudgeBase):
    """Always-valid sequential canary judge: stops as soon as the canary is clearly worse than the
    champion serving beside it (rollback) or clearly good enough (promote).

    Method (details and references in :mod:`ballast.sequential`): for every metric, a bad event
    (a failed request; a successful one slower than the champion's running p95, or its p99 as a
    second tier, both taken from the champion's answers *before* it so the reference is
    predictable; a labelled answer that is wrong; an answer of class ``k``) came from the canary
    with probability exactly equal to its routing weight if the canary is no worse, whatever the
    champion's own rate and however it varies over time. A mixture SPRT
    (Robbins; Johari, Pekelis and Walsh's mSPRT) over the rate ratio turns the arm labels into an
    e-value ``M_t``; by Ville's inequality ``P(ever M_t >= 1/alpha) <= alpha`` under the null, so
    the judge may be asked after every request. Wald's SPRT, which needs the true ratio in
    advance, is the floor it is measured against.

    * Rollback: any critical metric's e-value reached ``1/alpha`` (once reached, it stays
      reached). The false-rollback bound is :attr:`SequentialConfig.alpha_rollback`.
    * Good enough: every critical metric with data passed its own test that the ratio is below
      its margin (or the canary's own rate below ``abs_tolerance``), and no non-critical metric
      failed. Then "promote" at 100 % (or below with ``early_promote``), and ``READY_KEY`` = 1
      in the evidence so the controller may take the last step.
    * Otherwise "continue".

    Without a champion (first release) only the error rate can be judged: against
    ``first_release_max_error_rate`` with two one-sample mixture tests (above it: rollback;
    below it: good enough). With sticky traffic the good-enough test counts the answers at the
    clients' effective sample size (:func:`clustered_effective_n`; approximate), the rollback
    test every answer.

    Used as a plain :class:`Judge` (cumulative statistics only, no :meth:`observe`), it judges
    error rate and accuracy from the increments between calls; the latency test needs the stream.
    """

    def __init__(self, config: SequentialConfig | None = None) -> None:
        super().__init__()
        self.config = config or SequentialConfig()
        c = self.config
        self._policies = c.policies()
        self._harm_priors = {
            name: sq.harm_prior(p.effect, c.prior_spread) for name, p in self._policies.items()
        }
        self._promote_priors = {
            name: sq.promote_prior(p.margin, c.prior_spread) for name, p in self._policies.items()
        }
        self._below = sq.one_sample_prior(below=True)
        self._above = sq.one_sample_prior(below=False)
        self._reset()

    def _reset(self) -> None:
        k = self.config.n_classes
        self._tallies = {
            name: _Tally(
                self._harm_priors[name], self._promote_priors[name], self._policies[name].margin
            )
            for name in ("errors", "latency", "accuracy")
        }
        mix = self._policies["prediction_mix"]
        # One tally per class, the last for "any other class".
        self._classes = [
            _Tally(self._harm_priors["prediction_mix"], None, mix.margin) for _ in range(k + 1)
        ]
        self._class_counts = np.zeros((2, k + 1), dtype=np.int64)  # [canary, champion]
        self._canary_rows = self._canary_keyed = 0
        self._key_index: dict[str, int] = {}
        # The canary's answers and errors per routing key (by key index): its clients' effective
        # sample size for the one-sample test of a first release.
        self._key_n = np.zeros(0)
        self._key_e = np.zeros(0)
        self._reference = sq.LogHistogram()
        self._reference_s: tuple[float, float] | None = None
        # Seeded: the same observations give the same verdicts (tests, simulations, replays).
        self._tie_rng = np.random.default_rng(0)
        self._max: dict[str, float] = {}
        self._mode: Literal["stream", "summary"] | None = None
        self._last_summary: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    # -------------------------------------------------------------------------- feeding

    def observe_batch(self, batch: ObservationBatch, step_weight: int) -> None:
        """Count each metric's bad events per arm at this weight (see the class docstring)."""
        _check_weight(step_weight)
        if self._mode == "summary":
            raise RuntimeError("this judge already works from summaries; call start() first")
        self._mode = "stream"
        if len(batch) == 0:
            return
        w = step_weight / 100.0
        can = batch.canary
        cham = ~can
        ok = batch.ok
        keys = None if batch.key is None else self._key_indices(batch.key)
        keyed = None if keys is None else keys >= 0
        cnt = _count
        self._canary_rows += cnt(can)
        if keys is not None and keyed is not None:
            self._canary_keyed += cnt(can & keyed)
        if keys is not None and keyed is not None and self._champion is None:
            # Per-client counts feed the first release's one-sample test only.
            mine = can & keyed
            size = len(self._key_index)
            if self._key_n.size < size:
                self._key_n = np.pad(self._key_n, (0, size - self._key_n.size))
                self._key_e = np.pad(self._key_e, (0, size - self._key_e.size))
            self._key_n += np.bincount(keys[mine], minlength=size)
            self._key_e += np.bincount(keys[mine & ~ok], minlength=size)

        # The canary's unkeyed rows, for the one-sample tests (None: every row is unkeyed).
        free = None if keyed is None else can & ~keyed

        def unkeyed(events: np.ndarray, trials: np.ndarray) -> tuple[int, int] | None:
            return None if free is None else (cnt(free & events), cnt(free & trials))

        errors = self._tallies["errors"]
        failed = ~ok
        errors.add(
            w,
            cnt(can & failed),
            cnt(can),
            cnt(cham & failed),
            cnt(cham),
            errors.cells(w, can, can | cham, failed, keys, keyed),
            unkeyed(failed, can),
        )

        cfg = self.config
        if self._reference.n >= cfg.min_reference:
            # The references come from answers before this batch: they are predictable, which
            # the arm test needs (references built from the same answers would not be).
            ref = self._reference
            q_near, q_far = cfg.latency_quantiles
            near, far = ref.quantile(q_near), ref.quantile(q_far)
            assert near is not None and far is not None  # n > 0 here
            self._reference_s = (near, far)
            # Ties at the reference broken at random (LogHistogram.exceeds): before, answers
            # had to be strictly above the quantile's bin, and with constant latency (or a
            # coarse clock) none ever was on either side, so the latency test could never
            # find a canary good enough. One draw per answer for both tiers: very within slow.
            u = self._tie_rng.random(len(batch))
            slow = ok & ref.exceeds(batch.latency_s, q_near, u)
            very = slow & ref.exceeds(batch.latency_s, q_far, u)
            # Tier 2 above the far quantile, tier 1 between (see ArmLikelihood.add).
            tier = np.where(very, 2.0, 1.0)
            latency = self._tallies["latency"]
            latency.add(
                w,
                cnt(can & slow),
                cnt(can & ok),
                cnt(cham & slow),
                cnt(cham & ok),
                latency.cells(w, can, ok, slow, keys, keyed, tier),
            )
        self._reference.add(batch.latency_s[cham & ok])

        labelled = ok & (batch.correct >= 0)
        wrong = labelled & (batch.correct == 0)
        accuracy = self._tallies["accuracy"]
        accuracy.add(
            w,
            cnt(can & wrong),
            cnt(can & labelled),
            cnt(cham & wrong),
            cnt(cham & labelled),
            accuracy.cells(w, can, labelled, wrong, keys, keyed),
            unkeyed(wrong, labelled),
        )

        k = cfg.n_classes
        has = ok & (batch.prediction >= 0)
        cls = np.minimum(batch.prediction, k)
        per_c = np.bincount(cls[can & has], minlength=k + 1)  # int64 counts
        per_b = np.bincount(cls[cham & has], minlength=k + 1)
        self._class_counts[0] += per_c
        self._class_counts[1] += per_b
        n_c, n_b = int(per_c.sum()), int(per_b.sum())
        for i, tally in enumerate(self._classes):
            if keys is None:
                same = [sq.CellCounts(w, int(per_c[i]), int(per_b[i]))]
                cells = (same, same)
            else:
                cells = tally.cells(w, can, has, has & (cls == i), keys, keyed)
            tally.add(w, int(per_c[i]), n_c, int(per_b[i]), n_b, cells)

    def _key_indices(self, keys: np.ndarray) -> np.ndarray:
        """A stable index per routing key seen in this canary (-1: no key), for KeyedArms."""
        unique, inverse = np.unique(keys, return_inverse=True)
        table = self._key_index
        index = np.fromiter(
            (table.setdefault(k, len(table)) if k else -1 for k in unique),
            dtype=np.int64,
            count=len(unique),
        )
        return index[inverse.reshape(-1)]

    def _absorb_summary(
        self, baseline: VersionStats | None, canary: VersionStats, step_weight: int
    ) -> None:
        """Plain-Judge use: turn the increments of cumulative statistics into events."""
        self._mode = "summary"

        def key(s: VersionStats | None) -> tuple[int, ...]:
            return (0, 0, 0, 0) if s is None else (s.n, s.errors, s.n_labelled, s.n_correct)

        now = (key(canary), key(baseline))
        before = self._last_summary or ((0, 0, 0, 0), (0, 0, 0, 0))
        dc = [a - b for a, b in zip(now[0], before[0], strict=True)]
        db = [a - b for a, b in zip(now[1], before[1], strict=True)]
        if min(dc + db) < 0 or dc[3] > dc[2] or db[3] > db[2]:
            raise ValueError("statistics went backwards: a judge needs cumulative VersionStats")
        self._last_summary = now
        w = step_weight / 100.0
        errors = [sq.CellCounts(w, dc[1], db[1])]
        self._tallies["errors"].add(w, dc[1], dc[0], db[1], db[0], (errors, errors))
        wrong = [sq.CellCounts(w, dc[2] - dc[3], db[2] - db[3])]
        self._tallies["accuracy"].add(w, dc[2] - dc[3], dc[2], db[2] - db[3], db[2], (wrong, wrong))

    # -------------------------------------------------------------------------- judging

    def log_e_values(self) -> dict[str, float]:
        """Each metric's current rollback log e-value (cheap: no verdict, no evidence, and no
        effect on the sticky maxima that :meth:`judge` keeps)."""
        out = {name: t.harm.log_e(self._harm_priors[name]) for name, t in self._tallies.items()}
        prior = self._harm_priors["prediction_mix"]
        per_class = [t.harm.log_e(prior) for t in self._classes]
        out["prediction_mix"] = float(sq.logsumexp(per_class)) - math.log(len(per_class))
        return out

    def _track(self, key: str, value: float) -> float:
        """Running maximum: once a boundary is crossed it stays crossed (the test stopped)."""
        best = max(self._max.get(key, 0.0), value)
        self._max[key] = best
        return best

    def _assess_rate(self, name: str, ev: dict[str, float]) -> _Assessment:
        policy = self._policies[name]
        tally = self._tallies[name]
        cfg = self.config
        assert tally.ready is not None and tally.mle is not None  # rate metrics have all three
        log_e = tally.harm.log_e(self._harm_priors[name])
        best = self._track(f"{name}.harm", log_e)
        log_threshold = math.log(1.0 / policy.alpha)
        failed = best >= log_threshold

        alpha_ratio = cfg.alpha_promote / (2 if policy.abs_tolerance is not None else 1)
        ready_e = self._track(f"{name}.ready", tally.ready.log_e(self._promote_priors[name]))
        ready = ready_e >= math.log(1.0 / alpha_ratio)
        if policy.abs_tolerance is not None:
            abs_e = self._track(
                f"{name}.abs",
                # Unkeyed answers only: a few sticky clients that rarely err must not vouch
                # for a canary that fails the others.
                sq.bernoulli_log_e(
                    tally.free_events, tally.free_trials, policy.abs_tolerance, self._below
                ),
            )
            ev[f"{name}_abs_tolerance"] = policy.abs_tolerance
            ev[f"{name}_abs_log_e"] = abs_e
            ready = ready or abs_e >= math.log(2.0 / cfg.alpha_promote)
        mle = tally.mle.argmax_ratio()
        ev.update(
            {
                f"{name}_canary_events": float(tally.canary_events),
                f"{name}_canary_trials": float(tally.canary_trials),
                f"{name}_champion_events": float(tally.champion_events),
                f"{name}_champion_trials": float(tally.champion_trials),
                f"{name}_log_e": log_e,
                f"{name}_max_log_e": best,
                f"{name}_log_threshold": log_threshold,
                f"{name}_p_value": min(1.0, math.exp(-best)),
                f"{name}_alpha": policy.alpha,
                f"{name}_effect": policy.effect,
                f"{name}_margin": policy.margin,
                f"{name}_ready_log_e": ready_e,
                f"{name}_ready_log_threshold": math.log(1.0 / alpha_ratio),
                f"{name}_ready": float(ready),
                f"{name}_failed": float(failed),
                f"{name}_critical": float(policy.critical),
            }
        )
        if mle is not None:
            ev[f"{name}_ratio_mle"] = mle
        has_data = tally.comparable > 0 or (
            policy.abs_tolerance is not None and tally.canary_trials > 0
        )
        c_rate = tally.canary_events / tally.canary_trials if tally.canary_trials else 0.0
        b_rate = tally.champion_events / tally.champion_trials if tally.champion_trials else 0.0
        ratio = f"ratio ~{mle:.2g}, " if mle is not None else ""
        summary = (
            f"{name}: canary {tally.canary_events}/{tally.canary_trials} {_DESCRIBE[name]} "
            f"({c_rate:.2%}) vs champion {tally.champion_events}/{tally.champion_trials} "
            f"({b_rate:.2%}); {ratio}e-value {_e_text(best)} of {1 / policy.alpha:.0f} "
            f"(always-valid p = {min(1.0, math.exp(-best)):.2g})"
        )
        return _Assessment(name, policy.critical, has_data, failed, ready, summary)

    def _assess_mix(self, ev: dict[str, float]) -> _Assessment:
        policy = self._policies["prediction_mix"]
        prior = self._harm_priors["prediction_mix"]
        per_class = [t.harm.log_e(prior) for t in self._classes]
        # Average of the per-class e-values: one e-value for "some class is over-represented".
        log_e = float(sq.logsumexp(per_class)) - math.log(len(per_class))
        best = self._track("prediction_mix.harm", log_e)
        failed = best >= math.log(1.0 / policy.alpha)
        share = self._class_counts / np.maximum(self._class_counts.sum(axis=1, keepdims=True), 1)
        ev.update(
            {
                "prediction_mix_log_e": log_e,
                "prediction_mix_max_log_e": best,
                "prediction_mix_log_threshold": math.log(1.0 / policy.alpha),
                "prediction_mix_p_value": min(1.0, math.exp(-best)),
                "prediction_mix_alpha": policy.alpha,
                "prediction_mix_effect": policy.effect,
                "prediction_mix_failed": float(failed),
                "prediction_mix_critical": float(policy.critical),
                "prediction_mix_canary_n": float(self._class_counts[0].sum()),
                "prediction_mix_champion_n": float(self._class_counts[1].sum()),
            }
        )
        index = sq.psi(self._class_counts[0], self._class_counts[1])
        if index is not None:
            ev["prediction_mix_psi"] = index
        for i in range(self.config.n_classes):
            ev[f"prediction_mix_canary_share_{i}"] = float(share[0, i])
            ev[f"prediction_mix_champion_share_{i}"] = float(share[1, i])
        has_data = self._classes[0].comparable > 0
        psi_text = f"PSI {index:.3f}; " if index is not None else ""
        summary = (
            f"prediction_mix: {psi_text}e-value {_e_text(best)} of "
            f"{1 / policy.alpha:.0f} (always-valid p = {min(1.0, math.exp(-best)):.2g})"
        )
        # The mix has no good-enough test of its own: it can only fail.
        return _Assessment("prediction_mix", policy.critical, has_data, failed, not failed, summary)

    def _assess_first_release(self, ev: dict[str, float]) -> list[_Assessment]:
        policy = self._policies["errors"]
        cfg = self.config
        tally = self._tallies["errors"]
        limit = cfg.first_release_max_error_rate
        k, n = tally.canary_events, tally.canary_trials
        harm = self._track("errors.harm", sq.bernoulli_log_e(k, n, limit, self._above))
        # Sticky traffic: a client's requests fail together, so its answers are worth fewer
        # independent ones; counted each as one, a few clients that happened not to fail
        # vouched for the release as if they were thousands. The good-enough test counts the
        # answers at the clients' effective sample size (Kish's design effect, as the threshold
        # judge's error interval: an approximation, not an exact e-process). The rollback test
        # keeps every answer: over-counting there errs on the safe side.
        n_eff = float(n)
        if self._key_n.size and n:
            n_eff = clustered_effective_n(
                self._key_n,
                self._key_e,
                free_n=float(tally.free_trials),
                free_e=float(tally.free_events),
            )
        scale = n_eff / n if n else 1.0
        good = self._track(
            "errors.abs", sq.bernoulli_log_e(k * scale, n * scale, limit, self._below)
        )
        failed = harm >= math.log(1.0 / policy.alpha)
        ready = good >= math.log(1.0 / cfg.alpha_promote)
        ev.update(
            {
                "errors_canary_events": float(k),
                "errors_canary_trials": float(n),
                "errors_canary_n_effective": n_eff,
                "errors_limit": limit,
                "errors_max_log_e": harm,
                "errors_log_threshold": math.log(1.0 / policy.alpha),
                "errors_p_value": min(1.0, math.exp(-harm)),
                "errors_ready_log_e": good,
                "errors_ready_log_threshold": math.log(1.0 / cfg.alpha_promote),
                "errors_ready": float(ready),
                "errors_failed": float(failed),
            }
        )
        rate = k / n if n else 0.0
        worth = f" (worth {n_eff:.0f} independent answers)" if n_eff < n else ""
        summary = (
            f"errors: {k}/{n} failed ({rate:.2%}){worth} against the first-release limit "
            f"{limit:.2%}; e-value {_e_text(harm)} of {1 / policy.alpha:.0f}"
        )
        return [_Assessment("errors", True, n > 0, failed, ready, summary)]

    def judge(
        self, baseline: VersionStats | None, canary: VersionStats, step_weight: int
    ) -> Verdict:
        """Run every metric's tests on everything seen so far (see the class docstring)."""
        _check_weight(step_weight)
        if self._candidate is None:  # plain Judge use: the first call starts the canary
            self.start(baseline.version if baseline else None, canary.version)
        if self._mode != "stream":
            self._absorb_summary(baseline, canary, step_weight)
        cfg = self.config
        ev: dict[str, float] = {
            "step_weight": float(step_weight),
            "alpha_rollback": cfg.alpha_rollback,
            "alpha_promote": cfg.alpha_promote,
            "prior_spread": cfg.prior_spread,
            "latency_quantile_near": cfg.latency_quantiles[0],
            "latency_quantile_far": cfg.latency_quantiles[1],
            **canary.as_evidence("canary"),
        }
        if baseline is not None:
            ev.update(baseline.as_evidence("baseline"))
        if self._reference_s is not None:
            ev["latency_reference_near_ms"] = self._reference_s[0] * 1000.0
            ev["latency_reference_far_ms"] = self._reference_s[1] * 1000.0

        if self._champion is None:
            notes = ["no baseline: error rate against the first-release limit only"]
            found = self._assess_first_release(ev)
        else:
            notes = []
            found = [self._assess_rate(m, ev) for m in ("errors", "latency", "accuracy")]
            found.append(self._assess_mix(ev))

        failed = [a for a in found if a.failed and a.critical]
        if failed:
            ev[READY_KEY] = 0.0
            return Verdict("rollback", tuple(f"{a.summary} (critical)" for a in failed), ev)

        warnings = [a for a in found if a.failed]
        waiting = [a for a in found if a.critical and a.has_data and not a.ready]
        measured = [a for a in found if a.critical and a.has_data]
        for a in found:
            if a.critical and not a.has_data:
                notes.append(f"{a.name}: no comparable data yet")
        # Against a champion, errors and latency must both have been compared (accuracy may
        # have no labels: live traffic). Before, one large batch made the error test ready
        # before the latency reference existed, and a 10x slower canary went to 100 % and was
        # promoted with latency never compared.
        unmeasured = [
            a.name
            for a in found
            if self._champion is not None
            and a.name in ("errors", "latency")
            and a.critical
            and not a.has_data
        ]
        ready = bool(measured) and not waiting and not warnings and not unmeasured
        if canary.n_ok == 0:
            # Fails closed: errors alike on both sides read as "no worse", and latency and
            # accuracy then have nothing to measure: nothing says this canary works.
            ready = False
            notes.append(f"canary {canary.version} answered none of {canary.n} requests")
        ev[READY_KEY] = float(ready)
        if ready and (step_weight >= 100 or cfg.early_promote):
            good = f"clearly good enough at {step_weight}% on {canary.n} canary requests"
            return Verdict("promote", (good, *(a.summary for a in measured), *notes), ev)
        lines = [f"no critical metric crossed its rollback boundary at {step_weight}%"]
        lines += [f"held by a non-critical metric: {a.summary}" for a in warnings]
        if ready:
            lines.append("clearly good enough: ready for 100 %")
        else:
            lines += [f"not yet clearly good enough: {a.summary}" for a in waiting]
            lines += [
                f"not yet clearly good enough: {name} not compared yet" for name in unmeasured
            ]
            if self._canary_keyed:
                how = (
                    "count at their clients' effective sample size"
                    if self._champion is None
                    else "only each key's first answer can show the canary good enough"
                )
                lines.append(
                    f"{self._canary_keyed} of {self._canary_rows} canary answers carried a "
                    f"routing key (sticky): {how}, so few keys give little evidence"
                )
        ev["canary_keyed_share"] = self._canary_keyed / max(1, self._canary_rows)
        return Verdict("continue", (*lines, *notes), ev)

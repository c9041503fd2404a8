"""Canary analysis: per-version statistics from observed requests, and the judge that reads them.

Pure: no I/O, no clocks. The controller in :mod:`ballast.canary` gathers :class:`Observation`
records, summarises each side with :class:`VersionStats` and asks a :class:`Judge` for a
:class:`Verdict`. :class:`ThresholdJudge` is the foundation judge (fixed thresholds, a
minimum-sample rule); a sequential test can replace it behind the same :class:`Judge` protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

if TYPE_CHECKING:
    from ballast.settings import Settings

__all__ = [
    "UNKNOWN_VERSION",
    "Decision",
    "Judge",
    "Observation",
    "ThresholdJudge",
    "Verdict",
    "VersionStats",
    "stats_by_version",
]

Decision = Literal["continue", "promote", "rollback"]

# Version recorded when a request failed before any version answered (connection refused, timeout).
UNKNOWN_VERSION = "unknown"


@dataclass(frozen=True, slots=True)
class Observation:
    """One request as the client saw it.

    ``correct`` is None when the label is unknown or the request failed (nothing to compare).
    """

    version: str
    ok: bool
    latency_s: float
    correct: bool | None = None


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

    @classmethod
    def from_observations(cls, version: str, observations: Iterable[Observation]) -> VersionStats:
        """Summarise the observations whose ``version`` matches (others are ignored)."""
        n = errors = n_labelled = n_correct = 0
        ok_latencies: list[float] = []
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
        }
        return {f"{prefix}_{k}": float(v) for k, v in values.items() if v is not None}


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
      ``min_errors`` failures, so a single failed request never decides alone;
    * p95 latency above ``baseline p95 x max_latency_ratio + latency_slack_ms`` (the slack keeps
      sub-millisecond baselines from turning jitter into rollbacks), or above ``max_p95_ms``;
    * accuracy below ``baseline accuracy - max_accuracy_drop`` when both sides have
      ``min_samples`` labelled answers, or below ``min_accuracy`` when set.

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

    def __post_init__(self) -> None:
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
        if canary.error_rate > limit and canary.errors >= self.min_errors:
            return [
                f"error rate {canary.error_rate:.3f} ({canary.errors}/{canary.n}) "
                f"above limit {limit:.3f}"
            ]
        return []

    def _latency(
        self, baseline: VersionStats | None, canary: VersionStats, evidence: dict[str, float]
    ) -> list[str]:
        p95 = canary.latency_p95_ms
        if p95 is None:
            return []  # no successful request: the error check speaks for this canary
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
        if canary.accuracy < limit:
            return [f"accuracy {canary.accuracy:.3f} below limit {limit:.3f}"]
        return []

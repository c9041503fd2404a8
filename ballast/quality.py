"""The quality gate: may this candidate go on to compile, given the champion's held-out metric?

A pure decision (no registry, no I/O): the caller reads the champion's recorded metric and passes
it in. The candidate fails when

- its metric is not a finite number;
- it is on the wrong side of the absolute ``floor`` (below it when higher is better);
- it is worse than the champion's by more than ``max_drop`` (in the metric's own units).

Without a champion (the first release) only the floor applies. A champion without a recorded
value for the metric passes the comparison with a reason saying so, unless the policy requires
one. Every check's outcome is in ``reasons``, passed or not, so the decision carries its evidence.

Which way is better is a property of the metric, not a choice: :data:`METRICS` lists the held-out
metrics the trainer records (:func:`ballast.training.train`) with their direction, the values they
can take and their default floor, and :meth:`QualityPolicy.for_metric` builds a policy from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType

from ballast.errors import ConfigError

#: Float rounding when a metric is exactly at the limit (0.95 - 0.94 is 0.010000000000000009).
_EPS = 1e-12


@dataclass(frozen=True)
class MetricSpec:
    """How the gate reads one metric."""

    higher_is_better: bool
    #: The floor when none is configured: a minimum for a bounded score such as accuracy; None
    #: for a loss, whose scale depends on the dataset (a ceiling there must be set on purpose).
    default_floor: float | None
    #: The values the metric can take; a floor outside them is a configuration mistake.
    low: float = 0.0
    high: float = 1.0


_SCORE = MetricSpec(higher_is_better=True, default_floor=0.9)
_LOSS = MetricSpec(higher_is_better=False, default_floor=None, high=math.inf)

#: The metrics the trainer records that the gate can judge, and which way is better. (Not
#: ``best_epoch`` nor ``epochs_run``: they are not quality.)
METRICS: Mapping[str, MetricSpec] = MappingProxyType(
    {
        "accuracy": _SCORE,  # held-out
        "roc_auc": _SCORE,  # held-out
        "val_accuracy": _SCORE,  # validation split, best epoch
        "log_loss": _LOSS,  # held-out
        "val_loss": _LOSS,  # validation split, best epoch
        "train_loss": _LOSS,  # last epoch
    }
)


def metric_spec(metric: str) -> MetricSpec:
    """The :data:`METRICS` entry for ``metric``; :class:`ConfigError` for any other name."""
    try:
        return METRICS[metric]
    except KeyError:
        raise ConfigError(
            f"quality gate: unknown metric {metric!r}; choose one of {', '.join(sorted(METRICS))}"
        ) from None


@dataclass(frozen=True)
class QualityPolicy:
    metric: str = "accuracy"
    higher_is_better: bool = True
    #: How much worse than the champion the candidate may be, in the metric's units (0.01 = one
    #: accuracy point).
    max_drop: float = 0.01
    #: Absolute bound the candidate must meet (a minimum when higher is better, a maximum when
    #: lower is); None: no floor.
    floor: float | None = 0.9
    #: Fail when a champion exists but has no recorded value for ``metric``.
    require_champion_metric: bool = False

    def __post_init__(self) -> None:
        if not self.metric:
            raise ConfigError("quality gate: metric must be named")
        if not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise ConfigError(f"quality gate: max_drop must be >= 0, got {self.max_drop}")
        if self.floor is not None and not math.isfinite(self.floor):
            raise ConfigError(f"quality gate: floor must be a finite number, got {self.floor}")
        spec = METRICS.get(self.metric)
        if spec is None:  # a metric of the caller's own: direction and floor as given
            return
        if self.higher_is_better != spec.higher_is_better:
            way = "higher" if spec.higher_is_better else "lower"
            raise ConfigError(
                f"quality gate: for {self.metric} {way} is better, but the policy has "
                f"higher_is_better={self.higher_is_better}"
            )
        if self.floor is not None and not spec.low <= self.floor <= spec.high:
            raise ConfigError(
                f"quality gate: a floor of {self.floor} is outside the values {self.metric} "
                f"can take ({spec.low:g}..{spec.high:g})"
            )

    @classmethod
    def for_metric(
        cls,
        metric: str,
        *,
        max_drop: float,
        floor: float | None,
        require_champion_metric: bool = False,
    ) -> QualityPolicy:
        """The policy for one of :data:`METRICS`, its direction taken from the table (a floor
        is then a minimum or a maximum); :class:`ConfigError` for an unknown metric."""
        return cls(
            metric=metric,
            higher_is_better=metric_spec(metric).higher_is_better,
            max_drop=max_drop,
            floor=floor,
            require_champion_metric=require_champion_metric,
        )


@dataclass(frozen=True)
class ChampionMetric:
    """What the registry recorded for the champion. ``value`` None: nothing recorded."""

    version: str
    value: float | None
    source: str  # where the value came from, e.g. "run metric accuracy" or "tag ballast.accuracy"


@dataclass(frozen=True)
class QualityDecision:
    passed: bool
    metric: str
    candidate: float
    champion: float | None
    champion_version: str | None
    #: How much worse the candidate is than the champion (negative: better); None without one.
    drop: float | None
    max_drop: float
    floor: float | None
    reasons: tuple[str, ...]

    def evidence(self) -> dict[str, object]:
        return asdict(self)


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def judge_quality(
    candidate: float, champion: ChampionMetric | None, policy: QualityPolicy
) -> QualityDecision:
    """Apply ``policy`` to the candidate's held-out ``candidate`` value (see the module docstring)."""
    m = policy.metric
    reasons: list[str] = []
    failed = False
    sign = 1.0 if policy.higher_is_better else -1.0

    if not math.isfinite(candidate):
        failed = True
        reasons.append(f"candidate {m} is not a finite number ({candidate})")
    elif policy.floor is not None:
        meets = sign * (candidate - policy.floor) >= -_EPS
        side = "at least" if policy.higher_is_better else "at most"
        verdict = "meets" if meets else "fails"
        reasons.append(
            f"candidate {m} {_fmt(candidate)} {verdict} the floor ({side} {_fmt(policy.floor)})"
        )
        failed |= not meets

    champ_value: float | None = None
    drop: float | None = None
    if champion is None:
        reasons.append("no champion yet: only the floor applies")
    elif champion.value is None or not math.isfinite(champion.value):
        what = f"champion v{champion.version} has no recorded {m} ({champion.source})"
        if policy.require_champion_metric:
            failed = True
            reasons.append(f"{what}, and the policy requires one")
        else:
            reasons.append(f"{what}: only the floor applies")
    else:
        champ_value = champion.value
        if math.isfinite(candidate):
            drop = sign * (champ_value - candidate)
            ok = drop <= policy.max_drop + _EPS
            reasons.append(
                f"candidate {m} {_fmt(candidate)} vs champion v{champion.version} "
                f"{_fmt(champ_value)} ({champion.source}): "
                + (
                    f"worse by {_fmt(drop)}"
                    if drop > 0
                    else f"not worse ({_fmt(abs(drop))} better)"
                )
                + f", allowed {_fmt(policy.max_drop)}"
                + ("" if ok else " — too much worse")
            )
            failed |= not ok

    return QualityDecision(
        passed=not failed,
        metric=m,
        candidate=candidate,
        champion=champ_value,
        champion_version=champion.version if champion is not None else None,
        drop=drop,
        max_drop=policy.max_drop,
        floor=policy.floor,
        reasons=tuple(reasons),
    )

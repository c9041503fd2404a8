"""The canary controller: shift traffic step by step, judge each step, promote or roll back.

This is the one place that changes live traffic. Every exit path leaves the gateway in a known
state: a rollback verdict sets champion-only, a promotion sets candidate-only, and any exception
(``KeyboardInterrupt`` included) restores the deployment that was in force before the canary
began, then re-raises. Registry alias moves are the caller's (see :mod:`ballast.decisions`).

With a :class:`~ballast.judge.StreamJudge` (the sequential judge) the controller also feeds the
judge every batch of traffic as it arrives and asks it after each batch, so a step ends as soon
as the judge decides; :func:`step_action` says what happens after each verdict (the canary
simulator in :mod:`ballast.simulate` follows the same rule on simulated time).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from ballast.decisions import validate_steps
from ballast.judge import (
    Judge,
    Observation,
    StreamJudge,
    Verdict,
    VersionStats,
    is_ready,
)
from ballast.loadgen import VersionCounts, run_load
from ballast.serving import Deployment, VersionSpec

__all__ = [
    "CanaryResult",
    "DeploymentAdmin",
    "LoadFn",
    "StepAction",
    "StepRecord",
    "http_load",
    "run_canary",
    "step_action",
]

logger = logging.getLogger(__name__)

# Drives traffic for one step at the given canary weight (percent); returns what it observed.
LoadFn = Callable[[int], list[Observation]]

StepAction = Literal["stay", "advance", "end"]


def step_action(verdict: Verdict, *, next_weight: int | None, step_done: bool) -> StepAction:
    """What a controller does after a verdict from a stream judge (pure).

    * "rollback" or "promote": end the canary.
    * "continue" at the last step: stay (keep watching until the judge decides or time is up).
    * "continue" before the step's minimum (samples or seconds) is done: stay.
    * "continue" with the minimum done: advance, except into 100 %, which waits until the judge
      says the canary is clearly good enough (:func:`~ballast.judge.is_ready`): at 100 % the
      champion serves nothing, so there is nothing left to compare against.
    """
    if verdict.decision != "continue":
        return "end"
    if next_weight is None or not step_done:
        return "stay"
    if next_weight >= 100 and not is_ready(verdict):
        return "stay"
    return "advance"


class DeploymentAdmin(Protocol):
    """The part of the gateway's admin API the controller needs (``GatewayClient`` has it)."""

    def get_deployment(self) -> Deployment | None: ...

    def set_deployment(self, dep: Deployment) -> Deployment: ...


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One canary step: the weight, what the judge said, and how much traffic it saw.

    ``seconds`` is measured from the start of the canary to this step's verdict. ``counts`` are
    this step's observations per version; ``baseline_n`` and ``canary_n`` are cumulative, which is
    what the judge saw.
    """

    index: int
    weight: int
    verdict: Verdict
    seconds: float
    step_seconds: float
    counts: Mapping[str, int]
    baseline_n: int
    canary_n: int


@dataclass(frozen=True, slots=True)
class CanaryResult:
    """How a canary ended. ``final_deployment`` is what the gateway confirmed it now serves."""

    decision: Literal["promote", "rollback"]
    candidate: str
    champion: str | None
    reasons: tuple[str, ...]
    steps: tuple[StepRecord, ...]
    seconds_to_decision: float
    final_deployment: Deployment
    evidence: Mapping[str, float] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.decision == "promote"


def http_load(
    base_url: str,
    model: str,
    rows: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    candidate_version: str,
    min_samples: int,
    max_seconds: float,
    concurrency: int = 8,
    timeout: float = 5.0,
) -> LoadFn:
    """The default :data:`LoadFn`: real requests via :func:`~ballast.loadgen.run_load`.

    Each call sends until the candidate answered ``min_samples`` times or ``max_seconds``
    elapse. The request budget scales with the weight (about four times the expected number
    needed to reach ``min_samples`` at that share, plus a floor) so a step is bounded in count
    as well as in time.
    """

    def enough(counts: Mapping[str, VersionCounts]) -> bool:
        seen = counts.get(candidate_version)
        return seen is not None and seen.n >= min_samples

    def load(weight: int) -> list[Observation]:
        budget = 4 * math.ceil(min_samples * 100 / max(weight, 1)) + 100
        return run_load(
            base_url,
            model,
            rows,
            labels,
            concurrency=concurrency,
            max_requests=budget,
            max_seconds=max_seconds,
            stop_when=enough,
            timeout=timeout,
        )

    return load


@contextmanager
def _restore_on_failure(
    client: DeploymentAdmin, model: str, before: Deployment | None
) -> Iterator[None]:
    """On any exception, put back the deployment read before the canary, then re-raise."""
    try:
        yield
    except BaseException as exc:
        # Nothing deployed before means nothing should be served after.
        restore = before if before is not None else Deployment(model=model)
        try:
            client.set_deployment(restore)
        except Exception as restore_exc:
            # The original failure stays the one raised; the restore failure rides along.
            exc.add_note(f"restoring the pre-canary deployment failed too: {restore_exc!r}")
            logger.error("canary aborted (%r) and the restore failed: %r", exc, restore_exc)
        else:
            logger.warning("canary aborted (%r): pre-canary deployment restored", exc)
        raise


def _drive_step(
    load: LoadFn, weight: int, candidate: str, min_samples: int, step_max_seconds: float
) -> list[Observation]:
    """Call ``load`` until the candidate has ``min_samples`` answers in this step or time is up."""
    deadline = time.monotonic() + step_max_seconds
    out: list[Observation] = []
    while True:
        batch = load(weight)
        out.extend(batch)
        have = sum(1 for o in out if o.version == candidate)
        # An empty batch means the load has nothing more to give: don't spin until the deadline.
        if have >= min_samples or not batch or time.monotonic() >= deadline:
            return out


@dataclass(slots=True)
class _StreamStep:
    observations: list[Observation]
    verdict: Verdict
    baseline: VersionStats | None
    canary: VersionStats


def _drive_stream_step(
    judge: StreamJudge,
    load: LoadFn,
    *,
    weight: int,
    next_weight: int | None,
    champion: str | None,
    candidate: str,
    seen: list[Observation],
    min_samples: int,
    step_max_seconds: float,
) -> _StreamStep:
    """Feed each load batch to the judge and ask it at once; :func:`step_action` ends the step."""
    deadline = time.monotonic() + step_max_seconds
    out: list[Observation] = []
    while True:
        batch = load(weight)
        out.extend(batch)
        seen.extend(batch)
        judge.observe(batch, weight)
        baseline = VersionStats.from_observations(champion, seen) if champion else None
        canary = VersionStats.from_observations(candidate, seen)
        verdict = judge.judge(baseline, canary, weight)
        have = sum(1 for o in out if o.version == candidate)
        action = step_action(verdict, next_weight=next_weight, step_done=have >= min_samples)
        # An empty batch means the load has nothing more to give: don't spin until the deadline.
        if action != "stay" or not batch or time.monotonic() >= deadline:
            return _StreamStep(out, verdict, baseline, canary)


def _step_deployment(
    model: str, champion: VersionSpec | None, candidate: VersionSpec, weight: int
) -> Deployment:
    if champion is None:
        return Deployment(model=model, canary=candidate, canary_weight=100)
    return Deployment(model=model, champion=champion, canary=candidate, canary_weight=weight)


def run_canary(
    client: DeploymentAdmin,
    *,
    model: str,
    champion: VersionSpec | None,
    candidate: VersionSpec,
    steps: tuple[int, ...],
    judge: Judge,
    load: LoadFn,
    min_samples: int,
    step_max_seconds: float,
    on_step: Callable[[StepRecord], None] | None = None,
) -> CanaryResult:
    """Run a progressive canary of ``candidate`` against ``champion`` and apply the outcome.

    Each step sets the canary weight, drives load (until the candidate has ``min_samples``
    answers in the step or ``step_max_seconds`` pass) and asks ``judge`` about everything seen
    since the canary began. "rollback" ends it at once with the champion alone; "continue" moves
    to the next weight; only a "promote" makes the candidate the champion (a judge answers it at
    100 %, or earlier when configured to promote early). A last step without a "promote" (too
    little evidence) rolls back: a canary that proved nothing is not promoted. With no champion
    (first release) the candidate takes 100 % at once and the judge works on absolute thresholds.

    A :class:`~ballast.judge.StreamJudge` is started for this canary, sees every load batch and
    is asked after each one; a step then lasts until :func:`step_action` moves on (at least
    ``min_samples`` candidate answers, the judge's word before 100 %) or ``step_max_seconds``
    pass. A step before 100 % whose time runs out while the judge is not yet sure ends the canary
    as inconclusive (rolled back) instead of giving the candidate all traffic.
    """
    if champion is not None and champion.version == candidate.version:
        raise ValueError(f"candidate {candidate.version} is already the champion")
    if min_samples < 1 or not step_max_seconds > 0:
        raise ValueError("min_samples must be >= 1 and step_max_seconds > 0")
    weights = validate_steps(steps) if champion is not None else (100,)

    before = client.get_deployment()
    if champion is not None and before is not None and before.champion != champion:
        logger.warning(
            "gateway champion %s differs from the canary's champion %s; canary goes on",
            before.champion.version if before.champion else None,
            champion.version,
        )
    stream = judge if isinstance(judge, StreamJudge) else None
    started = time.monotonic()
    records: list[StepRecord] = []
    seen: list[Observation] = []

    with _restore_on_failure(client, model, before):
        if stream is not None:
            stream.start(champion.version if champion else None, candidate.version)
        for index, weight in enumerate(weights):
            next_weight = weights[index + 1] if index + 1 < len(weights) else None
            step_started = time.monotonic()
            client.set_deployment(_step_deployment(model, champion, candidate, weight))
            if stream is None:
                step_obs = _drive_step(
                    load, weight, candidate.version, min_samples, step_max_seconds
                )
                seen.extend(step_obs)
                baseline = (
                    VersionStats.from_observations(champion.version, seen) if champion else None
                )
                canary_stats = VersionStats.from_observations(candidate.version, seen)
                verdict = judge.judge(baseline, canary_stats, weight)
            else:
                step = _drive_stream_step(
                    stream,
                    load,
                    weight=weight,
                    next_weight=next_weight,
                    champion=champion.version if champion else None,
                    candidate=candidate.version,
                    seen=seen,
                    min_samples=min_samples,
                    step_max_seconds=step_max_seconds,
                )
                step_obs, verdict = step.observations, step.verdict
                baseline, canary_stats = step.baseline, step.canary
            now = time.monotonic()
            record = StepRecord(
                index=index,
                weight=weight,
                verdict=verdict,
                seconds=now - started,
                step_seconds=now - step_started,
                counts=dict(Counter(o.version for o in step_obs)),
                baseline_n=baseline.n if baseline else 0,
                canary_n=canary_stats.n,
            )
            records.append(record)
            logger.info(
                "canary %s step %d at %d%%: %s (%s) after %.1fs",
                candidate.version,
                index + 1,
                weight,
                verdict.decision,
                "; ".join(verdict.reasons),
                record.seconds,
            )
            if on_step is not None:
                on_step(record)
            if verdict.decision != "continue":
                break
            held = stream is not None and next_weight is not None
            if held and step_action(verdict, next_weight=next_weight, step_done=True) == "stay":
                break  # held before 100 % and out of time: inconclusive

        last = records[-1]
        seconds_to_decision = last.seconds
        if last.verdict.decision == "promote":
            decision: Literal["promote", "rollback"] = "promote"
            reasons = last.verdict.reasons
            final = Deployment(model=model, champion=candidate)
        else:
            decision = "rollback"
            reasons = last.verdict.reasons
            if last.verdict.decision != "rollback":
                reasons = (f"inconclusive at {last.weight}%", *reasons)
            # Champion alone at 100 % (or nothing served, on a first release).
            final = Deployment(model=model, champion=champion)
        applied = client.set_deployment(final)

    logger.info(
        "canary %s: %s after %.1fs (%s)",
        candidate.version,
        decision,
        seconds_to_decision,
        "; ".join(reasons),
    )
    return CanaryResult(
        decision=decision,
        candidate=candidate.version,
        champion=champion.version if champion else None,
        reasons=reasons,
        steps=tuple(records),
        seconds_to_decision=seconds_to_decision,
        final_deployment=applied,
        evidence=dict(last.verdict.evidence),
    )

"""The cost gate: may a candidate go on to registration, given what it costs to serve against
the champion?

A pure decision (no registry, no runtime): the caller measures, per benchmarked batch size, the
candidate's time per call over the champion's, side by side in one process
(:func:`ballast.compile.bench.relative_cost`), and passes the ratios in.

Why a gate before the canary, and not only the canary's live judge: the versions share the
gateway's cores, and under load every request waits behind both versions' model calls (a fast
model's batches run on the event loop, one per version per loop iteration; slower ones share
the inference threads). A canary that costs several times the champion's compute then slows
the champion's answers about as much as its own, and the judge's latency comparison barely
sees it (``benchmarks/canary_cost_visibility.py``). It shows as lost capacity once promoted.

The candidate fails when a ratio is not a finite positive number (the measurement broke) or its
worst ratio is above ``max_ratio``. Without a champion, with the gate off (``max_ratio`` None),
or when the champion could not be measured here (``not_compared``: say, a TensorRT champion on a
machine without TensorRT), it passes with a reason saying so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["CostDecision", "judge_cost"]


@dataclass(frozen=True)
class CostDecision:
    passed: bool
    #: Whether a comparison was made (False: gate off, no champion, or not measurable here).
    compared: bool
    #: Batch size -> candidate's time per call / champion's.
    ratios: dict[int, float] = field(default_factory=dict)
    max_ratio: float | None = None
    champion_version: str | None = None
    reasons: tuple[str, ...] = ()

    def evidence(self) -> dict[str, float]:
        """The ratios as named figures for the approval form and the release report (none when
        nothing was compared)."""
        if not self.compared:
            return {}
        return {f"cost_vs_champion_b{b}": r for b, r in self.ratios.items()}

    @property
    def worst(self) -> tuple[int, float] | None:
        """The batch size with the highest ratio, and that ratio (None: nothing compared)."""
        if not self.ratios:
            return None
        b = max(self.ratios, key=lambda k: (self.ratios[k], k))
        return b, self.ratios[b]


def judge_cost(
    ratios: Mapping[int, float],
    max_ratio: float | None,
    champion_version: str | None,
    *,
    not_compared: str | None = None,
) -> CostDecision:
    """The gate's decision. ``not_compared``: why no ratio could be measured (passes)."""
    # A plain dict (sorted by batch): Prefect pickles a task's error with its decision.
    frozen = dict(sorted(ratios.items()))

    def skip(reason: str) -> CostDecision:
        return CostDecision(True, False, frozen, max_ratio, champion_version, (reason,))

    if max_ratio is None:
        return skip("cost gate off (BALLAST_COST_MAX_RATIO unset)")
    if champion_version is None:
        return skip("no champion to compare the serving cost with")
    if not_compared is not None:
        return skip(f"serving cost not compared with champion {champion_version}: {not_compared}")
    if not frozen:
        return skip(f"no batch size to compare with champion {champion_version}")
    broken = [b for b, r in frozen.items() if not (math.isfinite(r) and r > 0)]
    if broken:
        return CostDecision(
            False,
            True,
            frozen,
            max_ratio,
            champion_version,
            (f"serving cost could not be measured at batch {', '.join(map(str, broken))}",),
        )
    shown = ", ".join(f"batch {b}: {r:.2f}x" for b, r in frozen.items())
    over = {b: r for b, r in frozen.items() if r > max_ratio}
    if over:
        b, r = max(over.items(), key=lambda kv: kv[1])
        reason = (
            f"serving cost {r:.2f}x champion {champion_version}'s at batch {b}, above the "
            f"{max_ratio:g}x limit ({shown})"
        )
        return CostDecision(False, True, frozen, max_ratio, champion_version, (reason,))
    reason = f"serving cost within {max_ratio:g}x champion {champion_version}'s ({shown})"
    return CostDecision(True, True, frozen, max_ratio, champion_version, (reason,))

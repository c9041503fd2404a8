"""Paired comparisons of two server configurations measured in alternating (or simultaneous)
rounds: the median of the per-round changes, with a distribution-free confidence interval.

On a shared 2-core VM one round's req/s moves by +-10 % with the machine, so a cost of a few
percent is only visible in the median of many paired rounds, and only the interval says
whether the rounds were enough to tell. The interval is the classic one for a median from
order statistics (the sign test's): no assumption about how the changes are distributed,
only that rounds are independent.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binom

__all__ = ["PairedChange", "median_interval", "paired_change"]


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float] | None:
    """The ``confidence`` interval of the median of ``values`` from their order statistics, or
    None when there are too few values for that confidence (5 or fewer at 95 %).

    ``[x(j), x(n-j+1)]`` (1-based, sorted) covers the median with probability
    ``1 - 2 P(B <= j-1)``, ``B ~ Binomial(n, 1/2)``; ``j`` is the largest that keeps it at least
    ``confidence``.
    """
    if not 0 < confidence < 1:
        raise ValueError("confidence must lie strictly between 0 and 1")
    xs = sorted(values)
    n = len(xs)
    alpha = 1 - confidence
    j = 0
    while j + 1 <= n // 2 and 2 * binom.cdf(j, n, 0.5) <= alpha:
        j += 1
    if j == 0:
        return None
    return xs[j - 1], xs[n - j]


@dataclass(frozen=True)
class PairedChange:
    """Per-round changes of a configuration against the baseline, in percent."""

    rounds: int
    median: float
    q1: float
    q3: float
    low: float | None  # the median's confidence interval; None: too few rounds
    high: float | None
    confidence: float

    def text(self) -> str:
        """``-4.2% [-7,+1] (95% CI -5.9..-2.4, 40 rounds)``: median [quartiles] (interval)."""
        head = f"{self.median:+.1f}%"
        if self.rounds >= 4:
            head += f" [{self.q1:+.0f},{self.q3:+.0f}]"
        if self.low is None or self.high is None:
            return f"{head} (too few rounds for a {self.confidence:.0%} interval)"
        return (
            f"{head} ({self.confidence:.0%} CI {self.low:+.1f}..{self.high:+.1f}, "
            f"{self.rounds} rounds)"
        )


def paired_change(
    values: Sequence[float], base: Sequence[float], confidence: float = 0.95
) -> PairedChange:
    """How ``values`` differ from ``base``, round by round (same index: neighbours in time), as
    percent changes ``100 (v / b - 1)``: their median, quartiles and the median's interval."""
    if len(values) != len(base) or not values:
        raise ValueError("want the same number of rounds (at least one) for both")
    if any(b <= 0 for b in base):
        raise ValueError("baseline values must be positive")
    changes = sorted(100 * (v / b - 1) for v, b in zip(values, base, strict=True))
    q1 = q3 = changes[0]
    if len(changes) >= 2:
        q1, _, q3 = statistics.quantiles(changes, n=4)
    interval = median_interval(changes, confidence)
    return PairedChange(
        rounds=len(changes),
        median=statistics.median(changes),
        q1=q1,
        q3=q3,
        low=None if interval is None else interval[0],
        high=None if interval is None else interval[1],
        confidence=confidence,
    )

"""Always-valid sequential statistics for canary judgement: pure functions, no I/O, no clocks.

The central test: which arm did a bad event come from?
------------------------------------------------------

A gateway sends each request to the canary with probability ``w`` (the step weight), at random
and independently of the request. Call a request's outcome a *bad event* when it failed, when it
was slower than the champion's running p95, or when its answer disagreed with a label. If the
canary behaves like the champion (H0), routing is independent of the outcome, so

    P(a bad event came from the canary | it happened, everything before it) = w

exactly, whatever the champion's own rate is and however it drifts over time (bursts of
champion errors, load spikes, a slow minute: none of it breaks the test). If the canary's bad
events are ``rho`` times as frequent as the champion's, that probability becomes

    pi(w, rho) = w rho / (w rho + 1 - w),   i.e.  logit(pi) = logit(w) + log(rho).

So the arm labels of the bad events form a Bernoulli sequence whose log-odds are shifted by
``log(rho)``: the champion's rate is a nuisance that conditioning removes (Lehmann's conditional
test for two Poisson rates; the binomial form of Kulldorff's MaxSPRT for vaccine safety uses
the same reduction). Only the counts per weight matter: ``k_c`` canary and ``k_b`` champion
events seen at weight ``w`` contribute ``k_c log(pi_1/pi_0) + k_b log((1-pi_1)/(1-pi_0))`` to the
log-likelihood ratio of ``rho_1`` against ``rho_0``.

Mixture SPRT and Ville's inequality
-----------------------------------

Wald's SPRT needs the alternative ``rho_1`` in advance. Robbins' mixture (1970), in the form
Johari, Pekelis and Walsh call the mSPRT ("Always valid inference", 2017/2022), averages the
likelihood ratio over a prior on the alternative:

    M_t = sum_g prior_g * LR_t(rho_g).

Under H0 each ``LR_t(rho_g)`` is a non-negative martingale with ``LR_0 = 1`` (a supermartingale
for the composite null ``rho <= rho_0``, by the monotone likelihood ratio of the Bernoulli
family), so ``M_t`` is one too, and Ville's inequality gives

    P(there is ever a t with M_t >= 1/alpha) <= alpha

however often one looks, and whenever one stops: the always-valid p-value is
``min(1, 1/max_{s<=t} M_s)``. The prior here is a normal on ``log(rho)`` centred at the effect
size the operator configures, truncated to the alternative side and laid on a fixed grid
(Howard, Ramdas, McAuliffe and Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", 2021, discuss the choice: a prior near the true effect costs little; a far one costs
``(log rho - log rho_e)^2 / (2 s^2)`` nats). Being told nothing costs a few nats over Wald's SPRT
told the truth; being told roughly costs well under one.

The same machinery, with the null at a margin ``R`` and the prior below it, tests "the canary's
ratio is below ``R``" (good enough to promote); with a fixed null probability it gives
one-sample tests of a canary's own rate (first releases; zero-event regimes where ratios say
nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# numpy only: this module sits on the CLI's import path, and scipy costs a few hundred ms there.
# tests/unit/test_sequential.py checks these helpers against scipy.

__all__ = [
    "MLE_RATIOS",
    "ArmLikelihood",
    "CellCounts",
    "KeyedArms",
    "LogHistogram",
    "RatioPrior",
    "arm_share",
    "bernoulli_log_e",
    "conditional_log_e",
    "harm_prior",
    "logsumexp",
    "one_sample_prior",
    "promote_prior",
    "psi",
    "ratio_mle",
    "wald_sprt_bounds",
]

# log-ratio grid used for priors: 48 points is plenty for a smooth prior (the mixture changes by
# well under 1 % against a 480-point grid).
_GRID_POINTS = 48


def logsumexp(values: np.ndarray | Sequence[float], axis: int | None = None) -> np.ndarray:
    """log(sum(exp(values))) without overflow (``-inf`` entries allowed)."""
    a = np.asarray(values, dtype=np.float64)
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # every entry -inf: the answer is -inf, not a warning
        out = np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True)) + top
    return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


def _logit(p: np.ndarray) -> np.ndarray:
    return np.asarray(np.log(p) - np.log1p(-p))


def _norm_logpdf(x: np.ndarray, loc: float, scale: float) -> np.ndarray:
    return np.asarray(-0.5 * ((x - loc) / scale) ** 2 - math.log(scale * math.sqrt(2 * math.pi)))


@dataclass(frozen=True, slots=True)
class RatioPrior:
    """Alternative ratios (odds multipliers) and their prior log-weights (which sum to 1)."""

    ratios: np.ndarray
    log_weights: np.ndarray

    def __post_init__(self) -> None:
        if self.ratios.shape != self.log_weights.shape or self.ratios.ndim != 1:
            raise ValueError("ratios and log_weights must be 1-D arrays of the same length")
        if not np.all(self.ratios > 0):
            raise ValueError("ratios must be positive")
        total = float(logsumexp(self.log_weights))
        if abs(total) > 1e-9:
            raise ValueError(f"prior weights must sum to 1 (log-sum {total:.3g})")


def _normal_grid_prior(lo: float, hi: float, centre: float, spread: float) -> RatioPrior:
    """A normal prior on log(ratio), truncated to [lo, hi] (log scale) and put on a grid."""
    if not spread > 0:
        raise ValueError("prior spread must be > 0")
    if not hi > lo:
        raise ValueError("empty prior range")
    log_r = np.linspace(lo, hi, _GRID_POINTS)
    log_w = _norm_logpdf(log_r, centre, spread)
    log_w -= logsumexp(log_w)
    return RatioPrior(np.exp(log_r), log_w)


def harm_prior(effect: float, spread: float = 0.75, max_ratio: float = 100.0) -> RatioPrior:
    """Prior for "the canary is worse": ratios in (1, max_ratio], centred on ``effect``.

    ``spread`` is the standard deviation of log(ratio): 0.75 puts about two thirds of the mass
    between effect/2.1 and effect x 2.1.
    """
    if not effect > 1 or not max_ratio > 1:
        raise ValueError(f"a harm effect size is a ratio above 1, got {effect}")
    # Start just above 1: rho = 1 exactly is the null and carries no evidence.
    return _normal_grid_prior(
        math.log(1.02), math.log(max_ratio), math.log(min(effect, max_ratio)), spread
    )


def promote_prior(margin: float, spread: float = 0.75) -> RatioPrior:
    """Prior for "the canary's ratio is below ``margin``": ratios in [margin/50, margin),
    centred on 1 (the canary behaves like the champion)."""
    if not margin > 1:
        raise ValueError(f"a promotion margin is a ratio above 1, got {margin}")
    hi = math.log(margin) - 0.02
    return _normal_grid_prior(math.log(margin) - math.log(50.0), hi, 0.0, spread)


def one_sample_prior(below: bool, spread: float = 1.5) -> RatioPrior:
    """Odds multipliers for a one-sample test of a fixed rate: above it (``below=False``,
    centred on 3x) or below it (``below=True``, centred on 1/8: a clean canary)."""
    if below:
        return _normal_grid_prior(math.log(1 / 1000), -0.02, math.log(1 / 8), spread)
    return _normal_grid_prior(0.02, math.log(1000), math.log(3), spread)


def arm_share(weight: float | np.ndarray, ratio: float | np.ndarray) -> np.ndarray:
    """P(a bad event came from the canary): ``w rho / (w rho + 1 - w)`` (``w`` in (0, 1))."""
    w = np.asarray(weight, dtype=np.float64)
    r = np.asarray(ratio, dtype=np.float64)
    return np.asarray(w * r / (w * r + 1.0 - w))


def _shifted(p0: np.ndarray, ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log p and log(1 - p) for p = expit(logit(p0) + log(ratio)), computed stably."""
    z = _logit(p0) + np.log(ratios)
    return -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)


def bernoulli_log_e(k: float, n: float, p0: float, prior: RatioPrior) -> float:
    """log of the mixture likelihood ratio for ``k`` successes in ``n`` Bernoulli trials.

    Null: success probability ``p0``. Alternatives: ``expit(logit(p0) + log(ratio))`` for each
    prior ratio. Zero trials give 0 (an e-value of 1: no evidence).
    """
    if not 0 < p0 < 1:
        raise ValueError(f"p0 must lie in (0, 1), got {p0}")
    if k < 0 or n < k:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0
    log_p, log_q = _shifted(np.asarray(p0), prior.ratios)
    ll = k * (log_p - math.log(p0)) + (n - k) * (log_q - math.log1p(-p0))
    return _lse1(ll + prior.log_weights)


@dataclass(frozen=True, slots=True)
class CellCounts:
    """Bad events seen at one canary weight: how many came from each arm."""

    weight: float  # the canary's routing probability, in (0, 1)
    canary: float
    champion: float
    tier: float = 1.0  # see ArmLikelihood.add


class ArmLikelihood:
    """Log-likelihood ratios of the arm-label model, accumulated on a grid of ratios against a
    null ratio: the incremental form of :func:`conditional_log_e` (same numbers, O(grid) per
    batch instead of O(grid x weights) per look).
    """

    __slots__ = ("_coef", "_ll", "events", "null_ratio", "ratios")

    def __init__(self, ratios: np.ndarray, null_ratio: float) -> None:
        if not null_ratio > 0 or not np.all(np.asarray(ratios) > 0):
            raise ValueError("ratios must be > 0")
        self.ratios = np.asarray(ratios, dtype=np.float64)
        self.null_ratio = float(null_ratio)
        self._ll = np.zeros(self.ratios.shape)
        self._coef: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
        self.events = 0.0

    def _coefficients(self, weight: float, tier: float) -> tuple[np.ndarray, np.ndarray]:
        coef = self._coef.get((weight, tier))
        if coef is None:
            p0 = float(arm_share(weight, self.null_ratio**tier))
            log_p, log_q = _shifted(np.asarray(p0), (self.ratios / self.null_ratio) ** tier)
            coef = (log_p - math.log(p0), log_q - math.log1p(-p0))
            self._coef[(weight, tier)] = coef
        return coef

    def add(self, weight: float, canary: float, champion: float, tier: float = 1.0) -> None:
        """``canary`` and ``champion`` bad events seen while the canary's share was ``weight``.

        ``tier`` k says these events' ratio is the k-th power of the tested one (a latency
        answer above the champion's p99 is a tier-2 event when one above its p95 is tier 1:
        a stretched tail raises the far tail's ratio about as the square of the near one's).
        """
        if canary < 0 or champion < 0 or not tier > 0:
            raise ValueError("event counts must be >= 0 and tier > 0")
        if not 0 <= weight <= 1:  # NaN too: skipped below, its events would be lost unseen
            raise ValueError(f"weight must lie in [0, 1], got {weight}")
        # A weight of 0 or 1 leaves no doubt about the arm: such events carry no evidence.
        if not 0 < weight < 1 or (canary == 0 and champion == 0):
            return
        a, b = self._coefficients(weight, tier)
        self._ll += canary * a + champion * b
        self.events += canary + champion

    def log_e(self, prior: RatioPrior) -> float:
        """log of the mixture e-value over ``prior`` (whose ratios must be this grid's)."""
        if prior.ratios.shape != self.ratios.shape:
            raise ValueError("the prior must be laid on this likelihood's grid")
        return _lse1(self._ll + prior.log_weights)

    def argmax_ratio(self) -> float | None:
        """The grid ratio with the highest likelihood; None before any event."""
        if self.events == 0:
            return None
        return float(self.ratios[int(np.argmax(self._ll))])


class KeyedArms:
    """The arm test for sticky traffic: which of a routing key's answers are draws at a known
    share, and which arm they came from.

    The gateway sends a request that carries a routing key to the canary iff the key's bucket
    ``b`` (a hash salted per canary: uniform in [0, 1) and independent of how the client
    behaves) is below the weight. The unit the gateway randomises is then the key, not the
    request: a client that errs or is slow lands wholly on one side, and counting each of its
    bad events as a fresh draw with probability ``w`` (what :class:`ArmLikelihood` does for
    unkeyed traffic) turns one unusual client into overwhelming evidence. A simulation with 200
    Zipf-distributed keys and identical versions rolled back about half the canaries.

    What stays exact is one answer per key: the first answer a key gets (a trial of the metric)
    reveals its arm, canary with probability ``w``, and is bad with the key's own rate, times
    the ratio on the canary. The key's rate does not depend on its bucket, so among such first
    answers that are bad, the canary's share is ``w rho / (w rho + 1 - w)``: the same shifted
    odds as for unkeyed requests, under the null (``rho = 1``: the rollback test's bound) and
    under every alternative (the good-enough test's bound). Later answers of the key at the
    same weight carry no evidence (its arm is known). When the weight rises from ``lo`` to
    ``w``, a key known to be at least ``lo`` is on the canary with probability
    ``(w - lo) / (1 - lo)``: its next answer is one more draw, at that share. Each key keeps the
    interval its bucket is known to lie in, per metric (the filtration of that metric's
    answers), and :meth:`events` turns a batch's keyed trials into (share, tier, canary,
    champion) cells of bad events; unkeyed answers stay with the caller.

    With ``trials`` the bad events themselves, a key's first *bad* answer is the draw instead.
    That keeps the null exact (the rollback test's bound holds) and finds far more events when
    most keys' first answers are good, but not the alternative: a key that errs often has its
    first failure early on either side, so its share stays near ``w`` whatever the ratio. It
    understates harm (the rollback test loses some power, never validity) and overstates how
    good a canary is, so it must never feed a good-enough test: counted there, a canary failing
    five times as often was found good enough in 6 of 100 simulated canaries with 200 keys.
    """

    __slots__ = ("_hi", "_lo")

    def __init__(self) -> None:
        # The interval [lo, hi) each key's bucket is known to lie in, by key index.
        self._lo = np.zeros(0)
        self._hi = np.ones(0)

    def events(
        self,
        weight: float,
        canary: np.ndarray,
        keys: np.ndarray,
        trials: np.ndarray,
        bad: np.ndarray,
        tiers: np.ndarray | None = None,
    ) -> list[CellCounts]:
        """Cells of the arm test for the keyed ``trials`` at ``weight``: ``keys`` are key
        indices (>= 0; -1: no key), the same index for the same key in every call. Each key's
        first trial in the batch is a draw while its arm is uncertain, counted when ``bad``
        (later ones at this weight find it known). Updates what is known of each key."""
        rows = np.flatnonzero(trials & (keys >= 0))
        if not rows.size:
            return []
        _, first = np.unique(keys[rows], return_index=True)
        rows = rows[first]
        ids = keys[rows]
        size = int(ids.max()) + 1
        if size > self._lo.size:
            grow = max(size, 2 * self._lo.size) - self._lo.size
            self._lo = np.concatenate([self._lo, np.zeros(grow)])
            self._hi = np.concatenate([self._hi, np.ones(grow)])
        lo, hi = self._lo[ids], self._hi[ids]
        share = (np.clip(weight, lo, hi) - lo) / (hi - lo)
        # Outside (0, 1) the arm was known (or, were it the other one, the salt changed).
        draw = (share > 0.0) & (share < 1.0)
        rows, ids, lo, hi, share = rows[draw], ids[draw], lo[draw], hi[draw], share[draw]
        on_canary = canary[rows].astype(bool)
        self._lo[ids] = np.where(on_canary, lo, weight)
        self._hi[ids] = np.where(on_canary, weight, hi)
        counted = bad[rows].astype(bool)
        if not counted.any():
            return []
        share, on_canary = share[counted], on_canary[counted]
        tier = np.ones(share.size) if tiers is None else np.asarray(tiers)[rows[counted]]
        cells, which = np.unique(np.stack([share, tier], axis=1), axis=0, return_inverse=True)
        which = which.reshape(-1)
        n = len(cells)
        c = np.bincount(which[on_canary], minlength=n)
        b = np.bincount(which[~on_canary], minlength=n)
        return [
            CellCounts(float(w), int(c[i]), int(b[i]), float(t)) for i, (w, t) in enumerate(cells)
        ]


def _lse1(a: np.ndarray) -> float:
    top = float(np.max(a))
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.sum(np.exp(a - top))))


def conditional_log_e(cells: Sequence[CellCounts], null_ratio: float, prior: RatioPrior) -> float:
    """log of the mixture e-value of the arm-label test (module docstring) against ``null_ratio``.

    With ``prior`` above ``null_ratio`` it tests "the canary is worse than ``null_ratio`` times
    the champion"; below it, "the canary is better than that". Always valid (Ville).
    """
    lik = ArmLikelihood(prior.ratios, null_ratio)
    for c in cells:
        lik.add(c.weight, c.canary, c.champion, c.tier)
    return lik.log_e(prior)


MLE_RATIOS = np.exp(np.linspace(math.log(1 / 64), math.log(64), 385))


def ratio_mle(cells: Sequence[CellCounts]) -> float | None:
    """Maximum-likelihood ratio of the canary's bad-event rate to the champion's (grid search
    over 1/64..64; the ends mean "at least"/"at most"). None without evidence."""
    lik = ArmLikelihood(MLE_RATIOS, 1.0)
    for c in cells:
        lik.add(c.weight, c.canary, c.champion, c.tier)
    return lik.argmax_ratio()


def psi(canary_counts: np.ndarray, champion_counts: np.ndarray, eps: float = 1e-4) -> float | None:
    """Population stability index between two class-count vectors (shares floored at ``eps``).

    Descriptive only (it is not a sequential test): about 0.1 is usually read as a moderate
    shift and 0.25 as a large one. None when either side has no counts.
    """
    a = np.asarray(canary_counts, dtype=np.float64)
    b = np.asarray(champion_counts, dtype=np.float64)
    if a.shape != b.shape or a.sum() <= 0 or b.sum() <= 0:
        return None
    p = np.maximum(a / a.sum(), eps)
    q = np.maximum(b / b.sum(), eps)
    return float(np.sum((p - q) * np.log(p / q)))


def wald_sprt_bounds(alpha: float, beta: float) -> tuple[float, float]:
    """Wald's SPRT log-likelihood bounds (accept H0 below the first, reject above the second)."""
    if not (0 < alpha < 1 and 0 < beta < 1):
        raise ValueError("alpha and beta must lie in (0, 1)")
    return math.log(beta / (1 - alpha)), math.log((1 - beta) / alpha)


class LogHistogram:
    """Counts of positive values in log-spaced bins (about 2.3 % wide): a running quantile in
    constant memory and O(bins) time, for the champion's latency reference.

    Values below ``lo`` or above ``hi`` land in the end bins.
    """

    def __init__(self, lo: float = 1e-5, hi: float = 1e3, bins_per_decade: int = 100) -> None:
        if not 0 < lo < hi or bins_per_decade < 1:
            raise ValueError("need 0 < lo < hi and bins_per_decade >= 1")
        self._log_lo = math.log10(lo)
        self._per = bins_per_decade
        self._nbins = math.ceil((math.log10(hi) - self._log_lo) * bins_per_decade)
        self.counts = np.zeros(self._nbins, dtype=np.int64)
        self.n = 0

    def _index(self, values: np.ndarray) -> np.ndarray:
        v = np.maximum(np.asarray(values, dtype=np.float64), 1e-300)
        idx = np.floor((np.log10(v) - self._log_lo) * self._per).astype(np.int64)
        return np.clip(idx, 0, self._nbins - 1)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return
        self.counts += np.bincount(self._index(values), minlength=self._nbins)
        self.n += int(values.size)

    def upper_edge(self, index: int) -> float:
        return float(10 ** (self._log_lo + (index + 1) / self._per))

    def quantile_bin(self, q: float) -> int | None:
        """Index of the bin holding the ``q``-quantile; None when empty."""
        if not 0 < q < 1:
            raise ValueError("q must lie in (0, 1)")
        if self.n == 0:
            return None
        index = int(np.searchsorted(np.cumsum(self.counts), q * self.n, side="left"))
        return min(index, self._nbins - 1)

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bin holding the ``q``-quantile (so at most about 1-q of the
        values lie above it); None when empty."""
        index = self.quantile_bin(q)
        return None if index is None else self.upper_edge(index)

    def exceeds(self, values: np.ndarray, q: float, u: np.ndarray) -> np.ndarray:
        """Which ``values`` count as above the ``q``-quantile, ties broken at random: those in a
        higher bin than the quantile's, and those in its bin when their uniform draw ``u`` is
        below the share that brings the reference's own rate above to 1-q.

        Without the draw, values tied in the quantile's bin (constant latency, a coarse clock)
        are either never above (nothing to test on either side) or all above (a slower
        canary hides among them). With it, each side's rate is 1-q when it is distributed as
        the reference, whatever the ties; a value is judged on its bin only, and the draws
        are independent of the values, so two alike sides still count alike."""
        index = self.quantile_bin(q)
        if index is None:
            return np.zeros(np.shape(values), dtype=bool)
        above = int(self.counts[index + 1 :].sum())
        tied = int(self.counts[index])
        share = 0.0 if tied == 0 else min(1.0, max(0.0, ((1 - q) * self.n - above) / tied))
        idx = self._index(values)
        return (idx > index) | ((idx == index) & (u < share))

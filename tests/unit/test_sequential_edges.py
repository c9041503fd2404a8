"""Edges of ballast.sequential that the statistical tests leave open: the priors' ranges and
centres, the refusals of nonsense, the default tier, a null ratio other than 1, events at the
ends of the weight range, and the log histogram's bins (a mutation-testing pass's findings)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import special, stats

from ballast import sequential as sq


def point_prior(ratio: float) -> sq.RatioPrior:
    return sq.RatioPrior(np.array([ratio]), np.array([0.0]))


def arm_llr(k: int, n: int, weight: float, ratio: float, null: float = 1.0) -> float:
    """The arm test's log-likelihood ratio, from first principles (pi = w r / (w r + 1 - w))."""
    p1 = weight * ratio / (weight * ratio + 1 - weight)
    p0 = weight * null / (weight * null + 1 - weight)
    return k * math.log(p1 / p0) + (n - k) * math.log((1 - p1) / (1 - p0))


# ---------------------------------------------------------------- priors


@pytest.mark.parametrize(
    ("factory", "lo", "hi", "centre", "spread"),
    [
        (lambda: sq.harm_prior(3.0), 1.02, 100.0, 3.0, 0.75),
        # An effect beyond the grid is centred on its top end.
        (lambda: sq.harm_prior(500.0), 1.02, 100.0, 100.0, 0.75),
        (lambda: sq.harm_prior(1.2, max_ratio=1.5), 1.02, 1.5, 1.2, 0.75),
        (lambda: sq.promote_prior(2.0), 2.0 / 50, 2.0 * math.exp(-0.02), 1.0, 0.75),
        (lambda: sq.one_sample_prior(below=True), 1e-3, math.exp(-0.02), 1 / 8, 1.5),
        (lambda: sq.one_sample_prior(below=False), math.exp(0.02), 1000.0, 3.0, 1.5),
    ],
    ids=[
        "harm",
        "harm-capped",
        "harm-max-ratio",
        "promote",
        "one-sample-below",
        "one-sample-above",
    ],
)
def test_each_prior_is_a_normal_on_its_documented_log_range(
    factory: Callable[[], sq.RatioPrior], lo: float, hi: float, centre: float, spread: float
) -> None:
    prior = factory()
    assert prior.ratios.shape == (48,)
    assert prior.ratios[0] == pytest.approx(lo, rel=1e-12)
    assert prior.ratios[-1] == pytest.approx(hi, rel=1e-12)
    expected = stats.norm.logpdf(np.log(prior.ratios), loc=math.log(centre), scale=spread)
    expected -= special.logsumexp(expected)
    assert np.allclose(prior.log_weights, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        # max_ratio is checked on its own, before an empty range could be the complaint.
        (lambda: sq.harm_prior(2.0, max_ratio=1.0), "harm effect size"),
        (lambda: sq.harm_prior(2.0, max_ratio=1.02), "empty prior range"),
        (lambda: sq.harm_prior(2.0, max_ratio=1.01), "empty prior range"),
        (lambda: sq.promote_prior(1.0), "promotion margin"),
        (lambda: sq.RatioPrior(np.array([1.5, 2.0]), np.array([0.0])), "1-D"),
        (lambda: sq.RatioPrior(np.full((2, 2), 2.0), np.full((2, 2), math.log(0.25))), "1-D"),
        (lambda: sq.RatioPrior(np.array([0.0, 2.0]), np.log([0.5, 0.5])), "positive"),
        (lambda: sq.bernoulli_log_e(1, 2, 0.0, point_prior(2.0)), r"\(0, 1\)"),
        (lambda: sq.bernoulli_log_e(-1, 2, 0.1, point_prior(2.0)), "k <= n"),
        (lambda: sq.ArmLikelihood(np.array([2.0]), 0.0), "> 0"),
        (lambda: sq.ArmLikelihood(np.array([0.0, 2.0]), 1.0), "> 0"),
        (lambda: sq.ArmLikelihood(np.array([2.0]), 1.0).add(0.5, 0, -1), ">= 0"),
        (lambda: sq.ArmLikelihood(np.array([2.0]), 1.0).add(0.5, 1, 1, tier=0.0), "tier > 0"),
    ],
    ids=[
        "max-ratio-1",
        "max-ratio-at-grid-start",
        "max-ratio-below-grid-start",
        "margin-1",
        "lengths",
        "2-d",
        "zero-ratio",
        "p0-zero",
        "negative-k",
        "zero-null",
        "zero-grid-ratio",
        "negative-champion",
        "zero-tier",
    ],
)
def test_more_nonsense_is_refused(factory: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


# ---------------------------------------------------------------- likelihoods


def test_bernoulli_mixture_weighs_each_alternative_by_its_prior() -> None:
    prior = sq.RatioPrior(np.array([2.0, 4.0]), np.log([0.25, 0.75]))

    def lr(ratio: float) -> float:
        p1 = 0.1 * ratio / (0.1 * ratio + 0.9)
        return 3 * math.log(p1 / 0.1) + 17 * math.log((1 - p1) / 0.9)

    expected = math.log(0.25 * math.exp(lr(2.0)) + 0.75 * math.exp(lr(4.0)))
    assert sq.bernoulli_log_e(3, 20, 0.1, prior) == pytest.approx(expected, rel=1e-12)
    # k = n is allowed: every trial a success.
    assert sq.bernoulli_log_e(2, 2, 0.1, point_prior(3.0)) == pytest.approx(2 * math.log(2.5))
    # One trial is evidence already (only zero trials give an e-value of 1).
    assert sq.bernoulli_log_e(1, 1, 0.1, point_prior(3.0)) == pytest.approx(math.log(2.5))


def test_arm_test_against_a_null_ratio_other_than_one() -> None:
    # The good-enough test: ratio 1 against a margin of 2, at weight 1/2.
    got = sq.conditional_log_e([sq.CellCounts(0.5, 6, 2)], 2.0, point_prior(1.0))
    assert got == pytest.approx(arm_llr(6, 8, 0.5, 1.0, null=2.0), rel=1e-12)
    # Tier 2 raises both the null and the alternative to the square.
    tiered = sq.conditional_log_e([sq.CellCounts(0.5, 6, 2, tier=2.0)], 2.0, point_prior(1.5))
    assert tiered == pytest.approx(arm_llr(6, 8, 0.5, 1.5**2, null=4.0), rel=1e-12)


def test_the_default_tier_is_one_and_events_are_counted() -> None:
    lik = sq.ArmLikelihood(np.array([3.0]), 1.0)
    lik.add(0.5, 6, 2)
    assert lik.log_e(point_prior(3.0)) == pytest.approx(arm_llr(6, 8, 0.5, 3.0), rel=1e-12)
    assert lik.events == 8
    assert sq.CellCounts(0.5, 6, 2).tier == 1.0


@pytest.mark.parametrize(("canary", "champion"), [(3, 0), (0, 3), (1, 0), (0, 1)])
def test_a_cell_with_events_on_one_arm_only_is_evidence(canary: int, champion: int) -> None:
    got = sq.conditional_log_e([sq.CellCounts(0.5, canary, champion)], 1.0, point_prior(3.0))
    assert got == pytest.approx(arm_llr(canary, canary + champion, 0.5, 3.0), rel=1e-12)
    assert sq.ratio_mle([sq.CellCounts(0.5, canary, champion)]) is not None


def test_events_at_weight_zero_carry_no_evidence() -> None:
    lik = sq.ArmLikelihood(np.array([3.0]), 1.0)
    lik.add(0.0, 0, 40)
    assert lik.events == 0 and lik.argmax_ratio() is None
    assert lik.log_e(point_prior(3.0)) == 0.0
    # A weight outside [0, 1] (NaN included) is a caller's bug, not "no evidence".
    for bad in (float("nan"), -0.1, 1.5):
        with pytest.raises(ValueError, match="weight"):
            lik.add(bad, 1, 1)


def test_ratio_mle_grid_runs_from_1_64_to_64_in_steps_of_a_32nd_octave() -> None:
    assert sq.MLE_RATIOS.size == 385
    # The ends mean "at most" and "at least".
    assert sq.ratio_mle([sq.CellCounts(0.5, 0, 50)]) == pytest.approx(1 / 64, rel=1e-12)
    assert sq.ratio_mle([sq.CellCounts(0.5, 50, 0)]) == pytest.approx(64.0, rel=1e-12)
    # 4 = 2 ** (64 / 32) lies on the grid, so the closed-form MLE comes back exactly.
    assert sq.ratio_mle([sq.CellCounts(0.2, 10, 10)]) == pytest.approx(4.0, rel=1e-12)


# ---------------------------------------------------------------- psi, Wald


def test_psi_floors_empty_shares_at_eps_and_refuses_what_it_cannot_compare() -> None:
    p, q = np.array([1e-4, 1.0]), np.array([0.5, 0.5])
    expected = float(np.sum((p - q) * np.log(p / q)))
    assert sq.psi(np.array([0, 10]), np.array([5, 5])) == pytest.approx(expected, rel=1e-12)
    # One count on each side is enough.
    both = 2 * (1 - 1e-4) * math.log(1e4)
    assert sq.psi(np.array([1, 0]), np.array([0, 1])) == pytest.approx(both, rel=1e-12)
    assert sq.psi(np.array([1, 1]), np.array([0, 0])) is None
    assert sq.psi(np.array([1, 2]), np.array([1, 2, 3])) is None


@pytest.mark.parametrize(
    ("alpha", "beta"), [(0.0, 0.1), (1.0, 0.1), (0.05, 0.0), (0.05, 1.0), (0.5, 1.5), (1.5, 0.5)]
)
def test_wald_bounds_refuse_probabilities_outside_the_open_unit_interval(
    alpha: float, beta: float
) -> None:
    with pytest.raises(ValueError, match="alpha and beta"):
        sq.wald_sprt_bounds(alpha, beta)


# ---------------------------------------------------------------- log histogram


def test_log_histogram_default_bins_span_1e_5_to_1e3_at_100_per_decade() -> None:
    h = sq.LogHistogram()
    assert h.counts.shape == (800,)
    assert h.upper_edge(0) == pytest.approx(10 ** (-5 + 0.01), rel=1e-12)
    assert h.upper_edge(799) == pytest.approx(1000.0, rel=1e-12)
    assert sq.LogHistogram(1.0, 10.0, 1).counts.shape == (1,), "one bin per decade is allowed"


@pytest.mark.parametrize(
    ("lo", "hi", "per"), [(0.0, 1.0, 10), (1.0, 1.0, 10), (2.0, 1.0, 10), (1e-3, 1.0, 0)]
)
def test_log_histogram_refuses_an_empty_range_or_no_bins(lo: float, hi: float, per: int) -> None:
    with pytest.raises(ValueError, match="0 < lo < hi"):
        sq.LogHistogram(lo, hi, per)


def test_values_outside_the_range_land_in_the_end_bins() -> None:
    h = sq.LogHistogram()
    h.add(np.array([0.0, -1.0, 1e-9, 5e4, 0.02]))  # zero and negatives too, without a warning
    assert h.n == 5
    assert h.counts[0] == 3 and h.counts[799] == 1 and h.counts[330] == 1
    assert int(h.counts.sum()) == 5
    single = sq.LogHistogram()
    single.add(np.array([0.02]))
    assert single.n == 1 and single.counts[330] == 1


def test_a_quantile_in_the_top_bin_is_the_top_edge() -> None:
    h = sq.LogHistogram()
    h.add(np.array([5e4, 6e4]))
    assert h.quantile_bin(0.5) == 799 and h.quantile(0.5) == pytest.approx(1000.0)


@pytest.mark.parametrize("q", [0.0, 1.0, 1.5, -0.5])
def test_a_quantile_outside_the_open_unit_interval_is_refused(q: float) -> None:
    h = sq.LogHistogram()
    h.add(np.array([0.02]))
    with pytest.raises(ValueError, match="q must lie"):
        h.quantile(q)


def test_no_tied_value_counts_when_the_values_above_already_make_the_rate() -> None:
    # 9 at 10 ms, 1 at 1 s: the one above is the 10 % above the 0.9-quantile, so a value tied
    # with the quantile's bin never counts, even with a draw of exactly 0.
    h = sq.LogHistogram()
    h.add(np.array([0.01] * 9 + [1.0]))
    assert h.quantile_bin(0.9) == 300
    assert not h.exceeds(np.array([0.01, 0.01]), 0.9, np.array([0.0, 0.5])).any()


def test_a_single_value_in_the_quantiles_bin_is_drawn_at_its_share() -> None:
    # Ten values in ten bins: the 0.85-quantile's bin holds one (9 ms), one value lies above,
    # so a tied value counts with probability (0.15 * 10 - 1) / 1 = 1/2.
    h = sq.LogHistogram()
    h.add(np.array([0.001 * k for k in range(1, 11)]))
    index = h.quantile_bin(0.85)
    assert index is not None and h.counts[index] == 1
    got = h.exceeds(np.array([0.009, 0.009]), 0.85, np.array([0.25, 0.75]))
    assert got.tolist() == [True, False]

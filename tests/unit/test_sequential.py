"""The always-valid statistics in ballast.sequential: known cases, then seeded Monte-Carlo checks
of the false-positive bound under continuous peeking (and of the power it buys)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import special, stats

from ballast import sequential as sq
from ballast.judge import MetricPolicy, ObservationBatch, SequentialConfig, SequentialJudge


def point_prior(ratio: float) -> sq.RatioPrior:
    """All the mass on one alternative: the mixture is then Wald's likelihood ratio."""
    return sq.RatioPrior(np.array([ratio]), np.array([0.0]))


# ---------------------------------------------------------------- helpers against scipy


def test_logsumexp_matches_scipy_including_infinities() -> None:
    a = np.array([[1.0, 2.0, -np.inf], [1000.0, 1001.0, 3.0]])
    assert np.allclose(sq.logsumexp(a, axis=1), special.logsumexp(a, axis=1))
    assert float(sq.logsumexp(a)) == pytest.approx(float(special.logsumexp(a)))
    assert float(sq.logsumexp([-np.inf, -np.inf])) == -np.inf


def test_priors_are_normalised_and_sit_on_their_side_of_the_null() -> None:
    harm = sq.harm_prior(effect=4.0, spread=0.5)
    assert float(special.logsumexp(harm.log_weights)) == pytest.approx(0.0, abs=1e-12)
    assert harm.ratios.min() > 1.0
    assert harm.ratios[int(np.argmax(harm.log_weights))] == pytest.approx(4.0, rel=0.1)
    # The grid prior follows scipy's normal density on log(ratio).
    expected = stats.norm.logpdf(np.log(harm.ratios), loc=math.log(4.0), scale=0.5)
    expected -= special.logsumexp(expected)
    assert np.allclose(harm.log_weights, expected)

    good = sq.promote_prior(margin=2.0, spread=0.5)
    assert good.ratios.max() < 2.0
    assert good.ratios[int(np.argmax(good.log_weights))] == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: sq.harm_prior(effect=1.0), "above 1"),
        (lambda: sq.promote_prior(margin=0.9), "above 1"),
        (lambda: sq.harm_prior(effect=3.0, spread=0.0), "spread"),
        (lambda: sq.RatioPrior(np.array([2.0]), np.array([-1.0])), "sum to 1"),
        (lambda: sq.bernoulli_log_e(3, 2, 0.1, point_prior(2.0)), "k <= n"),
        (lambda: sq.bernoulli_log_e(0, 2, 1.0, point_prior(2.0)), r"\(0, 1\)"),
        (lambda: sq.ArmLikelihood(np.array([2.0]), 1.0).add(0.5, -1, 0), ">= 0"),
    ],
    ids=["harm-effect", "margin", "spread", "weights", "k>n", "p0", "negative-count"],
)
def test_nonsense_is_refused(factory: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


# ---------------------------------------------------------------- known cases


def test_one_sample_mixture_with_a_point_prior_is_walds_likelihood_ratio() -> None:
    # 1 % vs 5 % failures: the odds ratio that maps 0.01 to 0.05.
    odds = (0.05 / 0.95) / (0.01 / 0.99)
    got = sq.bernoulli_log_e(3, 100, 0.01, point_prior(odds))
    wald = 3 * math.log(0.05 / 0.01) + 97 * math.log(0.95 / 0.99)
    assert got == pytest.approx(wald, rel=1e-12)
    assert got == pytest.approx(0.82775, abs=1e-5)


def test_arm_test_with_a_point_prior_is_the_binomial_likelihood_ratio() -> None:
    # Weight 0.5 and a rate ratio of 3: a bad event is the canary's with probability 3/4.
    cells = [sq.CellCounts(0.5, canary=6, champion=2)]
    got = sq.conditional_log_e(cells, 1.0, point_prior(3.0))
    assert got == pytest.approx(6 * math.log(0.75 / 0.5) + 2 * math.log(0.25 / 0.5), rel=1e-12)
    assert float(sq.arm_share(0.05, 5.0)) == pytest.approx(0.25 / 1.2)


def test_events_at_weight_zero_or_one_carry_no_evidence() -> None:
    prior = sq.harm_prior(4.0)
    assert sq.conditional_log_e([sq.CellCounts(1.0, 50, 0)], 1.0, prior) == 0.0
    assert sq.conditional_log_e([], 1.0, prior) == 0.0
    assert sq.bernoulli_log_e(0, 0, 0.1, prior) == 0.0


def test_incremental_likelihood_equals_the_pure_function_in_any_order() -> None:
    prior = sq.harm_prior(3.0)
    cells = [
        sq.CellCounts(0.05, 3, 20),
        sq.CellCounts(0.25, 9, 11),
        sq.CellCounts(0.05, 1, 7),
        sq.CellCounts(0.5, 4, 2, tier=2.0),
    ]
    lik = sq.ArmLikelihood(prior.ratios, 1.0)
    for c in reversed(cells):
        lik.add(c.weight, c.canary, c.champion, c.tier)
    assert lik.log_e(prior) == pytest.approx(sq.conditional_log_e(cells, 1.0, prior), rel=1e-12)
    with pytest.raises(ValueError, match="grid"):
        lik.log_e(point_prior(2.0))


def test_a_tier_two_event_tests_the_squared_ratio() -> None:
    prior = sq.harm_prior(2.0)
    tiered = sq.conditional_log_e([sq.CellCounts(0.2, 4, 3, tier=2.0)], 1.0, prior)
    squared = sq.RatioPrior(prior.ratios**2, prior.log_weights)
    assert tiered == pytest.approx(
        sq.conditional_log_e([sq.CellCounts(0.2, 4, 3)], 1.0, squared), rel=1e-12
    )


def test_ratio_mle_recovers_the_closed_form_for_one_weight() -> None:
    # pi = 1/2 at w = 0.2 means rho = pi (1 - w) / (w (1 - pi)) = 4.
    assert sq.ratio_mle([sq.CellCounts(0.2, 10, 10)]) == pytest.approx(4.0, rel=0.02)
    assert sq.ratio_mle([sq.CellCounts(0.5, 5, 5)]) == pytest.approx(1.0, rel=0.02)
    assert sq.ratio_mle([]) is None


def test_promotion_test_against_a_margin_grows_with_equal_rates_only() -> None:
    prior = sq.promote_prior(2.0)
    equal = sq.conditional_log_e([sq.CellCounts(0.5, 100, 100)], 2.0, prior)
    worse = sq.conditional_log_e([sq.CellCounts(0.5, 200, 100)], 2.0, prior)
    assert equal > math.log(20), f"equal rates must show ratio < 2 (log e = {equal:.2f})"
    assert worse < 0, f"a ratio of 2 must not look good enough (log e = {worse:.2f})"


def test_psi_is_zero_for_equal_shares_and_grows_with_a_shift() -> None:
    assert sq.psi(np.array([30, 70]), np.array([300, 700])) == pytest.approx(0.0, abs=1e-12)
    shifted = sq.psi(np.array([50, 50]), np.array([300, 700]))
    assert shifted is not None and shifted == pytest.approx(
        0.2 * math.log(0.5 / 0.3) - 0.2 * math.log(0.5 / 0.7)
    )
    assert sq.psi(np.array([0, 0]), np.array([1, 1])) is None


def test_wald_bounds_are_the_textbook_ones() -> None:
    lo, hi = sq.wald_sprt_bounds(0.01, 0.01)
    assert (lo, hi) == (pytest.approx(math.log(0.01 / 0.99)), pytest.approx(math.log(99)))


def test_log_histogram_quantile_brackets_numpy() -> None:
    rng = np.random.default_rng(3)
    values = np.exp(rng.normal(math.log(0.02), 0.5, size=20_000))
    h = sq.LogHistogram()
    h.add(values[:7000])
    h.add(values[7000:])
    for q in (0.5, 0.95, 0.99):
        edge = h.quantile(q)
        exact = float(np.quantile(values, q))
        assert edge is not None and exact <= edge <= exact * 1.03, (q, edge, exact)
    assert sq.LogHistogram().quantile(0.5) is None


@pytest.mark.parametrize("kind", ["continuous", "constant", "coarse clock"])
def test_exceeds_counts_one_minus_q_of_values_like_the_reference_whatever_the_ties(
    kind: str,
) -> None:
    rng = np.random.default_rng(4)

    def draw(n: int) -> np.ndarray:
        values = np.exp(rng.normal(math.log(0.02), 0.5, size=n))
        if kind == "constant":
            return np.full(n, 0.005)
        if kind == "coarse clock":
            return np.ceil(values * 100) / 100  # 10 ms ticks: a few values, many ties
        return values

    h = sq.LogHistogram()
    h.add(draw(20_000))
    fresh = draw(200_000)
    for q in (0.95, 0.99):
        rate = float(h.exceeds(fresh, q, rng.random(fresh.size)).mean())
        assert rate == pytest.approx(1 - q, abs=0.004), (kind, q, rate)
    # A value above every tie always counts; one below never does.
    top = float(fresh.max()) * 2
    assert h.exceeds(np.array([top]), 0.95, np.array([0.999])).all()
    assert not h.exceeds(np.array([1e-4]), 0.95, np.array([0.0])).any()
    assert not sq.LogHistogram().exceeds(np.array([1.0]), 0.95, np.array([0.0])).any()


# ---------------------------------------------------------------- Monte-Carlo: validity, power


def _crossing_table(n_max: int, w: float, prior: sq.RatioPrior) -> np.ndarray:
    """log e-value of the arm test for k canary events out of n at one weight, derived here from
    first principles (pi = w rho / (w rho + 1 - w)) rather than through the module."""
    n = np.arange(n_max + 1)[:, None, None]
    k = np.arange(n_max + 1)[None, :, None]
    pi = w * prior.ratios / (w * prior.ratios + 1 - w)
    ll = k * np.log(pi / w) + (n - k) * np.log((1 - pi) / (1 - w))
    table = special.logsumexp(ll + prior.log_weights, axis=2)
    # Spot-check the derivation against the module.
    for kk, nn in ((0, 10), (7, 40), (30, 300)):
        got = sq.conditional_log_e([sq.CellCounts(w, kk, nn - kk)], 1.0, prior)
        assert table[nn, kk] == pytest.approx(got, rel=1e-9, abs=1e-9)
    return np.asarray(table)


def test_false_rollback_rate_stays_below_alpha_however_often_one_looks() -> None:
    # 4000 A/A canaries, each looked at after every one of 400 bad events (at 5 % weight,
    # champion 1 %: about 200 s of the traffic). Ville: P(ever cross) <= alpha.
    alpha, w, runs, n_max = 0.05, 0.05, 4000, 400
    table = _crossing_table(n_max, w, sq.harm_prior(4.0, 0.5))
    rng = np.random.default_rng(20261127)
    arms = rng.random((runs, n_max)) < w  # under H0 a bad event is the canary's w.p. w
    k = np.cumsum(arms, axis=1)
    paths = table[np.arange(1, n_max + 1)[None, :], k]
    crossed = (paths >= math.log(1 / alpha)).any(axis=1).mean()
    se = math.sqrt(alpha * (1 - alpha) / runs)
    assert crossed <= alpha + 2 * se, f"crossing rate {crossed:.4f} above alpha {alpha}"

    # The same peeking with a fixed-horizon one-sided z-test crosses far more often: the
    # Monte-Carlo can tell a valid procedure from an invalid one.
    t = np.arange(1, n_max + 1)[None, :]
    z = (k - t * w) / np.sqrt(t * w * (1 - w))
    naive = (z[:, 9:] >= stats.norm.ppf(1 - alpha)).any(axis=1).mean()
    assert naive > 2 * alpha, f"peeking z-test crossed only {naive:.3f}"

    # Power: canary events five times as frequent are caught in nearly every run.
    bad = rng.random((500, n_max)) < float(sq.arm_share(w, 5.0))
    kb = np.cumsum(bad, axis=1)
    caught = (table[np.arange(1, n_max + 1)[None, :], kb] >= math.log(1 / alpha)).any(axis=1)
    assert caught.mean() >= 0.99, f"only {caught.mean():.3f} of 5x canaries were caught"


def test_judge_latency_test_keeps_its_bound_with_a_running_reference() -> None:
    # The latency events use the champion's running p95/p99 from *earlier* batches. Under A/A
    # the arm of a slow answer must still be a fair coin of weight w. A generous alpha (10 %) on
    # latency alone makes 300 runs meaningful.
    cfg = SequentialConfig(
        latency=MetricPolicy(alpha=0.10, effect=2.0, margin=1.5), min_reference=100
    )
    rng = np.random.default_rng(7)
    runs, batches, size, weight = 300, 30, 100, 25
    crossed = 0
    for _ in range(runs):
        judge = SequentialJudge(cfg)
        judge.start("1", "2")
        best = 0.0
        for _ in range(batches):
            canary = rng.random(size) * 100 < weight
            latency = np.exp(rng.normal(math.log(0.02), 0.47, size))
            judge.observe_batch(
                ObservationBatch(
                    canary,
                    np.ones(size, dtype=bool),
                    latency,
                    np.full(size, -1, dtype=np.int8),
                    np.full(size, -1, dtype=np.int64),
                ),
                weight,
            )
            best = max(best, judge.log_e_values()["latency"])  # a look after every batch
        crossed += best >= math.log(1 / 0.10)
    rate = crossed / runs
    assert rate <= 0.10 + 2 * math.sqrt(0.1 * 0.9 / runs), f"latency crossed in {rate:.3f}"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.001], ids=["nan", "inf", "neg"])
def test_a_batch_with_an_impossible_latency_is_refused_not_counted_as_fast(bad: float) -> None:
    # NaN compared below every latency reference, so a NaN answer counted as a fast one.
    latency = np.full(4, 0.01)
    latency[2] = bad
    with pytest.raises(ValueError, match="latency"):
        ObservationBatch(
            np.array([True, False, True, False]),
            np.ones(4, dtype=bool),
            latency,
            np.full(4, -1, dtype=np.int8),
            np.full(4, -1, dtype=np.int64),
        )


# ---------------------------------------------------------------- sticky keys


def _keyed(
    arms: sq.KeyedArms,
    weight: float,
    rows: list[tuple[str, bool, bool]],
    tiers: list[float] | None = None,
    *,
    first_bad: bool = False,
) -> list[tuple[float, float, int, int]]:
    """``rows`` of (key, on the canary, bad): the cells, as plain tuples. ``first_bad``: only
    bad answers are trials (the rollback test's use)."""
    keys = np.array([ord(k) - ord("a") if k else -1 for k, _, _ in rows])
    canary = np.array([c for _, c, _ in rows], dtype=bool)
    bad = np.array([b for _, _, b in rows], dtype=bool)
    tier = None if tiers is None else np.array(tiers)
    trials = bad if first_bad else np.ones(len(rows), dtype=bool)
    cells = arms.events(weight, canary, keys, trials, bad, tier)
    return sorted((c.weight, c.tier, int(c.canary), int(c.champion)) for c in cells)


def test_a_keys_first_answer_is_the_draw_and_its_later_ones_are_not() -> None:
    arms = sq.KeyedArms()
    rows = [("a", False, False), ("a", False, True), ("b", True, True), ("", True, True)]
    # a: its first answer was good (a draw that found nothing), so its failure after it is no
    # evidence; b failed first time: one canary event; the unkeyed row is the caller's.
    assert _keyed(arms, 0.05, rows) == [(0.05, 1.0, 1, 0)]
    assert _keyed(arms, 0.05, [("a", False, True), ("b", True, True)]) == []
    # Counting first bad answers (the rollback test), a's failure is its draw.
    assert _keyed(sq.KeyedArms(), 0.05, rows, first_bad=True) == [(0.05, 1.0, 1, 1)]


def test_a_weight_rise_draws_again_only_for_keys_that_could_move() -> None:
    arms = sq.KeyedArms()
    _keyed(arms, 0.05, [("c", False, True), ("k", True, True)])
    got = _keyed(arms, 0.25, [("c", True, True), ("k", True, True), ("n", False, True)])
    # c (champion) was known at or above 5 %: at 25 % it is on the canary with probability 20/95.
    assert got == [(pytest.approx(0.20 / 0.95), 1.0, 1, 0), (0.25, 1.0, 0, 1)]
    # Now c is known in [5 %, 25 %): on the canary at any higher weight, so no evidence.
    assert _keyed(arms, 0.5, [("c", True, True), ("k", True, True)]) == []


def test_keyed_events_keep_their_tier() -> None:
    arms = sq.KeyedArms()
    got = _keyed(arms, 0.25, [("a", True, True), ("b", False, True)], tiers=[2.0, 1.0])
    assert got == [(0.25, 1.0, 0, 1), (0.25, 2.0, 1, 0)]


def _sticky_runs(
    ratio: float, first_bad: bool, runs: int = 300, seed: int = 7
) -> list[tuple[float, float, int]]:
    """Per simulated canary of 50 sticky keys whose error rates differ widely, where the canary
    multiplies every key's rate by ``ratio``: the canary excess of the counted events over their
    share under that ratio (``w rho / (w rho + 1 - w)``), its binomial variance, and the
    canary events."""
    rng = np.random.default_rng(seed)
    n_keys, weights = 50, (0.05, 0.25, 0.5)
    out = []
    for _ in range(runs):
        bucket = rng.random(n_keys)
        # A few keys err a lot, most rarely; at most 15 %, so that five times it is a rate.
        rate = np.minimum(rng.gamma(0.3, 1.0, n_keys) / 3, 0.15)
        arms = sq.KeyedArms()
        excess = variance = 0.0
        canary_events = 0
        for w in weights:
            for _ in range(5):  # looks per step
                ids = rng.integers(0, n_keys, 60)
                can = bucket[ids] < w
                bad = rng.random(60) < rate[ids] * np.where(can, ratio, 1.0)
                keys = ids
                trials = bad if first_bad else np.ones(60, dtype=bool)
                for c in arms.events(w, can, keys, trials, bad):
                    n = c.canary + c.champion
                    share = float(sq.arm_share(c.weight, ratio))
                    excess += c.canary - share * n
                    variance += share * (1 - share) * n
                    canary_events += int(c.canary)
        out.append((excess, variance, canary_events))
    return out


def _dispersion(runs: list[tuple[float, float, int]]) -> float:
    return float(np.mean([e * e for e, _, _ in runs]) / np.mean([v for _, v, _ in runs]))


@pytest.mark.parametrize("first_bad", [False, True], ids=["first-answer", "first-bad"])
def test_keyed_cells_are_independent_draws_under_the_null_however_keys_differ(
    first_bad: bool,
) -> None:
    # The claim the rollback bound rests on: whatever the keys' behaviour, with buckets uniform
    # and independent of it, each cell's canary count is a binomial draw at its share, so a
    # canary's excess has mean 0 and the binomial variance.
    runs = _sticky_runs(1.0, first_bad)
    assert sum(v for _, v, _ in runs) > 250, "the check needs events"
    assert 0.6 < _dispersion(runs) < 1.4
    assert abs(sum(e for e, _, _ in runs)) < 4 * math.sqrt(sum(v for _, v, _ in runs))


def test_counting_every_keyed_event_as_a_draw_is_overdispersed() -> None:
    # What the judge did before it knew of keys: unbiased, but one erring key on the canary
    # moves the count by all its events at once.
    rng = np.random.default_rng(7)
    ex2 = var = 0.0
    for _ in range(300):
        bucket, rate = rng.random(50), rng.gamma(0.3, 1.0, 50) / 3
        e = v = 0.0
        for w in (0.05, 0.25, 0.5):
            ids = rng.integers(0, 50, 300)
            bad = rng.random(300) < rate[ids]
            e += np.count_nonzero(bad & (bucket[ids] < w)) - w * np.count_nonzero(bad)
            v += w * (1 - w) * np.count_nonzero(bad)
        ex2, var = ex2 + e * e, var + v
    assert ex2 / var > 3.0


@pytest.mark.parametrize("first_bad", [False, True], ids=["first-answer", "first-bad"])
def test_only_first_answers_keep_the_ratio_under_an_alternative(first_bad: bool) -> None:
    # The good-enough test needs P(canary | counted bad event) = w rho / (w rho + 1 - w) under
    # every ratio rho, not only rho = 1. First answers keep it; first bad answers fall short
    # of it (a key that errs often fails early on either side), which would make a canary
    # failing five times as often look better than it is.
    runs = _sticky_runs(5.0, first_bad, runs=200)
    excess, variance = sum(e for e, _, _ in runs), sum(v for _, v, _ in runs)
    if first_bad:
        assert excess < -8 * math.sqrt(variance), (excess, variance)
    else:
        assert abs(excess) < 4 * math.sqrt(variance), (excess, variance)

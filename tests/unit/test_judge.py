"""The judges and the statistics they read: the threshold judge (table-driven), the sequential
judge (evidence, decisions, misuse), the controller's step rule with a stream judge, and the
Flagger and Kayenta comparison judges."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, replace

import numpy as np
import pytest

from ballast.canary import CanaryResult, run_canary, step_action
from ballast.judge import (
    READY_KEY,
    MetricPolicy,
    Observation,
    ObservationBatch,
    SequentialConfig,
    SequentialJudge,
    StreamJudge,
    ThresholdJudge,
    Verdict,
    VersionStats,
    is_ready,
    stats_by_version,
)
from ballast.peer_judges import FlaggerJudge, KayentaJudge, mann_whitney_shift
from ballast.serving import Deployment, VersionSpec
from ballast.settings import Settings
from tests.unit.test_canary import FakeAdmin


def make_obs(
    version: str,
    n: int,
    *,
    errors: int = 0,
    latency_ms: float = 10.0,
    correct: int | None = None,
) -> list[Observation]:
    """``n`` observations of ``version``: the first ``errors`` fail, all take ``latency_ms``;
    with ``correct`` given, every success is labelled and the first ``correct`` of them are right.
    """
    out = []
    for i in range(n):
        ok = i >= errors
        label = None
        if correct is not None and ok:
            label = (i - errors) < correct
        out.append(Observation(version, ok, latency_ms / 1000.0, label))
    return out


def stats(
    version: str,
    n: int,
    *,
    errors: int = 0,
    latency_ms: float = 10.0,
    correct: int | None = None,
) -> VersionStats:
    obs = make_obs(version, n, errors=errors, latency_ms=latency_ms, correct=correct)
    return VersionStats.from_observations(version, obs)


# ---------------------------------------------------------------- VersionStats


def test_stats_count_only_their_own_version() -> None:
    obs = make_obs("1", 10, errors=2) + make_obs("2", 5, errors=5)
    s1 = VersionStats.from_observations("1", obs)
    s2 = VersionStats.from_observations("2", obs)
    assert (s1.n, s1.errors, s1.n_ok) == (10, 2, 8), s1
    assert s1.error_rate == pytest.approx(0.2)
    assert (s2.n, s2.errors, s2.error_rate) == (5, 5, 1.0), s2
    assert s2.latency_p95_ms is None, "no success means no latency percentile"


def test_latency_percentiles_use_successful_requests_only() -> None:
    fast_failures = [Observation("v", False, 0.0001) for _ in range(50)]
    slow_successes = [Observation("v", True, (i + 1) / 1000.0) for i in range(100)]  # 1..100 ms
    s = VersionStats.from_observations("v", fast_failures + slow_successes)
    assert s.latency_p50_ms == pytest.approx(50.5)
    assert s.latency_p95_ms == pytest.approx(95.05)
    assert s.latency_p99_ms == pytest.approx(99.01)


def test_accuracy_counts_labelled_answers_only() -> None:
    s = stats("v", 50, errors=10, correct=30)  # 40 successes, 30 right
    assert (s.n_labelled, s.n_correct) == (40, 30)
    assert s.accuracy == pytest.approx(0.75)
    unlabelled = stats("v", 50)
    assert unlabelled.accuracy is None
    assert unlabelled.n_labelled == 0


def test_empty_stats_are_zero_not_nan() -> None:
    s = VersionStats.from_observations("v", [])
    assert (s.n, s.errors, s.error_rate) == (0, 0, 0.0)
    assert s.accuracy is None
    assert s.latency_p50_ms is None


def test_as_evidence_is_flat_numbers_without_undefined_values() -> None:
    ev = stats("v", 3, errors=3).as_evidence("canary")
    assert ev["canary_n"] == 3.0
    assert ev["canary_error_rate"] == 1.0
    assert "canary_p95_ms" not in ev, "undefined percentiles are left out, not None"
    assert all(isinstance(v, float) and math.isfinite(v) for v in ev.values())


@pytest.mark.parametrize("latency_s", [math.nan, math.inf, -0.001], ids=["nan", "inf", "neg"])
def test_an_observation_with_an_impossible_latency_is_refused(latency_s: float) -> None:
    # NaN made np.percentile's p95 NaN, and `NaN > limit` is False: a canary promoted.
    with pytest.raises(ValueError, match="latency"):
        Observation("2", True, latency_s)


def test_stats_by_version_includes_unknown() -> None:
    obs = [*make_obs("1", 3), Observation("unknown", False, 5.0)]
    by = stats_by_version(obs)
    assert sorted(by) == ["1", "unknown"]
    assert by["unknown"].errors == 1


# ---------------------------------------------------------------- ThresholdJudge

JUDGE = ThresholdJudge(
    max_error_rate=0.02,
    max_latency_ratio=2.0,
    latency_slack_ms=5.0,
    max_accuracy_drop=0.05,
    min_samples=40,
)


@dataclass(frozen=True)
class Case:
    name: str
    baseline: VersionStats | None
    canary: VersionStats
    weight: int
    decision: str
    reason_contains: str


CASES = [
    Case("short samples decide nothing even if all fail",
         stats("1", 400), stats("2", 39, errors=39), 5, "continue", "39 of 40"),
    Case("healthy canary continues below 100%",
         stats("1", 400), stats("2", 40), 25, "continue", "all checks passed"),
    Case("healthy canary promotes at 100%",
         stats("1", 400), stats("2", 40), 100, "promote", "all checks passed"),
    Case("error rate above the absolute limit rolls back",
         stats("1", 400), stats("2", 40, errors=12), 5, "rollback", "error rate 0.300"),
    Case("a single error never decides alone",
         stats("1", 400), stats("2", 40, errors=1), 5, "continue", "all checks passed"),
    Case("errors as frequent as the baseline's are tolerated",
         stats("1", 400, errors=20), stats("2", 40, errors=2), 5, "continue", "all checks"),
    Case("errors above baseline + margin roll back",
         stats("1", 400, errors=20), stats("2", 40, errors=8), 5, "rollback", "limit 0.060"),
    # 4 of 40 reads 0.100 > 0.060, but a canary as good as a 5 % baseline does that about one
    # time in seven: judged on the lower bound of its error rate (0.054), it goes on.
    Case("errors above the limit the sample cannot tell from noise go on",
         stats("1", 400, errors=20), stats("2", 40, errors=4), 5, "continue", "all checks"),
    Case("a low error rate the sample pins above the limit rolls back",
         stats("1", 4000), stats("2", 4000, errors=120), 5, "rollback", "lower 90% bound"),
    Case("p95 above baseline x ratio + slack rolls back",
         stats("1", 400, latency_ms=10), stats("2", 40, latency_ms=26), 5, "rollback",
         "limit 25.0 ms"),
    Case("p95 just under baseline x ratio + slack passes",
         stats("1", 400, latency_ms=10), stats("2", 40, latency_ms=24.9), 5, "continue",
         "all checks"),
    Case("accuracy drop beyond the limit rolls back",
         stats("1", 400, correct=380), stats("2", 40, correct=30), 5, "rollback",
         "accuracy 0.750"),
    Case("an accuracy dip the sample cannot tell from noise passes",
         stats("1", 400, correct=380), stats("2", 40, correct=34), 5, "continue", "all checks"),
    Case("accuracy drop within the limit passes",
         stats("1", 400, correct=380), stats("2", 40, correct=37), 5, "continue", "all checks"),
    Case("accuracy is not judged on too few labels",
         stats("1", 400, correct=380), stats("2", 40, errors=1, correct=0), 5, "continue",
         "all checks"),
    Case("without a baseline only absolute limits apply",
         None, stats("2", 40, latency_ms=500, correct=0), 100, "promote",
         "no baseline: absolute thresholds only"),
    Case("without a baseline errors still roll back",
         None, stats("2", 40, errors=10), 100, "rollback", "error rate"),
    Case("a baseline with too few samples is not compared against",
         stats("1", 10, latency_ms=1), stats("2", 40, latency_ms=100), 50, "continue",
         "baseline 1 has 10 of 40 samples"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_threshold_judge(case: Case) -> None:
    verdict = JUDGE.judge(case.baseline, case.canary, case.weight)
    assert verdict.decision == case.decision, verdict
    assert any(case.reason_contains in r for r in verdict.reasons), verdict.reasons


def test_absolute_latency_and_accuracy_limits_apply_on_a_first_release() -> None:
    judge = ThresholdJudge(min_samples=40, max_p95_ms=50.0, min_accuracy=0.9)
    slow = judge.judge(None, stats("1", 40, latency_ms=60), 100)
    assert slow.decision == "rollback"
    assert slow.evidence["limit_p95_ms"] == 50.0
    wrong = judge.judge(None, stats("1", 40, correct=28), 100)
    assert wrong.decision == "rollback"
    assert wrong.evidence["limit_accuracy"] == 0.9
    fine = judge.judge(None, stats("1", 40, latency_ms=20, correct=40), 100)
    assert fine.decision == "promote", fine.reasons


@pytest.mark.parametrize("side", ["canary", "baseline"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_threshold_judge_fails_closed_on_a_p95_that_is_not_a_number(side: str, bad: float) -> None:
    # Given statistics built directly (not from observations) with a p95 that is not finite,
    baseline, canary = stats("1", 400), stats("2", 40)
    if side == "canary":
        canary = replace(canary, latency_p95_ms=bad)
    else:
        baseline = replace(baseline, latency_p95_ms=bad)
    # when judged at 100 %, then it is rolled back, not promoted on a comparison that said nothing.
    verdict = ThresholdJudge(min_samples=40).judge(baseline, canary, 100)
    assert verdict.decision == "rollback", verdict
    assert any("not a finite number" in r for r in verdict.reasons), verdict.reasons


def test_several_failures_are_all_reported() -> None:
    verdict = JUDGE.judge(
        stats("1", 400, correct=400),
        stats("2", 100, errors=20, latency_ms=100, correct=40),
        5,
    )
    assert verdict.decision == "rollback"
    assert len(verdict.reasons) == 3, verdict.reasons


def test_evidence_holds_both_sides_and_every_threshold() -> None:
    verdict: Verdict = JUDGE.judge(
        stats("1", 400, latency_ms=10, correct=400), stats("2", 60, errors=12, correct=48), 5
    )
    ev = verdict.evidence
    for key in (
        "step_weight",
        "min_samples",
        "max_error_rate",
        "error_margin",
        "max_latency_ratio",
        "latency_slack_ms",
        "max_accuracy_drop",
        "limit_error_rate",
        "limit_p95_ms",
        "limit_accuracy",
        "canary_n",
        "canary_error_rate",
        "canary_p95_ms",
        "baseline_n",
        "baseline_error_rate",
        "baseline_p95_ms",
        "baseline_accuracy",
    ):
        assert key in ev, f"evidence lacks {key}: {sorted(ev)}"
    assert ev["canary_error_rate"] == pytest.approx(0.2)
    assert ev["limit_accuracy"] == pytest.approx(0.95)
    assert ev["limit_error_rate"] == pytest.approx(0.02)
    assert ev["limit_p95_ms"] == pytest.approx(25.0)
    assert ev["compared_to_baseline"] == 1.0
    assert all(isinstance(v, float) for v in ev.values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_samples": 0},
        {"min_errors": 0},
        {"max_error_rate": 1.5},
        {"max_accuracy_drop": -0.1},
        {"max_latency_ratio": 0.0},
        {"latency_slack_ms": -1.0},
    ],
)
def test_nonsense_thresholds_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        ThresholdJudge(**kwargs)  # type: ignore[arg-type]  # deliberately loose test input


def test_from_settings_reads_the_judge_settings() -> None:
    s = Settings(
        judge_max_error_rate=0.1,
        judge_max_latency_ratio=3.0,
        judge_latency_slack_ms=7.0,
        judge_max_accuracy_drop=0.2,
        canary_min_samples=11,
        judge_error_confidence=0.99,
    )
    judge = ThresholdJudge.from_settings(s)
    assert judge.error_confidence == 0.99
    assert (judge.max_error_rate, judge.max_latency_ratio, judge.latency_slack_ms) == (
        0.1,
        3.0,
        7.0,
    )
    assert (judge.max_accuracy_drop, judge.min_samples) == (0.2, 11)


# ---------------------------------------------------------------- SequentialJudge


def traffic(
    rng: np.random.Generator,
    n: int,
    weight: int,
    *,
    canary_error: float = 0.01,
    champion_error: float = 0.01,
    canary_latency_ms: float = 20.0,
    canary_wrong: float = 0.02,
    champion_wrong: float = 0.02,
) -> ObservationBatch:
    """``n`` requests routed at ``weight`` %: failures, log-normal latency, labelled answers."""
    can = rng.random(n) * 100 < weight
    ok = rng.random(n) >= np.where(can, canary_error, champion_error)
    median = np.where(can, canary_latency_ms, 20.0) / 1000.0
    latency = median * np.exp(rng.normal(0.0, 0.47, n))
    wrong = rng.random(n) < np.where(can, canary_wrong, champion_wrong)
    correct = np.where(ok, (~wrong).astype(np.int8), np.int8(-1)).astype(np.int8)
    prediction = np.where(ok, rng.integers(0, 2, n), -1).astype(np.int64)
    return ObservationBatch(can, ok, latency, correct, prediction)


def feed(judge: SequentialJudge, batches: int, weight: int, seed: int = 0, **kw: float) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        judge.observe_batch(traffic(rng, 200, weight, **kw), weight)


def started(config: SequentialConfig | None = None) -> SequentialJudge:
    judge = SequentialJudge(config)
    judge.start("1", "2")
    return judge


def test_sequential_judge_is_a_stream_judge_and_threshold_judge_is_not() -> None:
    assert isinstance(SequentialJudge(), StreamJudge)
    assert isinstance(FlaggerJudge(), StreamJudge) and isinstance(KayentaJudge(), StreamJudge)
    assert not isinstance(JUDGE, StreamJudge)


def test_erroring_canary_is_rolled_back_on_errors_with_its_evidence() -> None:
    judge = started()
    feed(judge, 30, 5, canary_error=0.08)
    verdict = judge.judge(stats("1", 5700), stats("2", 300), 5)

    assert verdict.decision == "rollback", verdict.reasons
    assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith("errors:"), verdict.reasons
    ev = verdict.evidence
    assert ev["errors_failed"] == 1.0 and ev["latency_failed"] == 0.0
    assert ev["errors_log_threshold"] == pytest.approx(math.log(1 / 0.006))
    assert ev["errors_max_log_e"] >= ev["errors_log_threshold"]
    assert ev["errors_p_value"] <= 0.006
    assert ev["errors_ratio_mle"] > 3.0, "8 % against 1 % is a ratio near 8"
    assert ev["errors_canary_events"] > ev["errors_champion_events"] * 0.05
    assert ev["alpha_rollback"] == pytest.approx(0.01)
    assert ev[READY_KEY] == 0.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in ev.values()), ev


def test_slow_canary_is_rolled_back_on_latency_only() -> None:
    judge = started()
    feed(judge, 30, 25, canary_latency_ms=40.0)
    verdict = judge.judge(stats("1", 4500), stats("2", 1500), 25)
    assert verdict.decision == "rollback", verdict.reasons
    assert [r.split(":")[0] for r in verdict.reasons] == ["latency"]
    ev = verdict.evidence
    assert ev["latency_reference_near_ms"] < ev["latency_reference_far_ms"]
    assert ev["latency_canary_trials"] > 0 and ev["latency_ratio_mle"] > 1.5


def test_less_accurate_canary_is_rolled_back_on_accuracy() -> None:
    judge = started()
    feed(judge, 30, 25, canary_wrong=0.10)
    verdict = judge.judge(stats("1", 4500), stats("2", 1500), 25)
    assert verdict.decision == "rollback", verdict.reasons
    assert verdict.reasons[0].startswith("accuracy:")


def test_healthy_canary_becomes_ready_and_promotes_only_at_100() -> None:
    judge = started()
    feed(judge, 60, 50)
    below = judge.judge(stats("1", 6000), stats("2", 6000), 50)
    assert below.decision == "continue", below.reasons
    assert is_ready(below), below.reasons
    assert any("ready for 100" in r for r in below.reasons)
    at_full = judge.judge(stats("1", 6000), stats("2", 6000), 100)
    assert at_full.decision == "promote", at_full.reasons
    for metric in ("errors", "latency", "accuracy"):
        assert at_full.evidence[f"{metric}_ready"] == 1.0, metric


def test_a_canary_as_fast_as_a_constant_latency_champion_becomes_ready() -> None:
    # Every answer on both sides takes exactly 5 ms (a coarse clock does much the same).
    # Before: nothing was ever slower than the champion's p95, the latency test never
    # settled, and such a canary ended inconclusive.
    rng = np.random.default_rng(0)
    judge = started()
    for _ in range(60):
        batch = traffic(rng, 200, 50)
        batch = dataclasses.replace(batch, latency_s=np.full(len(batch), 0.005))
        judge.observe_batch(batch, 50)
    verdict = judge.judge(stats("1", 6000), stats("2", 6000), 100)
    assert verdict.evidence["latency_ready"] == 1.0, verdict.reasons
    # And a canary slower than that constant is still caught.
    slow = started()
    for _ in range(60):
        batch = traffic(rng, 200, 50)
        lat = np.where(batch.canary, 0.006, 0.005)
        slow.observe_batch(dataclasses.replace(batch, latency_s=lat), 50)
    assert slow.judge(stats("1", 6000), stats("2", 6000), 50).decision == "rollback"


def test_early_promote_promotes_below_100_when_configured() -> None:
    judge = started(SequentialConfig(early_promote=True))
    feed(judge, 60, 50)
    assert judge.judge(stats("1", 6000), stats("2", 6000), 50).decision == "promote"


def test_young_canary_is_neither_rolled_back_nor_ready() -> None:
    judge = started()
    feed(judge, 2, 5)
    verdict = judge.judge(stats("1", 380), stats("2", 20), 5)
    assert verdict.decision == "continue"
    assert not is_ready(verdict)
    assert any(r.startswith("not yet clearly good enough: errors") for r in verdict.reasons)


def test_a_non_critical_metric_holds_promotion_instead_of_rolling_back() -> None:
    config = SequentialConfig(latency=MetricPolicy(0.002, 2.0, 1.5, critical=False))
    judge = started(config)
    feed(judge, 40, 50, canary_latency_ms=40.0)
    verdict = judge.judge(stats("1", 4000), stats("2", 4000), 100)
    assert verdict.decision == "continue", verdict.reasons
    assert verdict.evidence["latency_failed"] == 1.0
    assert not is_ready(verdict)
    assert any(r.startswith("held by a non-critical metric: latency") for r in verdict.reasons)
    assert config.alpha_rollback == pytest.approx(0.008), "non-critical alphas are not spent"


def test_a_failed_canary_stays_failed_on_later_looks() -> None:
    judge = started()
    feed(judge, 30, 5, canary_error=0.08)
    assert judge.judge(stats("1", 1), stats("2", 1), 5).decision == "rollback"
    feed(judge, 200, 50, seed=1)  # plenty of healthy traffic afterwards
    assert judge.judge(stats("1", 2), stats("2", 2), 50).decision == "rollback"


def test_first_release_is_judged_against_the_absolute_error_limit() -> None:
    judge = SequentialJudge()
    judge.start(None, "1")
    rng = np.random.default_rng(0)
    for _ in range(10):
        judge.observe_batch(traffic(rng, 200, 100, canary_error=0.0), 100)
    good = judge.judge(None, stats("1", 2000), 100)
    assert good.decision == "promote", good.reasons
    assert "no baseline" in good.reasons[-1]

    bad = SequentialJudge()
    bad.start(None, "1")
    for _ in range(10):
        bad.observe_batch(traffic(rng, 200, 100, canary_error=0.10), 100)
    verdict = bad.judge(None, stats("1", 2000, errors=200), 100)
    assert verdict.decision == "rollback", verdict.reasons
    assert verdict.evidence["errors_limit"] == 0.02


def test_a_first_release_on_a_few_sticky_clients_is_not_vouched_for_by_their_volume() -> None:
    """Three clients, 3,000 answers, 15 errors all from the smallest client (3 % of its
    requests): 0.5 % overall, but three clients say little about the next ones. Counted as
    3,000 independent answers this was promoted; at the clients' effective size it is not yet.
    The same answers without keys, or spread over many clients, still promote."""

    def clients(sizes_errors: list[tuple[str | None, int, int]]) -> list[Observation]:
        out = []
        for key, size, errors in sizes_errors:
            out += [Observation("1", i >= errors, 0.01, key=key) for i in range(size)]
        return out

    def first_release(observations: list[Observation]) -> Verdict:
        judge = SequentialJudge()
        judge.start(None, "1")
        for start in range(0, len(observations), 500):  # as the controller feeds load batches
            judge.observe(observations[start : start + 500], 100)
        errors = sum(not o.ok for o in observations)
        return judge.judge(None, stats("1", len(observations), errors=errors), 100)

    few = first_release(clients([("a", 1500, 0), ("b", 1000, 0), ("c", 500, 15)]))
    assert few.decision == "continue" and not is_ready(few), few.reasons
    assert few.evidence["errors_canary_n_effective"] < 200, few.evidence
    assert any("worth 88 independent answers" in r for r in few.reasons), few.reasons

    unkeyed = first_release(clients([(None, 1500, 0), (None, 1000, 0), (None, 500, 15)]))
    assert unkeyed.decision == "promote", unkeyed.reasons
    assert unkeyed.evidence["errors_canary_n_effective"] == 3000

    # 1,000 clients of 3 answers, 15 of them failing once: as good as independent answers.
    many = first_release(clients([(f"k{i}", 3, int(i < 15)) for i in range(1000)]))
    assert many.decision == "promote", many.reasons
    assert many.evidence["errors_canary_n_effective"] > 2000


def test_plain_judge_use_reads_error_increments_from_cumulative_stats() -> None:
    judge = SequentialJudge()  # no start(), no observe(): the Judge protocol alone
    first = judge.judge(stats("1", 1900, errors=19), stats("2", 100, errors=1), 5)
    assert first.decision == "continue"
    worse = judge.judge(stats("1", 3800, errors=38), stats("2", 200, errors=21), 5)
    assert worse.decision == "rollback", worse.reasons
    assert worse.evidence["errors_canary_events"] == 21.0
    with pytest.raises(ValueError, match="cumulative"):
        judge.judge(stats("1", 100), stats("2", 10), 5)


def test_stream_judge_misuse_is_refused() -> None:
    judge = SequentialJudge()
    with pytest.raises(RuntimeError, match="start"):
        judge.observe([Observation("2", True, 0.01)], 5)
    with pytest.raises(ValueError, match="other than the champion"):
        judge.start("1", "1")
    judge.judge(stats("1", 100), stats("2", 10), 5)  # summary mode from here on
    with pytest.raises(RuntimeError, match="summaries"):
        judge.observe_batch(traffic(np.random.default_rng(0), 10, 5), 5)
    with pytest.raises(ValueError, match=r"1\.\.100"):
        started().judge(None, stats("2", 1), 0)
    with pytest.raises(ValueError, match="same length"):
        ObservationBatch(
            np.zeros(2, bool), np.zeros(1, bool), np.zeros(2), np.zeros(2), np.zeros(2)
        )


def test_observe_maps_versions_to_arms_and_drops_unknown() -> None:
    judge = started()
    obs = [
        Observation("2", False, 0.01),
        Observation("1", True, 0.01, correct=True, prediction=1),
        Observation("unknown", False, 5.0),
    ]
    batch = ObservationBatch.from_observations(obs, canary_version="2", champion_version="1")
    assert batch.canary.tolist() == [True, False]
    assert batch.correct.tolist() == [-1, 1] and batch.prediction.tolist() == [-1, 1]
    judge.observe(obs, 5)
    ev = judge.judge(stats("1", 1), stats("2", 1), 5).evidence
    assert ev["errors_canary_events"] == 1.0 and ev["errors_champion_trials"] == 1.0


def test_start_forgets_the_previous_canary() -> None:
    judge = started()
    feed(judge, 30, 5, canary_error=0.08)
    assert judge.judge(stats("1", 1), stats("2", 1), 5).decision == "rollback"
    judge.start("1", "3")
    assert judge.judge(stats("1", 1), stats("3", 1), 5).decision == "continue"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha_promote": 0.0},
        {"latency_quantiles": (0.99, 0.95)},
        {"n_classes": 1},
        {"first_release_max_error_rate": 1.0},
    ],
)
def test_nonsense_sequential_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must"):
        SequentialConfig(**kwargs)  # type: ignore[arg-type]  # deliberately loose test input


def test_nonsense_metric_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        MetricPolicy(alpha=0.0, effect=2.0, margin=1.5)
    with pytest.raises(ValueError, match="above 1"):
        MetricPolicy(alpha=0.01, effect=1.0, margin=1.5)


# ---------------------------------------------------------------- the controller's step rule


def verdict_of(decision: str, ready: float | None) -> Verdict:
    ev = {} if ready is None else {READY_KEY: ready}
    return Verdict(decision, ("x",), ev)  # type: ignore[arg-type]  # decision from the table


@pytest.mark.parametrize(
    ("decision", "ready", "next_weight", "done", "action"),
    [
        ("rollback", 0.0, 25, False, "end"),
        ("promote", 1.0, None, True, "end"),
        ("continue", 0.0, None, True, "stay"),
        ("continue", 1.0, 25, False, "stay"),
        ("continue", 0.0, 25, True, "advance"),
        ("continue", 0.0, 100, True, "stay"),
        ("continue", 1.0, 100, True, "advance"),
        ("continue", None, 100, True, "advance"),
    ],
)
def test_step_action(
    decision: str, ready: float | None, next_weight: int | None, done: bool, action: str
) -> None:
    got = step_action(verdict_of(decision, ready), next_weight=next_weight, step_done=done)
    assert got == action


def spec(version: str) -> VersionSpec:
    return VersionSpec(version=version, artifact_path=f"/a/{version}.onnx", sha256="0" * 64)


class SeededLoad:
    """Synthetic traffic as Observations: ``per_call`` requests per call at the given weight."""

    def __init__(
        self,
        *,
        canary_error: float = 0.01,
        per_call: int = 400,
        canary_per_weight: int | None = None,
    ) -> None:
        self.rng = np.random.default_rng(0)
        self.calls: list[int] = []
        self.canary_error = canary_error
        self.per_call = per_call
        # Traffic stops at each weight once the canary has answered this many requests there:
        # the evidence then does not depend on how many calls the machine fits in a step's time.
        self.canary_per_weight = canary_per_weight
        self.canary_seen: dict[int, int] = {}

    def __call__(self, weight: int) -> list[Observation]:
        self.calls.append(weight)
        cap = self.canary_per_weight
        if cap is not None and self.canary_seen.get(weight, 0) >= cap:
            time.sleep(0.01)
            return []
        batch = traffic(self.rng, self.per_call, weight, canary_error=self.canary_error)
        self.canary_seen[weight] = self.canary_seen.get(weight, 0) + int(np.sum(batch.canary))
        return [
            Observation("2" if c else "1", bool(ok), float(lat), None if k < 0 else bool(k), int(p))
            for c, ok, lat, k, p in zip(
                batch.canary,
                batch.ok,
                batch.latency_s,
                batch.correct,
                batch.prediction,
                strict=True,
            )
        ]


def run(
    load: SeededLoad, *, step_max_seconds: float = 5.0, min_samples: int = 20
) -> tuple[CanaryResult, FakeAdmin]:
    admin = FakeAdmin(Deployment(model="m", champion=spec("1")))
    result = run_canary(
        admin,
        model="m",
        champion=spec("1"),
        candidate=spec("2"),
        steps=(5, 25, 50, 100),
        judge=SequentialJudge(),
        load=load,
        min_samples=min_samples,
        step_max_seconds=step_max_seconds,
    )
    return result, admin


def test_controller_rolls_back_an_erroring_canary_inside_the_first_step() -> None:
    load = SeededLoad(canary_error=0.30, per_call=200)
    result, admin = run(load, min_samples=400)
    assert result.decision == "rollback", result.reasons
    assert set(load.calls) == {5}, "decided within the first step"
    assert admin.current == Deployment(model="m", champion=spec("1"))


def test_controller_holds_before_100_until_the_judge_is_sure_then_promotes() -> None:
    load = SeededLoad()
    result, admin = run(load, step_max_seconds=30.0)
    assert result.decision == "promote", result.reasons
    per_weight = {w: load.calls.count(w) for w in (5, 25, 50, 100)}
    assert per_weight[50] > per_weight[25], f"the 50 % step waits for the judge: {per_weight}"
    assert per_weight[100] == 1, "at 100 % the judge is already sure"
    assert admin.current == Deployment(model="m", champion=spec("2"))


def test_controller_gives_up_before_100_when_the_judge_stays_unsure() -> None:
    # About 40 canary answers at each weight, however fast the machine: enough for each step's
    # minimum (20), never enough for the judge to be sure.
    load = SeededLoad(per_call=100, canary_per_weight=40)
    result, admin = run(load, step_max_seconds=1.0)
    assert result.decision == "rollback", result.reasons
    assert result.reasons[0] == "inconclusive at 50%", result.reasons
    assert 100 not in load.calls, "an unproven canary never takes all traffic"
    assert admin.current == Deployment(model="m", champion=spec("1"))


# ---------------------------------------------------------------- peers: Flagger, Kayenta


def test_flagger_rolls_back_after_five_failed_checks_with_its_evidence() -> None:
    judge = FlaggerJudge()
    judge.start("1", "2")
    rng = np.random.default_rng(0)
    decisions = []
    for _ in range(5):
        judge.observe_batch(traffic(rng, 12000, 5, canary_error=0.05), 5)  # one 60 s interval
        decisions.append(judge.judge(stats("1", 1), stats("2", 1), 5))
    assert [v.decision for v in decisions] == ["continue"] * 4 + ["rollback"]
    ev = decisions[-1].evidence
    assert ev["failed_checks"] == 5.0 and ev["threshold"] == 5.0
    assert ev["check_success_rate"] < ev["min_success_rate"]


def test_flagger_is_ready_after_its_iterations_pass_and_then_promotes_at_100() -> None:
    judge = FlaggerJudge(iterations=2)
    judge.start("1", "2")
    rng = np.random.default_rng(0)
    verdicts = []
    for _ in range(2):
        judge.observe_batch(traffic(rng, 2000, 50, canary_error=0.0), 50)
        verdicts.append(judge.judge(stats("1", 1), stats("2", 1), 50))
    assert [v.decision for v in verdicts] == ["continue", "continue"]
    assert [v.evidence[READY_KEY] for v in verdicts] == [0.0, 1.0]
    assert judge.judge(stats("1", 1), stats("2", 1), 100).decision == "promote"


def test_mann_whitney_shift_finds_a_known_shift() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(0.0, 1.0, 60)
    shift = mann_whitney_shift(y + 5.0, y, 0.98)
    assert shift.estimate == pytest.approx(5.0, abs=0.5)
    assert shift.lower < 5.0 < shift.upper
    none = mann_whitney_shift(rng.normal(0, 1, 60), rng.normal(0, 1, 60), 0.98)
    assert none.lower < 0.0 < none.upper


def test_kayenta_fails_a_window_with_high_latency_and_passes_a_clean_one() -> None:
    rng = np.random.default_rng(0)
    slow = KayentaJudge()
    slow.start("1", "2")
    slow.observe_batch(traffic(rng, 4000, 25, canary_latency_ms=60.0), 25)
    verdict = slow.judge(stats("1", 1), stats("2", 1), 25)
    assert verdict.decision == "rollback", verdict.reasons
    assert verdict.evidence["latency_p99_high"] == 1.0 and verdict.evidence["score"] < 75

    clean = KayentaJudge()
    clean.start("1", "2")
    clean.observe_batch(traffic(rng, 4000, 25), 25)
    ok = clean.judge(stats("1", 1), stats("2", 1), 25)
    assert ok.decision == "continue" and ok.evidence[READY_KEY] == 1.0, ok.reasons
    assert clean.judge(stats("1", 1), stats("2", 1), 100).decision == "promote"


def test_wilson_upper_bound_matches_its_definition() -> None:
    from scipy.stats import binom

    from ballast.judge import wilson_upper

    # 27 of 30 right: a 0.97-accurate model does that about 6 % of the time; the bound knows.
    assert 0.95 < wilson_upper(27, 30, 0.95) < 0.97
    assert wilson_upper(0, 0, 0.95) == 1.0 and wilson_upper(40, 40, 0.95) == 1.0
    # Coverage: for a true rate p the bound is >= p in close to 95 % of samples of n (Wilson's
    # coverage oscillates with n; a point estimate would cover about half the time).
    for p, n in ((0.9, 60), (0.97, 30), (0.8, 200)):
        cover = sum(binom.pmf(k, n, p) for k in range(n + 1) if wilson_upper(k, n, 0.95) >= p)
        assert cover > 0.9, (p, n, cover)


def test_wilson_lower_bound_matches_its_definition() -> None:
    from scipy.stats import binom

    from ballast.judge import wilson_lower

    assert wilson_lower(0, 0, 0.9) == 0.0 and wilson_lower(0, 40, 0.9) == 0.0
    assert 0.0 < wilson_lower(4, 40, 0.9) < 0.1
    # Coverage: for a true rate p the bound is <= p in close to 90 % of samples of n.
    for p, n in ((0.01, 400), (0.03, 100), (0.2, 60)):
        cover = sum(binom.pmf(k, n, p) for k in range(n + 1) if wilson_lower(k, n, 0.9) <= p)
        assert cover > 0.85, (p, n, cover)


def test_sticky_clusters_are_worth_fewer_requests_for_the_error_rate() -> None:
    from ballast.judge import clustered_effective_n

    def obs(key: str | None, ok: bool) -> Observation:
        return Observation("2", ok, 0.01, key=key)

    # 400 requests with 8 errors, unkeyed: the binomial sample, no effective size.
    free = [obs(None, i % 50 != 0) for i in range(400)]
    assert VersionStats.from_observations("2", free).n_effective is None
    # Over 40 keys, the 8 errors from 8 keys (one each): little clumping.
    even = [obs(f"k{i % 40}", not (i % 40 == i // 40 and i < 320)) for i in range(400)]
    n_even = VersionStats.from_observations("2", even).n_effective
    assert n_even is not None and n_even > 300
    # All 8 errors from one key of 40: the rate rests on one client.
    clumped = [obs(f"k{i % 40}", not (i % 40 == 0 and i < 320)) for i in range(400)]
    stats_c = VersionStats.from_observations("2", clumped)
    assert stats_c.errors == 8 and stats_c.n_effective is not None and stats_c.n_effective < 60
    # Known cases of the formula (the jackknife, CR3): singletons are worth themselves (the
    # jackknife alone gives 98.01, each residual over (1 - 1/n)^2; 100 clusters of one are
    # 100 effective clusters, the floor), never more than n.
    none = np.zeros(0)
    assert clustered_effective_n(none, none, free_n=100, free_e=10) == 100
    assert clustered_effective_n(none, none, free_n=100, free_e=10, leverage_power=0) == 100
    assert clustered_effective_n(none, none, free_n=100, free_e=0) == 100
    # Two clients of 50, all 5 errors from one: residuals +-2.5 over (1 - 1/2)^2 each, a
    # variance of 50/100^2 against the binomial 0.0475/100.
    halves = clustered_effective_n(np.array([50.0, 50.0]), np.array([5.0, 0.0]))
    assert halves == pytest.approx(9.5)
    # One client: its requests count as independent (nothing says how clients differ).
    assert clustered_effective_n(np.array([400.0]), np.array([8.0])) == 400.0
    assert clustered_effective_n(np.array([0.0, 400.0]), np.array([0.0, 8.0])) == 400.0
    # The threshold judge's interval widens with it: 8/400 clumped is no longer above 1 %.
    judge = ThresholdJudge(min_samples=20, max_error_rate=0.01, error_margin=0.0)
    base = VersionStats.from_observations("1", [Observation("1", True, 0.01)] * 400)
    unclumped = replace(stats_c, n_effective=None)
    assert judge.judge(base, unclumped, 25).decision == "rollback"
    assert judge.judge(base, stats_c, 25).decision != "rollback"


def test_a_dominant_failing_client_is_corrected_for_more_than_the_plain_sandwich_did() -> None:
    from ballast.judge import clustered_effective_n

    # One client with 300 of 400 requests and all 12 errors, 20 clients with 5 each. The plain
    # sandwich (CR1, leverage ignored) measured the spread around a rate that client mostly
    # sets; the jackknife divides its residual by (1 - 300/400)^2.
    key_n = np.array([300.0] + [5.0] * 20)
    key_e = np.array([12.0] + [0.0] * 20)
    cr1 = clustered_effective_n(key_n, key_e, leverage_power=0.0)
    cr3 = clustered_effective_n(key_n, key_e)
    assert cr3 < cr1 / 10, (cr1, cr3)


def test_a_canary_failing_its_heaviest_client_is_rolled_back_whatever_else_it_answers() -> None:
    from ballast.judge import clustered_effective_n

    # Near a 100 % rate the binomial variance vanishes, and the ratio of the two variances
    # read these canaries as worth a thousandth of a request (the rollback never came). The
    # clusters' effective number (n^2 / sum n_c^2) is the floor.
    judge = ThresholdJudge()
    base = VersionStats.from_observations("1", [Observation("1", True, 0.01)] * 1000)

    def canary(failing: int, others: int, per_other: int = 1) -> VersionStats:
        heavy = [Observation("2", i >= failing, 0.01, key="big") for i in range(1000)]
        rest = [
            Observation("2", True, 0.01, key=f"k{c}")
            for c in range(others)
            for _ in range(per_other)
        ]
        return VersionStats.from_observations("2", heavy + rest)

    for failing, others in ((999, 1), (1000, 1), (1000, 5), (800, 3)):
        stats = canary(failing, others)
        assert stats.n_effective is not None and stats.n_effective >= 1.0, stats
        verdict = judge.judge(base, stats, 100)
        assert verdict.decision == "rollback", (failing, others, verdict)
    # Two equal clients, one failing everything: worth at least two draws, and rolled back.
    two = canary(1000, 1, 1000)
    assert two.n_effective == pytest.approx(2.0)
    assert judge.judge(base, two, 100).decision == "rollback"
    # One client alone: its requests count as independent, as before (a deployment's only
    # client failing 5 % is rolled back).
    alone = VersionStats.from_observations(
        "2", [Observation("2", i % 20 != 0, 0.01, key="only") for i in range(1000)]
    )
    assert alone.n_effective == 1000 and judge.judge(base, alone, 100).decision == "rollback"
    assert clustered_effective_n(np.array([1000.0, 1.0]), np.array([999.0, 0.0])) >= 1.0


def test_threshold_judge_false_rollbacks_are_controlled_in_simulation() -> None:
    from ballast.simulate import SimConfig, simulate

    # An identical canary at 20 req/s with a 1 % champion: the point-estimate rule rolled back
    # 11.9 % of 1000 runs; the bound brings it to about 2 %. A canary failing 4 % is still
    # caught in every run.
    aa, _ = simulate(SimConfig(scenario="aa", judge="threshold", runs=300, rate=20))
    bad, _ = simulate(
        SimConfig(scenario="errors", judge="threshold", runs=100, rate=20, effect=0.04)
    )
    assert aa.rollback_rate < 0.06, aa
    assert bad.rollback_rate == 1.0, bad


def test_a_canary_that_answers_nothing_is_never_promoted_even_beside_a_broken_champion() -> None:
    # Before: the champion failing everything too lifted the error limit past 100 % (threshold)
    # or made the errors alike (sequential), latency and accuracy had nothing to measure, and
    # both judges promoted a candidate that never answered.
    threshold = ThresholdJudge(min_samples=20).judge(
        stats("1", 100, errors=100), stats("2", 100, errors=100), 100
    )
    assert threshold.decision == "rollback"
    assert "answered none of 100 requests" in threshold.reasons[-1]

    judge = started()
    feed(judge, 200, 100, canary_error=1.0, champion_error=1.0)
    verdict = judge.judge(stats("1", 6000, errors=6000), stats("2", 6000, errors=6000), 100)
    assert verdict.decision != "promote", verdict.reasons
    assert any("answered none" in r for r in verdict.reasons)


def _latency_at_margin(rng: np.random.Generator, n: int, p_near: float, p_far: float) -> np.ndarray:
    """Latencies in (0, 1): a share ``p_near`` above 0.95 (the champion's p95 when p_near is
    0.05), of which ``p_far`` above 0.99."""
    u = rng.uniform(0, 1, n)
    out = rng.uniform(0, 0.95, n)
    mid = u < p_near - p_far
    far = (u >= p_near - p_far) & (u < p_near)
    out[mid] = rng.uniform(0.95, 0.99, int(mid.sum()))
    out[far] = rng.uniform(0.99, 1.0, int(far.sum()))
    return out


def _first_of_ready_or_rollback(seed: int, near: float, far: float) -> str:
    """Looks after every batch, as the controller does at 50 %: the first of rollback or
    "latency ready" wins."""
    rng = np.random.default_rng(seed)
    judge = SequentialJudge()
    judge.start("A", "B")
    a = VersionStats.from_observations("A", [Observation("A", True, 0.1)])
    b = VersionStats.from_observations("B", [Observation("B", True, 0.1)])
    for _ in range(100):
        canary = rng.uniform(size=200) < 0.5
        lat = np.where(
            canary,
            _latency_at_margin(rng, 200, 0.05 * near, 0.01 * far),
            _latency_at_margin(rng, 200, 0.05, 0.01),
        )
        judge.observe(
            [
                Observation("B" if c else "A", True, float(t))
                for c, t in zip(canary, lat, strict=True)
            ],
            50,
        )
        verdict = judge.judge(a, b, 50)
        if verdict.decision == "rollback":
            return "rollback"
        if verdict.evidence["latency_ready"] >= 1:
            return "ready"
    return "undecided"


def test_latency_good_enough_test_keeps_its_bound_whatever_the_far_tails_shape() -> None:
    # The canary is slower than the champion's p95 1.5 times as often (the margin: its null),
    # with its share above p99 unchanged. Before: tier-2 answers were tested against a null of
    # the margin squared and this canary read as good enough in 36 of 100 runs (5 % bound).
    outcomes = [_first_of_ready_or_rollback(seed, 1.5, 1.0) for seed in range(60)]
    assert outcomes.count("ready") <= 6, outcomes.count("ready")  # 5 % of 60 is 3
    # And the test still finds an identical canary good enough.
    assert [_first_of_ready_or_rollback(seed, 1.0, 1.0) for seed in range(5)] == ["ready"] * 5


def test_a_canary_is_not_ready_for_100_percent_before_its_latency_was_compared() -> None:
    from tests.unit.test_canary import CANDIDATE, CHAMPION, CHAMPION_ONLY, MODEL

    rng = np.random.default_rng(0)

    def load(weight: int) -> list[Observation]:  # one large batch a look; canary 10x slower
        canary = rng.uniform(size=2000) < weight / 100
        return [
            Observation(
                CANDIDATE.version if c else CHAMPION.version,
                True,
                float(rng.uniform(0.01, 0.02)) * (10 if c else 1),
            )
            for c in canary
        ]

    # Before: the error test was ready on the first batch, latency had no reference yet
    # ("no comparable data"), the canary went to 100 % and was promoted, p95 195 ms vs 19.
    result = run_canary(
        FakeAdmin(CHAMPION_ONLY),
        model=MODEL,
        champion=CHAMPION,
        candidate=CANDIDATE,
        steps=(50, 100),
        judge=SequentialJudge(),
        load=load,
        min_samples=1000,
        step_max_seconds=5,
    )
    assert result.decision == "rollback", [(s.weight, s.verdict.reasons) for s in result.steps]
    assert [s.weight for s in result.steps] == [50]
    first = SequentialJudge()
    first.start(CHAMPION.version, CANDIDATE.version)
    first.observe(load(50), 50)
    verdict = first.judge(None, VersionStats.from_observations(CANDIDATE.version, load(50)), 50)
    assert not is_ready(verdict) and any("latency not compared yet" in r for r in verdict.reasons)

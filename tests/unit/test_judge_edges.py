"""Edges of the canary judges that mutation testing found unchecked (2026-11-29): each test here
failed against at least one plausible change of the code (a flipped comparison, a dropped
clause, a swapped operator) that the other tests let through."""

from __future__ import annotations

import numpy as np
import pytest

from ballast.judge import (
    MetricPolicy,
    Observation,
    ObservationBatch,
    SequentialConfig,
    SequentialJudge,
    ThresholdJudge,
    VersionStats,
    clustered_effective_n,
    wilson_upper,
)


def ok(version: str, n: int, latency_s: float = 0.01, **kw: object) -> list[Observation]:
    return [Observation(version, True, latency_s, **kw) for _ in range(n)]  # type: ignore[arg-type]


def stats(version: str, observations: list[Observation]) -> VersionStats:
    return VersionStats.from_observations(version, observations)


# -- statistics helpers ---------------------------------------------------------------------------


def test_effective_n_of_mixed_keyed_and_unkeyed_traffic_has_its_value() -> None:
    # Two keyed clients of 50 answers (5 and 0 failures) and 100 unkeyed answers with 5.
    n = clustered_effective_n(np.array([50.0, 50.0]), np.array([5.0, 0.0]), free_n=100, free_e=5)
    assert n == pytest.approx(70.31807, rel=1e-6)


def test_effective_n_is_the_plain_count_when_clustering_adds_no_variance() -> None:
    assert clustered_effective_n(np.array([50.0, 50.0]), np.array([1.0, 1.0])) == 100.0


def test_wilson_upper_bound_has_its_value() -> None:
    assert wilson_upper(27, 30, 0.95) == pytest.approx(0.959323, abs=1e-6)


# -- input checks ---------------------------------------------------------------------------------


def test_a_zero_latency_is_a_valid_observation() -> None:
    assert Observation("2", True, 0.0).latency_s == 0.0
    batch = ObservationBatch.from_observations(
        [Observation("2", True, 0.0)], canary_version="2", champion_version="1"
    )
    assert batch.latency_s.tolist() == [0.0]


def test_a_batch_with_unkeyed_answers_holds_empty_keys_not_none() -> None:
    batch = ObservationBatch.from_observations(
        [Observation("2", True, 0.01, key="a"), Observation("2", True, 0.01)],
        canary_version="2",
        champion_version="1",
    )
    assert batch.key is not None and batch.key.tolist() == ["a", ""]


def test_a_sequential_judge_needs_a_candidate_version() -> None:
    with pytest.raises(ValueError, match="candidate must be a version"):
        SequentialJudge().start("1", "")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"accuracy_confidence": 1.0},
        {"error_confidence": 1.0},
        {"accuracy_confidence": 0.49},
        {"min_samples": 0},
        {"min_errors": 0},
        {"max_error_rate": 1.01},
        {"max_accuracy_drop": -0.01},
        {"error_margin": -0.01},
        {"latency_slack_ms": -1.0},
        {"max_latency_ratio": 0.0},
    ],
)
def test_threshold_judge_refuses_settings_out_of_range(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must"):
        ThresholdJudge(**kwargs)  # type: ignore[arg-type]


def test_threshold_judge_takes_the_ends_of_its_ranges() -> None:
    ThresholdJudge(accuracy_confidence=0.5, error_confidence=0.5, min_samples=1, min_errors=1)
    ThresholdJudge(max_error_rate=0.0, max_accuracy_drop=0.0, latency_slack_ms=0.0)
    ThresholdJudge(max_error_rate=1.0, max_accuracy_drop=1.0, error_margin=0.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MetricPolicy(alpha=1.0, effect=2.0, margin=1.5),
        lambda: MetricPolicy(alpha=0.01, effect=2.0, margin=1.0),
        lambda: MetricPolicy(alpha=0.01, effect=2.0, margin=1.5, abs_tolerance=0.0),
        lambda: MetricPolicy(alpha=0.01, effect=2.0, margin=1.5, abs_tolerance=1.0),
        lambda: SequentialConfig(prior_spread=0),
        lambda: SequentialConfig(alpha_promote=1.0),
        lambda: SequentialConfig(latency_quantiles=(0.9, 0.9)),
        lambda: SequentialConfig(latency_quantiles=(0.9, 1.0)),
        lambda: SequentialConfig(min_reference=0),
        lambda: SequentialConfig(first_release_max_error_rate=0.0),
    ],
)
def test_sequential_settings_out_of_range_are_refused(make: object) -> None:
    with pytest.raises(ValueError, match="must"):
        make()  # type: ignore[operator]


def test_sequential_settings_take_the_ends_of_their_ranges() -> None:
    assert SequentialConfig(latency_quantiles=(0.5, 0.9), min_reference=1).min_reference == 1


# -- threshold judge decisions --------------------------------------------------------------------


def test_a_baseline_of_exactly_min_samples_is_compared() -> None:
    v = ThresholdJudge(min_samples=40).judge(stats("1", ok("1", 40)), stats("2", ok("2", 40)), 10)
    assert v.evidence["compared_to_baseline"] == 1.0


@pytest.mark.parametrize(("failures", "decision"), [(1, "continue"), (2, "rollback")])
def test_min_errors_is_the_fewest_failures_that_roll_back(failures: int, decision: str) -> None:
    canary = [Observation("2", False, 0.01) for _ in range(failures)] + ok("2", 1)
    v = ThresholdJudge(min_samples=2).judge(None, stats("2", canary), 10)
    assert v.decision == decision, v


def test_a_canary_with_no_success_rolls_back_without_a_latency_to_compare() -> None:
    canary = [Observation("2", False, 0.01) for _ in range(40)]
    assert ThresholdJudge().judge(stats("1", ok("1", 40)), stats("2", canary), 10).decision == (
        "rollback"
    )


def test_a_baseline_with_no_success_sets_no_latency_limit() -> None:
    baseline = [Observation("1", False, 0.01) for _ in range(40)]
    v = ThresholdJudge(max_error_rate=1.0).judge(stats("1", baseline), stats("2", ok("2", 40)), 10)
    assert v.decision == "continue", v


def test_the_lower_of_the_latency_limits_applies() -> None:
    # Relative limit: 10 ms x 2 + 5 ms = 25 ms; absolute 15 ms: a 20 ms canary is over it.
    j = ThresholdJudge(max_p95_ms=15)
    v = j.judge(stats("1", ok("1", 40, 0.010)), stats("2", ok("2", 40, 0.020)), 10)
    assert v.decision == "rollback", v
    at_limit = ThresholdJudge(max_p95_ms=10).judge(None, stats("2", ok("2", 40, 0.010)), 10)
    assert at_limit.decision == "continue", at_limit


def test_accuracy_is_compared_only_with_a_baseline_of_min_samples_labelled_answers() -> None:
    canary = ok("2", 30, correct=True) + ok("2", 10, correct=False)
    thin = ok("1", 35) + ok("1", 5, correct=True)
    v = ThresholdJudge().judge(stats("1", thin), stats("2", canary), 10)
    assert v.decision == "continue", v
    full = ok("1", 40, correct=True)
    assert ThresholdJudge().judge(stats("1", full), stats("2", canary), 10).decision == "rollback"
    # An absolute floor too does not loosen the comparison with the champion.
    j = ThresholdJudge(min_accuracy=0.5)
    assert j.judge(stats("1", full), stats("2", canary), 10).decision == "rollback"


def test_a_perfect_canary_meets_a_min_accuracy_of_one() -> None:
    v = ThresholdJudge(min_accuracy=1.0).judge(None, stats("2", ok("2", 40, correct=True)), 10)
    assert v.decision == "continue", v


# -- sequential judge -----------------------------------------------------------------------------


def test_sticky_keys_count_in_the_rollback_test() -> None:
    # Every request keyed (a key each); the canary fails 30 %, the champion never.
    j = SequentialJudge()
    j.start("1", "2")
    obs = [Observation("1", True, 0.01, key=f"b{i}") for i in range(500)]
    obs += [Observation("2", i % 10 >= 3, 0.01, key=f"c{i}") for i in range(500)]
    j.observe(obs, 50)
    assert j.log_e_values()["errors"] > 50


@pytest.mark.parametrize("canary_class", [0, 1])
def test_a_canary_answering_one_class_only_shifts_the_prediction_mix(canary_class: int) -> None:
    j = SequentialJudge()
    j.start("1", "2")
    obs = [Observation("1", True, 0.01, prediction=i % 2) for i in range(400)]
    obs += [Observation("2", True, 0.01, prediction=canary_class) for _ in range(400)]
    j.observe(obs, 50)
    assert j.log_e_values()["prediction_mix"] > 20


def test_an_identical_unlabelled_error_free_canary_is_promoted_at_full_traffic() -> None:
    # Live traffic carries no labels and a healthy canary may fail nothing: neither may keep
    # it from being promoted once its errors and latency were compared.
    rng = np.random.default_rng(2)
    j = SequentialJudge()
    j.start("1", "2")
    seen: list[Observation] = []
    for _ in range(8):
        lat = rng.uniform(0.01, 0.02, 2000)
        batch = [Observation("1" if i % 2 else "2", True, float(lat[i])) for i in range(2000)]
        j.observe(batch, 50)
        seen += batch
    v = j.judge(stats("1", seen), stats("2", seen), 100)
    assert v.decision == "promote", v


def test_a_reference_of_exactly_min_reference_answers_starts_the_latency_test() -> None:
    j = SequentialJudge()
    j.start("1", "2")
    j.observe([Observation("1", True, 0.01 + i * 1e-5) for i in range(200)], 50)
    obs = ok("1", 100) + ok("2", 100, 0.05)
    j.observe(obs, 50)
    v = j.judge(stats("1", obs), stats("2", obs), 50)
    assert v.evidence["latency_canary_trials"] == 100

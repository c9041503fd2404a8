"""The threshold judge and the statistics it reads: pure functions, table-driven."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from ballast.judge import Observation, ThresholdJudge, Verdict, VersionStats, stats_by_version
from ballast.settings import Settings


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
         stats("1", 400, errors=20), stats("2", 40, errors=4), 5, "rollback", "limit 0.060"),
    Case("p95 above baseline x ratio + slack rolls back",
         stats("1", 400, latency_ms=10), stats("2", 40, latency_ms=26), 5, "rollback",
         "limit 25.0 ms"),
    Case("p95 just under baseline x ratio + slack passes",
         stats("1", 400, latency_ms=10), stats("2", 40, latency_ms=24.9), 5, "continue",
         "all checks"),
    Case("accuracy drop beyond the limit rolls back",
         stats("1", 400, correct=380), stats("2", 40, correct=34), 5, "rollback",
         "accuracy 0.850"),
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
    wrong = judge.judge(None, stats("1", 40, correct=30), 100)
    assert wrong.decision == "rollback"
    assert wrong.evidence["limit_accuracy"] == 0.9
    fine = judge.judge(None, stats("1", 40, latency_ms=20, correct=40), 100)
    assert fine.decision == "promote", fine.reasons


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
    )
    judge = ThresholdJudge.from_settings(s)
    assert (judge.max_error_rate, judge.max_latency_ratio, judge.latency_slack_ms) == (
        0.1,
        3.0,
        7.0,
    )
    assert (judge.max_accuracy_drop, judge.min_samples) == (0.2, 11)

"""Edges of the quality gate's decision: the default policy, a candidate exactly at the floor,
floors at the ends of a metric's range, a metric of the caller's own (a mutation-testing pass's
findings)."""

from __future__ import annotations

import math

import pytest

from ballast.errors import ConfigError
from ballast.quality import ChampionMetric, QualityPolicy, judge_quality


def champ(value: float | None) -> ChampionMetric:
    return ChampionMetric(version="3", value=value, source="run metric")


def test_the_default_policy_allows_one_point_below_the_champion_and_a_floor_of_0_9() -> None:
    policy = QualityPolicy()
    assert (policy.max_drop, policy.floor) == (0.01, 0.9)
    assert judge_quality(0.935, champ(0.945), policy).passed, "a drop of 0.01 is allowed"
    assert not judge_quality(0.93, champ(0.945), policy).passed, "a drop of 0.015 is not"
    assert not judge_quality(0.85, None, policy).passed, "below the default floor"


def test_a_candidate_exactly_at_the_floor_passes() -> None:
    assert judge_quality(0.9, None, QualityPolicy(floor=0.9)).passed
    # 0.1 + 0.2 is 0.30000000000000004: rounding above a loss ceiling of 0.3 still passes.
    loss = QualityPolicy(metric="log_loss", higher_is_better=False, floor=0.3)
    assert judge_quality(0.1 + 0.2, None, loss).passed
    assert not judge_quality(0.3001, None, loss).passed


def test_a_zero_tolerance_allows_only_an_equal_or_better_candidate() -> None:
    policy = QualityPolicy(max_drop=0.0)
    assert judge_quality(0.95, champ(0.95), policy).passed
    assert not judge_quality(0.949, champ(0.95), policy).passed


def test_an_infinite_tolerance_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_drop must be >= 0"):
        QualityPolicy(max_drop=math.inf)


@pytest.mark.parametrize(
    ("metric", "floor"), [("accuracy", 0.0), ("accuracy", 1.0), ("roc_auc", 1.0), ("log_loss", 0.0)]
)
def test_a_floor_at_either_end_of_the_metrics_range_is_allowed(metric: str, floor: float) -> None:
    assert QualityPolicy.for_metric(metric, max_drop=0.01, floor=floor).floor == floor


def test_for_metric_does_not_require_a_recorded_champion_value_unless_asked() -> None:
    policy = QualityPolicy.for_metric("accuracy", max_drop=0.01, floor=0.9)
    assert policy.require_champion_metric is False
    assert judge_quality(0.92, champ(None), policy).passed


def test_a_metric_of_the_callers_own_takes_direction_and_floor_as_given() -> None:
    # Not in METRICS: no direction check, and no range for the floor.
    policy = QualityPolicy(metric="p99_ms", higher_is_better=False, max_drop=5.0, floor=250.0)
    assert judge_quality(240.0, champ(238.0), policy).passed
    assert not judge_quality(260.0, None, policy).passed


def test_the_comparison_reason_says_how_much_worse() -> None:
    d = judge_quality(0.94, champ(0.96), QualityPolicy())
    assert any("worse by 0.0200, allowed 0.0100" in r for r in d.reasons), d.reasons
    # An equal candidate reads "0.0000 better": -0.0 printed as "-0.0000" before.
    same = judge_quality(0.95, champ(0.95), QualityPolicy())
    assert any("not worse (0.0000 better)" in r for r in same.reasons), same.reasons

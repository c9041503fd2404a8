"""The quality gate's pure decision: tolerance against the champion, absolute floor, evidence."""

from __future__ import annotations

import math

import pytest

from ballast.errors import ConfigError, QualityGateFailed
from ballast.quality import ChampionMetric, QualityPolicy, judge_quality

POLICY = QualityPolicy(metric="accuracy", max_drop=0.01, floor=0.9)


def champ(value: float | None, version: str = "3") -> ChampionMetric:
    return ChampionMetric(version=version, value=value, source="run metric accuracy")


def test_first_release_passes_on_the_floor_alone() -> None:
    d = judge_quality(0.95, None, POLICY)
    assert d.passed and d.champion is None and d.champion_version is None and d.drop is None
    assert any("no champion yet" in r for r in d.reasons)


def test_first_release_below_the_floor_fails() -> None:
    d = judge_quality(0.85, None, POLICY)
    assert not d.passed
    assert any("0.8500 fails the floor (at least 0.9000)" in r for r in d.reasons), d.reasons


def test_a_better_candidate_passes_with_the_margin_in_the_evidence() -> None:
    d = judge_quality(0.97, champ(0.95), POLICY)
    assert d.passed and d.drop == pytest.approx(-0.02)
    assert any("not worse (0.0200 better)" in r for r in d.reasons), d.reasons


def test_a_drop_exactly_at_the_tolerance_passes_despite_float_rounding() -> None:
    # 0.95 - 0.94 is 0.010000000000000009 in binary floating point.
    assert judge_quality(0.94, champ(0.95), POLICY).passed


def test_a_drop_beyond_the_tolerance_fails_naming_both_values() -> None:
    d = judge_quality(0.93, champ(0.95), POLICY)
    assert not d.passed and d.drop == pytest.approx(0.02)
    text = " ".join(d.reasons)
    assert "0.9300 vs champion v3 0.9500" in text and "too much worse" in text


def test_floor_and_tolerance_are_both_applied() -> None:
    # Within tolerance of a weak champion, yet below the floor.
    d = judge_quality(0.88, champ(0.885), POLICY)
    assert not d.passed and d.drop == pytest.approx(0.005)


def test_lower_is_better_metrics_invert_both_checks() -> None:
    policy = QualityPolicy(metric="log_loss", higher_is_better=False, max_drop=0.02, floor=0.3)
    assert judge_quality(0.11, champ(0.10), policy).passed
    assert not judge_quality(0.15, champ(0.10), policy).passed, "0.05 worse than the champion"
    assert not judge_quality(0.35, None, policy).passed, "above the ceiling"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_candidate_fails(bad: float) -> None:
    d = judge_quality(bad, champ(0.95), POLICY)
    assert not d.passed and any("not a finite number" in r for r in d.reasons)


@pytest.mark.parametrize("recorded", [None, math.nan])
def test_a_champion_without_a_recorded_value_leaves_only_the_floor(recorded: float | None) -> None:
    d = judge_quality(0.92, champ(recorded), POLICY)
    assert d.passed and d.champion is None and d.champion_version == "3"
    assert any("has no recorded accuracy" in r for r in d.reasons)
    strict = QualityPolicy(require_champion_metric=True)
    assert not judge_quality(0.92, champ(recorded), strict).passed


def test_no_floor_means_only_the_comparison_counts() -> None:
    policy = QualityPolicy(floor=None)
    assert judge_quality(0.5, None, policy).passed
    assert not judge_quality(0.5, champ(0.6), policy).passed


def test_evidence_is_a_plain_dict_of_the_decision() -> None:
    ev = judge_quality(0.93, champ(0.95), POLICY).evidence()
    assert ev["passed"] is False and ev["candidate"] == 0.93 and ev["champion"] == 0.95
    assert isinstance(ev["reasons"], tuple) and len(ev["reasons"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_drop": -0.1}, "max_drop must be >= 0"),
        ({"max_drop": math.nan}, "max_drop must be >= 0"),
        ({"floor": math.inf}, "floor must be a finite number"),
        ({"metric": ""}, "metric must be named"),
    ],
)
def test_a_bad_policy_is_a_config_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QualityPolicy(**kwargs)  # type: ignore[arg-type]  # values are right, mypy sees object


def test_quality_gate_failed_names_the_quality_stage_and_keeps_the_decision() -> None:
    d = judge_quality(0.5, None, POLICY)
    err = QualityGateFailed("candidate rejected", d)
    assert str(err) == "[quality] candidate rejected" and err.stage == "quality"
    assert err.decision is d

"""The quality gate's pure decision: tolerance against the champion, absolute floor, evidence."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from ballast.errors import ConfigError, QualityGateFailed
from ballast.quality import METRICS, ChampionMetric, QualityPolicy, judge_quality
from ballast.settings import Settings

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


# --- the metric's direction, from the table of what the trainer records ----------------------


@pytest.mark.parametrize(
    ("metric", "higher_is_better"),
    [
        ("accuracy", True),
        ("roc_auc", True),
        ("val_accuracy", True),
        ("log_loss", False),
        ("val_loss", False),
        ("train_loss", False),
    ],
)
def test_each_recorded_metric_has_its_direction_from_the_table(
    metric: str, higher_is_better: bool
) -> None:
    policy = QualityPolicy.for_metric(metric, max_drop=0.01, floor=None)
    assert policy.higher_is_better is higher_is_better, f"{metric} judged the wrong way round"


def test_the_table_covers_exactly_the_quality_metrics_the_trainer_records() -> None:
    # ballast.training.train records these (plus best_epoch and epochs_run, which are not quality)
    assert set(METRICS) == {
        "accuracy",
        "roc_auc",
        "val_accuracy",
        "log_loss",
        "val_loss",
        "train_loss",
    }


def test_a_policy_that_reads_a_known_metric_the_wrong_way_round_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="for log_loss lower is better"):
        QualityPolicy(metric="log_loss", floor=None)  # higher_is_better defaults to True
    with pytest.raises(ConfigError, match="unknown metric 'f1'"):
        QualityPolicy.for_metric("f1", max_drop=0.01, floor=None)


@pytest.mark.parametrize(
    ("metric", "floor"), [("accuracy", 1.5), ("roc_auc", -0.1), ("val_loss", -1)]
)
def test_a_floor_the_metric_cannot_reach_is_a_config_error(metric: str, floor: float) -> None:
    with pytest.raises(ConfigError, match="outside the values"):
        QualityPolicy.for_metric(metric, max_drop=0.01, floor=floor)


def _settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name in ("QUALITY_METRIC", "QUALITY_FLOOR", "QUALITY_MAX_DROP"):
        monkeypatch.delenv(f"BALLAST_{name}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(f"BALLAST_{name.upper()}", value)
    return Settings()


def test_a_loss_metric_in_the_settings_fails_a_worse_candidate_and_passes_a_better_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given the gate configured on held-out log loss, and a champion at 0.08
    policy = _settings(monkeypatch, quality_metric="log_loss").quality_policy()
    champion = ChampionMetric("3", 0.08, "run metric log_loss")
    # Then a candidate with a far higher loss fails, and one with a lower loss passes
    worse = judge_quality(2.5, champion, policy)
    assert not worse.passed and worse.drop == pytest.approx(2.42), worse.reasons
    better = judge_quality(0.05, champion, policy)
    assert better.passed and better.drop == pytest.approx(-0.03), better.reasons


def test_an_accuracy_metric_in_the_settings_still_fails_a_lower_candidate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = _settings(monkeypatch, quality_metric="roc_auc").quality_policy()
    assert policy.higher_is_better and policy.floor == 0.9
    assert not judge_quality(0.91, ChampionMetric("3", 0.99, "run metric roc_auc"), policy).passed
    assert judge_quality(0.99, ChampionMetric("3", 0.98, "run metric roc_auc"), policy).passed


def test_the_floor_defaults_to_none_for_a_loss_and_to_0_9_for_a_score(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _settings(monkeypatch, quality_metric="log_loss").quality_floor is None
    assert _settings(monkeypatch, quality_metric="val_accuracy").quality_floor == 0.9
    assert _settings(monkeypatch).quality_floor == 0.9, "the default metric is accuracy"
    loss = _settings(monkeypatch, quality_metric="val_loss", quality_floor="0.3")
    assert loss.quality_floor == 0.3 and not judge_quality(0.35, None, loss.quality_policy()).passed
    assert _settings(monkeypatch, quality_floor="none").quality_floor is None, "floor switched off"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"quality_metric": "f1"}, "quality_metric must be one the trainer records"),
        ({"quality_metric": "best_epoch"}, "quality_metric must be one the trainer records"),
        ({"quality_floor": "1.5"}, "outside the values accuracy can take"),
        ({"quality_metric": "log_loss", "quality_floor": "-0.1"}, "outside the values"),
    ],
)
def test_settings_refuse_a_metric_or_floor_the_gate_cannot_judge(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        _settings(monkeypatch, **env)

"""The cost gate: its pure decision, and the side-by-side measurement it is fed (real ONNX
Runtime sessions of two model sizes)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ballast.bench.onnx_mlp import build_mlp_onnx
from ballast.compile import relative_cost
from ballast.cost import judge_cost
from ballast.errors import CostGateFailed
from ballast.runtime import OnnxRuntimePredictor


def test_within_the_limit_passes_and_says_every_ratio() -> None:
    d = judge_cost({64: 1.4, 1: 0.9}, 2.0, "3")
    assert d.passed and d.compared
    assert list(d.ratios) == [1, 64] and d.worst == (64, 1.4)
    assert d.reasons == ("serving cost within 2x champion 3's (batch 1: 0.90x, batch 64: 1.40x)",)


def test_the_limit_itself_passes_and_anything_above_it_fails_naming_the_worst_batch() -> None:
    assert judge_cost({1: 2.0}, 2.0, "3").passed
    d = judge_cost({1: 2.01, 64: 3.5, 1024: 2.5}, 2.0, "3")
    assert not d.passed and d.compared
    assert d.reasons[0].startswith("serving cost 3.50x champion 3's at batch 64, above the 2x")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_a_ratio_that_is_not_a_finite_positive_number_fails(bad: float) -> None:
    d = judge_cost({1: 1.0, 64: bad}, 2.0, "3")
    assert not d.passed
    assert d.reasons == ("serving cost could not be measured at batch 64",)


def test_no_champion_gate_off_or_not_measurable_pass_without_comparing() -> None:
    first = judge_cost({}, 2.0, None)
    off = judge_cost({1: 50.0}, None, "3")
    elsewhere = judge_cost({}, 2.0, "3", not_compared="its tensorrt artefact cannot run here")
    empty = judge_cost({}, 2.0, "3")
    for d in (first, off, elsewhere, empty):
        assert d.passed and not d.compared, d
    assert "no champion" in first.reasons[0]
    assert "gate off" in off.reasons[0]
    assert elsewhere.reasons[0].endswith("champion 3: its tensorrt artefact cannot run here")
    assert elsewhere.worst is None


def test_the_gates_error_pickles_with_its_decision() -> None:
    # Prefect pickles a failed task's exception.
    d = judge_cost({1: 9.0}, 2.0, "3")
    err = pickle.loads(pickle.dumps(CostGateFailed("; ".join(d.reasons), d)))
    assert str(err).startswith("[cost] serving cost 9.00x")
    assert err.decision == d


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, OnnxRuntimePredictor]:
    d: Path = tmp_path_factory.mktemp("cost")
    return {
        name: OnnxRuntimePredictor(build_mlp_onnx(d / f"{name}.onnx", seed=seed, hidden=hidden))
        for name, seed, hidden in (
            ("small", 0, (16, 16)),
            ("small-again", 1, (16, 16)),
            ("large", 2, (1024, 1024)),
        )
    }


def test_a_model_hundreds_of_times_the_compute_measures_well_above_any_limit(
    sessions: dict[str, OnnxRuntimePredictor],
) -> None:
    ratios = relative_cost(sessions["large"], sessions["small"], 30, (1, 64), rounds=3)
    assert set(ratios) == {1, 64}
    # 1024x1024 against 16x16 hidden layers: a fixed call overhead hides much of it at batch 1.
    assert ratios[1] > 3 and ratios[64] > 20, ratios
    assert not judge_cost(ratios, 2.0, "1").passed


def test_the_same_architecture_with_other_weights_measures_near_one(
    sessions: dict[str, OnnxRuntimePredictor],
) -> None:
    ratios = relative_cost(sessions["small-again"], sessions["small"], 30, (1, 64, 1024))
    # Alternating blocks cancel the machine's drift; a 2x default limit leaves room for noise.
    assert all(0.5 < r < 1.5 for r in ratios.values()), ratios
    assert judge_cost(ratios, 2.0, "1").passed


def test_the_measurement_refuses_no_rounds(sessions: dict[str, OnnxRuntimePredictor]) -> None:
    with pytest.raises(ValueError, match="rounds"):
        relative_cost(sessions["small"], sessions["small"], 30, (1,), rounds=0)

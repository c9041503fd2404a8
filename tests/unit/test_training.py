"""Training: learns the bundled data, is deterministic on CPU, and fault injection really breaks it."""

from __future__ import annotations

import pytest
import torch

from ballast.data import ValidatedDataset, bundled_csv_bytes, bundled_spec
from ballast.errors import TrainingError
from ballast.training import corrupt_weights, evaluate, select_device, train
from ballast.validation import validate_bytes


@pytest.fixture(scope="module")
def dataset() -> ValidatedDataset:
    return validate_bytes(bundled_csv_bytes(), bundled_spec())


def _train(ds: ValidatedDataset, seed: int = 3):  # type: ignore[no-untyped-def]
    return train(
        ds, hidden=32, epochs=20, learning_rate=3e-3, batch_size=64, seed=seed, device="cpu"
    )


def test_training_reaches_a_useful_accuracy_on_held_out_rows(dataset: ValidatedDataset) -> None:
    result = _train(dataset)
    assert result.metrics["accuracy"] >= 0.93, result.metrics
    assert result.metrics["roc_auc"] >= 0.97, result.metrics
    assert len(result.split.y_test) == 143  # 25 % of 569, stratified
    assert result.device == "cpu"


def test_same_seed_and_data_give_identical_weights_on_cpu(dataset: ValidatedDataset) -> None:
    a, b = _train(dataset, seed=11), _train(dataset, seed=11)
    for (name, wa), wb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(wa, wb), f"{name} differs between two runs with the same seed"
    c = _train(dataset, seed=12)
    assert not torch.equal(a.model.net[0].weight, c.model.net[0].weight)


def test_corrupted_weights_are_measurably_worse(dataset: ValidatedDataset) -> None:
    result = _train(dataset)
    corrupt_weights(result.model, seed=1)
    broken = evaluate(result.model, result.split.x_test, result.split.y_test)
    assert broken["accuracy"] < 0.5, broken


def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        assert select_device("cuda") == "cuda"
    else:
        with pytest.raises(TrainingError, match="no CUDA device"):
            select_device("cuda")

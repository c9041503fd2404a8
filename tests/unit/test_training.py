"""Training: learns both bundled datasets, is deterministic on CPU, keeps the test rows out of every
decision, stops early, checkpoints and resumes exactly, and fault injection really breaks it."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ballast.checkpoint import seal, unseal
from ballast.data import ValidatedDataset
from ballast.datasets_extra import bundled_dataset
from ballast.errors import TrainingError
from ballast.training import (
    EpochRecord,
    TrainResult,
    corrupt_weights,
    evaluate,
    select_device,
    split_dataset,
    train,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Two shared cores: one intra-op thread trains these tiny models several times faster.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def dataset() -> ValidatedDataset:
    # The packaged rows as validation would return them (same bytes, same sha256), without
    # paying Great Expectations' import here; validation has its own tests.
    return bundled_dataset("breast-cancer")


@pytest.fixture(scope="module")
def digits() -> ValidatedDataset:
    return bundled_dataset("digits")


def _train(ds: ValidatedDataset, seed: int = 3, **kw: Any) -> TrainResult:
    args: dict[str, Any] = {
        "hidden": 32,
        "epochs": 20,
        "learning_rate": 3e-3,
        "batch_size": 64,
        "seed": seed,
        "device": "cpu",
    }
    return train(ds, **{**args, **kw})


class Crash(Exception):
    """Stands in for a process dying once an epoch's checkpoint is written."""


def crashed_run(run: Callable[..., TrainResult], epoch: int, **kw: Any) -> list[EpochRecord]:
    """``run(**kw)`` stopped by :class:`Crash` at the end of ``epoch``; the epochs it saw."""
    seen: list[EpochRecord] = []

    def crash_at(record: EpochRecord) -> None:
        seen.append(record)
        if record.epoch == epoch:
            raise Crash

    with pytest.raises(Crash):
        run(on_epoch=crash_at, **kw)
    return seen


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_reaches_a_useful_accuracy_on_held_out_rows(dataset: ValidatedDataset) -> None:
    result = _train(dataset)
    assert result.metrics["accuracy"] >= 0.93, result.metrics
    assert result.metrics["roc_auc"] >= 0.97, result.metrics
    assert len(result.split.y_test) == 143  # 25 % of 569, stratified
    assert result.device == "cpu" and result.model_name == "tabular-mlp"
    assert result.params["model"] == "tabular-mlp" and result.params["hidden"] == "32"


def test_small_cnn_learns_the_digits(digits: ValidatedDataset) -> None:
    result = train(
        digits,
        model="small-cnn",
        model_params={"channels": 8},
        epochs=6,
        learning_rate=3e-3,
        batch_size=64,
        seed=0,
        device="cpu",
    )
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    assert result.metrics["roc_auc"] >= 0.98, "multi-class AUC is one-vs-rest macro"
    assert result.model(torch.zeros(3, 64)).shape == (3, 10)
    assert result.params["channels"] == "8"


def test_same_seed_and_data_give_identical_weights_on_cpu(dataset: ValidatedDataset) -> None:
    a, b = _train(dataset, seed=11), _train(dataset, seed=11)
    assert same_weights(a.model, b.model), "two runs with the same seed differ"
    assert a.history == b.history
    c = _train(dataset, seed=12)
    assert not torch.equal(a.model.net[0].weight, c.model.net[0].weight)


def test_three_parts_are_disjoint_and_validation_comes_from_the_training_part(
    dataset: ValidatedDataset,
) -> None:
    s = split_dataset(dataset, test_fraction=0.25, seed=3, val_fraction=0.2)
    rows = [{r.tobytes() for r in part} for part in (s.x_train, s.x_val, s.x_test)]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert len(s.y_test) == 143 and len(s.y_val) == 86 and len(s.y_train) == 340
    assert abs(s.y_val.mean() - dataset.labels.mean()) < 0.05, "validation is stratified"


def test_history_records_every_epoch_and_the_best_epochs_weights_are_returned(
    dataset: ValidatedDataset,
) -> None:
    seen: list[EpochRecord] = []
    result = _train(dataset, epochs=8, patience=None, on_epoch=seen.append)
    assert [r.epoch for r in result.history] == list(range(1, 9)) and list(result.history) == seen
    best = min(result.history, key=lambda r: r.val_loss)
    assert result.best_epoch == best.epoch
    # The returned model is the best epoch's: its validation loss is the recorded best.
    again = evaluate(result.model, result.split.x_val, result.split.y_val)
    assert again["log_loss"] == pytest.approx(best.val_loss, rel=1e-5)
    history = result.metric_history()
    assert history["epoch_train_loss"][0] == (1, result.history[0].train_loss)
    assert [step for step, _ in history["epoch_val_accuracy"]] == list(range(1, 9))
    assert not set(history) & set(result.metrics), "series names must not shadow final metrics"


def test_early_stopping_stops_after_patience_epochs_without_improvement(
    dataset: ValidatedDataset,
) -> None:
    # A learning rate this high overfits within a few epochs, so validation loss stops improving.
    result = _train(dataset, epochs=60, learning_rate=0.05, patience=3)
    assert result.stopped_early, [round(r.val_loss, 4) for r in result.history]
    assert len(result.history) == result.best_epoch + 3
    assert result.metrics["epochs_run"] == len(result.history) < 60


def test_resume_after_a_crash_gives_the_weights_of_an_uninterrupted_run(
    dataset: ValidatedDataset, tmp_path: Path
) -> None:
    full = _train(dataset, epochs=8, patience=None)
    crashed_run(partial(_train, dataset), 4, epochs=8, patience=None, checkpoint_dir=tmp_path)
    resumed = _train(dataset, epochs=8, patience=None, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 4
    assert resumed.history == full.history, "epochs after the resume differ: RNG or optimiser state"
    assert same_weights(resumed.model, full.model)


def test_a_finished_run_started_again_returns_the_same_model_without_training(
    dataset: ValidatedDataset, tmp_path: Path
) -> None:
    first = _train(dataset, epochs=5, checkpoint_dir=tmp_path)
    calls: list[EpochRecord] = []
    again = _train(dataset, epochs=5, checkpoint_dir=tmp_path, on_epoch=calls.append)
    assert first.resumed_from_epoch is None and again.resumed_from_epoch == 5
    assert calls == [], "nothing left to train"
    assert same_weights(first.model, again.model) and again.metrics == first.metrics


def test_another_configuration_does_not_resume_from_these_checkpoints(
    dataset: ValidatedDataset, tmp_path: Path
) -> None:
    a = _train(dataset, epochs=3, checkpoint_dir=tmp_path)
    b = _train(dataset, epochs=3, checkpoint_dir=tmp_path, learning_rate=1e-3)
    assert b.resumed_from_epoch is None and a.checkpoint_key != b.checkpoint_key
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_checkpoints_of_other_training_code_are_not_resumed(
    dataset: ValidatedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ballast.training as training

    first = _train(dataset, epochs=3, checkpoint_dir=tmp_path)
    # Before: a code change that keeps the shapes (ReLU -> GELU) resumed the finished run,
    # trained 0 epochs and returned the old code's weights.
    monkeypatch.setattr(training, "training_code_identity", lambda: "edited-code", raising=False)
    calls: list[object] = []
    again = _train(dataset, epochs=3, checkpoint_dir=tmp_path, on_epoch=calls.append)
    assert again.resumed_from_epoch is None and len(calls) == 3
    assert again.checkpoint_key != first.checkpoint_key


def test_a_checkpoint_that_does_not_fit_the_model_is_a_training_error(
    dataset: ValidatedDataset, tmp_path: Path
) -> None:
    _train(dataset, epochs=1, checkpoint_dir=tmp_path)
    (path,) = tmp_path.glob("*/epoch-000001.pt")
    state = torch.load(io.BytesIO(unseal(path.read_bytes())), weights_only=True)
    state["model"] = {"layer.weight": torch.zeros(2)}  # what a changed architecture looks like
    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(seal(buf.getvalue()))  # a well-formed checkpoint, for another model
    with pytest.raises(TrainingError, match=r"does not fit this model.*remove .* to start over"):
        _train(dataset, epochs=1, checkpoint_dir=tmp_path)


def test_torch_compile_is_only_used_on_cuda(dataset: ValidatedDataset) -> None:
    result = _train(dataset, epochs=2, torch_compile=True)
    assert result.params["torch_compile"] == "False", "CPU trains eagerly"


def test_corrupted_weights_are_measurably_worse(dataset: ValidatedDataset) -> None:
    result = _train(dataset)
    corrupt_weights(result.model, seed=1)
    broken = evaluate(result.model, result.split.x_test, result.split.y_test)
    assert broken["accuracy"] < 0.5, broken


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"learning_rate": float("nan")}, "learning_rate must be a positive number"),
        ({"patience": 0}, "patience must be >= 1"),
        ({"min_delta": float("nan")}, "min_delta must be a finite number >= 0"),
        ({"min_delta": float("inf")}, "min_delta must be a finite number >= 0"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0"),
        ({"val_fraction": 0.6}, r"val_fraction must be within \(0, 0.5\)"),
        ({"model": "transformer"}, "unknown model 'transformer'"),
        ({"model": "small-cnn"}, "the dataset has 30"),
        ({"device": "tpu"}, "device must be auto, cpu or cuda"),
    ],
)
def test_bad_training_arguments_are_training_errors(
    dataset: ValidatedDataset, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(TrainingError, match=message):
        _train(dataset, **overrides)


def test_a_run_whose_validation_loss_is_never_finite_is_an_error_not_the_initial_weights(
    dataset: ValidatedDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a validation loss that is NaN at every epoch (finite training loss),
    import ballast.training as training

    real = training.evaluate

    def nan_loss(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return {**real(model, x, y), "log_loss": float("nan")}

    monkeypatch.setattr(training, "evaluate", nan_loss)
    # when training runs, then it fails instead of returning the untrained model as "best".
    with pytest.raises(TrainingError, match="no epoch produced a finite validation loss"):
        _train(dataset, epochs=3, patience=None)


def test_a_class_too_rare_to_stratify_is_a_training_error(dataset: ValidatedDataset) -> None:
    labels = dataset.labels.copy()
    labels[0] = 2  # one row of a third class cannot be split three ways
    odd = ValidatedDataset(
        "odd", dataset.features, labels, dataset.feature_names, "0" * 64, dataset.n_rows, ()
    )
    with pytest.raises(TrainingError, match="cannot carve the test split"):
        _train(odd)


def test_a_sample_missing_its_last_class_still_gets_a_model_of_every_class(
    digits: ValidatedDataset,
) -> None:
    # Before: 9 outputs for digits without a 9, another serving shape than a 10-class champion.
    keep = digits.labels != 9
    sample = dataclasses.replace(
        digits,
        features=digits.features[keep],
        labels=digits.labels[keep],
        n_rows=int(keep.sum()),
    )
    assert sample.n_classes == 10
    result = _train(sample, epochs=1)
    out = result.model(torch.zeros((2, digits.features.shape[1])))
    assert out.shape == (2, 10)


def test_labels_outside_the_declared_classes_are_a_training_error_before_training(
    dataset: ValidatedDataset,
) -> None:
    labels = dataset.labels.copy()
    labels[labels == 0] = -1  # before: IndexError in the first batch
    odd = dataclasses.replace(dataset, labels=labels)
    with pytest.raises(TrainingError, match=r"labels must be classes 0..1, got -1..1"):
        _train(odd)


def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        assert select_device("cuda") == "cuda"
    else:
        with pytest.raises(TrainingError, match="no CUDA device"):
            select_device("cuda")


def test_evaluate_reports_nan_auc_when_the_rows_miss_a_class(dataset: ValidatedDataset) -> None:
    result = _train(dataset, epochs=2)
    only_ones = result.split.y_test == 1
    m = evaluate(result.model, result.split.x_test[only_ones], result.split.y_test[only_ones])
    assert np.isnan(m["roc_auc"]) and 0 <= m["accuracy"] <= 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--epochs", "0"], "--epochs: must be >= 1"),
        (["--batch-size", "-3"], "--batch-size: must be >= 1"),
        (["--learning-rate", "nan"], "--learning-rate: must be >="),
        (["--weights-out", "{tmp}"], "is a folder"),
        (["--checkpoint-dir", "{file}"], "is a file, not a folder"),
    ],
)
def test_training_cli_refuses_bad_arguments_before_training(
    args: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: --epochs 0 exited 1 after setup, and a folder as --weights-out failed only after
    # training, leaving a stray .tmp file.
    from ballast.training_cli import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = [a.format(tmp=tmp_path, file=afile) for a in args]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert says in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"], "nothing written"

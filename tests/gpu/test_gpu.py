"""The CUDA paths, end to end on a real GPU: training with bf16 autocast (and torch.compile),
checkpoints resumed on the GPU, data-parallel training under torchrun with nccl, and the models
trained there compiled for serving (ONNX Runtime on CPU, an AOTInductor package on CUDA).

CPU machines never collect this file (``conftest.py``); CI has no GPU.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ballast.compile import CompiledArtifact, compile_model
from ballast.compile.parity import eager_logits
from ballast.data import ValidatedDataset
from ballast.datasets_extra import bundled_dataset
from ballast.distributed import Topology, train_data_parallel
from ballast.runtime import load_predictor
from ballast.training import TrainResult, train
from tests.unit.test_training import crashed_run

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cancer() -> ValidatedDataset:
    return bundled_dataset("breast-cancer")


def _train(ds: ValidatedDataset, **kw: Any) -> TrainResult:
    args: dict[str, Any] = {
        "hidden": 32,
        "epochs": 20,
        "learning_rate": 3e-3,
        "batch_size": 64,
        "seed": 3,
        "device": "cuda",
    }
    return train(ds, **{**args, **kw})


def _compile(result: TrainResult, out: Path, backend: str) -> CompiledArtifact:
    return compile_model(
        result.model,
        result.split.x_train[:8],
        result.split.x_test,
        out,
        backend=backend,  # type: ignore[arg-type]
        rtol_fp32=1e-4,
        max_batch=64,
        bench_batches=(1, 64),
        bench_min_time_s=0.05,
    )


def _on_cpu(model: torch.nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def test_cuda_training_uses_bf16_and_its_model_compiles_to_a_matching_onnx_runtime_artefact(
    cancer: ValidatedDataset, tmp_path: Path
) -> None:
    result = _train(cancer)
    assert result.device == "cuda" and result.params["device"] == "cuda"
    assert result.params["bf16"] == str(torch.cuda.is_bf16_supported())
    assert result.metrics["accuracy"] >= 0.93 and result.metrics["roc_auc"] >= 0.97, result.metrics
    assert _on_cpu(result.model), "the result is handed on as a CPU model"
    art = _compile(result, tmp_path, "onnxruntime")
    assert art.backend == "onnxruntime" and art.parity.passed, art.parity
    assert art.parity.n_rows == len(result.split.x_test)


def test_small_cnn_learns_the_digits_on_cuda() -> None:
    result = train(
        bundled_dataset("digits"),
        model="small-cnn",
        epochs=8,
        learning_rate=3e-3,
        batch_size=64,
        seed=0,
        device="cuda",
    )
    assert result.device == "cuda" and result.metrics["accuracy"] >= 0.9, result.metrics


def test_torch_compile_trains_on_cuda(cancer: ValidatedDataset) -> None:
    result = _train(cancer, epochs=10, torch_compile=True)
    assert result.params["torch_compile"] == "True"
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    assert _on_cpu(result.model)


def test_a_crashed_cuda_run_resumes_from_its_checkpoint_with_the_gpu_rng_restored(
    cancer: ValidatedDataset, tmp_path: Path
) -> None:
    full = _train(cancer, epochs=8, patience=None)
    seen = crashed_run(partial(_train, cancer), 4, epochs=8, patience=None, checkpoint_dir=tmp_path)
    resumed = _train(cancer, epochs=8, patience=None, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 4
    assert resumed.history[:4] == tuple(seen), "the first epochs come from the checkpoint"
    assert len(resumed.history) == 8
    # On CUDA bit-equality is not promised (kernel choice, bf16); a resume that lost the
    # optimiser or shuffle state drifts by far more than this.
    for a, b in zip(resumed.history[4:], full.history[4:], strict=True):
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-3, abs=1e-4), (a, b)
    sa, sb = resumed.model.state_dict(), full.model.state_dict()
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst <= 1e-3, f"resumed weights differ from an uninterrupted run's by up to {worst}"


def test_data_parallel_training_runs_under_torchrun_with_nccl(
    cancer: ValidatedDataset, tmp_path: Path
) -> None:
    lines: list[str] = []
    result = train_data_parallel(
        cancer,
        topology=Topology(1),  # one GPU here: one rank (nccl refuses two ranks on one GPU)
        work_dir=tmp_path,
        device="cuda",
        timeout_s=300.0,
        epochs=6,
        learning_rate=3e-3,
        batch_size=64,
        seed=5,
        model="tabular-mlp",
        model_params={"hidden": 32},
        patience=None,
        on_line=lines.append,
    )
    assert result.device == "cuda" and result.params.get("world_size") == "1", result.params
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    assert _on_cpu(result.model)
    assert not [ln for ln in lines if "teardown" in ln], lines[-20:]
    assert list(tmp_path.iterdir()) == [], "the launch folder is removed"


def test_a_cuda_aotinductor_package_of_a_gpu_trained_model_matches_eager(
    cancer: ValidatedDataset, tmp_path: Path
) -> None:
    # compile_model opens the package in a child first (ballast.compile.probe): on torch
    # 2.11+cu130 that child died with SIGSEGV inside aoti_load_package, which now fails here
    # as a CompileError naming the signal instead of killing pytest.
    result = _train(cancer, epochs=5)
    art = _compile(result, tmp_path, "aotinductor")
    assert art.parity.passed, art.parity
    predictor = load_predictor(art.path, "aotinductor")
    assert getattr(predictor, "device", None) == "cuda"
    x = np.resize(result.split.x_test, (100, result.split.x_test.shape[1])).astype(np.float32)
    np.testing.assert_allclose(
        predictor.predict(x), eager_logits(result.model, x), rtol=1e-4, atol=1e-4
    )


def test_eager_logits_of_a_gpu_model_match_its_cpu_copy(cancer: ValidatedDataset) -> None:
    # parity.eager_logits runs a model where it lives; the gateway and the pipeline rely on a
    # CUDA copy and a CPU copy agreeing to fp32 tolerance.
    result = _train(cancer, epochs=3)
    x = result.split.x_test.astype(np.float32)
    on_gpu = result.model.to("cuda")
    try:
        gpu = eager_logits(on_gpu, x)
    finally:
        on_gpu.to("cpu")
    np.testing.assert_allclose(gpu, eager_logits(result.model, x), rtol=1e-4, atol=1e-4)

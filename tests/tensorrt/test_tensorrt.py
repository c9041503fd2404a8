"""The TensorRT backend end to end on a real GPU.

Collected only where tensorrt imports and a CUDA GPU is visible (see conftest.py). Never run on the
project's machines, which cannot install TensorRT.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ballast.compile import TensorRTBackend, compile_model, export_onnx, select_backend
from ballast.compile.parity import eager_logits
from ballast.compile.tensorrt import TensorRTPredictor, read_sidecar, sidecar_path
from ballast.errors import CompileError
from ballast.runtime import load_predictor

pytestmark = pytest.mark.tensorrt

N_FEATURES = 30


class MLP(torch.nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1.0, 1.0, N_FEATURES))
        self.register_buffer("std", torch.linspace(0.5, 2.0, N_FEATURES))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(N_FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((200, N_FEATURES)).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, model: MLP, rows: np.ndarray
) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("trt")
    cache = out / "timing.cache"
    onnx_path = export_onnx(model, rows[:4], out / "model.onnx")
    backend = TensorRTBackend(fp16=False, timing_cache=cache)
    return backend.compile(onnx_path, out, max_batch=128), cache


def test_auto_selects_tensorrt_on_a_gpu_machine() -> None:
    assert select_backend("auto").name == "tensorrt"


def test_build_writes_engine_sidecar_and_timing_cache(engine: tuple[Path, Path]) -> None:
    path, cache = engine
    assert path.name == "model.engine" and path.stat().st_size > 0
    sidecar = read_sidecar(path)
    major, minor = torch.cuda.get_device_capability()
    assert sidecar["compute_capability"] == f"{major}.{minor}"
    assert (sidecar["precision"], sidecar["max_batch"], sidecar["opt_batch"]) == ("fp32", 128, 64)
    assert cache.stat().st_size > 0, "the timing cache must be persisted for the next build"


def test_fp32_engine_matches_eager_and_splits_large_batches(
    engine: tuple[Path, Path], model: MLP, rows: np.ndarray
) -> None:
    predictor = load_predictor(engine[0], "tensorrt")
    for n in (1, 64, 200):  # 200 > max_batch 128: two engine calls
        np.testing.assert_allclose(
            predictor.predict(rows[:n]), eager_logits(model, rows[:n]), rtol=1e-4, atol=1e-5
        )


def test_engine_from_another_gpu_architecture_is_refused(engine: tuple[Path, Path]) -> None:
    path, _ = engine
    side = sidecar_path(path)
    original = side.read_text()
    data = json.loads(original)
    data["compute_capability"] = "1.0"
    side.write_text(json.dumps(data))
    try:
        with pytest.raises(CompileError, match=r"compute capability 1\.0"):
            TensorRTPredictor(path)
    finally:
        side.write_text(original)


def test_compile_model_with_tensorrt_passes_parity(
    tmp_path: Path, model: MLP, rows: np.ndarray
) -> None:
    art = compile_model(
        model,
        rows[:8],
        rows,
        tmp_path,
        backend="tensorrt",
        rtol_fp32=1e-4,
        rtol_fp16=1e-2,
        max_batch=1024,
        bench_batches=(1, 64),
        bench_min_time_s=0.05,
    )
    assert art.backend == "tensorrt" and art.parity.passed
    assert art.precision in {"fp16", "fp32"}
    assert "speedup_b1_vs_eager" in art.metrics()


def test_a_corrupt_timing_cache_starts_a_new_one(
    tmp_path: Path, model: MLP, rows: np.ndarray
) -> None:
    # create_timing_cache gives None for a blob it cannot read: before, every build after a
    # corrupt cache file failed with a TypeError.
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"not a timing cache" * 64)
    onnx_path = export_onnx(model, rows[:4], tmp_path / "model.onnx")
    path = TensorRTBackend(fp16=False, timing_cache=cache).compile(onnx_path, tmp_path, max_batch=8)
    assert path.stat().st_size > 0 and cache.read_bytes()[:18] != b"not a timing cache"


def test_a_shape_outside_the_engines_profile_is_a_compile_error(
    engine: tuple[Path, Path], rows: np.ndarray
) -> None:
    predictor = TensorRTPredictor(engine[0])
    predictor.max_batch = 1000  # as a sidecar that disagrees with the engine (built for 128)
    with pytest.raises(CompileError, match="refused input shape"):
        predictor.predict(np.resize(rows, (300, N_FEATURES)))

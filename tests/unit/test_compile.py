"""Compile stage: ONNX export, the ONNX Runtime backend, backend choice, parity and benchmarks.

Everything here runs on CPU with real torch, ONNX and ONNX Runtime. The TensorRT backend itself
needs tensorrt and a GPU (tests/tensorrt); only its pure parts are checked here.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from ballast.compile import (
    AOTInductorBackend,
    CompiledArtifact,
    ModuleCompileBackend,
    OnnxRuntimeBackend,
    TensorRTBackend,
    benchmark,
    benchmark_eager,
    check_parity,
    compile_model,
    export_onnx,
    select_backend,
)
from ballast.compile.aotinductor import AOTInductorPredictor, read_package_metadata
from ballast.compile.aotinductor import compatibility_problems as aoti_problems
from ballast.compile.parity import eager_logits, random_rows, relative_errors
from ballast.compile.tensorrt import (
    ENGINE_NAME,
    TensorRTPredictor,
    compatibility_problems,
    read_sidecar,
    sidecar_path,
)
from ballast.errors import CompileError, ParityError
from ballast.hashing import sha256_file
from ballast.runtime import OnnxRuntimePredictor, load_predictor
from ballast.settings import Settings

N_FEATURES = 30


class MLP(torch.nn.Module):
    """Like the production model: normalisation buffers inside, logits out."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int = N_FEATURES, hidden: int = 32, n_classes: int = 2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.linspace(-1.0, 1.0, n_features))
        self.register_buffer("std", torch.linspace(0.5, 2.0, n_features))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class NamedInput(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(N_FEATURES, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.lin(features)


class NoisyAtInference(torch.nn.Module):
    """Dropout left on in eval: the exported graph samples its own mask, so it cannot match."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(N_FEATURES, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.nn.functional.dropout(x, p=0.5, training=True))


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    rng = np.random.default_rng(1)
    return (rng.standard_normal((120, N_FEATURES)) * 3 + 5).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory, model: MLP, rows: np.ndarray) -> Path:
    return export_onnx(model, rows[:4], tmp_path_factory.mktemp("export") / "model.onnx")


@pytest.fixture(scope="module")
def ort_artifact(tmp_path_factory: pytest.TempPathFactory, onnx_file: Path) -> Path:
    return OnnxRuntimeBackend().compile(onnx_file, tmp_path_factory.mktemp("ort"), max_batch=1024)


# --- export ------------------------------------------------------------------------------------


def test_export_writes_one_file_with_named_io_and_a_dynamic_batch(onnx_file: Path) -> None:
    assert [p.name for p in onnx_file.parent.iterdir()] == ["model.onnx"], "no external data"
    graph = onnx.load(str(onnx_file)).graph
    (inp,) = graph.input
    (out,) = graph.output
    assert (inp.name, out.name) == ("input", "logits")
    batch, features = inp.type.tensor_type.shape.dim
    assert batch.dim_param, "the batch dimension must be symbolic"
    assert features.dim_value == N_FEATURES


def test_export_prints_nothing_to_stdout(
    tmp_path: Path, model: MLP, rows: np.ndarray, capfd: pytest.CaptureFixture[str]
) -> None:
    export_onnx(model, rows[:1], tmp_path / "m.onnx")
    assert capfd.readouterr().out == "", "exporter progress must stay out of our output"


@pytest.mark.parametrize("max_batch", [1, 2, 5])
def test_export_with_a_small_batch_limit_traces_an_example_that_fits(
    tmp_path: Path, model: MLP, rows: np.ndarray, max_batch: int
) -> None:
    # Before: 8 example rows were traced against a batch range of 1..2, a constraint violation
    # (`ballast bench compile --batches 1`).
    path = export_onnx(model, rows[:16], tmp_path / "m.onnx", max_batch=max_batch)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in {1, max(max_batch, 2)}:
        (out,) = session.run(None, {"input": rows[:n].astype(np.float32)})
        assert out.shape[0] == n


def test_export_leaves_the_callers_model_in_its_mode(tmp_path: Path, rows: np.ndarray) -> None:
    m = MLP().train()
    export_onnx(m, rows[:2], tmp_path / "m.onnx")
    assert m.training, "export must restore train mode"


def test_export_keys_the_dynamic_batch_by_forwards_argument_name(
    tmp_path: Path, rows: np.ndarray
) -> None:
    path = export_onnx(NamedInput(), rows[:2], tmp_path / "named.onnx")
    out = OnnxRuntimeBackend().compile(path, tmp_path, max_batch=8)
    assert load_predictor(out, "onnxruntime").predict(rows[:5]).shape == (5, 3)


def test_the_saved_onnxruntime_model_holds_no_layout_rewrites_for_the_build_cpu(
    tmp_path: Path,
) -> None:
    # Before: saved at ORT_ENABLE_ALL, the small CNN's convolutions were NCHWc nodes laid out
    # for the build machine's vector width (ONNX Runtime: run such a model on the same
    # hardware); serving now lays them out for its own CPU when it loads the model.
    import onnx
    import torch

    from ballast.models import SMALL_CNN, get_spec

    spec = get_spec(SMALL_CNN)
    torch.manual_seed(0)
    net = spec.build(
        spec.params({"channels": 8}),
        n_features=64,
        n_classes=10,
        mean=np.zeros(64, dtype=np.float32),
        std=np.ones(64, dtype=np.float32),
    ).eval()
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    out = OnnxRuntimeBackend().compile(
        export_onnx(net, x[:2], tmp_path / "cnn.onnx"), tmp_path, max_batch=8
    )
    domains = {node.domain for node in onnx.load(out).graph.node}
    assert not any("nchwc" in d for d in domains), domains
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        load_predictor(out, "onnxruntime").predict(x), want, rtol=1e-4, atol=1e-5
    )


def test_export_refuses_an_example_that_is_not_a_2d_batch(tmp_path: Path, model: MLP) -> None:
    with pytest.raises(CompileError, match="batch, features"):
        export_onnx(model, np.zeros(N_FEATURES, dtype=np.float32), tmp_path / "m.onnx")


# --- onnxruntime backend -----------------------------------------------------------------------


def test_ort_artifact_matches_eager_at_any_batch_size(
    ort_artifact: Path, model: MLP, rows: np.ndarray
) -> None:
    assert ort_artifact.name == "model.ort.onnx"
    predictor = load_predictor(ort_artifact, "onnxruntime")
    for n in (1, 3, 120):
        got = predictor.predict(rows[:n])
        want = eager_logits(model, rows[:n])
        assert got.shape == (n, 2) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"batch {n}")


def test_ort_predictor_calls_the_binding_directly_with_the_public_calls_answers(
    ort_artifact: Path, rows: np.ndarray
) -> None:
    predictor = load_predictor(ort_artifact, "onnxruntime")
    assert isinstance(predictor, OnnxRuntimePredictor)
    assert predictor._direct is not None, "onnxruntime renamed its binding: the fast path is off"
    public = predictor._session
    for n in (1, 2, 16, 120):
        want = public.run(None, {"input": rows[:n]})[0]
        np.testing.assert_array_equal(predictor.predict(rows[:n]), want, err_msg=f"batch {n}")
    # What the public call would convert, the predictor converts first.
    strided = np.asfortranarray(rows[:7].astype(np.float64))
    want = public.run(None, {"input": np.ascontiguousarray(rows[:7])})[0]
    np.testing.assert_allclose(predictor.predict(strided), want, rtol=1e-6)
    # A wrong width is the runtime's error, as through the public call.
    with pytest.raises(Exception, match=r"(?i)invalid dimensions"):
        predictor.predict(np.zeros((2, N_FEATURES + 1), dtype=np.float32))
    # Without the binding (a release that renamed it) the public call answers the same.
    predictor._direct = None
    np.testing.assert_array_equal(
        predictor.predict(rows[:3]), public.run(None, {"input": rows[:3]})[0]
    )


def test_ort_backend_reports_a_graph_it_cannot_load_as_compile_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(CompileError, match="could not optimise"):
        OnnxRuntimeBackend().compile(bad, tmp_path / "out", max_batch=8)


# --- backend choice ----------------------------------------------------------------------------


def test_select_backend_onnxruntime_passes_threads_through() -> None:
    backend = select_backend("onnxruntime", intra_op_threads=2)
    assert isinstance(backend, OnnxRuntimeBackend) and backend.intra_op_threads == 2
    assert backend.available() and backend.precision == "fp32"


def test_auto_falls_back_to_onnxruntime_and_explicit_tensorrt_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        TensorRTBackend, "unavailable_reason", lambda self: "no CUDA GPU is visible"
    )
    assert select_backend("auto").name == "onnxruntime"
    with pytest.raises(CompileError, match=r"'tensorrt' was requested.*no CUDA GPU is visible"):
        select_backend("tensorrt")


def test_auto_picks_tensorrt_where_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TensorRTBackend, "unavailable_reason", lambda self: None)
    assert select_backend("auto").name == "tensorrt"


def test_select_backend_matches_this_machine() -> None:
    reason = TensorRTBackend().unavailable_reason()
    if reason is None:
        assert select_backend("tensorrt").name == "tensorrt"
    else:
        with pytest.raises(CompileError, match=re.escape(reason)):
            select_backend("tensorrt")


def test_aotinductor_is_chosen_only_by_name_and_builds_from_the_module() -> None:
    backend = select_backend("aotinductor")
    assert isinstance(backend, AOTInductorBackend) and isinstance(backend, ModuleCompileBackend)
    assert backend.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not isinstance(select_backend("onnxruntime"), ModuleCompileBackend)
    assert select_backend("auto").name in ("onnxruntime", "tensorrt"), "auto never picks AOTI"


def test_explicit_aotinductor_where_it_cannot_run_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(AOTInductorBackend, "unavailable_reason", lambda self: "no C++ compiler")
    with pytest.raises(CompileError, match=r"'aotinductor' was requested.*no C\+\+ compiler"):
        select_backend("aotinductor")


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(CompileError, match="unknown"):
        select_backend("tvm")  # type: ignore[arg-type]


# --- tensorrt: the parts that run without tensorrt ---------------------------------------------


def test_engine_compatibility_names_version_and_architecture_mismatches() -> None:
    sidecar = {"tensorrt_version": "10.13.0", "compute_capability": "8.0"}
    assert compatibility_problems(sidecar, trt_version="10.13.0", compute_capability="8.0") == []
    problems = compatibility_problems(sidecar, trt_version="11.4.0", compute_capability="9.0")
    assert len(problems) == 2
    assert "TensorRT 10.13.0" in problems[0] and "11.4.0" in problems[0]
    assert "8.0" in problems[1] and "9.0" in problems[1]


def test_tensorrt_predictor_refuses_an_engine_without_sidecar(tmp_path: Path) -> None:
    engine = tmp_path / ENGINE_NAME
    engine.write_bytes(b"\0" * 16)
    with pytest.raises(CompileError, match="sidecar missing"):
        load_predictor(engine, "tensorrt")


def test_tensorrt_predictor_refuses_an_engine_from_another_build(tmp_path: Path) -> None:
    engine = tmp_path / ENGINE_NAME
    engine.write_bytes(b"\0" * 16)
    sidecar_path(engine).write_text(
        json.dumps({"tensorrt_version": "0.0.0", "compute_capability": "0.0", "n_features": 30})
    )
    # Here: tensorrt missing. On a TensorRT machine: the version mismatch. Both refuse.
    with pytest.raises(CompileError):
        TensorRTPredictor(engine)


def test_tensorrt_names_the_sidecar_its_predictor_reads_as_a_companion_file(
    tmp_path: Path,
) -> None:
    # Given an engine path (no TensorRT needed: naming the files is pure)
    engine = tmp_path / ENGINE_NAME
    # When the backend is asked what must travel with it
    companions = TensorRTBackend().companion_files(engine)
    # Then it is the sidecar, beside the engine, that TensorRTPredictor reads before loading
    assert companions == (tmp_path / "model.engine.json",) == (sidecar_path(engine),)
    companions[0].write_text(json.dumps({"tensorrt_version": "10.0"}))
    assert read_sidecar(engine) == {"tensorrt_version": "10.0"}, "predictor reads another file"


def test_self_contained_artefacts_have_no_companion_files(tmp_path: Path) -> None:
    assert OnnxRuntimeBackend().companion_files(tmp_path / "model.ort.onnx") == ()
    assert AOTInductorBackend(device="cpu").companion_files(tmp_path / "model.pt2") == ()


# --- aotinductor: the parts that run without a build (the build: tests/integration) -----------


def test_aoti_compatibility_names_torch_version_device_and_cpu_isa() -> None:
    meta = {"ballast.torch_version": "2.13.0", "AOTI_DEVICE_KEY": "cpu", "AOTI_CPU_ISA": "AVX2"}
    here = {"torch_version": "2.13.0", "cuda_available": False, "cpu_capability": "AVX512"}
    assert aoti_problems(meta, **here) == []  # type: ignore[arg-type]
    newer = {**here, "torch_version": "2.14.0", "cpu_capability": "DEFAULT"}
    problems = aoti_problems(meta, **newer)  # type: ignore[arg-type]
    assert len(problems) == 2
    assert "torch 2.13.0" in problems[0] and "2.14.0" in problems[0]
    assert "AVX2" in problems[1] and "DEFAULT" in problems[1]
    cuda = {"AOTI_DEVICE_KEY": "cuda"}
    assert aoti_problems(cuda, **here) == ["built for CUDA, and no CUDA GPU is visible"]  # type: ignore[arg-type]
    assert aoti_problems(cuda, **{**here, "cuda_available": True}) == []  # type: ignore[arg-type]
    # Review finding: a package built for one GPU architecture loaded on another without a
    # word (the TensorRT path refused the same move).
    h100 = {"AOTI_DEVICE_KEY": "cuda", "AOTI_COMPUTE_CAPABILITY": "90"}
    on_gpu = {**here, "cuda_available": True}
    assert aoti_problems(h100, **on_gpu, compute_capability="90") == []  # type: ignore[arg-type]
    assert aoti_problems(h100, **on_gpu, compute_capability="80") == [  # type: ignore[arg-type]
        "built for GPU compute capability 90, this GPU is 80"
    ]


def test_aoti_device_cuda_without_a_gpu_is_unavailable_and_build_refuses(
    tmp_path: Path, model: MLP, rows: np.ndarray
) -> None:
    if torch.cuda.is_available():
        assert AOTInductorBackend(device="cuda").unavailable_reason() is None
        return
    backend = AOTInductorBackend(device="cuda")
    assert "no CUDA GPU" in (backend.unavailable_reason() or "")
    with pytest.raises(CompileError, match="cannot build an AOTInductor package"):
        backend.compile_module(model, rows[:4], tmp_path, max_batch=64)
    assert list(tmp_path.iterdir()) == [], "nothing written"


@pytest.mark.parametrize(
    ("example", "max_batch", "message"),
    [
        (np.zeros(N_FEATURES, np.float32), 64, "batch, features"),
        (np.zeros((4, N_FEATURES), np.float32), 1, "max_batch must be >= 2"),
    ],
)
def test_aoti_build_refuses_bad_arguments_before_compiling(
    tmp_path: Path, model: MLP, example: np.ndarray, max_batch: int, message: str
) -> None:
    backend = AOTInductorBackend(device="cpu")
    with pytest.raises(CompileError, match=message):
        backend.compile_module(model, example, tmp_path, max_batch=max_batch)
    with pytest.raises(CompileError, match="device must be auto, cpu or cuda"):
        AOTInductorBackend(device="tpu")


def test_aoti_predictor_refuses_what_is_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(CompileError, match="package not found"):
        AOTInductorPredictor(tmp_path / "missing.pt2")
    junk = tmp_path / "model.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CompileError, match="is not an AOTInductor package"):
        read_package_metadata(junk)
    with pytest.raises(CompileError):
        load_predictor(junk, "aotinductor")


# --- parity ------------------------------------------------------------------------------------


def test_relative_error_is_measured_against_the_rows_largest_logit() -> None:
    reference = np.array([[10.0, 1e-9], [-4.0, 2.0]])
    actual = reference + np.array([[1e-4, 1e-4], [0.0, 4e-4]])
    rel = relative_errors(actual, reference)
    # The near-zero logit does not blow up: 1e-4 against 10, not against 1e-9.
    np.testing.assert_allclose(rel, [1e-5, 1e-4])


def test_relative_error_of_a_near_zero_row_uses_the_batch_scale() -> None:
    reference = np.array([[1e-8, -1e-8], [5.0, -3.0]])
    actual = reference + 1e-6
    rel = relative_errors(actual, reference)
    assert rel[0] < 1e-5, "a row of tiny logits must be judged against the batch's logit scale"


def test_non_finite_output_is_an_infinite_error() -> None:
    rel = relative_errors(np.array([[np.nan, 1.0], [1.0, 1.0]]), np.ones((2, 2)))
    assert math.isinf(rel[0]) and rel[1] == 0


def test_a_non_finite_eager_output_is_an_infinite_error_and_spares_the_other_rows() -> None:
    reference = np.array([[np.nan, 1.0], [2.0, -2.0], [np.inf, 0.0]])
    rel = relative_errors(np.array([[0.0, 1.0], [2.0, -2.0], [np.inf, 0.0]]), reference)
    # Row 2 is non-finite on both sides at the same place: still no evidence of parity.
    assert math.isinf(rel[0]) and math.isinf(rel[2]), rel
    assert rel[1] == 0, "a NaN in another row must not poison this row's scale"


class _SqrtOfFirst(torch.nn.Module):
    """Fine on the real (positive) rows; NaN where a random row's first feature is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sqrt(x[:, 0]), -torch.sqrt(x[:, 0])], 1)


class _ClippedSqrtOfFirst:
    """A "compiled" version that agrees on positive rows and answers 0 where eager is NaN."""

    backend = "fake"

    def predict(self, x: np.ndarray) -> np.ndarray:
        s = np.sqrt(np.clip(x[:, 0], 0, None)).astype(np.float32)
        return np.stack([s, -s], 1)


def test_parity_fails_when_eager_is_not_finite_on_the_random_rows() -> None:
    # Given real rows on which both agree, and random rows where eager PyTorch yields NaN
    real = np.abs(np.random.default_rng(0).normal(1.0, 1.0, size=(50, 3))).astype(np.float32)
    real += 0.01
    assert (random_rows(real, 256)[:, 0] < 0).any(), "the test needs negative random rows"
    # When parity is checked, then it fails with an infinite error instead of passing
    with pytest.raises(ParityError, match=r"max relative error inf .*eager PyTorch itself") as e:
        check_parity(_SqrtOfFirst(), _ClippedSqrtOfFirst(), real, rtol=1e-4)
    report = e.value.report  # type: ignore[attr-defined]  # set by check_parity for callers
    assert not report.passed and math.isinf(report.max_rel_err) and math.isinf(report.max_abs_err)
    # Without the random rows both sides are finite and agree
    assert check_parity(_SqrtOfFirst(), _ClippedSqrtOfFirst(), real, rtol=1e-4, n_random=0).passed


@pytest.mark.parametrize("rtol", [math.inf, math.nan, 0.0, -1e-4, 1.0])
def test_a_parity_tolerance_outside_0_1_is_refused_before_anything_is_compared(
    rtol: float,
) -> None:
    # inf would let a model 1000x off pass; 0 or less would fail every compile.
    rows = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ParityError, match=r"parity tolerance must lie in \(0, 1\)"):
        check_parity(_SqrtOfFirst(), _ClippedSqrtOfFirst(), rows, rtol=rtol)


def test_random_rows_follow_the_scale_of_the_real_rows(rows: np.ndarray) -> None:
    drawn = random_rows(rows, 4000, seed=3)
    assert drawn.dtype == np.float32 and drawn.shape == (4000, N_FEATURES)
    np.testing.assert_allclose(drawn.mean(axis=0), rows.mean(axis=0), atol=0.3)
    np.testing.assert_allclose(drawn.std(axis=0), rows.std(axis=0), rtol=0.1)


def test_parity_passes_for_the_compiled_model(
    ort_artifact: Path, model: MLP, rows: np.ndarray
) -> None:
    report = check_parity(
        model, load_predictor(ort_artifact, "onnxruntime"), rows, rtol=1e-4, n_random=64
    )
    assert report.passed and report.max_rel_err <= 1e-4
    assert (report.n_rows, report.n_random, report.rtol) == (120, 64, 1e-4)


def test_parity_catches_an_artefact_wrong_only_at_batch_1(
    ort_artifact: Path, model: MLP, rows: np.ndarray
) -> None:
    # Review finding: the gate called predict with all rows and 256 random ones only, so an
    # artefact wrong at batch 1 (serving's usual size) passed.
    real = load_predictor(ort_artifact, "onnxruntime")
    sizes: list[int] = []

    class WrongAlone:
        backend = "onnxruntime"

        def predict(self, x: np.ndarray) -> np.ndarray:
            sizes.append(len(x))
            y = real.predict(x)
            return y if len(x) > 1 else -y

    with pytest.raises(ParityError, match=r"held-out one at a time row 0"):
        check_parity(model, WrongAlone(), rows, rtol=1e-4, n_random=8)
    assert sizes.count(1) == 4  # each of the first 4 held-out rows, one call each


def test_parity_fails_for_another_models_artefact_naming_error_and_limit(
    ort_artifact: Path, rows: np.ndarray
) -> None:
    torch.manual_seed(0)
    drifted = MLP().eval()
    with torch.no_grad():
        last = drifted.net[2]
        assert isinstance(last, torch.nn.Linear)
        last.bias.add_(0.05)  # the artefact was compiled before this change
    with pytest.raises(
        ParityError, match=r"max relative error [\d.e-]+ \(.* row \d+\) exceeds rtol"
    ):
        check_parity(drifted, load_predictor(ort_artifact, "onnxruntime"), rows, rtol=1e-4)


# --- benchmarks --------------------------------------------------------------------------------


def test_benchmark_reports_each_batch_with_consistent_numbers(ort_artifact: Path) -> None:
    report = benchmark(
        load_predictor(ort_artifact, "onnxruntime"), N_FEATURES, (1, 16), min_time_s=0.01
    )
    assert report.runtime == "onnxruntime" and report.batches == (1, 16)
    for t in report.timings:
        assert t.n_calls >= 50
        assert 0 < t.p50_ms <= t.p99_ms
        assert t.samples_per_s == pytest.approx(t.batch / (t.mean_ms / 1e3))


def test_benchmark_eager_restores_torch_threads_and_train_mode() -> None:
    m = MLP().train()
    threads = torch.get_num_threads()
    report = benchmark_eager(m, N_FEATURES, (4,), min_time_s=0.01, threads=1)
    assert report.runtime == "eager" and report.threads == 1
    assert torch.get_num_threads() == threads and m.training


# --- the whole stage ---------------------------------------------------------------------------


def test_compile_model_returns_hashed_checked_benchmarked_artifact(
    tmp_path: Path, model: MLP, rows: np.ndarray
) -> None:
    art = compile_model(
        model,
        rows[:8],
        rows,
        tmp_path,
        backend="onnxruntime",
        rtol_fp32=1e-4,
        max_batch=256,
        bench_batches=(1, 64),
        n_random=32,
        bench_min_time_s=0.01,
    )
    assert isinstance(art, CompiledArtifact)
    assert (art.backend, art.precision) == ("onnxruntime", "fp32")
    assert art.path == tmp_path / "model.ort.onnx" and art.sha256 == sha256_file(art.path)
    assert art.onnx_path == tmp_path / "model.onnx" and art.onnx_sha256 == sha256_file(
        art.onnx_path
    )
    assert art.parity.passed and art.companions == (), "an ORT model is one file"
    metrics = art.metrics()
    for key in (
        "parity_max_rel_err",
        "bench_b1_p50_ms",
        "bench_b64_samples_per_s",
        "eager_b1_p50_ms",
        "speedup_b1_vs_eager",
        "speedup_b64_vs_eager",
    ):
        assert key in metrics, f"missing metric {key}"
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


class _OrtWithNotes(OnnxRuntimeBackend):
    """An ONNX-file backend whose artefact needs a file beside it (as TensorRT's does)."""

    def __init__(self, *, write_notes: bool = True) -> None:
        super().__init__()
        self.write_notes = write_notes

    def compile(self, onnx_path: Path, out_dir: Path, *, max_batch: int) -> Path:
        out = super().compile(onnx_path, out_dir, max_batch=max_batch)
        if self.write_notes:
            out.with_name("notes.json").write_text("{}")
        return out

    def companion_files(self, artifact: Path) -> tuple[Path, ...]:
        return (artifact.with_name("notes.json"),)


def test_compile_model_records_the_files_the_backend_says_its_artefact_needs(
    tmp_path: Path, model: MLP, rows: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ballast.compile.pipeline.select_backend", lambda *a, **k: _OrtWithNotes())
    art = compile_model(
        model,
        rows[:8],
        rows,
        tmp_path,
        rtol_fp32=1e-4,
        max_batch=64,
        bench_batches=(1,),
        n_random=16,
        bench_min_time_s=0.01,
    )
    assert art.companions == (tmp_path / "notes.json",), "registration would leave it behind"


def test_compile_model_refuses_a_companion_file_the_backend_did_not_write(
    tmp_path: Path, model: MLP, rows: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "ballast.compile.pipeline.select_backend",
        lambda *a, **k: _OrtWithNotes(write_notes=False),
    )
    with pytest.raises(CompileError, match=r"not beside it: .*notes\.json"):
        compile_model(
            model, rows[:8], rows, tmp_path, rtol_fp32=1e-4, max_batch=64, bench_batches=(1,)
        )


def test_compile_model_raises_parity_error_before_returning(
    tmp_path: Path, rows: np.ndarray
) -> None:
    with pytest.raises(ParityError, match="exceeds rtol"):
        compile_model(
            NoisyAtInference(),
            rows[:8],
            rows,
            tmp_path,
            backend="onnxruntime",
            rtol_fp32=1e-4,
            bench_batches=(1,),
        )


def test_compile_model_refuses_a_max_batch_the_export_cannot_take(
    tmp_path: Path, model: MLP, rows: np.ndarray
) -> None:
    with pytest.raises(CompileError, match="max_batch"):
        compile_model(model, rows, rows, tmp_path, rtol_fp32=1e-4, max_batch=10_000)


@pytest.mark.parametrize("batches", ["[]", "[0,64]", "[-1]", "[1,4097]"])
def test_settings_refuse_bench_batches_the_compile_stage_cannot_use(
    monkeypatch: pytest.MonkeyPatch, batches: str
) -> None:
    # The compile task compiles for max(bench_batches): empty, < 1 or above the export's limit
    # would fail there with a bare ValueError or CompileError; refuse them at settings load.
    monkeypatch.setenv("BALLAST_BENCH_BATCHES", batches)
    with pytest.raises(ValidationError, match=r"bench_batches must be one or more .* 1\.\.4096"):
        Settings()


def test_settings_accept_bench_batches_up_to_the_export_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BALLAST_BENCH_BATCHES", "[1,4096]")
    assert Settings().bench_batches == (1, 4096)
    # Settings keep their own copy of the export's limit (importing it would load this package).
    from ballast import settings
    from ballast.compile.onnx_export import MAX_EXPORT_BATCH

    assert settings.MAX_EXPORT_BATCH == MAX_EXPORT_BATCH == 4096


# --- ballast bench compile (the script's plumbing; its numbers are never asserted) ---------------


def test_bench_compile_prints_rows_for_eager_and_each_backend_as_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ballast.bench.compile import main

    old = torch.get_num_threads()
    argv = ["--models", "tabular-mlp", "--backends", "onnxruntime", "--batches", "1,8"]
    argv += ["--rounds", "1", "--min-time", "0.01", "--epochs", "1", "--json"]
    assert main(argv) == 0
    assert torch.get_num_threads() == old, "the bench must put torch's thread count back"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bench"] == "compile" and summary["chosen_backend"] in (
        "onnxruntime",
        "tensorrt",
    )
    got = {(r["backend"], r["batch"]) for r in summary["rows"]}
    assert got == {("eager", 1), ("eager", 8), ("onnxruntime", 1), ("onnxruntime", 8)}
    for r in summary["rows"]:
        assert r["p50_ms"] > 0 and r["speedup_vs_eager"] > 0 and r["model"] == "tabular-mlp"
    assert set(summary["goal"]["speedups"]) == {"tabular-mlp/b1"}, "b64 was not measured"


@pytest.mark.parametrize(
    "argv",
    [["--models", "resnet"], ["--backends", "tvm"], ["--rounds", "0"], ["--batches", "0"]],
)
def test_bench_compile_refuses_bad_arguments(argv: list[str]) -> None:
    from ballast.bench.compile import main

    with pytest.raises(SystemExit) if argv[0] == "--batches" else nullcontext():
        assert main(argv) == 2


def test_bench_goal_needs_every_model_at_every_goal_batch() -> None:
    from ballast.bench.compile import Row, goal_check

    def row(model: str, batch: int, speedup: float) -> Row:
        return Row(model, "onnxruntime", batch, 0.1, 0.2, speedup, 1.0, 0.0, 1)

    rows = [row("a", 1, 3.0), row("a", 64, 2.0), row("b", 1, 2.5), row("b", 64, 1.9)]
    assert not goal_check(rows, "onnxruntime", ["a", "b"])["met"]
    assert goal_check(rows, "onnxruntime", ["a"])["met"]
    assert not goal_check(rows[:1], "onnxruntime", ["a"])["met"], "a missing batch is not met"


def test_tensorrt_timing_cache_is_saved_best_effort_each_build_with_its_own_temp_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Review finding: every build wrote the same "<cache>.tmp"; two builds at once failed the
    # second one's compile (FileNotFoundError) after its engine was written, with no sidecar.
    # These helpers need no TensorRT; the build that calls them is untested here (no GPU).
    import threading

    from ballast.compile.tensorrt import _replace_with, _save_timing_cache

    cache = tmp_path / "shared" / "timing.cache"
    barrier = threading.Barrier(8)

    def save(i: int) -> None:
        barrier.wait()
        _save_timing_cache(cache, bytes([i]) * 1000)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = cache.read_bytes()
    assert len(data) == 1000 and len(set(data)) == 1, "one whole cache, not a mix"
    assert [p.name for p in cache.parent.iterdir()] == ["timing.cache"], "no temp files left"
    # A folder that cannot be written: a warning, never an error.
    blocker = tmp_path / "ro"
    blocker.write_text("")
    with caplog.at_level("WARNING"):
        _save_timing_cache(blocker / "timing.cache", b"x")
    assert any("not saved" in r.getMessage() for r in caplog.records)
    _replace_with(tmp_path / "f", b"1")
    assert (tmp_path / "f").read_bytes() == b"1"


def test_bench_compile_names_a_backend_that_fails_parity_and_still_measures_eager(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ballast.compile
    from ballast.bench.compile import main

    def fails(*args: object, **kw: object) -> None:
        raise ParityError("max rel err 1 exceeds rtol 1e-4 (stand-in)")

    monkeypatch.setattr(ballast.compile, "check_parity", fails)
    argv = ["--models", "tabular-mlp", "--backends", "onnxruntime", "--batches", "1"]
    argv += ["--rounds", "1", "--min-time", "0.01", "--epochs", "1", "--json"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert {r["backend"] for r in summary["rows"]} == {"eager"}
    assert summary["failed"] == {
        "tabular-mlp/onnxruntime": "max rel err 1 exceeds rtol 1e-4 (stand-in)"
    }
    assert "tabular-mlp/onnxruntime FAILED" in captured.err

"""Export → compile → load → parity → benchmark, as one call that returns a typed result."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ballast.compile.backends import BackendName, ModuleCompileBackend, select_backend
from ballast.compile.bench import BenchReport, benchmark, benchmark_eager, torch_threads
from ballast.compile.onnx_export import MAX_EXPORT_BATCH, export_onnx
from ballast.compile.parity import ParityReport, check_parity
from ballast.compile.probe import NATIVE_BACKENDS, probe_load
from ballast.errors import CompileError
from ballast.hashing import sha256_file
from ballast.runtime import load_predictor

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"


@dataclass(frozen=True)
class CompiledArtifact:
    backend: str
    path: Path
    sha256: str
    onnx_path: Path
    onnx_sha256: str
    precision: str
    parity: ParityReport
    bench: BenchReport
    eager_bench: BenchReport
    #: Files beside ``path`` that loading it needs (TensorRT's sidecar); registered with it.
    companions: tuple[Path, ...] = ()

    def metrics(self) -> dict[str, float]:
        """Flat float metrics for the tracking store (names stable across runs)."""
        p = self.parity
        m: dict[str, float] = {
            "parity_max_abs_err": p.max_abs_err,
            "parity_max_rel_err": p.max_rel_err,
            "parity_rtol": p.rtol,
            "parity_n_rows": float(p.n_rows),
            "parity_n_random": float(p.n_random),
        }
        for prefix, report in (("bench", self.bench), ("eager", self.eager_bench)):
            for t in report.timings:
                m[f"{prefix}_b{t.batch}_p50_ms"] = t.p50_ms
                m[f"{prefix}_b{t.batch}_p99_ms"] = t.p99_ms
                m[f"{prefix}_b{t.batch}_samples_per_s"] = t.samples_per_s
        for t in self.bench.timings:
            if t.batch in self.eager_bench.batches and t.p50_ms > 0:
                m[f"speedup_b{t.batch}_vs_eager"] = (
                    self.eager_bench.for_batch(t.batch).p50_ms / t.p50_ms
                )
        return m


def compile_model(
    model: torch.nn.Module,
    example_rows: np.ndarray,
    heldout_rows: np.ndarray,
    out_dir: Path,
    *,
    backend: BackendName = "auto",
    rtol_fp32: float,
    rtol_fp16: float = 1e-2,
    max_batch: int = 1024,
    bench_batches: tuple[int, ...] = (1, 64, 1024),
    intra_op_threads: int = 1,
    n_random: int = 256,
    bench_min_time_s: float = 0.2,
    seed: int = 0,
    probe_native: bool = True,
) -> CompiledArtifact:
    """Export ``model`` to ONNX in ``out_dir``, compile it, check parity, benchmark it.

    Raises :class:`ParityError` (before anything is returned) when the compiled artefact differs
    from eager PyTorch by more than the tolerance for its precision, and :class:`CompileError`
    when a step cannot run. The eager model is timed on the artefact's device (a copy is moved
    there if needed) and, for ONNX Runtime, with the same number of intra-op threads, so the
    speed-up compares like with like. ``probe_native``: open an AOTInductor or TensorRT artefact
    in a child first (:mod:`ballast.compile.probe`).
    """
    if not 1 <= max_batch <= MAX_EXPORT_BATCH:
        raise CompileError(f"max_batch must be within 1..{MAX_EXPORT_BATCH}, got {max_batch}")
    example_rows = np.asarray(example_rows, dtype=np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    chosen = select_backend(backend, intra_op_threads=intra_op_threads)
    onnx_path = export_onnx(model, example_rows, out_dir / ONNX_NAME)
    if isinstance(chosen, ModuleCompileBackend):
        artifact = chosen.compile_module(model, example_rows, out_dir, max_batch=max_batch)
    else:
        artifact = chosen.compile(onnx_path, out_dir, max_batch=max_batch)
    # Registration copies these by name next to the artefact, where its loader looks for them.
    companions = tuple(Path(p) for p in chosen.companion_files(artifact))
    misplaced = [str(p) for p in companions if p.parent != artifact.parent or not p.is_file()]
    if misplaced:
        raise CompileError(
            f"{chosen.name} names files its artefact needs that are not beside it: {misplaced}"
        )
    precision = chosen.precision
    if probe_native and chosen.name in NATIVE_BACKENDS:
        # Native code opens these: a crash there would take this process (the flow run) with
        # it, so a child opens the artefact first and a crash becomes a CompileError.
        probe_load(artifact, chosen.name, n_features=int(example_rows.shape[1]))
    predictor = load_predictor(artifact, chosen.name, intra_op_threads=intra_op_threads)

    rtol = rtol_fp16 if precision == "fp16" else rtol_fp32
    parity = check_parity(model, predictor, heldout_rows, rtol=rtol, n_random=n_random, seed=seed)
    log.info(
        "compiled %s (%s): parity max rel err %.2e <= %.0e",
        chosen.name,
        precision,
        parity.max_rel_err,
        rtol,
    )

    # Like with like: eager PyTorch is timed on the device the artefact runs on (GPU for
    # TensorRT and CUDA AOTInductor packages, CPU otherwise), whatever device the caller's model
    # lives on, and on CPU with the same number of intra-op threads as the artefact.
    device = "cuda" if chosen.name == "tensorrt" else str(getattr(predictor, "device", "cpu"))
    threads = intra_op_threads if device == "cpu" else None
    on_device = all(t.device.type == device for t in [*model.parameters(), *model.buffers()])
    eager_model = model if on_device else copy.deepcopy(model).to(device)
    n_features = int(example_rows.shape[1])
    # AOTInductor's CPU kernels use torch's (process-wide) thread pool: set it for the timing.
    with torch_threads(threads if chosen.name == "aotinductor" else None):
        bench = benchmark(
            predictor,
            n_features,
            bench_batches,
            min_time_s=bench_min_time_s,
            seed=seed,
            threads=threads,
        )
    eager = benchmark_eager(
        eager_model,
        n_features,
        bench_batches,
        min_time_s=bench_min_time_s,
        seed=seed,
        threads=threads,
    )
    return CompiledArtifact(
        backend=chosen.name,
        path=artifact,
        sha256=sha256_file(artifact),
        onnx_path=onnx_path,
        onnx_sha256=sha256_file(onnx_path),
        precision=precision,
        parity=parity,
        bench=bench,
        eager_bench=eager,
        companions=companions,
    )

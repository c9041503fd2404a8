"""Stage 4: export ONNX, compile with the selected backend, check parity, benchmark."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.compile import BackendName, CompiledArtifact, compile_model
from ballast.settings import get_settings
from ballast.training import TrainResult
from tasks.common import logger


@task(name="compile", cache_policy=NO_CACHE)
def compile_candidate(
    trained: TrainResult, out_dir: Path, backend: BackendName | None = None
) -> CompiledArtifact:
    """Compile with ``backend`` (default: the ``compile_backend`` setting; ``auto`` is TensorRT
    where it can run, else ONNX Runtime). A parity failure raises before anything is returned."""
    s = get_settings()
    compiled = compile_model(
        trained.model,
        trained.split.x_train[:8],
        trained.split.x_test,
        out_dir,
        backend=backend or s.compile_backend,
        rtol_fp32=s.parity_rtol_fp32,
        rtol_fp16=s.parity_rtol_fp16,
        # At least 2: a dynamic batch axis needs it (AOTInductor refuses 1), and
        # BALLAST_BENCH_BATCHES='[1]' is a valid setting.
        max_batch=max(2, *s.bench_batches),
        bench_batches=s.bench_batches,
    )
    speedups = {
        t.batch: compiled.eager_bench.for_batch(t.batch).p50_ms / t.p50_ms
        for t in compiled.bench.timings
        if t.p50_ms > 0
    }
    logger().info(
        "stage=compile backend=%s parity_max_rel_err=%.2e sha256=%s speedup_vs_eager=%s",
        compiled.backend,
        compiled.parity.max_rel_err,
        compiled.sha256[:12],
        " ".join(f"b{b}:{x:.2f}x" for b, x in speedups.items()),
    )
    return compiled

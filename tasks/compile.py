"""Stage 4: export ONNX, compile with the selected backend, check parity, benchmark."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.compile import CompiledArtifact, compile_model
from ballast.settings import get_settings
from ballast.training import TrainResult
from tasks.common import logger


@task(name="compile", cache_policy=NO_CACHE)
def compile_candidate(trained: TrainResult, out_dir: Path) -> CompiledArtifact:
    s = get_settings()
    compiled = compile_model(
        trained.model,
        trained.split.x_train[:8],
        trained.split.x_test,
        out_dir,
        backend=s.compile_backend,
        rtol_fp32=s.parity_rtol_fp32,
        rtol_fp16=s.parity_rtol_fp16,
        max_batch=max(s.bench_batches),
        bench_batches=s.bench_batches,
    )
    logger().info(
        "stage=compile backend=%s parity_max_rel_err=%.2e sha256=%s",
        compiled.backend,
        compiled.parity.max_rel_err,
        compiled.sha256[:12],
    )
    return compiled

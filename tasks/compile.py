"""Stage 4: export ONNX, compile with the selected backend, check parity, benchmark."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from ballast.compile import BackendName, CompiledArtifact, compile_model, relative_cost
from ballast.compile.bench import torch_threads
from ballast.cost import CostDecision, judge_cost
from ballast.errors import BallastError, CostGateFailed, RegistryUnreachable
from ballast.release import TAG_ARTIFACT_SHA
from ballast.runtime import load_predictor
from ballast.settings import get_settings
from ballast.training import TrainResult
from model_registry import CHAMPION
from tasks.common import logger, registry


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
        probe_native=s.native_load_probe,
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


@task(name="cost-gate", cache_policy=NO_CACHE)
def cost_gate(compiled: CompiledArtifact, n_features: int) -> CostDecision:
    """Stop the release before registration when the compiled candidate costs more than
    ``cost_max_ratio`` times the champion's time per call at any benchmarked batch size, both
    measured side by side here (:func:`ballast.compile.relative_cost`): raises
    :class:`CostGateFailed` with the decision. The champion's artefact is fetched and verified as
    the canary does. A champion this machine cannot run (its backend missing) is not compared:
    the decision says so and passes."""
    from tasks.canary import version_spec  # the canary's fetch-and-verify, shared

    s = get_settings()
    log = logger()
    champion = None
    if s.cost_max_ratio is not None:
        reg = registry(s)
        champion = reg.get_by_alias(s.model_name, CHAMPION)
    if champion is None:
        decision = judge_cost({}, s.cost_max_ratio, None)
    elif champion.tags.get(TAG_ARTIFACT_SHA) == compiled.sha256:
        decision = judge_cost({b: 1.0 for b in s.bench_batches}, s.cost_max_ratio, champion.version)
    else:
        why = None
        ratios: dict[int, float] = {}
        try:
            spec = version_spec(reg, s, champion)
            theirs = load_predictor(Path(spec.artifact_path), spec.backend)
        except RegistryUnreachable:
            raise  # the registration right after would fail too: not a reason to skip the gate
        except (ImportError, OSError, RuntimeError, BallastError) as exc:
            # A TensorRT champion on a machine without TensorRT: nothing to measure here. A
            # champion that no longer verifies must not block the release that replaces it
            # (the canary verifies what it serves); the log says so.
            why = f"its artefact could not be opened here ({type(exc).__name__}: {exc})"
        else:
            width = getattr(theirs, "n_features", None)
            if width is not None and width != n_features:
                why = f"it takes {width} features, the candidate {n_features}"
            else:
                ours = load_predictor(compiled.path, compiled.backend)
                # One intra-op thread on both sides, as ONNX Runtime sessions are opened: an
                # AOTInductor package otherwise runs on every core of torch's pool.
                with torch_threads(1):
                    ratios = relative_cost(ours, theirs, n_features, tuple(s.bench_batches))
        decision = judge_cost(ratios, s.cost_max_ratio, champion.version, not_compared=why)
    log.info(
        "stage=cost passed=%s compared=%s champion=%s %s",
        decision.passed,
        decision.compared,
        decision.champion_version,
        " ".join(f"b{b}:{r:.2f}x" for b, r in decision.ratios.items()) or decision.reasons[0],
    )
    if not decision.passed:
        raise CostGateFailed("; ".join(decision.reasons), decision)
    return decision

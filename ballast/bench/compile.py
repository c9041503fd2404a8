"""``ballast bench compile``: eager PyTorch vs every available compile backend, side by side.

For each default model (``tabular-mlp`` on breast-cancer, ``small-cnn`` on digits) it trains
briefly (speed does not depend on the weights; parity uses the real held-out rows), exports ONNX
once, builds each available backend, checks parity, then times eager and every backend at each
batch size on the very same input array, in the same process, with the same number of intra-op
threads. Measurements alternate (eager, backend 1, backend 2, ... per batch) for ``--rounds``
rounds and the median of the rounds' medians is reported, so load drift on a shared machine hits
all runtimes alike.

    ballast bench compile [--models tabular-mlp,small-cnn] [--backends all] [--batches 1,64,1024]
                          [--threads 1] [--rounds 3] [--min-time 0.3] [--json]

Prints a table per model and, with ``--json``, one JSON object on the last line: rows of model,
backend, batch, median latency (ms), speed-up vs eager; the backend ``auto`` picks on this machine;
and whether it reaches 2× eager at batch 1 and 64.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODELS = ("tabular-mlp", "small-cnn")
ALL_BACKENDS = ("onnxruntime", "aotinductor", "tensorrt")
GOAL_SPEEDUP = 2.0
GOAL_BATCHES = (1, 64)


@dataclass(frozen=True)
class Row:
    model: str
    backend: str
    batch: int
    p50_ms: float
    p99_ms: float
    speedup_vs_eager: float
    samples_per_s: float
    parity_max_rel_err: float | None
    threads: int


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ballast bench compile", description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument(
        "--backends",
        default="all",
        help="comma-separated subset of onnxruntime,aotinductor,tensorrt; 'all' = those available",
    )
    ap.add_argument("--batches", type=_csv_ints, default=(1, 64, 1024))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs before compiling")
    ap.add_argument("--json", action="store_true", help="one JSON object on the last line")
    return ap


def _backend_objects(names: list[str], threads: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The backends to run (name → object) and the skipped ones (name → reason)."""
    from ballast.compile import AOTInductorBackend, OnnxRuntimeBackend, TensorRTBackend

    candidates: dict[str, Any] = {
        "onnxruntime": OnnxRuntimeBackend(intra_op_threads=threads),
        # CPU here: eager is timed on CPU (benchmarks/gpu_check.py covers CUDA packages).
        "aotinductor": AOTInductorBackend(device="cpu"),
        "tensorrt": TensorRTBackend(),
    }
    run, skipped = {}, {}
    for name in names:
        backend = candidates[name]
        reason = (
            backend.unavailable_reason()
            if hasattr(backend, "unavailable_reason")
            else (None if backend.available() else "not installed")
        )
        if reason is None:
            run[name] = backend
        else:
            skipped[name] = reason
    return run, skipped


def _build(
    backend: Any, model: Any, onnx_path: Path, example: np.ndarray, out: Path, max_batch: int
) -> Path:
    from ballast.compile import ModuleCompileBackend

    if isinstance(backend, ModuleCompileBackend):
        return backend.compile_module(model, example, out, max_batch=max_batch)
    return Path(backend.compile(onnx_path, out, max_batch=max_batch))


def run_model(
    model_name: str,
    backends: dict[str, Any],
    *,
    batches: tuple[int, ...],
    threads: int,
    rounds: int,
    min_time_s: float,
    epochs: int,
    workdir: Path,
    log: Any,
    failed: dict[str, str] | None = None,
) -> list[Row]:
    """Rows for eager and every backend of ``backends`` on ``model_name``. A backend that
    cannot be built, opened or checked is left out and named in ``failed`` (name → why); the
    others are still measured."""
    from ballast.compile import benchmark, benchmark_eager, check_parity, export_onnx
    from ballast.compile.bench import torch_threads
    from ballast.compile.probe import NATIVE_BACKENDS, probe_load
    from ballast.datasets_extra import bundled_dataset
    from ballast.errors import BallastError
    from ballast.models import get_spec
    from ballast.runtime import load_predictor
    from ballast.training import train

    spec = get_spec(model_name)
    ds = bundled_dataset(spec.default_dataset)  # type: ignore[arg-type]  # names match by design
    with torch_threads(threads):
        trained = train(
            ds,
            model=model_name,
            epochs=epochs,
            learning_rate=3e-3,
            batch_size=64,
            seed=0,
            device="cpu",
        )
    model = trained.model.to("cpu").eval()
    n_features = int(ds.features.shape[1])
    max_batch = max(max(batches), 2)
    example = trained.split.x_train[:8]
    out = workdir / model_name
    onnx_path = export_onnx(model, example, out / "model.onnx", max_batch=max_batch)

    predictors: dict[str, Any] = {}
    parity: dict[str, float] = {}
    for name, backend in backends.items():
        t0 = time.perf_counter()
        try:
            artifact = _build(backend, model, onnx_path, example, out / name, max_batch)
            if name in NATIVE_BACKENDS:  # a crash in its native loader: a CompileError here
                probe_load(artifact, name, n_features=n_features)
            predictor = load_predictor(artifact, name, intra_op_threads=threads)
            rtol = 1e-2 if getattr(backend, "precision", "fp32") == "fp16" else 1e-4
            parity[name] = check_parity(
                model, predictor, trained.split.x_test, rtol=rtol
            ).max_rel_err
        except Exception as exc:  # one backend must not stop the rest: named, and exit 1
            why = exc.message if isinstance(exc, BallastError) else f"{type(exc).__name__}: {exc}"
            if failed is not None:
                failed[f"{model_name}/{name}"] = why
            log(f"{model_name}: {name} failed: {why}")
            continue
        predictors[name] = predictor
        log(f"{model_name}: built {name} in {time.perf_counter() - t0:.1f} s")

    # TensorRT runs on the GPU: it is compared with eager PyTorch on the GPU, the rest with CPU.
    eagers = {"eager": model}
    if "tensorrt" in predictors:
        eagers["eager-cuda"] = copy.deepcopy(model).to("cuda")
    reference = {name: "eager-cuda" if name == "tensorrt" else "eager" for name in predictors}

    # median over rounds of each measurement's median; p99 as the worst round's p99
    p50: dict[tuple[str, int], list[float]] = {}
    p99: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for b in batches:
            # seed=b: every runtime gets the very same input array for this batch size
            timings = {
                name: benchmark_eager(
                    m, n_features, (b,), min_time_s=min_time_s, seed=b, threads=threads
                ).timings[0]
                for name, m in eagers.items()
            }
            for name, predictor in predictors.items():
                # AOTInductor's CPU kernels use torch's thread pool; ORT has its own.
                with torch_threads(threads):
                    timings[name] = benchmark(
                        predictor, n_features, (b,), min_time_s=min_time_s, seed=b
                    ).timings[0]
            for name, t in timings.items():
                p50.setdefault((name, b), []).append(t.p50_ms)
                p99.setdefault((name, b), []).append(t.p99_ms)
        log(f"{model_name}: round {r + 1}/{rounds} done")

    rows = []
    for name in [*eagers, *predictors]:
        for b in batches:
            med = statistics.median(p50[(name, b)])
            eager = statistics.median(p50[(reference.get(name, name), b)])
            rows.append(
                Row(
                    model=model_name,
                    backend=name,
                    batch=b,
                    p50_ms=round(med, 5),
                    p99_ms=round(max(p99[(name, b)]), 5),
                    speedup_vs_eager=round(eager / med, 3) if med > 0 else float("nan"),
                    samples_per_s=round(b / (med / 1e3), 1) if med > 0 else float("nan"),
                    parity_max_rel_err=parity.get(name),
                    threads=threads,
                )
            )
    return rows


def _table(rows: list[Row], model: str) -> Any:
    from rich.table import Table

    table = Table(title=f"{model}: median latency per call (numpy in, numpy out)")
    for col in ("backend", "batch", "p50 ms", "p99 ms", "samples/s", "vs eager", "parity"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in rows:
        if r.model != model:
            continue
        table.add_row(
            r.backend,
            str(r.batch),
            f"{r.p50_ms:.4f}",
            f"{r.p99_ms:.4f}",
            f"{r.samples_per_s:,.0f}",
            f"{r.speedup_vs_eager:.2f}×",
            "-" if r.parity_max_rel_err is None else f"{r.parity_max_rel_err:.1e}",
        )
    return table


def goal_check(rows: list[Row], backend: str, models: list[str]) -> dict[str, Any]:
    """Does ``backend`` reach GOAL_SPEEDUP× eager at the goal batches for every model?"""
    found = {
        f"{r.model}/b{r.batch}": r.speedup_vs_eager
        for r in rows
        if r.backend == backend and r.batch in GOAL_BATCHES
    }
    wanted = [f"{m}/b{b}" for m in models for b in GOAL_BATCHES]
    met = all(found.get(k, 0.0) >= GOAL_SPEEDUP for k in wanted)
    return {"backend": backend, "target": GOAL_SPEEDUP, "speedups": found, "met": met}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    from ballast.errors import BallastError
    from ballast.models import MODELS

    out = Console()
    err = Console(stderr=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        err.print(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
        return 2
    wanted = list(ALL_BACKENDS) if args.backends == "all" else args.backends.split(",")
    bad = [b for b in wanted if b not in ALL_BACKENDS]
    if bad:
        err.print(f"unknown backend(s) {bad}; known: {list(ALL_BACKENDS)}")
        return 2
    if args.threads < 1 or args.rounds < 1 or args.min_time <= 0 or args.epochs < 1:
        err.print("--threads, --rounds and --epochs must be >= 1 and --min-time > 0")
        return 2

    import onnxruntime
    import torch

    from ballast.compile import select_backend

    backends, skipped = _backend_objects(wanted, args.threads)
    for name, reason in skipped.items():
        err.print(f"[yellow]skipping {name}[/]: {reason}")
    chosen = select_backend("auto", intra_op_threads=args.threads).name
    started = time.perf_counter()
    rows: list[Row] = []
    failed: dict[str, str] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="ballast-bench-compile-") as tmp:
            for model in models:
                rows += run_model(
                    model,
                    backends,
                    batches=args.batches,
                    threads=args.threads,
                    rounds=args.rounds,
                    min_time_s=args.min_time,
                    epochs=args.epochs,
                    workdir=Path(tmp),
                    log=lambda msg: err.print(msg, style="dim", markup=False),
                    failed=failed,
                )
    except BallastError as exc:
        err.print(f"[red]{exc}[/]")
        return 1

    for model in models:
        out.print(_table(rows, model))
    goal = goal_check(rows, chosen, models)
    verdict = "met" if goal["met"] else "NOT met"
    out.print(
        f"auto picks [bold]{chosen}[/] here; goal ≥{GOAL_SPEEDUP:g}× eager at batch "
        f"{' and '.join(map(str, GOAL_BATCHES))}: {verdict} "
        + ", ".join(f"{k} {v:.2f}×" for k, v in goal["speedups"].items())
    )
    if args.json:
        summary = {
            "bench": "compile",
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "threads": args.threads,
            "rounds": args.rounds,
            "min_time_s": args.min_time,
            "chosen_backend": chosen,
            "skipped": skipped,
            "failed": failed,
            "goal": goal,
            "seconds": round(time.perf_counter() - started, 1),
            "rows": [asdict(r) for r in rows],
        }
        sys.stdout.write(json.dumps(summary) + "\n")
    for what, why in failed.items():
        err.print(f"{what} FAILED: {why}", markup=False, soft_wrap=True)
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

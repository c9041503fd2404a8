"""Eager PyTorch vs the ONNX Runtime artefact, measured side by side in one process.

Builds the production-shaped MLP (30 → 256 → 256 → 2, normalisation buffers inside) with random
weights (nothing is trained: speed does not depend on the weights), exports it, compiles it with
the ONNX Runtime backend, checks parity, then times both at each batch size, one right after the
other, with the same number of intra-op threads.

    .venv/bin/python benchmarks/compile_bench.py [--threads 1] [--min-time 1.0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ballast.compile import OnnxRuntimeBackend, benchmark, benchmark_eager, export_onnx
from ballast.compile.bench import BatchTiming
from ballast.compile.parity import check_parity
from ballast.runtime import load_predictor

N_FEATURES, HIDDEN, N_CLASSES = 30, 256, 2


class MLP(torch.nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(N_FEATURES))
        self.register_buffer("std", torch.rand(N_FEATURES) + 0.5)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(N_FEATURES, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, N_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _us(ms: float) -> str:
    return f"{ms * 1e3:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for both runtimes")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per cell")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    args = ap.parse_args()

    console = Console()
    if not console.is_terminal:  # piped: rich assumes 80 columns, too narrow for the table
        console = Console(width=110)
    torch.manual_seed(0)
    model = MLP().eval()
    rows = np.random.default_rng(0).standard_normal((512, N_FEATURES)).astype(np.float32)

    with tempfile.TemporaryDirectory(prefix="ballast-bench-") as tmp:
        onnx_path = export_onnx(model, rows[:8], Path(tmp) / "model.onnx")
        artifact = OnnxRuntimeBackend(intra_op_threads=args.threads).compile(
            onnx_path, Path(tmp), max_batch=max(args.batches)
        )
        predictor = load_predictor(artifact, "onnxruntime", intra_op_threads=args.threads)
        parity = check_parity(model, predictor, rows, rtol=1e-4)

        # One batch size at a time, eager then ORT back to back, so drift hits both alike.
        pairs: list[tuple[BatchTiming, BatchTiming]] = []
        for b in args.batches:
            eager = benchmark_eager(
                model, N_FEATURES, (b,), min_time_s=args.min_time, threads=args.threads
            )
            ort = benchmark(predictor, N_FEATURES, (b,), min_time_s=args.min_time)
            pairs.append((eager.timings[0], ort.timings[0]))

    table = Table(
        title=f"MLP {N_FEATURES}→{HIDDEN}→{HIDDEN}→{N_CLASSES}, {args.threads} intra-op thread(s), "
        f"torch {torch.__version__}",
        caption="latency in µs, throughput in samples/s, speed-up = eager p50 / ORT p50",
    )
    for col in (
        "batch",
        "eager p50",
        "eager p99",
        "eager /s",
        "ORT p50",
        "ORT p99",
        "ORT /s",
        "speed-up",
    ):
        table.add_column(col, justify="right")
    for eager_t, ort_t in pairs:
        table.add_row(
            str(eager_t.batch),
            _us(eager_t.p50_ms),
            _us(eager_t.p99_ms),
            f"{eager_t.samples_per_s:,.0f}",
            _us(ort_t.p50_ms),
            _us(ort_t.p99_ms),
            f"{ort_t.samples_per_s:,.0f}",
            f"{eager_t.p50_ms / ort_t.p50_ms:.2f}×",
        )
    console.print(table)
    console.print(
        f"parity: max relative error {parity.max_rel_err:.2e} (limit 1e-4) on "
        f"{parity.n_rows} rows + {parity.n_random} random rows"
    )


if __name__ == "__main__":
    main()

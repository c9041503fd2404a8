"""Data-parallel training throughput: 1 vs N processes under torchrun, side by side in one run.

Every configuration goes through the same launcher (``ballast.distributed.train_data_parallel``:
torchrun, one process per rank, gloo on CPU, nccl + bf16 autocast on CUDA), one after another on
the same synthetic data (rows drawn around the bundled breast-cancer data's per-feature mean and
spread, labels from a fixed random linear rule), so the ratios are comparable. Usage, from the
repository root (where ballast is not installed, prefix ``PYTHONPATH=.``):

    python benchmarks/ddp_bench.py --nproc 1,2 --rows 200000 --epochs 3 --json
    python benchmarks/ddp_bench.py --nproc 1,2,4,8 --device cuda --rows 2000000 --batch-size 8192

``epoch_samples_per_s`` (the steady state, behind ``speedup_vs_first``) is rows fitted per second
from the end of epoch 1 to the end of the last epoch, timed by when rank 0's per-epoch lines
arrive (use ``--epochs`` >= 3); ``train_samples_per_s`` counts all of rank 0's ``train()`` (split,
process-group and DDP set-up included); ``wall_samples_per_s`` the whole launch (interpreter
start and imports included). ``--batch-size`` is the global batch: each of N ranks takes 1/N of it per step. On CPU
each process gets ``cores // N`` torch threads unless ``--threads`` says otherwise.

Imports only the standard library, numpy, scikit-learn, torch and ballast's plain modules.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def synthetic(rows: int, seed: int = 0) -> Any:
    from sklearn.datasets import load_breast_cancer

    from ballast.data import ValidatedDataset

    feats = load_breast_cancer().data.astype(np.float32)
    rng = np.random.default_rng(seed)
    mean, std = feats.mean(0), feats.std(0)
    x = (rng.standard_normal((rows, feats.shape[1])) * std + mean).astype(np.float32)
    w = rng.standard_normal(feats.shape[1]).astype(np.float32)
    y = (((x - mean) / std) @ w > 0).astype(np.int64)
    names = tuple(f"f{i}" for i in range(feats.shape[1]))
    return ValidatedDataset("synthetic", x, y, names, "0" * 64, rows, ())


def main() -> None:
    from ballast.distributed import Topology, threads_per_process, train_data_parallel

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nproc", default="1,2", help="process counts to compare, e.g. 1,2")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024, help="global batch")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: share)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration (best kept)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    ds = synthetic(args.rows)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        for n in counts:
            threads = args.threads or threads_per_process(n, os.cpu_count())
            best: dict[str, Any] | None = None
            for _ in range(max(1, args.repeats)):
                arrivals: list[float] = []

                def on_line(line: str, arrivals: list[float] = arrivals) -> None:
                    # Rank 0 prints one line per epoch, flushed: its arrival time is the epoch's end.
                    if line.startswith("stage=train rank=0") and " epoch=" in line:
                        arrivals.append(time.perf_counter())

                t = time.perf_counter()
                r = train_data_parallel(
                    ds,
                    topology=Topology(n),
                    work_dir=Path(tmp),
                    epochs=args.epochs,
                    learning_rate=1e-3,
                    batch_size=args.batch_size,
                    seed=0,
                    model="tabular-mlp",
                    hidden=args.hidden,
                    device=args.device,
                    patience=None,
                    threads=threads,
                    timeout_s=args.timeout,
                    on_line=on_line,
                )
                wall = time.perf_counter() - t
                fitted = int(r.params["n_train"]) * len(r.history)
                steady = (
                    round(
                        int(r.params["n_train"])
                        * (len(arrivals) - 1)
                        / (arrivals[-1] - arrivals[0])
                    )
                    if len(arrivals) > 1
                    else None
                )
                row = {
                    "nproc": n,
                    "device": r.device,
                    "bf16": r.params["bf16"],
                    "threads_per_process": threads if args.device == "cpu" else None,
                    "rows": args.rows,
                    "epochs": len(r.history),
                    "global_batch": args.batch_size,
                    "train_s": round(r.seconds, 3),
                    "wall_s": round(wall, 3),
                    "epoch_samples_per_s": steady,
                    "train_samples_per_s": round(fitted / r.seconds),
                    "wall_samples_per_s": round(fitted / wall),
                    "accuracy": round(r.metrics["accuracy"], 4),
                }
                if best is None or row["train_s"] < best["train_s"]:
                    best = row
            assert best is not None
            results.append(best)
    key = "epoch_samples_per_s" if results[0]["epoch_samples_per_s"] else "train_samples_per_s"
    for row in results:
        row["speedup_vs_first"] = round((row[key] or 0) / results[0][key], 3)
    info = {"cpu_count": os.cpu_count(), "results": results}
    if args.json:
        print(json.dumps(info))
        return
    print(f"cpu_count={info['cpu_count']}")
    for row in results:
        print(
            f"nproc={row['nproc']} device={row['device']} bf16={row['bf16']} "
            f"threads/proc={row['threads_per_process']} train_s={row['train_s']} "
            f"wall_s={row['wall_s']} samples/s: steady {row['epoch_samples_per_s']} "
            f"train {row['train_samples_per_s']} wall {row['wall_samples_per_s']} "
            f"speedup={row['speedup_vs_first']} "
            f"accuracy={row['accuracy']}"
        )


if __name__ == "__main__":
    main()

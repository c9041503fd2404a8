"""Training throughput: samples/s of ``ballast.training.train`` per device and precision.

Runs the real training function on a synthetic tabular dataset (rows drawn around the bundled
breast-cancer data's per-feature mean and spread, labels from a fixed random linear rule), so the
figure is about the training loop, not the data. Every configuration runs in the same process,
one after another, so ratios are comparable. Usage:

    python benchmarks/train_bench.py --rows 200000 --epochs 3 --batch-size 1024 [--devices cpu,cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def synthetic(rows: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from ballast.data import ValidatedDataset, bundled_frame

    frame = bundled_frame()
    feats = frame.drop(columns=["label"]).to_numpy(dtype=np.float32)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, feats.shape[1])) * feats.std(0) + feats.mean(0)).astype(
        np.float32
    )
    w = rng.standard_normal(feats.shape[1]).astype(np.float32)
    y = (((x - feats.mean(0)) / feats.std(0)) @ w > 0).astype(np.int64)
    names = tuple(c for c in frame.columns if c != "label")
    return ValidatedDataset("synthetic", x, y, names, "0" * 64, rows, ())


def main() -> None:
    import torch

    from ballast.training import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    ds = synthetic(args.rows)
    results = []
    for device in args.devices.split(","):
        # Warm-up: one short run so CUDA context and kernels are not in the timed figure.
        train(
            ds,
            hidden=args.hidden,
            epochs=1,
            learning_rate=1e-3,
            batch_size=args.batch_size,
            seed=0,
            device=device,
        )
        t = time.perf_counter()
        r = train(
            ds,
            hidden=args.hidden,
            epochs=args.epochs,
            learning_rate=1e-3,
            batch_size=args.batch_size,
            seed=0,
            device=device,
        )
        secs = time.perf_counter() - t
        n_train = int(r.params["n_train"])
        results.append(
            {
                "device": device,
                "bf16": r.params["bf16"],
                "rows": args.rows,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "seconds": round(secs, 3),
                "train_samples_per_s": round(n_train * args.epochs / secs),
                "accuracy": round(r.metrics["accuracy"], 4),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    if torch.cuda.is_available():
        print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}))


if __name__ == "__main__":
    main()

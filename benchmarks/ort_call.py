"""What one ONNX Runtime call of the gateway's predictor costs, direct binding against the public call.

    .venv/bin/python benchmarks/ort_call.py                  # batches 1, 2, 16, 64; 20 blocks
    .venv/bin/python benchmarks/ort_call.py --batches 2 --blocks 60

``OnnxRuntimePredictor`` calls the session's compiled binding directly; ``InferenceSession.run``
first checks its feed in Python. Both run here on the same session, the MLP of ``ballast bench
serving``, in alternating blocks (so the machine's drift hits both alike), each block timing
``--calls`` calls with this thread's CPU clock. Reported per batch size: median microseconds
per call of each, and the median paired difference. Warm calls, back to back: in a serving
process, between requests, the same call costs about twice as much (``gateway_inproc.py``
reports the gateway's own moving average per version), and the difference stays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_call_us(call: Callable[[], object], calls: int) -> float:
    t = time.thread_time()
    for _ in range(calls):
        call()
    return (time.thread_time() - t) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", default="1,2,16,64", help="rows per call (1,2,16,64)")
    p.add_argument("--blocks", type=int, default=20, help="alternations per batch size (20)")
    p.add_argument("--calls", type=int, default=2000, help="calls per block (2000)")
    args = p.parse_args(argv)

    from ballast.bench.onnx_mlp import build_mlp_onnx
    from ballast.bench.serving import HIDDEN, N_FEATURES
    from ballast.runtime import OnnxRuntimePredictor

    with tempfile.TemporaryDirectory(prefix="ballast-ortcall-") as tmp:
        path = build_mlp_onnx(Path(tmp) / "mlp.onnx", seed=0, hidden=HIDDEN)
        direct = OnnxRuntimePredictor(path)
        public = OnnxRuntimePredictor(path)
        public._direct = None  # the same predictor through InferenceSession.run
        if direct._direct is None:
            raise SystemExit("this onnxruntime has no direct binding: nothing to compare")
        rng = np.random.default_rng(0)
        print(f"{'rows':>4}  {'direct us':>9}  {'public us':>9}  {'saved us/call':>13}")
        for rows in (int(b) for b in args.batches.split(",")):
            x = rng.standard_normal((rows, N_FEATURES), dtype=np.float32)
            times: dict[str, list[float]] = {"direct": [], "public": []}
            pair = [("direct", direct), ("public", public)]
            for block in range(args.blocks):
                for label, pred in pair if block % 2 == 0 else pair[::-1]:
                    times[label].append(per_call_us(partial(pred.predict, x), args.calls))
            saved = statistics.median(
                b - a for a, b in zip(times["direct"], times["public"], strict=True)
            )
            print(
                f"{rows:4d}  {statistics.median(times['direct']):9.2f}  "
                f"{statistics.median(times['public']):9.2f}  {saved:13.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

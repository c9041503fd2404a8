"""Would one ONNX Runtime call for both versions of a split be cheaper than two? (#8)

    .venv/bin/python benchmarks/ort_fused.py                 # champion 8 rows, canary 1 row
    .venv/bin/python benchmarks/ort_fused.py --rows 8,1 --blocks 40

A 90/10 split costs the gateway a second model call in most loop iterations (the canary's
rows), and that call's fixed part does not shrink with fewer rows. One remedy would be a
session holding both models side by side (two inputs, two outputs, the graphs merged with
prefixed names) called once per iteration. This measures it against what the gateway does,
side by side in alternating order, with this thread's CPU clock, on the MLP of ``ballast bench
serving`` (two seeds: two different sets of weights):

* ``champion``: the champion's call alone (an iteration with no canary rows);
* ``two calls``: the champion's call, then the canary's (what the gateway does);
* ``fused``: one call of the merged session with both inputs;
* ``fused, no canary``: the merged session with zero canary rows (an iteration without any).

Both sessions are called through the compiled binding, as ``OnnxRuntimePredictor`` does.
Warm calls back to back: in a serving process between requests every call costs more, alike.

Not adopted by the gateway: in one call, a canary whose call fails fails the champion's rows of
the same call, so the judge, which compares the two versions' errors, would see the canary's
faults on both arms; and it saves little (0.3-0.4 us per request measured on 2026-11-29, of a
split's ~2 us). Slowness is shared either way: every request of a loop iteration already waits
for all of the iteration's batches (``benchmarks/canary_cost_visibility.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ort_call import per_call_us


def _fused(champion: Path, canary: Path, out: Path) -> Path:
    """Both graphs in one model: names prefixed, each input's batch axis its own dim_param (a
    shared one tells ORT's planner the two batches are the same size, and it warns per call)."""
    import onnx
    from onnx import compose, helper

    a = compose.add_prefix(onnx.load(str(champion)), "champion_")
    b = compose.add_prefix(onnx.load(str(canary)), "canary_")
    for value in [*b.graph.input, *b.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "canary_batch"
    graph = helper.make_graph(
        [*a.graph.node, *b.graph.node],
        "fused",
        [*a.graph.input, *b.graph.input],
        [*a.graph.output, *b.graph.output],
        initializer=[*a.graph.initializer, *b.graph.initializer],
    )
    model = helper.make_model(graph, opset_imports=a.opset_import)
    model.ir_version = a.ir_version
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def _binding(path: Path) -> Callable[..., list[np.ndarray]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as the gateway runs them
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    run: Callable[..., list[np.ndarray]] = session._sess.run
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="8,1", help="champion rows,canary rows per iteration (8,1)")
    p.add_argument("--blocks", type=int, default=20, help="alternations (20)")
    p.add_argument("--calls", type=int, default=2000, help="calls per block (2000)")
    args = p.parse_args(argv)
    n_champion, n_canary = (int(v) for v in args.rows.split(","))

    from ballast.bench.onnx_mlp import build_mlp_onnx
    from ballast.bench.serving import HIDDEN, N_FEATURES

    rng = np.random.default_rng(0)
    xa = rng.standard_normal((n_champion, N_FEATURES), dtype=np.float32)
    xb = rng.standard_normal((n_canary, N_FEATURES), dtype=np.float32)
    none = np.zeros((0, N_FEATURES), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="ballast-ortfused-") as tmp:
        a = build_mlp_onnx(Path(tmp) / "champion.onnx", seed=0, hidden=HIDDEN)
        b = build_mlp_onnx(Path(tmp) / "canary.onnx", seed=1, hidden=HIDDEN)
        run_a, run_b = _binding(a), _binding(b)
        run_f = _binding(_fused(a, b, Path(tmp) / "fused.onnx"))
        both = ["champion_logits", "canary_logits"]
        # The merged session answers what the two sessions answer.
        fa, fb = run_f(both, {"champion_input": xa, "canary_input": xb}, None)
        np.testing.assert_allclose(fa, run_a(["logits"], {"input": xa}, None)[0], rtol=1e-5)
        np.testing.assert_allclose(fb, run_b(["logits"], {"input": xb}, None)[0], rtol=1e-5)
        cases: dict[str, Callable[[], Any]] = {
            "champion": lambda: run_a(["logits"], {"input": xa}, None),
            "two calls": lambda: (
                run_a(["logits"], {"input": xa}, None),
                run_b(["logits"], {"input": xb}, None),
            ),
            "fused": lambda: run_f(both, {"champion_input": xa, "canary_input": xb}, None),
            "fused, no canary": lambda: run_f(
                both, {"champion_input": xa, "canary_input": none}, None
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        order = list(cases)
        for block in range(args.blocks):
            for label in order if block % 2 == 0 else order[::-1]:
                times[label].append(per_call_us(cases[label], args.calls))
    print(f"champion {n_champion} rows, canary {n_canary} rows; median us per iteration")
    base = times["two calls"]
    for label in order:
        diff = statistics.median(t - u for t, u in zip(times[label], base, strict=True))
        print(f"{label:>17}  {statistics.median(times[label]):8.2f}  ({diff:+.2f} vs two calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

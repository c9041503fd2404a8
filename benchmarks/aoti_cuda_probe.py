"""Which step of an AOTInductor CUDA package crashes, and how fast it is where it does not.

On a lent H200 (torch 2.11+cu130) loading the package that ``ballast.compile.aotinductor``
builds segfaulted inside ``aoti_load_package``. Each variant here runs in its own process (a
segfault ends only that one) with faulthandler on, so one run tells which change matters:

* ``plain``: export with a dynamic batch, package with no extra inductor configs, load and run
  in the same process;
* ``fresh``: load ``plain``'s package in a new process (no compile state around);
* ``meta``: like ``plain`` but with ``aot_inductor.metadata`` (what Ballast's backend sets).

Where a variant loads, it times eager, the package and CUDA-graph replay of eager at batch 1, 64
and 4096 (median of CUDA-event-timed calls). Needs only torch.

Result on the lent H200 (2026-11-27; torch 2.11.0+cu130, driver 580.159.04): all three variants
build, and all three die with SIGSEGV inside ``aoti_load_package`` (``pt2_archive/_package.py``
``_load_aoti``), ``fresh`` included: a three-layer ``nn.Sequential`` with no extra inductor
configs crashes the same way, so the crash is that torch build's, not Ballast's packaging. The
same script on CPU (torch 2.13) builds, loads and runs all variants. Usage::

    python benchmarks/aoti_cuda_probe.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import faulthandler, json, sys, time
faulthandler.enable()
import torch
from torch._inductor import aoti_compile_and_package, aoti_load_package

variant, pkg, iters, dev = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(30, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
    torch.nn.Linear(64, 2),
).to(dev).eval()
out = {"variant": variant, "torch": torch.__version__}

def step(name):
    print(f"STEP {name}", file=sys.stderr, flush=True)

if variant in ("plain", "meta"):
    x = torch.randn(8, 30, device=dev)
    batch = torch.export.Dim("batch", min=1, max=4096)
    configs = {}
    if variant == "meta":
        configs = {"aot_inductor.metadata": {"ballast.device": "cuda", "ballast.n_features": "30"}}
    step("export")
    with torch.no_grad():
        prog = torch.export.export(model, (x,), dynamic_shapes={"input": {0: batch}})
        t0 = time.perf_counter()
        step("compile")
        aoti_compile_and_package(prog, package_path=pkg, inductor_configs=configs)
        out["compile_s"] = round(time.perf_counter() - t0, 1)
    # the weights the package holds are the model's: save them for the fresh-process variant
    torch.save(model.state_dict(), pkg + ".state.pt")
else:
    model.load_state_dict(torch.load(pkg + ".state.pt"))

step("load")
runner = aoti_load_package(pkg)
step("run")
x1 = torch.randn(1, 30, device=dev)
with torch.inference_mode():
    got = runner(x1)
    want = model(x1)
got = got[0] if isinstance(got, (list, tuple)) else got
out["max_abs_err_b1"] = float((got - want).abs().max())
step("time")

def timed(fn):
    for _ in range(20):
        fn()
    ms = []
    for _ in range(iters):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize()
            ms.append(a.elapsed_time(b))
        else:
            t = time.perf_counter(); fn(); ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    return round(ms[len(ms) // 2], 5)

rows = []
for bsz in (1, 64, 4096):
    x = torch.randn(bsz, 30, device=dev)
    with torch.inference_mode():
        row = {
            "batch": bsz,
            "eager_ms": timed(lambda: model(x)),
            "aoti_ms": timed(lambda: runner(x)),
        }
        if dev == "cuda":
            side = torch.cuda.Stream(); side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    model(x)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                model(x)
            row["graph_ms"] = timed(g.replay)
            row["aoti_over_graph"] = round(row["aoti_ms"] / row["graph_ms"], 3)
    row["eager_over_aoti"] = round(row["eager_ms"] / row["aoti_ms"], 3)
    rows.append(row)
out["timings"] = rows
print("RESULT " + json.dumps(out), flush=True)
"""


def run_variant(
    variant: str, pkg: str, iters: int, timeout: float, device: str = "cuda"
) -> dict[str, object]:
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", CHILD, variant, pkg, str(iters), device],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout:.0f} s"}
    seconds = round(time.perf_counter() - started, 1)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "seconds": seconds}
    steps = [ln[5:] for ln in proc.stderr.splitlines() if ln.startswith("STEP ")]
    return {
        "variant": variant,
        "returncode": proc.returncode,
        "last_step": steps[-1] if steps else None,
        "stderr_tail": proc.stderr[-2500:],
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=150.0, help="per variant, seconds")
    ap.add_argument("--variants", default="plain,fresh,meta")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "plain.pt2")
        for variant in args.variants.split(","):
            pkg = os.path.join(tmp, "meta.pt2") if variant == "meta" else plain
            res = run_variant(variant, pkg, args.iters, args.timeout, args.device)
            results.append(res)
            print(json.dumps(res)[:3000], flush=True)
    if args.json:
        print(json.dumps({"probe": results}))
    return 0 if any("timings" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Gateway configurations side by side: alternating wrk rounds, median req/s and CPU/request.

    .venv/bin/python benchmarks/gateway_ab.py                       # 1 version vs 90/10 split
    .venv/bin/python benchmarks/gateway_ab.py --rounds 8 \\
        "loop: one" "threads: one --inline-below-us 0"             # any gateway arguments

Each configuration is ``"LABEL: one|split [gateway args...]"`` and runs as its own gateway
(``--workers`` replicas, the 30->256->256->2 MLP of ``ballast bench serving``), all started
before the first round. Rounds alternate between them (wrk, one thread, c=64, ``--seconds``
each), so slow drift of a shared machine hits every configuration alike; a single run minutes
apart can differ by +-20 % on these VMs. Reported per configuration: median req/s, median CPU
microseconds per request of all its gateway processes (from /proc: steadier than req/s), and
every round's req/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ballast.bench.onnx_mlp import build_mlp_onnx
from ballast.bench.procstat import cpu_ticks
from ballast.bench.serving import HIDDEN, _deploy, _gateway, _lua, _wrk, predict_body


def _tree_cpu_ticks(port: int) -> int:
    """Clock ticks of the gateway serving ``port`` (supervisor and replicas)."""
    out = subprocess.run(
        ["pgrep", "-f", f"infra.gateway.*--port {port}( |$)"], capture_output=True, text=True
    )
    return cpu_ticks(out.stdout.split())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="*", default=["one version: one", "90/10 split: split"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    tick = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory(prefix="ballast-ab-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model = build_mlp_onnx(work / "model.onnx", seed=0, hidden=HIDDEN)
        script = _lua(work / "predict.lua", predict_body())
        runs: list[tuple[str, str, int, list[float], list[float]]] = []
        for i, spec in enumerate(args.configs):
            label, _, rest = spec.partition(":")
            mode, *extra = rest.split()
            if mode not in ("one", "split"):
                p.error(f"{spec!r}: say 'one' or 'split' after the label")
            folder = work / f"c{i}"
            folder.mkdir()
            url, token = stack.enter_context(_gateway(folder, args.workers, extra))
            _deploy(url, token, "m", model, mode == "split")
            runs.append((label.strip(), url, int(url.rsplit(":", 1)[1]), [], []))
        for _, url, _, _, _ in runs:  # warm-up
            _wrk(f"{url}/v1/models/m/predict", script, 16, 2, "warm-up")
        for _ in range(args.rounds):
            for label, url, port, rps, cpu in runs:
                before = _tree_cpu_ticks(port)
                row = _wrk(f"{url}/v1/models/m/predict", script, 64, args.seconds, label)
                ticks = _tree_cpu_ticks(port) - before
                if row.errors:
                    raise SystemExit(f"{label}: {row.errors} failed requests")
                rps.append(row.rps)
                cpu.append(ticks / tick / max(1, round(row.rps * row.seconds)) * 1e6)
    print(f"{'configuration':32s} {'req/s':>8s} {'CPU us/req':>11s}  req/s per round")
    for label, _, _, rps, cpu in runs:
        rounds = " ".join(f"{r:,.0f}" for r in rps)
        print(
            f"{label:32s} {statistics.median(rps):8,.0f} {statistics.median(cpu):11.1f}  {rounds}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

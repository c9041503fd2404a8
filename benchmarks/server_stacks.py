"""Which HTTP server stack to put the gateway on: the same raw-ASGI predict app under each.

    .venv/bin/python benchmarks/server_stacks.py [--seconds 8] [--rounds 3] [--workers 2]
        [--granian-path DIR]     # a folder holding the granian package (pip install --target)

The app (``benchmarks/stack_app.py``) is the predict route reduced to what every stack must
do: read a batch-1 JSON body, parse it, run the 30->256->256->2 ONNX MLP (one ORT call per
request, no batching), answer JSON. Each stack runs it with ``--workers`` processes on
127.0.0.1; wrk (c=64) loads each in turn for ``--rounds`` alternating rounds, so
they share the machine's noise. Rows: median req/s, p99, and the server's CPU per request
(all its processes, from /proc), which is steadier than req/s on a noisy box.

Stacks: uvicorn (httptools + uvloop) as shipped; uvicorn with the gateway's head-holding
protocol (``infra/gateway/http.py``, one write per response); granian's ASGI interface (Rust
HTTP, where it is importable). A stack that cannot start is reported, not guessed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ballast.bench.onnx_mlp import build_mlp_onnx
from ballast.bench.procstat import cpu_ticks, cpu_us_per_request
from ballast.bench.serving import HIDDEN, _free_port, _lua, _wrk, predict_body

ROOT = Path(__file__).resolve().parents[1]

_UVICORN = (
    "import sys, uvicorn; uvicorn.run('stack_app:app', host='127.0.0.1', port=int(sys.argv[1]), "
    "workers=int(sys.argv[2]), http=sys.argv[3], loop='uvloop', access_log=False, "
    "log_level='warning', proxy_headers=False)"
)


def _stacks(workers: int, port: int) -> dict[str, list[str]]:
    py = sys.executable
    uv = [py, "-c", _UVICORN, str(port), str(workers)]
    return {
        "uvicorn (httptools, uvloop)": [*uv, "httptools"],
        "uvicorn + head-holding protocol": [*uv, "infra.gateway.http:CoalescingHttpToolsProtocol"],
        "granian (ASGI, Rust HTTP)": [
            *(py, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1"),
            *("--port", str(port), "--workers", str(workers), "--loop", "uvloop"),
            *("--no-ws", "--log-level", "warning", "stack_app:app"),
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--granian-path", default="", help="folder with the granian package")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ballast-stacks-"))
    model = build_mlp_onnx(tmp / "model.onnx", seed=0, hidden=HIDDEN)
    script = _lua(tmp / "predict.lua", predict_body())
    path = [str(ROOT / "benchmarks"), str(ROOT)]
    if args.granian_path:
        path.append(args.granian_path)
    env = {**os.environ, "STACK_MODEL": str(model), "PYTHONPATH": os.pathsep.join(path)}
    running: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    notes: list[str] = []
    for name in _stacks(args.workers, 0):
        port = _free_port()
        cmd = _stacks(args.workers, port)[name]
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=(tmp / f"{len(running)}.log").open("wb"),
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}/v1/models/m/predict"
        deadline = time.monotonic() + 60
        while True:
            try:
                if _wrk(url, script, 1, 1, name).errors == 0:
                    running[name] = (proc, url)
                    break
            except (ValueError, subprocess.TimeoutExpired):  # not listening yet
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                notes.append(f"{name}: did not start (log {tmp}/{len(running)}.log)")
                with contextlib.suppress(ProcessLookupError):  # it may have exited already
                    os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.5)
    results: dict[str, list[tuple[float, float, str]]] = {n: [] for n in running}
    try:
        for _ in range(args.rounds):
            for name, (proc, url) in running.items():
                before = cpu_ticks([proc.pid])
                row = _wrk(url, script, 64, args.seconds, name)
                ticks = cpu_ticks([proc.pid]) - before
                if row.errors:
                    raise SystemExit(f"{name}: {row.errors} failed requests")
                cpu_us = cpu_us_per_request(ticks, row.rps * row.seconds)
                results[name].append((row.rps, cpu_us, f"{row.p99_ms:.2f}ms"))
    finally:
        for proc, _ in running.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in running.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    print(f"{'stack':36s} {'req/s (median)':>15s} {'CPU us/req':>11s}  p99 per round")
    for name, rows in results.items():
        rps = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(f"{name:36s} {rps:15,.0f} {cpu:11.1f}  {' '.join(r[2] for r in rows)}")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

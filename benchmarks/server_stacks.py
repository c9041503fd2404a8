"""Which HTTP server stack to put the gateway on: the same raw-ASGI predict app under each.

    .venv/bin/python benchmarks/server_stacks.py [--seconds 8] [--rounds 3] [--workers 2]
        [--granian-path DIR]     # a folder holding the granian package (pip install --target)

The app (``benchmarks/stack_app.py``) is the predict route reduced to what every stack must
do: read a batch-1 JSON body, parse it, run the 30->256->256->2 ONNX MLP (one ORT call per
request, no batching), answer JSON. Each stack runs it with ``--workers`` processes on
127.0.0.1; wrk (2 threads, c=64) loads each in turn for ``--rounds`` alternating rounds, so
they share the machine's noise. Rows: median req/s, p99, and the server's CPU per request
(all its processes, from /proc), which is steadier than req/s on a noisy box.

Stacks: uvicorn (httptools + uvloop) as shipped; uvicorn with the gateway's head-holding
protocol (``infra/gateway/http.py``, one write per response); granian's ASGI interface (Rust
HTTP, where it is importable). A stack that cannot start is reported, not guessed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def _cpu(pid: int) -> int:
    """Clock ticks used by ``pid`` and its children (workers)."""
    total = 0
    pids = [str(pid)]
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    pids += out.split()
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def _wrk(url: str, script: Path, seconds: int) -> tuple[int, float, str]:
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    ).stdout
    n = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (n and rps and p99):
        raise RuntimeError(f"wrk: {out[-400:]}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"{bad.group(1)} failed responses")
    return int(n.group(1)), float(rps.group(1)), p99.group(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--granian-path", default="", help="folder with the granian package")
    args = p.parse_args(argv)

    from ballast.bench.onnx_mlp import build_mlp_onnx

    tmp = Path(tempfile.mkdtemp(prefix="ballast-stacks-"))
    model = build_mlp_onnx(tmp / "model.onnx", seed=0, hidden=(256, 256))
    body = '{"instances": [[' + ", ".join(str(round(0.01 * i, 3)) for i in range(30)) + "]]}"
    (tmp / "body.json").write_text(body)
    script = tmp / "predict.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.body = io.open("{tmp / "body.json"}"):read("a")\n'
    )
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
                _wrk(url, script, 1)
                running[name] = (proc, url)
                break
            except (RuntimeError, subprocess.TimeoutExpired):
                if proc.poll() is not None or time.monotonic() > deadline:
                    notes.append(f"{name}: did not start (log {tmp}/{len(running)}.log)")
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.5)
    results: dict[str, list[tuple[float, float, str]]] = {n: [] for n in running}
    try:
        for _ in range(args.rounds):
            for name, (proc, url) in running.items():
                before = _cpu(proc.pid)
                n, rps, p99 = _wrk(url, script, args.seconds)
                ticks = _cpu(proc.pid) - before
                results[name].append((rps, ticks / os.sysconf("SC_CLK_TCK") / n * 1e6, p99))
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

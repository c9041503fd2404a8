"""Throughput and latency of the serving gateway, as a real process on 127.0.0.1.

    .venv/bin/python benchmarks/gateway_bench.py                 # c=16, 3000 batch-1 requests
    .venv/bin/python benchmarks/gateway_bench.py --wrk           # plus wrk at c=64 (if installed)
    .venv/bin/python benchmarks/gateway_bench.py --url http://127.0.0.1:8765 --model NAME

Without ``--url`` it builds a 30->256->256->2 MLP (the shape of the peers' numbers in
notes/peers.md), starts a gateway in a temporary state folder, deploys the model as champion,
measures, and stops the gateway. Every phase is bounded in requests and time. On a 2-core box
the Python load generator shares the CPU with the gateway: its figure is a floor; wrk (C) loads
the server far less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

# Runnable as a script from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.serving import Deployment
from ballast.settings import Settings

console = Console()


@dataclass
class Result:
    tool: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _httpx_load(
    url: str, body: bytes, *, concurrency: int, requests: int, max_seconds: float
) -> Result:
    latencies: list[float] = []
    errors = 0
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"httpx c={concurrency}", total=requests)
        async with httpx.AsyncClient(timeout=10.0, limits=limits, trust_env=False) as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max_seconds

            async def worker() -> None:
                nonlocal issued, errors
                while issued < requests and loop.time() < deadline:
                    issued += 1
                    t = time.perf_counter()
                    try:
                        resp = await client.post(url, content=body, headers=headers)
                        ok = resp.status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    latencies.append(time.perf_counter() - t)
                    errors += 0 if ok else 1
                    progress.advance(task)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            seconds = time.perf_counter() - started
    lat = np.array(latencies) * 1e3
    return Result(
        "httpx (Python)",
        concurrency,
        len(latencies),
        errors,
        seconds,
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
    )


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def _wrk(url: str, body: bytes, *, connections: int, seconds: int, workdir: Path) -> Result | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        console.print("[yellow]wrk not found (apt-get install wrk); skipped[/]")
        return None
    (workdir / "body.json").write_bytes(body)
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.body = io.open("{workdir / "body.json"}"):read("a")\n'
        "function response(status, headers, body)\n"
        '  if status ~= 200 then error("status " .. status) end\n'
        "end\n"
    )
    cmd = [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url]
    with console.status(f"wrk c={connections} for {seconds} s"):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)s", out)
    p50 = re.search(r"50%\s+(\S+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    if not (total and p50 and p99):
        console.print(f"[red]could not parse wrk output:[/]\n{out}")
        return None
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Result(
        "wrk (C)",
        connections,
        int(total.group(1)),
        int(failed.group(1)) if failed else 0,
        float(total.group(2)),
        _ms(p50.group(1)),
        _ms(p99.group(1)),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="bench a running gateway (its model must already be deployed)")
    p.add_argument("--model", default="bench-mlp")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--hidden", default="256,256", help="hidden layer widths of the built MLP")
    p.add_argument("--wrk", action="store_true", help="also run wrk (closed loop)")
    p.add_argument("--wrk-connections", type=int, default=64)
    p.add_argument("--wrk-seconds", type=int, default=15)
    args = p.parse_args()

    body = json.dumps(
        {"instances": np.random.default_rng(0).standard_normal((1, 30)).round(6).tolist()}
    ).encode()
    with tempfile.TemporaryDirectory(prefix="ballast-bench-") as tmp:
        workdir = Path(tmp)
        gateway: GatewayProcess | None = None
        try:
            if args.url:
                base = args.url.rstrip("/")
            else:
                from infra.gateway.testing import build_mlp_onnx, spec_for

                hidden = tuple(int(h) for h in args.hidden.split(","))
                with console.status(f"exporting a 30->{args.hidden}->2 MLP to ONNX"):
                    artefact = build_mlp_onnx(workdir / "model.onnx", seed=0, hidden=hidden)
                settings = Settings(
                    state_dir=workdir / "state",
                    gateway_port=_free_port(),
                    gateway_admin_token=secrets.token_urlsafe(16),
                )
                with console.status("starting the gateway"):
                    gateway = GatewayProcess.start(
                        settings, log_path=workdir / "gateway.log", exit_with_parent=True
                    )
                base = settings.gateway_url
                with GatewayClient(base, settings.admin_token()) as admin:
                    admin.set_deployment(
                        Deployment(model=args.model, champion=spec_for(artefact, "1"))
                    )
            url = f"{base}/v1/models/{args.model}/predict"
            # Warm the connection pool and the server's code paths before measuring.
            asyncio.run(
                _httpx_load(url, body, concurrency=args.concurrency, requests=200, max_seconds=10)
            )
            results = [
                asyncio.run(
                    _httpx_load(
                        url,
                        body,
                        concurrency=args.concurrency,
                        requests=args.requests,
                        max_seconds=args.max_seconds,
                    )
                )
            ]
            if args.wrk:
                wrk = _wrk(
                    url,
                    body,
                    connections=args.wrk_connections,
                    seconds=args.wrk_seconds,
                    workdir=workdir,
                )
                if wrk is not None:
                    results.append(wrk)
        finally:
            if gateway is not None:
                gateway.stop()

    table = Table(title=f"gateway {url} (batch-1 JSON predict)")
    for col in (
        "load",
        "conns",
        "requests",
        "errors",
        "seconds",
        "req/s",
        "p50 ms",
        "p99 ms",
    ):
        table.add_column(col, justify="right" if col != "load" else "left")
    for r in results:
        table.add_row(
            r.tool,
            str(r.concurrency),
            str(r.requests),
            str(r.errors),
            f"{r.seconds:.2f}",
            f"{r.rps:,.0f}",
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
        )
    console.print(table)
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())

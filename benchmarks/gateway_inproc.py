"""The gateway's own CPU per request, one version against a 90/10 split, without HTTP.

    .venv/bin/python benchmarks/gateway_inproc.py                 # 60 blocks of 0.25 s each
    .venv/bin/python benchmarks/gateway_inproc.py --blocks 200 --clients 32

``benchmarks/gateway_ab.py`` measures whole replicas over TCP, where the kernel's loopback work,
the load generator and how the connections happen to spread over replicas move every round by
+-10 % on a shared 2-core VM: a cost of a few percent drowns. This drives two gateway apps
(one version; champion + canary at 10 %) in one process and one event loop (uvloop, as served)
through the same ASGI entry point uvicorn calls, with ``--clients`` concurrent callers each
sending the benchmark's batch-1 JSON body in a loop. Nothing but the app runs: no sockets, no
HTTP parser (the same for both). Blocks alternate between the two apps, and each block's CPU
time (this process, all threads) per request is compared with its neighbour's, so drift of the
machine cancels. Metrics are on, in multiprocess mode, as in a replica of a multi-worker gateway.

Reported: median app CPU microseconds per request of each, the split's median paired change
with quartiles, and rows per model call. Add the HTTP and kernel share (``gateway_ab.py``
reports the whole: about 80 us per request on this VM) to turn the difference into a share of
a replica's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def _drive(app: Any, body: bytes, clients: int, seconds: float) -> int:
    """Requests answered by ``app`` in ``seconds`` with ``clients`` callers in a closed loop."""
    headers = [
        (b"host", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/models/m/predict",
        "raw_path": b"/v1/models/m/predict",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }
    message = {"type": "http.request", "body": body, "more_body": False}
    done = 0
    deadline = time.perf_counter() + seconds
    failed: list[int] = []

    async def receive() -> dict[str, Any]:
        return message

    async def client() -> None:
        nonlocal done

        async def send(event: dict[str, Any]) -> None:
            if event["type"] == "http.response.start" and event["status"] != 200:
                failed.append(event["status"])

        while time.perf_counter() < deadline:
            await app(dict(scope), receive, send)
            done += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, first status {failed[0]}")
    return done


async def _main(args: argparse.Namespace, work: Path) -> None:
    from ballast.bench.onnx_mlp import build_mlp_onnx
    from ballast.bench.serving import HIDDEN, predict_body
    from ballast.serving import Deployment
    from infra.gateway.app import GatewayConfig, create_app
    from infra.gateway.batcher import BatchPolicy
    from infra.gateway.testing import spec_for

    champion = build_mlp_onnx(work / "champion.onnx", seed=0, hidden=HIDDEN)
    widths = tuple(int(w) for w in args.canary_hidden.split(",")) if args.canary_hidden else HIDDEN
    canary = build_mlp_onnx(work / "canary.onnx", seed=1, hidden=widths)
    config = GatewayConfig(
        admin_token="bench",
        inference_threads=1,
        batch=BatchPolicy(inline_below_us=args.inline_below_us),
        metrics_flush_s=args.metrics_flush_ms / 1e3,
    )
    one = Deployment(model="m", champion=spec_for(champion, "1"))
    split = Deployment(
        model="m",
        champion=spec_for(champion, "1"),
        canary=spec_for(canary, "2"),
        canary_weight=10,
    )
    body = predict_body()
    apps = [("one version", create_app(config), one), ("90/10 split", create_app(config), split)]
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in apps}
    first, second = apps[0][1], apps[1][1]
    async with first.gateway.lifespan(first.router), second.gateway.lifespan(second.router):
        for _, app, dep in apps:
            await app.gateway.apply(dep)
            await _drive(app, body, args.clients, 1.0)  # warm-up: batchers move to the loop
        for block in range(args.blocks):
            order = apps if block % 2 == 0 else apps[::-1]
            for label, app, _ in order:
                t = time.process_time()
                n = await _drive(app, body, args.clients, args.seconds)
                cpu[label].append((time.process_time() - t) / max(1, n) * 1e6)
        rows = {label: _rows_per_call(app) for label, app, _ in apps}
    base, other = (cpu[label] for label, _, _ in apps)
    change = sorted(100 * (b / a - 1) for a, b in zip(base, other, strict=True))
    q1, med, q3 = statistics.quantiles(change, n=4)
    for label, _, _ in apps:
        per_call = " ".join(f"v{v}:{n:.1f}" for v, n in sorted(rows[label].items()))
        print(
            f"{label:12s} {statistics.median(cpu[label]):7.1f} us CPU/request (app only)"
            f"   rows/call {per_call}"
        )
    delta = statistics.median(b - a for a, b in zip(base, other, strict=True))
    print(
        f"split vs one: {med:+.1f} % [{q1:+.1f}, {q3:+.1f}] per paired block, "
        f"{delta:+.2f} us per request ({args.blocks} blocks of {args.seconds:g} s each)"
    )


def _rows_per_call(app: Any) -> dict[str, float]:
    """Mean rows per model call by version, from the app's own batchers."""
    live = app.gateway.live
    out: dict[str, float] = {}
    for slot in live.slots:
        batcher = slot.loaded.batcher
        if batcher is not None and batcher.batches:
            out[slot.loaded.version] = batcher.rows_total / batcher.batches
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--blocks", type=int, default=60, help="alternations (60)")
    p.add_argument("--seconds", type=float, default=0.25, help="length of one block (0.25)")
    p.add_argument("--clients", type=int, default=16, help="concurrent callers per app (16)")
    p.add_argument("--inline-below-us", type=float, default=250.0)
    p.add_argument("--metrics-flush-ms", type=float, default=20.0)
    p.add_argument(
        "--canary-hidden",
        default="",
        help="the canary's hidden widths, e.g. 8 (default: the champion's): a tiny canary "
        "shows how much of the split's cost is its weights pushing the champion's out of cache",
    )
    args = p.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="ballast-inproc-") as tmp:
        work = Path(tmp)
        metrics = work / "metrics"
        metrics.mkdir()
        # As in a replica of a multi-worker gateway (set before any metrics object exists).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        uvloop.run(_main(args, work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does a loaded gateway make an identical canary look slower than its champion?

    .venv/bin/python benchmarks/canary_latency_parity.py                    # c = 1, 4, 16, 64
    .venv/bin/python benchmarks/canary_latency_parity.py --concurrency 64 --seconds 10

A real gateway process (one replica unless ``--workers``) serves ``ballast bench serving``'s MLP
as champion and a copy of it as a 90/10 canary; wrk (a separate process) drives it at each
concurrency for ``--seconds``. Then the gateway's own observations (``/admin/observations``,
what the canary's judge reads) give each version's p50 and p95 and the share of each version's
answers above the champion's p95: 5 % for the champion by definition, and about 5 % for a
canary the gateway treats alike. The sequential judge counts answers above the champion's p95
as bad events, so a canary share of 10 % reads as a canary twice as often slow.
With several replicas, only the replica that answers the observation calls is read.

``--rate R`` replaces wrk's closed loop by open-loop traffic: requests at exponential intervals
averaging ``R`` per second from an asyncio httpx client in this process, however long the
answers take (a light load, as most production traffic is).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ballast.bench.onnx_mlp import build_mlp_onnx
from ballast.bench.serving import HIDDEN, _deploy, _gateway_process, _lua, _wrk, predict_body


def _observations(client: httpx.Client, cursor: tuple[str, int] | None) -> dict[str, Any]:
    params = {} if cursor is None else {"cursors": f"{cursor[0]}={cursor[1]}", "limit": "20000"}
    resp = client.get("/admin/observations", params=params)
    resp.raise_for_status()
    page: dict[str, Any] = resp.json()
    return page


def _read_since(client: httpx.Client, replica: str, start: int) -> list[list[object]]:
    out: list[list[object]] = []
    cursor = start
    for _ in range(1000):  # bounded: 20,000 per call
        page = _observations(client, (replica, cursor))
        if page["replica"] != replica:
            continue  # another replica answered this connection
        if not page["observations"]:
            break
        out += page["observations"]
        cursor = page["next"]
    return out


async def _open_loop(url: str, body: bytes, rate: float, seconds: float) -> None:
    """Requests at exponential intervals averaging ``rate`` per second, for ``seconds``."""
    rng = random.Random(0)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        pending: set[asyncio.Task[httpx.Response]] = set()
        due = time.monotonic()
        end = due + seconds
        while due < end:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.create_task(client.post(url, content=body, headers=headers))
            pending.add(task)
            task.add_done_callback(pending.discard)
            due += rng.expovariate(rate)
        await asyncio.gather(*pending)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--seconds", type=int, default=4, help="per concurrency (whole seconds)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--weight", type=int, default=10, help="the canary's percent (10)")
    p.add_argument("--rate", type=float, default=None, help="open-loop requests/s instead of wrk")
    args = p.parse_args(argv)
    loads = [("rate", args.rate)] if args.rate else [("c", c) for c in args.concurrency]
    with tempfile.TemporaryDirectory(prefix="ballast-parity-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model = build_mlp_onnx(work / "model.onnx", seed=0, hidden=HIDDEN)
        script = _lua(work / "predict.lua", predict_body())
        (work / "gateway").mkdir()
        gw, token = stack.enter_context(_gateway_process(work / "gateway", args.workers, []))
        _deploy(gw.url, token, "m", model, args.weight, None)  # the canary: a copy
        url = f"{gw.url}/v1/models/m/predict"
        _wrk(url, script, 16, 2, "warm-up")
        client = stack.enter_context(
            httpx.Client(
                base_url=gw.url,
                headers={"authorization": f"Bearer {token}"},
                timeout=10,
                trust_env=False,
            )
        )
        for kind, c in loads:
            here = _observations(client, None)
            if kind == "rate":
                asyncio.run(_open_loop(url, predict_body(), c, args.seconds))
            else:
                _wrk(url, script, int(c), args.seconds, "gateway")
            seen = _read_since(client, here["replica"], here["next"])
            lat = {
                role: np.array([o[4] for o in seen if o[2] == role and o[3]], np.float64) * 1e3
                for role in ("champion", "canary")
            }
            if not (lat["champion"].size and lat["canary"].size):
                print(f"{kind}={c:g}: no answers of both versions observed")
                continue
            p95 = float(np.percentile(lat["champion"], 95))
            print(
                f"{kind}={c:3g}  answers {len(seen):6d}  p50 ms champion "
                f"{np.median(lat['champion']):6.3f} canary {np.median(lat['canary']):6.3f}  "
                f"p95 ms champion {p95:6.3f} canary {np.percentile(lat['canary'], 95):6.3f}  "
                f"above the champion's p95: champion {(lat['champion'] > p95).mean():5.1%} "
                f"canary {(lat['canary'] > p95).mean():5.1%}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

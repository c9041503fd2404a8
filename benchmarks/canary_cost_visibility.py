"""How much of a canary's extra compute its requests' latency shows, against the champion's.

    .venv/bin/python benchmarks/canary_cost_visibility.py
    .venv/bin/python benchmarks/canary_cost_visibility.py --canaries 256,256 768,768 --rounds 5

Why it matters: the canary's judge compares the two versions' latencies. A model whose calls take
under ``--inline-below-us`` batches on the gateway's event loop, one batch per version per loop
iteration, and every request of an iteration waits for all of its batches; so under load a
canary's extra compute is paid by the champion's requests too, and the latency difference the
judge sees stays small. The release's cost gate (``ballast/cost.py``) measures it before the
canary instead.

One gateway app per canary size (the champion: ``ballast bench serving``'s MLP, hidden 256,256),
driven in process through its ASGI entry with ``--clients`` callers in a closed loop (as
``gateway_inproc.py``), 90/10 split. Reported per canary size, medians over ``--rounds``: each
version's model-call time (the batcher's moving average) and rows per call, and the two
versions' p50 latency as the gateway recorded it for the judge (``/admin/observations``).
``--inline-below-us 0`` runs every batch in an inference thread instead, for comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_inproc import _app, _drive, parse_config


async def _one(args: argparse.Namespace, work: Path, canary: str) -> dict[str, Any]:
    from ballast.bench.onnx_mlp import build_mlp_onnx
    from ballast.bench.serving import HIDDEN, predict_body
    from infra.gateway.app import GatewayConfig
    from infra.gateway.batcher import BatchPolicy

    champion = build_mlp_onnx(work / "champion.onnx", seed=0, hidden=HIDDEN)
    config = GatewayConfig(
        admin_token="bench",
        inference_threads=1,
        batch=BatchPolicy(inline_below_us=args.inline_below_us),
        metrics_flush_s=0.02,
    )
    app, dep = _app(parse_config(f"c: split canary={canary}"), config, work, champion)
    body = predict_body()
    rows: dict[str, list[float]] = {"call_champion": [], "call_canary": []}
    rows |= {"p50_champion": [], "p50_canary": [], "rows_champion": [], "rows_canary": []}
    async with app.gateway.lifespan(app.router):
        await app.gateway.apply(dep)
        await _drive(app, body, args.clients, 1.0)  # warm-up: fast batchers move to the loop
        for _ in range(args.rounds):
            gw = app.gateway
            gw._observed.clear()
            before = {
                s.role: (s.loaded.batcher.batches, s.loaded.batcher.rows_total)
                for s in gw.live.slots
            }
            await _drive(app, body, args.clients, args.seconds)
            for s in gw.live.slots:
                b = s.loaded.batcher
                lat = [o[4] * 1e6 for o in gw._observed if o[1] == s.loaded.version]
                n0, r0 = before[s.role]
                rows[f"call_{s.role}"].append(b.call_us)
                rows[f"rows_{s.role}"].append((b.rows_total - r0) / max(1, b.batches - n0))
                rows[f"p50_{s.role}"].append(statistics.median(lat))
        on_loop = all(s.loaded.batcher.on_loop() for s in app.gateway.live.slots)
    out = {k: statistics.median(v) for k, v in rows.items()}
    out["diff"] = statistics.median(
        c - h for c, h in zip(rows["p50_canary"], rows["p50_champion"], strict=True)
    )
    out["on_loop"] = on_loop
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--canaries", nargs="+", default=["256,256", "768,768"], help="hidden widths")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--inline-below-us", type=float, default=250.0)
    args = p.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="ballast-visibility-") as tmp:
        work = Path(tmp)
        (work / "metrics").mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(work / "metrics")
        for canary in args.canaries:
            r = uvloop.run(_one(args, work, canary))
            print(
                f"canary {canary:>11s}  on loop {r['on_loop']!s:5s}  call us champion "
                f"{r['call_champion']:5.0f} canary {r['call_canary']:5.0f} "
                f"({r['call_canary'] / r['call_champion']:.1f}x; rows/call "
                f"{r['rows_champion']:.1f} / {r['rows_canary']:.1f})   p50 us champion "
                f"{r['p50_champion']:5.0f} canary {r['p50_canary']:5.0f} (canary - champion "
                f"{r['diff']:+5.0f})"
            )
    print(f"({args.rounds} rounds of {args.seconds:g} s, {args.clients} clients, medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

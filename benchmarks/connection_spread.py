"""How a gateway's replicas share wrk's connections, round by round.

    .venv/bin/python benchmarks/connection_spread.py                 # 2 replicas, 8 rounds
    .venv/bin/python benchmarks/connection_spread.py --workers 3 --rounds 4 --split

Each round runs wrk (one thread, ``--concurrency`` connections, 3 s) against a fresh gateway's
predict route and, halfway through, counts the established connections each replica process
holds on the gateway's port (``ss``), then prints them with the round's req/s. One socket shared
by every replica lets whichever wakes first accept most of a burst; a socket per replica
(``SO_REUSEPORT``, see ``infra/gateway/supervisor.py``) lets the kernel spread them.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ballast.bench.onnx_mlp import build_mlp_onnx
from ballast.bench.serving import HIDDEN, _deploy, _gateway_process, _lua, predict_body


def _per_replica(port: int) -> list[int]:
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", "sport", f"= :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(Counter(re.findall(r"pid=(\d+)", out)).values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--split", action="store_true", help="serve a 90/10 split, not one version")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ballast-spread-") as tmp:
        work = Path(tmp)
        model = build_mlp_onnx(work / "model.onnx", seed=0, hidden=HIDDEN)
        script = _lua(work / "predict.lua", predict_body())
        with _gateway_process(work, args.workers, []) as (gw, token):
            _deploy(gw.url, token, "m", model, 10 if args.split else None)
            port = int(gw.url.rsplit(":", 1)[1])
            for r in range(args.rounds):
                url = f"{gw.url}/v1/models/m/predict"
                wrk = subprocess.Popen(
                    ["wrk", "-t1", f"-c{args.concurrency}", "-d3s", "-s", str(script), url],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                time.sleep(1.5)
                spread = _per_replica(port)
                out, _ = wrk.communicate(timeout=60)
                found = re.search(r"Requests/sec:\s+([\d.]+)", out)
                rps = float(found.group(1)) if found else 0.0
                print(f"round {r}: connections per replica {spread}, {rps:,.0f} req/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sustained load through a whole release, promotion and rollback included: zero failed requests?

    .venv/bin/python benchmarks/load_through_release.py                    # 7 phases x 5 s
    .venv/bin/python benchmarks/load_through_release.py --seconds 70 --workers 32 --json

Starts a gateway process with ``--replicas`` (default 2) replica processes on one port and
three small ONNX versions (a 30->256->256->2 MLP each), then drives batch-1 JSON predictions
from a separate load process (:class:`ballast.loadgen.LoadProcess`, ``--workers`` concurrent
keep-alive connections) while the release goes through its steps, each a PUT of the
deployment that returns once every replica serves it:

    champion v1 -> canary v2 at 5 %, 25 %, 50 % -> promote v2 (100 %) -> canary v3 at 25 %
    -> roll back to v2 alone

Every request is attributed to the phase in which it was sent. Reported per phase: requests,
req/s, p50 and p99 client-side latency (ms), failures (any non-200 answer or connection
failure), the versions that answered, and how long the switch (the PUT) took. Exit status 1
when any request failed. ``--json`` prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

# Runnable as a script from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from ballast.gateway_client import GatewayClient
from ballast.gateway_process import GatewayProcess
from ballast.loadgen import LoadProcess, PhaseStats, summarise_phases
from ballast.serving import Deployment, VersionSpec
from ballast.settings import Settings
from infra.gateway.testing import build_mlp_onnx, spec_for

MODEL = "release-bench"
N_FEATURES = 30


def plan(v1: VersionSpec, v2: VersionSpec, v3: VersionSpec) -> list[tuple[str, Deployment]]:
    """The release steps, in order: (phase name, deployment put at its start)."""

    def canary(champion: VersionSpec, cand: VersionSpec, weight: int) -> Deployment:
        return Deployment(model=MODEL, champion=champion, canary=cand, canary_weight=weight)

    return [
        ("champion v1", Deployment(model=MODEL, champion=v1)),
        ("canary v2 5%", canary(v1, v2, 5)),
        ("canary v2 25%", canary(v1, v2, 25)),
        ("canary v2 50%", canary(v1, v2, 50)),
        ("promote v2 100%", Deployment(model=MODEL, champion=v2)),
        ("canary v3 25%", canary(v2, v3, 25)),
        ("rollback to v2", Deployment(model=MODEL, champion=v2)),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    workdir: Path,
    *,
    phase_seconds: float,
    workers: int,
    replicas: int,
    say: Any = print,
) -> dict[str, Any]:
    """Start the gateway, drive the release under load, return the per-phase results."""
    versions = [
        spec_for(build_mlp_onnx(workdir / f"v{v}.onnx", seed=40 + v), str(v)) for v in (1, 2, 3)
    ]
    steps = plan(*versions)
    s = Settings(
        state_dir=workdir / "state",
        gateway_port=_free_port(),
        gateway_admin_token=secrets.token_urlsafe(16),
    )
    rows = np.random.default_rng(0).normal(size=(256, N_FEATURES)).astype(np.float32)
    marks: list[tuple[str, float]] = []
    switches: dict[str, float] = {}
    with (
        GatewayProcess.start(
            s, log_path=workdir / "gateway.log", workers=replicas, exit_with_parent=True
        ) as gw,
        GatewayClient(gw.url, s.admin_token(), timeout=60) as admin,
    ):
        deadline = time.monotonic() + 30
        while len(admin.replicas()["replicas"]) < replicas:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{replicas} replicas did not all report in 30 s")
            time.sleep(0.05)
        admin.set_deployment(steps[0][1])
        say(f"gateway {gw.url}: {replicas} replicas; load: {workers} connections, other process")
        load = LoadProcess(
            gw.url,
            MODEL,
            rows,
            workdir=workdir / "load",
            concurrency=workers,
            max_seconds=phase_seconds * len(steps) + 60,
        )
        # The first phase (the champion alone, in force already) starts with the load, and the
        # last one ends after it stopped: every request sent falls in some phase.
        marks.append((steps[0][0], time.monotonic()))
        switches[steps[0][0]] = 0.0
        with load:
            for name, dep in steps[1:]:
                time.sleep(max(0.0, phase_seconds - (time.monotonic() - marks[-1][1])))
                t0 = time.monotonic()
                marks.append((name, t0))
                admin.set_deployment(dep)
                switches[name] = round((time.monotonic() - t0) * 1e3, 1)
                say(f"  {name}: switched in {switches[name]} ms")
            time.sleep(max(0.0, phase_seconds - (time.monotonic() - marks[-1][1])))
            result = load.stop()
            end = time.monotonic()
        stopped = gw.stop(timeout=15)
    phases = summarise_phases(result, marks, end)
    # Once the rollback's PUT has returned, every replica serves v2 alone: nothing else answers.
    settled = marks[-1][1] + switches[marks[-1][0]] / 1e3
    after = [v for t, v in zip(result.started.tolist(), result.version, strict=True) if t > settled]
    total = len(result)
    failures = int(len(result) - np.count_nonzero(result.ok))
    seconds = end - marks[0][1]
    return {
        "replicas": replicas,
        "workers": workers,
        "phase_seconds": phase_seconds,
        "requests": sum(p.requests for p in phases),
        "sent_in_all": total,
        "failures": failures,
        "rps": round(sum(p.requests for p in phases) / seconds, 1),
        "p50_ms": _pct(result.latency_s, 50),
        "p99_ms": _pct(result.latency_s, 99),
        "gateway_exit": stopped,
        "phases": [{**asdict(p), "switch_ms": switches[p.phase]} for p in phases],
        "after_rollback": dict(Counter(after)),
        "cpus": os.cpu_count(),
    }


def _pct(latency_s: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(latency_s * 1e3, q)), 3) if len(latency_s) else None


def _table(phases: list[dict[str, Any]]) -> str:
    head = f"{'phase':<17}{'req':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'fail':>6}"
    head += f"{'switch ms':>11}  versions"
    lines = [head]
    for p in phases:
        versions = ", ".join(f"v{k}: {v}" for k, v in p["versions"].items())
        lines.append(
            f"{p['phase']:<17}{p['requests']:>8}{p['rps']:>9.0f}{p['p50_ms'] or 0:>9.2f}"
            f"{p['p99_ms'] or 0:>9.2f}{p['failures']:>6}{p['switch_ms']:>11.1f}  {versions}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=35.0, help="whole run (7 phases), s")
    ap.add_argument("--workers", type=int, default=16, help="concurrent connections of the load")
    ap.add_argument("--replicas", type=int, default=2, help="gateway replica processes")
    ap.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.workers < 1 or args.replicas < 1:
        ap.error("--seconds must be > 0, --workers and --replicas >= 1")
    phase_s = args.seconds / 7

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    with tempfile.TemporaryDirectory(prefix="ballast-release-load-") as tmp:
        out = run(
            Path(tmp), phase_seconds=phase_s, workers=args.workers, replicas=args.replicas, say=say
        )
    if args.json:
        print(json.dumps(out))
    else:
        print(_table(out["phases"]))
        print(
            f"total: {out['requests']} requests, {out['rps']:.0f} req/s, p50 {out['p50_ms']} ms, "
            f"p99 {out['p99_ms']} ms, failures {out['failures']} "
            f"({out['replicas']} replicas, {out['workers']} connections, {os.cpu_count()} CPUs)"
        )
    return 1 if out["failures"] else 0


__all__ = ["PhaseStats", "main", "plan", "run"]

if __name__ == "__main__":
    raise SystemExit(main())

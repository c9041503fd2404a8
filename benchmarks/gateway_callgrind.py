"""Instructions the gateway app executes per request, by configuration, counted by callgrind.

    .venv/bin/python benchmarks/gateway_callgrind.py                  # one version vs 90/10 split
    .venv/bin/python benchmarks/gateway_callgrind.py "one: one" "split: split" \\
        "noop: split canary=noop"                                      # gateway_inproc's syntax

``gateway_inproc.py`` and ``gateway_ab.py`` time CPU, which on a shared VM moves by several
percent between minutes; a cost of a few percent needs dozens of alternating rounds and still
has an interval a few percent wide. Counted instructions do not move with the machine: each
configuration runs once under valgrind's callgrind (about 2 minutes each) with the same
requests (``--clients`` callers, ``--requests`` each, after as many, at least 100, to warm up), in
the same app as ``gateway_inproc.py`` (no HTTP, no sockets), and the counters cover only the
measured requests (zeroed and dumped around them with ``callgrind_control``), in
``--windows`` windows of those requests each. Reported per configuration: each window's
instructions per request and their spread, then for the least window (see below) the change
against the first configuration and that change by shared object (the interpreter, ONNX
Runtime, libc, numpy ...), from each function's own (exclusive) count.

How repeatable (2026-11-29, 16 callers x 300 requests a window): two processes of one
configuration, one window each, agreed within 14 instructions per request (0.007 %). But a
window can read high: ONNX Runtime now and then does something once, at a moment that depends
on time (one function, called once, seen to add 0.6k to 21k instructions per request to a
window), and the first window after the warm-up read up to 5 % above the next two (the
interpreter's allocation and attribute lookups settling), which agreed within 0.3 %. So each
configuration runs ``--windows`` windows (3) and the least is kept; compare changes, not
absolute counts, and read each window's figures before trusting a change under 1k.

What instructions miss: time. A cache miss costs no instruction, so a second version's weights
evicting the first's from the caches shows in the timing benchmarks only. Under valgrind the
app runs about 50 times slower, so two settings are scaled to keep it doing what it does at
full speed: batches stay on the event loop (the measured call cost would otherwise send them to
threads) and metrics are flushed every second instead of every 20 ms (the same number of
requests per flush). Needs valgrind (Debian package ``valgrind``); Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_inproc import parse_config, predict_request

_NAMED = re.compile(r"^(c?ob|c?fn|c?fl|c?fi|c?fe)=(?:\((\d+)\))? ?(.*)$")


def self_costs(lines: Iterable[str], event: str = "Ir") -> Counter[tuple[str, str]]:
    """Each function's own count of ``event``, by (shared object's file name, function), from
    a callgrind output file.

    Follows the format's header (``positions:``: how many position columns lead a cost line;
    ``events:``: which column is ``event``) and both name forms (``fn=(3) name`` defining an
    id, ``fn=(3)`` using it, ``fn=name`` uncompressed). The cost line after ``calls=`` is the
    call's inclusive cost and belongs to the callee, and the one after ``jump=``/``jcnd=`` is a
    jump's source position: both left out, so the counts add up to the program's total once.
    """
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}, "fl": {}}
    current = {"ob": "?", "fn": "?"}
    own: Counter[tuple[str, str]] = Counter()
    positions, column = 1, 0
    skip_next = False
    for raw in lines:
        line = raw.rstrip("\n")
        if line.startswith("positions:"):
            positions = len(line.split()) - 1
            continue
        if line.startswith("events:"):
            events = line.split()[1:]
            column = events.index(event) if event in events else -1
            continue
        named = _NAMED.match(line)
        if named:
            kind, ref, name = named.groups()
            table = kind.removeprefix("c")
            table = "fl" if table in ("fi", "fe") else table
            if ref is None:
                value = name
            else:
                if name:
                    names[table][ref] = name
                value = names[table].get(ref, "?")
            if kind in ("ob", "fn"):
                current[kind] = value
            continue
        if line.startswith(("calls=", "jump=", "jcnd=")):
            skip_next = True
            continue
        if not line or not (line[0].isdigit() or line[0] in "+-*"):
            continue
        if skip_next:
            skip_next = False
            continue
        fields = line.split()
        at = positions + column
        if column >= 0 and len(fields) > at:  # trailing events left out are zero
            own[(Path(current["ob"]).name, current["fn"])] += int(fields[at])
    return own


def by_object(costs: Counter[tuple[str, str]], requests: int) -> dict[str, float]:
    """Instructions per request by shared object."""
    out: Counter[str] = Counter()
    for (obj, _), n in costs.items():
        out[obj] += n
    return {obj: n / requests for obj, n in out.items()}


def report(results: list[tuple[str, int, Counter[tuple[str, str]]]], top: int = 6) -> list[str]:
    """Lines: per configuration its instructions per request; after the first, the change and
    the shared objects that changed most."""
    lines = []
    label0, n0, base = results[0]
    base_obj = by_object(base, n0)
    base_total = sum(base_obj.values())
    width = max(len(label) for label, _, _ in results)
    for label, n, costs in results:
        objs = by_object(costs, n)
        total = sum(objs.values())
        line = f"{label:{width}s} {total / 1e3:8.1f} k instructions/request ({n} requests)"
        if label != label0:
            share = f"{(total / base_total - 1) * 100:+.2f} %" if base_total else "n/a"
            line += f"  {total - base_total:+8.0f} ({share})"
        lines.append(line)
        if label == label0:
            continue
        diffs = {o: objs.get(o, 0.0) - base_obj.get(o, 0.0) for o in set(objs) | set(base_obj)}
        for obj in sorted(diffs, key=lambda o: -abs(diffs[o]))[:top]:
            lines.append(f"{'':{width}s}   {diffs[obj]:+8.0f}  {obj}")
    return lines


# -- the measured process (under valgrind) ----------------------------------------------------


async def _drive(app: Any, body: bytes, clients: int, each: int) -> int:
    """``each`` requests from each of ``clients`` callers (a closed loop), as gateway_inproc's."""
    scope, message = predict_request(body)
    failed: list[int] = []

    async def receive() -> dict[str, Any]:
        return message

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "http.response.start" and event["status"] != 200:
            failed.append(event["status"])

    async def client() -> None:
        for _ in range(each):
            await app(dict(scope), receive, send)

    await asyncio.gather(*(client() for _ in range(clients)))
    if failed:
        raise SystemExit(f"{len(failed)} requests failed, first status {failed[0]}")
    return clients * each


def _callgrind(command: str) -> None:
    subprocess.run(
        ["callgrind_control", command, str(os.getpid())], check=True, capture_output=True
    )


async def _child(config: str, clients: int, each: int, windows: int, work: Path) -> None:
    from contextlib import AsyncExitStack

    from gateway_inproc import _app

    from ballast.bench.onnx_mlp import build_mlp_onnx
    from ballast.bench.serving import HIDDEN, predict_body
    from infra.gateway.app import GatewayConfig
    from infra.gateway.batcher import BatchPolicy

    champion = build_mlp_onnx(work / "champion.onnx", seed=0, hidden=HIDDEN)
    gw_config = GatewayConfig(
        admin_token="callgrind-bench",
        inference_threads=1,
        batch=BatchPolicy(inline_below_us=1e12),  # see the module's docstring
        metrics_flush_s=1.0,
    )
    app, dep = _app(parse_config(config), gw_config, work, champion)
    body = predict_body()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.gateway.lifespan(app.router))
        await app.gateway.apply(dep)
        # Warm: ONNX Runtime plans memory once per input shape; every batch size must have
        # come by before counting, or the first calls' planning is counted as the split's cost.
        await _drive(app, body, clients, max(each, 100))
        before = _batches(app)
        for _ in range(windows):  # one dump each: callgrind.<pid>.out.1, .2, ...
            _callgrind("-z")
            n = await _drive(app, body, clients, each)
            _callgrind("-d")
        after = _batches(app)
    batches = {
        v: [a - b for a, b in zip(after[v], before.get(v, [0, 0]), strict=True)] for v in after
    }
    print(json.dumps({"requests": n, "batches": batches, "pid": os.getpid()}), flush=True)


def _batches(app: Any) -> dict[str, list[int]]:
    """Per version: [model calls, rows in them] so far."""
    return {
        s.loaded.version: [s.loaded.batcher.batches, s.loaded.batcher.rows_total]
        for s in app.gateway.live.slots
        if s.loaded.batcher is not None
    }


def _run(
    config: str, args: argparse.Namespace, work: Path
) -> tuple[int, list[Path], dict[str, Any]]:
    out = Path(tempfile.mkdtemp(dir=work))
    metrics = out / "metrics"
    metrics.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            # By process: the app's subprocesses (callgrind_control) fork from it under valgrind.
            f"--callgrind-out-file={out}/callgrind.%p.out",
            sys.executable,
            __file__,
            "--child",
            config,
            "--clients",
            str(args.clients),
            "--requests",
            str(args.requests),
            "--windows",
            str(args.windows),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    if proc.returncode != 0 or not last[0].startswith("{"):
        raise SystemExit(f"{config!r} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    info = json.loads(last[0])
    # The measured windows' dumps (callgrind_control -d): the app's process, numbered from 1.
    dumps = [out / f"callgrind.{info['pid']}.out.{i}" for i in range(1, args.windows + 1)]
    return int(info["requests"]), dumps, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="*", default=["one version: one", "90/10 split: split"])
    p.add_argument("--clients", type=int, default=16, help="concurrent callers (16)")
    p.add_argument("--requests", type=int, default=300, help="measured requests per caller")
    p.add_argument(
        "--windows", type=int, default=3, help="measured windows per configuration, the least kept"
    )
    p.add_argument("--keep", type=Path, help="copy each measured dump here (callgrind_annotate)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.windows < 1:
        p.error("--clients, --requests and --windows must be at least 1")
    if args.child is not None:
        import uvloop

        with tempfile.TemporaryDirectory(prefix="ballast-callgrind-") as tmp:
            uvloop.run(_child(args.child, args.clients, args.requests, args.windows, Path(tmp)))
        return 0
    try:
        configs = [parse_config(c) for c in args.configs]
    except ValueError as exc:
        p.error(str(exc))
    if len({c.label for c in configs}) != len(configs):
        p.error("configurations need different labels")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed (Debian: apt-get install valgrind)")
    results = []
    with tempfile.TemporaryDirectory(prefix="ballast-callgrind-") as tmp:
        work = Path(tmp)
        for text, cfg in zip(args.configs, configs, strict=True):
            n, dumps, info = _run(text, args, work)
            windows = []
            for path in dumps:
                with path.open() as f:
                    windows.append(self_costs(f))
            totals = [sum(w.values()) / n for w in windows]
            least = min(range(len(windows)), key=totals.__getitem__)
            results.append((cfg.label, n, windows[least]))
            dump = dumps[least]
            spread = f"{(max(totals) / min(totals) - 1) * 100:.2f} %" if min(totals) else "n/a"
            print(
                f"# {cfg.label}: windows {' '.join(f'{t / 1e3:.1f}k' for t in totals)}"
                f" instructions/request (spread {spread}); the least is kept",
                flush=True,
            )
            if args.keep is not None:
                args.keep.mkdir(parents=True, exist_ok=True)
                kept = args.keep / f"callgrind.{re.sub(r'[^A-Za-z0-9_.-]+', '_', cfg.label)}.out"
                shutil.copyfile(dump, kept)
            calls = " ".join(
                f"v{v}:{rows / max(b, 1):.1f}" for v, (b, rows) in sorted(info["batches"].items())
            )
            print(f"# {cfg.label}: measured, rows per model call {calls}", flush=True)
    print("\n".join(report(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

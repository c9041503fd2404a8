"""The gateway's own CPU per request for several configurations side by side, without HTTP.

    .venv/bin/python benchmarks/gateway_inproc.py                 # one version vs a 90/10 split
    .venv/bin/python benchmarks/gateway_inproc.py --blocks 100 \\
        "one: one" "split: split" "same session: split canary=same" "tiny: split canary=8" \\
        "public run: split run=public"

``benchmarks/gateway_ab.py`` measures whole replicas over TCP, where the kernel's loopback work,
the load generator and how the connections happen to spread over replicas move every round by
+-10 % on a shared 2-core VM: a cost of a few percent drowns. This drives one gateway app per
configuration in one process and one event loop (uvloop, as served) through the same ASGI
entry point uvicorn calls, with ``--clients`` concurrent callers each sending the benchmark's
batch-1 JSON body in a loop. Nothing but the app runs: no sockets, no HTTP parser (the same for
all). Blocks alternate between the apps (in reverse order every other time), and each block's
CPU time (this process, all threads) per request is compared with the first configuration's
block next to it, so drift of the machine cancels. Metrics are on, in multiprocess mode, as in
a replica of a multi-worker gateway.

A configuration is ``"LABEL: one|split[=W] [canary=full|same|noop|W1,W2] [run=direct|public]"``:

* ``split`` routes W % (default 10) to a canary: ``full`` (default) is a model of the champion's
  size with its own weights, as a real canary; ``same`` loads the champion's own session as the
  canary (a diagnostic: a second version's batches and calls without a second set of weights);
  ``8,8`` a canary of those hidden widths (its calls cost little); ``noop`` a canary whose
  model call returns zeros at once (a diagnostic: what the canary's batches cost without any
  model call).
* ``run=public`` calls ONNX Runtime through ``InferenceSession.run`` instead of the session's
  binding (see ``ballast/runtime.py``).

Reported: median app CPU microseconds per request of each, the median paired change against the
first with quartiles and the median's 95 % interval (:mod:`ballast.bench.paired`), rows per model
call and the gateway's own moving average of a model call's CPU time (``Batcher.call_us``,
measured in place, between requests). Add the HTTP and kernel share (``gateway_ab.py`` reports
the whole: about 70-80 us per request on this VM) to turn a difference into a share of a
replica's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_ab import _canary_weight  # the same modes as the HTTP benchmark

from ballast.bench.paired import paired_change


@dataclass(frozen=True)
class Config:
    label: str
    weight: int | None  # None: one version
    canary: str = "full"  # full | same | noop | hidden widths "8,8"
    run: str = "direct"  # direct | public


def parse_config(text: str) -> Config:
    """``"LABEL: one|split[=W] [canary=...] [run=...]"`` (see the module's docstring)."""
    label, sep, rest = text.partition(":")
    words = rest.split()
    if not sep or not label.strip() or not words:
        raise ValueError(f"want 'LABEL: one|split[=W] [options]', got {text!r}")
    weight = _canary_weight(words[0])
    if weight == -1:
        raise ValueError(f"unknown mode {words[0]!r} in {text!r}: one or split[=W], W 0..100")
    opts: dict[str, str] = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq or key not in ("canary", "run"):
            raise ValueError(f"unknown option {word!r} in {text!r}: canary=..., run=...")
        opts[key] = value
    cfg = Config(label.strip(), weight, **opts)
    if cfg.canary not in ("full", "same", "noop") and not all(
        p.isdigit() and int(p) > 0 for p in cfg.canary.split(",")
    ):
        raise ValueError(
            f"canary= takes full, same, noop or hidden widths like 8,8; got {cfg.canary!r}"
        )
    if cfg.run not in ("direct", "public"):
        raise ValueError(f"run= takes direct or public, got {cfg.run!r}")
    if weight is None and cfg.canary != "full":
        raise ValueError(f"{text!r}: canary= needs split")
    return cfg


def predict_request(body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ASGI scope and the one body message of ``POST /v1/models/m/predict`` with ``body``
    (JSON), as uvicorn hands them to the app."""
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
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }
    return scope, {"type": "http.request", "body": body, "more_body": False}


async def _drive(app: Any, body: bytes, clients: int, seconds: float) -> int:
    """Requests answered by ``app`` in ``seconds`` with ``clients`` callers in a closed loop."""
    scope, message = predict_request(body)
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


_NOOP_BYTES = b"noop"


class _Noop:
    """A model whose call costs nothing (canary=noop): logits of zeros for two classes."""

    backend = "onnxruntime"

    def __init__(self) -> None:
        from ballast.bench.serving import N_FEATURES

        self.n_features = N_FEATURES

    def predict(self, x: Any) -> Any:
        import numpy as np

        return np.zeros((x.shape[0], 2), dtype=np.float32)


def _app(cfg: Config, config: Any, work: Path, champion: Path) -> tuple[Any, Any]:
    """The gateway app for ``cfg`` and the deployment it serves."""
    from ballast.bench.onnx_mlp import build_mlp_onnx
    from ballast.bench.serving import HIDDEN
    from ballast.runtime import OnnxRuntimePredictor
    from ballast.serving import Deployment
    from infra.gateway.app import _default_loader, create_app
    from infra.gateway.testing import spec_for

    sessions: dict[Path, Any] = {}

    def loader(path: Path, backend: str, threads: int) -> Any:
        # By content: the gateway opens a private copy of the verified bytes, never ``path``
        # as deployed, so the canary's file is not recognisable by its name.
        if cfg.canary == "noop" and Path(path).read_bytes() == _NOOP_BYTES:
            return _Noop()
        key = champion if cfg.canary == "same" else path
        if key not in sessions:
            sessions[key] = _default_loader(key, backend, threads)
            if cfg.run == "public" and isinstance(sessions[key], OnnxRuntimePredictor):
                sessions[key]._direct = None
        return sessions[key]

    one = spec_for(champion, "1")
    if cfg.weight is None:
        return create_app(config, loader=loader), Deployment(model="m", champion=one)
    if cfg.canary == "same":
        canary = champion  # the loader hands out the champion's session
    elif cfg.canary == "noop":
        canary = work / "noop.onnx"  # never opened: the loader hands out _Noop
        canary.write_bytes(_NOOP_BYTES)
    else:
        widths = HIDDEN if cfg.canary == "full" else tuple(int(w) for w in cfg.canary.split(","))
        canary = build_mlp_onnx(work / f"canary-{cfg.canary}.onnx", seed=1, hidden=widths)
    dep = Deployment(
        model="m", champion=one, canary=spec_for(canary, "2"), canary_weight=cfg.weight
    )
    return create_app(config, loader=loader), dep


async def _main(args: argparse.Namespace, configs: list[Config], work: Path) -> None:
    from ballast.bench.onnx_mlp import build_mlp_onnx
    from ballast.bench.serving import HIDDEN, predict_body
    from infra.gateway.app import GatewayConfig
    from infra.gateway.batcher import BatchPolicy

    champion = build_mlp_onnx(work / "champion.onnx", seed=0, hidden=HIDDEN)
    config = GatewayConfig(
        admin_token="bench",
        inference_threads=1,
        batch=BatchPolicy(inline_below_us=args.inline_below_us),
        metrics_flush_s=args.metrics_flush_ms / 1e3,
    )
    body = predict_body()
    apps = [(cfg, *_app(cfg, config, work, champion)) for cfg in configs]
    cpu: dict[str, list[float]] = {cfg.label: [] for cfg in configs}
    async with AsyncExitStack() as stack:
        for _, app, dep in apps:
            await stack.enter_async_context(app.gateway.lifespan(app.router))
            await app.gateway.apply(dep)
            await _drive(app, body, args.clients, 1.0)  # warm-up: batchers move to the loop
        for block in range(args.blocks):
            for cfg, app, _ in apps if block % 2 == 0 else apps[::-1]:
                t = time.process_time()
                n = await _drive(app, body, args.clients, args.seconds)
                cpu[cfg.label].append((time.process_time() - t) / max(1, n) * 1e6)
        calls = {cfg.label: _calls(app) for cfg, app, _ in apps}
    base = cpu[configs[0].label]
    width = max(len(c.label) for c in configs)
    for cfg in configs:
        mine = cpu[cfg.label]
        line = f"{cfg.label:{width}s} {statistics.median(mine):7.2f} us CPU/request (app only)"
        if cfg is not configs[0]:
            delta = statistics.median(b - a for a, b in zip(base, mine, strict=True))
            line += f"  {delta:+.2f} us = {paired_change(mine, base).text()}"
        per_call = " ".join(f"v{v}:{r:.1f}" for v, (r, _) in sorted(calls[cfg.label].items()))
        call_us = " ".join(f"v{v}:{u:.0f}" for v, (_, u) in sorted(calls[cfg.label].items()))
        print(f"{line}   rows/call {per_call}   call us {call_us}")
    print(f"({args.blocks} blocks of {args.seconds:g} s each; changes against {configs[0].label})")


def _calls(app: Any) -> dict[str, tuple[float, float]]:
    """Per version: mean rows per model call, and the batcher's moving average of a call's CPU
    microseconds, from the app's own batchers."""
    out: dict[str, tuple[float, float]] = {}
    for slot in app.gateway.live.slots:
        b = slot.loaded.batcher
        if b is not None and b.batches:
            out[slot.loaded.version] = (b.rows_total / b.batches, b.call_us)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="*", default=["one version: one", "90/10 split: split"])
    p.add_argument("--blocks", type=int, default=60, help="alternations (60)")
    p.add_argument("--seconds", type=float, default=0.25, help="length of one block (0.25)")
    p.add_argument("--clients", type=int, default=16, help="concurrent callers per app (16)")
    p.add_argument("--inline-below-us", type=float, default=250.0)
    p.add_argument("--metrics-flush-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    try:
        configs = [parse_config(c) for c in args.configs]
    except ValueError as exc:
        p.error(str(exc))
    if len(configs) < 2 or len({c.label for c in configs}) != len(configs):
        p.error("give at least two configurations with different labels")
    import uvloop

    with tempfile.TemporaryDirectory(prefix="ballast-inproc-") as tmp:
        work = Path(tmp)
        metrics = work / "metrics"
        metrics.mkdir()
        # As in a replica of a multi-worker gateway (set before any metrics object exists).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        uvloop.run(_main(args, configs, work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m infra.gateway [--host H] [--port P] [--workers N]``: serve the gateway with uvicorn.

Defaults and the admin token come from ``ballast.settings.get_settings()`` (``BALLAST_*``).
With ``--workers N`` (N > 1) a supervisor binds the port and runs N replica processes on it, a
listening socket each (:mod:`infra.gateway.supervisor`). Every replica converges to the desired
state kept in ``state_dir/gateway/desired.json`` (``--desired-state file``, the default) or in
the model registry (``--desired-state registry``), and reports to ``state_dir/gateway/replicas/``.
SIGTERM or Ctrl-C stops accepting connections and drains in-flight requests (uvicorn's graceful
shutdown, bounded by ``--graceful-timeout``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ballast.settings import Settings
    from infra.gateway.auth import Principal
    from infra.gateway.desired import DesiredStateSource


def _parser(host: str, port: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra.gateway", description=__doc__)
    p.add_argument("--host", default=host, help=f"bind address (default {host})")
    p.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    p.add_argument("--workers", type=int, default=1, help="replica processes (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of routing and fault RNGs")
    p.add_argument(
        "--inference-threads",
        type=int,
        default=None,
        help="threads running batches per replica (default: cores / workers, 1 to 4)",
    )
    p.add_argument("--max-batch-size", type=int, default=64, help="rows per model call (64)")
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=500,
        help="how long a request may wait for a batch while another runs (500)",
    )
    p.add_argument(
        "--max-inflight-batches", type=int, default=1, help="batches per version at once (1)"
    )
    p.add_argument(
        "--inline-below-us",
        type=float,
        default=250.0,
        help="run batches on the event loop, one per loop iteration, while the version's model "
        "calls take less than this many microseconds; slower ones go to inference threads "
        "(default 250; 0: always threads)",
    )
    p.add_argument(
        "--metrics-flush-ms",
        type=float,
        default=20.0,
        help="write the per-request metric updates summed over this many milliseconds "
        "(default 20; 0: every event-loop iteration). Another replica's /metrics may lag by this",
    )
    p.add_argument(
        "--desired-state",
        choices=["file", "registry", "none"],
        default="file",
        help="where replicas read the deployment to serve (default: file in the state dir)",
    )
    p.add_argument("--poll-interval", type=float, default=None, help="desired-state poll, s (<= 1)")
    p.add_argument("--tokens-file", type=Path, default=None, help="extra role tokens (0600 JSON)")
    p.add_argument(
        "--fault-latency-ms",
        type=float,
        default=60.0,
        help="delay a version with fault=latency adds (default 60)",
    )
    p.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="shut down (gracefully) when the process that started this one dies",
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="with --exit-with-parent: the pid of the process starting this one; if this "
        "process's parent is not (or no longer) that pid, it has died: exit at once "
        "(default: the parent at start, which misses a parent that died before then)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request (off: it costs)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=10.0,
        help="seconds to drain in-flight requests on SIGTERM (default 10)",
    )
    p.add_argument("--instance", default="", help=argparse.SUPPRESS)  # echoed by /healthz
    p.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--replica-id", default="", help="name of this replica in stats (default: host-pid)"
    )
    return p


def _drained(signum: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the SIGTERM or SIGINT (Ctrl-C) it captured once it has drained; exiting 0
    # then tells the owner "stopped cleanly", where dying by the signal (-15) would look like a
    # kill, and a KeyboardInterrupt would end a clean stop with a traceback.
    raise SystemExit(0)


def _parent_gone(parent: int) -> bool:
    """This process was re-parented: ``parent``, the process that started it, has died."""
    return os.getppid() != parent


def _watch_parent(parent: int) -> None:
    # A test runner or script killed with SIGKILL cannot stop its gateway; when it is gone the
    # gateway is re-parented, and then stops itself the graceful way.
    def watch() -> None:
        while not _parent_gone(parent):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="gateway-parent-watch", daemon=True).start()


def default_inference_threads(workers: int) -> int:
    """Threads running batches in each replica: the cores shared out, 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 2) // max(1, workers)))


def _worker_args(argv: list[str]) -> list[str]:
    """The command line for a worker: the supervisor's own, less what only it handles."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--host", "--port", "--parent-pid"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--host=", "--port=", "--parent-pid=")):
            continue
        if arg == "--exit-with-parent":
            continue
        out.append(arg)
    return out


def _source(kind: str, settings: Settings, poll: float | None) -> DesiredStateSource | None:
    if kind == "none":
        return None
    if kind == "registry":
        from infra.gateway.registry_source import RegistryDesiredState

        return RegistryDesiredState.from_settings(settings, poll_interval_s=poll or 1.0)
    from infra.gateway.desired import FileDesiredState

    return FileDesiredState(
        settings.state_dir.resolve() / "gateway" / "desired.json", poll_interval_s=poll or 0.2
    )


def main(argv: list[str] | None = None) -> int:
    # The parent at start, read before anything is imported: the fallback of --exit-with-parent
    # without --parent-pid (a parent that died even before this line goes unnoticed).
    parent_at_start = os.getppid()
    # Imported here, not at module level: `python -m infra.gateway --help` stays fast and
    # importing this module does nothing.
    from ballast.settings import get_settings

    settings = get_settings()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parser(settings.gateway_host, settings.gateway_port).parse_args(raw)
    if args.workers < 1:
        print("--workers must be >= 1", file=sys.stderr)
        return 2
    parent: int | None = None
    if args.exit_with_parent:
        parent = parent_at_start if args.parent_pid is None else args.parent_pid
        if _parent_gone(parent):
            # Its starter died while this process started up; nobody would ever stop it.
            print(f"parent {parent} gone before the gateway started: exiting", file=sys.stderr)
            return 0

    tokens: tuple[tuple[str, Principal], ...] = ()
    if args.tokens_file is not None:
        from ballast.errors import ConfigError
        from infra.gateway.auth import load_tokens_file

        try:
            tokens = tuple(load_tokens_file(args.tokens_file))
        except ConfigError as exc:  # fail before any worker starts, with the reason
            print(str(exc), file=sys.stderr)
            return 2

    if args.workers > 1 and args.worker_fd is None:
        from infra.gateway.supervisor import supervise

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        worker_args = _worker_args(raw)
        if args.inference_threads is None:
            # Measured (ballast bench serving, 2 cores, 2 replicas): 2 threads per replica
            # oversubscribe the cores and a 90/10 split then cost 28 % of a single version's
            # req/s; 1 thread per replica brought it within noise (about 3 %).
            worker_args += ["--inference-threads", str(default_inference_threads(args.workers))]
        return supervise(
            host=args.host,
            port=args.port,
            workers=args.workers,
            worker_args=worker_args,
            graceful_timeout=args.graceful_timeout,
            parent_pid=parent,
        )

    import uvicorn

    from infra.gateway.app import GatewayConfig, create_app
    from infra.gateway.batcher import BatchPolicy
    from infra.gateway.desired import ReplicaBoard
    from infra.gateway.http import CoalescingHttpToolsProtocol

    # Admin actions are JSON lines on stderr, next to uvicorn's own lifecycle lines.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    gw_logger = logging.getLogger("ballast.gateway")
    gw_logger.addHandler(handler)
    gw_logger.setLevel(args.log_level.upper())
    gw_logger.propagate = False

    config = GatewayConfig.from_settings(
        settings,
        seed=args.seed,
        inference_threads=args.inference_threads or default_inference_threads(1),
        fault_latency_s=args.fault_latency_ms / 1e3,
        batch=BatchPolicy(
            max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            max_inflight=args.max_inflight_batches,
            inline_below_us=args.inline_below_us,
        ),
        tokens=tokens,
        replica_id=args.replica_id,
        metrics_flush_s=args.metrics_flush_ms / 1e3,
        instance=args.instance,
        # Shared by the replicas of one machine (or pod), read by GET /admin/failures.
        failure_dir=settings.state_dir.resolve() / "gateway" / "failures",
    )
    source = _source(args.desired_state, settings, args.poll_interval)
    board = (
        None
        if source is None
        else ReplicaBoard(settings.state_dir.resolve() / "gateway" / "replicas")
    )
    signal.signal(signal.SIGTERM, _drained)
    signal.signal(signal.SIGINT, _drained)
    if parent is not None:
        _watch_parent(parent)
    app = create_app(config, source=source, board=board)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            access_log=args.access_log,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.graceful_timeout,
            server_header=False,
            # One write per small response (see infra/gateway/http.py).
            http=CoalescingHttpToolsProtocol,
            # Nothing here reads the client's address; X-Forwarded-* parsing only costs.
            proxy_headers=False,
            lifespan="on",
            host=args.host,
            port=args.port,
        )
    )
    if args.worker_fd is None:
        server.run()
    else:
        # The socket the supervisor bound for this worker (uvicorn listens on it once the
        # startup is done; see supervisor.py). Built with socket(fileno=...), which reads the real
        # family: uvicorn's own fd= path assumes AF_UNIX, and then TCP_NODELAY is never set
        # (40 ms per request, Nagle against delayed ACKs).
        server.run(sockets=[socket.socket(fileno=args.worker_fd)])
    # uvicorn returns without starting when it cannot bind (the reason is in its log).
    return 0 if server.started else 3


if __name__ == "__main__":
    raise SystemExit(main())

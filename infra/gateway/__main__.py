"""``python -m infra.gateway [--host H] [--port P]``: serve the gateway with uvicorn.

Defaults and the admin token come from ``ballast.settings.get_settings()`` (``BALLAST_*``).
SIGTERM or Ctrl-C stops accepting connections and drains in-flight requests (uvicorn's graceful
shutdown, bounded by ``--graceful-timeout``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType


def _parser(host: str, port: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra.gateway", description=__doc__)
    p.add_argument("--host", default=host, help=f"bind address (default {host})")
    p.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    p.add_argument("--seed", type=int, default=0, help="seed of routing and fault RNGs")
    p.add_argument(
        "--inference-threads", type=int, default=2, help="concurrent inferences (default 2)"
    )
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
    p.add_argument("--access-log", action="store_true", help="log every request (off: it costs)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--graceful-timeout",
        type=float,
        default=10.0,
        help="seconds to drain in-flight requests on SIGTERM (default 10)",
    )
    return p


def _drained(signum: int, frame: FrameType | None) -> None:
    # uvicorn re-raises the SIGTERM it captured once it has drained; exiting 0 then tells the
    # owner "stopped cleanly", where dying by the signal (-15) would look like a kill.
    raise SystemExit(0)


def _watch_parent() -> None:
    # A test runner or script killed with SIGKILL cannot stop its gateway; when it is gone the
    # gateway is re-parented, and then stops itself the graceful way.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="gateway-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    # Imported here, not at module level: `python -m infra.gateway --help` stays fast and
    # importing this module does nothing.
    import uvicorn

    from ballast.settings import get_settings
    from infra.gateway.app import GatewayConfig, create_app

    settings = get_settings()
    args = _parser(settings.gateway_host, settings.gateway_port).parse_args(argv)

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
        inference_threads=args.inference_threads,
        fault_latency_s=args.fault_latency_ms / 1e3,
    )
    signal.signal(signal.SIGTERM, _drained)
    if args.exit_with_parent:
        _watch_parent()
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        access_log=args.access_log,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.graceful_timeout,
        server_header=False,
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

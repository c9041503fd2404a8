"""``ballast demo``: the whole loop on one machine, checked.

Release 1 is promoted (first release: straight to 100 % after its checks; later runs: through a
canary against the champion). Release 2 carries an injected fault and must be rolled back by the
canary. The demo exits non-zero if anything did not happen as described. This module is part of
the application shell (like the CLI): it composes flows, so it imports them lazily.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from ballast.serving import Fault
from ballast.settings import Settings


def run_demo(s: Settings, *, fault: Fault, console: Console, keep_serving: bool = False) -> int:
    """Both releases and their checks; 0 if everything happened as described, else 1.

    The gateway it starts is stopped on every exit path, SIGTERM and SIGHUP included (they
    raise ``SystemExit(128 + signal)`` meanwhile), and stops itself if this process dies hard;
    unless ``keep_serving``, which leaves it running after the demo.
    """
    with _stop_signals_raise():
        return _run_demo(s, fault=fault, console=console, keep_serving=keep_serving)


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` inside, so ``finally`` blocks run
    (``timeout ballast demo``, a closed terminal); the previous handlers come back on exit.

    Handlers can only be set in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:
            return  # a second signal must not cut short the cleanup the first one started
        raised = True
        raise SystemExit(128 + signum)

    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    # A signal the launcher ignores stays ignored (``nohup ballast demo`` must survive hangup).
    previous = {
        sig: signal.signal(sig, stop) for sig in wanted if signal.getsignal(sig) != signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: a handler set outside Python, which cannot be put back; the default then.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _run_demo(s: Settings, *, fault: Fault, console: Console, keep_serving: bool) -> int:
    from prefect.settings import (
        PREFECT_CLIENT_MAX_RETRIES,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    from ballast.cli_data import prepare_dataset
    from ballast.cli_shared import no_server_telemetry
    from ballast.gateway_client import GatewayClient
    from ballast.gateway_process import ensure_gateway
    from ballast.release import ALIAS_CHAMPION, TAG_STATUS
    from flows.release import release_flow
    from model_registry import Registry

    started = time.perf_counter()
    console.rule("[bold]Ballast demo")
    uri = prepare_dataset(s)
    # A gateway that ends with the demo stops itself if the demo dies without stopping it.
    gateway = ensure_gateway(s, exit_with_parent=not keep_serving)
    console.print(f"gateway at {s.gateway_url} ({'started' if gateway else 'already running'})")
    problems: list[str] = []
    reports = []
    try:
        # The heartbeat thread costs ~1.2 s per flow run at exit; the demo has no use for it.
        # One retry: Ctrl-C stops the temporary server too (same process group), and the engine
        # spent about 80 s retrying to report the crash to it.
        demo_settings = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_CLIENT_MAX_RETRIES: 1}
        with no_server_telemetry(), temporary_settings(demo_settings):
            for label, inject in (
                ("release 1 (healthy)", None),
                (f"release 2 (fault: {fault})", fault),
            ):
                console.rule(label)
                t = time.perf_counter()
                report = release_flow(dataset_uri=uri, inject_fault=inject)
                reports.append((label, report, time.perf_counter() - t))
        r1, r2 = reports[0][1], reports[1][1]
        if r1.outcome != "promoted":
            problems.append(f"release 1 should be promoted, was {r1.outcome}: {r1.reason}")
        if r2.outcome != "rolled_back":
            problems.append(f"release 2 should be rolled back, was {r2.outcome}: {r2.reason}")
        reg = Registry(s.tracking_uri, s.artifact_root)
        champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
        if champion is None or champion.version != r1.version:
            problems.append(
                f"champion should be version {r1.version}, is {champion and champion.version}"
            )
        if (
            r2.version
            and reg.get_version(s.model_name, r2.version).tags.get(TAG_STATUS) != "rolled_back"
        ):
            problems.append(f"version {r2.version} should be tagged rolled_back")
        with GatewayClient(s.gateway_url, s.admin_token()) as gw:
            dep = gw.get_deployment()
        if dep is None or dep.champion is None or dep.champion.version != r1.version or dep.canary:
            problems.append(f"gateway should serve only version {r1.version}, serves {dep}")
        _print_summary(console, s, reg, reports)
    finally:
        if gateway is not None and not keep_serving:
            gateway.stop()
    total = time.perf_counter() - started
    if problems:
        for p in problems:
            console.print(f"[bold red]FAILED[/] {p}")
        return 1
    console.print(f"[bold green]demo passed[/] in {total:.0f} s")
    return 0


def _print_summary(console: Console, s: Settings, reg: Any, reports: list[Any]) -> None:
    table = Table(title="Releases")
    for col in ("run", "version", "outcome", "seconds to decision", "run seconds", "reason"):
        table.add_column(col)
    for label, r, secs in reports:
        table.add_row(
            label,
            str(r.version),
            r.outcome,
            f"{r.seconds_to_decision:.1f}" if r.seconds_to_decision is not None else "-",
            f"{secs:.1f}",
            (r.reason or "")[:80],
        )
    console.print(table)
    versions = Table(title=f"Registry: {s.model_name}")
    for col in ("version", "aliases", "status", "verdict"):
        versions.add_column(col)
    for v in reg.list_versions(s.model_name):
        versions.add_row(
            v.version,
            ",".join(v.aliases),
            v.tags.get("ballast.status", ""),
            v.tags.get("ballast.verdict", ""),
        )
    console.print(versions)
    console.print("Open what it made:")
    console.print(
        f"  MLflow:  .venv/bin/mlflow ui --backend-store-uri '{s.tracking_uri}' "
        "--host 127.0.0.1 --port 5000"
    )
    console.print(
        "  Prefect: .venv/bin/prefect server start --host 127.0.0.1  (runs are in ~/.prefect)"
    )
    console.print(f"  Audit:   {s.audit_log}")

"""Several gateway replicas on one port (a pre-fork supervisor).

The supervisor starts N worker processes (``python -m infra.gateway --worker-fd FD ...``) and
hands each the listening socket it serves. On Linux every worker gets a socket of its own, all
bound to the port with ``SO_REUSEPORT``: the kernel spreads new connections over them by hash.
One socket shared by every worker (elsewhere) lets whichever worker wakes first accept a burst
of connections: measured on the 2-core VM, wrk's 64 connections landed 17-27 on one replica and
the rest on the other (once all 64 on one; ``benchmarks/connection_spread.py``). A worker's
socket is bound but not listening when it starts; the worker listens once its startup is done,
so no connection waits on a replica that is still loading. Its socket closes with it:
connections it had not accepted when it died are refused (the kernel resets them) instead of
waiting for its replacement, and new ones go to the other workers. The supervisor keeps the
port bound (not listening) all along, so the port stays ours while a worker restarts, and
claims it (:func:`_claim`) so that a second gateway on the same port fails to start instead of
quietly sharing it.

It also gives every worker the same ``PROMETHEUS_MULTIPROC_DIR`` (a fresh folder) so
``/metrics`` on any worker adds up all of them.

A worker that dies is restarted (it reads the desired state at start and converges by itself),
unless workers keep dying (:func:`restart_allowed`), in which case the supervisor stops them all
and exits 1. SIGTERM or SIGINT is passed to every worker, which drains its in-flight requests;
the supervisor exits 0 once all of them exited cleanly.

The supervisor imports nothing heavy: it never loads a model itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

__all__ = ["restart_allowed", "supervise"]

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PREFIX = "ballast-gw-metrics-"


def restart_allowed(
    exits: Sequence[float], now: float, *, limit: int = 5, window_s: float = 30.0
) -> bool:
    """A dead worker is restarted unless ``limit`` workers already died in the last ``window_s``."""
    return sum(1 for t in exits if now - t <= window_s) < limit


def _log(message: str) -> None:
    print(f"supervisor[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


# One socket per worker, balanced by the kernel: Linux's SO_REUSEPORT. (BSD and macOS accept
# the option but do not balance: there the last socket bound takes every connection.)
BALANCED = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _bind(host: str, port: int, *, listen: bool, reuse_addr: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if BALANCED:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _hold(host: str, port: int) -> socket.socket:
    """The supervisor's own socket on the port. Balanced: it holds the port while no worker
    listens (a bound socket that does not listen takes no connections). Otherwise: the one
    socket every worker accepts on.

    Balanced, it goes without SO_REUSEADDR: Linux lets a socket with that option bind a port
    whose every holder has it and none listens, so while no worker listens (start-up, or every
    worker restarting) another server could take the port, and every worker's listen() would
    then fail.
    """
    return _bind(host, port, listen=not BALANCED, reuse_addr=not BALANCED)


def _claim(port: int) -> socket.socket | None:
    """Balanced: an abstract Unix socket named after ``port``, held while the supervisor runs.

    ``SO_REUSEPORT`` lets any socket of the same user bind the port too, so a second gateway
    started on it would not fail with "address in use": its replicas would silently take a
    share of this one's connections. Two supervisors cannot both hold the name (whatever
    address each binds), and the kernel frees it when the holder dies. Raises OSError when
    another holds it.
    """
    if not BALANCED:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0ballast-gateway-port-{port}")
    except OSError:
        sock.close()
        raise
    return sock


def supervise(
    *,
    host: str,
    port: int,
    workers: int,
    worker_args: Sequence[str],
    graceful_timeout: float,
    parent_pid: int | None = None,
) -> int:
    """Run ``workers`` replicas until SIGTERM/SIGINT; returns the process exit code.

    With ``parent_pid`` (the process that started this one) the supervisor also stops, the
    graceful way, once its parent is no longer that process.
    """
    try:
        port_holder = _hold(host, port)
    except OSError as exc:
        _log(f"cannot bind {host}:{port}: {exc}")
        return 1
    port = port_holder.getsockname()[1]
    try:
        claim = _claim(port)
    except OSError:
        port_holder.close()
        _log(f"cannot bind {host}:{port}: another Ballast gateway serves port {port}")
        return 1
    _sweep_metrics_dirs()
    # The pid in the name: a supervisor killed hard cannot remove its folder, the next one does.
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
    env = {**os.environ, METRICS_ENV: metrics_dir}
    cmd = [sys.executable, "-m", "infra.gateway", *worker_args]
    # A supervisor killed hard must not leave workers behind. Its pid is passed explicitly: a
    # worker whose supervisor died while it started up sees at once that it was re-parented.
    cmd += ["--exit-with-parent", "--parent-pid", str(os.getpid())]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def spawn(index: int) -> subprocess.Popen[bytes]:
        sock = _bind(host, port, listen=False) if BALANCED else port_holder
        try:
            proc = subprocess.Popen(
                [
                    *cmd,
                    "--worker-fd",
                    str(sock.fileno()),
                    "--replica-id",
                    f"w{index}-{int(time.time() * 1000) % 100000}",
                ],
                stdin=subprocess.DEVNULL,
                env=env,
                pass_fds=(sock.fileno(),),
            )
        finally:
            if sock is not port_holder:
                sock.close()  # the worker's own now: it closes when the worker exits
        _log(f"worker {index} started, pid {proc.pid}")
        return proc

    procs: list[subprocess.Popen[bytes]] = []
    exits: list[float] = []
    code = 0
    try:
        for i in range(workers):
            procs.append(spawn(i))
        while not stopping:
            if parent_pid is not None and os.getppid() != parent_pid:
                _log("parent gone: stopping")
                break
            for i, proc in enumerate(procs):
                rc = proc.poll()
                if rc is None or stopping:
                    continue
                _mark_dead(proc.pid, metrics_dir)
                now = time.monotonic()
                _log(f"worker {i} (pid {proc.pid}) exited with {rc}")
                if not restart_allowed(exits, now):
                    _log("workers keep exiting: giving up")
                    code = 1
                    stopping = True
                    break
                exits.append(now)
                procs[i] = spawn(i)
            time.sleep(0.1)
    except OSError as exc:  # a worker's socket could not be bound (or the worker not started)
        _log(f"cannot start a worker: {exc}")
        code = 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + graceful_timeout + 5.0
        for proc in procs:
            try:
                rc = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait(5.0)
            # -SIGTERM: a worker still starting up (no handler yet) ended by the SIGTERM sent
            # here; as clean a stop as a drained one.
            if rc not in (0, -signal.SIGTERM) and code == 0:
                code = 1
        port_holder.close()
        if claim is not None:
            claim.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
    _log(f"stopped (exit {code})")
    return code


def _sweep_metrics_dirs() -> None:
    """Remove the metrics folders of supervisors that died without removing theirs."""
    for folder in Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*-*"):
        pid = folder.name.removeprefix(METRICS_PREFIX).split("-", 1)[0]
        if not pid.isdigit():
            continue  # a folder from before the pid was in the name: not ours to judge
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # another user's, alive


def _mark_dead(pid: int, folder: str) -> None:
    # Drops the dead worker's live gauges; its counters stay, so totals never go backwards.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, folder)

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
after a delay that grows while its slot keeps dying (:func:`restart_delay`); once no worker runs
and every slot keeps dying (:func:`give_up`) the supervisor exits 1. SIGTERM or SIGINT is passed to every worker, which drains its in-flight requests;
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

__all__ = ["give_up", "restart_delay", "supervise"]

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_PREFIX = "ballast-gw-metrics-"


#: A dead worker's slot is started again after 0.5 s, doubling per death in a row up to 30 s;
#: a worker that lived STABLE_S resets its slot.
RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 60.0
GIVE_UP_AFTER = 5


def restart_delay(deaths_in_a_row: int) -> float:
    """Seconds before a slot whose worker died for the ``deaths_in_a_row``-th time in a row
    (each within STABLE_S of its start) gets a new one: 0.5 s after a single death, doubling
    while the slot keeps dying, so a crash loop backs off instead of spinning."""
    return min(RESTART_MAX_S, RESTART_BASE_S * 2 ** max(0, deaths_in_a_row - 1))


def give_up(deaths_in_a_row: Sequence[int], *, limit: int = GIVE_UP_AFTER) -> bool:
    """Stop the gateway (exit 1, for whoever runs it to see) only when every slot's worker died
    ``limit`` times in a row: a start that can never work. One slot's crash loop (an OOM under
    a burst) must not take down the workers still serving; before, five deaths in 30 s
    anywhere stopped them all. (Not "and none runs": a slot's next worker, still starting,
    would keep that from ever being true while slots die out of step.)"""
    return all(n >= limit for n in deaths_in_a_row)


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
                    # The host's name first: the pods of a cluster each run w0, w1, ..., and
                    # their failures and counters are merged by replica name.
                    f"{socket.gethostname()}-w{index}-{int(time.time() * 1000) % 100000}",
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

    # Per slot: its worker (None while it waits to be restarted), when that one started, when
    # the next one is due, and how many of its workers died in a row.
    procs: list[subprocess.Popen[bytes] | None] = []
    started_at: list[float] = []
    due: list[float] = [0.0] * workers
    deaths = [0] * workers
    code = 0
    try:
        for i in range(workers):
            procs.append(spawn(i))
            started_at.append(time.monotonic())
        while not stopping:
            if parent_pid is not None and os.getppid() != parent_pid:
                _log("parent gone: stopping")
                break
            for i, proc in enumerate(procs):
                now = time.monotonic()
                if proc is None:
                    if now >= due[i] and not stopping:
                        procs[i], started_at[i] = spawn(i), now
                    continue
                rc = proc.poll()
                if rc is None or stopping:
                    if rc is None and deaths[i] and now - started_at[i] >= STABLE_S:
                        deaths[i] = 0  # it lived: the slot's next death starts over
                    continue
                _mark_dead(proc.pid, metrics_dir)
                deaths[i] = deaths[i] + 1 if now - started_at[i] < STABLE_S else 1
                procs[i] = None
                if give_up(deaths):
                    _log(
                        f"worker {i} (pid {proc.pid}) exited with {rc}; every worker keeps exiting: giving up"
                    )
                    code = 1
                    stopping = True
                    break
                due[i] = now + restart_delay(deaths[i])
                _log(
                    f"worker {i} (pid {proc.pid}) exited with {rc}; a new one in "
                    f"{restart_delay(deaths[i]):g} s ({deaths[i]} in a row)"
                )
            time.sleep(0.1)
    except OSError as exc:  # a worker's socket could not be bound (or the worker not started)
        _log(f"cannot start a worker: {exc}")
        code = 1
    finally:
        running = [p for p in procs if p is not None]
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + graceful_timeout + 5.0
        for proc in running:
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

"""Start and stop the serving gateway as a child process.

The gateway lives in ``infra.gateway``; ``ballast`` must not import ``infra`` (dependency
direction), so it is spawned by module name: ``python -m infra.gateway --host H --port P``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from ballast.errors import GatewayError
from ballast.gateway_client import GatewayClient
from ballast.procinfo import start_ticks
from ballast.settings import Settings

__all__ = ["GatewayProcess", "ensure_gateway", "stop_recorded_gateway"]

_POLL_S = 0.1
_LOG_TAIL_BYTES = 4000


def _tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


class GatewayProcess:
    """A gateway child process. ``with GatewayProcess.start(s) as gw: ...`` stops it on exit."""

    def __init__(
        self, proc: subprocess.Popen[bytes], url: str, log_path: Path, log_file: IO[bytes]
    ) -> None:
        self._proc = proc
        self.url = url
        self.log_path = log_path
        self._log_file = log_file
        self.pid_path: Path | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def running(self) -> bool:
        return self._proc.poll() is None

    @classmethod
    def start(
        cls,
        settings: Settings,
        *,
        log_path: Path | None = None,
        timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        exit_with_parent: bool = False,
        workers: int = 1,
    ) -> GatewayProcess:
        """Spawn a gateway for ``settings`` and wait (at most ``timeout`` s) until /healthz answers.

        ``extra_args`` go to ``python -m infra.gateway`` (e.g. ``["--seed", "3"]``).
        ``workers`` > 1 starts a supervisor with that many replica processes on one port
        (``pid`` is then the supervisor's; stopping it drains every replica).
        ``exit_with_parent`` makes the gateway stop itself if this process dies without
        stopping it (tests and benchmarks); leave it off for a gateway meant to outlive its
        starter.

        Raises :class:`GatewayError` with the tail of its log if it exits or does not come up.
        """
        state_dir = settings.state_dir.resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        # Create the admin token file here, before the child reads it: two processes racing to
        # create it would otherwise each write a different token.
        settings.admin_token()
        log_path = log_path or state_dir / "gateway.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ.copy()
        # Absolute state dir: the child sees the same token file whatever its working directory.
        env["BALLAST_STATE_DIR"] = str(state_dir)
        env["BALLAST_GATEWAY_THREADS"] = str(settings.gateway_threads)
        if settings.gateway_admin_token is not None:
            # A token given to these settings in code, not through the environment: hand it on
            # (a process's environment is readable only by its own user), else the two disagree.
            env["BALLAST_GATEWAY_ADMIN_TOKEN"] = settings.gateway_admin_token.get_secret_value()
        cmd = [sys.executable, "-m", "infra.gateway"]
        cmd += ["--host", settings.gateway_host, "--port", str(settings.gateway_port)]
        if workers != 1:
            cmd += ["--workers", str(workers)]
        # Proof of identity: /healthz echoes it, so another server on the port (a gateway
        # someone else started a moment before) never passes for the one started here.
        instance = secrets.token_hex(8)
        cmd += ["--instance", instance]
        cmd += list(extra_args)
        if exit_with_parent:
            # This pid, passed explicitly: if this process dies while the gateway is still
            # starting up, the gateway sees it was re-parented and exits instead of serving.
            cmd += ["--exit-with-parent", "--parent-pid", str(os.getpid())]
        log_file = log_path.open("ab")
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a Ctrl-C meant for the caller's terminal does not hit the gateway
                # directly; its owner stops it (or leaves it serving, on purpose).
                start_new_session=True,
            )
        except BaseException:
            log_file.close()
            raise
        gw = cls(proc, settings.gateway_url, log_path, log_file)
        try:
            gw._wait_healthy(timeout, instance)
        except BaseException:
            gw.stop(timeout=5.0)
            raise
        return gw

    def _wait_healthy(self, timeout: float, instance: str) -> None:
        deadline = time.monotonic() + timeout
        with GatewayClient(self.url, timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise GatewayError(
                        f"gateway exited with code {self._proc.returncode} before it was healthy; "
                        f"log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                # Ours only when it echoes our id: another server answering on this port first
                # (our child is still importing) must not pass for it.
                if client.instance() == instance:
                    return
                time.sleep(_POLL_S)
        raise GatewayError(
            f"gateway at {self.url} not healthy after {timeout:.0f} s; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (uvicorn drains in-flight requests), then SIGKILL after ``timeout`` s.

        The default outlasts a multi-worker gateway's own stop (its workers' 10 s drain, then up
        to 5 s more for the supervisor): killed before that, the supervisor never removes its
        metrics folder."""
        try:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5.0)
        finally:
            self._log_file.close()
            if self.pid_path is not None:
                self.pid_path.unlink(missing_ok=True)
        return self._proc.returncode

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def ensure_gateway(
    settings: Settings, *, timeout: float = 30.0, exit_with_parent: bool = False
) -> GatewayProcess | None:
    """Make sure a gateway answers at ``settings.gateway_url``.

    Returns None when one already answers (someone else owns it), else starts one, records its
    pid in ``state_dir/gateway.pid`` and returns it (the caller owns it and should stop it).
    ``exit_with_parent`` (see :meth:`GatewayProcess.start`): a gateway that must not outlive
    this process, even if it dies without stopping it.
    """
    with GatewayClient(settings.gateway_url, timeout=1.0) as client:
        if client.health():
            return None
    if not settings.gateway_autostart:
        raise GatewayError(
            f"no gateway answers at {settings.gateway_url} and BALLAST_GATEWAY_AUTOSTART is off"
        )
    try:
        gw = GatewayProcess.start(settings, timeout=timeout, exit_with_parent=exit_with_parent)
    except GatewayError:
        # Lost a race: another caller started one on this port between our probe and our bind.
        with GatewayClient(settings.gateway_url, timeout=1.0) as client:
            if client.health():
                return None
        raise
    pid_path = settings.state_dir / "gateway.pid"
    # The pid with its start time: only that process is ever signalled for it, not another
    # program (or another checkout's gateway) that got the number after ours exited.
    record = {"pid": gw.pid, "start_ticks": start_ticks(gw.pid)}
    tmp = pid_path.with_name(f"{pid_path.name}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(pid_path)
    gw.pid_path = pid_path
    return gw


def _is_gateway(pid: int) -> bool:
    """Whether ``pid`` runs ``python -m infra.gateway``."""
    try:
        return b"infra.gateway" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _recorded(pid_path: Path) -> tuple[int, int | None] | None:
    """The pid file's pid and start time (None for a file of an older release: a bare pid)."""
    try:
        text = pid_path.read_text().strip()
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if isinstance(data, int):
        return data, None
    if isinstance(data, dict) and isinstance(data.get("pid"), int):
        ticks = data.get("start_ticks")
        return data["pid"], ticks if isinstance(ticks, int) else None
    return None


def stop_recorded_gateway(settings: Settings, *, timeout: float = 20.0) -> int | None:
    """Stop the gateway a release started (:func:`ensure_gateway` records it in
    ``state_dir/gateway.pid`` and leaves it serving the champion); returns its pid, or None when
    no such gateway runs. A pid file naming any other process (the pid recycled: another start
    time, or not a gateway) is only removed."""
    pid_path = settings.state_dir / "gateway.pid"
    recorded = _recorded(pid_path)
    if recorded is None:
        return None
    pid, ticks = recorded

    def ours() -> bool:
        # Checked before every signal: the process may exit, and its pid be reused, meanwhile.
        if ticks is not None and start_ticks(pid) != ticks:
            return False
        return _is_gateway(pid)

    if not ours():
        pid_path.unlink(missing_ok=True)
        return None
    try:
        os.kill(pid, signal.SIGTERM)  # uvicorn drains in-flight requests first
        deadline = time.monotonic() + timeout
        while ours() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if ours():
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it exited between the check and the signal
    except PermissionError as exc:
        raise GatewayError(f"not allowed to stop the gateway pid {pid}: {exc}") from exc
    pid_path.unlink(missing_ok=True)
    return pid

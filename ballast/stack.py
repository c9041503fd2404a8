"""The local Ballast stack: Prefect server and worker, MLflow server, gateway and Prometheus, as
background processes on one machine (``ballast stack up|down|status``).

Plain Python on purpose: no Prefect or MLflow import here (they run as child processes, spawned
with this interpreter), so the CLI stays fast and the core keeps its one-way dependencies.

Every process is started in a session of its own (its process group id is its pid) with its
output in ``<state_dir>/stack/<name>.log`` and a pid file ``<name>.pid`` (JSON: pid, the kernel's
start time of that pid, URLs). ``down`` signals exactly those process groups, after checking the
start time so a recycled pid is never signalled: SIGTERM, then SIGKILL after a bound. A group whose
leader exited while its children still run (a server's workers, holding its port) is stopped the
same way. One line per step goes to ``stack.log`` and to the caller's ``say``.

Order: Prefect server, MLflow, gateway and Prometheus start together (independent of each other);
once the Prefect server is healthy the process work pool is created if missing and the worker
starts. ``up`` is idempotent: a component whose recorded process is alive is left alone. If a
component fails to come up, ``up`` stops what this call started and raises :class:`StackError`
with the tail of its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from ballast.errors import BallastError
from ballast.locks import held_or_refused
from ballast.procinfo import listening_inodes, socket_inodes, start_ticks, stat_fields
from ballast.settings import Settings

__all__ = [
    "COMPONENTS",
    "Component",
    "ComponentStatus",
    "StackConfig",
    "StackError",
    "default_root",
    "deploy_all",
    "down",
    "plan",
    "render_prometheus_config",
    "status",
    "up",
]

#: Start order (``down`` goes in reverse).
COMPONENTS: tuple[str, ...] = (
    "prefect-server",
    "mlflow",
    "gateway",
    "prometheus",
    "prefect-worker",
)
_POLL_S = 0.25
_LOG_TAIL_BYTES = 3000
_REPO = Path(__file__).resolve().parents[1]

Say = Callable[[str], None]


class StackError(BallastError):
    """A stack component could not be started, stopped or inspected."""

    stage = "stack"


@dataclass(frozen=True)
class StackConfig:
    """Where the stack lives and the ports it binds (the gateway's come from Settings)."""

    root: Path
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    prometheus_port: int = 9090
    worker_health_port: int = 8180
    work_pool: str = "ballast-process"
    # The working directory of deployed flow runs (prefect.yaml's pull step reads $BALLAST_HOME).
    project_dir: Path = _REPO
    # Prefect's database: empty means sqlite in the stack folder; a URL such as
    # postgresql+asyncpg://user:pass@127.0.0.1:5432/prefect selects PostgreSQL.
    prefect_database_url: str = ""
    mlflow_workers: int = 1
    components: tuple[str, ...] = COMPONENTS
    start_timeout_s: float = 90.0
    stop_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise StackError(f"unknown components {sorted(unknown)}; known: {list(COMPONENTS)}")
        if "prefect-worker" in self.components and "prefect-server" not in self.components:
            raise StackError("the prefect-worker needs the prefect-server in the same stack")

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"


def default_root(settings: Settings) -> Path:
    """The stack folder: ``<state_dir>/stack``."""
    return (settings.state_dir / "stack").resolve()


@dataclass(frozen=True)
class Component:
    """One process of the stack: how to start it and how to know it is up."""

    name: str
    argv: tuple[str, ...]
    url: str  # what a person opens
    health_url: str
    port: int
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    url: str
    # Not started by this stack, but its health check answers (a gateway a release started).
    answering: bool = False


# -- pure parts: commands and config -----------------------------------------------------------


def _prefect_env(config: StackConfig) -> dict[str, str]:
    """What every Prefect process of this stack gets: the server, the worker (whose flow runs
    inherit it), and the CLI calls that create the work pool and deploy."""
    return {
        # Prefect's profile, sqlite database and result storage stay in the stack folder.
        "PREFECT_HOME": str(config.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def _prefect_server_env(config: StackConfig) -> dict[str, str]:
    """The server's environment: only it gets the database URL (which may hold a password)."""
    env = _prefect_env(config)
    if config.prefect_database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = config.prefect_database_url
    return env


#: Where the Prefect database's URL and credentials may come from; only the server's
#: environment keeps them. Prefect reads each setting under its PREFECT_SERVER_DATABASE_* name
#: and the older PREFECT_API_DATABASE_* alias (URL, password, user, host, ...).
_SERVER_ONLY_ENV = ("BALLAST_STACK_PREFECT_DB",)
_SERVER_ONLY_PREFIXES = ("PREFECT_SERVER_DATABASE_", "PREFECT_API_DATABASE_")


def _server_only(name: str) -> bool:
    return name in _SERVER_ONLY_ENV or name.upper().startswith(_SERVER_ONLY_PREFIXES)


def _without_server_secrets() -> dict[str, str]:
    """This process's environment less the database settings, for every process but the server."""
    return {k: v for k, v in os.environ.items() if not _server_only(k)}


def _mlflow_backend(settings: Settings) -> str:
    # The server shows the registry the flows write: the same store when it is a local sqlite
    # file. A remote tracking URI is someone else's server; ours then gets its own file.
    uri = settings.tracking_uri
    return (
        uri
        if uri.startswith("sqlite:")
        else f"sqlite:///{settings.state_dir.resolve()}/mlflow-server.db"
    )


def plan(settings: Settings, config: StackConfig) -> list[Component]:
    """The components ``config`` asks for, in start order, with their commands (no side effects)."""
    py = sys.executable
    h = config.host
    state = settings.state_dir.resolve()
    everything = {
        "prefect-server": Component(
            name="prefect-server",
            argv=(
                py,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                h,
                "--port",
                str(config.prefect_port),
            ),
            url=f"http://{h}:{config.prefect_port}",
            health_url=f"http://{h}:{config.prefect_port}/api/health",
            port=config.prefect_port,
            env=_prefect_server_env(config),
        ),
        "mlflow": Component(
            name="mlflow",
            argv=(
                py,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                _mlflow_backend(settings),
                "--artifacts-destination",
                str(settings.artifact_root),
                "--host",
                h,
                "--port",
                str(config.mlflow_port),
                "--workers",
                str(config.mlflow_workers),
            ),
            url=f"http://{h}:{config.mlflow_port}",
            health_url=f"http://{h}:{config.mlflow_port}/health",
            port=config.mlflow_port,
            # Its job runner (GenAI evaluation jobs, seven huey processes) is not used here.
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        ),
        "gateway": Component(
            name="gateway",
            argv=(
                py,
                "-m",
                "infra.gateway",
                "--host",
                settings.gateway_host,
                "--port",
                str(settings.gateway_port),
            ),
            url=settings.gateway_url,
            health_url=f"{settings.gateway_url}/healthz",
            port=settings.gateway_port,
            env={"BALLAST_STATE_DIR": str(state)},
        ),
        "prometheus": Component(
            name="prometheus",
            argv=(
                _which("prometheus"),
                f"--config.file={config.root / 'prometheus.yml'}",
                f"--storage.tsdb.path={config.root / 'prometheus-data'}",
                f"--web.listen-address={h}:{config.prometheus_port}",
                "--storage.tsdb.retention.time=7d",
            ),
            url=f"http://{h}:{config.prometheus_port}",
            health_url=f"http://{h}:{config.prometheus_port}/-/ready",
            port=config.prometheus_port,
        ),
        "prefect-worker": Component(
            name="prefect-worker",
            argv=(
                py,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                config.work_pool,
                "--type",
                "process",
                "--with-healthcheck",
            ),
            url=f"http://{h}:{config.prefect_port}/work-pools/work-pool/{config.work_pool}",
            health_url=f"http://{h}:{config.worker_health_port}/health",
            port=config.worker_health_port,
            env={
                **_prefect_env(config),
                "PREFECT_API_URL": config.prefect_api_url,
                "PREFECT_WORKER_WEBSERVER_HOST": h,
                "PREFECT_WORKER_WEBSERVER_PORT": str(config.worker_health_port),
                # Flow runs inherit the worker's environment: the same state folder and gateway
                # as this stack, whatever their working directory.
                "BALLAST_HOME": str(config.project_dir),
                "BALLAST_STATE_DIR": str(state),
                "BALLAST_GATEWAY_HOST": settings.gateway_host,
                "BALLAST_GATEWAY_PORT": str(settings.gateway_port),
            },
        ),
    }
    return [everything[name] for name in COMPONENTS if name in config.components]


def _which(program: str) -> str:
    # Resolved when the command is built; `up` checks every program before it starts any.
    path = shutil.which(program)
    return path or program


def render_prometheus_config(
    template: str, *, gateway_target: str, prometheus_target: str, rules_dir: Path
) -> str:
    """The reference prometheus.yml with this stack's targets and absolute rule-file paths."""
    import yaml

    doc = yaml.safe_load(template)
    if not isinstance(doc, dict) or "scrape_configs" not in doc:
        raise StackError("prometheus.yml template has no scrape_configs")
    doc["rule_files"] = [str((rules_dir / f).resolve()) for f in doc.get("rule_files", [])]
    targets = {"ballast-gateway": gateway_target, "prometheus": prometheus_target}
    for job in doc["scrape_configs"]:
        target = targets.get(job.get("job_name"))
        if target is not None:
            for sc in job.get("static_configs", []):
                sc["targets"] = [target]
    return str(yaml.safe_dump(doc, sort_keys=False))


# -- processes ---------------------------------------------------------------------------------


# Shared with the gateway's pid file (ballast.gateway_process); the old names stay for callers.
_stat = stat_fields
_start_ticks = start_ticks


# Set in every component's environment (a fresh value per start) and inherited by its
# children: how `down` tells a leaderless group's members from a stranger's processes. Not a
# BALLAST_* name, which settings would refuse as unknown in the processes that inherit it.
STACK_TOKEN_ENV = "_BALLAST_STACK_TOKEN"


def _carries(pid: int, token: str) -> bool:
    """Whether process ``pid``'s environment holds this start's token (False when it cannot be
    read: another user's process is not ours either)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{STACK_TOKEN_ENV}={token}".encode() in environ.split(b"\0")


def _members(record: Mapping[str, object]) -> list[int]:
    """Live processes of the recorded process group that are this start's: in the group (and
    session) ``spawn`` gave the leader, started no earlier than it, and carrying the start's
    token (when the pid file has one). The leader itself is one while it runs."""
    pid, ticks, token = record.get("pid"), record.get("start_ticks"), record.get("token")
    if not isinstance(pid, int) or not isinstance(ticks, int):
        return []
    # A pid file written before tokens existed: the checks below without the token (as
    # before), or `down` would forget our own orphans holding their ports.
    token = token if isinstance(token, str) else None
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if (
            fields is not None
            and fields[0] != "Z"
            and int(fields[2]) == pid
            and int(fields[3]) == pid
            and int(fields[19]) >= ticks  # started after the leader: its descendants
            and (token is None or _carries(int(entry.name), token))
        ):
            members.append(int(entry.name))
    return sorted(members)


def _orphans(record: Mapping[str, object]) -> list[int]:
    """Live processes left in the recorded process group after its leader exited.

    ``spawn`` starts every component in a session of its own, so its group and session ids are
    its pid; its children (a server's workers) stay in them after it exits. Empty when the
    leader still runs, when its pid now belongs to another process (that group is not ours), or
    when the start time was never recorded. A member must carry the start's token (when the
    pid file has one): once the whole group has gone, the pid may lead a stranger's session,
    whose own leader may exit in turn, leaving its children in a group of that same number.
    """
    pid, ticks = record.get("pid"), record.get("start_ticks")
    if not isinstance(pid, int) or not isinstance(ticks, int):
        return []
    leader = _stat(pid)
    if leader is not None and (leader[0] != "Z" or int(leader[19]) != ticks):
        return []
    return _members(record)


def _holds_port(record: Mapping[str, object], port: int, host: str | None = None) -> bool:
    """Whether every socket listening on ``port`` is held by the recorded start's processes.

    Between ``up``'s "port free?" check and the server's own bind (seconds of imports) another
    program can take the port; its health endpoint would then answer for ours, and ours would
    fail to bind and exit after ``up`` called it healthy. True where ``/proc/net/tcp`` cannot
    be read (there only the liveness check is left)."""
    listeners = listening_inodes(port, host)
    if listeners is None:
        return True
    if not listeners:
        return False
    ours: set[int] = set()
    for pid in _members(record):
        ours |= socket_inodes(pid)
    return listeners <= ours


def _alive(record: Mapping[str, object]) -> bool:
    """The recorded process still runs: same pid, same start time (not a recycled pid)."""
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    ticks = _start_ticks(pid)
    return ticks is not None and ticks == record.get("start_ticks")


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _port_free(host: str, port: int) -> bool:
    """Nothing listens on ``host:port``: the servers, which bind with SO_REUSEADDR, can bind it.
    ``host`` may be an IPv6 address, bracketed as in a URL or not."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if os.name == "posix":
            # As the servers do: a port whose last connections are in TIME_WAIT (for 60 s after
            # `down`) is free to them. (On Windows the option would let a port be taken over.)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def _require_program(comp: Component) -> None:
    if not os.path.isabs(comp.argv[0]) and shutil.which(comp.argv[0]) is None:
        raise StackError(
            f"{comp.name}: {comp.argv[0]!r} is not installed"
            + (" (apt-get install -y prometheus)" if comp.name == "prometheus" else "")
        )


class _Stack:
    """Pid files and logs of one stack folder."""

    def __init__(self, config: StackConfig, say: Say | None) -> None:
        self.config = config
        self._say = say

    def pid_path(self, name: str) -> Path:
        return self.config.root / f"{name}.pid"

    def log_path(self, name: str) -> Path:
        return self.config.root / f"{name}.log"

    def say(self, message: str) -> None:
        _private_dir(self.config.root)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with (self.config.root / "stack.log").open("a") as fh:
            fh.write(f"{stamp} {message}\n")
        if self._say is not None:
            self._say(message)

    def record(self, name: str) -> dict[str, object] | None:
        try:
            data = json.loads(self.pid_path(name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def spawn(self, comp: Component) -> int:
        _require_program(comp)
        inherited = os.environ if comp.name == "prefect-server" else _without_server_secrets()
        token = secrets.token_hex(16)
        env = {**inherited, **comp.env, STACK_TOKEN_ENV: token}
        log = self.log_path(comp.name).open("ab")
        try:
            proc = subprocess.Popen(
                comp.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.config.project_dir,
                # Its own session: `down` signals the whole group (servers' own children
                # included), and a Ctrl-C in the caller's terminal does not reach it.
                start_new_session=True,
                # What the servers and flow runs write (databases, registry, artefacts, logs,
                # the audit log) is the user's alone, as the admin token already is.
                umask=0o077,
            )
        finally:
            log.close()  # the child holds its own descriptor
        ticks = _start_ticks(proc.pid)
        record = {
            "pid": proc.pid,
            "start_ticks": ticks,
            "token": token,
            "name": comp.name,
            "url": comp.url,
            "health_url": comp.health_url,
            "argv": list(comp.argv),
        }
        tmp = self.pid_path(comp.name).with_suffix(".pid.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.pid_path(comp.name))
        self.say(f"{comp.name}: started pid={proc.pid} log={self.log_path(comp.name)}")
        return proc.pid

    def wait_healthy(self, comp: Component, deadline: float) -> None:
        rec = self.record(comp.name) or {}
        while time.monotonic() < deadline:
            if not _alive(rec):
                raise StackError(
                    f"{comp.name} exited before it was healthy; log {self.log_path(comp.name)}:\n"
                    f"{_tail(self.log_path(comp.name))}"
                )
            # Health after the liveness check, and the port held by this start's processes: a
            # stranger on the port must not pass for ours.
            host = urlsplit(comp.health_url).hostname
            if _healthy(comp.health_url) and _alive(rec) and _holds_port(rec, comp.port, host):
                return
            time.sleep(_POLL_S)
        raise StackError(
            f"{comp.name} not healthy at {comp.health_url} after {self.config.start_timeout_s:.0f} s; "
            f"log {self.log_path(comp.name)}:\n{_tail(self.log_path(comp.name))}"
        )

    def stop(self, name: str) -> bool:
        """Stop the recorded process group; True if something was running."""
        rec = self.record(name)
        path = self.pid_path(name)
        if rec is None:
            path.unlink(missing_ok=True)
            return False
        pid = rec.get("pid")
        if not isinstance(pid, int):
            self.say(f"{name}: not running (stale pid file removed)")
            path.unlink(missing_ok=True)
            return False
        if not _alive(rec):
            return self._stop_orphans(name, pid, rec)
        began = time.monotonic()
        how = self._terminate(pid, lambda: _alive(rec))
        if how == "SIGTERM" and _orphans(rec):
            # The leader is gone but its group still holds children (a server's workers, still
            # draining): they get the same bound, and only this start's processes are signalled.
            # (A SIGKILL to the group at once cut their drain short, and once the leader was
            # reaped the number could name a stranger's group.)
            left = self.config.stop_timeout_s - (time.monotonic() - began)
            return self._stop_orphans(name, pid, rec, timeout=max(1.0, left))
        path.unlink(missing_ok=True)
        self.say(f"{name}: stopped pid={pid} ({how})")
        return True

    def _stop_orphans(
        self, name: str, pgid: int, rec: Mapping[str, object], *, timeout: float | None = None
    ) -> bool:
        """The leader is gone: stop what is left of its group (e.g. mlflow's uvicorn, which
        still holds the port); True if something was."""
        path = self.pid_path(name)
        orphans = _orphans(rec)
        if not orphans:
            self.say(f"{name}: not running (stale pid file removed)")
            path.unlink(missing_ok=True)
            return False
        self.say(f"{name}: pid={pgid} exited; its process group still runs pids {orphans}")
        # The group's id cannot be reused while members remain, so signalling it is safe.
        how = self._terminate(pgid, lambda: bool(_orphans(rec)), timeout)
        left = _orphans(rec)
        if left:
            # The pid file stays: the next `down` tries again, and `up` refuses to start beside.
            self.say(f"{name}: pids {left} of process group {pgid} survived SIGKILL")
            return True
        path.unlink(missing_ok=True)
        self.say(f"{name}: stopped process group {pgid} (pids {orphans}; {how})")
        return True

    def _terminate(
        self, pgid: int, running: Callable[[], bool], timeout: float | None = None
    ) -> str:
        """SIGTERM the group, wait up to ``timeout`` (the stop timeout), then SIGKILL and wait
        up to 5 s more; returns how it ended ("SIGTERM" when that sufficed)."""
        bound = self.config.stop_timeout_s if timeout is None else timeout
        self._signal(pgid, signal.SIGTERM)
        deadline = time.monotonic() + bound
        while running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not running():
            return "SIGTERM"
        self._signal(pgid, signal.SIGKILL)
        kill_deadline = time.monotonic() + 5
        while running() and time.monotonic() < kill_deadline:
            time.sleep(0.05)
        return f"SIGKILL after {bound:.0f} s"

    @staticmethod
    def _signal(pgid: int, sig: signal.Signals, *, quiet: bool = False) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            if not quiet:
                raise StackError(f"not allowed to signal process group {pgid}: {exc}") from exc


# -- the three commands ------------------------------------------------------------------------


def _private_dir(path: Path) -> None:
    """``path`` exists and only its owner can enter it (logs, pid files and Prefect's database
    live in the stack folder)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def _prepare(settings: Settings, config: StackConfig, names: Iterable[str]) -> None:
    _private_dir(config.root)
    names = set(names)
    if "gateway" in names:
        # Created before the gateway reads it (two processes must not race to write it).
        settings.admin_token()
    if "prometheus" in names:
        monitoring = _REPO / "infra" / "monitoring"
        rendered = render_prometheus_config(
            (monitoring / "prometheus.yml").read_text(),
            gateway_target=f"{settings.gateway_host}:{settings.gateway_port}",
            prometheus_target=f"{config.host}:{config.prometheus_port}",
            rules_dir=monitoring,
        )
        (config.root / "prometheus.yml").write_text(rendered)
    if "prefect-server" in names:
        config.prefect_home.mkdir(parents=True, exist_ok=True)


def _ensure_work_pool(stack: _Stack, config: StackConfig) -> None:
    url = f"{config.prefect_api_url}/work_pools/{config.work_pool}"
    try:
        found = httpx.get(url, timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError as exc:
        raise StackError(f"Prefect API at {config.prefect_api_url} unreachable: {exc}") from exc
    if found:
        stack.say(f"work-pool: {config.work_pool} exists")
        return
    # The CLI fills in the process worker's default job template (the REST API would not).
    cmd = [sys.executable, "-m", "prefect", "work-pool", "create", config.work_pool]
    cmd += ["--type", "process"]
    env = {**_without_server_secrets(), **_prefect_env(config)}
    env["PREFECT_API_URL"] = config.prefect_api_url
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise StackError(f"prefect work-pool create failed:\n{result.stdout}{result.stderr}")
    stack.say(f"work-pool: created {config.work_pool} (type process)")


def _one_at_a_time(config: StackConfig) -> contextlib.AbstractContextManager[None]:
    """Hold the stack folder's lock: two ``up`` at once both spawned, and the loser's pid file
    overwrote the winner's, leaving a gateway that ``down`` could not see."""
    busy = StackError(f"another `ballast stack up` or `down` is running on {config.root}")
    return held_or_refused(config.root / "stack.lock", busy)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where ``up`` was: its cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """SIGTERM (``timeout``, a cancelled job), SIGHUP (the terminal closed) and SIGINT (Ctrl-C)
    while ``up`` runs: the first one is raised where ``up`` was, so its cleanup runs; later ones
    are ignored until that cleanup is done (a second Ctrl-C or ``timeout``'s second signal cut
    it short, leaving servers running that no pid file named). In :meth:`deferred` sections (a
    process started but not yet recorded) the first one waits for the section's end. Once
    :meth:`cleaning` (a cleanup after any failure) none interrupts."""

    def __init__(self) -> None:
        self.fired: int | None = None
        self._pending: int | None = None
        self._deferring = False
        self._cleaning = False

    def handler(self, signum: int, frame: object) -> None:
        if self.fired is not None or self._cleaning:
            return  # a cleanup is running: let it finish
        if self._deferring:
            self._pending = signum
            return
        self._raise(signum)

    def _raise(self, signum: int) -> None:
        self.fired = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated(signum)

    def cleaning(self) -> None:
        """A cleanup starts (after a signal or any other failure): signals no longer interrupt."""
        self._cleaning = True

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            pending, self._pending = self._pending, None
            if pending is not None and self.fired is None and not self._cleaning:
                # Raised even when the section failed: the signal decides how `up` exits.
                self._raise(pending)


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopSignals]:
    """:class:`_StopSignals` in force for the block. A signal the launcher ignores stays ignored
    (``nohup``). Main thread only (the only place a handler can be set); elsewhere nothing is
    caught or deferred."""
    guard = _StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    wanted = [signal.SIGTERM, signal.SIGINT]
    wanted += [signal.SIGHUP] if hasattr(signal, "SIGHUP") else []
    previous = {
        sig: signal.signal(sig, guard.handler)
        for sig in wanted
        if signal.getsignal(sig) != signal.SIG_IGN
    }
    try:
        yield guard
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def up(settings: Settings, config: StackConfig, say: Say | None = None) -> list[ComponentStatus]:
    """Start what is not running, wait for every component's health, return their status."""
    try:
        with _one_at_a_time(config), _stop_signals() as signals:
            return _up(settings, config, say, signals)
    except _Terminated as exc:
        raise SystemExit(128 + exc.signum) from None  # what was started is stopped


def _up(
    settings: Settings, config: StackConfig, say: Say | None, signals: _StopSignals
) -> list[ComponentStatus]:
    stack = _Stack(config, say)
    comps = plan(settings, config)
    running = {c.name for c in comps if _alive(stack.record(c.name) or {})}
    for c in comps:
        if c.name not in running:
            continue
        rec = stack.record(c.name) or {}
        if rec.get("health_url", c.health_url) != c.health_url:
            # Left alone it would be waited for at the address asked for, where nothing answers.
            raise StackError(
                f"{c.name} already runs (pid {rec.get('pid')}) at {rec.get('url')}, not at "
                f"{c.url} as asked; use its ports, or `ballast stack down` first"
            )
        stack.say(f"{c.name}: already running pid={rec.get('pid')}")
    to_start = [c for c in comps if c.name not in running]
    for c in to_start:
        _require_program(c)  # a missing program fails before anything starts
        rec = stack.record(c.name) or {}
        orphans = _orphans(rec)
        if orphans:
            raise StackError(
                f"{c.name}: pid {rec.get('pid')} exited but its process group still runs pids "
                f"{orphans}; `ballast stack down` stops them"
            )
        if not _port_free(settings.gateway_host if c.name == "gateway" else config.host, c.port):
            raise StackError(
                f"{c.name}: port {c.port} is in use by a process this stack did not start"
            )
    _prepare(settings, config, (c.name for c in to_start))
    started: list[str] = []
    try:
        # Everything but the worker starts at once; the worker needs the server's API.
        first = [c for c in to_start if c.name != "prefect-worker"]
        for c in first:
            with signals.deferred():  # started is recorded before a stop signal is raised
                stack.spawn(c)
                started.append(c.name)
        deadline = time.monotonic() + config.start_timeout_s
        for c in first:
            stack.wait_healthy(c, deadline)
            stack.say(f"{c.name}: healthy at {c.url}")
        worker = next((c for c in to_start if c.name == "prefect-worker"), None)
        if worker is not None:
            server = next(c for c in comps if c.name == "prefect-server")
            stack.wait_healthy(server, time.monotonic() + config.start_timeout_s)
            _ensure_work_pool(stack, config)
            with signals.deferred():
                stack.spawn(worker)
                started.append(worker.name)
            stack.wait_healthy(worker, time.monotonic() + config.start_timeout_s)
            stack.say(f"{worker.name}: healthy, polling pool {config.work_pool}")
    except BaseException:
        # Leave nothing half-started: what this call started goes; what ran before stays.
        signals.cleaning()
        if signals.fired is not None and started:
            stack.say(f"stopping {', '.join(started)} (further stop signals wait for this)")
        for name in reversed(started):
            stack.stop(name)
        raise
    return status(settings, config)


def down(config: StackConfig, say: Say | None = None) -> list[str]:
    """Stop every component this stack folder records, newest first. Returns the names stopped."""
    stack = _Stack(config, say)
    if not config.root.exists():
        return []
    with _one_at_a_time(config):
        stopped = [name for name in reversed(COMPONENTS) if stack.stop(name)]
    if not stopped:
        stack.say("nothing was running")
    return stopped


def status(settings: Settings, config: StackConfig) -> list[ComponentStatus]:
    """What each component's pid file says, checked against the process table and its health."""
    stack = _Stack(config, None)
    out = []
    for comp in plan(settings, config):
        rec = stack.record(comp.name)
        # A group whose leader exited but whose children still run (and hold the port) runs.
        running = rec is not None and (_alive(rec) or bool(_orphans(rec)))
        pid = rec.get("pid") if rec else None
        url = str(rec.get("url", comp.url)) if rec else comp.url
        health = str(rec.get("health_url", comp.health_url)) if rec else comp.health_url
        out.append(
            ComponentStatus(
                name=comp.name,
                pid=pid if isinstance(pid, int) else None,
                running=running,
                healthy=running and _healthy(health),
                url=url,
                answering=not running and _healthy(health),
            )
        )
    return out


def deploy_all(
    config: StackConfig, say: Say | None = None, names: Sequence[str] = (), timeout: float = 300
) -> None:
    """``prefect deploy`` every deployment in prefect.yaml (or ``names``) to this stack's server,
    creating the process work pool first if it is missing (deploy refuses an unknown pool)."""
    stack = _Stack(config, say)
    _ensure_work_pool(stack, config)
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
    cmd += [a for n in names for a in ("--name", n)] if names else ["--all"]
    env = {**_without_server_secrets(), **_prefect_env(config)}
    env["PREFECT_API_URL"] = config.prefect_api_url
    with stack.log_path("deploy").open("ab") as log:
        result = subprocess.run(
            cmd,
            env=env,
            cwd=config.project_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if result.returncode != 0:
        raise StackError(
            f"prefect deploy failed (exit {result.returncode}); log {stack.log_path('deploy')}:\n"
            f"{_tail(stack.log_path('deploy'))}"
        )
    stack.say(
        f"deployed {', '.join(names) if names else 'all deployments'} to {config.prefect_api_url}"
    )

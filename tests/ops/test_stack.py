"""``ballast stack``: the command plan and Prometheus config (pure), pid-file safety, and the
whole stack as real processes on free ports: up, up again (idempotent), Prometheus scraping the
gateway, down (every process gone, pid files removed)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from ballast.settings import Settings
from ballast.stack import (
    COMPONENTS,
    Component,
    StackConfig,
    StackError,
    down,
    plan,
    render_prometheus_config,
    status,
    up,
)
from tests.conftest import free_port

MONITORING = Path(__file__).resolve().parents[2] / "infra" / "monitoring"


def _bare(name: str, *argv: str, port: int = 0) -> Component:
    """A component for process-lifecycle tests: a command, no URLs to check."""
    return Component(name=name, argv=argv, url="", health_url="", port=port)


def config_for(settings: Settings, **kw: object) -> StackConfig:
    ports = {
        "prefect_port": free_port(),
        "mlflow_port": free_port(),
        "prometheus_port": free_port(),
        "worker_health_port": free_port(),
    }
    return StackConfig(root=settings.state_dir.resolve() / "stack", **{**ports, **kw})  # type: ignore[arg-type]  # test helper: keywords checked by StackConfig


def test_plan_builds_every_command_with_this_stacks_ports_and_state(settings: Settings) -> None:
    config = config_for(settings)
    comps = {c.name: c for c in plan(settings, config)}
    assert list(comps) == list(COMPONENTS)
    server = comps["prefect-server"]
    assert server.argv[1:] == (
        "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(config.prefect_port)
    )  # fmt: skip
    assert server.env["PREFECT_HOME"] == str(config.root / "prefect")
    assert comps["gateway"].health_url == f"{settings.gateway_url}/healthz"
    mlflow = comps["mlflow"].argv
    assert mlflow[mlflow.index("--backend-store-uri") + 1] == settings.tracking_uri
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == str(settings.artifact_root)
    worker = comps["prefect-worker"]
    assert worker.env["PREFECT_API_URL"] == f"http://127.0.0.1:{config.prefect_port}/api"
    # Flow runs inherit the worker's environment: the stack's own state folder and gateway.
    assert worker.env["BALLAST_STATE_DIR"] == str(settings.state_dir.resolve())
    assert worker.env["BALLAST_GATEWAY_PORT"] == str(settings.gateway_port)
    assert Path(worker.env["BALLAST_HOME"], "prefect.yaml").is_file()
    assert f"--web.listen-address=127.0.0.1:{config.prometheus_port}" in comps["prometheus"].argv
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL" not in server.env  # sqlite by default
    pg = config_for(settings, prefect_database_url="postgresql+asyncpg://u@127.0.0.1/prefect")
    assert (
        plan(settings, pg)[0]
        .env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
        .startswith("postgresql+asyncpg://")
    )


def test_config_refuses_unknown_components_and_a_worker_without_server(settings: Settings) -> None:
    with pytest.raises(StackError, match="unknown components"):
        config_for(settings, components=("gateway", "grafana"))
    with pytest.raises(StackError, match="needs the prefect-server"):
        config_for(settings, components=("prefect-worker",))


def test_rendered_prometheus_config_scrapes_this_gateway_and_passes_promtool(
    tmp_path: Path,
) -> None:
    text = render_prometheus_config(
        (MONITORING / "prometheus.yml").read_text(),
        gateway_target="127.0.0.1:18765",
        prometheus_target="127.0.0.1:19090",
        rules_dir=MONITORING,
    )
    doc = yaml.safe_load(text)
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in doc["scrape_configs"]}
    assert jobs == {"ballast-gateway": ["127.0.0.1:18765"], "prometheus": ["127.0.0.1:19090"]}
    assert doc["rule_files"] == [str(MONITORING / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(text)
    exe = shutil.which("promtool")
    assert exe is not None, "promtool is not installed: apt-get install -y prometheus"
    result = subprocess.run(
        [exe, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(StackError, match="scrape_configs"):
        render_prometheus_config(
            "global: {}\n", gateway_target="a:1", prometheus_target="b:2", rules_dir=tmp_path
        )


def test_down_never_signals_a_recycled_pid(settings: Settings) -> None:
    # A pid file whose pid now belongs to another process (different start time) is stale:
    # `down` removes it and leaves that process alone.
    config = config_for(settings)
    config.root.mkdir(parents=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        record = {"pid": bystander.pid, "start_ticks": 1, "name": "gateway", "url": "x"}
        (config.root / "gateway.pid").write_text(json.dumps(record))
        assert down(config) == []
        assert bystander.poll() is None, "down signalled a process it did not start"
        assert not (config.root / "gateway.pid").exists()
    finally:
        bystander.kill()
        bystander.wait(5)


def test_a_pid_file_of_an_exited_process_reads_stopped(settings: Settings) -> None:
    config = config_for(settings)
    config.root.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    record = {"pid": gone.pid, "start_ticks": None, "name": "mlflow", "url": "http://x"}
    (config.root / "mlflow.pid").write_text(json.dumps(record))
    mlflow = next(st for st in status(settings, config) if st.name == "mlflow")
    assert (mlflow.pid, mlflow.running, mlflow.healthy) == (gone.pid, False, False)
    assert down(config) == []
    assert not (config.root / "mlflow.pid").exists()


def test_up_refuses_a_port_someone_else_holds(settings: Settings) -> None:
    import socket

    config = config_for(settings, components=("gateway",))
    with socket.socket() as squatter:
        squatter.bind((settings.gateway_host, settings.gateway_port))
        squatter.listen(1)
        with pytest.raises(StackError, match="in use by a process this stack did not start"):
            up(settings, config)
    assert not (config.root / "gateway.pid").exists()


@pytest.mark.integration
def test_a_component_that_dies_at_start_fails_up_with_its_log_and_stops_the_rest(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prometheus with an unreadable config exits at once; the gateway started beside it must go.
    config = config_for(settings, components=("gateway", "prometheus"), start_timeout_s=30)
    import ballast.stack as stack_mod

    def broken_config(*args: object, **kwargs: object) -> str:
        return "scrape_configs: [ {job_name: x, static_configs: [ {targets: [1]} ] } ]\nbogus: 1\n"

    monkeypatch.setattr(stack_mod, "render_prometheus_config", broken_config)
    started = time.monotonic()
    with pytest.raises(StackError, match="prometheus exited before it was healthy") as info:
        up(settings, config)
    assert time.monotonic() - started < 30
    assert "bogus" in str(info.value)  # the log tail says why
    assert not list(config.root.glob("*.pid"))
    with httpx.Client(trust_env=False, timeout=1) as client, pytest.raises(httpx.HTTPError):
        client.get(f"{settings.gateway_url}/healthz")


# -- the whole stack ---------------------------------------------------------------------------


def _gone(pgid: int) -> bool:
    """No live (non-zombie) process is left in process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return False
    return True


@pytest.fixture
def stack(settings: Settings) -> Iterator[StackConfig]:
    config = config_for(settings, start_timeout_s=120)
    try:
        yield config
    finally:
        down(config)


@pytest.mark.integration
def test_stack_up_is_idempotent_scrapes_the_gateway_and_down_stops_every_process(
    settings: Settings, stack: StackConfig
) -> None:
    lines: list[str] = []
    t0 = time.monotonic()
    first = up(settings, stack, say=lines.append)
    up_seconds = time.monotonic() - t0
    assert [s.name for s in first] == list(COMPONENTS)
    assert all(s.healthy for s in first), first
    pids = {s.name: s.pid for s in first}
    assert all(f"{name}: started pid={pid}" in "\n".join(lines) for name, pid in pids.items())
    assert (stack.root / "stack.log").read_text().count("\n") >= len(lines)

    # Again: nothing new starts.
    lines.clear()
    again = up(settings, stack, say=lines.append)
    assert {s.name: s.pid for s in again} == pids
    assert all("already running" in line for line in lines) and len(lines) == len(COMPONENTS)

    # Prometheus scrapes this gateway and loaded the alert rules.
    prom = f"http://127.0.0.1:{stack.prometheus_port}"
    deadline = time.monotonic() + 30
    value = None
    with httpx.Client(trust_env=False, timeout=5) as client:
        while time.monotonic() < deadline:
            result = client.get(
                f"{prom}/api/v1/query", params={"query": 'up{job="ballast-gateway"}'}
            ).json()["data"]["result"]
            if result:
                value = result[0]
                if value["value"][1] == "1":
                    break
            time.sleep(1)
        assert value is not None and value["value"][1] == "1", value
        assert value["metric"]["instance"] == f"127.0.0.1:{settings.gateway_port}"
        rules = client.get(f"{prom}/api/v1/rules").json()["data"]["groups"]
        assert "BallastGatewayDown" in {r["name"] for g in rules for r in g["rules"]}
        # The worker polls the process pool it created on this server.
        pool = client.get(f"http://127.0.0.1:{stack.prefect_port}/api/work_pools/ballast-process")
        assert pool.status_code == 200 and pool.json()["type"] == "process"

    stopped = down(stack)
    assert stopped == list(reversed(COMPONENTS))
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids.values() if pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in pids.values() if pid), "a process group outlived down"
    assert not list(stack.root.glob("*.pid"))
    assert all(not s.running for s in status(settings, stack))
    assert up_seconds < 120


def test_cli_reports_bad_components_as_a_typed_error_and_status_of_an_empty_stack(
    settings: Settings,
) -> None:
    from typer.testing import CliRunner

    from ballast.cli_stack import stack_app

    runner = CliRunner()
    bad = runner.invoke(stack_app, ["up", "--only", "gateway,grafana"])
    assert bad.exit_code == 2
    assert "unknown components ['grafana']" in bad.output
    # Before: "," started nothing, printed an empty table and exited 0.
    empty = runner.invoke(stack_app, ["up", "--only", ","])
    assert empty.exit_code == 2 and "names no component" in empty.output, empty.output
    assert not (settings.state_dir / "stack").exists(), "a refused `up` left files behind"
    shown = runner.invoke(stack_app, ["status"])
    assert shown.exit_code == 0
    assert shown.output.count("stopped") == len(COMPONENTS)
    gone = runner.invoke(stack_app, ["down"])
    assert gone.exit_code == 0 and "stopped 0 component(s)" in gone.output


# -- secrets, ports in TIME_WAIT, groups whose leader exited -------------------------------------

SECRET_URL = "postgresql+asyncpg://ballast:s3cret@127.0.0.1:5432/prefect"


def test_the_prefect_database_url_reaches_the_server_and_nothing_else(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stack on PostgreSQL whose URL holds a password, also set in this environment
    import ballast.stack as stack_mod

    monkeypatch.setenv("BALLAST_STACK_PREFECT_DB", SECRET_URL)
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", SECRET_URL)
    config = config_for(settings, prefect_database_url=SECRET_URL)
    comps = {c.name: c for c in plan(settings, config)}
    # Then the server is told the URL, and the worker (whose flow runs inherit it) is not
    assert comps["prefect-server"].env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == SECRET_URL
    assert SECRET_URL not in comps["prefect-worker"].env.values()

    # Nor the CLI calls that create the work pool and deploy
    seen: list[dict[str, str]] = []

    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        env = kw["env"]
        assert isinstance(env, dict)
        seen.append(env)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(stack_mod.subprocess, "run", fake_run)
    monkeypatch.setattr(stack_mod.httpx, "get", lambda *a, **kw: httpx.Response(404))
    config.root.mkdir(parents=True)
    stack_mod.deploy_all(config)
    assert len(seen) == 2, "expected `work-pool create` and `deploy`"
    for env in seen:
        assert SECRET_URL not in env.values(), f"a Prefect client got the database URL: {env}"
        assert env["PREFECT_API_URL"] == config.prefect_api_url

    # And a spawned worker does not inherit it from this environment either
    monkeypatch.undo()  # the real subprocess.run again; the environment as the test began
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", SECRET_URL)
    monkeypatch.setenv("BALLAST_STACK_PREFECT_DB", SECRET_URL)
    stack = stack_mod._Stack(config, None)
    printenv = _bare("prefect-worker", "/bin/sh", "-c", "env")
    pid = stack.spawn(printenv)
    deadline = time.monotonic() + 10
    while stack_mod._start_ticks(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    logged = stack.log_path("prefect-worker").read_text()
    assert "PATH=" in logged, "the child printed no environment"
    assert SECRET_URL not in logged, "the worker inherited the database URL"


def test_an_ipv6_host_port_reads_free_or_taken_as_it_is() -> None:
    # Before: always an IPv4 socket, so an IPv6 gateway host read as "port in use".
    from ballast.stack import _port_free

    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    assert _port_free("::1", port) and _port_free("[::1]", port)
    with socket.socket(socket.AF_INET6) as squatter:
        squatter.bind(("::1", port))
        squatter.listen(1)
        assert not _port_free("[::1]", port)


def test_a_port_in_time_wait_reads_free_as_it_is_to_the_servers() -> None:
    # Given a port whose server closed a connection first (TIME_WAIT, 60 s on Linux)
    from ballast.stack import _port_free

    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        srv.listen(1)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = srv.accept()
            conn.close()  # the server side closes first and so keeps the TIME_WAIT
            time.sleep(0.1)
    # The precondition: a bind without SO_REUSEADDR fails.
    with socket.socket() as plain, pytest.raises(OSError, match="ddress already in use"):
        plain.bind(("127.0.0.1", port))
    # Then the pre-check agrees with the servers, which bind with SO_REUSEADDR
    assert _port_free("127.0.0.1", port), "a TIME_WAIT port read as taken"
    # While a port someone listens on still reads taken
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        assert not _port_free("127.0.0.1", squatter.getsockname()[1])


def _spawn_orphaning_leader(config: StackConfig, shell: str) -> tuple[int, int]:
    """A component whose leader starts ``sleep`` in its group and exits (as mlflow's CLI process
    with its uvicorn child). Returns (leader pid, sleeper pid)."""
    from ballast.stack import _Stack

    config.root.mkdir(parents=True, exist_ok=True)
    marker, go = config.root / "sleeper.pid", config.root / "leader-may-exit"
    # The leader waits (at most 10 s) until spawn has recorded its start time, then exits.
    wait = f"i=0; while [ ! -e {go} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done"
    comp = _bare(
        "mlflow", "/bin/sh", "-c", f"{shell} sleep 30 & echo $! > {marker}; {wait}; exit 0"
    )
    leader = _Stack(config, None).spawn(comp)
    go.touch()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text().strip():
            break
        time.sleep(0.05)
    sleeper = int(marker.read_text())
    while _proc_state(leader) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _proc_state(leader) in (None, "Z"), "the leader did not exit"
    assert _proc_state(sleeper) not in (None, "Z"), "the sleeper is not running"
    return leader, sleeper


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def test_down_stops_a_group_whose_leader_exited_and_up_refuses_to_start_beside_it(
    settings: Settings,
) -> None:
    config = config_for(settings, components=("mlflow",))
    leader, sleeper = _spawn_orphaning_leader(config, "")
    try:
        # Status sees the group still running; up will not start a second server beside it
        (mlflow,) = status(settings, config)
        assert mlflow.running, "a group whose children run read as stopped"
        with pytest.raises(StackError, match=f"still runs pids \\[{sleeper}\\]"):
            up(settings, config)
        lines: list[str] = []
        assert down(config, say=lines.append) == ["mlflow"]
        assert _gone(leader), "down left the group's children running"
        assert any(f"stopped process group {leader}" in line for line in lines), lines
        assert not (config.root / "mlflow.pid").exists()
    finally:
        _kill_group(leader)


def test_down_kills_a_leaderless_group_that_ignores_sigterm_after_the_bound(
    settings: Settings,
) -> None:
    config = config_for(settings, components=("mlflow",), stop_timeout_s=1.0)
    leader, _ = _spawn_orphaning_leader(config, "trap '' TERM;")
    try:
        lines: list[str] = []
        started = time.monotonic()
        assert down(config, say=lines.append) == ["mlflow"]
        assert time.monotonic() - started < 10
        assert _gone(leader), "SIGKILL after the bound did not stop the group"
        assert any("SIGKILL after 1 s" in line for line in lines), lines
    finally:
        _kill_group(leader)


def test_down_leaves_the_group_of_a_recycled_pid_alone(settings: Settings) -> None:
    # Given a pid file whose pid now leads someone else's session and group, with a child
    config = config_for(settings)
    config.root.mkdir(parents=True)
    bystander = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        record = {"pid": bystander.pid, "start_ticks": 1, "name": "mlflow", "url": "x"}
        (config.root / "mlflow.pid").write_text(json.dumps(record))
        assert down(config) == []
        assert bystander.poll() is None and not _gone(bystander.pid), "down signalled a stranger"
    finally:
        _kill_group(bystander.pid)
        bystander.wait(5)


def test_down_leaves_a_strangers_leaderless_group_on_a_recycled_pid_alone(
    settings: Settings,
) -> None:
    # Given a pid file whose pid, after our whole group had gone, led a stranger's session
    # whose leader then exited, leaving a child in a group of that same number. Before: down
    # took the child for our orphan and killed it.
    config = config_for(settings)
    config.root.mkdir(parents=True)
    marker = config.root / "stranger-child.pid"
    stranger = subprocess.Popen(
        ["/bin/sh", "-c", f"sleep 30 & echo $! > {marker}; exit 0"], start_new_session=True
    )
    stranger.wait(5)  # reaped: the pid names no process, its group lives on in the child
    child = int(marker.read_text())
    try:
        record = {"pid": stranger.pid, "start_ticks": 1, "token": "ours", "name": "mlflow"}
        (config.root / "mlflow.pid").write_text(json.dumps(record))
        assert down(config) == []
        assert _proc_state(child) not in (None, "Z"), "down killed a stranger's process"
    finally:
        _kill_group(stranger.pid)


def test_down_still_stops_our_leaderless_group_from_a_pid_file_without_a_token(
    settings: Settings,
) -> None:
    # A pid file written before tokens existed (review finding: down called it stale, deleted
    # it and left mlflow's workers holding the port).
    config = config_for(settings, components=("mlflow",))
    leader, _ = _spawn_orphaning_leader(config, "")
    try:
        pid_file = config.root / "mlflow.pid"
        record = json.loads(pid_file.read_text())
        del record["token"]
        pid_file.write_text(json.dumps(record))
        assert down(config) == ["mlflow"]
        assert _gone(leader), "down left our orphans running"
    finally:
        _kill_group(leader)


def test_down_lets_a_groups_children_drain_after_their_leader_exits(settings: Settings) -> None:
    # Given a component whose leader exits at once on SIGTERM while its child needs a second to
    # drain (a server whose workers finish in-flight work). Before: the group got SIGKILL the
    # moment the leader was gone, and the drain was cut short.
    from ballast.stack import _Stack

    config = config_for(settings, components=("mlflow",), stop_timeout_s=10.0)
    config.root.mkdir(parents=True, exist_ok=True)
    drained, ready = config.root / "drained", config.root / "child-ready"
    child = (
        "import signal, sys, time, pathlib\n"
        "def stop(*a):\n"
        "    time.sleep(1.0)\n"
        f"    pathlib.Path({str(drained)!r}).write_text('yes')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(ready)!r}).write_text('yes')\n"
        "time.sleep(60)\n"
    )
    script = config.root / "child.py"
    script.write_text(child)
    comp = _bare("mlflow", "/bin/sh", "-c", f"trap 'exit 0' TERM; {sys.executable} {script} & wait")
    leader = _Stack(config, None).spawn(comp)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the child never started"
        # When the stack is stopped
        assert down(config) == ["mlflow"]
        # Then the child finished its drain, and nothing of the group is left
        assert drained.exists(), "the child was killed before it drained"
        assert _gone(leader)
    finally:
        _kill_group(leader)


def test_the_database_settings_under_every_prefect_name_reach_only_the_server(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prefect reads its database settings under PREFECT_SERVER_DATABASE_* and the older
    # PREFECT_API_DATABASE_* names; before, only the URL under its new name was kept back.
    from ballast.stack import _without_server_secrets

    leaked = {
        "PREFECT_API_DATABASE_CONNECTION_URL": SECRET_URL,
        "PREFECT_SERVER_DATABASE_PASSWORD": "s3cret",
        "PREFECT_API_DATABASE_PASSWORD": "s3cret",
        "PREFECT_SERVER_DATABASE_USER": "ballast",
    }
    for name, value in leaked.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PREFECT_SERVER_API_PORT", "4200")  # other server settings may pass
    env = _without_server_secrets()
    assert not set(leaked) & set(env)
    assert env["PREFECT_SERVER_API_PORT"] == "4200"


def test_what_components_write_and_the_stack_folder_are_the_users_alone(
    settings: Settings,
) -> None:
    from ballast.stack import _Stack, _start_ticks

    config = config_for(settings, components=("mlflow",))
    config.root.mkdir(parents=True, exist_ok=True, mode=0o755)
    config.root.chmod(0o755)
    written = config.root / "written-by-child"
    stack = _Stack(config, None)
    stack.say("a line")  # the folder is made private on first use
    comp = _bare("mlflow", "/bin/sh", "-c", f"echo x > {written}")
    pid = stack.spawn(comp)
    deadline = time.monotonic() + 10
    while _start_ticks(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert written.stat().st_mode & 0o777 == 0o600
    assert config.root.stat().st_mode & 0o777 == 0o700


def test_up_checks_every_program_before_it_starts_any(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the gateway was started, then stopped again when prometheus turned out missing.
    import ballast.stack as stack_mod

    monkeypatch.setattr(stack_mod, "_which", lambda program: "no-such-prometheus-binary")
    config = config_for(settings, components=("gateway", "prometheus"))
    with pytest.raises(StackError, match="'no-such-prometheus-binary' is not installed"):
        up(settings, config)
    assert not list(config.root.glob("*.pid")) and not (config.root / "gateway.log").exists()


def test_up_refuses_a_running_component_at_other_ports_than_asked(settings: Settings) -> None:
    # A component already running on other ports would be waited for at the new ones, where
    # nothing answers (a 90 s wait, then a failure that did not say why).
    config = config_for(settings, components=("mlflow",))
    config.root.mkdir(parents=True, exist_ok=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        from ballast.stack import _start_ticks

        record = {
            "pid": sleeper.pid,
            "start_ticks": _start_ticks(sleeper.pid),
            "name": "mlflow",
            "url": "http://127.0.0.1:5999",
            "health_url": "http://127.0.0.1:5999/health",
        }
        (config.root / "mlflow.pid").write_text(json.dumps(record))
        with pytest.raises(
            StackError, match=r"already runs .* at http://127\.0\.0\.1:5999, not at"
        ):
            up(settings, config)
        assert sleeper.poll() is None  # left running: it is not this call's to stop
    finally:
        sleeper.kill()
        sleeper.wait(5)


def test_the_port_counts_as_ours_only_while_our_processes_hold_it(settings: Settings) -> None:
    from ballast.stack import _holds_port, _Stack

    config = config_for(settings, components=("mlflow",))
    config.root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    serve = f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(30)"
    stack = _Stack(config, None)
    pid = stack.spawn(_bare("mlflow", sys.executable, "-c", serve, port=port))
    try:
        rec = stack.record("mlflow")
        assert rec is not None
        deadline = time.monotonic() + 10
        while not _holds_port(rec, port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _holds_port(rec, port), "our own listener did not count as ours"
        assert not _holds_port(rec, free_port()), "a port nobody listens on counted as ours"
        with socket.socket() as stranger:
            stranger.bind(("127.0.0.1", 0))
            stranger.listen(1)
            assert not _holds_port(rec, stranger.getsockname()[1]), "a stranger's port was ours"
        # A listener on the same port at another address is not in the way of ours (review:
        # an unrelated [::1] listener kept the component from ever being called healthy).
        with socket.socket(socket.AF_INET6) as elsewhere:
            elsewhere.bind(("::1", port))
            elsewhere.listen(1)
            assert _holds_port(rec, port, "127.0.0.1")
            assert not _holds_port(rec, port, "::1"), "the other address's listener was ours"
    finally:
        _kill_group(pid)


@pytest.mark.integration
def test_up_never_takes_a_server_that_took_the_port_after_the_check_for_ours(
    settings: Settings,
) -> None:
    # Given another program that binds the gateway's port after `up` checked it was free but
    # before our gateway (still importing) binds it, and answers its health check. Before: `up`
    # called the component healthy, and ours exited a moment later ("address in use").
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    config = config_for(settings, components=("gateway",), start_timeout_s=30)
    servers: list[http.server.HTTPServer] = []

    def squat() -> None:
        deadline = time.monotonic() + 20
        while not (config.root / "gateway.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        srv = http.server.HTTPServer((settings.gateway_host, settings.gateway_port), Healthy)
        servers.append(srv)
        srv.serve_forever(poll_interval=0.1)

    squatter = threading.Thread(target=squat, daemon=True)
    squatter.start()
    try:
        with pytest.raises(StackError, match="gateway exited before it was healthy"):
            up(settings, config)
        assert servers, "the stranger never bound the port"
        assert not list(config.root.glob("*.pid"))
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        down(config)


_UP_WITH_A_STUBBORN_COMPONENT = """
import sys
from pathlib import Path
from ballast import stack
from ballast.settings import Settings

root, port = Path(sys.argv[1]), int(sys.argv[2])
comp = stack.Component(
    name="mlflow",
    argv=("/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"),
    url="",
    health_url=f"http://127.0.0.1:{port}/never",
    port=port,
)
stack.plan = lambda settings, config: [comp]
config = stack.StackConfig(
    root=root, components=("mlflow",), start_timeout_s=60, stop_timeout_s=2
)
stack.up(Settings(state_dir=root.parent), config, say=lambda m: print(m, flush=True))
"""


@pytest.mark.parametrize("second", ["SIGTERM", "SIGINT"])
def test_a_second_stop_signal_does_not_cut_ups_cleanup_short(
    settings: Settings, tmp_path: Path, second: str
) -> None:
    # Given `up` waiting for a component that ignores SIGTERM (its stop takes the 2 s bound)
    root = settings.state_dir.resolve() / "stack"
    launcher = subprocess.Popen(
        [sys.executable, "-c", _UP_WITH_A_STUBBORN_COMPONENT, str(root), str(free_port())],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (root / "mlflow.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        record = json.loads((root / "mlflow.pid").read_text())
        # When it is told to stop, and again while it stops what it started (Ctrl-C twice;
        # `timeout`, then a supervisor's second signal). Before: the second one ended the
        # launcher mid-cleanup, and the component ran on with its pid file left behind.
        launcher.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        launcher.send_signal(getattr(signal, second))
        out, _ = launcher.communicate(timeout=30)
        # Then it still stopped what it started, and exits as for the first signal
        assert launcher.returncode == 128 + signal.SIGTERM, out
        assert _gone(record["pid"]), "the component outlived `up`"
        assert not (root / "mlflow.pid").exists()
        assert "stopping mlflow" in out and "mlflow: stopped" in out, out
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(5)
        with contextlib.suppress(OSError, ValueError, KeyError):
            _kill_group(json.loads((root / "mlflow.pid").read_text())["pid"])

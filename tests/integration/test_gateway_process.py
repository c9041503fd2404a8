"""The gateway as a real process on 127.0.0.1: GatewayProcess, GatewayClient, real HTTP, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ballast.errors import GatewayError
from ballast.gateway_client import GatewayClient, GatewayHTTPError
from ballast.gateway_process import GatewayProcess, ensure_gateway, stop_recorded_gateway
from ballast.procinfo import start_ticks
from ballast.serving import Deployment, VersionSpec
from ballast.settings import Settings
from infra.gateway.testing import build_mlp_onnx, spec_for

pytestmark = pytest.mark.integration

MODEL = "m"
ROW = [0.25] * 30


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[VersionSpec, VersionSpec]:
    root = tmp_path_factory.mktemp("artefacts")
    one = spec_for(build_mlp_onnx(root / "one.onnx", seed=11), "1")
    two = spec_for(build_mlp_onnx(root / "two.onnx", seed=12), "2")
    return one, two


def seen(client: GatewayClient, n: int) -> Counter[str]:
    return Counter(client.predict(MODEL, [ROW]).version for _ in range(n))


def test_gateway_process_serves_champion_and_canary(
    settings: Settings, versions: tuple[VersionSpec, VersionSpec], tmp_path: Path
) -> None:
    one, two = versions
    with (
        GatewayProcess.start(
            settings, log_path=tmp_path / "gw.log", timeout=30, exit_with_parent=True
        ) as gw,
        GatewayClient(settings.gateway_url, settings.admin_token()) as client,
    ):
        assert gw.running()
        assert client.health()
        assert not client.ready()
        assert client.get_deployment() is None

        champion = Deployment(model=MODEL, champion=one)
        assert client.set_deployment(champion) == champion
        assert client.ready()
        answer = client.predict(MODEL, [ROW, ROW])
        assert answer.version == "1"
        assert len(answer.predictions) == 2

        canary = Deployment(model=MODEL, champion=one, canary=two, canary_weight=50)
        assert client.set_deployment(canary) == canary
        split = seen(client, 200)
        assert set(split) == {"1", "2"}
        assert 60 < split["2"] < 140  # 50 % of 200, about 7 standard deviations wide

        # The same key always lands on the same version.
        keyed = {client.predict(MODEL, [ROW], key="user-7").version for _ in range(20)}
        assert len(keyed) == 1

        client.set_deployment(canary.model_copy(update={"canary_weight": 0}))
        assert seen(client, 100) == {"1": 100}

        # A refused change says why and leaves the deployment in force.
        tampered = canary.model_copy(update={"canary": two.model_copy(update={"sha256": "0" * 64})})
        with pytest.raises(GatewayHTTPError, match="sha256 mismatch") as info:
            client.set_deployment(tampered)
        assert info.value.status_code == 409
        assert client.get_deployment() == canary.model_copy(update={"canary_weight": 0})

        with pytest.raises(GatewayHTTPError) as bad:
            client.predict(MODEL, [ROW[:-1]])
        assert bad.value.status_code == 422
        assert bad.value.version == "1"

        stats = client.stats()
        assert stats["versions"]["1"]["requests"] > 100
        # Single-row calls of this small model are quick: timed, and batched on the event loop.
        timed = stats["versions"]["1"]["model_call_us"]
        assert 0 < timed < 250 and stats["versions"]["1"]["batching"] == "loop"
        metrics = httpx.get(f"{settings.gateway_url}/metrics", trust_env=False).text
        assert 'ballast_deployment_info{model="m",role="canary",version="2"} 1.0' in metrics

        with GatewayClient(settings.gateway_url, "wrong-token") as intruder:
            with pytest.raises(GatewayHTTPError) as denied:
                intruder.get_deployment()
            assert denied.value.status_code == 401

        started = time.monotonic()
        code = gw.stop(timeout=10)
        assert time.monotonic() - started < 10
        assert code == 0
    with GatewayClient(settings.gateway_url, timeout=1.0) as after:
        assert not after.health()
    assert "deployment.applied" in (tmp_path / "gw.log").read_text()
    assert settings.admin_token() not in (tmp_path / "gw.log").read_text()


def test_sigterm_drains_in_flight_requests(
    settings: Settings, versions: tuple[VersionSpec, VersionSpec], tmp_path: Path
) -> None:
    one, _ = versions
    slow = Deployment(model=MODEL, champion=one.model_copy(update={"fault": "latency"}))
    gw = GatewayProcess.start(
        settings,
        log_path=tmp_path / "gw.log",
        extra_args=["--fault-latency-ms", "3000"],
        exit_with_parent=True,
    )
    try:
        with GatewayClient(settings.gateway_url, settings.admin_token()) as admin:
            admin.set_deployment(slow)
            with ThreadPoolExecutor(4) as pool:
                clients = [GatewayClient(settings.gateway_url, timeout=10) for _ in range(4)]
                futures = [pool.submit(c.predict, MODEL, [ROW]) for c in clients]
                deadline = time.monotonic() + 5
                while admin.stats()["versions"]["1"]["inflight"] < 4:
                    assert time.monotonic() < deadline, "requests never arrived"
                    time.sleep(0.02)
                started = time.monotonic()
                code = gw.stop(timeout=10)
                stopped_in = time.monotonic() - started
                answers = [f.result(timeout=10) for f in futures]
                for c in clients:
                    c.close()
    finally:
        gw.stop()
    assert code == 0
    assert [a.version for a in answers] == ["1"] * 4  # every in-flight request was answered
    assert 0.5 < stopped_in < 10  # it waited for the 3 s requests, within the bound


def test_ensure_gateway_starts_once_and_records_its_pid(settings: Settings) -> None:
    started = ensure_gateway(settings)
    assert started is not None
    try:
        pid_file = settings.state_dir / "gateway.pid"
        record = json.loads(pid_file.read_text())
        assert record == {"pid": started.pid, "start_ticks": start_ticks(started.pid)}
        assert ensure_gateway(settings) is None  # already answering: someone else's
    finally:
        started.stop()
    assert not pid_file.exists()


def test_stop_recorded_gateway_never_signals_a_process_that_got_the_pid_later(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a pid file whose pid now runs another program that even looks like a gateway (a
    # stranger's, or another checkout's gateway, started after ours exited)
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "--log", "x/infra.gateway.log"]
    )
    try:
        pid_file = settings.state_dir / "gateway.pid"
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        ticks = start_ticks(stranger.pid)
        assert ticks is not None
        pid_file.write_text(json.dumps({"pid": stranger.pid, "start_ticks": ticks - 1}))
        # Then it is left alone and the stale file removed
        assert stop_recorded_gateway(settings, timeout=2) is None
        assert stranger.poll() is None, "a recycled pid was signalled"
        assert not pid_file.exists()
        # While the process the file was written for is stopped
        pid_file.write_text(json.dumps({"pid": stranger.pid, "start_ticks": ticks}))
        assert stop_recorded_gateway(settings, timeout=5) == stranger.pid
        assert stranger.wait(5) == -signal.SIGTERM
    finally:
        stranger.kill()
        stranger.wait(5)


def test_start_fails_fast_with_the_log_when_the_port_is_taken(
    settings: Settings, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((settings.gateway_host, settings.gateway_port))
        squatter.listen(1)
        started = time.monotonic()
        with pytest.raises(GatewayError, match="exited with code") as info:
            GatewayProcess.start(
                settings, log_path=tmp_path / "gw.log", timeout=20, exit_with_parent=True
            )
        assert time.monotonic() - started < 20
    assert "address already in use" in str(info.value).lower()


def test_another_server_answering_on_the_port_never_passes_for_the_one_started(
    settings: Settings, tmp_path: Path
) -> None:
    # A server that answers /healthz with 200 (another gateway someone started a moment
    # before): our child is still importing when it answers, then cannot bind and exits.
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer((settings.gateway_host, settings.gateway_port), Healthy)
    serving = threading.Thread(target=other.serve_forever, daemon=True)
    serving.start()
    try:
        with pytest.raises(GatewayError, match="exited with code"):
            GatewayProcess.start(
                settings, log_path=tmp_path / "gw.log", timeout=20, exit_with_parent=True
            )
        # ensure_gateway reads that as "someone else serves here", and records no pid of ours.
        assert ensure_gateway(settings) is None
        assert not (settings.state_dir / "gateway.pid").exists()
    finally:
        other.shutdown()
        other.server_close()


_ORPHANING_PARENT = """
import sys, time
from ballast.gateway_process import GatewayProcess
from ballast.settings import get_settings
gw = GatewayProcess.start(get_settings(), exit_with_parent=True)
print(gw.pid, flush=True)
time.sleep(60)
"""


def test_gateway_stops_itself_when_its_parent_is_killed(settings: Settings) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHANING_PARENT], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        gateway_pid = int(parent.stdout.readline())
        with GatewayClient(settings.gateway_url, timeout=10.0) as client:
            assert client.health()
            parent.kill()  # SIGKILL: no chance to stop its child
            parent.wait(5)
            deadline = time.monotonic() + 10
            while client.health() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not client.health()
        while _alive(gateway_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(gateway_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)


# The starter dies right after spawning, while the gateway is still importing: the moment a
# gateway that records its parent only once up would take init for its parent, and serve forever.
_STARTER_DYING_AT_SPAWN = """
import os, subprocess
from ballast.gateway_process import GatewayProcess
from ballast.settings import get_settings

real_popen = subprocess.Popen

def popen_then_die(*args, **kwargs):
    proc = real_popen(*args, **kwargs)
    print(proc.pid, flush=True)
    os._exit(0)

subprocess.Popen = popen_then_die
GatewayProcess.start(get_settings(), exit_with_parent=True)
"""


def test_a_gateway_whose_starter_dies_while_it_starts_up_does_not_serve(
    settings: Settings,
) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", _STARTER_DYING_AT_SPAWN], stdout=subprocess.PIPE, text=True
    )
    assert starter.stdout is not None
    gateway_pid = int(starter.stdout.readline())
    try:
        assert starter.wait(10) == 0
        deadline = time.monotonic() + 20
        while _alive(gateway_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(gateway_pid), "an orphaned gateway kept running"
        with GatewayClient(settings.gateway_url, timeout=10.0) as client:
            assert not client.health()
        assert "gone before the gateway started" in (settings.state_dir / "gateway.log").read_text()
    finally:
        if _alive(gateway_pid):
            os.kill(gateway_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it is gone for our purposes once it is no longer running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False

"""`ballast demo` (what `make demo` runs) as a person runs it: a real process, checked end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ballast.gateway_client import GatewayClient
from ballast.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_demo_promotes_release_1_rolls_back_release_2_and_leaves_other_state_alone(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    sentinel = state / "mine.txt"
    sentinel.write_text("the user's own state")
    env = {
        **os.environ,
        "BALLAST_STATE_DIR": str(state),
        "BALLAST_KEYRING_PATH": str(tmp_path / "keys" / "keyring.json"),
        "BALLAST_SIGNING_KEY_PATH": str(tmp_path / "keys" / "signing-key.pem"),
        "BALLAST_EPOCHS": "20",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "COLUMNS": "200",
        # A user's own environment (a cluster's): the demo is a dev sandbox all the same, and
        # approves by policy (else it would refuse auto, or wait for a person).
        "BALLAST_ENVIRONMENT": "prod",
        "BALLAST_APPROVAL_POLICY": "manual",
    }
    env.pop("BALLAST_GATEWAY_PORT", None)
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # the demo turns telemetry off itself
    proc = subprocess.run(
        [sys.executable, "-m", "ballast.cli", "demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "demo passed" in out
    assert "Failed to send telemetry" not in out, "a local run must not phone home"
    assert "promoted" in out and "rolled_back" in out
    assert (state / "demo" / "mlflow.db").exists(), "the demo keeps its own registry"
    assert sentinel.read_text() == "the user's own state"


# The demo with its dataset and release flows stubbed: it starts its real gateway, then "releases"
# for a minute, long enough to be stopped from outside.
_STUBBED_DEMO = """
import signal, sys, time
# As a terminal starts it: the test runner itself may run with SIGHUP ignored (nohup), and the
# demo rightly leaves an ignored SIGHUP ignored.
signal.signal(signal.SIGHUP, signal.SIG_DFL)
import ballast.cli_data, flows.release
from rich.console import Console
from ballast.demo import run_demo
from ballast.settings import get_settings

def release_flow(**kw):
    print("releasing", flush=True)
    time.sleep(60)

ballast.cli_data.prepare_dataset = lambda s: "file:///unused"
flows.release.release_flow = release_flow
sys.exit(run_demo(get_settings(), fault="errors", console=Console(stderr=True)))
"""


@pytest.mark.parametrize(
    ("sig", "code"),
    [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGHUP, 128 + signal.SIGHUP),
     (signal.SIGKILL, -signal.SIGKILL)],
    ids=["SIGTERM", "SIGHUP", "SIGKILL"],
)  # fmt: skip
def test_a_demo_stopped_from_outside_leaves_no_gateway_serving(
    sig: signal.Signals, code: int, settings: Settings, tmp_path: Path
) -> None:
    # Given a demo whose gateway serves while a release runs (`timeout ballast demo`, a closed
    # terminal, or a hard kill)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    demo = subprocess.Popen(
        [sys.executable, "-c", _STUBBED_DEMO],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    gateway_pid = None
    try:
        assert demo.stdout is not None
        assert demo.stdout.readline().strip() == "releasing", "the demo did not get going"
        gateway_pid = json.loads((settings.state_dir / "gateway.pid").read_text())["pid"]
        with GatewayClient(settings.gateway_url, timeout=10.0) as client:
            assert client.health()
            # When the demo gets the signal
            demo.send_signal(sig)
            assert demo.wait(20) == code
            # Then its gateway stops, by the demo's hand or (SIGKILL) by its own
            deadline = time.monotonic() + 15
            while _running(gateway_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _running(gateway_pid), "the demo's gateway outlived the demo"
            assert not client.health()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(5)
        if gateway_pid is not None and _running(gateway_pid):
            os.kill(gateway_pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

"""`ballast demo` (what `make demo` runs) as a person runs it: a real process, checked end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
    }
    env.pop("BALLAST_GATEWAY_PORT", None)
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
    assert "promoted" in out and "rolled_back" in out
    assert (state / "demo" / "mlflow.db").exists(), "the demo keeps its own registry"
    assert sentinel.read_text() == "the user's own state"

"""The gateway a release leaves running: `ballast stack down` stops it by its recorded pid."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ballast.gateway_process import stop_recorded_gateway
from ballast.settings import Settings

# A stand-in with "infra.gateway" in its command line, as `python -m infra.gateway` has.
_STAND_IN = [sys.executable, "-c", "import time; time.sleep(60)", "infra.gateway"]


def _record(settings: Settings, pid: int) -> None:
    # Until the child has exec'd, its command line is still the forking parent's.
    deadline = time.monotonic() + 10
    while b"sleep" not in Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.01)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "gateway.pid").write_text(f"{pid}\n")


def test_the_recorded_gateway_is_stopped_and_its_pid_file_removed(settings: Settings) -> None:
    proc = subprocess.Popen(_STAND_IN)
    try:
        _record(settings, proc.pid)
        assert stop_recorded_gateway(settings, timeout=10) == proc.pid
        assert proc.wait(10) == -15  # SIGTERM: a real gateway drains first
        assert not (settings.state_dir / "gateway.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_pid_file_naming_another_process_stops_nothing(settings: Settings) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _record(settings, other.pid)  # a recycled pid, say
        assert stop_recorded_gateway(settings, timeout=10) is None
        assert other.poll() is None, "a process that is not a gateway must be left alone"
        assert not (settings.state_dir / "gateway.pid").exists()
    finally:
        other.kill()
        other.wait(10)
    assert stop_recorded_gateway(settings) is None  # no pid file: nothing to do

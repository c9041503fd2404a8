"""How a child that opened a native artefact ended, in words (ballast.compile.probe); the real
crash, failure and timeout are in tests/integration/test_aotinductor.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ballast.compile.probe import _CHILD, NATIVE_BACKENDS, probe_load, probe_problem
from ballast.distributed import pid_alive
from ballast.errors import CompileError

PKG = Path("/tmp/x/model.pt2")


def test_a_child_that_ran_the_artefact_is_no_problem() -> None:
    assert probe_problem("aotinductor", PKG, 0, "probe ok\n", "noise on stderr") is None


@pytest.mark.parametrize(
    ("code", "stdout", "says"),
    [
        (-11, "", "crashed: the process that loaded it was killed by SIGSEGV"),
        (-6, "", "crashed: the process that loaded it was killed by SIGABRT"),
        (-200, "", "crashed: the process that loaded it was killed by signal 200"),
        (1, "", "failed: the process that loaded it exited with status 1"),
        (0, "", "failed: the process that loaded it exited without running the artefact"),
    ],
)
def test_every_other_ending_is_named(code: int, stdout: str, says: str) -> None:
    stderr = "Fatal Python error: x\n  File y\n\nExtension modules: numpy, torch._C (total: 2)\n"
    problem = probe_problem("tensorrt", PKG, code, stdout, stderr)
    assert problem is not None
    assert problem.startswith(f"opening the tensorrt artefact model.pt2 {says} (torch ")
    assert problem.endswith("its last lines: Fatal Python error: x | File y")


def test_the_childs_last_lines_are_bounded_and_stdout_stands_in_for_an_empty_stderr() -> None:
    stderr = "".join(f"line {i}\n" for i in range(1000))
    problem = probe_problem("aotinductor", PKG, 1, "", stderr)
    assert problem is not None and "line 999" in problem and "line 987 " not in problem
    assert len(problem) < 2300
    assert (probe_problem("aotinductor", PKG, 1, "only here\n", "") or "").endswith("only here")
    assert (probe_problem("aotinductor", PKG, 1, "", "") or "").endswith("no output")


def test_only_native_runtimes_are_probed() -> None:
    assert {"aotinductor", "tensorrt"} == NATIVE_BACKENDS
    assert "onnxruntime" not in NATIVE_BACKENDS


def test_a_crash_report_keeps_its_header_and_innermost_frames_however_deep() -> None:
    frames = "".join(f'  File "f{i}.py", line {i} in frame{i}\n' for i in range(40))
    stderr = f"Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n{frames}"
    problem = probe_problem("aotinductor", PKG, -11, "", "loading...\n" + stderr) or ""
    said = problem.split("its last lines: ", 1)[1]
    assert said.startswith("Fatal Python error: Segmentation fault | Current thread 0x1")
    assert 'File "f0.py", line 0 in frame0' in said and "frame39" not in said


def test_a_hung_child_and_everything_it_started_are_killed_at_the_limit(tmp_path: Path) -> None:
    # A stand-in interpreter: it starts a grandchild that keeps the pipes open, then hangs.
    # Killing only the child left communicate() waiting for the grandchild.
    pidfile = tmp_path / "grandchild.pid"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\necho loading >&2\nsleep 60\n")
    fake.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(CompileError, match=r"did not finish within 1 s; its last lines: loading"):
        probe_load(PKG, "aotinductor", timeout_s=1.0, python=str(fake))
    assert time.monotonic() - started < 30
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(grandchild):
        time.sleep(0.05)
    assert not pid_alive(grandchild), "the grandchild outlived the probe"


def test_a_report_leaves_out_the_parent_watcher_and_anchors_on_a_timeout_dump() -> None:
    watcher = (
        "Thread 0x2 (most recent call first):\n"
        '  File "probe.py", line 150 in _exit_with_parent\n'
        '  File "threading.py", line 1010 in run\n'
    )
    main = 'Current thread 0x1 (most recent call first):\n  File "_package.py", line 1045 in _load_aoti\n'
    crash = f"Fatal Python error: Segmentation fault\n\n{watcher}\n{main}"
    said = (probe_problem("aotinductor", PKG, -11, "", crash) or "").split("last lines: ")[1]
    assert said == (
        "Fatal Python error: Segmentation fault | Current thread 0x1 (most recent call first): | "
        'File "_package.py", line 1045 in _load_aoti'
    )
    hang = (
        "Timeout (0:04:30)!\n"
        + watcher
        + 'Thread 0x1 (most recent call first):\n  File "x.py", line 3 in sleep_forever\n'
    )
    said = (probe_problem("aotinductor", PKG, -9, "", hang) or "").split("last lines: ")[1]
    assert said.startswith("Timeout (0:04:30)! | Thread 0x1") and "sleep_forever" in said


def test_a_child_whose_parent_died_while_it_started_ends_at_once(tmp_path: Path) -> None:
    # The parent's pid comes from the parent: read in the child it could already be init's,
    # and the child would then wait for a parent that never goes.
    gone = subprocess.Popen(["true"])
    gone.wait()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "aotinductor", str(PKG), "auto", "60", str(gone.pid)],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 70, done.stderr[-2000:]


def test_processes_left_by_a_finished_child_are_killed_and_do_not_hold_the_probe(
    tmp_path: Path,
) -> None:
    # A stand-in interpreter that answers at once but leaves a process holding its pipes:
    # the probe must not wait for it (up to its whole limit) nor leave it behind.
    pidfile = tmp_path / "left.pid"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\necho 'probe ok'\nexit 0\n")
    fake.chmod(0o755)
    started = time.monotonic()
    probe_load(PKG, "aotinductor", timeout_s=30.0, python=str(fake))
    assert time.monotonic() - started < 10, "waited for the leftover's pipes"
    left = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(left):
        time.sleep(0.05)
    assert not pid_alive(left), "a process the child started outlived the probe"

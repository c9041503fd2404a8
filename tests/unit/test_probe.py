"""How a child that opened a native artefact ended, in words (ballast.compile.probe); the real
crash, failure and timeout are in tests/integration/test_aotinductor.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ballast.compile.probe import NATIVE_BACKENDS, probe_problem

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

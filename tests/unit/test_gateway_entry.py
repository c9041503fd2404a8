"""`python -m infra.gateway`'s command line: --exit-with-parent with the starter's pid given."""

from __future__ import annotations

import os

import pytest

from ballast.settings import Settings
from infra.gateway import __main__ as entry


def test_a_gateway_whose_starter_already_died_exits_before_serving(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a starter pid that is not this process's parent (it died; this one was re-parented)
    starter = os.getppid() + 1_000_000
    # When the gateway starts with it
    code = entry.main(["--exit-with-parent", "--parent-pid", str(starter), "--port", "1"])
    # Then it exits at once, saying why, without binding anything
    assert code == 0
    assert f"parent {starter} gone" in capsys.readouterr().err


def test_workers_get_the_supervisors_pid_not_its_parents() -> None:
    argv = ["--workers", "2", "--exit-with-parent", "--parent-pid", "41", "--seed", "3"]
    assert entry._worker_args(argv) == ["--seed", "3"]
    assert entry._worker_args(["--parent-pid=41", "--port=9", "--seed", "3"]) == ["--seed", "3"]

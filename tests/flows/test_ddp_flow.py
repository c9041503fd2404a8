"""The release flow with data-parallel training (BALLAST_TRAIN_WORLD_SIZE=2: torchrun, two gloo
processes on CPU): one registered, promoted version; and a rank killed mid-run fails the release
at the train stage with nothing registered and the champion untouched.

Tests in this module run in order and share one state (the module's release_env).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ballast.distributed import PID_DIR
from ballast.errors import DistributedTrainingError
from ballast.release import ALIAS_CHAMPION
from ballast.settings import Settings, get_settings
from flows.release import release_flow
from model_registry import Registry

pytestmark = pytest.mark.flow


@pytest.fixture
def two_ranks(release_env: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("BALLAST_TRAIN_WORLD_SIZE", "2")
    monkeypatch.setenv("BALLAST_DEVICE", "cpu")
    monkeypatch.setenv("BALLAST_TRAIN_TIMEOUT_S", "180")
    get_settings.cache_clear()
    try:
        yield get_settings()
    finally:
        get_settings.cache_clear()


def _mentions(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def _versions(s: Settings) -> list[tuple[str, tuple[str, ...]]]:
    reg = Registry(s.tracking_uri, s.artifact_root)
    return [(v.version, tuple(sorted(v.aliases))) for v in reg.list_versions(s.model_name)]


def test_a_two_process_release_registers_and_promotes_exactly_one_version(
    two_ranks: Settings,
) -> None:
    import mlflow

    s = two_ranks
    assert _versions(s) == []
    report = release_flow()
    assert report.outcome == "promoted", report
    versions = _versions(s)
    assert [v for v, _ in versions] == [report.version], "one release, one version"
    reg = Registry(s.tracking_uri, s.artifact_root)
    champion = reg.get_by_alias(s.model_name, ALIAS_CHAMPION)
    assert champion is not None and champion.version == report.version
    assert champion.run_id is not None
    run = mlflow.MlflowClient(s.tracking_uri).get_run(champion.run_id)
    assert run.data.params["world_size"] == "2", "the candidate must come from the DDP path"
    assert report.metrics["accuracy"] >= 0.9
    # The private launch folders (they held the plaintext arrays) are gone.
    assert not list((s.state_dir / "ddp").glob("ddp-*"))


def test_a_rank_killed_mid_run_fails_the_release_with_nothing_registered(
    two_ranks: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Slow epochs (and a different seed, so no checkpoint of the first test is reused) give
    # time to kill rank 1 after rank 0 has checkpointed an epoch.
    monkeypatch.setenv("BALLAST_TRAIN_PAUSE_AFTER_EPOCH_S", "0.5")
    monkeypatch.setenv("BALLAST_SEED", "11")
    get_settings.cache_clear()
    s = get_settings()
    before = _versions(s)
    assert before, "runs after the first test's promotion"
    work, ckpt = s.state_dir / "ddp", s.state_dir / "checkpoints"
    earlier = set(ckpt.glob("*/epoch-*.pt"))
    killed: list[int] = []

    def kill_rank_1() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pid_files = list(work.glob(f"ddp-*/{PID_DIR}/rank-1.pid"))
            if pid_files and set(ckpt.glob("*/epoch-*.pt")) - earlier:  # rank 0 checkpointed
                pid = int(pid_files[0].read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    started = time.monotonic()
    with pytest.raises(DistributedTrainingError, match=r"\[train\] data-parallel training failed"):
        release_flow()
    killer.join(timeout=5)
    assert killed, "rank 1 was never killed"
    assert time.monotonic() - started < 120, "a dead rank must fail the run quickly"
    assert _versions(s) == before, "nothing registered, no alias moved"
    assert not [p for p in Path("/proc").glob("[0-9]*") if _mentions(p, str(work))], (
        "no torchrun or rank of the launch survives"
    )
    assert not list(work.glob("ddp-*")), "no launch folder (plaintext) left behind"

"""Data-parallel training for real: torchrun, two gloo processes on CPU, the bundled
breast-cancer data. Parity with one process, a rank killed mid-run, and resume after a crash."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ballast.checkpoint import CheckpointStore
from ballast.datasets_extra import bundled_dataset
from ballast.distributed import PID_DIR, Topology, sweep_stale_runs, train_data_parallel
from ballast.errors import DistributedTrainingError
from ballast.training import TrainResult, train

pytestmark = pytest.mark.integration

EPOCHS = 8
CONFIG: dict[str, Any] = {
    "epochs": EPOCHS,
    "learning_rate": 3e-3,
    "batch_size": 64,
    "seed": 5,
    "model": "tabular-mlp",
    "model_params": {"hidden": 16},
    "patience": None,
}
#: Launch, rendezvous and imports of two ranks take seconds on a 2-core box; training less.
LAUNCH_TIMEOUT_S = 120.0


def ddp(work: Path, *, checkpoint_dir: Path | None = None, pause: float = 0.0) -> TrainResult:
    return train_data_parallel(
        bundled_dataset("breast-cancer"),
        topology=Topology(2),
        work_dir=work,
        device="cpu",
        checkpoint_dir=checkpoint_dir,
        timeout_s=LAUNCH_TIMEOUT_S,
        threads=1,
        pause_after_epoch_s=pause,
        **CONFIG,
    )


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """One uninterrupted 2-process run, shared by the parity and resume tests."""
    return ddp(tmp_path_factory.mktemp("ddp-work"))


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (torchrun and ranks carry the spec path)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def checkpoint_epochs(root: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in root.glob("*/epoch-*.pt"))


def kill_rank_after(
    work: Path, ckpt: Path, rank: int, min_epoch: int
) -> tuple[threading.Thread, Callable[[], int]]:
    """A thread that SIGKILLs ``rank`` once rank 0 has checkpointed ``min_epoch``; returns it and a
    getter for the last checkpointed epoch at the moment of the kill."""
    seen: dict[str, int] = {}

    def killer() -> None:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while time.monotonic() < deadline:
            pid_files = list(work.glob(f"ddp-*/{PID_DIR}/rank-{rank}.pid"))
            epochs = checkpoint_epochs(ckpt)
            if pid_files and epochs and epochs[-1] >= min_epoch:
                seen["epoch"] = epochs[-1]
                os.kill(int(pid_files[0].read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    return t, lambda: seen.get("epoch", -1)


def abort_rank_at_start(work: Path, rank: int, times: int) -> tuple[threading.Thread, list[int]]:
    """A thread that SIGABRTs ``rank`` of the first ``times`` launches as soon as it has written
    its pid (before the process group forms: gloo's own aborts happen there); returns it and the
    pids it aborted."""
    aborted: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while len(aborted) < times and time.monotonic() < deadline:
            for pid_file in work.glob(f"ddp-*/{PID_DIR}/rank-{rank}.pid"):
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pid_file.read_text())
                    if pid not in aborted:
                        os.kill(pid, signal.SIGABRT)
                        aborted.append(pid)
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    return t, aborted


def test_a_rank_crashing_while_the_ranks_connect_is_relaunched_once(
    tmp_path: Path, two_ranks: TrainResult, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "work"
    # Given a launch whose rank 1 aborts before the first epoch (as gloo does on some connection
    # races; CI saw one),
    killer, aborted = abort_rank_at_start(work, rank=1, times=1)
    with caplog.at_level("WARNING", logger="ballast.distributed"):
        result = ddp(work)
    killer.join(timeout=5)
    # then the launch is relaunched once, says so, and trains as if nothing had happened.
    assert len(aborted) == 1
    assert any("relaunch=1 reason=SIGABRT" in r.getMessage() for r in caplog.records)
    assert [r.epoch for r in result.history] == list(range(1, EPOCHS + 1))
    assert result.metrics["accuracy"] == two_ranks.metrics["accuracy"]
    assert processes_mentioning(str(work)) == [] and list(work.iterdir()) == []


def test_a_rank_that_crashes_at_every_start_fails_after_two_relaunches(tmp_path: Path) -> None:
    work = tmp_path / "work"
    killer, aborted = abort_rank_at_start(work, rank=1, times=3)
    with pytest.raises(DistributedTrainingError, match="relaunched 2 times") as info:
        ddp(work)
    killer.join(timeout=5)
    assert len(aborted) == 3, "a third relaunch must not happen"
    assert info.value.root_signal == signal.SIGABRT
    assert "rank killed by SIGABRT" in str(info.value)
    assert processes_mentioning(str(work)) == [] and list(work.iterdir()) == []


def test_two_gloo_ranks_reach_the_accuracy_of_one_process_on_the_same_data_and_seed(
    two_ranks: TrainResult,
) -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        single = train(bundled_dataset("breast-cancer"), device="cpu", **CONFIG)
    finally:
        torch.set_num_threads(old)
    assert len(two_ranks.history) == len(single.history) == EPOCHS
    # The same band: held-out accuracy within 2 points, and well above chance.
    assert abs(two_ranks.metrics["accuracy"] - single.metrics["accuracy"]) <= 0.02, (
        two_ranks.metrics,
        single.metrics,
    )
    assert two_ranks.metrics["accuracy"] >= 0.9
    # Global batches are shared out and gradients averaged, so the trajectory is one process's
    # up to float summation order.
    for a, b in zip(two_ranks.history, single.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4), a.epoch
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-4), a.epoch
    assert two_ranks.params["world_size"] == "2" and "world_size" not in single.params
    # The returned model is the one the metrics describe, on CPU and ready for compile.
    assert not two_ranks.model.training
    assert next(two_ranks.model.parameters()).device.type == "cpu"
    x, y = two_ranks.split.x_test, two_ranks.split.y_test
    with torch.no_grad():
        pred = two_ranks.model(torch.as_tensor(x)).argmax(1).numpy()
    assert float((pred == y).mean()) == pytest.approx(two_ranks.metrics["accuracy"])


def test_a_rank_killed_mid_run_fails_the_whole_launch_cleanly(tmp_path: Path) -> None:
    work, ckpt = tmp_path / "work", tmp_path / "ckpt"
    # Given a 2-rank run slowed to ~0.5 s per epoch, when rank 1 is SIGKILLed after epoch 1,
    killer, _ = kill_rank_after(work, ckpt, rank=1, min_epoch=1)
    started = time.monotonic()
    with pytest.raises(DistributedTrainingError, match=r"\[train\] data-parallel training failed"):
        ddp(work, checkpoint_dir=ckpt, pause=0.5)
    elapsed = time.monotonic() - started
    killer.join(timeout=5)
    # then the launch fails within bounded time (far from the 120 s timeout: nothing hung),
    assert elapsed < 60, f"took {elapsed:.1f} s to notice a dead rank"
    # no process of the launch survives, and no result nor plaintext is left behind.
    assert processes_mentioning(str(work)) == []
    assert list(work.iterdir()) == [], "the private launch folder must be removed"
    epochs = checkpoint_epochs(ckpt)
    assert epochs and epochs[-1] < EPOCHS, "rank 0 checkpointed, and the run did not finish"


def test_a_crashed_run_resumes_from_rank_zeros_checkpoint_and_ends_like_an_uninterrupted_one(
    tmp_path: Path, two_ranks: TrainResult
) -> None:
    work, ckpt = tmp_path / "work", tmp_path / "ckpt"
    # Given a run whose rank 0 (the one that checkpoints) is killed after epoch 2,
    killer, killed_at = kill_rank_after(work, ckpt, rank=0, min_epoch=2)
    with pytest.raises(DistributedTrainingError):
        ddp(work, checkpoint_dir=ckpt, pause=0.5)
    killer.join(timeout=5)
    last = checkpoint_epochs(ckpt)[-1]
    assert 2 <= killed_at() <= last < EPOCHS
    # when it is launched again with the same configuration,
    resumed = ddp(work, checkpoint_dir=ckpt)
    # then it continues after the last checkpoint instead of starting over,
    assert resumed.resumed_from_epoch == last
    assert len(resumed.history) == EPOCHS
    # and ends where the uninterrupted 2-rank run ended (RNG and optimiser state were restored).
    assert [r.epoch for r in resumed.history] == list(range(1, EPOCHS + 1))
    for a, b in zip(resumed.history, two_ranks.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-6), a.epoch
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-6), a.epoch
    assert resumed.metrics["accuracy"] == two_ranks.metrics["accuracy"]
    assert resumed.checkpoint_key == two_ranks.checkpoint_key
    # Only the configuration's own folder exists: one key, one writer.
    assert [p.name for p in ckpt.iterdir()] == [
        CheckpointStore(ckpt, resumed.checkpoint_key).dir.name
    ]


def test_a_launcher_killed_mid_run_takes_the_ranks_and_the_plaintext_with_it(
    tmp_path: Path,
) -> None:
    # Given a launch from a process of its own (the release's train task) that gets SIGKILLed
    # after epoch 1 (OOM killer, a pod deleted): its cleanup never runs,
    import subprocess
    import sys

    work, ckpt = tmp_path / "work", tmp_path / "ckpt"
    script = (
        "import sys; from pathlib import Path\n"
        "from ballast.datasets_extra import bundled_dataset\n"
        "from ballast.distributed import Topology, train_data_parallel\n"
        "train_data_parallel(bundled_dataset('breast-cancer'), topology=Topology(2),"
        f" work_dir=Path({str(work)!r}), device='cpu', checkpoint_dir=Path({str(ckpt)!r}),"
        f" timeout_s={LAUNCH_TIMEOUT_S}, threads=1, pause_after_epoch_s=1.0, epochs={EPOCHS},"
        " learning_rate=3e-3, batch_size=64, seed=5, model='tabular-mlp',"
        " model_params={'hidden': 16}, patience=None)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not checkpoint_epochs(ckpt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpoint_epochs(ckpt), "the launch never checkpointed"
        launcher.kill()
        launcher.wait(10)
        # then the ranks notice within seconds and stop (they did train on, to the end),
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and processes_mentioning(str(work)):
            time.sleep(0.1)
        assert processes_mentioning(str(work)) == []
        assert checkpoint_epochs(ckpt)[-1] < EPOCHS, "the orphaned ranks trained on"
        # and the private folder with the decrypted arrays does not outlive the next launch's
        # sweep (rank 0 removes it itself when it sees the launcher go first).
        sweep_stale_runs(work)
        assert list(work.glob("ddp-*")) == [], "the plaintext outlived the launch"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in processes_mentioning(str(work)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

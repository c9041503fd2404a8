"""A training process killed with SIGKILL mid-run resumes from its last checkpoint when started
again, and ends with exactly the weights of a run that was never interrupted (CPU determinism)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ballast.datasets_extra import bundled_dataset
from ballast.training import TrainResult, train

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--dataset", "breast-cancer", "--epochs", "10", "--patience", "0", "--seed", "5"]
ARGS += ["--device", "cpu", "--threads", "1", "--param", "hidden=16"]


def cli(*extra: str | Path) -> list[str]:
    return [sys.executable, "-m", "ballast.training_cli", *ARGS, *map(str, extra)]


def finish(cmd: list[str]) -> dict[str, Any]:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def uninterrupted() -> TrainResult:
    """The same configuration as ARGS, trained in this process without checkpoints."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as --threads 1 does in the subprocess
    try:
        return train(
            bundled_dataset("breast-cancer"),
            model_params={"hidden": 16},
            epochs=10,
            learning_rate=3e-3,
            batch_size=64,
            seed=5,
            patience=None,
            device="cpu",
        )
    finally:
        torch.set_num_threads(old)


def checkpoint_epochs(root: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in root.glob("*/epoch-*.pt"))


def test_killed_run_resumes_from_its_last_checkpoint_and_matches_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    # Given a run slowed to ~0.4 s per epoch so it can be caught mid-way,
    proc = subprocess.Popen(
        cli("--checkpoint-dir", ckpt_dir, "--pause-after-epoch", "0.4"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not checkpoint_epochs(ckpt_dir) or max(checkpoint_epochs(ckpt_dir)) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no second checkpoint within 60 s"
            time.sleep(0.05)
        # when it is killed outright after its second checkpoint,
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
    last = max(checkpoint_epochs(ckpt_dir))
    assert 2 <= last < 10, f"killed too late to prove anything (last checkpoint {last})"

    # then starting it again resumes after the last checkpoint instead of starting over,
    resumed = finish(cli("--checkpoint-dir", ckpt_dir, "--weights-out", tmp_path / "resumed.pt"))
    assert resumed["resumed_from_epoch"] == last
    assert resumed["epochs_run"] == 10
    # and it ends exactly where a run that was never interrupted ends: every epoch's losses
    # and the final weights are bit-identical (the RNG and optimiser states were restored).
    fresh = uninterrupted()
    assert resumed["history"] == [
        [r.epoch, r.train_loss, r.val_loss, r.val_accuracy] for r in fresh.history
    ]
    assert resumed["metrics"] == fresh.metrics
    a = torch.load(tmp_path / "resumed.pt", weights_only=True)
    b = fresh.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    # No temporary of the interrupted write survives the resume.
    assert not list(ckpt_dir.glob("*/*.tmp"))

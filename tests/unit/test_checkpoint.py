"""Checkpoint store: content keys, atomic writes, newest-first reading, pruning, refusal of strays."""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from ballast.checkpoint import SEAL_HEADER, CheckpointStore, config_key, seal, unseal
from ballast.errors import TrainingError

KEY = config_key(dataset_sha256="ab" * 32, hyperparameters={"hidden": 8, "lr": 0.01}, seed=1)


def state(value: float) -> dict[str, object]:
    return {"weights": torch.full((3,), value), "best": value, "history": [[1, value]]}


def test_config_key_ignores_key_order_and_changes_with_any_input() -> None:
    same = config_key(dataset_sha256="ab" * 32, hyperparameters={"lr": 0.01, "hidden": 8}, seed=1)
    assert same == KEY and len(KEY) == 64
    others = {
        config_key(dataset_sha256="cd" * 32, hyperparameters={"hidden": 8, "lr": 0.01}, seed=1),
        config_key(dataset_sha256="ab" * 32, hyperparameters={"hidden": 9, "lr": 0.01}, seed=1),
        config_key(dataset_sha256="ab" * 32, hyperparameters={"hidden": 8, "lr": 0.01}, seed=2),
    }
    assert KEY not in others and len(others) == 3


def test_empty_store_has_no_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEY)
    assert store.latest() is None and store.epochs() == []


def test_latest_returns_the_newest_epoch_and_old_ones_are_pruned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEY, keep=2)
    for epoch in (1, 2, 3):
        store.save(epoch, state(float(epoch)))
    assert store.epochs() == [2, 3], "only the newest two are kept"
    ckpt = store.latest()
    assert ckpt is not None and ckpt.epoch == 3
    assert torch.equal(ckpt.state["weights"], torch.full((3,), 3.0))
    assert ckpt.state["history"] == [[1, 3.0]] and ckpt.state["key"] == KEY


def test_files_live_in_a_folder_named_by_the_key(tmp_path: Path) -> None:
    path = CheckpointStore(tmp_path, KEY).save(1, state(1.0))
    assert path == tmp_path / KEY[:16] / "epoch-000001.pt"


def test_a_killed_writers_temporary_is_ignored_and_removed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEY)
    store.save(1, state(1.0))
    torn = store.dir / ".epoch-000002.pt.x1y2.tmp"
    torn.write_bytes(b"\x80half a pickle")
    hour_ago = time.time() - 3700
    os.utime(torn, (hour_ago, hour_ago))
    live = store.dir / ".epoch-000002.pt.a1b2.tmp"  # another process, saving right now
    live.write_bytes(b"\x80being written")
    ckpt = store.latest()
    assert ckpt is not None and ckpt.epoch == 1
    assert not torn.exists(), "the temporary of an interrupted write must be cleaned up"
    # Before: removed too, and that process's rename then failed with FileNotFoundError.
    assert live.exists()


def test_stale_later_epochs_never_push_out_the_checkpoints_a_new_run_writes(
    tmp_path: Path,
) -> None:
    # Files of epochs 9 and 10 that do not verify: the run starts over. Before, each new
    # checkpoint was deleted as soon as written (9 and 10 outranked it), so a crash restarted
    # from scratch again.
    store = CheckpointStore(tmp_path, KEY, keep=2)
    store.dir.mkdir(parents=True)
    for epoch in (9, 10):
        (store.dir / f"epoch-{epoch:06d}.pt").write_bytes(b"corrupt")
    assert store.latest() is None
    for epoch in (1, 2, 3):
        store.save(epoch, state(float(epoch)))
    assert store.epochs() == [2, 3]
    ckpt = store.latest()
    assert ckpt is not None and ckpt.epoch == 3


def test_an_unreadable_newest_file_falls_back_to_the_one_before(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEY)
    store.save(1, state(1.0))
    (store.dir / "epoch-000002.pt").write_bytes(b"not a checkpoint")
    ckpt = store.latest()
    assert ckpt is not None and ckpt.epoch == 1


def test_a_file_from_another_configuration_is_not_resumed(tmp_path: Path) -> None:
    other = config_key(dataset_sha256="ef" * 32, hyperparameters={}, seed=0)
    CheckpointStore(tmp_path, other).save(4, state(4.0))
    # Same 16-character folder name is (astronomically) unlikely; force it to test the guard.
    stray = tmp_path / KEY[:16]
    stray.mkdir()
    os.replace(tmp_path / other[:16] / "epoch-000004.pt", stray / "epoch-000004.pt")
    assert CheckpointStore(tmp_path, KEY).latest() is None


def test_loading_never_unpickles_code(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEY)
    store.dir.mkdir(parents=True)
    # A pickle that would build an arbitrary object on a full unpickle, correctly sealed so that
    # only torch.load's weights_only stands in its way: it refuses it.
    buf = io.BytesIO()
    torch.save({"format": 1, "key": KEY, "epoch": 1, "x": Path("/")}, buf)
    (store.dir / "epoch-000001.pt").write_bytes(seal(buf.getvalue()))
    assert store.latest() is None


def test_a_bit_flipped_in_tensor_data_is_caught_and_the_epoch_before_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given two checkpoints, the newest with a flipped bit inside a tensor's bytes (torch.load
    # does not check the zip's CRCs: unsealed, this loads 1.0 as 2.0 without a word)
    store = CheckpointStore(tmp_path, KEY)
    store.save(1, {"weights": torch.zeros(1000)})
    newest = store.save(2, {"weights": torch.ones(1000)})
    raw = bytearray(newest.read_bytes())
    i = raw.find(bytes.fromhex("0000803f"))  # float32 1.0, little-endian
    assert i > 0, "tensor data not found in the file"
    raw[i + 3] ^= 0x7F  # 1.0 -> 2.0
    newest.write_bytes(bytes(raw))
    # When the store is read, then the corrupted file is skipped with a warning
    with caplog.at_level(logging.WARNING, logger="ballast.checkpoint"):
        ckpt = store.latest()
    assert ckpt is not None and ckpt.epoch == 1, "a corrupted checkpoint must not be resumed"
    assert torch.equal(ckpt.state["weights"], torch.zeros(1000))
    assert "sha256 does not match" in caplog.text


@pytest.mark.parametrize("cut", [0, 10, len(SEAL_HEADER) + 5, -1])
def test_a_truncated_checkpoint_falls_back_to_the_one_before(tmp_path: Path, cut: int) -> None:
    store = CheckpointStore(tmp_path, KEY)
    store.save(1, state(1.0))
    newest = store.save(2, state(2.0))
    newest.write_bytes(newest.read_bytes()[:cut])
    ckpt = store.latest()
    assert ckpt is not None and ckpt.epoch == 1


def test_an_unsealed_checkpoint_of_an_older_version_is_not_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Decision: a file without a digest cannot be verified, so it is skipped like a corrupt one
    # (the run starts over: deterministic for a seed, it only costs time).
    store = CheckpointStore(tmp_path, KEY)
    store.dir.mkdir(parents=True)
    torch.save({**state(1.0), "format": 1, "key": KEY, "epoch": 1}, store.dir / "epoch-000001.pt")
    with caplog.at_level(logging.WARNING, logger="ballast.checkpoint"):
        assert store.latest() is None
    assert "cannot be verified" in caplog.text


def test_files_are_sealed_with_the_sha256_of_what_torch_saved(tmp_path: Path) -> None:
    path = CheckpointStore(tmp_path, KEY).save(1, state(1.0))
    raw = path.read_bytes()
    assert raw.startswith(SEAL_HEADER)
    loaded = torch.load(io.BytesIO(unseal(raw)), weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["weights"], torch.full((3,), 1.0))
    with pytest.raises(TrainingError, match="does not match"):
        unseal(raw[:-1] + bytes([raw[-1] ^ 1]))


def test_save_failure_leaves_no_file_behind(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEY)

    class Unpicklable:
        def __reduce__(self) -> tuple[object, ...]:
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        store.save(1, {"x": Unpicklable()})
    assert list(store.dir.iterdir()) == []


def test_clear_removes_the_configurations_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, KEY)
    store.save(1, state(1.0))
    store.clear()
    assert not store.dir.exists() and store.latest() is None


@pytest.mark.parametrize(
    ("key", "keep", "epoch", "message"),
    [
        ("../../etc", 2, 1, "hex digest"),
        (KEY, 0, 1, "keep must be >= 1"),
        (KEY, 2, 0, "epoch must be >= 1"),
    ],
)
def test_bad_arguments_are_training_errors(
    tmp_path: Path, key: str, keep: int, epoch: int, message: str
) -> None:
    with pytest.raises(TrainingError, match=message):
        CheckpointStore(tmp_path, key, keep=keep).save(epoch, state(1.0))

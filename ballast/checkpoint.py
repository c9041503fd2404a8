"""Per-epoch training checkpoints, written atomically, found again by a content key.

A checkpoint belongs to one training configuration: :func:`config_key` hashes the dataset's sha256,
every hyperparameter and the seed, and :class:`CheckpointStore` keeps that configuration's files in
``<root>/<key[:16]>/``. A run started again with the same configuration finds the newest
checkpoint and resumes from it; any other configuration starts fresh, in its own folder.

Each file is written to a temporary name in the same folder, flushed and fsynced, then renamed
over ``epoch-NNNNNN.pt``: a process killed mid-write (even with SIGKILL) leaves either the previous
checkpoints or the new one, never a torn file under a checkpoint's name. Leftover temporaries
are removed when the store is opened. Files are read back with ``torch.load(weights_only=True)``,
so a checkpoint can hold tensors, numbers, strings, lists and dicts, and never runs code on load.

``torch.load`` does not check the CRCs of the zip it reads, so a flipped bit in tensor data would
load silently. Each file is therefore sealed (:func:`seal`): a fixed header, the sha256 of the
``torch.save`` bytes, then those bytes, all in the one atomically renamed file. A file whose
digest does not match, or that has none (written before checkpoints were sealed, or not by this
store), cannot be verified and is skipped like an unreadable one: the run resumes from the epoch
before, or starts over. Training is deterministic for a seed, so starting over costs time only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ballast.errors import TrainingError

log = logging.getLogger(__name__)

_FILE = re.compile(r"^epoch-(\d{6})\.pt$")
_TMP_SUFFIX = ".tmp"
# A temporary file older than this is a killed run's (a save writes and renames in seconds).
_STALE_TMP_S = 3600.0
#: Bumped when the layout of the saved state changes, so an old file is not misread.
FORMAT_VERSION = 1
#: The start of every sealed checkpoint file; the 32-byte sha256 of the rest follows it.
SEAL_HEADER = b"BALLAST-CHECKPOINT sha256\n"
_DIGEST_BYTES = 32


def seal(data: bytes) -> bytes:
    """``data`` (what ``torch.save`` wrote) behind :data:`SEAL_HEADER` and its sha256."""
    return SEAL_HEADER + hashlib.sha256(data).digest() + data


def unseal(sealed: bytes) -> bytes:
    """The ``torch.save`` bytes inside a sealed file, after checking their sha256.

    Raises :class:`TrainingError` saying why the contents cannot be trusted.
    """
    if not sealed:
        raise TrainingError("empty file")
    if not sealed.startswith(SEAL_HEADER):
        raise TrainingError(
            "no sha256 seal (written before checkpoints were sealed, or not by Ballast), "
            "so its contents cannot be verified"
        )
    start = len(SEAL_HEADER) + _DIGEST_BYTES
    if len(sealed) < start:
        raise TrainingError("truncated inside its seal")
    data = sealed[start:]
    if hashlib.sha256(data).digest() != sealed[len(SEAL_HEADER) : start]:
        raise TrainingError("sha256 does not match its contents (corrupted or truncated)")
    return data


def config_key(*, dataset_sha256: str, hyperparameters: Mapping[str, Any], seed: int) -> str:
    """sha256 over the dataset hash, the hyperparameters (key order does not matter) and the seed."""
    payload = json.dumps(
        {
            "dataset_sha256": dataset_sha256,
            "hyperparameters": dict(hyperparameters),
            "seed": seed,
            "format": FORMAT_VERSION,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    epoch: int
    state: dict[str, Any]
    path: Path


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse to open a directory: best effort.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointStore:
    """The checkpoints of one configuration (``key``) under ``root``; keeps the newest ``keep``."""

    def __init__(self, root: Path, key: str, *, keep: int = 2) -> None:
        if not re.fullmatch(r"[0-9a-f]{16,64}", key):
            raise TrainingError(f"checkpoint key must be a hex digest, got {key!r}")
        if keep < 1:
            raise TrainingError(f"keep must be >= 1, got {keep}")
        self.key = key
        self.keep = keep
        self.dir = Path(root) / key[:16]

    def _files(self) -> list[tuple[int, Path]]:
        """(epoch, path) of every checkpoint file, newest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _FILE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found, reverse=True)

    def epochs(self) -> list[int]:
        """Epochs that have a checkpoint, oldest first."""
        return sorted(e for e, _ in self._files())

    def _remove_temporaries(self) -> None:
        # Only a killed run's: another process saving into this folder right now (a retry
        # started while a timed-out attempt still runs) must not lose its temporary file.
        if self.dir.is_dir():
            stale = time.time() - _STALE_TMP_S
            for p in self.dir.glob(f"*{_TMP_SUFFIX}"):
                with contextlib.suppress(OSError):
                    if p.stat().st_mtime < stale:
                        p.unlink(missing_ok=True)

    def save(self, epoch: int, state: Mapping[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``epoch`` (atomic), then drop all but the newest."""
        import torch

        if epoch < 1:
            raise TrainingError(f"checkpoint epoch must be >= 1, got {epoch}")
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"epoch-{epoch:06d}.pt"
        payload = {**state, "format": FORMAT_VERSION, "key": self.key, "epoch": epoch}
        buf = io.BytesIO()
        torch.save(payload, buf)  # before any file exists: a failure here leaves nothing behind
        sealed = seal(buf.getvalue())
        fd, tmp_name = tempfile.mkstemp(dir=self.dir, prefix=f".{final.name}.", suffix=_TMP_SUFFIX)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(sealed)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.dir)
        # Files of later epochs are left from a run this one superseded (it resumed from an
        # earlier epoch because they did not verify): they would outrank, and so delete, every
        # checkpoint this run writes. The newest ``keep`` up to this epoch stay.
        older = [p for e, p in self._files() if e <= epoch]
        for old in [p for e, p in self._files() if e > epoch] + older[self.keep :]:
            old.unlink(missing_ok=True)
        return final

    def latest(self) -> Checkpoint | None:
        """The newest readable checkpoint of this configuration, or None when there is none.

        A file that cannot be read or verified (a disk error, a flipped bit, a truncated file, a
        file without a seal, a file from another format version) is skipped with a warning in
        favour of the one before it; temporaries of a killed run are removed.
        """
        import torch

        self._remove_temporaries()
        for epoch, path in self._files():
            try:
                data = unseal(path.read_bytes())
            except (OSError, TrainingError) as exc:
                log.warning("skipping unverifiable checkpoint %s: %s", path, exc)
                continue
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as exc:
                log.warning("skipping unreadable checkpoint %s: %s", path, exc)
                continue
            if not isinstance(state, dict) or (
                state.get("format"),
                state.get("key"),
                state.get("epoch"),
            ) != (FORMAT_VERSION, self.key, epoch):
                log.warning("skipping checkpoint %s: written for another configuration", path)
                continue
            return Checkpoint(epoch=epoch, state=state, path=path)
        return None

    def clear(self) -> None:
        """Remove this configuration's checkpoints (and the folder when it is then empty)."""
        self._remove_temporaries()
        for _, p in self._files():
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()

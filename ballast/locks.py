"""One holder at a time for a piece of local state (a stack folder, the demo folder)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ballast.errors import BallastError

__all__ = ["held", "held_or_refused"]


@contextlib.contextmanager
def held_or_refused(path: Path, busy: BallastError) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created 0600, its folder too) for the block, or
    raise ``busy`` at once if another process holds it. The kernel releases it when the
    holder dies, so a crash never leaves it taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def held(path: Path, timeout_s: float, busy: BaseException) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created 0600, its folder too) for the block, waiting
    up to ``timeout_s`` for another holder to let go; then raise ``busy``. Released when the
    holder dies, as :func:`held_or_refused`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock

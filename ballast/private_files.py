"""Files that hold secrets or grants (tokens, roles, the admin token): owner-only, regular files,
read through the very descriptor whose mode and type were checked.

Checking ``stat(path)`` and then opening the path again reads whatever is there by then, and a
FIFO put in place of the file blocks the reader for ever; opening once with ``O_NONBLOCK`` and
checking with ``fstat`` avoids both.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["PrivateFileError", "read_private", "read_private_config"]


class PrivateFileError(Exception):
    """The file is missing, unreadable, not a regular file, or open to group/others."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.missing = missing


def read_private(path: Path, what: str) -> bytes:
    """The bytes of ``path``, refused unless it is a regular file only its owner can access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PrivateFileError(f"{what} {path} does not exist", missing=True) from None
    except OSError as exc:
        raise PrivateFileError(f"{what} {path} cannot be read: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PrivateFileError(f"{what} {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise PrivateFileError(
                f"{what} {path} has mode {mode:o}, open to group/others; it must be 600 (owner "
                f"only): run chmod 600 on it"
            )
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise PrivateFileError(f"{what} {path} cannot be read: {exc}") from None
    finally:
        os.close(fd)


def read_private_config(path: Path, what: str) -> bytes:
    """:func:`read_private` for configuration read at start-up: a refusal is a
    :class:`ballast.errors.ConfigError` with the same message."""
    from ballast.errors import ConfigError

    try:
        return read_private(path, what)
    except PrivateFileError as exc:
        raise ConfigError(exc.message) from None

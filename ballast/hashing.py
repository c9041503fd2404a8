"""Content hashes of artefact files, streamed so a large engine never sits in memory whole."""

from __future__ import annotations

import hashlib
from pathlib import Path

# 1 MiB reads: large enough that hashing runs at disk/sha256 speed, small enough to stay cheap.
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

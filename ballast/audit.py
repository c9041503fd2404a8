"""Append-only audit log: one JSON line per release decision, who made it and why."""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Any


def current_actor() -> str:
    return os.environ.get("BALLAST_ACTOR") or getpass.getuser()


def record(
    path: Path, action: str, *, model: str, version: str | None, **detail: Any
) -> dict[str, Any]:
    """Append one entry and fsync it, so a crash right after a decision still leaves its record."""
    entry = {
        "ts": time.time(),
        "actor": current_actor(),
        "action": action,
        "model": model,
        "version": version,
        **detail,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, sort_keys=True, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

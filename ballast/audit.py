"""Append-only, hash-chained audit log: one JSON line per release decision, who made it and why.

Each entry holds ``prev``, the sha256 of the previous line's bytes (:data:`GENESIS` for the first),
so editing, deleting or reordering a line in the middle breaks the chain at the next entry and
:func:`verify_chain` names the first line where that happened. An exclusive ``flock`` around
read-last-line + append keeps two writers from chaining onto the same predecessor.

The chain alone cannot tell a log cut short, or rewritten whole with fresh hashes, from a genuine
one. An :class:`Anchor` (entry count and the last entry's hash) kept somewhere else closes that:
every edit at or before the anchored entry changes that entry's hash (it chains on all before
it). Each release publishes the anchor in its Prefect report; ``ballast audit anchor`` prints it
and ``ballast audit verify --anchor N:HASH`` checks the log against it.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "GENESIS",
    "Anchor",
    "anchor",
    "current_actor",
    "find",
    "line_hash",
    "read",
    "record",
    "verify_chain",
]

# The ``prev`` of the first entry: no line hashes to it.
GENESIS = "0" * 64


def current_actor() -> str:
    return os.environ.get("BALLAST_ACTOR") or getpass.getuser()


def line_hash(line: bytes) -> str:
    """The chain hash of one line (without its newline)."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _last_line(fd: int) -> bytes | None:
    """The last non-empty line of the open file, read backwards in blocks (the log only grows)."""
    end = os.lseek(fd, 0, os.SEEK_END)
    buf = b""
    pos = end
    while pos > 0:
        step = min(4096, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        stripped = buf.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    stripped = buf.rstrip(b"\n")
    return stripped or None


def writable_audit_log(path: Path) -> None:
    """Raise ``OSError`` unless an entry could be appended to ``path`` now (its folder made,
    the log opened for appending as :func:`record` opens it): checked before an action that
    must not happen unrecorded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600))


def record(
    path: Path, action: str, *, model: str, version: str | None, **detail: Any
) -> dict[str, Any]:
    """Append one chained entry and fsync it, so a crash right after a decision keeps its record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
        st = os.fstat(fd)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            # An existing log open to others (made by hand, copied in) is made private, as a
            # new one is: whoever may write it may rewrite history from there on.
            os.fchmod(fd, 0o600)
        end = os.lseek(fd, 0, os.SEEK_END)
        if end and os.pread(fd, 1, end - 1) != b"\n":
            # A write torn by a crash: end that fragment's line, or this entry would be glued
            # onto it and lost with it. verify_chain reports the fragment; the chain goes on.
            os.write(fd, b"\n")
        last = _last_line(fd)
        entry = {
            "ts": time.time(),
            "actor": current_actor(),
            "action": action,
            "model": model,
            "version": version,
            **detail,
            "prev": GENESIS if last is None else line_hash(last),
        }
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def read(path: Path) -> list[dict[str, Any]]:
    """Every entry, oldest first. A line that is not a JSON object (a write torn by a crash) is
    skipped here; :func:`verify_chain` reports it."""
    if not path.exists():
        return []
    entries: list[dict[str, Any]] = []
    for line in path.read_bytes().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def find(path: Path, action: str, *, model: str, version: str | None) -> list[dict[str, Any]]:
    """The entries of ``action`` on ``model`` ``version``, oldest first ([] without a log).

    For "was this already recorded?" (a retried task must not record twice). Lines that are not
    JSON objects (a tail torn by a crash) are skipped here; :func:`verify_chain` reports them.
    """
    if not path.exists():
        return []
    found: list[dict[str, Any]] = []
    with path.open("rb") as fh:
        for raw in fh:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if (
                isinstance(entry, dict)
                and entry.get("action") == action
                and entry.get("model") == model
                and entry.get("version") == version
            ):
                found.append(entry)
    return found


@dataclass(frozen=True, slots=True)
class Anchor:
    """How far the log went when it was taken: ``entries`` lines, the last hashing to ``head``."""

    entries: int
    head: str

    def text(self) -> str:
        return f"{self.entries}:{self.head}"

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """``N:HASH`` as :meth:`text` writes it; ValueError otherwise."""
        m = re.fullmatch(r"(\d{1,12}):([0-9a-f]{64})", text.strip())
        if m is None:
            raise ValueError(
                f"an anchor is ENTRIES:SHA256 (as `ballast audit anchor` prints), got {text!r}"
            )
        return cls(int(m.group(1)), m.group(2))


def _lines(path: Path) -> list[tuple[int, bytes]]:
    """(line number, bytes) of every non-empty line. A line of blanks is an entry (a broken
    one): ``record`` chains onto it as the last line, so verifying must not skip it."""
    return [(n, raw) for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1) if raw]


def anchor(path: Path) -> Anchor:
    """The log's anchor now (0 entries and :data:`GENESIS` for a missing or empty log)."""
    if not path.is_file():
        return Anchor(0, GENESIS)
    lines = _lines(path)
    return Anchor(len(lines), line_hash(lines[-1][1]) if lines else GENESIS)


def verify_chain(path: Path, anchors: Sequence[Anchor] = ()) -> list[str]:
    """Problems found in the chain, first to last (empty: intact). Line numbers start at 1.

    A changed line breaks the ``prev`` of the line after it; a removed or reordered line breaks
    the ``prev`` of the line now following its old neighbour. An edit to the last line, a cut
    or a rewrite of the whole log with fresh hashes cannot be told from a genuine log by the
    chain alone: each of ``anchors`` (taken earlier, kept elsewhere) must still match its entry.
    """
    if not path.exists():
        return [f"{path}: no audit log"]
    if not path.is_file():
        return [f"{path}: not a file (give the audit log itself)"]
    problems: list[str] = []
    lines = _lines(path)
    for a in anchors:
        if a.entries == 0:
            continue
        if a.entries > len(lines):
            problems.append(
                f"anchor {a.text()[:20]}...: the log has {len(lines)} entries, not the "
                f"{a.entries} it had (cut short)"
            )
        elif line_hash(lines[a.entries - 1][1]) != a.head:
            problems.append(
                f"anchor {a.text()[:20]}...: entry {a.entries} (line "
                f"{lines[a.entries - 1][0]}) is not the one anchored: it, or an entry before "
                "it, was rewritten"
            )
    expected = GENESIS
    for n, raw in lines:
        try:
            entry = json.loads(raw)
        except ValueError:  # not JSON, or not even UTF-8 (a tampered byte)
            problems.append(f"line {n}: not valid JSON")
            expected = line_hash(raw)
            continue
        prev = entry.get("prev") if isinstance(entry, dict) else None
        if prev is None:
            problems.append(f"line {n}: no prev hash (entry written outside the chain)")
        elif prev != expected:
            problems.append(
                f"line {n}: prev hash does not match the entry before it "
                "(an earlier entry was edited, removed or reordered)"
            )
        expected = line_hash(raw)
    return problems

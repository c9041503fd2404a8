"""Quarantine records: what failed validation, kept as one JSON line per refused dataset.

A record names the dataset and where it came from, the sha256 of its ciphertext and plaintext (so
the exact bytes can be found again and compared), the expectations it failed with their observed
aggregates, and when. It holds no row of the data: the file sits outside the plaintext boundary.
The log is append-only, mode 0600.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ballast.validation import ValidationReport

__all__ = ["QUARANTINE_FILE", "QuarantineRecord", "append_record", "read_records", "record_for"]

QUARANTINE_FILE = "quarantine.jsonl"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuarantineRecord:
    dataset: str
    uri: str
    ciphertext_sha256: str | None
    sha256: str
    rows: int
    failed: tuple[dict[str, Any], ...]  # expectation, column, observed
    time: str  # UTC, ISO 8601
    stage: str = "validate"


def record_for(report: ValidationReport, uri: str, now: datetime | None = None) -> QuarantineRecord:
    """The record for a failed validation (pure: the caller supplies the clock in tests)."""
    when = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    failed = tuple(
        {"expectation": r.expectation, "column": r.column, "observed": r.observed}
        for r in report.failed
    )
    notes = tuple({"expectation": "note", "column": None, "observed": n} for n in report.notes)
    return QuarantineRecord(
        dataset=report.dataset,
        uri=uri,
        ciphertext_sha256=report.ciphertext_sha256,
        sha256=report.sha256,
        rows=report.rows,
        failed=notes + failed,
        time=when,
    )


def append_record(path: Path, record: QuarantineRecord) -> None:
    """Append one JSON line to ``path`` (created 0600, parents as needed) and fsync it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(asdict(record), sort_keys=True) + "\n").encode()
    # O_NONBLOCK: a FIFO put in the log's place must not hang ingest (it is refused below).
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.fchmod(fd, 0o600)  # an older file created under a looser umask is tightened too
        # One write of an O_APPEND fd: concurrent writers never interleave inside a line.
        start = os.lseek(fd, 0, os.SEEK_END)
        written = os.write(fd, line)
        if written != len(line):
            # A half line would swallow the next record and make the log unreadable: take it
            # back (a concurrent writer's line after it is unlikely; this is a full disk).
            os.ftruncate(fd, start)
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records in ``path`` (empty if it does not exist). A line that is not a record (torn
    by a crash mid-write) is skipped, with a warning: it must not hide the others."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            logger.warning("quarantine log %s line %d is not a record; skipped", path, n)
    return records

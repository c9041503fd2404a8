"""Quarantine records: what failed validation, kept as one JSON line per refused dataset.

A record names the dataset and where it came from, the sha256 of its ciphertext and plaintext (so
the exact bytes can be found again and compared), the expectations it failed with their observed
aggregates, and when. It holds no row of the data: the file sits outside the plaintext boundary.
The log is append-only, mode 0600.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ballast.validation import ValidationReport

__all__ = ["QUARANTINE_FILE", "QuarantineRecord", "append_record", "read_records", "record_for"]

QUARANTINE_FILE = "quarantine.jsonl"


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
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file created under a looser umask is tightened too
        # One write of an O_APPEND fd: concurrent writers never interleave inside a line.
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records in ``path`` (empty if it does not exist)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]

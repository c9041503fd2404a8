"""The quarantine log: one JSON line per refused dataset, never unreadable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ballast.quarantine import QuarantineRecord, append_record, read_records


def _record(name: str) -> QuarantineRecord:
    return QuarantineRecord(
        dataset=name,
        uri=f"file:///{name}.enc",
        ciphertext_sha256="0" * 64,
        sha256="1" * 64,
        rows=10,
        failed=({"expectation": "x", "column": "c", "observed": "y"},),
        time="2026-11-28T00:00:00.000000Z",
    )


def test_a_short_write_leaves_no_half_line_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "quarantine.jsonl"
    append_record(path, _record("good-1"))
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(OSError, match="short write"):
        append_record(path, _record("lost"))  # the disk filled up
    monkeypatch.setattr(os, "write", real_write)
    append_record(path, _record("good-2"))
    # Before: the half line swallowed good-2 and read_records raised for the whole log.
    assert [r["dataset"] for r in read_records(path)] == ["good-1", "good-2"]


def test_a_torn_line_hides_no_other_record(tmp_path: Path) -> None:
    path = tmp_path / "quarantine.jsonl"
    append_record(path, _record("a"))
    with path.open("a") as fh:
        fh.write('{"dataset": "torn\n')
    append_record(path, _record("b"))
    assert [r["dataset"] for r in read_records(path)] == ["a", "b"]


def test_a_fifo_in_place_of_the_log_is_refused_not_waited_on(tmp_path: Path) -> None:
    path = tmp_path / "quarantine.jsonl"
    os.mkfifo(path, 0o600)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # so the O_WRONLY open may succeed
    try:
        with pytest.raises(OSError, match="not a regular file"):
            append_record(path, _record("x"))
    finally:
        os.close(reader)

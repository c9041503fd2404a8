"""The hash-chained audit log: appends chain, and edits, deletions and reorders are found."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ballast.audit import GENESIS, Anchor, anchor, find, line_hash, read, record, verify_chain


def _log(tmp_path: Path, n: int = 4) -> Path:
    path = tmp_path / "audit" / "audit.jsonl"
    for i in range(n):
        record(path, "approve", model="m", version=str(i), approver="alice", reason=f"r{i}")
    return path


def test_each_entry_holds_the_hash_of_the_previous_line(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    lines = path.read_bytes().splitlines()
    entries = read(path)
    assert [e["version"] for e in entries] == ["0", "1", "2"]
    assert entries[0]["prev"] == GENESIS
    assert entries[1]["prev"] == line_hash(lines[0])
    assert entries[2]["prev"] == line_hash(lines[1])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, "the log must be private"


def test_an_intact_chain_verifies(tmp_path: Path) -> None:
    assert verify_chain(_log(tmp_path)) == []


def test_an_edited_middle_line_is_reported_at_the_next_entry(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["approver"] = "mallory"
    lines[1] = json.dumps(entry, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")
    problems = verify_chain(path)
    assert len(problems) == 1 and problems[0].startswith("line 3:"), problems


def test_a_deleted_middle_line_is_reported(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    del lines[1]
    path.write_text("\n".join(lines) + "\n")
    problems = verify_chain(path)
    assert len(problems) == 1 and problems[0].startswith("line 2:"), problems


def test_reordered_lines_are_reported(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")
    assert verify_chain(path), "a swap of two entries went unnoticed"


def test_a_deleted_first_line_is_reported(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:]) + "\n")
    assert verify_chain(path)[0].startswith("line 1:")


def test_garbage_and_unchained_lines_are_reported(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    with path.open("a") as fh:
        fh.write("not json\n")
        fh.write(json.dumps({"action": "approve"}) + "\n")
    problems = verify_chain(path)
    assert any("not valid JSON" in p for p in problems)
    assert any("no prev hash" in p for p in problems)


def test_a_line_of_blanks_is_reported_and_the_next_entry_chains_onto_it(
    tmp_path: Path,
) -> None:
    # Before: verifying skipped it (and the anchor ignored it) while record() chained onto it,
    # so the insertion went unseen and the next genuine entry was the one reported as tampered.
    path = _log(tmp_path, 2)
    before = anchor(path)
    with path.open("a") as fh:
        fh.write("   \n")
    assert any("line 3: not valid JSON" in p for p in verify_chain(path)), verify_chain(path)
    assert anchor(path) != before
    record(path, "approve", model="m", version="9", approver="alice", reason="after")
    assert [p for p in verify_chain(path) if "line 4" in p] == []


def test_a_log_open_to_others_is_made_private_at_the_next_entry(tmp_path: Path) -> None:
    path = _log(tmp_path, 1)
    path.chmod(0o666)
    record(path, "approve", model="m", version="1", approver="alice", reason="r")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # before: stayed 0666
    assert verify_chain(path) == []


def test_appends_after_a_long_entry_still_chain(tmp_path: Path) -> None:
    # The last line is found by reading backwards in blocks; cross a block boundary.
    path = tmp_path / "audit.jsonl"
    record(path, "note", model="m", version=None, blob="x" * 10_000)
    record(path, "note", model="m", version=None)
    assert verify_chain(path) == []


def test_find_returns_one_versions_entries_of_an_action_and_skips_a_torn_tail(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    assert find(path, "register", model="m", version="1") == [], "no log: nothing recorded"
    record(path, "register", model="m", version="1", tags={"run": "a"})
    record(path, "register", model="m", version="2")
    record(path, "promote", model="m", version="1")
    record(path, "register", model="other", version="1")
    with path.open("ab") as fh:
        fh.write(b'{"action": "register", "model": "m", "vers')  # a crash mid-append
    (entry,) = find(path, "register", model="m", version="1")
    assert entry["tags"] == {"run": "a"}


def test_an_entry_after_a_torn_write_is_kept_and_the_chain_goes_on(tmp_path: Path) -> None:
    # Given a log whose last write was torn by a crash (no newline at the end) ...
    path = _log(tmp_path, 2)
    with path.open("ab") as fh:
        fh.write(b'{"action": "approve", "model": "m", "vers')
    # ... the next decision is recorded on its own line, not glued onto the fragment,
    record(path, "promote", model="m", version="2")

    assert [e["action"] for e in read(path)] == ["approve", "approve", "promote"]
    assert find(path, "promote", model="m", version="2") != []
    # and verify names the torn line alone: the entries after it chain on.
    assert verify_chain(path) == ["line 3: not valid JSON"]
    record(path, "promote", model="m", version="3")
    assert verify_chain(path) == ["line 3: not valid JSON"]


# -- anchors: what the chain alone cannot show ----------------------------------------------------


def _rewrite_whole(path: Path, version_of_first: str) -> None:
    """Edit the first entry and re-chain every line after it: the chain alone verifies."""
    entries = read(path)
    entries[0]["version"] = version_of_first
    path.unlink()
    prev = GENESIS
    with path.open("wb") as fh:
        for e in entries:
            e["prev"] = prev
            line = json.dumps(e, sort_keys=True).encode()
            fh.write(line + b"\n")
            prev = line_hash(line)


def test_an_anchor_catches_a_log_cut_short_or_rewritten_whole(tmp_path: Path) -> None:
    path = _log(tmp_path, 4)
    held = anchor(path)
    assert held.entries == 4 and held.head == line_hash(path.read_bytes().splitlines()[-1])
    assert verify_chain(path, [held]) == []
    record(path, "approve", model="m", version="later", approver="bob", reason="r")
    assert verify_chain(path, [held]) == [], "entries after the anchor are the chain's business"

    rewritten = tmp_path / "rewritten.jsonl"
    rewritten.write_bytes(path.read_bytes())
    _rewrite_whole(rewritten, "9")
    assert verify_chain(rewritten) == [], "the chain alone cannot see this"
    assert "entry 4 (line 4) is not the one anchored" in verify_chain(rewritten, [held])[0]

    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:2]))
    assert verify_chain(cut) == []
    assert "the log has 2 entries, not the 4 it had (cut short)" in verify_chain(cut, [held])[0]
    cut.write_bytes(b"")
    assert "has 0 entries" in verify_chain(cut, [held])[0]


def test_anchor_text_round_trips_and_junk_is_refused(tmp_path: Path) -> None:
    held = anchor(_log(tmp_path, 2))
    assert Anchor.parse(held.text()) == held
    assert anchor(tmp_path / "missing.jsonl") == Anchor(0, GENESIS)
    for junk in ("", "4", "4:abc", f"-1:{'a' * 64}", f"4:{'A' * 64}"):
        with pytest.raises(ValueError, match="ENTRIES:SHA256"):
            Anchor.parse(junk)

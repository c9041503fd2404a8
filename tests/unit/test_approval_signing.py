"""Signed approvals: the message, keys, the roles file's registered keys, the pure signature
check, and the CLI's local refusals (no Prefect server needed). A signed answer through a real
paused run is tested in tests/flows/test_manual_approval.py."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from ballast.approval_signing import (
    approval_message,
    create_approver_key,
    load_approver_key,
    parse_public_key,
    public_key_text,
    sign_approval,
    verify_approval,
)
from ballast.cli_approve import approve_command, approver_key_command
from ballast.decisions import authorize_signature
from ballast.errors import ConfigError
from ballast.roles import approval_keys_from_settings, parse_approval_keys, parse_roles
from ballast.settings import Settings, get_settings

RUN_ID = "0b5e4f5e-4a59-4f43-9a8b-7f1b8f3c2d11"


def message(**changes: object) -> bytes:
    fields: dict[str, object] = {
        "flow_run_id": RUN_ID,
        "pause_key": "approval-3-1",
        "approve": True,
        "approver": "alice",
        "reason": "looks good",
    }
    fields.update(changes)
    return approval_message(**fields)  # type: ignore[arg-type]


def test_a_signature_covers_the_run_the_pause_the_decision_the_name_and_the_reason() -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_approval(key, message())
    assert verify_approval(key.public_key(), message(), signed)
    for change in (
        {"flow_run_id": "11111111-4a59-4f43-9a8b-7f1b8f3c2d11"},
        {"pause_key": "approval-3-2"},  # a later pause of the same run: no replay
        {"approve": False},
        {"approver": "bob"},
        {"reason": "looks good!"},
    ):
        assert not verify_approval(key.public_key(), message(**change), signed), change
    # Another key, or something that is not a signature, never verifies.
    assert not verify_approval(Ed25519PrivateKey.generate().public_key(), message(), signed)
    assert not verify_approval(key.public_key(), message(), "not base64!")
    assert not verify_approval(key.public_key(), message(), "")
    # Trimmed as the gate records it; the run id's case does not matter.
    assert message(approver=" alice ", reason="looks good\n") == message()
    assert message(flow_run_id=RUN_ID.upper()) == message()
    doc = json.loads(message())
    assert doc["purpose"] == "ballast-approval-v1" and list(doc) == sorted(doc)


def test_a_new_key_is_private_never_overwrites_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "alice.pem"
    key = create_approver_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_text(load_approver_key(path)) == public_key_text(key)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        create_approver_key(path)
    assert path.read_bytes() == before
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="mode 644"):
        load_approver_key(path)
    other = tmp_path / "other.pem"
    other.write_text("not a key")
    other.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM key"):
        load_approver_key(other)


def test_the_roles_file_registers_keys_beside_plain_entries() -> None:
    key = Ed25519PrivateKey.generate()
    doc = {
        "alice": {"roles": ["approver"], "approval_key": public_key_text(key)},
        "bob": ["approver", "operator"],
    }
    assert parse_roles(doc) == {
        "alice": frozenset({"approver"}),
        "bob": frozenset({"approver", "operator"}),
    }
    keys = parse_approval_keys(doc)
    assert list(keys) == ["alice"] and public_key_text(keys["alice"]) == public_key_text(key)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"roles": ["approver"], "approval_key": "AAAA"}, "32 bytes, got 3"),
        ({"roles": ["approver"], "approval_key": "%%%"}, "not base64"),
        ({"roles": ["approver"], "approval_key": 7}, "must be a string"),
        ({"roles": ["approver"], "key": "x"}, r"unknown field\(s\) \['key'\]"),
        ({"approval_key": "x"}, "must be a list of strings"),
    ],
)
def test_a_bad_registered_key_is_refused_with_the_reason(entry: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_approval_keys({"alice": entry})
    with pytest.raises(ConfigError):
        parse_public_key("AAAA")


def test_who_must_sign_and_what_a_signature_must_match() -> None:
    alice = Ed25519PrivateKey.generate()
    keys = {"Alice": alice.public_key()}
    good = sign_approval(alice, message())
    # A registered approver: signed with their key, or refused (by name alone anyone could
    # answer for them). Names compare trimmed and case-folded, as the role check does.
    assert authorize_signature(" alice", good, message(), keys, required=False).allowed
    unsigned = authorize_signature("alice", "", message(), keys, required=False)
    assert not unsigned.allowed and "must be signed" in unsigned.reason
    forged = sign_approval(Ed25519PrivateKey.generate(), message())
    wrong = authorize_signature("alice", forged, message(), keys, required=False)
    assert not wrong.allowed and "does not match" in wrong.reason
    replay = authorize_signature(
        "alice", good, message(pause_key="approval-3-2"), keys, required=False
    )
    assert not replay.allowed
    # Others answer by name unless signatures are required; a signature nobody can check is
    # refused rather than silently ignored.
    assert authorize_signature("bob", "", message(approver="bob"), keys, required=False).allowed
    assert not authorize_signature("bob", "", message(approver="bob"), keys, required=True).allowed
    assert not authorize_signature(
        "bob", good, message(approver="bob"), keys, required=False
    ).allowed


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("approve")(approve_command)
    app.command("approver-key")(approver_key_command)
    return app


@pytest.fixture
def registered(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """alice holds the approver role with a registered key (returned: her private key file);
    bob holds it by name only."""
    made = CliRunner().invoke(cli(), ["approver-key", str(tmp_path / "alice.pem"), "--as", "alice"])
    assert made.exit_code == 0, made.output
    entry = json.loads(made.stdout.strip().splitlines()[-1])
    assert entry["alice"]["roles"] == ["approver"]
    roles = tmp_path / "roles.json"
    roles.write_text(json.dumps({**entry, "bob": ["approver"]}))
    roles.chmod(0o600)
    monkeypatch.setenv("BALLAST_ROLES_FILE", str(roles))
    get_settings.cache_clear()
    keys = approval_keys_from_settings(get_settings())
    assert public_key_text(keys["alice"]) == public_key_text(
        load_approver_key(tmp_path / "alice.pem")
    )
    return tmp_path / "alice.pem"


def test_the_cli_refuses_locally_what_the_paused_run_would_refuse(
    registered: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def approve(*args: str) -> str:
        result = CliRunner().invoke(cli(), ["approve", RUN_ID, "--reason", "ok", *args])
        assert result.exit_code == 2, result.output
        return " ".join(result.output.split())

    assert "has a registered approval key: pass --key" in approve("--as", "alice")
    other = tmp_path / "other.pem"
    create_approver_key(other)
    assert "is not the approval key registered for 'alice'" in approve(
        "--as", "alice", "--key", str(other)
    )
    assert "'bob' has no registered approval key" in approve(
        "--as", "bob", "--key", str(registered)
    )
    monkeypatch.setenv("BALLAST_APPROVAL_SIGNATURES", "required")
    get_settings.cache_clear()
    assert "signed approvals are required" in approve("--as", "bob")


def test_approver_key_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_text("someone's only copy")
    result = CliRunner().invoke(cli(), ["approver-key", str(path), "--as", "alice"])
    assert result.exit_code == 2 and "refusing to write a new key over it" in result.output
    assert path.read_text() == "someone's only copy"


def test_approver_key_warns_when_written_inside_a_git_work_tree(tmp_path: Path) -> None:
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    inside = tmp_path / "repo" / "keys" / "alice.pem"
    outside = tmp_path / "elsewhere" / "alice.pem"
    warned = CliRunner().invoke(cli(), ["approver-key", str(inside), "--as", "alice"])
    quiet = CliRunner().invoke(cli(), ["approver-key", str(outside), "--as", "alice"])
    assert warned.exit_code == 0 and quiet.exit_code == 0, warned.output + quiet.output
    assert "inside the git work tree" in warned.output and str(tmp_path / "repo") in warned.output
    assert "warning" not in quiet.output
    assert inside.exists() and outside.exists()


@pytest.mark.parametrize(
    "raw_hex",
    [
        "01" + "00" * 31,  # the identity: order 1
        "ec" + "ff" * 30 + "7f",  # order 2
        "00" * 32,  # order 4: the all-zero placeholder
        "00" * 31 + "80",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
        "ed" + "ff" * 30 + "7f",  # y = p: not canonical
        "ee" + "ff" * 31,
    ],
)
def test_keys_anyone_could_sign_for_are_refused(raw_hex: str) -> None:
    import base64

    text = base64.b64encode(bytes.fromhex(raw_hex)).decode()
    with pytest.raises(ConfigError, match="weak key"):
        parse_public_key(text)
    with pytest.raises(ConfigError, match="weak key"):
        parse_approval_keys({"alice": {"roles": ["approver"], "approval_key": text}})


def test_two_entries_for_one_person_are_refused(tmp_path: Path, settings: Settings) -> None:
    key = public_key_text(Ed25519PrivateKey.generate())
    # Names meet trimmed and case-folded: the later entry would decide alice's key unseen.
    with pytest.raises(ConfigError, match="name the same person"):
        parse_approval_keys(
            {"alice": {"roles": ["approver"], "approval_key": key}, "Alice ": ["approver"]}
        )
    # The same name twice in the file: json would keep the last and drop alice's key.
    roles = tmp_path / "roles.json"
    roles.write_text(
        '{"alice": {"roles": ["approver"], "approval_key": "' + key + '"}, "alice": ["approver"]}'
    )
    roles.chmod(0o600)
    from ballast.roles import load_roles

    with pytest.raises(ConfigError, match="'alice' appears twice"):
        load_roles(roles)


# secp112r1: a PEM key cryptography refuses with UnsupportedAlgorithm, not ValueError.
_UNSUPPORTED_PEM = """-----BEGIN EC PRIVATE KEY-----
MD4CAQEEDlqsYO1UXKsWFz2idvmFoAcGBSuBBAAGoSADHgAEQq/EkdnYQ0Io4vxg
ei8WQq4yB7ijOExYHkfXBg==
-----END EC PRIVATE KEY-----
"""


def test_a_key_of_an_unsupported_kind_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_text(_UNSUPPORTED_PEM)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM key"):
        load_approver_key(path)

"""Roles from configuration: a 0600 JSON file plus ``settings.approvers``."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from ballast.errors import ConfigError
from ballast.roles import (
    approval_config_from_settings,
    load_roles,
    parse_roles,
    roles_from_settings,
)
from ballast.settings import Settings, get_settings


def _write(path: Path, data: object, mode: int = 0o600) -> Path:
    path.write_text(json.dumps(data))
    path.chmod(mode)
    return path


def test_a_private_roles_file_maps_names_to_roles(tmp_path: Path) -> None:
    path = _write(tmp_path / "roles.json", {"alice": ["approver"], "bob": ["operator", "admin"]})
    assert load_roles(path) == {
        "alice": frozenset({"approver"}),
        "bob": frozenset({"operator", "admin"}),
    }


def test_a_roles_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "roles.json", {"alice": ["approver"]}, mode=0o644)
    with pytest.raises(ConfigError, match="must be 600"):
        load_roles(path)


def test_a_missing_roles_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_roles(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (["alice"], "expected an object"),
        ({"alice": "approver"}, "must be a list"),
        ({"alice": ["root"]}, "unknown role"),
        ({" ": ["approver"]}, "non-empty"),
    ],
)
def test_malformed_roles_are_refused_with_the_reason(data: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_roles(data)


def test_invalid_json_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "roles.json"
    path.write_text("{not json")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_roles(path)


def test_settings_approvers_add_the_role_on_top_of_the_file(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "roles.json", {"bob": ["operator"]})
    monkeypatch.setenv("BALLAST_ROLES_FILE", str(path))
    monkeypatch.setenv("BALLAST_APPROVERS", '["bob", "dave"]')
    get_settings.cache_clear()
    roles = roles_from_settings(get_settings())
    assert roles["bob"] == frozenset({"operator", "approver"})
    assert roles["dave"] == frozenset({"approver"})


def test_roles_alone_ignore_a_bad_approval_key_that_the_approval_config_refuses(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bob's key is garbage: a paused run must not judge anyone on such a file, but the CLI's
    # check of mallory's role (audited as a refusal) needs the roles only.
    path = _write(
        tmp_path / "roles.json",
        {"bob": {"roles": ["approver"], "approval_key": "not base64!"}, "carol": ["approver"]},
    )
    monkeypatch.setenv("BALLAST_ROLES_FILE", str(path))
    monkeypatch.setenv("BALLAST_APPROVERS", '["dave"]')
    get_settings.cache_clear()
    s = get_settings()
    assert roles_from_settings(s)["carol"] == frozenset({"approver"})
    with pytest.raises(ConfigError, match="approval_key of 'bob'"):
        approval_config_from_settings(s)
    # A good file gives both halves from one reading, settings.approvers included.
    _write(path, {"carol": ["approver"]})
    config = approval_config_from_settings(s)
    assert dict(config.roles) == {"carol": {"approver"}, "dave": {"approver"}}
    assert dict(config.keys) == {}


def test_no_configuration_means_no_one_holds_a_role(settings: Settings) -> None:
    assert dict(roles_from_settings(settings)) == {}


def test_a_roles_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "roles.json"
    path.write_bytes(b'{"alice": ["approver"], "b\xff": []}')
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_roles(path)


def test_a_roles_path_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "roles"
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_roles(path)


def test_a_roles_path_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "roles.fifo"
    os.mkfifo(path, 0o600)  # no writer: a blocking open waits for one
    outcome: list[object] = []

    def load() -> None:
        try:
            outcome.append(load_roles(path))
        except Exception as exc:
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(5)
    blocked = worker.is_alive()
    if blocked:  # open the other end so the stuck reader returns and the thread ends
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
    assert not blocked, "load_roles blocked opening a FIFO"
    assert isinstance(outcome[0], ConfigError) and "not a regular file" in str(outcome[0]), outcome

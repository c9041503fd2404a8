"""Edges of the gateway's bearer tokens (infra/gateway/auth.py) that a mutation-testing pass
found unchecked (2026-11-29): the scheme of the Authorization header, a token listed twice and
each refusal of a tokens-file entry."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from ballast.errors import ConfigError
from infra.gateway.auth import (
    Principal,
    TokenTable,
    load_tokens_file,
    token_sha256,
    write_tokens_file,
)

ADMIN = "admin-token-0123456789"
CI = "ci-token-0123456789abcdef"


def table() -> TokenTable:
    return TokenTable.build(ADMIN, [(token_sha256(CI), Principal("ci", "operator"))])


def tokens_file(tmp_path: Path, entries: Any) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(entries))
    path.chmod(0o600)
    return path


# -- authenticate --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        f"Basic {CI}",  # a valid token under another scheme
        f"Token {ADMIN}",
        CI,  # no scheme at all
        "Bearer",
        "Bearer    ",
        "",
    ],
)
def test_only_a_bearer_header_with_a_token_authenticates(header: str) -> None:
    assert table().authenticate(header) is None


def test_bearer_is_case_insensitive_and_the_token_is_stripped() -> None:
    assert table().authenticate(f"BEARER  {CI} ") == Principal("ci", "operator")
    assert table().authenticate(f"Bearer {ADMIN}") == Principal("admin-token", "admin")


def test_a_listed_empty_token_hash_never_matches_an_empty_bearer() -> None:
    # An entry may name any sha256, even the empty string's: "Bearer " must still not match it.
    t = TokenTable.build(ADMIN, [(token_sha256(""), Principal("empty", "admin"))])
    assert t.authenticate("Bearer ") is None
    assert t.authenticate("Bearer  ") is None


# -- roles ---------------------------------------------------------------------------------------


def test_each_role_may_what_it_and_lower_roles_may() -> None:
    assert Principal("o", "operator").may("operator") is True
    assert Principal("o", "operator").may("viewer") is True
    assert Principal("o", "operator").may("admin") is False
    assert Principal("v", "viewer").may("viewer") is True


# -- building the table --------------------------------------------------------------------------


def test_a_table_needs_a_token() -> None:
    with pytest.raises(ValueError, match="at least one admin token"):
        TokenTable({})
    with pytest.raises(ValueError, match="non-empty admin token"):
        TokenTable.build("")


def test_the_admin_token_listed_again_in_the_file_is_refused() -> None:
    with pytest.raises(ConfigError, match="'ci' is listed twice"):
        TokenTable.build(ADMIN, [(token_sha256(ADMIN), Principal("ci", "viewer"))])


def test_principals_are_listed_by_role_then_name() -> None:
    t = TokenTable.build(
        ADMIN,
        [
            (token_sha256("b" * 20), Principal("b", "viewer")),
            (token_sha256("a" * 20), Principal("a", "viewer")),
        ],
    )
    assert [p.name for p in t.principals()] == ["admin-token", "a", "b"]


# -- tokens files --------------------------------------------------------------------------------


def test_a_written_tokens_file_is_private_and_loads(tmp_path: Path) -> None:
    path = write_tokens_file(
        tmp_path / "tokens.json", [{"name": "ci", "role": "operator", "token": CI}]
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_tokens_file(path) == [(token_sha256(CI), Principal("ci", "operator"))]


def test_a_token_of_exactly_16_characters_is_accepted(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, {"tokens": [{"name": "x", "role": "viewer", "token": "t" * 16}]})
    assert load_tokens_file(path) == [(token_sha256("t" * 16), Principal("x", "viewer"))]


def test_a_lowercase_hex_digest_is_kept_as_given(tmp_path: Path) -> None:
    digest = token_sha256("some-long-token-value")
    path = tokens_file(tmp_path, {"tokens": [{"name": "g", "role": "admin", "sha256": digest}]})
    assert load_tokens_file(path) == [(digest, Principal("g", "admin"))]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"tokens": {"name": "x"}}, "must be"),
        ({"tokens": None}, "must be"),
        ([], "must be"),
        ({"tokens": [["name", "role"]]}, "expected name, role"),  # a list, not an object
        ({"tokens": [{"name": "x", "role": "viewer", "token": "t" * 20, "roles": 1}]}, "expected"),
        ({"tokens": [{"role": "viewer", "token": "t" * 20}]}, "'name' must be"),
        ({"tokens": [{"name": "", "role": "viewer", "token": "t" * 20}]}, "'name' must be"),
        ({"tokens": [{"name": 7, "role": "viewer", "token": "t" * 20}]}, "'name' must be"),
        (
            {"tokens": [{"name": "x", "role": "viewer", "token": "t" * 20, "sha256": "0" * 64}]},
            "exactly one",
        ),
        ({"tokens": [{"name": "x", "role": "viewer", "token": "t" * 15}]}, "16 char"),
        ({"tokens": [{"name": "x", "role": "viewer", "token": 1234567890123456789}]}, "16 char"),
        ({"tokens": [{"name": "x", "role": "viewer", "token": "tttttttt tttttttt"}]}, "spaces"),
        ({"tokens": [{"name": "x", "role": "viewer", "token": "t" * 20 + "\t"}]}, "spaces"),
        ({"tokens": [{"name": "x", "role": "viewer", "sha256": "0" * 63}]}, "64 lowercase"),
        ({"tokens": [{"name": "x", "role": "viewer", "sha256": "0" * 65}]}, "64 lowercase"),
        ({"tokens": [{"name": "x", "role": "viewer", "sha256": "A" * 64}]}, "64 lowercase"),
        ({"tokens": [{"name": "x", "role": "viewer", "sha256": 0}]}, "64 lowercase"),
    ],
    ids=[
        "tokens-object",
        "tokens-null",
        "top-level-list",
        "entry-not-object",
        "unknown-key",
        "no-name",
        "empty-name",
        "name-not-string",
        "both-secrets",
        "15-chars",
        "token-not-string",
        "inner-space",
        "trailing-tab",
        "63-hex",
        "65-hex",
        "uppercase-hex",
        "digest-not-string",
    ],
)
def test_bad_tokens_file_entries_are_refused(tmp_path: Path, content: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_tokens_file(tokens_file(tmp_path, content))

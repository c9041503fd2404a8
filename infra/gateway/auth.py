"""Bearer tokens with roles for the admin API: viewer < operator < admin.

Tokens come from configuration, never from the repository:

* the single admin token of earlier releases (``BALLAST_GATEWAY_ADMIN_TOKEN`` or the 0600 file
  ``state_dir/admin-token``) keeps working, as role ``admin``;
* a tokens file (``--tokens-file``), JSON, mode 0600 (refused when group or others may read it)::

      {"tokens": [
        {"name": "grafana", "role": "viewer",   "sha256": "<hex sha256 of the token>"},
        {"name": "ci",      "role": "operator", "token": "<the token itself>"}
      ]}

  ``sha256`` is preferred: whoever reads the file then still cannot present the token.

A presented token is hashed and looked up by its sha256, so comparing it costs the same whatever
prefix of a real token it shares; tokens are never logged, only the entry's ``name``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ballast.errors import ConfigError
from ballast.private_files import PrivateFileError, read_private

__all__ = [
    "ROLES",
    "Principal",
    "Role",
    "TokenTable",
    "load_tokens_file",
    "token_sha256",
]

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who presented a valid token: the entry's name and role (never the token)."""

    name: str
    role: Role

    def may(self, required: Role) -> bool:
        return _RANK[self.role] >= _RANK[required]


class TokenTable:
    """Token hashes to principals. Build with :meth:`build`; look up with :meth:`authenticate`."""

    def __init__(self, by_hash: Mapping[str, Principal]) -> None:
        if not by_hash:
            raise ValueError("the gateway needs at least one admin token")
        self._by_hash = dict(by_hash)

    @classmethod
    def build(cls, admin_token: str, extra: Iterable[tuple[str, Principal]] = ()) -> TokenTable:
        """The legacy admin token (role admin) plus ``(sha256, principal)`` entries."""
        if not admin_token:
            raise ValueError("the gateway needs a non-empty admin token")
        table = {token_sha256(admin_token): Principal("admin-token", "admin")}
        for digest, principal in extra:
            if digest in table:
                raise ConfigError(f"token of {principal.name!r} is listed twice")
            table[digest] = principal
        return cls(table)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an ``Authorization: Bearer <token>`` header value, or None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        return self._by_hash.get(token_sha256(token))

    def principals(self) -> list[Principal]:
        return sorted(self._by_hash.values(), key=lambda p: (p.role, p.name))


def load_tokens_file(path: Path) -> list[tuple[str, Principal]]:
    """Read a tokens file (format in the module docstring); ConfigError naming what is wrong."""
    path = Path(path)
    try:
        raw = read_private(path, "tokens file")
    except PrivateFileError as exc:
        raise ConfigError(exc.message) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ConfigError(f"tokens file {path} is not valid JSON: {exc}") from exc
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f'tokens file {path} must be {{"tokens": [...]}}')
    out: list[tuple[str, Principal]] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"tokens file {path}, entry {i}"
        if not isinstance(entry, dict) or set(entry) - {"name", "role", "sha256", "token"}:
            raise ConfigError(f"{where}: expected name, role and one of sha256/token")
        name, role = entry.get("name"), entry.get("role")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        if name in names:
            raise ConfigError(f"{where}: name {name!r} is used twice")
        if role not in ROLES:
            raise ConfigError(f"{where}: role must be one of {', '.join(ROLES)}")
        digest, token = entry.get("sha256"), entry.get("token")
        if (digest is None) == (token is None):
            raise ConfigError(f"{where}: give exactly one of 'sha256' and 'token'")
        if token is not None:
            if not isinstance(token, str) or len(token) < 16:
                raise ConfigError(f"{where}: 'token' must be a string of at least 16 characters")
            if token != token.strip() or any(c.isspace() for c in token):
                # A client's bearer token cannot carry spaces (RFC 6750), and the server strips
                # what it is sent: such an entry would load and never match.
                raise ConfigError(f"{where}: 'token' must not contain spaces")
            digest = token_sha256(token)
        elif not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
            raise ConfigError(f"{where}: 'sha256' must be 64 lowercase hex digits")
        names.add(name)
        out.append((digest, Principal(name, role)))
    return out


def write_tokens_file(path: Path, entries: Iterable[Mapping[str, str]]) -> Path:
    """Create a tokens file 0600 (tests and set-up scripts); refuses to overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"tokens": [dict(e) for e in entries]}, fh)
    return path

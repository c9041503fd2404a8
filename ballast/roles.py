"""Release roles from configuration: who may approve, operate or administer releases.

Roles come from a JSON file kept outside the repository (``{"alice": ["approver"], ...}``) that
must be readable by its owner only (mode 0600, like the keyring), plus ``settings.approvers``.
An entry may also be ``{"roles": [...], "approval_key": "<base64>"}``: that name's approvals
must then be signed with the matching key (:mod:`ballast.approval_signing`).
Nothing here decides an approval; :func:`ballast.decisions.authorize_approval` does, from the
mapping this module returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ballast.approval_signing import parse_public_key
from ballast.errors import ConfigError
from ballast.private_files import read_private_config
from ballast.settings import Settings

__all__ = [
    "APPROVER",
    "ROLES",
    "ApprovalConfig",
    "Role",
    "Roles",
    "approval_config_from_settings",
    "approval_keys_from_settings",
    "load_roles",
    "merge_approvers",
    "parse_approval_keys",
    "parse_roles",
    "roles_from_settings",
]

Role = Literal["approver", "operator", "admin"]
ROLES: frozenset[str] = frozenset(get_args(Role))
APPROVER: Role = "approver"

# name -> the roles that name holds
Roles = Mapping[str, frozenset[str]]


def _entries(data: object, source: str) -> list[tuple[str, list[str], str | None]]:
    """(name, roles, approval key text) per entry; an entry is a list of roles, or an object
    ``{"roles": [...], "approval_key": "<base64 Ed25519 public key>"}``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected an object mapping names to lists of roles")
    out: list[tuple[str, list[str], str | None]] = []
    seen: dict[str, str] = {}
    for name, entry in data.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{source}: names must be non-empty strings, got {name!r}")
        # Names compare trimmed and case-folded everywhere (authorize_approval): two entries
        # that meet there would let the later one decide "alice"'s roles and key unseen.
        folded = name.strip().casefold()
        if folded in seen:
            raise ConfigError(f"{source}: {name!r} and {seen[folded]!r} name the same person")
        seen[folded] = name
        key: str | None = None
        roles = entry
        if isinstance(entry, dict):
            extra = sorted(set(entry) - {"roles", "approval_key"})
            if extra:
                raise ConfigError(
                    f"{source}: unknown field(s) {extra} for {name!r}; known: approval_key, roles"
                )
            roles = entry.get("roles")
            key = entry.get("approval_key")
            if key is not None and not isinstance(key, str):
                raise ConfigError(f"{source}: approval_key of {name!r} must be a string")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ConfigError(f"{source}: roles of {name!r} must be a list of strings")
        unknown = sorted(set(roles) - ROLES)
        if unknown:
            raise ConfigError(
                f"{source}: unknown role(s) {unknown} for {name!r}; known: {sorted(ROLES)}"
            )
        out.append((name.strip(), roles, key))
    return out


def parse_roles(data: object, *, source: str = "roles") -> dict[str, frozenset[str]]:
    """Check a decoded roles document: names are non-empty strings, roles are known ones."""
    return {name: frozenset(roles) for name, roles, _ in _entries(data, source)}


def parse_approval_keys(data: object, *, source: str = "roles") -> dict[str, Ed25519PublicKey]:
    """The approval keys a roles document registers, by name (see
    :mod:`ballast.approval_signing`); names without one are absent."""
    out: dict[str, Ed25519PublicKey] = {}
    for name, _, key in _entries(data, source):
        if key is not None:
            out[name] = parse_public_key(key, source=f"{source}: approval_key of {name!r}")
    return out


class _DuplicateName(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json keeps the last of two equal keys: a second "alice" entry would drop the first's
    # approval key without a word.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateName(f"{key!r} appears twice")
        out[key] = value
    return out


def _read_document(path: Path) -> object:
    raw = read_private_config(path, "roles file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"roles file {path} is not UTF-8 text: {exc}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"roles file {path} is not valid JSON: {exc}") from None
    except _DuplicateName as exc:
        raise ConfigError(f"roles file {path}: {exc}") from None


def load_roles(path: Path) -> dict[str, frozenset[str]]:
    """Read and check a roles file. A file others can read or write is refused: whoever can edit
    it can make themselves an approver."""
    return parse_roles(_read_document(path), source=str(path))


def approval_keys_from_settings(s: Settings) -> dict[str, Ed25519PublicKey]:
    """The approval keys the roles file registers (none without a roles file)."""
    return dict(approval_config_from_settings(s).keys)


@dataclass(frozen=True, slots=True)
class ApprovalConfig:
    """Who may approve and with which keys, from one reading of the roles file."""

    roles: Roles
    keys: Mapping[str, Ed25519PublicKey]


def approval_config_from_settings(s: Settings) -> ApprovalConfig:
    """The configured roles (the roles file plus ``settings.approvers``) and approval keys, read
    from the file once: both halves describe the same version of it."""
    if s.roles_file is None:
        return ApprovalConfig(merge_approvers({}, s.approvers), {})
    document = _read_document(s.roles_file)
    source = str(s.roles_file)
    return ApprovalConfig(
        merge_approvers(parse_roles(document, source=source), s.approvers),
        parse_approval_keys(document, source=source),
    )


def merge_approvers(roles: Mapping[str, frozenset[str]], approvers: Iterable[str]) -> Roles:
    out = dict(roles)
    for name in approvers:
        if name.strip():
            out[name.strip()] = out.get(name.strip(), frozenset()) | {APPROVER}
    return out


def roles_from_settings(s: Settings) -> Roles:
    """The configured roles: the roles file (if any) plus ``settings.approvers``. Approval keys
    are not parsed: another person's malformed key must not turn a refusal the CLI audits
    into a configuration error."""
    base = load_roles(s.roles_file) if s.roles_file is not None else {}
    return merge_approvers(base, s.approvers)

"""Release roles from configuration: who may approve, operate or administer releases.

Roles come from a JSON file kept outside the repository (``{"alice": ["approver"], ...}``) that
must be readable by its owner only (mode 0600, like the keyring), plus ``settings.approvers``.
Nothing here decides an approval; :func:`ballast.decisions.authorize_approval` does, from the
mapping this module returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, get_args

from ballast.errors import ConfigError
from ballast.private_files import PrivateFileError, read_private
from ballast.settings import Settings

__all__ = [
    "APPROVER",
    "ROLES",
    "Role",
    "Roles",
    "load_roles",
    "merge_approvers",
    "parse_roles",
    "roles_from_settings",
]

Role = Literal["approver", "operator", "admin"]
ROLES: frozenset[str] = frozenset(get_args(Role))
APPROVER: Role = "approver"

# name -> the roles that name holds
Roles = Mapping[str, frozenset[str]]


def parse_roles(data: object, *, source: str = "roles") -> dict[str, frozenset[str]]:
    """Check a decoded roles document: names are non-empty strings, roles are known ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected an object mapping names to lists of roles")
    out: dict[str, frozenset[str]] = {}
    for name, roles in data.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{source}: names must be non-empty strings, got {name!r}")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ConfigError(f"{source}: roles of {name!r} must be a list of strings")
        unknown = sorted(set(roles) - ROLES)
        if unknown:
            raise ConfigError(
                f"{source}: unknown role(s) {unknown} for {name!r}; known: {sorted(ROLES)}"
            )
        out[name.strip()] = frozenset(roles)
    return out


def load_roles(path: Path) -> dict[str, frozenset[str]]:
    """Read and check a roles file. A file others can read or write is refused: whoever can edit
    it can make themselves an approver."""
    try:
        raw = read_private(path, "roles file")
    except PrivateFileError as exc:
        raise ConfigError(exc.message) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"roles file {path} is not valid JSON: {exc}") from None
    except ValueError as exc:  # not UTF-8
        raise ConfigError(f"roles file {path} is not UTF-8 text: {exc}") from None
    return parse_roles(data, source=str(path))


def merge_approvers(roles: Mapping[str, frozenset[str]], approvers: Iterable[str]) -> Roles:
    out = dict(roles)
    for name in approvers:
        if name.strip():
            out[name.strip()] = out.get(name.strip(), frozenset()) | {APPROVER}
    return out


def roles_from_settings(s: Settings) -> Roles:
    """The configured roles: the roles file (if any) plus ``settings.approvers``."""
    base = load_roles(s.roles_file) if s.roles_file is not None else {}
    return merge_approvers(base, s.approvers)

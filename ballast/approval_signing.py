"""Signed approvals: an approver proves who they are with an Ed25519 key of their own.

Prefect OSS has no user accounts, so the release form's "approver" field is only a name: anyone
who can reach the API can type an approver's name. An approver whose public key is registered
in the roles file (``{"alice": {"roles": ["approver"], "approval_key": "<base64>"}}``) must sign
each answer instead; ``ballast approve --key FILE`` does it. The signature covers the flow run,
the pause it answers (the pause key names the version and the attempt, and every pause of a run
has its own key, so an answer cannot be replayed on another pause or run), the decision, the
name and the reason.

The private key is a PEM (PKCS#8) file only its owner can read, kept outside the repository;
``ballast approver-key FILE`` makes one and prints the line to register.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ballast.errors import ConfigError
from ballast.private_files import read_private_config

__all__ = [
    "PURPOSE",
    "approval_message",
    "create_approver_key",
    "load_approver_key",
    "parse_public_key",
    "public_key_text",
    "registered_key",
    "sign_approval",
    "verify_approval",
]

# Domain separation: a signature made for anything else never reads as an approval.
PURPOSE = "ballast-approval-v1"


def approval_message(
    *, flow_run_id: str, pause_key: str, approve: bool, approver: str, reason: str
) -> bytes:
    """The bytes an approver signs: canonical JSON (sorted keys, no spaces, UTF-8). Names and
    reasons are taken as sent, after trimming, as the release gate records them."""
    doc = {
        "purpose": PURPOSE,
        "flow_run_id": str(flow_run_id).lower(),
        "pause_key": pause_key,
        "approve": bool(approve),
        "approver": approver.strip(),
        "reason": reason.strip(),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def registered_key(keys: Mapping[str, Ed25519PublicKey], name: str) -> Ed25519PublicKey | None:
    """``name``'s registered key, names compared trimmed and case-folded (as the role check
    compares them); None when it has none."""
    folded = name.strip().casefold()
    return next((k for n, k in keys.items() if n.strip().casefold() == folded), None)


def sign_approval(key: Ed25519PrivateKey, message: bytes) -> str:
    """The signature of ``message``, base64 (what the form's ``signature`` field carries)."""
    return base64.b64encode(key.sign(message)).decode("ascii")


def verify_approval(public_key: Ed25519PublicKey, message: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``public_key``'s signature of ``message``."""
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    try:
        public_key.verify(raw, message)
    except InvalidSignature:
        return False
    return True


_P = 2**255 - 19
# The y coordinates of the eight points of small order (1, 2, 4, 8): a "public key" there lets
# anyone make signatures that verify (OpenSSL's Ed25519 verify does not refuse them), e.g. the
# all-zero placeholder key. Each y stands for the point and its negation.
_SMALL_ORDER_Y = frozenset(
    {
        0,
        1,
        _P - 1,
        2707385501144840649318225287225658788936804267575313519463743609750303402022,
        55188659117513257062467267217118295137698188065244968500265048394206261417927,
    }
)


def parse_public_key(text: str, *, source: str = "approval key") -> Ed25519PublicKey:
    """A registered key: the raw 32-byte Ed25519 public key, base64. Anything else, and keys
    anyone could sign for (points of small order, non-canonical encodings), is a
    :class:`ConfigError` naming ``source``."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source}: not base64") from None
    if len(raw) != 32:
        raise ConfigError(f"{source}: an Ed25519 public key is 32 bytes, got {len(raw)}")
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _P or y in _SMALL_ORDER_Y:
        raise ConfigError(
            f"{source}: a weak key (a point of small order or a non-canonical encoding): anyone "
            "could sign for it; make one with `ballast approver-key`"
        )
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: not an Ed25519 public key: {exc}") from None


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw public key, base64: what the roles file registers."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def create_approver_key(path: Path) -> Ed25519PrivateKey:
    """A new key at ``path`` (mode 0600, never over an existing file: that could be the only
    copy of someone's key)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists: refusing to write a new key over it") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # a half-written key would block the next try ("exists")
        raise
    return key


def load_approver_key(path: Path) -> Ed25519PrivateKey:
    """The private key at ``path``; refused unless only its owner can read it."""
    pem = read_private_config(path, "approver key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"approver key {path} is not an unencrypted PEM key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"approver key {path} is not an Ed25519 key")
    return key

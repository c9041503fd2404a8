"""Key providers: who holds the key-encryption keys (KEKs) that wrap each object's data key.

A provider never sees plaintext data, only 32-byte data keys (DEKs). Two providers:

* :class:`LocalKeyring`: a JSON file outside the repository (mode 0600, parent 0700) holding
  random 256-bit KEKs; a DEK is wrapped with AES-256-GCM, the caller's context as associated data.
* :class:`KmsKeyProvider`: AWS KMS ``Encrypt``/``Decrypt`` with the context as the KMS encryption
  context, so CloudTrail shows which object each unwrap was for.

The byte layout of a locally wrapped key is in ``ballast/FORMAT.md``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ballast.errors import (
    BallastError,
    ConfigError,
    DecryptionError,
    KeyNotFoundError,
    KeyServiceUnavailable,
    redacted_cause,
)
from ballast.storage import atomic_write

if TYPE_CHECKING:
    from ballast.settings import Settings

__all__ = [
    "DEK_SIZE",
    "KEK_SIZE",
    "KeyProvider",
    "KmsKeyProvider",
    "LocalKeyring",
    "provider_from_settings",
]

DEK_SIZE = 32
logger = logging.getLogger(__name__)

KEK_SIZE = 32
WRAP_NONCE_SIZE = 12
KEYRING_FORMAT = "ballast-keyring/1"
KMS_CONTEXT_KEY = "ballast:identity"


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps data keys. ``context`` is authenticated: unwrap needs the same bytes."""

    def current_key_id(self) -> str:
        """The key id new objects are wrapped under."""
        ...

    def wrap_key(self, key_id: str, dek: bytes, context: bytes) -> bytes: ...

    def unwrap_key(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        """Raises KeyNotFoundError (unknown or retired key) or DecryptionError (anything else)."""
        ...


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _encrypt_error(message: str) -> BallastError:
    # errors.py has no encryption-side class; the stage says where it failed.
    return BallastError(message, stage="encrypt")


class LocalKeyring:
    """KEKs in a local JSON file. Every call re-reads the file, so rotations by another process
    are seen at once; writers take an exclusive ``flock`` and replace the file atomically.

    ``retire`` destroys the key material and keeps a tombstone, so objects still wrapped under a
    retired key fail with a message that says the key was retired (not merely "unknown").
    """

    def __init__(self, path: Path, *, auto_create: bool = False) -> None:
        self.path = Path(path).expanduser()
        # With auto_create, the first current_key_id() on a machine without a keyring makes one:
        # the local default must work out of the box; explicit callers get a clear error instead.
        self.auto_create = auto_create

    def __repr__(self) -> str:
        return f"LocalKeyring({str(self.path)!r})"

    # -- KeyProvider ---------------------------------------------------------------------------

    def current_key_id(self) -> str:
        data = self._load(missing_ok=self.auto_create)
        current = data.get("current") if data else None
        if current:
            return str(current)
        if self.auto_create:
            return self._create_key(only_if_none=True)
        raise KeyNotFoundError(
            f"keyring {self.path} has no current key; create one with `ballast keys create`"
        )

    def wrap_key(self, key_id: str, dek: bytes, context: bytes) -> bytes:
        if len(dek) != DEK_SIZE:
            raise ValueError(f"data key must be {DEK_SIZE} bytes, got {len(dek)}")
        kek = self._kek(key_id, self._load())
        nonce = os.urandom(WRAP_NONCE_SIZE)
        return nonce + AESGCM(kek).encrypt(nonce, bytes(dek), context)

    def unwrap_key(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        kek = self._kek(key_id, self._load())
        if len(wrapped) != WRAP_NONCE_SIZE + DEK_SIZE + 16:
            raise DecryptionError(
                f"wrapped data key under key {key_id!r} has length {len(wrapped)}, "
                f"expected {WRAP_NONCE_SIZE + DEK_SIZE + 16}: the header is corrupt"
            )
        nonce, body = wrapped[:WRAP_NONCE_SIZE], wrapped[WRAP_NONCE_SIZE:]
        try:
            return AESGCM(kek).decrypt(nonce, body, context)
        except InvalidTag:
            raise DecryptionError(
                f"could not unwrap the data key with key {key_id!r}: wrong key material, "
                "a tampered header, or the object is bound to another identity"
            ) from None

    # -- management ----------------------------------------------------------------------------

    def create_key(self) -> str:
        """Add a fresh random KEK and make it current. Creates the keyring if needed."""
        return self._create_key(only_if_none=False)

    def _create_key(self, *, only_if_none: bool) -> str:
        with self._locked() as data:
            if only_if_none and data.get("current"):
                # Another process created one while we waited for the lock: use it.
                return str(data["current"])
            key_id = self._fresh_id(data)
            data["keys"][key_id] = {
                "kek": base64.b64encode(os.urandom(KEK_SIZE)).decode("ascii"),
                "created": _now(),
            }
            data["current"] = key_id
        return key_id

    def rotate(self) -> str:
        """Make a new current key. Older keys stay usable for unwrap until retired, so objects
        can be re-wrapped (``crypto.rewrap_header``) before their old key is retired."""
        return self.create_key()

    def retire(self, key_id: str) -> None:
        """Destroy a key's material for good (crypto-shredding); the id stays as a tombstone."""
        with self._locked() as data:
            entry = data["keys"].get(key_id)
            if entry is None:
                raise KeyNotFoundError(f"key {key_id!r} is not in keyring {self.path}")
            if data.get("current") == key_id:
                raise ConfigError(f"key {key_id!r} is the current key; rotate() before retiring it")
            if "retired" in entry:
                return
            data["keys"][key_id] = {"created": entry.get("created"), "retired": _now()}

    def key_ids(self) -> list[str]:
        """Ids of keys that can still unwrap (current first, then by creation time)."""
        data = self._load(missing_ok=True)
        if not data:
            return []
        active = [(v.get("created", ""), k) for k, v in data["keys"].items() if "kek" in v]
        ordered = [k for _, k in sorted(active)]
        current = data.get("current")
        if current in ordered:
            ordered.remove(current)
            ordered.insert(0, current)
        return ordered

    def retired_key_ids(self) -> list[str]:
        data = self._load(missing_ok=True)
        return sorted(k for k, v in data["keys"].items() if "retired" in v) if data else []

    # -- file handling ---------------------------------------------------------------------------

    def _kek(self, key_id: str, data: dict[str, Any]) -> bytes:
        entry = data["keys"].get(key_id)
        if entry is None:
            raise KeyNotFoundError(f"key {key_id!r} is not in keyring {self.path}")
        if "kek" not in entry:
            raise KeyNotFoundError(
                f"key {key_id!r} was retired at {entry.get('retired', '?')} "
                f"and can no longer unwrap data keys (keyring {self.path})"
            )
        try:
            kek = base64.b64decode(entry["kek"], validate=True)
        except (ValueError, TypeError):  # binascii.Error is a ValueError; so is non-ASCII text
            kek = b""
        if len(kek) != KEK_SIZE:
            raise ConfigError(f"keyring {self.path}: key {key_id!r} is not {KEK_SIZE} bytes")
        return kek

    def _fresh_id(self, data: dict[str, Any]) -> str:
        while True:
            key_id = secrets.token_hex(6)
            if key_id not in data["keys"]:  # tombstones count: an id is never reused
                return key_id

    def _check_secure(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"keyring {self.path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"keyring {self.path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it. "
                f"Run: chmod 600 {self.path}"
            )
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise ConfigError(
                f"keyring {self.path} is owned by uid {st.st_uid}, not by this user; refusing it"
            )
        parent = self.path.parent.stat()
        if parent.st_mode & 0o022:
            # Someone else could swap the file for one holding keys they know.
            raise ConfigError(
                f"keyring directory {self.path.parent} is writable by group or others "
                f"(mode {stat.S_IMODE(parent.st_mode):04o}); run: chmod 700 {self.path.parent}"
            )

    def _load(self, *, missing_ok: bool = False) -> dict[str, Any]:
        try:
            # O_NOFOLLOW + fstat: check the very file we read, not whatever a symlink points at.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            if missing_ok:
                return {}
            raise KeyNotFoundError(
                f"no keyring at {self.path}; create one with `ballast keys create`"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot open keyring {self.path}: {exc}") from exc
        try:
            # Checked before reading: fdopen of a folder raises IsADirectoryError, untyped.
            self._check_secure(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"keyring {self.path} is not valid JSON: {exc}") from exc
        if (
            not isinstance(data, dict)
            or data.get("format") != KEYRING_FORMAT
            or not isinstance(data.get("keys"), dict)
            # Each entry is an object, and "current" a key id or null: a hand-edited file with
            # anything else must fail here, typed, not deep inside unwrap with an AttributeError.
            or not all(isinstance(v, dict) for v in data["keys"].values())
            or not isinstance(data.get("current"), str | None)
        ):
            raise ConfigError(f"keyring {self.path} is not a {KEYRING_FORMAT} file")
        return data

    def _ensure_dir(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under an exclusive lock; the new file replaces the old atomically."""
        import fcntl

        self._ensure_dir()
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            data = self._load(missing_ok=True) or {
                "format": KEYRING_FORMAT,
                "current": None,
                "keys": {},
            }
            before = json.dumps(data, sort_keys=True)
            yield data
            if json.dumps(data, sort_keys=True) == before and self.path.exists():
                return  # nothing changed: leave the file (and its mtime) alone
            payload = json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
            with atomic_write(self.path, mode=0o600) as fh:
                fh.write(payload)
        finally:
            os.close(lock_fd)  # releases the flock


class KmsKeyProvider:
    """AWS KMS as the KEK holder. ``key_id`` may be a key id, key ARN or alias; the header records
    the resolved key ARN, so a later alias move does not change which key unwraps old objects.

    Only keys this provider trusts unwrap: ``key_id`` and ``also_trust`` (ids, ARNs or aliases:
    old keys during a rotation), compared as resolved ARNs. The header's key id is written by
    whoever wrote the object; KMS would decrypt with any key the caller's role may use (one in
    another account whose policy an attacker controls included), so without this check anyone
    who can write to the bucket could make a forged dataset decrypt as authentic ("strict mode"
    of the AWS Encryption SDK).
    """

    def __init__(
        self,
        key_id: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        *,
        also_trust: Sequence[str] = (),
        client: Any = None,
    ) -> None:
        self.key_id = key_id
        self.also_trust = tuple(also_trust)
        self._arn: str | None = None
        self._trusted: frozenset[str] | None = None
        if client is None:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import NoRegionError

            try:
                client = boto3.client(
                    "kms",
                    endpoint_url=endpoint_url,
                    region_name=region,
                    config=Config(
                        retries={"max_attempts": 5, "mode": "standard"},
                        connect_timeout=5,
                        read_timeout=30,
                    ),
                )
            except NoRegionError as exc:
                raise ConfigError("KmsKeyProvider needs an AWS region (region=...)") from exc
        self._client = client

    def __repr__(self) -> str:
        return f"KmsKeyProvider({self.key_id!r})"

    @staticmethod
    def _context(context: bytes) -> dict[str, str]:
        # KMS encryption contexts are strings and show up in CloudTrail, which is the point.
        return {KMS_CONTEXT_KEY: context.decode("utf-8")}

    def current_key_id(self) -> str:
        return self._current_arn(None)

    def _current_arn(self, error: type[DecryptionError] | None) -> str:
        if self._arn is None:
            resp = self._call("describe_key", self.key_id, error, KeyId=self.key_id)
            self._arn = str(resp["KeyMetadata"]["Arn"])
        return self._arn

    def trusted_key_ids(self) -> frozenset[str]:
        """The ARNs of the keys this provider unwraps with, as far as they still resolve (an
        extra key that no longer does is left out, with a warning: it must not stop objects
        under the current key from decrypting)."""
        if self._trusted is None:
            extra = (self._extra_arn(k) for k in self.also_trust)
            self._trusted = frozenset(
                (self._current_arn(DecryptionError), *(a for a in extra if a is not None))
            )
        return self._trusted

    def _extra_arn(self, key: str) -> str | None:
        if _is_key_arn(key):
            return key  # nothing to resolve
        try:
            resp = self._call("describe_key", key, DecryptionError, KeyId=key)
        except DecryptionError as exc:  # KeyNotFoundError too
            logger.warning("trusted KMS key %r left out: %s", key, exc)
            return None
        return str(resp["KeyMetadata"]["Arn"])

    def wrap_key(self, key_id: str, dek: bytes, context: bytes) -> bytes:
        if len(dek) != DEK_SIZE:
            raise ValueError(f"data key must be {DEK_SIZE} bytes, got {len(dek)}")
        # The header records ``key_id`` as given, and unwrap compares key ARNs only: an alias
        # or a bare id there would make the object unreadable for good (and a re-wrap would
        # have replaced the readable original by then).
        if not _is_key_arn(key_id):
            raise ConfigError(
                f"KMS key {key_id!r} is not a key ARN: give the key's ARN "
                "(arn:aws:kms:<region>:<account>:key/<id>), which the object's header records"
            )
        resp = self._call(
            "encrypt",
            key_id,
            None,
            KeyId=key_id,
            Plaintext=bytes(dek),
            EncryptionContext=self._context(context),
        )
        return bytes(resp["CiphertextBlob"])

    def unwrap_key(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        if key_id not in self.trusted_key_ids():
            raise KeyNotFoundError(
                f"KMS key {key_id!r} is not trusted here (BALLAST_KMS_KEY_ID, "
                "BALLAST_KMS_TRUSTED_KEY_IDS): the object was not written under one of our keys"
            )
        resp = self._call(
            "decrypt",
            key_id,
            DecryptionError,
            KeyId=key_id,
            CiphertextBlob=bytes(wrapped),
            EncryptionContext=self._context(context),
        )
        dek = bytes(resp["Plaintext"])
        if len(dek) != DEK_SIZE:
            raise DecryptionError(f"KMS key {key_id!r} returned a {len(dek)}-byte data key")
        return dek

    def _call(
        self, op: str, key_id: str, error: type[DecryptionError] | None, **kwargs: Any
    ) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        method = getattr(self._client, op)
        try:
            return dict(method(**kwargs))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            msg = exc.response.get("Error", {}).get("Message", "")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _KMS_TRANSIENT or status >= 500:
                raise KeyServiceUnavailable(
                    f"KMS {op} with key {key_id!r} failed ({code}: {msg}); a retry may succeed",
                    stage="decrypt" if error else "encrypt",
                ) from redacted_cause(exc)
            if code in {"NotFoundException", "DisabledException", "KMSInvalidStateException"}:
                raise KeyNotFoundError(
                    f"KMS key {key_id!r} is unavailable ({code}: {msg})"
                ) from redacted_cause(exc)
            text = f"KMS {op} with key {key_id!r} failed ({code}: {msg})"
            raise (error(text) if error else _encrypt_error(text)) from redacted_cause(exc)
        except _transport_errors() as exc:  # a BotoCoreError: the service was not reached
            raise KeyServiceUnavailable(
                f"KMS {op} with key {key_id!r} failed: {exc}; a retry may succeed",
                stage="decrypt" if error else "encrypt",
            ) from redacted_cause(exc)
        except BotoCoreError as exc:  # credentials, parameters: a retry repeats it
            text = f"KMS {op} with key {key_id!r} failed: {exc}"
            raise (error(text) if error else _encrypt_error(text)) from redacted_cause(exc)


# KMS answers that say nothing about the key or the data: retry later.
_KMS_TRANSIENT = frozenset(
    {
        "ThrottlingException",
        "LimitExceededException",
        "RequestLimitExceeded",
        "KMSInternalException",
        "DependencyTimeoutException",
        "ServiceUnavailable",
    }
)


def _transport_errors() -> tuple[type[Exception], ...]:
    """botocore's errors for a service that was not reached or did not answer in time."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectionError,
        ConnectTimeoutError,
        EndpointConnectionError,
        HTTPClientError,
        ReadTimeoutError,
    )

    return (
        ConnectionError,
        EndpointConnectionError,
        ConnectTimeoutError,
        ReadTimeoutError,
        ConnectionClosedError,
        HTTPClientError,
    )


def _is_key_arn(key: str) -> bool:
    """``arn:aws:kms:<region>:<account>:key/<id>``: what a header records (not an alias ARN)."""
    return key.startswith("arn:") and ":key/" in key


def provider_from_settings(settings: Settings) -> KeyProvider:
    """KMS when settings name a KMS key, else the local keyring (created on first use)."""
    if settings.kms_key_id:
        return KmsKeyProvider(
            settings.kms_key_id,
            endpoint_url=settings.kms_endpoint_url or None,
            region=settings.aws_region or None,
            also_trust=settings.kms_trusted_key_ids,
        )
    return LocalKeyring(settings.keyring_path, auto_create=True)

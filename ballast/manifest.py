"""A signed manifest of one release's artefacts.

The manifest lists every file of an artefact folder with its sha256 and size, plus what the files
were made from (dataset hash, git commit) and what was measured (metrics, backend, parity). It is
serialised to canonical JSON (sorted keys, no whitespace, UTF-8) and signed with Ed25519, so a
verifier holding the trusted public key can tell that neither the manifest nor any listed file
changed, and that nothing was added to or removed from the folder.

The signing key lives outside the repository (its path is passed in), 0600, refused when group or
others can read it. With a key provider (the local keyring or KMS, as for datasets) it is created
*wrapped*: the file holds the Ed25519 private key encrypted under the provider's current key plus
the public key in the clear, so a copy of the file alone signs nothing, and ``ballast keys rotate``
re-wraps it. Without a provider it is a plain PKCS#8 PEM (what earlier releases created; still
read).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import secrets
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ballast.errors import BallastError, ConfigError, IntegrityError
from ballast.hashing import sha256_file
from ballast.private_files import PrivateFileError, read_private

if TYPE_CHECKING:
    from ballast.keys import KeyProvider

#: The file name the signed manifest takes inside an artefact folder; it is not listed in itself.
SIGNED_MANIFEST_NAME = "manifest.signed.json"

#: ``format`` of a signing-key file whose private key is wrapped by a key provider.
WRAPPED_KEY_FORMAT = "ballast-wrapped-ed25519/1"
# Authenticated with the wrap: a data key of a dataset cannot be passed off as the signing key.
_SIGNING_KEY_CONTEXT = b"ballast/signing-key/v1"

_SHA256 = r"^[0-9a-f]{64}$"


class ArtifactFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(min_length=1)  # relative, POSIX separators
    sha256: str = Field(pattern=_SHA256)
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, v: str) -> str:
        # A listed path must stay inside the artefact folder when joined to it.
        p = PurePosixPath(v)
        if p.is_absolute() or ".." in p.parts or "\\" in v or str(p) != v:
            raise ValueError(f"artefact path must be a normalised relative POSIX path: {v!r}")
        return v


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    model_name: str = Field(min_length=1)
    created_at: datetime
    git_commit: str | None = None
    dataset_sha256: str = Field(pattern=_SHA256)
    backend: str = Field(min_length=1)
    precision: str = Field(min_length=1)
    files: tuple[ArtifactFile, ...]
    metrics: dict[str, float] = Field(default_factory=dict)
    parity: dict[str, float | int | bool] = Field(default_factory=dict)
    # Chain of custody back to the data at rest (optional: manifests from before they existed).
    dataset_ciphertext_sha256: str | None = Field(default=None, pattern=_SHA256)
    validation_artifact_id: str | None = None
    content_key: str | None = Field(default=None, pattern=_SHA256)

    @field_validator("metrics")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        # Canonical JSON has no NaN/Infinity; refuse them here rather than at signing time.
        bad = [k for k, x in v.items() if not math.isfinite(x)]
        if bad:
            raise ValueError(f"metrics must be finite: {', '.join(sorted(bad))}")
        return v

    @field_validator("created_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("created_at must be timezone-aware")
        return v

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
        return json.dumps(
            self.model_dump(mode="json"),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        ).encode("utf-8")

    def file(self, path: str) -> ArtifactFile:
        """The entry for ``path`` (KeyError when it is not listed)."""
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


class SignedManifest(BaseModel):
    """Canonical manifest JSON, its Ed25519 signature and the signing key's fingerprint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithm: Literal["ed25519"] = "ed25519"
    payload: str  # the canonical JSON text, kept verbatim so the signed bytes round-trip
    signature: str  # base64
    key_fingerprint: str = Field(pattern=_SHA256)

    def unverified_manifest(self) -> Manifest:
        """The payload parsed without checking the signature: use :func:`verify_manifest`."""
        return Manifest.model_validate_json(self.payload)

    def write(self, path: Path) -> Path:
        """Write to ``path`` (a folder gets :data:`SIGNED_MANIFEST_NAME`); returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / SIGNED_MANIFEST_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Path) -> SignedManifest:
        """Read a signed manifest file (or the one inside a folder); IntegrityError if malformed."""
        path = Path(path)
        if path.is_dir():
            path = path / SIGNED_MANIFEST_NAME
        try:
            return cls.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise IntegrityError(f"signed manifest missing: {path}") from exc
        except ValidationError as exc:
            raise IntegrityError(f"signed manifest {path} is malformed: {exc}") from exc


# --- keys -----------------------------------------------------------------------------------


def load_or_create_signing_key(
    key_path: Path, provider: KeyProvider | None = None
) -> Ed25519PrivateKey:
    """The Ed25519 signing key at ``key_path``, created (0600, folder 0700) when missing:
    wrapped by ``provider`` when one is given, else as a plain PEM."""
    key_path = Path(key_path)
    if not key_path.exists():
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        if provider is not None:
            data = _wrapped_key_bytes(key, provider, provider.current_key_id())
        else:
            data = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        if _install_new_key(key_path, data):
            return key
    return _read_private_key(key_path, provider)


def _install_new_key(key_path: Path, data: bytes) -> bool:
    """Put ``data`` at ``key_path`` only if nothing is there; False when another signer won.

    The key is written and fsynced under a temporary name first and then hard-linked into place:
    the final name never exists half-written (a crash or a concurrent first signer would otherwise
    read an empty key), and ``link`` fails rather than overwrite a key someone else created.
    """
    tmp = key_path.with_name(f".{key_path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, key_path)
        except FileExistsError:
            return False
        _fsync_dir(key_path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    # The new directory entry must survive a crash too, not only the file's bytes.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _wrapped_key_bytes(key: Ed25519PrivateKey, provider: KeyProvider, kek_id: str) -> bytes:
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    doc = {
        "format": WRAPPED_KEY_FORMAT,
        "kek_id": kek_id,
        "wrapped": base64.b64encode(provider.wrap_key(kek_id, raw, _SIGNING_KEY_CONTEXT)).decode(),
        "public": base64.b64encode(public_key_bytes(key)).decode(),
    }
    return (json.dumps(doc, indent=1) + "\n").encode()


def _wrapped_doc(data: bytes, key_path: Path) -> dict[str, Any] | None:
    """The parsed wrapped-key document, or None when ``data`` is a PEM."""
    if not data.lstrip().startswith(b"{"):
        return None
    try:
        doc = json.loads(data)
        if doc.get("format") != WRAPPED_KEY_FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        for field in ("kek_id", "wrapped", "public"):
            if not isinstance(doc.get(field), str):
                raise ValueError(f"missing {field}")
        return dict(doc)
    except ValueError as exc:
        raise IntegrityError(f"signing key {key_path} is unreadable: {exc}") from exc


def _read_private_key(key_path: Path, provider: KeyProvider | None = None) -> Ed25519PrivateKey:
    try:
        data = read_private(key_path, "signing key")
    except PrivateFileError as exc:
        if exc.missing:
            raise FileNotFoundError(key_path) from None
        raise IntegrityError(exc.message) from None
    doc = _wrapped_doc(data, key_path)
    if doc is not None:
        if provider is None:
            raise IntegrityError(
                f"signing key {key_path} is wrapped by key {doc['kek_id']!r}: "
                "signing needs the key provider (keyring or KMS)"
            )
        try:
            wrapped = base64.b64decode(doc["wrapped"], validate=True)
            public = base64.b64decode(doc["public"], validate=True)
        except ValueError as exc:
            raise IntegrityError(f"signing key {key_path} is unreadable: {exc}") from exc
        raw = provider.unwrap_key(doc["kek_id"], wrapped, _SIGNING_KEY_CONTEXT)
        try:
            wrapped_key = Ed25519PrivateKey.from_private_bytes(raw)
        except ValueError as exc:
            raise IntegrityError(f"signing key {key_path} is unreadable: {exc}") from exc
        if public_key_bytes(wrapped_key) != public:
            raise IntegrityError(f"signing key {key_path}: the private and public halves differ")
        return wrapped_key
    if not data.strip():
        raise IntegrityError(
            f"signing key {key_path} is empty (a crash while an earlier version created it?)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: an encrypted PEM; UnsupportedAlgorithm: a key type cryptography lacks.
        raise IntegrityError(f"signing key {key_path} is unreadable: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{key_path} is not an Ed25519 private key")
    return key


def rewrap_signing_key(key_path: Path, provider: KeyProvider) -> str | None:
    """Re-wrap a wrapped signing key under the provider's current key (after a rotation).

    Returns the new key id, or None when there was nothing to do (no file, a plain PEM, or
    already under the current key). The signing key itself, and so every signature, stays.
    """
    key_path = Path(key_path)
    if not key_path.exists():
        return None
    doc = _wrapped_doc(key_path.read_bytes(), key_path)
    current = provider.current_key_id()
    if doc is None or doc["kek_id"] == current:
        return None
    key = _read_private_key(key_path, provider)
    tmp = key_path.with_name(f".{key_path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_wrapped_key_bytes(key, provider, current))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, key_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return current


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key (what a verifier pins)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """sha256 of the raw public key, hex."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()


def export_public_key(key_path: Path, dst: Path) -> Path:
    """Write the public half of the signing key at ``key_path`` to ``dst`` as PEM (atomically:
    a failed write leaves ``dst`` as it was). Refuses (:class:`ConfigError`) to write over the
    key itself, which would destroy the only copy of the private half."""
    from ballast.storage import atomic_write

    dst = Path(dst)
    if dst.exists() and os.path.samefile(dst, key_path):
        raise ConfigError(f"{dst} is the signing key itself; write the public key elsewhere")
    pub = _trusted_public_key(Path(key_path))
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with atomic_write(dst, mode=0o644) as fh:  # public: readable by the pods that verify
        fh.write(pem)
    return dst


def _trusted_public_key(trusted: bytes | Path) -> Ed25519PublicKey:
    if isinstance(trusted, bytes):
        if len(trusted) == 32:
            return Ed25519PublicKey.from_public_bytes(trusted)
        data = trusted
        source = "trusted key"
    else:
        source = f"trusted key {trusted}"
        try:
            data = Path(trusted).read_bytes()
        except OSError as exc:
            raise IntegrityError(f"{source} cannot be read: {exc}") from exc
        doc = _wrapped_doc(data, Path(trusted))
        if doc is not None:  # a wrapped signing key carries its public half in the clear
            try:
                public = base64.b64decode(doc["public"], validate=True)
                return Ed25519PublicKey.from_public_bytes(public)
            except ValueError as exc:  # bad base64 or not 32 bytes
                raise IntegrityError(f"{source}: its public key is malformed: {exc}") from exc
    try:
        if b"PRIVATE KEY" in data:
            priv = serialization.load_pem_private_key(data, password=None)
            if not isinstance(priv, Ed25519PrivateKey):
                raise IntegrityError(f"{source} is not an Ed25519 key")
            return priv.public_key()
        pub = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IntegrityError(f"{source} cannot be read: {exc}") from exc
    if not isinstance(pub, Ed25519PublicKey):
        raise IntegrityError(f"{source} is not an Ed25519 key")
    return pub


# --- build, sign, verify ---------------------------------------------------------------------


def _artifact_files(artifact_dir: Path) -> dict[str, Path]:
    """Every regular file under ``artifact_dir`` except the signed manifest, by relative path.

    Anything that is neither a regular file nor a folder (symlink, FIFO, socket, device) is
    refused: it is not covered by a hash, and a FIFO would block whoever opens it."""
    found: dict[str, Path] = {}
    for p in sorted(artifact_dir.rglob("*")):
        rel = p.relative_to(artifact_dir).as_posix()
        mode = p.lstat().st_mode  # lstat: never follows a link nor opens the entry
        if stat.S_ISLNK(mode):
            # A link could point outside the folder and change without the folder changing.
            raise IntegrityError(f"symlink in artefact folder: {rel}")
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise IntegrityError(f"not a regular file in artefact folder: {rel}")
        if rel != SIGNED_MANIFEST_NAME:
            found[rel] = p
    return found


def build_manifest(
    artifact_dir: Path,
    *,
    model_name: str,
    dataset_sha256: str,
    backend: str,
    precision: str,
    metrics: dict[str, float] | None = None,
    parity: dict[str, float | int | bool] | None = None,
    git_commit: str | None = None,
    created_at: datetime | None = None,
    dataset_ciphertext_sha256: str | None = None,
    validation_artifact_id: str | None = None,
    content_key: str | None = None,
) -> Manifest:
    """List and hash every file in ``artifact_dir`` (except a signed manifest already there)."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise IntegrityError(f"artefact folder not found: {artifact_dir}")
    try:
        files = tuple(
            ArtifactFile(path=rel, sha256=sha256_file(p), size=p.stat().st_size)
            for rel, p in _artifact_files(artifact_dir).items()
        )
    except ValidationError as exc:  # a name no manifest can hold (a backslash, not UTF-8)
        problem = exc.errors()[0]
        raise IntegrityError(
            f"artefact folder {artifact_dir}: {problem['msg']} ({problem.get('input')!r})"
        ) from None
    if not files:
        raise IntegrityError(f"artefact folder is empty: {artifact_dir}")
    try:
        return Manifest(
            model_name=model_name,
            created_at=created_at or datetime.now(UTC),
            git_commit=git_commit,
            dataset_sha256=dataset_sha256,
            backend=backend,
            precision=precision,
            files=files,
            metrics=dict(metrics or {}),
            parity=dict(parity or {}),
            dataset_ciphertext_sha256=dataset_ciphertext_sha256,
            validation_artifact_id=validation_artifact_id,
            content_key=content_key,
        )
    except ValidationError as exc:  # a non-finite metric, a malformed hash: typed, one line
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise IntegrityError(f"manifest of {artifact_dir}: {problems}") from None


def sign_manifest(
    manifest: Manifest, key_path: Path, provider: KeyProvider | None = None
) -> SignedManifest:
    """Sign ``manifest`` with the key at ``key_path`` (created 0600 when missing, wrapped by
    ``provider`` when given)."""
    try:
        key = load_or_create_signing_key(key_path, provider)
    except IntegrityError:
        raise
    except BallastError as exc:  # the provider could not unwrap it (unknown key, wrong material)
        raise IntegrityError(f"signing key {key_path} could not be unwrapped: {exc}") from exc
    payload = manifest.canonical_bytes()
    return SignedManifest(
        payload=payload.decode("utf-8"),
        signature=base64.b64encode(key.sign(payload)).decode("ascii"),
        key_fingerprint=key_fingerprint(key),
    )


def verify_manifest(
    signed: SignedManifest, trusted_key: bytes | Path, artifact_dir: Path
) -> Manifest:
    """Check the signature against the trusted key and every file in ``artifact_dir``.

    ``trusted_key`` is the raw 32-byte public key, PEM bytes, or a PEM file (public or the signing
    key itself). Raises :class:`IntegrityError` naming every problem found: wrong key, bad
    signature, a missing, changed, resized or unlisted file. Returns the verified manifest.
    """
    pub = _trusted_public_key(trusted_key)
    if key_fingerprint(pub) != signed.key_fingerprint:
        raise IntegrityError(
            f"manifest was signed by key {signed.key_fingerprint[:16]}…, "
            f"the trusted key is {key_fingerprint(pub)[:16]}…"
        )
    try:
        pub.verify(base64.b64decode(signed.signature, validate=True), signed.payload.encode())
    except (InvalidSignature, ValueError) as exc:
        raise IntegrityError("manifest signature does not verify") from exc
    try:
        manifest = Manifest.model_validate_json(signed.payload)
    except ValidationError as exc:  # signed but unreadable: a newer schema or a signer bug
        raise IntegrityError(f"signed manifest payload is invalid: {exc}") from exc

    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise IntegrityError(f"artefact folder not found: {artifact_dir}")
    present = _artifact_files(artifact_dir)
    problems: list[str] = []
    for entry in manifest.files:
        p = present.pop(entry.path, None)
        if p is None:
            problems.append(f"missing: {entry.path}")
        elif p.stat().st_size != entry.size:
            problems.append(f"size changed: {entry.path} ({p.stat().st_size} != {entry.size})")
        elif sha256_file(p) != entry.sha256:
            problems.append(f"content changed: {entry.path}")
    problems.extend(f"not in manifest: {rel}" for rel in present)
    if problems:
        raise IntegrityError(f"artefacts in {artifact_dir} do not match: " + "; ".join(problems))
    return manifest


def current_git_commit(repo: Path | None = None) -> str | None:
    """HEAD's commit id of the repository at ``repo`` (cwd by default), or None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


#: The packages whose code builds, registers and serves a release (for source_identity).
CODE_PACKAGES = ("ballast", "tasks", "flows", "model_registry", "infra")
_PROJECT = Path(__file__).resolve().parents[1]


def source_identity(root: Path | None = None) -> str | None:
    """A hash of every ``.py`` file of :data:`CODE_PACKAGES` under ``root`` (this checkout by
    default), with their paths: what identifies the code where there is no git (a container
    image holds the sources, not the repository). None if there are none."""
    base = _PROJECT if root is None else root
    digest = hashlib.sha256()
    found = False
    for package in CODE_PACKAGES:
        for path in sorted((base / package).rglob("*.py")):
            digest.update(path.relative_to(base).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
            found = True
    return f"src-{digest.hexdigest()[:24]}" if found else None


def code_identity(repo: Path | None = None) -> str | None:
    """What identifies the code that built a release: HEAD's commit, plus a hash of uncommitted
    changes to tracked files when there are any (so an edited checkout is not taken for HEAD).
    Outside git (an image built from the sources) a hash of the sources themselves
    (:func:`source_identity`): before, "unknown", so an image with fixed compile or manifest
    code registered nothing new for the same data. None only where neither is found."""
    commit = current_git_commit(repo)
    if commit is None:
        return source_identity(repo)
    try:
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--no-ext-diff", "--binary"],
            cwd=repo,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return commit
    if diff.returncode != 0 or not diff.stdout:
        return commit
    return f"{commit}+{hashlib.sha256(diff.stdout).hexdigest()[:16]}"

"""A signed manifest of one release's artefacts.

The manifest lists every file of an artefact folder with its sha256 and size, plus what the files
were made from (dataset hash, git commit) and what was measured (metrics, backend, parity). It is
serialised to canonical JSON (sorted keys, no whitespace, UTF-8) and signed with Ed25519, so a
verifier holding the trusted public key can tell that neither the manifest nor any listed file
changed, and that nothing was added to or removed from the folder.

The signing key is a PKCS#8 PEM file that lives outside the repository (its path is passed in); it
is created 0600 on first use and refused when group or others can read it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ballast.errors import IntegrityError
from ballast.hashing import sha256_file

#: The file name the signed manifest takes inside an artefact folder; it is not listed in itself.
SIGNED_MANIFEST_NAME = "manifest.signed.json"

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


def load_or_create_signing_key(key_path: Path) -> Ed25519PrivateKey:
    """The Ed25519 signing key at ``key_path``, created (0600, folder 0700) when missing."""
    key_path = Path(key_path)
    if not key_path.exists():
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            # O_EXCL: two first-time signers must not overwrite each other's key.
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _read_private_key(key_path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return key
    return _read_private_key(key_path)


def _read_private_key(key_path: Path) -> Ed25519PrivateKey:
    mode = key_path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IntegrityError(
            f"signing key {key_path} is accessible to group/others "
            f"(mode {stat.S_IMODE(mode):o}); run chmod 600 on it"
        )
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{key_path} is not an Ed25519 private key")
    return key


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key (what a verifier pins)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """sha256 of the raw public key, hex."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()


def export_public_key(key_path: Path, dst: Path) -> Path:
    """Write the public half of the signing key at ``key_path`` to ``dst`` as PEM."""
    pub = load_or_create_signing_key(key_path).public_key()
    dst = Path(dst)
    dst.write_bytes(
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return dst


def _trusted_public_key(trusted: bytes | Path) -> Ed25519PublicKey:
    if isinstance(trusted, bytes):
        if len(trusted) == 32:
            return Ed25519PublicKey.from_public_bytes(trusted)
        data = trusted
    else:
        data = Path(trusted).read_bytes()
    try:
        if b"PRIVATE KEY" in data:
            priv = serialization.load_pem_private_key(data, password=None)
            if not isinstance(priv, Ed25519PrivateKey):
                raise IntegrityError("trusted key is not an Ed25519 key")
            return priv.public_key()
        pub = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise IntegrityError(f"trusted key cannot be read: {exc}") from exc
    if not isinstance(pub, Ed25519PublicKey):
        raise IntegrityError("trusted key is not an Ed25519 key")
    return pub


# --- build, sign, verify ---------------------------------------------------------------------


def _artifact_files(artifact_dir: Path) -> dict[str, Path]:
    """Every regular file under ``artifact_dir`` except the signed manifest, by relative path."""
    found: dict[str, Path] = {}
    for p in sorted(artifact_dir.rglob("*")):
        rel = p.relative_to(artifact_dir).as_posix()
        if p.is_symlink():
            # A link could point outside the folder and change without the folder changing.
            raise IntegrityError(f"symlink in artefact folder: {rel}")
        if p.is_file() and rel != SIGNED_MANIFEST_NAME:
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
) -> Manifest:
    """List and hash every file in ``artifact_dir`` (except a signed manifest already there)."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise IntegrityError(f"artefact folder not found: {artifact_dir}")
    files = tuple(
        ArtifactFile(path=rel, sha256=sha256_file(p), size=p.stat().st_size)
        for rel, p in _artifact_files(artifact_dir).items()
    )
    if not files:
        raise IntegrityError(f"artefact folder is empty: {artifact_dir}")
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
    )


def sign_manifest(manifest: Manifest, key_path: Path) -> SignedManifest:
    """Sign ``manifest`` with the key at ``key_path`` (created 0600 when missing)."""
    key = load_or_create_signing_key(key_path)
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

"""Hashing and the signed manifest: what a verifier accepts, and every way it must refuse."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from ballast.errors import IntegrityError
from ballast.hashing import sha256_file
from ballast.manifest import (
    SIGNED_MANIFEST_NAME,
    ArtifactFile,
    Manifest,
    SignedManifest,
    build_manifest,
    current_git_commit,
    export_public_key,
    load_or_create_signing_key,
    public_key_bytes,
    sign_manifest,
    verify_manifest,
)

DATASET = "ab" * 32


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    d = tmp_path / "artefacts"
    (d / "sub").mkdir(parents=True)
    (d / "model.ort.onnx").write_bytes(b"onnx-bytes" * 100)
    (d / "state_dict.pt").write_bytes(b"weights")
    (d / "sub" / "notes.txt").write_text("nested file")
    return d


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "signing.pem"


def _signed(artifact_dir: Path, key_path: Path) -> SignedManifest:
    manifest = build_manifest(
        artifact_dir,
        model_name="m",
        dataset_sha256=DATASET,
        backend="onnxruntime",
        precision="fp32",
        metrics={"accuracy": 0.97, "bench_b1_p50_ms": 0.02},
        parity={"max_rel_err": 1e-7, "passed": True},
        git_commit="deadbeef",
    )
    signed = sign_manifest(manifest, key_path)
    signed.write(artifact_dir)
    return signed


def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) * 2 + 123)  # spans three 1 MiB reads
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_build_manifest_lists_every_file_but_the_signed_manifest(
    artifact_dir: Path, key_path: Path
) -> None:
    _signed(artifact_dir, key_path)  # leaves manifest.signed.json in the folder
    manifest = build_manifest(
        artifact_dir,
        model_name="m",
        dataset_sha256=DATASET,
        backend="onnxruntime",
        precision="fp32",
    )
    assert [f.path for f in manifest.files] == ["model.ort.onnx", "state_dict.pt", "sub/notes.txt"]
    entry = manifest.file("state_dict.pt")
    assert entry.size == 7
    assert entry.sha256 == hashlib.sha256(b"weights").hexdigest()
    assert manifest.created_at.tzinfo is not None


def test_signed_manifest_verifies_with_raw_key_private_key_file_and_public_pem(
    artifact_dir: Path, key_path: Path, tmp_path: Path
) -> None:
    signed = _signed(artifact_dir, key_path)
    raw = public_key_bytes(load_or_create_signing_key(key_path))
    pem = export_public_key(key_path, tmp_path / "signing.pub.pem")

    for trusted in (raw, key_path, pem, pem.read_bytes()):
        manifest = verify_manifest(signed, trusted, artifact_dir)
        assert manifest.metrics["accuracy"] == 0.97, f"verified content wrong for {trusted!r}"


def test_signed_manifest_round_trips_through_its_file(artifact_dir: Path, key_path: Path) -> None:
    signed = _signed(artifact_dir, key_path)
    loaded = SignedManifest.read(artifact_dir)
    assert loaded == signed
    verify_manifest(loaded, key_path, artifact_dir)


def test_canonical_bytes_are_sorted_compact_and_stable(artifact_dir: Path) -> None:
    a = build_manifest(
        artifact_dir,
        model_name="m",
        dataset_sha256=DATASET,
        backend="onnxruntime",
        precision="fp32",
    )
    b = Manifest.model_validate_json(a.canonical_bytes())
    assert a.canonical_bytes() == b.canonical_bytes()
    text = a.canonical_bytes().decode()
    assert ": " not in text and ", " not in text, "canonical JSON must have no whitespace"
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_signing_key_is_created_private_and_reused(key_path: Path) -> None:
    first = load_or_create_signing_key(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    second = load_or_create_signing_key(key_path)
    assert public_key_bytes(first) == public_key_bytes(second), "an existing key must be reused"


def test_signing_key_readable_by_others_is_refused(key_path: Path) -> None:
    load_or_create_signing_key(key_path)
    key_path.chmod(0o644)
    with pytest.raises(IntegrityError, match="chmod 600"):
        load_or_create_signing_key(key_path)


def test_changed_file_content_of_same_size_is_refused(artifact_dir: Path, key_path: Path) -> None:
    signed = _signed(artifact_dir, key_path)
    (artifact_dir / "state_dict.pt").write_bytes(b"WEIGHTS")
    with pytest.raises(IntegrityError, match=r"content changed: state_dict\.pt"):
        verify_manifest(signed, key_path, artifact_dir)


def test_resized_missing_and_unlisted_files_are_all_named(
    artifact_dir: Path, key_path: Path
) -> None:
    signed = _signed(artifact_dir, key_path)
    (artifact_dir / "model.ort.onnx").write_bytes(b"short")
    (artifact_dir / "sub" / "notes.txt").unlink()
    (artifact_dir / "extra.so").write_bytes(b"\x7fELF")
    with pytest.raises(IntegrityError) as info:
        verify_manifest(signed, key_path, artifact_dir)
    msg = str(info.value)
    assert "size changed: model.ort.onnx" in msg
    assert "missing: sub/notes.txt" in msg
    assert "not in manifest: extra.so" in msg


def test_edited_payload_fails_the_signature(artifact_dir: Path, key_path: Path) -> None:
    signed = _signed(artifact_dir, key_path)
    forged = signed.model_copy(update={"payload": signed.payload.replace("0.97", "0.99")})
    assert forged.payload != signed.payload
    with pytest.raises(IntegrityError, match="signature does not verify"):
        verify_manifest(forged, key_path, artifact_dir)


def test_manifest_signed_by_another_key_is_refused(
    artifact_dir: Path, key_path: Path, tmp_path: Path
) -> None:
    signed = _signed(artifact_dir, key_path)
    other = load_or_create_signing_key(tmp_path / "other" / "key.pem")
    with pytest.raises(IntegrityError, match="signed by key"):
        verify_manifest(signed, public_key_bytes(other), artifact_dir)


def test_symlink_in_artefact_folder_is_refused(artifact_dir: Path, key_path: Path) -> None:
    signed = _signed(artifact_dir, key_path)
    (artifact_dir / "link").symlink_to("/etc/hostname")
    with pytest.raises(IntegrityError, match="symlink"):
        verify_manifest(signed, key_path, artifact_dir)


def test_missing_signed_manifest_file_is_an_integrity_error(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="missing"):
        SignedManifest.read(tmp_path / SIGNED_MANIFEST_NAME)


def test_manifest_refuses_non_finite_metrics_and_escaping_paths(artifact_dir: Path) -> None:
    with pytest.raises(IntegrityError, match=r"metrics: .*finite: loss"):
        build_manifest(
            artifact_dir,
            model_name="m",
            dataset_sha256=DATASET,
            backend="onnxruntime",
            precision="fp32",
            metrics={"loss": float("nan")},
        )
    for bad in ("../etc/passwd", "/abs", "a/./b"):
        with pytest.raises(ValidationError):
            ArtifactFile(path=bad, sha256="0" * 64, size=1)


def test_current_git_commit_inside_and_outside_a_repository(tmp_path: Path) -> None:
    assert current_git_commit(tmp_path) is None
    commit = current_git_commit(Path(__file__).parent)
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}", commit)


def test_code_outside_git_is_identified_by_its_sources(tmp_path: Path) -> None:
    # An image built from the sources has no .git: before, every image read as code "unknown",
    # so a fixed compile stage registered nothing new for the same data.
    from ballast.manifest import code_identity

    for package in ("ballast", "tasks"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "m.py").write_text("X = 1\n")
    first = code_identity(tmp_path)
    assert first is not None and re.fullmatch(r"src-[0-9a-f]{24}", first)
    assert code_identity(tmp_path) == first  # stable
    (tmp_path / "tasks" / "m.py").write_text("X = 2\n")
    assert code_identity(tmp_path) not in (None, first)  # any change is another identity
    (tmp_path / "tasks" / "m.py").write_text("X = 1\n")
    (tmp_path / "tasks" / "m.py").rename(tmp_path / "tasks" / "n.py")
    assert code_identity(tmp_path) != first  # so is a moved file
    assert code_identity(tmp_path / "empty") is None


# -- a signing key wrapped by the key provider -------------------------------------------------


def test_a_wrapped_signing_key_signs_verifies_and_keeps_nothing_secret_in_the_clear(
    artifact_dir: Path, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    from ballast.keys import LocalKeyring

    ring = LocalKeyring(tmp_path / "keyring.json", auto_create=True)
    key_path = tmp_path / "keys" / "signing-key"
    manifest = build_manifest(
        artifact_dir,
        model_name="m",
        dataset_sha256=DATASET,
        backend="onnxruntime",
        precision="fp32",
        dataset_ciphertext_sha256="cd" * 32,
        validation_artifact_id="a1b2",
        content_key="ef" * 32,
    )
    signed = sign_manifest(manifest, key_path, ring)
    signed.write(artifact_dir)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    doc = json.loads(key_path.read_text())
    assert doc["format"] == "ballast-wrapped-ed25519/1" and doc["kek_id"] == ring.current_key_id()
    key = load_or_create_signing_key(key_path, ring)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert raw not in key_path.read_bytes() and raw.hex() not in key_path.read_text()
    # Verifying needs only the public half, which the file carries in the clear.
    verified = verify_manifest(SignedManifest.read(artifact_dir), key_path, artifact_dir)
    assert verified.dataset_ciphertext_sha256 == "cd" * 32
    assert (verified.validation_artifact_id, verified.content_key) == ("a1b2", "ef" * 32)
    # Signing without the provider, or with another keyring, is refused with the reason.
    with pytest.raises(IntegrityError, match="needs the key provider"):
        sign_manifest(manifest, key_path)
    stranger = LocalKeyring(tmp_path / "other.json", auto_create=True)
    with pytest.raises(IntegrityError, match="could not be unwrapped"):
        sign_manifest(manifest, key_path, stranger)


def test_rotation_rewraps_the_signing_key_and_old_signatures_still_verify(
    artifact_dir: Path, tmp_path: Path
) -> None:
    from ballast.keys import LocalKeyring
    from ballast.manifest import rewrap_signing_key

    ring = LocalKeyring(tmp_path / "keyring.json", auto_create=True)
    key_path = tmp_path / "signing-key"
    _ = load_or_create_signing_key(key_path, ring)
    old_kek = ring.current_key_id()
    signed = _signed_with(artifact_dir, key_path, ring)
    public_before = public_key_bytes(load_or_create_signing_key(key_path, ring))
    assert rewrap_signing_key(key_path, ring) is None  # already under the current key
    new_kek = ring.rotate()
    assert rewrap_signing_key(key_path, ring) == new_kek
    assert json.loads(key_path.read_text())["kek_id"] == new_kek
    ring.retire(old_kek)  # the old key is gone for good: the signing key still opens
    assert public_key_bytes(load_or_create_signing_key(key_path, ring)) == public_before
    verify_manifest(signed, key_path, artifact_dir)


def test_a_plain_pem_signing_key_is_left_alone_by_rotation(tmp_path: Path) -> None:
    from ballast.keys import LocalKeyring
    from ballast.manifest import rewrap_signing_key

    pem = tmp_path / "signing.pem"
    load_or_create_signing_key(pem)  # no provider: the earlier plain format
    ring = LocalKeyring(tmp_path / "keyring.json", auto_create=True)
    before = pem.read_bytes()
    assert rewrap_signing_key(pem, ring) is None and pem.read_bytes() == before


def _signed_with(artifact_dir: Path, key_path: Path, provider: object) -> SignedManifest:
    manifest = build_manifest(
        artifact_dir, model_name="m", dataset_sha256=DATASET, backend="ort", precision="fp32"
    )
    signed = sign_manifest(manifest, key_path, provider)  # type: ignore[arg-type]
    signed.write(artifact_dir)
    return signed


# -- creating the signing key: never a half-written key file -----------------------------------


class _HeldWrites:
    """A file object whose writes wait for ``release`` when made by ``holder`` (a thread)."""

    def __init__(self, fh: Any, holder: threading.Thread, release: threading.Event) -> None:
        self._fh, self._holder, self._release = fh, holder, release

    def __enter__(self) -> _HeldWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def write(self, data: bytes) -> int:
        if threading.current_thread() is self._holder:
            assert self._release.wait(10), "the second signer never finished"
        return int(self._fh.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def test_a_second_first_time_signer_never_reads_a_half_written_key(
    key_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given signer A stopped while writing the new key, when signer B loads the key meanwhile,
    # then B gets a whole key and A, once it finishes, uses the same key (the winner's).
    real_fdopen = os.fdopen
    b_done = threading.Event()
    results: dict[str, object] = {}

    def first_signer() -> None:
        try:
            results["a"] = load_or_create_signing_key(key_path)
        except Exception as exc:
            results["a"] = exc

    a = threading.Thread(target=first_signer)
    monkeypatch.setattr(
        os, "fdopen", lambda fd, *args, **kw: _HeldWrites(real_fdopen(fd, *args, **kw), a, b_done)
    )
    a.start()
    try:
        deadline = time.monotonic() + 10
        while not any(key_path.parent.glob("*")) and time.monotonic() < deadline:
            time.sleep(0.01)  # until A has created its file and is held in write()
        b = load_or_create_signing_key(key_path)
    finally:
        b_done.set()
        a.join(10)
    assert isinstance(results["a"], Ed25519PrivateKey), f"signer A failed: {results['a']!r}"
    on_disk = load_or_create_signing_key(key_path)
    assert public_key_bytes(results["a"]) == public_key_bytes(b) == public_key_bytes(on_disk), (
        "both first-time signers must end up with the one key on disk"
    )
    assert sorted(p.name for p in key_path.parent.iterdir()) == [key_path.name], "temp file left"


def test_a_crash_while_writing_a_new_key_leaves_no_key_file_behind(
    key_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fdopen = os.fdopen

    class _DiskFull:
        def __init__(self, fh: Any) -> None:
            self._fh = fh

        def __enter__(self) -> _DiskFull:
            return self

        def __exit__(self, *exc: object) -> None:
            self._fh.close()

        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **kw: _DiskFull(real_fdopen(fd, *a, **kw)))
    with pytest.raises(OSError, match="No space"):
        load_or_create_signing_key(key_path)
    monkeypatch.undo()
    assert list(key_path.parent.iterdir()) == [], "a failed creation must leave no (empty) key"
    key = load_or_create_signing_key(key_path)  # the next signer simply creates it
    assert public_key_bytes(load_or_create_signing_key(key_path)) == public_key_bytes(key)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
        None,  # a genuine wrapped key whose public half is bad base64
    ],
    ids=["empty", "corrupt-pem", "wrapped-bad-public"],
)
def test_an_unreadable_signing_key_is_an_integrity_error_naming_the_file(
    tmp_path: Path, artifact_dir: Path, content: bytes | None
) -> None:
    from ballast.keys import LocalKeyring

    key_path = tmp_path / "signing.pem"
    ring = LocalKeyring(tmp_path / "keyring.json", auto_create=True)
    if content is None:
        load_or_create_signing_key(key_path, ring)
        doc = json.loads(key_path.read_text())
        content = json.dumps({**doc, "public": "A"}).encode()
        key_path.unlink()
    key_path.write_bytes(content)
    key_path.chmod(0o600)
    manifest = build_manifest(
        artifact_dir, model_name="m", dataset_sha256=DATASET, backend="ort", precision="fp32"
    )
    with pytest.raises(IntegrityError, match=re.escape(str(key_path))):
        sign_manifest(manifest, key_path, ring)


# -- a malformed or missing trusted key --------------------------------------------------------


@pytest.mark.parametrize(
    "public", ["not base64!", base64.b64encode(b"\0" * 31).decode()], ids=["base64", "length"]
)
def test_a_malformed_trusted_wrapped_key_is_an_integrity_error_naming_it(
    artifact_dir: Path, key_path: Path, tmp_path: Path, public: str
) -> None:
    signed = _signed(artifact_dir, key_path)
    trusted = tmp_path / "trusted.json"
    doc = {"format": "ballast-wrapped-ed25519/1", "kek_id": "k", "wrapped": "x", "public": public}
    trusted.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match=re.escape(str(trusted))):
        verify_manifest(signed, trusted, artifact_dir)


def test_a_missing_trusted_key_file_is_an_integrity_error_naming_it(
    artifact_dir: Path, key_path: Path, tmp_path: Path
) -> None:
    signed = _signed(artifact_dir, key_path)
    for trusted in (tmp_path / "nope.pem", tmp_path):  # missing, and a folder
        with pytest.raises(IntegrityError, match=re.escape(str(trusted))):
            verify_manifest(signed, trusted, artifact_dir)


# -- entries that are neither files nor folders --------------------------------------------------


def test_a_fifo_in_a_verified_folder_is_refused_without_opening_it(
    artifact_dir: Path, key_path: Path
) -> None:
    signed = _signed(artifact_dir, key_path)
    os.mkfifo(artifact_dir / "sub" / "pipe")  # opening it for reading would block: no writer
    with pytest.raises(IntegrityError, match=r"not a regular file.*sub/pipe"):
        verify_manifest(signed, key_path, artifact_dir)
    with pytest.raises(IntegrityError, match=r"not a regular file.*sub/pipe"):
        build_manifest(
            artifact_dir, model_name="m", dataset_sha256=DATASET, backend="ort", precision="fp32"
        )


@pytest.mark.parametrize(
    ("name", "match"),
    [(b"a\\b", "normalised relative POSIX path"), (b"\xff.bin", "valid string")],
    ids=["backslash", "not-utf8"],
)
def test_a_file_name_no_manifest_can_hold_is_an_integrity_error(
    tmp_path: Path, name: bytes, match: str
) -> None:
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with open(os.path.join(os.fsencode(tmp_path), name), "wb") as fh:
        fh.write(b"x")
    with pytest.raises(IntegrityError, match=match):
        build_manifest(
            tmp_path, model_name="m", dataset_sha256="cd" * 32, backend="ort", precision="fp32"
        )

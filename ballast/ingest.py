"""The data boundary: fetch → decrypt → validate, each failure typed by its stage.

Plaintext exists only in memory here and leaves only as a :class:`ValidatedDataset`. The sha256 of
the ciphertext is computed while it streams in (no second read); the plaintext's after decryption.
A dataset that fails validation is recorded in the quarantine log before the error propagates
(a log that cannot be written is logged and noted on the error, which stays the validation one).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast
from urllib.parse import urlparse

from ballast.crypto import KeyProvider, decrypt_stream
from ballast.data import DatasetSpec, ValidatedDataset
from ballast.errors import ConfigError
from ballast.settings import Settings
from ballast.storage import S3Options, Storage, storage_for
from ballast.validation import DEFAULT_GE_SAMPLE_ROWS, ExpectationsFailed, validate_bytes

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # as settings.dataset_name, '..' aside


def dataset_identity(name: str) -> str:
    """The associated data an encrypted dataset is bound to: a renamed copy will not decrypt."""
    return f"dataset:{name}"


def dataset_name_from_uri(uri: str) -> str:
    """The dataset name a storage location implies: its file name less ``.csv.enc`` (or
    ``.enc``), else up to the first dot.

    ``s3://bucket/datasets/breast-cancer.csv.enc`` and ``/data/breast-cancer.csv.enc`` both name
    ``breast-cancer``, the convention ``ballast data prepare`` writes. Raises ConfigError when
    the name is not a plain dataset name (pass it explicitly then).
    """
    if uri.startswith("s3://"):
        path = uri[5:]  # verbatim: '#' and '?' belong to an S3 key (see parse_s3_uri)
    elif "://" in uri:
        path = urlparse(uri).path
    else:
        path = uri
    base = path.rsplit("/", 1)[-1]
    # The convention's suffixes come off; anything else is cut at the first dot. A name may
    # hold dots itself ("iris.v2" writes iris.v2.csv.enc): cutting at the first dot named it
    # "iris", and its data then failed to decrypt under the wrong identity.
    for suffix in (".csv.enc", ".enc"):
        if base.endswith(suffix):
            name = base[: -len(suffix)]
            break
    else:
        name = base.split(".", 1)[0]
    if not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"cannot derive a dataset name from {uri!r} (file name {base!r}); pass --name"
        )
    return name


def storage_from_settings(uri: str, s: Settings) -> Storage:
    """The storage backend for ``uri`` with the S3 endpoint and region from settings."""
    opts = S3Options(endpoint_url=s.s3_endpoint_url or None, region=s.aws_region or None)
    return storage_for(uri, opts)


def quarantine_path(s: Settings) -> Path:
    from ballast.quarantine import QUARANTINE_FILE

    return s.state_dir / QUARANTINE_FILE


class HashingReader(io.RawIOBase):
    """Passes reads through and hashes exactly the bytes handed out."""

    def __init__(self, inner: BinaryIO) -> None:
        super().__init__()
        self._inner = inner
        self._readinto = getattr(inner, "readinto", None)
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        view = memoryview(b).cast("B")
        if self._readinto is not None:
            n = self._readinto(view)
            if n is None:
                raise BlockingIOError("non-blocking source has no data")
        else:
            chunk = self._inner.read(len(view))
            n = len(chunk)
            view[:n] = chunk
        self.sha256.update(view[:n])
        self.bytes_read += n
        return int(n)

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


def load_validated(
    uri: str,
    *,
    provider: KeyProvider,
    spec: DatasetSpec,
    storage: Storage | None = None,
    quarantine: Path | None = None,
    ge_sample_rows: int = DEFAULT_GE_SAMPLE_ROWS,
) -> ValidatedDataset:
    """Fetch, decrypt and validate ``uri``. Raises FetchError, DecryptionError (and its
    KeyNotFoundError) or ValidationFailed; on the last, appends a record to ``quarantine`` first.
    """
    plaintext = io.BytesIO()
    with (storage or storage_for(uri)).open_read(uri) as src:  # FetchError
        hashing = HashingReader(src)
        # DecryptionError; the reader consumes the object to its end, so the hash covers all.
        decrypt_stream(cast(BinaryIO, hashing), plaintext, provider, dataset_identity(spec.name))
    ciphertext_sha256 = hashing.hexdigest()
    log.info(
        "decrypted %s (%d bytes, ciphertext sha256 %s)",
        uri,
        plaintext.tell(),
        ciphertext_sha256[:12],
    )
    data = plaintext.getvalue()  # no copy: BytesIO hands over its buffer
    del plaintext
    try:
        return validate_bytes(
            data, spec, ciphertext_sha256=ciphertext_sha256, ge_sample_rows=ge_sample_rows
        )
    except ExpectationsFailed as exc:
        if quarantine is not None:
            _quarantine(exc, quarantine, uri, spec.name)
        raise


def _quarantine(exc: ExpectationsFailed, path: Path, uri: str, name: str) -> None:
    """Append the failure's record to the quarantine log. A log that cannot be written (disk
    full, a symlink in its place) must not replace the typed validation error: it is logged and
    noted on ``exc`` instead."""
    from ballast.quarantine import append_record, record_for

    try:
        append_record(path, record_for(exc.report, uri))
    except OSError as write_error:
        # The OSError names the path and errno only; the record (aggregates) is not logged.
        log.warning("could not quarantine %s (%s) in %s: %s", name, uri, path, write_error)
        exc.add_note(f"the quarantine record was not written to {path}: {write_error}")
        exc.quarantined = False
        return
    exc.quarantined = True
    log.warning("quarantined %s (%s): %d failed expectations", name, uri, len(exc.report.failed))

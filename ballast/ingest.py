"""The data boundary: fetch → decrypt → validate, each failure typed by its stage.

Plaintext exists only in memory here and leaves only as a :class:`ValidatedDataset`.
"""

from __future__ import annotations

import io
import logging

from ballast.crypto import KeyProvider, decrypt_stream
from ballast.data import DatasetSpec, ValidatedDataset
from ballast.settings import Settings
from ballast.storage import S3Options, Storage, storage_for
from ballast.validation import validate_bytes

log = logging.getLogger(__name__)


def dataset_identity(name: str) -> str:
    """The associated data an encrypted dataset is bound to: a renamed copy will not decrypt."""
    return f"dataset:{name}"


def storage_from_settings(uri: str, s: Settings) -> Storage:
    """The storage backend for ``uri`` with the S3 endpoint and region from settings."""
    opts = S3Options(endpoint_url=s.s3_endpoint_url or None, region=s.aws_region or None)
    return storage_for(uri, opts)


def load_validated(
    uri: str, *, provider: KeyProvider, spec: DatasetSpec, storage: Storage | None = None
) -> ValidatedDataset:
    plaintext = io.BytesIO()
    with (storage or storage_for(uri)).open_read(uri) as src:  # FetchError
        decrypt_stream(src, plaintext, provider, dataset_identity(spec.name))  # DecryptionError
    log.info("decrypted %s (%d bytes)", uri, plaintext.tell())
    return validate_bytes(plaintext.getvalue(), spec)  # ValidationFailed

"""The data boundary: fetch → decrypt → validate, each failure typed by its stage.

Plaintext exists only in memory here and leaves only as a :class:`ValidatedDataset`.
"""

from __future__ import annotations

import io
import logging

from ballast.crypto import KeyProvider, decrypt_stream
from ballast.data import DatasetSpec, ValidatedDataset
from ballast.storage import storage_for
from ballast.validation import validate_bytes

log = logging.getLogger(__name__)


def dataset_identity(name: str) -> str:
    """The associated data an encrypted dataset is bound to: a renamed copy will not decrypt."""
    return f"dataset:{name}"


def load_validated(uri: str, *, provider: KeyProvider, spec: DatasetSpec) -> ValidatedDataset:
    plaintext = io.BytesIO()
    with storage_for(uri).open_read(uri) as src:  # FetchError
        decrypt_stream(src, plaintext, provider, dataset_identity(spec.name))  # DecryptionError
    log.info("decrypted %s (%d bytes)", uri, plaintext.tell())
    return validate_bytes(plaintext.getvalue(), spec)  # ValidationFailed

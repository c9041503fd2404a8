"""Which task failures Prefect retries: storage and network hiccups, never bad input."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore import exceptions as bx

from ballast.errors import (
    BallastError,
    ConfigError,
    FetchError,
    IntegrityError,
    RegistryError,
    ValidationFailed,
)
from ballast.storage import LocalStorage
from tasks.common import not_retryable, retry_registry_hiccups, retry_transient


class _Failed:
    """A task run's final state whose result raises ``exc``."""

    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc

    def result(self) -> None:
        if self.exc is not None:
            raise self.exc


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (FetchError("s3://b/k: read failed at byte 9: reset"), True),
        (FetchError("s3://b/k: no such object (NoSuchKey)", transient=False), False),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (httpx.ConnectError("refused"), True),
        (ValidationFailed("mean_radius out of range"), False),
        (ConfigError("bad setting"), False),
        (ValueError("Invalid endpoint: localhost:4566"), False),  # a setting, not a hiccup
        (RegistryError("tracking server unreachable"), False),
        (None, False),  # it did not fail
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, bool) else str(v),
)
def test_ingest_retries_only_what_may_pass_next_time(
    exc: BaseException | None, retried: bool
) -> None:
    assert retry_transient(None, None, _Failed(exc)) is retried
    if exc is not None:
        assert not_retryable(exc) is not retried


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (RegistryError("tracking server unreachable"), True),
        (OSError(errno.EIO, "I/O error"), True),
        (IntegrityError("signing key is not 0600"), False),
        (ValueError("bad metric"), False),
    ],
    ids=["registry-down", "io", "bad-key", "bug"],
)
def test_registration_retries_a_registry_hiccup_not_a_bad_key(
    exc: BaseException, retried: bool
) -> None:
    assert retry_registry_hiccups(None, None, _Failed(exc)) is retried


def test_a_missing_or_unreadable_local_dataset_is_not_transient(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as missing, LocalStorage().open_read(str(tmp_path / "no.csv")):
        pass
    assert not missing.value.transient
    with pytest.raises(FetchError) as folder, LocalStorage().open_read(str(tmp_path)):
        pass
    assert not folder.value.transient and "cannot open" in folder.value.message


def _kms_failing_with(exc: Exception) -> object:
    from ballast.keys import KmsKeyProvider

    class Client:
        def describe_key(self, **kw: object) -> dict[str, object]:
            raise exc

        decrypt = encrypt = describe_key

    return KmsKeyProvider("arn:aws:kms:eu-west-1:111122223333:key/k1", client=Client())


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    body = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(body, "Decrypt")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "transient"),
    [
        (
            lambda u: bx.EndpointConnectionError(endpoint_url=u),
            True,
        ),
        (
            lambda u: bx.ReadTimeoutError(endpoint_url=u),
            True,
        ),
        (lambda u: _client_error("ThrottlingException", 400), True),
        (lambda u: _client_error("KMSInternalException", 500), True),
        (lambda u: _client_error("AccessDeniedException", 400), False),
        (lambda u: _client_error("InvalidCiphertextException", 400), False),
        (lambda u: bx.NoCredentialsError(), False),
    ],
    ids=["unreachable", "timeout", "throttled", "kms-5xx", "denied", "bad-ciphertext", "no-creds"],
)
def test_a_kms_outage_is_retried_and_a_refusal_is_not(make: Any, transient: bool) -> None:
    # Before, an unreachable or throttling KMS read as "[decrypt]" bad data, never retried.
    import traceback

    from ballast.errors import DecryptionError, KeyServiceUnavailable

    secret = "".join(["kms", "PW"])
    provider = _kms_failing_with(make(f"http://u:{secret}@127.0.0.1:1/"))
    arn = "arn:aws:kms:eu-west-1:111122223333:key/k1"
    with pytest.raises((KeyServiceUnavailable, DecryptionError)) as info:
        provider.unwrap_key(arn, b"w", b"dataset:d")  # type: ignore[attr-defined]
    assert isinstance(info.value, KeyServiceUnavailable) is transient
    assert info.value.stage == "decrypt"
    assert not_retryable(info.value) is not transient
    assert secret not in "".join(traceback.format_exception(info.value))
    with pytest.raises(BallastError) as wrapping:
        provider.wrap_key(arn, b"k" * 32, b"dataset:d")  # type: ignore[attr-defined]
    assert wrapping.value.stage == "encrypt"
    assert not_retryable(wrapping.value) is not transient

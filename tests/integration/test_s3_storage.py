"""S3 storage and the KMS key provider against a real S3/KMS-API server (moto, as a subprocess)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ballast.crypto import (
    EncryptingWriter,
    KmsKeyProvider,
    LocalKeyring,
    decrypt_bytes,
    decrypt_stream,
    encrypt_bytes,
    read_header,
    rewrap_header,
)
from ballast.errors import DecryptionError, FetchError, KeyNotFoundError
from ballast.storage import S3Options, S3Storage, storage_for
from tests.conftest import free_port

pytestmark = pytest.mark.integration

MiB = 1 << 20
REGION = "us-east-1"
BUCKET = "ballast-data"


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """Dummy credentials, and no chance of picking up a real profile from ~/.aws."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="module")
def endpoint(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto server on 127.0.0.1, started for this module and stopped after it."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break  # any HTTP answer means it is serving
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server not up after 30 s:\n{log_path.read_text()}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def s3_client(endpoint: str) -> Any:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def kms_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("kms", endpoint_url=endpoint, region_name=REGION)


@pytest.fixture
def store(endpoint: str, s3_client: Any) -> S3Storage:
    return S3Storage(endpoint_url=endpoint, region=REGION, part_size=5 * MiB)


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    ring = LocalKeyring(tmp_path / "keys" / "keyring.json")
    ring.create_key()
    return ring


def test_encrypted_multipart_object_roundtrips(
    store: S3Storage, s3_client: Any, keyring: LocalKeyring
) -> None:
    uri = f"s3://{BUCKET}/datasets/breast-cancer/v1.enc"
    payload = os.urandom(12 * MiB)

    with store.open_write(uri) as raw, EncryptingWriter(raw, keyring, uri) as enc:
        for i in range(0, len(payload), 3 * MiB + 1):
            enc.write(payload[i : i + 3 * MiB + 1])
    head = s3_client.head_object(Bucket=BUCKET, Key="datasets/breast-cancer/v1.enc")
    out = io.BytesIO()
    with store.open_read(uri) as src:
        decrypt_stream(src, out, keyring, uri)

    assert out.getvalue() == payload
    assert head["ETag"].strip('"').endswith("-3"), "12 MiB in 5 MiB parts is a 3-part upload"
    assert head["ContentLength"] > len(payload)
    assert store.exists(uri)


def test_storage_for_reaches_the_endpoint_from_options(
    endpoint: str, s3_client: Any, keyring: LocalKeyring
) -> None:
    uri = f"s3://{BUCKET}/small.enc"
    store = storage_for(uri, S3Options(endpoint_url=endpoint, region=REGION))

    with store.open_write(uri) as fh:
        fh.write(encrypt_bytes(b"a,b\n1,2\n", keyring, "dataset:small"))
    with store.open_read(uri) as fh:
        assert decrypt_bytes(fh.read(), keyring, "dataset:small") == b"a,b\n1,2\n"


def test_missing_object_and_bucket_raise_fetch_error_naming_the_uri(store: S3Storage) -> None:
    for uri in (f"s3://{BUCKET}/no/such/key", "s3://no-such-bucket/key"):
        with pytest.raises(FetchError, match=uri), store.open_read(uri):
            pass
        assert not store.exists(uri)


def test_failed_upload_leaves_no_object_and_no_pending_parts(
    store: S3Storage, s3_client: Any
) -> None:
    uri = f"s3://{BUCKET}/broken.enc"

    def upload_then_die() -> None:
        with store.open_write(uri) as fh:
            fh.write(b"\0" * (11 * MiB))  # two parts are already up when it fails
            raise RuntimeError("producer died")

    with pytest.raises(RuntimeError, match="producer died"):
        upload_then_die()

    assert not store.exists(uri)
    pending = s3_client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert not [u for u in pending if u["Key"] == "broken.enc"], "the upload must be aborted"


# -- KMS ------------------------------------------------------------------------------------------


@pytest.fixture
def kms_key(kms_client: Any) -> str:
    return str(kms_client.create_key(Description="ballast test KEK")["KeyMetadata"]["KeyId"])


def test_kms_provider_roundtrip_records_the_key_arn(
    endpoint: str, kms_client: Any, kms_key: str
) -> None:
    kms = KmsKeyProvider(kms_key, endpoint_url=endpoint, region=REGION)
    payload = os.urandom(3 * MiB + 7)

    blob = encrypt_bytes(payload, kms, "dataset:kms")
    header = read_header(io.BytesIO(blob))

    assert header.key_id.startswith("arn:aws:kms:") and header.key_id.endswith(kms_key)
    assert decrypt_bytes(blob, kms, "dataset:kms") == payload


def test_kms_alias_resolves_to_the_key_arn(endpoint: str, kms_client: Any, kms_key: str) -> None:
    kms_client.create_alias(AliasName=f"alias/ballast-{kms_key[:8]}", TargetKeyId=kms_key)
    kms = KmsKeyProvider(f"alias/ballast-{kms_key[:8]}", endpoint_url=endpoint, region=REGION)

    assert kms.current_key_id().endswith(f"key/{kms_key}")


def test_kms_unwrap_is_bound_to_the_encryption_context(endpoint: str, kms_key: str) -> None:
    kms = KmsKeyProvider(kms_key, endpoint_url=endpoint, region=REGION)
    arn = kms.current_key_id()
    wrapped = kms.wrap_key(arn, b"k" * 32, b"dataset:a")

    assert kms.unwrap_key(arn, wrapped, b"dataset:a") == b"k" * 32
    with pytest.raises(DecryptionError, match="KMS decrypt"):
        kms.unwrap_key(arn, wrapped, b"dataset:b")


def test_kms_unknown_key_is_named_and_a_wrong_key_fails(
    endpoint: str, kms_client: Any, kms_key: str
) -> None:
    missing = "11111111-2222-3333-4444-555555555555"
    with pytest.raises(KeyNotFoundError, match=missing):
        KmsKeyProvider(missing, endpoint_url=endpoint, region=REGION).current_key_id()

    kms = KmsKeyProvider(kms_key, endpoint_url=endpoint, region=REGION)
    blob = encrypt_bytes(b"secret", kms, "dataset:kms")
    header = read_header(io.BytesIO(blob))
    body = blob[header.size :]
    gone_arn = header.key_id.replace(kms_key, missing)
    other_arn = kms_client.create_key()["KeyMetadata"]["Arn"]

    with pytest.raises(KeyNotFoundError, match=gone_arn):
        decrypt_bytes(
            header.with_key(gone_arn, header.wrapped_key).to_bytes() + body, kms, "dataset:kms"
        )
    # A key we trust that did not wrap this data key: KMS itself refuses.
    trusting = KmsKeyProvider(kms_key, endpoint_url=endpoint, region=REGION, also_trust=[other_arn])
    with pytest.raises(DecryptionError, match="KMS decrypt") as info:
        decrypt_bytes(
            header.with_key(other_arn, header.wrapped_key).to_bytes() + body,
            trusting,
            "dataset:kms",
        )
    assert not isinstance(info.value, KeyNotFoundError)


def test_kms_refuses_an_object_written_under_a_key_it_does_not_trust(
    endpoint: str, kms_client: Any, kms_key: str
) -> None:
    # Someone who can write to the bucket encrypts a poisoned dataset under a key of their own
    # that the pipeline's role may also use (here: any key of the same account). KMS would
    # decrypt it; the provider must not, unless that key is listed.
    theirs = KmsKeyProvider(
        kms_client.create_key()["KeyMetadata"]["KeyId"], endpoint_url=endpoint, region=REGION
    )
    forged = encrypt_bytes(b"a,b,label\nPOISON,1,0\n", theirs, "dataset:kms")
    ours = KmsKeyProvider(kms_key, endpoint_url=endpoint, region=REGION)

    with pytest.raises(KeyNotFoundError, match="is not trusted here"):
        decrypt_bytes(forged, ours, "dataset:kms")
    rotating = KmsKeyProvider(
        kms_key, endpoint_url=endpoint, region=REGION, also_trust=[theirs.current_key_id()]
    )
    assert decrypt_bytes(forged, rotating, "dataset:kms") == b"a,b,label\nPOISON,1,0\n"


def test_kms_rotation_rewraps_the_header_only(
    endpoint: str, kms_client: Any, kms_key: str, tmp_path: Path
) -> None:
    kms = KmsKeyProvider(kms_key, endpoint_url=endpoint, region=REGION)
    path = tmp_path / "obj.enc"
    path.write_bytes(encrypt_bytes(os.urandom(200_000), kms, "dataset:rot", 4096))
    before = path.read_bytes()
    new_arn = kms_client.create_key()["KeyMetadata"]["Arn"]

    rewrap_header(path, kms, new_arn)

    after = path.read_bytes()
    h0, h1 = read_header(io.BytesIO(before)), read_header(io.BytesIO(after))
    assert h1.key_id == new_arn
    assert after[h1.size :] == before[h0.size :]
    # After the move the new key is the configured one, the old one trusted until retired.
    moved = KmsKeyProvider(new_arn, endpoint_url=endpoint, region=REGION, also_trust=[kms_key])
    assert decrypt_bytes(after, moved, "dataset:rot") == decrypt_bytes(before, moved, "dataset:rot")


# -- `ballast data put/get` as real processes -------------------------------------------------


def _ballast(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "ballast.cli", "data", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # rich wraps long lines; compare messages with their whitespace normalised.
    proc.stderr = " ".join(proc.stderr.split())
    return proc


@pytest.fixture
def cli_env(endpoint: str, s3_client: Any, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)  # the module's dummy AWS credentials are already in os.environ
    env.update(
        BALLAST_S3_ENDPOINT_URL=endpoint,
        BALLAST_AWS_REGION=REGION,
        BALLAST_KEYRING_PATH=str(tmp_path / "keys" / "keyring.json"),
        BALLAST_STATE_DIR=str(tmp_path / "state"),
        BALLAST_KMS_KEY_ID="",
        COLUMNS="400",  # rich's console width when not on a terminal
    )
    return env


def test_cli_put_then_get_roundtrips_through_s3_bound_to_the_dataset_name(
    cli_env: dict[str, str], s3_client: Any, tmp_path: Path
) -> None:
    # Given a plaintext file of several segments and parts.
    src = tmp_path / "iris.csv"
    payload = os.urandom(6 * MiB + 123)
    src.write_bytes(payload)
    uri = f"s3://{BUCKET}/cli/iris.csv.enc"

    put = _ballast(cli_env, "put", str(src), uri)
    get = _ballast(cli_env, "get", uri, str(tmp_path / "out" / "iris.csv"))

    assert put.returncode == 0, put.stderr
    assert "dataset iris" in put.stdout
    stored = s3_client.get_object(Bucket=BUCKET, Key="cli/iris.csv.enc")["Body"].read()
    header = read_header(io.BytesIO(stored))
    assert header.identity == "dataset:iris"
    assert payload[:64] not in stored, "the object must be ciphertext"
    assert get.returncode == 0, get.stderr
    out = tmp_path / "out" / "iris.csv"
    assert out.read_bytes() == payload
    assert (out.stat().st_mode & 0o777) == 0o600


def test_cli_get_of_a_renamed_or_tampered_object_fails_and_writes_nothing(
    cli_env: dict[str, str], s3_client: Any, tmp_path: Path
) -> None:
    src = tmp_path / "wine.csv"
    src.write_bytes(b"a,b\n1,2\n" * 1000)
    assert _ballast(cli_env, "put", str(src), f"s3://{BUCKET}/cli/wine.csv.enc").returncode == 0
    # A copy under another dataset's name, and a copy with one flipped byte.
    s3_client.copy_object(
        Bucket=BUCKET, Key="cli/beer.csv.enc", CopySource=f"{BUCKET}/cli/wine.csv.enc"
    )
    blob = bytearray(s3_client.get_object(Bucket=BUCKET, Key="cli/wine.csv.enc")["Body"].read())
    blob[-5] ^= 1
    s3_client.put_object(Bucket=BUCKET, Key="cli/wine-tampered.csv.enc", Body=bytes(blob))
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    renamed = _ballast(cli_env, "get", f"s3://{BUCKET}/cli/beer.csv.enc", str(out_dir / "b.csv"))
    tampered = _ballast(
        cli_env,
        "get",
        f"s3://{BUCKET}/cli/wine-tampered.csv.enc",
        str(out_dir / "w.csv"),
        "--name",
        "wine",
    )
    missing = _ballast(cli_env, "get", f"s3://{BUCKET}/cli/nope.csv.enc", str(out_dir / "n.csv"))

    assert renamed.returncode == 2
    assert (
        "stage=decrypt" in renamed.stderr and "'dataset:wine', not 'dataset:beer'" in renamed.stderr
    )
    assert tampered.returncode == 2
    assert "stage=decrypt" in tampered.stderr and "failed authentication" in tampered.stderr
    assert missing.returncode == 2 and "stage=fetch" in missing.stderr
    assert list(out_dir.iterdir()) == [], "a failed get must leave no file, not even a temp one"


def test_cli_put_of_a_missing_file_fails_and_uploads_nothing(
    cli_env: dict[str, str], s3_client: Any, tmp_path: Path
) -> None:
    uri = f"s3://{BUCKET}/cli/ghost.csv.enc"

    put = _ballast(cli_env, "put", str(tmp_path / "ghost.csv"), uri)

    assert put.returncode == 2 and "stage=fetch" in put.stderr and "no such file" in put.stderr
    assert "Traceback" not in put.stderr
    listed = s3_client.list_objects_v2(Bucket=BUCKET, Prefix="cli/ghost").get("KeyCount", 0)
    assert listed == 0

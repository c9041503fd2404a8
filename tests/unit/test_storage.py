"""Storage backends: atomic local writes, and S3 streaming logic against an in-memory fake client.

The real S3 API (moto's server) is exercised in tests/integration/test_s3_storage.py.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ballast.crypto import LocalKeyring, decrypt_stream, encrypt_stream
from ballast.errors import BallastError, ConfigError, FetchError
from ballast.storage import (
    LocalStorage,
    S3Options,
    S3Storage,
    atomic_write,
    parse_s3_uri,
    storage_for,
)

MiB = 1 << 20


# -- local ----------------------------------------------------------------------------------------


def test_local_roundtrip_with_paths_and_file_uris(tmp_path: Path) -> None:
    store = LocalStorage()
    target = tmp_path / "a" / "b" / "obj.bin"

    with store.open_write(str(target)) as fh:
        fh.write(b"hello ")
        fh.write(b"world")
    with store.open_read(target.as_uri()) as fh:
        data = fh.read()

    assert data == b"hello world"
    assert store.exists(str(target))
    assert store.exists(target.as_uri())
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.parametrize("uri", ["file:///tmp/a%00b.csv", "/tmp/a\x00b.csv"])
def test_a_nul_byte_in_a_local_path_is_a_config_error(uri: str) -> None:
    with pytest.raises(ConfigError, match="NUL byte"), LocalStorage().open_read(uri):
        pass
    with pytest.raises(ConfigError, match="NUL byte"), LocalStorage().open_write(uri):
        pass


def test_local_write_is_atomic_when_the_writer_fails(tmp_path: Path) -> None:
    store = LocalStorage()
    fresh, existing = tmp_path / "fresh.bin", tmp_path / "existing.bin"
    existing.write_bytes(b"old")

    def write_then_die(target: Path) -> None:
        with store.open_write(str(target)) as fh:
            fh.write(b"half of it")
            raise RuntimeError("writer died")

    for target in (fresh, existing):
        with pytest.raises(RuntimeError, match="writer died"):
            write_then_die(target)

    assert not fresh.exists(), "a failed write must not create the object"
    assert existing.read_bytes() == b"old", "a failed write must not touch the old object"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.bin"], "no temp files left"


def test_local_missing_object_raises_fetch_error_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.bin")

    with pytest.raises(FetchError, match=r"missing\.bin"), LocalStorage().open_read(missing):
        pass
    assert not LocalStorage().exists(missing)


def test_atomic_write_sets_the_requested_mode(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "f", mode=0o644) as fh:
        fh.write(b"x")

    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_storage_for_picks_the_backend_by_scheme(tmp_path: Path) -> None:
    assert isinstance(storage_for(str(tmp_path / "x")), LocalStorage)
    assert isinstance(storage_for("file:///tmp/x"), LocalStorage)
    s3 = storage_for("s3://bucket/key", S3Options(region="us-east-1"))
    assert isinstance(s3, S3Storage)
    with pytest.raises(ConfigError, match="scheme"):
        storage_for("gs://bucket/key")
    # A slash short of a URI is a typo, not a folder "s3:" (before: written there, "done").
    for typo in ("s3:/bucket/key", "S3:/bucket/key", "file:/tmp/x"):
        with pytest.raises(ConfigError, match="missing a slash"):
            storage_for(typo)
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize(
    ("uri", "bucket", "key"),
    [
        ("s3://bucket/datasets/breast-cancer.csv.enc", "bucket", "datasets/breast-cancer.csv.enc"),
        # '#' and '?' are part of an S3 key, not a fragment or query: cutting them off would
        # read or overwrite another object.
        ("s3://bucket/datasets/run#2.csv.enc", "bucket", "datasets/run#2.csv.enc"),
        ("s3://bucket/a?b=1.enc", "bucket", "a?b=1.enc"),
        ("s3://my.bucket-1/x.enc#v1", "my.bucket-1", "x.enc#v1"),
    ],
)
def test_s3_uris_keep_the_key_verbatim(uri: str, bucket: str, key: str) -> None:
    assert parse_s3_uri(uri) == (bucket, key)


@pytest.mark.parametrize(
    "bad",
    [
        "s3://bucket",
        "s3://bucket/",
        "s3:///key",
        "http://b/k",
        "s3://b?x/k",
        "s3://b#x/k",
        "s3:/b/k",
    ],
)
def test_bad_s3_uris_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_s3_uri(bad)


def test_s3_part_size_below_the_s3_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3Options(part_size=MiB)


# -- S3 logic against a fake client -------------------------------------------------------------


def _ClientError(code: str) -> ClientError:  # noqa: N802 - reads like the exception it builds
    return ClientError({"Error": {"Code": code, "Message": code}}, "FakeOperation")


class _Body:
    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.stream = io.BytesIO(data)
        self.fail_after = fail_after
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.stream.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        if self.fail_after is not None:
            n = min(n, self.fail_after - self.stream.tell())
        return self.stream.read(n)

    def close(self) -> None:
        self.closed = True


class FakeS3:
    """Just enough of the S3 client API, recording every call."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_reads: list[int] = []  # byte offsets at which successive bodies break
        self.fail_upload_part: int | None = None

    def _rec(self, op: str, kw: dict[str, Any]) -> None:
        self.calls.append((op, {k: v for k, v in kw.items() if k != "Body"}))

    def get_object(self, **kw: Any) -> dict[str, Any]:
        self._rec("get_object", kw)
        data = self.objects.get((kw["Bucket"], kw["Key"]))
        if data is None:
            raise _ClientError("NoSuchKey")
        if "IfMatch" in kw and kw["IfMatch"] != f'"{hash(data)}"':
            raise _ClientError("PreconditionFailed")
        start = int(kw["Range"].split("=")[1].rstrip("-")) if "Range" in kw else 0
        fail = self.fail_reads.pop(0) - start if self.fail_reads else None
        return {
            "Body": _Body(data[start:], fail),
            "ETag": f'"{hash(data)}"',
            "ContentLength": len(data) - start,
        }

    def head_object(self, **kw: Any) -> dict[str, Any]:
        if (kw["Bucket"], kw["Key"]) not in self.objects:
            raise _ClientError("404")
        return {}

    def put_object(self, **kw: Any) -> dict[str, Any]:
        self._rec("put_object", kw)
        self.objects[(kw["Bucket"], kw["Key"])] = bytes(kw["Body"])
        return {}

    def create_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self._rec("create_multipart_upload", kw)
        upload_id = f"u{len(self.uploads)}"
        self.uploads[upload_id] = {}
        return {"UploadId": upload_id}

    def upload_part(self, **kw: Any) -> dict[str, Any]:
        self._rec("upload_part", {**kw, "size": len(kw["Body"])})
        if self.fail_upload_part == kw["PartNumber"]:
            raise _ClientError("InternalError")
        self.uploads[kw["UploadId"]][kw["PartNumber"]] = bytes(kw["Body"])
        return {"ETag": f'"etag{kw["PartNumber"]}"'}

    def complete_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self._rec("complete_multipart_upload", kw)
        parts = self.uploads.pop(kw["UploadId"])
        numbers = [p["PartNumber"] for p in kw["MultipartUpload"]["Parts"]]
        assert numbers == sorted(parts), "every uploaded part listed, in order"
        self.objects[(kw["Bucket"], kw["Key"])] = b"".join(parts[n] for n in numbers)
        return {}

    def abort_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        self._rec("abort_multipart_upload", kw)
        self.uploads.pop(kw["UploadId"])
        return {}

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


def _write(store: S3Storage, uri: str, data: bytes, *, fail: bool = False) -> None:
    with store.open_write(uri) as fh:
        fh.write(data)
        if fail:
            raise RuntimeError("producer died")


@pytest.fixture
def fake() -> FakeS3:
    return FakeS3()


@pytest.fixture
def s3(fake: FakeS3) -> S3Storage:
    return S3Storage(part_size=5 * MiB, client=fake)


def test_small_object_goes_up_in_one_put(s3: S3Storage, fake: FakeS3) -> None:
    with s3.open_write("s3://b/small") as fh:
        fh.write(b"tiny")

    assert fake.ops() == ["put_object"]
    assert fake.objects[("b", "small")] == b"tiny"


def test_large_object_streams_as_multipart_with_parts_of_at_least_5_mib(
    s3: S3Storage, fake: FakeS3
) -> None:
    payload = os.urandom(1 << 16) * 200  # 12.5 MiB
    with s3.open_write("s3://b/big") as fh:
        for i in range(0, len(payload), 100_003):  # odd-sized writes
            fh.write(payload[i : i + 100_003])
        assert fh.tell() == len(payload)

    sizes = [kw["size"] for op, kw in fake.calls if op == "upload_part"]
    assert sizes == [5 * MiB, 5 * MiB, len(payload) - 10 * MiB]
    assert fake.ops()[0] == "create_multipart_upload"
    assert fake.ops()[-1] == "complete_multipart_upload"
    assert fake.objects[("b", "big")] == payload


def test_failed_multipart_write_is_aborted_and_leaves_no_object(
    s3: S3Storage, fake: FakeS3
) -> None:
    with pytest.raises(RuntimeError, match="producer died"):
        _write(s3, "s3://b/obj", b"x" * (11 * MiB), fail=True)

    assert "abort_multipart_upload" in fake.ops()
    assert "complete_multipart_upload" not in fake.ops()
    assert not fake.objects
    assert not fake.uploads


def test_failed_part_upload_aborts_and_raises_a_typed_error(s3: S3Storage, fake: FakeS3) -> None:
    fake.fail_upload_part = 2

    with pytest.raises(BallastError, match="upload_part failed"):
        _write(s3, "s3://b/o", b"x" * (12 * MiB))

    assert fake.ops()[-1] == "abort_multipart_upload"
    assert not fake.objects
    assert not fake.uploads


def test_failed_small_write_sends_nothing(s3: S3Storage, fake: FakeS3) -> None:
    with pytest.raises(RuntimeError, match="producer died"):
        _write(s3, "s3://b/o", b"x" * 100, fail=True)

    assert fake.ops() == []


def test_part_size_grows_so_huge_objects_fit_in_10000_parts(
    fake: FakeS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ballast.storage._PART_GROWTH_EVERY", 2)
    store = S3Storage(part_size=5 * MiB, client=fake)
    chunk = b"\0" * MiB
    with store.open_write("s3://b/o") as fh:
        for _ in range(50):
            fh.write(chunk)

    sizes = [kw["size"] // MiB for op, kw in fake.calls if op == "upload_part"]
    assert sizes == [5, 5, 10, 10, 20]


def test_missing_object_raises_fetch_error_naming_the_uri(s3: S3Storage) -> None:
    with (
        pytest.raises(FetchError, match=r"s3://b/nope: no such object") as info,
        s3.open_read("s3://b/nope"),
    ):
        pass
    assert not info.value.transient, "a retry cannot make a missing object appear"
    assert not s3.exists("s3://b/nope")


def test_encrypted_roundtrip_through_s3_storage(s3: S3Storage, tmp_path: Path) -> None:
    ring = LocalKeyring(tmp_path / "k" / "ring.json")
    ring.create_key()
    payload = os.urandom(7 * MiB + 3)

    with s3.open_write("s3://b/enc") as fh:
        encrypt_stream(io.BytesIO(payload), fh, ring, "s3://b/enc")
    out = io.BytesIO()
    with s3.open_read("s3://b/enc") as fh:
        decrypt_stream(fh, out, ring, "s3://b/enc")

    assert out.getvalue() == payload
    assert s3.exists("s3://b/enc")


def test_dropped_download_resumes_at_the_same_offset_and_etag(s3: S3Storage, fake: FakeS3) -> None:
    payload = os.urandom(3 * MiB)
    fake.objects[("b", "o")] = payload
    fake.fail_reads = [MiB + 17, 2 * MiB + 5]

    with s3.open_read("s3://b/o") as fh:
        data = fh.read()

    assert data == payload
    gets = [kw for op, kw in fake.calls if op == "get_object"]
    assert [g.get("Range") for g in gets] == [None, f"bytes={MiB + 17}-", f"bytes={2 * MiB + 5}-"]
    assert all("IfMatch" in g for g in gets[1:]), "a resumed read must pin the ETag"


def test_download_gives_up_after_the_retry_budget(fake: FakeS3) -> None:
    fake.objects[("b", "o")] = b"x" * MiB
    fake.fail_reads = [10, 10, 10]
    store = S3Storage(client=fake, read_retries=2)

    with (
        pytest.raises(FetchError, match="read failed at byte 10"),
        store.open_read("s3://b/o") as fh,
    ):
        fh.read()


def test_object_replaced_during_a_resumed_read_is_an_error(s3: S3Storage, fake: FakeS3) -> None:
    fake.objects[("b", "o")] = b"a" * MiB
    fake.fail_reads = [100]

    def read_while_replaced() -> None:
        with s3.open_read("s3://b/o") as fh:
            fh.read(50)
            fake.objects[("b", "o")] = b"b" * MiB
            fh.read()

    with pytest.raises(FetchError, match="changed"):
        read_while_replaced()


def test_an_endpoint_password_reaches_neither_a_logged_traceback_nor_the_resume_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # botocore quotes the endpoint URL, password included, in its own exceptions; Prefect logs a
    # failed task's traceback with its causes.
    import logging
    import socket
    import traceback

    from botocore.exceptions import ReadTimeoutError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    secret = "".join(["S3cret", "PW"])  # in no source line a traceback quotes
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://minio:{secret}@127.0.0.1:{s.getsockname()[1]}"
    with (
        pytest.raises(FetchError) as info,
        S3Storage(endpoint_url=url, region="us-east-1").open_read("s3://b/k"),
    ):
        pass
    logged = "".join(traceback.format_exception(info.value))
    assert "EndpointConnectionError" in logged and "http://***@127.0.0.1" in logged, logged
    assert secret not in logged, logged

    class Body:  # drops the connection once, then answers
        def __init__(self, data: bytes, fail: bool) -> None:
            self.data, self.fail = io.BytesIO(data), fail

        def read(self, n: int) -> bytes:
            if self.fail:
                self.fail = False
                raise ReadTimeoutError(endpoint_url=url + "/b/k")
            return self.data.read(n)

        def close(self) -> None:
            pass

    class Client:
        calls = 0

        def get_object(self, **kw: Any) -> dict[str, Any]:
            Client.calls += 1
            return {"Body": Body(b"data", Client.calls == 1), "ETag": '"e"', "ContentLength": 4}

    with (
        caplog.at_level(logging.WARNING, logger="ballast.storage"),
        S3Storage(client=Client()).open_read("s3://b/k") as fh,
    ):
        assert fh.read() == b"data"
    assert "resuming" in caplog.text and secret not in caplog.text, caplog.text


def test_a_local_read_that_fails_after_the_open_is_a_fetch_error() -> None:
    # /proc/self/mem opens, then its first read at offset 0 fails with EIO: as a failing disk
    # or a dropped NFS mount would, after the open. Before, a bare OSError with no stage.
    with (
        pytest.raises(FetchError, match="read failed: Input/output error") as info,
        LocalStorage().open_read("/proc/self/mem") as fh,
    ):
        fh.read(16)
    assert info.value.stage == "fetch" and info.value.transient
    with (
        pytest.raises(FetchError, match="read failed"),
        LocalStorage().open_read("/proc/self/mem") as fh,
    ):
        fh.readinto(bytearray(16))  # type: ignore[attr-defined]

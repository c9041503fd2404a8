"""Where encrypted objects live: local files or S3 (or any S3-API server such as moto or MinIO).

Both backends stream: memory is bounded by a buffer or one multipart part, never the object.
Writes are atomic: nothing appears at the destination unless the write completed (a renamed temp
file locally, a completed multipart upload on S3; a failed upload is aborted).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast
from urllib.parse import urlparse
from urllib.request import url2pathname

from pydantic import BaseModel, ConfigDict, Field

from ballast.errors import (
    BallastError,
    ConfigError,
    FetchError,
    redact_uri_credentials,
    redacted_cause,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "LocalStorage",
    "S3Options",
    "S3Storage",
    "Storage",
    "atomic_write",
    "parse_s3_uri",
    "storage_for",
]

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 << 20  # S3 rejects smaller parts (except the last)
MAX_PART_SIZE = 5 << 30
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 8 << 20
# Part size doubles every this many parts: 8 MiB parts reach ~8 TB within S3's 10,000 parts.
_PART_GROWTH_EVERY = 1000
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# Local open() failures no retry can fix.
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR}


def _store_error(message: str) -> BallastError:
    # errors.py has no write-side storage class; the stage names where it failed.
    return BallastError(message, stage="store")


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable; some filesystems refuse fsync on directories, which is harmless.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path, *, mode: int = 0o600) -> Iterator[BinaryIO]:
    """Write to a temp file beside ``path`` and rename it over ``path`` only on success.

    The temp file is created 0600 (so plaintext is never briefly world-readable) and chmod-ed to
    ``mode`` just before the rename. On any exception the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if mode != 0o600:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class Storage(Protocol):
    """A place objects are read from and written to, addressed by URI."""

    def open_read(self, uri: str) -> AbstractContextManager[BinaryIO]:
        """A readable stream; raises FetchError naming the URI if it does not exist."""
        ...

    def open_write(self, uri: str) -> AbstractContextManager[BinaryIO]:
        """A writable stream; the object appears only if the ``with`` block completes."""
        ...

    def exists(self, uri: str) -> bool: ...


# -- local -------------------------------------------------------------------------------------


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"file URI with a remote host is not supported: {uri}")
        path = url2pathname(parsed.path)
    elif "://" in uri:
        raise ConfigError(f"unsupported storage URI scheme: {uri}")
    elif re.match(r"(?i)(s3|file|https?|gs|az):/", uri):
        # A scheme with a slash missing ("s3:/bucket/key") is a typo, not a folder named "s3:"
        # (before, `data encrypt x.csv s3:/bad` wrote ./s3:/bad and said it was done).
        raise ConfigError(f"{uri!r} looks like a URI missing a slash: write s3://bucket/key")
    else:
        path = uri
    if "\x00" in path:  # %00 in a file URI: open() would raise a bare ValueError
        raise ConfigError(f"storage path contains a NUL byte: {uri!r}")
    return Path(path)


class _LocalReader(io.RawIOBase):
    """A local file whose read errors (EIO from a failing disk, a dropped NFS mount) are
    :class:`FetchError`, as the S3 reader's are; only opening it was typed before."""

    def __init__(self, fh: io.BufferedReader, uri: str) -> None:
        super().__init__()
        self._fh, self._uri = fh, uri

    def readable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        try:
            return self._fh.readinto(b)
        except OSError as exc:
            raise self._failed(exc) from redacted_cause(exc)

    def read(self, size: int | None = -1) -> bytes:
        try:
            return self._fh.read(-1 if size is None else size)
        except OSError as exc:
            raise self._failed(exc) from redacted_cause(exc)

    def _failed(self, exc: OSError) -> FetchError:
        return FetchError(
            f"{self._uri}: read failed: {exc.strerror or exc}",
            transient=exc.errno not in _PERMANENT_ERRNOS,
        )


class LocalStorage:
    """Plain files; ``uri`` is a path or a ``file://`` URI. New files get ``mode`` (0600)."""

    def __init__(self, *, mode: int = 0o600) -> None:
        self.mode = mode

    @contextlib.contextmanager
    def open_read(self, uri: str) -> Iterator[BinaryIO]:
        path = _local_path(uri)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below, after the caller's block
        except FileNotFoundError:
            raise FetchError(f"{uri}: no such file", transient=False) from None
        except OSError as exc:
            raise FetchError(
                f"{uri}: cannot open: {exc.strerror or exc}",
                transient=exc.errno not in _PERMANENT_ERRNOS,
            ) from redacted_cause(exc)
        with fh:
            yield cast(BinaryIO, _LocalReader(fh, uri))

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[BinaryIO]:
        path = _local_path(uri)
        # The usual mistakes, refused typed before anything is written.
        if path.is_dir():
            raise _store_error(f"{uri}: is a folder; give the file to write")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _store_error(
                f"{uri}: cannot create its folder: {exc.strerror or exc}"
            ) from redacted_cause(exc)
        with contextlib.ExitStack() as stack:
            try:  # the temp file beside it: a folder not writable, a name too long for it
                fh = stack.enter_context(atomic_write(path, mode=self.mode))
            except OSError as exc:
                raise _store_error(
                    f"{uri}: cannot write there: {exc.strerror or exc}"
                ) from redacted_cause(exc)
            yield fh

    def exists(self, uri: str) -> bool:
        return _local_path(uri).is_file()


# -- S3 ----------------------------------------------------------------------------------------


class S3Options(BaseModel):
    """How to reach S3. ``endpoint_url`` points at an S3-API server (moto, MinIO) instead of AWS."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None = None
    region: str | None = None
    part_size: int = Field(default=DEFAULT_PART_SIZE, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    # A dropped connection mid-download resumes with a ranged GET pinned to the same ETag.
    read_retries: int = Field(default=3, ge=0, le=20)


_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key), the key verbatim.

    Not ``urlparse``: ``#`` and ``?`` are legal in S3 keys (the AWS CLI keeps them), and a URL
    parser would cut them off as a fragment or query, silently naming another object.
    """
    scheme, sep, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme != "s3" or not sep or not _BUCKET.fullmatch(bucket) or not key:
        raise ConfigError(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key


def _client_error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class _S3Reader(io.RawIOBase):
    """Streams a GET's body; on a dropped connection resumes at the current offset (same ETag)."""

    def __init__(self, client: Any, bucket: str, key: str, uri: str, retries: int) -> None:
        super().__init__()
        self._client, self._bucket, self._key, self._uri = client, bucket, key, uri
        self._retries = retries
        self._pos = 0
        resp = self._get()
        self._etag: str | None = resp.get("ETag")
        self._size = int(resp.get("ContentLength", -1))
        self._body = resp["Body"]

    def _get(self, **extra: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return dict(self._client.get_object(Bucket=self._bucket, Key=self._key, **extra))
        except ClientError as exc:
            code = _client_error_code(exc)
            if code in _NOT_FOUND:
                raise FetchError(
                    f"{self._uri}: no such object ({code})", transient=False
                ) from redacted_cause(exc)
            if code in _DENIED:
                raise FetchError(
                    f"{self._uri}: access denied ({code})", transient=False
                ) from redacted_cause(exc)
            if code in {"PreconditionFailed", "412"}:
                raise FetchError(
                    f"{self._uri}: object changed while it was being read"
                ) from redacted_cause(exc)
            raise FetchError(f"{self._uri}: get_object failed ({code}: {exc})") from redacted_cause(
                exc
            )
        except BotoCoreError as exc:
            raise FetchError(f"{self._uri}: get_object failed: {exc}") from redacted_cause(exc)

    def readable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        import urllib3.exceptions
        from botocore.exceptions import BotoCoreError

        out = memoryview(b).cast("B")
        attempt = 0
        while True:
            try:
                data = self._body.read(len(out))
                break
            except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
                attempt += 1
                if attempt > self._retries:
                    raise FetchError(
                        f"{self._uri}: read failed at byte {self._pos}: {exc}"
                    ) from redacted_cause(exc)
                log.warning(
                    "%s: read failed at byte %d (%s); resuming",
                    self._uri,
                    self._pos,
                    redact_uri_credentials(str(exc)),
                )
                self._body.close()
                extra: dict[str, Any] = {"Range": f"bytes={self._pos}-"}
                if self._etag:
                    extra["IfMatch"] = self._etag
                self._body = self._get(**extra)["Body"]
        n = len(data)
        out[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class _S3Writer(io.RawIOBase):
    """Buffers one part at a time; small objects go up in one PUT, larger ones as multipart."""

    def __init__(self, client: Any, bucket: str, key: str, uri: str, part_size: int) -> None:
        super().__init__()
        self._client, self._bucket, self._key, self._uri = client, bucket, key, uri
        self._part_size = part_size
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._written = 0
        self.completed = False
        self._aborted = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written

    def write(self, b: ReadableBuffer) -> int:
        if self._aborted or self.completed:
            raise ValueError(f"{self._uri}: write after the upload was aborted or completed")
        data = memoryview(b).cast("B")
        total = len(data)
        while data:
            take = min(len(data), self._part_size - len(self._buf))
            self._buf += data[:take]
            data = data[take:]
            if len(self._buf) >= self._part_size:
                self._upload_part()
        self._written += total
        return total

    def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return dict(getattr(self._client, op)(Bucket=self._bucket, Key=self._key, **kwargs))
        except (ClientError, BotoCoreError) as exc:
            raise _store_error(f"{self._uri}: {op} failed: {exc}") from redacted_cause(exc)

    def _upload_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = str(self._call("create_multipart_upload")["UploadId"])
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise _store_error(f"{self._uri}: object exceeds {MAX_PARTS} multipart parts")
        # Hand the buffer itself to botocore (no copy) and start a fresh one.
        body, self._buf = self._buf, bytearray()
        resp = self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=body)
        del body
        part: dict[str, Any] = {"ETag": resp["ETag"], "PartNumber": number}
        self._parts.append(part)
        if number % _PART_GROWTH_EVERY == 0:
            self._part_size = min(self._part_size * 2, MAX_PART_SIZE)

    def complete(self) -> None:
        if self._upload_id is None:
            self._call("put_object", Body=self._buf)
        else:
            if self._buf:
                self._upload_part()
            self._call(
                "complete_multipart_upload",
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        self._buf = bytearray()
        self.completed = True

    def abort(self) -> None:
        self._aborted = True
        self._buf = bytearray()
        if self._upload_id is not None and not self.completed:
            try:
                self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
                )
            except Exception as exc:  # the original error matters more; a lifecycle rule cleans up
                log.warning(
                    "%s: abort_multipart_upload failed: %s",
                    self._uri,
                    redact_uri_credentials(str(exc)),
                )
            self._upload_id = None


class S3Storage:
    """S3 via boto3. Reads stream from ``get_object``; writes upload in parts of ``part_size``."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        read_retries: int = 3,
        client: Any = None,
    ) -> None:
        self.options = S3Options(
            endpoint_url=endpoint_url, region=region, part_size=part_size, read_retries=read_retries
        )
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=Config(
                    retries={"max_attempts": 5, "mode": "standard"},
                    connect_timeout=10,
                    read_timeout=60,
                ),
            )
        self.client = client

    @classmethod
    def from_options(cls, options: S3Options, *, client: Any = None) -> S3Storage:
        return cls(**options.model_dump(), client=client)

    @contextlib.contextmanager
    def open_read(self, uri: str) -> Iterator[BinaryIO]:
        bucket, key = parse_s3_uri(uri)
        raw = _S3Reader(self.client, bucket, key, uri, self.options.read_retries)
        with io.BufferedReader(raw, buffer_size=1 << 16) as fh:
            yield fh

    @contextlib.contextmanager
    def open_write(self, uri: str) -> Iterator[BinaryIO]:
        bucket, key = parse_s3_uri(uri)
        raw = _S3Writer(self.client, bucket, key, uri, self.options.part_size)
        fh = io.BufferedWriter(raw, buffer_size=1 << 16)
        try:
            yield fh
            if not fh.closed:
                fh.flush()
            raw.complete()
        except BaseException:
            raw.abort()
            raise
        finally:
            # BufferedWriter.close() flushes into raw; after abort() that data goes nowhere.
            with contextlib.suppress(Exception):
                fh.close()

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = parse_s3_uri(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _client_error_code(exc) in _NOT_FOUND:
                return False
            raise FetchError(f"{uri}: head_object failed: {exc}") from redacted_cause(exc)
        except BotoCoreError as exc:
            raise FetchError(f"{uri}: head_object failed: {exc}") from redacted_cause(exc)
        return True


def storage_for(uri: str, s3: S3Options | None = None) -> Storage:
    """The backend for a URI: ``s3://`` → :class:`S3Storage`, a path or ``file://`` → local."""
    if uri.startswith("s3://"):
        return S3Storage.from_options(s3 or S3Options())
    _local_path(uri)  # rejects unknown schemes now rather than at first use
    return LocalStorage()

"""Encryption at rest: envelope encryption with a streaming, segmented AEAD.

Every object gets a fresh random 256-bit data key (DEK), wrapped by a key-encryption key from a
:class:`~ballast.keys.KeyProvider`. The payload is cut into fixed-size segments, each sealed with
AES-256-GCM under a key derived from the DEK (HKDF-SHA256, random salt). A segment's nonce is
``nonce_prefix || counter || last_flag`` (the Tink streaming AEAD / age STREAM construction), so
truncation, reordering, appended data and any flipped bit are all detected. Every segment's
associated data is the immutable part of the header, which holds the object's identity, so an
object read under another name fails. The key id and wrapped DEK are outside that part: key
rotation (:func:`rewrap_header`) rewrites them without touching a payload byte.

The byte layout is specified in ``ballast/FORMAT.md``. Memory stays O(segment) both ways; a
reader only ever hands out plaintext of a segment whose tag has verified.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ballast.errors import ConfigError, DecryptionError
from ballast.keys import DEK_SIZE, KeyProvider, KmsKeyProvider, LocalKeyring, provider_from_settings
from ballast.storage import atomic_write

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "MAX_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "DecryptingReader",
    "EncryptingWriter",
    "Header",
    "KeyProvider",
    "KmsKeyProvider",
    "LocalKeyring",
    "decrypt_bytes",
    "decrypt_file",
    "decrypt_stream",
    "encrypt_bytes",
    "encrypt_file",
    "encrypt_stream",
    "open_decrypting",
    "provider_from_settings",
    "read_header",
    "rewrap_header",
]

MAGIC = b"BALLAST\x1a"  # 0x1A (Ctrl-Z) stops `type`/`cat`-style tools from printing the rest
VERSION = 1
TAG_SIZE = 16
SALT_SIZE = 32
NONCE_PREFIX_SIZE = 7
DEFAULT_SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 16
# Upper bound enforced on read too: a hostile header must not make us allocate gigabytes.
MAX_SEGMENT_SIZE = 64 << 20
MAX_SEGMENTS = 1 << 32  # the counter is 32 bits
MAX_IDENTITY_SIZE = 0xFFFF
MAX_KEY_ID_SIZE = 0xFF
MAX_WRAPPED_SIZE = 0xFFFF
HKDF_INFO = b"ballast stream v1 segment key"
# magic, version, segment size, salt, nonce prefix, identity length (all big-endian).
_FIXED = struct.Struct(">8sBI32s7sH")
_LAST = b"\x01"
_NOT_LAST = b"\x00"


@dataclass(frozen=True)
class Header:
    """The parsed header. ``immutable`` is authenticated by every segment's tag; ``key_id`` and
    ``wrapped_key`` are authenticated by the key provider's own AEAD when the DEK is unwrapped."""

    version: int
    segment_size: int
    salt: bytes
    nonce_prefix: bytes
    identity: str
    key_id: str
    wrapped_key: bytes

    @property
    def immutable(self) -> bytes:
        ident = self.identity.encode("utf-8")
        return (
            _FIXED.pack(
                MAGIC, self.version, self.segment_size, self.salt, self.nonce_prefix, len(ident)
            )
            + ident
        )

    def to_bytes(self) -> bytes:
        kid = self.key_id.encode("ascii")
        return (
            self.immutable
            + struct.pack(">B", len(kid))
            + kid
            + struct.pack(">H", len(self.wrapped_key))
            + self.wrapped_key
        )

    @property
    def size(self) -> int:
        return len(self.to_bytes())

    def with_key(self, key_id: str, wrapped_key: bytes) -> Header:
        _check_key_id(key_id)
        if not 0 < len(wrapped_key) <= MAX_WRAPPED_SIZE:
            raise ValueError(f"wrapped key of {len(wrapped_key)} bytes does not fit the header")
        return Header(
            self.version,
            self.segment_size,
            self.salt,
            self.nonce_prefix,
            self.identity,
            key_id,
            wrapped_key,
        )


def _check_key_id(key_id: str) -> None:
    raw = key_id.encode("utf-8")
    if not 0 < len(raw) <= MAX_KEY_ID_SIZE or not all(0x21 <= b <= 0x7E for b in raw):
        raise ValueError(f"key id {key_id!r} must be 1-255 printable ASCII characters")


def _identity_bytes(identity: str) -> bytes:
    if not isinstance(identity, str) or not identity:
        raise ValueError("identity must be a non-empty string (e.g. 'dataset:breast-cancer:v1')")
    raw = identity.encode("utf-8")
    if len(raw) > MAX_IDENTITY_SIZE:
        raise ValueError(f"identity is {len(raw)} bytes; at most {MAX_IDENTITY_SIZE}")
    return raw


def _read_exact(src: BinaryIO, n: int) -> bytes:
    """Read n bytes unless EOF comes first (streams and sockets may return short reads)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = src.read(n - got)
        if chunk is None:  # "no data yet", not EOF: taking it for EOF would seal a short object
            raise BlockingIOError("non-blocking source has no data")
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _readinto_exact(src: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from src; returns bytes read (less than len(view) only at EOF)."""
    readinto = getattr(src, "readinto", None)
    got = 0
    total = len(view)
    while got < total:
        if readinto is not None:
            n = readinto(view[got:])
            if n is None:
                raise BlockingIOError("non-blocking source has no data")
        else:
            chunk = src.read(total - got)
            if chunk is None:
                raise BlockingIOError("non-blocking source has no data")
            n = len(chunk)
            view[got : got + n] = chunk
        if not n:
            break
        got += n
    return got


def _write_all(dst: BinaryIO, data: memoryview) -> None:
    # Raw (unbuffered) streams may accept fewer bytes than offered.
    while data:
        n = dst.write(data)
        if n is None:
            raise BlockingIOError("non-blocking destination would block")
        data = data[n:]


def read_header(src: BinaryIO) -> Header:
    """Parse the header and leave ``src`` positioned at the first segment."""
    fixed = _read_exact(src, _FIXED.size)
    if fixed[: len(MAGIC)] != MAGIC:
        if len(fixed) < len(MAGIC) and MAGIC.startswith(fixed):
            raise DecryptionError("truncated: header is incomplete")
        raise DecryptionError("not a Ballast encrypted object (bad magic bytes)")
    if len(fixed) < _FIXED.size:
        raise DecryptionError("truncated: header is incomplete")
    _, version, segment_size, salt, nonce_prefix, ident_len = _FIXED.unpack(fixed)
    if version != VERSION:
        raise DecryptionError(f"unsupported format version {version} (this reader knows {VERSION})")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise DecryptionError(f"corrupt header: segment size {segment_size} is out of range")
    ident = _read_exact(src, ident_len)
    klen_raw = _read_exact(src, 1)
    if len(ident) < ident_len or not klen_raw:
        raise DecryptionError("truncated: header is incomplete")
    kid = _read_exact(src, klen_raw[0])
    wlen_raw = _read_exact(src, 2)
    if len(kid) < klen_raw[0] or len(wlen_raw) < 2:
        raise DecryptionError("truncated: header is incomplete")
    (wlen,) = struct.unpack(">H", wlen_raw)
    wrapped = _read_exact(src, wlen)
    if len(wrapped) < wlen:
        raise DecryptionError("truncated: header is incomplete")
    try:
        identity = ident.decode("utf-8")
        key_id = kid.decode("ascii")
        _check_key_id(key_id)
    except (UnicodeDecodeError, ValueError):
        raise DecryptionError("corrupt header: identity or key id is malformed") from None
    if not identity or not wrapped:
        raise DecryptionError("corrupt header: empty identity or wrapped key")
    return Header(version, segment_size, salt, nonce_prefix, identity, key_id, wrapped)


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    """12 bytes: 7-byte random prefix, 32-bit big-endian counter, last-segment flag."""
    return prefix + counter.to_bytes(4, "big") + (_LAST if last else _NOT_LAST)


def _segment_key(dek: bytes, salt: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=HKDF_INFO)
    return AESGCM(hkdf.derive(dek))


class EncryptingWriter(io.RawIOBase):
    """A writable stream that encrypts into ``dst`` segment by segment.

    The output is complete only after :meth:`finish` (or leaving a ``with`` block without an
    exception), which writes the final segment. Closing or garbage-collecting an unfinished
    writer does *not* finish it: a half-written stream must read as truncated, never as a valid
    shorter object. ``dst`` is not closed.
    """

    def __init__(
        self,
        dst: BinaryIO,
        provider: KeyProvider,
        identity: str,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        key_id: str | None = None,
    ) -> None:
        super().__init__()
        # Set first: close() (also run by __del__) must work even if __init__ fails below.
        self._buf = bytearray()
        self._out = bytearray()
        self._finished = False
        self._broken = False
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(
                f"segment_size must be within {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}, "
                f"got {segment_size}"
            )
        ident = _identity_bytes(identity)
        self._dst = dst
        self.key_id = key_id or provider.current_key_id()
        dek = os.urandom(DEK_SIZE)
        header = Header(
            VERSION,
            segment_size,
            os.urandom(SALT_SIZE),
            os.urandom(NONCE_PREFIX_SIZE),
            identity,
            self.key_id,
            b"",
        )
        header = header.with_key(self.key_id, provider.wrap_key(self.key_id, dek, ident))
        self.header = header
        self._aead = _segment_key(dek, header.salt)
        del dek
        self._ad = header.immutable
        self._seg = segment_size
        self._buf = bytearray(segment_size)
        self._fill = 0
        self._out = bytearray(segment_size + TAG_SIZE)
        self._counter = 0
        self._finished = False
        self.bytes_in = 0
        _write_all(dst, memoryview(header.to_bytes()))

    def writable(self) -> bool:
        return True

    def write(self, b: ReadableBuffer) -> int:
        if self.closed:
            raise ValueError("write to a closed EncryptingWriter")
        if self._finished:
            raise ValueError("write after finish()")
        data = memoryview(b).cast("B")
        total = len(data)
        while data:
            if self._fill == self._seg:
                # A full buffer is only sealed once more data proves it is not the last segment.
                self._seal(self._seg, last=False)
            take = min(len(data), self._seg - self._fill)
            self._buf[self._fill : self._fill + take] = data[:take]
            self._fill += take
            data = data[take:]
        self.bytes_in += total
        return total

    def write_from(self, src: BinaryIO) -> int:
        """Encrypt everything readable from ``src``, reading straight into the segment buffer
        (one copy fewer than ``write``). Returns the number of plaintext bytes consumed."""
        if self.closed or self._finished:
            raise ValueError("write to a closed or finished EncryptingWriter")
        total = 0
        buf = memoryview(self._buf)
        try:
            while True:
                if self._fill == self._seg:
                    # Full: seal it as non-final only once a further byte proves more follows.
                    peek = _read_exact(src, 1)
                    if not peek:
                        break
                    self._seal(self._seg, last=False)
                    buf[0:1] = peek
                    self._fill = 1
                    total += 1
                n = _readinto_exact(src, buf[self._fill :])
                self._fill += n
                total += n
                if self._fill < self._seg:
                    break  # EOF
        finally:
            buf.release()
            self.bytes_in += total
        return total

    def _seal(self, n: int, *, last: bool) -> None:
        if self._counter >= MAX_SEGMENTS or (not last and self._counter == MAX_SEGMENTS - 1):
            raise ValueError("stream too long for a 32-bit segment counter; use larger segments")
        if self._broken:
            raise ValueError("an earlier write to the destination failed; the output is unusable")
        nonce = _nonce(self.header.nonce_prefix, self._counter, last)
        out = memoryview(self._out)[: n + TAG_SIZE]
        self._aead.encrypt_into(nonce, memoryview(self._buf)[:n], self._ad, out)
        try:
            _write_all(self._dst, out)
        except BaseException:
            # Part of a segment may be out: never seal anything after it (it could not verify).
            self._broken = True
            raise
        self._counter += 1
        self._fill = 0

    def finish(self) -> None:
        """Seal the final segment (possibly empty). Required for a valid object."""
        if self._finished:
            return
        if self.closed:
            raise ValueError("finish() on a closed, unfinished EncryptingWriter")
        self._seal(self._fill, last=True)
        self._finished = True
        self._dst.flush()

    @property
    def finished(self) -> bool:
        return self._finished

    def close(self) -> None:
        if not self.closed:
            # Drop plaintext promptly; the stream stays unfinished unless finish() ran.
            self._buf[:] = bytes(len(self._buf))
            self._buf = bytearray()
            self._out = bytearray()
        super().close()

    def __enter__(self) -> EncryptingWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()


class DecryptingReader(io.RawIOBase):
    """A readable stream of verified plaintext.

    Plaintext of a segment is handed out only after that segment's tag verified. Failures raise
    :class:`DecryptionError` at the segment where they are found: a consumer may already have
    read earlier, verified segments, so treat an exception as "the whole object is invalid".
    ``src`` is not closed.
    """

    def __init__(self, src: BinaryIO, provider: KeyProvider, identity: str) -> None:
        super().__init__()
        # Set first: close() (also run by __del__) must work even if __init__ fails below.
        self._pt = bytearray()
        self._ct = bytearray()
        ident = _identity_bytes(identity)
        header = read_header(src)
        if header.identity != identity:
            raise DecryptionError(
                f"object is bound to identity {header.identity!r}, not {identity!r}"
            )
        self.header = header
        dek = provider.unwrap_key(header.key_id, header.wrapped_key, ident)
        if len(dek) != DEK_SIZE:
            raise DecryptionError(f"key provider returned a {len(dek)}-byte data key")
        self._aead = _segment_key(dek, header.salt)
        del dek
        self._src = src
        self._ad = header.immutable
        self._seg = header.segment_size
        self._ct = bytearray(self._seg + TAG_SIZE)
        self._pt = bytearray(self._seg)
        self._pos = 0
        self._len = 0
        self._counter = 0
        self._peek = b""
        self._done = False
        self._error: DecryptionError | None = None

    @property
    def key_id(self) -> str:
        return self.header.key_id

    def readable(self) -> bool:
        return True

    def _nonce(self, counter: int, last: bool) -> bytes:
        return (
            self.header.nonce_prefix + counter.to_bytes(4, "big") + (_LAST if last else _NOT_LAST)
        )

    def _open(self, ct: memoryview, pt: memoryview, counter: int, last: bool) -> bool:
        try:
            self._aead.decrypt_into(
                _nonce(self.header.nonce_prefix, counter, last), ct, self._ad, pt
            )
        except InvalidTag:
            # decrypt_into leaves unverified plaintext in the buffer: wipe it.
            pt[:] = bytes(len(pt))
            return False
        return True

    def _fail(self, message: str) -> DecryptionError:
        self._error = DecryptionError(message)
        self._done = True
        return self._error

    def _next_segment(self) -> memoryview:
        """Read, verify and return the next segment's plaintext (a view valid until next call)."""
        full = self._seg + TAG_SIZE
        ct = memoryview(self._ct)
        got = 0
        if self._peek:
            ct[0:1] = self._peek
            got = 1
        got += _readinto_exact(self._src, ct[got:full])
        if got == full:
            self._peek = _read_exact(self._src, 1)
            last = not self._peek
        else:
            self._peek = b""
            last = True
        i = self._counter
        if got == 0:
            raise self._fail(
                "truncated: no segments after the header"
                if i == 0
                else f"truncated: final segment missing (stream ends after segment {i - 1})"
            )
        if got < TAG_SIZE:
            raise self._fail(f"truncated: segment {i} is {got} bytes, shorter than its tag")
        if i >= MAX_SEGMENTS:
            raise self._fail("corrupt stream: more segments than the 32-bit counter allows")
        ctv = ct[:got]
        ptv = memoryview(self._pt)[: got - TAG_SIZE]
        if self._open(ctv, ptv, i, last):
            self._counter += 1
            if last:
                self._done = True
            return ptv
        # Diagnose with the opposite flag, so the message says what actually happened.
        if got == full and self._open(ctv, ptv, i, not last):
            ptv[:] = bytes(len(ptv))
            if last:
                raise self._fail(
                    f"truncated: final segment missing (stream ends after segment {i})"
                )
            raise self._fail(f"unexpected data after the final segment (segment {i})")
        raise self._fail(
            f"segment {i} failed authentication (tampered, truncated, reordered, "
            "or encrypted under another key or identity)"
        )

    def segments(self) -> Iterator[memoryview]:
        """Verified plaintext, one segment at a time (each view is reused: copy to keep it)."""
        if self._error is not None:
            raise self._error
        if self._pos < self._len:
            yield memoryview(self._pt)[self._pos : self._len]
            self._pos = self._len
        while not self._done:
            view = self._next_segment()
            self._pos = self._len = 0
            yield view
        if self._error is not None:
            raise self._error

    def readinto(self, b: WriteableBuffer) -> int:
        if self.closed:
            raise ValueError("read from a closed DecryptingReader")
        if self._error is not None:
            raise self._error
        out = memoryview(b).cast("B")
        while self._pos == self._len:
            if self._done:
                return 0
            view = self._next_segment()
            self._pos, self._len = 0, len(view)
        n = min(len(out), self._len - self._pos)
        out[:n] = self._pt[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._pt[:] = bytes(len(self._pt))
            self._pt = bytearray()
            self._ct = bytearray()
            self._pos = self._len = 0
        super().close()


# -- streams -----------------------------------------------------------------------------------


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    provider: KeyProvider,
    identity: str,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> str:
    """Encrypt all of ``src`` into ``dst``; returns the key id that wraps the data key."""
    with EncryptingWriter(dst, provider, identity, segment_size=segment_size) as writer:
        writer.write_from(src)
    return writer.key_id


def decrypt_stream(src: BinaryIO, dst: BinaryIO, provider: KeyProvider, identity: str) -> None:
    """Decrypt ``src`` into ``dst``. On failure ``dst`` may hold a verified prefix; use
    :func:`decrypt_file` (or discard ``dst``) where all-or-nothing matters."""
    with DecryptingReader(src, provider, identity) as reader:
        for view in reader.segments():
            _write_all(dst, view)
    dst.flush()


def open_decrypting(src: BinaryIO, provider: KeyProvider, identity: str) -> BinaryIO:
    """A buffered, readable plaintext stream over ``src`` (for parsers that want a file)."""
    return io.BufferedReader(DecryptingReader(src, provider, identity), buffer_size=1 << 16)


def encrypt_bytes(
    data: bytes,
    provider: KeyProvider,
    identity: str,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, provider, identity, segment_size)
    return out.getvalue()


def decrypt_bytes(data: bytes, provider: KeyProvider, identity: str) -> bytes:
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(data), out, provider, identity)
    return out.getvalue()


def encrypt_file(
    src: Path,
    dst: Path,
    provider: KeyProvider,
    identity: str,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> str:
    """Encrypt a file; ``dst`` appears (atomically) only once the whole object is written."""
    with open(src, "rb") as fin, atomic_write(Path(dst)) as fout:
        return encrypt_stream(fin, fout, provider, identity, segment_size)


def decrypt_file(src: Path, dst: Path, provider: KeyProvider, identity: str) -> None:
    """Decrypt a file; ``dst`` appears (atomically, mode 0600) only if every segment verified."""
    with open(src, "rb") as fin, atomic_write(Path(dst)) as fout:
        decrypt_stream(fin, fout, provider, identity)


def rewrap_header(path: Path, provider: KeyProvider, new_key_id: str | None = None) -> None:
    """Re-wrap an object's data key under ``new_key_id`` (default: the provider's current key).

    Only the header changes; payload bytes are copied verbatim, never decrypted. The new file
    replaces the old atomically, so a crash leaves either the old or the new object. A no-op if
    the object is already wrapped under the target key.

    A symlink is followed: the object it points to is re-wrapped and the link stays. A file
    with several hard links is refused: replacing one name would leave the others under the
    old key, unreadable once that key is retired.
    """
    path = Path(os.path.realpath(path))
    with open(path, "rb") as fin:
        header = read_header(fin)
        target = new_key_id or provider.current_key_id()
        if target == header.key_id:
            return
        links = os.fstat(fin.fileno()).st_nlink
        if links > 1:
            raise ConfigError(
                f"{path} has {links} hard links; re-wrapping would leave the other names under "
                "the old key: re-wrap a copy that has one name"
            )
        context = _identity_bytes(header.identity)
        dek = provider.unwrap_key(header.key_id, header.wrapped_key, context)
        new_header = header.with_key(target, provider.wrap_key(target, dek, context))
        del dek
        mode = os.fstat(fin.fileno()).st_mode & 0o777
        with atomic_write(path, mode=mode) as fout:
            fout.write(new_header.to_bytes())
            while chunk := fin.read(1 << 20):
                fout.write(chunk)

"""Streaming envelope encryption: roundtrips, every tampering we can think of, keys, rotation."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.stub import Stubber
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ballast import crypto
from ballast.crypto import (
    DEFAULT_SEGMENT_SIZE,
    DecryptingReader,
    EncryptingWriter,
    LocalKeyring,
    decrypt_bytes,
    decrypt_file,
    decrypt_stream,
    encrypt_bytes,
    encrypt_file,
    encrypt_stream,
    open_decrypting,
    provider_from_settings,
    read_header,
    rewrap_header,
)
from ballast.errors import BallastError, ConfigError, DecryptionError, KeyNotFoundError
from ballast.settings import Settings

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

SEG = 64  # small segments keep multi-segment cases fast
TAG = 16
IDENTITY = "dataset:breast-cancer:v1"


def _plaintext(n: int) -> bytes:
    # Distinct bytes per position, so a reordering would change the result if it went undetected.
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    ring = LocalKeyring(tmp_path / "keys" / "keyring.json")
    ring.create_key()
    return ring


def _encrypt(keyring: LocalKeyring, n: int, segment_size: int = SEG) -> tuple[bytes, bytes, int]:
    """(plaintext, ciphertext, header size)."""
    pt = _plaintext(n)
    ct = encrypt_bytes(pt, keyring, IDENTITY, segment_size)
    return pt, ct, read_header(io.BytesIO(ct)).size


def _segments(ct: bytes, header_size: int, segment_size: int = SEG) -> list[bytes]:
    body = ct[header_size:]
    step = segment_size + TAG
    return [body[i : i + step] for i in range(0, len(body), step)]


# -- roundtrips -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 5 * SEG + 7, 9 * SEG])
def test_roundtrip_at_segment_boundaries(keyring: LocalKeyring, n: int) -> None:
    pt, ct, hsize = _encrypt(keyring, n)

    assert decrypt_bytes(ct, keyring, IDENTITY) == pt
    n_segments = max(1, -(-n // SEG))
    assert len(ct) == hsize + n + n_segments * TAG, "each segment adds exactly one 16-byte tag"
    assert pt[:16] not in ct or n < 16, "plaintext must not appear in the ciphertext"


@pytest.mark.parametrize(
    "n", [0, 1, DEFAULT_SEGMENT_SIZE - 1, DEFAULT_SEGMENT_SIZE, DEFAULT_SEGMENT_SIZE + 1, 3 << 20]
)
def test_roundtrip_with_the_default_one_mib_segments(keyring: LocalKeyring, n: int) -> None:
    pt = os.urandom(n)
    ct = encrypt_bytes(pt, keyring, IDENTITY)

    assert read_header(io.BytesIO(ct)).segment_size == DEFAULT_SEGMENT_SIZE
    assert decrypt_bytes(ct, keyring, IDENTITY) == pt


def test_empty_plaintext_is_one_final_empty_segment(keyring: LocalKeyring) -> None:
    _, ct, hsize = _encrypt(keyring, 0)

    assert len(ct) == hsize + TAG
    with pytest.raises(DecryptionError, match="no segments"):
        decrypt_bytes(ct[:hsize], keyring, IDENTITY)


def test_encrypting_twice_gives_unrelated_ciphertexts(keyring: LocalKeyring) -> None:
    a = encrypt_bytes(b"same plaintext", keyring, IDENTITY)
    b = encrypt_bytes(b"same plaintext", keyring, IDENTITY)
    ha, hb = read_header(io.BytesIO(a)), read_header(io.BytesIO(b))

    assert ha.salt != hb.salt
    assert ha.nonce_prefix != hb.nonce_prefix
    assert ha.wrapped_key != hb.wrapped_key, "every object must get its own data key"
    assert a[ha.size :] != b[hb.size :]


def test_header_records_segment_size_identity_and_key(keyring: LocalKeyring) -> None:
    src = io.BytesIO(encrypt_bytes(b"x" * 300, keyring, IDENTITY, 100))
    header = read_header(src)

    assert header.segment_size == 100
    assert header.identity == IDENTITY
    assert header.key_id == keyring.current_key_id()
    assert src.tell() == header.size, "read_header leaves the stream at the first segment"
    assert header.to_bytes() == src.getvalue()[: header.size]


class _Trickle(io.RawIOBase):
    """A source/sink that moves at most a few bytes per call, like a slow socket."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.pos = 0
        self.out = bytearray()
        self.calls = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        b = memoryview(b).cast("B")
        self.calls += 1
        n = min(len(b), 1 + self.calls % 7, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def write(self, b: ReadableBuffer) -> int:
        b = memoryview(b).cast("B")
        n = min(len(b), 5)
        self.out += bytes(b[:n])
        return n


def test_short_reads_and_short_writes_are_handled(keyring: LocalKeyring) -> None:
    pt = _plaintext(5 * SEG + 3)
    sink = _Trickle()
    # RawIOBase is not typing.BinaryIO, but read/readinto/write are all the code uses.
    encrypt_stream(_Trickle(pt), sink, keyring, IDENTITY, SEG)  # type: ignore[arg-type]
    out = _Trickle()

    decrypt_stream(_Trickle(bytes(sink.out)), out, keyring, IDENTITY)  # type: ignore[arg-type]

    assert bytes(out.out) == pt


class _WouldBlockOnce(io.RawIOBase):
    """A non-blocking source whose read answers None ("no data yet") once, at ``at`` bytes."""

    def __init__(self, data: bytes, at: int, readinto: bool = True) -> None:
        self.data, self.pos, self.at, self.blocked = data, 0, at, False
        if not readinto:
            self.readinto = None  # type: ignore[assignment]

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes | None:
        if self.pos == self.at and not self.blocked:
            self.blocked = True
            return None
        stop = len(self.data) if n < 0 else self.pos + n
        if self.pos < self.at:
            stop = min(stop, self.at)  # stop at ``at``, so that the next read meets it
        out = self.data[self.pos : stop]
        self.pos += len(out)
        return out

    def readinto(self, b: WriteableBuffer) -> int | None:
        out = self.read(len(memoryview(b)))
        if out is None:
            return None
        memoryview(b)[: len(out)] = out
        return len(out)


@pytest.mark.parametrize("readinto", [True, False])
@pytest.mark.parametrize("at", [SEG, 2 * SEG, 3])
def test_a_source_with_no_data_yet_is_not_taken_for_its_end(
    keyring: LocalKeyring, at: int, readinto: bool
) -> None:
    # A non-blocking source that has no data for a moment, exactly at a segment boundary
    # (where the writer peeks one byte to know whether the segment is the last), must not be
    # sealed as a complete, shorter object.
    pt = _plaintext(4 * SEG + 5)
    dst = io.BytesIO()
    src = _WouldBlockOnce(pt, at, readinto)

    with pytest.raises(BlockingIOError):
        encrypt_stream(src, dst, keyring, IDENTITY, SEG)  # type: ignore[arg-type]

    with pytest.raises(DecryptionError, match="truncated"):
        decrypt_bytes(dst.getvalue(), keyring, IDENTITY)


@pytest.mark.parametrize("segments", [1, 2])
def test_a_ciphertext_source_with_no_data_yet_raises_blocking_not_truncated(
    keyring: LocalKeyring, segments: int
) -> None:
    _, ct, header_size = _encrypt(keyring, 3 * SEG + 1)
    src = _WouldBlockOnce(ct, header_size + segments * (SEG + TAG))

    with pytest.raises(BlockingIOError):
        decrypt_stream(src, io.BytesIO(), keyring, IDENTITY)  # type: ignore[arg-type]


def test_decrypting_reader_serves_odd_sized_reads(keyring: LocalKeyring) -> None:
    pt, ct, _ = _encrypt(keyring, 7 * SEG + 5)
    got = bytearray()
    with open_decrypting(io.BytesIO(ct), keyring, IDENTITY) as fh:
        for size in [1, 3, SEG, SEG + 1, 2 * SEG + 3, 17] * 10:
            got += fh.read(size)
        assert fh.read() == b""

    assert bytes(got) == pt


@pytest.mark.parametrize("n", [0, 1, SEG, SEG + 1, 6 * SEG])
def test_encrypting_writer_accepts_arbitrary_writes(keyring: LocalKeyring, n: int) -> None:
    pt = _plaintext(n)
    dst = io.BytesIO()
    with EncryptingWriter(dst, keyring, IDENTITY, segment_size=SEG) as w:
        for i in range(0, len(pt), 37):
            w.write(pt[i : i + 37])

    assert w.finished
    assert decrypt_bytes(dst.getvalue(), keyring, IDENTITY) == pt


def test_failed_writer_block_leaves_a_stream_that_reads_as_truncated(
    keyring: LocalKeyring,
) -> None:
    dst = io.BytesIO()
    w = EncryptingWriter(dst, keyring, IDENTITY, segment_size=SEG)

    def produce_then_die() -> None:
        with w:
            w.write(_plaintext(3 * SEG))
            raise RuntimeError("producer died")

    with pytest.raises(RuntimeError, match="producer died"):
        produce_then_die()

    assert not w.finished
    with pytest.raises(DecryptionError, match="truncated"):
        decrypt_bytes(dst.getvalue(), keyring, IDENTITY)


def test_closing_an_unfinished_writer_does_not_finalize_it(keyring: LocalKeyring) -> None:
    dst = io.BytesIO()
    w = EncryptingWriter(dst, keyring, IDENTITY, segment_size=SEG)
    w.write(b"partial")
    w.close()

    with pytest.raises(DecryptionError, match="truncated"):
        decrypt_bytes(dst.getvalue(), keyring, IDENTITY)


class _FailingSink(io.BytesIO):
    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def write(self, b: ReadableBuffer) -> int:
        if self.tell() + memoryview(b).nbytes > self.fail_at:
            raise OSError("disk full")
        return super().write(b)


def test_writer_refuses_to_continue_after_a_failed_destination_write(
    keyring: LocalKeyring,
) -> None:
    sink = _FailingSink(fail_at=400)
    w = EncryptingWriter(sink, keyring, IDENTITY, segment_size=SEG)

    with pytest.raises(OSError, match="disk full"):
        w.write(_plaintext(10 * SEG))
    with pytest.raises(ValueError, match="unusable"):
        w.finish()
    assert not w.finished


@pytest.mark.parametrize("bad", [0, 15, 1 << 30])
def test_segment_size_out_of_range_is_refused(keyring: LocalKeyring, bad: int) -> None:
    with pytest.raises(ValueError, match="segment_size"):
        encrypt_bytes(b"x", keyring, IDENTITY, bad)


def test_empty_identity_is_refused(keyring: LocalKeyring) -> None:
    with pytest.raises(ValueError, match="identity"):
        encrypt_bytes(b"x", keyring, "")


def test_non_ascii_or_blank_key_ids_are_refused(keyring: LocalKeyring) -> None:
    header = read_header(io.BytesIO(encrypt_bytes(b"x", keyring, IDENTITY)))

    for bad in ["clé", "with space", "", "x" * 256]:
        with pytest.raises(ValueError, match="key id"):
            header.with_key(bad, b"w")


# -- tampering ----------------------------------------------------------------------------------


def test_every_truncated_header_is_refused_as_truncated(keyring: LocalKeyring) -> None:
    _, ct, hsize = _encrypt(keyring, 10)

    for cut in range(hsize + 1):
        with pytest.raises(DecryptionError, match="truncated"):
            decrypt_bytes(ct[:cut], keyring, IDENTITY)


def test_foreign_data_is_not_mistaken_for_an_object(keyring: LocalKeyring) -> None:
    with pytest.raises(DecryptionError, match="bad magic"):
        decrypt_bytes(b"a,b,c\n1,2,3\n" * 10, keyring, IDENTITY)


def test_every_header_byte_is_authenticated(keyring: LocalKeyring) -> None:
    _, ct, hsize = _encrypt(keyring, 3 * SEG + 5)
    undetected = []
    for offset in range(hsize):
        bad = bytearray(ct)
        bad[offset] ^= 0x01
        try:
            decrypt_bytes(bytes(bad), keyring, IDENTITY)
        except DecryptionError:
            continue
        undetected.append(offset)

    assert not undetected, f"header bytes at offsets {undetected} are not authenticated"


@pytest.mark.parametrize("segment", [0, 2, 5])
@pytest.mark.parametrize("where", ["first", "middle", "tag"])
def test_any_flipped_payload_bit_names_its_segment(
    keyring: LocalKeyring, segment: int, where: str
) -> None:
    _, ct, hsize = _encrypt(keyring, 5 * SEG + 9)  # segments 0-4 full, 5 final (9 bytes)
    seg_len = len(_segments(ct, hsize)[segment])
    rel = {"first": 0, "middle": (seg_len - TAG) // 2, "tag": seg_len - 1}[where]
    bad = bytearray(ct)
    bad[hsize + segment * (SEG + TAG) + rel] ^= 0x80

    with pytest.raises(DecryptionError, match=f"segment {segment} failed authentication"):
        decrypt_bytes(bytes(bad), keyring, IDENTITY)


def test_truncation_at_a_segment_boundary_is_detected(keyring: LocalKeyring) -> None:
    _, ct, hsize = _encrypt(keyring, 5 * SEG + 9)

    for keep in range(1, 6):
        with pytest.raises(DecryptionError, match="truncated: final segment missing"):
            decrypt_bytes(ct[: hsize + keep * (SEG + TAG)], keyring, IDENTITY)


def test_dropping_a_full_final_segment_is_detected(keyring: LocalKeyring) -> None:
    _, ct, hsize = _encrypt(keyring, 4 * SEG)  # the final segment is a full one

    with pytest.raises(DecryptionError, match=r"truncated: final segment missing .*segment 2"):
        decrypt_bytes(ct[: hsize + 3 * (SEG + TAG)], keyring, IDENTITY)


@pytest.mark.parametrize("cut", [1, TAG - 1, TAG, SEG])
def test_truncation_inside_a_segment_is_detected(keyring: LocalKeyring, cut: int) -> None:
    _, ct, _ = _encrypt(keyring, 3 * SEG + 40)

    with pytest.raises(DecryptionError):
        decrypt_bytes(ct[:-cut], keyring, IDENTITY)


def test_swapped_segments_are_detected(keyring: LocalKeyring) -> None:
    _, ct, hsize = _encrypt(keyring, 4 * SEG + 3)
    segs = _segments(ct, hsize)
    segs[1], segs[2] = segs[2], segs[1]

    with pytest.raises(DecryptionError, match="segment 1 failed authentication"):
        decrypt_bytes(ct[:hsize] + b"".join(segs), keyring, IDENTITY)


def test_appended_segment_after_a_full_final_segment_is_detected(keyring: LocalKeyring) -> None:
    _, ct, hsize = _encrypt(keyring, 3 * SEG)
    segs = _segments(ct, hsize)

    with pytest.raises(DecryptionError, match="unexpected data after the final segment"):
        decrypt_bytes(ct + segs[-1], keyring, IDENTITY)
    with pytest.raises(DecryptionError, match="unexpected data after the final segment"):
        decrypt_bytes(ct + b"\x00", keyring, IDENTITY)


@pytest.mark.parametrize("extra", [b"\x00", b"A" * TAG, b"B" * (SEG + TAG)])
def test_appended_data_after_a_short_final_segment_is_detected(
    keyring: LocalKeyring, extra: bytes
) -> None:
    _, ct, _ = _encrypt(keyring, 3 * SEG + 10)

    with pytest.raises(DecryptionError):
        decrypt_bytes(ct + extra, keyring, IDENTITY)


def test_segments_spliced_from_another_object_are_detected(keyring: LocalKeyring) -> None:
    _, a, ha = _encrypt(keyring, 3 * SEG)
    _, b, hb = _encrypt(keyring, 3 * SEG)
    spliced = a[:ha] + _segments(a, ha)[0] + _segments(b, hb)[1] + _segments(a, ha)[2]

    with pytest.raises(DecryptionError, match="segment 1 failed authentication"):
        decrypt_bytes(spliced, keyring, IDENTITY)


def test_reader_never_hands_out_plaintext_of_an_unverified_segment(
    keyring: LocalKeyring,
) -> None:
    pt, ct, hsize = _encrypt(keyring, 4 * SEG)
    bad = bytearray(ct)
    bad[hsize + (SEG + TAG) + 3] ^= 1  # segment 1
    got = bytearray()
    reader = DecryptingReader(io.BytesIO(bytes(bad)), keyring, IDENTITY)
    buf = bytearray(SEG // 2 + 5)

    def drain() -> None:
        while n := reader.readinto(buf):
            got.extend(buf[:n])

    with pytest.raises(DecryptionError, match="segment 1"):
        drain()

    assert bytes(got) == pt[:SEG], "only segment 0 (verified) may have been read"
    with pytest.raises(DecryptionError, match="segment 1"):
        reader.read(1)  # a failed reader stays failed


# -- identity and keys --------------------------------------------------------------------------


def test_wrong_identity_fails(keyring: LocalKeyring) -> None:
    _, ct, _ = _encrypt(keyring, 100)

    with pytest.raises(DecryptionError, match="dataset:other"):
        decrypt_bytes(ct, keyring, "dataset:other")


def test_renaming_the_identity_inside_the_header_does_not_help(keyring: LocalKeyring) -> None:
    # Given a ciphertext whose stored identity an attacker rewrote to the one we expect.
    _, ct, _ = _encrypt(keyring, 100)
    header = read_header(io.BytesIO(ct))
    forged = crypto.Header(
        header.version,
        header.segment_size,
        header.salt,
        header.nonce_prefix,
        "dataset:renamed",
        header.key_id,
        header.wrapped_key,
    )

    with pytest.raises(DecryptionError, match="unwrap"):
        decrypt_bytes(forged.to_bytes() + ct[header.size :], keyring, "dataset:renamed")


def test_wrong_key_material_under_the_same_key_id_fails(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    _, ct, _ = _encrypt(keyring, 100)
    other_path = tmp_path / "other" / "keyring.json"
    other = LocalKeyring(other_path)
    other.create_key()
    data = json.loads(other_path.read_text())
    data["keys"] = {keyring.current_key_id(): next(iter(data["keys"].values()))}
    data["current"] = keyring.current_key_id()
    other_path.write_text(json.dumps(data))

    with pytest.raises(DecryptionError, match="could not unwrap") as info:
        decrypt_bytes(ct, other, IDENTITY)
    assert not isinstance(info.value, KeyNotFoundError)


def test_unknown_key_id_is_named(keyring: LocalKeyring, tmp_path: Path) -> None:
    _, ct, _ = _encrypt(keyring, 10)
    stranger = LocalKeyring(tmp_path / "stranger" / "keyring.json")
    stranger.create_key()

    with pytest.raises(KeyNotFoundError, match=keyring.current_key_id()):
        decrypt_bytes(ct, stranger, IDENTITY)


def test_missing_keyring_fails_with_key_not_found(tmp_path: Path) -> None:
    ring = LocalKeyring(tmp_path / "nowhere" / "keyring.json")

    with pytest.raises(KeyNotFoundError, match="no keyring"):
        ring.unwrap_key("abc", b"x" * 60, b"ctx")
    with pytest.raises(KeyNotFoundError, match="ballast keys create"):
        ring.current_key_id()


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d["keys"].__setitem__(d["current"], "c2VjcmV0"),
        lambda d: d["keys"].__setitem__(d["current"], 5),
        lambda d: d["keys"].__setitem__(d["current"], ["kek"]),
        lambda d: d.__setitem__("current", 7),
        lambda d: d.__setitem__("keys", []),
        lambda d: d.__setitem__("format", "other/1"),
    ],
)
def test_a_malformed_keyring_is_a_config_error_everywhere(
    keyring: LocalKeyring, damage: Any
) -> None:
    # A hand-edited or corrupted keyring must fail typed (callers catch BallastError), never
    # with an AttributeError or TypeError from deep inside unwrap.
    ct = encrypt_bytes(b"payload", keyring, IDENTITY, SEG)
    data = json.loads(keyring.path.read_text())
    damage(data)
    keyring.path.write_text(json.dumps(data))

    for call in (
        lambda: decrypt_bytes(ct, keyring, IDENTITY),
        keyring.key_ids,
        keyring.current_key_id,
        keyring.rotate,
    ):
        with pytest.raises(ConfigError, match="is not a ballast-keyring/1 file"):
            call()


@pytest.mark.parametrize(
    "kek", ["not base64!", "kék-non-ascii", "c2hvcnQ="], ids=["junk", "non-ascii", "short"]
)
def test_a_corrupt_key_entry_is_a_config_error(keyring: LocalKeyring, kek: str) -> None:
    ct = encrypt_bytes(b"payload", keyring, IDENTITY, SEG)
    data = json.loads(keyring.path.read_text())
    data["keys"][keyring.current_key_id()]["kek"] = kek
    keyring.path.write_text(json.dumps(data))

    with pytest.raises(ConfigError, match="is not 32 bytes"):
        decrypt_bytes(ct, keyring, IDENTITY)


def test_retired_key_cannot_decrypt_and_says_so(keyring: LocalKeyring) -> None:
    _, ct, _ = _encrypt(keyring, 10)
    old = keyring.current_key_id()
    new = keyring.rotate()
    keyring.retire(old)

    assert keyring.key_ids() == [new]
    assert keyring.retired_key_ids() == [old]
    with pytest.raises(KeyNotFoundError, match=rf"key '{old}' was retired"):
        decrypt_bytes(ct, keyring, IDENTITY)
    assert "kek" not in json.loads(keyring.path.read_text())["keys"][old], "material destroyed"


def test_current_key_cannot_be_retired(keyring: LocalKeyring) -> None:
    with pytest.raises(ConfigError, match="rotate"):
        keyring.retire(keyring.current_key_id())
    with pytest.raises(KeyNotFoundError, match="nope"):
        keyring.retire("nope")


def test_key_ids_are_short_unique_hex(keyring: LocalKeyring) -> None:
    ids = [keyring.rotate() for _ in range(20)]

    assert len(set(ids)) == 20
    assert all(len(k) == 12 and int(k, 16) >= 0 for k in ids)
    assert keyring.key_ids()[0] == ids[-1], "the current key is listed first"
    assert len(keyring.key_ids()) == 21


# -- keyring file security ------------------------------------------------------------------------


def test_keyring_is_created_0600_in_a_0700_directory(tmp_path: Path) -> None:
    ring = LocalKeyring(tmp_path / "fresh" / "keyring.json")
    ring.create_key()

    assert stat.S_IMODE(ring.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ring.path.parent.stat().st_mode) == 0o700
    assert not [p for p in ring.path.parent.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_keyring_readable_by_others_is_refused(keyring: LocalKeyring, mode: int) -> None:
    os.chmod(keyring.path, mode)

    with pytest.raises(ConfigError, match=r"group or others .*chmod 600"):
        keyring.current_key_id()
    with pytest.raises(ConfigError, match="chmod 600"):
        encrypt_bytes(b"x", keyring, IDENTITY)


def test_keyring_in_a_world_writable_directory_is_refused(keyring: LocalKeyring) -> None:
    os.chmod(keyring.path.parent, 0o777)

    with pytest.raises(ConfigError, match="chmod 700"):
        keyring.current_key_id()


def test_keyring_symlink_is_refused(keyring: LocalKeyring, tmp_path: Path) -> None:
    link = keyring.path.parent / "link.json"
    link.symlink_to(keyring.path)

    with pytest.raises(ConfigError, match="cannot open keyring"):
        LocalKeyring(link).current_key_id()


def test_a_keyring_path_that_is_a_folder_is_a_typed_error(tmp_path: Path) -> None:
    folder = tmp_path / "k" / "dir"
    folder.mkdir(parents=True, mode=0o700)
    os.chmod(folder.parent, 0o700)
    # Before: IsADirectoryError from fdopen, untyped.
    with pytest.raises(ConfigError, match="not a regular file"):
        LocalKeyring(folder).current_key_id()
    with pytest.raises(ConfigError, match="not a regular file"):
        LocalKeyring(folder).create_key()


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "k" / "keyring.json"
    ids: list[str] = []
    barrier = threading.Barrier(6)

    def first_use() -> None:
        barrier.wait()
        ids.append(LocalKeyring(path, auto_create=True).current_key_id())

    threads = [threading.Thread(target=first_use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(set(ids)) == 1, f"racing first uses created several keys: {ids}"
    assert LocalKeyring(path).key_ids() == ids[:1]


def test_provider_from_settings_uses_the_settings_keyring(settings: Settings) -> None:
    provider = provider_from_settings(settings)

    assert isinstance(provider, LocalKeyring)
    assert provider.path == settings.keyring_path
    key_id = provider.current_key_id()  # created on first use
    assert stat.S_IMODE(settings.keyring_path.stat().st_mode) == 0o600
    assert provider.current_key_id() == key_id
    assert decrypt_bytes(encrypt_bytes(b"hi", provider, IDENTITY), provider, IDENTITY) == b"hi"


# -- files and rotation --------------------------------------------------------------------------


def test_file_roundtrip(keyring: LocalKeyring, tmp_path: Path) -> None:
    src = tmp_path / "plain.csv"
    src.write_bytes(_plaintext(10 * SEG + 1))

    key_id = encrypt_file(src, tmp_path / "enc" / "data.bin", keyring, IDENTITY, SEG)
    decrypt_file(tmp_path / "enc" / "data.bin", tmp_path / "out.csv", keyring, IDENTITY)

    assert key_id == keyring.current_key_id()
    assert (tmp_path / "out.csv").read_bytes() == src.read_bytes()
    assert stat.S_IMODE((tmp_path / "out.csv").stat().st_mode) == 0o600


def test_failed_decrypt_file_leaves_no_output(keyring: LocalKeyring, tmp_path: Path) -> None:
    _, ct, _ = _encrypt(keyring, 6 * SEG)
    bad = bytearray(ct)
    bad[-1] ^= 1  # only the final segment is bad: earlier segments verify and get written
    (tmp_path / "bad.bin").write_bytes(bad)
    (tmp_path / "out").mkdir()
    existing = tmp_path / "out" / "existing.csv"
    existing.write_bytes(b"previous good content")

    with pytest.raises(DecryptionError, match="segment 5"):
        decrypt_file(tmp_path / "bad.bin", tmp_path / "out" / "new.csv", keyring, IDENTITY)
    with pytest.raises(DecryptionError):
        decrypt_file(tmp_path / "bad.bin", existing, keyring, IDENTITY)

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["existing.csv"]
    assert existing.read_bytes() == b"previous good content"


def test_rotation_rewraps_only_the_header(keyring: LocalKeyring, tmp_path: Path) -> None:
    # Given an object encrypted under key 1.
    pt = _plaintext(20 * SEG + 3)
    path = tmp_path / "obj.bin"
    path.write_bytes(encrypt_bytes(pt, keyring, IDENTITY, SEG))
    os.chmod(path, 0o640)
    old_id = keyring.current_key_id()
    before = path.read_bytes()
    h_before = read_header(io.BytesIO(before))

    # When the keyring rotates, the object is rewrapped and the old key retired.
    new_id = keyring.rotate()
    rewrap_header(path, keyring)
    keyring.retire(old_id)

    # Then only the key slot changed, and the object decrypts under the new key alone.
    after = path.read_bytes()
    h_after = read_header(io.BytesIO(after))
    assert h_after.key_id == new_id
    assert h_after.immutable == h_before.immutable
    assert after[h_after.size :] == before[h_before.size :], "payload bytes must be identical"
    assert h_after.wrapped_key != h_before.wrapped_key
    assert decrypt_bytes(after, keyring, IDENTITY) == pt
    assert stat.S_IMODE(path.stat().st_mode) == 0o640, "rewrap keeps the file mode"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]

    # And rewrapping again is a no-op.
    inode = path.stat().st_ino
    rewrap_header(path, keyring)
    assert path.stat().st_ino == inode

    # And losing the new key makes decryption fail naming it.
    data = json.loads(keyring.path.read_text())
    del data["keys"][new_id]
    keyring.path.write_text(json.dumps(data))
    with pytest.raises(KeyNotFoundError, match=new_id):
        decrypt_bytes(path.read_bytes(), keyring, IDENTITY)


def test_rewrap_through_a_symlink_rewraps_the_object_and_keeps_the_link(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    real = tmp_path / "store" / "obj.bin"
    real.parent.mkdir()
    real.write_bytes(encrypt_bytes(b"payload", keyring, IDENTITY, SEG))
    link = tmp_path / "obj-link.bin"
    link.symlink_to(real)
    old = keyring.current_key_id()
    new = keyring.rotate()

    rewrap_header(link, keyring)
    keyring.retire(old)

    # The object itself moved under the new key (the old one is gone), and the link still
    # points at it: replacing the link with a copy would strand the object under a retired key.
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert read_header(io.BytesIO(real.read_bytes())).key_id == new
    assert decrypt_bytes(real.read_bytes(), keyring, IDENTITY) == b"payload"


def test_rewrap_refuses_a_file_with_several_hard_links(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    path = tmp_path / "obj.bin"
    path.write_bytes(encrypt_bytes(b"payload", keyring, IDENTITY, SEG))
    os.link(path, tmp_path / "other-name.bin")
    old = keyring.current_key_id()
    keyring.rotate()
    before = path.read_bytes()

    with pytest.raises(ConfigError, match="2 hard links"):
        rewrap_header(path, keyring)

    assert path.read_bytes() == before
    assert read_header(io.BytesIO(before)).key_id == old
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_rewrap_to_an_explicit_key_and_with_a_retired_source_key(
    keyring: LocalKeyring, tmp_path: Path
) -> None:
    path = tmp_path / "obj.bin"
    path.write_bytes(encrypt_bytes(b"payload", keyring, IDENTITY, SEG))
    first = keyring.current_key_id()
    second = keyring.rotate()
    keyring.rotate()

    rewrap_header(path, keyring, second)
    assert read_header(io.BytesIO(path.read_bytes())).key_id == second
    keyring.retire(second)

    with pytest.raises(KeyNotFoundError, match=second):
        rewrap_header(path, keyring, first)
    assert read_header(io.BytesIO(path.read_bytes())).key_id == second, "untouched on failure"


# -- the spec is sufficient ----------------------------------------------------------------------


def _spec_reader(blob: bytes, keyring_json: dict[str, object], identity: str) -> bytes:
    """Written from ballast/FORMAT.md only: struct, AESGCM and HKDF, nothing from ballast."""
    assert blob[0:8] == b"BALLAST\x1a"
    assert blob[8] == 1
    (seg_size,) = struct.unpack(">I", blob[9:13])
    salt, prefix = blob[13:45], blob[45:52]
    (ilen,) = struct.unpack(">H", blob[52:54])
    ident = blob[54 : 54 + ilen]
    assert ident == identity.encode()
    h_imm = blob[: 54 + ilen]
    p = 54 + ilen
    klen = blob[p]
    key_id = blob[p + 1 : p + 1 + klen].decode("ascii")
    p += 1 + klen
    (wlen,) = struct.unpack(">H", blob[p : p + 2])
    wrapped = blob[p + 2 : p + 2 + wlen]
    p += 2 + wlen

    keys = keyring_json["keys"]
    assert isinstance(keys, dict)
    kek = base64.b64decode(keys[key_id]["kek"])
    dek = AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], ident)
    k_seg = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=salt, info=b"ballast stream v1 segment key"
    ).derive(dek)

    body = blob[p:]
    step = seg_size + 16
    chunks = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        flag = b"\x01" if i == len(chunks) - 1 else b"\x00"
        nonce = prefix + struct.pack(">I", i) + flag
        out.append(AESGCM(k_seg).decrypt(nonce, chunk, h_imm))
    return b"".join(out)


@pytest.mark.parametrize(("n", "seg"), [(0, 64), (1, 64), (640, 64), (1000, 100), (70000, 4096)])
def test_independent_reader_written_from_the_spec_decrypts(
    keyring: LocalKeyring, n: int, seg: int
) -> None:
    pt = os.urandom(n)
    blob = encrypt_bytes(pt, keyring, IDENTITY, seg)

    assert _spec_reader(blob, json.loads(keyring.path.read_text()), IDENTITY) == pt


# -- memory -------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import hashlib, io, os, resource, sys, threading
    from pathlib import Path
    from ballast.crypto import LocalKeyring, decrypt_stream, encrypt_stream

    TOTAL = int(sys.argv[2])
    ring = LocalKeyring(Path(sys.argv[1]))
    ring.create_key()

    class Gen(io.RawIOBase):  # TOTAL pseudo-random bytes, generated on the fly
        def __init__(self):
            self.left = TOTAL
            self.h = hashlib.sha256()
            self.block = os.urandom(1 << 16)
        def readable(self):
            return True
        def readinto(self, b):
            n = min(len(b), self.left, len(self.block))
            b[:n] = self.block[:n]
            self.h.update(self.block[:n])
            self.left -= n
            self.block = hashlib.sha512(self.block[:64]).digest() * 1024
            return n

    class Sink(io.RawIOBase):
        def __init__(self):
            self.h = hashlib.sha256()
            self.n = 0
        def writable(self):
            return True
        def write(self, b):
            self.h.update(b)
            self.n += len(b)
            return len(b)

    def vm_kb(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    try:  # Linux: reset the peak-RSS mark so it covers only the stream (not imports)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base, peak = vm_kb("VmRSS"), lambda: vm_kb("VmHWM")
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    r, w = os.pipe()
    src, sink = Gen(), Sink()
    def produce():
        with os.fdopen(w, "wb") as out:
            encrypt_stream(src, out, ring, "mem:test")
    t = threading.Thread(target=produce)
    t.start()
    with os.fdopen(r, "rb") as inp:
        decrypt_stream(inp, sink, ring, "mem:test")
    t.join()
    assert sink.n == TOTAL, sink.n
    assert sink.h.digest() == src.h.digest()
    print((peak() - base) * 1024)
    """
)


def test_memory_stays_flat_for_a_200_mb_stream(tmp_path: Path) -> None:
    # A fresh process, so the high-water mark belongs to this stream alone.
    total = 200 * 1000 * 1000
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "k" / "ring.json"), str(total)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    delta = int(proc.stdout.strip().splitlines()[-1])

    limit = 6 * DEFAULT_SEGMENT_SIZE + 20 * 1024 * 1024  # encrypt + decrypt buffers, + slack
    assert delta < limit, f"peak RSS grew by {delta / 2**20:.1f} MiB for a 200 MB stream"


# -- KMS error mapping (the server roundtrip is in tests/integration/test_s3_storage.py) ---------

# Full ARNs: botocore's stubber checks their length, as KMS does.
K1 = "arn:aws:kms:us-east-1:111122223333:key/k1"
NEW = "arn:aws:kms:us-east-1:111122223333:key/new"
OLD = "arn:aws:kms:us-east-1:111122223333:key/old"


@pytest.fixture
def stubbed_kms() -> tuple[crypto.KmsKeyProvider, Stubber]:
    import boto3

    client = boto3.client(
        "kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    return crypto.KmsKeyProvider("alias/ballast", client=client), Stubber(client)


def _resolves(stub: Stubber, alias: str, arn: str) -> None:
    """The describe_key answer that resolves the provider's configured key to ``arn``."""
    stub.add_response(
        "describe_key",
        {"KeyMetadata": {"KeyId": arn.rpartition("/")[2], "Arn": arn}},
        {"KeyId": alias},
    )


@pytest.mark.parametrize(
    ("code", "error", "match"),
    [
        ("DisabledException", KeyNotFoundError, "is unavailable"),
        ("KMSInvalidStateException", KeyNotFoundError, "is unavailable"),
        ("NotFoundException", KeyNotFoundError, "is unavailable"),
        ("InvalidCiphertextException", DecryptionError, "KMS decrypt"),
        ("AccessDeniedException", DecryptionError, "KMS decrypt"),
    ],
)
def test_kms_errors_map_to_typed_errors_naming_the_key(
    stubbed_kms: tuple[crypto.KmsKeyProvider, Stubber],
    code: str,
    error: type[Exception],
    match: str,
) -> None:
    kms, stub = stubbed_kms
    _resolves(stub, "alias/ballast", K1)
    stub.add_client_error("decrypt", service_error_code=code, service_message="nope")

    with (
        stub,
        pytest.raises(
            error,
            match=rf"key '{K1}'.*{match}|{match}.*'{K1}'",
        ) as info,
    ):
        kms.unwrap_key(K1, b"blob", b"dataset:x")
    if error is DecryptionError:
        assert not isinstance(info.value, KeyNotFoundError)


def test_kms_wrap_failure_is_an_encrypt_stage_error(
    stubbed_kms: tuple[crypto.KmsKeyProvider, Stubber],
) -> None:
    kms, stub = stubbed_kms
    stub.add_client_error("encrypt", service_error_code="AccessDeniedException")

    with (
        stub,
        pytest.raises(
            BallastError,
            match=rf"\[encrypt\] KMS encrypt with key '{K1}'",
        ),
    ):
        kms.wrap_key(K1, b"k" * 32, b"dataset:x")


def test_kms_sends_the_identity_as_encryption_context(
    stubbed_kms: tuple[crypto.KmsKeyProvider, Stubber],
) -> None:
    kms, stub = stubbed_kms
    ctx = {"ballast:identity": "dataset:x"}
    stub.add_response(
        "encrypt",
        {"CiphertextBlob": b"wrapped", "KeyId": K1},
        {
            "KeyId": K1,
            "Plaintext": b"k" * 32,
            "EncryptionContext": ctx,
        },
    )
    _resolves(stub, "alias/ballast", K1)  # unwrapping checks the key is ours first
    stub.add_response(
        "decrypt",
        {"Plaintext": b"k" * 32, "KeyId": K1},
        {
            "KeyId": K1,
            "CiphertextBlob": b"wrapped",
            "EncryptionContext": ctx,
        },
    )

    with stub:
        assert (
            kms.unwrap_key(
                K1,
                kms.wrap_key(K1, b"k" * 32, b"dataset:x"),
                b"dataset:x",
            )
            == b"k" * 32
        )
    stub.assert_no_pending_responses()


def test_kms_refuses_a_header_naming_a_key_it_does_not_trust_without_asking_kms(
    stubbed_kms: tuple[crypto.KmsKeyProvider, Stubber],
) -> None:
    # KMS would decrypt with any key the role may use: a bucket writer's own key included.
    kms, stub = stubbed_kms
    _resolves(stub, "alias/ballast", "arn:aws:kms:us-east-1:1:key/ours")

    with stub, pytest.raises(KeyNotFoundError, match="'arn:aws:kms:us-east-1:2:key/theirs' is not"):
        kms.unwrap_key("arn:aws:kms:us-east-1:2:key/theirs", b"blob", b"dataset:x")
    stub.assert_no_pending_responses()  # no decrypt was sent


def test_kms_trusts_the_extra_keys_it_is_given_by_their_arns() -> None:
    import boto3

    client = boto3.client(
        "kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    kms = crypto.KmsKeyProvider("alias/new", also_trust=("alias/old",), client=client)
    stub = Stubber(client)
    _resolves(stub, "alias/new", NEW)
    _resolves(stub, "alias/old", OLD)
    stub.add_response(
        "decrypt",
        {"Plaintext": b"k" * 32, "KeyId": OLD},
        {
            "KeyId": OLD,
            "CiphertextBlob": b"wrapped",
            "EncryptionContext": {"ballast:identity": "dataset:x"},
        },
    )
    with stub:
        assert kms.unwrap_key(OLD, b"wrapped", b"dataset:x") == b"k" * 32
        assert kms.trusted_key_ids() == {NEW, OLD}  # resolved once, cached
        with pytest.raises(KeyNotFoundError, match="not trusted"):
            kms.unwrap_key("alias/old", b"wrapped", b"dataset:x")  # ARNs only, as headers hold
    stub.assert_no_pending_responses()


def test_kms_wraps_only_under_a_trusted_key_arn_so_the_header_stays_readable(
    stubbed_kms: tuple[crypto.KmsKeyProvider, Stubber],
) -> None:
    # Before: an alias went into the header as given, and unwrap (ARNs only) refused it for
    # ever; a re-wrap had replaced the readable original by then.
    kms, stub = stubbed_kms
    alias_arn = "arn:aws:kms:us-east-1:1:alias/ballast"
    with stub:
        for key in ("alias/ballast", K1.rpartition("/")[2], alias_arn):
            with pytest.raises(ConfigError, match="give the key's ARN"):
                kms.wrap_key(key, b"k" * 32, b"dataset:x")
    stub.assert_no_pending_responses()  # no encrypt was sent


def test_a_trusted_kms_key_that_no_longer_resolves_does_not_stop_decryption() -> None:
    import boto3

    client = boto3.client(
        "kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    kms = crypto.KmsKeyProvider("alias/new", also_trust=("alias/deleted", OLD), client=client)
    stub = Stubber(client)
    _resolves(stub, "alias/new", NEW)
    stub.add_client_error(
        "describe_key",
        service_error_code="NotFoundException",
        expected_params={"KeyId": "alias/deleted"},
    )
    stub.add_response(
        "decrypt",
        {"Plaintext": b"k" * 32, "KeyId": NEW},
        {
            "KeyId": NEW,
            "CiphertextBlob": b"wrapped",
            "EncryptionContext": {"ballast:identity": "dataset:x"},
        },
    )
    with stub:
        assert kms.unwrap_key(NEW, b"wrapped", b"dataset:x") == b"k" * 32
        assert kms.trusted_key_ids() == {NEW, OLD}  # an ARN needs no lookup
    stub.assert_no_pending_responses()


def test_kms_key_lookup_failing_while_decrypting_is_a_decryption_error(
    stubbed_kms: tuple[crypto.KmsKeyProvider, Stubber],
) -> None:
    kms, stub = stubbed_kms
    stub.add_client_error("describe_key", service_error_code="AccessDeniedException")
    with stub, pytest.raises(DecryptionError, match="describe_key"):
        kms.unwrap_key(K1, b"blob", b"dataset:x")  # was a BallastError of stage "encrypt"


def test_provider_from_settings_passes_the_trusted_kms_keys(settings: Settings) -> None:
    s = settings.model_copy(
        update={"kms_key_id": "alias/new", "kms_trusted_key_ids": ("alias/old",)}
    )
    provider = provider_from_settings(s)
    assert isinstance(provider, crypto.KmsKeyProvider)
    assert (provider.key_id, provider.also_trust) == ("alias/new", ("alias/old",))


def test_public_names_are_exported() -> None:
    from ballast import keys, storage

    for module in (crypto, keys, storage):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing, f"{module.__name__}.__all__ lists undefined names {missing}"

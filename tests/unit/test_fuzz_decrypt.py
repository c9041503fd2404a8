"""Fuzzing the decryptor: generated corruptions of small valid objects never escape as anything
but a typed error, and never decrypt to anything but the original plaintext.

Corruptions are byte flips, truncations, insertions, deletions, appended bytes, segment swaps,
drops and duplicates, and edits of header fields (version, segment size, the length fields, key
id pointed at another active, a retired or an unknown key, identity). Small segments make every
object several segments long. ``derandomize=True`` makes every run (and CI) see the same cases.
"""

from __future__ import annotations

import io
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ballast.crypto import (
    DecryptingReader,
    Header,
    LocalKeyring,
    decrypt_bytes,
    encrypt_bytes,
    read_header,
)
from ballast.errors import ConfigError, DecryptionError, KeyNotFoundError

IDENTITY = "dataset:fuzz"
TAG = 16
TYPED = (DecryptionError, KeyNotFoundError, ConfigError)
EXAMPLES = 2_000


@dataclass(frozen=True)
class Sample:
    plaintext: bytes
    blob: bytes
    header: Header

    @property
    def segments(self) -> list[bytes]:
        body = self.blob[self.header.size :]
        step = self.header.segment_size + TAG
        return [body[i : i + step] for i in range(0, len(body), step)]


@dataclass(frozen=True)
class World:
    ring: LocalKeyring
    samples: tuple[Sample, ...]
    other_key: str  # active, but not the one that wrapped the samples
    retired_key: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    ring = LocalKeyring(Path(tmp_path_factory.mktemp("fuzz")) / "keys" / "keyring.json")
    retired = ring.create_key()
    wrapping = ring.rotate()
    ring.retire(retired)
    samples = []
    # (plaintext size, segment size): empty; one short; several segments ending short; several
    # ending on a full final segment.
    for n, seg in [(0, 16), (5, 16), (70, 16), (64, 16), (150, 40)]:
        pt = bytes((i * 31 + 7) & 0xFF for i in range(n))
        blob = encrypt_bytes(pt, ring, IDENTITY, seg)
        samples.append(Sample(pt, blob, read_header(io.BytesIO(blob))))
    other = ring.rotate()  # current now, so the samples' key is an older, still active one
    assert ring.key_ids() == [other, wrapping]
    return World(ring, tuple(samples), other, retired)


# -- mutations ----------------------------------------------------------------------------------

_FIELDS = [
    "version",
    "segment_size",
    "identity_len",
    "key_id_len",
    "wrapped_len",
    "key_id_other",
    "key_id_retired",
    "key_id_unknown",
    "identity",
]


def _ops_for(s: Sample) -> st.SearchStrategy[tuple]:  # type: ignore[type-arg]
    """Operations with positions drawn inside this sample's layout."""
    size, hsize, nseg = len(s.blob), s.header.size, len(s.segments)
    # Header and payload are drawn separately, so payload flips are as likely as header ones.
    pos = st.one_of(st.integers(0, hsize - 1), st.integers(hsize, size - 1))
    seg = st.integers(0, nseg - 1)
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, size)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=40)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=80)),
        st.tuples(st.just("swap_segments"), seg, seg),
        st.tuples(st.just("drop_segment"), seg),
        st.tuples(st.just("duplicate_segment"), seg),
        st.tuples(st.just("header"), st.sampled_from(_FIELDS), st.integers(0, 0xFFFFFFFF)),
    )


def corruptions(world: World) -> st.SearchStrategy[tuple[int, list[tuple]]]:  # type: ignore[type-arg]
    """A sample index and one to three operations on it (strategies built once per sample)."""
    per_sample = [
        st.tuples(st.just(i), st.lists(_ops_for(s), min_size=1, max_size=3))
        for i, s in enumerate(world.samples)
    ]
    return st.one_of(per_sample)


def _header_edit(s: Sample, w: World, field: str, value: int) -> bytes:
    h, blob = s.header, s.blob
    imm = len(h.immutable)
    body = blob[h.size :]
    if field == "version":
        return blob[:8] + bytes([value & 0xFF]) + blob[9:]
    if field == "segment_size":
        # Keep hostile sizes small enough to be quick: the bound itself is tested elsewhere.
        size = value % (4 * h.segment_size + 2)
        return blob[:9] + struct.pack(">I", size) + blob[13:]
    if field == "identity_len":
        return blob[:52] + struct.pack(">H", value & 0xFFFF) + blob[54:]
    if field == "key_id_len":
        return blob[:imm] + bytes([value & 0xFF]) + blob[imm + 1 :]
    if field == "wrapped_len":
        at = imm + 1 + len(h.key_id)
        return blob[:at] + struct.pack(">H", value & 0xFFFF) + blob[at + 2 :]
    if field == "identity":
        other = Header(
            h.version,
            h.segment_size,
            h.salt,
            h.nonce_prefix,
            f"dataset:other-{value % 7}",
            h.key_id,
            h.wrapped_key,
        )
        return other.to_bytes() + body
    key_id = {
        "key_id_other": w.other_key,
        "key_id_retired": w.retired_key,
        "key_id_unknown": f"{value:012x}"[-12:],
    }[field]
    return h.with_key(key_id, h.wrapped_key).to_bytes() + body


def _mutate(s: Sample, w: World, ops: list[tuple]) -> bytes:  # type: ignore[type-arg]
    data = s.blob
    for op in ops:
        kind = op[0]
        n = len(data)
        if kind == "flip" and n:
            i = op[1] % n
            data = data[:i] + bytes([data[i] ^ op[2]]) + data[i + 1 :]
        elif kind == "truncate":
            data = data[: op[1] % (n + 1)]
        elif kind == "insert":
            i = op[1] % (n + 1)
            data = data[:i] + op[2] + data[i:]
        elif kind == "delete" and n:
            i = op[1] % n
            data = data[:i] + data[i + op[2] :]
        elif kind == "append":
            data = data + op[1]
        elif kind == "header":
            # Header edits apply to the original layout (the fields' offsets are known there).
            data = _header_edit(s, w, op[1], op[2])
        else:  # segment operations, on the original segmentation
            segs = s.segments
            i = op[1] % len(segs)
            if kind == "swap_segments":
                j = op[2] % len(segs)
                segs[i], segs[j] = segs[j], segs[i]
            elif kind == "drop_segment":
                del segs[i]
            else:
                segs.insert(i, segs[i])
            data = s.blob[: s.header.size] + b"".join(segs)
    return data


def _check(world: World, sample: Sample, mutated: bytes, seen: Counter[str]) -> None:
    error: DecryptionError | ConfigError | None = None
    try:
        out = decrypt_bytes(mutated, world.ring, IDENTITY)
    except TYPED as exc:  # anything else propagates and fails the test with its traceback
        error = exc
    if error is not None:
        assert mutated != sample.blob, f"an untouched object failed to decrypt: {error}"
        assert str(error).startswith(f"[{error.stage}] ")
        seen[_kind(error)] += 1
        return
    assert mutated == sample.blob, "a corrupted object decrypted"
    assert out == sample.plaintext
    seen["unchanged"] += 1


def _kind(exc: Exception) -> str:
    if isinstance(exc, KeyNotFoundError):
        return "retired key" if "retired" in str(exc) else "unknown key"
    for marker in (  # "failed authentication" first: its message also mentions truncation
        "failed authentication",
        "bad magic",
        "unsupported format version",
        "segment size",
        "truncated",
        "unexpected data after",
        "bound to identity",
        "could not unwrap",
        "has length",
        "malformed",
        "empty identity",
    ):
        if marker in str(exc):
            return marker
    return "other: " + str(exc)


def test_corruptions_only_ever_raise_typed_errors(world: World) -> None:
    seen: Counter[str] = Counter()
    distinct: set[bytes] = set()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=corruptions(world))
    def corrupted(case: tuple[int, list[tuple]]) -> None:  # type: ignore[type-arg]
        which, ops = case
        sample = world.samples[which]
        mutated = _mutate(sample, world, ops)
        distinct.add(mutated)
        _check(world, sample, mutated, seen)

    corrupted()

    assert sum(seen.values()) >= EXAMPLES, seen
    assert len(distinct) >= EXAMPLES // 2, f"only {len(distinct)} distinct corruptions"
    # The generator must reach every layer, not stop at the first check.
    for kind in (
        "bad magic",
        "unsupported format version",
        "truncated",
        "failed authentication",
        "unexpected data after",
        "bound to identity",
        "could not unwrap",
        "retired key",
        "unknown key",
    ):
        assert seen[kind] > 0, f"no corruption reached {kind!r}: {dict(seen)}"
    assert not [k for k in seen if k.startswith("other")], dict(seen)


def test_the_streaming_reader_fails_the_same_way_under_small_reads(world: World) -> None:
    runs: list[int] = []

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(case=corruptions(world), read_size=st.integers(1, 50))
    def small_reads(case: tuple[int, list[tuple]], read_size: int) -> None:  # type: ignore[type-arg]
        which, ops = case
        sample = world.samples[which]
        mutated = _mutate(sample, world, ops)
        got = bytearray()
        runs.append(1)
        try:
            with DecryptingReader(io.BytesIO(mutated), world.ring, IDENTITY) as reader:
                buf = bytearray(read_size)
                while n := reader.readinto(buf):
                    got += buf[:n]
        except TYPED:
            assert mutated != sample.blob
            # Whatever came out before the failure is a verified prefix of the original.
            assert sample.plaintext.startswith(bytes(got))
            return
        assert mutated == sample.blob and bytes(got) == sample.plaintext

    small_reads()
    assert len(runs) >= 300

"""The data boundary (fetch → decrypt → validate): every kind of bad input is refused with a typed
error naming its stage, and leaves nothing behind; failing data is quarantined; lineage hashes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from ballast.crypto import LocalKeyring, decrypt_file, encrypt_bytes, read_header
from ballast.data import DatasetSpec, bundled_csv_bytes, bundled_frame, bundled_spec
from ballast.errors import BallastError, ConfigError, DecryptionError, KeyNotFoundError
from ballast.ingest import (
    HashingReader,
    dataset_identity,
    dataset_name_from_uri,
    load_validated,
)
from ballast.quarantine import read_records
from ballast.settings import Settings
from ballast.storage import LocalStorage
from ballast.validation import ExpectationsFailed

SEG = 4096  # the bundled CSV (121 kB) becomes 30 segments
TAG = 16
NAME = "breast-cancer"


@pytest.fixture(scope="module")
def spec() -> DatasetSpec:
    return bundled_spec(NAME)


@pytest.fixture
def ring(tmp_path: Path) -> LocalKeyring:
    ring = LocalKeyring(tmp_path / "keys" / "keyring.json")
    ring.create_key()
    return ring


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: what 'nothing left behind' compares."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def _seg_offset(hsize: int, i: int) -> int:
    return hsize + i * (SEG + TAG)


Mutation = Callable[[bytes, int, LocalKeyring, Path], tuple[bytes, LocalKeyring]]


def _same(fn: Callable[[bytes, int], bytes]) -> Mutation:
    return lambda ct, hsize, ring, tmp: (fn(ct, hsize), ring)


def _wrong_key_material(
    ct: bytes, hsize: int, ring: LocalKeyring, tmp: Path
) -> tuple[bytes, LocalKeyring]:
    other = LocalKeyring(tmp / "other" / "keyring.json")
    other.create_key()
    data = json.loads(other.path.read_text())
    data["keys"] = {ring.current_key_id(): next(iter(data["keys"].values()))}
    data["current"] = ring.current_key_id()
    other.path.write_text(json.dumps(data))
    return ct, other


def _unknown_key(
    ct: bytes, hsize: int, ring: LocalKeyring, tmp: Path
) -> tuple[bytes, LocalKeyring]:
    other = LocalKeyring(tmp / "stranger" / "keyring.json")
    other.create_key()
    return ct, other


def _retired_key(
    ct: bytes, hsize: int, ring: LocalKeyring, tmp: Path
) -> tuple[bytes, LocalKeyring]:
    old = ring.current_key_id()
    ring.rotate()
    ring.retire(old)
    return ct, ring


def _other_name(ct: bytes, hsize: int, ring: LocalKeyring, tmp: Path) -> tuple[bytes, LocalKeyring]:
    return encrypt_bytes(bundled_csv_bytes(), ring, dataset_identity("other-dataset"), SEG), ring


def _renamed_header(
    ct: bytes, hsize: int, ring: LocalKeyring, tmp: Path
) -> tuple[bytes, LocalKeyring]:
    # The attacker rewrites the stored identity to the expected one: the wrap's AD catches it.
    other = encrypt_bytes(bundled_csv_bytes(), ring, dataset_identity("other-dataset"), SEG)
    h = read_header(io.BytesIO(other))
    forged = h.__class__(
        h.version,
        h.segment_size,
        h.salt,
        h.nonce_prefix,
        dataset_identity(NAME),
        h.key_id,
        h.wrapped_key,
    )
    return forged.to_bytes() + other[h.size :], ring


def _set(offset: int, raw: bytes) -> Callable[[bytes, int], bytes]:
    return lambda ct, hsize: ct[:offset] + raw + ct[offset + len(raw) :]


def _key_slot(ct: bytes, hsize: int, field: str) -> bytes:
    ident_len = struct.unpack(">H", ct[52:54])[0]
    kid_at = 54 + ident_len
    kid_len = ct[kid_at]
    wlen_at = kid_at + 1 + kid_len
    if field == "key_id_len":
        return ct[:kid_at] + b"\x00" + ct[kid_at + 1 :]
    if field == "key_id_byte":
        return ct[: kid_at + 1] + b"\x07" + ct[kid_at + 2 :]
    (wlen,) = struct.unpack(">H", ct[wlen_at : wlen_at + 2])
    if field == "wrapped_len":
        return ct[:wlen_at] + struct.pack(">H", wlen + 1) + ct[wlen_at + 2 :]
    return _flip(ct, wlen_at + 2 + 5)  # a byte of the wrapped key


# (id, mutation, error type, message) — the message must say what happened.
DECRYPT_CASES: list[tuple[str, Mutation, type[BallastError], str]] = [
    ("header-magic", _same(lambda ct, h: _flip(ct, 0)), DecryptionError, "bad magic"),
    ("header-version", _same(_set(8, b"\x02")), DecryptionError, "unsupported format version 2"),
    (
        "header-segment-size-zero",
        _same(_set(9, b"\0\0\0\0")),
        DecryptionError,
        "segment size 0 is out of range",
    ),
    (
        "header-segment-size-huge",
        _same(_set(9, b"\xff\xff\xff\xff")),
        DecryptionError,
        "out of range",
    ),
    (
        "header-segment-size-other",
        _same(_set(9, struct.pack(">I", 2 * SEG))),
        DecryptionError,
        "segment 0 failed authentication",
    ),
    (
        "header-salt",
        _same(lambda ct, h: _flip(ct, 20)),
        DecryptionError,
        "segment 0 failed authentication",
    ),
    (
        "header-nonce-prefix",
        _same(lambda ct, h: _flip(ct, 47)),
        DecryptionError,
        "segment 0 failed authentication",
    ),
    (
        "header-identity-length",
        _same(_set(52, b"\x00\x05")),
        DecryptionError,
        "bound to identity|malformed",
    ),
    (
        "header-identity-byte",
        _same(lambda ct, h: _flip(ct, 56)),
        DecryptionError,
        "bound to identity",
    ),
    (
        "header-key-id-length",
        _same(lambda ct, h: _key_slot(ct, h, "key_id_len")),
        DecryptionError,
        "malformed",
    ),
    (
        "header-key-id-byte",
        _same(lambda ct, h: _key_slot(ct, h, "key_id_byte")),
        DecryptionError,
        "malformed",
    ),
    (
        "header-wrapped-length",
        _same(lambda ct, h: _key_slot(ct, h, "wrapped_len")),
        DecryptionError,
        "has length 61, expected 60",
    ),
    (
        "header-wrapped-key",
        _same(lambda ct, h: _key_slot(ct, h, "wrapped_key")),
        DecryptionError,
        "could not unwrap",
    ),
    (
        "first-segment",
        _same(lambda ct, h: _flip(ct, _seg_offset(h, 0) + 7)),
        DecryptionError,
        "segment 0 failed authentication",
    ),
    (
        "middle-segment",
        _same(lambda ct, h: _flip(ct, _seg_offset(h, 15) + SEG // 2)),
        DecryptionError,
        "segment 15 failed authentication",
    ),
    (
        "last-segment",
        _same(lambda ct, h: _flip(ct, len(ct) - 1)),
        DecryptionError,
        "segment 29 failed authentication",
    ),
    (
        "swapped-segments",
        _same(
            lambda ct, h: (
                ct[: _seg_offset(h, 3)]
                + ct[_seg_offset(h, 4) : _seg_offset(h, 5)]
                + ct[_seg_offset(h, 3) : _seg_offset(h, 4)]
                + ct[_seg_offset(h, 5) :]
            )
        ),
        DecryptionError,
        "segment 3 failed authentication",
    ),
    (
        "truncated-mid-segment",
        _same(lambda ct, h: ct[: _seg_offset(h, 10) + 100]),
        DecryptionError,
        "segment 10 failed authentication",
    ),
    (
        "truncated-at-segment-boundary",
        _same(lambda ct, h: ct[: _seg_offset(h, 10)]),
        DecryptionError,
        r"truncated: final segment missing \(stream ends after segment 9\)",
    ),
    (
        "truncated-inside-tag",
        _same(lambda ct, h: ct[: _seg_offset(h, 10) + 5]),
        DecryptionError,
        "segment 10 is 5 bytes, shorter than its tag",
    ),
    (
        "appended-bytes",
        _same(lambda ct, h: ct + b"\x00" * 7),
        DecryptionError,
        "segment 29 failed authentication",
    ),
    (
        "appended-segment",
        _same(lambda ct, h: ct + ct[_seg_offset(h, 0) : _seg_offset(h, 1)]),
        DecryptionError,
        "segment 29 failed authentication",
    ),
    (
        "zero-length-file",
        _same(lambda ct, h: b""),
        DecryptionError,
        "truncated: header is incomplete",
    ),
    (
        "header-only",
        _same(lambda ct, h: ct[:h]),
        DecryptionError,
        "truncated: no segments after the header",
    ),
    (
        "plaintext-not-an-object",
        _same(lambda ct, h: bundled_csv_bytes()),
        DecryptionError,
        "bad magic",
    ),
    ("wrong-key-material", _wrong_key_material, DecryptionError, "could not unwrap the data key"),
    ("unknown-key", _unknown_key, KeyNotFoundError, r"key '[0-9a-f]{12}' is not in keyring"),
    ("retired-key", _retired_key, KeyNotFoundError, r"key '[0-9a-f]{12}' was retired"),
    (
        "other-dataset-name",
        _other_name,
        DecryptionError,
        "bound to identity 'dataset:other-dataset', not 'dataset:breast-cancer'",
    ),
    ("identity-rewritten-in-header", _renamed_header, DecryptionError, "could not unwrap"),
]


@pytest.mark.parametrize(
    ("case", "mutate", "error", "message"), DECRYPT_CASES, ids=[c[0] for c in DECRYPT_CASES]
)
def test_bad_ciphertext_is_refused_at_decrypt_and_leaves_nothing_behind(
    tmp_path: Path,
    ring: LocalKeyring,
    spec: DatasetSpec,
    case: str,
    mutate: Mutation,
    error: type[BallastError],
    message: str,
) -> None:
    # Given a valid encrypted dataset, corrupted one way.
    good = encrypt_bytes(bundled_csv_bytes(), ring, dataset_identity(NAME), SEG)
    hsize = read_header(io.BytesIO(good)).size
    assert (len(good) - hsize) // (SEG + TAG) == 29, "30 segments, the last one short"
    bad, provider = mutate(good, hsize, ring, tmp_path)
    src = tmp_path / "datasets" / f"{NAME}.csv.enc"
    src.parent.mkdir()
    src.write_bytes(bad)
    quarantine = tmp_path / "state" / "quarantine.jsonl"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = _tree(tmp_path)

    # When the boundary loads it, and when the file is decrypted to disk.
    with pytest.raises(error, match=message) as info:
        load_validated(
            str(src), provider=provider, spec=spec, storage=LocalStorage(), quarantine=quarantine
        )
    with pytest.raises(error, match=message):
        decrypt_file(src, out_dir / "plain.csv", provider, dataset_identity(NAME))

    # Then the error is typed and names the decrypt stage, and nothing was written anywhere.
    assert info.value.stage == "decrypt"
    assert str(info.value).startswith("[decrypt] ")
    if error is DecryptionError:
        assert not isinstance(info.value, KeyNotFoundError)
    assert _tree(tmp_path) == before, "a refused object must leave no file behind"
    assert not quarantine.exists(), "only data that decrypted can be quarantined"


def test_missing_object_is_a_fetch_error(
    tmp_path: Path, ring: LocalKeyring, spec: DatasetSpec
) -> None:
    with pytest.raises(BallastError, match=r"^\[fetch\] .*no such file") as info:
        load_validated(str(tmp_path / "nope.enc"), provider=ring, spec=spec)
    assert info.value.stage == "fetch"
    assert not list(tmp_path.rglob("*.jsonl"))


def _write(tmp_path: Path, ring: LocalKeyring, plaintext: bytes) -> Path:
    path = tmp_path / "datasets" / f"{NAME}.csv.enc"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(encrypt_bytes(plaintext, ring, dataset_identity(NAME), SEG))
    return path


def test_valid_dataset_carries_both_lineage_hashes(
    tmp_path: Path, ring: LocalKeyring, spec: DatasetSpec
) -> None:
    plaintext = bundled_csv_bytes()
    path = _write(tmp_path, ring, plaintext)
    quarantine = tmp_path / "state" / "quarantine.jsonl"

    ds = load_validated(str(path), provider=ring, spec=spec, quarantine=quarantine)

    assert ds.ciphertext_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ds.sha256 == hashlib.sha256(plaintext).hexdigest()
    assert ds.ciphertext_sha256 != ds.sha256
    assert ds.report is not None and ds.report.ciphertext_sha256 == ds.ciphertext_sha256
    assert ds.validation_artifact_id is None, "only the Prefect task publishes the artifact"
    assert not quarantine.exists()


def test_failing_data_is_quarantined_before_the_error_propagates(
    tmp_path: Path, ring: LocalKeyring, spec: DatasetSpec
) -> None:
    # Given an encrypted dataset with an impossible value and a missing column.
    frame = bundled_frame().drop(columns=["worst_area"])
    frame.loc[4, "mean_radius"] = -3.0
    frame.loc[5, "mean_radius"] = -7.0  # the column's minimum: the only one an aggregate shows
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    plaintext = buf.getvalue().encode()
    path = _write(tmp_path, ring, plaintext)
    quarantine = tmp_path / "state" / "quarantine.jsonl"

    with pytest.raises(ExpectationsFailed, match=r"^\[validate\] ") as info:
        load_validated(str(path), provider=ring, spec=spec, quarantine=quarantine)

    (record,) = read_records(quarantine)
    assert info.value.quarantined is True
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o600
    assert record["dataset"] == NAME and record["uri"] == str(path)
    assert record["stage"] == "validate" and record["rows"] == 569
    assert record["ciphertext_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["sha256"] == hashlib.sha256(plaintext).hexdigest()
    failed = {(f["expectation"], f["column"]) for f in record["failed"]}
    assert ("expect_column_values_to_be_between", "mean_radius") in failed
    assert ("expect_table_columns_to_match_ordered_list", None) in failed
    assert ("expect_column_values_to_not_be_null", "worst_area") in failed
    assert record["time"].endswith("Z")
    assert len(record["failed"]) == len(info.value.report.failed) + len(info.value.report.notes)
    # Aggregates only, never raw values: the minimum (-7) may show, the other bad value never.
    dumped = json.dumps(record["failed"])
    assert "-7" in dumped, dumped
    assert "-3" not in dumped, "a raw value reached the quarantine record"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        ["keyring.json", "keyring.json.lock", f"{NAME}.csv.enc", "quarantine.jsonl"]
    ), "the quarantine record is the only thing a failure writes"


def test_empty_plaintext_is_refused_at_validate_and_quarantined(
    tmp_path: Path, ring: LocalKeyring, spec: DatasetSpec
) -> None:
    # A zero-length plaintext encrypts to a valid object (one empty final segment).
    path = _write(tmp_path, ring, b"")
    quarantine = tmp_path / "state" / "quarantine.jsonl"
    os.makedirs(quarantine.parent)
    quarantine.write_text('{"earlier": "record"}\n')
    os.chmod(quarantine, 0o644)

    with pytest.raises(ExpectationsFailed, match=r"^\[validate\] .*not readable CSV"):
        load_validated(str(path), provider=ring, spec=spec, quarantine=quarantine)

    earlier, record = read_records(quarantine)
    assert earlier == {"earlier": "record"}, "the log is append-only"
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o600, "a looser log is tightened"
    assert record["sha256"] == hashlib.sha256(b"").hexdigest()
    assert [f["expectation"] for f in record["failed"]] == ["parse_csv"]


def _symlinked(quarantine: Path) -> Callable[[], bool]:
    target = quarantine.parent / "elsewhere.jsonl"
    quarantine.parent.mkdir(parents=True)
    os.symlink(target, quarantine)
    return lambda: not target.exists()  # O_NOFOLLOW: the link is never followed


def _parent_is_a_file(quarantine: Path) -> Callable[[], bool]:
    quarantine.parent.write_text("not a folder\n")  # ENOTDIR, even for root
    return lambda: quarantine.parent.read_text() == "not a folder\n"


@pytest.mark.parametrize("break_log", [_symlinked, _parent_is_a_file])
def test_a_quarantine_log_that_cannot_be_written_leaves_the_typed_validation_error(
    tmp_path: Path,
    ring: LocalKeyring,
    spec: DatasetSpec,
    caplog: pytest.LogCaptureFixture,
    break_log: Callable[[Path], Callable[[], bool]],
) -> None:
    # Given failing data and a quarantine path that refuses the append.
    path = _write(tmp_path, ring, b"x" + bundled_csv_bytes())  # header 'xmean_radius'
    quarantine = tmp_path / "state" / "quarantine.jsonl"
    nothing_written = break_log(quarantine)

    with (
        caplog.at_level("WARNING", logger="ballast.ingest"),
        pytest.raises(ExpectationsFailed, match=r"^\[validate\] ") as info,
    ):
        load_validated(str(path), provider=ring, spec=spec, quarantine=quarantine)

    exc = info.value
    assert exc.__context__ is None, "the OSError must not be chained in or replace the error"
    (note,) = exc.__notes__
    assert note.startswith(f"the quarantine record was not written to {quarantine}: ")
    assert any("could not quarantine" in r.getMessage() for r in caplog.records)
    assert nothing_written()
    again = pickle.loads(pickle.dumps(exc))
    assert again.__notes__ == [note] and again.report == exc.report, "Prefect pickles errors"
    # What the CLI reads to say "quarantined" or not (it said "quarantined" regardless).
    assert exc.quarantined is False and again.quarantined is False


# -- small pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("s3://bucket/datasets/breast-cancer.csv.enc", "breast-cancer"),
        ("s3://bucket/breast-cancer", "breast-cancer"),
        ("/data/x/iris_v2.csv.enc", "iris_v2"),
        ("relative/wine.enc", "wine"),
        ("file:///srv/data/wine.csv.enc", "wine"),
        ("s3://bucket/wine.csv.enc#v1", "wine"),
        ("/data/iris.v2.csv.enc", "iris.v2"),  # what `data prepare` writes for that name
        ("s3://bucket/iris.v2.enc", "iris.v2"),
    ],
)
def test_dataset_name_comes_from_the_file_name(uri: str, name: str) -> None:
    assert dataset_name_from_uri(uri) == name


@pytest.mark.parametrize(
    # "run#2" is not a dataset name; a URL parser would have cut it to "run" without a word.
    "uri",
    [
        "s3://bucket/.hidden",
        "s3://bucket/dir/",
        "/data/-x.enc",
        "",
        "s3://b/run#2.csv.enc",
        "/data/a..b.csv.enc",  # settings refuse '..' in a name too
    ],
)
def test_unusable_file_names_ask_for_an_explicit_name(uri: str) -> None:
    with pytest.raises(ConfigError, match="pass --name"):
        dataset_name_from_uri(uri)


class _Trickle:
    """A source with only read(), returning at most 3 bytes a call."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.data[self.pos : self.pos + min(n, 3)]
        self.pos += len(chunk)
        return chunk


def test_hashing_reader_hashes_exactly_what_it_hands_out() -> None:
    data = os.urandom(1000)
    for inner in (io.BytesIO(data), _Trickle(data)):
        reader = HashingReader(inner)  # type: ignore[arg-type]  # read() is all it needs
        got = io.BufferedReader(reader, 64).read()
        assert got == data
        assert reader.hexdigest() == hashlib.sha256(data).hexdigest()
        assert reader.bytes_read == 1000


# -- `ballast data put/get` on local paths (the S3 path runs as processes in tests/integration) --


def test_cli_put_and_get_on_local_paths_bind_the_dataset_name(
    settings: Settings, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from ballast.cli import app

    runner = CliRunner()
    src = tmp_path / "plain.csv"
    src.write_bytes(bundled_csv_bytes())
    enc = tmp_path / "store" / "breast-cancer.csv.enc"
    renamed = tmp_path / "store" / "other.csv.enc"

    put = runner.invoke(app, ["data", "put", str(src), str(enc)])
    assert put.exit_code == 0, put.output
    assert read_header(io.BytesIO(enc.read_bytes())).identity == "dataset:breast-cancer"
    renamed.write_bytes(enc.read_bytes())
    got = runner.invoke(app, ["data", "get", str(enc), str(tmp_path / "out" / "a.csv")])
    bad = runner.invoke(app, ["data", "get", str(renamed), str(tmp_path / "out" / "b.csv")])

    assert got.exit_code == 0, got.output
    assert (tmp_path / "out" / "a.csv").read_bytes() == bundled_csv_bytes()
    assert bad.exit_code == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.csv"], "nothing from b"

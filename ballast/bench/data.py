"""``ballast bench data``: decrypt throughput, peak memory, and validation throughput.

Three parts, each measured side by side in one run:

1. **Decrypt throughput per core** (default 64 MiB and 1 GiB): Ballast's streaming decrypt from a
   file, one-shot ``AESGCM`` on the same plaintext held in memory, and a plain read of the same
   file (page cache warm: this is the floor any file-based decrypt pays). Per core = bytes divided
   by the process's CPU seconds (all three are single-threaded); wall-clock rates are shown too.
2. **Peak RSS** of encrypt and of decrypt (default 10 MiB, 1 GiB, 5 GiB), each in a fresh child
   process so the high-water mark belongs to that stream alone; the decrypt child also checks the
   plaintext's sha256. Data is generated on the fly, written under a temp dir, deleted after.
3. **Validation throughput** of the default suite (default 1M and 10M rows), rows per second per
   core for the gate as shipped (every check on every row + Great Expectations on a bounded
   sample), with its two engines timed apart; and, at ``--ge-baseline-rows``, the gate as it was
   before (Great Expectations on the whole frame, suite built one expectation at a time), with
   Great Expectations' cost per expectation type.

    ballast bench data                 # full run (needs ~6 GiB free disk, ~4 GiB RAM)
    ballast bench data --quick --json  # small sizes; last stdout line is one JSON object
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ballast.argtypes import at_least, counts, existing_folder

if TYPE_CHECKING:
    import pandas as pd
    from _typeshed import ReadableBuffer, WriteableBuffer

MiB = 1 << 20
GiB = 1 << 30
IDENTITY = "bench:data"
_UNITS = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB}


def parse_size(text: str) -> int:
    """``64M`` → 67108864 (binary units K, M, G; a bare number is bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 64M, 1G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _sizes(text: str) -> list[int]:
    return [parse_size(t) for t in text.split(",") if t.strip()]


def human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= size and n % (size // 16) == 0:
            return f"{n / size:g} {unit}"
    return f"{n:,} B"


# -- data generation ------------------------------------------------------------------------------


class Generated(io.RawIOBase):
    """``size`` pseudo-random bytes made on the fly (a random MiB block, re-keyed each MiB)."""

    def __init__(self, size: int, on_bytes: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self._left = size
        self._block = os.urandom(MiB)
        self._pos = 0
        self._on_bytes = on_bytes
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), self._left, MiB - self._pos)
        view[:n] = self._block[self._pos : self._pos + n]
        self.sha256.update(view[:n])
        self._pos += n
        self._left -= n
        if self._pos == MiB:
            self._pos = 0
            self._block = hashlib.sha512(self._block[:64]).digest() * (MiB // 64)
        if self._on_bytes is not None:
            self._on_bytes(n)
        return n


class Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: ReadableBuffer) -> int:
        return memoryview(b).nbytes


def _binary(stream: io.RawIOBase | io.BytesIO) -> BinaryIO:
    # The crypto API is typed for BinaryIO; these streams offer the read/readinto/write it uses.
    return cast(BinaryIO, stream)


@dataclass
class Timing:
    wall_s: float
    cpu_s: float


@contextmanager
def timed() -> Iterator[Timing]:
    t = Timing(0.0, 0.0)
    w0, c0 = time.perf_counter(), time.process_time()
    yield t
    t.wall_s = time.perf_counter() - w0
    t.cpu_s = time.process_time() - c0


def _best(fn: Callable[[], None], repeat: int) -> Timing:
    best: Timing | None = None
    for _ in range(max(1, repeat)):
        with timed() as t:
            fn()
        if best is None or t.cpu_s < best.cpu_s:
            best = t
    assert best is not None
    return best


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else float("inf")


# -- 1. decrypt throughput ------------------------------------------------------------------------


@dataclass
class DecryptRow:
    size_bytes: int
    file_read_mib_s_per_core: float
    file_read_mib_s_wall: float
    stream_decrypt_mib_s_per_core: float
    stream_decrypt_mib_s_wall: float
    oneshot_aesgcm_mib_s_per_core: float | None
    oneshot_aesgcm_mib_s_wall: float | None


def bench_decrypt(size: int, work: Path, repeat: int, progress: Progress) -> DecryptRow:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from ballast.crypto import EncryptingWriter, LocalKeyring, decrypt_stream

    ring = LocalKeyring(work / "keys" / "keyring.json")
    if not ring.key_ids():
        ring.create_key()
    task = progress.add_task(f"generate + encrypt {human(size)}", total=size)
    src = Generated(size, lambda n: progress.advance(task, n))
    plaintext = bytearray(size)
    view, filled = memoryview(plaintext), 0
    while filled < size:
        filled += src.readinto(view[filled:])
    view.release()
    enc = work / "throughput.enc"
    with open(enc, "wb") as fh, EncryptingWriter(fh, ring, IDENTITY) as writer:
        writer.write(plaintext)  # from the buffer itself: no copy of the plaintext
    progress.remove_task(task)

    buf = bytearray(MiB)

    def read_file() -> None:
        with open(enc, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass

    def stream_decrypt() -> None:
        with open(enc, "rb") as fh:
            decrypt_stream(fh, _binary(Null()), ring, IDENTITY)

    read_file()  # warm the page cache: every row then reads from memory
    t_read = _best(read_file, repeat)
    t_stream = _best(stream_decrypt, repeat)

    oneshot: Timing | None = None
    if size < (1 << 31) - 16:  # AESGCM's one-shot limit
        key, nonce = AESGCM.generate_key(256), os.urandom(12)
        aead = AESGCM(key)
        sealed = aead.encrypt(nonce, plaintext, None)
        out = bytearray(size)

        def oneshot_decrypt() -> None:
            aead.decrypt_into(nonce, sealed, None, out)

        oneshot = _best(oneshot_decrypt, repeat)
        if out != plaintext:
            raise SystemExit("one-shot AESGCM round trip failed")
        del sealed, out
    enc.unlink()
    del plaintext
    return DecryptRow(
        size_bytes=size,
        file_read_mib_s_per_core=_rate(size, t_read.cpu_s),
        file_read_mib_s_wall=_rate(size, t_read.wall_s),
        stream_decrypt_mib_s_per_core=_rate(size, t_stream.cpu_s),
        stream_decrypt_mib_s_wall=_rate(size, t_stream.wall_s),
        oneshot_aesgcm_mib_s_per_core=_rate(size, oneshot.cpu_s) if oneshot else None,
        oneshot_aesgcm_mib_s_wall=_rate(size, oneshot.wall_s) if oneshot else None,
    )


# -- 2. peak RSS in child processes ---------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import hashlib, io, json, os, resource, sys, time
    from pathlib import Path
    from ballast.bench.data import Generated, Null
    from ballast.crypto import LocalKeyring, decrypt_stream, encrypt_stream

    mode, keyring, path, size = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    ring = LocalKeyring(Path(keyring))

    def kb(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    try:  # Linux: reset the high-water mark so the peak covers the stream, not the imports
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base, peak = kb("VmRSS"), lambda: kb("VmHWM")
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t0 = time.perf_counter()
    if mode == "encrypt":
        src = Generated(size)
        with open(path, "wb") as out:
            encrypt_stream(src, out, ring, "bench:data")
        digest = src.sha256.hexdigest()
    else:
        class Hashing(Null):
            h = hashlib.sha256()
            def write(self, b):
                self.h.update(b)
                return memoryview(b).nbytes
        sink = Hashing()
        with open(path, "rb") as fh:
            decrypt_stream(fh, sink, ring, "bench:data")
        digest = sink.h.hexdigest()
    print(json.dumps({"base_kib": base, "peak_kib": peak(), "seconds": time.perf_counter() - t0,
                      "sha256": digest}))
    """
)


@dataclass
class RssRow:
    size_bytes: int
    encrypt_peak_rss_mib: float
    encrypt_growth_mib: float
    decrypt_peak_rss_mib: float
    decrypt_growth_mib: float
    decrypt_seconds: float
    verified: bool


def _child(mode: str, keyring: Path, path: Path, size: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(keyring), str(path), str(size)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def bench_rss(size: int, work: Path) -> RssRow:
    from ballast.crypto import LocalKeyring

    ring = LocalKeyring(work / "keys" / "keyring.json")
    if not ring.key_ids():
        ring.create_key()
    path = work / f"rss-{size}.enc"
    try:
        enc = _child("encrypt", ring.path, path, size)
        dec = _child("decrypt", ring.path, path, size)
    finally:
        path.unlink(missing_ok=True)
    return RssRow(
        size_bytes=size,
        encrypt_peak_rss_mib=enc["peak_kib"] / 1024,
        encrypt_growth_mib=max(0, enc["peak_kib"] - enc["base_kib"]) / 1024,
        decrypt_peak_rss_mib=dec["peak_kib"] / 1024,
        decrypt_growth_mib=max(0, dec["peak_kib"] - dec["base_kib"]) / 1024,
        decrypt_seconds=float(dec["seconds"]),
        verified=enc["sha256"] == dec["sha256"],
    )


# -- 3. validation throughput ---------------------------------------------------------------------


def synthetic_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """``rows`` rows shaped like the bundled dataset: bundled rows resampled, every feature
    jittered by up to ±1 % (so rows stay distinct and inside the spec's ranges)."""
    import numpy as np
    import pandas as pd

    from ballast.data import LABEL, bundled_frame

    base = bundled_frame()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), rows)
    columns: dict[str, np.ndarray] = {}
    for col in base.columns:
        values = base[col].to_numpy()[idx]
        if col != LABEL:  # one column at a time keeps the peak near the frame's own size
            values = values * rng.uniform(0.99, 1.01, rows)
        columns[col] = values
    return pd.DataFrame(columns)


@dataclass
class ValidationRow:
    rows: int
    gate_seconds_cpu: float
    gate_seconds_wall: float
    gate_rows_s_per_core: float
    every_row_seconds_cpu: float
    every_row_rows_s_per_core: float
    ge_seconds_cpu: float
    ge_rows: int
    expectations: int
    passed: bool


def warm_up_validation() -> float:
    """Import Great Expectations and validate the bundled data once; returns the seconds.
    Keeps one-time import and first-use costs out of the throughput figures."""
    from ballast.data import bundled_frame, bundled_spec
    from ballast.validation import validate_frame

    with timed() as t:
        import great_expectations  # noqa: F401

        _quiet_ge()
        validate_frame(bundled_frame(), bundled_spec())
    return t.wall_s


def _quiet_ge() -> None:
    # Great Expectations logs at INFO (one module even forces it); the figures are the output.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)


def bench_validation(rows: int, progress: Progress) -> ValidationRow:
    from ballast.data import bundled_spec
    from ballast.validation import (
        evaluate_all_rows,
        ge_rows,
        run_great_expectations,
        suite_checks,
        validate_frame,
    )

    spec = bundled_spec()
    task = progress.add_task(f"validate {rows:,} rows", total=None)
    frame = synthetic_frame(rows)
    checks = suite_checks(spec)
    with timed() as gate:
        report = validate_frame(frame, spec)
    # The two engines apart (same work validate_frame does, timed separately).
    with timed() as every:
        outcomes = evaluate_all_rows(frame, checks)
    picked = ge_rows(len(frame), (o.offenders for o in outcomes), max(20_000, spec.min_rows))
    sample = frame if picked is None else frame.take(picked)
    with timed() as ge:
        run_great_expectations(sample, checks, spec.name)
    progress.remove_task(task)
    return ValidationRow(
        rows=rows,
        gate_seconds_cpu=gate.cpu_s,
        gate_seconds_wall=gate.wall_s,
        gate_rows_s_per_core=rows / gate.cpu_s,
        every_row_seconds_cpu=every.cpu_s,
        every_row_rows_s_per_core=rows / every.cpu_s,
        ge_seconds_cpu=ge.cpu_s,
        ge_rows=len(sample),
        expectations=len(report.results),
        passed=report.success,
    )


@dataclass
class GeBaseline:
    rows: int
    suite_build_incremental_s: float  # the old code: suite.add_expectation() per expectation
    suite_build_at_once_s: float
    whole_frame_run_s_cpu: float  # GE on every row, result_format SUMMARY (the old default)
    whole_frame_rows_s_per_core: float  # build + run, as the old gate paid it
    per_type_s_cpu: dict[str, float]  # one suite per expectation type, on every row


def bench_ge_baseline(rows: int, progress: Progress) -> GeBaseline:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from ballast.data import bundled_spec
    from ballast.validation import suite_checks, to_gx

    _quiet_ge()
    spec = bundled_spec()
    frame = synthetic_frame(rows)
    checks = suite_checks(spec)
    task = progress.add_task(f"Great Expectations on all {rows:,} rows", total=None)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        ctx.data_sources.add_pandas(name="bench")
        .add_dataframe_asset(name="frame")
        .add_batch_definition_whole_dataframe("whole")
    )
    counter = iter(range(1_000_000))

    def suite_of(selected: list[Any], incremental: bool) -> Any:
        name = f"suite-{next(counter)}"
        if incremental:
            suite = ctx.suites.add(gx.ExpectationSuite(name=name))
            for c in selected:
                suite.add_expectation(to_gx(c))
            return suite
        return ctx.suites.add(
            gx.ExpectationSuite(name=name, expectations=[to_gx(c) for c in selected])
        )

    def run(suite: Any) -> None:
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"vd-{next(counter)}", data=batch, suite=suite)
        )
        vd.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY")

    with timed() as build_inc:
        suite = suite_of(list(checks), incremental=True)
    with timed() as build_once:
        suite_of(list(checks), incremental=False)
    with timed() as whole:
        run(suite)
    per_type: dict[str, float] = {}
    for kind in dict.fromkeys(c.expectation for c in checks):
        selected = [c for c in checks if c.expectation == kind]
        s = suite_of(selected, incremental=False)
        with timed() as t:
            run(s)
        per_type[f"{selected[0].type} x{len(selected)}"] = t.cpu_s
    progress.remove_task(task)
    return GeBaseline(
        rows=rows,
        suite_build_incremental_s=build_inc.cpu_s,
        suite_build_at_once_s=build_once.cpu_s,
        whole_frame_run_s_cpu=whole.cpu_s,
        whole_frame_rows_s_per_core=rows / (build_inc.cpu_s + whole.cpu_s),
        per_type_s_cpu=per_type,
    )


# -- main -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ballast bench data", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--decrypt-sizes", type=_sizes, default=None, help="default 64M,1G")
    p.add_argument("--rss-sizes", type=_sizes, default=None, help="default 10M,1G,5G")
    p.add_argument(
        "--rows",
        type=counts(lambda t: int(float(t)), skip_empty=True),
        default=None,
        help="default 1000000,10000000",
    )
    p.add_argument(
        "--ge-baseline-rows",
        type=int,
        default=None,
        help="rows for the whole-frame Great Expectations baseline (0 skips; default 1000000)",
    )
    p.add_argument("--repeat", type=at_least(1), default=3, help="best of N for throughput timings")
    p.add_argument(
        "--dir", type=existing_folder, default=None, help="work directory (default: a temp dir)"
    )
    p.add_argument(
        "--skip", default="", help="comma list of parts to skip: decrypt,rss,validation,baseline"
    )
    return p


def _defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    if args.decrypt_sizes is None:
        args.decrypt_sizes = [8 * MiB, 64 * MiB] if quick else [64 * MiB, GiB]
    if args.rss_sizes is None:
        args.rss_sizes = [10 * MiB, 256 * MiB] if quick else [10 * MiB, GiB, 5 * GiB]
    if args.rows is None:
        args.rows = [100_000, 1_000_000] if quick else [1_000_000, 10_000_000]
    if args.ge_baseline_rows is None:
        args.ge_baseline_rows = 100_000 if quick else 1_000_000


def _disk_check(work: Path, sizes: list[int], console: Console) -> list[int]:
    free = shutil.disk_usage(work).free
    keep = [s for s in sizes if s * 1.01 + GiB < free]
    for s in sorted(set(sizes) - set(keep)):
        console.print(f"[yellow]skipping {human(s)}: only {human(free)} free under {work}[/]")
    return keep


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _defaults(args)
    _quiet_ge()  # before its import too: some of its modules log while importing
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out = Console()
    err = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="ballast-bench-data-", dir=args.dir))
    result: dict[str, Any] = {
        "machine": _machine(),
        "command": "ballast bench data " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    try:
        with Progress(
            TextColumn("{task.description:<40}"),
            BarColumn(),
            TransferSpeedColumn(),
            console=err,
            transient=True,
        ) as progress:
            if "decrypt" not in skip:
                sizes = _disk_check(work, args.decrypt_sizes, err)
                result["decrypt"] = [
                    asdict(bench_decrypt(s, work, args.repeat, progress)) for s in sizes
                ]
            if "rss" not in skip:
                sizes = _disk_check(work, args.rss_sizes, err)
                rss = []
                for s in sizes:
                    task = progress.add_task(f"peak RSS {human(s)} (child processes)", total=None)
                    rss.append(asdict(bench_rss(s, work)))
                    progress.remove_task(task)
                result["rss"] = rss
            if "validation" not in skip:
                task = progress.add_task("import Great Expectations, warm up", total=None)
                result["validation_warm_up_s"] = warm_up_validation()
                progress.remove_task(task)
                result["validation"] = [asdict(bench_validation(n, progress)) for n in args.rows]
            if "baseline" not in skip and args.ge_baseline_rows > 0:
                result["ge_baseline"] = asdict(bench_ge_baseline(args.ge_baseline_rows, progress))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print_tables(result, out)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def _machine() -> dict[str, Any]:
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
    }


def _f(x: float | None, fmt: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> Table:
    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 and not rows[0][0][0].isdigit() else "right")
    for row in rows:
        t.add_row(*row)
    return t


def _print_tables(r: dict[str, Any], console: Console) -> None:
    if r.get("decrypt"):
        rows = [
            [
                human(x["size_bytes"]),
                _f(x["file_read_mib_s_per_core"]),
                _f(x["stream_decrypt_mib_s_per_core"]),
                _f(x["oneshot_aesgcm_mib_s_per_core"]),
                f"{_f(x['stream_decrypt_mib_s_wall'])} / {_f(x['oneshot_aesgcm_mib_s_wall'])}",
            ]
            for x in r["decrypt"]
        ]
        console.print(
            _table(
                "Decrypt, MiB/s per core (per CPU-second; page cache warm)",
                ("size", "file read", "Ballast stream", "one-shot AESGCM", "wall stream/1-shot"),
                rows,
            )
        )
    if r.get("rss"):
        rows = [
            [
                human(x["size_bytes"]),
                _f(x["encrypt_peak_rss_mib"], ".1f"),
                _f(x["encrypt_growth_mib"], ".1f"),
                _f(x["decrypt_peak_rss_mib"], ".1f"),
                _f(x["decrypt_growth_mib"], ".1f"),
                _f(x["decrypt_seconds"], ".2f"),
                "yes" if x["verified"] else "NO",
            ]
            for x in r["rss"]
        ]
        console.print(
            _table(
                "Peak RSS, MiB (fresh process; growth = while streaming)",
                ("size", "enc peak", "enc growth", "dec peak", "dec growth", "dec s", "sha ok"),
                rows,
            )
        )
    if r.get("validation"):
        rows = [
            [
                f"{x['rows']:,}",
                _f(x["gate_rows_s_per_core"]),
                _f(x["gate_seconds_cpu"], ".2f"),
                _f(x["every_row_seconds_cpu"], ".2f"),
                _f(x["ge_seconds_cpu"], ".2f"),
                f"{x['ge_rows']:,}",
                "yes" if x["passed"] else "NO",
            ]
            for x in r["validation"]
        ]
        console.print(
            _table(
                "Validation gate, default suite (rows per CPU-second)",
                ("rows", "rows/s/core", "CPU s", "every-row s", "GE s", "GE rows", "ok"),
                rows,
            )
        )
    if r.get("ge_baseline"):
        b = r["ge_baseline"]
        rows = [
            [
                "build suite: add_expectation() one by one (old)",
                _f(b["suite_build_incremental_s"], ".2f"),
            ],
            ["build suite: all expectations at once (new)", _f(b["suite_build_at_once_s"], ".2f")],
            ["run the whole suite on every row (SUMMARY)", _f(b["whole_frame_run_s_cpu"], ".2f")],
            ["old gate (build + run): rows/s/core", _f(b["whole_frame_rows_s_per_core"])],
        ]
        rows += [
            [f"  only {kind}", _f(secs, ".2f")]
            for kind, secs in sorted(b["per_type_s_cpu"].items(), key=lambda kv: -kv[1])
        ]
        console.print(
            _table(
                f"Before: Great Expectations on all {b['rows']:,} rows, CPU s", ("what", "s"), rows
            )
        )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

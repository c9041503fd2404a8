"""Throughput and peak memory of Ballast's streaming encryption.

Generates a plaintext file (default 256 MiB), then times: a plain file copy (the disk baseline),
``encrypt_file``-equivalent and ``decrypt_file``-equivalent file→file runs (temp file, fsync,
rename), and in-memory stream runs with no disk at all. Peak memory is the growth of the resident
set over each phase (Linux: the kernel's high-water mark, reset per phase).

    .venv/bin/python benchmarks/crypto_bench.py --size-mib 256
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Table

from ballast.crypto import DEFAULT_SEGMENT_SIZE, LocalKeyring, decrypt_stream, encrypt_stream
from ballast.storage import atomic_write

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

MiB = 1 << 20
IDENTITY = "bench:crypto"


def _vm_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak RSS growth over a block. Linux resets the high-water mark (clear_refs 5) per phase;
    elsewhere ru_maxrss only shows growth beyond the process's earlier peak."""

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._linux = _vm_kb("VmRSS") is not None
        except OSError:
            self._linux = False
        self._base = _vm_kb("VmRSS") if self._linux else _maxrss_kb()
        self.delta_mib = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _vm_kb("VmHWM") if self._linux else _maxrss_kb()
        self.delta_mib = max(0, (peak or 0) - (self._base or 0)) / 1024


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Counting(io.RawIOBase):
    """Passes reads through and reports progress."""

    def __init__(self, inner: BinaryIO, on_bytes: Callable[[int], None]) -> None:
        super().__init__()
        self._inner = inner
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        view = memoryview(b).cast("B")
        data = self._inner.read(len(view))
        view[: len(data)] = data
        self._on_bytes(len(data))
        return len(data)


class Generated(io.RawIOBase):
    """``size`` pseudo-random bytes made on the fly (a 1 MiB random block, re-keyed each MiB)."""

    def __init__(self, size: int, on_bytes: Callable[[int], None]) -> None:
        super().__init__()
        self._left = size
        self._block = os.urandom(MiB)
        self._pos = 0
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, b: WriteableBuffer) -> int:
        view = memoryview(b).cast("B")
        n = min(len(view), self._left, MiB - self._pos)
        view[:n] = self._block[self._pos : self._pos + n]
        self._pos += n
        self._left -= n
        if self._pos == MiB:
            self._pos = 0
            self._block = hashlib.sha512(self._block[:64]).digest() * (MiB // 64)
        self._on_bytes(n)
        return n


class Null(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: ReadableBuffer) -> int:
        return memoryview(b).nbytes


@dataclass
class Row:
    name: str
    mib: float
    seconds: float
    peak_mib: float

    @property
    def rate(self) -> float:
        return self.mib / self.seconds if self.seconds else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="plaintext size (MiB)")
    parser.add_argument("--segment-size", type=int, default=DEFAULT_SEGMENT_SIZE)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp)")
    args = parser.parse_args()
    size = args.size_mib * MiB
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="ballast-bench-", dir=args.dir))
    rows: list[Row] = []
    try:
        ring = LocalKeyring(work / "keys" / "keyring.json")
        ring.create_key()
        plain, enc, dec, copy = (work / n for n in ("plain.bin", "enc.bin", "dec.bin", "copy.bin"))
        with Progress(
            TextColumn("{task.description:<26}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TransferSpeedColumn(),
            console=console,
        ) as progress:

            def phase(name: str, fn: Callable[[Callable[[int], None]], None]) -> None:
                task: TaskID = progress.add_task(name, total=size)

                def advance(n: int) -> None:
                    progress.advance(task, n)

                with PeakMemory() as mem:
                    t0 = time.perf_counter()
                    fn(advance)
                    seconds = time.perf_counter() - t0
                rows.append(Row(name, size / MiB, seconds, mem.delta_mib))

            def generate(advance: Callable[[int], None]) -> None:
                with open(plain, "wb") as out:
                    shutil.copyfileobj(Generated(size, advance), out, MiB)

            def copy_file(advance: Callable[[int], None]) -> None:
                with open(plain, "rb") as src, atomic_write(copy) as out:
                    shutil.copyfileobj(Counting(src, advance), out, MiB)

            def encrypt_file(advance: Callable[[int], None]) -> None:
                with open(plain, "rb") as src, atomic_write(enc) as out:
                    encrypt_stream(
                        _binary(Counting(src, advance)), out, ring, IDENTITY, args.segment_size
                    )

            def decrypt_file(advance: Callable[[int], None]) -> None:
                with open(enc, "rb") as src, atomic_write(dec) as out:
                    decrypt_stream(_binary(Counting(src, advance)), out, ring, IDENTITY)

            def encrypt_mem(advance: Callable[[int], None]) -> None:
                src = _binary(Generated(size, advance))
                encrypt_stream(src, _binary(Null()), ring, IDENTITY, args.segment_size)

            phase("generate plaintext (disk)", generate)
            phase("copy file (baseline)", copy_file)
            phase("encrypt file→file", encrypt_file)
            phase("decrypt file→file", decrypt_file)
            phase("encrypt stream (no disk)", encrypt_mem)
            with open(enc, "rb") as fh:
                encrypted = fh.read()  # staged in memory before timing: disk is not measured

            def decrypt_mem(advance: Callable[[int], None]) -> None:
                src = Counting(_binary(io.BytesIO(encrypted)), advance)
                decrypt_stream(_binary(src), _binary(Null()), ring, IDENTITY)

            phase("decrypt stream (no disk)", decrypt_mem)
            encrypted = b""  # release it before the summary
        if _sha256(dec) != _sha256(plain):
            raise SystemExit("decrypted file differs from the plaintext")
        overhead = enc.stat().st_size - size
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(
        title=f"Ballast crypto: {args.size_mib} MiB, {args.segment_size // 1024} KiB segments"
    )
    table.add_column("phase")
    table.add_column("MiB", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("MiB/s", justify="right")
    table.add_column("peak RSS growth (MiB)", justify="right")
    for r in rows:
        table.add_row(
            r.name, f"{r.mib:.0f}", f"{r.seconds:.3f}", f"{r.rate:,.0f}", f"{r.peak_mib:.1f}"
        )
    console.print(table)
    console.print(f"ciphertext overhead: {overhead} bytes; roundtrip verified (sha256)")
    console.print(f"cpus: {os.cpu_count()}")


def _binary(stream: io.RawIOBase | io.BytesIO) -> BinaryIO:
    # The crypto API is typed for BinaryIO; these streams offer the read/readinto/write it uses.
    return cast(BinaryIO, stream)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    main()

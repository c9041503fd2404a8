"""Failed inference requests as JSON log lines, bounded per version and second.

Every non-2xx answer of ``/v1`` predict and ``/v2`` infer gives one line (event
``request.failed``) carrying its request id, model, version, role, replica, route, status and
reason, so a failure can be found from the id a client saw and localised to a version and a
replica (:mod:`ballast.localise`). A faulty version at thousands of requests a second must not
flood the log: each (model, version) key gets at most ``per_second`` lines per wall-clock second;
the rest are counted, and when the second is over one ``request.failures_suppressed`` line says
how many, by status and reason (``counts``: ``[[status, reason, n], ...]``). Lines and suppressed counts together always add up to every
failure.

The first lines of a burst are the ones kept: they are what localisation needs (the first
failure, its neighbours). Pure apart from ``emit`` and ``clock``, both injected.

:class:`FailureFiles` also keeps a routed request's lines (and summaries) in a file per replica
under the state folder, for ``GET /admin/failures``: in a Kubernetes pod the log goes to
stdout, where a watchdog run cannot read it, and every replica of the pod shares the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["EVENT_FAILED", "EVENT_SUPPRESSED", "FailureFiles", "FailureLog"]

logger = logging.getLogger("ballast.gateway")

EVENT_FAILED = "request.failed"
EVENT_SUPPRESSED = "request.failures_suppressed"
# Requests refused before any version was chosen (unknown model, malformed body) share one key.
_UNROUTED = "-"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass(slots=True)
class _Window:
    second: int
    logged: int = 0
    suppressed: int = 0
    first_suppressed: float = 0.0
    last_suppressed: float = 0.0
    counts: Counter[tuple[int, str]] = field(default_factory=Counter)  # (status, reason)
    roles: Counter[str] = field(default_factory=Counter)


class FailureLog:
    """``record(...)`` per failed request; ``flush()`` about once a second (and at shutdown)."""

    def __init__(
        self,
        emit: Callable[[dict[str, Any]], None],
        *,
        replica: str,
        per_second: int = 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if per_second < 1:
            raise ValueError("per_second must be >= 1")
        self._emit = emit
        self._replica = replica
        self._per_second = per_second
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self.failures = 0  # every failure recorded, logged or not
        self.lines = 0  # request.failed lines emitted

    def record(
        self,
        *,
        request_id: str,
        model: str | None,
        version: str | None,
        role: str | None,
        route: str,
        status: int,
        reason: str,
        error: str | None = None,
    ) -> None:
        now = self._clock()
        second = int(now)
        # The model a client asked for is not trusted as a key (unbounded): only a routed
        # request's (model, version) is.
        key = (model or _UNROUTED, version) if version is not None else (_UNROUTED, _UNROUTED)
        window = self._windows.get(key)
        if window is None or window.second != second:
            if window is not None:
                self._summarise(key, window)
            window = self._windows[key] = _Window(second)
        self.failures += 1
        if window.logged < self._per_second:
            window.logged += 1
            self.lines += 1
            line: dict[str, Any] = {
                "ts": _iso(now),
                "event": EVENT_FAILED,
                "request_id": request_id,
                "model": model,
                "version": version,
                "role": role,
                "replica": self._replica,
                "route": route,
                "status": status,
                "reason": reason,
            }
            if error:
                line["error"] = error[:300]
            self._emit(line)
            return
        if not window.suppressed:
            window.first_suppressed = now
        window.suppressed += 1
        window.last_suppressed = now
        window.counts[(status, reason)] += 1
        if role is not None:
            window.roles[role] += 1

    def flush(self, *, final: bool = False) -> None:
        """Summarise every second that is over (every one, when ``final``) and forget it."""
        second = int(self._clock())
        for key, window in list(self._windows.items()):
            if final or window.second != second:
                self._summarise(key, window)
                del self._windows[key]

    def _summarise(self, key: tuple[str, str], window: _Window) -> None:
        if not window.suppressed:
            return
        model, version = key
        self._emit(
            {
                "ts": _iso(window.last_suppressed),
                "event": EVENT_SUPPRESSED,
                "model": None if model == _UNROUTED else model,
                "version": None if version == _UNROUTED else version,
                "role": window.roles.most_common(1)[0][0] if window.roles else None,
                "replica": self._replica,
                "first_ts": _iso(window.first_suppressed),
                "logged": window.logged,
                "suppressed": window.suppressed,
                "reasons": dict(_sum_by(window.counts, 1)),
                "statuses": {str(k): v for k, v in _sum_by(window.counts, 0).items()},
                # Both together, so a reader can keep only server errors, say.
                "counts": [[st, r, n] for (st, r), n in sorted(window.counts.items())],
            }
        )


def _sum_by(counts: Counter[tuple[int, str]], index: int) -> Counter[Any]:
    out: Counter[Any] = Counter()
    for k, n in counts.items():
        out[k[index]] += n
    return out


class _Lines:
    """Appends lines to ``path``, moving it to ``path.1`` (one old file kept) before a line
    would take it past ``max_bytes``; reopens a file removed under it. Used by one thread.

    Not logging's RotatingFileHandler: logging.shutdown() takes every handler's lock at exit,
    and a writer stuck on a stalled disk holds that lock, so the process could never exit.
    Unbuffered: one write per line, nothing left to flush at close.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fh: Any = None
        self._size = 0
        self.handled = 0  # lines given to write(), written or not
        self.failed = 0  # lines that could not be written
        self._cut = False  # the file ends in part of a line

    def write(self, line: bytes) -> None:
        written = 0
        try:
            if self._fh is not None and not os.path.exists(self.path):
                # Removed under us (a peer's sweep after a quiet day, an operator): reopen, or
                # every later line would go to a file nobody can read.
                self.close()
            if self._fh is None:
                self._open()
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            if self._cut:  # the last line was cut short by a failed write: end it first
                line = b"\n" + line
            view = memoryview(line)
            while written < len(line):  # unbuffered writes may be short (a disk filling up)
                n = self._fh.write(view[written:])
                if not n:
                    raise OSError("no byte written")
                written += n
                self._size += n
            self._cut = False
        except OSError as exc:
            self._cut = self._cut or 0 < written < len(line)
            self.failed += 1
            if self.failed == 1:
                logger.warning(
                    json.dumps(
                        {
                            "event": "failure_file.unwritable",
                            "path": str(self.path),
                            "error": str(exc),
                        }
                    )
                )
            self.close()
        finally:
            self.handled += 1

    def _rotate(self) -> None:
        self.close()
        try:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        except OSError:
            # No old file to be had (".1" a folder, say): start the file again rather than
            # fail every later line.
            open(self.path, "wb").close()
        self._cut = False
        self._open()

    def _open(self) -> None:
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held across lines
        self._size = os.fstat(self._fh.fileno()).st_size

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()


class FailureFiles:
    """Failure lines of routed requests in ``folder/<replica>.jsonl``, the same JSON the log
    gets, for :func:`ballast.localise.localise` to read back.

    Bounded on disk: at ``max_bytes`` the file rotates to ``<replica>.jsonl.1`` (one old file
    kept), and :meth:`sweep` (at start, then every few minutes) removes any file untouched for
    ``keep_s`` (replicas long gone) and the oldest beyond ``max_files``.
    Lines of requests refused before routing (no version) are not kept: a flood of malformed
    requests must not rotate a failing version's lines away.

    :meth:`write` only queues the line: a thread of its own (started by the first line) writes
    it, so a stalled disk never stalls the event loop that serves requests. Beyond
    ``queue_lines`` waiting lines more are dropped and counted in :attr:`lost`. Call
    :meth:`write` from one thread.
    """

    PATTERNS = ("*.jsonl", "*.jsonl.1")

    def __init__(
        self,
        folder: Path,
        replica: str,
        *,
        max_bytes: int = 4 << 20,
        keep_s: float = 86_400.0,
        max_files: int = 64,
        queue_lines: int = 10_000,
    ) -> None:
        if max_bytes < 1024 or keep_s <= 0 or max_files < 2 or queue_lines < 1:
            raise ValueError(
                "max_bytes must be >= 1024, keep_s > 0, max_files >= 2 and queue_lines >= 1"
            )
        self.folder = Path(folder)
        self.keep_s = keep_s
        self.max_files = max_files
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", replica)[:120] or "replica"
        self.path = self.folder / f"{safe}.jsonl"
        # Opened at the first line: a replica that never fails writes no file.
        self._lines = _Lines(self.path, max_bytes)
        # Not logging's QueueListener: its stop() waits without a bound for the thread, which a
        # stalled disk would turn into a shutdown that never ends.
        self._queue: queue.Queue[bytes | object] = queue.Queue(maxsize=queue_lines)
        self._writer: threading.Thread | None = None
        # The stop marker of the close() in progress; older ones (left by a close that gave up
        # on a stuck writer) are ignored, so they never end a writer that still has lines.
        self._stop: object | None = None
        self.queued = 0  # lines given to the writer (written, failed or still waiting)
        self.dropped = 0  # lines refused because the queue was full

    def sweep(self, now: float | None = None) -> int:
        """Create the folder; remove files untouched for ``keep_s``, then the oldest beyond
        ``max_files`` (never this replica's own). Returns how many were removed. Replicas
        restarted again and again (each a new name) must not fill the disk within a day."""
        self.folder.mkdir(parents=True, exist_ok=True)
        cutoff = (time.time() if now is None else now) - self.keep_s
        own = {self.path, self.path.with_name(self.path.name + ".1")}
        removed = 0
        aged: list[tuple[float, Path]] = []
        for path in self.paths():
            try:
                mtime = path.stat().st_mtime
                if mtime < cutoff and path not in own:
                    path.unlink()
                    removed += 1
                else:
                    aged.append((mtime, path))
            except OSError:
                continue  # removed by a peer sweeping at the same time
        others = sorted(item for item in aged if item[1] not in own)
        for _, path in others[: max(0, len(aged) - self.max_files)]:
            try:
                path.unlink()
                removed += 1
            except OSError:
                continue
        return removed

    def folder_id(self) -> str:
        """A name for the folder, the same for every replica sharing it: a reader reaching one
        pod twice (two addresses) counts its files once."""
        target = self.folder / ".folder-id"
        try:
            return target.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            pass
        tmp = self.folder / f".folder-id.{os.getpid()}.tmp"
        tmp.write_text(uuid.uuid4().hex, encoding="ascii")
        try:
            os.link(tmp, target)  # atomic, and refused if a peer got there first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return target.read_text(encoding="ascii").strip()

    def paths(self) -> list[Path]:
        """Every replica's failure files in the folder (this pod's replicas share it)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for pattern in self.PATTERNS for p in self.folder.glob(pattern))

    def write(self, event: dict[str, Any]) -> None:
        """Queue a line for the writer thread (never blocks)."""
        if event.get("version") is None:
            return
        self._stop = None  # lines come after any stop marker queued so far: keep writing
        if self._writer is None or not self._writer.is_alive():
            # First line, or a writer gone after close() or an error it could not survive:
            # lines already queued are written by the new one.
            self._writer = threading.Thread(
                target=self._write_lines, name="gateway-failure-files", daemon=True
            )
            self._writer.start()
        line = (json.dumps(event, default=str) + "\n").encode()
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1
            return
        self.queued += 1

    def _write_lines(self) -> None:
        while True:
            line = self._queue.get()
            if not isinstance(line, bytes):  # a stop marker
                if line is self._stop:
                    return
                continue  # an older close()'s, or one lines were queued after
            try:
                self._lines.write(line)
            except Exception:  # never end the writer: later lines would wait for ever
                logger.exception("failure file writer")

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued line is written (or failed); False if ``timeout_s`` passed
        first. A reader calls it so that its report holds the lines of failures it saw."""
        deadline = time.monotonic() + timeout_s
        while self._lines.handled < self.queued:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    @property
    def waiting(self) -> int:
        """Lines queued and not yet written."""
        return max(0, self.queued - self._lines.handled)

    @property
    def lost(self) -> int:
        """Lines this replica could not write (a full disk, a folder it could not create, a
        queue full behind a stalled disk)."""
        return self._lines.failed + self.dropped

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued, within ``timeout_s``, and close the file. A writer stuck on a
        stalled disk is left behind (a daemon thread, holding no lock the interpreter's exit
        waits for) rather than holding up the shutdown; a later ``close`` tries again."""
        writer = self._writer
        if writer is not None and writer.is_alive():
            deadline = time.monotonic() + timeout_s
            self._stop = stop = object()
            with contextlib.suppress(queue.Full):  # a full queue: the writer is stuck anyway
                self._queue.put(stop, timeout=timeout_s)  # after the lines already queued
            writer.join(max(0.0, deadline - time.monotonic()))
            if writer.is_alive():
                logger.warning(
                    json.dumps(
                        {
                            "event": "failure_file.close_timeout",
                            "path": str(self.path),
                            "waiting": self.waiting,
                        }
                    )
                )
                return
        self._writer = None
        self._lines.close()

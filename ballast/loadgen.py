"""Closed-loop load against the gateway: batch-1 predictions from held-out rows, one record each.

:func:`run_load` drives ``concurrency`` workers over one ``httpx.AsyncClient`` until a request
budget, a time budget or a caller's stop condition runs out, and returns one
:class:`~ballast.judge.Observation` per completed request. It is a plain sync function (it runs
its own event loop, in a fresh thread when the caller's thread already runs one).
:class:`LoadThread` keeps the same load going in the background until stopped (the demo's
"live traffic"), still bounded in time.

:class:`LoadProcess` runs the same load in a separate process (``python -m ballast.loadgen``),
so the client never shares a GIL or an event loop with whoever drives the gateway meanwhile,
and hands back every request with its start time (:class:`TimedLoad`);
:func:`summarise_phases` cuts that into phases (rate, p50/p99, failures per phase).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from ballast.judge import UNKNOWN_VERSION, Observation

__all__ = [
    "VERSION_HEADER",
    "LoadProcess",
    "LoadThread",
    "PhaseStats",
    "StopWhen",
    "TimedLoad",
    "VersionCounts",
    "run_load",
    "summarise_phases",
]

VERSION_HEADER = "X-Ballast-Version"

# How often the driver looks at the deadline and the cancel event while requests are in flight.
_POLL_S = 0.05

T = TypeVar("T")


@dataclass(slots=True)
class VersionCounts:
    """Running counts for one version, cheap enough to hand to ``stop_when`` after every request."""

    n: int = 0
    errors: int = 0
    labelled: int = 0
    correct: int = 0


StopWhen = Callable[[Mapping[str, VersionCounts]], bool]


def _run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, whatever the calling thread is doing."""

    async def main() -> T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    # A loop already runs in this thread (a notebook, an async framework calling sync code):
    # asyncio.run would refuse, and blocking that loop's thread is the caller's choice, not ours.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ballast-load") as pool:
        return pool.submit(asyncio.run, main()).result()


def _check_inputs(
    rows: np.ndarray, labels: np.ndarray | None, concurrency: int, max_requests: int, max_s: float
) -> None:
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty 2-D array, got shape {rows.shape}")
    if labels is not None and len(labels) != rows.shape[0]:
        raise ValueError(f"{len(labels)} labels for {rows.shape[0]} rows")
    if concurrency < 1 or max_requests < 1 or not max_s > 0:
        raise ValueError("concurrency and max_requests must be >= 1 and max_seconds > 0")


async def _one(client: httpx.AsyncClient, url: str, body: bytes, label: int | None) -> Observation:
    """Send one request; failures become observations, never exceptions."""
    start = time.perf_counter()
    try:
        resp = await client.post(url, content=body, headers={"content-type": "application/json"})
    except httpx.HTTPError:
        # No answer, so no version header: the failure cannot be pinned on a version.
        return Observation(UNKNOWN_VERSION, False, time.perf_counter() - start)
    latency = time.perf_counter() - start
    version = resp.headers.get(VERSION_HEADER) or UNKNOWN_VERSION
    if resp.status_code != 200:
        return Observation(version, False, latency)
    try:
        prediction = int(resp.json()["predictions"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        # A 200 whose body is not a prediction is a failure to serve, not a success.
        return Observation(version, False, latency)
    correct = None if label is None else prediction == label
    return Observation(version, True, latency, correct, prediction)


async def _drive(
    url: str,
    bodies: list[bytes],
    labels: list[int] | None,
    *,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    stop_when: StopWhen | None,
    timeout: float,
    cancel: threading.Event | None,
    on_observation: Callable[[Observation], None] | None,
) -> list[Observation]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    observations: list[Observation] = []
    counts: dict[str, VersionCounts] = {}
    issued = 0
    stopping = False

    def record(obs: Observation) -> None:
        nonlocal stopping
        observations.append(obs)
        c = counts.setdefault(obs.version, VersionCounts())
        c.n += 1
        c.errors += 0 if obs.ok else 1
        if obs.correct is not None:
            c.labelled += 1
            c.correct += int(obs.correct)
        if on_observation is not None:
            on_observation(obs)
        if stop_when is not None and stop_when(counts):
            stopping = True

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while not stopping and issued < max_requests and loop.time() < deadline:
            if cancel is not None and cancel.is_set():
                return
            i = issued % len(bodies)
            issued += 1
            label = None if labels is None else labels[i]
            record(await _one(client, url, bodies[i], label))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env=False: a proxy from the environment must never see gateway traffic.
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        tasks = [asyncio.ensure_future(worker(client)) for _ in range(concurrency)]
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=_POLL_S, return_when=asyncio.FIRST_EXCEPTION
                )
                failed = any(not t.cancelled() and t.exception() is not None for t in done)
                if failed:
                    break  # a callback broke: raised below
                if loop.time() >= deadline or (cancel is not None and cancel.is_set()):
                    # Out of time or told to stop: nothing more is sent, and what is in flight
                    # is waited for (each request ends within ``timeout``). Dropping it would
                    # leave out exactly the requests that hang: a server that stops answering
                    # near the end would read as 0 failures.
                    if pending:
                        _, pending = await asyncio.wait(pending, timeout=timeout + 1.0)
                    break
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        # A worker only fails through the caller's callbacks (stop_when, on_observation).
        for task in tasks:
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
    return observations


def run_load(
    base_url: str,
    model: str,
    rows: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    stop_when: StopWhen | None = None,
    timeout: float = 5.0,
    cancel: threading.Event | None = None,
    on_observation: Callable[[Observation], None] | None = None,
) -> list[Observation]:
    """Send batch-1 predictions (row ``i`` of ``rows``, cycling) and record what came back.

    Stops at the first of: ``max_requests`` issued, ``max_seconds`` elapsed (requests in flight
    are then waited for, up to ``timeout``), ``stop_when(counts)`` true (checked after every answer, with running
    counts per version), or ``cancel`` set. Each observation carries the version from the
    ``X-Ballast-Version`` header (``"unknown"`` when no answer came), ``ok`` = HTTP 200 with a
    prediction, the client-side latency, and ``correct`` when ``labels`` are given.
    """
    rows = np.asarray(rows, dtype=np.float32)
    _check_inputs(rows, labels, concurrency, max_requests, max_seconds)
    url = f"{base_url.rstrip('/')}/v1/models/{quote(model, safe='')}/predict"
    # Encode once: the load generator must not compete with the gateway for the CPU.
    bodies = [json.dumps({"instances": [row]}).encode() for row in rows.tolist()]
    label_list = None if labels is None else [int(v) for v in np.asarray(labels).tolist()]

    def factory() -> Awaitable[list[Observation]]:
        return _drive(
            url,
            bodies,
            label_list,
            concurrency=concurrency,
            max_requests=max_requests,
            max_seconds=max_seconds,
            stop_when=stop_when,
            timeout=timeout,
            cancel=cancel,
            on_observation=on_observation,
        )

    return _run_sync(factory)


class LoadThread:
    """Background load until :meth:`stop` (or ``max_seconds``, whichever comes first).

    ``with LoadThread(url, model, rows) as load: ...`` starts it and stops it on exit;
    :meth:`observations` gives a snapshot while it runs. An exception inside the thread is
    re-raised by :meth:`stop`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        rows: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        concurrency: int = 4,
        max_seconds: float = 600.0,
        max_requests: int = 1_000_000,
        timeout: float = 5.0,
    ) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        _check_inputs(rows, labels, concurrency, max_requests, max_seconds)
        self._kwargs: dict[str, Any] = {
            "base_url": base_url,
            "model": model,
            "rows": rows,
            "labels": labels,
            "concurrency": concurrency,
            "max_requests": max_requests,
            "max_seconds": max_seconds,
            "timeout": timeout,
        }
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._seen: list[Observation] = []
        self._error: BaseException | None = None
        # Daemon: a caller that forgets stop() must not keep the process alive (it is bounded
        # by max_seconds anyway).
        self._thread = threading.Thread(target=self._run, name="ballast-load-thread", daemon=True)

    def _record(self, obs: Observation) -> None:
        with self._lock:
            self._seen.append(obs)

    def _run(self) -> None:
        try:
            run_load(**self._kwargs, cancel=self._cancel, on_observation=self._record)
        except BaseException as exc:  # handed to stop(); a thread cannot raise to its owner
            self._error = exc

    def start(self) -> LoadThread:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def observations(self) -> list[Observation]:
        """A copy of everything recorded so far."""
        with self._lock:
            return list(self._seen)

    def stop(self, timeout: float | None = 10.0) -> list[Observation]:
        """Stop sending, wait for the thread, and return every observation."""
        self._cancel.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        return self.observations()

    def __enter__(self) -> LoadThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- load from a separate process --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimedLoad:
    """Every completed request of a :class:`LoadProcess`, as columns in start order.

    ``started`` is ``time.monotonic()`` when the request was sent: CLOCK_MONOTONIC is one clock
    for every process of the machine, so it compares with the driver's own marks.
    """

    started: np.ndarray  # float64 seconds (monotonic)
    latency_s: np.ndarray  # float64
    ok: np.ndarray  # bool: HTTP 200 with a prediction
    version: tuple[str, ...]  # "unknown" when no answer came (connection failure)

    def __len__(self) -> int:
        return len(self.started)


@dataclass(frozen=True, slots=True)
class PhaseStats:
    """One phase of a load run: what was sent in it and how it went."""

    phase: str
    seconds: float
    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    versions: dict[str, int]


def summarise_phases(
    load: TimedLoad, marks: Sequence[tuple[str, float]], end: float
) -> list[PhaseStats]:
    """Cut ``load`` into phases: ``marks`` are (name, monotonic start) in order, ``end`` closes
    the last one. A request belongs to the phase it was sent in; earlier ones are left out."""
    if not marks:
        return []
    starts = [t for _, t in marks]
    if any(b < a for a, b in pairwise(starts)) or end < starts[-1]:
        raise ValueError("phase marks must be in time order and end after the last one")
    bounds = [*starts, end]
    out: list[PhaseStats] = []
    for i, (name, t0) in enumerate(marks):
        t1 = bounds[i + 1]
        last = i == len(marks) - 1
        sel = (load.started >= t0) & ((load.started <= t1) if last else (load.started < t1))
        idx = np.flatnonzero(sel)
        lat_ms = load.latency_s[idx] * 1e3
        seconds = t1 - t0
        out.append(
            PhaseStats(
                phase=name,
                seconds=round(seconds, 3),
                requests=int(idx.size),
                failures=int(idx.size - np.count_nonzero(load.ok[idx])),
                rps=round(idx.size / seconds, 1) if seconds > 0 else 0.0,
                p50_ms=round(float(np.percentile(lat_ms, 50)), 3) if idx.size else None,
                p99_ms=round(float(np.percentile(lat_ms, 99)), 3) if idx.size else None,
                versions=dict(sorted(Counter(load.version[j] for j in idx.tolist()).items())),
            )
        )
    return out


class LoadProcess:
    """``run_load`` in a child process until :meth:`stop` (or ``max_seconds``).

    ``with LoadProcess(url, model, rows, workdir=d) as load: ...; result = load.stop()``.
    The child writes its rows and results under ``workdir``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        rows: np.ndarray,
        *,
        workdir: Path,
        concurrency: int = 16,
        max_seconds: float = 600.0,
        timeout: float = 5.0,
    ) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        _check_inputs(rows, None, concurrency, 1, max_seconds)
        self._workdir = Path(workdir)
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._rows_path = self._workdir / "load-rows.npy"
        self._out = self._workdir / "load-result.npz"
        self._ready = self._workdir / "load-ready"
        self._log = self._workdir / "load.log"
        np.save(self._rows_path, rows, allow_pickle=False)
        self._cmd = [
            sys.executable,
            "-m",
            "ballast.loadgen",
            "--url",
            base_url,
            "--model",
            model,
            "--rows",
            str(self._rows_path),
            "--concurrency",
            str(concurrency),
            "--seconds",
            str(max_seconds),
            "--timeout",
            str(timeout),
            "--out",
            str(self._out),
            "--ready",
            str(self._ready),
        ]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 30.0) -> LoadProcess:
        """Spawn the child and wait until its first answer came back."""
        for stale in (self._out, self._ready):
            stale.unlink(missing_ok=True)
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                self._cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + ready_timeout
        while not self._ready.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"load process did not start sending; log {self._log}:\n"
                    + self._log.read_text(errors="replace")[-2000:]
                )
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> TimedLoad:
        """Stop sending (SIGTERM; requests in flight are waited for, up to the request timeout),
        wait, return every request."""
        proc = self._proc
        if proc is None:
            raise RuntimeError("the load process was never started")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        if proc.returncode != 0 or not self._out.exists():
            raise RuntimeError(
                f"load process exited with {proc.returncode}; log {self._log}:\n"
                + self._log.read_text(errors="replace")[-2000:]
            )
        return _read_result(self._out)

    def __enter__(self) -> LoadProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5.0)


def _read_result(path: Path) -> TimedLoad:
    with np.load(path, allow_pickle=False) as data:
        names = [str(v) for v in data["names"].tolist()]
        codes = data["version"].tolist()
        return TimedLoad(
            started=data["started"].astype(np.float64),
            latency_s=data["latency_s"].astype(np.float64),
            ok=data["ok"].astype(bool),
            version=tuple(names[c] for c in codes),
        )


def _child(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ballast.loadgen", description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=Path, required=True, help=".npy of float32 rows")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--out", type=Path, required=True, help="results (.npz)")
    p.add_argument("--ready", type=Path, default=None, help="touched at the first answer")
    args = p.parse_args(argv)
    rows = np.load(args.rows, allow_pickle=False)
    cancel = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        cancel.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    done: list[float] = []
    latency: list[float] = []
    ok: list[bool] = []
    version: list[int] = []
    names: dict[str, int] = {}
    ready = args.ready

    def record(obs: Observation) -> None:
        nonlocal ready
        done.append(time.monotonic())
        latency.append(obs.latency_s)
        ok.append(obs.ok)
        version.append(names.setdefault(obs.version, len(names)))
        if ready is not None:
            ready.touch()
            ready = None

    run_load(
        args.url,
        args.model,
        rows,
        concurrency=args.concurrency,
        max_requests=1 << 62,
        max_seconds=args.seconds,
        timeout=args.timeout,
        cancel=cancel,
        on_observation=record,
    )
    lat = np.asarray(latency, dtype=np.float64)
    started = np.asarray(done, dtype=np.float64) - lat
    order = np.argsort(started, kind="stable")
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez(
        tmp,
        started=started[order],
        latency_s=lat[order],
        ok=np.asarray(ok, dtype=bool)[order],
        version=np.asarray(version, dtype=np.int32)[order],
        names=np.asarray(list(names) or [UNKNOWN_VERSION]),
    )
    os.replace(tmp, args.out)  # the parent never reads a half-written file
    return 0


if __name__ == "__main__":
    raise SystemExit(_child())

"""Closed-loop load against the gateway: batch-1 predictions from held-out rows, one record each.

:func:`run_load` drives ``concurrency`` workers over one ``httpx.AsyncClient`` until a request
budget, a time budget or a caller's stop condition runs out, and returns one
:class:`~ballast.judge.Observation` per completed request. It is a plain sync function (it runs
its own event loop, in a fresh thread when the caller's thread already runs one).
:class:`LoadThread` keeps the same load going in the background until stopped (the demo's
"live traffic"), still bounded in time.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from ballast.judge import UNKNOWN_VERSION, Observation

__all__ = [
    "VERSION_HEADER",
    "LoadThread",
    "StopWhen",
    "VersionCounts",
    "run_load",
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
                if failed or loop.time() >= deadline or (cancel is not None and cancel.is_set()):
                    # Out of time, told to stop, or a callback broke: drop what is in flight.
                    # After a stop condition, in-flight requests still finish (bounded by the
                    # deadline) so slow answers are not systematically left out.
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

    Stops at the first of: ``max_requests`` issued, ``max_seconds`` elapsed (in-flight requests
    are then dropped), ``stop_when(counts)`` true (checked after every answer, with running
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

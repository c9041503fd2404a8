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
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["EVENT_FAILED", "EVENT_SUPPRESSED", "FailureLog"]

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

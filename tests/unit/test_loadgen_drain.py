"""The load generator against a real (tiny) HTTP server that stops answering: requests in
flight when the run ends are waited for and counted, never dropped."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from ballast.loadgen import run_load


@contextmanager
def _server(wait_s: Callable[[int], float]) -> Iterator[tuple[str, list[int]]]:
    """A JSON predict endpoint that answers its n-th request after ``wait_s(n)`` seconds."""
    seen = [0]
    lock = threading.Lock()
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            with lock:
                seen[0] += 1
                n = seen[0]
            release.wait(wait_s(n))
            body = json.dumps({"predictions": [0]}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.send_header("X-Ballast-Version", "1")
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def hangs_after_10() -> Iterator[tuple[str, list[int]]]:
    # Requests after the 10th hang: never answered within the client's timeout.
    with _server(lambda n: 10.0 if n > 10 else 0.0) as served:
        yield served


def test_requests_hanging_when_the_run_ends_are_counted_as_failures(
    hangs_after_10: tuple[str, list[int]],
) -> None:
    url, seen = hangs_after_10
    started = time.monotonic()
    obs = run_load(
        url,
        "m",
        np.zeros((4, 3), np.float32),
        concurrency=4,
        max_requests=10_000,
        # Long enough for the 10 quick answers on a stalled CI machine (0.5 s was not).
        max_seconds=4.0,
        timeout=5.0,  # longer than the run: the hanging requests are in flight at its end
    )
    # Before: the 4 requests hanging at the deadline were cancelled and left out: 10 answers,
    # 0 failures, from a server that had stopped answering.
    assert seen[0] == 14
    assert len(obs) == 14 and sum(not o.ok for o in obs) == 4
    assert time.monotonic() - started < 9.5  # waited for, within the request timeout


def test_a_run_stopped_with_nothing_in_flight_ends_cleanly(
    hangs_after_10: tuple[str, list[int]],
) -> None:
    # Every worker done in the same look that finds the stop: nothing is left to wait for
    # (waiting on nothing raised "Set of Tasks/Futures is empty" and failed the canary).
    url, _ = hangs_after_10
    stop = threading.Event()
    stop.set()
    obs = run_load(
        url,
        "m",
        np.zeros((4, 3), np.float32),
        concurrency=2,
        max_requests=9,
        max_seconds=5,
        cancel=stop,
    )
    assert obs == []

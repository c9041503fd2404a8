"""The head-holding transport and the protocol that uses it: one write per small response, and
HTTP behaviour (100-continue, pipelining, keep-alive, failures) as uvicorn's own."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from infra.gateway.http import CoalescingHttpToolsProtocol, HeadHoldingTransport


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


def test_head_and_first_body_chunk_leave_in_one_write() -> None:
    rec = _Recorder()
    t = HeadHoldingTransport(rec)  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert rec.writes == []
    t.write(b"ok")
    assert rec.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    t.write(b"more")  # later chunks pass straight through
    assert rec.writes[-1] == b"more"
    assert t.get_extra_info("peername") == ("127.0.0.1", 1)


def test_100_continue_is_not_held_and_close_sends_a_held_head_first() -> None:
    rec = _Recorder()
    t = HeadHoldingTransport(rec)  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert rec.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.close()
    assert rec.closed
    assert rec.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"], (
        "closing must not lose the held head"
    )
    assert t.is_closing()


def test_a_response_completing_without_a_body_write_sends_its_held_head_before_moving_on() -> None:
    # Given a transport holding a head (a HEAD response: uvicorn writes no body) ...
    rec = _Recorder()
    seen: list[list[bytes]] = []
    t = HeadHoldingTransport(rec, lambda: seen.append(list(rec.writes)))  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert rec.writes == []
    # ... when the cycle reports the response complete, the head leaves first, then the
    # protocol's own completion runs (which may start the next pipelined request).
    t()
    assert seen == [[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"]]
    t.close()  # nothing held any more: nothing written twice
    assert len(rec.writes) == 1
    # A response that did write its body completes without an extra write.
    rec2 = _Recorder()
    t2 = HeadHoldingTransport(rec2)  # type: ignore[arg-type]
    t2.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    t2.write(b"ok")
    t2()
    assert rec2.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["path"] == "/fail-after-start":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom")
    out = b"echo:" + body
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(out)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": out})


@contextmanager
def _server() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _app, http=CoalescingHttpToolsProtocol, lifespan="off", log_level="critical"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _read_responses(conn: socket.socket, n: int) -> list[tuple[bytes, bytes]]:
    """``n`` responses (head, body) read off ``conn`` (content-length framed)."""
    buf = b""
    out: list[tuple[bytes, bytes]] = []
    conn.settimeout(5)
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return out
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if head.startswith(b"HTTP/1.1 100"):
            out.append((head, b""))
            continue
        while len(buf) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            buf += chunk
        out.append((head, buf[:length]))
        buf = buf[length:]
    return out


def test_served_through_uvicorn_keepalive_pipelining_and_continue() -> None:
    with _server() as port, socket.create_connection(("127.0.0.1", port)) as conn:
        # Two pipelined requests on one connection, then a third after both answers.
        conn.sendall(
            b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\none"
            b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\ntwo"
        )
        got = _read_responses(conn, 2)
        assert [b for _, b in got] == [b"echo:one", b"echo:two"]
        assert all(h.startswith(b"HTTP/1.1 200 OK") for h, _ in got)
        # Expect: 100-continue: the interim answer comes before the body is sent.
        conn.sendall(
            b"POST /c HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        )
        (interim,) = _read_responses(conn, 1)
        assert interim[0].startswith(b"HTTP/1.1 100")
        conn.sendall(b"three")
        ((head, body),) = _read_responses(conn, 1)
        assert head.startswith(b"HTTP/1.1 200") and body == b"echo:three"


def test_an_app_failing_after_it_started_the_response_closes_the_connection() -> None:
    with _server() as port, socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"POST /fail-after-start HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        conn.settimeout(5)
        # As under uvicorn's own protocol: the head it started, then the connection closes
        # (chunked, with no last chunk: the client sees an incomplete response).
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"\r\n\r\n"), data
        assert b"transfer-encoding: chunked" in data


def _recv_until(conn: socket.socket, end: bytes) -> bytes:
    """Bytes received until they end with ``end`` (a kept-alive connection never closes)."""
    conn.settimeout(5)
    buf = b""
    while not buf.endswith(end):
        chunk = conn.recv(65536)
        assert chunk, f"connection closed early: {buf!r}"
        buf += chunk
    return buf


def test_head_requests_are_answered_on_kept_alive_and_closing_connections() -> None:
    with _server() as port, socket.create_connection(("127.0.0.1", port)) as conn:
        # A HEAD on a kept-alive connection: its head arrives (uvicorn writes no body) ...
        conn.sendall(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n")
        head = _recv_until(conn, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 5" in head
        # ... and the connection goes on: a POST pipelined behind another HEAD.
        conn.sendall(
            b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n"
            b"POST /p HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi"
        )
        buf = _recv_until(conn, b"echo:hi")
        assert buf.count(b"HTTP/1.1 200 OK") == 2 and buf.index(b"content-length: 5") < buf.index(
            b"content-length: 7"
        )
    with _server() as port, socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"HEAD /h HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        conn.settimeout(5)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in data, data


def test_many_sequential_requests_each_answered_whole() -> None:
    with _server() as port, socket.create_connection(("127.0.0.1", port)) as conn:
        for i in range(50):
            payload = str(i).encode()
            conn.sendall(
                b"POST /n HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                % (len(payload), payload)
            )
            ((head, body),) = _read_responses(conn, 1)
            assert body == b"echo:" + payload, (i, head)

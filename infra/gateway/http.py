"""uvicorn's httptools protocol, sending a response's head and its body in one write.

uvicorn writes the status line and headers when the app sends ``http.response.start`` and the
body on ``http.response.body``: two ``send()`` calls, two TCP segments per small response. On
loopback and on a busy replica each ``send()`` is a syscall that also runs the receiver's TCP
path, and it was the largest single cost left in the predict route (a quarter of the event
loop's time under ``py-spy --gil``). Holding the head until the first body write halves them.

Nothing else changes: the cycle still builds and checks every header, and a response whose app
fails after starting it is closed (its held head is dropped with the connection, which is what
a client of a half-sent response saw before: a broken response).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttpToolsProtocol", "HeadHoldingTransport"]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HeadHoldingTransport:
    """The transport one request/response cycle writes to: it keeps the first write (the
    response head) and sends it together with the next one (the first body chunk)."""

    __slots__ = ("_head", "_started", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._started:
            if data == _CONTINUE:  # sent while the request body is still awaited
                self.transport.write(data)
                return
            self._started = True
            self._head = bytes(data)
            return
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        self.transport.write(data)

    def close(self) -> None:
        self._head = None
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # anything else the cycle may ask of a transport
        return getattr(self.transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` whose request cycles write through a :class:`HeadHoldingTransport`."""

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        # A new cycle was made (not an upgrade); its task is scheduled but has not run yet.
        if cycle is not None and cycle is not before and cycle.transport is self.transport:
            cycle.transport = HeadHoldingTransport(self.transport)  # type: ignore[assignment]

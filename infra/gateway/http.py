"""uvicorn's httptools protocol, sending a response's head and its body in one write.

uvicorn writes the status line and headers when the app sends ``http.response.start`` and the
body on ``http.response.body``: two ``send()`` calls, two TCP segments per small response. On
loopback and on a busy replica each ``send()`` is a syscall that also runs the receiver's TCP
path, and it was the largest single cost left in the predict route (a quarter of the event
loop's time under ``py-spy --gil``). Holding the head until the first body write halves them.

Nothing else changes: the cycle still builds and checks every header. A held head is never
lost: a response that completes without writing a body (``HEAD``: uvicorn writes none) sends it
when the cycle reports completion, and closing the connection sends it first (so a response
whose app fails after starting it reaches the client as uvicorn's own does: the head, then the
connection closes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttpToolsProtocol", "HeadHoldingTransport"]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _nothing() -> None:
    pass


class HeadHoldingTransport:
    """The transport one request/response cycle writes to: it keeps the first write (the
    response head) and sends it together with the next one (the first body chunk).

    It is also the cycle's ``on_response`` callback (:meth:`__call__`): a head still held when
    the response is complete (no body was written) is sent then, before ``on_response`` runs.
    """

    __slots__ = ("_head", "_on_response", "_started", "transport")

    def __init__(
        self, transport: asyncio.Transport, on_response: Callable[[], None] = _nothing
    ) -> None:
        self.transport = transport
        self._on_response = on_response
        self._head: bytes | None = None
        self._started = False

    def __call__(self) -> None:
        if self._head is not None:  # per request: one attribute test unless a head is held
            self.flush()
        self._on_response()

    def flush(self) -> None:
        """Send the held head, if any, unless the connection is already going away."""
        head = self._head
        if head is not None:
            self._head = None
            if not self.transport.is_closing():
                self.transport.write(head)

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
        self.flush()
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
            # Completion goes through the holder too: a response with no body write (HEAD)
            # gets its head sent before the protocol moves on to the next request.
            holder = HeadHoldingTransport(self.transport, cycle.on_response)
            cycle.transport = holder  # type: ignore[assignment]
            cycle.on_response = holder

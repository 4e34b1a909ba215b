"""The HTTP protocol the gateway gives uvicorn: httptools, plus a deadline and a size limit for headers.

uvicorn times out idle keep-alive connections, but not a client that
connects and says nothing, nor one that sends its request headers a byte at
a time (slow loris): each would hold a connection for ever. Bodies are the
application's business (``limits.py``); headers arrive before there is a
request to hand to it, so they are watched here.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_body

MAX_HEADER_BYTES = 64 * 1024


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's HTTP protocol, with a deadline and a size limit for request headers (slow loris).

    The clock starts when the connection opens or a request begins, and
    stops when its headers are complete. A client that has sent part of a
    request by then gets ``408``; one that sent nothing is closed quietly.
    """

    header_timeout = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._begun = False  # a request has started to arrive and its headers are not complete

    def _arm(self) -> None:
        self._header_bytes = 0
        self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, status: bytes, code: str, message: str) -> None:
        body = error_body(code, message)
        self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n" % len(body) + body)
        self.transport.close()

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._begun:
            self._refuse(b"408 Request Timeout", "header_timeout",
                         f"the request headers did not arrive within {self.header_timeout:g} s")
        else:
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is None or self.transport.is_closing():
            return
        # Still waiting for the end of the headers: what is buffered so far is at most one read beyond the limit.
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._disarm()
            self._refuse(b"431 Request Header Fields Too Large", "headers_too_large",
                         f"request headers are larger than {MAX_HEADER_BYTES} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._begun = False
        self._disarm()
        super().on_headers_complete()


def header_deadline(timeout: float) -> type[HeaderDeadline]:
    """The protocol class to give uvicorn (``http=``) for a ``--header-timeout`` of ``timeout`` seconds."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout": timeout})

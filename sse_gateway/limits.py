"""Limits: how much a client may send, hold open, or take its time over.

Overload is answered at once, never queued: a request beyond a limit gets
a JSON error with ``Retry-After``.

* **Sessions** (``--max-sessions``): creating one more session, explicitly
  or by publishing to an unknown id, is ``503 too_many_sessions``. It is a
  capacity limit of the deployment, not of one client, and it clears when
  retention removes sessions, hence 503 and not 429. Concurrent creations
  can overshoot it by the number that race.
* **Streams** (``--max-streams``, ``--max-streams-per-session``), counted
  per process: beyond the total, ``503 too_many_streams`` (the process is
  full); beyond one session's share, ``429 too_many_streams_for_session``
  (that session's readers are asking for too much).
* **Slow clients.** Headers must arrive within ``--header-timeout`` of the
  connection being opened or the request being started, and be at most
  ``MAX_HEADER_BYTES`` (``HeaderDeadline``); a whole body within
  ``--body-timeout`` (``read_body``); each line of an NDJSON stream within
  ``--ndjson-line-timeout`` of the one before (``next_chunk``). A request
  answered before its body was read closes the connection after the answer
  (``CloseUnreadBody``), so nobody can keep trickling a body nobody reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import RequestTimeout, TooLarge, TooManyRequests, Unavailable, error_body

MAX_HEADER_BYTES = 64 * 1024
STREAM_RETRY_AFTER = 5
SESSION_RETRY_AFTER = 60


class StreamSlots:
    """Open streams of this process, in total and per session."""

    def __init__(self, total: int, per_session: int) -> None:
        self.max_total = total
        self.max_per_session = per_session
        self.total = 0
        self.by_session: dict[str, int] = {}

    def take(self, session: str) -> Callable[[], None]:
        """Count one more stream of ``session`` (or raise 429/503); returns the function that gives it back."""
        held = self.by_session.get(session, 0)
        if self.max_per_session and held >= self.max_per_session:
            raise TooManyRequests(f"session {session!r} already has {held} open streams, its limit",
                                  "too_many_streams_for_session", retry_after=STREAM_RETRY_AFTER)
        if self.max_total and self.total >= self.max_total:
            raise Unavailable(f"this gateway already serves {self.total} streams, its limit",
                              "too_many_streams", retry_after=STREAM_RETRY_AFTER)
        self.total += 1
        self.by_session[session] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.total -= 1
            left = self.by_session[session] - 1
            if left:
                self.by_session[session] = left
            else:
                del self.by_session[session]

        return release


def too_many_sessions(limit: int) -> Unavailable:
    return Unavailable(f"the gateway holds {limit} sessions, its limit; try again after retention removed some",
                       "too_many_sessions", retry_after=SESSION_RETRY_AFTER)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body: ``413`` beyond ``limit`` bytes, ``408`` if it takes longer than ``timeout`` seconds."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body is larger than {limit} bytes", "body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"request body is larger than {limit} bytes", "body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s", "body_timeout") from None
    return b"".join(chunks)


async def next_chunk(chunks: AsyncIterator[bytes], deadline: float) -> bytes | None:
    """The next piece of a streamed body, None at its end; ``TimeoutError`` after ``deadline`` (loop time)."""
    async with asyncio.timeout_at(deadline):
        return await anext(chunks, None)


class CloseUnreadBody:
    """Pure ASGI: a response sent before the request body was read ends the connection.

    Otherwise the server would keep reading (and dropping) that body for as
    long as the client cares to trickle it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        unread = headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers

        async def watch_receive() -> Message:
            nonlocal unread
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                unread = False
            return message

        async def close_if_unread(message: Message) -> None:
            if message["type"] == "http.response.start" and unread:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, watch_receive, close_if_unread)


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

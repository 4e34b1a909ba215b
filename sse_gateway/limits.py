"""Limits: how much a client may send, hold open, or take its time over.

Overload is answered at once, never queued: a request beyond a limit gets
a JSON error with ``Retry-After``.

* **Sessions** (``--max-sessions``): creating one more session, explicitly
  or by publishing to an unknown id, is ``503 too_many_sessions``. It is a
  capacity limit of the deployment, not of one client, and it clears when
  retention removes sessions, hence 503 and not 429. Concurrent creations
  can overshoot it by the number that race.
* **Streams** (``--max-streams``, ``--max-streams-per-session``), counted
  per process by ``StreamSlots``, the one count of open streams: beyond
  the total, ``503 too_many_streams`` (the process is full); beyond one
  session's share, ``429 too_many_streams_for_session`` (that session's
  readers are asking for too much).
* **Slow clients.** Headers must arrive within ``--header-timeout`` of the
  connection being opened or the request being started (``protocol.py``,
  below the application); a whole body within
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

from .errors import RequestTimeout, TooLarge, TooManyRequests, Unavailable
from .log.base import OpenStreams
from .models import now_ms

STREAM_RETRY_AFTER = 5
SESSION_RETRY_AFTER = 60


class StreamSlots(OpenStreams):
    """The open streams of this process, in total and per session: THE count of them.

    A stream holds its slot from before it attaches to the hub until after it
    detaches. Everything that needs the number reads it here: the limits
    below, the hub (a session's channel lives while the session has a
    stream), presence (``EventLog.presence``; Redis writes this node's count
    for the others, told by ``changed``) and the ``open_streams`` gauge.
    """

    def __init__(self, total: int = 0, per_session: int = 0) -> None:
        self.max_total = total
        self.max_per_session = per_session
        self.total = 0
        self.by_session: dict[str, int] = {}
        self.last_seen: dict[str, int] = {}  # when the count of a session last fell to 0 (ms)
        #: ``changed(session)`` after a session's count moved; the hub sets it to the log's ``streams_changed``
        self.changed: Callable[[str], None] = _nothing

    def count(self, session: str) -> int:
        return self.by_session.get(session, 0)

    def last_closed(self, session: str) -> int | None:
        return self.last_seen.get(session)

    def forget(self, session: str) -> None:
        """The session was deleted: its last close is no longer news."""
        self.last_seen.pop(session, None)

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
        self.changed(session)
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
                self.last_seen[session] = now_ms()
            self.changed(session)

        return release


def _nothing(session: str) -> None:
    pass


def too_many_sessions(limit: int) -> Unavailable:
    return Unavailable(f"the gateway holds {limit} sessions, its limit; try again after retention removed some",
                       "too_many_sessions", retry_after=SESSION_RETRY_AFTER)


def body_too_slow(timeout: float) -> RequestTimeout:
    """``408 body_timeout``: a whole body did not arrive within ``--body-timeout`` (the route's and the
    protocol's publish path's)."""
    return RequestTimeout(f"the request body did not arrive within {timeout:g} s", "body_timeout")


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
        raise body_too_slow(timeout) from None
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

"""The HTTP protocol the gateway gives uvicorn: httptools, plus a deadline and a size limit for headers.

uvicorn times out idle keep-alive connections, but not a client that
connects and says nothing, nor one that sends its request headers a byte at
a time (slow loris): each would hold a connection for ever. Bodies are the
application's business (``limits.py``); headers arrive before there is a
request to hand to it, so they are watched here. So are requests the HTTP
parser refuses (a duplicate Content-Length, a bad chunk size, a NUL in a
header, a path that is not ASCII): they get the gateway's JSON error like
every other refusal, not uvicorn's plain text.

It also tells a stream about its connection (``TRANSPORT_EXTENSION`` in the
request scope): the transport, which the stream's heartbeats and a cut use,
and the protocol itself, whose ``on_lost`` the stream sets to hear at once
when the connection is lost, without a task of its own waiting for
``http.disconnect`` (stream.py).

Three more things differ from uvicorn's protocol. Plain publishes are
answered here without an ASGI request (``fast_publish.py``). A client that
pipelines is read ahead only as far as one read beyond the request being
served, and not at all while its answers wait to be sent. And nothing is
allocated per request that a connection can do without: no timer per
request (the header deadline starts only when a read ends with headers
incomplete; one keep-alive timer per idle connection), and a connection's
pipeline queue and flow control hold no ``deque`` until they are used
(~1.2 KB less per idle stream).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_body

if TYPE_CHECKING:
    from .fast_publish import FastPublish, FastPublisher

MAX_HEADER_BYTES = 64 * 1024
TRANSPORT_EXTENSION = "sse_gateway.transport"  # scope["extensions"][...]: {"transport": ..., "protocol": ...}


class _Pipeline(list):
    """uvicorn's queue of pipelined requests (``appendleft``, ``pop``: first in, first out), as a list: an
    empty ``deque`` takes 624 bytes, an empty list 56, and almost every connection's stays empty."""

    __slots__ = ()

    def appendleft(self, item) -> None:
        self.insert(0, item)


class _FlowControl(FlowControl):
    """uvicorn's flow control, whose ``asyncio.Event`` (and the ``deque`` of its waiters, 624 bytes) is made
    only when the client first stops taking what is written."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._is_writable_event = None

    async def drain(self) -> None:
        if self._is_writable_event is not None:
            await self._is_writable_event.wait()

    def pause_writing(self) -> None:
        if not self.write_paused:
            self.write_paused = True
            if self._is_writable_event is None:
                self._is_writable_event = asyncio.Event()
            self._is_writable_event.clear()

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            self._is_writable_event.set()


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with the gateway's additions (module docstring).

    Request headers have a deadline and a size limit (slow loris). The
    clock starts when the connection opens or a request begins (at the end
    of the read that began it, if its headers are not complete by then:
    most requests arrive whole and never need a timer), and stops when its
    headers are complete. A client that has sent part of a request by then
    gets ``408``; one that sent nothing is closed quietly.
    """

    header_timeout = 10.0
    fast: FastPublisher | None = None  # takes the plain publishes (fast_publish.py)
    # Slots, not the instance dict: an instance dict shares its keys with the other connections' only
    # while it has fewer than 30 (CPython 3.11). uvicorn's take 28; with these in it too, every
    # connection's dict held keys of its own (~1.2 KB more per connection).
    __slots__ = ("_answers_unsent", "_begun", "_buffered", "_deadline", "_fast_cycle", "_header_bytes", "_idle_since",
                 "_serving", "fast_queue", "on_lost")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._buffered = 0  # bytes read while waiting for the end of the headers
        self._header_bytes = 0  # bytes of the current request's request line and headers
        self._begun = False  # a request has started to arrive and its headers are not complete
        self.on_lost: Callable[[], None] | None = None  # called once when the connection is lost (stream.py)
        self._fast_cycle: FastPublish | None = None  # the request being read, if ``fast`` took it
        self._idle_since: float | None = None  # loop time of the last answer while no request is in progress
        self.fast_queue: list[FastPublish] | None = None  # ``fast``'s publishes in flight, in request order
        self._answers_unsent = False  # the next request waits until the client has read what was answered
        self._serving = None  # the request of the usual way (uvicorn's cycle) last started
        self.pipeline = _Pipeline()

    def _arm(self) -> None:
        self._buffered = 0
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
        self.flow = _FlowControl(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if self._fast_cycle is not None:
            self.fast.lost(self._fast_cycle)
        # uvicorn tells only its latest request that the client left; one started before it (pipelined) would
        # write its answer to a closed transport (an error), so every one is told
        for cycle in (self._serving, *(cycle for cycle, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
        super().connection_lost(exc)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    # After an answer. uvicorn reads on after every answer, so a client that pipelines faster than it is answered
    # has the server queue one more read of requests per answer, without end; here reading resumes once the
    # requests read ahead are all started. Keep-alive: uvicorn arms a timer after every answer and cancels it
    # when the next request arrives; here one timer per idle connection looks at when the connection last
    # went idle, and waits again if it has been busy.

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None  # data arrived: not idle

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        self.next_request()

    def next_request(self) -> None:
        """Every answer so far is written: start the next request uvicorn queued, or wait for one."""
        if self.transport.is_closing():
            return
        if self.flow.write_paused:
            self.flow.pause_reading()  # a client that does not read its answers: resume_writing goes on
            self._answers_unsent = True
            return
        if self.pipeline:  # requests read ahead (pipelined): the next one, and reading on only when it is the last
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            if not self.pipeline:
                self.flow.resume_reading()
            return
        self.flow.resume_reading()
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._idle_check)

    def _start_asgi_task(self, cycle, app) -> None:
        self._serving = cycle
        super()._start_asgi_task(cycle, app)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._answers_unsent:
            self._answers_unsent = False
            self.next_request()

    def _idle_check(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None or self.transport.is_closing():
            return  # busy: its answer looks again
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._idle_check)
        else:
            self.timeout_keep_alive_handler()

    def _refuse_large(self) -> None:
        self._disarm()
        self._refuse(b"431 Request Header Fields Too Large", "headers_too_large",
                     f"request headers are larger than {MAX_HEADER_BYTES} bytes")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._fast_cycle is not None and self._fast_cycle.reading:
            self.fast.body_pending(self, self._fast_cycle)
        if self.transport.is_closing():
            return
        if self._deadline is None:
            if not self._begun:
                return
            # A request began in this read and its headers are not complete: the clock starts, and of this read
            # only that request's part counts (the read may hold many pipelined requests before it).
            self._arm()
            self._buffered = self._header_bytes
        else:  # still waiting for the end of the headers: what is buffered is at most one read beyond the limit
            self._buffered += len(data)
        if self._buffered > MAX_HEADER_BYTES:
            self._refuse_large()

    def send_400_response(self, msg: str) -> None:
        """What uvicorn sends when the parser refuses a request: the gateway's JSON instead of plain text."""
        if self._header_bytes > MAX_HEADER_BYTES:  # the parse was stopped by on_header/on_url below
            self._refuse_large()
        elif not self.transport.is_closing():
            self._refuse(b"400 Bad Request", "invalid_http", f"the request is not valid HTTP/1.1 ({msg})")

    # Headers that arrive in one read are parsed in one go: their size is counted as the parser meets them.
    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise ValueError("request headers too large")  # stops the parser: see send_400_response

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # the connection: a stream's heartbeats and a cut write to it or abort it, on_lost tells of its end
        self.scope.setdefault("extensions", {})[TRANSPORT_EXTENSION] = {"transport": self.transport,
                                                                       "protocol": self}
        self._begun = True  # (the clock starts after this read if the headers are not complete by then)
        self._header_bytes = 0

    def on_headers_complete(self) -> None:
        self._begun = False
        self._disarm()
        fast = self._fast_cycle = self.fast.take(self) if self.fast is not None else None
        if fast is None:
            super().on_headers_complete()
        else:
            self.cycle = fast  # what uvicorn's connection_lost and shutdown look at

    def on_body(self, body: bytes) -> None:
        fast = self._fast_cycle
        if fast is None:
            super().on_body(body)
        elif fast.reading:
            fast.chunks.append(body)  # at most --max-body-bytes: its Content-Length said so

    def on_message_complete(self) -> None:
        fast = self._fast_cycle
        if fast is None:
            super().on_message_complete()
        elif fast.reading:
            self.fast.body_arrived(self, fast)


def gateway_protocol(timeout: float, app: Any = None) -> type[GatewayProtocol]:
    """The protocol class to give uvicorn (``http=``) for a ``--header-timeout`` of ``timeout`` seconds; with
    ``app`` (``dispatch.GatewayApp``), plain publishes are answered by the protocol (``fast_publish.py``)."""
    from .fast_publish import FastPublisher  # it needs the routes, which need this module

    return type("GatewayProtocol", (GatewayProtocol,), {"header_timeout": timeout,
                                                       "fast": FastPublisher(app) if app is not None else None})

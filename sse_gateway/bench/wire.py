"""The load generator's side of the wire: a minimal HTTP/1.1 publisher and SSE subscriber.

Publishers and subscribers are ``asyncio.Protocol`` objects on raw asyncio
connections, with requests encoded by hand, rather than stream readers:
10,000 subscribers must cost little, at fan-out they parse ~100,000
events/s between them, and the fleet's 1,000 publishers send 20,000
requests/s. Bytes are handled in ``data_received``, with no task per
connection, no copy into a ``StreamReader`` and no wake-up per response.

Every event the bench publishes carries its own sequence number and send
time in the payload, ``{"n":N,"t":NANOSECONDS,"p":"..."}``, so exactness
(every ``n``, in order, once) and publish-to-receive latency are judged
from what arrives, whatever id format the server under test uses.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from array import array
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import orjson

PAD = b"x" * 58  # brings one payload to ~100 bytes
_EVENT = re.compile(rb'"n": ?(\d+), ?"t": ?(\d+)')  # sequence number and send time
_N = re.compile(rb'"n": ?(\d+),')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.I)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding: *chunked", re.I)


def payload(n: int) -> bytes:
    """One event's data: sequence number, send time (monotonic ns), padding."""
    return b'{"n":%d,"t":%d,"p":"%s"}' % (n, time.monotonic_ns(), PAD)


class Endpoint:
    """A URL template with ``{session}`` in its path, split once into what a request needs."""

    def __init__(self, template: str) -> None:
        parts = urlsplit(template)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{template!r}: the bench speaks plain http:// only")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.template = parts.path + (f"?{parts.query}" if parts.query else "")
        self.host_header = parts.netloc.encode()

    def path(self, session: str) -> bytes:
        return self.template.replace("{session}", session).encode()


class HTTPError(Exception):
    """The server answered with a status the bench did not expect, or broke the connection."""


#: ``done(status, body)`` when a response has arrived; status 0: the connection broke first
Done = Callable[[int, bytes], None]


class Publisher(asyncio.Protocol):
    """One keep-alive connection that POSTs events; responses are matched to requests in order.

    ``send`` writes a request and calls back when its response arrives (no
    task, no future: what the paced scenarios use); ``post`` awaits one.
    Requests may be pipelined: HTTP/1.1 answers them in order.
    """

    def __init__(self, endpoint: Endpoint, envelope: bool) -> None:
        self.endpoint = endpoint
        self.envelope = envelope
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._pending: deque[Done] = deque()
        self._writable: asyncio.Future | None = None

    async def connect(self) -> Publisher:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, self.endpoint.host, self.endpoint.port)
        return self

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        while self._pending:
            self._pending.popleft()(0, repr(exc).encode())
        self.resume_writing()

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # -- requests ---------------------------------------------------------------

    def request(self, session: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            self.endpoint.path(session), self.endpoint.host_header, content_type, len(body), body)

    def event_body(self, n: int) -> bytes:
        data = payload(n)
        return b'{"data":%s}' % data if self.envelope else data

    def batch_body(self, first: int, count: int) -> bytes:
        return b"[" + b",".join(b'{"data":%s}' % payload(n) for n in range(first, first + count)) + b"]"

    def send(self, request: bytes, done: Done) -> None:
        """Write ``request``; ``done(status, body)`` is called when its response has arrived."""
        if self.transport is None:
            done(0, b"not connected")
            return
        self._pending.append(done)
        self.transport.write(request)

    async def post(self, request: bytes) -> bytes:
        """Send one request and wait for its response: the body if the status is 2xx, else ``HTTPError``."""
        fut = asyncio.get_running_loop().create_future()
        self.send(request, _resolver(fut))
        return _checked(*await fut)

    async def publish(self, session: str, n: int) -> None:
        """Append event ``n``; returns when the server has answered 2xx."""
        await self.post(self.request(session, self.event_body(n)))

    async def pipeline(self, requests: list[bytes]) -> None:
        """Send several requests before their answers arrive (HTTP/1.1 keeps their order)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        for req, fut in zip(requests, futures, strict=True):
            self.send(req, _resolver(fut))
        for status, body in await asyncio.gather(*futures):
            _checked(status, body)

    async def ndjson(self, session: str, until: float, lines_per_chunk: int = 100) -> int:
        """Stream NDJSON events until loop time ``until``; the number of ids the server confirmed."""
        # A small send buffer keeps what is written but not yet read by the server (which the
        # response waits for) to ~64 KiB, instead of the megabytes the kernel would accept.
        self.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append(_resolver(fut))
        self.transport.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/x-ndjson\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" % (self.endpoint.path(session),
                                                                       self.endpoint.host_header))
        n = 0
        while loop.time() < until and self.transport is not None:
            chunk = b"".join(b'{"data":%s}\n' % payload(i) for i in range(n, n + lines_per_chunk))
            n += lines_per_chunk
            self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if self._writable is not None:
                await self._writable
        if self.transport is not None:
            self.transport.write(b"0\r\n\r\n")
        return len(orjson.loads(_checked(*await fut))["ids"])

    # -- responses --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while self._pending:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head, at = buf[:end + 2], end + 4
            m = _CONTENT_LENGTH.search(head)
            if m:
                stop = at + int(m.group(1))
                if len(buf) < stop:
                    break
                body = buf[at:stop]
            elif _CHUNKED.search(head):
                whole = _dechunk_all(buf, at)
                if whole is None:
                    break
                body, stop = whole
            else:
                body, stop = b"", at
            buf = buf[stop:]
            self._pending.popleft()(int(head[9:12]), body)
        self._buf = buf


def _dechunk_all(buf: bytes, at: int) -> tuple[bytes, int] | None:
    """A complete chunked body starting at ``at``: (body, end), or None if more bytes are needed."""
    parts = []
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(buf[at:eol].split(b";")[0], 16)
        if size == 0:
            end = buf.find(b"\r\n", eol + 2)  # no trailers are expected: the CRLF that ends the body
            return (b"".join(parts), end + 2) if end >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        parts.append(buf[eol + 2:eol + 2 + size])
        at = eol + 2 + size + 2


def _resolver(fut: asyncio.Future) -> Done:
    def done(status: int, body: bytes) -> None:
        if not fut.done():
            fut.set_result((status, body))
    return done


def _checked(status: int, body: bytes) -> bytes:
    if not 200 <= status < 300:
        raise HTTPError(f"{status or 'connection broken'}: {body[:200]!r}")
    return body


class Group:
    """The subscribers of one scenario: what they expect, and what they saw.

    Waiting is counted, not scanned: a member reports when it opens (its
    response head arrived), reaches its final event or fails, so waiting for
    1,000 subscribers costs nothing per delivered event.
    """

    def __init__(self, endpoints: list[Endpoint], *, last_event_id_style: str = "header", latencies: bool = False,
                 comments: bool = False, max_reconnects: int = 5) -> None:
        self.endpoints = endpoints  # members take them in turn, from the second (see ``subscribe``)
        self.style = last_event_id_style
        self.latencies: array | None = array("q") if latencies else None  # ns; an array is not traversed by gc
        self.comments: int | None = 0 if comments else None  # SSE comment lines received (heartbeats), if counted
        self.max_reconnects = max_reconnects
        self.members: list[Subscriber] = []
        self.opened = 0
        self.settled = 0  # members that reached their final event or failed
        self.reconnects = 0
        self.failures: list[str] = []
        self.closing = False
        self._waiters: list[tuple[asyncio.Future, object]] = []

    def subscribe(self, session: str, first_n: int = 0) -> Subscriber:
        """A new member. With several nodes, member k streams from node (k + 1) mod N while publisher k
        publishes to node k mod N: on two nodes, every subscriber of the fleet and half of those of one
        session read through a node other than the one its events were published to."""
        endpoint = self.endpoints[(len(self.members) + 1) % len(self.endpoints)]
        sub = Subscriber(self, session, first_n, endpoint)
        self.members.append(sub)
        return sub

    async def open_all(self, concurrency: int = 200) -> None:
        """Connect every member, at most ``concurrency`` connects in flight."""
        gate = asyncio.Semaphore(concurrency)

        async def one(sub: Subscriber) -> None:
            async with gate:
                await sub.open()

        await asyncio.gather(*(one(s) for s in self.members))

    async def wait(self, condition, timeout: float) -> bool:
        """Wait until ``condition()`` holds (checked when a member opens or settles); False on timeout."""
        if condition():
            return True
        fut = asyncio.get_running_loop().create_future()
        entry = (fut, condition)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.remove(entry)

    async def wait_opened(self, timeout: float) -> bool:
        return await self.wait(lambda: self.opened + len(self.failures) >= len(self.members), timeout)

    async def wait_settled(self, timeout: float) -> bool:
        return await self.wait(lambda: self.settled >= len(self.members), timeout)

    def _changed(self) -> None:
        for fut, condition in self._waiters:
            if not fut.done() and condition():
                fut.set_result(None)

    def finish_at(self, final_n: int) -> None:
        """Every member settles once it has received event ``final_n``."""
        for sub in self.members:
            sub.finish_at(final_n)

    def close(self) -> None:
        self.closing = True
        for sub in self.members:
            sub.close()

    @property
    def received(self) -> int:
        return sum(s.received for s in self.members)

    @property
    def exact(self) -> bool:
        """Every member got every event up to its final one, in order, once."""
        return not self.failures and all(s.exact and s.final_n is not None and s.next_n == s.final_n + 1
                                         for s in self.members)

    def min_next(self) -> int:
        return min(s.next_n for s in self.members)


class Subscriber(asyncio.Protocol):
    """One SSE stream: HTTP/1.1 head, chunked or raw body, frames, and the ``n`` of each event.

    On a dropped connection it reconnects with the id of the last event it
    got, as EventSource does, and exactness carries over the reconnect.
    """

    def __init__(self, group: Group, session: str, first_n: int, endpoint: Endpoint) -> None:
        self.group = group
        self.endpoint = endpoint
        self.session = session
        self.next_n = first_n
        self.final_n: int | None = None
        self.reached = False
        self.received = 0
        self.exact = True
        self.closed = False
        self.failed = False
        self._first_frames: bytes | None = None  # the frames that held the first event received
        self._last_frames: bytes | None = None  # ... and the last
        self.transport: asyncio.Transport | None = None
        self.reconnects = 0
        self._reset()

    def _reset(self) -> None:
        self._head = b""
        self._in_head = True
        self._chunked = False
        self._chunk_left = 0  # bytes of the current chunk still to come; negative: its CRLF
        self._raw = b""  # undecoded chunked bytes
        self._sse = b""  # decoded bytes after the last complete frame
        self._line_start = True  # the next decoded byte begins a line

    def finish_at(self, final_n: int) -> None:
        self.final_n = final_n
        self._set_reached(self.next_n > final_n)

    def _set_reached(self, reached: bool) -> None:
        if reached == self.reached or self.failed:
            return
        self.reached = reached
        self.group.settled += 1 if reached else -1
        if reached:
            self.group._changed()

    async def open(self, last_event_id: bytes | None = None) -> None:
        g, endpoint = self.group, self.endpoint
        path = endpoint.path(self.session)
        extra = b""
        if last_event_id is not None:
            if g.style == "query":
                path += (b"&" if b"?" in path else b"?") + b"last_event_id=" + last_event_id
            else:
                extra = b"Last-Event-ID: " + last_event_id + b"\r\n"
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self, endpoint.host, endpoint.port)
        except OSError as exc:
            self._fail(f"{self.session}: connect failed: {exc!r}")
            return
        self.transport.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n"
                             b"Cache-Control: no-cache\r\n%s\r\n" % (path, endpoint.host_header, extra))

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        g = self.group
        if self.closed or g.closing:
            return
        if self.reconnects >= g.max_reconnects:
            self._fail(f"{self.session}: connection lost {self.reconnects + 1} times")
            return
        self.reconnects += 1
        g.reconnects += 1
        self._reset()
        asyncio.get_running_loop().call_later(0.05, self._reconnect)

    def _reconnect(self) -> None:
        if not self.group.closing and not self.closed:
            asyncio.ensure_future(self.open(self.last_id))

    def _fail(self, why: str) -> None:
        if self.failed:
            return
        self.failed = True
        self.exact = False
        g = self.group
        g.failures.append(why)
        if not self.reached:
            g.settled += 1
        self.close()
        g._changed()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end + 2], self._head[end + 4:]
            self._in_head = False
            self._head = b""
            status = int(head[9:12])
            if status != 200:
                self._fail(f"{self.session}: status {status}")
                return
            self._chunked = bool(_CHUNKED.search(head))
            self.group.opened += 1
            self.group._changed()
        if self._chunked:
            data = self._dechunk(data)
        if data:
            if self.group.comments is not None:  # lines that begin with ':', wherever the reads split them
                self.group.comments += (self._line_start and data[:1] == b":") + data.count(b"\n:")
                self._line_start = data[-1:] == b"\n"
            self._frames(data)

    def _dechunk(self, data: bytes) -> bytes:
        if not self._raw and self._chunk_left == 0:  # fast path: data is exactly one whole chunk
            eol = data.find(b"\r\n")
            if eol > 0:
                size = int(data[:eol], 16) if b";" not in data[:eol] else -1
                if size > 0 and len(data) == eol + size + 4:
                    return data[eol + 2:-2]
        buf = self._raw + data if self._raw else data
        out = []
        pos, size = 0, len(buf)
        left = self._chunk_left
        while pos < size:
            if left > 0:
                take = min(left, size - pos)
                out.append(buf[pos:pos + take])
                pos += take
                left -= take
                if left == 0:
                    left = -2  # the CRLF after the chunk's data
            elif left < 0:
                skip = min(-left, size - pos)
                pos += skip
                left += skip
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                length = int(buf[pos:eol].split(b";")[0], 16)
                pos = eol + 2
                if length == 0:  # the last chunk: the server ended the stream
                    pos = size
                    break
                left = length
        self._chunk_left = left
        self._raw = buf[pos:]
        return b"".join(out)

    def _frames(self, data: bytes) -> None:
        buf = self._sse + data if self._sse else data
        if buf.endswith(b"\n\n"):
            frames, self._sse = buf, b""
        else:
            lf, crlf = buf.rfind(b"\n\n"), buf.rfind(b"\n\r\n")
            end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
            frames, self._sse = buf[:end], buf[end:]
        lat = self.group.latencies
        hits = (_EVENT if lat is not None else _N).findall(frames)
        if not hits:
            return
        if self._first_frames is None:
            self._first_frames = frames
        self._last_frames = frames
        if len(hits) == 1:  # the common case when a server writes each event as it comes
            hit = hits[0]
            n = int(hit[0] if lat is not None else hit)
            if n != self.next_n:
                self.exact = False
            self.next_n = n + 1
            self.received += 1
            if lat is not None:
                lat.append(time.monotonic_ns() - int(hit[1]))
        else:
            ns = [int(h[0]) for h in hits] if lat is not None else list(map(int, hits))
            if ns != list(range(self.next_n, self.next_n + len(ns))):
                self.exact = False
            self.next_n = ns[-1] + 1
            self.received += len(ns)
            if lat is not None:
                now = time.monotonic_ns()
                lat.extend(now - int(t) for _, t in hits)
        if not self.reached and self.final_n is not None and self.next_n > self.final_n:
            self._set_reached(True)

    @property
    def first_id(self) -> bytes | None:
        """The SSE id of the first event received (what a client resumes after to skip only it)."""
        return _first_id(self._first_frames) if self._first_frames else None

    @property
    def last_id(self) -> bytes | None:
        """The SSE id of the last event received: the cursor of a reconnect."""
        return _last_id(self._last_frames) if self._last_frames else None


def _first_id(frames: bytes) -> bytes | None:
    at = 0 if frames.startswith(b"id:") else frames.find(b"\nid:") + 1
    return _id_at(frames, at) if frames.startswith(b"id:", at) else None


def _last_id(frames: bytes) -> bytes | None:
    at = frames.rfind(b"\nid:") + 1
    if at == 0 and not frames.startswith(b"id:"):
        return None
    return _id_at(frames, at)


def _id_at(frames: bytes, at: int) -> bytes:
    end = frames.find(b"\n", at)
    return frames[at + 3:end].strip()

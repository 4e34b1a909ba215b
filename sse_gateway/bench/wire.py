"""The load generator's side of the wire: a minimal HTTP/1.1 publisher and SSE subscriber.

Publishers use asyncio streams on keep-alive connections and send requests
encoded by hand. Subscribers are ``asyncio.Protocol`` objects rather than
stream readers: 10,000 of them must cost little, and at fan-out each one
parses up to ~100,000 events/s between them, so bytes are handled in
``data_received`` with no task per connection and no copy into a
``StreamReader``.

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
from urllib.parse import urlsplit

import orjson

PAD = b"x" * 58  # brings one payload to ~100 bytes
_EVENT = re.compile(rb'"n": ?(\d+), ?"t": ?(\d+)')
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


class Publisher:
    """One keep-alive connection that POSTs events and reads each answer before the next request."""

    def __init__(self, endpoint: Endpoint, envelope: bool) -> None:
        self.endpoint = endpoint
        self.envelope = envelope
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> Publisher:
        self.reader, self.writer = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
        return self

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def request(self, session: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            self.endpoint.path(session), self.endpoint.host_header, content_type, len(body), body)

    def event_body(self, n: int) -> bytes:
        data = payload(n)
        return b'{"data":%s}' % data if self.envelope else data

    def batch_body(self, first: int, count: int) -> bytes:
        return b"[" + b",".join(b'{"data":%s}' % payload(n) for n in range(first, first + count)) + b"]"

    async def publish(self, session: str, n: int) -> None:
        """Append event ``n``; returns when the server has answered 2xx."""
        await self.post(self.request(session, self.event_body(n)))

    async def post(self, request: bytes) -> bytes:
        if self.writer is None:
            await self.connect()
        self.writer.write(request)
        return await self.response()

    async def pipeline(self, requests: list[bytes]) -> None:
        """Send several requests before reading their answers (HTTP/1.1 pipelining keeps their order)."""
        if self.writer is None:
            await self.connect()
        self.writer.write(b"".join(requests))
        for _ in requests:
            await self.response()

    async def response(self) -> bytes:
        """Read one response; its body if the status is 2xx, else ``HTTPError``."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            if _CHUNKED.search(head):
                parts = []
                while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    parts.append(await self.reader.readexactly(size + 2))
                await self.reader.readuntil(b"\r\n")
                body = b"".join(p[:-2] for p in parts)
            else:
                m = _CONTENT_LENGTH.search(head)
                body = await self.reader.readexactly(int(m.group(1))) if m else b""
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            self.close()
            raise HTTPError(f"connection broken: {exc!r}") from None
        status = int(head[9:12])
        if not 200 <= status < 300:
            raise HTTPError(f"{status}: {body[:200]!r}")
        return body

    async def ndjson(self, session: str, until: float, lines_per_chunk: int = 100) -> int:
        """Stream NDJSON events until loop time ``until``; the number of ids the server confirmed."""
        if self.writer is None:
            await self.connect()
        # A small send buffer keeps what is written but not yet read by the server (which the
        # response waits for) to ~64 KiB, instead of the megabytes the kernel would accept.
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        loop = asyncio.get_running_loop()
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/x-ndjson\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" % (self.endpoint.path(session),
                                                                    self.endpoint.host_header))
        n = 0
        while loop.time() < until:
            chunk = b"".join(b'{"data":%s}\n' % payload(i) for i in range(n, n + lines_per_chunk))
            n += lines_per_chunk
            self.writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await self.writer.drain()
        self.writer.write(b"0\r\n\r\n")
        return len(orjson.loads(await self.response())["ids"])


class Group:
    """The subscribers of one scenario: what they expect, and what they saw.

    Waiting is counted, not scanned: a member reports when it opens (its
    response head arrived), reaches its final event or fails, so waiting for
    1,000 subscribers costs nothing per delivered event.
    """

    def __init__(self, endpoint: Endpoint, *, last_event_id_style: str = "header", latencies: bool = False,
                 max_reconnects: int = 5) -> None:
        self.endpoint = endpoint
        self.style = last_event_id_style
        self.latencies: list[int] | None = [] if latencies else None
        self.max_reconnects = max_reconnects
        self.members: list[Subscriber] = []
        self.opened = 0
        self.settled = 0  # members that reached their final event or failed
        self.reconnects = 0
        self.failures: list[str] = []
        self.closing = False
        self._waiters: list[tuple[asyncio.Future, object]] = []

    def subscribe(self, session: str, first_n: int = 0) -> Subscriber:
        sub = Subscriber(self, session, first_n)
        self.members.append(sub)
        return sub

    async def open_all(self, subs: list[Subscriber] | None = None, concurrency: int = 200) -> None:
        """Connect ``subs`` (default: every member), at most ``concurrency`` connects in flight."""
        gate = asyncio.Semaphore(concurrency)

        async def one(sub: Subscriber) -> None:
            async with gate:
                await sub.open()

        await asyncio.gather(*(one(s) for s in (self.members if subs is None else subs)))

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

    def __init__(self, group: Group, session: str, first_n: int) -> None:
        self.group = group
        self.session = session
        self.next_n = first_n
        self.final_n: int | None = None
        self.reached = False
        self.received = 0
        self.exact = True
        self.closed = False
        self.failed = False
        self.first_id: bytes | None = None
        self.last_id: bytes | None = None
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
        g = self.group
        path = g.endpoint.path(self.session)
        extra = b""
        if last_event_id is not None:
            if g.style == "query":
                path += (b"&" if b"?" in path else b"?") + b"last_event_id=" + last_event_id
            else:
                extra = b"Last-Event-ID: " + last_event_id + b"\r\n"
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self, g.endpoint.host, g.endpoint.port)
        except OSError as exc:
            self._fail(f"{self.session}: connect failed: {exc!r}")
            return
        self.transport.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n"
                             b"Cache-Control: no-cache\r\n%s\r\n" % (path, g.endpoint.host_header, extra))

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
            self._frames(data)

    def _dechunk(self, data: bytes) -> bytes:
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
        lf = buf.rfind(b"\n\n")
        crlf = buf.rfind(b"\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
        if end == 0:
            self._sse = buf
            return
        frames, self._sse = buf[:end], buf[end:]
        hits = _EVENT.findall(frames)
        if not hits:
            return
        if self.first_id is None:
            self.first_id = _first_id(frames)
        self.last_id = _last_id(frames) or self.last_id
        start = self.next_n
        ns = [int(n) for n, _ in hits]
        if ns != list(range(start, start + len(ns))):
            self.exact = False
        self.next_n = ns[-1] + 1
        self.received += len(ns)
        lat = self.group.latencies
        if lat is not None:
            now = time.monotonic_ns()
            lat.extend(now - int(t) for _, t in hits)
        if not self.reached and self.final_n is not None and self.next_n > self.final_n:
            self._set_reached(True)


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

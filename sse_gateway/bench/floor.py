"""The floor: the least work a server can do for the bench's publish and stream URLs.

A raw asyncio protocol (uvloop when installed) that keeps each session's
events in memory, encodes each event to its SSE frame once and writes
pre-encoded bytes straight to every subscriber's transport: no framework,
no durability, no flow control, no chunked encoding. Whatever the bench
measures against it is the load generator's ceiling, so a figure near the
floor's is limited by the client, not by the server under test.

It speaks the gateway's shapes: ``POST /v1/sessions/{s}/events`` with a JSON
object, a JSON array or an NDJSON (chunked) body, and
``GET /v1/sessions/{s}/stream`` with ``Last-Event-ID`` (a bare integer).

    python -m sse_gateway.bench.floor --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
from urllib.parse import parse_qs, urlsplit

import orjson

_STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Connection: close\r\n\r\n")


class Session:
    __slots__ = ("frames", "subscribers")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.subscribers: set[asyncio.Transport] = set()

    def append(self, items: list) -> list[int]:
        first = len(self.frames) + 1
        frames = [b"id: %d\ndata: %s\n\n" % (first + i, orjson.dumps(item["data"])) for i, item in enumerate(items)]
        self.frames.extend(frames)
        out = b"".join(frames)
        for transport in self.subscribers:
            transport.write(out)
        return list(range(first, first + len(frames)))


SESSIONS: dict[str, Session] = {}


def session_of(path: str) -> tuple[str, str]:
    """``(session, "events" | "stream")`` for the two routes; ``("", "")`` otherwise."""
    parts = path.split("/")
    if len(parts) == 5 and parts[:3] == ["", "v1", "sessions"] and parts[4] in ("events", "stream"):
        return parts[3], parts[4]
    return "", ""


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.streaming: Session | None = None
        self.ndjson: tuple[Session, list[int]] | None = None  # a chunked body being read
        self.chunk_left = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.subscribers.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.streaming is not None:
            return
        self.buf += data
        while self.buf:
            if self.ndjson is not None:
                if not self._read_ndjson():
                    return
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            body_at = end + 4
            url = urlsplit(target)
            name, route = session_of(url.path)
            if method == "GET" and route == "stream":
                self.buf = b""
                self._stream(name, headers, parse_qs(url.query))
                return
            if method != "POST" or route != "events":
                self.buf = self.buf[body_at:]
                self._respond(b"404 Not Found", b'{"error":{"code":"not_found","message":"no route"}}')
                continue
            session = SESSIONS.setdefault(name, Session())
            if headers.get("transfer-encoding", "").lower() == "chunked":
                self.buf = self.buf[body_at:]
                self.ndjson = (session, [])
                continue
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < body_at + length:
                return
            body, self.buf = self.buf[body_at:body_at + length], self.buf[body_at + length:]
            value = orjson.loads(body)
            ids = session.append(value if isinstance(value, list) else [value])
            self._respond(b"201 Created", orjson.dumps({"ids": ids} if isinstance(value, list) else {"id": ids[0]}))

    def _read_ndjson(self) -> bool:
        """Consume chunked NDJSON from ``buf``; False when more bytes are needed."""
        session, ids = self.ndjson
        while True:
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                return False
            size = int(self.buf[:eol].split(b";")[0], 16)
            if size == 0:
                if len(self.buf) < eol + 4:
                    return False
                self.buf = self.buf[eol + 4:]
                self.ndjson = None
                self._respond(b"201 Created", orjson.dumps({"ids": ids}))
                return True
            if len(self.buf) < eol + 2 + size + 2:
                return False
            chunk = self.buf[eol + 2:eol + 2 + size]
            self.buf = self.buf[eol + 2 + size + 2:]
            ids.extend(session.append([orjson.loads(line) for line in chunk.split(b"\n") if line.strip()]))

    def _stream(self, name: str, headers: dict, query: dict) -> None:
        cursor = headers.get("last-event-id") or query.get("last_event_id", ["0"])[0]
        session = SESSIONS.setdefault(name, Session())
        self.streaming = session
        self.transport.write(_STREAM_HEAD + b"".join(session.frames[int(cursor.split(":")[0]):]))
        session.subscribers.add(self.transport)

    def _respond(self, status: bytes, body: bytes) -> None:
        self.transport.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, len(body), body))


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Connection, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()

"""Quiet streams: heartbeats from one tick of the hub, one task each, and little memory.

Through real sockets, the chunked body decoded strictly: a heartbeat reaches a
quiet stream as a chunk of its own and the events around it keep their
framing; many quiet streams each get theirs; a quiet stream is one task, and
ends as soon as its client leaves. In process, with a transport that records
what is written to it: the tick writes to a stream's transport only while the
stream waits and nothing of its connection is unsent; otherwise the stream
sends the ping itself through the server, where the watchdog sees a send that
does not finish. Without the transport a stream keeps its own timer.
"""

from __future__ import annotations

import asyncio
import re
import socket

import httpx
import pytest
import uvicorn
from util import WAIT_TIMEOUT, await_until, metric

from sse_gateway.app import create_app
from sse_gateway.config import Settings
from sse_gateway.hub import Hub
from sse_gateway.log.memory import MemoryLog
from sse_gateway.metrics import Stats
from sse_gateway.models import NewEvent
from sse_gateway.protocol import TRANSPORT_EXTENSION, GatewayProtocol, gateway_protocol
from sse_gateway.sse import PING
from sse_gateway.stream import EventStream

pytestmark = pytest.mark.timeout(60)

PING_CHUNK = b"7\r\n: ping\n\r\n"  # what uvicorn writes for a body of PING
HEAD_END = b"\r\n\r\n"


def take_chunks(buf: bytes) -> tuple[list[bytes], bytes]:
    """The whole chunks at the start of a chunked body, and the rest; anything but chunked framing fails."""
    chunks = []
    while True:
        size_line, sep, rest = buf.partition(b"\r\n")
        if not sep:
            return chunks, buf
        assert re.fullmatch(rb"[0-9a-f]+", size_line), f"not a chunk size: {size_line[:40]!r}"
        size = int(size_line, 16)
        if len(rest) < size + 2:
            return chunks, buf
        assert rest[size:size + 2] == b"\r\n", f"chunk of {size} bytes not followed by CRLF: {rest[:size + 8]!r}"
        chunks.append(rest[:size])
        buf = rest[size + 2:]
        if size == 0:
            return chunks, buf


class ChunkedStream:
    """A stream read on a raw socket: its status line and headers, then each chunk of its body, whole."""

    def __init__(self, port: int, session: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT)
        self.sock.sendall(f"GET /v1/sessions/{session}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.head = b""
        self.chunks: list[bytes] = []
        self._buf = b""

    def read_until(self, done, what: str) -> None:
        while not done():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"waited {WAIT_TIMEOUT:g} s for {what}; chunks: {self.chunks!r}") from None
            assert data, f"the stream ended before {what}: {self.chunks!r}"
            self._buf += data
            if not self.head:
                head, sep, self._buf = self._buf.partition(HEAD_END)
                if not sep:
                    self._buf = head
                    continue
                self.head = head
            got, self._buf = take_chunks(self._buf)
            self.chunks += got

    def close(self) -> None:
        self.sock.close()


def test_a_heartbeat_is_a_chunk_of_its_own_between_whole_frames(gateway, client):
    assert client.post("/v1/sessions/quiet/events", json={"data": "before"}).status_code == 201
    stream = ChunkedStream(gateway.port, "quiet")
    try:
        stream.read_until(lambda: stream.chunks.count(PING) >= 2, "two heartbeats")
        assert b"transfer-encoding: chunked" in stream.head.lower()
        assert client.post("/v1/sessions/quiet/events", json={"data": "after"}).status_code == 201
        stream.read_until(lambda: any(b"id: 2:" in c for c in stream.chunks), "the event after the silence")
    finally:
        stream.close()
    assert stream.chunks[0].startswith(b"retry: ") and stream.chunks[0].endswith(b"\n\n")
    assert stream.chunks[1].startswith(b"id: 1:") and b'data: "before"\n\n' in stream.chunks[1]
    for chunk in stream.chunks[2:-1]:
        assert chunk == PING, stream.chunks  # each ping alone in its chunk, nothing else in the silence
    assert stream.chunks[-1].startswith(b"id: 2:") and stream.chunks[-1].endswith(b'data: "after"\n\n')
    assert asyncio.run(metric(gateway.url, "sse_gateway_heartbeats_total")) >= 2


async def test_many_quiet_streams_each_get_their_heartbeats(start_gateway):
    gw = start_gateway("--heartbeat", "1")
    streams = 200
    async with httpx.AsyncClient(base_url=gw.url) as c:
        for k in range(4):
            assert (await c.post(f"/v1/sessions/many{k}/events", json={"data": k})).status_code == 201

    async def one(k: int) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(f"GET /v1/sessions/many{k % 4}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        try:
            buf = await reader.readuntil(HEAD_END)
            assert b" 200 " in buf.split(b"\r\n")[0], buf
            chunks: list[bytes] = []
            buf = b""
            while chunks.count(PING) < 2:
                data = await reader.read(65536)
                assert data, f"stream {k} ended: {chunks!r}"
                got, buf = take_chunks(buf + data)
                chunks += got
            return chunks
        finally:
            writer.transport.abort()

    got = await asyncio.wait_for(asyncio.gather(*(one(k) for k in range(streams))), WAIT_TIMEOUT)
    for chunks in got:
        assert chunks[0].startswith(b"retry: ") and chunks[1].startswith(b"id: 1:")
        assert set(chunks[2:]) == {PING}, chunks
    assert await metric(gw.url, "sse_gateway_heartbeats_total") >= 2 * streams


async def test_a_quiet_stream_is_one_task_and_ends_as_soon_as_its_client_leaves(start_gateway):
    gw = start_gateway("--heartbeat", "1")
    async with httpx.AsyncClient(base_url=gw.url) as c:
        assert (await c.post("/v1/sessions/leaving/events", json={"data": 1})).status_code == 201
    before = await metric(gw.url, "sse_gateway_asyncio_tasks")
    clients = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /v1/sessions/leaving/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await reader.readuntil(b"id: 1:")
        clients.append(writer)
    await await_until(lambda: metric(gw.url, "sse_gateway_open_streams"), what="the streams to be counted")
    assert await metric(gw.url, "sse_gateway_open_streams") == 50
    tasks = await metric(gw.url, "sse_gateway_asyncio_tasks") - before
    assert 50 <= tasks < 100, f"{tasks:g} tasks for 50 quiet streams: one each, no watcher beside it"
    for i, writer in enumerate(clients):  # half reset, half closed
        writer.transport.abort() if i % 2 else writer.close()

    async def all_gone() -> bool:
        return (await metric(gw.url, "sse_gateway_open_streams") == 0
                and await metric(gw.url, "sse_gateway_asyncio_tasks") <= before)

    await await_until(all_gone, what="every stream and its task to end once its client left")


async def test_a_connection_keeps_the_instance_dict_uvicorn_shares_between_connections():
    """A dict shares its keys with the other instances' only while it has fewer than 30 (CPython 3.11):
    the gateway's attributes of the protocol live in slots, or every connection pays ~1.2 KB more."""
    app = create_app(Settings(backend="memory", heartbeat=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, http=gateway_protocol(10),
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    writer = None
    try:
        await await_until(lambda: server.started, what="uvicorn to start")
        await app.state.gw.log.append("s", [NewEvent("message", "1")])
        reader, writer = await asyncio.open_connection("127.0.0.1", server.servers[0].sockets[0].getsockname()[1])
        writer.write(b"GET /v1/sessions/s/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await reader.readuntil(b"id: 1:")
        (protocol,) = server.server_state.connections
        assert isinstance(protocol, GatewayProtocol) and protocol.on_lost is not None
        assert len(vars(protocol)) < 30, sorted(vars(protocol))
    finally:
        if writer is not None:
            writer.transport.abort()  # uvicorn's shutdown waits for the stream to end
        server.should_exit = True
        await serving


# -- in process: what the tick writes, and where ------------------------------------------------


class Transport:
    """The connection as a stream sees it: what is written to it, and how many bytes it holds unsent."""

    def __init__(self, unsent: int = 0) -> None:
        self.written: list[bytes] = []
        self.unsent = unsent
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return self.aborted

    def get_extra_info(self, name: str, default=None):
        return default

    def abort(self) -> None:
        self.aborted = True


class Server:
    """The ASGI side of one stream: the bodies it sends; ``hold`` makes a send never finish (its connection
    does not drain), like uvicorn's while the transport is paused."""

    def __init__(self, hold=lambda body: False) -> None:
        self.bodies: list[bytes] = []
        self.hold = hold

    async def send(self, message) -> None:
        body = message.get("body", b"")
        if self.hold(body):
            await asyncio.Event().wait()
        if body:
            self.bodies.append(body)


async def never_disconnect():
    await asyncio.Event().wait()


class Streams:
    """Streams of session ``s`` on a hub whose heartbeat tick runs every 1/4 of their 50 ms heartbeat."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.stats = hub.stats
        self.tasks: list[asyncio.Task] = []

    def serve(self, server: Server, transport: Transport | None) -> asyncio.Task:
        scope = {"type": "http", "method": "GET", "path": "/v1/sessions/s/stream", "headers": [],
                 "query_string": b""}
        if transport is not None:
            scope["extensions"] = {TRANSPORT_EXTENSION: {"transport": transport}}
        stream = EventStream(self.hub, "s", 0, None, prelude=b"retry: 1000\n\n", live=True, heartbeat=0.05,
                             stats=self.stats)
        self.tasks.append(asyncio.create_task(stream(scope, never_disconnect, server.send)))
        return self.tasks[-1]


@pytest.fixture
async def streams():
    log = MemoryLog()
    await log.open()
    await log.create_session("s")
    hub = Hub(log, Stats())
    tick = asyncio.create_task(hub.send_heartbeats(0.05))
    harness = Streams(hub)
    yield harness
    hub.shutdown()
    for task in [tick, *harness.tasks]:
        task.cancel()
    await asyncio.gather(tick, *harness.tasks, return_exceptions=True)
    await log.close()


async def test_the_tick_writes_a_waiting_streams_ping_to_its_transport_as_one_chunk(streams):
    server, transport = Server(), Transport()
    streams.serve(server, transport)
    await await_until(lambda: len(transport.written) >= 3, what="three heartbeats written by the tick")
    assert set(transport.written) == {PING_CHUNK}
    assert server.bodies == [b"retry: 1000\n\n"]  # nothing went through the server but the prelude
    assert streams.stats.heartbeats == len(transport.written)


async def test_a_stream_whose_transport_holds_unsent_bytes_sends_its_own_ping(streams):
    server, transport = Server(), Transport(unsent=100)
    streams.serve(server, transport)
    await await_until(lambda: server.bodies.count(PING) >= 2, what="two heartbeats sent through the server")
    assert transport.written == []  # the tick never wrote to it
    assert streams.stats.heartbeats == server.bodies.count(PING)


async def test_a_stuck_client_is_cut_by_the_watchdog_and_never_written_to_by_the_tick(streams):
    server, transport = Server(hold=lambda body: body == PING), Transport(unsent=100)
    watchdog = asyncio.create_task(streams.hub.cut_slow_clients(0.2))
    try:
        task = streams.serve(server, transport)
        await await_until(lambda: streams.stats.slow_consumer_disconnects == 1, what="the watchdog to cut the stream")
        await task
    finally:
        watchdog.cancel()
    assert transport.aborted and transport.written == []
    assert streams.stats.heartbeats == 0  # its ping never went out


async def test_the_tick_never_writes_to_a_stream_in_the_middle_of_a_send(streams):
    stuck_server, stuck = Server(hold=lambda body: b"id: " in body), Transport()
    streams.serve(stuck_server, stuck)
    await streams.hub.log.append("s", [NewEvent("message", '"x"')])
    other = Transport()
    streams.serve(Server(), other)  # a quiet stream beside it: its heartbeats show the tick has run
    await await_until(lambda: len(other.written) >= 4, what="four heartbeats to the quiet stream")
    assert stuck.written == []
    assert stuck_server.bodies == [b"retry: 1000\n\n"]


async def test_without_the_transport_a_stream_sends_its_heartbeats_itself(streams):
    server = Server()
    streams.serve(server, None)
    await await_until(lambda: server.bodies.count(PING) >= 2, what="two heartbeats from the stream's own timer")

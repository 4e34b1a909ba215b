"""Publishes answered by the HTTP protocol itself (``fast_publish.py``) answer exactly as the route does.

Two gateways in this process, each behind uvicorn with the gateway's
protocol: one whose protocol takes plain publishes itself, one that hands
every request to the ASGI app. The same raw requests, byte for byte, go to
both; every answer (status, headers but the date, body) must be the same,
and the first gateway must have taken the requests it should (counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket

import httpx
import pytest
import uvicorn
from util import WAIT_TIMEOUT, await_until

from sse_gateway.app import create_app
from sse_gateway.config import Settings
from sse_gateway.fast_publish import FastPublisher
from sse_gateway.protocol import gateway_protocol

pytestmark = pytest.mark.timeout(60)

KEY = "k-publisher"
AUTH = f"Authorization: Bearer {KEY}\r\n"


@contextlib.asynccontextmanager
async def serving(fast: bool, **settings):
    app = create_app(Settings(backend="memory", publish_key=(KEY,), body_timeout=1, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                                           http=gateway_protocol(10, app if fast else None)))
    task = asyncio.create_task(server.serve())
    try:
        await await_until(lambda: server.started, what="uvicorn to start")
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One response: its status line, its headers but the date (sorted), its body (any epoch as E)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head).group(1))
    body = await reader.readexactly(length)
    lines = [line for line in head.split(b"\r\n") if line and not line.startswith(b"date:")]
    return b"\n".join(lines[:1] + sorted(lines[1:])) + b"\n\n" + re.sub(rb'"epoch":"\w+"', b'"epoch":"E"', body)


def publish(session: str, body: bytes | str, headers: str = "Content-Type: application/json\r\n",
            auth: str = AUTH, length: bool = True) -> bytes:
    body = body.encode() if isinstance(body, str) else body
    size = f"Content-Length: {len(body)}\r\n" if length else ""
    return (f"POST /v1/sessions/{session}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{headers}{size}\r\n"
            .encode() + body)


# (requests written at once, answers expected, whether the fast path takes the first)
EXCHANGES = [
    ([publish("s", '{"data": {"n": 1}}')], 1, True),
    ([publish("s", '{"data": "again", "idempotency_key": "a"}')], 1, True),
    ([publish("s", '{"data": "again", "idempotency_key": "a"}')], 1, True),  # 200: a repeat
    ([publish("s", '{"data": "h"}', "Content-Type: application/json\r\nIdempotency-Key: h\r\n")], 1, True),
    ([publish("s", "plain words", "Content-Type: text/plain; charset=utf-8\r\n")], 1, True),
    ([publish("s", '[{"data": 1}, {"event": "tick", "data": 2}]')], 1, True),
    ([publish("s", "[]")], 1, True),
    ([publish("s", '{"data": ')], 1, True),  # invalid JSON
    ([publish("s", "[" * 300 + "]" * 300)], 1, True),  # too deep
    ([publish("s", '{"data": 1, "bogus": 2}')], 1, True),
    ([publish("s", '{"data": "x"}', "Content-Type: application/json; charset=latin-1\r\n")], 1, True),
    ([publish("s", b"\xff\xfe", "Content-Type: text/plain\r\n")], 1, True),
    ([publish("s", '{"event": "gateway.end", "data": 1}')], 1, True),
    ([publish("s", '{"data": "%s"}' % ("x" * 70_000))], 1, True),  # larger than an event may be
    ([publish("s", '{"data": 1}', "Content-Type: application/json\r\nProducer-Epoch: 5\r\n")], 1, True),
    ([publish("s", '{"data": 1}', "Content-Type: application/json\r\nProducer-Epoch: 4\r\n")], 1, True),  # fenced
    ([publish("s", '{"data": 1}', "Content-Type: application/json\r\nConnection: close\r\n")], 1, True),
    # the usual way: refused by the headers, or not plain
    ([publish("s", '{"data": 1}', auth="")], 1, False),
    ([publish("s", '{"data": 1}', auth="Authorization: Bearer wrong\r\n")], 1, False),
    ([publish("s", "x", "Content-Type: application/xml\r\n")], 1, False),
    ([publish("bad!id", '{"data": 1}')], 1, False),
    ([publish("s", '{"data": 1}', "Content-Type: application/json\r\nProducer-Epoch: -1\r\n")], 1, False),
    ([publish("s", '{"data": 1}', f"Content-Type: application/json\r\nIdempotency-Key: {'k' * 1000}\r\n")], 1, False),
    ([publish("s", b"x" * 200_000, "Content-Type: text/plain\r\n")], 1, False),  # beyond --max-body-bytes
    ([publish("s", '{"data": 1}\n', "Content-Type: application/x-ndjson\r\n")], 1, False),
    ([publish("s", '{"data": 1}', "Content-Type: application/json\r\nOrigin: http://127.0.0.1\r\n")], 1, False),
    ([publish("s", '{"data": 1}').replace(b"events HTTP", b"events?event=x HTTP")], 1, False),
    # pipelined: answered in order, the first 32 in flight at once, the rest the usual way as answers go out
    ([b"".join(publish("p", '{"data": %d}' % i) for i in range(40))], 40, True),
    ([publish("p", "<x/>", "Content-Type: text/xml\r\n") + publish("p", '{"data": 2}')], 2, False),
    ([publish("p", '{"data": 1}', "Content-Type: application/json\r\nOrigin: http://127.0.0.1\r\n")
      + publish("p", '{"data": 2}')], 2, False),
]


async def exchange(port: int, requests: list[bytes], answers: int) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request in requests:
            writer.write(request)
        return [await read_answer(reader) for _ in range(answers)]
    finally:
        writer.close()


async def test_every_answer_is_the_routes_and_plain_publishes_take_the_fast_path(monkeypatch):
    taken: list[bool] = []
    take = FastPublisher.take

    def counting(self, proto):
        fast = take(self, proto)
        taken.append(fast is not None)
        return fast

    monkeypatch.setattr(FastPublisher, "take", counting)
    async with serving(True, max_body_bytes=100_000, max_event_bytes=65536) as fast_port, \
            serving(False, max_body_bytes=100_000, max_event_bytes=65536) as usual_port:
        for requests, answers, fast in EXCHANGES:
            taken.clear()
            got = await exchange(fast_port, requests, answers)
            assert taken[:1] == [fast], requests[0][:200]
            assert got == await exchange(usual_port, requests, answers), requests[0][:200]


async def test_a_body_in_pieces_is_appended_whole_and_a_body_too_slow_is_408():
    async with serving(True) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = publish("s", '{"data": "in three pieces"}')
        for piece in (request[:-20], request[-20:-8], request[-8:]):
            writer.write(piece)
            await writer.drain()
        assert b'"id":1' in await read_answer(reader)
        writer.write(publish("s", '{"data": "never finished"}')[:-5])  # the rest never comes
        answer = await read_answer(reader)
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer and b"connection: close" in answer
        assert await reader.read() == b""  # and the connection is closed
        writer.close()


@pytest.mark.timeout(180)  # the flood itself takes a while on a busy machine
def test_a_client_that_pipelines_without_reading_is_not_read_either(start_gateway):
    """A publisher that sends request after request and reads no answer: the gateway stops reading it once
    answers wait to be sent, so what it holds for the client does not grow with what the client sends; the
    requests it took are answered in order."""
    gw = start_gateway()
    request = publish("flood", '{"data": "x"}', auth="")
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=WAIT_TIMEOUT)
    try:
        sock.setblocking(False)
        # 260 MB of requests: far beyond what the kernel's buffers (here up to 32 + 4 MB) and the gateway hold
        sent, limit = 0, 2_000_000
        while sent < limit:
            try:
                n = sock.send(request)
            except BlockingIOError:
                break
            sent += 1
            if n < len(request):  # the rest of a request the buffers took only in part
                sock.setblocking(True)
                sock.sendall(request[n:])
                sock.setblocking(False)
        assert sent < limit, "the gateway kept reading requests whose answers nobody read"
        sock.setblocking(True)
        answers, buffered = 0, b""
        while answers < 300:  # (not all: they are appended one after another, a commit each)
            buffered += sock.recv(1 << 16)
            *whole, buffered = buffered.split(b"HTTP/1.1 ")
            for answer in whole:
                if answer:
                    answers += 1
                    assert answer.startswith(b"201") and b'"id":%d,' % answers in answer, answer
    finally:
        sock.close()
    assert httpx.get(f"{gw.url}/healthz").status_code == 200

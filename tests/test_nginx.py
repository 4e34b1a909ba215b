"""A real nginx, configured from deploy/nginx.conf, in front of a real gateway.

The stream is read over one raw TCP socket with the chunked body decoded
by hand, so the test sees every heartbeat, knows the connection never
changed, and can tell a stream nginx cut from one that is merely quiet.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Callable

import httpx
import pytest

from util import WAIT_TIMEOUT, await_until, metric, read_stream

pytestmark = pytest.mark.system  # nginx in front of real gateways

SILENCE = 10.0  # seconds in which nothing is published
READ_TIMEOUT = 3  # nginx's proxy_read_timeout in these tests, in seconds


@pytest.fixture
def start_nginx(nginx) -> Callable[..., int]:
    """``start_nginx(*upstream_ports, read_timeout="3s")`` runs nginx in the foreground; returns its port."""

    def start(*upstream_ports: int, read_timeout: str = f"{READ_TIMEOUT}s") -> int:
        return nginx.start(*upstream_ports, read_timeout=read_timeout)

    return start


class RawStream:
    """One HTTP/1.1 GET on one TCP connection; the chunked response body is decoded as it arrives."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Accept: text/event-stream",
                 "Accept-Encoding: gzip", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.local_address = self.sock.getsockname()
        self.pending = b""
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.ended = False  # the connection closed, or the response finished

    def close(self) -> None:
        self.sock.close()

    def read_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done() and not self.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._receive(left)
        return done()

    def read_for(self, seconds: float) -> None:
        self.read_until(lambda: False, seconds)

    def _receive(self, timeout: float) -> None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return
        try:
            data = self.sock.recv(65536)
        except ConnectionError:
            data = b""
        if not data:
            self.ended = True
            return
        self.pending += data
        self._decode()

    def _decode(self) -> None:
        if self.status is None:
            head, sep, rest = self.pending.partition(b"\r\n\r\n")
            if not sep:
                return
            status_line, *fields = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split()[1])
            self.headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
            assert self.headers.get("transfer-encoding") == "chunked", self.headers
            self.pending = rest
        while True:
            size_line, sep, rest = self.pending.partition(b"\r\n")
            if not sep:
                return
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                return
            self.body += rest[:size]
            self.pending = rest[size + 2:]
            if size == 0:
                self.ended = True
                return


def counter(gateway_url: str, name: str) -> float:
    for line in httpx.get(f"{gateway_url}/metrics").text.splitlines():
        if line.startswith(f"sse_gateway_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric sse_gateway_{name}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("heartbeat, survives", [(1, True), (6, False)], ids=["heartbeat-1s", "heartbeat-6s"])
def test_quiet_stream_survives_nginx_read_timeout_only_with_heartbeats(start_gateway, start_nginx, tmp_path,
                                                                        heartbeat, survives):
    gw = start_gateway("--heartbeat", str(heartbeat))
    port = start_nginx(gw.port)
    httpx.post(f"{gw.url}/v1/sessions/quiet/events", json={"data": "before the silence"}).raise_for_status()

    stream = RawStream(port, "/v1/sessions/quiet/stream")
    try:
        assert stream.read_until(lambda: b"id: 1:" in stream.body, WAIT_TIMEOUT), stream.body
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in stream.headers, "nginx compressed the event stream"
        mark, started = len(stream.body), time.monotonic()
        if survives:
            stream.read_for(SILENCE)  # the silence is what is tested: over three of nginx's read timeouts
        else:
            stream.read_until(lambda: stream.ended, WAIT_TIMEOUT)  # until nginx cuts it
        quiet_for = time.monotonic() - started
        pings = stream.body[mark:].count(b": ping")

        if survives:
            assert not stream.ended, f"nginx cut the stream after {quiet_for:.1f}s despite heartbeats"
            # at least one heartbeat in every read-timeout window, or nginx would have cut the stream
            assert pings >= int(SILENCE / READ_TIMEOUT), f"only {pings} heartbeats in {quiet_for:.1f}s"
            httpx.post(f"{gw.url}/v1/sessions/quiet/events", json={"data": "after the silence"}).raise_for_status()
            assert stream.read_until(lambda: b"id: 2:" in stream.body, WAIT_TIMEOUT), \
                "the event after the silence never came"
            assert not stream.ended
            assert stream.sock.getsockname() == stream.local_address
            assert counter(gw.url, "streams_opened_total") == 1, "the gateway saw the stream reconnect"
        else:
            assert stream.ended, "a stream quiet for longer than proxy_read_timeout was not cut: is the test real?"
            assert pings == 0
            # cut by nginx's read timeout, not for another reason
            assert "upstream timed out" in (tmp_path / "error.log").read_text()
        print(f"heartbeat {heartbeat}s: {pings} heartbeats in {quiet_for:.1f}s of silence, "
              f"{'same connection' if survives else 'cut by nginx'}")
    finally:
        stream.close()


@pytest.mark.timeout(60)
async def test_exact_resume_through_nginx(start_gateway, start_nginx):
    total, cursor = 500, 200
    gw = start_gateway("--heartbeat", "1")
    port = start_nginx(gw.port)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        resp = await client.post("/v1/sessions/through/events", json=[{"data": {"n": n}} for n in range(1, total + 1)])
        assert resp.status_code == 201, resp.text
        epoch = (await client.get("/v1/sessions/through")).json()["epoch"]
    got = await read_stream(f"http://127.0.0.1:{port}", "through", headers={"Last-Event-ID": f"{cursor}:{epoch}"},
                            params={"live": "false"}, timeout=30)
    assert got.ids == list(range(cursor + 1, total + 1)), "Last-Event-ID did not survive nginx"
    assert got.data == [f'{{"n":{n}}}' for n in range(cursor + 1, total + 1)]
    assert got.notices == []


@pytest.mark.timeout(120)
async def test_a_node_killed_behind_the_shipped_nginx_loses_no_stream_and_no_publish(redis_server, start_gateway,
                                                                                     start_nginx):
    """The compose topology without Docker: two gateways on one Redis behind deploy/nginx.conf. Ten
    streams and four publishers go through nginx; one gateway is killed with -9 mid-run. Streams it
    held reconnect through nginx to the other with their Last-Event-ID; publishes cut by the kill
    (502) are retried with their Idempotency-Key. Every stream ends with exactly ids 1..N, each
    event once, each publisher's events in its order."""
    total, kill_at, streams, publishers = 400, 150, 10, 4
    a, b = (start_gateway("--backend", "redis", "--redis-url", redis_server, "--heartbeat", "1") for _ in range(2))
    base = f"http://127.0.0.1:{start_nginx(a.port, b.port, read_timeout='5m')}"
    acked, retried = [], 0
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        assert (await client.post("/v1/sessions", json={"id": "fo"})).status_code == 201
        readers = asyncio.gather(*(read_stream(base, "fo", until_id=total, timeout=90, retry_statuses=(502, 503))
                                   for _ in range(streams)))
        async def all_open() -> bool:
            return (await client.get("/v1/sessions/fo")).json()["subscribers"] >= streams

        await await_until(all_open, what=f"{streams} streams to open through nginx")
        on_a = await metric(a.url, "sse_gateway_open_streams")
        assert 1 <= on_a < streams, f"nginx (least_conn) put {on_a:.0f} of {streams} streams on the node to kill"

        async def publish(p: int) -> None:
            nonlocal retried
            for n in range(p, total, publishers):
                attempts = 0
                while True:
                    attempts += 1
                    try:
                        r = await client.post("/v1/sessions/fo/events", json={"data": [p, n]},
                                              headers={"Idempotency-Key": f"k{n}"})
                    except httpx.TransportError:
                        r = None
                    if r is not None and r.status_code == 201:
                        break
                    if r is not None and r.status_code == 200 and attempts > 1:
                        break  # an earlier attempt was written, its reply lost: the key answers with its id
                    assert r is None or r.status_code in (502, 503), r.text
                    retried += 1
                    await asyncio.sleep(0.05)
                acked.append(n)
                if len(acked) == kill_at:
                    a.kill()
                await asyncio.sleep(0.002)

        await asyncio.gather(*(publish(p) for p in range(publishers)))
        got = await readers
    for stream in got:
        assert stream.ids == list(range(1, total + 1))
        data = [json.loads(d) for d in stream.data]
        assert sorted(n for _, n in data) == list(range(total))  # each event once
        for p in range(publishers):
            assert [n for q, n in data if q == p] == list(range(p, total, publishers))
    reconnected = sum(stream.connects > 1 for stream in got)
    assert reconnected >= on_a, (reconnected, on_a)
    print(f"{on_a:.0f} of {streams} streams were on the killed node and resumed on the other; "
          f"{retried} publish attempts retried")

"""Slow consumers on a real gateway: a cut client gives back its memory and its socket at once.

Clients that never read (a 4 KiB receive buffer) open streams of a session
of large events. The watchdog (``--send-timeout``) cuts each one; the cut
must abort the connection (the client sees a reset, the gateway's file
descriptor is gone) and leave nothing of it in memory, however large the
events: the gateway's RSS stays within a bound derived from the sizes
across several waves of such clients.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import httpx
import pytest

from sse_gateway.hub import CHUNK_BYTES, FILL_FIRST, WINDOW_BYTES
from sse_gateway.routes.stream import HISTORY_BYTES
from util import read_stream

pytestmark = pytest.mark.timeout(120)

EVENT_BYTES = 1_000_000  # data of one event (under --max-event-bytes, 1 MiB)
EVENTS = 40  # so a whole replay is 40 MB: what one client used to pin
CLIENTS = 5  # per wave
WAVES = 6  # after the first, whose peak sets the baseline
CHUNK = 1 << 20  # stream.py / hub.py CHUNK_BYTES: the most one write leaves in a transport


def wait_until(check: Callable[[], object], what: str, timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def rss(pid: int, kind: str = "RssAnon") -> int:
    """Resident memory of the process: ``RssAnon`` leaves out the SQLite readers' mapped file (mmap_size)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {kind}")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stuck_client(port: int, session: str) -> socket.socket:
    """A stream whose client reads nothing: its receive buffer is 4 KiB and never drained."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET /v1/sessions/{session}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return s


def drain_to_end(s: socket.socket, most: int, timeout: float = 10.0) -> tuple[int, str]:
    """Read what is left on a cut client's socket: how many bytes came before the end, and which end."""
    s.settimeout(0.5)
    got = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and got <= most:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return got, "reset"
        except TimeoutError:
            continue
        if not chunk:
            return got, "closed"
        got += len(chunk)
    return got, "open"


def test_a_cut_slow_client_leaves_no_socket_and_no_memory(start_gateway):
    gw = start_gateway("--send-timeout", "1", "--heartbeat", "1")
    pid = gw.proc.pid
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        for i in range(EVENTS):
            r = c.post("/v1/sessions/big/events", json={"data": chr(ord("a") + i % 26) * EVENT_BYTES})
            assert r.status_code == 201, r.text

        def cuts() -> int:
            for line in c.get("/metrics").text.splitlines():
                if line.startswith("sse_gateway_slow_consumer_disconnects_total "):
                    return int(float(line.split()[1]))
            raise AssertionError("no slow_consumer_disconnects metric")

        assert c.get("/v1/sessions/big/events", params={"limit": 1}).status_code == 200  # readers opened
        base_fds, base_rss = fds(pid), rss(pid)
        # What one wave may use for a moment, and the allocator may keep: the shared read of the first
        # FILL_FIRST events and their frames, the channel's window (trimmed at 2 x WINDOW_BYTES), and
        # for each client one write (at most CHUNK_BYTES, or one event) and its copies on the way to
        # the socket. It does not depend on how many waves came before: a cut client leaves nothing.
        # (Before, each cut client kept its whole replay, EVENTS x EVENT_BYTES = 40 MB, while connected.)
        write = max(CHUNK_BYTES, EVENT_BYTES)
        wave_footprint = 2 * FILL_FIRST * EVENT_BYTES + 2 * WINDOW_BYTES + write + CLIENTS * 4 * write
        after: list[int] = []  # RSS after each wave
        for wave in range(WAVES):
            clients = [stuck_client(gw.port, "big") for _ in range(CLIENTS)]
            wait_until(lambda: cuts() >= CLIENTS * (wave + 1), f"wave {wave}: the watchdog cuts {CLIENTS} streams")
            # The gateway's side of each connection is gone at once, not when the client leaves.
            wait_until(lambda: fds(pid) <= base_fds,
                       f"wave {wave}: the gateway's file descriptors back to {base_fds} (has {fds(pid)})")
            for s in clients:
                got, end = drain_to_end(s, most=4 * CHUNK_BYTES)
                # The client sees the connection reset after at most what was in flight, never the replay.
                assert end in ("reset", "closed") and got <= 4 * CHUNK_BYTES, (wave, got, end)
                s.close()
            assert c.get("/v1/sessions/big").json()["subscribers"] == 0
            after.append(rss(pid))
        # After every wave, back within one wave's footprint: what a wave allocated may stay with the
        # allocator for a while (under load one wave was seen 4 MB above it until the next waves reused
        # it), but a cut client that kept anything would leave the process 5 x 40 MB larger per wave.
        wait_until(lambda: rss(pid) - base_rss <= wave_footprint,
                   f"RssAnon back within one wave's footprint, {wave_footprint / 1e6:.0f} MB above "
                   f"{base_rss / 1e6:.0f} MB, after {WAVES} waves of {CLIENTS} cut clients (after each wave: "
                   f"{[round((r - base_rss) / 1e6) for r in after]} MB above it)")


async def test_large_events_are_read_in_bounded_pieces_and_arrive_whole(start_gateway):
    """History answers stop at HISTORY_BYTES of data (``next_after`` goes on); a stream replays large
    events in writes of at most CHUNK_BYTES, an event larger than that in slices, and nothing is lost."""
    gw = start_gateway("--max-event-bytes", str(3 << 20))
    sizes = [EVENT_BYTES] * 9 + [int(2.5 * CHUNK_BYTES)] + [10] * 300 + [EVENT_BYTES] * 3
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        for i, n in enumerate(sizes):
            r = await c.post("/v1/sessions/large/events", json={"data": chr(ord("a") + i % 26) * n})
            assert r.status_code == 201, r.text
        pages, after = [], 0
        while after < len(sizes):
            body = (await c.get("/v1/sessions/large/events", params={"after": after, "limit": 1000})).json()
            ids = [e["id"] for e in body["events"]]
            assert ids == list(range(after + 1, body["next_after"] + 1))
            data = sum(len(e["data"]) for e in body["events"])
            assert len(ids) == 1 or data <= HISTORY_BYTES, (ids, data)
            assert [len(e["data"]) for e in body["events"]] == sizes[after:body["next_after"]]
            pages.append(len(ids))
            after = body["next_after"]
    # 4 events of 1 MB fit in 4 MiB; then 1 MB, 2.5 MiB and the 300 small ones; then the last 3.
    assert pages == [4, 4, 302, 3], pages
    got = await read_stream(gw.url, "large", params={"live": "false"})
    assert got.ids == list(range(1, len(sizes) + 1))
    assert [len(d) - 2 for d in got.data] == sizes  # JSON strings: the quotes

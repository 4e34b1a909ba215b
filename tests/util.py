"""Test helpers: waiting on a condition, a TCP proxy that drops connections on demand, a resuming SSE reader."""

from __future__ import annotations

import asyncio
import inspect
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from sse_gateway.log.base import LogObserver

#: How long a wait may take before the test fails. Generous on purpose: a wait ends as soon as its
#: condition holds, so this costs nothing when the machine is fast, and it must not fail a slow one.
WAIT_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], *, what: str, timeout: float = WAIT_TIMEOUT,
               interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something true, and return that.

    Fails the test with ``what`` (the thing that never happened) after ``timeout`` seconds. Use it
    instead of a fixed sleep: it waits exactly as long as the condition needs, and no longer.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}; it never happened (last: {value!r})")
        time.sleep(interval)


async def await_until(predicate: Callable[[], Any], *, what: str, timeout: float = WAIT_TIMEOUT,
                      interval: float = 0.02) -> Any:
    """``wait_until`` for async tests: ``predicate`` may be a plain function or return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}; it never happened (last: {value!r})")
        await asyncio.sleep(interval)


class ChaosProxy:
    """A TCP proxy on its own thread; ``drop_all()`` aborts every open connection at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.drops = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChaosProxy:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        async def shutdown() -> None:
            self.server.close()
            for w in list(self.writers):
                w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except (OSError, asyncio.CancelledError):
            writer.transport.abort()
            return
        self.writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass  # the proxy shuts down; a cancelled connection task makes Python 3.11's asyncio log an "error"
        self.writers.difference_update((writer, up_writer))

    def drop_all(self) -> int:
        """Abort every connection through the proxy (as a network drop would); returns how many."""
        done = threading.Event()
        count = [0]

        def abort() -> None:
            count[0] = len(self.writers) // 2
            for w in list(self.writers):
                w.transport.abort()
            self.writers.clear()
            done.set()

        self.loop.call_soon_threadsafe(abort)
        done.wait(5)
        self.drops += 1
        return count[0]


@dataclass
class Received:
    ids: list[int] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    notices: list[tuple[str, str]] = field(default_factory=list)  # gateway.gap / gateway.reset
    connects: int = 0
    cursor: str | None = None
    ended: bool = False


def _async_client(target, **kw) -> httpx.AsyncClient:
    """A client of ``target``: a base URL, or an in-process gateway (conftest ``InProcessGateway``)."""
    if hasattr(target, "async_client"):
        return target.async_client(**kw)
    return httpx.AsyncClient(base_url=target, **kw)


async def read_stream(base_url, session: str, *, until_id: int | None = None, timeout: float = 60,
                      received: Received | None = None, headers: dict | None = None,
                      params: dict | None = None, retry_statuses: tuple[int, ...] = ()) -> Received:
    """Read a session like EventSource does: resume with Last-Event-ID after every drop.

    Stops at ``gateway.end``, at ``until_id``, on a 204, or fails after ``timeout`` seconds. A status
    in ``retry_statuses`` (a proxy's 502 while a node dies) is retried like a drop. ``base_url`` may be
    an in-process gateway for reads that end by themselves (``live=false``, a completed session).
    """
    got = received or Received()

    async def run() -> None:
        async with _async_client(base_url, timeout=httpx.Timeout(5.0, read=30.0)) as client:
            while True:
                hdrs = dict(headers or {})
                if got.cursor is not None:
                    hdrs["Last-Event-ID"] = got.cursor
                try:
                    async with aconnect_sse(client, "GET", f"/v1/sessions/{session}/stream", headers=hdrs,
                                            params=params) as source:
                        got.connects += 1
                        if source.response.status_code == 204:
                            got.ended = True
                            return
                        if source.response.status_code in retry_statuses:
                            await asyncio.sleep(0.1)
                            continue
                        assert source.response.status_code == 200, source.response.status_code
                        async for sse in source.aiter_sse():
                            if not sse.data and sse.id in ("", got.cursor):
                                # A block without data (the opening `retry:`, a `: ping` heartbeat): the SSE
                                # standard dispatches nothing, httpx-sse an event with the previous id.
                                continue
                            if sse.event in ("gateway.gap", "gateway.reset"):
                                got.notices.append((sse.event, sse.data))
                                continue
                            got.cursor = sse.id
                            got.ids.append(int(sse.id.split(":")[0].split("/")[0]))  # ID, ID:EPOCH, ID/HOLD:EPOCH
                            got.events.append(sse.event)
                            got.data.append(sse.data)
                            if sse.event == "gateway.end":
                                got.ended = True
                                return
                            if until_id is not None and got.ids[-1] >= until_id:
                                return
                    if params and params.get("live") == "false":
                        return
                except (httpx.HTTPError, OSError):
                    pass
                await asyncio.sleep(0.02)

    await asyncio.wait_for(run(), timeout)
    return got


async def metric(base_url, name: str, labels: str = "") -> float:
    """One sample of the gateway's /metrics, e.g. metric(url, "sse_gateway_open_streams")."""
    async with _async_client(base_url) as c:
        text = (await c.get("/metrics")).text
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    raise KeyError(f"{wanted} not in /metrics")


class RawStream:
    """A minimal SSE-over-HTTP/1.1 reader on a raw socket (chunked encoding), light enough for hundreds.

    ``ids`` are the integer ids received; ``clean_end`` is True when the server ended the
    response properly (last chunk), False when the connection broke.
    """

    def __init__(self, port: int, session: str, cursor: str | None = None) -> None:
        self.port = port
        self.session = session
        self.cursor = cursor
        self.ids: list[int] = []
        self.events: list[str] = []
        self.status = 0
        self.clean_end = False

    async def run(self, *, stop_at_end: bool = True) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"GET /v1/sessions/{self.session}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if self.cursor:
            head += f"Last-Event-ID: {self.cursor}\r\n"
        writer.write((head + "\r\n").encode())
        try:
            status_line = await reader.readline()
            self.status = int(status_line.split()[1]) if status_line else 0
            while (await reader.readline()).strip():
                pass
            if self.status != 200:
                return
            buf = b""
            frame: dict[str, str] = {}
            while True:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    self.clean_end = True
                    return
                buf += await reader.readexactly(size)
                await reader.readexactly(2)
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode()
                    if line == "":
                        if "id" in frame:
                            self.cursor = frame["id"]
                            self.ids.append(int(self.cursor.split(":")[0]))
                            self.events.append(frame.get("event", "message"))
                            if stop_at_end and self.events[-1] == "gateway.end":
                                return
                        frame = {}
                    elif not line.startswith(":"):
                        name, _, value = line.partition(": ")
                        frame[name] = value
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.clean_end = False
        finally:
            writer.transport.abort()


class Heard(LogObserver):
    """One function ``heard(session, events, row)`` for a log's appends, moves (no events) and deletes (row None)."""

    def __init__(self, heard) -> None:
        self.heard = heard

    def appended(self, session, events, row) -> None:
        self.heard(session, events, row)

    def moved(self, session, row) -> None:
        self.heard(session, [], row)

    def deleted(self, session) -> None:
        self.heard(session, [], None)

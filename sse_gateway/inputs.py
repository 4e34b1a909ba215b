"""The input side of a session (user -> agent): how an agent's reads of it wake, and its SSE stream.

Input streams do not use the hub's channels (``hub.py``). A channel shares
one window of encoded frames among many subscribers of a busy session;
input is the opposite: a person types, cancels or approves now and then,
and one agent (sometimes two during a restart) reads it. So an input
reader here is a **waiter** on its session: a flag that the log's facts
set, and a cursor. It clears the flag, reads the log after its cursor, and
if nothing is there waits for the flag (or its heartbeat); a fact that
lands between the read and the wait has set the flag already, so no input
is ever missed, and every read is of the log, so nothing is skipped or sent
twice at a seam. The cost is one read of the log per input per reader,
which at input's rate is nothing.

What wakes a waiter (``InputWaiters`` is a ``LogObserver``):

* ``input_appended``: this process stored input of the session;
* ``moved`` with ``input_last_id`` beyond the waiter's cursor: another
  process on the same SQLite file or another node on Redis did (their
  notices carry the input head), or with another epoch;
* ``deleted``: the session is gone, so the stream ends (a new life of the
  id is another session: its reader resumes with a reset).

Sessions with waiters are part of ``log.watched`` (``Watched``: the hub's
channels and these), so a shared store reports other writers' input here.

``InputStream`` is one agent's ``GET /v1/sessions/{id}/input/stream``:
``retry:``, a ``gateway.reset`` notice when the cursor is of another life
(or beyond the input's end), then each input as an SSE event ``id:
N:EPOCH``, ``event: KIND``, data the input as JSON; heartbeats when idle;
it ends on delete, drain, a failing store, or (``live=false``) once it has
caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Iterator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .errors import GatewayError
from .log.base import EventLog, LogObserver
from .models import Session, StoredInput, dump_json
from .sse import PING, data_lines, encode_control
from .stream import HEADERS

log = logging.getLogger("sse_gateway.inputs")

READ_LIMIT = 100  # inputs one read of an input stream asks for


class Waiter:
    """One reader of a session's input: its cursor and the flag that facts set."""

    __slots__ = ("session", "cursor", "epoch", "closed", "_flag")

    def __init__(self, session: str, cursor: int, epoch: str) -> None:
        self.session = session
        self.cursor = cursor
        self.epoch = epoch
        self.closed = False  # the session was deleted (or is another life now), or the gateway drains
        self._flag = asyncio.Event()

    def set(self) -> None:
        self._flag.set()

    def clear(self) -> None:
        self._flag.clear()

    async def wait(self, timeout: float) -> bool:
        """Whether a fact came within ``timeout`` seconds (since the last ``clear``)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await self._flag.wait()
            return True
        return False


class InputWaiters(LogObserver):
    """Every input reader of this process, by session; the log tells it what happened."""

    def __init__(self) -> None:
        self.waiting: dict[str, set[Waiter]] = {}
        self.draining = False

    def watch(self, session: str, cursor: int, epoch: str) -> Waiter:
        waiter = Waiter(session, cursor, epoch)
        waiter.closed = self.draining
        self.waiting.setdefault(session, set()).add(waiter)
        return waiter

    def unwatch(self, waiter: Waiter) -> None:
        found = self.waiting.get(waiter.session)
        if found is not None:
            found.discard(waiter)
            if not found:
                del self.waiting[waiter.session]

    def _wake(self, session: str, head: int | None, epoch: str | None) -> None:
        for waiter in self.waiting.get(session, ()):
            if head is None or (epoch and epoch != waiter.epoch):
                waiter.closed = True
                waiter.set()
            elif head > waiter.cursor:
                waiter.set()

    def input_appended(self, session: str, inputs: list[StoredInput], row: Session) -> None:
        self._wake(session, row.input_last_id, row.epoch)

    def moved(self, session: str, row: Session) -> None:
        self._wake(session, row.input_last_id, row.epoch)

    def deleted(self, session: str) -> None:
        self._wake(session, None, None)

    def drain(self) -> None:
        """End every input stream (agents reconnect, to this process or another)."""
        self.draining = True
        for waiters in self.waiting.values():
            for waiter in waiters:
                waiter.closed = True
                waiter.set()


class Watched(Collection):
    """``log.watched``: the sessions the hub has channels for, and those with input readers."""

    def __init__(self, *parts: Mapping[str, object]) -> None:
        self.parts = parts

    def __contains__(self, session: object) -> bool:
        return any(session in part for part in self.parts)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for part in self.parts:
            for session in list(part):
                if session not in seen:
                    seen.add(session)
                    yield session

    def __len__(self) -> int:
        return sum(1 for _ in self)


def encode_input(item: StoredInput, epoch: str) -> bytes:
    """The SSE frame of one input: ``id: N:EPOCH``, ``event: KIND``, the input as JSON."""
    return (b"id: %d:%s\nevent: %s\n" % (item.id, epoch.encode(), item.kind.encode())
            + data_lines(dump_json(item.to_json()), True) + b"\n")


def input_reset(row: Session) -> bytes:
    return encode_control("gateway.reset", {"epoch": row.epoch, "last_id": row.input_last_id})


class InputStream(Response):
    """The ``text/event-stream`` of one agent reading a session's input (pure ASGI)."""

    media_type = "text/event-stream"

    def __init__(self, event_log: EventLog, waiters: InputWaiters, row: Session, cursor: int, *, prelude: bytes,
                 live: bool, heartbeat: float) -> None:
        self.log = event_log
        self.waiters = waiters
        self.session = row.id
        self.epoch = row.epoch
        self.cursor = cursor
        self.prelude = prelude
        self.live = live
        self.heartbeat = heartbeat
        self.status_code = 200
        self.background = None  # FastAPI reads (and may set) it on every Response a route returns; never run here
        self.gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        waiter = self.waiters.watch(self.session, self.cursor, self.epoch)  # before the first read: no fact lost
        watcher = asyncio.create_task(self._watch(receive, waiter))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await self._pump(send, waiter)
            if not self.gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except GatewayError as err:  # the store failed: end the stream, the agent resumes later
            log.warning("input stream of session %s ended: %s", self.session, err.message)
            if not self.gone:
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.waiters.unwatch(waiter)

    async def _watch(self, receive: Receive, waiter: Waiter) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        waiter.set()

    async def _pump(self, send: Send, waiter: Waiter) -> None:
        loop = asyncio.get_running_loop()
        await send({"type": "http.response.body", "body": self.prelude, "more_body": True})
        last_write = loop.time()
        while not self.gone and not waiter.closed:
            waiter.clear()
            got = await self.log.read_input(self.session, waiter.cursor, READ_LIMIT)
            if got:
                waiter.cursor = got[-1].id
                await send({"type": "http.response.body", "more_body": True,
                            "body": b"".join(encode_input(item, self.epoch) for item in got)})
                last_write = loop.time()
                continue
            if not self.live:
                return
            idle = loop.time() - last_write
            if idle >= self.heartbeat:
                await send({"type": "http.response.body", "body": PING, "more_body": True})
                last_write = loop.time()
                continue
            await waiter.wait(self.heartbeat - idle)

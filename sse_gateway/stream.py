"""One subscriber's life: where it starts, replay and live as one loop, how it ends.

Races and who wins them:

* **Publish during connect.** The stream attaches to the hub *before* it
  reads the session's head from the log, so a commit is either in what it
  reads or wakes it afterwards. Replay and live are the same loop (copy
  the frames after the cursor from the hub's window, or read them from the
  log), so nothing is sent twice or skipped at the seam.
* **Client gone.** The gateway's HTTP protocol calls the stream back when
  its connection is lost (``on_lost``, see below), which wakes the loop,
  which ends; presence is released in ``finally``, whatever happened.
  Under a server without that extension a watcher task waits for
  ``http.disconnect`` instead.
* **Slow client.** A stream notes when its current send began; the hub's
  watchdog cancels a stream whose send has waited longer than
  ``send_timeout`` (the client accepted nothing for that long). It is cut,
  never buffered for; it reconnects with its Last-Event-ID and catches up
  from the log. (A watchdog, not a timeout per send: arming and cancelling a
  timer for every write was 40% of the CPU at 1,000 subscribers.)

  A cut **aborts** the connection. uvicorn's ``send`` hands a body to the
  transport whole and only waits for it to drain before the *next* send,
  so when the watchdog fires, the transport still holds the last write,
  unsent. Ending the response any ASGI way (returning early, raising)
  makes uvicorn ``close()`` the transport, which is graceful: it keeps the
  unsent bytes and the socket until the client reads them, i.e. for as long
  as the stuck client stays connected. So the gateway's HTTP protocol
  (``protocol.GatewayProtocol``) puts its transport in the scope, under
  ``scope["extensions"]["sse_gateway.transport"]["transport"]`` (and
  itself under ``["protocol"]``, whose ``on_lost`` a stream sets), and a cut
  stream sets ``SO_LINGER`` to 0 and calls ``transport.abort()``: the
  buffer is dropped and the file descriptor closed at once, and the kernel
  answers the client with a reset (its own unsent bytes are dropped too).
  Under a server without that extension (tests in one process) a cut
  falls back to ending the response unfinished.

  What a write can leave behind is bounded in bytes, whatever the event
  sizes: a write carries at most ``CHUNK_BYTES`` (1 MiB) of frames, or one
  larger frame, and a body above ``CHUNK_BYTES`` is sent in slices of that
  size. So a stuck client pins at most one slice in the transport (plus
  uvicorn's 64 KiB high-water mark) until the watchdog cuts it, and nothing
  after. A replay read asks the log for as many events as should fit in
  ``CHUNK_BYTES`` judging by the largest frame of the previous read (the
  first read takes ``READ_FIRST`` events, no read more than ``READ_CHUNK``);
  frames beyond the budget are dropped and read again next time.
* **Heartbeats.** A stream that has written nothing for ``heartbeat``
  seconds gets a ``: ping`` comment. The hub's one heartbeat tick sends
  them (``Hub.send_heartbeats``): a stream waiting for events is not woken
  for it, and has no timer of its own. The tick writes the ping straight
  to the stream's transport (``beat``), as the chunk uvicorn would have
  made of it: uvicorn sends a body without a Content-Length with chunked
  transfer encoding, one ``transport.write`` per ``send``, so a whole
  chunk written between two of the stream's own writes is never inside
  another. It only does so while the stream waits (its writes are
  complete) and its transport has nothing unsent; otherwise it wakes the
  stream, which sends the ping through uvicorn as before, so a client that
  reads nothing still meets the watchdog below. Without the transport
  (another server, tests in one process) a stream keeps a timer for its
  heartbeat.
* **Shutdown or delete.** The hub closes the channel; the loop ends the
  response cleanly so the client reconnects (to this node or another).
* **Completion.** The loop stops right after it has sent ``gateway.end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import struct

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from . import rules
from .errors import BadRequest, GatewayError
from .hub import CHUNK_BYTES, Channel, Hub
from .messages import APPEND as MESSAGE_APPEND
from .messages import TYPES as MESSAGE_TYPES
from .messages import Compactor, merge_appends
from .models import END_EVENT, Session
from .protocol import TRANSPORT_EXTENSION
from .sse import PING, encode_control, encode_event

log = logging.getLogger("sse_gateway.stream")

READ_CHUNK = 256  # most events one replay read asks for (small events)
READ_FIRST = 16  # what a stream's first replay read asks for, before it has seen any frame
_FRAME_FLOOR = CHUNK_BYTES // READ_CHUNK  # frames smaller than this count as this big when sizing a read
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection, drops unsent bytes
_PING_CHUNK = b"%x\r\n%s\r\n" % (len(PING), PING)  # PING as uvicorn frames a body chunk (see ``beat``)
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_CURSOR = re.compile(rules.CURSOR)


def parse_position(text: str) -> tuple[int, int, str | None]:
    """``ID``, ``ID/HOLD``, either with ``:EPOCH``: (id, hold or 0, epoch); else ``400 invalid_cursor``.
    A hold above its id holds nothing back (no message had begun there): it is the plain ``ID``."""
    m = _CURSOR.fullmatch(text)
    if not m:
        raise BadRequest(f"cursor {text[:40]!r} is neither ID nor ID:EPOCH", "invalid_cursor")
    id_, hold = int(m.group(1)), int(m.group(2) or 0)
    return id_, (hold if hold <= id_ else 0), m.group(3)


def parse_cursor(text: str) -> tuple[int, str | None]:
    """A cursor as the last id its reader has every event up to (``ID/HOLD``: HOLD - 1), and its epoch."""
    id_, hold, epoch = parse_position(text)
    return (hold - 1 if hold else id_), epoch


def start_position(row: Session, cursor: int, epoch: str | None) -> tuple[int, bytes]:
    """Where a stream with this cursor starts, and the notice it gets first (``gateway.reset``)."""
    if (epoch is not None and epoch != row.epoch) or cursor > row.last_id:
        return 0, encode_control("gateway.reset", {"epoch": row.epoch, "last_id": row.last_id})
    return cursor, b""


class EventStream(Response):
    """The ``text/event-stream`` response of one subscriber (pure ASGI, never buffered)."""

    media_type = "text/event-stream"

    def __init__(self, hub: Hub, session: str, cursor: int, epoch: str | None, *, prelude: bytes, live: bool,
                 heartbeat: float, stats=None, on_close=None, hold: int = 0) -> None:
        self.hub = hub
        self.session = session
        self.cursor = cursor
        self.hold = hold  # the cursor's HOLD (``messages``), 0 for a plain one
        self.walk: Compactor | None = None  # the replay, while it holds messages back (see ``_next``)
        self.epoch = epoch
        self.prelude = prelude
        self.live = live
        self.heartbeat = heartbeat
        self.send_since = 0.0  # loop time the pending send began; 0 when none is pending
        self.last_write = 0.0  # loop time of the last write (heartbeats included)
        self.cut_slow = False  # set by the hub's watchdog just before it cancels this stream
        self.task: asyncio.Task | None = None
        self.stats = stats
        self.on_close = on_close  # called once when the stream ends, before it detaches (gives back its slot)
        self.status_code = 200
        self.background = None  # FastAPI reads (and may set) it on every Response a route returns; never run here
        self.gone = False
        self._wakeup: asyncio.Future | None = None
        self._read_limit = READ_FIRST  # events the next replay read asks for
        self._transport: asyncio.Transport | None = None  # the connection, when the server tells (see above)
        self._direct = False  # the hub's tick may write heartbeats to the transport (``beat``)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ch = self.hub.attach(self.session)  # before reading the head: see the module docstring
        self.task = asyncio.current_task()
        connection = (scope.get("extensions") or {}).get(TRANSPORT_EXTENSION) or {}
        self._transport = connection.get("transport")
        self._direct = self._transport is not None and scope["method"] == "GET"
        self._clock = self.task.get_loop().time
        self.hub.streams.add(self)
        protocol = connection.get("protocol")
        if protocol is not None:  # the connection says when it is lost: no task of its own waits for that
            protocol.on_lost = self._lost
            self.gone = self._transport.is_closing()
            watcher = None
        else:
            watcher = asyncio.create_task(self._watch(receive))
        started = False
        try:
            row = await self.hub.log.get_session(self.session)
            if row is None:  # deleted since the route looked
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            ch = self.hub.settle(ch, row)
            cursor, notice = start_position(row, self.cursor, self.epoch)
            if cursor < row.last_id or (self.hold and not notice):  # a replay: messages begun after it come whole
                self.walk = Compactor(cursor, 0 if notice else self.hold)
                cursor = self.walk.walk_from
            del row  # not kept for as long as the stream lives
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            started = True
            await self._pump(send, ch, cursor, self.prelude + notice)
            if not self.gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except GatewayError as err:  # the store failed: end the stream, the client resumes later
            log.warning("stream of session %s ended: %s", self.session, err.message)
            if not started:
                await send({"type": "http.response.start", "status": err.status,
                            "headers": [(b"content-type", b"application/json"),
                                        *((k.lower().encode(), v.encode()) for k, v in err.headers.items())]})
                await send({"type": "http.response.body", "body": err.body()})
            elif not self.gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self.cut_slow:
                raise
            self.task.uncancel()  # our own cancellation, by the watchdog: not a shutdown
            log.info("cut slow client of session %s", self.session)
            if self.stats:
                self.stats.slow_consumer_disconnects += 1
            self._abort()  # returning without finishing the response alone would close it gracefully
        finally:
            if watcher is not None:
                watcher.cancel()
            else:
                protocol.on_lost = None
            self.hub.streams.discard(self)
            if self.on_close is not None:
                self.on_close()  # first: the hub drops the channel once the session has no stream left
            self.hub.detach(ch)

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._lost()

    def _lost(self) -> None:
        self.gone = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def beat(self, tick: float) -> None:
        """The hub's heartbeat tick (at loop time ``tick``) found this stream silent for ``heartbeat``:
        send it a ping.

        Written straight to the transport, as one chunk, if the stream is waiting (between two whole
        writes) and nothing of its connection is unsent; a stream that is running sends its own. One
        whose transport still holds bytes (its client is slow, or reads nothing) is woken to send the
        ping through uvicorn, which waits for the transport to drain, so the watchdog sees that send."""
        fut = self._wakeup
        if fut is None or fut.done() or not self._direct:
            return
        transport = self._transport
        if transport.is_closing():
            return  # the connection is going: the stream hears of it
        if transport.get_write_buffer_size():
            fut.set_result(None)
            return
        transport.write(_PING_CHUNK)
        self.last_write = tick
        if self.stats:
            self.stats.heartbeats += 1

    def _abort(self) -> None:
        """Drop the connection now: its unsent bytes, its socket, its file descriptor (see the docstring)."""
        transport = self._transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    async def _send(self, send: Send, body: bytes) -> None:
        if len(body) > CHUNK_BYTES:  # one frame larger than a write may be: in slices
            for at in range(0, len(body), CHUNK_BYTES):
                await self._send(send, body[at:at + CHUNK_BYTES])
            return
        self.send_since = self._clock()
        await send({"type": "http.response.body", "body": body, "more_body": True})
        self.send_since = 0.0

    async def _pump(self, send: Send, ch: Channel, cursor: int, prelude: bytes) -> None:
        loop = asyncio.get_running_loop()
        await self._send(send, prelude)
        self.last_write = loop.time()
        stop_at = None if self.live else ch.head
        close_at: float | None = None  # when draining, the moment this stream closes
        while not self.gone and not ch.closed:
            if self.walk is not None and cursor >= (ch.head if stop_at is None else stop_at):
                if frames := self._flush(ch):  # caught up: the replay ends
                    await self._send(send, frames)
                    self.last_write = loop.time()
                continue
            if ch.end_id is not None and cursor >= ch.end_id:
                return
            if stop_at is not None and cursor >= stop_at:
                return
            if ch.ready(cursor):
                chunk, cursor = await self._next(ch, cursor)
                if chunk:
                    if self.stats:
                        self.stats.stream_writes += 1
                    await self._send(send, chunk)
                    self.last_write = loop.time()
                continue
            now = loop.time()
            if self.hub.drain_start is not None:
                if close_at is None:
                    close_at = self.hub.drain_start + random.random() * self.hub.drain_window
                if now >= close_at:
                    return
            idle = now - self.last_write
            if idle >= self.heartbeat:
                await self._send(send, PING)
                self.last_write = loop.time()
                if self.stats:
                    self.stats.heartbeats += 1
                continue
            fut = self._wakeup = loop.create_future()
            ch.waiting.add(fut)
            # A timer only while draining, or for a heartbeat the hub's tick does not send (see ``beat``)
            delay = None if self._direct and self.hub.heartbeat_tick else self.heartbeat - idle
            if close_at is not None:
                delay = close_at - now if delay is None else min(delay, close_at - now)
            timer = None if delay is None else loop.call_later(delay, _resolve, fut)
            try:
                await fut
            finally:
                if timer is not None:
                    timer.cancel()
                ch.waiting.discard(fut)
                self._wakeup = None

    async def _next(self, ch: Channel, cursor: int) -> tuple[bytes, int]:
        """The frames after ``cursor``: from the hub's window (extended by a shared read if the cursor
        is at its end), else from the log."""
        walk = self.walk
        # A replay holding nothing takes the window's frames as they are, up to the next message.start
        if walk is None or (not walk.held and walk.skipping is None and ch.last_start <= cursor):
            got = ch.window_after(cursor)
            if got is None and ch.fills(cursor):
                await self.hub.fill(ch, cursor)
                got = ch.window_after(cursor)
            if got is not None and (walk is None or ch.last_start <= cursor):
                if self.stats:
                    self.stats.delivered += got[1] - cursor
                if walk is not None:
                    walk.pos = got[1]
                return got
        events = await self.hub.log.read(self.session, cursor, self._read_limit)
        if not events:
            # Nothing after the cursor although the head is ahead: trimmed, or the session went away.
            row = await self.hub.log.get_session(self.session)
            if row is None or row.epoch != ch.epoch:
                self.hub.close_channel(ch)
                return b"", cursor
            ch.head = row.last_id
            if row.trimmed_id > cursor:
                return self._gap(cursor + 1, row.trimmed_id), row.trimmed_id
            await asyncio.sleep(0.05)  # the log disagrees with itself for a moment: never spin
            return b"", cursor
        out = []
        size = largest = 0
        if events[0].id > cursor + 1:
            out.append(self._gap(cursor + 1, events[0].id - 1))
            size = len(out[0])
        epoch = ch.epoch
        last, taken = cursor, 0
        pairs: list = []  # what the replay sends for the events taken
        appends = 0  # message.append among them (merged when several follow each other)
        for ev in events:
            if walk is None:
                frame = encode_event(ev, epoch)
                largest = max(largest, len(frame))
                size += len(frame)
                if size > CHUNK_BYTES and last > cursor:
                    break  # the rest is read again next time
            else:  # what the replay sends for it (it took the event: never read again), within the budget
                if size > CHUNK_BYTES and last > cursor:
                    break
                if ev.event in MESSAGE_TYPES or walk.held or walk.skipping is not None:
                    sent = walk.feed(ev)
                    frame = b"".join(encode_event(e, epoch, hold) for e, hold in sent)
                    pairs += sent
                    appends += ev.event == MESSAGE_APPEND
                else:  # nothing held, not a message's: as it is (what feed would say, for less)
                    walk.pos, walk.ts = ev.id, ev.ts
                    frame = encode_event(ev, epoch)
                    pairs.append((ev, 0))
                largest = max(largest, len(frame))
                size += len(frame)
            out.append(frame)
            last = ev.id
            taken += 1
            if ev.event == END_EVENT:
                ch.end_id = ev.id
        if appends > 1 and len(merged := merge_appends(pairs)) < len(pairs):  # a behind reader's deltas
            out[len(out) - taken:] = [encode_event(e, epoch, hold) for e, hold in merged]
        self._read_limit = max(1, min(READ_CHUNK, CHUNK_BYTES // max(largest, _FRAME_FLOOR)))
        if self.stats:
            self.stats.delivered += taken
            self.stats.replayed += taken
        return b"".join(out), last

    def _flush(self, ch: Channel) -> bytes:
        """The replay caught up: a snapshot of each message it still holds, then every event as it is."""
        walk, self.walk = self.walk, None
        return b"".join(encode_event(e, ch.epoch, hold) for e, hold in walk.flush())

    def _gap(self, first: int, last: int) -> bytes:
        if self.stats:
            self.stats.gaps += 1
        return encode_control("gateway.gap", {"from": first, "to": last})


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)

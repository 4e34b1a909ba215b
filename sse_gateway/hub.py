"""In-process fan-out: one channel per watched session, a shared window of frames.

The hub never queues events per subscriber. It keeps, for each session that
has at least one stream attached, the session's **head** (its last known
id) and a **window** of the most recent frames, already encoded. Each
subscriber owns only its cursor: when woken it copies the frames after its
cursor from the window, or reads them from the log when it is behind the
window. So

* a slow subscriber costs no memory (it falls back to reading the log);
* replay and live are one code path, so there is no seam to get wrong;
* a write this process did not see (another process on the same SQLite
  file, another node on Redis) only moves the head, and the missing events
  come from the log: no gap is possible. Subscribers at the end of the
  window share ONE read per channel (``Hub.fill``), which extends the
  window for all of them; only a subscriber behind the window reads alone.
  So an event appended elsewhere costs one read per node that streams its
  session, not one per subscriber.

New events wake a channel's waiting subscribers at once after a quiet spell;
while a wake-up's subscribers are writing, and for ``coalesce`` seconds after
the last of them has, further events are held and go out together at the
next wake-up (``Channel.moved``). A busy session is thus written in batches
that grow with its audience, one write per subscriber per batch.

Everything here is bounded in bytes as well as in events, whatever the
event sizes: a window keeps at most ``WINDOW`` frames and about
``WINDOW_BYTES`` (trimmed when it holds twice either), the shared read that
extends it asks for as many events as ``WINDOW_BYTES`` holds judging by
the largest frame seen, and a subscriber takes at most ``CHUNK_BYTES`` of
frames per write (``window_after``; always one frame at least). The sum of
the frames' lengths is the only per-frame work this adds.

Channels are created when the first stream attaches and dropped when the
session's last stream detaches. Streams are counted in one place,
``limits.StreamSlots`` (``Hub.slots``): a stream holds its slot from before
it attaches until after it detaches, so a channel lives while its
session's count is above 0. The log reads the same count for presence
(``EventLog.presence``; Redis sums the counts of all nodes), and the
metrics read it for the ``open_streams`` gauge.

The hub is the log's observer (``log.base.LogObserver``): ``appended``
extends a channel's window, ``moved`` (another writer) moves its head,
``deleted`` closes it. ``log.watched`` is the hub's set of channels (the
gateway adds the sessions whose input an agent reads: ``inputs.Watched``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .limits import StreamSlots
from .log.base import LogObserver
from .messages import START as MESSAGE_START
from .models import END_EVENT, Session, StoredEvent
from .sse import encode_event

if TYPE_CHECKING:
    from .log.base import EventLog
    from .metrics import Stats

WINDOW = 1024  # frames a window keeps (trimmed to this when it holds twice as many)
WINDOW_BYTES = 4 << 20  # and bytes of frames it keeps (trimmed to this when it holds twice as many; one frame at least)
CHUNK_BYTES = 1 << 20  # one write of a stream carries at most this many bytes of frames (or one larger frame)
FILL_FIRST = 16  # events a shared read asks for when the window is empty (their size is not known yet)
BEATS_PER_HEARTBEAT = 4  # the heartbeat tick runs this often per heartbeat interval
_CLOCK_SLACK = 0.001  # a stream silent for its heartbeat within this is due (the loop's clock is coarse)

log = logging.getLogger("sse_gateway.hub")


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class Channel:
    __slots__ = ("session", "epoch", "head", "end_id", "last_start", "frames", "first_id", "size", "largest",
                 "waiting", "closed", "filling", "_joined", "coalesce", "_woke_at", "_woke_head", "_timer")

    def __init__(self, session: str, coalesce: float = 0.0) -> None:
        self.session = session
        self.coalesce = coalesce  # seconds between a wake-up's subscribers having written and the next wake-up
        self._woke_at: float | None = float("-inf")  # when the last wake-up's subscribers had run; None: running
        self._woke_head = 0  # the head the last wake-up was for
        self._timer: asyncio.TimerHandle | None = None  # the coalesced wake-up that is due
        self.epoch = ""
        self.head = 0
        self.end_id: int | None = None
        self.last_start = 0  # the id of the last message.start extended into the window (a replay holds from it)
        self.frames: list[bytes] = []  # frames[i] is the frame of event first_id + i
        self.first_id = 0
        self.size = 0  # bytes of frames in the window
        self.largest = 0  # the largest frame in the window, or added since it was trimmed (sizes the shared reads)
        self.waiting: set[asyncio.Future] = set()
        self.closed = False  # the session was deleted, or the gateway is shutting down
        self.filling: asyncio.Task | None = None  # the shared read that extends the window (``Hub.fill``)
        # (cursor, window's last id, frames after the cursor up to CHUNK_BYTES, their last id), shared
        self._joined: tuple[int, int, bytes, int] = (-1, -1, b"", -1)

    def learn(self, row: Session) -> None:
        """Take what the log says about the session (at attach time, or from another writer)."""
        self.epoch = row.epoch
        moved = row.last_id > self.head or (row.completed and self.end_id != row.last_id)
        if row.last_id > self.head:
            self.head = row.last_id
        if row.completed:
            self.end_id = row.last_id
        if moved:  # waking every subscriber when nothing moved would make each attach cost O(subscribers)
            self.moved()

    def extend(self, events: list[StoredEvent]) -> None:
        end = self.first_id + len(self.frames)
        if self.frames and events[0].id < end:  # some are in the window already (a fill raced an append)
            events = [ev for ev in events if ev.id >= end]
            if not events:
                return
        first = events[0].id
        if not self.frames or first != end:
            self.frames = []
            self.first_id = first
            self.size = self.largest = 0
        new = [encode_event(ev, self.epoch) for ev in events]
        for ev in events:
            if ev.event == MESSAGE_START:
                self.last_start = ev.id
        self.frames.extend(new)
        sizes = list(map(len, new))
        self.size += sum(sizes)
        self.largest = max(self.largest, max(sizes))
        if len(self.frames) > 2 * WINDOW or self.size > 2 * WINDOW_BYTES:
            self._trim()
        last = events[-1]
        if last.id > self.head:
            self.head = last.id
        if last.event == END_EVENT:
            self.end_id = last.id
        self.moved()

    def _trim(self) -> None:
        """Drop the oldest frames down to ``WINDOW`` frames and ``WINDOW_BYTES`` (keeping the newest frame)."""
        frames = self.frames
        drop = max(0, len(frames) - WINDOW)
        size = self.size - sum(map(len, frames[:drop]))
        while size > WINDOW_BYTES and drop < len(frames) - 1:
            size -= len(frames[drop])
            drop += 1
        del frames[:drop]
        self.first_id += drop
        self.size = size
        self.largest = max(map(len, frames))

    def fill_limit(self) -> int:
        """How many events a shared read asks for: as many as ``WINDOW_BYTES`` holds, judging by the
        largest frame seen (``FILL_FIRST`` while none has been), at most ``WINDOW``."""
        if not self.largest:
            return FILL_FIRST
        return max(1, min(WINDOW, WINDOW_BYTES // self.largest))

    def ready(self, cursor: int) -> bool:
        """Whether a subscriber at ``cursor`` takes the events after it now, or waits for the coalesced
        wake-up that is due: only one that has written everything the last wake-up was for waits, and
        one far behind the window never does."""
        held = self._timer is not None or self._woke_at is None
        return cursor < self.head and (cursor < self._woke_head or not held or self.head - cursor > WINDOW)

    def window_after(self, cursor: int) -> tuple[bytes, int] | None:
        """The frames after ``cursor`` if the window holds the next one, at most ``CHUNK_BYTES`` of them
        (always at least one), and the new cursor."""
        start = cursor + 1 - self.first_id
        frames = self.frames
        if not frames or start < 0 or start >= len(frames):
            return None
        last = self.first_id + len(frames) - 1
        joined_cursor, joined_last, body, upto = self._joined
        if joined_cursor != cursor or joined_last != last:  # the first subscriber at this cursor joins, the rest reuse
            end, size, n = start + 1, len(frames[start]), len(frames)
            while end < n:
                size += len(frames[end])
                if size > CHUNK_BYTES:
                    break
                end += 1
            body = b"".join(frames[start:end])
            upto = self.first_id + end - 1
            self._joined = (cursor, last, body, upto)
        return body, upto

    def fills(self, cursor: int) -> bool:
        """Whether a shared read (``Hub.fill``) serves a subscriber at ``cursor``: it is live (at most a
        window behind the head) and the window is empty or ends at its cursor. One far behind replays alone."""
        return self.head - cursor <= WINDOW and (not self.frames or cursor == self.first_id + len(self.frames) - 1)

    def moved(self) -> None:
        """The head moved: wake the waiting subscribers, at once if the last such wake-up ended
        ``coalesce`` ago, else when it will be (``ready`` holds the busy ones until then too). A session
        publishing faster than that is written to each subscriber in batches, one write per batch
        instead of one per event; a quiet one is not delayed at all. Counting from the *end* of a
        wake-up (when every woken subscriber has had its turn) lets batches grow with the number of
        subscribers: writing to 1,000 of them takes longer than the gap between two publishes."""
        if not self.coalesce:
            self.wake()
        elif self._timer is not None or self._woke_at is None:
            return  # a wake-up is due, or the last one's subscribers are still running (``_woken`` sees the head)
        else:
            loop = asyncio.get_running_loop()
            due = self._woke_at + self.coalesce
            if loop.time() >= due:
                self._due(loop)
            else:
                self._timer = loop.call_at(due, self._due, loop)

    def _due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._woke_head = self.head
        self.wake()
        self._woke_at = None
        loop.call_soon(self._woken, loop)  # queued behind the woken subscribers' turns

    def _woken(self, loop: asyncio.AbstractEventLoop) -> None:
        self._woke_at = loop.time()
        if self.head > self._woke_head:  # events came while they ran
            self._timer = loop.call_at(self._woke_at + self.coalesce, self._due, loop)

    def wake(self) -> None:
        """Wake every waiting subscriber now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self.waiting:
            if not fut.done():
                fut.set_result(None)
        self.waiting.clear()


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


class Hub(LogObserver):
    def __init__(self, log: EventLog, stats: Stats | None = None, *, coalesce: float = 0.0,
                 slots: StreamSlots | None = None) -> None:
        self.log = log
        self.coalesce = coalesce
        self.stats = stats
        self.slots = slots if slots is not None else StreamSlots()
        self.channels: dict[str, Channel] = {}
        self.streams: set = set()  # every EventStream being served, for the slow-client watchdog and heartbeats
        self.drain_start: float | None = None  # loop time the drain began
        self.drain_window = 0.0
        self.heartbeat_tick = False  # ``send_heartbeats`` is running: streams it can write to have no timer
        self.slots.changed = log.streams_changed
        log.streams = self.slots
        log.watched = self.channels.keys()
        log.add_observer(self)

    def attach(self, session: str) -> Channel:
        """The channel of ``session`` for a new stream; learn its head from the log *after* this call."""
        ch = self.channels.get(session)
        if ch is None:
            ch = self.channels[session] = Channel(session, self.coalesce)
        return ch

    def settle(self, ch: Channel, row: Session) -> Channel:
        """Give a just-attached channel the row read after attaching; a new life gets a new channel."""
        if ch.epoch and ch.epoch != row.epoch:  # deleted and created again by another process
            self.close_channel(ch)
            ch = self.attach(row.id)
        ch.learn(row)
        return ch

    def detach(self, ch: Channel) -> None:
        """A stream of ``ch`` ended (after giving back its slot): drop the channel if it was the session's last."""
        if not self.slots.count(ch.session):
            self.channels.pop(ch.session, None)

    def presence(self, session: str) -> tuple[int, int | None]:
        """This process's streams of ``session`` and when their number last fell to 0 (ms)."""
        return self.slots.count(session), self.slots.last_closed(session)

    # -- what the log tells (LogObserver) --------------------------------------------

    def appended(self, session: str, events: list[StoredEvent], row: Session) -> None:
        ch = self.channels.get(session)
        if ch is None:
            return
        if ch.epoch and row.epoch != ch.epoch:
            self.close_channel(ch)  # deleted and created again by another process
        else:
            ch.epoch = row.epoch  # a channel attached but not yet settled does not know it: its frames need it
            ch.extend(events)

    def moved(self, session: str, row: Session) -> None:
        ch = self.channels.get(session)
        if ch is None:
            return
        if ch.epoch and row.epoch != ch.epoch:
            self.close_channel(ch)  # deleted and created again by another process
        elif row.last_id > ch.head or (row.completed and ch.end_id is None):
            ch.learn(row)

    def deleted(self, session: str) -> None:
        self.slots.forget(session)
        ch = self.channels.get(session)
        if ch is not None:
            self.close_channel(ch)

    async def fill(self, ch: Channel, cursor: int) -> None:
        """Extend ``ch``'s window with the events after ``cursor`` (its end): one read, shared by every
        subscriber that asks while it runs. It runs as a task of its own, so a subscriber that goes away
        does not cancel it for the others."""
        if ch.filling is None:
            ch.filling = asyncio.create_task(self._fill(ch, cursor))
            ch.filling.add_done_callback(_retrieve)  # a failure nobody awaits any more is not logged as lost
        await asyncio.shield(ch.filling)

    async def _fill(self, ch: Channel, cursor: int) -> None:
        try:
            events = await self.log.read(ch.session, cursor, ch.fill_limit())
            if self.stats:
                self.stats.window_fills += 1
            if events and not ch.closed and self.channels.get(ch.session) is ch:
                ch.extend(events)
        finally:
            ch.filling = None

    def close_channel(self, ch: Channel) -> None:
        ch.closed = True
        if self.channels.get(ch.session) is ch:
            del self.channels[ch.session]
        ch.wake()

    async def cut_slow_clients(self, send_timeout: float) -> None:
        """Forever: cancel each stream whose pending send has waited more than ``send_timeout``."""
        while True:
            await asyncio.sleep(min(1.0, send_timeout / 4))
            limit = _loop_time() - send_timeout
            for stream in [s for s in self.streams if 0.0 < s.send_since < limit]:
                stream.cut_slow = True
                stream.task.cancel()

    async def send_heartbeats(self, heartbeat: float) -> None:
        """Forever: a tick every ``heartbeat / BEATS_PER_HEARTBEAT`` seconds gives a heartbeat to each
        stream that has written nothing for its ``heartbeat`` (``EventStream.beat``). One timer for every
        stream, and a quiet stream's task is not woken for it.

        The ticks keep to a fixed grid, and a ping counts as written at its tick, so a stream that only
        gets heartbeats gets one every ``heartbeat`` however long a tick takes to write them; after a
        write of its own, a stream gets its first ping within a tick of ``heartbeat``."""
        loop = asyncio.get_running_loop()
        every = heartbeat / BEATS_PER_HEARTBEAT
        self.heartbeat_tick = True
        try:
            tick = loop.time()
            while True:
                tick = max(tick + every, loop.time())  # the next point of the grid, unless this tick ran late
                await asyncio.sleep(tick - loop.time())
                due = tick + _CLOCK_SLACK
                for stream in [s for s in self.streams if s.last_write + s.heartbeat <= due]:
                    try:
                        stream.beat(tick)
                    except Exception:  # one broken connection must not stop everyone's heartbeats
                        log.exception("heartbeat to a stream of session %s failed", stream.session)
        finally:
            self.heartbeat_tick = False

    def begin_drain(self, window: float) -> None:
        """Each stream closes at a random moment of the next ``window`` seconds (see stream.py)."""
        self.drain_start = asyncio.get_running_loop().time()
        self.drain_window = window
        for ch in list(self.channels.values()):
            ch.wake()

    def shutdown(self) -> None:
        """End every stream (clients reconnect, to this process or another)."""
        for ch in list(self.channels.values()):
            self.close_channel(ch)

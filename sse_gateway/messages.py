"""Messages: a token stream kept as one object per answer, on the same log.

A message is written with ordinary events of five reserved types, whose JSON
data names it (``{"message": ID, ...}``): ``message.start`` opens it,
``message.append`` adds text, ``message.reset`` empties it while it is open,
``message.end`` closes it (``finished`` or ``failed``), ``message.replace``
gives its whole text at once and closes it (also one closed already: a
retried step). Each backend keeps, per session, every message's start id and
the id that closed it, and checks each operation against them atomically with
the append (``check``), so every reader folds the same log into the same
messages. Nothing else about the publish path changes: batches, NDJSON,
idempotency keys, fencing and limits apply as to any event.

Readers: a live reader gets every event as committed. A reader that replays
history walks it with a ``Compactor``, which holds back the operations of
each message that began after its cursor and sends the message once, whole,
at the event that closes it, or as one snapshot when the replay reaches the
head. The cursor ``P/H`` says what such a reader has (docs/api.md,
"Messages"): every plain event up to ``P``; every message that began before
``H`` up to ``P``; of the messages that began at or after ``H``, those closed
by ``P`` whole and the others not at all.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import rules
from .errors import BadRequest, Conflict
from .models import NewEvent, StoredEvent, dump_json, load_json

START, APPEND, END, REPLACE, RESET = "message.start", "message.append", "message.end", "message.replace", \
    "message.reset"
SNAPSHOT = "message.snapshot"  # what a replay sends for a whole message (the gateway's; never published)
TYPES = frozenset({START, APPEND, END, REPLACE, RESET})
CLOSED = ("finished", "failed")  # how a message ends
_FIELDS = {  # operation -> (the fields its data needs, the fields it may have)
    START: (frozenset({"message"}), frozenset({"message", "type", "metadata"})),
    APPEND: (frozenset({"message", "text"}), frozenset({"message", "text"})),
    END: (frozenset({"message"}), frozenset({"message", "status", "error"})),
    REPLACE: (frozenset({"message", "text"}), frozenset({"message", "text", "status", "error", "metadata"})),
    RESET: (frozenset({"message"}), frozenset({"message"})),
}
_MESSAGE_ID = re.compile(rules.MESSAGE_ID)
_TYPE = re.compile(rules.EVENT_TYPE)


def _invalid(text: str) -> BadRequest:
    return BadRequest(text, "invalid_message")


def parse(event: str, data: str, is_json: bool) -> dict:
    """The data of a message operation as a dict, or ``400 invalid_message`` saying what is wrong. (Read
    with orjson alone: an integer beyond 64 bits in metadata may come back a float; only the shape counts.)"""
    if not is_json:
        raise _invalid(f"{event} needs JSON data (an object naming its message)")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _invalid(f"{event} data is not JSON") from None
    if type(doc) is not dict:
        raise _invalid(f"{event} data must be an object")
    need, may = _FIELDS[event]
    keys = doc.keys()
    if not need <= keys:
        raise _invalid(f"{event} data needs {', '.join(sorted(need - keys))}")
    if not keys <= may:
        raise _invalid(f"{event} data has unknown field(s) {', '.join(sorted(keys - may))}")
    mid = doc["message"]
    if type(mid) is not str or not _MESSAGE_ID.fullmatch(mid):
        raise _invalid("message must be 1-128 characters of A-Z a-z 0-9 _ . : ~ -")
    if "text" in doc and type(doc["text"]) is not str:
        raise _invalid(f"{event} text must be a string")
    if event == START and doc.get("type") is not None and not (isinstance(doc["type"], str)
                                                              and _TYPE.fullmatch(doc["type"])):
        raise _invalid("a message's type must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    if "status" in doc and doc["status"] not in CLOSED:
        raise _invalid("status must be finished or failed")
    return doc


def operations(events: Sequence[NewEvent]) -> list[tuple[int, str, str]]:
    """(index, operation, message id) of each message operation among ``events``, checked
    (``400 invalid_message``) before anything is queued. One set lookup per other event."""
    return [(i, ev.event, parse(ev.event, ev.data, ev.is_json)["message"])
            for i, ev in enumerate(events) if ev.event in TYPES]


class Book(abc.ABC):
    """A session's messages as a backend keeps them: id -> (start id, id that closed it, or 0 while open).

    A backend implements the three reads (``stored``, ``stored_spans``, ``open``); the rules
    (``check``, ``log.base.apply_append``, ``apply_complete``) write nothing but ``changes``, which the
    backend stores with the write they belong to (and a refused write drops with its book)."""

    def __init__(self) -> None:
        self.changes: dict[str, tuple[int, int]] = {}
        self._read: dict[str, tuple[int, int] | None] = {}  # what ``stored`` answered (a batch asks again)

    @abc.abstractmethod
    def stored(self, mid: str) -> tuple[int, int] | None:
        """The stored (start, closed) of message ``mid``, or None if it was never started."""

    @abc.abstractmethod
    def stored_spans(self, after: int, through: int) -> dict[str, tuple[int, int]]:
        """The messages begun in (after, through]."""

    @abc.abstractmethod
    def open(self) -> list[str]:
        """The messages still open, in the order they began."""

    def get(self, mid: str) -> tuple[int, int] | None:
        if mid in self.changes:
            return self.changes[mid]
        if mid not in self._read:
            self._read[mid] = self.stored(mid)
        return self._read[mid]

    def spans(self, after: int, through: int) -> Iterable[tuple[int, int]]:
        found = self.stored_spans(after, through)
        found.update((mid, v) for mid, v in self.changes.items() if after < v[0] <= through)
        return found.values()


class DictBook(Book):
    """A book over a dict (the memory backend's, and the tests')."""

    def __init__(self, known: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.known = known

    def stored(self, mid: str) -> tuple[int, int] | None:
        return self.known.get(mid)

    def stored_spans(self, after: int, through: int) -> dict[str, tuple[int, int]]:
        return {mid: v for mid, v in self.known.items() if after < v[0] <= through}

    def open(self) -> list[str]:
        return [mid for mid, v in sorted(self.known.items(), key=lambda kv: kv[1][0]) if not v[1]]

    def save(self) -> None:
        self.known.update(self.changes)


def exists(mid: str, start: int) -> Conflict:
    return Conflict(f"message {mid!r} exists (started at {start})", "message_exists", extra={"message": mid})


def not_found(mid: str) -> Conflict:
    return Conflict(f"no message {mid!r} was started", "message_not_found", extra={"message": mid})


def closed_already(mid: str, closed: int) -> Conflict:
    return Conflict(f"message {mid!r} was closed at {closed}", "message_closed",
                    extra={"message": mid, "closed_at": closed})


def check(book: Book, ops: Iterable[tuple[int, str, str]]) -> dict[str, tuple[int, int]]:
    """Apply ``ops`` ((event id, operation, message id), in id order) to ``book``: the messages they change,
    or ``409`` (nothing changed) for an operation its message's state does not allow. Redis runs the same
    rules in Lua (``redis_append.lua``)."""
    changed: dict[str, tuple[int, int]] = {}
    for id_, op, mid in ops:
        state = changed.get(mid) or book.get(mid)
        if op == START:
            if state is not None:
                raise exists(mid, state[0])
            changed[mid] = (id_, 0)
            continue
        if state is None:
            raise not_found(mid)
        start, closed = state
        if closed:
            if op != REPLACE:  # a closed message takes nothing but a whole new text
                raise closed_already(mid, closed)
        elif op in (END, REPLACE):
            changed[mid] = (start, id_)
    return changed


def keep_whole(through: int, trimmed: int, spans: Callable[[int, int], Iterable[tuple[int, int]]]) -> int:
    """The trim point at or below ``through`` (and not below ``trimmed``, the last one) that cuts no
    message: messages never half trimmed. A message that is open, or closed after the point, keeps
    everything from its start. Messages begun at or before ``trimmed`` were closed by then."""
    while through > trimmed:
        cut = [start for start, closed in spans(trimmed, through) if not closed or closed > through]
        if not cut:
            break
        through = min(cut) - 1
    return through


def close_data(mid: str, outcome: str) -> str:
    """The ``message.end`` the gateway appends for a message still open when its run ends."""
    status = "finished" if outcome == "completed" else "failed"
    return f'{{"message":"{mid}","status":"{status}"}}'


# -- reading -----------------------------------------------------------------------


@dataclass(slots=True)
class Message:
    """One message as a reader assembles it."""

    id: str
    start: int
    type: str | None = None
    metadata: Any = None
    parts: list[str] = field(default_factory=list)
    status: str = "open"
    error: Any = None

    def apply(self, op: str, doc: Mapping) -> None:
        if op == APPEND:
            self.parts.append(doc["text"])
        elif op == RESET:
            self.parts = []
        elif op in (END, REPLACE):
            if op == REPLACE:
                self.parts = [doc["text"]]
                if "metadata" in doc:
                    self.metadata = doc["metadata"]
            self.status = doc.get("status", "finished")
            self.error = doc.get("error")

    def whole(self) -> dict:
        body: dict = {"message": self.id, "type": self.type, "metadata": self.metadata, "text": "".join(self.parts),
                      "status": self.status, "start": self.start}
        if self.error is not None:
            body["error"] = self.error
        return body

    def snapshot(self) -> str:
        return dump_json(self.whole())


def stored_op(ev: StoredEvent) -> dict | None:
    """The data of a message operation the log holds, or None for any other event. Operations are checked
    when published; one stored before messages existed (any data under these types) reads as a plain event."""
    if ev.event not in TYPES or not ev.is_json:
        return None
    try:
        doc = load_json(ev.data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("message"), str) or \
            (ev.event in (APPEND, REPLACE) and not isinstance(doc.get("text"), str)):
        return None
    return doc


def new_message(mid: str, start: int, doc: Mapping) -> Message:
    return Message(mid, start, doc.get("type"), doc.get("metadata"))


class Compactor:
    """One reader's replay from the cursor ``(after, hold)`` (``hold`` 0: a plain cursor).

    ``feed`` takes the log's events in id order from ``walk_from`` on and returns what the reader gets,
    as (event, hold) pairs: the event's id with ``hold`` is its cursor (``P/H``; plain ``P`` if hold is
    0). ``flush`` ends the replay: a snapshot of each message still held, each stepping the hold forward,
    the last one leaving a plain cursor. After it, the reader takes every event as it is."""

    __slots__ = ("after", "held", "pos", "resumed", "skipping", "ts")

    def __init__(self, after: int, hold: int = 0) -> None:
        self.after = after
        self.pos = after  # the last id walked (or the cursor's)
        self.ts = 0  # and when it was appended
        #: while walking (hold, after]: the messages begun in it, folded to learn which the reader has
        self.skipping: dict[str, Message] | None = {} if hold else None
        self.held: dict[str, Message] = {}  # in the order they began
        self.resumed = hold

    @property
    def walk_from(self) -> int:
        """The id after which the walk reads the log."""
        return self.resumed - 1 if self.resumed else self.after

    def hold(self) -> int:
        """The start of the first message held back (0: none)."""
        for m in self.held.values():
            return m.start
        return 0

    def _leave_skip(self) -> None:
        """Past the cursor: what began in (hold, after] and was still open at it is held; the rest was
        delivered whole, and its later operations go as they are."""
        self.held.update((mid, m) for mid, m in self.skipping.items() if m.status == "open")
        self.skipping = None

    def feed(self, ev: StoredEvent) -> list[tuple[StoredEvent, int]]:
        if ev.id <= self.pos and self.skipping is None:
            return []  # already walked
        if self.skipping is not None and ev.id > self.after:
            self._leave_skip()
        self.pos, self.ts = max(self.pos, ev.id), ev.ts
        doc = stored_op(ev)
        if doc is None:
            return [] if self.skipping is not None else [(ev, self.hold())]
        op, mid = ev.event, doc["message"]
        if self.skipping is not None:
            if op == START:
                self.skipping[mid] = new_message(mid, ev.id, doc)
            elif (m := self.skipping.get(mid)) is not None:
                m.apply(op, doc)
            return []
        if op == START:
            self.held[mid] = new_message(mid, ev.id, doc)
            return []
        m = self.held.get(mid)
        if m is None:
            return [(ev, self.hold())]  # begun before the cursor, or delivered: as it is
        m.apply(op, doc)
        if m.status == "open":
            return []
        del self.held[mid]
        return [(StoredEvent(ev.id, SNAPSHOT, m.snapshot(), True, ev.ts), self.hold())]

    def flush(self) -> list[tuple[StoredEvent, int]]:
        if self.skipping is not None:
            self._leave_skip()
        out = []
        while self.held:
            mid, m = next(iter(self.held.items()))
            del self.held[mid]
            out.append((StoredEvent(self.pos, SNAPSHOT, m.snapshot(), True, self.ts), self.hold()))
        return out


def merge_appends(pairs: list[tuple[StoredEvent, int]]) -> list[tuple[StoredEvent, int]]:
    """Runs of ``message.append`` of one message with consecutive ids (nothing between them, not even an
    event held back) as one ``message.append`` at the run's last id, its texts joined, ``count`` saying how
    many it stands for: its cursor is exact, as each of theirs was. For a replay that is behind."""
    out: list[tuple[StoredEvent, int]] = []
    run: list[tuple[StoredEvent, dict]] = []

    def close() -> None:
        if len(run) == 1:
            out.append((run[0][0], hold))
        elif run:
            last = run[-1][0]
            data = {"message": run[0][1]["message"], "text": "".join(doc["text"] for _, doc in run),
                    "count": len(run)}
            out.append((StoredEvent(last.id, APPEND, dump_json(data), True, last.ts), hold))
        run.clear()

    hold = 0
    for ev, h in pairs:
        doc = stored_op(ev) if ev.event == APPEND else None
        if doc is None:
            close()
            out.append((ev, h))
            continue
        if run and (ev.id != run[-1][0].id + 1 or h != hold or doc["message"] != run[0][1]["message"]):
            close()
        hold = h
        run.append((ev, doc))
    close()
    return out


def cursor_text(id_: int, hold: int) -> str:
    return f"{id_}/{hold}" if hold else str(id_)

"""The reference event log: everything in process memory, nothing survives a restart.

Small enough to read in one sitting; the contract suite runs against it
first, and the benchmarks use it to tell the cost of the store from the
cost of the gateway.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Sequence
from typing import Any

from ..errors import Conflict, NotFound, Unavailable
from ..messages import DictBook, operations
from ..models import (
    AppendResult,
    InputResult,
    NewEvent,
    NewInput,
    Session,
    StoredEvent,
    StoredInput,
    now_ms,
)
from .base import (
    NO_RESULT,
    EventLog,
    apply_ack,
    apply_append,
    apply_complete,
    apply_input,
    apply_input_ack,
    apply_lease,
    apply_state,
    apply_trim,
    approval_ids,
    end_data,
    expiry,
    is_expired,
    new_row,
    stored_input,
    stored_json,
    stored_text,
)


class _Entry:
    __slots__ = ("row", "events", "keys", "inputs", "input_keys", "approvals", "messages")

    def __init__(self, row: Session) -> None:
        self.row = row
        self.events: list[StoredEvent] = []
        self.keys: dict[str, int] = {}
        self.inputs: list[StoredInput] = []  # inputs[i] has id i + 1
        self.input_keys: dict[str, int] = {}
        self.approvals: dict[str, int] = {}  # approval id -> the input that answered it (0: open)
        self.messages: dict[str, tuple[int, int]] = {}  # message id -> (start id, id that closed it or 0)

    def book(self) -> DictBook:
        return DictBook(self.messages)


class MemoryLog(EventLog):
    shared_store = False  # one process's memory: nothing else writes to it

    def __init__(self, *, max_events: int | None = None, default_ttl: int | None = None,
                 lease_seconds: int | None = None, cancel_grace: int | None = None) -> None:
        super().__init__()
        self.max_events = max_events
        self.default_ttl = default_ttl
        self.lease_seconds = lease_seconds
        self.cancel_grace = cancel_grace
        self._sessions: dict[str, _Entry] = {}
        self._closed = False

    async def open(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True  # nothing is pending: every write here is done when it returns

    def _writable(self) -> None:
        if self._closed:
            raise Unavailable("the store is closed", "store_closed")

    def _entry(self, session: str) -> _Entry:
        self._writable()
        entry = self._sessions.get(session)
        if entry is None:
            raise NotFound(f"no session {session!r}")
        return entry

    async def create_session(self, session: str, *, metadata: Any = None, ttl_seconds: int | None = None,
                             lease_seconds: int | None = None, webhook_url: str | None = None) -> Session:
        self._writable()
        if metadata is not None:
            stored_json(metadata, "metadata")  # what the other backends could not store is refused here too
        if session in self._sessions:
            raise Conflict(f"session {session!r} exists", "session_exists")
        row = new_row(session, now_ms(), metadata, ttl_seconds,
                      self.lease_seconds if lease_seconds is None else lease_seconds, webhook_url)
        self._sessions[session] = _Entry(row)
        return copy.copy(row)

    async def get_session(self, session: str) -> Session | None:
        entry = self._sessions.get(session)
        return copy.copy(entry.row) if entry else None

    async def list_sessions(self, *, status: str | None = None, limit: int = 100) -> list[Session]:
        rows = [e.row for e in self._sessions.values() if status is None or e.row.status == status]
        rows.sort(key=lambda r: r.created_at, reverse=True)
        return [copy.copy(r) for r in rows[:limit]]

    async def count_sessions(self) -> int:
        return len(self._sessions)

    async def delete_session(self, session: str) -> bool:
        self._writable()
        if self._sessions.pop(session, None) is None:
            return False
        self._deleted(session)
        return True

    async def append(self, session: str, events: Sequence[NewEvent], *, create: bool = True,
                     producer: int | None = None) -> AppendResult:
        if self._closed:
            self._writable()
        stored_text(events)
        ops = operations(events)
        entry = self._sessions.get(session)
        if entry is None:
            if not create:
                raise NotFound(f"no session {session!r}")
            await self.create_session(session)
            entry = self._sessions[session]
        book = entry.book() if ops or entry.messages else None
        result, new_keys = apply_append(entry.row, events, entry.keys, now_ms(), self.max_events, producer, book, ops)
        entry.keys.update(new_keys)
        if book is not None:
            book.save()
        for aid in approval_ids(result.events):
            entry.approvals.setdefault(aid, 0)
        self._store(entry, result.events)
        return result

    async def append_input(self, session: str, item: NewInput) -> InputResult:
        entry = self._entry(session)
        tail = stored_input(item)
        key = item.idempotency_key
        repeat = entry.inputs[entry.input_keys[key] - 1] if key is not None and key in entry.input_keys else None
        approval = entry.approvals.get(item.approval_id) if item.kind == "approval" else None
        result, mirror = apply_input(entry.row, item, tail, repeat, approval, now_ms(), self.max_events,
                                     self.cancel_grace, entry.book())
        if mirror is not None:
            stored = result.input
            entry.inputs.append(stored)
            if key is not None:
                entry.input_keys[key] = stored.id
            if item.kind == "approval":
                entry.approvals[item.approval_id] = stored.id
            self._store(entry, [mirror])
            self._input_appended(session, [stored], copy.copy(entry.row))
        return result

    async def read_input(self, session: str, after: int, limit: int) -> list[StoredInput]:
        entry = self._sessions.get(session)
        return [] if entry is None else entry.inputs[max(after, 0):max(after, 0) + limit]

    async def ack_input(self, session: str, upto: int) -> Session:
        entry = self._entry(session)
        apply_input_ack(entry.row, upto)
        return copy.copy(entry.row)

    async def approvals(self, session: str) -> dict[str, int]:
        entry = self._sessions.get(session)
        return {} if entry is None else dict(entry.approvals)

    def _store(self, entry: _Entry, events: list[StoredEvent]) -> None:
        entry.events.extend(events)
        if entry.events and entry.events[0].id <= entry.row.trimmed_id:
            cut = bisect.bisect_right(entry.events, entry.row.trimmed_id, key=lambda e: e.id)
            del entry.events[:cut]
        if events:
            self._appended(entry.row.id, events, copy.copy(entry.row))

    async def read(self, session: str, after: int, limit: int) -> list[StoredEvent]:
        entry = self._sessions.get(session)
        if entry is None:
            return []
        start = bisect.bisect_right(entry.events, after, key=lambda e: e.id)
        return entry.events[start:start + limit]

    async def complete(self, session: str, result: Any = NO_RESULT, *, outcome: str = "completed",
                       error: Any = None, producer: int | None = None) -> Session:
        entry = self._entry(session)
        data = end_data(result, outcome, error)
        book = entry.book()
        end = apply_complete(entry.row, result, now_ms(), data, outcome, error, producer, book)
        book.save()
        if end:
            self._store(entry, end)
        return copy.copy(entry.row)

    async def lease(self, session: str, *, producer: int | None = None, claim: bool = False,
                    seconds: int | None = None) -> Session:
        entry = self._entry(session)
        apply_lease(entry.row, now_ms(), producer, claim, seconds)
        return copy.copy(entry.row)

    async def expire(self, now: int) -> int:
        ended = 0
        for session, entry in list(self._sessions.items()):
            if (how := expiry(entry.row, now)) is not None:
                await self.complete(session, outcome=how[0], error=how[1])
                ended += 1
        return ended

    async def ack(self, session: str, upto: int) -> Session:
        entry = self._entry(session)
        apply_ack(entry.row, upto)
        return copy.copy(entry.row)

    async def put_state(self, session: str, state: Any, if_version: int | None, *,
                        producer: int | None = None) -> Session:
        entry = self._entry(session)
        stored_json(state, "state")
        apply_state(entry.row, state, if_version, now_ms(), producer)
        return copy.copy(entry.row)

    async def trim(self, session: str, through: int) -> Session:
        entry = self._entry(session)
        apply_trim(entry.row, through, entry.book())
        self._store(entry, [])
        return copy.copy(entry.row)

    async def sweep(self, now: int) -> int:
        expired = [s for s, e in self._sessions.items() if is_expired(e.row, now, self.default_ttl)]
        for session in expired:
            await self.delete_session(session)
        return len(expired)

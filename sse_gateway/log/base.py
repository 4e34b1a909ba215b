"""The event log: the one abstraction everything else stands on.

A log holds sessions. A session is an append-only sequence of events with
ids 1, 2, 3, ... and no holes, plus a small row of facts about the run
(status, result, acks, state document). The contract every backend keeps:

* **Contiguous ids.** ``append`` gives the events of one call consecutive
  ids following the session's last id, even when many callers (tasks,
  processes, nodes) append at once. Ids are never reused within an epoch.
* **Atomic.** One ``append`` call is all or nothing: either every new event
  is stored or none is and an error is raised.
* **Durable before return.** When ``append`` (or any other write) returns,
  the write is committed; a crash of the process afterwards cannot lose it.
* **Idempotent.** An event with an ``idempotency_key`` already used in the
  session is not appended again: its first id is returned with
  ``new=False``. Keys live as long as the session.
* **Epochs.** A session gets a random epoch when created. A session id that
  is deleted and created again gets a new one, so a cursor ``ID:EPOCH`` from
  the old life is never mistaken for a position in the new one.
* **Ordered reads.** ``read(after, limit)`` returns retained events with
  id > after in id order, at most ``limit`` of them. Events at or below
  ``Session.trimmed_id`` were removed by retention; a reader that asks for
  them gets the next retained events and is told of the gap by the caller.
* **Completion.** ``complete`` appends a final ``gateway.end`` event, after
  which ``append`` raises ``session_completed`` (except for idempotent
  replays of events already stored).
* **Notification.** After every committed write that adds events, the log
  calls its listeners with the session id and the new events, in id
  order, so the hub can wake subscribers. Listeners must not block.

Backends: ``memory`` (the reference, for tests and benchmarks), ``sqlite``
(the default) and ``redis`` (many nodes).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import BadRequest, Conflict, PreconditionFailed
from ..models import END_EVENT, AppendResult, NewEvent, Session, StoredEvent, dump_json

#: ``listener(session_id, new_events, session)``; ``new_events`` empty and ``session`` None on delete.
Listener = Callable[[str, list[StoredEvent], Session | None], None]

NO_RESULT = object()


class EventLog(abc.ABC):
    """A durable store of sessions and their events (see the module docstring)."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` after each committed write that adds events or deletes a session."""
        self._listeners.append(listener)

    def _notify(self, session: str, events: list[StoredEvent], row: Session | None) -> None:
        for listener in self._listeners:
            listener(session, events, row)

    async def open(self) -> None:
        """Connect and create what is missing. Called once before use."""

    async def close(self) -> None:
        """Flush and release everything. Pending writes finish first."""

    async def ping(self) -> None:
        """Raise if the store cannot be reached (used by ``/readyz``)."""

    @abc.abstractmethod
    async def create_session(self, session: str, *, metadata: Any = None, ttl_seconds: int | None = None) -> Session:
        """Create an empty session with a fresh epoch; ``409 session_exists`` if it exists."""

    @abc.abstractmethod
    async def get_session(self, session: str) -> Session | None:
        """The session's row, or None."""

    @abc.abstractmethod
    async def list_sessions(self, *, status: str | None = None, limit: int = 100) -> list[Session]:
        """Sessions, newest first, optionally only ``open`` or ``completed`` ones."""

    async def count_sessions(self) -> int:
        """How many sessions the log holds (for ``--max-sessions``); backends count without loading rows."""
        return len(await self.list_sessions(limit=2**62))

    @abc.abstractmethod
    async def delete_session(self, session: str) -> bool:
        """Remove the session, its events and keys. False if there was none."""

    @abc.abstractmethod
    async def append(self, session: str, events: Sequence[NewEvent], *, create: bool = True) -> AppendResult:
        """Append ``events`` atomically, with contiguous ids; see the contract above.

        Creates the session if it does not exist and ``create`` is true,
        else raises ``404``. Raises ``409 session_completed`` if completed.
        """

    @abc.abstractmethod
    async def read(self, session: str, after: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` retained events with id > ``after``, in order."""

    @abc.abstractmethod
    async def complete(self, session: str, result: Any = NO_RESULT) -> Session:
        """Append ``gateway.end`` (data: the result) and mark the session completed. Idempotent."""

    @abc.abstractmethod
    async def ack(self, session: str, upto: int) -> Session:
        """Move ``acked_id`` forward to ``upto`` (never back)."""

    @abc.abstractmethod
    async def put_state(self, session: str, state: Any, if_version: int | None) -> Session:
        """Replace the state document; ``412`` if ``if_version`` is given and differs."""

    @abc.abstractmethod
    async def trim(self, session: str, through: int) -> Session:
        """Remove the events with id <= ``through`` (retention); ids are never reused."""

    @abc.abstractmethod
    async def sweep(self, now: int) -> int:
        """Apply retention at time ``now`` (ms): remove expired sessions. Returns how many."""


# The rules of a session's row, shared by the backends that run them in
# Python (memory, sqlite). Each function checks everything before it
# changes anything, so a raised error leaves the row as it was.


def apply_append(row: Session, events: Sequence[NewEvent], keys: Mapping[str, int], ts: int,
                 max_events: int | None) -> tuple[AppendResult, dict[str, int]]:
    """Assign ids to ``events`` on ``row``; ``keys`` are the idempotency keys already stored.

    Returns the result and the new keys to store. Moves ``row.trimmed_id``
    when the session holds more than ``max_events``.
    """
    batch_keys: dict[str, int] = {}
    fresh = [ev for ev in events if ev.idempotency_key is None or ev.idempotency_key not in keys]
    if fresh and row.completed:
        # A retry of an event already stored may still learn its id; anything new is refused.
        keyed_again = {ev.idempotency_key for ev in fresh if ev.idempotency_key is not None}
        if len(keyed_again) < len(fresh) or any(k not in keys for k in keyed_again):
            raise Conflict(f"session {row.id!r} is completed", "session_completed")
    ids: list[int] = []
    new: list[bool] = []
    stored: list[StoredEvent] = []
    for ev in events:
        key = ev.idempotency_key
        if key is not None:
            seen = keys.get(key) or batch_keys.get(key)
            if seen:
                ids.append(seen)
                new.append(False)
                continue
        row.last_id += 1
        if key is not None:
            batch_keys[key] = row.last_id
        stored.append(StoredEvent(row.last_id, ev.event, ev.data, ev.is_json, ts))
        ids.append(row.last_id)
        new.append(True)
    if max_events and row.last_id - row.trimmed_id > max_events:
        row.trimmed_id = row.last_id - max_events
    return AppendResult(ids, new, row.last_id, stored), batch_keys


def apply_complete(row: Session, result: Any, ts: int) -> StoredEvent | None:
    """Complete ``row``; returns the ``gateway.end`` event, or None if it was already completed."""
    if row.completed:
        if result is not NO_RESULT and result != row.result:
            raise Conflict(f"session {row.id!r} was completed with another result", "session_completed")
        return None
    row.status = "completed"
    row.completed_at = ts
    row.result = None if result is NO_RESULT else result
    row.last_id += 1
    return StoredEvent(row.last_id, END_EVENT, dump_json(row.result), True, ts)


def apply_ack(row: Session, upto: int) -> None:
    if upto < 0 or upto > row.last_id:
        raise BadRequest(f"ack id must be between 0 and the last id ({row.last_id})", "invalid_ack")
    row.acked_id = max(row.acked_id, upto)


def apply_state(row: Session, state: Any, if_version: int | None) -> None:
    if if_version is not None and if_version != row.state_version:
        raise PreconditionFailed(
            f"state is at version {row.state_version}, not {if_version}", "state_version_mismatch",
            extra={"version": row.state_version},
        )
    row.state = state
    row.state_version += 1
    row.state_as_of = row.last_id


def apply_trim(row: Session, through: int) -> None:
    if through < 0:
        raise BadRequest("trim needs a non-negative id", "invalid_trim")
    row.trimmed_id = max(row.trimmed_id, min(through, row.last_id))


def is_expired(row: Session, now: int, default_ttl: int | None) -> bool:
    ttl = row.ttl_seconds if row.ttl_seconds is not None else default_ttl
    return bool(row.completed and ttl is not None and row.completed_at is not None
                and row.completed_at + ttl * 1000 <= now)

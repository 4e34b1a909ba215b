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
  replays of events already stored). It names the run's ``outcome``:
  ``completed`` (the end event's data is the result, as in v1), ``failed``
  or ``cancelled`` (data ``{"status", "error", "result"?}``, ``end_data``);
  the row keeps ``outcome``, ``result`` and ``error``. Completing again
  with the same outcome (and result, if one is given) changes nothing;
  another is ``409 session_completed``.
* **Every run ends (lifecycle).** A session's ``lease_seconds`` (given at
  creation, else the log's default; 0 or None: no lease) sets its
  ``deadline``: creation, each append, state write and ``lease`` renewal
  moves it to now + lease. A ``cancel`` input sets ``cancel_requested_at``
  (the first one only; ``run_status`` is ``cancelling``) and pulls the
  deadline to at most now + the log's ``cancel_grace``; renewals no longer
  move it. ``expire(now)`` ends every open run whose deadline has passed,
  atomically with the check, as ``cancelled`` (a cancel was asked for) or
  ``timed_out``, with an ``error`` saying why, and returns how many. Ending
  a run twice is impossible: a run another instance ended first is
  skipped.
* **Fencing.** A write may name its ``producer`` epoch (``append``,
  ``complete``, ``put_state``, ``lease``). An epoch below the session's
  ``producer_epoch`` is refused, atomically with the write and before
  anything else is checked, with ``403 producer_fenced`` (its ``extra``
  says the current epoch); a greater one becomes the session's. ``lease``
  with ``claim`` raises the epoch by one and returns it: a restarted agent
  claims, and its old process can no longer write. A write that names no
  epoch is not fenced.
* **A write fails alone.** A value the store cannot keep (event text with
  a lone surrogate: ``400 invalid_json``, or ``invalid_utf8`` for a text
  event; a metadata, state or result that is not JSON ``dump_json`` can
  write: ``400 invalid_json`` or ``json_too_deep``) is refused before the
  write is queued (``stored_text``, ``stored_json``). A write the store
  itself refuses while it commits a batch of writes (``group_commit``)
  fails with its own error, and the other writes of the batch commit and
  answer as if it had not been there.
* **Close drains.** ``close`` returns once every write accepted before it
  is committed and answered; a write after it is ``503 store_closed``.
* **Errors.** ``404`` no such session (``append(create=False)``, ``ack``,
  ``complete``, ``put_state``, ``trim``, ``lease``); ``409 session_exists``
  (``create_session``) and ``409 session_completed``; ``412
  state_version_mismatch``; ``400 invalid_ack`` (beyond the last id or
  negative) and ``400 invalid_trim`` (negative).
* **Input (user -> agent).** A session also holds a second sequence, its
  input, with ids 1, 2, 3, ... of its own (``input_last_id``), kept in
  order, durably, for the session's life. ``append_input`` stores one input
  and, in the same atomic write, appends its **mirror** to the output log:
  a ``gateway.input`` event whose data is ``{"input_id": N, "kind", "data",
  "approval_id"?, "decision"?}`` (``models.mirror_data``), so readers of the
  output see every input exactly once, in order. An input with an
  ``idempotency_key`` already used for an input of the session is not
  stored again (``new=False``, the first input returned; the key space is
  not the output's). ``404`` no session (input never creates one), ``409
  session_completed``. ``read_input(after, limit)`` returns inputs with id >
  after in order. ``ack_input(upto)`` moves ``input_acked_id`` forward only
  (``400 invalid_ack`` beyond ``input_last_id`` or negative). Deleting the
  session removes its input, keys and approvals.
* **Approvals.** An event of type ``approval.request`` whose JSON data is
  an object with a string ``approval_id`` (``rules.APPROVAL_ID``) opens
  that approval, in the same atomic write as the append (an id already
  known stays as it is: an answered approval is never reopened). An input
  of kind ``approval`` must name an open one: ``404 approval_not_found``
  if the session never opened it, ``409 approval_answered`` if an input
  answered it already; storing the input closes it, atomically.
* **Messages.** The five ``message.*`` operations (``messages``) are
  checked against the session's messages (id -> start id, id that closed
  it) in the same atomic write as the append, before anything changes:
  ``400 invalid_message`` (their data, checked before the write is
  queued), ``409 message_exists``, ``message_not_found``,
  ``message_closed``; idempotent repeats are not checked again.
  ``complete`` (and ``expire``) appends a ``message.end`` for each message
  still open, in the order they began, before ``gateway.end``. Retention
  (``max_events``, ``trim``) never moves ``trimmed_id`` into a message
  that is open or closed after it (``messages.keep_whole``). Deleting a
  session forgets its messages.
* **Observation.** A log tells its observers (``add_observer``) what
  happened, each fact its own call, made from the event loop after the
  commit, in commit order per session; observers must not block or raise:

  - ``appended(session, events, row)``: a write *of this instance* added
    ``events`` (never empty, in id order; ``row`` is the session after
    them). Completion is an append of ``gateway.end``.
  - ``moved(session, row)``: another writer (a process on the same file,
    another node) may have changed a session this instance ``watched``;
    ``row`` is what the store holds now (epoch, status, last_id at least).
    It may repeat a head already known; a row of another epoch means the
    session was deleted and created again. The events themselves are read
    from the log.
  - ``deleted(session)``: the session is gone (deleted here, expired, or,
    for a watched session, deleted by another writer).
  - ``input_appended(session, inputs, row)``: a write of this instance
    stored ``inputs`` (in id order; ``row`` is the session after them,
    ``input_last_id`` included). Its mirror event is told as ``appended``
    first. Another writer's input reaches ``moved`` with a row whose
    ``input_last_id`` moved (0 when the backend's notice does not say).
  - ``committed(operations, seconds)``: a backend that batches writes
    (``group_commit``) committed one batch of ``operations`` in ``seconds``
    (metrics).

  Nothing else is promised: a write that adds no events (ack, state, trim)
  is not announced, and a write of another instance to a session nobody
  here watches is not either.

What a backend may provide beyond the abstract methods, with defaults here
so callers never probe for it:

* ``shared_store``: other instances (processes, nodes) can open the same
  store. Such a backend watches ``watched`` (set by the hub to the sessions
  it has channels for; a live view, read when the backend polls or tails)
  and reports their writes as ``moved``/``deleted``. ``memory`` cannot be
  shared. ``wakeups_heard`` and ``watched_rereads`` count, for the
  metrics, the news of other instances heard and the re-reads of every
  watched row that news did not spare (SQLite: ``wake.py``).
* ``streams`` / ``streams_changed``: the hub hands the log its one count of
  this process's open streams (``limits.StreamSlots``) and says when a
  session's count changed. ``presence(session)`` is the number of open
  streams of a session and when their number last fell to 0: by default
  this process's count; a backend with ``shared_presence`` (Redis) sums
  the counts of every live instance on the store.

Backends: ``memory`` (the reference, for tests and benchmarks), ``sqlite``
(the default) and ``redis`` (many nodes). The contract suite
(``tests/test_log_contract.py``) runs every one of them; a new backend
that passes it works.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from ..errors import BadRequest, Conflict, Forbidden, NotFound, PreconditionFailed
from ..models import (
    APPROVAL_REQUEST,
    END_EVENT,
    INPUT_EVENT,
    AppendResult,
    InputResult,
    NewEvent,
    NewInput,
    Session,
    StoredEvent,
    StoredInput,
    dump_json,
    load_json,
    mirror_data,
    mirror_tail,
    new_epoch,
)
from ..rules import APPROVAL_ID
from .. import messages
from ..messages import Book

NO_RESULT = object()


class LogObserver:
    """What a log tells about its sessions (see "Observation" above). Every call does nothing here:
    an observer overrides the facts it cares for, and a log calls only those."""

    def appended(self, session: str, events: list[StoredEvent], row: Session) -> None:
        """This instance committed ``events`` (not empty, in id order); ``row`` is the session after them."""

    def moved(self, session: str, row: Session) -> None:
        """Another writer may have moved the head of a watched session; ``row`` is the store's now."""

    def deleted(self, session: str) -> None:
        """The session was deleted (or expired)."""

    def input_appended(self, session: str, inputs: list[StoredInput], row: Session) -> None:
        """This instance stored ``inputs`` (in id order); ``row`` is the session after them."""

    def committed(self, operations: int, seconds: float) -> None:
        """One group commit of ``operations`` writes took ``seconds``."""


_FACTS = ("appended", "moved", "deleted", "input_appended", "committed")


class OpenStreams:
    """This process's open streams, as ``limits.StreamSlots`` counts them; this one counts none."""

    def count(self, session: str) -> int:
        return 0

    def last_closed(self, session: str) -> int | None:
        """When the number of ``session``'s streams here last fell to 0 (ms), if it ever did."""
        return None


class EventLog(abc.ABC):
    """A durable store of sessions and their events (see the module docstring)."""

    #: other instances (processes, nodes) may open the same store; their writes reach ``moved``/``deleted``
    shared_store = False
    #: ``presence`` counts the streams of every instance on the store, not only this process's
    shared_presence = False
    #: (metrics) wake-ups heard from other instances, each telling what one of their commits changed
    wakeups_heard = 0
    #: (metrics) times the rows of every watched session were read again because another instance committed
    #: something this one was not told of (a lost wake-up, an instance that sends none)
    watched_rereads = 0

    def __init__(self) -> None:
        #: the sessions whose changes by other writers this log reports (``shared_store`` only); set by the hub
        self.watched: Collection[str] = ()
        #: this process's open streams (``presence``, ``streams_changed``); set by the hub
        self.streams: OpenStreams = OpenStreams()
        self._on_appended: list[Callable[[str, list[StoredEvent], Session], None]] = []
        self._on_moved: list[Callable[[str, Session], None]] = []
        self._on_deleted: list[Callable[[str], None]] = []
        self._on_committed: list[Callable[[int, float], None]] = []
        self._on_input_appended: list[Callable[[str, list[StoredInput], Session], None]] = []

    def add_observer(self, observer: LogObserver) -> None:
        """Tell ``observer`` of every fact it overrides (an override of nothing costs nothing per write)."""
        for fact in _FACTS:
            if getattr(type(observer), fact, None) not in (None, getattr(LogObserver, fact)):
                getattr(self, "_on_" + fact).append(getattr(observer, fact))

    def _appended(self, session: str, events: list[StoredEvent], row: Session) -> None:
        for call in self._on_appended:
            call(session, events, row)

    def _moved(self, session: str, row: Session) -> None:
        for call in self._on_moved:
            call(session, row)

    def _deleted(self, session: str) -> None:
        for call in self._on_deleted:
            call(session)

    def _input_appended(self, session: str, inputs: list[StoredInput], row: Session) -> None:
        for call in self._on_input_appended:
            call(session, inputs, row)

    def _committed(self, operations: int, seconds: float) -> None:
        for call in self._on_committed:
            call(operations, seconds)

    async def open(self) -> None:
        """Connect and create what is missing. Called once before use."""

    async def close(self) -> None:
        """Commit and answer every pending write, then release everything."""

    async def ping(self) -> None:
        """Raise if the store cannot be reached (used by ``/readyz``)."""

    async def presence(self, session: str) -> tuple[int, int | None]:
        """Open streams of ``session`` and when the last one closed (ms): this process's unless overridden."""
        return self.streams.count(session), self.streams.last_closed(session)

    def streams_changed(self, session: str) -> None:
        """This process's count of open streams of ``session`` (``self.streams``) changed."""

    @abc.abstractmethod
    async def create_session(self, session: str, *, metadata: Any = None, ttl_seconds: int | None = None,
                             lease_seconds: int | None = None, webhook_url: str | None = None) -> Session:
        """Create an empty session with a fresh epoch; ``409 session_exists`` if it exists. ``lease_seconds``
        None takes the log's default."""

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
    async def append(self, session: str, events: Sequence[NewEvent], *, create: bool = True,
                     producer: int | None = None) -> AppendResult:
        """Append ``events`` atomically, with contiguous ids; see the contract above.

        Creates the session if it does not exist and ``create`` is true,
        else raises ``404``. Raises ``409 session_completed`` if completed.
        """

    @abc.abstractmethod
    async def read(self, session: str, after: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` retained events with id > ``after``, in order."""

    @abc.abstractmethod
    async def complete(self, session: str, result: Any = NO_RESULT, *, outcome: str = "completed",
                       error: Any = None, producer: int | None = None) -> Session:
        """Append ``gateway.end`` (``end_data``) and end the run with ``outcome``. Idempotent."""

    @abc.abstractmethod
    async def ack(self, session: str, upto: int) -> Session:
        """Move ``acked_id`` forward to ``upto`` (never back)."""

    @abc.abstractmethod
    async def lease(self, session: str, *, producer: int | None = None, claim: bool = False,
                    seconds: int | None = None) -> Session:
        """Renew the producer's lease (``seconds``: set its length first, 0 for none); ``claim``: take over
        as a new producer epoch. ``409 session_completed`` once the run ended."""

    @abc.abstractmethod
    async def expire(self, now: int) -> int:
        """End every open run whose deadline is at or before ``now`` (ms); returns how many it ended."""

    @abc.abstractmethod
    async def put_state(self, session: str, state: Any, if_version: int | None, *,
                        producer: int | None = None) -> Session:
        """Replace the state document; ``412`` if ``if_version`` is given and differs."""

    @abc.abstractmethod
    async def trim(self, session: str, through: int) -> Session:
        """Remove the events with id <= ``through`` (retention); ids are never reused."""

    @abc.abstractmethod
    async def sweep(self, now: int) -> int:
        """Apply retention at time ``now`` (ms): remove expired sessions. Returns how many."""

    @abc.abstractmethod
    async def append_input(self, session: str, item: NewInput) -> InputResult:
        """Store ``item`` as the session's next input and append its mirror event, atomically (see above)."""

    @abc.abstractmethod
    async def read_input(self, session: str, after: int, limit: int) -> list[StoredInput]:
        """Up to ``limit`` inputs with id > ``after``, in order ([] for no session)."""

    @abc.abstractmethod
    async def ack_input(self, session: str, upto: int) -> Session:
        """Move ``input_acked_id`` forward to ``upto`` (never back)."""

    @abc.abstractmethod
    async def approvals(self, session: str) -> dict[str, int]:
        """The session's approvals: approval id -> the input id that answered it (0: still open)."""


def stored_json(value: Any, what: str) -> str:
    """``value`` (metadata, state, result) as the JSON text a backend stores, or ``400`` if it has none.

    The gateway's routes have checked their values already (``bodies.parse_json``); this keeps a caller
    of the log from queueing a value that would fail inside a group commit."""
    try:
        text = dump_json(value)
        if not text.isascii():
            text.encode()  # a lone surrogate: not UTF-8, so neither SQLite nor Redis can take it
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply to be stored", "json_too_deep") from None
    except (TypeError, ValueError) as exc:  # not JSON (orjson's and the standard library's errors), or not UTF-8
        raise BadRequest(f"{what} cannot be stored as JSON: {exc}", "invalid_json") from None
    return text


def stored_text(events: Sequence[NewEvent]) -> None:
    """``400`` if an event's text cannot be stored (a lone surrogate is not UTF-8). Free for ASCII text."""
    for ev in events:
        if not ev.data.isascii():
            try:
                ev.data.encode()
            except UnicodeEncodeError:
                raise BadRequest("event data is not valid Unicode text (a lone surrogate)",
                                 "invalid_json" if ev.is_json else "invalid_utf8") from None


# The rules of a session's row, shared by the backends that run them in
# Python (memory, sqlite). Each function checks everything before it
# changes anything, so a raised error leaves the row as it was.


def fenced(session: str, producer: int, current: int) -> Forbidden:
    """The refusal of a write that names producer epoch ``producer`` when the session's is ``current`` (every
    backend raises this one)."""
    return Forbidden(f"producer epoch {producer} of session {session!r} was fenced: another producer took over as "
                     f"epoch {current}", "producer_fenced", extra={"producer_epoch": current},
                     headers={"Producer-Epoch": str(current)})


def ended(session: str, outcome: str | None) -> Conflict:
    """The refusal of a write that needs the run open (or another end) once it ended with ``outcome``."""
    return Conflict(f"session {session!r} has ended already ({outcome})", "session_completed",
                    extra={"outcome": outcome})


def apply_producer(row: Session, producer: int | None) -> None:
    """Fencing, checked before anything else: ``403 producer_fenced`` for an epoch older than the session's.
    A newer one becomes the session's only once the write has passed every check (``renew``, ``adopt``)."""
    if producer is not None and producer < row.producer_epoch:
        raise fenced(row.id, producer, row.producer_epoch)


def adopt(row: Session, producer: int | None) -> None:
    """A write that passed every check: its producer epoch (not below the session's) becomes the session's."""
    if producer is not None:
        row.producer_epoch = producer


def renew(row: Session, ts: int, producer: int | None = None) -> None:
    """The producer wrote at ``ts``: it adopts its epoch, and its lease runs from now (not once a cancel
    was asked for: then the cancel's grace, or else the lease as it stood, ends the run)."""
    adopt(row, producer)
    if row.cancel_requested_at is None and row.outcome is None:
        row.deadline = ts + row.lease_seconds * 1000 if row.lease_seconds else None


def new_row(session: str, ts: int, metadata: Any = None, ttl_seconds: int | None = None,
            lease_seconds: int | None = None, webhook_url: str | None = None) -> Session:
    """A new session's row: a fresh epoch, and its lease (None: no lease) running from ``ts``."""
    row = Session(id=session, epoch=new_epoch(), created_at=ts, metadata=metadata, ttl_seconds=ttl_seconds,
                  lease_seconds=lease_seconds or None, webhook_url=webhook_url)
    renew(row, ts)
    return row


def apply_append(row: Session, events: Sequence[NewEvent], keys: Mapping[str, int], ts: int,
                 max_events: int | None, producer: int | None = None, book: Book | None = None,
                 ops: Sequence[tuple[int, str, str]] = ()) -> tuple[AppendResult, dict[str, int]]:
    """Assign ids to ``events`` on ``row``; ``keys`` are the idempotency keys already stored; ``ops`` the
    message operations among them (``messages.operations``), checked against ``book``, whose ``changes``
    the backend then stores.

    Returns the result and the new keys to store. Moves ``row.trimmed_id``
    when the session holds more than ``max_events`` (never into a message),
    and renews the lease.
    """
    apply_producer(row, producer)
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
    last = row.last_id
    for ev in events:
        key = ev.idempotency_key
        if key is not None:
            seen = keys.get(key) or batch_keys.get(key)
            if seen:
                ids.append(seen)
                new.append(False)
                continue
        last += 1
        if key is not None:
            batch_keys[key] = last
        stored.append(StoredEvent(last, ev.event, ev.data, ev.is_json, ts))
        ids.append(last)
        new.append(True)
    if ops:  # checked before the row changes: a refused operation leaves everything as it was
        book.changes = messages.check(book, [(ids[i], op, mid) for i, op, mid in ops if new[i]])
    row.last_id = last
    if max_events and row.last_id - row.trimmed_id > max_events:
        row.trimmed_id = trim_point(row, row.last_id - max_events, book)
    renew(row, ts, producer)
    return AppendResult(ids, new, row.last_id, stored, row.epoch), batch_keys


def trim_point(row: Session, through: int, book: Book | None) -> int:
    """Where retention that asks to remove up to ``through`` moves ``trimmed_id``: never back, never past
    the last id, never into a message (``messages.keep_whole``)."""
    through = min(through, row.last_id)
    if book is not None:
        through = messages.keep_whole(through, row.trimmed_id, book.spans)
    return max(row.trimmed_id, through)


_APPROVAL_ID = re.compile(APPROVAL_ID)


def approval_ids(events: Sequence[StoredEvent]) -> list[str]:
    """The approval ids the ``approval.request`` events among ``events`` open (one string compare per event
    for the rest). Redis applies the same rule in Lua (``redis_append.lua``)."""
    found = []
    for ev in events:
        if ev.event == APPROVAL_REQUEST and ev.is_json:
            try:
                doc = load_json(ev.data)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(aid := doc.get("approval_id"), str) \
                    and _APPROVAL_ID.fullmatch(aid):
                found.append(aid)
    return found


def stored_input(item: NewInput) -> str:
    """``item``'s mirror tail (``models.mirror_tail``), or ``400`` if its data cannot be stored."""
    if not item.data.isascii():
        try:
            item.data.encode()
        except UnicodeEncodeError:
            raise BadRequest("input data is not valid Unicode text (a lone surrogate)", "invalid_json") from None
    return mirror_tail(item)


def apply_input(row: Session, item: NewInput, tail: str, repeat: StoredInput | None, approval: int | None,
                ts: int, max_events: int | None, grace: int | None = None,
                book: Book | None = None) -> tuple[InputResult, StoredEvent | None]:
    """Store ``item`` on ``row``: ``repeat`` is the input its idempotency key named already (if any),
    ``approval`` the state of the approval it answers (None unknown, 0 open, else the input that answered).
    A first cancel starts the ``grace`` (seconds; None: the agent alone ends the run).
    Returns the result and the mirror event to append (None for a repeat)."""
    if repeat is not None:
        return InputResult(repeat, False, row.input_last_id, row.last_id, row.epoch), None
    if row.completed:
        raise Conflict(f"session {row.id!r} is completed", "session_completed")
    if item.kind == "approval":
        if approval is None:
            raise NotFound(f"session {row.id!r} has no approval {item.approval_id!r}", "approval_not_found")
        if approval:
            raise Conflict(f"approval {item.approval_id!r} was answered by input {approval}", "approval_answered",
                           extra={"input_id": approval})
    if item.kind == "cancel" and row.cancel_requested_at is None:
        row.cancel_requested_at = ts
        if grace is not None:
            end = ts + grace * 1000
            row.deadline = end if row.deadline is None else min(row.deadline, end)
    row.input_last_id += 1
    row.last_id += 1
    mirror = StoredEvent(row.last_id, INPUT_EVENT, mirror_data(row.input_last_id, tail), True, ts)
    if max_events and row.last_id - row.trimmed_id > max_events:
        row.trimmed_id = trim_point(row, row.last_id - max_events, book)
    stored = StoredInput(row.input_last_id, item.kind, item.data, ts, row.last_id, item.approval_id, item.decision)
    return InputResult(stored, True, row.input_last_id, row.last_id, row.epoch), mirror


def apply_input_ack(row: Session, upto: int) -> None:
    if upto < 0 or upto > row.input_last_id:
        raise BadRequest(f"input ack id must be between 0 and the last input id ({row.input_last_id})", "invalid_ack")
    row.input_acked_id = max(row.input_acked_id, upto)


def end_data(result: Any = NO_RESULT, outcome: str = "completed", error: Any = None) -> str:
    """The ``gateway.end`` event's data as stored JSON text (``400`` if it cannot be): the result of a
    completed run (v1), else ``{"status", "error", "result"?}``."""
    if outcome == "completed":
        return stored_json(None if result is NO_RESULT else result, "result")
    body = {"status": outcome, "error": error}
    if result is not NO_RESULT:
        body["result"] = result
    return stored_json(body, "result or error")


def apply_complete(row: Session, result: Any, ts: int, data: str, outcome: str = "completed", error: Any = None,
                   producer: int | None = None, book: Book | None = None) -> list[StoredEvent]:
    """End ``row``'s run with ``outcome``; returns the events appended: a ``message.end`` for each message of
    ``book`` still open (``finished`` if the run completed, else ``failed``), then ``gateway.end``
    (``data``: ``end_data``'s text). None if the run had ended so already."""
    apply_producer(row, producer)
    if row.completed:
        if outcome != row.outcome or (result is not NO_RESULT and result != row.result):
            raise ended(row.id, row.outcome)
        return []
    adopt(row, producer)
    out = []
    if book is not None and (still_open := book.open()):
        for mid in still_open:
            row.last_id += 1
            out.append(StoredEvent(row.last_id, messages.END, messages.close_data(mid, outcome), True, ts))
        book.changes = {mid: (book.get(mid)[0], ev.id) for mid, ev in zip(still_open, out)}
    row.status = "completed"
    row.outcome = outcome
    row.error = error
    row.completed_at = ts
    row.deadline = None
    row.result = None if result is NO_RESULT else result
    row.last_id += 1
    out.append(StoredEvent(row.last_id, END_EVENT, data, True, ts))
    return out


def expiry(row: Session, now: int) -> tuple[str, dict] | None:
    """How an open run whose deadline has passed at ``now`` ends (outcome, error), or None if it does not."""
    if row.completed or row.deadline is None or row.deadline > now:
        return None
    if row.cancel_requested_at is not None:
        return "cancelled", {"code": "cancel_unconfirmed",
                             "message": "the agent did not confirm the cancel in time; the gateway ended the run"}
    return "timed_out", {"code": "lease_expired",
                         "message": f"the producer neither wrote nor renewed its lease for {row.lease_seconds} s"}


def apply_lease(row: Session, ts: int, producer: int | None, claim: bool, seconds: int | None) -> None:
    apply_producer(row, producer)
    if row.completed:
        raise ended(row.id, row.outcome)
    adopt(row, producer)
    if claim:
        row.producer_epoch += 1
    if seconds is not None:
        row.lease_seconds = seconds or None
    renew(row, ts)


def apply_ack(row: Session, upto: int) -> None:
    if upto < 0 or upto > row.last_id:
        raise BadRequest(f"ack id must be between 0 and the last id ({row.last_id})", "invalid_ack")
    row.acked_id = max(row.acked_id, upto)


def apply_state(row: Session, state: Any, if_version: int | None, ts: int, producer: int | None = None) -> None:
    apply_producer(row, producer)
    if if_version is not None and if_version != row.state_version:
        raise PreconditionFailed(
            f"state is at version {row.state_version}, not {if_version}", "state_version_mismatch",
            extra={"version": row.state_version},
        )
    row.state = state
    row.state_version += 1
    row.state_as_of = row.last_id
    renew(row, ts, producer)


def apply_trim(row: Session, through: int, book: Book | None = None) -> None:
    if through < 0:
        raise BadRequest("trim needs a non-negative id", "invalid_trim")
    row.trimmed_id = trim_point(row, through, book)


def is_expired(row: Session, now: int, default_ttl: int | None) -> bool:
    ttl = row.ttl_seconds if row.ttl_seconds is not None else default_ttl
    return bool(row.completed and ttl is not None and row.completed_at is not None
                and row.completed_at + ttl * 1000 <= now)

"""The default event log: one SQLite file in WAL mode, one writer, group commit.

Writes (appends, completions, acks, state, deletes) go through one queue to
one writer connection (``group_commit``). The writer takes everything
queued, runs it in a single ``BEGIN IMMEDIATE`` transaction and commits
once, then answers every caller: concurrent publishers share one commit,
and nobody's ``append`` returns before its events are committed. Values
are turned into the text stored before they are queued, so a value that
cannot be stored is refused to its caller alone. If the batch fails anyway
for a reason that is not the store's (a row SQLite refuses, a bug), the
writer rolls it back and runs it again in one transaction with a
``SAVEPOINT`` per write: the write that fails is rolled back to its
savepoint and answered with its error, the others commit together. The
rules of each write run in Python (``log.base.apply_*``) against rows read
inside the transaction, so
several processes on one file still allocate contiguous ids: the write lock
is SQLite's, not ours. The processes that know of each other also queue for
it in the kernel (``writer.lock``, ``wake.py``), so the next writer starts
as soon as the last one commits.

Reads use a few read-only connections of their own (WAL lets them run
beside the writer). Other processes on the same file (``serve --workers``,
a rolling restart) tell this one what their commits changed, one datagram
per commit (``wake.py``), and it tells its observers (``moved``,
``deleted``) for the sessions it watches, without reading the store. A
poller stays as the safety net: it watches ``PRAGMA data_version`` of the
writer's connection, which moves only when *another* connection commits,
and re-reads the rows of the watched sessions when a commit was not told
of (a datagram lost, or a process that sends none), and in any case at
least once a second while other processes commit. This process's own
commits never cost a re-read.

Deleting a session or trimming its history only moves a row's fields;
the events themselves are removed afterwards in small chunks by ``sweep``,
so neither ever holds the write lock for long.

Durability: ``synchronous=NORMAL`` (the default) survives a crash of the
process (``kill -9``) but may lose the last commits on a power cut;
``FULL`` survives both at the cost of an fsync per group commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiosqlite

from ..errors import Conflict, GatewayError, NotFound, Unavailable
from ..messages import Book, operations
from ..models import (
    AppendResult,
    InputResult,
    NewEvent,
    NewInput,
    Session,
    StoredEvent,
    StoredInput,
    dump_json,
    load_json,
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
from .group_commit import GroupCommit, Write
from .wake import Wake

log = logging.getLogger("sse_gateway.sqlite")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    sid INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a recreated session gets a new sid
    name TEXT NOT NULL UNIQUE,
    epoch TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    completed_at INTEGER,
    last_id INTEGER NOT NULL DEFAULT 0,
    trimmed_id INTEGER NOT NULL DEFAULT 0,
    purged_id INTEGER NOT NULL DEFAULT 0,   -- events <= purged_id are physically deleted
    metadata TEXT,
    ttl_seconds INTEGER,
    acked_id INTEGER NOT NULL DEFAULT 0,
    state TEXT,
    state_version INTEGER NOT NULL DEFAULT 0,
    state_as_of INTEGER NOT NULL DEFAULT 0,
    result TEXT
);
CREATE INDEX IF NOT EXISTS sessions_created ON sessions (created_at);
CREATE TABLE IF NOT EXISTS events (
    sid INTEGER NOT NULL,
    id INTEGER NOT NULL,
    event TEXT NOT NULL,
    data TEXT NOT NULL,
    is_json INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (sid, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idem (
    sid INTEGER NOT NULL,
    key TEXT NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (sid, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inputs (      -- user -> agent, ids of their own per session
    sid INTEGER NOT NULL,
    id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    ts INTEGER NOT NULL,
    event_id INTEGER NOT NULL,           -- its mirror (gateway.input) in events
    approval_id TEXT,
    decision TEXT,
    PRIMARY KEY (sid, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS input_keys (
    sid INTEGER NOT NULL,
    key TEXT NOT NULL,
    id INTEGER NOT NULL,
    PRIMARY KEY (sid, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS approvals (  -- opened by approval.request events, closed by an approval input
    sid INTEGER NOT NULL,
    approval_id TEXT NOT NULL,
    input_id INTEGER NOT NULL,           -- 0: open
    PRIMARY KEY (sid, approval_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (   -- message.* events: each message's start and the id that closed it
    sid INTEGER NOT NULL,
    message TEXT NOT NULL,
    start_id INTEGER NOT NULL,
    closed_id INTEGER NOT NULL,          -- 0: open
    PRIMARY KEY (sid, message)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_start ON messages (sid, start_id);
CREATE TABLE IF NOT EXISTS doomed (      -- deleted sessions whose events are still being removed
    sid INTEGER PRIMARY KEY,
    last_id INTEGER NOT NULL
);
"""

_ROW = ("sid, name, epoch, created_at, status, completed_at, last_id, trimmed_id, ttl_seconds, acked_id, "
        "state_version, state_as_of, result, input_last_id, input_acked_id, outcome, error, lease_seconds, "
        "deadline, cancel_requested_at, producer_epoch, webhook_url")
#: columns added after the first release: a file made before them gets them when it is opened
_ADDED_COLUMNS = {"input_last_id": "INTEGER NOT NULL DEFAULT 0", "input_acked_id": "INTEGER NOT NULL DEFAULT 0",
                  "outcome": "TEXT", "error": "TEXT", "lease_seconds": "INTEGER",
                  "deadline": "INTEGER",  # when an open run ends unless its producer writes (ms)
                  "cancel_requested_at": "INTEGER", "producer_epoch": "INTEGER NOT NULL DEFAULT 0",
                  "webhook_url": "TEXT"}
_N_ROW = _ROW.count(",") + 1
_INPUT = "id, kind, data, ts, event_id, approval_id, decision"
_FULL_ROW = _ROW + ", metadata, state"
_PURGE_CHUNK = 5000
_MAX_BATCH = 1000
#: while other processes commit, the poller re-reads the watched rows at least this often (seconds), even
#: when every commit was told of: a process that sends no wake-ups may have committed beside them
REREAD_EVERY = 1.0


def _row(t: tuple, full: bool = False) -> tuple[int, Session]:
    (sid, name, epoch, created_at, status, completed_at, last_id, trimmed_id, ttl, acked, sv, sa, result, il, ia,
     outcome, error, lease, deadline, cancel_at, producer, webhook) = t[:_N_ROW]
    row = Session(id=name, epoch=epoch, created_at=created_at, status=status, completed_at=completed_at,
                  last_id=last_id, trimmed_id=trimmed_id, ttl_seconds=ttl, acked_id=acked, state_version=sv,
                  state_as_of=sa, result=None if result is None else load_json(result), input_last_id=il,
                  input_acked_id=ia, outcome=outcome or ("completed" if status == "completed" else None),
                  error=None if error is None else load_json(error), lease_seconds=lease, deadline=deadline,
                  cancel_requested_at=cancel_at, producer_epoch=producer, webhook_url=webhook)
    if full:
        row.metadata = None if t[_N_ROW] is None else load_json(t[_N_ROW])
        row.state = None if t[_N_ROW + 1] is None else load_json(t[_N_ROW + 1])
    return sid, row


def _dumps(value: Any) -> str | None:
    return None if value is None else dump_json(value)


def store_error(exc: sqlite3.Error, path: str | None = None) -> GatewayError:
    """What a failed write means to a publisher; nothing of the batch was committed. A file system that
    went read-only under an open database (ext4's errors=remount-ro) shows only as a disk I/O error, so
    ``path``'s file system is asked."""
    text = str(exc).lower()
    if "full" in text:
        err = Unavailable("the store is out of space; nothing was written", "store_full", retry_after=5)
        err.status = 507
        return err
    if "readonly" in text or "read-only" in text or (path is not None and "i/o" in text and _read_only(path)):
        return Unavailable("the store is read-only; nothing was written", "store_read_only", retry_after=5)
    if "locked" in text or "busy" in text:
        return Unavailable("the store is busy; nothing was written", "store_busy", retry_after=1)
    return Unavailable(f"the store failed: {exc}; nothing was written", "store_error", retry_after=1)


def _store_failed(exc: BaseException) -> bool:
    """Whether a failed group commit failed for the store's sake (full, read-only, busy), not one write's:
    then running its writes one by one would only fail each again."""
    return isinstance(exc, GatewayError) and exc.code in ("store_full", "store_read_only", "store_busy")


def _read_only(path: str) -> bool:
    """Whether the file system of ``path`` refuses writes (EROFS). Only a write tells: a file system
    turned read-only after an error still says rw in its mount flags."""
    probe = os.path.join(os.path.dirname(os.path.abspath(path)), f".sse-gateway-probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        return exc.errno == errno.EROFS
    return False


def preflight(path: str) -> str | None:
    """Why the file cannot serve as the log (locked, corrupt, unwritable), in one sentence; None if it can."""
    if _read_only(path):
        return f"{path} is on a read-only file system; the log needs to write there (check the disk and remount it)"
    try:
        conn = sqlite3.connect(path, timeout=2, isolation_level=None)
    except sqlite3.Error as exc:
        return f"cannot open {path}: {exc}"
    try:
        conn.execute("PRAGMA schema_version").fetchone()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            return f"{path} cannot use WAL mode (is it on a network filesystem?)"
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return f"{path} is locked by another program that holds a write transaction ({text})"
        if "not a database" in text or "malformed" in text:
            return f"{path} is not a usable SQLite database ({text}); move it aside or restore it from a backup"
        return f"{path} is not usable: {text}"
    finally:
        conn.close()
    return None


class _Op(Write):
    __slots__ = ("args", "kind")

    def __init__(self, kind: str, session: str, args: tuple) -> None:
        super().__init__(session)
        self.kind = kind
        self.args = args


@dataclass
class _Writes:
    """What one group commit writes, gathered while its operations run."""

    events: list[tuple] = field(default_factory=list)
    keys: list[tuple] = field(default_factory=list)
    states: list[tuple] = field(default_factory=list)
    touched: dict[str, tuple[int, Session]] = field(default_factory=dict)
    rewritten: set[str] = field(default_factory=set)  # touched by more than appends: every column is written
    appended: dict[str, tuple[list[StoredEvent], Session]] = field(default_factory=dict)
    inputs: dict[str, tuple[list[StoredInput], Session]] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    #: what the other processes are told (``wake.py``): session -> (sid, epoch or None if deleted, last_id,
    #: status, input_last_id), for the sessions created, deleted or given events
    news: dict[str, tuple] = field(default_factory=dict)


class SqliteLog(EventLog):
    shared_store = True  # other processes may open the same file: the poller hears their commits

    def __init__(self, path: str, *, max_events: int | None = None, default_ttl: int | None = None,
                 lease_seconds: int | None = None, cancel_grace: int | None = None,
                 synchronous: str = "NORMAL", readers: int = 3, poll_interval: float = 0.05,
                 wake: bool = True) -> None:
        super().__init__()
        self.path = path
        self.max_events = max_events
        self.default_ttl = default_ttl
        self.lease_seconds = lease_seconds
        self.cancel_grace = cancel_grace
        self.synchronous = synchronous
        self.poll_interval = poll_interval
        self._n_readers = readers
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader = 0
        self._db: sqlite3.Connection | None = None  # the writer's, used only on self._thread
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._writer = GroupCommit(self._commit, self._answer, committed=self._committed, max_batch=_MAX_BATCH,
                                   name="sqlite-writer")
        self._poller: asyncio.Task | None = None
        #: wake-ups to and from the other processes on the file (None: the poller alone hears them)
        self._wake: Wake | None = Wake(path, self._heard) if wake and path != ":memory:" else None
        self._told = False  # a wake-up was heard since the poller last looked
        self._missed = False  # a wake-up was lost (a gap in a sender's sequence)
        self._senders: dict[str, int] = {}  # the last sequence number heard from each sender
        self._sids: dict[str, int] = {}  # the life (sid) each session was last told of, so older news is ignored

    # -- life ------------------------------------------------------------

    async def open(self) -> None:
        self._db = await asyncio.get_running_loop().run_in_executor(self._thread, self._connect_writer)
        for _ in range(self._n_readers + 1):
            conn = await aiosqlite.connect(self.path, isolation_level=None)
            await conn.execute("PRAGMA busy_timeout = 10000")
            await conn.execute("PRAGMA query_only = 1")
            await conn.execute("PRAGMA mmap_size = 268435456")
            self._readers.append(conn)
        self._poll_conn = self._readers.pop()
        if self._wake is not None and (problem := self._wake.open(asyncio.get_running_loop())):
            log.warning("no wake-ups between the processes on %s (%s): commits of others are noticed by polling",
                        self.path, problem)
            self._wake = None
        self._writer.start()
        self._poller = asyncio.create_task(self._poll_loop(), name="sqlite-poller")

    async def close(self) -> None:
        if self._db is None:
            return
        await self._writer.close()
        self._poller.cancel()
        await asyncio.gather(self._poller, return_exceptions=True)
        if self._wake is not None:
            self._wake.close()
        for conn in [*self._readers, self._poll_conn]:
            await conn.close()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        self._thread.shutdown()
        self._db = None

    async def ping(self) -> None:
        await self._query("SELECT 1")

    def _reader(self) -> aiosqlite.Connection:
        self._next_reader = (self._next_reader + 1) % len(self._readers)
        return self._readers[self._next_reader]

    async def _query(self, sql: str, params: tuple = ()) -> list:
        """A read on one of the reader connections; a failure is a 503, never a traceback."""
        if self._db is None:
            raise Unavailable("the store is closed", "store_closed")
        try:
            return await self._reader().execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise store_error(exc) from None

    # -- reads -----------------------------------------------------------

    async def get_session(self, session: str) -> Session | None:
        rows = await self._query(f"SELECT {_FULL_ROW} FROM sessions WHERE name = ?", (session,))
        return _row(rows[0], full=True)[1] if rows else None

    async def list_sessions(self, *, status: str | None = None, limit: int = 100) -> list[Session]:
        where, params = ("WHERE status = ?", (status, limit)) if status else ("", (limit,))
        rows = await self._query(
            f"SELECT {_FULL_ROW} FROM sessions {where} ORDER BY created_at DESC, sid DESC LIMIT ?", params)
        return [_row(r, full=True)[1] for r in rows]

    async def count_sessions(self) -> int:
        (count,), = await self._query("SELECT count(*) FROM sessions")
        return count

    async def read(self, session: str, after: int, limit: int) -> list[StoredEvent]:
        rows = await self._query(
            "SELECT e.id, e.event, e.data, e.is_json, e.ts FROM sessions s JOIN events e ON e.sid = s.sid "
            "WHERE s.name = ? AND e.id > max(?, s.trimmed_id) ORDER BY e.id LIMIT ?",
            (session, after, limit))
        return [StoredEvent(*r) for r in rows]

    async def read_input(self, session: str, after: int, limit: int) -> list[StoredInput]:
        rows = await self._query(
            f"SELECT {', '.join('i.' + c.strip() for c in _INPUT.split(','))} FROM sessions s "
            "JOIN inputs i ON i.sid = s.sid WHERE s.name = ? AND i.id > ? ORDER BY i.id LIMIT ?",
            (session, after, limit))
        return [_input(r) for r in rows]

    async def approvals(self, session: str) -> dict[str, int]:
        rows = await self._query("SELECT a.approval_id, a.input_id FROM sessions s JOIN approvals a ON a.sid = s.sid "
                                 "WHERE s.name = ?", (session,))
        return dict(rows)

    # -- writes: everything goes through the writer ------------------------

    async def _submit(self, kind: str, session: str, *args: Any) -> Any:
        return await self._writer.submit(_Op(kind, session, args))

    async def create_session(self, session: str, *, metadata: Any = None, ttl_seconds: int | None = None,
                             lease_seconds: int | None = None, webhook_url: str | None = None) -> Session:
        text = None if metadata is None else stored_json(metadata, "metadata")
        lease = self.lease_seconds if lease_seconds is None else lease_seconds
        return await self._submit("create", session, metadata, text, ttl_seconds, lease, webhook_url)

    async def delete_session(self, session: str) -> bool:
        return await self._submit("delete", session)

    async def append(self, session: str, events: Sequence[NewEvent], *, create: bool = True,
                     producer: int | None = None) -> AppendResult:
        stored_text(events)
        return await self._submit("append", session, events, create, producer, operations(events))

    async def complete(self, session: str, result: Any = NO_RESULT, *, outcome: str = "completed",
                       error: Any = None, producer: int | None = None) -> Session:
        text = end_data(result, outcome, error)
        return await self._submit("complete", session, result, text, outcome, error, producer)

    async def lease(self, session: str, *, producer: int | None = None, claim: bool = False,
                    seconds: int | None = None) -> Session:
        return await self._submit("lease", session, producer, claim, seconds)

    async def expire(self, now: int) -> int:
        due = await self._query("SELECT name FROM sessions WHERE deadline <= ? AND status = 'open'", (now,))
        ended = await asyncio.gather(*(self._submit("expire", name, now) for name, in due), return_exceptions=True)
        failed = [e for e in ended if isinstance(e, BaseException) and not isinstance(e, NotFound)]
        if failed:  # (a session deleted since it was found due is not a failure)
            raise failed[0]
        return sum(1 for e in ended if e is True)

    async def ack(self, session: str, upto: int) -> Session:
        return await self._submit("ack", session, upto)

    async def put_state(self, session: str, state: Any, if_version: int | None, *,
                        producer: int | None = None) -> Session:
        return await self._submit("state", session, state, stored_json(state, "state"), if_version, producer)

    async def trim(self, session: str, through: int) -> Session:
        return await self._submit("trim", session, through)

    async def append_input(self, session: str, item: NewInput) -> InputResult:
        return await self._submit("input", session, item, stored_input(item))

    async def ack_input(self, session: str, upto: int) -> Session:
        return await self._submit("input_ack", session, upto)

    async def _commit(self, batch: list[_Op]) -> tuple[list[tuple[Any, GatewayError | None]], _Writes]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._commit_sync, batch)

    async def _answer(self, batch: list[_Op], done: tuple[list[tuple[Any, GatewayError | None]], _Writes]) -> None:
        outcomes, writes = done
        for op, (value, err) in zip(batch, outcomes, strict=True):
            if err is not None:
                op.reject(err)
            else:
                op.resolve(value)
        for session in writes.deleted:
            self._deleted(session)
        for session, (new_events, row) in writes.appended.items():
            self._appended(session, new_events, row)
        for session, (inputs, row) in writes.inputs.items():
            self._input_appended(session, inputs, row)

    async def _on_writer(self, work, *args: Any) -> Any:
        """Run ``work`` on the writer's thread, between group commits (purges)."""
        if self._db is None:
            raise Unavailable("the store is closed", "store_closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)
        except GatewayError:
            raise
        except Exception as exc:  # a bug: never let it look like anything but a failed write
            log.exception("work on the writer failed")
            raise Unavailable(f"the write failed: {exc}", "store_error") from None

    # The writer thread: one call per group commit, so a batch costs one hop between threads.

    def _connect_writer(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        db.executescript(SCHEMA)
        have = {r[1] for r in db.execute("PRAGMA table_info(sessions)")}
        for name, spec in _ADDED_COLUMNS.items():
            if name not in have:
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it meanwhile
                    db.execute(f"ALTER TABLE sessions ADD COLUMN {name} {spec}")
        db.execute("CREATE INDEX IF NOT EXISTS sessions_deadline ON sessions (deadline) WHERE deadline IS NOT NULL")
        return db

    def _transaction(self, body) -> Any:
        db = self._db
        lock = self._wake.lock if self._wake is not None else None
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            db.execute("BEGIN IMMEDIATE")
            result = body(db)
            db.execute("COMMIT")
            return result
        except BaseException as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise store_error(exc, self.path) from None
            raise
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _commit_sync(self, batch: list[_Op]) -> tuple[list[tuple[Any, GatewayError | None]], _Writes]:
        try:
            done = self._transaction(lambda db: self._commit_in(db, batch))
        except Exception as exc:
            if len(batch) == 1 or _store_failed(exc):
                raise  # the store's own failure (or a batch of one): every write of the batch fails with it
            log.warning("a group commit of %d writes failed (%s); committing them one savepoint each",
                        len(batch), getattr(exc, "message", None) or repr(exc))
            done = self._transaction(lambda db: self._commit_each(db, batch))
        self._tell_others(done[1].news)
        return done

    def _tell_others(self, news: dict[str, tuple]) -> None:
        """On the writer's thread, right after a commit: the other processes' wake-up (``wake.py``)."""
        if self._wake is not None:
            self._wake.send([[name, *fields] for name, fields in news.items()])

    def _commit_each(self, db: sqlite3.Connection, batch: list[_Op]) -> tuple[list, _Writes]:
        """The batch in the open transaction, each write within its own savepoint: one that fails is rolled
        back alone and answered with its error. Each reads its rows afresh, so a failed write leaves nothing
        behind, not even in memory."""
        outcomes: list[tuple[Any, GatewayError | None]] = []
        writes = _Writes()
        for op in batch:
            db.execute("SAVEPOINT write")
            try:
                (outcome,), done = self._commit_in(db, [op])
            except Exception as exc:
                db.execute("ROLLBACK TO write")  # if even this fails, the transaction is lost: every write fails
                db.execute("RELEASE write")
                outcomes.append((None, self._write_error(exc)))
                continue
            db.execute("RELEASE write")
            outcomes.append(outcome)
            for session in done.deleted:  # as _apply does within one batch: a life that ended is not told
                writes.appended.pop(session, None)
                writes.inputs.pop(session, None)
                writes.deleted.append(session)
            for session, (new_events, row) in done.appended.items():
                _add_appended(writes, session, new_events, row)
            for session, (inputs, row) in done.inputs.items():
                _add_inputs(writes, session, inputs, row)
            writes.news.update(done.news)
        return outcomes, writes

    def _write_error(self, exc: Exception) -> GatewayError:
        """What one write that failed on its own tells its caller."""
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, sqlite3.Error):
            log.error("the store refused a write: %s", exc)
            return store_error(exc, self.path)
        log.error("a write failed", exc_info=exc)
        return Unavailable(f"the write failed: {exc}", "store_error")

    def _commit_in(self, db: sqlite3.Connection, batch: list[_Op]) -> tuple[list, _Writes]:
        names = list({op.session for op in batch})
        rows: dict[str, tuple[int, Session] | None] = dict.fromkeys(names)
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            for t in db.execute(f"SELECT {_ROW} FROM sessions WHERE name IN ({','.join('?' * len(chunk))})", chunk):
                rows[t[1]] = _row(t)
        keys = self._load_keys(db, batch, rows)
        writes = _Writes()
        outcomes: list[tuple[Any, GatewayError | None]] = []
        for op in batch:
            try:
                value = self._apply(db, op, rows, keys, writes)
                outcomes.append((copy.copy(value) if isinstance(value, Session) else value, None))
            except GatewayError as err:
                outcomes.append((None, err))
        if writes.events:
            db.executemany("INSERT INTO events (sid, id, event, data, is_json, ts) VALUES (?,?,?,?,?,?)",
                           writes.events)
        if writes.keys:
            db.executemany("INSERT INTO idem (sid, key, id) VALUES (?,?,?)", writes.keys)
        if writes.touched:
            rewritten = writes.rewritten
            db.executemany(
                "UPDATE sessions SET status=?, completed_at=?, last_id=?, trimmed_id=?, acked_id=?, result=?, "
                "outcome=?, error=?, lease_seconds=?, deadline=?, cancel_requested_at=?, producer_epoch=? "
                "WHERE sid=?",
                [(r.status, r.completed_at, r.last_id, r.trimmed_id, r.acked_id, _dumps(r.result), r.outcome,
                  _dumps(r.error), r.lease_seconds, r.deadline, r.cancel_requested_at, r.producer_epoch, sid)
                 for name, (sid, r) in writes.touched.items() if name in rewritten])
            # what an append changes (half the cost of writing every column, measured)
            db.executemany("UPDATE sessions SET last_id=?, trimmed_id=?, deadline=?, producer_epoch=? WHERE sid=?",
                           [(r.last_id, r.trimmed_id, r.deadline, r.producer_epoch, sid)
                            for name, (sid, r) in writes.touched.items() if name not in rewritten])
        if writes.states:
            db.executemany("UPDATE sessions SET state=?, state_version=?, state_as_of=? WHERE sid=?", writes.states)
        return outcomes, writes

    @staticmethod
    def _load_keys(db: sqlite3.Connection, batch: list[_Op], rows: dict) -> dict[tuple[int, str], int]:
        wanted = [(rows[op.session][0], ev.idempotency_key) for op in batch if op.kind == "append"
                  and rows[op.session] is not None for ev in op.args[0] if ev.idempotency_key is not None]
        found: dict[tuple[int, str], int] = {}
        for i in range(0, len(wanted), 400):
            chunk = wanted[i:i + 400]
            sql = ("SELECT sid, key, id FROM idem WHERE (sid, key) IN (VALUES "
                   + ",".join(["(?,?)"] * len(chunk)) + ")")
            for sid, key, id_ in db.execute(sql, [x for pair in chunk for x in pair]):
                found[(sid, key)] = id_
        return found

    def _apply(self, db: sqlite3.Connection, op: _Op, rows: dict, keys: dict, writes: _Writes) -> Any:
        """Run one operation against the rows loaded for this transaction."""
        entry = rows.get(op.session)
        if op.kind == "create" or (op.kind == "append" and entry is None and op.args[1]):
            if entry is not None:
                raise Conflict(f"session {op.session!r} exists", "session_exists")
            metadata, text, ttl, lease, webhook = op.args if op.kind == "create" else \
                (None, None, None, self.lease_seconds, None)
            row = new_row(op.session, now_ms(), metadata, ttl, lease, webhook)
            cur = db.execute("INSERT INTO sessions (name, epoch, created_at, metadata, ttl_seconds, lease_seconds, "
                             "deadline, webhook_url) VALUES (?,?,?,?,?,?,?,?)",
                             (row.id, row.epoch, row.created_at, text, ttl, row.lease_seconds, row.deadline, webhook))
            entry = rows[op.session] = (cur.lastrowid, row)
            writes.news[op.session] = (cur.lastrowid, row.epoch, 0, row.status, 0)
            if op.kind == "create":
                return row
        if entry is None:
            if op.kind == "delete":
                return False
            raise NotFound(f"no session {op.session!r}")
        sid, row = entry
        if op.kind == "delete":
            db.execute("DELETE FROM sessions WHERE sid = ?", (sid,))
            db.execute("DELETE FROM idem WHERE sid = ?", (sid,))
            if row.input_last_id:
                db.execute("DELETE FROM inputs WHERE sid = ?", (sid,))
                db.execute("DELETE FROM input_keys WHERE sid = ?", (sid,))
            db.execute("DELETE FROM approvals WHERE sid = ?", (sid,))
            db.execute("DELETE FROM messages WHERE sid = ?", (sid,))
            db.execute("INSERT OR REPLACE INTO doomed (sid, last_id) VALUES (?, ?)", (sid, row.last_id))
            rows[op.session] = None
            writes.touched.pop(op.session, None)
            writes.appended.pop(op.session, None)  # nobody is told of events of a life that ended
            writes.inputs.pop(op.session, None)
            writes.deleted.append(op.session)
            writes.news[op.session] = (sid, None, 0, "", 0)
            return True
        new_events: list[StoredEvent] = []
        book = _Book(db, sid)
        if op.kind == "append":
            result, batch_keys = apply_append(row, op.args[0], _KeyView(keys, sid), now_ms(), self.max_events,
                                              op.args[2], book, op.args[3])
            keys.update({(sid, k): v for k, v in batch_keys.items()})
            writes.keys.extend((sid, k, v) for k, v in batch_keys.items())
            new_events = result.events
            if opened := approval_ids(new_events):
                db.executemany("INSERT OR IGNORE INTO approvals (sid, approval_id, input_id) VALUES (?,?,0)",
                               [(sid, aid) for aid in opened])
            value: Any = result
        elif op.kind == "complete":
            new_events = apply_complete(row, op.args[0], now_ms(), *op.args[1:], book)
            value = row
        elif op.kind == "expire":
            how = expiry(row, op.args[0])
            if how is None:
                return False  # renewed, or ended, since it was found due
            new_events = apply_complete(row, NO_RESULT, now_ms(), end_data(NO_RESULT, *how), *how, book=book)
            value = True
        elif op.kind == "lease":
            apply_lease(row, now_ms(), *op.args)
            value = row
        elif op.kind == "ack":
            apply_ack(row, op.args[0])
            value = row
        elif op.kind == "input":
            value, new_events = self._apply_input(db, sid, row, *op.args)
            if new_events:
                _add_inputs(writes, op.session, [value.input], row)
        elif op.kind == "input_ack":
            apply_input_ack(row, op.args[0])
            db.execute("UPDATE sessions SET input_acked_id = ? WHERE sid = ?", (row.input_acked_id, sid))
            value = row
        elif op.kind == "trim":
            apply_trim(row, op.args[0], book)
            value = row
        elif op.kind == "state":
            state, text, if_version, producer = op.args
            apply_state(row, state, if_version, now_ms(), producer)
            writes.states.append((text, row.state_version, row.state_as_of, sid))
            value = row
        else:  # pragma: no cover - a programming error
            raise ValueError(op.kind)
        if book.changes:
            db.executemany("INSERT OR REPLACE INTO messages (sid, message, start_id, closed_id) VALUES (?,?,?,?)",
                           [(sid, mid, start, closed) for mid, (start, closed) in book.changes.items()])
        writes.touched[op.session] = entry
        if op.kind != "append":
            writes.rewritten.add(op.session)
        if new_events:
            writes.events.extend((sid, e.id, e.event, e.data, int(e.is_json), e.ts) for e in new_events)
            # the row itself, not a copy: this batch's rows are read afresh and left behind when it ends, so
            # what the observers get is the row after the batch's last write to the session
            _add_appended(writes, op.session, new_events, row)
            writes.news[op.session] = (sid, row.epoch, row.last_id, row.status, row.input_last_id)
        return value

    def _apply_input(self, db: sqlite3.Connection, sid: int, row: Session, item: NewInput,
                     tail: str) -> tuple[InputResult, list[StoredEvent]]:
        """An input and its mirror: the input's rows are written here, the mirror event with the batch's."""
        repeat = None
        if item.idempotency_key is not None:
            found = db.execute(f"SELECT {_INPUT} FROM inputs WHERE sid = ? AND id = "
                               "(SELECT id FROM input_keys WHERE sid = ? AND key = ?)",
                               (sid, sid, item.idempotency_key)).fetchone()
            repeat = None if found is None else _input(found)
        approval = None
        if item.kind == "approval" and repeat is None:
            found = db.execute("SELECT input_id FROM approvals WHERE sid = ? AND approval_id = ?",
                               (sid, item.approval_id)).fetchone()
            approval = None if found is None else found[0]
        result, mirror = apply_input(row, item, tail, repeat, approval, now_ms(), self.max_events, self.cancel_grace,
                                     _Book(db, sid))
        if mirror is None:
            return result, []
        got = result.input
        db.execute(f"INSERT INTO inputs (sid, {_INPUT}) VALUES (?,?,?,?,?,?,?,?)",
                   (sid, got.id, got.kind, got.data, got.ts, got.event_id, got.approval_id, got.decision))
        if item.idempotency_key is not None:
            db.execute("INSERT INTO input_keys (sid, key, id) VALUES (?,?,?)", (sid, item.idempotency_key, got.id))
        if item.kind == "approval":
            db.execute("UPDATE approvals SET input_id = ? WHERE sid = ? AND approval_id = ?",
                       (got.id, sid, item.approval_id))
        db.execute("UPDATE sessions SET input_last_id = ? WHERE sid = ?", (row.input_last_id, sid))
        return result, [mirror]

    def _purge_sync(self, sid: int, start: int, stop: int, last: bool) -> None:
        def body(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM events WHERE sid = ? AND id > ? AND id <= ?", (sid, start, stop))
            if last:
                db.execute("DELETE FROM doomed WHERE sid = ?", (sid,))
            db.execute("UPDATE sessions SET purged_id = ? WHERE sid = ? AND purged_id < ?", (stop, sid, stop))

        self._transaction(body)
        self._tell_others({})  # nothing a reader needs, but the others' data_version moved: say why

    # -- retention and other processes' commits -----------------------------

    async def sweep(self, now: int) -> int:
        """Delete expired sessions, then physically remove trimmed and deleted events in chunks."""
        rows = await self._query(f"SELECT {_ROW} FROM sessions WHERE status = 'completed'")
        expired = [row.id for _, row in map(_row, rows) if is_expired(row, now, self.default_ttl)]
        for name in expired:
            await self.delete_session(name)
        await self._purge()
        return len(expired)

    async def _purge(self) -> None:
        for sid, last_id in await self._query("SELECT sid, last_id FROM doomed LIMIT 100"):
            await self._purge_range(sid, last_id, doomed=True)
        for sid, purged, trimmed in await self._query(
                "SELECT sid, purged_id, trimmed_id FROM sessions WHERE purged_id < trimmed_id LIMIT 100"):
            await self._purge_range(sid, trimmed, doomed=False, start=purged)

    async def _purge_range(self, sid: int, upto: int, *, doomed: bool, start: int = 0) -> None:
        # Each chunk is its own short transaction on the writer's thread, between group commits.
        while start < upto:
            stop = min(upto, start + _PURGE_CHUNK)
            await self._on_writer(self._purge_sync, sid, start, stop, doomed and stop >= upto)
            start = stop

    def _heard(self, sender: str, seq: int, entries: list) -> None:
        """A wake-up from another process on the file (``wake.py``): tell the observers of the watched
        sessions it names, from its entries alone. News of an older life of a session than one already
        told of (datagrams of two senders may cross) is dropped."""
        self.wakeups_heard += 1
        self._told = True
        last = self._senders.get(sender)
        if last is not None and seq != last + 1:
            self._missed = True
        if len(self._senders) > 256:  # senders that left
            self._senders.clear()
        self._senders[sender] = seq
        watched = self.watched
        sids = self._sids
        for name, sid, epoch, last_id, status, input_last_id in entries:
            if sid < sids.get(name, 0):
                continue
            sids[name] = sid
            if name not in watched:
                continue
            if epoch is None:
                self._deleted(name)
            else:
                self._moved(name, Session(id=name, epoch=epoch, created_at=0, status=status, last_id=last_id,
                                          input_last_id=input_last_id))

    async def _poll_loop(self) -> None:
        """The safety net under the wake-ups: re-read the rows of the watched sessions when another process
        committed something this one was not told of, and tell the observers (``moved``, ``deleted``).

        ``PRAGMA data_version`` on the *writer's* connection moves only when another connection commits
        (this process's readers never write), so this process's own commits, however many, never make
        the poller read a row. When it moved, the rows are re-read if no wake-up came by the next look (a
        commit's datagram follows its commit by microseconds), at once if a sender's sequence shows a
        gap, and at least every ``REREAD_EVERY`` seconds while others commit (a process that sends no
        wake-ups may commit beside those that do). Without wake-ups, every move is re-read."""
        loop = asyncio.get_running_loop()
        last_version = None
        pending = False  # another process committed since the watched rows were last read
        untold = False  # ... and at the last look, no wake-up had come since the look before
        last_read = loop.time()
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                version = await loop.run_in_executor(self._thread, self._others_version)
            except sqlite3.Error as exc:
                log.warning("polling for other writers failed: %s", exc)
                continue
            told, self._told = self._told, False
            changed = version != last_version
            first, last_version = last_version is None, version
            pending = pending or changed
            reread = first or pending and (self._wake is None or self._missed or (untold and not told)
                                           or loop.time() - last_read >= REREAD_EVERY)
            untold = changed and not told or untold and not told
            if not reread:
                continue
            pending = untold = self._missed = False
            last_read = loop.time()
            watched = list(self.watched)
            self._sids = {name: sid for name, sid in self._sids.items() if name in self.watched}
            if not watched:
                continue
            self.watched_rereads += 1
            found: dict[str, tuple[int, Session]] = {}
            try:
                for i in range(0, len(watched), 500):
                    chunk = watched[i:i + 500]
                    for t in await self._poll_conn.execute_fetchall(
                            f"SELECT {_ROW} FROM sessions WHERE name IN ({','.join('?' * len(chunk))})", chunk):
                        found[t[1]] = _row(t)
            except sqlite3.Error as exc:
                log.warning("polling for other writers failed: %s", exc)
                pending = True
                continue
            for name in watched:
                entry = found.get(name)
                if entry is None:
                    self._deleted(name)
                elif entry[0] >= self._sids.get(name, 0):  # not a life older than a wake-up told of meanwhile
                    self._sids[name] = entry[0]
                    self._moved(name, entry[1])

    def _others_version(self) -> int:
        """On the writer's thread: a number that changes when another connection commits to the file."""
        (version,), = self._db.execute("PRAGMA data_version").fetchall()
        return version


class _Book(Book):
    """A session's messages, read inside the write's transaction (``messages.Book``)."""

    def __init__(self, db: sqlite3.Connection, sid: int) -> None:
        super().__init__()
        self.db = db
        self.sid = sid

    def stored(self, mid: str) -> tuple[int, int] | None:
        return self.db.execute("SELECT start_id, closed_id FROM messages WHERE sid = ? AND message = ?",
                               (self.sid, mid)).fetchone()

    def stored_spans(self, after: int, through: int) -> dict[str, tuple[int, int]]:
        return {mid: (start, closed) for mid, start, closed in self.db.execute(
            "SELECT message, start_id, closed_id FROM messages WHERE sid = ? AND start_id > ? AND start_id <= ?",
            (self.sid, after, through))}

    def open(self) -> list[str]:
        return [mid for mid, in self.db.execute(
            "SELECT message FROM messages WHERE sid = ? AND closed_id = 0 ORDER BY start_id", (self.sid,))]


class _KeyView:
    """The idempotency keys of one session, seen through the batch's (sid, key) map."""

    __slots__ = ("keys", "sid")

    def __init__(self, keys: dict[tuple[int, str], int], sid: int) -> None:
        self.keys = keys
        self.sid = sid

    def get(self, key: str, default: Any = None) -> Any:
        return self.keys.get((self.sid, key), default)

    def __contains__(self, key: str) -> bool:
        return (self.sid, key) in self.keys


def _input(t: tuple) -> StoredInput:
    id_, kind, data, ts, event_id, approval_id, decision = t
    return StoredInput(id_, kind, data, ts, event_id, approval_id, decision)


def _add_inputs(writes: _Writes, session: str, inputs: list[StoredInput], row: Session) -> None:
    entry = writes.inputs.get(session)
    writes.inputs[session] = ([*entry[0], *inputs] if entry else list(inputs), row)


def _add_appended(writes: _Writes, session: str, events: list[StoredEvent], row: Session) -> None:
    """Note ``events`` appended to ``session`` by this batch (extended in place: one batch may hold a
    thousand single-event appends to one session), with its row after them."""
    entry = writes.appended.get(session)
    if entry is None:
        writes.appended[session] = (list(events), row)
    else:
        entry[0].extend(events)
        writes.appended[session] = (entry[0], row)

"""The Redis backend: many gateway nodes share one store.

The contract of ``log.base`` holds across nodes:

* **Atomic, contiguous, idempotent.** Every write of a session is one Lua
  script (``redis_append.lua``: create, append, complete, overdue;
  ``redis_session.lua``: ack, state, lease, trim, delete, expire, presence)
  that checks everything, then writes: create the session if needed (epoch
  = a random token chosen by the caller), refuse a completed one, look up
  the idempotency keys, ``XADD`` each event with the explicit stream id
  ``ID-0``, update the row, ``XTRIM MINID`` past ``max_events``, and
  ``PUBLISH`` one notification. Redis runs one script at a time, so ids are
  contiguous whichever node appends; ``XADD`` with a stream id below the
  stream's top is refused, so a bug could never reorder the log.
* **Every run ends.** The rules of ``log.base`` (fencing, leases, cancels,
  outcomes) run inside the scripts, as their Python twins (``apply_*``)
  do in the other backends; ``redis_run.lua``, put before every script,
  holds the ones they share (fencing, renewal, the index of deadlines).
  What Lua cannot do well stays in Python: the end event's data
  (``end_data``), how an overdue run ends (``expiry``, from the row read
  just before; the script checks that it still ends so) and whether a
  repeated ``complete`` names the same result.
  The index of deadlines holds a *lower bound* of each open run's
  deadline: a write that sets a deadline or may move it earlier (create,
  a first cancel, ``lease``) indexes it, a renewing append does not, so
  appends stay cheap. ``expire(now)`` reads the index up to ``now`` page
  by page and runs ``overdue`` for each run found: that script checks the
  deadline again and ends the run, atomically with the check (so two nodes
  never both end it), or re-scores an entry found early, or drops one
  whose run ended, has no deadline or is gone.
* **Ordered.** The position of an event is its integer id; the stream id is
  ``ID-0``. ``read(after)`` is ``XRANGE (after-0 + COUNT limit``; trimming
  is exact (``MINID``), so nothing at or below ``trimmed_id`` is returned.
  With the epoch (a field of the row, new for every life of a session id)
  a cursor ``ID:EPOCH`` names one event for ever.
* **Durable before return** as far as Redis is: ``appendonly yes`` with
  ``appendfsync always`` survives a crash of Redis or of its machine;
  ``everysec`` survives ``kill -9`` of Redis but may lose the last second
  on a power cut; without AOF, a restart loses everything since the last
  snapshot. ``wait_replicas`` (``--redis-wait-replicas``) adds ``WAIT`` so
  a write is acknowledged only once that many replicas have it (a failover
  then loses nothing acknowledged); if they do not confirm within a second
  the publisher gets ``503 store_not_replicated`` and retries with its
  idempotency key.

Writes go through one queue to one writer task (``group_commit``), which
sends everything queued as one pipeline: concurrent publishers share a
round trip (and one ``WAIT``), and this node's observers hear of its own
appends (``appended``) in id order. Reads use the connection pool. Every
Redis failure becomes ``503 store_unavailable`` within a socket timeout of
two seconds; a write that timed out may or may not have happened, which an
idempotency key settles on retry.

Keys: one session's keys share the hash tag ``{SESSION}`` (session ids are
``[A-Za-z0-9_.~-]``, never braces), so they live in one Redis Cluster slot
and one script can change them all::

    sse-gateway:{SESSION}:meta      hash: epoch, status, last_id, trimmed_id, acked_id, state, ...,
                                    outcome, error, lease_seconds, deadline, cancel_requested_at,
                                    producer_epoch, webhook_url (a field that is absent is None, or 0)
    sse-gateway:{SESSION}:events    stream: entry ID-0 = {e: type, d: data, j: 1 if JSON, t: ts ms}
    sse-gateway:{SESSION}:keys      hash: idempotency key -> id
    sse-gateway:{SESSION}:presence  hash: node -> open streams; last_seen -> ms
    sse-gateway:{SESSION}:inputs    stream: entry ID-0 = {k: kind, d: data, t: ts, e: mirror event id,
                                    a: approval id, c: decision}
    sse-gateway:{SESSION}:ikeys     hash: input idempotency key -> input id
    sse-gateway:{SESSION}:approvals hash: approval id -> the input that answered it (0: open)
    sse-gateway:sessions            sorted set: session by created_at (listing)
    sse-gateway:expiring            sorted set: completed session by expiry time (retention)
    sse-gateway:deadlines           sorted set: open run by a lower bound of its deadline (expire)
    sse-gateway:node:NODE           string with a 6 s expiry: the node is alive
    sse-gateway:appends             pub/sub channel: "SESSION\\tEPOCH\\tLAST_ID\\tSTATUS\\tNODE[\\tINPUT_LAST_ID]"

An input and its mirror event are one script (``redis_input.lua``); an
``approval.request`` event opens its approval inside the append script.

The three sorted sets are global keys. On a single Redis (or a primary
with replicas) the scripts update them atomically with the session. On
Redis Cluster (URL ``redis+cluster://host:port``) they cannot be in a
session's script, so the writer updates them right after it, best effort:
a node that dies in between leaves a session unlisted and never expired
(its keys stay until it is deleted), or a run whose lease lapses never
ended by ``expire``; and updates of one run's deadline from two nodes may
land out of order (a writer's ``ZADD LT`` never raises an entry, but the
sweeper's re-score may land after a cancel pulled the deadline in, which
then ends the run only once the later score passes). Listing and the end
of lapsed runs are therefore exact on a single Redis and best effort on
Cluster. Cluster also refuses EVALSHA in a
pipeline, so there the writer runs each session's scripts one after the
other (sessions concurrently), and the feed subscribes through the node
named in the URL (a classic PUBLISH reaches every node of a cluster).
``WAIT`` is not offered on Cluster.

Live feed: every script that adds events or deletes a session publishes
one line on ``sse-gateway:appends``. Each node holds ONE subscription to
it, on a dedicated connection, whatever the number of sessions; a line
from another node about a session this node streams (``watched``, set by
the hub) moves that session's head (observers hear ``moved``) and the
hub reads the new events from the log once for all its subscribers. A
node's own lines are not needed: its writer hands the hub its own
appends, events included. A line of its own that arrives while the
writer waits for that session's reply (the usual race between two
connections) is held until the reply, then dropped, or applied if the
reply was lost (timeout, broken connection: the script may have run). One
that arrives when no write of that session is pending (a script run late)
is applied. The cost is one small message per append per node, and
nothing per idle session. If the feed connection
breaks, the node reconnects with backoff (0.1 s doubling to 2 s), and once
subscribed again re-reads the head of every watched session, so a write
made meanwhile is never missed; streams stay open meanwhile (with their
heartbeats) and catch up then. Nothing can be appended to a Redis that the
feed cannot reach, so a long outage of the feed is an outage of the store.

Presence: this node's streams are counted once, by ``limits.StreamSlots``
(``self.streams``, set by the hub), which says when a session's count
changed (``streams_changed``); a background task writes that count per
session (only when it changed) and refreshes the node's liveness key every
two seconds. ``presence(session)`` sums the counts of live nodes, so the
streams of a node killed with ``-9`` stop counting within six seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Sequence
from hashlib import sha1
from pathlib import Path
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from .. import messages
from ..errors import BadRequest, Conflict, GatewayError, NotFound, PreconditionFailed, Unavailable
from ..messages import operations
from ..models import (
    END_EVENT,
    INPUT_EVENT,
    AppendResult,
    InputResult,
    NewEvent,
    NewInput,
    Session,
    StoredEvent,
    StoredInput,
    load_json,
    mirror_data,
    new_epoch,
    now_ms,
)
from .base import (
    NO_RESULT,
    EventLog,
    apply_complete,
    end_data,
    ended,
    expiry,
    fenced,
    stored_input,
    stored_json,
    stored_text,
)
from .group_commit import GroupCommit, Write

log = logging.getLogger("sse_gateway.redis")

PREFIX = "sse-gateway:"
CHANNEL = PREFIX + "appends"
INDEX = PREFIX + "sessions"
EXPIRING = PREFIX + "expiring"
DEADLINES = PREFIX + "deadlines"
PRESENCE_PERIOD = 2.0  # seconds between a node's liveness refreshes; it is dead after three missed
FEED_PING = 5.0  # seconds of silence on the feed before it is pinged; twice that without an answer is a loss
WAIT_TIMEOUT_MS = 1000
_MAX_BATCH = 500
_SWEEP_PAGE = 100
_CLIENT_OPTIONS = {"decode_responses": True, "socket_timeout": 2.0, "socket_connect_timeout": 1.0,
                   "socket_keepalive": True}
#: connections to one Redis per node; more concurrent commands wait (up to the socket timeout) for a free one,
#: instead of failing with "Too many connections" when a thousand streams attach at once
POOL_SIZE = 64


class _Script:
    _RUN = (Path(__file__).parent / "redis_run.lua").read_text()  # the lifecycle rules every script shares

    def __init__(self, filename: str) -> None:
        self.text = self._RUN + (Path(__file__).parent / filename).read_text()
        self.sha = sha1(self.text.encode()).hexdigest()


_APPEND = _Script("redis_append.lua")
_SESSION = _Script("redis_session.lua")
_INPUT = _Script("redis_input.lua")


class _Op(Write):
    __slots__ = ("script", "args", "reply")

    def __init__(self, script: _Script, session: str, args: list,
                 reply: Callable[[Any], tuple[Any, tuple | None]]) -> None:
        super().__init__(session)
        self.script = script
        self.args = args
        #: the script's reply -> (the caller's value, (new events, row) to announce (row None: deleted), or None)
        self.reply = reply


def _pairs(flat: list) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2]))


def _int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _json(value: str | None) -> Any:
    return None if value is None else load_json(value)


def _dumps(value: Any, what: str) -> str:
    return "" if value is None else stored_json(value, what)


def _arg(value: int | str | None) -> int | str:
    return "" if value is None else value


def _session(name: str, h: dict[str, str]) -> Session:
    return Session(id=name, epoch=h["epoch"], created_at=int(h["created_at"]), status=h["status"],
                   completed_at=_int(h.get("completed_at")), last_id=int(h["last_id"]),
                   trimmed_id=int(h["trimmed_id"]), metadata=_json(h.get("metadata")),
                   ttl_seconds=_int(h.get("ttl_seconds")), acked_id=int(h["acked_id"]),
                   state=_json(h.get("state")), state_version=int(h["state_version"]),
                   state_as_of=int(h["state_as_of"]), result=_json(h.get("result")),
                   input_last_id=int(h.get("input_last_id", 0)), input_acked_id=int(h.get("input_acked_id", 0)),
                   outcome=h.get("outcome") or ("completed" if h["status"] == "completed" else None),
                   error=_json(h.get("error")), lease_seconds=_int(h.get("lease_seconds")),
                   deadline=_int(h.get("deadline")), cancel_requested_at=_int(h.get("cancel_requested_at")),
                   producer_epoch=int(h.get("producer_epoch", 0)), webhook_url=h.get("webhook_url"))


def _unavailable(exc: RedisError, write: bool = False) -> Unavailable:
    if write and isinstance(exc, RedisTimeout):
        return Unavailable("Redis did not answer in time; the write may or may not have happened (retry with an "
                           "idempotency key)", "store_unavailable")
    return Unavailable(f"the store is unavailable: {exc}", "store_unavailable")


def _gateway_error(session: str, exc: Exception) -> GatewayError:
    """What a script's error reply means; anything else is the store failing."""
    if not isinstance(exc, RedisError) or isinstance(exc, DataError):  # a write redis-py could not send
        return Unavailable(f"the store refused the write: {exc}", "store_error")
    if not isinstance(exc, ResponseError) or not str(exc).startswith("GW "):
        return _unavailable(exc, write=True)
    code, _, detail = str(exc)[3:].partition(" ")
    if code == "session_not_found":
        return NotFound(f"no session {session!r}")
    if code == "session_exists":
        return Conflict(f"session {session!r} exists", "session_exists")
    if code == "session_completed":  # detail: the run's outcome, when the write was one that ends it or renews it
        return ended(session, detail) if detail else Conflict(f"session {session!r} is completed",
                                                              "session_completed")
    if code == "producer_fenced":
        current, _, producer = detail.partition(" ")
        return fenced(session, int(producer), int(current))
    if code == "invalid_ack":
        return BadRequest(f"ack id must be between 0 and the last id ({detail})", "invalid_ack")
    if code == "invalid_input_ack":
        return BadRequest(f"input ack id must be between 0 and the last input id ({detail})", "invalid_ack")
    if code == "approval_not_found":
        return NotFound(f"session {session!r} has no such approval", "approval_not_found")
    if code == "approval_answered":
        return Conflict(f"the approval was answered by input {detail}", "approval_answered",
                        extra={"input_id": int(detail)})
    if code == "message_exists":
        mid, _, start = detail.partition(" ")
        return messages.exists(mid, int(start))
    if code == "message_not_found":
        return messages.not_found(detail)
    if code == "message_closed":
        mid, _, closed = detail.partition(" ")
        return messages.closed_already(mid, int(closed))
    if code == "state_version_mismatch":
        return PreconditionFailed(f"state is at version {detail}, not the one given", "state_version_mismatch",
                                  extra={"version": int(detail)})
    return Unavailable(f"the store refused the write: {exc}", "store_error")


@contextlib.contextmanager
def _store():
    try:
        yield
    except RedisError as exc:
        raise _unavailable(exc) from None


class RedisLog(EventLog):
    shared_store = True  # every node opens the same Redis: the feed hears the others' writes
    shared_presence = True  # every node writes its count of streams per session; presence() sums the live ones

    def __init__(self, url: str, *, max_events: int | None = None, default_ttl: int | None = None,
                 lease_seconds: int | None = None, cancel_grace: int | None = None, wait_replicas: int = 0) -> None:
        super().__init__()
        scheme, sep, rest = url.partition("://")
        self.cluster = scheme.endswith("+cluster")
        self.url = scheme.removesuffix("+cluster") + sep + rest
        if self.cluster and wait_replicas:
            raise ValueError("redis_wait_replicas is not supported with Redis Cluster")
        self.max_events = max_events
        self.default_ttl = default_ttl
        self.lease_seconds = lease_seconds
        self.cancel_grace = cancel_grace
        self.wait_replicas = wait_replicas
        self.node = secrets.token_hex(4)
        self._global_keys = [] if self.cluster else [INDEX, EXPIRING, DEADLINES]
        self._redis: Redis | RedisCluster | None = None
        self._writer = GroupCommit(self._commit, self._answer, committed=self._committed, max_batch=_MAX_BATCH,
                                   name="redis-writer")
        self._index_updates: list[tuple] = []  # Cluster only: the global keys, after the scripts
        self._reported: set[str] = set()  # sessions whose count of this node's streams Redis holds (not 0)
        self._presence_dirty: set[str] = set()
        self._presence_changed: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._writing: set[str] = set()  # the sessions of the batch whose replies the writer waits for
        self._held: dict[str, Session | None] = {}  # this node's feed lines about them, until the replies
        self._closing = False

    def _keys(self, session: str) -> list[str]:
        tag = f"{PREFIX}{{{session}}}:"
        return [tag + "meta", tag + "events", tag + "keys", tag + "presence", tag + "inputs", tag + "ikeys",
                tag + "approvals", tag + "messages", tag + "mspans", *self._global_keys]

    # -- life ------------------------------------------------------------------

    async def open(self) -> None:
        """Connect lazily: a gateway started before Redis is up reports not ready until it is."""
        options = dict(_CLIENT_OPTIONS, retry=Retry(NoBackoff(), 0))
        if self.cluster:
            self._redis = RedisCluster.from_url(self.url, **options)
        else:
            pool = BlockingConnectionPool.from_url(self.url, max_connections=POOL_SIZE,
                                                   timeout=_CLIENT_OPTIONS["socket_timeout"], **options)
            self._redis = Redis(connection_pool=pool)
            self._redis.auto_close_connection_pool = True
        # bytes, not str: anything published on the channel, even invalid UTF-8, must reach _on_feed
        self._feed = Redis.from_url(self.url, decode_responses=False, socket_connect_timeout=1.0,
                                    socket_keepalive=True, retry=Retry(NoBackoff(), 0))
        self._presence_changed = asyncio.Event()
        self._writer.start()
        self._tasks = [asyncio.create_task(self._feed_loop(), name="redis-feed"),
                       asyncio.create_task(self._presence_loop(), name="redis-presence")]

    async def close(self) -> None:
        if self._redis is None:
            return
        # The loops also check _closing: asyncio.wait_for in 3.11 (and redis-py's own timeouts) can swallow
        # a cancellation that lands as their timeout fires, which would leave a loop running forever.
        self._closing = True
        self._presence_changed.set()
        await self._writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, TimeoutError):
            async with asyncio.timeout(2):
                await self._flush_presence(final=True)  # the streams of this node end with it
                await self._redis.delete(PREFIX + "node:" + self.node)
        await self._feed.aclose()
        await self._redis.aclose()
        self._redis = None

    async def ping(self) -> None:
        await self._redis.ping()

    # -- reads -------------------------------------------------------------------

    async def get_session(self, session: str) -> Session | None:
        with _store():
            h = await self._redis.hgetall(self._keys(session)[0])
        return _session(session, h) if h else None

    async def list_sessions(self, *, status: str | None = None, limit: int = 100) -> list[Session]:
        found: list[Session] = []
        start, chunk = 0, max(limit, 100)
        with _store():
            while len(found) < limit:
                names = await self._redis.zrevrange(INDEX, start, start + chunk - 1)
                if not names:
                    break
                pipe = self._redis.pipeline(transaction=False)
                for name in names:
                    pipe.hgetall(self._keys(name)[0])
                for name, h in zip(names, await pipe.execute()):
                    if h and (status is None or h["status"] == status):  # h is empty if deleted meanwhile
                        found.append(_session(name, h))
                start += chunk
        return found[:limit]

    async def read(self, session: str, after: int, limit: int) -> list[StoredEvent]:
        with _store():
            entries = await self._redis.xrange(self._keys(session)[1], min=f"({after}-0", max="+", count=limit)
        return [StoredEvent(int(eid.partition("-")[0]), f["e"], f["d"], f["j"] == "1", int(f["t"]))
                for eid, f in entries]

    async def read_input(self, session: str, after: int, limit: int) -> list[StoredInput]:
        with _store():
            entries = await self._redis.xrange(self._keys(session)[4], min=f"({after}-0", max="+", count=limit)
        return [StoredInput(int(eid.partition("-")[0]), f["k"], f["d"], int(f["t"]), int(f["e"]), f.get("a"),
                            f.get("c")) for eid, f in entries]

    async def approvals(self, session: str) -> dict[str, int]:
        with _store():
            return {k: int(v) for k, v in (await self._redis.hgetall(self._keys(session)[6])).items()}

    async def presence(self, session: str) -> tuple[int, int | None]:
        """Streams of ``session`` open on all live nodes, and when one last closed (ms)."""
        with _store():
            counts = await self._redis.hgetall(self._keys(session)[3])
            last_seen = counts.pop("last_seen", None)
            counts.pop(self.node, None)  # this node's own count is known here, fresher
            nodes = list(counts)
            pipe = self._redis.pipeline(transaction=False)
            for node in nodes:
                pipe.exists(PREFIX + "node:" + node)
            alive = await pipe.execute() if nodes else []
        total = self.streams.count(session) + sum(int(counts[n]) for n, up in zip(nodes, alive) if up)
        return total, _int(last_seen)

    def streams_changed(self, session: str) -> None:
        """This node's count of streams of ``session`` changed: the presence task writes it."""
        self._presence_dirty.add(session)
        if self._presence_changed is not None:
            self._presence_changed.set()

    # -- writes: everything goes through the writer ----------------------------------

    async def _submit(self, script: _Script, session: str, args: list, reply) -> Any:
        return await self._writer.submit(_Op(script, session, args, reply))

    def _args(self, op: str, session: str, *rest: Any, now: int | None = None) -> list:
        return [op, session, now_ms() if now is None else now, CHANNEL, self.node, *rest]

    def _row_reply(self, session: str) -> Callable[[Any], tuple[Session, None]]:
        return lambda flat: (_session(session, _pairs(flat)), None)

    async def create_session(self, session: str, *, metadata: Any = None, ttl_seconds: int | None = None,
                             lease_seconds: int | None = None, webhook_url: str | None = None) -> Session:
        def reply(flat: list) -> tuple[Session, None]:
            row = _session(session, _pairs(flat))
            self._index_later("zadd", INDEX, {session: row.created_at})
            self._index_deadline_later(session, row.deadline)
            return row, None

        lease = self.lease_seconds if lease_seconds is None else lease_seconds
        args = self._args("create", session, new_epoch(), _dumps(metadata, "metadata"), _arg(ttl_seconds),
                          lease or "", webhook_url or "")
        return await self._submit(_APPEND, session, args, reply)

    async def append(self, session: str, events: Sequence[NewEvent], *, create: bool = True,
                     producer: int | None = None) -> AppendResult:
        stored_text(events)
        ops = operations(events)
        ts = now_ms()
        args = self._args("append", session, new_epoch(), int(create), self.max_events or 0, _arg(producer),
                          self.lease_seconds or "", len(ops), now=ts)
        for i, op, mid in ops:
            args += [i + 1, op, mid]
        for ev in events:
            args += [ev.event, ev.data, int(ev.is_json), ev.idempotency_key or ""]

        def reply(r: list) -> tuple[AppendResult, tuple | None]:
            epoch, status, created_at, last_id, trimmed_id, created, deadline = r[:7]
            ids, new = r[7::2], [bool(n) for n in r[8::2]]
            stored = [StoredEvent(i, ev.event, ev.data, ev.is_json, ts)
                      for i, fresh, ev in zip(ids, new, events) if fresh]
            if created:
                self._index_later("zadd", INDEX, {session: int(created_at)})
                self._index_deadline_later(session, _int(deadline or None))
            row = Session(id=session, epoch=epoch, created_at=int(created_at), status=status, last_id=last_id,
                          trimmed_id=trimmed_id)
            return AppendResult(ids, new, last_id, stored, epoch), ((stored, row) if stored else None)

        return await self._submit(_APPEND, session, args, reply)

    def _end_args(self, data: str, outcome: str, error: Any, result: Any) -> list:
        """The arguments of a script that may end a run (complete, overdue) up to the last one or two."""
        return [data, _arg(self.default_ttl), outcome, _dumps(error, "error"),
                stored_json(None if result is NO_RESULT else result, "result")]

    def _end_reply(self, session: str, data: str, r: list) -> tuple[Session | None, tuple | None]:
        """The reply of a script that may end a run: its code, then the row (None: no session). Code 1: the
        run ended now with the end event ``data``, to announce."""
        closed = r[2:2 + r[1]]  # the messages the end closed
        h = _pairs(r[2 + r[1]:])
        row = _session(session, h) if h else None
        if r[0] != 1:
            return row, None
        self._index_later("zrem", DEADLINES, session)
        if "expires_at" in h:
            self._index_later("zadd", EXPIRING, {session: int(h["expires_at"])})
        first = row.last_id - len(closed)
        ends = [StoredEvent(first + i, messages.END, messages.close_data(mid, row.outcome), True, row.completed_at)
                for i, mid in enumerate(closed)]
        return row, ([*ends, StoredEvent(row.last_id, END_EVENT, data, True, row.completed_at)], row)

    async def complete(self, session: str, result: Any = NO_RESULT, *, outcome: str = "completed",
                       error: Any = None, producer: int | None = None) -> Session:
        data = end_data(result, outcome, error)

        def reply(r: list) -> tuple[Session, tuple | None]:
            row, told = self._end_reply(session, data, r)
            if not r[0]:  # it had ended, with this outcome (the script checked): base's rule for the result
                apply_complete(row, result, row.completed_at, data, outcome, error)
            return row, told

        args = self._args("complete", session, *self._end_args(data, outcome, error, result), _arg(producer))
        return await self._submit(_APPEND, session, args, reply)

    async def lease(self, session: str, *, producer: int | None = None, claim: bool = False,
                    seconds: int | None = None) -> Session:
        def reply(flat: list) -> tuple[Session, None]:
            row = _session(session, _pairs(flat))
            self._index_deadline_later(session, row.deadline)
            return row, None

        args = self._args("lease", session, _arg(producer), int(claim), _arg(seconds))
        return await self._submit(_SESSION, session, args, reply)

    async def expire(self, now: int) -> int:
        """End every open run due at ``now``: page by page through the index of deadlines (a lower bound of
        each; a session at most once a call), one ``overdue`` script per run found (see ``_overdue``)."""
        seen: set[str] = set()
        count = 0
        while True:
            with _store():
                due = [name for name in await self._redis.zrangebyscore(DEADLINES, "-inf", now, start=0,
                                                                        num=_SWEEP_PAGE) if name not in seen]
                if not due:
                    return count
                pipe = self._redis.pipeline(transaction=False)
                for name in due:
                    pipe.hgetall(self._keys(name)[0])
                rows = await pipe.execute()
            seen.update(due)
            count += sum(await asyncio.gather(*(self._overdue(name, _session(name, h) if h else None, now)
                                                for name, h in zip(due, rows))))

    async def _overdue(self, session: str, row: Session | None, now: int) -> int:
        """End ``session``'s run if it is due at ``now``, as ``row`` (read just before) says (base.expiry);
        1 if it ended it. The script checks the row again, atomically with the end, so two nodes never both
        end a run: a run renewed meanwhile is re-scored in the index, one that ended or has no deadline (or
        no session) leaves it, and one that would now end otherwise (a cancel came, the lease changed)
        comes back with its row, to go again."""
        while True:
            outcome, error = (row and expiry(row, now)) or ("", None)
            data = end_data(NO_RESULT, outcome, error) if outcome else ""
            args = self._args("overdue", session, *self._end_args(data, outcome, error, NO_RESULT), now,
                              _arg(row and row.lease_seconds))

            def reply(r: list) -> tuple[tuple[int, Session | None], tuple | None]:
                got, told = self._end_reply(session, data, r)
                if r[0] == 0:  # not due: what the script did to the index, done here on Cluster
                    if got is not None and not got.completed and got.deadline is not None:
                        self._index_later("zadd", DEADLINES, {session: got.deadline})
                    else:
                        self._index_later("zrem", DEADLINES, session)
                return (r[0], got), told

            code, row = await self._submit(_APPEND, session, args, reply)
            if code >= 0:
                return code

    async def ack(self, session: str, upto: int) -> Session:
        return await self._submit(_SESSION, session, self._args("ack", session, upto), self._row_reply(session))

    async def append_input(self, session: str, item: NewInput) -> InputResult:
        tail = stored_input(item)
        args = self._args("input", session, item.kind, item.data, item.idempotency_key or "", item.approval_id or "",
                          item.decision or "", tail, self.max_events or 0, _arg(self.cancel_grace))

        def reply(r: list) -> tuple[InputResult, tuple | None]:
            new, (id_, kind, data, ts, event_id, aid, decision) = r[0], r[1:8]
            epoch, status, last_id, trimmed_id, input_last_id, input_acked_id, deadline = r[8:15]
            got = StoredInput(id_, kind, data, ts, event_id, aid or None, decision or None)
            row = Session(id=session, epoch=epoch, created_at=0, status=status, last_id=last_id,
                          trimmed_id=trimmed_id, input_last_id=input_last_id, input_acked_id=input_acked_id,
                          deadline=_int(deadline or None))
            result = InputResult(got, bool(new), input_last_id, last_id, epoch)
            if not new:
                return result, None
            if kind == "cancel":  # it may have pulled the deadline in
                self._index_deadline_later(session, row.deadline)
            mirror = StoredEvent(event_id, INPUT_EVENT, mirror_data(id_, tail), True, ts)
            return result, ([mirror], row, [got])

        return await self._submit(_INPUT, session, args, reply)

    async def ack_input(self, session: str, upto: int) -> Session:
        return await self._submit(_SESSION, session, self._args("input_ack", session, upto), self._row_reply(session))

    async def put_state(self, session: str, state: Any, if_version: int | None, *,
                        producer: int | None = None) -> Session:
        args = self._args("state", session, stored_json(state, "state"), _arg(if_version), _arg(producer))
        return await self._submit(_SESSION, session, args, self._row_reply(session))

    async def trim(self, session: str, through: int) -> Session:
        if through < 0:
            raise BadRequest("trim needs a non-negative id", "invalid_trim")
        return await self._submit(_SESSION, session, self._args("trim", session, through), self._row_reply(session))

    def _removal_reply(self, session: str) -> Callable[[int], tuple[int, tuple | None]]:
        def reply(done: int) -> tuple[int, tuple | None]:
            if done >= 0:
                self._index_later("zrem", INDEX, session)
                self._index_later("zrem", EXPIRING, session)
                self._index_later("zrem", DEADLINES, session)
            return done, (([], None) if done == 1 else None)
        return reply

    async def delete_session(self, session: str) -> bool:
        return await self._submit(_SESSION, session, self._args("delete", session), self._removal_reply(session)) == 1

    async def sweep(self, now: int) -> int:
        with _store():
            due = await self._redis.zrangebyscore(EXPIRING, "-inf", now, start=0, num=100)
        removed = 0
        for session in due:
            args = self._args("expire", session, now=now)
            removed += await self._submit(_SESSION, session, args, self._removal_reply(session)) == 1
        return removed

    def _index_later(self, command: str, key: str, *args: Any, **options: Any) -> None:
        if self.cluster:
            self._index_updates.append((command, key, args, options))

    def _index_deadline_later(self, session: str, deadline: int | None) -> None:
        """Cluster: index a deadline a write set or may have moved earlier. ``LT``: an update that lands after
        another node's earlier one never raises the entry above it (only the sweeper raises entries)."""
        if deadline is not None:
            self._index_later("zadd", DEADLINES, {session: deadline}, lt=True)

    # -- the writer ---------------------------------------------------------------------

    async def _commit(self, batch: list[_Op]) -> tuple[list, bool]:
        self._writing = {op.session for op in batch}  # until the replies say which writes happened
        try:
            return await self._eval([(op.script, op.session, op.args) for op in batch], wait=self.wait_replicas)
        except BaseException:
            self._release_held(self._writing)  # no reply at all: any of the scripts may have run
            raise

    async def _answer(self, batch: list[_Op], done: tuple[list, bool]) -> None:
        replies, replicated = done
        # A reply that never came (timeout, broken connection): the script may have run.
        lost = {op.session for op, reply in zip(batch, replies)
                if isinstance(reply, RedisError) and not isinstance(reply, ResponseError)}
        try:
            news = []
            for op, reply in zip(batch, replies):
                try:
                    if isinstance(reply, Exception):
                        raise _gateway_error(op.session, reply)
                    value, told = op.reply(reply)
                except GatewayError as err:
                    op.reject(err)
                    continue
                except Exception as exc:  # a reply this node cannot read (a bug): that write alone fails
                    log.exception("the reply to a write on session %r could not be read", op.session)
                    op.reject(Unavailable(f"the write failed: {exc}", "store_error"))
                    continue
                if told is not None:
                    news.append((op.session, *told))
                if replicated:
                    op.resolve(value)
                else:
                    op.reject(Unavailable(
                        f"the write is on the Redis primary but fewer than {self.wait_replicas} replica(s) "
                        "confirmed it (retry with an idempotency key)", "store_not_replicated"))
            for session, events, row, *inputs in news:
                if row is None:
                    self._deleted(session)
                else:
                    self._appended(session, events, row)
                    if inputs:
                        self._input_appended(session, inputs[0], row)
        finally:
            self._release_held(lost)
        if self._index_updates:
            await self._update_index()

    def _release_held(self, lost: set[str]) -> None:
        """The writer has its replies: this node's feed lines that came before them are dropped, but for
        the sessions whose reply was lost (the feed line is then the only news of the write)."""
        held, self._held, self._writing = self._held, {}, set()
        for session, row in held.items():
            if session in lost:
                self._heard(session, row)

    async def _eval(self, calls: list[tuple[_Script, str, list]], wait: int = 0) -> tuple[list, bool]:
        """Run the scripts; each session's in the given order. Returns their replies (an exception
        for each that failed) and whether ``wait`` replicas confirmed the writes.

        On one Redis they go as one pipeline, then ``WAIT``. Redis Cluster takes no EVALSHA in a
        pipeline: there each session's scripts run one after the other, sessions concurrently.
        """
        replies: list[Any] = [None] * len(calls)
        replicated = True
        todo = list(range(len(calls)))
        for _ in range(2):  # a second round only if Redis lost its scripts (restart, failover)
            try:
                if self.cluster:
                    await self._eval_cluster(calls, todo, replies)
                else:
                    try:
                        results = await self._pipeline(calls, todo, wait)
                    except (DataError, ValueError, TypeError):
                        # redis-py could not encode a write (nothing was sent): each goes alone, so only the
                        # one it cannot send fails. Script errors need none of this: each is its own reply.
                        results = [None] * len(todo)
                        for n, i in enumerate(todo):
                            try:
                                results[n] = (await self._pipeline(calls, [i], 0))[0]
                            except (DataError, ValueError, TypeError) as exc:
                                results[n] = exc
                        if wait:
                            results.append(await self._redis.execute_command("WAIT", wait, WAIT_TIMEOUT_MS))
                    if wait:
                        acks = results.pop()
                        replicated = replicated and not isinstance(acks, Exception) and acks >= wait
                    for i, result in zip(todo, results):
                        replies[i] = result
                todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
                if not todo:
                    break
                for script in (_APPEND, _SESSION, _INPUT):
                    await self._redis.script_load(script.text)
            except RedisError as exc:
                for i in todo:
                    replies[i] = exc
                break
        return replies, replicated

    async def _pipeline(self, calls: list[tuple[_Script, str, list]], todo: list[int], wait: int) -> list:
        """One round trip: the scripts ``todo`` of ``calls``, then ``WAIT`` if ``wait``; a reply (or the
        exception of a script that failed) for each."""
        pipe = self._redis.pipeline(transaction=False)
        for i in todo:
            script, session, args = calls[i]
            keys = self._keys(session)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        if wait:
            pipe.execute_command("WAIT", wait, WAIT_TIMEOUT_MS)
        return await pipe.execute(raise_on_error=False)

    async def _eval_cluster(self, calls: list[tuple[_Script, str, list]], todo: list[int], replies: list) -> None:
        by_session: dict[str, list[int]] = {}
        for i in todo:
            by_session.setdefault(calls[i][1], []).append(i)

        async def run(indexes: list[int]) -> None:
            for i in indexes:
                script, session, args = calls[i]
                keys = self._keys(session)
                try:
                    replies[i] = await self._redis.evalsha(script.sha, len(keys), *keys, *args)
                except (RedisError, ValueError, TypeError) as exc:  # the last two: arguments it could not send
                    replies[i] = exc

        await asyncio.gather(*(run(indexes) for indexes in by_session.values()))

    async def _update_index(self) -> None:
        updates, self._index_updates = self._index_updates, []
        pipe = self._redis.pipeline(transaction=False)
        for command, key, args, options in updates:
            getattr(pipe, command)(key, *args, **options)
        try:
            await pipe.execute()
        except RedisError as exc:
            log.warning("could not update the session index (%d changes): %s", len(updates), exc)

    # -- the live feed ----------------------------------------------------------------------

    async def _feed_loop(self) -> None:
        delay = 0.1
        while not self._closing:
            pubsub = self._feed.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                await self._refresh_watched()  # after subscribing: whatever happened before is in what we read
                delay = 0.1
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                log.warning("live feed from Redis lost (%s); reconnecting in %.1fs", str(exc) or type(exc).__name__,
                            delay)
            except Exception:  # a bug must not end the feed for good: this node's streams would go silent
                log.exception("live feed from Redis failed; reconnecting in %.1fs", delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _listen(self, pubsub) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while not self._closing:
            msg = await pubsub.get_message(timeout=FEED_PING)
            if msg is None:
                if loop.time() - heard > 2 * FEED_PING:
                    raise RedisTimeout("no answer to PING")
                await pubsub.ping()
                continue
            heard = loop.time()  # any reply counts: a message, a subscription, the answer to PING
            if msg["type"] == "message":
                self._on_feed(msg["data"])

    def _on_feed(self, data: bytes) -> None:
        line = data.decode("utf-8", "replace")
        try:
            fields = line.split("\t")
            session, epoch, last_id, status = fields[:4]  # a line from an older node has no origin
            origin = fields[4] if len(fields) > 4 else ""
            head = int(last_id)
            input_head = int(fields[5]) if len(fields) > 5 else 0  # only an input's line says
        except ValueError:  # not from a gateway: never let it stop the feed
            log.warning("ignored a malformed line on %s: %.100r", CHANNEL, line)
            return
        if session in self.watched:
            row = None if status == "deleted" else Session(id=session, epoch=epoch, created_at=0, status=status,
                                                             last_id=head, input_last_id=input_head)
            if origin == self.node and session in self._writing:
                self._held[session] = row  # see the module docstring: the writer's reply decides
            else:
                self._heard(session, row)

    def _heard(self, session: str, row: Session | None) -> None:
        if row is None:
            self._deleted(session)
        else:
            self._moved(session, row)

    async def _refresh_watched(self) -> None:
        """Tell the hub the head of every watched session (after the feed was lost)."""
        names = list(self.watched)
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            pipe = self._redis.pipeline(transaction=False)
            for name in chunk:
                pipe.hmget(self._keys(name)[0], "epoch", "status", "last_id", "input_last_id")
            for name, (epoch, status, last_id, input_last) in zip(chunk, await pipe.execute()):
                row = None if epoch is None else Session(id=name, epoch=epoch, created_at=0, status=status,
                                                         last_id=int(last_id), input_last_id=int(input_last or 0))
                self._heard(name, row)

    # -- presence ---------------------------------------------------------------------------

    async def _presence_loop(self) -> None:
        loop = asyncio.get_running_loop()
        beat_at = 0.0
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._presence_changed.wait(), max(0.0, beat_at - loop.time()))
            self._presence_changed.clear()
            try:
                if loop.time() >= beat_at:
                    await self._redis.set(PREFIX + "node:" + self.node, 1, px=int(3000 * PRESENCE_PERIOD))
                    beat_at = loop.time() + PRESENCE_PERIOD
                await self._flush_presence()
            except RedisError as exc:
                log.warning("could not record presence: %s", exc)
                await asyncio.sleep(PRESENCE_PERIOD)

    async def _flush_presence(self, final: bool = False) -> None:
        """Write this node's changed counts (all of them 0 if ``final``: the node stops)."""
        if final:
            self._presence_dirty |= self._reported
        names = list(self._presence_dirty)
        self._presence_dirty.clear()
        if not names:
            return
        counts = [0 if final else self.streams.count(name) for name in names]
        results, _ = await self._eval([(_SESSION, name, self._args("presence", name, self.node, count))
                                       for name, count in zip(names, counts)])
        for name, count, result in zip(names, counts, results):
            if isinstance(result, Exception):
                self._presence_dirty.add(name)  # tried again at the next change or heartbeat
            elif count:
                self._reported.add(name)
            else:
                self._reported.discard(name)
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed

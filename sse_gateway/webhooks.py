"""Webhooks: a signed POST when a run ends or asks for approval while nobody watches its session.

``Notifier`` is a log observer (``log.base.LogObserver``). ``appended`` runs
on the event loop right after a commit; it picks the events that call a
webhook (``gateway.end``: ``run.ended``; ``approval.request``:
``approval.requested``) with one dict lookup per event and hands them to a
task, so the write that told it never waits. The task asks the log who
watches the session (``EventLog.presence``): a webhook is due only when no
stream is open and none closed after the event was committed (a stream
that closes after it saw it: a stream ends right after ``gateway.end``).
When presence cannot be read (Redis unreachable, the log closing), the
webhook is sent: a notice too many beats one missed.

Each delivery is a row of the **outbox**, a SQLite file of its own in WAL
mode, committed before any attempt: a restart (or a crash) never loses a
delivery once it is written, and the next start resumes it. The window
between the event's commit in the log and the delivery's in the outbox is
a few milliseconds; a crash inside it loses that webhook.

The delivery loop sends what is due, at most ``PARALLEL`` at once, and
reads only that many rows at a time, so a receiver that is down makes the
outbox grow on disk, never in memory. Before an attempt it **claims** its
row: counts the attempt and moves the row's due time past the attempt's
end, in one conditional update, so two processes on one outbox (a
rolling restart on one SQLite file) never send a row at once, and a row
whose attempt died with its process comes due again by itself; the loop
looks at the outbox at least every ``LOOK_AGAIN`` seconds, so it also
sends what another process wrote or left behind. After the
attempt the row is deleted (a ``2xx``: delivered; or given up after
``--webhook-attempts``, after ``--webhook-max-age``, or on ``410 Gone``)
or is due again after a backoff that doubles per attempt (``backoff``)
and honours a ``Retry-After`` in seconds. Delivery is at least once: an
attempt cut by a stop is sent again, with the same ``webhook-id``, so
receivers drop repeats by it.

Signing follows Standard Webhooks (https://www.standardwebhooks.com):
``webhook-id`` (the delivery's, the same on every attempt),
``webhook-timestamp`` (this attempt's, Unix seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``
(``sign``); the key is ``config.webhook_key`` of ``--webhook-secret``. The
body is ``payload``, stored once and sent as stored; docs/api.md#webhooks
has its fields.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import math
import random
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiosqlite
import httpx
import orjson

from . import __version__
from .config import Settings, url_problem, webhook_key
from .log.base import EventLog, LogObserver
from .models import APPROVAL_REQUEST, END_EVENT, Session, StoredEvent, now_ms, rfc3339

if TYPE_CHECKING:
    from .metrics import Stats

log = logging.getLogger("sse_gateway.webhooks")

#: The events that call a webhook, and the payload ``type`` of each.
TYPES = {END_EVENT: "run.ended", APPROVAL_REQUEST: "approval.requested"}
PARALLEL = 8  # attempts under way at once; also the most outbox rows (and bodies) held in memory
LOOK_AGAIN = 5.0  # seconds: the loop looks at the outbox at least this often (rows another process wrote)
MAX_BACKOFF = 3600.0  # the longest wait between two attempts, before jitter
GONE = 410  # the receiver wants no more: the delivery is given up at once

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,          -- the webhook-id, the same on every attempt
    session TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,           -- the payload, signed and sent as stored
    created_at INTEGER NOT NULL,  -- ms
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at INTEGER NOT NULL,      -- ms: when the next attempt may start (an attempt under way holds it ahead)
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (due_at);
"""


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` of one attempt: Standard Webhooks ``v1``, HMAC-SHA256 of ``id.timestamp.body``."""
    mac = hmac.new(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def backoff(attempts: int, first: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after ``attempts`` failed attempts: ``first``, doubled per attempt up to ``MAX_BACKOFF``,
    plus up to 50% at random, so that deliveries that failed together do not all come back together."""
    return min(first * 2 ** min(attempts - 1, 32), MAX_BACKOFF) * (1 + rand() / 2)


def payload(session: str, epoch: str, ev: StoredEvent) -> bytes:
    """The body of ``ev``'s webhook: what happened, where, its cursor and the event's own data."""
    return orjson.dumps({"type": TYPES[ev.event], "session": session, "event_id": ev.id,
                         "cursor": f"{ev.id}:{epoch}", "data": orjson.Fragment(ev.data) if ev.is_json else ev.data,
                         "ts": rfc3339(ev.ts)})


def retry_after(value: str | None) -> float:
    """A receiver's ``Retry-After`` in seconds, at most ``MAX_BACKOFF``; 0 for none, a date or nonsense."""
    try:
        seconds = float(value or 0)
    except ValueError:
        return 0.0
    return min(seconds, MAX_BACKOFF) if seconds > 0 else 0.0  # NaN is not > 0


@dataclass(slots=True)
class _Row:
    id: str
    session: str
    url: str
    body: bytes
    attempts: int
    created_at: int
    due_at: int


class Notifier(LogObserver):
    """A gateway's webhooks: the log's observer, the outbox and the loop that delivers it (see the module)."""

    def __init__(self, settings: Settings, log_: EventLog, stats: Stats,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = settings.webhook_url
        self.key = webhook_key(settings.webhook_secret or "")
        self.path = settings.outbox_path
        self.synchronous = settings.sqlite_synchronous.upper()
        self.attempts = settings.webhook_attempts
        self.max_age = settings.webhook_max_age * 1000
        self.first = settings.webhook_backoff
        self.timeout = settings.webhook_timeout
        self.log = log_
        self.stats = stats
        self.pending = 0  # rows in the outbox when the loop last looked (a gauge)
        self._transport = transport  # tests hand in one that needs no socket
        self._db: aiosqlite.Connection | None = None
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.Task | None = None
        self._wake = asyncio.Event()  # a delivery was written, or an attempt ended
        self._writing: set[asyncio.Task] = set()  # presence checks and their outbox writes
        self._sending: dict[asyncio.Task, str] = {}  # attempts under way -> their row

    # -- life ------------------------------------------------------------

    async def open(self) -> None:
        if self.path == ":memory:":
            log.warning("the webhook outbox is in memory (--backend memory without --webhook-outbox): webhooks "
                        "not yet delivered are lost when the gateway stops")
        self._db = await aiosqlite.connect(self.path, isolation_level=None)  # each statement commits on its own
        await self._db.execute("PRAGMA busy_timeout = 10000")
        await self._db.execute("PRAGMA journal_mode = WAL")
        await self._db.execute(f"PRAGMA synchronous = {self.synchronous}")
        await self._db.executescript(SCHEMA)
        self._http = httpx.AsyncClient(transport=self._transport, timeout=self.timeout, follow_redirects=False,
                                       limits=httpx.Limits(max_connections=PARALLEL),
                                       headers={"user-agent": f"sse-gateway/{__version__}"})
        self._loop = asyncio.create_task(self._run(), name="webhooks")

    async def close(self) -> None:
        """Write down every delivery already heard, then stop sending: nothing is drained, nothing is lost.

        Call it after the log is closed (no more facts come). An attempt cut short here is due again at once
        in the outbox, and is sent again by the next start, with the same ``webhook-id``."""
        if self._db is None:
            return
        await asyncio.gather(*self._writing, return_exceptions=True)
        cut = list(self._sending.values())
        for task in (self._loop, *self._sending):
            task.cancel()
        await asyncio.gather(self._loop, *self._sending, return_exceptions=True)
        with contextlib.suppress(sqlite3.Error):
            await self._db.executemany("UPDATE deliveries SET due_at = ? WHERE id = ?", [(now_ms(), i) for i in cut])
        await self._http.aclose()
        await self._db.close()
        self._db = None

    # -- hearing ---------------------------------------------------------

    def appended(self, session: str, events: list[StoredEvent], row: Session) -> None:
        found = [ev for ev in events if ev.event in TYPES]
        if not found:
            return
        url = getattr(row, "webhook_url", None) or self.url  # a session's own URL, where it has one
        if url:
            task = asyncio.create_task(self._write(session, row.epoch, url, found))
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)

    async def _write(self, session: str, epoch: str, url: str, events: list[StoredEvent]) -> None:
        """Put a delivery of each of ``events`` that nobody watched into the outbox, committed."""
        if problem := url_problem(url):
            log.warning("no webhook for session %r: its URL is not usable (%s)", session, problem)
            return
        try:
            streams, last_closed = await self.log.presence(session)
        except Exception as exc:  # noqa: BLE001 -- whatever the store's trouble, a notice too many beats one missed
            log.warning("presence of session %r unknown (%s): its webhook is sent", session, exc)
            streams, last_closed = 0, None
        now = now_ms()
        rows = [("msg_" + secrets.token_hex(16), session, url, payload(session, epoch, ev), now, now)
                for ev in events if not streams and (last_closed is None or last_closed < ev.ts)]
        if not rows:
            return
        try:
            await self._db.executemany("INSERT INTO deliveries (id, session, url, body, created_at, due_at) "
                                       "VALUES (?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:
            log.error("%d webhook(s) of session %r lost: the outbox refused them (%s)", len(rows), session, exc)
            return
        self._wake.set()

    # -- delivering ------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                wait = await self._start_due()
            except sqlite3.Error as exc:
                log.warning("the webhook outbox failed (%s); trying again in a second", exc)
                wait = 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _start_due(self) -> float:
        """Start the attempts that are due, up to ``PARALLEL`` under way; seconds until the loop looks again."""
        now = now_ms()
        free = PARALLEL - len(self._sending)
        if free > 0:
            async with self._db.execute("SELECT id, session, url, body, attempts, created_at, due_at FROM deliveries "
                                        "WHERE due_at <= ? ORDER BY due_at LIMIT ?", (now, free)) as cur:
                rows = [_Row(*r) for r in await cur.fetchall()]
            for row in rows:
                if await self._claim(row, now):
                    task = asyncio.create_task(self._attempt(row))
                    self._sending[task] = row.id
                    task.add_done_callback(self._sent)
        async with self._db.execute("SELECT COUNT(*), MIN(due_at) FROM deliveries") as cur:
            self.pending, next_due = await cur.fetchone()
        if next_due is None or len(self._sending) >= PARALLEL:  # an attempt that ends wakes the loop
            return LOOK_AGAIN
        return min(max(0.0, (next_due - now_ms()) / 1000), LOOK_AGAIN)

    async def _claim(self, row: _Row, now: int) -> bool:
        """Count an attempt of ``row`` and hold its due time past the attempt's end; False if another
        process on this outbox took it first."""
        held = now + int((self.timeout + 1) * 1000)
        cur = await self._db.execute("UPDATE deliveries SET attempts = attempts + 1, due_at = ? "
                                     "WHERE id = ? AND due_at = ?", (held, row.id, row.due_at))
        row.attempts += 1
        return cur.rowcount == 1

    def _sent(self, task: asyncio.Task) -> None:
        self._sending.pop(task, None)
        self._wake.set()

    async def _attempt(self, row: _Row) -> None:
        """Send ``row`` once; then delete it (delivered, or given up) or make it due after its backoff."""
        error, asked = await self._post(row)
        now = now_ms()
        wait = 0.0 if error is None else max(backoff(row.attempts, self.first), asked)
        try:
            if error is None:
                await self._db.execute("DELETE FROM deliveries WHERE id = ?", (row.id,))
                self.stats.webhooks_succeeded += 1
            elif row.attempts >= self.attempts or now + 1000 * wait > row.created_at + self.max_age:
                log.warning("webhook %s of session %r given up after %d attempt(s): %s", row.id, row.session,
                            row.attempts, error)
                await self._db.execute("DELETE FROM deliveries WHERE id = ?", (row.id,))
                self.stats.webhooks_failed += 1
            else:
                log.info("webhook %s of session %r: attempt %d failed (%s); next in %.1f s", row.id, row.session,
                         row.attempts, error, wait)
                await self._db.execute("UPDATE deliveries SET due_at = ?, last_error = ? WHERE id = ?",
                                       (now + int(1000 * wait), error, row.id))
                self.stats.webhooks_retried += 1
        except sqlite3.Error as exc:  # the row keeps its claim: it comes due again when that runs out
            log.warning("webhook %s: the outbox failed after an attempt (%s)", row.id, exc)

    async def _post(self, row: _Row) -> tuple[str | None, float]:
        """One attempt: (None, 0) on a 2xx, else what went wrong and the wait the receiver asked for (s)."""
        stamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": row.id, "webhook-timestamp": str(stamp),
                   "webhook-signature": sign(self.key, row.id, stamp, row.body)}
        try:
            async with asyncio.timeout(self.timeout):
                async with self._http.stream("POST", row.url, content=row.body, headers=headers) as r:
                    status, asked = r.status_code, r.headers.get("retry-after")  # the answer's body is never read
        except (httpx.HTTPError, httpx.InvalidURL, OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}".rstrip(": "), 0.0
        if 200 <= status < 300:
            return None, 0.0
        return f"HTTP {status}", math.inf if status == GONE else retry_after(asked)

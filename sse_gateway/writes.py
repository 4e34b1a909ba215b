"""How requests write to the log: admission under ``--max-sessions``, auto-create, counting.

Every route that may create a session (publish, create, put state, the
demo's runs) goes through ``Writes``, so the limit and the auto-create rule
are applied the same way everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from . import limits
from .config import Settings
from .errors import Conflict, NotFound, Unavailable
from .log.base import EventLog
from .metrics import Stats
from .models import AppendResult, NewEvent, Session


class Writes:
    def __init__(self, settings: Settings, log: EventLog, stats: Stats) -> None:
        self.settings = settings
        self.log = log
        self.stats = stats

    async def admit_session(self) -> None:
        """Raise ``503 too_many_sessions`` if the log holds ``--max-sessions`` already."""
        limit = self.settings.max_sessions
        if limit and await self.log.count_sessions() >= limit:
            raise limits.too_many_sessions(limit)

    async def _append(self, session: str, events: list[NewEvent], create: bool, producer: int | None) -> AppendResult:
        try:
            return await self.log.append(session, events, create=create, producer=producer)
        except Unavailable:
            self.stats.store_errors += 1
            raise

    async def append(self, session: str, events: list[NewEvent], producer: int | None = None) -> AppendResult:
        """Append ``events``, creating the session if allowed (``--auto-create``) and admitted; ``producer``: the
        writer's epoch (fencing)."""
        if len(events) > 1:
            _check_keys(events)
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self.settings.auto_create and self.settings.max_sessions:
            try:  # only a publish that creates the session pays for counting sessions
                result = await self._append(session, events, False, producer)
            except NotFound:
                await self.admit_session()
                result = await self._append(session, events, True, producer)
        else:
            result = await self._append(session, events, self.settings.auto_create, producer)
        self.stats.append_seconds.observe(loop.time() - started)
        fresh = len(result.events)
        self.stats.published += fresh
        self.stats.publish_duplicates += len(events) - fresh
        return result

    async def put_state(self, session: str, state: Any, version: int | None, producer: int | None = None) -> Session:
        """Replace the state document, creating the session if allowed and admitted."""
        if not self.settings.auto_create:
            return await self.log.put_state(session, state, version, producer=producer)
        try:
            return await self.log.put_state(session, state, version, producer=producer)
        except NotFound:
            await self.admit_session()
            with contextlib.suppress(Conflict):
                await self.log.create_session(session)
            return await self.log.put_state(session, state, version, producer=producer)


def _check_keys(events: list[NewEvent]) -> None:
    """``409 idempotency_key_reused`` if one key names two different events of one request.

    The same event twice under one key is a repeat (stored once); two
    different ones would silently lose the second.
    """
    seen: dict[str, NewEvent] = {}
    for ev in events:
        if ev.idempotency_key is not None:
            first = seen.setdefault(ev.idempotency_key, ev)
            if first is not ev and (first.event, first.data, first.is_json) != (ev.event, ev.data, ev.is_json):
                raise Conflict(f"idempotency key {ev.idempotency_key[:64]!r} names two different events",
                               "idempotency_key_reused")

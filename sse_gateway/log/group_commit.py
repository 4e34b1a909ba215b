"""Group commit: one writer task per log, shared by the backends that batch (SQLite, Redis).

Callers queue a write and await its future. The writer takes everything
queued (up to ``max_batch``) and commits it at once: concurrent publishers
share one transaction (SQLite) or one pipeline round trip (Redis), and
nobody's write returns before it is committed. A batch goes through two
steps the backend supplies:

* ``commit(batch)``: the store's work (awaited and timed; the time and the
  number of writes reach the log's ``committed`` observers);
* ``answer(batch, outcome)``: settle every write's future from what
  ``commit`` returned, and tell the observers (``appended``, ...).

One write must never fail another (``log.base``: a write fails alone).
So values are checked before they are queued, and ``commit`` returns an
outcome per write: a write that fails on its own is answered with its own
error while the rest of the batch commits (SQLite runs the batch again
with a savepoint per write; Redis has a reply per script, and sends each
write alone if redis-py cannot encode one). If ``commit`` or ``answer``
raises, that is the store failing as a whole: every write of the batch
not yet answered fails with that error (a ``GatewayError`` as it is,
anything else as ``503 store_error``) and the writer goes on: a writer
that died would leave every later write waiting for ever. ``close`` lets the writer commit
everything queued before it, then stops it; writes after that are
``503 store_closed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from ..errors import GatewayError, Unavailable

log = logging.getLogger("sse_gateway.log")


class Write:
    """One queued write: what the backend needs to run it, and the future its caller awaits."""

    __slots__ = ("session", "future")

    def __init__(self, session: str) -> None:
        self.session = session
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()

    def resolve(self, value: Any) -> None:
        if not self.future.done():  # its caller may have gone (a cancelled request)
            self.future.set_result(value)

    def reject(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)


W = TypeVar("W", bound=Write)


class GroupCommit(Generic[W]):
    def __init__(self, commit: Callable[[list[W]], Awaitable[Any]],
                 answer: Callable[[list[W], Any], Awaitable[None]], *,
                 committed: Callable[[int, float], None], max_batch: int, name: str) -> None:
        self._commit = commit
        self._answer = answer
        self._committed = committed
        self.max_batch = max_batch
        self.name = name
        self._queue: asyncio.Queue[W | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def submit(self, write: W) -> Any:
        """Queue ``write``; its result once committed (or the error that refused it)."""
        if self._task is None:
            raise Unavailable("the store is closed", "store_closed")
        self._queue.put_nowait(write)
        return await write.future

    async def close(self) -> None:
        """Commit and answer everything queued so far, then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        self._queue.put_nowait(None)
        # On a forced exit asyncio cancels every task at once, the writer too: that is not an error here.
        await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            write = await queue.get()
            if write is None:
                return
            batch = [write]
            while len(batch) < self.max_batch and not queue.empty():
                write = queue.get_nowait()
                if write is None:
                    break
                batch.append(write)
            await self._run_batch(batch)
            if write is None:
                return

    async def _run_batch(self, batch: list[W]) -> None:
        try:
            started = time.perf_counter()
            outcome = await self._commit(batch)
            self._committed(len(batch), time.perf_counter() - started)
            await self._answer(batch, outcome)
        except Exception as exc:  # the store failed (or a bug did)
            if isinstance(exc, GatewayError):
                err = exc
                log.error("write of %d operations failed: %s", len(batch), exc.message)
            else:
                err = Unavailable(f"the write failed: {exc}", "store_error")
                log.exception("write of %d operations failed", len(batch))
            for each in batch:
                each.reject(err)

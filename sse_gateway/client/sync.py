"""``SyncPublisher`` and ``SyncRun``: the publisher for code without an event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from types import TracebackType
from typing import Any

from .http import T
from .inputs import Input, InputSent
from .publisher import InputPage, Published, Publisher, Run, SessionInfo, State, Token, Watchers

# -- the blocking twin -------------------------------------------------------------------------


class SyncPublisher:
    """``Publisher`` for code without an event loop: the same methods, blocking.

    It runs a ``Publisher`` on an event loop of its own, on a background thread, so that batches
    are still sent every ``flush_interval`` while the caller's code runs. ``send`` and ``token``
    answer nothing here (``flush`` answers the ids). Close it (``with``, or ``close()``) to flush.
    """

    def __init__(self, url: str | None = None, key: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sse-gateway-publisher", daemon=True)
        self._thread.start()

        async def make() -> Publisher:
            return Publisher(url, key, **options)

        try:
            self.publisher: Publisher = self._call(make())
        except BaseException:
            self._stop()
            raise

    def _call(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def close(self, *, flush: bool = True) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self.publisher.aclose(flush=flush))
        finally:
            self._stop()

    def __enter__(self) -> SyncPublisher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:  # the exception that ends the block goes on; a failed last flush is noted on it
            self.close(flush=isinstance(exc, Exception))
        except Exception as close_error:
            exc.add_note(f"sse-gateway: buffered events were not stored: {close_error}")

    def create(self, session: str | None = None, *, metadata: Any = None, ttl_seconds: int | None = None,
               lease_seconds: int | None = None, webhook_url: str | None = None) -> SessionInfo:
        return self._call(self.publisher.create(session, metadata=metadata, ttl_seconds=ttl_seconds,
                                                lease_seconds=lease_seconds, webhook_url=webhook_url))

    def get(self, session: str) -> dict[str, Any]:
        return self._call(self.publisher.get(session))

    def delete(self, session: str) -> bool:
        return self._call(self.publisher.delete(session))

    def complete(self, session: str, result: Any = None, *, status: str = "completed",
                 error: Any = None) -> dict[str, Any]:
        return self._call(self.publisher.complete(session, result, status=status, error=error))

    def lease(self, session: str, *, seconds: int | None = None, claim: bool = False) -> dict[str, Any]:
        return self._call(self.publisher.lease(session, seconds=seconds, claim=claim))

    def fail(self, session: str, error: BaseException | str | Mapping[str, Any],
             code: str | None = None) -> dict[str, Any]:
        return self._call(self.publisher.fail(session, error, code))

    def watchers(self, session: str) -> Watchers:
        return self._call(self.publisher.watchers(session))

    def get_state(self, session: str) -> State:
        return self._call(self.publisher.get_state(session))

    def put_state(self, session: str, state: Mapping[str, Any], *, if_match: int | None = None) -> State:
        return self._call(self.publisher.put_state(session, state, if_match=if_match))

    def mint_token(self, session: str, *, ttl_seconds: int | None = None, scopes: list[str] | None = None) -> Token:
        return self._call(self.publisher.mint_token(session, ttl_seconds=ttl_seconds, scopes=scopes))

    def publish(self, session: str, event: str, data: Any, *, idempotency_key: str | None = None) -> Published:
        return self._call(self.publisher.publish(session, event, data, idempotency_key=idempotency_key))

    def publish_text(self, session: str, text: str, *, event: str = "message",
                     idempotency_key: str | None = None) -> Published:
        return self._call(self.publisher.publish_text(session, text, event=event, idempotency_key=idempotency_key))

    def send(self, session: str, event: str, data: Any, *, idempotency_key: str | None = None) -> None:
        self._call(self.publisher.send(session, event, data, idempotency_key=idempotency_key))

    def token(self, session: str, text: str, *, event: str = "token") -> None:
        self._call(self.publisher.token(session, text, event=event))

    def message(self, session: str, tokens: Iterable[str], *, message: str | None = None, type: str | None = None,
                metadata: Any = None) -> str:
        """``Publisher.message``; ``tokens`` is read on a worker thread, so a blocking one stalls nothing."""
        return self._call(self.publisher.message(session, _pulled(tokens), message=message, type=type,
                                                 metadata=metadata))

    def replace_message(self, session: str, message: str, text: str, *, status: str = "finished",
                        metadata: Any = None) -> Published:
        return self._call(self.publisher.replace_message(session, message, text, status=status, metadata=metadata))

    def flush(self, session: str | None = None) -> list[int]:
        return self._call(self.publisher.flush(session))

    def send_input(self, session: str, kind: str, data: Any = None, *, approval_id: str | None = None,
                   decision: str | None = None, idempotency_key: str | None = None) -> InputSent:
        return self._call(self.publisher.send_input(session, kind, data, approval_id=approval_id, decision=decision,
                                                    idempotency_key=idempotency_key))

    def ack_input(self, session: str, input_id: int | str) -> dict[str, Any]:
        return self._call(self.publisher.ack_input(session, input_id))

    def read_inputs(self, session: str, *, after: int | None = None, limit: int | None = None,
                    wait: float | None = None) -> InputPage:
        """As ``Publisher.read_inputs``; the inputs' ``ack()`` is a coroutine: use ``ack_input`` here."""
        return self._call(self.publisher.read_inputs(session, after=after, limit=limit, wait=wait))

    def run(self, session: str | None = None, *, metadata: Any = None, ttl_seconds: int | None = None,
            lease_seconds: int | None = None, listen: bool = False) -> SyncRun:
        return SyncRun(self, self.publisher.run(session, metadata=metadata, ttl_seconds=ttl_seconds,
                                                lease_seconds=lease_seconds, listen=listen))


class SyncRun:
    """``Run`` for ``SyncPublisher``: ``with pub.run(id) as run:``, the same behaviour at the end."""

    def __init__(self, owner: SyncPublisher, run: Run) -> None:
        self._owner = owner
        self.run = run

    @property
    def session(self) -> str:
        return self.run.session

    @property
    def info(self) -> SessionInfo | None:
        return self.run.info

    @property
    def result(self) -> Any:
        return self.run.result

    @result.setter
    def result(self, value: Any) -> None:
        self.run.result = value

    def __enter__(self) -> SyncRun:
        self._owner._call(self.run.__aenter__())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        return self._owner._call(self.run.__aexit__(exc_type, exc, tb))

    def send(self, event: str, data: Any, *, idempotency_key: str | None = None) -> None:
        self._owner._call(self.run.send(event, data, idempotency_key=idempotency_key))

    def token(self, text: str, *, event: str = "token") -> None:
        self._owner._call(self.run.token(text, event=event))

    def message(self, tokens: Iterable[str], *, message: str | None = None, type: str | None = None,
                metadata: Any = None) -> str:
        return self._owner._call(self.run.message(_pulled(tokens), message=message, type=type, metadata=metadata))

    def replace_message(self, message: str, text: str, *, status: str = "finished", metadata: Any = None) -> Published:
        return self._owner._call(self.run.replace_message(message, text, status=status, metadata=metadata))

    def publish(self, event: str, data: Any, *, idempotency_key: str | None = None) -> Published:
        return self._owner._call(self.run.publish(event, data, idempotency_key=idempotency_key))

    def flush(self) -> list[int]:
        return self._owner._call(self.run.flush())

    def complete(self, result: Any = None, *, status: str = "completed", error: Any = None) -> dict[str, Any]:
        return self._owner._call(self.run.complete(result, status=status, error=error))

    def fail(self, error: BaseException | str | Mapping[str, Any], code: str | None = None) -> dict[str, Any]:
        return self._owner._call(self.run.fail(error, code))

    @property
    def cancelled(self) -> bool:
        """True once a ``cancel`` input has arrived (the first look starts the input reader)."""
        async def look() -> bool:
            return self.run.cancelled.is_set()

        return self._owner._call(look())

    @property
    def cancel_input(self) -> Input | None:
        return self.run.cancel_input

    def ack_input(self, input_id: int | str) -> dict[str, Any]:
        return self._owner._call(self.run.ack_input(input_id))

    def request_approval(self, approval_id: str, **details: Any) -> Published:
        return self._owner._call(self.run.request_approval(approval_id, **details))

    def wait_approval(self, approval_id: str, *, timeout: float | None = None) -> str | None:
        return self._owner._call(self.run.wait_approval(approval_id, timeout=timeout))

    def watchers(self) -> Watchers:
        return self._owner._call(self.run.watchers())

    def get_state(self) -> State:
        return self._owner._call(self.run.get_state())

    def put_state(self, state: Mapping[str, Any], *, if_match: int | None = None) -> State:
        return self._owner._call(self.run.put_state(state, if_match=if_match))


async def _pulled(tokens: Iterable[str]) -> AsyncIterator[str]:
    """``tokens``, each taken on a worker thread (a blocking iterator does not hold up the loop)."""
    it, done = iter(tokens), object()
    while (text := await asyncio.to_thread(next, it, done)) is not done:
        yield text

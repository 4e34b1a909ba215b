"""``Publisher`` and ``Run``: what an agent uses to append events, batch tokens and end its run."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from .http import (
    RETRY_STATUSES,
    GatewayError,
    Retry,
    RetryNotice,
    check_event_type,
    check_session,
    dumps,
    resolve_key,
    resolve_url,
    session_path,
    stream_path,
    with_retries,
)
from .inputs import Input, InputReader, InputSent, input_body, input_from, input_sent
from .subscriber import Reconnect

# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionInfo:
    """A session made or taken up by ``create`` (``created`` False: it existed already)."""

    id: str
    epoch: str | None
    stream_url: str  # relative to the gateway's base URL; carries the token when there is one
    subscribe_token: str | None
    token_expires_at: str | None
    created: bool


@dataclass(frozen=True)
class Published:
    """The answer to a publish: the ids given (a repeat gets its first id), ``appended`` False if all were repeats."""

    ids: list[int]
    last_id: int
    appended: bool
    epoch: str | None
    raw: dict[str, Any]

    @property
    def id(self) -> int:
        return self.ids[-1]


@dataclass(frozen=True)
class Watchers:
    """Presence: streams attached now, and when the last one left. ``bool(watchers)``: someone is watching."""

    subscribers: int
    last_seen_at: str | None

    def __bool__(self) -> bool:
        return self.subscribers > 0


@dataclass(frozen=True)
class State:
    """A session's state document: ``version`` (0 before the first put), ``state``, and ``as_of`` (a cursor)."""

    version: int
    state: dict[str, Any] | None
    as_of: str | None


@dataclass(frozen=True)
class Token:
    token: str
    expires_at: str
    stream_url: str


def error_object(error: BaseException | str | Mapping[str, Any], code: str | None = None) -> dict[str, Any]:
    """The ``error`` a run that failed ends with: ``{"code": ..., "message": ...}``.

    An exception gives its class name as ``code`` and its text as ``message``; a string is the
    message (code ``"failed"``); a mapping is taken as the error object itself.
    """
    if isinstance(error, Mapping):
        body = dict(error)
    elif isinstance(error, BaseException):
        body = {"code": type(error).__name__, "message": str(error) or type(error).__name__}
    else:
        body = {"code": "failed", "message": str(error)}
    if code is not None:
        body["code"] = code
    return body


@dataclass(frozen=True)
class InputPage:
    """An answer of ``read_inputs``: the inputs after ``after``, and the ``after`` of the next call."""

    inputs: list[Input]
    next_after: int
    input_last_id: int
    input_acked_id: int
    epoch: str | None


# -- publisher -------------------------------------------------------------------------------------


@dataclass
class _Buffer:
    """The events of one session waiting for a batch POST, oldest first."""

    items: list[bytes] = field(default_factory=list)
    futures: list[asyncio.Future[int]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    error: BaseException | None = None


class Publisher:
    """Publishes to a gateway: one ``httpx.AsyncClient`` with retries, idempotency keys and batching.

    ``url`` and ``key`` default to ``$SSE_GATEWAY_URL`` and ``$SSE_GATEWAY_PUBLISH_KEY``.

    Every event gets an idempotency key, ``<key_prefix>-<n>``: the prefix is random per publisher
    (``py-`` and 16 characters) unless given, ``n`` counts the events of this publisher. The key is
    set once, when the event is handed over, and sent again on every retry, so a retry after a lost
    answer never appends twice. Give ``key_prefix`` (or a key per event) to keep the keys stable
    across a restart of the agent.

    ``send`` and ``token`` buffer; a session's buffer is sent as one batch POST ``flush_interval``
    seconds after its first event, or as soon as ``batch_size`` events wait, in order. The error of
    a batch sent in the background is raised by the next ``send``, ``token`` or ``flush`` of that
    session. A batch that failed for a reason that may pass (the network, 408, 429, 5xx, 507, once
    ``retry`` is spent) keeps its events and keys, and the next flush sends it again; a batch the
    gateway refuses for good (another 4xx: a completed session, a wrong key) is dropped.
    """

    def __init__(self, url: str | None = None, key: str | None = None, *, batch_size: int = 100,
                 flush_interval: float = 0.1, max_batch_bytes: int = 1 << 20, max_buffer: int = 10_000,
                 retry: Retry = Retry(), timeout: float = 30.0, key_prefix: str | None = None,
                 client: httpx.AsyncClient | None = None,
                 on_retry: Callable[[RetryNotice], None] | None = None) -> None:
        if client is not None and url is None and str(client.base_url):
            url = str(client.base_url)
        self.url = resolve_url(url)
        self.key = resolve_key(key)
        if not 1 <= batch_size <= 1000:
            raise ValueError("batch_size must be 1 to 1000 (the gateway's --max-batch is 1000 by default)")
        if flush_interval < 0 or max_buffer < batch_size:
            raise ValueError("flush_interval must be 0 or more and max_buffer at least batch_size")
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_batch_bytes = max_batch_bytes
        self.max_buffer = max_buffer
        self.retry = retry
        self.on_retry = on_retry
        self.key_prefix = key_prefix if key_prefix is not None else "py-" + secrets.token_urlsafe(12)
        if not re.fullmatch(r"[!-~]{1,200}", self.key_prefix):
            raise ValueError("key_prefix must be 1 to 200 printable ASCII characters without spaces")
        self._counter = 0
        self._own_client = client is None
        self._http = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self._buffers: dict[str, _Buffer] = {}
        self._epochs: dict[str, int] = {}  # session -> the producer epoch this publisher claimed (``claim``)

    # -- plumbing

    def next_key(self) -> str:
        """A fresh idempotency key of this publisher."""
        self._counter += 1
        return f"{self.key_prefix}-{self._counter}"

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        headers.update(extra or {})
        return headers

    def _as_producer(self, session: str, headers: Mapping[str, str] | None = None) -> dict[str, str]:
        """``headers`` and, once this publisher claimed ``session``, its ``Producer-Epoch`` (fencing)."""
        out = dict(headers or {})
        if session in self._epochs:
            out["Producer-Epoch"] = str(self._epochs[session])
        return out

    async def request(self, method: str, path: str, *, json_body: Any = None, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None,
                      retry: Retry | None = None) -> httpx.Response:
        """One API request, with this publisher's credentials and retries; a refusal raises ``GatewayError``."""
        hdrs = self._headers(headers)
        if json_body is not None:
            content = dumps(json_body)
            hdrs.setdefault("Content-Type", "application/json")
        url = self.url + path

        def send() -> Awaitable[httpx.Response]:
            return self._http.request(method, url, content=content, headers=hdrs, params=params)

        return await with_retries(send, method=method, url=url, base_url=self.url, retry=retry or self.retry,
                                   on_retry=self.on_retry)

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is None:
            await self.aclose()
            return
        try:  # the exception that ends the block goes on; a failed last flush is noted on it
            await self.aclose(flush=isinstance(exc, Exception))
        except Exception as close_error:
            exc.add_note(f"sse-gateway: buffered events were not stored: {close_error}")

    async def aclose(self, *, flush: bool = True) -> None:
        """Flush every buffer (unless ``flush`` is False), then close the HTTP client if this publisher made it."""
        try:
            if flush:
                for session in list(self._buffers):
                    await self.flush(session)
        finally:
            tasks = [buf.task for buf in self._buffers.values() if buf.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._own_client:
                await self._http.aclose()

    # -- sessions

    async def create(self, session: str | None = None, *, metadata: Any = None, ttl_seconds: int | None = None,
                     lease_seconds: int | None = None, webhook_url: str | None = None) -> SessionInfo:
        """Create ``session``, or take it up if it exists (``created`` False).

        Without an id, one is made here (``s_`` and 16 random characters), so that a retry after a
        lost ``201`` finds the session it created. ``PUT /v1/sessions/{id}`` answers ``200`` for a
        session that exists with the same settings; one with other settings (``409 session_exists``)
        is taken up too, keeping its own metadata.
        """
        session = check_session(session) if session is not None else "s_" + secrets.token_urlsafe(12)
        body: dict[str, Any] = {}
        if metadata is not None:
            body["metadata"] = metadata
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        if lease_seconds is not None:
            body["lease_seconds"] = lease_seconds
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        try:
            response = await self.request("PUT", session_path(session), json_body=body)
        except GatewayError as exc:
            if exc.code != "session_exists":
                raise
            row = await self.get(session)
            try:
                token: Token | None = await self.mint_token(session)
            except GatewayError as mint_error:
                if mint_error.code != "tokens_not_configured":
                    raise
                token = None
            return SessionInfo(session, row.get("epoch"), token.stream_url if token else stream_path(session),
                               token.token if token else None, token.expires_at if token else None, False)
        data = response.json()
        return SessionInfo(data["id"], data.get("epoch"), data.get("stream_url") or stream_path(session),
                           data.get("subscribe_token"), data.get("token_expires_at"), response.status_code == 201)

    async def get(self, session: str) -> dict[str, Any]:
        """The session as ``GET /v1/sessions/{id}`` gives it (status, last_id, subscribers, result...)."""
        return (await self.request("GET", session_path(session))).json()

    async def delete(self, session: str) -> bool:
        """Delete the session; False if there was none."""
        try:
            await self.request("DELETE", session_path(session))
        except GatewayError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def complete(self, session: str, result: Any = None, *, status: str = "completed",
                       error: Any = None) -> dict[str, Any]:
        """Flush, then end the run (``gateway.end``): ``status`` completed (with ``result``), failed or
        cancelled (with ``error``, and ``result`` if there is one); answers the session.

        Ending again the same way is a no-op, so a retry is safe.
        """
        await self.flush(session)
        body: dict[str, Any] = {} if result is None else {"result": result}
        if status != "completed":
            body["status"] = status
            if error is not None:
                body["error"] = error
        return (await self.request("POST", session_path(session) + "/complete", json_body=body,
                                   headers=self._as_producer(session))).json()

    async def fail(self, session: str, error: BaseException | str | Mapping[str, Any],
                   code: str | None = None) -> dict[str, Any]:
        """End the run as failed, with ``error_object(error, code)``."""
        return await self.complete(session, status="failed", error=error_object(error, code))

    async def lease(self, session: str, *, seconds: int | None = None, claim: bool = False) -> dict[str, Any]:
        """Renew the producer's lease on ``session`` (``seconds``: its new length, 0 for none); answers the
        session. ``claim``: take the session over as a new producer epoch, which this publisher's later
        writes to it carry (``Producer-Epoch``): writes of an agent that claimed it before are refused."""
        body: dict[str, Any] = {}
        if seconds is not None:
            body["seconds"] = seconds
        if claim:
            body["claim"] = True
        row = (await self.request("POST", session_path(session) + "/lease", json_body=body,
                                  headers=None if claim else self._as_producer(session))).json()
        if claim:
            self._epochs[session] = int(row["producer_epoch"])
        return row

    async def watchers(self, session: str) -> Watchers:
        """Is someone watching? The session's ``subscribers`` and ``last_seen_at``."""
        row = await self.get(session)
        return Watchers(int(row.get("subscribers") or 0), row.get("last_seen_at"))

    async def get_state(self, session: str) -> State:
        return _state((await self.request("GET", session_path(session) + "/state")).json())

    async def put_state(self, session: str, state: Mapping[str, Any], *, if_match: int | None = None) -> State:
        """Flush, then replace the state document (only if its version is still ``if_match``, when given: else 412)."""
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else None
        await self.flush(session)  # the state's as_of then covers every event sent before it
        response = await self.request("PUT", session_path(session) + "/state", json_body=dict(state),
                                      headers=self._as_producer(session, headers))
        return _state(response.json())

    async def mint_token(self, session: str, *, ttl_seconds: int | None = None,
                         scopes: list[str] | None = None) -> Token:
        """A subscribe token for one session (the gateway needs ``--token-secret``); ``scopes``
        ``["subscribe", "input"]`` also lets its holder send the session input."""
        body: dict = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
        if scopes is not None:
            body["scopes"] = scopes
        data = (await self.request("POST", session_path(session) + "/tokens", json_body=body)).json()
        return Token(data["token"], data["expires_at"], data["stream_url"])

    # -- input (user -> agent)

    async def send_input(self, session: str, kind: str, data: Any = None, *, approval_id: str | None = None,
                         decision: str | None = None, idempotency_key: str | None = None) -> InputSent:
        """Send the session's agent an input: ``kind`` one of ``message``, ``steer``, ``approval``,
        ``cancel``; an approval also needs ``approval_id`` and ``decision`` (``approve``/``deny``).

        It gets an idempotency key as events do (``<key_prefix>-<n>``, sent again on every retry),
        so a retry after a lost answer is one input (``created`` False for a repeat). A refusal
        raises ``GatewayError``: ``approval_not_found``, ``approval_answered`` (``body["input_id"]``
        names the answer), ``session_completed``, ``session_not_found``...
        """
        body = input_body(kind, data, approval_id=approval_id, decision=decision,
                          idempotency_key=idempotency_key or self.next_key())
        response = await self.request("POST", session_path(session) + "/input", json_body=body)
        return input_sent(response)

    async def ack_input(self, session: str, input_id: int | str) -> dict[str, Any]:
        """Confirm the session's inputs up to ``input_id`` (an id or a cursor) as handled.

        Answers ``{"session", "input_acked_id", "input_last_id"}``; acks only move forward.
        """
        return (await self.request("POST", session_path(session) + "/input/ack",
                                   json_body={"id": input_id})).json()

    async def read_inputs(self, session: str, *, after: int | None = None, limit: int | None = None,
                          wait: float | None = None) -> InputPage:
        """The inputs after ``after`` (default: after ``input_acked_id``), JSON; ``wait`` (0 to 30 s)
        waits that long for one when there is none yet (a long poll)."""
        params: dict[str, str] = {}
        if after is not None:
            params["after"] = str(after)
        if limit is not None:
            params["limit"] = str(limit)
        if wait is not None:
            params["wait"] = f"{wait:g}"
        data = (await self.request("GET", session_path(session) + "/input", params=params)).json()
        ack = self._acker(session)
        return InputPage([input_from(item, f"{item['id']}:{data.get('epoch')}", ack) for item in data["inputs"]],
                         int(data["next_after"]), int(data["input_last_id"]), int(data["input_acked_id"]),
                         data.get("epoch"))

    def input_reader(self, session: str, *, cursor: str | None = None, from_: str | None = None,
                     give_up_after: float = 60.0, read_timeout: float = 60.0,
                     on_reconnect: Callable[[Reconnect], None] | None = None) -> InputReader:
        """The session's input as a stream (``async for item in pub.input_reader(id)``), with this
        publisher's gateway and key; ``item.ack()`` acks through this publisher."""
        return InputReader(session, url=self.url, key=self.key or "", cursor=cursor, from_=from_,
                           give_up_after=give_up_after, read_timeout=read_timeout, on_reconnect=on_reconnect,
                           ack=self._acker(session))

    def _acker(self, session: str) -> Callable[[int], Awaitable[Any]]:
        async def ack(input_id: int) -> Any:
            return await self.ack_input(session, input_id)

        return ack

    # -- events

    async def publish(self, session: str, event: str, data: Any, *, idempotency_key: str | None = None) -> Published:
        """Append one event now (after what is buffered for the session); answers its id."""
        item = {"event": check_event_type(event), "data": data, "idempotency_key": idempotency_key or self.next_key()}
        body = dumps(item)
        await self.flush(session)
        response = await self.request("POST", session_path(session) + "/events", content=body,
                                      headers=self._as_producer(session, {"Content-Type": "application/json"}))
        return _published(response)

    async def publish_text(self, session: str, text: str, *, event: str = "message",
                           idempotency_key: str | None = None) -> Published:
        """Append one text event now (``text/plain``: its data is the text, not JSON)."""
        headers = {"Content-Type": "text/plain; charset=utf-8", "Idempotency-Key": idempotency_key or self.next_key()}
        body = text.encode()
        await self.flush(session)
        response = await self.request("POST", session_path(session) + "/events", content=body,
                                      headers=self._as_producer(session, headers),
                                      params={"event": check_event_type(event)})
        return _published(response)

    async def send(self, session: str, event: str, data: Any, *,
                   idempotency_key: str | None = None) -> asyncio.Future[int]:
        """Buffer one event; it goes in the session's next batch. Answers a future of its id.

        Raises (without taking the event) the error of an earlier batch of this session that failed.
        Waits for a flush when ``max_buffer`` events are waiting.
        """
        check_session(session)
        body = dumps({"event": check_event_type(event), "data": data,
                       "idempotency_key": idempotency_key or self.next_key()})
        buf = self._buffers.get(session)
        if buf is None:
            buf = self._buffers[session] = _Buffer()
        if buf.error is not None:
            error, buf.error = buf.error, None
            raise error
        if len(buf.items) >= self.max_buffer:  # back-pressure: wait for room (a failure here takes nothing)
            await self.flush(session)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        buf.items.append(body)
        buf.futures.append(future)
        if len(buf.items) >= self.batch_size:
            buf.full.set()
        if buf.task is None:
            buf.task = asyncio.create_task(self._flusher(session, buf))
        return future

    async def token(self, session: str, text: str, *, event: str = "token") -> asyncio.Future[int]:
        """Buffer a token of text: an event ``token`` whose data is ``{"text": text}``."""
        return await self.send(session, event, {"text": text})

    async def message(self, session: str, tokens: Iterable[str] | AsyncIterable[str], *, message: str | None = None,
                      type: str | None = None, metadata: Any = None) -> str:
        """Publish one message from ``tokens`` (text deltas, sync or async): ``message.start``, a
        ``message.append`` per token (batched like ``send``), ``message.end``; answers its id once all of
        it is stored. If ``tokens`` raises, the message ends ``failed`` (with the error) and the
        exception goes on. ``message``: its id (default a fresh one); ``type``, ``metadata``: as
        ``message.start`` takes them (docs/api.md, Messages)."""
        mid = message or "m_" + secrets.token_urlsafe(9)
        start: dict[str, Any] = {"message": mid}
        if type is not None:
            start["type"] = type
        if metadata is not None:
            start["metadata"] = metadata
        await self.send(session, "message.start", start)
        try:
            if isinstance(tokens, AsyncIterable):
                async for text in tokens:
                    await self.send(session, "message.append", {"message": mid, "text": text})
            else:
                for text in tokens:
                    await self.send(session, "message.append", {"message": mid, "text": text})
        except BaseException as exc:
            await self.send(session, "message.end", {"message": mid, "status": "failed", "error": error_object(exc)})
            await self.flush(session)
            raise
        await self.send(session, "message.end", {"message": mid, "status": "finished"})
        await self.flush(session)
        return mid

    async def replace_message(self, session: str, message: str, text: str, *, status: str = "finished",
                              metadata: Any = None) -> Published:
        """Give message ``message`` its whole text at once (a retried step, an edited answer); it ends
        ``status``. Readers that have it see it replaced; later readers see only this."""
        data: dict[str, Any] = {"message": message, "text": text, "status": status}
        if metadata is not None:
            data["metadata"] = metadata
        return await self.publish(session, "message.replace", data)

    async def flush(self, session: str | None = None) -> list[int]:
        """Send what is buffered for ``session`` (every session if None) now; answers the ids it got.

        Raises the error of a batch that failed (its events are kept and sent again by the next
        flush, unless the gateway refused them for good).
        """
        if session is None:
            ids: list[int] = []
            for name in list(self._buffers):
                ids += await self.flush(name)
            return ids
        buf = self._buffers.get(session)
        if buf is None:
            return []
        waiting = list(buf.futures)  # what is buffered now, whichever flush (this or the timer's) sends it
        buf.error = None
        while buf.items and not all(f.done() for f in waiting):
            await self._flush_batch(session, buf)
        buf.error = None  # reported here, not again by the next send
        return [f.result() for f in waiting]

    async def _flusher(self, session: str, buf: _Buffer) -> None:
        try:
            while buf.items:
                if len(buf.items) < self.batch_size and self.flush_interval > 0:
                    buf.full.clear()
                    try:
                        await asyncio.wait_for(buf.full.wait(), self.flush_interval)
                    except TimeoutError:
                        pass
                while buf.items:
                    await self._flush_batch(session, buf)
        except Exception as exc:  # kept for the next call of this session: nobody awaits this task
            buf.error = exc
        finally:
            buf.task = None

    async def _flush_batch(self, session: str, buf: _Buffer) -> list[int]:
        """Send the oldest waiting events as one batch; they leave the buffer only once stored."""
        async with buf.lock:
            if not buf.items:
                return []
            count, size = 0, 2
            for item in buf.items[:self.batch_size]:
                if count and size + len(item) + 1 > self.max_batch_bytes:
                    break
                count, size = count + 1, size + len(item) + 1
            body = b"[" + b",".join(buf.items[:count]) + b"]"
            try:
                response = await self.request("POST", session_path(session) + "/events", content=body,
                                              headers=self._as_producer(session, {"Content-Type": "application/json"}))
            except GatewayError as exc:
                if 400 <= exc.status < 500 and exc.status not in RETRY_STATUSES:  # refused for good: drop it
                    for future in buf.futures[:count]:
                        if not future.done():
                            future.set_exception(exc)
                            future.exception()  # retrieved: the error is raised by the next call instead
                    del buf.items[:count], buf.futures[:count]
                raise
            ids = [int(i) for i in response.json()["ids"]]
            futures = buf.futures[:count]
            del buf.items[:count], buf.futures[:count]
            for future, event_id in zip(futures, ids):
                if not future.done():
                    future.set_result(event_id)
            if len(buf.items) < self.batch_size:
                buf.full.clear()
            return ids

    # -- runs

    def run(self, session: str | None = None, *, metadata: Any = None, ttl_seconds: int | None = None,
            lease_seconds: int | None = None, listen: bool = False) -> Run:
        """``async with pub.run(id) as run:`` creates or takes up the session, claims it as its producer,
        keeps its lease, and ends the run at the end (completed, failed or cancelled).

        ``listen``: start reading the session's input at entry (else at the first use of
        ``run.inputs()``, ``run.cancelled`` or ``run.wait_approval``)."""
        return Run(self, session, metadata=metadata, ttl_seconds=ttl_seconds, lease_seconds=lease_seconds,
                   listen=listen)



def _published(response: httpx.Response) -> Published:
    data = response.json()
    ids = [int(i) for i in data["ids"]] if "ids" in data else [int(data["id"])]
    return Published(ids, int(data["last_id"]), response.status_code == 201, data.get("epoch"), data)


def _state(data: dict[str, Any]) -> State:
    return State(int(data["version"]), data.get("state"), data.get("as_of"))


class Run:
    """One agent run in one session; made by ``Publisher.run``, used as ``async with``.

    On entry the session is created or taken up (``info``); a completed one raises
    ``GatewayError(409, "session_completed")``. The run then **claims** the session: it becomes its
    producer with a new epoch (``producer_epoch``), and every write of an earlier agent on it (a
    process that was thought dead, still running somewhere) is refused from then on
    (``403 producer_fenced``). While the block runs, the run renews the session's **lease** (when it
    has one) every third of it, so a live agent that is thinking, not writing, is not timed out;
    an agent process that dies stops renewing, and the gateway ends its run as ``timed_out``.

    On a normal exit, buffered events are flushed and the run ends ``completed`` with ``result``
    (unless ``complete`` or ``fail`` was called already). On an exception, what is buffered is
    flushed, the run ends ``failed`` with ``error_object(exc)``, and the exception goes on. A
    cancelled task or a ``KeyboardInterrupt`` only flushes (for at most 5 s) and leaves the session
    open, for a restarted agent to take up.

    The run also reads its session's **input** (from its first use, or from entry with
    ``listen=True``), on a background stream that starts after ``input_acked_id`` and resumes
    exactly across drops:

    - ``async for item in run.inputs():`` every input, in order, each once;
      ``await item.ack()`` or ``await run.ack_input(id)`` confirms it.
    - ``run.cancelled``: an ``asyncio.Event``, set when a ``cancel`` input arrives
      (``run.cancel_input`` is that input). When the block then ends normally, the run ends
      ``cancelled`` (its ``result``, if set, is kept as the partial result; the error says the
      cancel's reason), and the cancel is acked.
    - ``await run.request_approval("rm-1", command=...)`` publishes ``approval.request``;
      ``await run.wait_approval("rm-1")`` answers ``"approve"`` or ``"deny"`` (None if the run is
      cancelled first).
    """

    def __init__(self, publisher: Publisher, session: str | None, *, metadata: Any = None,
                 ttl_seconds: int | None = None, lease_seconds: int | None = None, listen: bool = False) -> None:
        self.publisher = publisher
        self._requested = session
        self._metadata = metadata
        self._ttl = ttl_seconds
        self._lease = lease_seconds
        self.producer_epoch: int | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._listen = listen
        self.info: SessionInfo | None = None
        self.result: Any = None
        self.finished = False
        self._cancelled = asyncio.Event()
        self.cancel_input: Input | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reader_error: BaseException | None = None
        self._queue: asyncio.Queue[Input | BaseException] = asyncio.Queue()
        self._approvals: dict[str, asyncio.Future[str]] = {}

    @property
    def session(self) -> str:
        if self.info is None:
            raise RuntimeError("the run has not started: use it as `async with pub.run(...) as run`")
        return self.info.id

    async def __aenter__(self) -> Run:
        self.info = await self.publisher.create(self._requested, metadata=self._metadata, ttl_seconds=self._ttl,
                                                lease_seconds=self._lease)
        row = await self.publisher.lease(self.info.id, claim=True)  # 409 session_completed if its run is over
        self.producer_epoch = int(row["producer_epoch"])
        if row.get("lease_seconds"):
            self._renewer = asyncio.create_task(self._renew(int(row["lease_seconds"])),
                                                name=f"sse-gateway-lease-{self.info.id}")
        if self._listen:
            self.listen()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        try:
            return await self._end(exc)
        finally:
            await self._stop_reader()

    async def _renew(self, seconds: int) -> None:
        """Renew the lease every third of it until the block ends (or the run has ended, or was taken over)."""
        while True:
            await asyncio.sleep(max(seconds / 3, 0.2))
            try:
                await self.publisher.lease(self.session)
            except GatewayError as exc:
                if exc.status in (403, 404, 409):  # taken over (producer_fenced), deleted, or the run has ended
                    return
            except Exception:  # the network: the next renewal tries again, within the lease
                continue

    async def _end(self, exc: BaseException | None) -> bool:
        if exc is None:
            if not self.finished:
                if self._cancelled.is_set():
                    cancel = self.cancel_input
                    if cancel is not None:
                        await self.publisher.ack_input(self.session, cancel.id)
                    reason = (cancel.reason if cancel else None) or "cancelled by the user"
                    await self.complete(self.result, status="cancelled",
                                        error={"code": "cancelled", "message": reason})
                else:
                    await self.complete(self.result)
            else:
                await self.flush()
            return False
        if isinstance(exc, Exception):
            try:
                await self.flush()
            except Exception as flush_error:
                exc.add_note(f"sse-gateway: the run's last events were not stored: {flush_error}")
            if not self.finished:
                try:
                    await self.fail(exc)
                except Exception as fail_error:
                    exc.add_note(f"sse-gateway: the run could not be marked failed: {fail_error}")
            return False
        try:
            await asyncio.wait_for(self.flush(), 5)
        except Exception:
            pass
        return False

    # -- input

    def listen(self) -> None:
        """Start reading the session's input in the background (once; the other input methods call it)."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_inputs(), name=f"sse-gateway-input-{self.session}")

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when a ``cancel`` input arrives (reading it starts the input reader)."""
        if self.info is not None:
            self.listen()
        return self._cancelled

    async def _read_inputs(self) -> None:
        try:
            async for item in self.publisher.input_reader(self.session):
                if item.kind == "cancel" and not self._cancelled.is_set():
                    self.cancel_input = item
                    self._cancelled.set()
                elif item.kind == "approval" and item.approval_id and item.decision:
                    future = self._approval(item.approval_id)
                    if not future.done():
                        future.set_result(item.decision)
                self._queue.put_nowait(item)
        except Exception as exc:  # given to whoever waits for input
            self._reader_error = exc
            self._queue.put_nowait(exc)
            for future in self._approvals.values():
                if not future.done():
                    future.set_exception(exc)
                    future.exception()

    async def _stop_reader(self) -> None:
        tasks = [t for t in (self._reader, self._renewer) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _approval(self, approval_id: str) -> asyncio.Future[str]:
        future = self._approvals.get(approval_id)
        if future is None:
            future = self._approvals[approval_id] = asyncio.get_running_loop().create_future()
            if self._reader_error is not None:
                future.set_exception(self._reader_error)
        return future

    async def inputs(self) -> AsyncIterator[Input]:
        """Every input of the session after its ``input_acked_id``, in order, each once; waits for more.

        Raises the reader's error (``GatewayError``: the session was deleted, the gateway stayed
        unreachable for ``give_up_after``). Cancels and approvals are yielded too.
        """
        self.listen()
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._queue.put_nowait(item)
                raise item
            yield item

    async def ack_input(self, input_id: int | str) -> dict[str, Any]:
        """Confirm the inputs up to ``input_id`` as handled (see ``Publisher.ack_input``)."""
        return await self.publisher.ack_input(self.session, input_id)

    async def send_input(self, kind: str, data: Any = None, *, approval_id: str | None = None,
                         decision: str | None = None, idempotency_key: str | None = None) -> InputSent:
        """Send input to this run's own session (tests, or a supervisor in the same process)."""
        return await self.publisher.send_input(self.session, kind, data, approval_id=approval_id,
                                               decision=decision, idempotency_key=idempotency_key)

    async def request_approval(self, approval_id: str, **details: Any) -> Published:
        """Publish ``approval.request`` with ``{"approval_id": approval_id, **details}``: it opens the approval."""
        self.listen()
        return await self.publish("approval.request", {"approval_id": approval_id, **details})

    async def wait_approval(self, approval_id: str, *, timeout: float | None = None) -> str | None:
        """The decision on ``approval_id``: ``"approve"`` or ``"deny"``; None when the run is cancelled
        first. An answer that came before the call counts. ``timeout`` (seconds): ``TimeoutError``
        after that long without an answer (the approval stays open)."""
        self.listen()
        future = self._approval(approval_id)
        cancelled = asyncio.ensure_future(self._cancelled.wait())
        try:
            done, _ = await asyncio.wait({future, cancelled}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
        if future in done:
            return future.result()
        if cancelled in done or self._cancelled.is_set():
            return None
        raise TimeoutError(f"no answer to approval {approval_id!r} within {timeout:g} s")

    # -- events

    async def send(self, event: str, data: Any, *, idempotency_key: str | None = None) -> asyncio.Future[int]:
        return await self.publisher.send(self.session, event, data, idempotency_key=idempotency_key)

    async def token(self, text: str, *, event: str = "token") -> asyncio.Future[int]:
        return await self.publisher.token(self.session, text, event=event)

    async def publish(self, event: str, data: Any, *, idempotency_key: str | None = None) -> Published:
        return await self.publisher.publish(self.session, event, data, idempotency_key=idempotency_key)

    async def message(self, tokens: Iterable[str] | AsyncIterable[str], *, message: str | None = None,
                      type: str | None = None, metadata: Any = None) -> str:
        return await self.publisher.message(self.session, tokens, message=message, type=type, metadata=metadata)

    async def replace_message(self, message: str, text: str, *, status: str = "finished",
                              metadata: Any = None) -> Published:
        return await self.publisher.replace_message(self.session, message, text, status=status, metadata=metadata)

    async def flush(self) -> list[int]:
        return await self.publisher.flush(self.session)

    async def complete(self, result: Any = None, *, status: str = "completed", error: Any = None) -> dict[str, Any]:
        answer = await self.publisher.complete(self.session, result, status=status, error=error)
        self.finished = True
        return answer

    async def fail(self, error: BaseException | str | Mapping[str, Any], code: str | None = None) -> dict[str, Any]:
        answer = await self.publisher.fail(self.session, error, code)
        self.finished = True
        return answer

    async def watchers(self) -> Watchers:
        return await self.publisher.watchers(self.session)

    async def get_state(self) -> State:
        return await self.publisher.get_state(self.session)

    async def put_state(self, state: Mapping[str, Any], *, if_match: int | None = None) -> State:
        return await self.publisher.put_state(self.session, state, if_match=if_match)

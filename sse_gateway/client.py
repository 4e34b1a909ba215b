"""A Python client of sse-gateway: ``Publisher`` for agents, ``Subscriber`` for readers.

``Publisher`` (async; ``SyncPublisher`` is its blocking twin) appends events with stable
idempotency keys, batches tokens, retries what can be retried and runs a session as a block::

    async with Publisher() as pub, pub.run("run1") as run:
        for piece in ("Hel", "lo"):
            await run.token(piece)
        run.result = {"text": "Hello"}

``Subscriber`` reads a session with exact resume::

    async for event in Subscriber("run1"):
        print(event.id, event.event, event.data)

Both take the gateway's base URL and a credential, or read ``SSE_GATEWAY_URL`` and
``SSE_GATEWAY_PUBLISH_KEY`` when they are not given. See docs/python.md.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import httpx

__all__ = ["DEFAULT_URL", "ENV_KEY", "ENV_URL", "Event", "GatewayError", "GatewayUnreachable", "Published",
           "Publisher", "Retry", "RetryNotice", "Run", "SessionInfo", "State", "Subscriber", "SyncPublisher",
           "SyncRun", "Token", "Watchers", "failure_result"]

ENV_URL = "SSE_GATEWAY_URL"
ENV_KEY = "SSE_GATEWAY_PUBLISH_KEY"  # the variable `sse-gateway serve` reads its keys from
DEFAULT_URL = "http://127.0.0.1:8000"

#: Answers worth trying again: the request may succeed later. Other 4xx are the caller's mistake.
RETRY_STATUSES = frozenset({408, 429, 507} | set(range(500, 600)))

_EVENT_TYPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_SESSION_ID = re.compile(r"[A-Za-z0-9_.~-]{1,128}")
_NEWLINE = re.compile(r"\r\n|\r|\n")

T = TypeVar("T")


# -- configuration -------------------------------------------------------------------------------


def resolve_url(url: str | None) -> str:
    """``url``, else ``$SSE_GATEWAY_URL``, else ``http://127.0.0.1:8000``; without a trailing slash."""
    url = (url or os.environ.get(ENV_URL) or DEFAULT_URL).strip().rstrip("/")
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"the gateway URL must be http://HOST[:PORT] or https://..., not {url!r}")
    return url


def resolve_key(key: str | None) -> str | None:
    """``key``, else the first of ``$SSE_GATEWAY_PUBLISH_KEY`` (which ``serve`` reads as comma-separated keys)."""
    if key is not None:
        return key or None
    for part in os.environ.get(ENV_KEY, "").split(","):
        if part.strip():
            return part.strip()
    return None


def _check_session(session: str) -> str:
    if not isinstance(session, str) or not _SESSION_ID.fullmatch(session) or session in (".", ".."):
        raise ValueError(f"invalid session id {session!r}: 1 to 128 of A-Z a-z 0-9 _ . ~ -")
    return session


def _check_event_type(event: str) -> str:
    if not isinstance(event, str) or not _EVENT_TYPE.fullmatch(event):
        raise ValueError(f"invalid event type {event!r}: 1 to 64 of A-Z a-z 0-9 _ . : -")
    if event.startswith("gateway."):
        raise ValueError(f"event types beginning with 'gateway.' belong to the gateway: {event!r}")
    return event


def _dumps(value: Any) -> bytes:
    """Strict JSON, as the gateway reads it: integers of any size, no NaN or Infinity."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


# -- errors ----------------------------------------------------------------------------------------


class GatewayError(Exception):
    """The gateway refused a request (``status``, ``code`` and ``message`` of its JSON error).

    ``retry_after`` is the answer's ``Retry-After`` in seconds, if it had one; ``body`` the whole
    error body (some carry more: ``ids``, ``version``, ``epoch``).
    """

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None,
                 body: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.body = body

    @classmethod
    def from_response(cls, response: httpx.Response) -> GatewayError:
        retry_after = _retry_after(response.headers.get("retry-after"))
        try:
            body = response.json()
            error = body["error"]
            return cls(response.status_code, str(error["code"]), str(error.get("message", "")),
                       retry_after=retry_after, body=body)
        except (ValueError, KeyError, TypeError):
            text = response.text.strip().replace("\n", " ")[:200]
            return cls(response.status_code, f"http_{response.status_code}",
                       text or response.reason_phrase or "no answer body", retry_after=retry_after)


class GatewayUnreachable(GatewayError):
    """No answer from the gateway (refused, reset, timed out) for as long as the client would try.

    ``status`` is 0 and ``code`` is ``"unreachable"``; the message names the URL and the last cause.
    """

    def __init__(self, message: str) -> None:
        super().__init__(0, "unreachable", message)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- retries ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    """How long to keep trying a request the gateway may answer later.

    A request is tried at most ``attempts`` times and never after ``timeout`` seconds from the first
    try. Between tries the client waits ``uniform(0, min(cap, base * 2**n))`` (exponential backoff
    with full jitter), and at least the answer's ``Retry-After`` when it gives one (plus that
    jitter, so that clients told the same ``Retry-After`` do not return together). The last wait is
    cut short to try once more when ``timeout`` ends; a ``Retry-After`` beyond it is not waited
    for: the gateway's error is raised at once.
    """

    attempts: int = 12
    timeout: float = 60.0
    base: float = 0.25
    cap: float = 10.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        jitter = random.uniform(0, min(self.cap, self.base * 2 ** min(attempt, 30)))
        return jitter if retry_after is None else retry_after + jitter


#: No retries at all: the first failure is raised.
NO_RETRY = Retry(attempts=1, timeout=0)


@dataclass(frozen=True)
class RetryNotice:
    """Given to ``on_retry`` before each wait: what failed, and how long the client now waits."""

    method: str
    url: str
    attempt: int  # 1 after the first failure
    delay: float
    error: GatewayError


async def _with_retries(send: Callable[[], Awaitable[httpx.Response]], *, method: str, url: str, base_url: str,
                        retry: Retry, on_retry: Callable[[RetryNotice], None] | None) -> httpx.Response:
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            response = await send()
        except httpx.UnsupportedProtocol as exc:
            raise GatewayError(0, "invalid_url", f"{base_url}: {exc}") from exc
        except httpx.TransportError as exc:
            error: GatewayError = GatewayUnreachable(f"cannot reach the gateway at {base_url} ({_describe(exc)})")
            error.__cause__ = exc
        else:
            if response.status_code < 400:
                return response
            error = GatewayError.from_response(response)
            if response.status_code not in RETRY_STATUSES:
                raise error
        attempt += 1
        delay = retry.delay(attempt - 1, error.retry_after)
        left = retry.timeout - (time.monotonic() - start)
        if attempt >= retry.attempts or left <= 0 or (error.retry_after or 0) > left:
            raise error
        delay = min(delay, left)  # one last try when the time is up
        if on_retry is not None:
            on_retry(RetryNotice(method, url, attempt, delay, error))
        await asyncio.sleep(delay)


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


def failure_result(error: BaseException | str | Mapping[str, Any], code: str | None = None) -> dict[str, Any]:
    """The result a failed run completes with: ``{"error": {"code": ..., "message": ...}}``.

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
    return {"error": body}


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

    # -- plumbing

    def next_key(self) -> str:
        """A fresh idempotency key of this publisher."""
        self._counter += 1
        return f"{self.key_prefix}-{self._counter}"

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        headers.update(extra or {})
        return headers

    async def request(self, method: str, path: str, *, json_body: Any = None, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None,
                      retry: Retry | None = None) -> httpx.Response:
        """One API request, with this publisher's credentials and retries; a refusal raises ``GatewayError``."""
        hdrs = self._headers(headers)
        if json_body is not None:
            content = _dumps(json_body)
            hdrs.setdefault("Content-Type", "application/json")
        url = self.url + path

        def send() -> Awaitable[httpx.Response]:
            return self._http.request(method, url, content=content, headers=hdrs, params=params)

        return await _with_retries(send, method=method, url=url, base_url=self.url, retry=retry or self.retry,
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

    async def create(self, session: str | None = None, *, metadata: Any = None,
                     ttl_seconds: int | None = None) -> SessionInfo:
        """Create ``session``, or take it up if it exists (``created`` False).

        Without an id, one is made here (``s_`` and 16 random characters), so that a retry after a
        lost ``201`` finds the session it created. An existing id is answered ``200`` by gateways
        that reuse a session created with the same settings, ``409 session_exists`` by older ones
        (and for other settings): both are taken as "reuse"; the session keeps its own metadata.
        """
        session = _check_session(session) if session is not None else "s_" + secrets.token_urlsafe(12)
        body: dict[str, Any] = {"id": session}
        if metadata is not None:
            body["metadata"] = metadata
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        try:
            response = await self.request("POST", "/v1/sessions", json_body=body)
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
            return SessionInfo(session, row.get("epoch"), token.stream_url if token else _stream_path(session),
                               token.token if token else None, token.expires_at if token else None, False)
        data = response.json()
        return SessionInfo(data["id"], data.get("epoch"), data.get("stream_url") or _stream_path(session),
                           data.get("subscribe_token"), data.get("token_expires_at"), response.status_code == 201)

    async def get(self, session: str) -> dict[str, Any]:
        """The session as ``GET /v1/sessions/{id}`` gives it (status, last_id, subscribers, result...)."""
        return (await self.request("GET", _session_path(session))).json()

    async def delete(self, session: str) -> bool:
        """Delete the session; False if there was none."""
        try:
            await self.request("DELETE", _session_path(session))
        except GatewayError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def complete(self, session: str, result: Any = None) -> dict[str, Any]:
        """Flush, then complete the session with ``result`` (``gateway.end``); answers the session.

        Completing again with the same result is a no-op, so a retry is safe.
        """
        await self.flush(session)
        body = {} if result is None else {"result": result}
        return (await self.request("POST", _session_path(session) + "/complete", json_body=body)).json()

    async def fail(self, session: str, error: BaseException | str | Mapping[str, Any],
                   code: str | None = None) -> dict[str, Any]:
        """Complete the session as failed: its result is ``failure_result(error, code)``."""
        return await self.complete(session, failure_result(error, code))

    async def watchers(self, session: str) -> Watchers:
        """Is someone watching? The session's ``subscribers`` and ``last_seen_at``."""
        row = await self.get(session)
        return Watchers(int(row.get("subscribers") or 0), row.get("last_seen_at"))

    async def get_state(self, session: str) -> State:
        return _state((await self.request("GET", _session_path(session) + "/state")).json())

    async def put_state(self, session: str, state: Mapping[str, Any], *, if_match: int | None = None) -> State:
        """Flush, then replace the state document (only if its version is still ``if_match``, when given: else 412)."""
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else None
        await self.flush(session)  # the state's as_of then covers every event sent before it
        response = await self.request("PUT", _session_path(session) + "/state", json_body=dict(state),
                                      headers=headers)
        return _state(response.json())

    async def mint_token(self, session: str, *, ttl_seconds: int | None = None) -> Token:
        """A subscribe token for one session (the gateway needs ``--token-secret``)."""
        body = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
        data = (await self.request("POST", _session_path(session) + "/tokens", json_body=body)).json()
        return Token(data["token"], data["expires_at"], data["stream_url"])

    # -- events

    async def publish(self, session: str, event: str, data: Any, *, idempotency_key: str | None = None) -> Published:
        """Append one event now (after what is buffered for the session); answers its id."""
        item = {"event": _check_event_type(event), "data": data, "idempotency_key": idempotency_key or self.next_key()}
        body = _dumps(item)
        await self.flush(session)
        response = await self.request("POST", _session_path(session) + "/events", content=body,
                                      headers={"Content-Type": "application/json"})
        return _published(response)

    async def publish_text(self, session: str, text: str, *, event: str = "message",
                           idempotency_key: str | None = None) -> Published:
        """Append one text event now (``text/plain``: its data is the text, not JSON)."""
        headers = {"Content-Type": "text/plain; charset=utf-8", "Idempotency-Key": idempotency_key or self.next_key()}
        body = text.encode()
        await self.flush(session)
        response = await self.request("POST", _session_path(session) + "/events", content=body, headers=headers,
                                      params={"event": _check_event_type(event)})
        return _published(response)

    async def send(self, session: str, event: str, data: Any, *,
                   idempotency_key: str | None = None) -> asyncio.Future[int]:
        """Buffer one event; it goes in the session's next batch. Answers a future of its id.

        Raises (without taking the event) the error of an earlier batch of this session that failed.
        Waits for a flush when ``max_buffer`` events are waiting.
        """
        _check_session(session)
        body = _dumps({"event": _check_event_type(event), "data": data,
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
                response = await self.request("POST", _session_path(session) + "/events", content=body,
                                              headers={"Content-Type": "application/json"})
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

    def run(self, session: str | None = None, *, metadata: Any = None, ttl_seconds: int | None = None) -> Run:
        """``async with pub.run(id) as run:`` creates or takes up the session, completes or fails it at the end."""
        return Run(self, session, metadata=metadata, ttl_seconds=ttl_seconds)


def _session_path(session: str) -> str:
    return f"/v1/sessions/{_check_session(session)}"


def _stream_path(session: str) -> str:
    return _session_path(session) + "/stream"


def _published(response: httpx.Response) -> Published:
    data = response.json()
    ids = [int(i) for i in data["ids"]] if "ids" in data else [int(data["id"])]
    return Published(ids, int(data["last_id"]), response.status_code == 201, data.get("epoch"), data)


def _state(data: dict[str, Any]) -> State:
    return State(int(data["version"]), data.get("state"), data.get("as_of"))


class Run:
    """One agent run in one session; made by ``Publisher.run``, used as ``async with``.

    On entry the session is created or taken up (``info``); a completed one raises
    ``GatewayError(409, "session_completed")``. On a normal exit, buffered events are
    flushed and the session is completed with ``result`` (unless ``complete`` or ``fail`` was called
    already). On an exception, what is buffered is flushed, the session is completed with
    ``failure_result(exc)``, and the exception goes on. A cancelled task or a ``KeyboardInterrupt``
    only flushes (for at most 5 s) and leaves the session open, for a restarted agent to take up.
    """

    def __init__(self, publisher: Publisher, session: str | None, *, metadata: Any = None,
                 ttl_seconds: int | None = None) -> None:
        self.publisher = publisher
        self._requested = session
        self._metadata = metadata
        self._ttl = ttl_seconds
        self.info: SessionInfo | None = None
        self.result: Any = None
        self.finished = False

    @property
    def session(self) -> str:
        if self.info is None:
            raise RuntimeError("the run has not started: use it as `async with pub.run(...) as run`")
        return self.info.id

    async def __aenter__(self) -> Run:
        self.info = await self.publisher.create(self._requested, metadata=self._metadata, ttl_seconds=self._ttl)
        if not self.info.created and (await self.publisher.get(self.info.id)).get("status") == "completed":
            raise GatewayError(409, "session_completed", f"session {self.info.id!r} is completed: its run is over")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        if exc is None:
            if not self.finished:
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

    async def send(self, event: str, data: Any, *, idempotency_key: str | None = None) -> asyncio.Future[int]:
        return await self.publisher.send(self.session, event, data, idempotency_key=idempotency_key)

    async def token(self, text: str, *, event: str = "token") -> asyncio.Future[int]:
        return await self.publisher.token(self.session, text, event=event)

    async def publish(self, event: str, data: Any, *, idempotency_key: str | None = None) -> Published:
        return await self.publisher.publish(self.session, event, data, idempotency_key=idempotency_key)

    async def flush(self) -> list[int]:
        return await self.publisher.flush(self.session)

    async def complete(self, result: Any = None) -> dict[str, Any]:
        answer = await self.publisher.complete(self.session, result)
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

    def create(self, session: str | None = None, *, metadata: Any = None,
               ttl_seconds: int | None = None) -> SessionInfo:
        return self._call(self.publisher.create(session, metadata=metadata, ttl_seconds=ttl_seconds))

    def get(self, session: str) -> dict[str, Any]:
        return self._call(self.publisher.get(session))

    def delete(self, session: str) -> bool:
        return self._call(self.publisher.delete(session))

    def complete(self, session: str, result: Any = None) -> dict[str, Any]:
        return self._call(self.publisher.complete(session, result))

    def fail(self, session: str, error: BaseException | str | Mapping[str, Any],
             code: str | None = None) -> dict[str, Any]:
        return self._call(self.publisher.fail(session, error, code))

    def watchers(self, session: str) -> Watchers:
        return self._call(self.publisher.watchers(session))

    def get_state(self, session: str) -> State:
        return self._call(self.publisher.get_state(session))

    def put_state(self, session: str, state: Mapping[str, Any], *, if_match: int | None = None) -> State:
        return self._call(self.publisher.put_state(session, state, if_match=if_match))

    def mint_token(self, session: str, *, ttl_seconds: int | None = None) -> Token:
        return self._call(self.publisher.mint_token(session, ttl_seconds=ttl_seconds))

    def publish(self, session: str, event: str, data: Any, *, idempotency_key: str | None = None) -> Published:
        return self._call(self.publisher.publish(session, event, data, idempotency_key=idempotency_key))

    def publish_text(self, session: str, text: str, *, event: str = "message",
                     idempotency_key: str | None = None) -> Published:
        return self._call(self.publisher.publish_text(session, text, event=event, idempotency_key=idempotency_key))

    def send(self, session: str, event: str, data: Any, *, idempotency_key: str | None = None) -> None:
        self._call(self.publisher.send(session, event, data, idempotency_key=idempotency_key))

    def token(self, session: str, text: str, *, event: str = "token") -> None:
        self._call(self.publisher.token(session, text, event=event))

    def flush(self, session: str | None = None) -> list[int]:
        return self._call(self.publisher.flush(session))

    def run(self, session: str | None = None, *, metadata: Any = None, ttl_seconds: int | None = None) -> SyncRun:
        return SyncRun(self, self.publisher.run(session, metadata=metadata, ttl_seconds=ttl_seconds))


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

    def publish(self, event: str, data: Any, *, idempotency_key: str | None = None) -> Published:
        return self._owner._call(self.run.publish(event, data, idempotency_key=idempotency_key))

    def flush(self) -> list[int]:
        return self._owner._call(self.run.flush())

    def complete(self, result: Any = None) -> dict[str, Any]:
        return self._owner._call(self.run.complete(result))

    def fail(self, error: BaseException | str | Mapping[str, Any], code: str | None = None) -> dict[str, Any]:
        return self._owner._call(self.run.fail(error, code))

    def watchers(self) -> Watchers:
        return self._owner._call(self.run.watchers())

    def get_state(self) -> State:
        return self._owner._call(self.run.get_state())

    def put_state(self, state: Mapping[str, Any], *, if_match: int | None = None) -> State:
        return self._owner._call(self.run.put_state(state, if_match=if_match))


# -- subscriber ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event of the stream.

    ``id`` and ``cursor`` (``ID:EPOCH``) are None for ``gateway.gap`` and ``gateway.reset``, which are
    notices, not log entries. ``data`` is the data parsed as JSON when it is JSON, else the text;
    ``text`` is the data as it came.
    """

    id: int | None
    event: str
    data: Any
    cursor: str | None
    text: str

    @property
    def is_gap(self) -> bool:
        return self.event == "gateway.gap"

    @property
    def is_reset(self) -> bool:
        return self.event == "gateway.reset"

    @property
    def is_end(self) -> bool:
        return self.event == "gateway.end"


@dataclass(frozen=True)
class Reconnect:
    """Given to ``on_reconnect`` before each wait: why the stream is opened again, and after what."""

    reason: str  # one line, naming the URL
    cursor: str | None
    delay: float
    error: GatewayError | None  # None when the stream just ended (a draining gateway)


class Subscriber:
    """The events of one session, in order, resuming exactly after every drop.

    ``async for event in Subscriber("run1"):`` yields every event after ``cursor`` (a ``Last-Event-ID``,
    ``ID:EPOCH`` or ``ID``) or from ``from_`` (``"earliest"``, ``"latest"`` or a cursor), then the live
    ones. After a dropped connection it reconnects with ``Last-Event-ID`` set to the last cursor it
    yielded, with backoff (full jitter, starting from the stream's ``retry:`` hint). ``gateway.gap``
    and ``gateway.reset`` are yielded too (a reset also forgets the cursor: the stream starts over).
    The iteration ends after ``gateway.end``, on a ``204``, or, with ``live=False``, when what
    existed has been read.

    ``key`` is a publisher key or a subscribe token (default ``$SSE_GATEWAY_PUBLISH_KEY``).
    ``400``, ``401``, ``403`` and ``404`` raise ``GatewayError`` at once. A gateway that cannot be
    reached, or answers only ``429``/``5xx``, for ``give_up_after`` seconds (counted from the first
    failure since the last good connection) raises ``GatewayUnreachable`` (or the last refusal).
    ``read_timeout``: a connection silent for this long (heartbeats included) counts as dropped.
    A subscriber is iterated once (it closes its HTTP client at the end, unless ``client`` was given).
    """

    def __init__(self, session: str, *, url: str | None = None, key: str | None = None, cursor: str | None = None,
                 from_: str | None = None, live: bool = True, give_up_after: float = 60.0,
                 read_timeout: float = 60.0, backoff_cap: float = 10.0, parse_json: bool = True,
                 client: httpx.AsyncClient | None = None,
                 on_reconnect: Callable[[Reconnect], None] | None = None) -> None:
        if client is not None and url is None and str(client.base_url):
            url = str(client.base_url)
        self.session = _check_session(session)
        self.url = resolve_url(url)
        self.stream_url = self.url + _stream_path(session)
        self.key = resolve_key(key)
        self.cursor: str | None = cursor.strip() if cursor else None
        self.from_ = from_
        self.live = live
        self.give_up_after = give_up_after
        self.read_timeout = read_timeout
        self.backoff_cap = backoff_cap
        self.parse_json = parse_json
        self.on_reconnect = on_reconnect
        self.connects = 0
        self.ended = False
        self._retry_hint = 1.0
        self._own_client = client is None
        self._http = client or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=read_timeout))

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def __aenter__(self) -> Subscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_client:
            await self._http.aclose()

    async def events(self) -> AsyncIterator[Event]:
        try:
            async for event in self._events():
                yield event
        finally:
            if self._own_client:
                await self._http.aclose()

    async def _events(self) -> AsyncIterator[Event]:
        if self.cursor is None and self.from_ == "latest":
            await self._resolve_latest()
        failing_since: float | None = None
        attempt = 0
        while True:
            headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
            headers["Accept"] = "text/event-stream"
            params: dict[str, str] = {} if self.live else {"live": "false"}
            if self.cursor is not None:
                headers["Last-Event-ID"] = self.cursor
            elif self.from_ is not None:
                params["from"] = self.from_
            error: GatewayError | None = None
            try:
                async with self._http.stream("GET", self.stream_url, headers=headers, params=params) as response:
                    if response.status_code == 204:
                        self.ended = True
                        return
                    if response.status_code != 200:
                        await response.aread()
                        error = GatewayError.from_response(response)
                        if response.status_code not in RETRY_STATUSES:
                            raise error
                    else:
                        self.connects += 1
                        failing_since, attempt = None, 0
                        async for event in self._read(response):
                            yield event
                            if event.is_end:
                                self.ended = True
                                return
                        if not self.live:
                            self.ended = True
                            return
            except httpx.UnsupportedProtocol as exc:
                raise GatewayError(0, "invalid_url", f"{self.url}: {exc}") from exc
            except httpx.TransportError as exc:
                error = GatewayUnreachable(f"connection lost to {self.stream_url} ({_describe(exc)})"
                                           if self.connects and failing_since is None else
                                           f"cannot reach the gateway at {self.url} ({_describe(exc)})")
                error.__cause__ = exc
            now = time.monotonic()
            if error is None:  # the response ended by itself: a draining gateway; take it up again
                reason = f"the stream of {self.stream_url} ended"
            else:
                failing_since = failing_since if failing_since is not None else now
                reason = str(error)
            delay = random.uniform(0, min(self.backoff_cap, self._retry_hint * 2 ** min(attempt, 30)))
            if error is not None and error.retry_after is not None:
                delay += error.retry_after
            left = self.give_up_after - (now - failing_since) if failing_since is not None else float("inf")
            if error is not None and (left <= 0 or (error.retry_after or 0) > left):
                if isinstance(error, GatewayUnreachable):
                    cause = _describe(error.__cause__) if error.__cause__ else reason
                    raise GatewayUnreachable(f"cannot reach the gateway at {self.url} ({cause}); gave up "
                                             f"after {self.give_up_after:g} s of retries") from error.__cause__
                raise error
            delay = min(delay, left)  # one last try when the time is up
            attempt += 1
            if self.on_reconnect is not None:
                self.on_reconnect(Reconnect(reason, self.cursor, delay, error))
            await asyncio.sleep(delay)

    async def _resolve_latest(self) -> None:
        """``from=latest`` pinned to a cursor, so that a reconnect before the first event misses nothing."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}

        def send() -> Awaitable[httpx.Response]:
            return self._http.get(self.url + _session_path(self.session), headers=headers)

        retry = Retry(attempts=1_000_000, timeout=self.give_up_after, base=self._retry_hint, cap=self.backoff_cap)
        row = (await _with_retries(send, method="GET", url=self.url + _session_path(self.session),
                                   base_url=self.url, retry=retry, on_retry=None)).json()
        self.cursor = f"{row['last_id']}:{row['epoch']}"

    async def _read(self, response: httpx.Response) -> AsyncIterator[Event]:
        event, data, has_data, event_id = "", [], False, None
        async for line in _lines(response):
            if line == "":
                if has_data:
                    yield self._event(event or "message", "\n".join(data), event_id)
                event, data, has_data, event_id = "", [], False, None
                continue
            if line.startswith(":"):
                continue
            name, colon, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data.append(value)
                has_data = True
            elif name == "event":
                event = value
            elif name == "id" and "\0" not in value:
                event_id = value
            elif name == "retry" and value.isdigit():
                self._retry_hint = max(0.05, int(value) / 1000)

    def _event(self, kind: str, text: str, cursor: str | None) -> Event:
        data: Any = text
        if self.parse_json:
            try:
                data = json.loads(text)
            except ValueError:
                data = text
        event_id: int | None = None
        if cursor:
            self.cursor = cursor
            try:
                event_id = int(cursor.split(":", 1)[0])
            except ValueError:
                event_id = None
        elif kind == "gateway.reset":
            self.cursor = None  # the session's log started over: so do we
        return Event(event_id, kind, data, cursor or None, text)


async def _lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of an SSE body, ended by CRLF, LF or CR (a CR at the end of a chunk may begin a CRLF)."""
    rest = ""
    skip_lf = False
    async for chunk in response.aiter_text():
        if not chunk:
            continue
        if skip_lf:
            skip_lf = False
            if chunk.startswith("\n"):
                chunk = chunk[1:]
        rest += chunk
        if not rest:
            continue
        ends_cr = rest.endswith("\r")
        parts = _NEWLINE.split(rest[:-1] if ends_cr else rest)
        rest = parts.pop()
        for line in parts:
            yield line
        if ends_cr:
            yield rest
            rest = ""
            skip_lf = True

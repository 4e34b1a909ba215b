"""Talking to the gateway: where it is, which credential, the errors it answers, and retries."""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from .. import rules

T = TypeVar("T")

ENV_URL = "SSE_GATEWAY_URL"
ENV_KEY = "SSE_GATEWAY_PUBLISH_KEY"  # the variable `sse-gateway serve` reads its keys from
DEFAULT_URL = "http://127.0.0.1:8000"

#: Answers worth trying again: the request may succeed later. Other 4xx are the caller's mistake.
RETRY_STATUSES = frozenset({408, 429, 507} | set(range(500, 600)))

_EVENT_TYPE = re.compile(rules.EVENT_TYPE)
_SESSION_ID = re.compile(rules.SESSION_ID)  # the gateway's own rules (a module without server imports)



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


def check_session(session: str) -> str:
    if not isinstance(session, str) or not _SESSION_ID.fullmatch(session):
        raise ValueError(f"invalid session id {session!r}: 1 to 128 of A-Z a-z 0-9 _ . ~ -")
    return session


def check_event_type(event: str) -> str:
    if not isinstance(event, str) or not _EVENT_TYPE.fullmatch(event):
        raise ValueError(f"invalid event type {event!r}: 1 to 64 of A-Z a-z 0-9 _ . : -")
    if event.startswith(rules.RESERVED_PREFIX):
        raise ValueError(f"event types beginning with 'gateway.' belong to the gateway: {event!r}")
    return event


def dumps(value: Any) -> bytes:
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


def describe(exc: BaseException) -> str:
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


async def with_retries(send: Callable[[], Awaitable[httpx.Response]], *, method: str, url: str, base_url: str,
                        retry: Retry, on_retry: Callable[[RetryNotice], None] | None) -> httpx.Response:
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            response = await send()
        except httpx.UnsupportedProtocol as exc:
            raise GatewayError(0, "invalid_url", f"{base_url}: {exc}") from exc
        except httpx.TransportError as exc:
            error: GatewayError = GatewayUnreachable(f"cannot reach the gateway at {base_url} ({describe(exc)})")
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

def session_path(session: str) -> str:
    return f"/v1/sessions/{check_session(session)}"


def stream_path(session: str) -> str:
    return session_path(session) + "/stream"

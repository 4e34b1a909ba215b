"""``Subscriber``: a session's events, read with exact resume across dropped connections."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from .http import (
    RETRY_STATUSES,
    GatewayError,
    GatewayUnreachable,
    Retry,
    check_session,
    describe,
    resolve_key,
    resolve_url,
    session_path,
    stream_path,
    with_retries,
)

_NEWLINE = re.compile(r"\r\n|\r|\n")


# -- subscriber ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event of the stream.

    ``id`` and ``cursor`` (``ID:EPOCH``, or ``ID/HOLD:EPOCH`` while a replay holds messages back) are None
    for ``gateway.gap`` and ``gateway.reset``, which are notices, not log entries. ``data`` is the data parsed as JSON when it is JSON, else the text;
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
        self.session = check_session(session)
        self.url = resolve_url(url)
        self.stream_url = self.url + stream_path(session)
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
                error = GatewayUnreachable(f"connection lost to {self.stream_url} ({describe(exc)})"
                                           if self.connects and failing_since is None else
                                           f"cannot reach the gateway at {self.url} ({describe(exc)})")
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
                    cause = describe(error.__cause__) if error.__cause__ else reason
                    raise GatewayUnreachable(f"cannot reach the gateway at {self.url} ({cause}); gave up "
                                             f"after {self.give_up_after:g} s of retries") from error.__cause__
                raise error
            delay = min(delay, left)  # one last try when the time is up
            attempt += 1
            if self.on_reconnect is not None:
                self.on_reconnect(Reconnect(reason, self.cursor, delay, error))
            await asyncio.sleep(delay)

    #: the field of the session's row that ``from=latest`` starts after
    _latest_field = "last_id"

    async def _resolve_latest(self) -> None:
        """``from=latest`` pinned to a cursor, so that a reconnect before the first event misses nothing."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}

        def send() -> Awaitable[httpx.Response]:
            return self._http.get(self.url + session_path(self.session), headers=headers)

        retry = Retry(attempts=1_000_000, timeout=self.give_up_after, base=self._retry_hint, cap=self.backoff_cap)
        row = (await with_retries(send, method="GET", url=self.url + session_path(self.session),
                                   base_url=self.url, retry=retry, on_retry=None)).json()
        self.cursor = f"{row.get(self._latest_field, 0)}:{row['epoch']}"

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
                event_id = int(cursor.split(":", 1)[0].split("/", 1)[0])  # ID/HOLD: a replay's (messages)
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

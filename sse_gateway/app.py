"""The HTTP layer: routes of ../shared/API.md over the event log, hub and auth.

Bodies are parsed with orjson by hand rather than through Pydantic models:
the publish path runs for every event, and the errors must be the
gateway's own JSON. The OpenAPI description still documents every body
(``openapi_extra``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, Response
from starlette.routing import Match
from starlette.staticfiles import StaticFiles

from . import __version__, cors, demo, limits, openapi
from .auth import MAX_TOKEN_TTL, Auth, check_life
from .config import Settings
from .errors import (BadRequest, Conflict, GatewayError, NotConfigured, NotFound, RequestTimeout, TooLarge,
                     Unavailable, UnsupportedMedia, error_body)
from .hub import Hub
from .log import make_log
from .log.base import NO_RESULT, EventLog
from .metrics import RequestTimer, Stats, make_registry, measure_loop_lag, render
from .models import NewEvent, Session, check_event_type, check_session_id, dump_json, now_ms, rfc3339
from .sse import encode_retry
from .stream import EventStream, parse_cursor, start_position

log = logging.getLogger("sse_gateway")

def _static_dir() -> Path:
    """The demo page and helper: ``sse_gateway/static`` in an installed wheel, ``static/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "static", here.parent / "static"):
        if (candidate / "index.html").is_file():
            return candidate
    return candidate


STATIC_DIR = _static_dir()
MAX_KEY = 256


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dump_json(body).encode(), status, headers, media_type="application/json")


def session_json(row: Session, hub: Hub, presence: tuple[int, int | None] | None = None) -> dict:
    """``presence`` (streams, last detach in ms) if the log counts them across nodes, else the hub's."""
    subscribers, last_seen = presence or hub.presence(row.id)
    return {
        "id": row.id, "epoch": row.epoch, "status": row.status,
        "created_at": rfc3339(row.created_at), "completed_at": rfc3339(row.completed_at),
        "earliest_id": row.earliest_id, "last_id": row.last_id, "metadata": row.metadata,
        "subscribers": subscribers, "last_seen_at": rfc3339(last_seen),
        "acked_id": row.acked_id, "state_version": row.state_version,
        "ttl_seconds": row.ttl_seconds, "result": row.result,
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes, arrived within ``--body-timeout`` (see limits.py)."""
    return await limits.read_body(request, limit, request.app.state.gw.settings.body_timeout)


_EVENT_FIELDS = frozenset({"event", "data", "idempotency_key"})
_VALID_TYPES: set[str] = set()  # event types already found valid (bounded)
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19  # after _DIGITS_TO_ZERO: a run of 19 digits, an integer orjson may turn into a float


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is infinity when parsed as double")
    return value


def parse_json(body: bytes) -> Any:
    """orjson, except for bodies with integers beyond 64 bits, which the standard library keeps exact."""
    try:
        if _LONG_DIGITS in body.translate(_DIGITS_TO_ZERO):  # a C pass; a regex search was 5x slower per event
            # Decoded first, as orjson does: strict UTF-8, no byte order mark, no UTF-16 guessing.
            value = json.loads(body.decode("utf-8"), parse_constant=_no_constants, parse_float=_finite)
            dump_json(value).encode()  # lone surrogates (which orjson refuses) cannot be stored or sent
            return value
        return orjson.loads(body)
    except (ValueError, RecursionError) as exc:  # orjson.JSONDecodeError and UnicodeError are ValueErrors
        raise BadRequest(f"body is not valid JSON: {exc}", "invalid_json") from None


def content_type(request: Request) -> tuple[str, str]:
    raw = request.headers.get("content-type", "")
    kind, _, params = raw.partition(";")
    charset = ""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return kind.strip().lower(), charset


def json_int(value: Any) -> int | None:
    """An integer as JSON Schema counts them (``3`` and ``3.0`` alike); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY or not key.isprintable() or not key.isascii():
        raise BadRequest(f"idempotency key must be 1-{MAX_KEY} printable ASCII characters", "invalid_idempotency_key")
    return key


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19):
        raise BadRequest(f"{name} must be an integer", f"invalid_{name}")
    value = int(raw)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}", f"invalid_{name}")
    return value


class Gateway:
    """Everything a request needs, built in the lifespan (never at import)."""

    def __init__(self, settings: Settings, log_: EventLog) -> None:
        self.settings = settings
        self.log = log_
        self.stats = Stats()
        self.streams = limits.StreamSlots(settings.max_streams, settings.max_streams_per_session)
        self.hub = Hub(log_, self.stats, coalesce=self.settings.coalesce_ms / 1000, slots=self.streams)
        self.auth = Auth(settings.publish_keys, settings.token_secret, settings.token_ttl)
        self.registry = make_registry(self)
        self.draining = False
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        log_.add_observer(self.stats)

    def spawn(self, coro) -> None:
        """Run ``coro`` in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.log.open()
        self._tasks = [asyncio.create_task(self._sweep(), name="retention"),
                       asyncio.create_task(self.hub.cut_slow_clients(self.settings.send_timeout),
                                           name="slow-clients"),
                       asyncio.create_task(measure_loop_lag(self.stats), name="loop-lag")]

    def begin_drain(self, then) -> None:
        """Refuse new streams, close open ones spread over the drain window, then call ``then``."""
        self.draining = True
        window = self.settings.drain_seconds
        self.hub.begin_drain(window * 0.8)

        async def wait_for_streams() -> None:
            deadline = self.loop.time() + window
            while self.hub.channels and self.loop.time() < deadline:
                await asyncio.sleep(0.05)
            then()

        self.spawn(wait_for_streams())

    async def stop(self) -> None:
        self.hub.shutdown()
        pending = [*self._tasks, *self._background]  # background work must not outlive the log
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.log.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                removed = await self.log.sweep(now_ms())
                if removed:
                    log.info("retention removed %d expired session(s)", removed)
            except GatewayError as exc:
                log.warning("retention sweep failed: %s", exc.message)

    # -- publishing ------------------------------------------------------------

    def parse_item(self, item: Any, key: str | None = None) -> NewEvent:
        if not isinstance(item, dict):
            raise BadRequest("each event must be a JSON object {\"event\"?, \"data\", \"idempotency_key\"?}",
                             "invalid_event")
        if not item.keys() <= _EVENT_FIELDS:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(set(item) - _EVENT_FIELDS))}", "unknown_field")
        if "data" not in item:
            raise BadRequest("an event needs a \"data\" field", "missing_data")
        event = item.get("event", "message")
        if type(event) is not str or event not in _VALID_TYPES:  # publishers reuse a few types: each is checked once
            check_event_type(event)
            if len(_VALID_TYPES) < 1024:
                _VALID_TYPES.add(event)
        if item.get("idempotency_key") is not None:
            if key is not None:
                raise BadRequest("give the idempotency key in the header or the body, not both",
                                 "invalid_idempotency_key")
            key = check_key(item["idempotency_key"])
        data = dump_json(item["data"])
        self.check_size(data)
        return NewEvent(event, data, True, key)

    def check_size(self, data: str) -> None:
        if len(data) > self.settings.max_event_bytes // 4 and len(data.encode()) > self.settings.max_event_bytes:
            raise TooLarge(f"event data is larger than {self.settings.max_event_bytes} bytes", "event_too_large")

    async def admit_session(self) -> None:
        """Raise ``503 too_many_sessions`` if the log holds ``--max-sessions`` already."""
        limit = self.settings.max_sessions
        if limit and await self.log.count_sessions() >= limit:
            raise limits.too_many_sessions(limit)

    async def _store_append(self, session: str, events: list[NewEvent], create: bool):
        try:
            return await self.log.append(session, events, create=create)
        except Unavailable:
            self.stats.store_errors += 1
            raise

    async def append(self, session: str, events: list[NewEvent]):
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self.settings.auto_create and self.settings.max_sessions:
            try:  # only a publish that creates the session pays for counting sessions
                result = await self._store_append(session, events, False)
            except NotFound:
                await self.admit_session()
                result = await self._store_append(session, events, True)
        else:
            result = await self._store_append(session, events, self.settings.auto_create)
        self.stats.append_seconds.observe(loop.time() - started)
        fresh = len(result.events)
        self.stats.published += fresh
        self.stats.publish_duplicates += len(events) - fresh
        return result


def create_app(settings: Settings | None = None, event_log: EventLog | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        gw = Gateway(settings, event_log or make_log(settings))
        await gw.start()
        app.state.gw = gw
        try:
            yield
        finally:
            await gw.stop()

    # No trailing-slash redirects: /v1/sessions/%2F is an unknown path (404), not a 307 to another resource.
    app = GatewayApp(title="sse-gateway", version=__version__, lifespan=lifespan, docs_url="/docs",
                  redoc_url=None, redirect_slashes=False,
                  description="Durable per-session event logs, streamed as Server-Sent Events "
                  "with exact Last-Event-ID resume.")

    app.openapi = lambda: openapi.describe(app, settings)

    def gw_of(request: Request) -> Gateway:
        return request.app.state.gw

    async def readable_row(request: Request, session: str) -> tuple[Gateway, Session]:
        """The gateway and the session's row, for a reader allowed to see it (400/401/403/404 otherwise)."""
        gw = gw_of(request)
        check_session_id(session)
        bound = gw.auth.reader(request, session)
        return gw, await row_for_reader(gw, session, bound)

    async def row_for_reader(gw: Gateway, session: str, bound: str | None) -> Session:
        """The session's row (404 if none) for a reader whose token is bound to life ``bound`` (403 if another)."""
        row = await gw.log.get_session(session)
        if row is None:
            raise NotFound(f"no session {session!r}")
        check_life(bound, row.epoch)
        return row

    # -- errors: always JSON ----------------------------------------------------

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        if exc.status == 401:
            gw_of(request).stats.auth_failures += 1
        return Response(exc.body(), exc.status, exc.headers, media_type="application/json")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of the path, not only those of the first route that matched
            headers["Allow"] = ", ".join(allowed_methods(request))
        return Response(error_body(codes.get(exc.status_code, "http_error"), str(exc.detail)), exc.status_code,
                        headers, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return Response(error_body("invalid_request", f"{where}: {first.get('msg', 'invalid')}"), 400,
                        media_type="application/json")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return Response(error_body("internal_error", "the gateway failed; this is a bug"), 500,
                        media_type="application/json")

    # -- publish ------------------------------------------------------------------

    @app.post("/v1/sessions/{session}/events", tags=["publish"], status_code=201,
              openapi_extra=openapi.PUBLISH, summary="Append events to a session")
    async def publish(session: str, request: Request) -> Response:
        gw = gw_of(request)
        check_session_id(session)
        gw.auth.publisher(request)
        kind, charset = content_type(request)
        header_key = request.headers.get("idempotency-key")
        if header_key is not None:
            header_key = check_key(header_key)
        try:
            text_type = check_event_type(request.query_params.get("event", "message"))  # checked for every body
            if kind == "application/x-ndjson":
                if header_key is not None:
                    raise BadRequest("an NDJSON stream takes per-line idempotency_key, not the header",
                                     "invalid_idempotency_key")
                return await publish_ndjson(gw, session, request)
            body = await read_body(request, gw.settings.max_body_bytes)
            if kind == "application/json":
                payload = parse_json(body)
                if isinstance(payload, list):
                    if header_key is not None:
                        raise BadRequest("a batch takes per-item idempotency_key, not the header",
                                         "invalid_idempotency_key")
                    if not payload:
                        raise BadRequest("a batch needs at least one event", "empty_batch")
                    if len(payload) > gw.settings.max_batch:
                        raise TooLarge(f"a batch holds at most {gw.settings.max_batch} events", "batch_too_large")
                    events = [gw.parse_item(item) for item in payload]
                    return appended(session, await gw.append(session, events), batch=True)
                event = gw.parse_item(payload, header_key)
            elif kind == "text/plain":
                if charset not in ("", "utf-8", "utf8", "us-ascii"):
                    raise UnsupportedMedia("text/plain must be UTF-8", "unsupported_charset")
                try:
                    text = body.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadRequest("text/plain body is not valid UTF-8", "invalid_utf8") from None
                gw.check_size(text)
                event = NewEvent(text_type, text, False, header_key)
            else:
                raise UnsupportedMedia("publish takes application/json, text/plain or application/x-ndjson",
                                       "unsupported_media_type")
            return appended(session, await gw.append(session, [event]), batch=False)
        except GatewayError:
            gw.stats.publish_rejected += 1
            raise

    async def publish_ndjson(gw: Gateway, session: str, request: Request) -> Response:
        """Each complete line is appended as it arrives; lines that arrive together share a commit."""
        ids: list[int] = []
        any_new = False
        pending = b""
        limit = gw.settings.max_body_bytes

        async def append_all(events: list[NewEvent]) -> None:
            nonlocal any_new
            for i in range(0, len(events), gw.settings.max_batch):
                result = await gw.append(session, events[i:i + gw.settings.max_batch])
                ids.extend(result.ids)
                any_new = any_new or any(result.new)

        async def flush(lines: list[bytes]) -> None:
            events = []
            try:
                for line in lines:
                    if line.strip():
                        events.append(gw.parse_item(parse_json(line)))
            except GatewayError as err:
                await append_all(events)  # the good lines before the bad one are kept, as if they had come alone
                err.extra = {"ids": ids}
                raise
            await append_all(events)

        loop = asyncio.get_running_loop()
        patience = gw.settings.ndjson_line_timeout
        deadline = loop.time() + patience
        chunks = request.stream()
        while True:
            try:
                chunk = await limits.next_chunk(chunks, deadline)
            except TimeoutError:
                raise RequestTimeout(f"no complete NDJSON line arrived for {patience:g} s", "line_timeout",
                                     extra={"ids": ids}) from None
            if chunk is None:
                break
            pending += chunk
            if b"\n" in chunk:
                *lines, pending = pending.split(b"\n")
                deadline = loop.time() + patience
                await flush(lines)
            if len(pending) > limit:
                raise TooLarge(f"an NDJSON line is longer than {limit} bytes", "line_too_long", extra={"ids": ids})
        await flush([pending])
        row_last = ids[-1] if ids else 0
        return json_response({"ids": ids, "session": session, "last_id": row_last}, 201 if any_new else 200)

    def appended(session: str, result, *, batch: bool) -> Response:
        status = 201 if any(result.new) else 200
        body = {"ids": result.ids} if batch else {"id": result.ids[0]}
        body["session"] = session
        body["last_id"] = result.last_id
        return json_response(body, status)

    # -- stream -------------------------------------------------------------------

    @app.get("/v1/sessions/{session}/stream", tags=["read"], openapi_extra=openapi.STREAM,
             summary="Stream a session as Server-Sent Events", response_class=Response)
    async def stream(session: str, request: Request) -> Response:
        gw = gw_of(request)
        check_session_id(session)
        bound = gw.auth.reader(request, session)
        if gw.draining:
            raise Unavailable("the gateway is shutting down; reconnect", "draining", retry_after=1)
        q = request.query_params
        header = request.headers.get("last-event-id")
        resuming = header if header is not None else q.get("last_event_id")
        if resuming is not None and resuming.strip() == "":
            resuming = None  # an empty Last-Event-ID means no cursor, as EventSource sends it
        cursor, epoch = (0, None)
        from_latest = False
        if resuming is not None:
            cursor, epoch = parse_cursor(resuming)
        elif "from" in q:
            start = q["from"]
            if start == "earliest":
                pass
            elif start == "latest":
                from_latest = True
            else:
                cursor, epoch = parse_cursor(start)
        live = q.get("live", "true").lower()
        if live not in ("true", "false", "1", "0"):
            raise BadRequest("live must be true or false", "invalid_live")
        row = await row_for_reader(gw, session, bound)
        if from_latest:
            cursor, epoch = row.last_id, row.epoch
        start, notice = start_position(row, cursor, epoch)
        if row.completed and start >= row.last_id and not notice:
            return Response(status_code=204)
        release = gw.streams.take(session)
        if notice:
            gw.stats.resets += 1
        elif resuming is not None and start > row.acked_id:
            gw.spawn(_ack_quietly(gw.log, session, start))  # a reconnect's cursor is also an ack
        gw.stats.streams_opened += 1
        return EventStream(gw.hub, session, cursor, epoch, prelude=encode_retry(gw.settings.retry_ms),
                           live=live in ("true", "1"), heartbeat=gw.settings.heartbeat,
                           stats=gw.stats, on_close=release)

    # -- history ------------------------------------------------------------------

    @app.get("/v1/sessions/{session}/events", tags=["read"], openapi_extra=openapi.HISTORY,
             summary="Read a session's events as JSON")
    async def history(session: str, request: Request) -> Response:
        gw = gw_of(request)
        check_session_id(session)
        bound = gw.auth.reader(request, session)
        after = query_int(request, "after", 0, 0, 2**62)
        limit = query_int(request, "limit", 100, 1, 1000)
        row = await row_for_reader(gw, session, bound)
        events = await gw.log.read(session, after, limit)
        body: dict = {
            "events": [e.to_json() for e in events], "epoch": row.epoch, "earliest_id": row.earliest_id,
            "last_id": row.last_id, "next_after": events[-1].id if events else after,
        }
        first = events[0].id if events else row.trimmed_id + 1
        if after + 1 < first and after < row.trimmed_id:
            body["gap"] = {"from": after + 1, "to": min(first - 1, row.trimmed_id)}
        return json_response(body)

    # -- sessions -------------------------------------------------------------------

    @app.post("/v1/sessions", tags=["sessions"], status_code=201, openapi_extra=openapi.CREATE,
              summary="Create a session")
    async def create_session(request: Request) -> Response:
        gw = gw_of(request)
        gw.auth.publisher(request)
        body = await read_body(request, gw.settings.max_body_bytes)
        spec = parse_json(body) if body.strip() else {}
        if not isinstance(spec, dict):
            raise BadRequest("body must be a JSON object {\"id\"?, \"metadata\"?, \"ttl_seconds\"?}", "invalid_body")
        unknown = set(spec) - {"id", "metadata", "ttl_seconds"}
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}", "unknown_field")
        session = spec.get("id")
        if session is None:
            session = "s_" + secrets.token_urlsafe(12)
        elif not isinstance(session, str):
            raise BadRequest("id must be a string", "invalid_session_id")
        check_session_id(session)
        ttl = spec.get("ttl_seconds")
        if ttl is not None:
            ttl = json_int(ttl)
            if ttl is None or not 0 < ttl < 10**9:
                raise BadRequest("ttl_seconds must be a positive integer", "invalid_ttl")
        await gw.admit_session()
        row = await gw.log.create_session(session, metadata=spec.get("metadata"), ttl_seconds=ttl)
        token = gw.auth.mint(session, epoch=row.epoch)
        stream_url = f"/v1/sessions/{session}/stream"
        body_out = {"id": session, "epoch": row.epoch, "stream_url": stream_url,
                    "subscribe_token": token[0] if token else None}
        if token:
            body_out["stream_url"] = f"{stream_url}?token={token[0]}"
            body_out["token_expires_at"] = rfc3339(token[1] * 1000)
        return json_response(body_out, 201)

    @app.post("/v1/sessions/{session}/tokens", tags=["sessions"], status_code=201, openapi_extra=openapi.TOKENS,
              summary="Mint a subscribe token for a session")
    async def mint_token(session: str, request: Request) -> Response:
        gw = gw_of(request)
        check_session_id(session)
        gw.auth.publisher(request)
        body = await read_body(request, 4096)
        spec = parse_json(body) if body.strip() else {}
        if not isinstance(spec, dict) or set(spec) - {"ttl_seconds"}:
            raise BadRequest("body must be a JSON object {\"ttl_seconds\"?}", "invalid_body")
        ttl = spec.get("ttl_seconds")
        if ttl is not None:
            ttl = json_int(ttl)
            if ttl is None or not 0 < ttl <= MAX_TOKEN_TTL:
                raise BadRequest(f"ttl_seconds must be an integer from 1 to {MAX_TOKEN_TTL}", "invalid_ttl")
        row = await gw.log.get_session(session)  # an existing session binds the token to its life
        token = gw.auth.mint(session, ttl, epoch=row.epoch if row else None)
        if token is None:
            raise NotConfigured("this gateway mints no tokens: start it with --token-secret", "tokens_not_configured")
        return json_response({"token": token[0], "expires_at": rfc3339(token[1] * 1000),
                              "stream_url": f"/v1/sessions/{session}/stream?token={token[0]}"}, 201)

    @app.get("/v1/sessions", tags=["sessions"], openapi_extra=openapi.LIST, summary="List sessions")
    async def list_sessions(request: Request) -> Response:
        gw = gw_of(request)
        gw.auth.publisher(request)
        status = request.query_params.get("status")
        if status not in (None, "open", "completed"):
            raise BadRequest("status must be open or completed", "invalid_status")
        limit = query_int(request, "limit", 100, 1, 1000)
        rows = await gw.log.list_sessions(status=status, limit=limit)
        return json_response({"sessions": [session_json(r, gw.hub) for r in rows]})

    @app.get("/v1/sessions/{session}", tags=["sessions"], summary="A session's status, presence and acks")
    async def get_session(session: str, request: Request) -> Response:
        gw, row = await readable_row(request, session)
        presence = await gw.log.presence(session)
        return json_response(session_json(row, gw.hub, presence))

    @app.delete("/v1/sessions/{session}", tags=["sessions"], summary="Delete a session and its log")
    async def delete_session(session: str, request: Request) -> Response:
        gw = gw_of(request)
        check_session_id(session)
        gw.auth.publisher(request)
        if not await gw.log.delete_session(session):
            raise NotFound(f"no session {session!r}")
        return Response(status_code=204)

    @app.post("/v1/sessions/{session}/complete", tags=["sessions"], openapi_extra=openapi.COMPLETE,
              summary="Complete a session with its final result")
    async def complete(session: str, request: Request) -> Response:
        gw = gw_of(request)
        check_session_id(session)
        gw.auth.publisher(request)
        body = await read_body(request, gw.settings.max_body_bytes)
        spec = parse_json(body) if body.strip() else {}
        if not isinstance(spec, dict) or set(spec) - {"result"}:
            raise BadRequest("body must be a JSON object {\"result\"?}", "invalid_body")
        if "result" in spec:
            gw.check_size(dump_json(spec["result"]))
        row = await gw.log.complete(session, spec.get("result", NO_RESULT))
        return json_response(session_json(row, gw.hub))

    @app.post("/v1/sessions/{session}/ack", tags=["sessions"], openapi_extra=openapi.ACK,
              summary="Confirm delivery up to an id")
    async def ack(session: str, request: Request) -> Response:
        gw = gw_of(request)
        check_session_id(session)
        bound = gw.auth.reader(request, session)
        spec = parse_json(await read_body(request, 4096))
        upto = spec.get("id") if isinstance(spec, dict) else None
        upto = parse_cursor(upto)[0] if isinstance(upto, str) else json_int(upto)
        if upto is None:
            raise BadRequest("body must be {\"id\": N}", "invalid_ack")
        if bound is not None:
            await row_for_reader(gw, session, bound)
        row = await gw.log.ack(session, upto)
        return json_response({"session": session, "acked_id": row.acked_id})

    @app.get("/v1/sessions/{session}/state", tags=["sessions"], summary="The run's state document")
    async def get_state(session: str, request: Request) -> Response:
        return state_response((await readable_row(request, session))[1])

    @app.put("/v1/sessions/{session}/state", tags=["sessions"], openapi_extra=openapi.STATE,
             summary="Replace the run's state document")
    async def put_state(session: str, request: Request) -> Response:
        gw = gw_of(request)
        check_session_id(session)
        gw.auth.publisher(request)
        if_match = request.headers.get("if-match")
        version = None
        if if_match is not None and if_match.strip() != "*":
            tag = if_match.strip().removeprefix("W/").strip('"')
            if not (tag.isascii() and tag.isdigit() and len(tag) <= 19):
                raise BadRequest("If-Match must be a version ETag such as \"3\"", "invalid_if_match")
            version = int(tag)
        state = parse_json(await read_body(request, gw.settings.max_body_bytes))
        if not isinstance(state, dict):
            raise BadRequest("state must be a JSON object", "invalid_state")
        if await gw.log.get_session(session) is None and not gw.settings.auto_create:
            raise NotFound(f"no session {session!r}")
        try:
            row = await gw.log.put_state(session, state, version)
        except NotFound:
            if not gw.settings.auto_create:
                raise
            await gw.admit_session()
            with contextlib.suppress(Conflict):
                await gw.log.create_session(session)
            row = await gw.log.put_state(session, state, version)
        return state_response(row)

    def state_response(row: Session) -> Response:
        return json_response({"version": row.state_version, "state": row.state,
                              "as_of": f"{row.state_as_of}:{row.epoch}"},
                             headers={"ETag": f'"{row.state_version}"'})

    @app.post("/v1/sessions/{session}/trim", tags=["sessions"], openapi_extra=openapi.TRIM,
              summary="Remove events up to an id (retention)")
    async def trim(session: str, request: Request) -> Response:
        gw = gw_of(request)
        check_session_id(session)
        gw.auth.publisher(request)
        spec = parse_json(await read_body(request, 4096))
        through = json_int(spec.get("through")) if isinstance(spec, dict) else None
        if through is None or through < 0:
            raise BadRequest("body must be {\"through\": N}", "invalid_trim")
        row = await gw.log.trim(session, through)
        return json_response({"session": session, "earliest_id": row.earliest_id, "last_id": row.last_id})

    # -- operations -------------------------------------------------------------------

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz", tags=["operations"], summary="The store is reachable and the gateway takes traffic")
    async def readyz(request: Request) -> Response:
        gw = gw_of(request)
        if gw.draining:
            return json_response({"status": "draining"}, 503, {"Retry-After": "1"})
        try:
            await asyncio.wait_for(gw.log.ping(), 2.0)
        except Exception as exc:  # any failure of the store means not ready
            return Response(error_body("store_unavailable", f"the store is not reachable: {exc}"), 503,
                            {"Retry-After": "1"}, media_type="application/json")
        return json_response({"status": "ready", "backend": gw.settings.backend})

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        return Response(render(gw_of(request).registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.exists():
            return json_response({"service": "sse-gateway", "version": __version__, "docs": "/docs"})
        return FileResponse(page)

    if settings.demo:
        app.include_router(demo.router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(DirectRoute, method="POST", action="events", endpoint=publish, on_error=gateway_error)
    app.add_middleware(RequestTimer, stats_of=lambda: getattr(getattr(app.state, "gw", None), "stats", None))
    app.add_middleware(limits.CloseUnreadBody)
    cors.install(app, settings.cors_origin)
    app.stream_route = DirectRoute(None, method="GET", action="stream", endpoint=stream, on_error=gateway_error,
                                   unless_origin=True)
    return app


class GatewayApp(FastAPI):
    """FastAPI, with streams served before any of FastAPI's or Starlette's own layers.

    A stream's task resumes through every ASGI layer it was called through,
    once per wake-up, and each of its sends passes through Starlette's
    error layer: at 1,000 subscribers those layers were ~8% of the CPU.
    ``stream_route`` (a ``DirectRoute``) answers stream requests first; anything
    else, and a stream request it does not take, goes through FastAPI.
    """

    stream_route: DirectRoute | None = None

    async def __call__(self, scope, receive, send) -> None:
        if self.stream_route is not None and scope["type"] == "http":
            scope["app"] = self  # what Starlette would set: endpoints find the gateway through it
            if await self.stream_route.serve(scope, receive, send):
                return
        await super().__call__(scope, receive, send)


class DirectRoute:
    """One hot route, ``METHOD /v1/sessions/{id}/ACTION``, straight to its endpoint past the router.

    Publishing and streaming run for every event, and every request or sent
    event passes through each ASGI layer under it: the router, FastAPI's
    dependency solving, exit stack and telemetry, Starlette's exception
    layers. Profiles put those at a fifth to a third of the CPU of
    publishing and of a 1,000-subscriber fan-out, and ~5 KB per idle stream.
    The endpoint is the same function the documented route calls, so the
    checks, errors and OpenAPI description are unchanged. Streams are served
    before FastAPI itself (``GatewayApp``; a request with an ``Origin``
    header takes the ordinary path, so CORS applies); publishing from the
    innermost layer, inside the metrics, body-limit and CORS layers.
    """

    def __init__(self, app, method: str, action: str, endpoint, on_error, unless_origin: bool = False) -> None:
        self.app = app
        self.method = method
        self.suffix = "/" + action
        self.endpoint = endpoint
        self.on_error = on_error
        self.unless_origin = unless_origin

    async def __call__(self, scope, receive, send) -> None:
        if not await self.serve(scope, receive, send):
            await self.app(scope, receive, send)

    async def serve(self, scope, receive, send) -> bool:
        """Answer the request if it is this route's; whether it was."""
        path = scope.get("path", "")
        if scope["type"] == "http" and scope["method"] == self.method and path.endswith(self.suffix):
            parts = path.split("/")  # "", "v1", "sessions", id, action
            if len(parts) == 5 and parts[1] == "v1" and parts[2] == "sessions" and parts[3] and not (
                    self.unless_origin and any(name == b"origin" for name, _ in scope["headers"])):
                request = Request(scope, receive)
                try:
                    response = await self.endpoint(parts[3], request)
                except GatewayError as exc:
                    response = await self.on_error(request, exc)
                await response(scope, receive, send)
                return True
        return False


def allowed_methods(request: Request) -> list[str]:
    """The methods some route serves at this request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


async def _ack_quietly(event_log: EventLog, session: str, upto: int) -> None:
    with contextlib.suppress(GatewayError):
        await event_log.ack(session, upto)

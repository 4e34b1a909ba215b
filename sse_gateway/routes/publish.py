"""Publishing: ``POST /v1/sessions/{session}/events`` (one event, a batch, text, or an NDJSON stream).

A ``201`` is sent only after the events are committed; ``200`` when every
event was an idempotent retry of one already stored.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import QueryParams
from starlette.responses import Response

from .. import limits, openapi
from ..bodies import check_key, check_size, content_type, parse_event, parse_json, producer_epoch, read_body
from ..errors import BadRequest, GatewayError, NotFound, RequestTimeout, TooLarge, UnsupportedMedia
from ..gateway import Gateway
from ..models import AppendResult, NewEvent, check_event_type
from .common import json_response, publisher

router = APIRouter(tags=["publish"])


@dataclass(slots=True)
class PublishHeaders:
    """What a publish request's headers (and query) say, checked before its body is read."""

    kind: str  # the media type
    charset: str
    key: str | None  # Idempotency-Key
    producer: int | None  # Producer-Epoch
    text_type: str  # ?event=, the type of a text/plain event


def publish_headers(request: Any, query_string: bytes) -> PublishHeaders:
    """The checked headers of a publish (``request.headers``: lower-case names); the ``GatewayError`` of the
    first that is wrong."""
    kind, charset = content_type(request)
    header_key = request.headers.get("idempotency-key")
    if header_key is not None:
        header_key = check_key(header_key)
    producer = producer_epoch(request)
    # ?event= is checked for every body (and ignored but for text); most publishes have no query at all
    text_type = "message"
    if query_string:
        text_type = check_event_type(QueryParams(query_string).get("event", "message"))
    if kind == "application/x-ndjson" and header_key is not None:
        raise BadRequest("an NDJSON stream takes per-line idempotency_key, not the header", "invalid_idempotency_key")
    return PublishHeaders(kind, charset, header_key, producer, text_type)


@router.post("/v1/sessions/{session}/events", status_code=201, openapi_extra=openapi.PUBLISH,
             summary="Append events to a session")
async def publish(session: str, request: Request) -> Response:
    gw = publisher(request, session)
    try:
        checked = publish_headers(request, request.scope["query_string"])
        if checked.kind == "application/x-ndjson":
            return await _publish_ndjson(gw, session, request, checked.producer)
        body = await read_body(request, gw.settings.max_body_bytes)
        return json_response(*await append_body(gw, session, checked, body))
    except GatewayError:
        gw.stats.publish_rejected += 1
        raise


async def append_body(gw: Gateway, session: str, checked: PublishHeaders, body: bytes) -> tuple[dict, int]:
    """Append the event or batch of a JSON or text body; the answer and its status (201, or 200 for a repeat).
    The caller counts a ``GatewayError`` as a rejected publish."""
    settings = gw.settings
    if checked.kind == "application/json":
        if checked.charset not in ("", "utf-8", "utf8"):
            raise UnsupportedMedia("application/json must be UTF-8", "unsupported_charset")
        payload = parse_json(body)
        if isinstance(payload, list):
            if checked.key is not None:
                raise BadRequest("a batch takes per-item idempotency_key, not the header", "invalid_idempotency_key")
            if not payload:
                raise BadRequest("a batch needs at least one event", "empty_batch")
            if len(payload) > settings.max_batch:
                raise TooLarge(f"a batch holds at most {settings.max_batch} events", "batch_too_large")
            events = [parse_event(item, settings.max_event_bytes) for item in payload]
            return _appended(session, await gw.writes.append(session, events, checked.producer), batch=True)
        event = parse_event(payload, settings.max_event_bytes, checked.key)
    elif checked.kind == "text/plain":
        if checked.charset not in ("", "utf-8", "utf8", "us-ascii"):
            raise UnsupportedMedia("text/plain must be UTF-8", "unsupported_charset")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("text/plain body is not valid UTF-8", "invalid_utf8") from None
        check_size(text, settings.max_event_bytes)
        event = NewEvent(checked.text_type, text, False, checked.key)
    else:  # (read first, so the connection stays open)
        raise UnsupportedMedia("publish takes application/json, text/plain or application/x-ndjson",
                               "unsupported_media_type")
    return _appended(session, await gw.writes.append(session, [event], checked.producer), batch=False)


async def _publish_ndjson(gw: Gateway, session: str, request: Request, producer: int | None) -> Response:
    """Each complete line is appended as it arrives; lines that arrive together share a commit.

    Whatever ends the request early (a bad line, a line too long or too slow, a refused append), its error
    carries the ``ids`` of the lines appended before it: the publisher learns what was kept.
    """
    ids: list[int] = []
    try:
        return await _ndjson_lines(gw, session, request, ids, producer)
    except GatewayError as err:
        err.extra = {**err.extra, "ids": list(ids)}
        raise


async def _ndjson_lines(gw: Gateway, session: str, request: Request, ids: list[int],
                        producer: int | None) -> Response:
    answer: dict = {"ids": ids, "session": session, "last_id": 0}
    any_new = False
    pending: list[bytes] = []  # the pieces of the line not complete yet (joined once its end arrives)
    size = 0
    settings = gw.settings

    async def append_all(events: list[NewEvent]) -> None:
        nonlocal any_new
        for i in range(0, len(events), settings.max_batch):
            result = await gw.writes.append(session, events[i:i + settings.max_batch], producer)
            ids.extend(result.ids)
            answer.update(last_id=ids[-1], epoch=result.epoch)
            any_new = any_new or any(result.new)

    async def flush(lines: list[bytes]) -> None:
        events = []
        try:
            for line in lines:
                if line.strip():
                    events.append(parse_event(parse_json(line), settings.max_event_bytes))
        except GatewayError:
            await append_all(events)  # the good lines before the bad one are kept, as if they had come alone
            raise
        await append_all(events)

    loop = asyncio.get_running_loop()
    patience = settings.ndjson_line_timeout
    deadline = loop.time() + patience
    chunks = request.stream()
    while True:
        try:
            chunk = await limits.next_chunk(chunks, deadline)
        except TimeoutError:
            raise RequestTimeout(f"no complete NDJSON line arrived for {patience:g} s", "line_timeout") from None
        if chunk is None:
            break
        if b"\n" in chunk:
            *lines, rest = b"".join((*pending, chunk)).split(b"\n")
            pending, size = [rest], len(rest)
            deadline = loop.time() + patience
            await flush(lines)
        else:
            pending.append(chunk)
            size += len(chunk)
        if size > settings.max_body_bytes:
            raise TooLarge(f"an NDJSON line is longer than {settings.max_body_bytes} bytes", "line_too_long")
    await flush([b"".join(pending)])
    if not ids:  # nothing but blank lines: say where the session stands
        row = await gw.log.get_session(session)
        if row is None:
            raise NotFound(f"no session {session!r} (an NDJSON stream without events creates none)")
        answer.update(last_id=row.last_id, epoch=row.epoch)
    return json_response(answer, 201 if any_new else 200)


def _appended(session: str, result: AppendResult, *, batch: bool) -> tuple[dict, int]:
    body = {"ids": result.ids} if batch else {"id": result.ids[0]}
    body["session"] = session
    body["last_id"] = result.last_id
    body["epoch"] = result.epoch
    return body, 201 if any(result.new) else 200

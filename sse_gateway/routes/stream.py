"""Reading a session: the SSE stream (replay after a cursor, then live) and the same events as JSON."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Request
from starlette.responses import Response

from .. import openapi, rules
from ..bodies import query_int
from ..cors import CROSS_SITE
from ..errors import BadRequest, GatewayError, Unavailable
from ..log.base import EventLog
from ..messages import Compactor, cursor_text
from ..sse import encode_retry
from ..stream import READ_CHUNK, EventStream, parse_position, start_position
from .common import json_response, reader, row_for_reader

router = APIRouter(tags=["read"])

HISTORY_BYTES = 4 << 20  # one history answer carries at most this much event data (and always one event)
_HISTORY_FIRST = 16  # events the first read of a history answer asks for


@router.get("/v1/sessions/{session}/stream", openapi_extra=openapi.STREAM, response_class=Response,
            summary="Stream a session as Server-Sent Events")
async def stream(session: str, request: Request) -> Response:
    gw, bound = reader(request, session)
    if gw.draining:
        raise Unavailable("the gateway is shutting down; reconnect", "draining", retry_after=1)
    q = request.query_params
    header, query, start = request.headers.get("last-event-id"), q.get("last_event_id"), q.get("from")
    # Every cursor given is checked (400 invalid_cursor), also one that another takes precedence over;
    # an empty Last-Event-ID means no cursor, as EventSource sends it.
    given = {c: parse_position(c) for c in (header, query) if c is not None and c.strip()}
    start_at = parse_position(start) if start not in (None, "earliest", "latest") else None
    chosen = header if header is not None else query
    resuming = given.get(chosen)
    cursor, hold, epoch = resuming or start_at or (0, 0, None)
    from_latest = resuming is None and start == "latest"
    live = q.get("live", "true").lower()
    if live not in ("true", "false", "1", "0"):
        raise BadRequest("live must be true or false", "invalid_live")
    row = await row_for_reader(gw, session, bound)
    if from_latest:
        cursor, hold, epoch = row.last_id, 0, row.epoch
    start, notice = start_position(row, cursor, epoch)
    has = hold - 1 if hold and not notice else start  # the reader has every event up to this one
    if resuming is not None and not notice and has > row.acked_id and CROSS_SITE not in request.scope:
        gw.spawn(_ack_quietly(gw.log, session, has))  # a reconnect's cursor is also an ack, the last one too
    if row.completed and has >= row.last_id and not notice:
        return Response(status_code=204)
    release = gw.streams.take(session)
    if notice:
        gw.stats.resets += 1
    gw.stats.streams_opened += 1
    return EventStream(gw.hub, session, cursor, epoch, prelude=encode_retry(gw.settings.retry_ms),
                       live=live in ("true", "1"), heartbeat=gw.settings.heartbeat,
                       stats=gw.stats, on_close=release, hold=hold)


async def _ack_quietly(event_log: EventLog, session: str, upto: int) -> None:
    with contextlib.suppress(GatewayError):
        await event_log.ack(session, upto)


@router.get("/v1/sessions/{session}/events", openapi_extra=openapi.HISTORY,
            summary="Read a session's events as JSON")
async def history(session: str, request: Request) -> Response:
    gw, bound = reader(request, session)
    compact = request.query_params.get("compact", "false").lower()
    if compact not in ("true", "false", "1", "0"):
        raise BadRequest("compact must be true or false", "invalid_compact")
    if compact in ("true", "1") or "/" in request.query_params.get("after", ""):  # ID/HOLD: a replay's cursor
        return await _compacted(request, gw, session, bound)
    after = query_int(request, "after", rules.READ_AFTER)
    limit = query_int(request, "limit", rules.READ_LIMIT)
    row = await row_for_reader(gw, session, bound)
    events = await read_bounded(gw.log, session, after, limit)
    body: dict = {
        "events": [e.to_json() for e in events], "epoch": row.epoch, "earliest_id": row.earliest_id,
        "last_id": row.last_id, "next_after": events[-1].id if events else after,
    }
    first = events[0].id if events else row.trimmed_id + 1
    if after + 1 < first and after < row.trimmed_id:
        body["gap"] = {"from": after + 1, "to": min(first - 1, row.trimmed_id)}
    return json_response(body)


async def read_bounded(event_log: EventLog, session: str, after: int, limit: int,
                       budget: int = HISTORY_BYTES) -> list:
    """Up to ``limit`` events after ``after``, but no more than ``budget`` bytes of data (always at least
    one). Read in pages, each sized by the largest event of the one before (and never more than 64 events
    for a budget of 4 MiB), so neither the answer nor what is read for it grows with ``limit`` times
    the size of an event: one request over 1,000 events of 1 MiB holds about 4 MiB, not 1 GiB."""
    events: list = []
    size, cursor, page = 0, after, min(limit, _HISTORY_FIRST)
    while True:
        got = await event_log.read(session, cursor, page)
        largest = 0
        for ev in got:
            n = len(ev.data) + len(ev.event)
            largest = max(largest, n)
            if events and size + n > budget:
                return events
            events.append(ev)
            size += n
        if len(got) < page or len(events) >= limit:
            return events
        cursor = events[-1].id
        page = min(limit - len(events), max(1, (budget - size) // max(largest, budget // 64)))


async def _compacted(request: Request, gw, session: str, bound) -> Response:
    """The history as a replay sends it (``messages.Compactor``): ``after`` is a cursor (``ID`` or
    ``ID/HOLD``); each event says its cursor; at the end of the log, a snapshot of each open message."""
    raw = request.query_params.get("after", "0")
    if "/" not in raw:
        after, hold = query_int(request, "after", rules.READ_AFTER), 0
    else:
        try:
            after, hold, _ = parse_position(raw)
        except BadRequest:
            raise BadRequest("after must be a cursor: ID or ID/HOLD", "invalid_after") from None
    limit = query_int(request, "limit", rules.READ_LIMIT)
    row = await row_for_reader(gw, session, bound)
    walk = Compactor(after, hold)
    start = cursor = walk.walk_from
    out: list = []
    size, first = 0, None
    while len(out) < limit and size < HISTORY_BYTES:
        got = await gw.log.read(session, cursor, READ_CHUNK)
        for ev in got:
            first = first or ev.id
            sent = walk.feed(ev)
            out += sent
            size += sum(len(e.data) for e, _ in sent)
            cursor = ev.id
            if len(out) >= limit or size >= HISTORY_BYTES:
                break
        if len(got) < READ_CHUNK:
            if len(out) < limit and size < HISTORY_BYTES:
                out += walk.flush()  # the end of the log: what is still open, as it stands
            break
    if walk.skipping is not None:  # stopped before passing the cursor: the reader keeps it
        next_after = raw.strip()
    else:
        next_after = cursor_text(walk.pos, walk.hold())
    body: dict = {
        "events": [{**e.to_json(), "cursor": cursor_text(e.id, h)} for e, h in out], "epoch": row.epoch,
        "earliest_id": row.earliest_id, "last_id": row.last_id, "next_after": next_after,
    }
    first = first or row.trimmed_id + 1
    if start + 1 < first and start < row.trimmed_id:
        body["gap"] = {"from": start + 1, "to": min(first - 1, row.trimmed_id)}
    return json_response(body)

"""A session's input (user -> agent): sending it, the agent reading it (SSE or JSON), the agent's acks.

``POST /v1/sessions/{id}/input`` is for whoever may steer the run: a
publisher key, or a subscribe token minted with the ``input`` scope. The
rest is the agent's side and needs a publisher key. An input is answered
``201`` only once it and its ``gateway.input`` mirror are committed
(``200`` for a repeat of an idempotency key); reads start after the
session's ``input_acked_id`` unless given a cursor, so an agent that
restarts gets exactly what it had not confirmed.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import Response

from .. import openapi, rules
from ..bodies import INPUT_SHAPE, json_int, json_object, parse_input, query_int
from ..errors import BadRequest, Conflict, NotFound, Unavailable
from ..inputs import InputStream, input_reset
from ..models import check_session_id
from ..sse import encode_retry
from ..stream import parse_cursor
from .common import gateway, json_response, publisher, row_for_reader

router = APIRouter(tags=["input"])

_INPUT_FIELDS = frozenset({"kind", "data", "idempotency_key", "approval_id", "decision"})


@router.post("/v1/sessions/{session}/input", status_code=201, openapi_extra=openapi.INPUT,
             summary="Send input (message, steer, approval, cancel) to a session's agent")
async def send_input(session: str, request: Request) -> Response:
    gw = gateway(request)
    check_session_id(session)
    bound = gw.auth.sender(request, session)
    spec = await json_object(request, gw.settings.max_body_bytes, _INPUT_FIELDS, INPUT_SHAPE, "invalid_body",
                             unknown_code="unknown_field", empty=False)
    item = parse_input(spec, gw.settings.max_event_bytes)
    if bound is not None:  # a token bound to one life of the session sends to that life only
        await row_for_reader(gw, session, bound)
    try:
        result = await gw.log.append_input(session, item)
    except Unavailable:
        gw.stats.store_errors += 1
        raise
    got = result.input
    return json_response({"id": got.id, "session": session, "kind": got.kind, "event_id": got.event_id,
                          "input_last_id": result.input_last_id, "epoch": result.epoch},
                         201 if result.new else 200)


@router.get("/v1/sessions/{session}/input", openapi_extra=openapi.INPUT_READ,
            summary="Read a session's input as JSON (the agent's side), optionally waiting for it")
async def read_input(session: str, request: Request) -> Response:
    gw = publisher(request, session)
    limit = query_int(request, "limit", rules.READ_LIMIT)
    wait = query_int(request, "wait", rules.INPUT_WAIT)
    given = request.query_params.get("after")
    after = None if given is None else query_int(request, "after", rules.READ_AFTER)
    row = await gw.log.get_session(session)
    if row is None:
        raise NotFound(f"no session {session!r}")
    if after is None:
        after = row.input_acked_id
    waiter = gw.inputs.watch(session, after, row.epoch)  # before the first read: an input between is not missed
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            waiter.clear()
            items = await gw.log.read_input(session, after, limit)
            remaining = deadline - loop.time()
            if items or remaining <= 0 or waiter.closed:
                break
            await waiter.wait(remaining)
    finally:
        gw.inputs.unwatch(waiter)
    if wait:
        row = await gw.log.get_session(session)
        if row is None:
            raise NotFound(f"no session {session!r} (it was deleted)")
    return json_response({"inputs": [i.to_json() for i in items], "epoch": row.epoch,
                          "input_last_id": max(row.input_last_id, items[-1].id if items else 0),
                          "input_acked_id": row.input_acked_id, "next_after": items[-1].id if items else after})


@router.get("/v1/sessions/{session}/input/stream", openapi_extra=openapi.INPUT_STREAM, response_class=Response,
            summary="Stream a session's input as Server-Sent Events (the agent's side)")
async def input_stream(session: str, request: Request) -> Response:
    gw = publisher(request, session)
    if gw.draining:
        raise Unavailable("the gateway is shutting down; reconnect", "draining", retry_after=1)
    q = request.query_params
    # Where it starts: the header, else ?last_event_id=, else ?from=, else after input_acked_id. Every one
    # given is checked, even one that a former one overrides (an agent's bug shows at once).
    header = request.headers.get("last-event-id")
    given = [parse_cursor(header) if header is not None and header.strip() else None,
             parse_cursor(q["last_event_id"]) if "last_event_id" in q else None]
    start = q.get("from")
    if start is not None and start not in ("earliest", "latest", "acked"):
        given.append(parse_cursor(start))
        start = None
    cursor, epoch = next((c for c in given if c is not None), (None, None))
    live = q.get("live", "true").lower()
    if live not in ("true", "false", "1", "0"):
        raise BadRequest("live must be true or false", "invalid_live")
    row = await gw.log.get_session(session)
    if row is None:
        raise NotFound(f"no session {session!r}")
    notice = b""
    if cursor is None:
        cursor = {"earliest": 0, "latest": row.input_last_id}.get(start, row.input_acked_id)
    elif (epoch is not None and epoch != row.epoch) or cursor > row.input_last_id:
        cursor, notice = 0, input_reset(row)
    return InputStream(gw.log, gw.inputs, row, cursor, prelude=encode_retry(gw.settings.retry_ms) + notice,
                       live=live in ("true", "1"), heartbeat=gw.settings.heartbeat)


@router.post("/v1/sessions/{session}/input/ack", openapi_extra=openapi.INPUT_ACK,
             summary="Confirm the agent handled a session's input up to an id")
async def ack_input(session: str, request: Request) -> Response:
    gw = publisher(request, session)
    spec = await json_object(request, rules.SMALL_BODY, frozenset({"id"}), '{"id": N}', "invalid_ack", empty=False)
    upto = spec.get("id")
    upto, epoch = parse_cursor(upto) if isinstance(upto, str) else (json_int(upto), None)  # 400 invalid_cursor
    if upto is None:
        raise BadRequest("body must be {\"id\": N} with N an input id or a cursor \"N:EPOCH\"", "invalid_ack")
    if epoch is not None:
        row = await gw.log.get_session(session)
        if row is None:
            raise NotFound(f"no session {session!r}")
        if epoch != row.epoch:
            raise Conflict(f"cursor {upto}:{epoch} is of another life of session {session!r} (epoch {row.epoch}); "
                           "nothing of this one was acked", "wrong_epoch", extra={"epoch": row.epoch})
    row = await gw.log.ack_input(session, upto)
    return json_response({"session": session, "input_acked_id": row.input_acked_id,
                          "input_last_id": row.input_last_id})

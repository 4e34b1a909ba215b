"""A run's state within its session: its end (with a result or an error), the producer's lease, delivery acks, the
state document, trimming."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from .. import openapi, rules
from ..bodies import bounded_int, check_size, json_int, json_object, producer_epoch, read_json
from ..errors import BadRequest, Conflict
from ..log.base import NO_RESULT
from ..messages import START, Message, new_message, stored_op
from ..models import Session, dump_json
from ..stream import READ_CHUNK, parse_cursor
from .common import json_response, publisher, readable_row, reader, row_for_reader, session_json

router = APIRouter(tags=["sessions"])


@router.post("/v1/sessions/{session}/complete", openapi_extra=openapi.COMPLETE,
             summary="End the run: completed with its result, failed or cancelled")
async def complete(session: str, request: Request) -> Response:
    gw = publisher(request, session)
    producer = producer_epoch(request)
    spec = await json_object(request, gw.settings.max_body_bytes, frozenset({"result", "status", "error"}),
                             '{"result"?, "status"?, "error"?}', "invalid_body")
    status = spec.get("status", "completed")
    if status not in rules.END_STATUSES:
        raise BadRequest("status must be completed, failed or cancelled", "invalid_status")
    if "error" in spec and status == "completed":
        raise BadRequest("a completed run has a result, not an error: give status failed or cancelled",
                         "invalid_body")
    result = spec.get("result", NO_RESULT)
    check_size(dump_json({"result": spec.get("result"), "error": spec.get("error")}), gw.settings.max_event_bytes,
               "result")
    row = await gw.log.complete(session, result, outcome=status, error=spec.get("error"), producer=producer)
    return json_response(session_json(row, gw))


@router.post("/v1/sessions/{session}/lease", openapi_extra=openapi.LEASE,
             summary="Renew the agent's lease, change it, or take the session over as a new producer")
async def lease(session: str, request: Request) -> Response:
    gw = publisher(request, session)
    producer = producer_epoch(request)
    spec = await json_object(request, rules.SMALL_BODY, frozenset({"seconds", "claim"}),
                             '{"seconds"?, "claim"?}', "invalid_body")
    seconds = bounded_int(spec.get("seconds"), rules.LEASE, "seconds", "invalid_lease")
    claim = spec.get("claim", False)
    if not isinstance(claim, bool):
        raise BadRequest("claim must be true or false", "invalid_body")
    row = await gw.log.lease(session, producer=producer, claim=claim, seconds=seconds)
    return json_response(session_json(row, gw))


@router.post("/v1/sessions/{session}/ack", openapi_extra=openapi.ACK, summary="Confirm delivery up to an id")
async def ack(session: str, request: Request) -> Response:
    gw, bound = reader(request, session)
    spec = await json_object(request, rules.SMALL_BODY, frozenset({"id"}), '{"id": N}', "invalid_ack",
                             empty=False)
    upto = spec.get("id")
    upto, epoch = parse_cursor(upto) if isinstance(upto, str) else (json_int(upto), None)  # 400 invalid_cursor
    if upto is None:
        raise BadRequest("body must be {\"id\": N} with N a number or a cursor \"N:EPOCH\"", "invalid_ack")
    if bound is not None or epoch is not None:
        row = await row_for_reader(gw, session, bound)
        if epoch is not None and epoch != row.epoch:  # a cursor of an earlier life of this session id
            raise Conflict(f"cursor {upto}:{epoch} is of another life of session {session!r} (epoch {row.epoch}); "
                           "nothing of this one was acked", "wrong_epoch", extra={"epoch": row.epoch})
    row = await gw.log.ack(session, upto)
    return json_response({"session": session, "acked_id": row.acked_id})


def _state_response(row: Session, messages: list | None = None) -> Response:
    body = {"version": row.state_version, "state": row.state, "as_of": f"{row.state_as_of}:{row.epoch}"}
    if messages is not None:
        body["messages"] = messages
    return json_response(body, headers={"ETag": f'"{row.state_version}"'})


@router.get("/v1/sessions/{session}/state", openapi_extra=openapi.STATE_READ, summary="The run's state document")
async def get_state(session: str, request: Request) -> Response:
    gw, row = await readable_row(request, session)
    flag = request.query_params.get("messages", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise BadRequest("messages must be true or false", "invalid_messages")
    if flag in ("false", "0"):
        return _state_response(row)
    return _state_response(row, await _messages_as_of(gw.log, session, row.state_as_of))


async def _messages_as_of(event_log, session: str, upto: int) -> list:
    """Every retained message as a replay would snapshot it at ``upto`` (the state's ``as_of``), in the
    order they began: with the state, what a returning reader has before it streams from ``as_of``."""
    found: dict[str, Message] = {}
    cursor = 0
    while cursor < upto and (events := await event_log.read(session, cursor, READ_CHUNK)):
        for ev in events:
            if ev.id > upto:
                break
            if (doc := stored_op(ev)) is not None:
                if ev.event == START:
                    found[doc["message"]] = new_message(doc["message"], ev.id, doc)
                elif (m := found.get(doc["message"])) is not None:  # (one begun before retention: gone)
                    m.apply(ev.event, doc)
        cursor = events[-1].id
    return [m.whole() for m in found.values()]


@router.put("/v1/sessions/{session}/state", openapi_extra=openapi.STATE, summary="Replace the run's state document")
async def put_state(session: str, request: Request) -> Response:
    gw = publisher(request, session)
    if_match = request.headers.get("if-match")
    version = None
    if if_match is not None and if_match.strip() != "*":
        tag = if_match.strip().removeprefix("W/").strip('"')
        if not (tag.isascii() and tag.isdigit() and len(tag) <= 19):
            raise BadRequest("If-Match must be a version ETag such as \"3\"", "invalid_if_match")
        version = int(tag)
    state = await read_json(request, gw.settings.max_body_bytes)
    if not isinstance(state, dict):
        raise BadRequest("state must be a JSON object", "invalid_state")
    check_size(dump_json(state), gw.settings.max_event_bytes, "state")
    return _state_response(await gw.writes.put_state(session, state, version, producer_epoch(request)))


@router.post("/v1/sessions/{session}/trim", openapi_extra=openapi.TRIM,
             summary="Remove events up to an id (retention)")
async def trim(session: str, request: Request) -> Response:
    gw = publisher(request, session)
    spec = await json_object(request, rules.SMALL_BODY, frozenset({"through"}), '{"through": N}',
                             "invalid_trim", empty=False)
    through = json_int(spec.get("through"))
    if through is None or through < 0:
        raise BadRequest("body must be {\"through\": N}", "invalid_trim")
    row = await gw.log.trim(session, through)
    return json_response({"session": session, "earliest_id": row.earliest_id, "last_id": row.last_id})

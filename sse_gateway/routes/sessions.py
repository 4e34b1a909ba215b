"""Sessions: create one, mint subscribe tokens for it, list, look at and delete them."""

from __future__ import annotations

import re
import secrets

from fastapi import APIRouter, Request
from starlette.responses import Response

from .. import openapi, rules
from ..bodies import bounded_int, check_size, json_object, parse_scopes, query_int
from ..errors import BadRequest, Conflict, NotConfigured, NotFound
from ..gateway import Gateway
from ..models import Session, check_session_id, dump_json, rfc3339
from .common import json_response, publisher, readable_row, session_json

router = APIRouter(tags=["sessions"])

_PUT_FIELDS = frozenset({"metadata", "ttl_seconds", "lease_seconds", "webhook_url"})
_CREATE_FIELDS = _PUT_FIELDS | {"id"}
_SETTINGS = ("metadata", "ttl_seconds", "lease_seconds", "webhook_url")  # what a create gives its session
_TOKEN_FIELDS = frozenset({"ttl_seconds", "scopes"})


def _stream_url(session: str, token: str | None) -> str:
    url = f"/v1/sessions/{session}/stream"
    return f"{url}?token={token}" if token else url


@router.post("/v1/sessions", status_code=201, openapi_extra=openapi.CREATE, summary="Create a session")
async def create_session(request: Request) -> Response:
    gw = publisher(request)
    spec = await _session_spec(request, gw, _CREATE_FIELDS,
                               '{"id"?, "metadata"?, "ttl_seconds"?, "lease_seconds"?, "webhook_url"?}')
    session = spec.get("id")
    if session is None:
        session = "s_" + secrets.token_urlsafe(12)
    elif not isinstance(session, str):
        raise BadRequest("id must be a string", "invalid_session_id")
    check_session_id(session)
    await gw.writes.admit_session()
    row = await gw.log.create_session(session, **{k: spec[k] for k in _SETTINGS})
    return _created(gw, row, 201)


@router.put("/v1/sessions/{session}", status_code=201, openapi_extra=openapi.PUT_SESSION,
            summary="Create a session, or find it as created before (idempotent)")
async def put_session(session: str, request: Request) -> Response:
    """Created (201), or the same session when it exists with these settings (200): a create retried after its
    answer was lost succeeds. Other settings are 409 session_exists. The lease is not compared: it is a live
    value (``POST .../lease`` changes it), and a restarted agent must find its session whatever it became."""
    gw = publisher(request, session)
    spec = await _session_spec(request, gw, _PUT_FIELDS,
                               '{"metadata"?, "ttl_seconds"?, "lease_seconds"?, "webhook_url"?}')
    row = await gw.log.get_session(session)
    if row is None:
        await gw.writes.admit_session()
        try:
            return _created(gw, await gw.log.create_session(session, **{k: spec[k] for k in _SETTINGS}), 201)
        except Conflict as exc:
            if exc.code != "session_exists" or (row := await gw.log.get_session(session)) is None:
                raise
    if (row.metadata, row.ttl_seconds, row.webhook_url) != (spec["metadata"], spec["ttl_seconds"], spec["webhook_url"]):
        raise Conflict(f"session {session!r} exists with other settings", "session_exists")
    return _created(gw, row, 200)


async def _session_spec(request: Request, gw: Gateway, fields: frozenset[str], shape: str) -> dict:
    """A create's body: every setting present (None when absent), checked, its metadata bounded."""
    spec = await json_object(request, gw.settings.max_body_bytes, fields, shape, "invalid_body",
                             unknown_code="unknown_field")
    spec["ttl_seconds"] = bounded_int(spec.get("ttl_seconds"), rules.SESSION_TTL, "ttl_seconds", "invalid_ttl")
    spec["lease_seconds"] = bounded_int(spec.get("lease_seconds"), rules.LEASE, "lease_seconds", "invalid_lease")
    spec["webhook_url"] = webhook_url(spec.get("webhook_url"))
    spec.setdefault("metadata", None)
    check_size(dump_json(spec["metadata"]), gw.settings.max_event_bytes, "metadata")
    return spec


_WEBHOOK_URL = re.compile(rules.WEBHOOK_URL)


def webhook_url(url: object) -> str | None:
    """A session's webhook (``rules.WEBHOOK_URL``), or None."""
    if url is not None and not (isinstance(url, str) and _WEBHOOK_URL.fullmatch(url)):
        raise BadRequest("webhook_url must be an http:// or https:// URL of printable ASCII, at most 2,048 "
                         "characters", "invalid_webhook_url")
    return url


def _created(gw: Gateway, row: Session, status: int) -> Response:
    token = gw.auth.mint(row.id, epoch=row.epoch)
    body = {"id": row.id, "epoch": row.epoch, "stream_url": _stream_url(row.id, token and token[0]),
            "subscribe_token": token[0] if token else None}
    if token:
        body["token_expires_at"] = rfc3339(token[1] * 1000)
    return json_response(body, status)


@router.post("/v1/sessions/{session}/tokens", status_code=201, openapi_extra=openapi.TOKENS,
             summary="Mint a subscribe token for a session")
async def mint_token(session: str, request: Request) -> Response:
    gw = publisher(request, session)
    spec = await json_object(request, rules.SMALL_BODY, _TOKEN_FIELDS, '{"ttl_seconds"?, "scopes"?}',
                             "invalid_body")
    ttl = bounded_int(spec.get("ttl_seconds"), rules.TOKEN_TTL, "ttl_seconds", "invalid_ttl")
    scopes = parse_scopes(spec.get("scopes"))
    row = await gw.log.get_session(session)  # an existing session binds the token to its life
    token = gw.auth.mint(session, ttl, epoch=row.epoch if row else None, scopes=scopes)
    if token is None:
        raise NotConfigured("this gateway mints no tokens: start it with --token-secret (or SSE_GATEWAY_TOKEN_SECRET)",
                            "tokens_not_configured")
    return json_response({"token": token[0], "expires_at": rfc3339(token[1] * 1000),
                          "stream_url": _stream_url(session, token[0])}, 201)


@router.get("/v1/sessions", openapi_extra=openapi.LIST, summary="List sessions")
async def list_sessions(request: Request) -> Response:
    gw = publisher(request)
    status = request.query_params.get("status")
    if status not in (None, "open", "completed"):
        raise BadRequest("status must be open or completed", "invalid_status")
    rows = await gw.log.list_sessions(status=status, limit=query_int(request, "limit", rules.LIST_LIMIT))
    return json_response({"sessions": [session_json(r, gw) for r in rows]})


@router.get("/v1/sessions/{session}", summary="A session's status, presence and acks")
async def get_session(session: str, request: Request) -> Response:
    gw, row = await readable_row(request, session)
    return json_response(session_json(row, gw, await gw.log.presence(session)))


@router.delete("/v1/sessions/{session}", summary="Delete a session and its log")
async def delete_session(session: str, request: Request) -> Response:
    gw = publisher(request, session)
    if not await gw.log.delete_session(session):
        raise NotFound(f"no session {session!r}")
    return Response(status_code=204)

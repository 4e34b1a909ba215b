"""What the routers share: the gateway of a request, JSON answers, a session as JSON, readers' access."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..auth import check_life
from ..errors import NotFound
from ..gateway import Gateway
from ..models import Session, check_session_id, dump_json, rfc3339


def gateway(request: Request) -> Gateway:
    return request.app.state.gw


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dump_json(body).encode(), status, headers, media_type="application/json")


def session_json(row: Session, gw: Gateway, presence: tuple[int, int | None] | None = None) -> dict:
    """``presence`` (streams, last detach in ms) if the log counts them across nodes, else the hub's."""
    subscribers, last_seen = presence or gw.hub.presence(row.id)
    return {
        "id": row.id, "epoch": row.epoch, "status": row.status,
        "created_at": rfc3339(row.created_at), "completed_at": rfc3339(row.completed_at),
        "earliest_id": row.earliest_id, "last_id": row.last_id, "metadata": row.metadata,
        "subscribers": subscribers, "last_seen_at": rfc3339(last_seen),
        "acked_id": row.acked_id, "state_version": row.state_version,
        "ttl_seconds": row.ttl_seconds, "result": row.result,
        "input_last_id": row.input_last_id, "input_acked_id": row.input_acked_id,
        "run_status": row.run_status, "outcome": row.outcome, "error": row.error,
        "lease_seconds": row.lease_seconds, "lease_until": rfc3339(row.deadline),
        "cancel_requested_at": rfc3339(row.cancel_requested_at), "producer_epoch": row.producer_epoch,
    }


def publisher(request: Request, session: str | None = None) -> Gateway:
    """The gateway, for a caller with a publisher key (401 otherwise); checks ``session``'s id if given."""
    gw = gateway(request)
    if session is not None:
        check_session_id(session)
    gw.auth.publisher(request)
    return gw


async def row_for_reader(gw: Gateway, session: str, bound: str | None) -> Session:
    """The session's row (404 if none) for a reader whose token is bound to life ``bound`` (403 if another)."""
    row = await gw.log.get_session(session)
    if row is None:
        raise NotFound(f"no session {session!r}")
    check_life(bound, row.epoch)
    return row


def reader(request: Request, session: str) -> tuple[Gateway, str | None]:
    """The gateway and the life a reader's token is bound to, for a caller who may read ``session``."""
    gw = gateway(request)
    check_session_id(session)
    return gw, gw.auth.reader(request, session)


async def readable_row(request: Request, session: str) -> tuple[Gateway, Session]:
    """The gateway and the session's row, for a reader allowed to see it (400/401/403/404 otherwise)."""
    gw, bound = reader(request, session)
    return gw, await row_for_reader(gw, session, bound)

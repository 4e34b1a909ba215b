"""Operations: liveness, readiness, Prometheus metrics, and the front page."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response

from .. import __version__
from ..errors import error_body
from .common import gateway, json_response

router = APIRouter(tags=["operations"])


def static_dir() -> Path:
    """The demo page and helper: ``sse_gateway/static`` in an installed wheel, ``static/`` in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "static", package.parent / "static"):
        if (candidate / "index.html").is_file():
            return candidate
    return candidate


@router.get("/healthz", summary="The process is alive")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="The store is reachable and the gateway takes traffic")
async def readyz(request: Request) -> Response:
    gw = gateway(request)
    if gw.draining:
        return json_response({"status": "draining"}, 503, {"Retry-After": "1"})
    try:
        await asyncio.wait_for(gw.log.ping(), 2.0)
    except Exception as exc:  # any failure of the store means not ready
        return Response(error_body("store_unavailable", f"the store is not reachable: {exc}"), 503,
                        {"Retry-After": "1"}, media_type="application/json")
    return json_response({"status": "ready", "backend": gw.settings.backend})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(gateway(request).metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", include_in_schema=False)
async def index() -> Response:
    page = static_dir() / "index.html"
    if not page.is_file():
        return json_response({"service": "sse-gateway", "version": __version__, "docs": "/docs"})
    return FileResponse(page)

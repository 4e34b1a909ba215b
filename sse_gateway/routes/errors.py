"""Every error is the gateway's JSON (``{"error": {"code", "message"}}``), whatever raised it.

``install`` hands FastAPI the handlers for the framework's own refusals
(unknown path, wrong method, a parameter it validated), for a client that
leaves mid-body (not a bug: logged at debug level) and for bugs;
``render``, ``client_gone`` and ``internal_error`` are what the hot-path
dispatcher uses for the same cases, so both paths answer alike.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match

from ..errors import GatewayError, error_body

log = logging.getLogger("sse_gateway")
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def render(request: Request, exc: GatewayError) -> Response:
    if exc.status == 401:
        gw = getattr(request.app.state, "gw", None)
        if gw is not None:
            gw.stats.auth_failures += 1
    return Response(exc.body(), exc.status, exc.headers, media_type="application/json")


def client_gone(request: Request) -> Response:
    """A client that left in the middle of its request body: not a bug, nobody reads the answer."""
    log.debug("client left during %s %s", request.method, request.url.path)
    return Response(error_body("client_disconnected", "the client left before its request body arrived"), 400,
                    media_type="application/json")


def internal_error(request: Request, exc: BaseException) -> Response:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(error_body("internal_error", "the gateway failed; this is a bug"), 500,
                    media_type="application/json")


def install(app: FastAPI) -> None:
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return render(request, exc)

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of the path, not only those of the first route that matched
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return Response(error_body(_HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail)),
                        exc.status_code, headers, media_type="application/json")

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return Response(error_body("invalid_request", f"{where}: {first.get('msg', 'invalid')}"), 400,
                        media_type="application/json")

    async def disconnected(request: Request, exc: ClientDisconnect) -> Response:
        return client_gone(request)

    async def unexpected(request: Request, exc: Exception) -> Response:
        return internal_error(request, exc)

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ClientDisconnect, disconnected)
    app.add_exception_handler(Exception, unexpected)


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route serves at this request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)

"""The hot paths: publishing and streaming, answered before FastAPI's and Starlette's layers.

Publishing runs for every event and a stream's task resumes through every
ASGI layer it was called through, once per wake-up: the router, FastAPI's
dependency solving, exit stack and telemetry, and Starlette's exception
layers were a fifth to a third of the CPU of publishing and of a
1,000-subscriber fan-out, and ~5 KB per idle stream. ``GatewayApp`` looks
``POST /v1/sessions/{id}/events`` and ``GET /v1/sessions/{id}/stream`` up
in ``HotPaths`` and calls the same endpoint functions the documented
routes use (so checks, errors and the OpenAPI description are the same),
rendering every error the way the rest of the app does: a
``GatewayError`` as its JSON, anything else as ``500 internal_error``.
What a stream's task keeps while it lives is only what it needs: not the
request object, not the split path, no frame of a lookup.

A request with an ``Origin`` header takes the ordinary path, so CORS
applies to it. Publishing keeps the two pure-ASGI layers every body-taking
request has (request timing, closing a connection whose body was left
unread); streams take none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..cors import FROM_PAGE, SiteGuard
from ..errors import GatewayError
from .errors import client_gone, internal_error, render

Endpoint = Callable[[str, Request], Awaitable[Response]]


class GatewayApp(FastAPI):
    """FastAPI, with ``guard`` (a ``cors.SiteGuard``) and then ``hot`` (a ``HotPaths``) first for every request."""

    hot: HotPaths | None = None
    guard: SiteGuard | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["app"] = self  # what Starlette would set: endpoints find the gateway through it
            if self.guard is not None and (refusal := self.guard.check(scope)) is not None:
                response = render(Request(scope, receive), refusal)
                response.headers["connection"] = "close"  # its body, if any, is never read
                await response(scope, receive, send)
                return
            if self.hot is not None and (hot := self.hot.route(scope)) is not None:
                await hot(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def endpoint_app(endpoint: Endpoint) -> ASGIApp:
    """An ASGI app calling ``endpoint(session_id, request)`` and rendering every error as JSON."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        response = await _answer(endpoint, scope, receive)
        try:
            await response(scope, receive, send)
        except Exception as exc:
            # A bug once the response has begun. A 500 can still be sent if nothing was; otherwise the
            # server refuses the second start and closes the connection, and the client resumes.
            with contextlib.suppress(Exception):
                await internal_error(Request(scope, receive), exc)(scope, receive, send)

    return app


async def _answer(endpoint: Endpoint, scope: Scope, receive: Receive) -> Response:
    """``endpoint``'s response, or its error as JSON. The request is not kept while the response runs
    (a stream's lasts as long as its connection)."""
    request = Request(scope, receive)
    try:
        return await endpoint(scope["path"].split("/")[3], request)
    except GatewayError as exc:
        return render(request, exc)
    except ClientDisconnect:
        return client_gone(request)
    except Exception as exc:  # a bug: still the gateway's JSON, never a plain-text 500
        return internal_error(request, exc)


class HotPaths:
    """``METHOD /v1/sessions/{id}/ACTION`` -> an ASGI app, for requests without an ``Origin``."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], ASGIApp] = {}

    def add(self, method: str, action: str, app: ASGIApp) -> None:
        self.routes[(method, action)] = app

    def route(self, scope: Scope) -> ASGIApp | None:
        """The app of the request if it is one of the hot routes. (Returned, not called here: a stream's
        task keeps every frame it was called through for as long as it lives.)"""
        parts = scope["path"].split("/")  # "", "v1", "sessions", id, action
        if len(parts) != 5 or parts[1] != "v1" or parts[2] != "sessions" or not parts[3]:
            return None
        if FROM_PAGE in scope:  # the site guard has looked at the headers already
            return None
        return self.routes.get((scope["method"], parts[4]))

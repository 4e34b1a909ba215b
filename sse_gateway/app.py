"""``create_app``: the gateway's ASGI app, assembled from its parts.

The routes live in ``routes/`` (one router per area), the process and its
background tasks in ``gateway.py``, body checks in ``bodies.py``. Publishing
and streaming are also answered by ``routes.dispatch.HotPaths`` before the
framework's layers; everything else goes through FastAPI.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from . import __version__, cors, demo, limits, openapi, routes
from .config import Settings
from .gateway import Gateway
from .log import make_log
from .log.base import EventLog
from .metrics import RequestTimer
from .routes import dispatch, errors
from .routes.operations import static_dir


def create_app(settings: Settings | None = None, event_log: EventLog | None = None, worker=None) -> FastAPI:
    """The app; ``worker`` (``workers.WorkerInfo``) when it serves as one of several processes."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        gw = Gateway(settings, event_log or make_log(settings), worker=worker)
        await gw.start()
        app.state.gw = gw
        try:
            yield
        finally:
            await gw.stop()

    # No trailing-slash redirects: /v1/sessions/%2F is an unknown path (404), not a 307 to another resource.
    app = dispatch.GatewayApp(title="sse-gateway", version=__version__, lifespan=lifespan, docs_url="/docs",
                              redoc_url=None, redirect_slashes=False,
                              description="Durable per-session event logs, streamed as Server-Sent Events "
                              "with exact Last-Event-ID resume.")
    app.openapi = lambda: openapi.describe(app, settings)
    errors.install(app)
    for router in routes.ROUTERS:
        app.include_router(router)
    if settings.demo:
        app.include_router(demo.router)
    static = static_dir()
    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")

    def stats():
        gw = getattr(app.state, "gw", None)
        return gw.stats if gw is not None else None

    app.add_middleware(RequestTimer, stats_of=stats)
    app.add_middleware(limits.CloseUnreadBody)
    cors.install(app, settings.cors_origin)

    app.guard = cors.SiteGuard(settings)
    app.hot = dispatch.HotPaths()
    app.hot.add("POST", "events", limits.CloseUnreadBody(RequestTimer(
        dispatch.endpoint_app(routes.publish.publish), stats_of=stats)))
    app.hot.add("GET", "stream", dispatch.endpoint_app(routes.stream.stream))
    return app

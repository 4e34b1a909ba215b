"""Publishing answered by the HTTP protocol itself, without an ASGI request.

Agents publish one token per request far more often than they batch, so a
publish's cost is mostly the server's per-request work: uvicorn's request
cycle and ASGI scope, the ``receive``/``send`` messages, Starlette's
request and response objects, the middleware that times and guards every
request. For the common publish (``POST /v1/sessions/{id}/events`` with a
``Content-Length``, a JSON or text body, no query, no ``Origin``, no
``Expect``, no pipelined request before it, the access log off) the
protocol (``protocol.GatewayProtocol``) hands the request here once its
headers are parsed: the headers are checked as the route checks them
(``publish.publish_headers``, the publisher key, the site guard), the body
is collected as it arrives (within ``--body-timeout``), and the same
``publish.append_body`` appends it; the answer is written to the transport
as one piece. The answer and every error are byte for byte what the route
gives (``tests/test_fast_publish.py`` compares the two); the request is
timed and counted as every other.

Whatever the headers do not make plain goes the usual way, through the
ASGI app, which answers it (with its error, if it is one): this path never
refuses anything itself, but a body that does not arrive in time (``408
body_timeout``, as the route answers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from .cors import FROM_PAGE
from .errors import GatewayError, RequestTimeout, error_body
from .models import dump_json
from .routes.common import publisher
from .routes.publish import PublishHeaders, append_body, publish_headers

if TYPE_CHECKING:
    from .protocol import GatewayProtocol

log = logging.getLogger("sse_gateway")
_PREFIX = b"/v1/sessions/"
_SUFFIX = b"/events"
_JSON = b"content-type: application/json\r\ncontent-length: %d\r\n"


class _Nothing:
    """uvicorn's protocol sets its cycle's ``message_event`` when the connection is lost: nobody waits here."""

    def set(self) -> None:
        pass


class _Headers:
    """What the route's checks read of a request: ``headers.get(name)`` (lower case) and ``app``."""

    __slots__ = ("app", "headers")

    def __init__(self, app: Any, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = headers


class FastPublish:
    """One publish in progress on a connection, in the place of uvicorn's request cycle (``protocol.cycle``)."""

    __slots__ = ("checked", "chunks", "disconnected", "keep_alive", "reading", "response_complete", "session",
                 "started", "timer")
    message_event = _Nothing()

    def __init__(self, session: str, checked: PublishHeaders, keep_alive: bool) -> None:
        self.session = session
        self.checked = checked
        self.keep_alive = keep_alive  # uvicorn's shutdown sets it False: the connection closes after the answer
        self.chunks: list[bytes] = []
        self.reading = True  # until the body is complete, or will never be
        self.response_complete = False
        self.disconnected = False  # uvicorn's connection_lost sets it
        self.started = time.perf_counter()
        self.timer: asyncio.TimerHandle | None = None


class FastPublisher:
    """Takes the plain publishes of one app's connections (module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app  # dispatch.GatewayApp: its guard, and its gateway once started

    def take(self, proto: GatewayProtocol) -> FastPublish | None:
        """A ``FastPublish`` for the request whose headers ``proto`` has just parsed, or None: the usual way."""
        parser = proto.parser
        url = proto.url
        if (parser.get_method() != b"POST" or not url.startswith(_PREFIX) or not url.endswith(_SUFFIX)
                or proto.expect_100_continue or proto.access_log or parser.get_http_version() != "1.1"
                or (proto.cycle is not None and not proto.cycle.response_complete)):
            return None
        session = url[len(_PREFIX):-len(_SUFFIX)]
        if not session or b"/" in session or b"?" in session or b"%" in session or b"#" in session:
            return None
        gw = getattr(self.app.state, "gw", None)
        if gw is None:
            return None
        scope = proto.scope
        scope["method"] = "POST"  # what the site guard reads (the usual way sets it again)
        guard = self.app.guard
        if guard is not None and (guard.check(scope) is not None or FROM_PAGE in scope):
            return None  # refused, or a page's request (CORS applies)
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        length = headers.get("content-length")
        if length is None or not length.isdigit() or int(length) > gw.settings.max_body_bytes \
                or "transfer-encoding" in headers:
            return None
        request = _Headers(self.app, headers)
        session_id = session.decode("ascii")
        try:
            publisher(request, session_id)
            checked = publish_headers(request, b"")
        except GatewayError:
            return None
        if checked.kind == "application/x-ndjson":
            return None
        return FastPublish(session_id, checked, parser.should_keep_alive())

    def body_arrived(self, proto: GatewayProtocol, fast: FastPublish) -> None:
        """The whole body is in: append it and answer."""
        fast.reading = False
        if fast.timer is not None:
            fast.timer.cancel()
            fast.timer = None
        task = proto.loop.create_task(self._answer(proto, fast))
        proto.tasks.add(task)  # a draining server waits for it
        task.add_done_callback(proto.tasks.discard)

    def lost(self, fast: FastPublish) -> None:
        """The connection was lost: a body still arriving never will (a whole one is still appended)."""
        if fast.reading:
            fast.reading = False
            if fast.timer is not None:
                fast.timer.cancel()
                fast.timer = None

    def body_pending(self, proto: GatewayProtocol, fast: FastPublish) -> None:
        """Part of the body is still to come: it has ``--body-timeout`` seconds from now."""
        if fast.timer is None:
            timeout = self.app.state.gw.settings.body_timeout
            fast.timer = proto.loop.call_later(timeout, self._too_slow, proto, fast, timeout)

    def _too_slow(self, proto: GatewayProtocol, fast: FastPublish, timeout: float) -> None:
        fast.timer = None
        if fast.reading:
            fast.reading = False
            fast.keep_alive = False  # the rest of the body is never read
            err = RequestTimeout(f"the request body did not arrive within {timeout:g} s", "body_timeout")
            self._count_rejected()
            self._respond(proto, fast, err.status, err.body(), err.headers)

    async def _answer(self, proto: GatewayProtocol, fast: FastPublish) -> None:
        headers: dict[str, str] = {}
        try:
            answer, status = await append_body(self.app.state.gw, fast.session, fast.checked, b"".join(fast.chunks))
            body = dump_json(answer).encode()
        except GatewayError as exc:
            self._count_rejected()
            status, body, headers = exc.status, exc.body(), exc.headers
        except Exception as exc:  # a bug: still the gateway's JSON, as the route answers it
            log.error("unexpected error on POST /v1/sessions/%s/events", fast.session, exc_info=exc)
            status, body = 500, error_body("internal_error", "the gateway failed; this is a bug")
        self._respond(proto, fast, status, body, headers)

    def _count_rejected(self) -> None:
        self.app.state.gw.stats.publish_rejected += 1

    def _respond(self, proto: GatewayProtocol, fast: FastPublish, status: int, body: bytes,
                 headers: dict[str, str]) -> None:
        self.app.state.gw.stats.observe_request("publish", status, time.perf_counter() - fast.started)
        fast.response_complete = True
        transport = proto.transport
        if transport.is_closing():
            return
        head = [STATUS_LINE[status]]
        for name, value in proto.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        for name, value in headers.items():
            head += (name.lower().encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
        head.append(_JSON % len(body))
        if not fast.keep_alive:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", body)
        transport.write(b"".join(head))
        if not fast.keep_alive:
            transport.close()
        proto.on_response_complete()

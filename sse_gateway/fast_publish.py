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
from .errors import GatewayError, error_body
from .limits import body_too_slow
from .models import dump_json
from .routes.common import publisher
from .routes.publish import PublishHeaders, append_body, publish_headers

if TYPE_CHECKING:
    from .protocol import GatewayProtocol

log = logging.getLogger("sse_gateway")
_PREFIX = b"/v1/sessions/"
_SUFFIX = b"/events"
_JSON = b"content-type: application/json\r\ncontent-length: %d\r\n"
#: publishes one connection may have read ahead (pipelined), appended one after another; a request beyond goes
#: the usual way, for which uvicorn stops reading the connection until the answers before it are sent
MAX_PIPELINED = 32
_BODIES = ("application/json", "text/plain")


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

    __slots__ = ("answer", "appending", "checked", "chunks", "disconnected", "keep_alive", "reading",
                 "response_complete", "session", "since", "timer")
    message_event = _Nothing()

    def __init__(self, session: str, checked: PublishHeaders, keep_alive: bool) -> None:
        self.session = session
        self.checked = checked
        self.keep_alive = keep_alive  # uvicorn's shutdown sets it False: the connection closes after the answer
        self.chunks: list[bytes] = []
        self.reading = True  # until the body is complete, or will never be
        self.response_complete = False
        self.disconnected = False  # uvicorn's connection_lost sets it
        self.since = time.perf_counter()
        self.appending = False  # its append has begun (it is the first of its connection's not yet answered)
        self.timer: asyncio.TimerHandle | None = None
        self.answer: bytes | None = None  # the response, once ready; written when those before it are


class FastPublisher:
    """Takes the plain publishes of one app's connections (module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app  # dispatch.GatewayApp: its guard, and its gateway once started

    def take(self, proto: GatewayProtocol) -> FastPublish | None:
        """A ``FastPublish`` for the request whose headers ``proto`` has just parsed, or None: the usual way."""
        parser = proto.parser
        url = proto.url
        if (parser.get_method() != b"POST" or not url.startswith(_PREFIX) or not url.endswith(_SUFFIX)
                or proto.expect_100_continue or proto.access_log or parser.get_http_version() != "1.1"):
            return None
        queue = proto.fast_queue
        if proto.cycle is not None and not proto.cycle.response_complete and (
                not queue or proto.cycle is not queue[-1] or len(queue) >= MAX_PIPELINED):
            return None  # behind a request of the usual way, or too many: uvicorn queues it and stops reading
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
        if checked.kind not in _BODIES:
            return None  # NDJSON (streamed), or not a body publish takes
        fast = FastPublish(session_id, checked, parser.should_keep_alive())
        if queue is None:
            queue = proto.fast_queue = []  # (a connection that never publishes, a stream's, has none)
        queue.append(fast)
        return fast

    def body_arrived(self, proto: GatewayProtocol, fast: FastPublish) -> None:
        """The whole body is in: append it and answer, once the requests before it on the connection are."""
        fast.reading = False
        if fast.timer is not None:
            fast.timer.cancel()
            fast.timer = None
        if proto.fast_queue[0] is fast:
            self._append(proto, fast)

    def _append(self, proto: GatewayProtocol, fast: FastPublish) -> None:
        # One at a time per connection, as uvicorn serves pipelined requests: a publisher that pipelines
        # gets its events appended in the order it sent them, whatever happens to any of them.
        fast.appending = True
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
            err = body_too_slow(timeout)
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
        self.app.state.gw.stats.observe_request("publish", status, time.perf_counter() - fast.since)
        head = [STATUS_LINE[status]]
        for name, value in proto.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        for name, value in headers.items():
            head += (name.lower().encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
        head.append(_JSON % len(body))
        if not fast.keep_alive:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", body)
        fast.answer = b"".join(head)
        self._flush(proto)

    def _flush(self, proto: GatewayProtocol) -> None:
        """Write the answers that are ready, in the order their requests came (HTTP/1.1 pipelining), and begin
        the next append."""
        queue = proto.fast_queue
        transport = proto.transport
        while queue and queue[0].answer is not None:
            fast = queue.pop(0)
            fast.response_complete = True
            proto.server_state.total_requests += 1
            if not transport.is_closing():
                transport.write(fast.answer)
                if not fast.keep_alive:
                    transport.close()
            fast.answer = b""
        if not queue:
            proto.next_request()
        elif not (head := queue[0]).reading and not head.appending and head.answer is None \
                and not transport.is_closing():
            self._append(proto, head)

"""Errors the gateway answers with, and their JSON form.

Every error a client can see is a ``GatewayError``; the HTTP layer turns it
into ``{"error": {"code": ..., "message": ...}}`` with its status::

    GatewayError                      (status, code, message, headers)
    ├── BadRequest          400       invalid_session_id, invalid_cursor, invalid_json, json_too_deep, ...
    ├── Unauthorized        401       missing or bad credentials
    ├── Forbidden           403       credentials that do not reach this session; cross_site_refused,
    │   │                             host_not_allowed (cors.SiteGuard)
    │   └── NotConfigured   403       tokens_not_configured: what this deployment is not set up to do
    ├── NotFound            404       session_not_found, not_found
    ├── RequestTimeout      408       body_timeout, line_timeout (a body that trickles in)
    ├── Conflict            409       session_exists, session_completed
    ├── PreconditionFailed  412       state_version_mismatch
    ├── TooLarge            413       event_too_large, batch_too_large, body_too_large, ...
    ├── UnsupportedMedia    415       unsupported_media_type
    └── Overloaded                    (try again later: always with Retry-After)
        ├── TooManyRequests 429       too_many_streams_for_session, too_many_demo_runs
        └── Unavailable     503       store_unavailable, draining, too_many_streams, too_many_sessions

The event log raises these too (a completed session, a stale state
version), so the HTTP layer never has to translate storage exceptions.
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, code: str | None = None, *, headers: dict[str, str] | None = None,
                 extra: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.extra)


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class Unauthorized(GatewayError):
    status = 401
    code = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    code = "session_not_found"


class Conflict(GatewayError):
    status = 409
    code = "conflict"


class RequestTimeout(GatewayError):
    """The body did not arrive in time; the connection is closed after the answer."""

    status = 408
    code = "request_timeout"

    def __init__(self, message: str, code: str | None = None, **kw) -> None:
        super().__init__(message, code, **kw)
        self.headers.setdefault("Connection", "close")


class PreconditionFailed(GatewayError):
    status = 412
    code = "state_version_mismatch"


class TooLarge(GatewayError):
    status = 413
    code = "too_large"


class UnsupportedMedia(GatewayError):
    status = 415
    code = "unsupported_media_type"


class Overloaded(GatewayError):
    """A limit was reached for now: the answer says when to try again (``Retry-After``)."""

    def __init__(self, message: str, code: str | None = None, *, retry_after: int = 1, **kw) -> None:
        super().__init__(message, code, **kw)
        self.headers.setdefault("Retry-After", str(retry_after))


class TooManyRequests(Overloaded):
    status = 429
    code = "too_many_requests"


class NotConfigured(Forbidden):
    """A request this deployment's configuration does not allow; the message says what to configure.

    A 4xx, not a 5xx: nothing failed, and clients, monitors and fuzzers read every 5xx as a failure.
    """

    code = "not_configured"


class Unavailable(Overloaded):
    status = 503
    code = "unavailable"


def error_body(code: str, message: str, extra: dict | None = None) -> bytes:
    body: dict = {"error": {"code": code, "message": message}}
    if extra:
        body.update(extra)
    return orjson.dumps(body)

"""Cross-origin access: none by default; ``--cors-origin`` names the sites whose pages may call the gateway.

Credentials (the ``sse_gateway_token`` cookie, ``EventSource(url,
{withCredentials: true})``) are allowed for origins named one by one, never
with ``*``: a wildcard that also allowed credentials would let any site
read with its visitors' cookies. A refused preflight gets the gateway's
JSON error like every other refusal.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from .errors import error_body

METHODS = ["GET", "POST", "PUT", "DELETE"]
HEADERS = ["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key", "If-Match"]
EXPOSED = ["ETag", "Retry-After"]


class _CORS(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        return Response(error_body("cors_refused", bytes(response.body).decode()), 400, headers,
                        media_type="application/json")


def install(app: FastAPI, origins: tuple[str, ...]) -> None:
    """Allow ``origins`` (nothing if empty)."""
    if origins:
        app.add_middleware(_CORS, allow_origins=list(origins), allow_credentials="*" not in origins,
                           allow_methods=METHODS, allow_headers=HEADERS, expose_headers=EXPOSED)

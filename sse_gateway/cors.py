"""Cross-origin access: none by default; ``--cors-origin`` names the sites whose pages may call the gateway.

Credentials (the ``sse_gateway_token`` cookie, ``EventSource(url,
{withCredentials: true})``) are allowed for origins named one by one, never
with ``*``: a wildcard that also allowed credentials would let any site
read with its visitors' cookies. A refused preflight gets the gateway's
JSON error like every other refusal.

CORS only governs what a page may *read*; a browser sends some writes
(a form, a ``text/plain`` POST) to any address without asking first. So
``SiteGuard`` refuses, before any route runs:

* a write (POST, PUT, PATCH, DELETE) from a page whose ``Origin`` is neither
  the gateway's own nor one of ``--cors-origin``: ``403 cross_site_refused``;
* on a gateway without publisher keys that listens on loopback (open,
  meant for one machine), a request whose ``Host`` is a name other than
  ``localhost`` (or a name of ``--allowed-host``): ``403 host_not_allowed``.
  A page of any site can make its own name resolve to 127.0.0.1 (DNS
  rebinding) and would then be same-origin with the gateway; IP addresses
  cannot be rebound;
* two ``Host`` or two ``Origin`` headers: ``400 invalid_http``.

A read from a page of another site is served (CORS decides what the page
may see) but has no side effect: its cursor is not taken as an ack.
Clients that are not browsers send no ``Origin`` and are not affected.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import Scope

from .config import Settings
from .errors import BadRequest, Forbidden, GatewayError, error_body

METHODS = ["GET", "POST", "PUT", "DELETE"]
HEADERS = ["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key", "If-Match", "Producer-Epoch"]
EXPOSED = ["ETag", "Retry-After", "Producer-Epoch"]


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


_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_host(host: str) -> tuple[str, int | None]:
    """``name:port`` (or ``[v6]:port``) as a lower-case name and a port (None when absent or unreadable)."""
    name, port = host.lower(), None
    if name.startswith("["):
        name, _, rest = name[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif name.count(":") == 1:
        name, port = name.split(":")
    return name, int(port) if port and port.isdigit() else None


def _is_local_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


CROSS_SITE = "sse_gateway.cross_site"  # set in the scope of a read from a page of a site not allowed
FROM_PAGE = "sse_gateway.from_page"  # set in the scope of a request with an Origin: a web page sent it


class SiteGuard:
    """Refuses cross-site writes and, on an open gateway, names that may have been rebound (module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.origins = frozenset(o.lower() for o in settings.cors_origin)
        self.any_origin = "*" in self.origins
        # A gateway without keys that listens beyond this machine is open to the network by choice (--insecure).
        self.check_host = not settings.publish_keys and settings.loopback and "*" not in settings.allowed_host
        self.hosts = frozenset(h.lower() for h in settings.allowed_host)
        self._host_names: dict[str, str | None] = {}  # Host header -> the name refused, or None (a few per gateway)

    def check(self, scope: Scope) -> GatewayError | None:
        """The refusal for this request, or None. A read from a page of another site is marked ``CROSS_SITE``
        in the scope: it is served (CORS decides what the page may see) but has no side effect (no ack)."""
        host = origin = fetch_site = None
        for name, value in scope["headers"]:
            if name == b"host" or name == b"origin":
                if (host if name == b"host" else origin) is not None:
                    return BadRequest(f"two {name.decode()} headers", "invalid_http")
                if name == b"host":
                    host = value.decode("latin-1")
                else:
                    origin = value.decode("latin-1")
            elif name == b"sec-fetch-site":
                fetch_site = value
        if self.check_host and host is not None and (name := self._refused_name(host)) is not None:
            return Forbidden(f"this gateway has no publisher keys and answers only to localhost and IP "
                             f"addresses, not {name[:100]!r}; start it with --allowed-host {name[:100]} "
                             "or with --publish-key", "host_not_allowed")
        if origin is not None:
            scope[FROM_PAGE] = True  # read by the fast paths and the JSON body rule: no second scan of the headers
        if origin is not None and not self._allowed(origin, host):
            if scope["method"] in _WRITES:
                return Forbidden(f"a page of {origin[:100]} may not write to this gateway; list the site with "
                                 "--cors-origin", "cross_site_refused")
            scope[CROSS_SITE] = True
        elif origin is None and fetch_site == b"cross-site" and not self.any_origin:
            scope[CROSS_SITE] = True  # an <img> or a link of another site: no Origin, but the browser says so
        return None

    def _refused_name(self, host: str) -> str | None:
        """The name of ``host`` if this gateway must not answer to it, else None; remembered per Host value
        (every request carries one, and parsing an IP address costs more than the rest of the check)."""
        try:
            return self._host_names[host]
        except KeyError:
            pass
        name = _split_host(host)[0]
        refused = None if _is_local_name(name) or name in self.hosts else name
        if len(self._host_names) >= 256:  # a client cycling through Host values cannot grow this
            self._host_names.clear()
        self._host_names[host] = refused
        return refused

    def _allowed(self, origin: str, host: str | None) -> bool:
        origin = origin.lower()
        if self.any_origin or origin in self.origins:
            return True
        parts = urllib.parse.urlsplit(origin)
        if host is None or parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            return False  # "null" (a sandboxed page, a file) and other schemes are never the gateway's own page
        try:
            origin_port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            return False
        host_name, host_port = _split_host(host)
        return host_name == parts.hostname and (host_port or _DEFAULT_PORTS[parts.scheme]) == origin_port

"""Who may do what: publisher keys and subscribe tokens.

* **Publisher keys** (``--publish-key``) guard publishing and session
  administration. Compared in constant time.
* **Subscribe tokens** are HS256 JWTs signed with ``--token-secret``,
  with ``sub`` = the session id and an ``exp``. A token reads exactly one
  session. It is accepted as ``Authorization: Bearer``, as ``?token=``
  (EventSource cannot set headers) or as the ``sse_gateway_token`` cookie.
  A publisher key reads every session.

With no keys configured the gateway is open (and listens on loopback only,
unless ``--insecure``).
"""

from __future__ import annotations

import hmac
import time

import jwt
from starlette.requests import Request

from .errors import Forbidden, Unauthorized

COOKIE = "sse_gateway_token"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="sse-gateway"'}


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class Auth:
    def __init__(self, keys: tuple[str, ...] = (), secret: str | None = None, ttl: int = 3600) -> None:
        self.keys = tuple(k.encode() for k in keys if k)
        self.secret = secret
        self.ttl = ttl

    @property
    def open(self) -> bool:
        return not self.keys

    def _is_key(self, credential: str) -> bool:
        given = credential.encode()
        found = False
        for key in self.keys:  # compare with every key, so timing tells nothing about which matched
            found |= hmac.compare_digest(given, key)
        return found

    def publisher(self, request: Request) -> None:
        """Raise 401 unless the request carries a publisher key (or none are configured)."""
        if not self.keys:
            return
        credential = _bearer(request)
        if credential is None:
            raise Unauthorized("this gateway needs a publisher key: Authorization: Bearer KEY",
                               "missing_credentials", headers=_CHALLENGE)
        if not self._is_key(credential):
            raise Unauthorized("the publisher key is not valid", "invalid_credentials", headers=_CHALLENGE)

    def reader(self, request: Request, session: str) -> None:
        """Raise 401/403 unless the request may read ``session``."""
        if not self.keys and not self.secret:
            return
        credential = _bearer(request) or request.query_params.get("token") or request.cookies.get(COOKIE)
        if not credential:
            if not self.keys:
                return  # tokens are minted, but reading without one is open like everything else
            raise Unauthorized("reading needs a subscribe token or a publisher key", "missing_credentials",
                               headers=_CHALLENGE)
        if self.keys and self._is_key(credential):
            return
        if not self.secret:
            raise Unauthorized("the credentials are not valid", "invalid_credentials", headers=_CHALLENGE)
        try:
            claims = jwt.decode(credential, self.secret, algorithms=["HS256"],
                                options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the subscribe token has expired", "token_expired", headers=_CHALLENGE) from None
        except jwt.PyJWTError:
            raise Unauthorized("the subscribe token is not valid", "invalid_token", headers=_CHALLENGE) from None
        if claims.get("sub") != session:
            raise Forbidden("the subscribe token is for another session", "wrong_session")

    def mint(self, session: str, ttl: int | None = None) -> tuple[str, int] | None:
        """A subscribe token for ``session`` and its expiry (Unix seconds), or None without a secret."""
        if not self.secret:
            return None
        exp = int(time.time()) + (ttl or self.ttl)
        return jwt.encode({"sub": session, "exp": exp, "scope": "subscribe"}, self.secret, algorithm="HS256"), exp

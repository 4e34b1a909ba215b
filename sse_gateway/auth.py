"""Who may do what: publisher keys and subscribe tokens.

* **Publisher keys** (``--publish-key``) guard publishing and session
  administration, and read every session. They are accepted only as
  ``Authorization: Bearer KEY``: never from a query string or a cookie,
  where they would end up in logs, browser history and other sites'
  requests. Compared in constant time (digests of equal length, every key
  compared).
* **Subscribe tokens** are HS256 JWTs signed with ``--token-secret``, with
  ``sub`` = the session id, ``scope`` = ``subscribe`` (or a list of scopes:
  ``["subscribe", "input"]`` also lets the token's holder send input to the
  session, ``POST /v1/sessions/{id}/input``), an ``exp`` and,
  when the session exists as it is minted, ``ep`` = its epoch. A token
  reads exactly one session and nothing else: with ``ep``, not even a
  session deleted and created again under the same id (``check_life``).
  It is accepted as
  ``Authorization: Bearer``, as ``?token=`` (EventSource cannot set
  headers) or as the ``sse_gateway_token`` cookie. Only HS256 is accepted,
  so ``alg: none`` and algorithm-confusion tokens are refused.

Credentials are checked on every request, so a reconnect with an expired
token gets ``401``, which makes EventSource stop. With no keys configured
the gateway is open (and listens on loopback only, unless ``--insecure``);
if it has a token secret, tokens that are presented anyway are still checked.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import jwt
from starlette.requests import Request

from .errors import Forbidden, Unauthorized

COOKIE = "sse_gateway_token"
SCOPE = "subscribe"
INPUT_SCOPE = "input"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="sse-gateway"'}


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class Auth:
    def __init__(self, keys: tuple[str, ...] = (), secret: str | None = None, ttl: int = 3600) -> None:
        self.keys = tuple(_digest(k) for k in keys)  # empty keys never get here (Settings refuses them)
        self.secret = secret
        self.ttl = ttl

    def _is_key(self, credential: str) -> bool:
        given = _digest(credential)
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
            raise Unauthorized("this needs a publisher key: Authorization: Bearer KEY", "missing_credentials",
                               headers=_CHALLENGE)
        if not self._is_key(credential):
            raise Unauthorized("the publisher key is not valid", "invalid_credentials", headers=_CHALLENGE)

    def reader(self, request: Request, session: str) -> str | None:
        """Raise 401/403 unless the request may read ``session``; the epoch its token is bound to, if any
        (pass it to ``check_life`` with the session's row)."""
        return self._token_holder(request, session, SCOPE)

    def sender(self, request: Request, session: str) -> str | None:
        """Raise 401/403 unless the request may send input to ``session`` (a publisher key, or a token
        whose scopes include ``input``); the epoch its token is bound to, if any."""
        return self._token_holder(request, session, INPUT_SCOPE)

    def _token_holder(self, request: Request, session: str, scope: str) -> str | None:
        if not self.keys and not self.secret:
            return None  # wide open: there is nothing to check credentials against
        bearer = _bearer(request)
        if bearer is not None and self.keys and self._is_key(bearer):
            return None
        token = bearer or request.query_params.get("token") or request.cookies.get(COOKIE)
        if not token:
            if not self.keys:
                return None  # no keys: reading is open like everything else
            raise Unauthorized("reading needs a subscribe token or a publisher key", "missing_credentials",
                               headers=_CHALLENGE)
        if not self.secret:
            raise Unauthorized("the credentials are not valid", "invalid_credentials", headers=_CHALLENGE)
        try:
            claims = jwt.decode(token, self.secret, algorithms=["HS256"],
                                options={"require": ["exp", "sub", "scope"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the subscribe token has expired", "token_expired", headers=_CHALLENGE) from None
        except jwt.PyJWTError:
            raise Unauthorized("the subscribe token is not valid", "invalid_token", headers=_CHALLENGE) from None
        scopes = token_scopes(claims["scope"])
        if SCOPE not in scopes:
            raise Unauthorized("the token is not a subscribe token", "invalid_token", headers=_CHALLENGE)
        if claims["sub"] != session:
            raise Forbidden("the subscribe token is for another session", "wrong_session")
        if scope not in scopes:
            raise Forbidden(f"the subscribe token does not allow {scope} (mint one with \"scopes\": "
                            f"[\"subscribe\", \"{scope}\"])", "insufficient_scope")
        epoch = claims.get("ep")
        return epoch if isinstance(epoch, str) else None

    def mint(self, session: str, ttl: int | None = None, epoch: str | None = None,
             scopes: tuple[str, ...] = (SCOPE,)) -> tuple[str, int] | None:
        """A subscribe token for ``session`` (bound to its life ``epoch`` if given) and its expiry (Unix
        seconds), or None without a secret. ``scopes`` beyond ``subscribe`` are written as a list; a token of
        ``subscribe`` alone keeps the string form every earlier gateway reads."""
        if not self.secret:
            return None
        exp = int(time.time()) + (ttl or self.ttl)
        claims = {"sub": session, "exp": exp, "scope": SCOPE if tuple(scopes) == (SCOPE,) else list(scopes)}
        if epoch is not None:
            claims["ep"] = epoch
        return jwt.encode(claims, self.secret, algorithm="HS256"), exp


def token_scopes(claim: object) -> frozenset[str]:
    """The scopes of a token's ``scope`` claim: a string (space-separated, as OAuth writes them) or a list."""
    if isinstance(claim, str):
        return frozenset(claim.split())
    if isinstance(claim, list) and all(isinstance(s, str) for s in claim):
        return frozenset(claim)
    return frozenset()


def check_life(bound: str | None, epoch: str) -> None:
    """403 if a token bound to one life of a session (``bound``) is used on another (``epoch``)."""
    if bound is not None and bound != epoch:
        raise Forbidden("the subscribe token is for an earlier life of this session (it was deleted and "
                        "created again)", "wrong_session")

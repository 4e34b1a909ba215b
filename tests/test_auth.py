"""Who may do what: publisher keys, subscribe tokens, safe defaults, CORS, logs.

In process (tests/conftest.py ``start_app``), except what needs the real ``serve``: its access log,
its refusal to listen, the warnings it prints at start.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time

import httpx
import jwt
import pytest
from conftest import ROOT, free_port
from util import wait_until

pytestmark = pytest.mark.timeout(60)

KEY = "pk-" + "k" * 40
KEY2 = "pk2-" + "q" * 40
SECRET = "ts-" + "s" * 40
AS_PUBLISHER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def gw(start_module_app):
    """Two publisher keys and a token secret."""
    return start_module_app(token_secret=SECRET, publish_key=(KEY, KEY2), heartbeat=1)


@pytest.fixture
def c(gw):
    with gw.client(timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def served(start_module_gateway):
    """The real ``serve``: keys from the environment (comma-separated) and an access log that must stay clean."""
    return start_module_gateway("--token-secret", SECRET, "--access-log", "--heartbeat", "1",
                                env={"SSE_GATEWAY_PUBLISH_KEY": f"{KEY}, {KEY2}"})


def token_for(session: str, *, ttl: int = 300, secret: str = SECRET, **claims) -> str:
    return jwt.encode({"sub": session, "exp": int(time.time()) + ttl, "scope": "subscribe", **claims}, secret,
                      algorithm="HS256")


def input_token_for(session: str) -> str:
    """A token minted with ``{"scopes": ["subscribe", "input"]}``: it reads the session and sends it input."""
    return token_for(session, scope=["subscribe", "input"])


def b64(data: dict | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def sign(claims: dict, secret: str = SECRET, alg: str = "HS256") -> str:
    """A JWT signed by hand, for claims a JWT library would refuse to encode."""
    signing_input = f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims)}"
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    return f"{signing_input}.{b64(hmac.new(secret.encode(), signing_input.encode(), digest).digest())}"


def seed(c: httpx.Client, session: str) -> None:
    assert c.post(f"/v1/sessions/{session}/events", json=[{"data": 1}, {"data": 2}],
                  headers=AS_PUBLISHER).status_code == 201


def snapshot(c: httpx.Client, session: str) -> dict | None:
    r = c.get(f"/v1/sessions/{session}", headers=AS_PUBLISHER)
    if r.status_code == 404:
        return None
    row = r.json()
    return {k: row[k] for k in ("epoch", "status", "last_id", "earliest_id", "acked_id", "state_version",
                                "input_last_id", "input_acked_id")}


# -- the matrix: every endpoint, every kind of credential ----------------------------------

#: name -> (method, path, request arguments, who may call it, status when allowed)
ENDPOINTS = {
    "publish": ("POST", "/v1/sessions/{s}/events", {"json": {"data": 3}}, "publisher", 201),
    "create": ("POST", "/v1/sessions", {"json": {"id": "{s}-new"}}, "publisher", 201),
    "put_session": ("PUT", "/v1/sessions/{s}", {}, "publisher", 200),
    "list": ("GET", "/v1/sessions", {}, "publisher", 200),
    "delete": ("DELETE", "/v1/sessions/{s}", {}, "publisher", 204),
    "complete": ("POST", "/v1/sessions/{s}/complete", {"json": {"result": "r"}}, "publisher", 200),
    "lease": ("POST", "/v1/sessions/{s}/lease", {"json": {"seconds": 60}}, "publisher", 200),
    "put_state": ("PUT", "/v1/sessions/{s}/state", {"json": {"step": 1}}, "publisher", 200),
    "trim": ("POST", "/v1/sessions/{s}/trim", {"json": {"through": 1}}, "publisher", 200),
    "tokens": ("POST", "/v1/sessions/{s}/tokens", {"json": {"ttl_seconds": 60}}, "publisher", 201),
    "stream": ("GET", "/v1/sessions/{s}/stream", {"params": {"live": "false"}}, "reader", 200),
    "history": ("GET", "/v1/sessions/{s}/events", {}, "reader", 200),
    "get_session": ("GET", "/v1/sessions/{s}", {}, "reader", 200),
    "get_state": ("GET", "/v1/sessions/{s}/state", {}, "reader", 200),
    "ack": ("POST", "/v1/sessions/{s}/ack", {"json": {"id": 1}}, "reader", 200),
    "send_input": ("POST", "/v1/sessions/{s}/input", {"json": {"kind": "message", "data": "hi"}}, "sender", 201),
    "read_input": ("GET", "/v1/sessions/{s}/input", {}, "publisher", 200),
    "input_stream": ("GET", "/v1/sessions/{s}/input/stream", {"params": {"live": "false"}}, "publisher", 200),
    "input_ack": ("POST", "/v1/sessions/{s}/input/ack", {"json": {"id": 0}}, "publisher", 200),
    "demo_run": ("POST", "/v1/demo/runs", {"json": {"duration": 1}}, "publisher", 201),
}
PUBLIC = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}

#: credential -> (status, error code) for publisher endpoints, for reader endpoints, and for input senders;
#: None: allowed
CREDENTIALS = {
    "none": ((401, "missing_credentials"), (401, "missing_credentials"), (401, "missing_credentials")),
    "wrong_key": ((401, "invalid_credentials"), (401, "invalid_token"), (401, "invalid_token")),
    "basic_scheme": ((401, "missing_credentials"), (401, "missing_credentials"), (401, "missing_credentials")),
    "right_key": (None, None, None),
    "second_key": (None, None, None),
    "token": ((401, "invalid_credentials"), None, (403, "insufficient_scope")),
    "input_token": ((401, "invalid_credentials"), None, None),
    "token_other_session": ((401, "invalid_credentials"), (403, "wrong_session"), (403, "wrong_session")),
    "input_token_other_session": ((401, "invalid_credentials"), (403, "wrong_session"), (403, "wrong_session")),
    "key_in_query": ((401, "missing_credentials"), (401, "invalid_token"), (401, "invalid_token")),
    "key_in_cookie": ((401, "missing_credentials"), (401, "invalid_token"), (401, "invalid_token")),
}
ROLES = {"publisher": 0, "reader": 1, "sender": 2}


def credential(kind: str, session: str) -> dict:
    """httpx arguments that present credential ``kind`` for ``session``."""
    return {
        "none": {},
        "wrong_key": {"headers": {"Authorization": "Bearer " + "x" * 43}},
        "basic_scheme": {"headers": {"Authorization": f"Basic {KEY}"}},
        "right_key": {"headers": AS_PUBLISHER},
        "second_key": {"headers": {"Authorization": f"Bearer {KEY2}"}},
        "token": {"headers": {"Authorization": f"Bearer {token_for(session)}"}},
        "input_token": {"headers": {"Authorization": f"Bearer {input_token_for(session)}"}},
        "token_other_session": {"headers": {"Authorization": f"Bearer {token_for(session + '-other')}"}},
        "input_token_other_session": {"headers": {"Authorization": f"Bearer {input_token_for(session + '-other')}"}},
        "key_in_query": {"params": {"token": KEY}},
        "key_in_cookie": {"headers": {"Cookie": f"sse_gateway_token={KEY}"}},
    }[kind]


def test_every_operation_is_in_the_matrix(c):
    """A new route fails here until someone decides who may call it."""
    ops = {(m, p) for p, item in c.get("/openapi.json").json()["paths"].items() for m in item}
    table = {(m.lower(), p.replace("{s}", "{session}")) for m, p, *_ in ENDPOINTS.values()}
    assert ops == table | PUBLIC


@pytest.mark.parametrize("kind", CREDENTIALS)
@pytest.mark.parametrize("name", ENDPOINTS)
def test_auth_matrix(c, name, kind):
    method, path, args, role, ok = ENDPOINTS[name]
    session = f"m-{name}-{kind}".replace("_", "-")
    seed(c, session)
    before = snapshot(c, session)
    args = json.loads(json.dumps(args).replace("{s}", session))
    cred = credential(kind, session)
    kwargs = {**args, **cred, "params": {**args.get("params", {}), **cred.get("params", {})}}
    r = c.request(method, path.replace("{s}", session), **kwargs)
    expected = CREDENTIALS[kind][ROLES[role]]
    if expected is None:
        assert r.status_code == ok, r.text
        return
    status, code = expected
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert snapshot(c, session) == before  # nothing changed
    assert snapshot(c, f"{session}-new") is None


# -- subscribe tokens -----------------------------------------------------------------------


def test_created_session_comes_with_a_token_that_reads_it_by_header_query_and_cookie(c):
    r = c.post("/v1/sessions", json={"id": "tok-a"}, headers=AS_PUBLISHER)
    assert r.status_code == 201
    body = r.json()
    token = body["subscribe_token"]
    assert body["stream_url"] == f"/v1/sessions/tok-a/stream?token={token}"
    assert body["token_expires_at"].endswith("Z")
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["sub"] == "tok-a"
    seed(c, "tok-a")
    for args in ({"headers": {"Authorization": f"Bearer {token}"}}, {"params": {"token": token}},
                 {"headers": {"Cookie": f"sse_gateway_token={token}"}}):
        r = c.get("/v1/sessions/tok-a/stream", **{**args, "params": {"live": "false", **args.get("params", {})}})
        assert r.status_code == 200 and r.text.count("\nid: ") == 2, r.text
    r = c.get(body["stream_url"] + "&live=false")  # the URL as given, for EventSource
    assert r.status_code == 200


def test_tokens_endpoint(c):
    r = c.post("/v1/sessions/tok-b/tokens", headers=AS_PUBLISHER)
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"token", "expires_at", "stream_url"}
    claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == "tok-b" and claims["scope"] == "subscribe"
    assert 3500 <= claims["exp"] - time.time() <= 3601  # --token-ttl's default
    r = c.post("/v1/sessions/tok-b/tokens", json={"ttl_seconds": 5}, headers=AS_PUBLISHER)
    assert jwt.decode(r.json()["token"], SECRET, algorithms=["HS256"])["exp"] - time.time() <= 6
    for bad in ({"ttl_seconds": 0}, {"ttl_seconds": -1}, {"ttl_seconds": "60"}, {"ttl_seconds": 1.5},
                {"ttl_seconds": True}, {"ttl_seconds": 10**9}, {"other": 1}, [], "x"):
        r = c.post("/v1/sessions/tok-b/tokens", json=bad, headers=AS_PUBLISHER)
        assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_ttl", "invalid_body"), bad


def test_a_token_reads_only_the_life_of_the_session_it_was_minted_for(c):
    """Deleted and created again under the same id, a session is another session: the old token
    (bound to the old epoch) gets 403 everywhere it used to read; a new one reads; a token minted
    before the session existed is bound to nothing and reads whatever life the id has."""
    early = c.post("/v1/sessions/tok-life/tokens", headers=AS_PUBLISHER).json()["token"]
    assert "ep" not in jwt.decode(early, SECRET, algorithms=["HS256"])
    first = c.post("/v1/sessions", json={"id": "tok-life"}, headers=AS_PUBLISHER).json()
    old = first["subscribe_token"]
    assert jwt.decode(old, SECRET, algorithms=["HS256"])["ep"] == first["epoch"]
    minted = c.post("/v1/sessions/tok-life/tokens", headers=AS_PUBLISHER).json()["token"]
    assert jwt.decode(minted, SECRET, algorithms=["HS256"])["ep"] == first["epoch"]
    seed(c, "tok-life")
    reads = [("GET", "/v1/sessions/tok-life/stream", {"params": {"live": "false"}}),
             ("GET", "/v1/sessions/tok-life/events", {}),
             ("GET", "/v1/sessions/tok-life", {}),
             ("GET", "/v1/sessions/tok-life/state", {}),
             ("POST", "/v1/sessions/tok-life/ack", {"json": {"id": 1}})]
    for method, path, kw in reads:
        assert c.request(method, path, headers={"Authorization": f"Bearer {old}"}, **kw).status_code == 200, path
    assert c.delete("/v1/sessions/tok-life", headers=AS_PUBLISHER).status_code == 204
    second = c.post("/v1/sessions", json={"id": "tok-life"}, headers=AS_PUBLISHER).json()
    seed(c, "tok-life")
    assert second["epoch"] != first["epoch"]
    for token in (old, minted):
        for method, path, kw in reads:
            r = c.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)
            assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_session", (path, r.text)
    assert c.get("/v1/sessions/tok-life", headers=AS_PUBLISHER).json()["acked_id"] == 0  # the old token acked nothing
    for token in (second["subscribe_token"], early):
        for method, path, kw in reads:
            r = c.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)
            assert r.status_code == 200, (path, r.text)


def bad_tokens(session: str) -> dict[str, str]:
    good = token_for(session)
    head, payload, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return {
        "expired": token_for(session, ttl=-10),
        "tampered": f"{head}.{b64({**claims, 'sub': session + '-x'})}.{sig}",
        "tampered_exp": f"{head}.{b64({**claims, 'exp': claims['exp'] + 10**6})}.{sig}",
        "wrong_secret": token_for(session, secret="another-secret-" + "z" * 32),
        "alg_none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}.",
        "alg_none_signed": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}.{sig}",
        "hs512": sign(claims, alg="HS512"),
        "no_exp": jwt.encode({"sub": session, "scope": "subscribe"}, SECRET, algorithm="HS256"),
        "no_scope": jwt.encode({"sub": session, "exp": claims["exp"]}, SECRET, algorithm="HS256"),
        "other_scope": token_for(session, scope="publish"),
        "sub_not_string": sign({"sub": 7, "exp": claims["exp"], "scope": "subscribe"}),
        "exp_not_number": sign({"sub": session, "exp": "tomorrow", "scope": "subscribe"}),
        "garbage": "not.a.token",
        "empty_segments": "..",
    }


@pytest.mark.parametrize("kind", list(bad_tokens("x")))
def test_bad_tokens_are_refused(c, kind):
    session = "tok-bad"
    seed(c, session)
    token = bad_tokens(session)[kind]
    for args in ({"headers": {"Authorization": f"Bearer {token}"}}, {"params": {"token": token}},
                 {"headers": {"Cookie": f"sse_gateway_token={token}"}}):
        for path in ("stream", "events", "state", ""):
            url = f"/v1/sessions/{session}/{path}".rstrip("/")
            r = c.get(url, **args)
            assert r.status_code == 401, (kind, path, r.text)
            expected = "token_expired" if kind == "expired" else "invalid_token"
            assert r.json()["error"]["code"] == expected
    assert c.post(f"/v1/sessions/{session}/ack", json={"id": 1},
                  headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_a_token_for_one_session_never_reads_another(c):
    seed(c, "tok-a2")
    seed(c, "tok-b2")
    token = c.post("/v1/sessions/tok-a2/tokens", headers=AS_PUBLISHER).json()["token"]
    for path in ("stream", "events", "state", "", "ack"):
        method = "POST" if path == "ack" else "GET"
        url = f"/v1/sessions/tok-b2/{path}".rstrip("/")
        params = {"token": token, "live": "false"}
        r = c.request(method, url, params=params, json={"id": 1} if path == "ack" else None)
        assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_session", (path, r.text)
        r = c.request(method, url.replace("tok-b2", "tok-a2"), params=params,
                      json={"id": 1} if path == "ack" else None)
        assert r.status_code == 200, (path, r.text)
    # a token is never a publisher key
    r = c.post("/v1/sessions/tok-a2/events", json={"data": 1}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401


def test_an_expired_token_stops_an_eventsource_reconnect(c):
    seed(c, "tok-exp")
    token = c.post("/v1/sessions/tok-exp/tokens", json={"ttl_seconds": 1}, headers=AS_PUBLISHER).json()["token"]
    url = f"/v1/sessions/tok-exp/stream?token={token}"
    r = c.get(url + "&live=false")  # the first connection is allowed ...
    assert r.status_code == 200
    cursor = [line[4:] for line in r.text.splitlines() if line.startswith("id: ")][-1]
    assert cursor.startswith("2:")
    # ... the network drops it; by the time EventSource reconnects, the token has expired
    exp = jwt.decode(token, SECRET, algorithms=["HS256"])["exp"]
    wait_until(lambda: time.time() > exp + 0.01, what="the token's expiry to pass")
    r = c.get(url, headers={"Last-Event-ID": cursor})
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired"
    assert r.headers["content-type"] == "application/json"  # not text/event-stream: EventSource gives up


def test_tokens_and_keys_never_reach_the_log(served):
    c = httpx.Client(base_url=served.url, timeout=10)
    seed(c, "leak")
    token = c.post("/v1/sessions/leak/tokens", headers=AS_PUBLISHER).json()["token"]
    bad = token_for("leak", secret="wrong-" + "w" * 40)
    for query in (f"token={token}", f"live=false&token={token}&x=1", f"%74oken={token}&live=false",
                  f"TOKEN={token}&live=false", f"to%6Ben={bad}", f"token={bad}&token={token}"):
        c.get(f"/v1/sessions/leak/stream?{query}&live=false")
    c.get("/v1/sessions/leak/events", headers={"Cookie": f"sse_gateway_token={token}"})
    c.get("/v1/sessions/leak/events", headers=AS_PUBLISHER)
    c.close()
    # the access log is on: the test is not vacuous
    log = wait_until(lambda: (text := served.log()).count("GET /v1/sessions/leak/") >= 8 and text,
                     what="8 requests in the access log")
    for secret in (token, bad, KEY, KEY2, SECRET, token.split(".")[2], bad.split(".")[2]):
        assert secret not in log
    assert "REDACTED" in log


# -- safe defaults --------------------------------------------------------------------------


def serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sse_gateway", "serve", "--backend", "memory", *args],
                          capture_output=True, text=True, timeout=20, env={"PYTHONPATH": str(ROOT), **(env or {})})


def test_an_open_gateway_listens_only_on_loopback(start_gateway):
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.com"):
        r = serve("--host", host, "--port", str(free_port()))
        assert r.returncode == 2, r.stderr
        assert "refusing to listen" in r.stderr and "--insecure" in r.stderr and "Traceback" not in r.stderr
    r = serve("--host", "0.0.0.0", "--port", str(free_port()), env={"SSE_GATEWAY_INSECURE": "0"})
    assert r.returncode == 2
    # --insecure: it starts, and says it is open
    open_gw = start_gateway("--host", "0.0.0.0", "--insecure", backend="memory")
    assert httpx.post(f"{open_gw.url}/v1/sessions/o/events", json={"data": 1}).status_code == 201
    open_gw.stop()
    assert "open to anyone" in open_gw.log()
    # with a key it starts and is closed
    keyed = start_gateway("--host", "0.0.0.0", "--publish-key", KEY, backend="memory")
    assert httpx.post(f"{keyed.url}/v1/sessions/o/events", json={"data": 1}).status_code == 401
    assert httpx.post(f"{keyed.url}/v1/sessions/o/events", json={"data": 1}, headers=AS_PUBLISHER).status_code == 201
    assert "open to anyone" not in keyed.log()


def test_open_loopback_gateway_says_so_and_a_short_secret_is_flagged(start_gateway):
    gw = start_gateway("--token-secret", "short", backend="memory")  # on loopback: a warning, not a refusal
    r = httpx.post(f"{gw.url}/v1/sessions", json={"id": "o"})
    assert r.status_code == 201 and r.json()["subscribe_token"]
    assert httpx.get(f"{gw.url}/v1/sessions/o").status_code == 200  # no keys: reading is open
    # a token that is presented is still checked
    assert httpx.get(f"{gw.url}/v1/sessions/o", params={"token": "junk"}).status_code == 401
    gw.stop()
    assert "open to anyone who can reach 127.0.0.1" in gw.log()
    assert "shorter than 32 bytes" in gw.log()


def test_tokens_need_a_secret(start_gateway):
    gw = start_gateway("--publish-key", KEY, backend="memory")
    r = httpx.post(f"{gw.url}/v1/sessions/x/tokens", headers=AS_PUBLISHER)
    assert r.status_code == 403 and r.json()["error"]["code"] == "tokens_not_configured"
    r = httpx.post(f"{gw.url}/v1/sessions", json={"id": "x"}, headers=AS_PUBLISHER)
    assert r.status_code == 201 and r.json()["subscribe_token"] is None
    assert httpx.get(f"{gw.url}/v1/sessions/x", params={"token": "junk"}).status_code == 401
    gw.stop()
    assert "no --token-secret" in gw.log()


# -- CORS -----------------------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization, last-event-id"}


def test_no_origin_is_allowed_by_default(c):
    r = c.options("/v1/sessions/x/stream", headers={"Origin": "https://app.example", **PREFLIGHT})
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = c.get("/healthz", headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_configured_origins_get_cors_with_credentials(start_app):
    gw = start_app(cors_origin=("https://app.example",), publish_key=(KEY,), token_secret=SECRET, backend="memory")
    with gw.client() as c:
        r = c.options("/v1/sessions/x/stream", headers={"Origin": "https://app.example", **PREFLIGHT})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["access-control-allow-credentials"] == "true"
        assert "last-event-id" in r.headers["access-control-allow-headers"].lower()
        r = c.options("/v1/sessions/x/stream", headers={"Origin": "https://evil.example", **PREFLIGHT})
        assert r.status_code == 400 and r.json()["error"]["code"] == "cors_refused"
        assert "access-control-allow-origin" not in r.headers
        c.post("/v1/sessions/x/events", json={"data": 1}, headers=AS_PUBLISHER)
        cookie = f"sse_gateway_token={token_for('x')}"
        r = c.get("/v1/sessions/x/stream", params={"live": "false"},
                  headers={"Origin": "https://app.example", "Cookie": cookie})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["access-control-allow-credentials"] == "true"
        r = c.get("/v1/sessions/x/events", headers={"Origin": "https://evil.example", "Cookie": cookie})
        assert "access-control-allow-origin" not in r.headers  # the browser hides the answer from that page


def test_a_wildcard_origin_never_allows_credentials(start_app):
    gw = start_app(cors_origin=("*",), backend="memory")
    with gw.client() as c:
        r = c.get("/healthz", headers={"Origin": "https://any.example"})
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers

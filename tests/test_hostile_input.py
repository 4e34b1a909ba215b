"""Hostile input: each gets its documented status and a JSON error, and changes nothing.

tests/test_publish.py covers malformed publish bodies; this adds cursors, session ids (paths and
normalisation), event types, SSE framing read back through a real SSE client, wrong types for every JSON
field of every endpoint, oversized bodies, and JSON the store must never see. The fixtures fail the module
if the gateway logged a traceback.

In process (tests/conftest.py ``start_app``), except request targets sent byte for byte (``raw``: httpx
would normalise them, and what uvicorn makes of them is part of the test) and a request refused before
its body is sent: those go to a real gateway (``served``).
"""

from __future__ import annotations

import http.client
import json
import socket
import httpx
import pytest
from httpx_sse import connect_sse
from util import WAIT_TIMEOUT

pytestmark = pytest.mark.timeout(60)

MAX_BODY = 2_000_000
BIG = 12345678901234567890123  # beyond 64 bits: parsed by the standard library, not orjson


@pytest.fixture(scope="module")
def gw(start_module_app):
    return start_module_app(max_body_bytes=MAX_BODY, heartbeat=1)


@pytest.fixture
def c(gw):
    with gw.client(timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def served(start_module_gateway):
    """A real gateway, for requests that must reach it byte for byte."""
    return start_module_gateway("--max-body-bytes", str(MAX_BODY), "--heartbeat", "1")


@pytest.fixture
def sc(served):
    with httpx.Client(base_url=served.url, timeout=10) as client:
        yield client


def raw(gw, method: str, target: str, body: bytes | None = None, headers: dict | None = None):
    """A request with the target exactly as given (httpx would normalise ``..`` and encodings)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def snapshot(c: httpx.Client, session: str) -> dict | None:
    r = c.get(f"/v1/sessions/{session}")
    if r.status_code == 404:
        return None
    row = r.json()
    return {k: row[k] for k in ("epoch", "status", "last_id", "earliest_id", "acked_id", "state_version",
                                "input_last_id", "input_acked_id")}


def session_names(c: httpx.Client) -> set[str]:
    return {s["id"] for s in c.get("/v1/sessions", params={"limit": 1000}).json()["sessions"]}


def seed(c: httpx.Client, session: str, n: int = 2) -> dict:
    c.post(f"/v1/sessions/{session}/events", json=[{"data": i} for i in range(n)])
    c.put(f"/v1/sessions/{session}/state", json={"step": 1})
    return snapshot(c, session)


def assert_error(status: int, headers, body: bytes, expected: int | tuple, codes: tuple[str, ...]) -> None:
    allowed = expected if isinstance(expected, tuple) else (expected,)
    assert status in allowed, (status, body[:300])
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] in codes and error["message"], error


def sse_events(c: httpx.Client, session: str) -> list:
    with connect_sse(c, "GET", f"/v1/sessions/{session}/stream", params={"live": "false"}) as source:
        assert source.response.status_code == 200
        return [sse for sse in source.iter_sse() if sse.id or sse.data]


# -- cursors ------------------------------------------------------------------------------

BAD_CURSORS = ["abc", "-1", "+1", "1.5", "1e3", "0x10", "1_0", "99999999999999999999", "9" * 19, "1:", ":abc",
               "1:ab:cd", "1:ab cd", "1:" + "a" * 33, "1 2", "1;2", "1,2", "1:ab-cd", "earliest:1", "NaN"]
UNICODE_CURSORS = ["١", "1:épo", "١:abc", "1\x00", "1:ab\x00", "１"]  # not sendable in a header by httpx


@pytest.mark.parametrize("cursor", BAD_CURSORS + UNICODE_CURSORS)
def test_bad_cursors_are_400_everywhere(c, cursor):
    before = seed(c, "cur")
    places = [{"params": {"last_event_id": cursor}}, {"params": {"from": cursor}}]
    if cursor.isascii() and cursor.isprintable():
        places.append({"headers": {"Last-Event-ID": cursor}})
    for place in places:
        r = c.get("/v1/sessions/cur/stream", **place)
        assert_error(r.status_code, r.headers, r.content, 400, ("invalid_cursor",))
    r = c.post("/v1/sessions/cur/ack", json={"id": cursor})
    assert_error(r.status_code, r.headers, r.content, 400, ("invalid_cursor",))
    for place in places:  # the input stream takes its cursors alike
        r = c.get("/v1/sessions/cur/input/stream", **place)
        assert_error(r.status_code, r.headers, r.content, 400, ("invalid_cursor",))
    r = c.post("/v1/sessions/cur/input/ack", json={"id": cursor})
    assert_error(r.status_code, r.headers, r.content, 400, ("invalid_cursor",))
    assert snapshot(c, "cur") == before


def test_cursor_edge_cases_that_are_fine(c):
    seed(c, "cur-ok", 3)
    epoch = snapshot(c, "cur-ok")["epoch"]
    for headers, params, ids in [
        ({"Last-Event-ID": ""}, {}, [1, 2, 3]),  # EventSource's empty cursor: none yet
        ({}, {"last_event_id": " 2 "}, [3]),
        ({"Last-Event-ID": f"1:{epoch}"}, {}, [2, 3]),
        ({}, {"from": "earliest"}, [1, 2, 3]),
        ({}, {"from": "latest"}, []),
        ({"Last-Event-ID": "0"}, {"from": "latest"}, [1, 2, 3]),  # first match wins: the header
    ]:
        r = c.get("/v1/sessions/cur-ok/stream", headers=headers, params={"live": "false", **params})
        assert r.status_code == 200, (headers, params, r.text)
        assert [int(line[4:].split(":")[0]) for line in r.text.splitlines() if line.startswith("id: ")] == ids
    r = c.get("/v1/sessions/cur-ok/stream", params={"live": "maybe"})
    assert_error(r.status_code, r.headers, r.content, 400, ("invalid_live",))


@pytest.mark.parametrize("value", ["abc", "-1", "1_0", "١", "99999999999999999999", " 1", "1.0", "", "0x1", "+1"])
def test_bad_integers_in_queries(c, value):
    seed(c, "q")
    for path, name in [("/v1/sessions/q/events", "after"), ("/v1/sessions/q/events", "limit"),
                       ("/v1/sessions", "limit"), ("/v1/sessions/q/input", "after"), ("/v1/sessions/q/input", "limit"),
                       ("/v1/sessions/q/input", "wait")]:
        r = c.get(path, params={name: value})
        assert_error(r.status_code, r.headers, r.content, 400, (f"invalid_{name}",))
    r = c.get("/v1/sessions", params={"status": "OPEN"})
    assert_error(r.status_code, r.headers, r.content, 400, ("invalid_status",))


# -- session ids ----------------------------------------------------------------------------

#: raw path segments: traversal, separators, control characters, look-alikes, bad encodings
BAD_SEGMENTS = ["..", ".", "%2e%2e", "%2E", ".%2e", "a%2Fb", "%2F", "..%2F..%2Fetc", "a%5Cb", "a%00b", "a%0Ab",
                "a%0D%0Aevent:x", "%E2%80%A8", "%EF%BD%81", "a%20b", "a%09b", "%C0%AE%C0%AE", "%FF", "a%3Fb",
                "a%23b", "a%25", "x" * 129, "caf%C3%A9", "a%2Cb", "a%3Bb", "%7E%2F", "a%2F..", "%2F%2F"]
SESSION_ROUTES = [("POST", "/events"), ("GET", "/stream"), ("GET", "/events"), ("GET", ""), ("DELETE", ""),
                  ("POST", "/complete"), ("POST", "/ack"), ("GET", "/state"), ("PUT", "/state"), ("POST", "/trim"),
                  ("POST", "/tokens"), ("POST", "/input"), ("GET", "/input"), ("GET", "/input/stream"),
                  ("POST", "/input/ack"), ("POST", "/lease")]


@pytest.mark.parametrize("segment", BAD_SEGMENTS)
def test_bad_session_ids_in_paths(served, sc, segment):
    sc.post("/v1/sessions/keep/events", json={"data": 1})
    names = session_names(sc)
    for method, suffix in SESSION_ROUTES:
        status, headers, body = raw(served, method, f"/v1/sessions/{segment}{suffix}", b'{"data": 1}',
                                    {"content-type": "application/json"})
        assert_error(status, headers, body, (400, 404, 405), ("invalid_session_id", "not_found",
                                                              "method_not_allowed"))
    assert session_names(sc) == names


def test_session_ids_do_not_collide_after_normalisation(served, sc):
    c = sc
    c.post("/v1/sessions/a1/events", json={"data": "first"})
    status, _, body = raw(served, "POST", "/v1/sessions/%61%31/events", b'{"data": "second"}',
                          {"content-type": "application/json"})
    assert status == 201 and json.loads(body)["session"] == "a1"  # %61%31 *is* a1, as URLs say
    assert snapshot(c, "a1")["last_id"] == 2
    for other in ("A1", "a1.", "a1~", "a1_", "a1-", "~a1", "a1" + "." * 3):
        assert snapshot(c, other) is None, other
        assert c.post(f"/v1/sessions/{other}/events", json={"data": other}).json()["id"] == 1
    for lookalike in ("%EF%BD%811", "a%C2%B9", "a%E2%82%81", "%D0%B01", "a1%E2%80%8B", "a1%C2%A0"):
        status, headers, body = raw(served, "GET", f"/v1/sessions/{lookalike}")
        assert_error(status, headers, body, 400, ("invalid_session_id",))
    assert snapshot(c, "a1")["last_id"] == 2


@pytest.mark.parametrize("bad_id", ["..", ".", "a/b", "../x", "a\x00b", "a\nb", "a\r\nb", "\u2028", "ａ", "a b", "",
                                    "x" * 129, "é", "a\\b", 1, 1.5, True, [], {}, ["a"]])
def test_bad_session_ids_in_create(c, bad_id):
    names = session_names(c)
    r = c.post("/v1/sessions", json={"id": bad_id})
    assert_error(r.status_code, r.headers, r.content, 400, ("invalid_session_id",))
    assert session_names(c) == names


# -- event types and framing ---------------------------------------------------------------

BAD_TYPES = ["a\nb", "a\r", "a\r\nid: 9", "\n\nevent: forged", "a\u2028", "a\u0085", "a\x00", "a b", "é", "a\tb",
             "a;b", "a,b", "a/b", "", "e" * 65]


@pytest.mark.parametrize("event", BAD_TYPES + ["gateway.end", "gateway.gap", "gateway.", "gateway.x"])
def test_bad_and_reserved_event_types_on_every_publish_path(c, event):
    before = seed(c, "types")
    code = "reserved_event_type" if event.startswith("gateway.") else "invalid_event_type"
    attempts = [
        c.post("/v1/sessions/types/events", json={"event": event, "data": 1}),
        c.post("/v1/sessions/types/events", json=[{"data": 1}, {"event": event, "data": 2}]),
        c.post("/v1/sessions/types/events", params={"event": event}, content=b"x",
               headers={"content-type": "text/plain"}),
    ]
    for r in attempts:
        assert_error(r.status_code, r.headers, r.content, 400, (code,))
    assert snapshot(c, "types") == before
    r = c.post("/v1/sessions/types/events", headers={"content-type": "application/x-ndjson"},
               content=json.dumps({"data": "ok"}) + "\n" + json.dumps({"event": event, "data": 2}) + "\n")
    assert_error(r.status_code, r.headers, r.content, 400, (code,))
    assert r.json()["ids"] == [before["last_id"] + 1]  # NDJSON keeps the good lines before the bad one
    assert [e.event for e in sse_events(c, "types")] == ["message"] * (before["last_id"] + 1)


HOSTILE_TEXT = [
    "hello\r\n\r\nevent: forged\ndata: x",
    "\n\nid: 999\nevent: gateway.end\ndata: {}\n\n",
    "\r\rretry: 1\r\r",
    "data: nested\r\n: comment\r\nid: 5",
    "a\x00b\x00",
    "a\u2028b\u2029c\x85d\x0b\x0ce\x1cf",
    "\ufeffBOM at the start, \ufeff in the middle",
    "ends with newline\n",
    "\r\n",
    "",
    ":",
    "é😀\U0010ffff",
    "long line " + "x" * 500_000,
]


def normalised(text: str) -> str:
    """What an SSE reader receives for ``text``: CR, LF and CRLF all become LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def test_no_data_can_forge_sse_fields_or_events(c):
    session = "frames"
    expected: list[tuple[str, str]] = []
    for text in HOSTILE_TEXT:
        r = c.post(f"/v1/sessions/{session}/events", params={"event": "t"}, content=text.encode(),
                   headers={"content-type": "text/plain; charset=utf-8"})
        assert r.status_code == 201, r.text
        expected.append(("t", normalised(text)))
        r = c.post(f"/v1/sessions/{session}/events", json={"event": "j", "data": {"text": text}})
        assert r.status_code == 201, r.text
        wire = json.dumps({"text": text}, ensure_ascii=False, separators=(",", ":"))  # U+0085/2028/2029 escaped:
        expected.append(("j", wire.translate({0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"})))
    events = sse_events(c, session)
    assert [(e.event, e.data) for e in events] == expected
    assert [int(e.id.split(":")[0]) for e in events] == list(range(1, len(expected) + 1))
    assert all(e.retry is None for e in events)
    for e in events:
        if e.event == "j":
            assert json.loads(e.data)  # still one JSON document
    history = c.get(f"/v1/sessions/{session}/events", params={"limit": 1000}).json()["events"]
    assert [h["data"] for h in history if h["event"] == "t"] == HOSTILE_TEXT  # kept exactly
    assert [h["data"]["text"] for h in history if h["event"] == "j"] == HOSTILE_TEXT


# -- wrong types for every JSON field of every endpoint -----------------------------------

WRONG = [1, 1.5, True, None, [], {}, "x", [1], {"a": 1}]

#: (method, path, body, expected error codes); every body is wrong somewhere
WRONG_BODIES = (
    [("POST", "/events", {"event": v, "data": 1}, ("invalid_event_type",)) for v in WRONG if v != "x"]
    + [("POST", "/events", {"data": 1, "idempotency_key": v}, ("invalid_idempotency_key",))
       for v in [1, 1.5, True, [], {}, "", "x" * 257, "é", "a\nb", "\x00"]]
    + [("POST", "/events", v, ("invalid_event", "empty_batch")) for v in [1, 1.5, True, None, "x", [], [1], [[]]]]
    + [("POST", "/events", {"data": 1, "id": 5}, ("unknown_field",))]
    + [("POST", "", {"id": v}, ("invalid_session_id",)) for v in [1, 1.5, True, [], {}]]
    + [("POST", "", {"ttl_seconds": v}, ("invalid_ttl",)) for v in ["1", 1.5, True, [], {}, 0, -1, 10**9, BIG]]
    + [("POST", "", v, ("invalid_body",)) for v in [1, "x", True, [], [{}]]]
    + [("POST", "", {"idd": "x"}, ("unknown_field",))]
    + [("POST", "/complete", v, ("invalid_body",)) for v in [1, "x", True, None, [], {"result": 1, "x": 2}]]
    + [("POST", "/complete", {"status": v}, ("invalid_status",)) for v in [*WRONG, "timed_out", "FAILED", ""]]
    + [("POST", "/complete", {"error": v}, ("invalid_body",)) for v in WRONG]
    + [("POST", "", {"lease_seconds": v}, ("invalid_lease",)) for v in ["1", 1.5, True, [], {}, -1, 10**9, BIG]]
    + [("POST", "", {"webhook_url": v}, ("invalid_webhook_url",))
       for v in [1, True, [], {}, "", "x", "ftp://a", "http://", "http:///a", "http://a b", "http://é", "http://a\n"]]
    + [("POST", "/lease", {"seconds": v}, ("invalid_lease",)) for v in ["1", 1.5, True, [], {}, -1, 10**9, BIG]]
    + [("POST", "/lease", {"claim": v}, ("invalid_body",)) for v in [1, 1.5, None, [], {}, "x", "true"]]
    + [("POST", "/lease", v, ("invalid_body",)) for v in [1, "x", True, None, [], {"renew": True}]]
    + [("POST", "/ack", {"id": v}, ("invalid_ack", "invalid_cursor")) for v in
       ["abc", 1.5, True, [], {}, None, -1, BIG, "-1", 10**15, "1000000000000000"]]
    + [("POST", "/ack", v, ("invalid_ack",)) for v in [1, "x", True, None, [], {"idd": 1}]]
    + [("POST", "/trim", {"through": v}, ("invalid_trim",)) for v in ["1", 1.5, True, [], {}, None, -1]]
    + [("POST", "/trim", v, ("invalid_trim",)) for v in [1, "x", True, None, [], {"thru": 1}]]
    + [("PUT", "/state", v, ("invalid_state",)) for v in [1, 1.5, "x", True, None, [], [{}]]]
    + [("POST", "/tokens", {"ttl_seconds": v}, ("invalid_ttl",)) for v in ["1", 1.5, True, [], {}, 0, -1, BIG]]
    + [("POST", "/tokens", v, ("invalid_body",)) for v in [1, "x", True, None, [], {"ttl": 1}]]
    + [("POST", "/tokens", {"scopes": v}, ("invalid_scopes",)) for v in
       [1, "subscribe", True, {}, [], [1], ["input"], ["subscribe", "subscribe"], ["subscribe", "x"], [None]]]
    + [("POST", "/input", v, ("invalid_body",)) for v in [1, 1.5, "x", True, None, [], [{"kind": "message"}]]]
    + [("POST", "/input", {"kind": v}, ("invalid_kind",)) for v in [*WRONG, "MESSAGE", "approve", ""]]
    + [("POST", "/input", {"kind": "message", "extra": 1}, ("unknown_field",))]
    + [("POST", "/input", {"kind": "message", "idempotency_key": v}, ("invalid_idempotency_key",))
       for v in [1, 1.5, True, [], {}, "", "x" * 257, "é", "a\nb", "\x00"]]
    + [("POST", "/input", {"kind": "approval", "approval_id": v, "decision": "approve"}, ("invalid_approval_id",))
       for v in [1, 1.5, True, None, [], {}, "", "x" * 129, "é", "a\nb", "\x00"]]
    + [("POST", "/input", {"kind": "approval", "approval_id": "a", "decision": v}, ("invalid_decision",))
       for v in [*WRONG, "APPROVE", "yes"]]
    + [("POST", "/input", {"kind": k, **extra}, (code,)) for k in ("message", "steer", "cancel")
       for extra, code in [({"approval_id": "a"}, "invalid_approval_id"), ({"decision": "deny"}, "invalid_decision")]]
    + [("POST", "/input/ack", {"id": v}, ("invalid_ack", "invalid_cursor")) for v in
       ["abc", 1.5, True, [], {}, None, -1, BIG, "-1", 10**15, "1000000000000000"]]
    + [("POST", "/input/ack", v, ("invalid_ack",)) for v in [1, "x", True, None, [], {"idd": 1}]]
)


@pytest.mark.parametrize("method,suffix,body,codes", WRONG_BODIES, ids=[
    f"{m}{s or '/sessions'}:{json.dumps(b)[:30]}" for m, s, b, _ in WRONG_BODIES])
def test_wrong_types_for_every_json_field(c, method, suffix, body, codes):
    before = seed(c, "types2", 3)
    before_inputs = c.get("/v1/sessions/types2/input", params={"after": 0}).json()["inputs"]
    names = session_names(c)
    path = "/v1/sessions" if method == "POST" and suffix == "" else f"/v1/sessions/types2{suffix}"
    r = c.request(method, path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert_error(r.status_code, r.headers, r.content, 400, codes)
    assert snapshot(c, "types2") == before and session_names(c) == names
    if suffix.startswith("/input"):  # nothing reached the input, nor its mirror the output
        assert c.get("/v1/sessions/types2/input", params={"after": 0}).json()["inputs"] == before_inputs


@pytest.mark.parametrize("if_match", ["abc", "-1", "1.5", '"x"', "W/abc", "1_0", "1 2", "", "99999999999999999999"])
def test_bad_if_match(c, if_match):
    before = seed(c, "ifm")
    r = c.put("/v1/sessions/ifm/state", json={"a": 1}, headers={"If-Match": if_match})
    assert_error(r.status_code, r.headers, r.content, 400, ("invalid_if_match",))
    assert snapshot(c, "ifm") == before


# -- JSON the store must never see ---------------------------------------------------------

POISON = [
    b'{"data": ["\\ud800", 12345678901234567890123]}',  # a lone surrogate, on the standard-library path
    b'{"data": {"\\udfff": 12345678901234567890123}}',
    b'{"data": [12345678901234567890123, 1e400]}',  # infinity, which JSON cannot say
    b'{"data": [12345678901234567890123, -1e999]}',
    '\ufeff{"data": 12345678901234567890123}'.encode(),  # a byte order mark
    '{"data": 12345678901234567890123}'.encode("utf-16"),  # not UTF-8
    b'{"data": 12345678901234567890123, "x": NaN}',
    b'{"data": "\\ud800"}',
    b'{"data": "\xed\xa0\x80"}',  # a surrogate encoded in (invalid) UTF-8
    b'{"data": 1' + b"1" * 5000 + b"}",  # more digits than Python converts
]


@pytest.mark.parametrize("body", POISON, ids=range(len(POISON)))
def test_json_the_store_cannot_keep_is_refused_and_the_writer_keeps_writing(c, body):
    before = seed(c, "poison")
    targets = [("POST", "/v1/sessions/poison/events", body),
               ("POST", "/v1/sessions", body.replace(b'"data"', b'"metadata"')),
               ("PUT", "/v1/sessions/poison/state", body),
               ("POST", "/v1/sessions/poison/complete", body.replace(b'"data"', b'"result"')),
               ("POST", "/v1/sessions/poison/input", body.replace(b'{"data"', b'{"kind": "message", "data"'))]
    for method, path, content in targets:
        r = c.request(method, path, content=content, headers={"content-type": "application/json"})
        assert_error(r.status_code, r.headers, r.content, 400, ("invalid_json",))
    assert snapshot(c, "poison") == before
    r = c.post("/v1/sessions/poison/events", json={"data": BIG}, timeout=5)  # the writer is alive
    assert r.status_code == 201
    assert json.loads(c.get("/v1/sessions/poison/events", params={"after": before["last_id"]}).text)[
        "events"][0]["data"] == BIG


def test_deep_nesting_is_refused(c):
    for path, method in [("/v1/sessions/deep/events", "POST"), ("/v1/sessions/deep/state", "PUT"),
                         ("/v1/sessions/deep/input", "POST")]:
        body = b'{"data": ' + b"[" * 3000 + b"]" * 3000 + b"}"
        r = c.request(method, path, content=body, headers={"content-type": "application/json"})
        assert_error(r.status_code, r.headers, r.content, 400, ("json_too_deep",))
    assert snapshot(c, "deep") is None


# -- oversized bodies ------------------------------------------------------------------------


def test_oversized_bodies(c):
    before = seed(c, "big")
    names = session_names(c)
    huge = b'{"data": "' + b"x" * MAX_BODY + b'"}'
    for method, path, ctype in [("POST", "/v1/sessions/big/events", "application/json"),
                                ("POST", "/v1/sessions/big/events", "text/plain"),
                                ("POST", "/v1/sessions", "application/json"),
                                ("POST", "/v1/sessions/big/complete", "application/json"),
                                ("PUT", "/v1/sessions/big/state", "application/json"),
                                ("POST", "/v1/sessions/big/ack", "application/json"),
                                ("POST", "/v1/sessions/big/trim", "application/json"),
                                ("POST", "/v1/sessions/big/tokens", "application/json"),
                                ("POST", "/v1/sessions/big/input", "application/json"),
                                ("POST", "/v1/sessions/big/input/ack", "application/json")]:
        r = c.request(method, path, content=huge, headers={"content-type": ctype})
        assert_error(r.status_code, r.headers, r.content, 413, ("body_too_large",))
    r = c.post("/v1/sessions/big/events", json={"data": "y" * (1 << 20)})
    assert_error(r.status_code, r.headers, r.content, 413, ("event_too_large",))
    r = c.post("/v1/sessions/big/input", json={"kind": "message", "data": "y" * (1 << 20)})
    assert_error(r.status_code, r.headers, r.content, 413, ("input_too_large",))
    r = c.post("/v1/sessions/big/events", content=b'{"data": 1}\n' + b"z" * (MAX_BODY + 10),
               headers={"content-type": "application/x-ndjson"})
    assert_error(r.status_code, r.headers, r.content, 413, ("line_too_long",))
    assert r.json()["ids"] == [before["last_id"] + 1]
    assert snapshot(c, "big")["last_id"] == before["last_id"] + 1 and session_names(c) == names


def test_a_declared_huge_body_is_refused_before_it_is_sent(served):
    # The answer comes although the body never will: the gateway did not wait for it.
    with socket.create_connection(("127.0.0.1", served.port), timeout=WAIT_TIMEOUT) as s:
        s.sendall(b"POST /v1/sessions/huge/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000000\r\n\r\n{")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
        assert b"connection: close" in answer.lower()


def test_metadata_state_and_results_are_bounded_like_event_data(c):
    """A row's documents are bounded by --max-event-bytes (1 MiB), not only by the body limit."""
    before = seed(c, "docs")
    names = session_names(c)
    big = "m" * (1 << 20)
    for method, path, body, code in [("POST", "/v1/sessions", {"id": "fat", "metadata": big}, "metadata_too_large"),
                                     ("PUT", "/v1/sessions/docs/state", {"blob": big}, "state_too_large"),
                                     ("POST", "/v1/sessions/docs/complete", {"result": big}, "result_too_large")]:
        r = c.request(method, path, json=body)
        assert_error(r.status_code, r.headers, r.content, 413, (code,))
    assert snapshot(c, "docs") == before and session_names(c) == names
    small = "m" * 1000
    assert c.post("/v1/sessions", json={"id": "slim", "metadata": small}).status_code == 201
    assert c.put("/v1/sessions/docs/state", json={"blob": small}).status_code == 200


def test_every_cursor_given_is_checked_even_one_that_is_not_used(c):
    seed(c, "both")
    for place in ({"headers": {"Last-Event-ID": "1"}, "params": {"from": "nope"}},
                  {"headers": {"Last-Event-ID": "1"}, "params": {"last_event_id": "x:y:z"}},
                  {"params": {"last_event_id": "1", "from": "-1"}}):
        r = c.get("/v1/sessions/both/stream", **place)
        assert_error(r.status_code, r.headers, r.content, 400, ("invalid_cursor",))

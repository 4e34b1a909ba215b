"""Publishing: every body format, the limits, and bad input that must change nothing.

In process (tests/conftest.py ``start_app``): publishing answers and ends, no socket needed.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def client(app_client: httpx.Client) -> httpx.Client:
    return app_client


def last_id(client: httpx.Client, session: str) -> int:
    r = client.get(f"/v1/sessions/{session}")
    return r.json()["last_id"] if r.status_code == 200 else 0


def test_json_object_batch_and_text(client):
    r = client.post("/v1/sessions/p/events", json={"event": "token", "data": {"text": "Hel"}})
    epoch = client.get("/v1/sessions/p").json()["epoch"]
    assert r.status_code == 201 and r.json() == {"id": 1, "session": "p", "last_id": 1, "epoch": epoch}
    r = client.post("/v1/sessions/p/events", json=[{"data": 1}, {"event": "tool.call", "data": [1, 2]}])
    assert r.status_code == 201 and r.json() == {"ids": [2, 3], "session": "p", "last_id": 3, "epoch": epoch}
    r = client.post("/v1/sessions/p/events?event=note", content="plain text", headers={"content-type": "text/plain"})
    assert r.status_code == 201 and r.json()["id"] == 4
    events = client.get("/v1/sessions/p/events").json()["events"]
    assert [(e["id"], e["event"], e["data"]) for e in events] == [
        (1, "token", {"text": "Hel"}), (2, "message", 1), (3, "tool.call", [1, 2]), (4, "note", "plain text")]
    assert events[0]["ts"].endswith("Z") and "." in events[0]["ts"]


def test_json_data_is_kept_exactly(client):
    body = '{"data": {"big": 123456789012345678901234567890, "neg": -98765432109876543210, "f": 0.1, "u": "\u2028é"}}'
    r = client.post("/v1/sessions/exact/events", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 201
    raw = client.get("/v1/sessions/exact/stream", params={"live": "false"}).text
    # U+2028 goes out escaped (the same JSON string): no parser can take it for a line break
    assert 'data: {"big":123456789012345678901234567890,"neg":-98765432109876543210,"f":0.1,"u":"\\u2028é"}' in raw


def test_idempotency_header_and_items(client):
    h = {"Idempotency-Key": "req-1"}
    first = client.post("/v1/sessions/i/events", json={"data": "x"}, headers=h)
    again = client.post("/v1/sessions/i/events", json={"data": "x"}, headers=h)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"] == 1
    batch = [{"data": 1, "idempotency_key": "a"}, {"data": 2, "idempotency_key": "b"}]
    assert client.post("/v1/sessions/i/events", json=batch).json()["ids"] == [2, 3]
    r = client.post("/v1/sessions/i/events", json=batch)
    assert r.status_code == 200 and r.json()["ids"] == [2, 3]
    assert last_id(client, "i") == 3


async def test_twenty_concurrent_retries_append_once(app_gateway):
    async with app_gateway.async_client() as c:
        rs = await asyncio.gather(*(c.post("/v1/sessions/race/events", json={"data": "once"},
                                           headers={"Idempotency-Key": "k"}) for _ in range(20)))
        assert sorted(r.status_code for r in rs) == [200] * 19 + [201]
        assert {r.json()["id"] for r in rs} == {1}
        assert (await c.get("/v1/sessions/race")).json()["last_id"] == 1


BAD = [
    # (content type, body, params, headers, status, code)
    ("application/json", b"{not json", None, None, 400, "invalid_json"),
    ("application/json", b"", None, None, 400, "invalid_json"),
    ("application/json", b'"just a string"', None, None, 400, "invalid_event"),
    ("application/json", b"[]", None, None, 400, "empty_batch"),
    ("application/json", b'[{"data":1}, 5]', None, None, 400, "invalid_event"),
    ("application/json", b'{"event":"x"}', None, None, 400, "missing_data"),
    ("application/json", b'{"data":1,"extra":2}', None, None, 400, "unknown_field"),
    ("application/json", b'{"event":"gateway.end","data":1}', None, None, 400, "reserved_event_type"),
    ("application/json", b'{"event":"a\\r\\nid: 9","data":1}', None, None, 400, "invalid_event_type"),
    ("application/json", b'{"event":"","data":1}', None, None, 400, "invalid_event_type"),
    ("application/json", b'{"event":5,"data":1}', None, None, 400, "invalid_event_type"),
    ("application/json", b'{"event":["x"],"data":1}', None, None, 400, "invalid_event_type"),  # unhashable
    ("application/json", b'{"event":{"x":1},"data":1}', None, None, 400, "invalid_event_type"),
    ("application/json", b'{"event":"' + b"e" * 65 + b'","data":1}', None, None, 400, "invalid_event_type"),
    ("application/json", b'{"data":1,"idempotency_key":""}', None, None, 400, "invalid_idempotency_key"),
    ("application/json", b'{"data":1,"idempotency_key":7}', None, None, 400, "invalid_idempotency_key"),
    ("application/json", b'[{"data":1}]', None, {"Idempotency-Key": "k"}, 400, "invalid_idempotency_key"),
    ("application/json", b'{"data":1}', None, {"Idempotency-Key": "x" * 300}, 400, "invalid_idempotency_key"),
    ("application/json", b'{"data": NaN}', None, None, 400, "invalid_json"),
    ("application/json", b'{"data": 12345678901234567890123, "x": Infinity}', None, None, 400, "invalid_json"),
    ("application/json", b"[" * 5000 + b"]" * 5000, None, None, 400, "json_too_deep"),
    ("text/plain", b"\xff\xfe bad utf-8", None, None, 400, "invalid_utf8"),
    ("text/plain", b"x", {"event": "bad type"}, None, 400, "invalid_event_type"),
    ("text/plain; charset=latin-1", b"x", None, None, 415, "unsupported_charset"),
    ("application/xml", b"<x/>", None, None, 415, "unsupported_media_type"),
    ("", b"x", None, None, 415, "unsupported_media_type"),
    ("application/x-ndjson", b'{"data":1}\nnot json\n', None, None, 400, "invalid_json"),
]


@pytest.mark.parametrize("ctype,body,params,headers,status,code", BAD)
def test_bad_input_is_a_clear_json_error_and_changes_nothing(client, ctype, body, params, headers, status, code):
    client.post("/v1/sessions/b/events", json={"data": "before"})
    hdrs = {"content-type": ctype} if ctype else {}
    r = client.post("/v1/sessions/b/events", content=body, params=params, headers={**hdrs, **(headers or {})})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    expected = 2 if ctype == "application/x-ndjson" else 1  # an NDJSON stream keeps the lines before the bad one
    assert last_id(client, "b") == expected
    if ctype == "application/x-ndjson":
        assert r.json()["ids"] == [2]


def test_limits(start_app):
    gw = start_app(max_event_bytes=1000, max_batch=10, max_body_bytes=50000)
    with gw.client() as c:
        c.post("/v1/sessions/l/events", json={"data": 0})
        r = c.post("/v1/sessions/l/events", json={"data": "x" * 1001})
        assert r.status_code == 413 and r.json()["error"]["code"] == "event_too_large"
        r = c.post("/v1/sessions/l/events", content="é" * 501, headers={"content-type": "text/plain"})
        assert r.status_code == 413  # bytes, not characters
        r = c.post("/v1/sessions/l/events", json=[{"data": i} for i in range(11)])
        assert r.status_code == 413 and r.json()["error"]["code"] == "batch_too_large"
        r = c.post("/v1/sessions/l/events", json=[{"data": "y" * 900}] * 60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = c.post("/v1/sessions/l/events", json=[{"data": 1}, {"data": "x" * 2000}])
        assert r.status_code == 413  # the batch is all or nothing
        assert c.get("/v1/sessions/l").json()["last_id"] == 1


def test_session_ids(client):
    for good in ["a", "A-b_c.d~e", "x" * 128, "..."]:
        assert client.post(f"/v1/sessions/{good}/events", json={"data": 1}).status_code == 201, good
    for bad in ["x" * 129, "a%20b", "%2e%2e", "a%0Ab", "%E2%80%A8"]:
        r = client.post(f"/v1/sessions/{bad}/events", json={"data": 1})
        assert r.status_code in (400, 404), bad
        assert r.json()["error"]["code"] in ("invalid_session_id", "not_found")


def test_no_auto_create(start_app):
    gw = start_app(auto_create=False)
    with gw.client() as c:
        r = c.post("/v1/sessions/new/events", json={"data": 1})
        assert r.status_code == 404
        assert c.post("/v1/sessions", json={"id": "new"}).status_code == 201
        assert c.post("/v1/sessions/new/events", json={"data": 1}).status_code == 201


def test_unknown_routes_and_methods_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.patch("/v1/sessions/x/events")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_one_key_for_two_different_events_of_a_batch_is_refused(app_client):
    c = app_client
    batch = [{"data": 1, "idempotency_key": "k"}, {"data": 2, "idempotency_key": "k"}]
    r = c.post("/v1/sessions/reuse/events", json=batch)
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert c.get("/v1/sessions/reuse").status_code == 404  # nothing stored, not even the session
    r = c.post("/v1/sessions/reuse/events", json=[{"data": 1, "idempotency_key": "k"}] * 2)
    assert r.status_code == 201 and r.json()["ids"] == [1, 1]  # the same event twice: stored once
    lines = b'{"data":3,"idempotency_key":"n"}\n{"data":4,"idempotency_key":"n"}\n'
    r = c.post("/v1/sessions/reuse/events", content=lines, headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert c.get("/v1/sessions/reuse").json()["last_id"] == 1


def test_an_ndjson_stream_of_blank_lines_says_where_the_session_stands(app_client):
    c = app_client
    nd = {"content-type": "application/x-ndjson"}
    r = c.post("/v1/sessions/blank/events", content=b"\n\n", headers=nd)
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    first = c.post("/v1/sessions/blank/events", json=[{"data": 1}, {"data": 2}]).json()
    r = c.post("/v1/sessions/blank/events", content=b"\n \n", headers=nd)
    assert r.status_code == 200 and r.json() == {"ids": [], "session": "blank", "last_id": 2, "epoch": first["epoch"]}


def test_json_in_another_charset_is_refused(app_client):
    r = app_client.post("/v1/sessions/cs/events", content='{"data": "é"}'.encode("latin-1"),
                        headers={"content-type": "application/json; charset=latin-1"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_charset"

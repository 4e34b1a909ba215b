"""Property tests against a real gateway: arbitrary bytes, JSON, headers and queries.

Whatever arrives, the gateway answers below 500, every error is its JSON, and the SSE output, read by a
standard parser (httpx-sse), holds exactly the events the test published and nothing else. The number of
inputs is bounded so that the module runs in well under a minute (``FUZZ_EXAMPLES`` scales it); the counts
are printed at the end (``pytest -s``).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import time
import urllib.parse
from typing import Any

import httpx
import jwt
import pytest
from httpx_sse import EventSource
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.timeout(300), pytest.mark.system]  # fuzzing a real gateway

KEY = "fuzz-key-" + "k" * 32
SECRET = "fuzz-secret-" + "s" * 32
AS_PUBLISHER = {"Authorization": f"Bearer {KEY}"}
SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
TRIED: collections.Counter = collections.Counter()
_names = itertools.count()


def fuzz(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def gw(start_module_gateway):
    return start_module_gateway("--publish-key", KEY, "--token-secret", SECRET, "--heartbeat", "1")


@pytest.fixture(scope="module")
def c(gw):
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        yield client
    print("\nfuzz inputs tried:", dict(TRIED))


def assert_json_error(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert r.headers["content-type"] == "application/json", r.text
        error = r.json()["error"]
        assert error["code"] and error["message"]


def read_sse(c: httpx.Client, session: str, **kwargs) -> list:
    with c.stream("GET", f"/v1/sessions/{session}/stream", params={"live": "false"}, **kwargs) as r:
        assert r.status_code == 200
        return [sse for sse in EventSource(r).iter_sse() if sse.id or sse.data or sse.event != "message"]


def normalised(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def model(ctype: str, body: bytes, event: str | None) -> list[tuple[str, str, Any]]:
    """What an accepted publish must have appended, in order: (event type, kind, data)."""
    kind = ctype.partition(";")[0].strip().lower()
    if kind == "text/plain":
        return [(event or "message", "text", normalised(body.decode("utf-8")))]
    if kind == "application/json":
        value = json.loads(body.decode("utf-8"))
        items = value if isinstance(value, list) else [value]
    else:
        items = [json.loads(line) for line in body.split(b"\n") if line.strip()]
    return [(item.get("event", "message"), "json", item["data"]) for item in items]


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str) -> Any:
    """JSON as RFC 8259 has it: no NaN or Infinity (which Python's reader would accept)."""
    return json.loads(text, parse_constant=_refuse_constant)


def check_published(c: httpx.Client, session: str, r: httpx.Response, expected: list[tuple[str, str, Any]]) -> None:
    """The session's SSE output is exactly what ``r`` says was appended, with the data that was sent."""
    body = r.json()
    ids = body["ids"] if "ids" in body else [body["id"]]
    assert len(ids) == len(expected)
    if not ids:  # an NDJSON body without a line appends nothing (and creates nothing)
        assert c.get(f"/v1/sessions/{session}", headers=AS_PUBLISHER).status_code == 404
        return
    first: dict[int, tuple[str, str, Any]] = {}
    for id_, item in zip(ids, expected, strict=True):
        first.setdefault(id_, item)  # an idempotency key used twice in one batch appends once
    events = read_sse(c, session, headers=AS_PUBLISHER)
    assert [int(e.id.split(":")[0]) for e in events] == sorted(first)
    for e in events:
        etype, kind, data = first[int(e.id.split(":")[0])]
        assert e.event == etype
        assert (e.data if kind == "text" else strict_json(e.data)) == data
    history = c.get(f"/v1/sessions/{session}/events", headers=AS_PUBLISHER)
    strict_json(history.text)  # the JSON API stays JSON


# -- publish: arbitrary bytes ------------------------------------------------------------------

CONTENT_TYPES = ["application/json", "text/plain", "text/plain; charset=utf-8", "application/x-ndjson",
                 "text/plain; charset=latin-1", "application/json; charset=utf-16", "application/xml", "",
                 "multipart/form-data; boundary=x", "TEXT/PLAIN", "application/x-ndjson; charset=utf-8", "*/*"]
#: what a header value can be on the wire (h11 refuses CR, LF, NUL and surrounding blanks), as latin-1 bytes
HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                       max_size=300).map(lambda v: v.strip(" ").encode("latin-1"))
HOSTILE = st.sampled_from(["\r\n\r\nevent: forged\ndata: x", "\r", "\n", "\x00", "\u2028", "\ufeff", "id: 9",
                           "data: x", "retry: 1", ":", "gateway.end", "é"])
HOSTILE_TEXT = st.lists(st.one_of(st.text(max_size=20), HOSTILE), max_size=8).map("".join)


#: JSON fragments at the edges of what parsers agree on
EDGE_TOKENS = [b"12345678901234567890123", b"-98765432109876543210", b"18446744073709551616", b"1e400", b"-1e400",
               b"1e-400", b"-0", b"0.1", b"1E5", b'"\\ud800"', b'"\\udfff"', b'"\\ud800\\udc00"', b"NaN",
               b"Infinity", b"true", b"null", b'"\\u0000"', "\"\u2028\"".encode(), b'"\xef\xbb\xbf"', b'"\xed\xa0\x80"',
               b"1" * 4400, b'"\r\n"', b"[]", b"{}"]
EDGE_JSON = st.recursive(
    st.sampled_from(EDGE_TOKENS),
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: b"[" + b",".join(xs) + b"]")
    | st.lists(inner, max_size=3).map(lambda xs: b"{" + b",".join(b'"k%d":%s' % kv for kv in enumerate(xs)) + b"}"),
    max_leaves=6)


def bodies() -> st.SearchStrategy[bytes]:
    json_ish = st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"data"', b'"event"', b":", b",", b"1", b"null",
                                         b'"x"', b"\n", b"\xff", b"\xef\xbb\xbf", b'"idempotency_key"', b" ",
                                         *EDGE_TOKENS]),
                        max_size=30).map(b"".join)
    events = st.one_of(EDGE_JSON.map(lambda d: b'{"data":' + d + b"}"),
                       st.lists(EDGE_JSON, min_size=1, max_size=3).map(
                           lambda ds: b"[" + b",".join(b'{"data":' + d + b"}" for d in ds) + b"]"),
                       st.lists(EDGE_JSON, min_size=1, max_size=3).map(
                           lambda ds: b"\n".join(b'{"data":' + d + b"}" for d in ds)))
    return st.one_of(st.binary(max_size=1000), json_ish, events,
                     HOSTILE_TEXT.map(lambda t: t.encode("utf-8", "replace")))


@fuzz(500)
@given(ctype=st.sampled_from(CONTENT_TYPES), body=bodies(), event=st.none() | HOSTILE_TEXT,
       key=st.none() | HEADER_VALUE)
def test_publish_arbitrary_bytes(c, ctype, body, event, key):
    TRIED["publish_bytes"] += 1
    session = f"fb{next(_names)}"
    headers: dict[str, Any] = {**AS_PUBLISHER, "content-type": ctype}
    if key is not None:
        headers["Idempotency-Key"] = key
    params = {"event": event} if event is not None else {}
    r = c.post(f"/v1/sessions/{session}/events", content=body, headers=headers, params=params)
    assert_json_error(r)
    if r.status_code < 300:
        check_published(c, session, r, model(ctype, body, event))
    else:
        assert c.get(f"/v1/sessions/{session}/events", headers=AS_PUBLISHER).status_code in (200, 404)


# -- publish: arbitrary JSON -------------------------------------------------------------------

INTEGERS = st.one_of(st.integers(), st.integers(min_value=2**63 - 2, max_value=10**30),
                     st.integers(min_value=-(10**30), max_value=-(2**63) + 2))
JSON = st.recursive(
    st.none() | st.booleans() | INTEGERS | st.floats(allow_nan=False, allow_infinity=False) | HOSTILE_TEXT
    | st.sampled_from(["\ud800", "\udfff", "a\udcffb"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT | st.just("\udcff"), inner, max_size=4),
    max_leaves=20)
EVENT_TYPES = st.one_of(st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True), HOSTILE_TEXT, JSON)


@st.composite
def event_objects(draw) -> Any:
    obj = {}
    if draw(st.booleans()):
        obj["event"] = draw(EVENT_TYPES)
    if draw(st.integers(0, 9)):
        obj["data"] = draw(JSON)
    if draw(st.integers(0, 3)) == 0:
        obj["idempotency_key"] = draw(st.one_of(st.sampled_from(["k1", "k2"]), HOSTILE_TEXT, JSON))
    if draw(st.integers(0, 9)) == 0:
        obj[draw(HOSTILE_TEXT)] = draw(JSON)
    return obj


PAYLOADS = st.one_of(event_objects(), st.lists(event_objects(), max_size=5), JSON)


@fuzz(500)
@given(payload=PAYLOADS, ctype=st.sampled_from(["application/json", "application/x-ndjson", "text/plain"]))
def test_publish_arbitrary_json(c, payload, ctype):
    TRIED["publish_json"] += 1
    session = f"fj{next(_names)}"
    if ctype == "application/x-ndjson" and isinstance(payload, list):
        body = "\n".join(json.dumps(item) for item in payload).encode()
    else:
        body = json.dumps(payload).encode()
    r = c.post(f"/v1/sessions/{session}/events", content=body, headers={**AS_PUBLISHER, "content-type": ctype})
    assert_json_error(r)
    if r.status_code < 300:
        check_published(c, session, r, model(ctype, body, None))


# -- stream: arbitrary headers and queries -------------------------------------------------------

TARGET = "target"


@pytest.fixture(scope="module")
def target(c) -> dict:
    """A session of hostile events, and a completed one; what a stream of them may contain."""
    texts = ["hello\r\n\r\nevent: forged\ndata: x", "\n\nid: 999\n\n", "a\x00b\u2028c", "\ufeff", "", "x" * 5000]
    for i, text in enumerate(texts):
        c.post(f"/v1/sessions/{TARGET}/events", params={"event": f"t{i}"}, content=text.encode(),
               headers={**AS_PUBLISHER, "content-type": "text/plain"})
        c.post(f"/v1/sessions/{TARGET}/events", json={"event": "gateway-ish", "data": {"t": text}},
               headers=AS_PUBLISHER)
    c.post("/v1/sessions/done/events", json={"data": 1}, headers=AS_PUBLISHER)
    c.post("/v1/sessions/done/complete", json={"result": "r"}, headers=AS_PUBLISHER)
    known: dict[str, dict] = {}
    for name in (TARGET, "done"):
        page = c.get(f"/v1/sessions/{name}/events", headers=AS_PUBLISHER).json()
        events = {}
        for e in page["events"]:  # what a standard SSE reader must see for each id
            text = name == TARGET and e["event"].startswith("t")
            events[e["id"]] = (e["event"], normalised(e["data"]) if text else json.dumps(e["data"]))
        known[name] = {"epoch": page["epoch"], "last_id": page["last_id"], "events": events}
    return known


def credentials(session: str) -> st.SearchStrategy[dict]:
    token = jwt.encode({"sub": session, "exp": int(time.time()) + 3600, "scope": "subscribe"}, SECRET)
    return st.one_of(
        st.just({"headers": AS_PUBLISHER}),
        st.just({"params": {"token": token}}),
        st.just({"headers": {"Cookie": f"sse_gateway_token={token}"}}),
        HEADER_VALUE.map(lambda v: {"headers": {"Authorization": v}}),
        HEADER_VALUE.map(lambda v: {"headers": {"Authorization": (b"Bearer " + v).strip()}}),
        st.text(max_size=200).map(lambda v: {"params": {"token": v}}),
        HEADER_VALUE.map(lambda v: {"headers": {"Cookie": v}}),
        st.just({}),
    )


def cursors(epochs: list[str]) -> st.SearchStrategy[str]:
    ids = st.integers(min_value=-5, max_value=10**20).map(str)
    return st.one_of(ids, st.tuples(ids, st.sampled_from([*epochs, "zzzzzz", ""])).map(":".join),
                     HEADER_VALUE.map(lambda v: v.decode("latin-1")), st.text(max_size=40),
                     st.sampled_from(["earliest", "latest", "", " 3 "]))


@fuzz(400)
@given(data=st.data())
def test_stream_arbitrary_headers_and_queries(c, target, data):
    TRIED["stream"] += 1
    session = data.draw(st.sampled_from([TARGET, "done", "missing"])
                        | st.text(max_size=30).filter(lambda v: not v.startswith(("f", TARGET, "done"))))
    epochs = [target[s]["epoch"] for s in target]
    cred = data.draw(credentials(session))
    headers = dict(cred.get("headers", {}))
    params = dict(cred.get("params", {}))
    cursor = cursors(epochs)
    if data.draw(st.booleans()):
        headers["Last-Event-ID"] = data.draw(HEADER_VALUE | cursor.filter(
            lambda v: v == v.strip(" ") and all(" " <= ch <= "\xff" and ch != "\x7f" for ch in v)).map(
            lambda v: v.encode("latin-1")))
    for name in ("last_event_id", "from"):
        if data.draw(st.booleans()):
            params[name] = data.draw(cursor)
    params["live"] = data.draw(st.sampled_from(["false", "0"]) | st.text(max_size=10).filter(
        lambda v: v.lower() not in ("true", "1")))
    path = f"/v1/sessions/{urllib.parse.quote(session, safe='')}/stream"
    with c.stream("GET", path, headers=headers, params=params) as r:
        if r.status_code != 200:
            r.read()
            assert r.status_code == 204 or r.status_code >= 400, r.status_code
            if r.status_code != 204:
                assert_json_error(r)
            return
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [sse for sse in EventSource(r).iter_sse() if sse.id or sse.data or sse.event != "message"]
    known = target[session]
    for e in events:
        if not e.id:  # only the gateway's notices come without an id
            assert e.event == "gateway.reset", e
            assert json.loads(e.data) == {"epoch": known["epoch"], "last_id": known["last_id"]}
            continue
        id_, _, epoch = e.id.partition(":")
        assert epoch == known["epoch"] and int(id_) in known["events"], e
        etype, wire = known["events"][int(id_)]
        assert e.event == etype
        assert e.data == wire if etype.startswith("t") else json.loads(e.data) == json.loads(wire), e


def test_fuzzers_ran(c):
    assert TRIED["publish_bytes"] >= 100 * SCALE and TRIED["publish_json"] >= 100 * SCALE
    assert TRIED["stream"] >= 100 * SCALE

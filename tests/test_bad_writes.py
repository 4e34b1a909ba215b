"""A bad write fails alone: good and bad writes, interleaved and concurrent, against an in-process gateway.

Every route that takes JSON parses it with ``bodies.parse_json``; a value the gateway cannot store and send
again (nested too deep, not JSON, too large, of the wrong type) is a ``4xx`` JSON error before anything is
queued for the writer, and the writes it was sent with commit and answer as if it had not been there
(the SQLite group commit once failed a whole batch for one state document too deep to serialise).

The property test runs random mixes on SQLite and Redis: every good write answered ``201``/``200`` and stored exactly
(every id counted), every bad one a ``4xx`` JSON error, no ``5xx`` ever, and the log unchanged by the bad
ones; then everything stored is read back through the routes that send it again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sse_gateway import bodies
from sse_gateway.app import create_app
from sse_gateway.config import Settings

pytestmark = pytest.mark.timeout(300)

MAX_JSON_DEPTH = 200  # as docs/api.md says (bodies.MAX_JSON_DEPTH)
MAX_EVENT_BYTES = 2000
MAX_BATCH = 8
JSON = {"content-type": "application/json"}
NDJSON = {"content-type": "application/x-ndjson"}
_runs = itertools.count()


def gateway_settings(db: Path, redis_url: str | None = None) -> Settings:
    return Settings(backend="redis" if redis_url else "sqlite", db=str(db), redis_url=redis_url or "",
                    max_event_bytes=MAX_EVENT_BYTES, max_batch=MAX_BATCH, demo=True, session_ttl=0)


class App:
    """An in-process gateway (``create_app`` with its lifespan) and a client to it; SQLite at ``db``, or
    the Redis at ``redis_url``."""

    def __init__(self, db: Path, redis_url: str | None = None) -> None:
        self.app = create_app(gateway_settings(db, redis_url))

    async def __aenter__(self) -> App:
        self._life = self.app.router.lifespan_context(self.app)
        await self._life.__aenter__()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
                                        base_url="http://127.0.0.1", timeout=30)
        self.log = self.app.state.gw.log
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.aclose()
        await self._life.__aexit__(*exc)


def deep(levels: int, inner: bytes = b"1") -> bytes:
    return b"[" * levels + inner + b"]" * levels


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


# -- what the property test sends ----------------------------------------------------------------

# Good JSON values: any size of integer, finite floats, any text a JSON string can hold (no lone surrogates).
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)
good_data = values | st.just(nested(MAX_JSON_DEPTH - 1))  # the deepest a body's object may carry
batch_data = values | st.just(nested(MAX_JSON_DEPTH - 2))  # the deepest an item of a batch may carry
event_types = st.sampled_from(["message", "token", "tool.call", "a:b-c_d"])

too_deep = st.integers(MAX_JSON_DEPTH + 1, 1100) | st.sampled_from([254, 255, 990, 1023, 1024, 1025, 3000])
deep_json = st.builds(lambda n, big: deep(n, b"12345678901234567890123" if big else b"1"), too_deep, st.booleans())
not_json = st.sampled_from([b'{"data": NaN}', b'{"data": "\\ud800"}', b'{"data": [1e400]}', b"{not json",
                            b'{"data": ["\\udc00", 12345678901234567890123]}', b'{"data": 1} x', b""])
bad_items = st.one_of(
    deep_json.map(lambda d: b'{"data": ' + d + b"}"),
    not_json,
    st.sampled_from([b'{"event": 5, "data": 1}', b'{"event": "gateway.end", "data": 1}', b'{"event": "a b", "data": 1}',
                     b'{"data": 1, "extra": 2}', b'{"dat": 1}', b"[1]", b'"just a string"',
                     b'{"data": 1, "idempotency_key": 5}']),
    st.just(b'{"data": "' + b"x" * (MAX_EVENT_BYTES + 1) + b'"}'),  # 413 event_too_large
)


def item(event: str, data: Any) -> dict:
    return {"event": event, "data": data}


@st.composite
def good_publish(draw) -> tuple:
    kind = draw(st.sampled_from(["one", "batch", "ndjson"]))
    count = 1 if kind == "one" else draw(st.integers(1, MAX_BATCH))
    data = batch_data if kind == "batch" else good_data
    return ("publish", kind, [item(draw(event_types), draw(data)) for _ in range(count)])


@st.composite
def bad_publish(draw) -> tuple:
    kind = draw(st.sampled_from(["one", "batch", "ndjson"]))
    bad = draw(bad_items)
    if kind == "one":
        return ("bad_publish", kind, [], bad)
    good = [item(draw(event_types), draw(values)) for _ in range(draw(st.integers(0, 3)))]
    return ("bad_publish", kind, good, bad)  # a batch is all or nothing; NDJSON keeps the lines before


good_writes = st.one_of(
    good_publish(),
    st.builds(lambda v: ("state", {"doc": v}), good_data),
    st.builds(lambda v: ("create", v), good_data),
)
bad_writes = st.one_of(
    bad_publish(),
    st.builds(lambda d: ("bad_state", b'{"doc": ' + d + b"}"), deep_json),
    st.sampled_from([("bad_state", b"[1, 2]"), ("bad_state", b'{"doc": NaN}'), ("bad_state", b'"x"'),
                     ("bad_state", b'{"doc": "' + b"s" * (MAX_EVENT_BYTES + 1) + b'"}')]),
    st.builds(lambda d: ("bad_create", b'{"metadata": ' + d + b"}"), deep_json),
    st.sampled_from([("bad_create", b'{"id": 5}'), ("bad_create", b'{"ttl_seconds": "x"}'),
                     ("bad_create", b'{"metadata": "\\ud800"}'), ("bad_create", b'{"extra": 1}'),
                     ("bad_create", b'{"metadata": "' + b"m" * (MAX_EVENT_BYTES + 1) + b'"}')]),
    st.builds(lambda path, d: ("bad_other", path, b'{"x": ' + d + b"}"),
              st.sampled_from(["ack", "trim", "tokens", "complete", "demo"]), deep_json),
    st.sampled_from([("bad_other", "ack", b'{"id": "x"}'), ("bad_other", "trim", b'{"through": -1}'),
                     ("bad_other", "tokens", b'{"ttl_seconds": []}'), ("bad_other", "complete", b'{"result": NaN}'),
                     ("bad_other", "demo", b'{"duration": {}}'), ("bad_other", "ack", b"[]")]),
)
writes = st.lists(st.tuples(st.sampled_from(["s0", "s1", "s2"]), good_writes | bad_writes), min_size=1,
                  max_size=60)


# -- what the test expects -------------------------------------------------------------------------


@dataclass
class Model:
    """What the log must hold: per session, the data of every id a good write was answered with."""

    events: dict[str, dict[int, tuple[str, Any]]] = field(default_factory=dict)
    states: dict[str, list[Any]] = field(default_factory=dict)
    created: dict[str, Any] = field(default_factory=dict)
    answers: list[tuple[str, int]] = field(default_factory=list)

    def stored(self, session: str, ids: list[int], items: list[dict]) -> None:
        got = self.events.setdefault(session, {})
        for id_, it in zip(ids, items, strict=True):
            assert id_ not in got, f"id {id_} of {session} was given twice"
            got[id_] = (it["event"], it["data"])


def assert_error(r: httpx.Response, *statuses: int) -> dict:
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json", r.text[:300]
    body = r.json()
    assert body["error"]["code"] and body["error"]["message"], body
    return body


def ndjson(items: list[dict], bad: bytes | None = None) -> bytes:
    lines = [json.dumps(i).encode() for i in items]
    return b"\n".join([*lines, *([bad.replace(b"\n", b" ")] if bad is not None else [])]) + b"\n"


async def send(gw: App, model: Model, session: str, write: tuple) -> None:
    c = gw.client
    what = write[0]
    if what == "publish":
        _, kind, items = write
        if kind == "one":
            r = await c.post(f"/v1/sessions/{session}/events", json=items[0])
            assert r.status_code == 201, r.text
            ids = [r.json()["id"]]
        elif kind == "batch":
            r = await c.post(f"/v1/sessions/{session}/events", json=items)
            assert r.status_code == 201, r.text
            ids = r.json()["ids"]
        else:
            r = await c.post(f"/v1/sessions/{session}/events", content=ndjson(items), headers=NDJSON)
            assert r.status_code == 201, r.text
            ids = r.json()["ids"]
        model.stored(session, ids, items)
    elif what == "bad_publish":
        _, kind, good, bad = write
        if kind == "one":
            r = await c.post(f"/v1/sessions/{session}/events", content=bad, headers=JSON)
            assert_error(r, 400, 413)
        elif kind == "batch":
            body = b"[" + b",".join([*(json.dumps(i).encode() for i in good), bad]) + b"]"
            r = await c.post(f"/v1/sessions/{session}/events", content=body, headers=JSON)
            assert_error(r, 400, 413)  # a batch is all or nothing (b"" makes it invalid JSON too)
        else:
            r = await c.post(f"/v1/sessions/{session}/events", content=ndjson(good, bad), headers=NDJSON)
            if bad == b"" and not good and r.status_code == 404:  # a blank line alone creates no session
                assert assert_error(r, 404)["error"]["code"] == "session_not_found"
                ids = []
            elif bad == b"":  # an empty line is skipped: this stream is good
                assert r.status_code == (201 if good else 200), r.text
                ids = r.json()["ids"]
            else:
                ids = assert_error(r, 400, 413)["ids"]  # the lines before the bad one, kept and counted
            model.stored(session, ids, good)
    elif what == "state":
        r = await c.put(f"/v1/sessions/{session}/state", json=write[1])
        assert r.status_code == 200, r.text
        assert r.json()["state"] == write[1]  # the answer sends it again, exactly
        model.states.setdefault(session, []).append(write[1])
    elif what == "bad_state":
        assert_error(await c.put(f"/v1/sessions/{session}/state", content=write[1], headers=JSON), 400, 413)
    elif what == "create":
        name = f"c{next(_runs)}"
        r = await c.post("/v1/sessions", json={"id": name, "metadata": write[1]})
        assert r.status_code == 201, r.text
        model.created[name] = write[1]
    elif what == "bad_create":
        assert_error(await c.post("/v1/sessions", content=write[1], headers=JSON), 400, 413)
    elif what == "bad_other":
        _, path, body = write
        url = "/v1/demo/runs" if path == "demo" else f"/v1/sessions/{session}/{path}"
        assert_error(await c.post(url, content=body, headers=JSON), 400, 413)
    else:  # pragma: no cover
        raise AssertionError(what)


async def check_log(gw: App, model: Model) -> None:
    """The log holds exactly what the good writes were answered with, and every route sends it again."""
    c = gw.client
    sessions = {"s0", "s1", "s2"}
    for session in sorted(sessions):
        expected = model.events.get(session, {})
        row = await gw.log.get_session(session)
        if row is None:
            assert not expected and session not in model.states
            continue
        stored = await gw.log.read(session, 0, 10_000)
        assert [e.id for e in stored] == list(range(1, len(expected) + 1)) == sorted(expected), session
        assert row.last_id == len(expected)
        for e in stored:
            assert (e.event, json.loads(e.data)) == expected[e.id], (session, e.id)
        states = model.states.get(session, [])
        assert row.state_version == len(states)
        if states:
            assert row.state in states
        r = await c.get(f"/v1/sessions/{session}/events", params={"limit": 1000})
        assert r.status_code == 200, r.text
        assert [(e["id"], e["event"], e["data"]) for e in r.json()["events"]] == \
            [(i, *expected[i]) for i in sorted(expected)]
        r = await c.get(f"/v1/sessions/{session}/state")
        assert r.status_code == 200 and r.json()["version"] == len(states), r.text
    for name, metadata in model.created.items():
        r = await c.get(f"/v1/sessions/{name}")
        assert r.status_code == 200 and r.json()["metadata"] == metadata, r.text
    r = await c.get("/v1/sessions", params={"limit": 1000})
    assert r.status_code == 200, r.text
    listed = {s["id"]: s for s in r.json()["sessions"]}
    assert set(listed) == set(model.created) | {s for s in sessions if await gw.log.get_session(s)}
    for name, metadata in model.created.items():
        assert listed[name]["metadata"] == metadata


async def run(db: Path, redis_url: str | None, mix: list[tuple[str, tuple]], waves: int) -> None:
    model = Model()
    if redis_url:  # every example starts from an empty store
        client = redis.asyncio.Redis.from_url(redis_url)
        await client.flushall()
        await client.aclose()
    async with App(db, redis_url) as gw:
        assert type(gw.log).__name__ == ("RedisLog" if redis_url else "SqliteLog")
        size = max(1, -(-len(mix) // waves))
        for start in range(0, len(mix), size):  # each wave at once: its writes share group commits
            await asyncio.gather(*(send(gw, model, session, write) for session, write in mix[start:start + size]))
        await check_log(gw, model)
        # Completion, with a result the gateway must send again exactly; a bad result first changes nothing.
        for session in sorted(s for s, got in model.events.items() if got):
            r = await gw.client.post(f"/v1/sessions/{session}/complete", content=b'{"result": ' + deep(MAX_JSON_DEPTH)
                                     + b"}", headers=JSON)
            assert_error(r, 400)
            result = {"n": 2**70, "deep": nested(MAX_JSON_DEPTH - 2)}
            r = await gw.client.post(f"/v1/sessions/{session}/complete", json={"result": result})
            assert r.status_code == 200 and r.json()["result"] == result, r.text
            end = (await gw.log.read(session, len(model.events[session]), 10))
            assert [(e.id, e.event, json.loads(e.data)) for e in end] == \
                [(len(model.events[session]) + 1, "gateway.end", result)]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(mix=writes, waves=st.integers(1, 4))
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_good_and_bad_writes_interleaved_and_concurrent(request, tmp_path, backend, mix, waves):
    redis_url = request.getfixturevalue("redis_server") if backend == "redis" else None
    asyncio.run(run(tmp_path / f"run{next(_runs)}.db", redis_url, mix, waves))


# -- the finding, as it was reported ---------------------------------------------------------------


async def test_a_deep_document_does_not_fail_sixteen_concurrent_publishers(tmp_path):
    """16 publishers on one session, while state, metadata, results and events nested 990-1,023 levels deep
    (orjson reads them, cannot write them) arrive on others: 16 x 201, and a 400 json_too_deep for each."""
    async with App(tmp_path / "g.db") as gw:
        c = gw.client
        await c.post("/v1/sessions/done/events", json={"data": 0})
        for levels in (990, 1000, 1023):
            body = deep(levels)
            bad = [c.put("/v1/sessions/bad/state", content=b'{"a": ' + body + b"}", headers=JSON),
                   c.post("/v1/sessions", content=b'{"metadata": ' + body + b"}", headers=JSON),
                   c.post("/v1/sessions/done/complete", content=b'{"result": ' + body + b"}", headers=JSON),
                   c.post("/v1/sessions/bad/events", content=b'{"data": ' + body + b"}", headers=JSON),
                   c.post("/v1/sessions/bad/events", content=b'[{"data": ' + body + b"}]", headers=JSON)]
            good = [c.post("/v1/sessions/good/events", json={"data": i}) for i in range(16)]
            answers = await asyncio.gather(*good[:8], *bad, *good[8:])
            assert [r.status_code for r in answers[:8] + answers[13:]] == [201] * 16
            for r in answers[8:13]:
                assert assert_error(r, 400)["error"]["code"] == "json_too_deep"
        assert (await gw.log.get_session("good")).last_id == 48
        assert await gw.log.get_session("bad") is None
        assert (await gw.log.get_session("done")).status == "open"


async def test_ndjson_lines_committed_before_a_bad_one_are_reported(tmp_path):
    """Lines 1-2 are appended; line 3 is too deep: 400 with the ids of lines 1-2, never a 500 without them."""
    async with App(tmp_path / "g.db") as gw:
        body = b'{"data": 1}\n{"data": 2}\n{"data": ' + deep(1000) + b"}\n{\"data\": 4}\n"
        r = await gw.client.post("/v1/sessions/n/events", content=body, headers=NDJSON)
        assert assert_error(r, 400) == {"error": r.json()["error"], "ids": [1, 2]}
        assert r.json()["error"]["code"] == "json_too_deep"
        assert [e.id for e in await gw.log.read("n", 0, 10)] == [1, 2]


async def test_ndjson_refused_by_the_log_after_some_lines_reports_their_ids(tmp_path):
    """A line the log refuses (the session was completed meanwhile) ends the stream with 409 and the ids of
    the lines appended before it."""
    async with App(tmp_path / "g.db") as gw:
        c = gw.client
        appended = asyncio.Event()

        async def lines():
            yield b'{"data": 1}\n{"data": 2}\n'
            for _ in range(200):  # until the first lines are committed
                if (await gw.log.get_session("n")) is not None:
                    break
                await asyncio.sleep(0.01)
            appended.set()
            r = await c.post("/v1/sessions/n/complete", json={"result": 1})
            assert r.status_code == 200, r.text
            yield b'{"data": 3}\n'

        r = await c.post("/v1/sessions/n/events", content=lines(), headers=NDJSON)
        assert appended.is_set()
        body = assert_error(r, 409)
        assert body["error"]["code"] == "session_completed" and body["ids"] == [1, 2]


def test_the_documented_depth_is_the_one_parse_json_keeps():
    assert getattr(bodies, "MAX_JSON_DEPTH", None) == MAX_JSON_DEPTH


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1])
async def test_the_depth_limit_is_the_same_on_every_route(tmp_path, levels):
    """A body nested exactly MAX_JSON_DEPTH levels is taken by every route and sent again by every read;
    one level more is 400 json_too_deep everywhere."""
    async with App(tmp_path / "g.db") as gw:
        c = gw.client
        inner = deep(levels - 1)  # inside the body's own object: the body is `levels` deep
        attempts = [c.post("/v1/sessions/s/events", content=b'{"data": ' + inner + b"}", headers=JSON),
                    c.post("/v1/sessions/s/events", content=b'[{"data": ' + deep(levels - 2) + b"}]", headers=JSON),
                    c.post("/v1/sessions/s/events", content=b'{"data": ' + inner + b"}\n", headers=NDJSON),
                    c.put("/v1/sessions/s/state", content=b'{"a": ' + inner + b"}", headers=JSON),
                    c.post("/v1/sessions", content=b'{"id": "m", "metadata": ' + inner + b"}", headers=JSON)]
        answers = await asyncio.gather(*attempts)
        if levels > MAX_JSON_DEPTH:
            for r in answers:
                assert assert_error(r, 400)["error"]["code"] == "json_too_deep"
            assert await gw.log.get_session("s") is None and await gw.log.get_session("m") is None
            r = await c.post("/v1/sessions", json={"id": "s"})
            r = await c.post("/v1/sessions/s/complete", content=b'{"result": ' + inner + b"}", headers=JSON)
            assert assert_error(r, 400)["error"]["code"] == "json_too_deep"
            return
        assert [r.status_code for r in answers] == [201, 201, 201, 200, 201], [r.text[:200] for r in answers]
        r = await c.post("/v1/sessions/s/complete", content=b'{"result": ' + inner + b"}", headers=JSON)
        assert r.status_code == 200, r.text
        for url in ("/v1/sessions/s/events", "/v1/sessions/s/state", "/v1/sessions/m", "/v1/sessions/s",
                    "/v1/sessions"):
            r = await c.get(url)
            assert r.status_code == 200, (url, r.text[:200])
        assert {s["id"]: s["metadata"] for s in r.json()["sessions"]}["m"] == nested(levels - 1)

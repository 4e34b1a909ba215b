"""Two-way sessions, the input path: a client sends input, the agent reads it exactly once per cursor.

In process (tests/conftest.py ``start_app``): sending, repeats, errors, approvals, the mirror in the
output, reads as JSON (with the long poll), the input stream with ``live=false``, acks, tokens with the
input scope, and a hypothesis property: whatever the interleaving of inputs, retries and agent restarts
at any cursor, the agent ends holding exactly the inputs sent, each id once per cursor. Against real
gateways (system tier): a live input stream, and an agent process killed with -9 while an approval is
pending, which resumes from its acked cursor and sees the answer exactly once, on SQLite and on Redis.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from util import wait_until

pytestmark = pytest.mark.timeout(120)

SECRET = "ts-" + "i" * 40
KEY = "pk-" + "i" * 40
AS_AGENT = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def gw(start_module_app):
    return start_module_app(heartbeat=1)


@pytest.fixture
def c(gw):
    with gw.client(timeout=10) as client:
        yield client


def sse_frames(text: str) -> list[dict]:
    """The events of an SSE body (no heartbeats, no ``retry:``), each as its fields."""
    frames = []
    for block in text.split("\n\n"):
        fields: dict = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name in ("id", "event", "data"):
                fields[name] = value
        if "data" in fields:
            frames.append(fields)
    return frames


def mirrors(c: httpx.Client, session: str, **headers) -> list[dict]:
    events = c.get(f"/v1/sessions/{session}/events", params={"limit": 1000}, headers=headers).json()["events"]
    return [e["data"] for e in events if e["event"] == "gateway.input"]


# -- sending ------------------------------------------------------------------------------------


def test_send_read_ack_and_the_mirror(c):
    assert c.post("/v1/sessions", json={"id": "in-a"}).status_code == 201
    assert c.post("/v1/sessions/in-a/events", json={"data": "working"}).status_code == 201
    r = c.post("/v1/sessions/in-a/input", json={"kind": "message", "data": {"text": "hi"}, "idempotency_key": "m1"})
    assert r.status_code == 201, r.text
    epoch = r.json()["epoch"]
    assert r.json() == {"id": 1, "session": "in-a", "kind": "message", "event_id": 2, "input_last_id": 1,
                        "epoch": epoch}
    again = c.post("/v1/sessions/in-a/input", json={"kind": "message", "data": {"text": "hi"}, "idempotency_key": "m1"})
    assert again.status_code == 200 and again.json() == r.json()
    assert c.post("/v1/sessions/in-a/input", json={"kind": "steer", "data": "shorter"}).json()["id"] == 2
    assert c.post("/v1/sessions/in-a/input", json={"kind": "cancel"}).json()["id"] == 3
    page = c.get("/v1/sessions/in-a/input").json()
    assert [(i["id"], i["kind"], i["data"]) for i in page["inputs"]] == [
        (1, "message", {"text": "hi"}), (2, "steer", "shorter"), (3, "cancel", None)]
    assert (page["input_last_id"], page["input_acked_id"], page["next_after"], page["epoch"]) == (3, 0, 3, epoch)
    assert [m["input_id"] for m in mirrors(c, "in-a")] == [1, 2, 3]  # each once, in order
    assert mirrors(c, "in-a")[2] == {"input_id": 3, "kind": "cancel", "data": None}
    r = c.post("/v1/sessions/in-a/input/ack", json={"id": f"2:{epoch}"})
    assert r.json() == {"session": "in-a", "input_acked_id": 2, "input_last_id": 3}
    assert c.post("/v1/sessions/in-a/input/ack", json={"id": 1}).json()["input_acked_id"] == 2  # forward only
    assert [i["id"] for i in c.get("/v1/sessions/in-a/input").json()["inputs"]] == [3]  # after the ack
    assert [i["id"] for i in c.get("/v1/sessions/in-a/input", params={"after": 0, "limit": 2}).json()["inputs"]] \
        == [1, 2]
    row = c.get("/v1/sessions/in-a").json()
    assert (row["input_last_id"], row["input_acked_id"], row["last_id"]) == (3, 2, 4)
    r = c.post("/v1/sessions/in-a/input/ack", json={"id": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_ack"
    r = c.post("/v1/sessions/in-a/input/ack", json={"id": "1:zzzzzz"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "wrong_epoch"


def test_input_errors(c):
    r = c.post("/v1/sessions/in-none/input", json={"kind": "message"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    assert c.get("/v1/sessions/in-none").status_code == 404  # input never creates a session
    for path in ("/input", "/input/stream"):
        assert c.get(f"/v1/sessions/in-none{path}").status_code == 404
    c.post("/v1/sessions/in-done/events", json={"data": 1})
    c.post("/v1/sessions/in-done/input", json={"kind": "message", "idempotency_key": "k"})
    c.post("/v1/sessions/in-done/complete", json={})
    r = c.post("/v1/sessions/in-done/input", json={"kind": "message"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_completed"
    assert c.post("/v1/sessions/in-done/input", json={"kind": "message", "idempotency_key": "k"}).status_code == 200
    r = c.post("/v1/sessions/in-done/input", json={"kind": "message", "data": "x" * 2_000_000})
    assert r.status_code == 413 and r.json()["error"]["code"] in ("input_too_large", "body_too_large")


def test_approval_flow(c):
    c.post("/v1/sessions", json={"id": "in-ap"})
    r = c.post("/v1/sessions/in-ap/input", json={"kind": "approval", "approval_id": "a1", "decision": "approve"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "approval_not_found"
    request = {"event": "approval.request", "data": {"approval_id": "a1", "tool": "rm -rf"}}
    assert c.post("/v1/sessions/in-ap/events", json=request).status_code == 201
    r = c.post("/v1/sessions/in-ap/input", json={"kind": "approval", "approval_id": "a1", "decision": "deny",
                                                  "data": {"why": "too broad"}, "idempotency_key": "tab-1"})
    assert r.status_code == 201 and r.json()["id"] == 1
    second_tab = c.post("/v1/sessions/in-ap/input", json={"kind": "approval", "approval_id": "a1",
                                                           "decision": "approve"})
    assert second_tab.status_code == 409 and second_tab.json()["error"]["code"] == "approval_answered"
    assert second_tab.json()["input_id"] == 1
    retry = c.post("/v1/sessions/in-ap/input", json={"kind": "approval", "approval_id": "a1", "decision": "deny",
                                                      "data": {"why": "too broad"}, "idempotency_key": "tab-1"})
    assert retry.status_code == 200 and retry.json()["id"] == 1
    assert mirrors(c, "in-ap") == [{"input_id": 1, "kind": "approval", "data": {"why": "too broad"},
                                    "approval_id": "a1", "decision": "deny"}]
    item = c.get("/v1/sessions/in-ap/input").json()["inputs"][0]
    assert (item["approval_id"], item["decision"], item["event_id"]) == ("a1", "deny", 2)


def test_long_poll_wakes_on_input_and_times_out_without(gw):
    async def run() -> None:
        async with gw.async_client(timeout=10) as c:
            await c.post("/v1/sessions", json={"id": "in-lp"})
            started = time.monotonic()
            r = await c.get("/v1/sessions/in-lp/input", params={"wait": 1})
            assert r.json()["inputs"] == [] and time.monotonic() - started >= 0.9
            waiting = asyncio.create_task(c.get("/v1/sessions/in-lp/input", params={"wait": 20}))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            started = time.monotonic()
            await c.post("/v1/sessions/in-lp/input", json={"kind": "cancel"})
            r = await waiting
            assert [i["kind"] for i in r.json()["inputs"]] == ["cancel"] and time.monotonic() - started < 5
            waiting = asyncio.create_task(c.get("/v1/sessions/in-lp/input", params={"wait": 20, "after": 1}))
            await asyncio.sleep(0.3)
            await c.delete("/v1/sessions/in-lp")
            assert (await waiting).status_code == 404  # deleted while it waited: the wait ends

    gw.call(run())


def test_input_stream_replays_after_the_ack_and_resets_another_life(c):
    c.post("/v1/sessions", json={"id": "in-st"})
    for kind in ("message", "steer", "cancel"):
        c.post("/v1/sessions/in-st/input", json={"kind": kind, "data": kind})
    r = c.get("/v1/sessions/in-st/input/stream", params={"live": "false"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = sse_frames(r.text)
    epoch = c.get("/v1/sessions/in-st").json()["epoch"]
    assert [(f["id"], f["event"]) for f in frames] == [(f"1:{epoch}", "message"), (f"2:{epoch}", "steer"),
                                                       (f"3:{epoch}", "cancel")]
    assert json.loads(frames[1]["data"])["data"] == "steer"
    c.post("/v1/sessions/in-st/input/ack", json={"id": 2})
    assert [f["id"] for f in sse_frames(c.get("/v1/sessions/in-st/input/stream", params={"live": "false"}).text)] \
        == [f"3:{epoch}"]  # a restarted agent resumes after what it acked
    resumed = c.get("/v1/sessions/in-st/input/stream", params={"live": "false"},
                    headers={"Last-Event-ID": f"1:{epoch}"})
    assert [f["id"] for f in sse_frames(resumed.text)] == [f"2:{epoch}", f"3:{epoch}"]
    for start, ids in (("earliest", [1, 2, 3]), ("latest", []), ("acked", [3])):
        got = c.get("/v1/sessions/in-st/input/stream", params={"live": "false", "from": start})
        assert [int(f["id"].split(":")[0]) for f in sse_frames(got.text)] == ids, start
    other_life = c.get("/v1/sessions/in-st/input/stream", params={"live": "false"},
                       headers={"Last-Event-ID": "2:zzzzzz"})
    frames = sse_frames(other_life.text)
    assert frames[0]["event"] == "gateway.reset" and "id" not in frames[0]
    assert json.loads(frames[0]["data"]) == {"epoch": epoch, "last_id": 3}
    assert [f["id"] for f in frames[1:]] == [f"1:{epoch}", f"2:{epoch}", f"3:{epoch}"]
    for bad in ("abc", "-1", "1:"):
        r = c.get("/v1/sessions/in-st/input/stream", headers={"Last-Event-ID": bad})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor"
        for overridden in ({"last_event_id": bad}, {"from": bad}):  # checked although the header wins
            r = c.get("/v1/sessions/in-st/input/stream", headers={"Last-Event-ID": "1"}, params=overridden)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor"


# -- who may send -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(start_module_app):
    return start_module_app(token_secret=SECRET, publish_key=(KEY,), heartbeat=1)


def test_a_token_with_the_input_scope_sends_and_a_subscribe_token_does_not(locked):
    with locked.client(timeout=10) as c:
        c.post("/v1/sessions", json={"id": "in-tok"}, headers=AS_AGENT)
        plain = c.post("/v1/sessions/in-tok/tokens", headers=AS_AGENT).json()["token"]
        r = c.post("/v1/sessions/in-tok/tokens", json={"scopes": ["subscribe", "input"]}, headers=AS_AGENT)
        assert r.status_code == 201
        both = r.json()["token"]
        assert jwt.decode(both, SECRET, algorithms=["HS256"])["scope"] == ["subscribe", "input"]
        assert jwt.decode(plain, SECRET, algorithms=["HS256"])["scope"] == "subscribe"  # as every gateway reads it
        body = {"kind": "message", "data": "from the browser"}
        r = c.post("/v1/sessions/in-tok/input", json=body, headers={"Authorization": f"Bearer {plain}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
        for args in ({"headers": {"Authorization": f"Bearer {both}"}}, {"params": {"token": both}},
                     {"headers": {"Cookie": f"sse_gateway_token={both}"}}):
            assert c.post("/v1/sessions/in-tok/input", json=body, **args).status_code == 201
        assert c.get("/v1/sessions/in-tok/events", params={"token": both}).status_code == 200  # it reads too
        for agent_side in (("GET", "/input"), ("GET", "/input/stream"), ("POST", "/input/ack")):
            r = c.request(agent_side[0], f"/v1/sessions/in-tok{agent_side[1]}", json={"id": 0},
                          params={"token": both, "live": "false"})
            assert r.status_code == 401, agent_side  # the agent's side takes a publisher key
        for bad in (["input"], ["subscribe", "subscribe"], ["subscribe", "admin"], "subscribe", [], [1]):
            r = c.post("/v1/sessions/in-tok/tokens", json={"scopes": bad}, headers=AS_AGENT)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_scopes", bad
        c.delete("/v1/sessions/in-tok", headers=AS_AGENT)
        c.post("/v1/sessions", json={"id": "in-tok"}, headers=AS_AGENT)
        r = c.post("/v1/sessions/in-tok/input", json=body, headers={"Authorization": f"Bearer {both}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_session"  # bound to the old life


# -- the property: exactly the inputs sent, each id once per cursor --------------------------------

KINDS = ("message", "steer", "cancel")
STEP = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(KINDS), st.one_of(st.none(), st.integers(0, 5))),
    st.tuples(st.just("retry")),  # the last keyed send again, as a client whose answer was lost
    st.tuples(st.just("read"), st.integers(1, 4), st.booleans(), st.sampled_from(["json", "sse", "poll"])),
    st.tuples(st.just("restart"), st.sampled_from(["acked", "cursor", "between"]), st.integers(0, 100)),
)
SESSIONS = iter(range(10**6))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(STEP, max_size=30))
def test_the_agent_ends_holding_exactly_the_inputs_sent(gw, steps):
    session = f"prop-{next(SESSIONS)}"
    with gw.client(timeout=10) as c:
        assert c.post("/v1/sessions", json={"id": session}).status_code == 201
        expected: list[tuple[str, object]] = []  # what a user sent, in order, each input once
        by_key: dict[str, int] = {}
        last_keyed: dict | None = None
        held: dict[int, tuple[str, object]] = {}  # what the agent has handled, by id
        counts: dict[int, int] = {}  # how often each id reached the agent
        cursor = acked = 0

        def read(n: int, how: str) -> list[dict]:
            base = f"/v1/sessions/{session}/input"
            if how == "sse":
                r = c.get(base + "/stream", params={"live": "false"}, headers={"Last-Event-ID": str(cursor)})
                return [json.loads(f["data"]) for f in sse_frames(r.text)][:n]
            params = {"after": cursor, "limit": n, **({"wait": 0} if how == "json" else {"wait": 1})}
            return c.get(base, params=params).json()["inputs"]

        def take(items: list[dict]) -> None:
            nonlocal cursor
            for item in items:
                assert item["id"] == cursor + 1, (cursor, item)  # contiguous from the cursor, no gap, no repeat
                cursor = item["id"]
                counts[cursor] = counts.get(cursor, 0) + 1
                if cursor in held:
                    assert held[cursor] == (item["kind"], item["data"])  # a re-read is the same input
                held[cursor] = (item["kind"], item["data"])

        for step in steps:
            if step[0] == "send":
                _, kind, key = step
                body = {"kind": kind, "data": f"{kind}-{len(expected)}"}
                if key is not None:
                    body["idempotency_key"] = f"k{key}"
                    last_keyed = body
                r = c.post(f"/v1/sessions/{session}/input", json=body)
                if key is not None and f"k{key}" in by_key:
                    assert r.status_code == 200 and r.json()["id"] == by_key[f"k{key}"]
                    continue
                assert r.status_code == 201 and r.json()["id"] == len(expected) + 1
                expected.append((kind, body["data"]))
                if key is not None:
                    by_key[f"k{key}"] = r.json()["id"]
            elif step[0] == "retry" and last_keyed is not None:
                r = c.post(f"/v1/sessions/{session}/input", json=last_keyed)
                assert r.status_code == 200 and r.json()["id"] == by_key[last_keyed["idempotency_key"]]
            elif step[0] == "read":
                _, n, ack, how = step
                if how == "poll" and cursor >= len(expected):
                    how = "json"  # a poll with nothing to come would only wait
                take(read(n, how))
                if ack and cursor:
                    r = c.post(f"/v1/sessions/{session}/input/ack", json={"id": cursor})
                    acked = max(acked, cursor)  # forward only: a restarted agent may ack below what it did before
                    assert r.json()["input_acked_id"] == acked
            elif step[0] == "restart":
                _, where, pick = step
                if where == "acked":  # no cursor: the gateway resumes after input_acked_id
                    r = c.get(f"/v1/sessions/{session}/input/stream", params={"live": "false"})
                    frames = [json.loads(f["data"]) for f in sse_frames(r.text)]
                    cursor = acked
                    take(frames)
                    continue
                cursor = cursor if where == "cursor" else acked + pick % (cursor - acked + 1)
        take(read(1000, "json"))
        assert cursor == len(expected)
        assert [held[i] for i in range(1, cursor + 1)] == expected
        assert sorted(counts) == list(range(1, len(expected) + 1))  # every id reached it
        row = c.get(f"/v1/sessions/{session}").json()
        assert row["input_last_id"] == len(expected) and row["input_acked_id"] == acked
        assert [(m["kind"], m["data"]) for m in mirrors(c, session)] == expected  # the mirror: each once, in order
        assert [m["input_id"] for m in mirrors(c, session)] == list(range(1, len(expected) + 1))


# -- real gateways: a live stream, and an agent killed with -9 ----------------------------------------

AGENT = r'''
import json, sys, httpx
from httpx_sse import connect_sse
base, session, handled = sys.argv[1], sys.argv[2], sys.argv[3]
with httpx.Client(base_url=base, timeout=httpx.Timeout(5.0, read=60.0)) as c:
    # no cursor: the gateway starts after what this agent acked before it died
    with connect_sse(c, "GET", f"/v1/sessions/{session}/input/stream") as source:
        print("connected", flush=True)
        for sse in source.iter_sse():
            if not sse.data:
                continue
            item = json.loads(sse.data)
            with open(handled, "a") as f:
                f.write(json.dumps({"id": item["id"], "cursor": sse.id, "kind": sse.event, **item}) + "\n")
            c.post(f"/v1/sessions/{session}/input/ack", json={"id": sse.id}).raise_for_status()
'''


def handled(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_agent(base: str, session: str, out) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", AGENT, base, session, str(out)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "connected"
    return proc


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_an_agent_killed_while_an_approval_is_pending_resumes_and_sees_the_answer_once(start_gateway, start_redis,
                                                                                       backend, tmp_path):
    args = ("--heartbeat", "1")
    if backend == "redis":
        args += ("--backend", "redis", "--redis-url", start_redis().url)
    gateway = start_gateway(*args)
    out = tmp_path / "handled.jsonl"
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        c.post("/v1/sessions", json={"id": "run"})
        agent = start_agent(gateway.url, "run", out)
        try:
            c.post("/v1/sessions/run/input", json={"kind": "message", "data": "delete the temp files"})
            wait_until(lambda: c.get("/v1/sessions/run").json()["input_acked_id"] == 1,
                       what="the agent handled and acked the message")
            # the agent asks (its output), then dies before anyone answers
            c.post("/v1/sessions/run/events", json={"event": "approval.request",
                                                    "data": {"approval_id": "rm-1", "command": "rm -rf /tmp/x"}})
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            answer = {"kind": "approval", "approval_id": "rm-1", "decision": "approve", "idempotency_key": "tab-1"}
            assert c.post("/v1/sessions/run/input", json=answer).status_code == 201
            assert c.post("/v1/sessions/run/input", json=answer).status_code == 200  # the browser retried
            r = c.post("/v1/sessions/run/input", json={**answer, "idempotency_key": "phone"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "approval_answered"  # a second device
            c.post("/v1/sessions/run/input", json={"kind": "steer", "data": "then summarise"})
        finally:
            agent.kill()
            agent.wait(10)
        agent = start_agent(gateway.url, "run", out)
        try:
            wait_until(lambda: len(handled(out)) >= 3, what="the restarted agent catches up")
            time.sleep(0.5)  # and nothing more comes
            got = handled(out)
            assert [(h["id"], h["kind"]) for h in got] == [(1, "message"), (2, "approval"), (3, "steer")]
            assert [h for h in got if h["kind"] == "approval"][0]["decision"] == "approve"
            epoch = c.get("/v1/sessions/run").json()["epoch"]
            assert [h["cursor"] for h in got] == [f"{i}:{epoch}" for i in (1, 2, 3)]
            wait_until(lambda: c.get("/v1/sessions/run").json()["input_acked_id"] == 3, what="every input acked")
            # a user's second tab sees each input once, in order, among the agent's output
            events = c.get("/v1/sessions/run/events").json()["events"]
            assert [(e["event"], e["data"].get("input_id")) for e in events] == [
                ("gateway.input", 1), ("approval.request", None), ("gateway.input", 2), ("gateway.input", 3)]
            # live: a new input reaches the running agent at once
            c.post("/v1/sessions/run/input", json={"kind": "cancel"})
            wait_until(lambda: len(handled(out)) == 4, what="the live cancel")
            assert handled(out)[-1]["kind"] == "cancel"
        finally:
            agent.kill()
            agent.wait(10)


def test_input_streams_end_when_the_session_is_deleted(gateway):
    with httpx.Client(base_url=gateway.url, timeout=httpx.Timeout(5.0, read=10.0)) as c:
        c.post("/v1/sessions", json={"id": "gone"})
        with c.stream("GET", "/v1/sessions/gone/input/stream") as r:
            assert r.status_code == 200
            c.post("/v1/sessions/gone/input", json={"kind": "message", "data": 1})
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("id: ")).startswith("id: 1:")
            c.delete("/v1/sessions/gone")
            rest = list(lines)  # the stream ends: its session, input and all, is gone
        assert not [line for line in rest if line.startswith("id: ")]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_input_sent_to_another_process_reaches_a_live_input_stream(start_gateway, start_redis, backend, tmp_path):
    """Two processes on one SQLite file, or two nodes on one Redis: the agent streams from one, the user
    sends to the other, and the input arrives live (the other writer's notice wakes the stream: with a
    heartbeat of 10 s, a stream that missed it would read the input only at its next heartbeat)."""
    args = ("--heartbeat", "10")
    if backend == "redis":
        args += ("--backend", "redis", "--redis-url", start_redis().url)
    else:
        args += ("--db", str(tmp_path / "shared.db"))
    a, b = start_gateway(*args), start_gateway(*args)
    with httpx.Client(base_url=b.url, timeout=10) as user, \
            httpx.Client(base_url=a.url, timeout=httpx.Timeout(5.0, read=20.0)) as agent:
        user.post("/v1/sessions", json={"id": "far"})
        with agent.stream("GET", "/v1/sessions/far/input/stream") as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("retry: ")
            time.sleep(0.3)
            started = time.monotonic()
            assert user.post("/v1/sessions/far/input", json={"kind": "cancel", "data": "stop"}).status_code == 201
            for line in lines:
                if line.startswith("data: "):
                    assert json.loads(line[6:])["data"] == "stop"
                    break
            assert time.monotonic() - started < 3  # live, not a heartbeat's or a reconnect's later


def test_a_draining_gateway_ends_input_streams(start_gateway):
    gateway = start_gateway("--heartbeat", "1", "--drain-seconds", "2")
    with httpx.Client(base_url=gateway.url, timeout=httpx.Timeout(5.0, read=20.0)) as c:
        c.post("/v1/sessions", json={"id": "dr"})
        with c.stream("GET", "/v1/sessions/dr/input/stream") as r:
            assert r.status_code == 200
            gateway.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            b"".join(r.iter_bytes())  # ends: the agent reconnects elsewhere
            assert time.monotonic() - started < 5
        gateway.proc.wait(15)

"""Sessions outlive connections: lifecycle, completion, acks, state, presence, retention.

Listing, acks, retention and reads that end by themselves (``live=false``, a completed session) run in
process (tests/conftest.py ``start_app``); live streams and raw sockets talk to a real gateway. Each runs
on SQLite and on Redis (a real redis-server).
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from util import await_until, read_stream, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.system)])
def backend(request) -> dict[str, str]:
    """The session API runs on every backend: the settings that select one."""
    if request.param == "redis":
        return {"backend": "redis", "redis_url": request.getfixturevalue("start_redis")().url}
    return {"backend": "sqlite"}


def serve_args(backend: dict[str, str]) -> tuple[str, ...]:
    return tuple(arg for name, value in backend.items() for arg in (f"--{name.replace('_', '-')}", value))


@pytest.fixture
def gateway(start_gateway, backend):
    return start_gateway("--heartbeat", "1", *serve_args(backend))


@pytest.fixture
def app_gateway(start_app, backend):
    return start_app(heartbeat=1, **backend)


def subscribers(client: httpx.Client, session: str) -> int:
    return client.get(f"/v1/sessions/{session}").json()["subscribers"]


def publish(c: httpx.Client, session: str, n: int) -> None:
    assert c.post(f"/v1/sessions/{session}/events", json=[{"data": i} for i in range(n)]).status_code == 201


async def test_lifecycle_end_to_end(gateway, client):
    r = client.post("/v1/sessions", json={"id": "run", "metadata": {"user": "u1"}})
    assert r.status_code == 201
    body = r.json()
    assert body["id"] == "run" and body["stream_url"] == "/v1/sessions/run/stream" and "subscribe_token" in body
    assert client.post("/v1/sessions", json={"id": "run"}).status_code == 409
    live = asyncio.create_task(read_stream(gateway.url, "run", timeout=20))
    await await_until(lambda: subscribers(client, "run") == 1, what="the reader to attach to run")
    publish(client, "run", 3)
    r = client.post("/v1/sessions/run/complete", json={"result": {"answer": 42}})
    assert r.status_code == 200 and r.json()["status"] == "completed" and r.json()["last_id"] == 4
    got = await live
    assert got.ids == [1, 2, 3, 4] and got.events[-1] == "gateway.end" and got.data[-1] == '{"answer":42}'
    assert got.connects == 1  # the stream closed after gateway.end and the reader stopped
    epoch = client.get("/v1/sessions/run").json()["epoch"]
    r = client.get("/v1/sessions/run/stream", headers={"Last-Event-ID": f"4:{epoch}"})
    assert r.status_code == 204  # EventSource stops reconnecting
    r = client.post("/v1/sessions/run/events", json={"data": "late"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_completed"
    assert client.post("/v1/sessions/run/complete", json={"result": {"answer": 42}}).status_code == 200
    assert client.post("/v1/sessions/run/complete", json={"result": "other"}).status_code == 409
    row = client.get("/v1/sessions/run").json()
    assert row["result"] == {"answer": 42} and row["completed_at"] and row["metadata"] == {"user": "u1"}


async def test_client_returning_after_completion_gets_the_rest_and_the_result(app_gateway, app_client):
    gateway, client = app_gateway, app_client
    publish(client, "back", 10)
    client.post("/v1/sessions/back/complete", json={"result": "done"})
    epoch = client.get("/v1/sessions/back").json()["epoch"]
    got = await read_stream(gateway, "back", headers={"Last-Event-ID": f"6:{epoch}"})
    assert got.ids == [7, 8, 9, 10, 11] and got.data[-1] == '"done"'
    got = await read_stream(gateway, "back")  # a page opened after the run sees all of it
    assert got.ids == list(range(1, 12))


def test_generated_ids_and_listing(app_client):
    client = app_client
    ids = {client.post("/v1/sessions").json()["id"] for _ in range(3)}
    assert len(ids) == 3
    client.post("/v1/sessions/done/complete")  # unknown session
    publish(client, "done", 1)
    client.post("/v1/sessions/done/complete")
    listed = client.get("/v1/sessions", params={"status": "completed"}).json()["sessions"]
    assert [s["id"] for s in listed] == ["done"]
    assert len(client.get("/v1/sessions", params={"limit": 2}).json()["sessions"]) == 2
    assert client.get("/v1/sessions", params={"status": "nope"}).status_code == 400


def test_acks_move_forward_only_and_count_reconnects(app_client):
    client = app_client
    publish(client, "ack", 5)
    assert client.post("/v1/sessions/ack/ack", json={"id": 3}).json()["acked_id"] == 3
    assert client.post("/v1/sessions/ack/ack", json={"id": 2}).json()["acked_id"] == 3
    assert client.post("/v1/sessions/ack/ack", json={"id": 99}).status_code == 400
    assert client.post("/v1/sessions/ack/ack", json={"nope": 1}).status_code == 400
    client.get("/v1/sessions/ack/stream", params={"live": "false"}, headers={"Last-Event-ID": "4"})
    wait_until(lambda: client.get("/v1/sessions/ack").json()["acked_id"] == 4,
               what="a reconnect with Last-Event-ID 4 to count as an ack of 4")
    assert client.post("/v1/sessions/ack/ack", json={"id": 5, "extra": 1}).json()["error"]["code"] == "invalid_ack"


def test_an_ack_from_another_life_of_the_session_is_refused(app_client):
    client = app_client
    publish(client, "life", 5)
    old_epoch = client.get("/v1/sessions/life").json()["epoch"]
    assert client.post("/v1/sessions/life/ack", json={"id": f"2:{old_epoch}"}).json()["acked_id"] == 2
    client.delete("/v1/sessions/life")
    publish(client, "life", 5)
    epoch = client.get("/v1/sessions/life").json()["epoch"]
    r = client.post("/v1/sessions/life/ack", json={"id": f"4:{old_epoch}"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "wrong_epoch" and r.json()["epoch"] == epoch
    assert client.get("/v1/sessions/life").json()["acked_id"] == 0
    assert client.post("/v1/sessions/life/ack", json={"id": f"4:{epoch}"}).json()["acked_id"] == 4


def test_the_final_reconnect_answered_204_is_an_ack_too(app_client):
    client = app_client
    publish(client, "fin", 3)
    assert client.post("/v1/sessions/fin/complete", json={"result": "done"}).status_code == 200
    epoch = client.get("/v1/sessions/fin").json()["epoch"]
    r = client.get("/v1/sessions/fin/stream", headers={"Last-Event-ID": f"4:{epoch}"})
    assert r.status_code == 204
    wait_until(lambda: client.get("/v1/sessions/fin").json()["acked_id"] == 4,
               what="the reconnect answered 204 to count as an ack of the end event")


async def test_state_is_versioned_and_as_of_is_a_resume_point(app_gateway, app_client):
    gateway, client = app_gateway, app_client
    publish(client, "st", 2)
    r = client.put("/v1/sessions/st/state", json={"step": "search"})
    assert r.status_code == 200 and r.json()["version"] == 1 and r.headers["etag"] == '"1"'
    epoch = client.get("/v1/sessions/st").json()["epoch"]
    assert r.json()["as_of"] == f"2:{epoch}"
    r = client.put("/v1/sessions/st/state", json={"step": "draft"}, headers={"If-Match": '"1"'})
    assert r.status_code == 200 and r.json()["version"] == 2
    r = client.put("/v1/sessions/st/state", json={"step": "stale"}, headers={"If-Match": '"1"'})
    assert r.status_code == 412 and r.json()["error"]["code"] == "state_version_mismatch"
    assert client.put("/v1/sessions/st/state", json=[1], headers={"If-Match": '"2"'}).status_code == 400
    assert client.put("/v1/sessions/st/state", json={}, headers={"If-Match": "junk"}).status_code == 400
    publish(client, "st", 3)
    got = client.get("/v1/sessions/st/state").json()
    assert got == {"version": 2, "state": {"step": "draft"}, "as_of": f"2:{epoch}"}
    resumed = await read_stream(gateway, "st", params={"live": "false"}, headers={"Last-Event-ID": got["as_of"]})
    assert resumed.ids == [3, 4, 5]  # render the state, stream from as_of: nothing missed


async def test_presence_returns_to_zero_after_attach_detach_cycles(gateway, client):
    publish(client, "pr", 1)

    def raw_stream() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", gateway.port))
        s.sendall(b"GET /v1/sessions/pr/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.recv(100)
        return s

    async def present(expected: int) -> None:
        await await_until(lambda: subscribers(client, "pr") == expected, what=f"{expected} subscribers of pr")

    for cycle in range(50):
        socks = [raw_stream() for _ in range(3)]
        await present(3)
        if cycle % 2:  # killed clients: reset, not a polite close
            for s in socks:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        for s in socks:
            s.close()
        await present(0)
    row = client.get("/v1/sessions/pr").json()
    assert row["subscribers"] == 0 and row["last_seen_at"]


async def test_trimmed_cursor_gets_an_exact_gap_then_the_rest(app_gateway, app_client):
    gateway, client = app_gateway, app_client
    publish(client, "tr", 20)
    r = client.post("/v1/sessions/tr/trim", json={"through": 12})
    assert r.json()["earliest_id"] == 13
    got = await read_stream(gateway, "tr", params={"live": "false"}, headers={"Last-Event-ID": "5"})
    assert got.notices == [("gateway.gap", '{"from":6,"to":12}')]
    assert got.ids == list(range(13, 21))
    hist = client.get("/v1/sessions/tr/events", params={"after": 5, "limit": 3}).json()
    assert hist["gap"] == {"from": 6, "to": 12} and [e["id"] for e in hist["events"]] == [13, 14, 15]
    assert "gap" not in client.get("/v1/sessions/tr/events", params={"after": 12}).json()


async def test_max_events_trims_while_streaming(start_app, backend):
    gw = start_app(max_events=100, heartbeat=1, **backend)
    with gw.client() as c:
        for _ in range(5):
            publish(c, "cap", 100)
        assert c.get("/v1/sessions/cap").json()["earliest_id"] == 401
    got = await read_stream(gw, "cap", params={"live": "false"})
    assert got.notices == [("gateway.gap", '{"from":1,"to":400}')] and got.ids == list(range(401, 501))


async def test_delete_ends_streams_and_recreate_resets_old_cursors(gateway, client):
    publish(client, "dr", 5)
    old_epoch = client.get("/v1/sessions/dr").json()["epoch"]
    live = asyncio.create_task(read_stream(gateway.url, "dr", until_id=99, timeout=10))
    await await_until(lambda: subscribers(client, "dr") == 1, what="the reader to attach to dr")
    assert client.delete("/v1/sessions/dr").status_code == 204
    with pytest.raises(AssertionError, match="404"):
        await live  # the stream ended at once, and the reconnect got 404
    assert client.delete("/v1/sessions/dr").status_code == 404
    assert client.get("/v1/sessions/dr").status_code == 404
    publish(client, "dr", 2)
    got = await read_stream(gateway.url, "dr", params={"live": "false"}, headers={"Last-Event-ID": f"5:{old_epoch}"})
    new_epoch = client.get("/v1/sessions/dr").json()["epoch"]
    assert new_epoch != old_epoch
    assert got.notices == [("gateway.reset", f'{{"epoch":"{new_epoch}","last_id":2}}')] and got.ids == [1, 2]


def test_completed_sessions_expire_after_their_ttl(app_client):
    client = app_client
    assert client.post("/v1/sessions", json={"id": "ttl", "ttl_seconds": 1}).status_code == 201
    publish(client, "ttl", 3)
    client.post("/v1/sessions/ttl/complete")
    wait_until(lambda: client.get("/v1/sessions/ttl").status_code == 404, interval=0.1,
               what="the retention sweep to remove the completed session after its 1 s TTL")
    assert client.post("/v1/sessions", json={"ttl_seconds": 0}).status_code == 400


def test_a_create_retried_after_a_lost_answer_gets_the_same_session(app_client):
    c = app_client
    spec = {"metadata": {"user": 7}, "ttl_seconds": 60}
    first = c.put("/v1/sessions/again", json=spec)
    assert first.status_code == 201 and first.json()["id"] == "again"
    again = c.put("/v1/sessions/again", json=spec)
    assert again.status_code == 200 and again.json()["epoch"] == first.json()["epoch"]
    for other in ({"metadata": {"user": 8}, "ttl_seconds": 60}, {"metadata": {"user": 7}}):
        r = c.put("/v1/sessions/again", json=other)
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_exists"
    r = c.post("/v1/sessions", json={"id": "again", **spec})  # POST creates, or says the id is taken
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_exists"
    published = c.post("/v1/sessions/auto/events", json={"data": 1}).json()
    r = c.put("/v1/sessions/auto")  # created by a publish: no metadata, no ttl
    assert r.status_code == 200 and r.json()["epoch"] == published["epoch"]
    assert c.get("/v1/sessions/auto").json()["last_id"] == 1
    assert c.put("/v1/sessions/auto", json={"id": "x"}).json()["error"]["code"] == "unknown_field"

"""Every run ends: outcomes, the producer's lease, a cancel's grace, and fencing, over HTTP.

In process (tests/conftest.py ``start_app``): ending a run as completed, failed or cancelled and what
the end event says; the lease endpoint (renew, change, claim); a stale producer's writes refused with
403 producer_fenced and nothing written; a silent agent's run ended as timed_out, an unconfirmed cancel
ended as cancelled, by the gateway's own sweep; hostile bodies and headers; and a hypothesis property:
whatever the interleaving of claims and writes from old and new producers, the log holds exactly the
writes whose epoch was current when they arrived. Against real gateways (system tier): a subscriber
reading through a real socket sees a silent agent's run end as timed_out, never before its lease ran
out, on SQLite and across two Redis nodes after the node the agent wrote to was killed.
"""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from httpx_sse import connect_sse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from util import wait_until

from sse_gateway.errors import Forbidden
from sse_gateway.log.memory import MemoryLog
from sse_gateway.models import NewEvent

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gw(start_module_app):
    return start_module_app(heartbeat=1, cancel_grace=1)


@pytest.fixture
def c(gw):
    with gw.client(timeout=10) as client:
        yield client


def end_of(c: httpx.Client, session: str) -> dict:
    events = c.get(f"/v1/sessions/{session}/events", params={"limit": 1000}).json()["events"]
    assert events[-1]["event"] == "gateway.end"
    return events[-1]


def error_code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


# -- ending a run ---------------------------------------------------------------------------------


def test_a_run_ends_completed_failed_or_cancelled(c):
    c.post("/v1/sessions/lc-ok/events", json={"data": 1})
    r = c.post("/v1/sessions/lc-ok/complete", json={"result": {"answer": 42}})
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["run_status"], r.json()["outcome"]) == ("completed", "completed", "completed")
    assert end_of(c, "lc-ok")["data"] == {"answer": 42}  # v1: the result itself

    c.post("/v1/sessions/lc-bad/events", json={"data": 1})
    error = {"code": "tool_failed", "message": "the search tool answered 500"}
    r = c.post("/v1/sessions/lc-bad/complete", json={"status": "failed", "error": error})
    assert (r.json()["status"], r.json()["run_status"], r.json()["error"]) == ("completed", "failed", error)
    assert end_of(c, "lc-bad")["data"] == {"status": "failed", "error": error}
    assert c.post("/v1/sessions/lc-bad/complete", json={"status": "failed"}).status_code == 200  # the same again
    r = c.post("/v1/sessions/lc-bad/complete", json={"result": 1})
    assert r.status_code == 409 and error_code(r) == "session_completed" and r.json()["outcome"] == "failed"

    c.post("/v1/sessions/lc-stop/events", json={"data": 1})
    r = c.post("/v1/sessions/lc-stop/complete", json={"status": "cancelled", "result": {"draft": "Hel"}})
    assert r.json()["run_status"] == "cancelled"
    assert end_of(c, "lc-stop")["data"] == {"status": "cancelled", "error": None, "result": {"draft": "Hel"}}
    with c.stream("GET", "/v1/sessions/lc-stop/stream", params={"live": "false"}) as s:
        frames = [line for line in s.iter_lines() if line.startswith(("event:", "data:"))]
    assert frames[-2:] == ["event: gateway.end", 'data: {"status":"cancelled","error":null,"result":{"draft":"Hel"}}']


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"status": "timed_out"}, 400, "invalid_status"),  # only the gateway times a run out
    ({"status": "done"}, 400, "invalid_status"),
    ({"status": 1}, 400, "invalid_status"),
    ({"error": "x"}, 400, "invalid_body"),  # a completed run has a result, not an error
    ({"status": "failed", "reason": "x"}, 400, "invalid_body"),
    ({"status": "failed", "error": "x" * (1 << 20)}, 413, "result_too_large"),
])
def test_hostile_ends_are_refused_and_change_nothing(c, body, status, code):
    c.post("/v1/sessions/lc-hostile/events", json={"data": 1})
    r = c.post("/v1/sessions/lc-hostile/complete", json=body)
    assert (r.status_code, error_code(r)) == (status, code)
    row = c.get("/v1/sessions/lc-hostile").json()
    assert (row["status"], row["run_status"]) == ("open", "running")


# -- the lease and fencing ------------------------------------------------------------------------


def test_lease_renew_change_and_claim(c):
    r = c.post("/v1/sessions", json={"id": "lc-lease", "lease_seconds": 600})
    assert r.status_code == 201
    row = c.get("/v1/sessions/lc-lease").json()
    assert row["lease_seconds"] == 600 and row["lease_until"] is not None and row["producer_epoch"] == 0
    r = c.post("/v1/sessions/lc-lease/lease", json={"seconds": 0})
    assert (r.json()["lease_seconds"], r.json()["lease_until"]) == (None, None)
    r = c.post("/v1/sessions/lc-lease/lease", json={"claim": True, "seconds": 30})
    assert (r.json()["producer_epoch"], r.json()["lease_seconds"]) == (1, 30)
    assert c.post("/v1/sessions/lc-lease/lease").json()["producer_epoch"] == 1  # a renewal claims nothing
    for body, code in (({"seconds": -1}, "invalid_lease"), ({"seconds": 10**9}, "invalid_lease"),
                       ({"seconds": "5"}, "invalid_lease"), ({"claim": "yes"}, "invalid_body"),
                       ({"renew": True}, "invalid_body")):
        r = c.post("/v1/sessions/lc-lease/lease", json=body)
        assert (r.status_code, error_code(r)) == (400, code), body
    assert c.post("/v1/sessions/lc-nobody/lease").status_code == 404
    c.post("/v1/sessions/lc-lease/complete")
    r = c.post("/v1/sessions/lc-lease/lease")
    assert (r.status_code, error_code(r)) == (409, "session_completed")


def test_a_stale_producer_is_refused_and_writes_nothing(c):
    assert c.post("/v1/sessions/lc-fence/events", json={"data": "old"}, headers={"Producer-Epoch": "0"}).status_code == 201
    assert c.post("/v1/sessions/lc-fence/lease", json={"claim": True}).json()["producer_epoch"] == 1
    old = {"Producer-Epoch": "0"}
    for method, path, kw in (("POST", "/events", {"json": {"data": "late"}}),
                             ("POST", "/events", {"json": [{"data": "a"}, {"data": "b"}]}),
                             ("POST", "/events", {"content": b'{"data":1}\n', "headers": {
                                 **old, "Content-Type": "application/x-ndjson"}}),
                             ("PUT", "/state", {"json": {"step": 9}}),
                             ("POST", "/lease", {"json": {}}),
                             ("POST", "/complete", {"json": {"result": "late"}})):
        kw.setdefault("headers", old)
        r = c.request(method, "/v1/sessions/lc-fence" + path, **kw)
        assert r.status_code == 403 and error_code(r) == "producer_fenced", (path, r.text)
        assert r.headers["Producer-Epoch"] == "1" and r.json()["producer_epoch"] == 1
    row = c.get("/v1/sessions/lc-fence").json()
    assert (row["last_id"], row["state_version"], row["status"]) == (1, 0, "open")
    r = c.post("/v1/sessions/lc-fence/events", json={"data": "new"}, headers={"Producer-Epoch": "1"})
    assert r.status_code == 201 and r.json()["id"] == 2


@pytest.mark.parametrize("value", ["", "-1", "x", "1.5", "9007199254740992", "1" * 40, "0x10"])
def test_a_bad_producer_epoch_is_400(c, value):
    r = c.post("/v1/sessions/lc-epoch/events", json={"data": 1}, headers={"Producer-Epoch": value})
    assert (r.status_code, error_code(r)) == (400, "invalid_producer_epoch")
    assert c.get("/v1/sessions/lc-epoch").status_code == 404  # nothing created


@pytest.mark.parametrize(("field", "value", "code"), [
    ("lease_seconds", -1, "invalid_lease"), ("lease_seconds", 1.5, "invalid_lease"),
    ("lease_seconds", True, "invalid_lease"), ("webhook_url", "ftp://x", "invalid_webhook_url"),
    ("webhook_url", "http://", "invalid_webhook_url"), ("webhook_url", "http://a b", "invalid_webhook_url"),
    ("webhook_url", "http://h/" + "x" * 2048, "invalid_webhook_url"), ("webhook_url", 5, "invalid_webhook_url"),
])
def test_bad_session_settings_are_400(c, field, value, code):
    r = c.post("/v1/sessions", json={"id": "lc-settings", field: value})
    assert (r.status_code, error_code(r)) == (400, code)
    assert c.get("/v1/sessions/lc-settings").status_code == 404


def test_put_session_is_idempotent_with_its_lease(c):
    body = {"lease_seconds": 120, "webhook_url": "https://hooks.example/agent"}
    assert c.put("/v1/sessions/lc-put", json=body).status_code == 201
    assert c.put("/v1/sessions/lc-put", json=body).status_code == 200
    assert c.put("/v1/sessions/lc-put", json={**body, "lease_seconds": 60}).status_code == 200  # a live value
    r = c.put("/v1/sessions/lc-put", json={**body, "webhook_url": "https://hooks.example/other"})
    assert (r.status_code, error_code(r)) == (409, "session_exists")
    assert "webhook_url" not in c.get("/v1/sessions/lc-put").json()  # readers never see where it notifies


# -- the gateway ends runs itself -----------------------------------------------------------------


def test_a_silent_agent_s_run_ends_as_timed_out(c):
    c.post("/v1/sessions", json={"id": "lc-silent", "lease_seconds": 1})
    c.post("/v1/sessions/lc-silent/events", json={"data": "thinking"})
    row = wait_until(lambda: (r := c.get("/v1/sessions/lc-silent").json())["status"] == "completed" and r,
                     what="the gateway's sweep ends the silent run")
    assert (row["run_status"], row["error"]["code"], row["lease_until"]) == ("timed_out", "lease_expired", None)
    end = end_of(c, "lc-silent")
    assert end["id"] == 2 and end["data"]["status"] == "timed_out"
    metrics = c.get("/metrics").text
    assert 'sse_gateway_runs_ended_total{outcome="timed_out"}' in metrics
    assert next(line for line in metrics.splitlines() if line.startswith("sse_gateway_runs_expired_total")) != \
        "sse_gateway_runs_expired_total 0.0"


def test_a_cancel_is_cancelling_until_confirmed_or_the_grace_ends(c):
    c.post("/v1/sessions", json={"id": "lc-cancel", "lease_seconds": 600})
    c.post("/v1/sessions/lc-cancel/input", json={"kind": "cancel", "data": {"reason": "enough"}})
    row = c.get("/v1/sessions/lc-cancel").json()
    assert row["run_status"] == "cancelling" and row["cancel_requested_at"] is not None
    assert c.post("/v1/sessions/lc-cancel/events", json={"data": "still writing"}).status_code == 201
    row = wait_until(lambda: (r := c.get("/v1/sessions/lc-cancel").json())["status"] == "completed" and r,
                     what="the gateway ends the run the agent did not confirm")
    assert (row["run_status"], row["error"]["code"]) == ("cancelled", "cancel_unconfirmed")
    assert end_of(c, "lc-cancel")["data"]["status"] == "cancelled"

    c.post("/v1/sessions", json={"id": "lc-confirm"})  # the agent confirms within the grace
    c.post("/v1/sessions/lc-confirm/input", json={"kind": "cancel"})
    r = c.post("/v1/sessions/lc-confirm/complete", json={"status": "cancelled", "result": {"done": 3}})
    assert r.json()["run_status"] == "cancelled" and r.json()["error"] is None


# -- a property: fencing keeps exactly the current producer's writes ------------------------------

OPS = st.lists(st.one_of(st.just(("claim",)), st.tuples(st.just("write"), st.integers(0, 4)),
                         st.tuples(st.just("write_unfenced"))), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS)
async def test_fencing_keeps_exactly_the_current_producer_s_writes(ops):
    log = MemoryLog()
    await log.open()
    await log.create_session("s")
    current, kept = 0, []
    for n, op in enumerate(ops):
        if op[0] == "claim":
            current = (await log.lease("s", claim=True)).producer_epoch
            continue
        epoch = op[1] if op[0] == "write" else None
        try:
            await log.append("s", [NewEvent("w", json.dumps([n, epoch]))], producer=epoch)
        except Forbidden:
            assert epoch is not None and epoch < current
            continue
        assert epoch is None or epoch >= current
        current = max(current, epoch or 0)
        kept.append([n, epoch])
    stored = [json.loads(e.data) for e in await log.read("s", 0, 1000)]
    assert stored == kept
    assert [e.id for e in await log.read("s", 0, 1000)] == list(range(1, len(kept) + 1))


# -- real gateways ------------------------------------------------------------------------------


def _read_to_end(url: str, session: str, headers: dict | None = None) -> list:
    with httpx.Client(base_url=url, timeout=30) as client, \
            connect_sse(client, "GET", f"/v1/sessions/{session}/stream", headers=headers or {}) as source:
        events = []
        for sse in source.iter_sse():
            if sse.id:  # log entries (heartbeats and notices carry none)
                events.append(sse)
            if sse.event == "gateway.end":
                return events
    raise AssertionError("the stream closed before gateway.end")


@pytest.mark.system
def test_a_subscriber_sees_a_silent_agent_time_out(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        c.post("/v1/sessions", json={"id": "silent", "lease_seconds": 1})
        last = None
        for i in range(5):
            last = c.post("/v1/sessions/silent/events", json={"data": i}).json()
        events = _read_to_end(gateway.url, "silent")
        row = c.get("/v1/sessions/silent").json()
        published = c.get("/v1/sessions/silent/events").json()["events"]
    assert [int(e.id.split(":")[0]) for e in events] == list(range(1, 7))  # every id once, then the end
    assert json.loads(events[-1].data)["status"] == "timed_out" and row["run_status"] == "timed_out"
    assert last["id"] == 5
    ts = [e["ts"] for e in published]
    assert ts[-1] >= ts[-2]  # (RFC 3339 UTC strings order as times)
    from datetime import datetime
    gap = datetime.fromisoformat(ts[-1]) - datetime.fromisoformat(ts[-2])
    assert gap.total_seconds() >= 1  # never before the lease ran out


@pytest.mark.system
def test_a_lease_ends_the_run_on_another_redis_node_when_the_agent_s_node_dies(start_gateway, redis_server):
    a = start_gateway("--backend", "redis", "--redis-url", redis_server)
    b = start_gateway("--backend", "redis", "--redis-url", redis_server)
    with httpx.Client(base_url=a.url, timeout=10) as c:
        c.post("/v1/sessions", json={"id": "far", "lease_seconds": 5})
        for i in range(3):
            c.post("/v1/sessions/far/events", json={"data": i})
    with httpx.Client(base_url=b.url, timeout=30) as client, \
            connect_sse(client, "GET", "/v1/sessions/far/stream") as source:
        seen = []
        a.proc.send_signal(signal.SIGKILL)  # the agent's node dies; node b alone is left to end the run
        for sse in source.iter_sse():
            if sse.id:
                seen.append(sse)
            if sse.event == "gateway.end":
                break
    assert [int(e.id.split(":")[0]) for e in seen] == [1, 2, 3, 4]
    assert json.loads(seen[-1].data)["status"] == "timed_out"
    assert "sse_gateway_runs_expired_total 1.0" in httpx.get(b.url + "/metrics").text  # node b ended it

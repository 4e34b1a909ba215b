"""POST /v1/demo/runs: the simulated agent run behind the demo page."""

from __future__ import annotations

import signal

import httpx
import pytest
from messages_util import View


@pytest.mark.timeout(60)
async def test_a_demo_run_types_pauses_past_the_heartbeat_and_completes(start_gateway):
    gw = start_gateway("--heartbeat", "1")
    async with httpx.AsyncClient() as api:
        resp = await api.post(f"{gw.url}/v1/demo/runs", json={"duration": 3})
    assert resp.status_code == 201, resp.text
    run = resp.json()
    assert run["stream_url"] == f"/v1/sessions/{run['session']}/stream" and run["heartbeat"] == 1

    async with httpx.AsyncClient(base_url=gw.url) as api:
        first = await _follow(gw, run["session"], _nothing)  # live, or the answer whole if it began already
        written = (await api.get(f"/v1/sessions/{run['session']}/events", params={"limit": 1000})).json()["events"]
    events = [e["event"] for e in written]  # the log as the run wrote it
    assert [e["id"] for e in written] == list(range(1, len(written) + 1))
    assert events[:2] == ["status", "message.start"] and events[-2:] == ["message.end", "gateway.end"]
    assert written[1]["data"] == {"message": "answer", "type": "answer"}
    assert written[-2]["data"] == {"message": "answer"}
    assert events.count("tool") == 2 and 300 <= events.count("message.append") <= 400
    deltas = [e["data"] for e in written if e["event"] == "message.append"]
    assert {d["message"] for d in deltas} == {"answer"}
    text = "".join(d["text"] for d in deltas)
    result = written[-1]["data"]
    assert result["text"] == text and result["tokens"] == len(deltas)
    assert first[-1] == ("gateway.end", result)

    # A reader that comes after the end gets the answer whole, in one event.
    late = [(e, d) for e, d in await _follow(gw, run["session"], _nothing) if e.startswith("message.")]
    assert late == [("message.snapshot", {"message": "answer", "type": "answer", "metadata": None, "text": text,
                                          "status": "finished", "start": 2})]  # after the first status event
    assert result["seconds"] >= 2.0, "the tool pause must outlast the heartbeat"
    async with httpx.AsyncClient() as api:
        row = (await api.get(f"{gw.url}/v1/sessions/{run['session']}")).json()
    assert (row["run_status"], row["error"], row["result"]) == ("completed", None, result)


@pytest.mark.timeout(60)
def test_demo_runs_need_a_publisher_key_once_keys_are_configured(start_app):
    key = "demo-key-" + "k" * 16
    gw = start_app(publish_key=(key,), token_secret="demo-secret-" + "s" * 32)  # in process: answers that end
    as_publisher = {"Authorization": f"Bearer {key}"}
    with gw.client() as c:
        assert c.post("/v1/demo/runs").status_code == 401
        resp = c.post("/v1/demo/runs", json={"duration": 1}, headers=as_publisher)
        assert resp.status_code == 201, resp.text
        stream_url = resp.json()["stream_url"]
        assert "?token=" in stream_url, "the page cannot read a keyed gateway without a subscribe token"
        assert c.get(f"{stream_url}&live=false").status_code == 200
        session, token = resp.json()["session"], stream_url.split("?token=")[1]
        stop = c.post(f"/v1/sessions/{session}/input", json={"kind": "cancel"},
                      headers={"Authorization": f"Bearer {token}"})
        assert stop.status_code in (201, 409), stop.text  # the page's token may send input (Stop, approve)
        assert stop.status_code == 201 or stop.json()["error"]["code"] == "session_completed"
        for body in ({"duration": 0}, {"duration": "5"}, {"duration": True}, {"speed": 2}, [1]):
            resp = c.post("/v1/demo/runs", json=body, headers=as_publisher)
            assert resp.status_code == 400, (body, resp.text)


@pytest.mark.timeout(60)
def test_no_demo_turns_the_endpoint_off_and_a_run_cut_by_shutdown_ends_quietly(start_gateway):
    off = start_gateway("--no-demo")
    assert httpx.post(f"{off.url}/v1/demo/runs").status_code == 404
    assert httpx.get(off.url + "/").status_code == 200  # the page itself stays

    on = start_gateway("--heartbeat", "1")
    session = httpx.post(f"{on.url}/v1/demo/runs", json={"duration": 60}).json()["session"]
    on.proc.send_signal(signal.SIGTERM)
    assert on.proc.wait(timeout=20) == 0
    assert "Traceback" not in on.log() and "Task exception" not in on.log()
    on.start()
    row = httpx.get(f"{on.url}/v1/sessions/{session}").json()
    assert row["status"] == "open" and 0 < row["last_id"] < 300, "the run neither stopped nor kept its events"


@pytest.mark.timeout(60)
def test_demo_runs_are_bounded_in_number_and_count_against_max_sessions(start_gateway):
    from sse_gateway.demo import MAX_RUNS

    gw = start_gateway("--max-sessions", str(MAX_RUNS + 1))
    with httpx.Client(base_url=gw.url) as c:
        started = [c.post("/v1/demo/runs", json={"duration": 300}) for _ in range(MAX_RUNS)]
        assert [r.status_code for r in started] == [201] * MAX_RUNS
        r = c.post("/v1/demo/runs", json={"duration": 300})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_demo_runs"
        assert int(r.headers["retry-after"]) > 0
        c.delete(f"/v1/sessions/{started[0].json()['session']}")  # its run stops at its next token
        for i in range(2):
            assert c.post("/v1/sessions", json={"id": f"mine{i}"}).status_code == 201
        r = c.post("/v1/demo/runs", json={"duration": 1})  # a slot may be free again, the sessions are not
        assert (r.status_code, r.json()["error"]["code"]) in ((503, "too_many_sessions"), (429, "too_many_demo_runs"))
        assert len(c.get("/v1/sessions", params={"limit": 1000}).json()["sessions"]) == MAX_RUNS + 1


async def _nothing(event, data) -> None:
    pass


async def _follow(gw, session: str, on_event) -> list[tuple[str, object]]:
    """Read the run's stream to its end, calling ``on_event(event, data)`` as each arrives."""
    from sse_gateway.client import Subscriber

    seen = []
    async for event in Subscriber(session, url=gw.url):
        seen.append((event.event, event.data))
        await on_event(event.event, event.data)
    return seen


@pytest.mark.timeout(60)
async def test_a_demo_run_asks_before_its_tool_call_and_goes_on_by_itself_without_an_answer(start_gateway):
    gw = start_gateway("--heartbeat", "1")
    async with httpx.AsyncClient(base_url=gw.url) as api:
        for decision in ("approve", "deny", None):
            session = (await api.post("/v1/demo/runs", json={"duration": 2})).json()["session"]

            async def answer(event, data, decision=decision, session=session):
                if event == "approval.request" and decision:
                    r = await api.post(f"/v1/sessions/{session}/input", json={
                        "kind": "approval", "approval_id": data["approval_id"], "decision": decision})
                    assert r.status_code == 201, r.text

            seen = await _follow(gw, session, answer)
            types = [e for e, _ in seen]
            tools = [d for e, d in seen if e == "tool"]
            result = seen[-1][1]
            request = next(d for e, d in seen if e == "approval.request")
            assert request["tool"] == "search_docs" and request["approval_id"] == "search_docs-1"
            assert types.index("approval.request") < types.index("tool")
            assert result["tool"] == (decision or "timeout") and "status" not in result
            if decision == "deny":
                assert [t["status"] for t in tools] == ["skipped"]
                assert "Without the lookup" in result["text"]
            else:
                assert [t["status"] for t in tools] == ["running", "done"]
                assert "Here is what I found" in result["text"]
            assert types.count("gateway.input") == (1 if decision else 0)
            row = (await api.get(f"/v1/sessions/{session}")).json()
            assert row["input_acked_id"] == row["input_last_id"], "the run acks the input it handled"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("data", "message"), [({"reason": "enough, thanks"}, "enough, thanks"),
                                               (None, "the user pressed Stop")], ids=["reason", "no-reason"])
async def test_a_cancel_stops_a_demo_run_and_ends_it_as_cancelled(start_gateway, data, message):
    gw = start_gateway("--heartbeat", "1", "--cancel-grace", "0")  # only the run itself ends it
    async with httpx.AsyncClient(base_url=gw.url) as api:
        session = (await api.post("/v1/demo/runs", json={"duration": 60})).json()["session"]
        tokens = 0

        async def stop_after_ten(event, _):
            nonlocal tokens
            if event == "message.append":
                tokens += 1
                if tokens == 10:
                    body = {"kind": "cancel", **({"data": data} if data is not None else {})}
                    r = await api.post(f"/v1/sessions/{session}/input", json=body)
                    assert r.status_code == 201, r.text

        seen = await _follow(gw, session, stop_after_ten)
        row = (await api.get(f"/v1/sessions/{session}")).json()
    typed = View()  # the answer as a reader assembles it: whole if the reader came after it began, then deltas
    for kind, body in seen:
        typed.take(kind, body)
    end = seen[-1][1]
    assert seen[-1][0] == "gateway.end"
    assert set(end) == {"status", "error", "result"} and end["status"] == "cancelled"
    assert end["error"] == {"code": "cancelled", "message": message}
    result = end["result"]
    assert "cancelled" not in result, "the outcome says it, not a convention inside the result"
    assert typed.messages == {"answer": {"type": "answer", "metadata": None, "text": result["text"], "status": "failed",
                                         "error": end["error"]}}
    assert result["tokens"] < 100, "it stopped typing"
    assert seen[-2] == ("message.end", {"message": "answer", "status": "failed", "error": end["error"]})
    assert [d["kind"] for e, d in seen if e == "gateway.input"] == ["cancel"]
    assert (row["status"], row["run_status"], row["outcome"]) == ("completed", "cancelled", "cancelled")
    assert row["error"] == end["error"] and row["result"] == result
    assert row["input_acked_id"] == row["input_last_id"] == 1, "the run acks the cancel it handled"

"""sse_gateway.client: the Publisher's retries, keys, batches and runs; the Subscriber's exact resume.

What needs no socket runs against the in-process gateway (``start_app``); drops, crashes, streams and
limits on streams run against real gateways (``start_gateway``), through ``ChaosProxy`` where a
network must fail.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import ROOT
from util import ChaosProxy, await_until, free_port

from sse_gateway.client import (
    Event,
    GatewayError,
    GatewayUnreachable,
    Publisher,
    Reconnect,
    Retry,
    RetryNotice,
    Subscriber,
    SyncPublisher,
    Watchers,
    error_object,
)
from sse_gateway.client.http import _retry_after

pytestmark = pytest.mark.timeout(120)

#: Retries without waiting: for faults the test makes itself, where no gateway needs time.
AT_ONCE = Retry(attempts=1000, timeout=60, base=0.0, cap=0.0)
#: Short waits, for a real gateway that is restarting or a network that drops.
QUICK = Retry(attempts=1_000_000, timeout=60, base=0.02, cap=0.5)
KEY = "k" * 24


def fresh(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Faulty(httpx.AsyncBaseTransport):
    """Forwards requests to ``inner``, failing the n-th as ``faults[n]`` says.

    ``"before"``: the request never reaches the gateway (a refused or reset connection);
    ``"after"``: the gateway handles it and the answer is lost (a drop after the commit).
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, faults: list[str | None] | None = None) -> None:
        self.inner = inner
        self.faults = list(faults or [])
        self.bodies: list[bytes] = []
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.bodies.append(request.content)
        fault = self.faults.pop(0) if self.faults else None
        if fault == "before":
            raise httpx.ConnectError("the connection was refused", request=request)
        response = await self.inner.handle_async_request(request)
        if fault == "after":
            await response.aread()
            self.lost += 1
            raise httpx.ReadError("the connection dropped before the answer", request=request)
        return response


async def history(client: httpx.AsyncClient, session: str) -> list[dict]:
    events: list[dict] = []
    after = 0
    while True:
        page = (await client.get(f"/v1/sessions/{session}/events", params={"after": after, "limit": 1000})).json()
        events += page["events"]
        if page["next_after"] == after:
            return events
        after = page["next_after"]


def assert_exactly(events: list[dict], texts: list[str]) -> None:
    """The log holds exactly ``texts`` as tokens, in order, with ids 1..n: nothing twice, nothing missing."""
    assert [e["id"] for e in events] == list(range(1, len(texts) + 1))
    assert [e["data"]["text"] for e in events] == texts


@pytest.fixture(scope="module")
def module_app(start_module_app):
    return start_module_app()


@pytest.fixture
def app(start_app):
    return start_app()


# -- the publisher: lost answers, retries, keys -----------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(1, 60), batch_size=st.integers(1, 25),
       faults=st.lists(st.sampled_from([None, "before", "after"]), max_size=16))
def test_lost_answers_and_refused_connections_never_append_twice(module_app, count, batch_size, faults):
    """Whatever request fails, and whether before or after the gateway stored it, the log ends exact."""
    session = fresh("lost")
    texts = [f"t{i}" for i in range(count)]

    async def scenario() -> None:
        transport = Faulty(module_app._bridge, faults)
        async with httpx.AsyncClient(transport=transport, base_url=module_app.base) as http:
            async with Publisher(client=http, batch_size=batch_size, retry=AT_ONCE) as pub:
                futures = [await pub.token(session, text) for text in texts]
                await pub.flush()
            assert [f.result() for f in futures] == list(range(1, count + 1))
        async with module_app.async_client() as plain:
            assert_exactly(await history(plain, session), texts)

    asyncio.run(scenario())


async def test_a_failed_batch_is_sent_again_with_the_same_keys(app):
    transport = Faulty(app._bridge, ["after", "before", "after"])
    async with httpx.AsyncClient(transport=transport, base_url=app.base) as http:
        async with Publisher(client=http, retry=AT_ONCE, key_prefix="agent-7") as pub:
            await pub.send("keys", "step", {"n": 1})
            await pub.send("keys", "step", {"n": 2})
            assert await pub.flush("keys") == [1, 2]
    assert transport.lost == 2 and len(transport.bodies) == 4
    assert len(set(transport.bodies)) == 1  # every try carried the same events with the same keys
    assert b'"idempotency_key":"agent-7-1"' in transport.bodies[0]
    assert b'"idempotency_key":"agent-7-2"' in transport.bodies[0]


async def test_keys_are_a_random_prefix_per_publisher_and_a_counter():
    one, two = Publisher("http://127.0.0.1:1"), Publisher("http://127.0.0.1:1")
    keys = [one.next_key() for _ in range(3)]
    assert keys == [f"{one.key_prefix}-{n}" for n in (1, 2, 3)]
    assert one.key_prefix != two.key_prefix and len(one.key_prefix) >= 16
    await one.aclose()
    await two.aclose()


def mock_gateway(answers: list[httpx.Response]):
    """A transport that answers ``answers`` in order, recording the requests."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return answers.pop(0)

    return httpx.MockTransport(handle), seen


def error(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return httpx.Response(status, json={"error": {"code": code, "message": code.replace("_", " ")}}, headers=headers)


async def test_retries_honour_retry_after_on_429_and_503():
    transport, seen = mock_gateway([error(429, "too_many_demo_runs", "1"), error(503, "store_busy", "1"),
                                    httpx.Response(201, json={"id": 1, "session": "s", "last_id": 1})])
    notices: list[RetryNotice] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:1") as http:
        async with Publisher(client=http, retry=Retry(base=0.01, cap=0.05), on_retry=notices.append) as pub:
            published = await pub.publish("s", "message", {"a": 1})
    assert published.ids == [1] and published.appended
    assert [n.error.status for n in notices] == [429, 503]
    assert all(n.delay >= 1 for n in notices)  # waited at least what Retry-After said, before each retry
    assert len({r.content for r in seen}) == 1  # one event, one key, three tries


async def test_a_retry_after_longer_than_the_budget_gives_up_at_once_with_the_gateways_error(start_app):
    """A real limit: --max-sessions is 503 with Retry-After 60; a client with 5 s left does not retry."""
    app = start_app(max_sessions=1)
    notices: list[RetryNotice] = []
    async with app.async_client() as http, Publisher(client=http, retry=Retry(timeout=5),
                                                     on_retry=notices.append) as pub:
        await pub.create("first")
        with pytest.raises(GatewayError) as caught:
            await pub.create("second")
    assert (caught.value.status, caught.value.code, caught.value.retry_after) == (503, "too_many_sessions", 60)
    assert notices == []


@pytest.mark.parametrize("status, code", [(400, "invalid_body"), (401, "invalid_credentials"),
                                          (404, "session_not_found"), (413, "event_too_large")])
async def test_other_4xx_are_raised_at_once_as_gateway_errors(status, code):
    transport, seen = mock_gateway([error(status, code)])
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:1") as http:
        async with Publisher(client=http) as pub:
            with pytest.raises(GatewayError) as caught:
                await pub.publish("s", "message", 1)
    assert (caught.value.status, caught.value.code) == (status, code) and len(seen) == 1
    assert str(caught.value) == f"{status} {code}: {code.replace('_', ' ')}"


async def test_a_wrong_key_is_a_typed_error(start_app):
    app = start_app(publish_key=(KEY,))
    async with app.async_client() as http, Publisher(client=http, key="w" * 24) as pub:
        with pytest.raises(GatewayError) as caught:
            await pub.create("x")
    assert (caught.value.status, caught.value.code) == (401, "invalid_credentials")


def test_retry_after_in_seconds_or_as_a_date():
    assert _retry_after("5") == 5 and _retry_after("0.5") == 0.5 and _retry_after(None) is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past: at once
    assert _retry_after("soon") is None


async def test_an_unreachable_gateway_is_a_clear_error_within_the_bound():
    url = f"http://127.0.0.1:{free_port()}"
    notices: list[RetryNotice] = []
    async with Publisher(url, retry=Retry(timeout=0.5, base=0.05, cap=0.1), on_retry=notices.append) as pub:
        with pytest.raises(GatewayUnreachable) as caught:
            await pub.publish("s", "message", 1)
    assert url in str(caught.value) and caught.value.status == 0 and caught.value.code == "unreachable"
    assert notices and sum(n.delay for n in notices) <= 0.5


# -- the publisher: batches, sessions, runs -------------------------------------------------------


async def test_tokens_are_sent_in_batches_in_order(app):
    transport = Faulty(app._bridge)
    async with httpx.AsyncClient(transport=transport, base_url=app.base) as http:
        async with Publisher(client=http, batch_size=100) as pub:
            for i in range(250):
                await pub.token("batched", f"t{i}")
            assert await pub.flush("batched") == list(range(1, 251))
        assert len(transport.bodies) == 3  # 100, 100, 50
        assert_exactly(await history(http, "batched"), [f"t{i}" for i in range(250)])


async def test_a_buffered_event_goes_out_by_itself_after_the_flush_interval(app):
    async with app.async_client() as http, Publisher(client=http, flush_interval=0.05) as pub:
        future = await pub.token("timer", "alone")
        assert await asyncio.wait_for(future, 30) == 1
        assert_exactly(await history(http, "timer"), ["alone"])


async def test_a_batch_refused_for_good_is_dropped_and_its_error_raised_by_the_next_call(app):
    async with app.async_client() as http, Publisher(client=http, flush_interval=0) as pub:
        await pub.create("done")
        await pub.complete("done")
        future = await pub.send("done", "message", 1)
        with pytest.raises(GatewayError) as caught:
            await asyncio.wait_for(future, 30)
        assert caught.value.code == "session_completed"
        with pytest.raises(GatewayError, match="session_completed"):
            await pub.send("done", "message", 2)  # the background batch's error, reported once
        assert await pub.flush("done") == []  # nothing kept to poison later calls


async def test_create_reuses_an_existing_session_and_survives_a_lost_201(app):
    transport = Faulty(app._bridge, ["after"])  # the first create is stored, its 201 lost
    async with httpx.AsyncClient(transport=transport, base_url=app.base) as http:
        async with Publisher(client=http, retry=AT_ONCE) as pub:
            first = await pub.create("reused", metadata={"model": "m"})
            again = await pub.create("reused", metadata={"model": "m"})
            made = await pub.create()  # no id: one is made here, so a retry finds the same session
            sessions = (await http.get("/v1/sessions")).json()["sessions"]
    assert not first.created and not again.created and first.epoch == again.epoch
    assert made.created and made.id.startswith("s_")
    assert sorted(s["id"] for s in sessions) == sorted(["reused", made.id])


async def test_create_takes_a_200_for_an_existing_session_as_reuse():
    """Gateways that answer a repeated create with 200 and the session (not 409)."""
    body = {"id": "r", "epoch": "abc123", "stream_url": "/v1/sessions/r/stream?token=t", "subscribe_token": "t",
            "token_expires_at": "2026-01-01T00:00:00.000Z"}
    transport, seen = mock_gateway([httpx.Response(200, json=body)])
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:1") as http:
        async with Publisher(client=http) as pub:
            info = await pub.create("r")
    assert not info.created and info.epoch == "abc123" and info.subscribe_token == "t" and len(seen) == 1


async def test_the_run_block_completes_with_its_result(app):
    async with app.async_client() as http, Publisher(client=http) as pub:
        async with pub.run("ok-run", metadata={"user": 1}) as run:
            assert run.info.created and run.session == "ok-run"
            for piece in ("Hel", "lo"):
                await run.token(piece)
            run.result = {"text": "Hello"}
        row = await pub.get("ok-run")
        events = await history(http, "ok-run")
    assert row["status"] == "completed" and row["result"] == {"text": "Hello"} and row["metadata"] == {"user": 1}
    assert [e["event"] for e in events] == ["token", "token", "gateway.end"]


async def test_the_run_block_fails_the_run_on_an_exception_and_reraises(app):
    async with app.async_client() as http, Publisher(client=http) as pub:
        with pytest.raises(ValueError, match="the model said no"):
            async with pub.run("bad-run") as run:
                await run.token("partial")
                raise ValueError("the model said no")
        row = await pub.get("bad-run")
        events = await history(http, "bad-run")
    assert (row["status"], row["run_status"], row["result"]) == ("completed", "failed", None)
    assert row["error"] == {"code": "ValueError", "message": "the model said no"}
    assert [e["event"] for e in events] == ["token", "gateway.end"]  # what was buffered is kept


async def test_the_run_block_leaves_the_session_open_when_cancelled(app):
    async with app.async_client() as http, Publisher(client=http) as pub:
        started = asyncio.Event()

        async def agent() -> None:
            async with pub.run("cancelled-run") as run:
                await run.token("before")
                started.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(agent())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        row = await pub.get("cancelled-run")
        assert row["status"] == "open" and row["last_id"] == 1  # flushed, and free to be taken up again
        async with pub.run("cancelled-run") as run:
            assert not run.info.created
        with pytest.raises(GatewayError, match="session_completed"):
            async with pub.run("cancelled-run"):
                pass


async def test_complete_fail_state_and_watchers(app):
    async with app.async_client() as http, Publisher(client=http) as pub:
        await pub.create("w")
        watchers = await pub.watchers("w")
        assert watchers == Watchers(0, None) and not watchers
        state = await pub.put_state("w", {"step": "search"})
        assert state.version == 1 and (await pub.get_state("w")).state == {"step": "search"}
        await pub.token("w", "x")
        state = await pub.put_state("w", {"step": "write"}, if_match=1)
        assert state.version == 2 and state.as_of.startswith("1:")  # the buffered token went first
        with pytest.raises(GatewayError) as caught:
            await pub.put_state("w", {"step": "late"}, if_match=1)
        assert caught.value.status == 412 and caught.value.body["version"] == 2
        await pub.fail("w", "the tool timed out", code="tool_timeout")
        assert (await pub.get("w"))["error"] == {"code": "tool_timeout", "message": "the tool timed out"}
        await pub.fail("w", "the tool timed out", code="tool_timeout")  # a retry of the same is fine
        assert await pub.delete("w") and not await pub.delete("w")


async def test_a_restarted_agent_s_run_fences_the_old_one(app):
    async with app.async_client() as http, Publisher(client=http) as old, Publisher(client=http) as new:
        async with old.run("taken-over") as first:
            await first.publish("token", {"text": "old"})
            async with new.run("taken-over") as second:  # the restarted agent claims the session
                assert (first.producer_epoch, second.producer_epoch) == (1, 2)
                with pytest.raises(GatewayError) as fenced:
                    await first.publish("token", {"text": "zombie"})
                assert (fenced.value.status, fenced.value.code) == (403, "producer_fenced")
                await second.publish("token", {"text": "new"})
                second.result = "done"
            first.finished = True  # (its own end would be refused too)
        events = await history(http, "taken-over")
    assert [e["data"] for e in events] == [{"text": "old"}, {"text": "new"}, "done"]


async def test_a_run_renews_its_lease_while_it_thinks(app):
    async with app.async_client() as http, Publisher(client=http) as pub:
        async with pub.run("thinking", lease_seconds=3) as run:
            first = (await pub.get("thinking"))["lease_until"]
            renewed = []

            async def moved_twice() -> bool:
                row = await pub.get("thinking")
                if row["lease_until"] not in renewed and row["lease_until"] != first:
                    renewed.append(row["lease_until"])
                return len(renewed) >= 2 and row["run_status"] == "running"

            await await_until(moved_twice, what="two renewals of the lease while the agent writes nothing")
            run.result = "thought"
        row = await pub.get("thinking")
    assert (row["run_status"], row["result"]) == ("completed", "thought")


def test_the_error_of_a_failed_run():
    assert error_object(KeyError("k")) == {"code": "KeyError", "message": "'k'"}
    assert error_object("no") == {"code": "failed", "message": "no"}
    assert error_object({"code": "x", "message": "y", "step": 3}) == {"code": "x", "message": "y", "step": 3}
    assert error_object("late", code="tool_timeout") == {"code": "tool_timeout", "message": "late"}


def test_the_sync_publisher_runs_a_block_too(app):
    http = httpx.AsyncClient(transport=app._bridge, base_url=app.base)
    with SyncPublisher(client=http, flush_interval=0.01) as pub:
        with pub.run("sync-run") as run:
            run.token("a")
            run.token("b")
            run.result = "ab"
        with pytest.raises(RuntimeError):
            with pub.run("sync-failed") as run:
                run.send("log", "x")
                raise RuntimeError("stop")
        assert pub.get("sync-run")["result"] == "ab" and pub.get("sync-run")["last_id"] == 3
        assert pub.get("sync-failed")["run_status"] == "failed"
        assert pub.get("sync-failed")["error"]["code"] == "RuntimeError"


def test_configuration_from_the_environment(monkeypatch):
    monkeypatch.setenv("SSE_GATEWAY_URL", "http://gateway.test:9000/")
    monkeypatch.setenv("SSE_GATEWAY_PUBLISH_KEY", f" {KEY} ,other-key-of-16-chars")
    pub = SyncPublisher()
    try:
        assert pub.publisher.url == "http://gateway.test:9000" and pub.publisher.key == KEY
    finally:
        pub.close()
    with pytest.raises(ValueError, match="gateway URL"):
        Subscriber("s", url="localhost:8000")

    async def reserved() -> None:
        async with Publisher() as pub:
            await pub.send("s", "gateway.end", 1)

    with pytest.raises(ValueError, match="event type"):
        asyncio.run(reserved())


# -- the subscriber -----------------------------------------------------------------------------


async def test_the_subscriber_reports_a_gap_and_a_reset(app):
    async with app.async_client() as http, Publisher(client=http) as pub:
        await pub.create("gappy")
        for i in range(5):
            await pub.publish("gappy", "message", i)
        await http.post("/v1/sessions/gappy/trim", json={"through": 2})
        got = [e async for e in Subscriber("gappy", live=False, client=http)]
        assert [e.event for e in got] == ["gateway.gap", "message", "message", "message"]
        assert got[0].data == {"from": 1, "to": 2} and got[0].id is None and got[0].cursor is None
        assert [e.id for e in got[1:]] == [3, 4, 5] and [e.data for e in got[1:]] == [2, 3, 4]

        old = got[-1].cursor
        await pub.delete("gappy")
        await pub.create("gappy")
        await pub.publish("gappy", "message", "new life")
        sub = Subscriber("gappy", cursor=old, live=False, client=http)
        got = [e async for e in sub]
    assert [e.event for e in got] == ["gateway.reset", "message"] and got[0].is_reset
    assert got[0].data["last_id"] == 1 and got[0].data["epoch"] != old.split(":")[1]
    assert got[1].id == 1 and got[1].data == "new life" and sub.cursor == got[1].cursor


async def test_the_subscriber_ends_at_the_end_and_on_204(app):
    async with app.async_client() as http, Publisher(client=http) as pub:
        async with pub.run("ended") as run:
            await run.publish("log", "line one\nline two")
            run.result = {"n": 1}
        got = [e async for e in Subscriber("ended", client=http)]
        assert [(e.id, e.event) for e in got] == [(1, "log"), (2, "gateway.end")]
        assert got[0].data == "line one\nline two" and got[1].data == {"n": 1} and got[1].is_end
        after = Subscriber("ended", cursor=got[-1].cursor, client=http)
        assert [e async for e in after] == [] and after.ended


@pytest.mark.parametrize("setup, status, code", [
    ("missing", 404, "session_not_found"), ("no key", 401, "missing_credentials"), ("bad cursor", 400,
                                                                                     "invalid_cursor")])
async def test_the_subscriber_raises_refusals_at_once(start_app, setup, status, code):
    app = start_app(publish_key=(KEY,))
    async with app.async_client() as http:
        await http.post("/v1/sessions", json={"id": "here"}, headers={"Authorization": f"Bearer {KEY}"})
        sub = {"missing": Subscriber("nowhere", key=KEY, client=http),
               "no key": Subscriber("here", key="", client=http),
               "bad cursor": Subscriber("here", key=KEY, cursor="x:y", client=http)}[setup]
        with pytest.raises(GatewayError) as caught:
            async for _ in sub:
                pass
    assert (caught.value.status, caught.value.code) == (status, code) and sub.connects == 0


async def test_the_subscriber_reads_with_a_subscribe_token_and_not_another_sessions(start_app):
    app = start_app(publish_key=(KEY,), token_secret="s" * 40)
    async with app.async_client() as http, Publisher(client=http, key=KEY) as pub:
        info = await pub.create("mine")
        await pub.publish("mine", "message", "for my eyes")
        token = (await pub.mint_token("mine", ttl_seconds=60)).token
        assert info.subscribe_token and info.stream_url.endswith("?token=" + info.subscribe_token)
        for credential in (token, info.subscribe_token):
            got = [e.data async for e in Subscriber("mine", key=credential, live=False, client=http)]
            assert got == ["for my eyes"]
        await pub.create("theirs")
        with pytest.raises(GatewayError) as caught:
            async for _ in Subscriber("theirs", key=token, client=http):
                pass
    assert (caught.value.status, caught.value.code) == (403, "wrong_session")


async def test_an_unreachable_gateway_ends_the_subscriber_with_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    notes: list[Reconnect] = []
    with pytest.raises(GatewayUnreachable) as caught:
        async for _ in Subscriber("s", url=url, give_up_after=0.5, on_reconnect=notes.append):
            pass
    assert url in str(caught.value) and "gave up" in str(caught.value)
    assert notes and all(url in n.reason for n in notes)


async def subscribers(client: httpx.AsyncClient, session: str) -> int:
    return (await client.get(f"/v1/sessions/{session}")).json()["subscribers"]


async def test_the_subscriber_resumes_exactly_through_drops(gateway):
    got: list[Event] = []
    notes: list[Reconnect] = []
    with ChaosProxy(gateway.port) as proxy:
        sub = Subscriber("drops", url=f"http://127.0.0.1:{proxy.port}", on_reconnect=notes.append)

        async def read() -> None:
            async for event in sub:
                got.append(event)

        async with httpx.AsyncClient(base_url=gateway.url) as http, Publisher(gateway.url) as pub:
            await pub.create("drops")
            reader = asyncio.create_task(read())
            connected = 0
            for i in range(1, 301):
                await pub.publish("drops", "message", i)
                if i % 60 == 0:  # wait until the subscriber has its new stream (it read the 200), then cut it
                    await await_until(lambda: sub.connects > connected and subscribers(http, "drops"),
                                      what="the subscriber to attach")
                    connected, reported = sub.connects, len(notes)
                    assert await asyncio.to_thread(proxy.drop_all) >= 1
                    await await_until(lambda: len(notes) > reported, what="the subscriber to see the drop")
            watching = await pub.watchers("drops")
            await pub.complete("drops", "done")
            await asyncio.wait_for(reader, 60)
    assert [e.id for e in got] == list(range(1, 302))  # every id once, in order, through five drops
    assert [e.data for e in got] == [*range(1, 301), "done"]
    assert sub.connects == 6 and len(notes) == 5 and all(str(proxy.port) in n.reason for n in notes)
    assert isinstance(watching, Watchers) and watching.subscribers in (0, 1)


async def test_the_subscriber_from_latest_misses_nothing_published_after_it_started(gateway):
    async with Publisher(gateway.url) as pub, httpx.AsyncClient(base_url=gateway.url) as http:
        await pub.publish("latest", "message", "old")
        sub = Subscriber("latest", url=gateway.url, from_="latest")
        events = sub.events()
        first = asyncio.create_task(anext(events))
        await await_until(lambda: subscribers(http, "latest"), what="the subscriber to attach")
        await pub.publish("latest", "message", "new")
        assert (await asyncio.wait_for(first, 30)).data == "new"
        await events.aclose()


async def test_the_subscriber_waits_out_a_429_with_its_retry_after(start_gateway):
    gw = start_gateway("--max-streams-per-session", "1")
    notes: list[Reconnect] = []
    async with Publisher(gw.url) as pub, httpx.AsyncClient(base_url=gw.url) as http:
        await pub.publish("busy", "message", 1)
        first = Subscriber("busy", url=gw.url)
        firsts = first.events()
        assert (await anext(firsts)).id == 1
        second = Subscriber("busy", url=gw.url, on_reconnect=notes.append)
        reading = asyncio.create_task(asyncio.wait_for(_collect(second), 60))
        await await_until(lambda: notes, what="the second stream to be refused")
        await firsts.aclose()
        await await_until(lambda: subscribers(http, "busy"), what="the second stream to attach")
        await pub.complete("busy")
        got = await reading
    assert notes[0].error.status == 429 and notes[0].error.code == "too_many_streams_for_session"
    assert notes[0].delay >= notes[0].error.retry_after == 5
    assert [e.id for e in got] == [1, 2]


async def _collect(sub: Subscriber) -> list[Event]:
    return [e async for e in sub]


# -- the publisher against real failures ------------------------------------------------------------


async def test_a_publisher_whose_connections_drop_mid_flush_stores_the_exact_sequence(gateway):
    """Batches go out back to back while the network drops every connection every 50 stored events."""
    texts = [f"t{i}" for i in range(1500)]
    with ChaosProxy(gateway.port) as proxy:
        async with Publisher(f"http://127.0.0.1:{proxy.port}", batch_size=10, retry=QUICK) as pub:
            futures = [await pub.token("chaos", text) for text in texts]
            flushing = asyncio.create_task(pub.flush())
            cut = 0

            def stored() -> int:
                return sum(f.done() for f in futures)

            while not flushing.done():
                await await_until(lambda: flushing.done() or stored() >= cut + 50, what="50 more events stored")
                cut = stored()
                await asyncio.to_thread(proxy.drop_all)
            await flushing
    assert [f.result() for f in futures] == list(range(1, 1501))
    assert proxy.drops >= 5 and proxy.connections > 5  # it dropped, and the publisher came back each time
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert_exactly(await history(http, "chaos"), texts)


async def test_a_publisher_outlives_a_gateway_killed_and_restarted(gateway):
    texts = [f"t{i}" for i in range(600)]
    async with Publisher(gateway.url, batch_size=20, retry=QUICK) as pub:
        futures = [await pub.token("crash", text) for text in texts[:300]]
        await await_until(lambda: futures[100].done(), what="a hundred events to be stored")
        restart = asyncio.create_task(asyncio.to_thread(gateway.restart))  # SIGKILL, then start again
        for text in texts[300:]:
            futures.append(await pub.token("crash", text))
        await restart
        await pub.flush()
    assert [f.result() for f in futures] == list(range(1, 601))
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        assert_exactly(await history(http, "crash"), texts)


# -- the documentation's examples run -------------------------------------------------------------


def doc_blocks() -> list[str]:
    text = (ROOT / "docs" / "python.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def run_python(code: str, url: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    script = tmp_path / name
    script.write_text(code)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")},
           "PYTHONPATH": str(ROOT), "SSE_GATEWAY_URL": url}
    return subprocess.run([sys.executable, str(script), "doc-run"], capture_output=True, text=True, timeout=60,
                          env=env, cwd=tmp_path)


def as_program(block: str, url: str) -> str:
    """A top-level ``async with`` example as a program (what ``python -m asyncio`` would run)."""
    body = block.replace('"http://127.0.0.1:8000"', repr(url))
    return "import asyncio\n\nasync def main():\n" + textwrap.indent(body, "    ") + "\nasyncio.run(main())\n"


def test_the_documented_examples_run(gateway, tmp_path):
    blocks = doc_blocks()
    first, reader = blocks[0], blocks[1]
    imports, _, rest = first.partition("\n\n")
    r = run_python(imports + "\n" + as_program(rest, gateway.url), gateway.url, tmp_path, "five.py")
    assert r.returncode == 0, r.stderr
    imports, _, rest = reader.partition("\n\n")
    r = run_python(imports + "\n" + as_program(rest, gateway.url), gateway.url, tmp_path, "read.py")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "4 gateway.end {'text': 'Hello world'}"
    sync = next(b for b in blocks if b.startswith("from sse_gateway.client import SyncPublisher"))
    assert run_python(sync, gateway.url, tmp_path, "sync.py").returncode == 0
    assert httpx.get(f"{gateway.url}/v1/sessions/run2").json()["result"] == {"text": "Hello"}


def test_the_documented_agent_runs(gateway, tmp_path):
    agent = next(b for b in doc_blocks() if b.startswith('"""agent.py'))
    r = run_python(agent, gateway.url, tmp_path, "agent.py")
    assert r.returncode == 0, r.stderr
    row = httpx.get(f"{gateway.url}/v1/sessions/doc-run").json()
    assert row["status"] == "completed" and row["result"]["text"].startswith("You asked: why is the sky blue")
    state = httpx.get(f"{gateway.url}/v1/sessions/doc-run/state").json()
    assert state["state"] == {"step": "done", "chars": len(row["result"]["text"])}


# -- messages ----------------------------------------------------------------------------------------


async def test_a_message_from_tokens_and_one_that_fails(app):
    async with httpx.AsyncClient(transport=app._bridge, base_url=app.base) as http:
        async with Publisher(client=http, flush_interval=0.01) as pub:
            async def words():
                for w in ["Hel", "lo"]:
                    yield w
            mid = await pub.message("msg", words(), type="answer", metadata={"step": 1})

            def broken():
                yield "half"
                raise ValueError("model went away")
            with pytest.raises(ValueError):
                await pub.message("msg", broken(), message="m2")
            await pub.replace_message("msg", "m2", "whole, retried")
        events = await history(http, "msg")
        assert [(e["event"], e["data"]) for e in events] == [
            ("message.start", {"message": mid, "type": "answer", "metadata": {"step": 1}}),
            ("message.append", {"message": mid, "text": "Hel"}), ("message.append", {"message": mid, "text": "lo"}),
            ("message.end", {"message": mid, "status": "finished"}),
            ("message.start", {"message": "m2"}), ("message.append", {"message": "m2", "text": "half"}),
            ("message.end", {"message": "m2", "status": "failed",
                             "error": {"code": "ValueError", "message": "model went away"}}),
            ("message.replace", {"message": "m2", "text": "whole, retried", "status": "finished"})]


def test_the_sync_publisher_publishes_a_message_from_a_blocking_iterator(app):
    http = httpx.AsyncClient(transport=app._bridge, base_url=app.base)
    with SyncPublisher(client=http, flush_interval=0.01) as pub:
        mid = pub.message("sync-msg", iter(["a", "b", "c"]), message="m")
        assert mid == "m" and pub.get("sync-msg")["last_id"] == 5


async def test_the_subscriber_reads_a_replayed_message_whole(app):
    async with httpx.AsyncClient(transport=app._bridge, base_url=app.base) as http:
        async with Publisher(client=http, flush_interval=0.01) as pub:
            await pub.send("replayed", "message.start", {"message": "a"})
            await pub.send("replayed", "tool", {"n": 1})
            await pub.message("replayed", ["x", "y"], message="b")
            await pub.send("replayed", "message.append", {"message": "a", "text": "z"})
            await pub.flush("replayed")
        got = [e async for e in Subscriber("replayed", live=False, client=http)]
    assert [(e.id, e.cursor.split(":")[0], e.event) for e in got] == [
        (2, "2/1", "tool"), (6, "6/1", "message.snapshot"), (7, "7", "message.snapshot")]
    assert got[1].data["text"] == "xy" and got[2].data == {"message": "a", "type": None, "metadata": None,
                                                           "text": "z", "status": "open", "start": 1}

"""sse_gateway.client, the return path: an agent reads its input exactly once through drops and
restarts, stops on a cancel, and waits for approvals; backends send input with idempotency keys."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from util import ChaosProxy, await_until

from sse_gateway.client import (
    GatewayError,
    Input,
    Publisher,
    Reconnect,
    Retry,
    Subscriber,
    SyncPublisher,
)

pytestmark = pytest.mark.timeout(120)

QUICK = Retry(attempts=1_000_000, timeout=60, base=0.02, cap=0.5)


def fresh(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def row(http: httpx.AsyncClient, session: str) -> dict:
    return (await http.get(f"/v1/sessions/{session}")).json()


async def test_input_is_checked_before_it_is_sent(gateway):
    async with Publisher(gateway.url) as pub:
        with pytest.raises(ValueError, match="invalid input kind"):
            await pub.send_input("x", "shout")
        with pytest.raises(ValueError, match="approval_id and decision"):
            await pub.send_input("x", "approval", approval_id="a")
        with pytest.raises(ValueError, match="only with kind 'approval'"):
            await pub.send_input("x", "message", decision="approve")


async def test_send_input_is_idempotent_and_mirrored(gateway):
    session = fresh("send")
    async with Publisher(gateway.url) as pub:
        await pub.create(session)
        first = await pub.send_input(session, "steer", {"text": "shorter"}, idempotency_key="tab-1")
        again = await pub.send_input(session, "steer", {"text": "shorter"}, idempotency_key="tab-1")
        other = await pub.send_input(session, "message", "hi")  # a key of the publisher's own
        assert first.created and not again.created and (again.id, again.event_id) == (first.id, first.event_id)
        assert (first.id, other.id, other.input_last_id) == (1, 2, 2)
        with pytest.raises(GatewayError) as refused:
            await pub.send_input(session, "approval", approval_id="never", decision="approve")
        assert refused.value.code == "approval_not_found"
        events = [e async for e in Subscriber(session, url=gateway.url, live=False)]
        page = await pub.read_inputs(session)
    assert [(e.event, e.data["input_id"], e.data["kind"]) for e in events] == [
        ("gateway.input", 1, "steer"), ("gateway.input", 2, "message")]
    assert [(i.id, i.kind, i.data) for i in page.inputs] == [(1, "steer", {"text": "shorter"}), (2, "message", "hi")]
    assert page.next_after == 2 and page.input_acked_id == 0


async def test_an_agent_reading_through_drops_gets_every_input_exactly_once(gateway):
    session = fresh("drops")
    got: list[Input] = []
    notes: list[Reconnect] = []
    with ChaosProxy(gateway.port) as proxy:
        async with Publisher(gateway.url) as sender, \
                Publisher(f"http://127.0.0.1:{proxy.port}", retry=QUICK) as agent:
            await sender.create(session)
            reader = agent.input_reader(session, on_reconnect=notes.append)

            async def read() -> None:
                async for item in reader:
                    got.append(item)
                    if item.kind == "cancel":
                        return

            task = asyncio.create_task(read())
            for i in range(1, 201):
                await sender.send_input(session, "message", i)
                if i % 40 == 0:  # once the reader is attached again (a new connection), cut every connection
                    reported = len(notes)
                    await await_until(lambda: reader.connects > reported, what="the reader to be attached")
                    assert await asyncio.to_thread(proxy.drop_all) >= 1
                    await await_until(lambda r=reported: len(notes) > r, what="the reader to see the drop")
            await sender.send_input(session, "cancel")
            await asyncio.wait_for(task, 60)
    ids = [item.id for item in got]
    assert ids == list(range(1, 202)) and len(set(ids)) == 201  # every input once, in order, through five drops
    assert [item.data for item in got[:-1]] == list(range(1, 201))
    assert len(notes) == 5 and reader.connects == 6


async def test_a_restarted_agent_resumes_after_its_ack(gateway):
    session = fresh("restart")
    async with Publisher(gateway.url) as pub, httpx.AsyncClient(base_url=gateway.url) as http:
        await pub.create(session)
        for i in range(1, 6):
            await pub.send_input(session, "message", i)

        seen: list[int] = []
        async with pub.run(session) as run:  # the first life: handles 1 to 3, acks them, and dies
            async for item in run.inputs():
                seen.append(item.id)
                if item.id == 3:
                    await item.ack()
                    break
            assert (await row(http, session))["input_acked_id"] == 3
            await pub.send_input(session, "message", 6)
            run.finished = True  # dies: the session stays open for the next life
        assert (await row(http, session))["status"] == "open"

        again: list[int] = []
        async with pub.run(session) as run:  # the second life starts right after the ack
            async for item in run.inputs():
                again.append(item.id)
                if item.id == 6:
                    await run.ack_input(item.id)
                    break
        state = await row(http, session)
    assert seen == [1, 2, 3] and again == [4, 5, 6]
    assert state["input_acked_id"] == 6 and state["status"] == "completed"


async def test_a_cancel_ends_the_run_as_cancelled(gateway):
    session = fresh("cancel")
    typed: list[str] = []
    async with Publisher(gateway.url) as agent, Publisher(gateway.url) as user, \
            httpx.AsyncClient(base_url=gateway.url) as http:

        async def run_agent() -> None:
            async with agent.run(session, listen=True) as run:
                while not run.cancelled.is_set():
                    typed.append("x")
                    await run.token("x")
                    run.result = {"text": "".join(typed)}
                    await asyncio.sleep(0)  # lets the reader take the cancel in
                    await run.flush()

        task = asyncio.create_task(run_agent())
        await await_until(lambda: len(typed) >= 5, what="the agent to type")
        sent = await user.send_input(session, "cancel", {"reason": "enough"})
        await asyncio.wait_for(task, 30)
        state = await row(http, session)
    assert (state["status"], state["run_status"]) == ("completed", "cancelled")
    assert state["result"] == {"text": "".join(typed)}  # the partial result is kept
    assert state["error"] == {"code": "cancelled", "message": "enough"}
    assert state["input_acked_id"] == sent.id  # the cancel is handled: a restart is not cancelled again


async def test_an_approval_round_trip(gateway):
    session = fresh("approve")
    async with Publisher(gateway.url) as agent, Publisher(gateway.url) as user, \
            httpx.AsyncClient(base_url=gateway.url) as http:

        async def run_agent() -> list[str | None]:
            decisions: list[str | None] = []
            async with agent.run(session) as run:
                await run.request_approval("rm-1", command="rm -rf build/")
                decisions.append(await run.wait_approval("rm-1"))
                await run.request_approval("rm-2", command="rm -rf /")
                decisions.append(await run.wait_approval("rm-2"))
                run.result = {"decisions": decisions}
            return decisions

        await user.create(session)  # the page opens the session's stream before the agent starts
        task = asyncio.create_task(run_agent())
        answered: dict[str, str] = {}
        async for event in Subscriber(session, url=gateway.url):  # the user's page
            if event.event == "approval.request":
                approval_id = event.data["approval_id"]
                decision = "approve" if approval_id == "rm-1" else "deny"
                await user.send_input(session, "approval", approval_id=approval_id, decision=decision)
                answered[approval_id] = decision
                if approval_id == "rm-1":
                    with pytest.raises(GatewayError) as twice:  # a second tab answering too
                        await user.send_input(session, "approval", approval_id="rm-1", decision="deny")
                    assert twice.value.status == 409 and twice.value.code == "approval_answered"
            if event.is_end:
                break
        assert await asyncio.wait_for(task, 30) == ["approve", "deny"]
        state = await row(http, session)
    assert answered == {"rm-1": "approve", "rm-2": "deny"}
    assert state["result"] == {"decisions": ["approve", "deny"]}


async def test_waiting_for_an_approval_ends_on_a_cancel_or_a_timeout(gateway):
    session = fresh("wait")
    async with Publisher(gateway.url) as pub, httpx.AsyncClient(base_url=gateway.url) as http:
        async with pub.run(session) as run:
            await run.request_approval("a-1", tool="search")
            with pytest.raises(TimeoutError):
                await run.wait_approval("a-1", timeout=0.05)
            await pub.send_input(session, "cancel", "the user left")
            assert await run.wait_approval("a-1") is None
            assert run.cancelled.is_set() and run.cancel_input.reason == "the user left"
        state = await row(http, session)
    assert (state["run_status"], state["result"]) == ("cancelled", None)
    assert state["error"] == {"code": "cancelled", "message": "the user left"}


async def test_an_answer_given_before_the_wait_counts(gateway):
    session = fresh("early")
    async with Publisher(gateway.url) as pub:
        async with pub.run(session) as run:
            await run.request_approval("a-1")
            await run.send_input("approval", approval_id="a-1", decision="approve")
            await run.send_input("message", "after")
            items = []
            async for item in run.inputs():
                items.append(item)
                if item.kind == "message":
                    break
            assert await run.wait_approval("a-1") == "approve"
    assert [(i.kind, i.approval_id, i.decision) for i in items] == [("approval", "a-1", "approve"),
                                                                      ("message", None, None)]


async def test_read_inputs_long_polls_and_acks(gateway):
    session = fresh("poll")
    async with Publisher(gateway.url) as pub:
        await pub.create(session)
        polling = asyncio.create_task(pub.read_inputs(session, wait=20))
        await pub.send_input(session, "steer", "left")
        page = await asyncio.wait_for(polling, 30)
        assert [(i.id, i.data) for i in page.inputs] == [(1, "left")]
        await page.inputs[0].ack()
        assert (await pub.read_inputs(session)).inputs == []


def test_the_sync_publisher_speaks_input_too(gateway):
    session = fresh("sync")
    with SyncPublisher(gateway.url) as pub:
        with pub.run(session) as run:
            run.request_approval("s-1", note="sync")
            pub.send_input(session, "approval", approval_id="s-1", decision="approve")
            assert run.wait_approval("s-1", timeout=30) == "approve"
            pub.send_input(session, "cancel")
            wait_cancelled(run)
        assert pub.read_inputs(session, after=0).input_last_id == 2
        assert pub.get(session)["run_status"] == "cancelled"
        assert pub.get(session)["error"] == {"code": "cancelled", "message": "cancelled by the user"}


def wait_cancelled(run) -> None:
    from util import wait_until
    wait_until(lambda: run.cancelled, what="the cancel to arrive")


def test_the_documented_stoppable_agent_asks_then_stops_on_cancel(gateway, tmp_path):
    """docs/python.md's agent: it waits for the approval, types, and ends as cancelled when told to."""
    import os
    import re
    import subprocess
    import sys

    from conftest import ROOT

    text = (ROOT / "docs" / "python.md").read_text()
    agent = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith('"""stoppable.py'))
    script = tmp_path / "stoppable.py"
    script.write_text(agent)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")},
           "PYTHONPATH": str(ROOT), "SSE_GATEWAY_URL": gateway.url}
    with SyncPublisher(gateway.url) as pub:
        pub.create("doc-stop")
        proc = subprocess.Popen([sys.executable, str(script), "doc-stop"], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            from util import wait_until

            def asked() -> bool:
                return pub.get("doc-stop")["last_id"] >= 1

            wait_until(asked, what="the agent to ask for approval")
            pub.send_input("doc-stop", "approval", approval_id="tool-1", decision="approve")
            wait_until(lambda: pub.get("doc-stop")["last_id"] >= 10, what="the agent to type")
            pub.send_input("doc-stop", "cancel", {"reason": "enough"})
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        row = pub.get("doc-stop")
    assert row["run_status"] == "cancelled" and row["error"]["message"] == "enough"
    assert row["result"]["tool"] == "approve" and row["result"]["text"].startswith("word0 word1 ")


def test_the_documented_backend_example_runs(gateway, tmp_path):
    import os
    import re
    import subprocess
    import sys
    import textwrap

    from conftest import ROOT

    text = (ROOT / "docs" / "python.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if 'pub.create("run3")' in b)
    program = ("import asyncio\nfrom sse_gateway.client import Publisher\n\nasync def main():\n"
               + textwrap.indent(block.replace('"http://127.0.0.1:8000"', repr(gateway.url)), "    ")
               + "\nasyncio.run(main())\n")
    (tmp_path / "backend.py").write_text(program)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "backend.py"], capture_output=True, text=True, timeout=60, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1 2 [(1, 'steer'), (2, 'approval'), (3, 'cancel')]"
    assert httpx.get(f"{gateway.url}/v1/sessions/run3").json()["input_acked_id"] == 3

"""Messages against real gateways: httpx-sse readers that start, resume mid-message and read live.

Every reader is judged by one rule (``messages_util.View``): what it assembles, from whatever cursor it
resumed, equals what a reader that took every event of the log as it is assembled. On SQLite through
one gateway, and on Redis with the writer on one node and the readers on another.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from httpx_sse import aconnect_sse
from messages_util import View
from test_redis_nodes import feeds_subscribed, node
from util import await_until

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]


def op(event: str, mid: str, **fields) -> dict:
    return {"event": event, "data": {"message": mid, **fields}}


async def post(client: httpx.AsyncClient, base: str, session: str, body) -> httpx.Response:
    r = await client.post(f"{base}/v1/sessions/{session}/events", json=body)
    assert r.status_code == 201, r.text
    return r


async def read(client: httpx.AsyncClient, base: str, session: str, cursor: str | None = None, *,
               live: bool = False, until=None, into: list | None = None) -> list[tuple[str, str, object]]:
    """(cursor, type, data) of what a stream sends (``live``: until ``until(sent)`` holds), also appended to
    ``into`` as it arrives."""
    headers = {"Last-Event-ID": cursor} if cursor else {}
    sent: list[tuple[str, str, object]] = [] if into is None else into
    async with aconnect_sse(client, "GET", f"{base}/v1/sessions/{session}/stream", headers=headers,
                            params={"live": "true" if live else "false"}) as source:
        if source.response.status_code == 204:
            return sent
        async for sse in source.aiter_sse():
            if not sse.data or sse.event.startswith("gateway.") and sse.event != "gateway.end":
                continue
            sent.append((sse.id, sse.event, json.loads(sse.data)))
            if until is not None and until(sent):
                break
    return sent


def view(sent, start: View | None = None) -> View:
    v = View()
    if start is not None:
        v.plain, v.messages = list(start.plain), {k: dict(m) for k, m in start.messages.items()}
    for cursor, event, data in sent:
        v.take(event, data, cursor)
    return v


async def as_written(client: httpx.AsyncClient, base: str, session: str) -> tuple:
    """The view of a reader that took every event as it is (the JSON history, not compacted)."""
    events = (await client.get(f"{base}/v1/sessions/{session}/events", params={"limit": 1000})).json()["events"]
    return view([(str(e["id"]), e["event"], e["data"]) for e in events]).state()


async def write_answers(client: httpx.AsyncClient, base: str, session: str) -> None:
    """Two answers written in parallel, a tool call between them, one retried step replaced whole."""
    await post(client, base, session, [op("message.start", "a", type="answer"), op("message.start", "b")])
    for i in range(6):
        await post(client, base, session, [op("message.append", "a", text=f"a{i} "),
                                            {"event": "tool", "data": {"i": i}},
                                            op("message.append", "b", text=f"b{i}")])
    await post(client, base, session, op("message.end", "b", status="failed"))
    await post(client, base, session, op("message.replace", "b", text="b, retried"))
    await post(client, base, session, op("message.append", "a", text="still going"))


async def check_every_cursor(client: httpx.AsyncClient, reader: str, writer: str, session: str) -> None:
    whole = await as_written(client, writer, session)
    first = await read(client, reader, session)
    assert view(first).state() == whole
    assert [e for _, e, _ in first].count("message.snapshot") == len(whole[1])  # each message once, whole
    assert sum(e == "message.append" for _, e, _ in first) == 0
    for i in range(len(first)):
        had = view(first[:i + 1])
        again = await read(client, reader, session, first[i][0])
        assert view(again, had).state() == whole, (first[i][0], again)


async def test_a_reader_resuming_from_every_cursor_assembles_the_same_answers(start_gateway):
    gw = start_gateway()
    async with httpx.AsyncClient(timeout=10) as client:
        await write_answers(client, gw.url, "run")
        await check_every_cursor(client, gw.url, gw.url, "run")
        # a live reader cut in the middle of a message gets exactly the deltas after its cursor
        got = await read(client, gw.url, "run", "1")
        assert [e for _, e, _ in got][:3] == ["message.append", "tool", "message.append"]
        r = await client.post(f"{gw.url}/v1/sessions/run/complete", json={"result": None})
        assert r.status_code == 200
        await check_every_cursor(client, gw.url, gw.url, "run")


async def test_live_deltas_then_a_resume_mid_message(start_gateway):
    gw = start_gateway()
    async with httpx.AsyncClient(timeout=10) as client:
        await post(client, gw.url, "live", op("message.start", "m", type="answer"))
        got: list = []
        reader = asyncio.create_task(read(client, gw.url, "live", live=True, until=lambda s: len(s) >= 4, into=got))
        # (the deltas are published once the reader has caught up: before, its replay would hold them in
        # the snapshot, which is right too, but not what this test looks at)
        await await_until(lambda: got, what="the reader to get the open message's snapshot")
        for word in ["Hel", "lo, ", "wor"]:
            await post(client, gw.url, "live", op("message.append", "m", text=word))
        sent = await reader
        # joined at the end of the log: the open message as one snapshot, then each delta as committed
        assert [(c.split(":")[0], e) for c, e, _ in sent] == [("1", "message.snapshot"), ("2", "message.append"),
                                                ("3", "message.append"), ("4", "message.append")]
        had = view(sent[:2])  # cut after the first delta
        await post(client, gw.url, "live", [op("message.append", "m", text="ld"), op("message.end", "m")])
        rest = await read(client, gw.url, "live", sent[1][0].split(":")[0])
        assert [e for _, e, _ in rest] == ["message.append", "message.append", "message.append", "message.end"]
        assert view(rest, had).messages["m"] == {"type": "answer", "metadata": None, "text": "Hello, world",
                                                 "status": "finished"}


async def test_invalid_operations_are_clear_json_errors_and_change_nothing(start_gateway):
    gw = start_gateway()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        await post(client, "", "bad", op("message.start", "m"))
        cases = [
            (op("message.append", "ghost", text="x"), 409, "message_not_found"),
            ([op("message.append", "m", text="x"), op("message.start", "m")], 409, "message_exists"),
            ({"event": "message.append", "data": {"message": "m", "text": 7}}, 400, "invalid_message"),
            ({"event": "message.end", "data": "m"}, 400, "invalid_message"),
            ({"event": "message.start", "data": {"message": "x" * 129}}, 400, "invalid_message"),
            ({"event": "message.append", "data": {"message": "m", "text": "x" * (2 << 20)}}, 413, "event_too_large"),
        ]
        for body, status, code in cases:
            r = await client.post("/v1/sessions/bad/events", json=body)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        r = await client.post("/v1/sessions/bad/events?event=message.start", content="m",
                              headers={"content-type": "text/plain"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_message")
        lines = "\n".join(json.dumps(x) for x in [op("message.append", "m", text="ok"), op("message.end", "zz")])
        r = await client.post("/v1/sessions/bad/events", content=lines,
                              headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 409 and r.json()["ids"] == [2]  # the line before the bad one stays appended
        assert (await client.get("/v1/sessions/bad")).json()["last_id"] == 2


async def test_writer_on_one_redis_node_reader_on_another(redis_server, start_gateway):
    writer, reader = node(start_gateway, redis_server), node(start_gateway, redis_server)
    await feeds_subscribed(redis_server, count=2)
    async with httpx.AsyncClient(timeout=10) as client:
        await post(client, writer.url, "run", op("message.start", "m", type="answer"))
        got: list = []
        live = asyncio.create_task(read(client, reader.url, "run", live=True, until=lambda s: len(s) >= 3, into=got))
        await await_until(lambda: got, what="the reader to get the open message's snapshot")
        await post(client, writer.url, "run", op("message.append", "m", text="one "))
        await post(client, writer.url, "run", op("message.append", "m", text="two "))
        sent = await live
        assert [e for _, e, _ in sent] == ["message.snapshot", "message.append", "message.append"]
        await write_answers(client, writer.url, "run")
        await check_every_cursor(client, reader.url, writer.url, "run")
        # the mid-message cursor a live reader was given, resumed on the other node
        rest = await read(client, writer.url, "run", sent[1][0])
        assert view(rest, view(sent[:2])).state() == await as_written(client, writer.url, "run")

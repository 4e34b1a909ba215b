"""The browser helper's messages in Node, with the real ``eventsource`` package, on a real gateway.

A reader joins a session late, while one answer is still being written beside finished, failed,
replaced and reset messages and plain events: its replay holds the open answer back (cursors
``ID/HOLD:EPOCH``), and the reader cuts its own connection there a few times (the helper resumes
from the cursor it stored, as it stored it). Then, while the answer goes on, a proxy aborts its
connection again and again, always mid-message (EventSource resumes with ``Last-Event-ID``).
Last, the reader closes its stream while 3,000 more deltas are written, and comes back far
behind the live window: the gateway reads the log for it and merges runs of deltas
(``message.append`` with a ``count``). The messages it assembles and the plain events it took
equal, exactly, what was published.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import ROOT, require_binary
from messages_util import View
from util import ChaosProxy, await_until

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]  # node, a real gateway

SESSION = "cut"
BEHIND_FROM, BEHIND_TO = 360, 3360  # the deltas written while the reader is away


def op(event: str, mid: str, **fields) -> dict:
    return {"event": event, "data": {"message": mid, **fields}}


def note(n: int) -> dict:
    return {"event": "note", "data": {"n": n}}


def piece(n: int) -> str:
    """A delta as a model emits one: words, some with accents, quotes or a line break."""
    return ("« é »\n" if n % 50 == 0 else f" w{n}") + ("," if n % 7 == 0 else "")


FIRST = [  # before the reader joins: the answer is open throughout, other messages come and go
    [op("message.start", "answer", type="answer", metadata={"model": "sim"}), note(1)],
    [op("message.append", "answer", text=piece(n)) for n in range(1, 40)],
    [op("message.start", "tool-1", type="tool"), op("message.append", "tool-1", text="search…"), note(2)],
    [op("message.append", "answer", text=piece(n)) for n in range(40, 80)],
    [op("message.end", "tool-1", status="failed", error={"code": "tool_failed", "message": "500"}), note(3)],
    [op("message.replace", "tool-1", text="found 3 pages"), op("message.start", "draft"),
     op("message.append", "draft", text="scratch"), op("message.reset", "draft"), note(4)],
    [op("message.append", "answer", text=piece(n)) for n in range(80, 120)],
    [op("message.append", "draft", text="clean"), note(5)],
]


def later(batch: int) -> list[dict]:
    """The rest of the answer, 20 deltas a batch, with a plain event and a short message now and then."""
    first = 120 + batch * 20
    items = [op("message.append", "answer", text=piece(n)) for n in range(first, first + 20)]
    if batch % 3 == 0:
        items.insert(10, note(100 + batch))
    if batch % 4 == 1:
        items += [op("message.start", f"step-{batch}", type="step"), op("message.append", f"step-{batch}", text="ok"),
                  op("message.end", f"step-{batch}")]
    return items


async def test_a_reader_cut_mid_message_resumes_and_assembles_the_exact_text(start_gateway):
    node = require_binary("node")
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "50")
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as api:
        (await api.post("/v1/sessions", json={"id": SESSION})).raise_for_status()
        for items in FIRST:
            (await api.post(f"/v1/sessions/{SESSION}/events", json=items)).raise_for_status()

        async def connected_count(n: int) -> bool:
            return (await api.get(f"/v1/sessions/{SESSION}")).json()["subscribers"] == n

        async def connected() -> bool:
            return await connected_count(1)

        with ChaosProxy(gw.port) as proxy:
            reader = await asyncio.create_subprocess_exec(
                node, str(ROOT / "tests/node/messages.mjs"),
                f"http://127.0.0.1:{proxy.port}/v1/sessions/{SESSION}/stream",
                "90000", "3", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            cuts = 0
            for batch in range(12):
                (await api.post(f"/v1/sessions/{SESSION}/events", json=later(batch))).raise_for_status()
                await await_until(connected, what="the reader to be connected")
                cuts += await asyncio.to_thread(proxy.drop_all) > 0  # the answer is open: always mid-message

            reader.stdin.write(b"pause\n")  # away while the answer grows far past the live window
            await reader.stdin.drain()
            await await_until(lambda: connected_count(0), what="the reader to close its stream")
            for first in range(BEHIND_FROM, BEHIND_TO, 500):
                deltas = [op("message.append", "answer", text=piece(n)) for n in range(first, first + 500)]
                (await api.post(f"/v1/sessions/{SESSION}/events", json=deltas)).raise_for_status()
            reader.stdin.write(b"resume\n")
            await reader.stdin.drain()
            (await api.post(f"/v1/sessions/{SESSION}/events",
                            json=[op("message.append", "answer", text=" The end."), op("message.end", "answer")]))
            (await api.post(f"/v1/sessions/{SESSION}/complete", json={"result": "done"})).raise_for_status()
            out, _ = await asyncio.wait_for(reader.communicate(), 90)
        events, after = [], 0
        while page := (await api.get(f"/v1/sessions/{SESSION}/events",
                                     params={"after": after, "limit": 1000})).json()["events"]:
            events += page
            after = page[-1]["id"]

    got = json.loads(out.decode().strip().splitlines()[-1])
    assert "timeout" not in got and "error" not in got, got
    published = View()
    for e in events:
        published.take(e["event"], e["data"], str(e["id"]))
    plain, messages = published.state()
    assert plain[-1] == ("gateway.end", "done")
    assert [tuple(p) for p in got["plain"]] == plain[:-1], "the plain events, each once, in order"
    began = {json.loads(e["data"])["message"] if isinstance(e["data"], str) else e["data"]["message"]: e["id"]
             for e in events if e["event"] == "message.start"}
    assert [m["id"] for m in got["messages"]] == sorted(began, key=began.get), "in the order they began"
    assert {m["id"]: m["start"] for m in got["messages"]} == began
    assembled = {m["id"]: {k: v for k, v in m.items() if k not in ("id", "start") and (k != "error" or v is not None)}
                 for m in got["messages"]}
    assert assembled == messages
    assert len(got["messages"]) == len(messages), "a message given twice"
    answer = assembled["answer"]["text"]
    assert answer == "".join(piece(n) for n in range(1, BEHIND_TO)) + " The end."
    print(f"merged appends: {got['merged'][:10]}… ({len(got['merged'])}); cut at {got['cut']}; {cuts} drops")
    assert got["merged"] and max(got["merged"]) >= 2, "the reader far behind got no merged deltas"
    assert got["duplicates"] == 0 and got["result"] == "done"
    assert len(got["cut"]) == 3 and all("/" in c for c in got["cut"]), "the reader resumed from held cursors"
    assert cuts >= 3, f"only {cuts} drops hit an open connection"
    assert got["reconnects"] > 3, "the reader reconnected after its own cuts and after the proxy's"

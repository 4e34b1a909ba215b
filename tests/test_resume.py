"""Exactness across every resume path, counted id by id, against a real gateway process.

* network drops: a proxy between clients and gateway aborts every connection
  at random moments while a publisher runs; httpx-sse, curl and Node's
  ``eventsource`` each end with exactly ids 1..N+1 (N events + gateway.end);
* the replay/live seam: clients attaching at random moments and cursors
  while a fast publisher runs see no gap and no duplicate;
* ``kill -9`` of the gateway: every event acknowledged with 201 survives.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, require_binary
from util import ChaosProxy, await_until, read_stream

N = 2000


async def publish_slowly(url: str, session: str, n: int, *, pace: float = 0.0015) -> list[int]:
    """Publish n single events one POST at a time, then complete the session."""
    ids = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for i in range(1, n + 1):
            r = await client.post(f"/v1/sessions/{session}/events", json={"event": "token", "data": {"i": i}})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
            if pace:
                await asyncio.sleep(pace)
        r = await client.post(f"/v1/sessions/{session}/complete", json={"result": {"n": n}})
        assert r.status_code == 200, r.text
    return ids


async def drop_repeatedly(proxy: ChaosProxy, until: asyncio.Event, *, times: int = 6) -> int:
    dropped = 0
    for _ in range(times):
        await asyncio.sleep(random.uniform(0.25, 0.6))
        dropped += proxy.drop_all() > 0
    await until.wait()  # the clients must still finish on their own after the last drop
    return dropped


def curl_reader(url: str, session: str, timeout: float) -> list[int]:
    """Read with curl, restarting it with Last-Event-ID whenever the connection drops."""
    curl = require_binary("curl")
    ids: list[int] = []
    cursor = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cmd = [curl, "-sN", "--max-time", str(max(1, int(deadline - time.monotonic()))),
               f"{url}/v1/sessions/{session}/stream"]
        if cursor:
            cmd[2:2] = ["-H", f"Last-Event-ID: {cursor}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        frame: dict[str, str] = {}
        for raw in proc.stdout:
            line = raw.decode().rstrip("\n")
            if line == "":
                if "id" in frame:
                    cursor = frame["id"]
                    ids.append(int(cursor.split(":")[0]))
                    if frame.get("event") == "gateway.end":
                        proc.kill()
                        proc.wait()
                        return ids
                frame = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                frame[name] = value[1:] if value.startswith(" ") else value
        proc.wait()
        time.sleep(0.02)
    raise AssertionError(f"curl reader timed out with {len(ids)} ids")


@pytest.mark.timeout(120)
async def test_every_client_gets_exactly_every_id_through_random_drops(start_gateway):
    node = require_binary("node")
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "50")
    session = "drops"
    async with httpx.AsyncClient(base_url=gw.url) as c:
        assert (await c.post("/v1/sessions", json={"id": session})).status_code == 201
    with ChaosProxy(gw.port) as proxy:
        via = f"http://127.0.0.1:{proxy.port}"
        node_proc = await asyncio.create_subprocess_exec(
            node, str(ROOT / "tests/node/collect.mjs"), f"{via}/v1/sessions/{session}/stream", "90000",
            stdout=asyncio.subprocess.PIPE)
        curl_task = asyncio.create_task(asyncio.to_thread(curl_reader, via, session, 90))
        httpx_task = asyncio.create_task(read_stream(via, session, timeout=90))

        async def all_connected() -> bool:  # every client connects before the first event
            return (await c.get(f"/v1/sessions/{session}")).json()["subscribers"] == 3

        async with httpx.AsyncClient(base_url=gw.url) as c:
            await await_until(all_connected, what="node, curl and httpx to connect through the proxy")
        done = asyncio.Event()
        dropper = asyncio.create_task(drop_repeatedly(proxy, done))
        acked = await publish_slowly(gw.url, session, N)
        httpx_got = await httpx_task
        curl_ids = await curl_task
        out, _ = await asyncio.wait_for(node_proc.communicate(), 60)
        done.set()
        drops = await dropper
    expected = list(range(1, N + 2))  # N events, then gateway.end
    assert acked == list(range(1, N + 1))
    assert drops >= 5, f"only {drops} drops hit open connections"
    assert httpx_got.ids == expected and httpx_got.connects >= 6
    assert httpx_got.events[-1] == "gateway.end" and json.loads(httpx_got.data[-1]) == {"n": N}
    assert [json.loads(d)["i"] for d in httpx_got.data[:-1]] == list(range(1, N + 1))
    assert curl_ids == expected
    node_result = json.loads(out)
    assert [int(i.split(":")[0]) for i in node_result["ids"]] == expected
    assert node_result["errors"] >= 5  # it saw the drops and reconnected by itself


@pytest.mark.timeout(90)
async def test_clients_attaching_during_fast_publishing_see_no_gap_or_duplicate(gateway):
    session = "seam"
    total = 6000

    async def publisher() -> None:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as c:
            for start in range(0, total, 50):
                batch = [{"data": {"i": i}} for i in range(start + 1, start + 51)]
                assert (await c.post(f"/v1/sessions/{session}/events", json=batch)).status_code == 201
                await asyncio.sleep(0)
            await c.post(f"/v1/sessions/{session}/complete")

    async def late_client(delay: float, use_cursor: bool) -> tuple[int, list[int]]:
        await asyncio.sleep(delay)
        start = 0
        headers = None
        if use_cursor:
            async with httpx.AsyncClient(base_url=gateway.url) as c:
                head = (await c.get(f"/v1/sessions/{session}")).json()["last_id"]
            start = random.randint(0, head)
            headers = {"Last-Event-ID": str(start)}
        got = await read_stream(gateway.url, session, headers=headers, timeout=60)
        return start, got.ids

    async with httpx.AsyncClient(base_url=gateway.url) as c:
        await c.post(f"/v1/sessions/{session}/events", json={"data": {"i": 0}})  # the session exists; id 1
    clients = [asyncio.create_task(late_client(random.uniform(0, 1.5), i % 2 == 0)) for i in range(24)]
    await publisher()
    for start, ids in await asyncio.gather(*clients):
        assert ids == list(range(start + 1, total + 3)), f"client from {start}: {len(ids)} ids"


@pytest.mark.timeout(90)
async def test_kill_9_loses_no_acknowledged_event(start_gateway, tmp_path: Path):
    gw = start_gateway()
    session = "crash"
    acked: dict[int, int] = {}

    async def publisher(worker: int) -> None:
        async with httpx.AsyncClient(base_url=gw.url, timeout=5) as c:
            for i in range(10_000):
                try:
                    r = await c.post(f"/v1/sessions/{session}/events", json={"data": {"w": worker, "i": i}})
                except httpx.HTTPError:
                    return  # the gateway died under us
                assert r.status_code == 201
                acked[r.json()["id"]] = (worker, i)

    tasks = [asyncio.create_task(publisher(w)) for w in range(8)]
    await await_until(lambda: len(acked) >= 300, interval=0.01, what="300 acknowledged publishes")
    gw.kill()  # SIGKILL mid-flight, publishers still running: no shutdown, no flush
    await asyncio.gather(*tasks)
    assert len(acked) >= 300
    gw.start()
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
        row = (await c.get(f"/v1/sessions/{session}")).json()
        stored, after = {}, 0
        while True:
            page = (await c.get(f"/v1/sessions/{session}/events", params={"after": after, "limit": 1000})).json()
            if not page["events"]:
                break
            for e in page["events"]:
                stored[e["id"]] = (e["data"]["w"], e["data"]["i"])
            after = page["next_after"]
    assert sorted(stored) == list(range(1, row["last_id"] + 1))  # contiguous, nothing half-written
    for id_, origin in acked.items():
        assert stored[id_] == origin
    r = httpx.post(f"{gw.url}/v1/sessions/{session}/events", json={"data": "after restart"})
    assert r.json()["id"] == row["last_id"] + 1

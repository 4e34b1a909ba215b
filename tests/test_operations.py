"""Operating the gateway: metrics that tell the truth, rolling restarts, full disks, no leaks.

The metrics run in process (tests/conftest.py ``start_app``); restarts, disks and leaks need real processes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import IN_CI, Gateway
from util import WAIT_TIMEOUT, RawStream, await_until, metric, read_stream


@pytest.mark.timeout(60)
async def test_metrics_count_what_happened(app_gateway, app_client):
    url, client = app_gateway, app_client
    client.post("/v1/sessions/m/events", json=[{"data": i} for i in range(10)])
    client.post("/v1/sessions/m/events", json={"data": "k"}, headers={"Idempotency-Key": "k"})
    client.post("/v1/sessions/m/events", json={"data": "k"}, headers={"Idempotency-Key": "k"})
    client.post("/v1/sessions/m/events", json={"event": "gateway.x", "data": 1})
    await read_stream(url, "m", params={"live": "false"})  # 11 delivered, read by one shared read (a fill)
    client.post("/v1/sessions/m/trim", json={"through": 4})
    # gap, then 7: the shared read starts at 5, after the trim, so this stream reads 5..11 on its own
    await read_stream(url, "m", params={"live": "false"}, headers={"Last-Event-ID": "2"})
    # reset, then from the start: gap 1..4, then 7 (the same way)
    await read_stream(url, "m", params={"live": "false"}, headers={"Last-Event-ID": "1:wrongepoch"})
    assert await metric(url, "sse_gateway_events_published_total", 'outcome="appended"') == 11
    assert await metric(url, "sse_gateway_events_published_total", 'outcome="duplicate"') == 1
    assert await metric(url, "sse_gateway_events_published_total", 'outcome="rejected"') == 1
    assert await metric(url, "sse_gateway_delivered_total") == 11 + 7 + 7
    assert await metric(url, "sse_gateway_replayed_total") == 7 + 7
    assert await metric(url, "sse_gateway_window_fills_total") == 3
    assert await metric(url, "sse_gateway_gaps_total") == 2
    assert await metric(url, "sse_gateway_resets_total") == 1
    assert await metric(url, "sse_gateway_streams_opened_total") == 3
    assert await metric(url, "sse_gateway_open_streams") == 0
    assert await metric(url, "sse_gateway_store_commit_operations_count") >= 1
    assert await metric(url, "sse_gateway_request_seconds_count", 'route="publish",status="2xx"') == 3
    assert await metric(url, "sse_gateway_request_seconds_count", 'route="publish",status="4xx"') == 1
    assert await metric(url, "process_open_fds") > 0
    text = client.get("/metrics").text
    assert "m" not in {line.split('"')[1] for line in text.splitlines() if 'session="' in line}  # no session labels


@pytest.mark.timeout(120)
async def test_rolling_restart_drains_to_the_other_process_exactly(start_gateway, tmp_path: Path):
    db = tmp_path / "shared.db"
    a = start_gateway("--drain-seconds", "4", "--heartbeat", "1", db=db)
    b = start_gateway("--drain-seconds", "4", "--heartbeat", "1", db=db)
    nodes = [a, b]
    session, total = "roll", 1200
    httpx.post(f"{a.url}/v1/sessions", json={"id": session})

    async def client(first: Gateway) -> RawStream:
        """Reconnect like EventSource behind a load balancer: this node, else the next one."""
        stream = RawStream(first.port, session)
        order = [first, b if first is a else a]
        while True:
            for node in order:
                stream.port = node.port
                try:
                    await stream.run()
                except OSError:
                    continue
                if stream.events and stream.events[-1] == "gateway.end":
                    return stream
                if stream.status == 200:
                    break  # a clean end or a drop: reconnect, starting with the same node
            await asyncio.sleep(0.05)

    published: list[int] = []

    async def publisher(offset: int) -> list[int]:
        ids = published if offset == 0 else []
        async with httpx.AsyncClient(timeout=5) as c:
            for i in range(offset, total, 2):
                for node in (nodes[offset], nodes[1 - offset]):  # fail over like a load balancer
                    try:
                        r = await c.post(f"{node.url}/v1/sessions/{session}/events",
                                         json={"data": {"i": i, "t": time.time()}})
                    except httpx.HTTPError:
                        continue
                    if r.status_code == 201:
                        ids.append(r.json()["id"])
                        break
                await asyncio.sleep(0.004)
        return ids

    clients = [asyncio.create_task(client(a if i % 2 else b)) for i in range(200)]

    async def all_open() -> bool:
        return await metric(a.url, "sse_gateway_open_streams") + await metric(b.url, "sse_gateway_open_streams") >= 200

    await await_until(all_open, interval=0.1, what="200 streams open on the two processes")
    pubs = [asyncio.create_task(publisher(0)), asyncio.create_task(publisher(1))]
    await await_until(lambda: len(published) >= 100, what="publishing to be under way before the drain")
    on_a_before = await metric(a.url, "sse_gateway_open_streams")
    a.proc.send_signal(signal.SIGTERM)
    r = httpx.get(f"{a.url}/readyz")
    assert r.status_code == 503  # the load balancer moves traffic at once
    r = httpx.get(f"{a.url}/v1/sessions/{session}/stream")
    assert r.status_code == 503 and r.headers["retry-after"]
    draining: list[float] = []  # a's open streams, sampled until it exits

    async def exited() -> bool:
        if a.proc.poll() is not None:
            return True
        try:
            draining.append(await metric(a.url, "sse_gateway_open_streams"))
        except (httpx.HTTPError, KeyError):
            pass
        return False

    await await_until(exited, interval=0.05, what="the drained process to exit by itself")
    ids = sorted((await pubs[0]) + (await pubs[1]))
    assert ids == list(range(1, total + 1))  # two processes on one file: contiguous, no duplicate
    async with httpx.AsyncClient() as c:
        await c.post(f"{b.url}/v1/sessions/{session}/complete")
    done = await asyncio.wait_for(asyncio.gather(*clients), 60)
    for stream in done:
        assert stream.ids == list(range(1, total + 2))
    assert on_a_before >= 50
    assert a.proc.returncode == 0 and "Traceback" not in a.log()
    # the closes were spread over the window, not done at once: a was seen with some streams closed and some open
    assert any(0 < n < on_a_before for n in draining), (on_a_before, draining)


@pytest.mark.timeout(60)
async def test_a_stream_on_one_process_gets_commits_of_another_live(start_gateway, tmp_path: Path):
    """Each commit on a reaches an open stream on b before the next is made: live, on one connection."""
    db = tmp_path / "two.db"
    a, b = start_gateway(db=db), start_gateway(db=db)
    httpx.post(f"{a.url}/v1/sessions", json={"id": "x"})
    received: list[int] = []
    connections = 0

    async def watch() -> None:
        nonlocal connections
        async with httpx.AsyncClient(timeout=WAIT_TIMEOUT) as c, c.stream("GET", f"{b.url}/v1/sessions/x/stream") as r:
            connections += 1
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    received.append(int(line[6:]))
                    if len(received) == 50:
                        return

    watcher = asyncio.create_task(watch())
    await await_until(lambda: metric(b.url, "sse_gateway_open_streams"), what="the stream on b to open")
    async with httpx.AsyncClient() as c:
        for i in range(50):
            assert (await c.post(f"{a.url}/v1/sessions/x/events", json={"data": i})).status_code == 201
            await await_until(lambda: len(received) == i + 1, interval=0.005,
                              what=f"event {i + 1}, committed by a, on b's open stream")
    await asyncio.wait_for(watcher, WAIT_TIMEOUT)
    assert received == list(range(50)) and connections == 1


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        message = f"cannot mount a small tmpfs here ({r.stderr.decode().strip()}); needs root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(reason=message)


@pytest.mark.timeout(90)
def test_full_disk_refuses_publishes_keeps_acknowledged_events_and_recovers(start_gateway, tmp_path: Path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "3m")
    try:
        gw = start_gateway(db=disk / "gw.db")
        acked: dict[int, str] = {}
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 400_000))
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            statuses = []
            for i in range(400):
                payload = f"{i}-" + "x" * 8000
                r = c.post("/v1/sessions/full/events", json={"data": payload})
                statuses.append(r.status_code)
                if r.status_code == 201:
                    acked[r.json()["id"]] = payload
                else:
                    assert r.status_code == 507, r.text
                    assert r.json()["error"]["code"] == "store_full"
                    assert r.headers["retry-after"]
                    if statuses.count(507) >= 5:
                        break
            assert acked and 507 in statuses
            # reading keeps working while writes fail
            replay = c.get("/v1/sessions/full/stream", params={"live": "false"})
            assert replay.text.count("id: ") == len(acked)
            filler.unlink()  # space comes back: the gateway recovers by itself
            r = c.post("/v1/sessions/full/events", json={"data": "after"})
            assert r.status_code == 201 and r.json()["id"] == max(acked) + 1
        gw.kill()  # and nothing acknowledged was lost, even across a crash
        gw.start()
        with httpx.Client(base_url=gw.url) as c:
            events = c.get("/v1/sessions/full/events", params={"limit": 1000}).json()["events"]
        stored = {e["id"]: e["data"] for e in events}
        assert list(stored) == list(range(1, max(acked) + 2))
        for id_, payload in acked.items():
            assert stored[id_] == payload
        gw.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.timeout(90)
def test_a_disk_gone_read_only_refuses_publishes_clearly_and_keeps_serving_reads(start_gateway, tmp_path: Path):
    """ext4 with errors=remount-ro, forced into an error (as a failing disk would): the file system turns
    read-only under the open database. Publishes get 503 store_read_only (nothing half-written), reads
    and streams go on, and a restart on that disk refuses to start with one clear line."""
    image, disk = tmp_path / "disk.img", tmp_path / "disk"
    disk.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    steps = [["mkfs.ext4", "-q", str(image)], ["mount", "-o", "loop,errors=remount-ro", str(image), str(disk)]]
    for step in steps:
        r = subprocess.run(step, capture_output=True)
        if r.returncode != 0:
            message = f"cannot {step[0]} a loop file system here ({r.stderr.decode().strip()}); needs root"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(reason=message)
    try:
        device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(disk)], capture_output=True,
                                text=True).stdout.strip()
        gw = start_gateway(db=disk / "gw.db")
        with httpx.Client(base_url=gw.url, timeout=10) as c:
            for i in range(20):
                assert c.post("/v1/sessions/ro/events", json={"data": i}).status_code == 201
            Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("1")
            for i in range(5):
                r = c.post("/v1/sessions/ro/events", json={"data": "lost"})
                assert r.status_code == 503 and r.json()["error"]["code"] == "store_read_only", r.text
                assert r.headers["retry-after"]
            assert c.post("/v1/sessions", json={"id": "new"}).json()["error"]["code"] == "store_read_only"
            replay = c.get("/v1/sessions/ro/stream", params={"live": "false"})
            assert replay.status_code == 200 and replay.text.count("id: ") == 20
            events = c.get("/v1/sessions/ro/events").json()["events"]
            assert [e["data"] for e in events] == list(range(20))
        gw.kill()
        from test_cli import cli

        r = cli("serve", "--db", str(disk / "gw.db"), "--port", "1")
        assert r.returncode == 1 and "read-only" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.system  # starts the real serve
def test_corrupt_or_locked_database_is_a_clear_error(tmp_path: Path):
    from test_cli import cli

    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database " * 100)
    r = cli("serve", "--db", str(bad), "--port", "1")
    assert r.returncode == 1 and "not a usable SQLite database" in r.stderr and "Traceback" not in r.stderr
    import sqlite3

    locked = tmp_path / "locked.db"
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        r = cli("serve", "--db", str(locked), "--port", "1")
        assert r.returncode == 1 and "locked" in r.stderr and "Traceback" not in r.stderr
    finally:
        holder.close()


@pytest.mark.timeout(240)
async def test_ten_thousand_connect_disconnect_cycles_leak_nothing(start_gateway):
    gw = start_gateway("--heartbeat", "5")
    async with httpx.AsyncClient(base_url=gw.url) as c:
        for start in range(0, 20000, 1000):
            await c.post("/v1/sessions/big/events", json=[{"data": "y" * 100}] * 1000)
        await c.post("/v1/sessions/quiet/events", json={"data": 1})

    async def baseline() -> dict[str, float]:
        return {name: await metric(gw.url, name) for name in
                ("sse_gateway_asyncio_tasks", "process_open_fds", "process_resident_memory_bytes",
                 "sse_gateway_open_streams")}

    async def cycle(kind: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            if kind == 0:  # gone before the response starts (half a request)
                writer.write(b"GET /v1/sessions/big/stream HTTP/1.1\r\nHo")
                await writer.drain()
            elif kind == 1:  # gone mid-replay of 20,000 events
                writer.write(b"GET /v1/sessions/big/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                await reader.readexactly(random.randint(200, 60000))
            else:  # gone mid-live, after the replay
                writer.write(b"GET /v1/sessions/quiet/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                await reader.readuntil(b"id: 1:")
        finally:
            if random.random() < 0.5:
                writer.transport.abort()  # a reset
            else:
                writer.close()

    # warm up: let every lazily-created thing exist before the baseline
    await asyncio.gather(*(cycle(i % 3) for i in range(300)))
    last: dict[str, float] = {}

    async def settled() -> dict[str, float] | None:
        """No open stream, and as many tasks as at the previous look (the warm-up's are all gone)."""
        now = await baseline()
        steady = now["sse_gateway_open_streams"] == 0 and now["sse_gateway_asyncio_tasks"] == last.get(
            "sse_gateway_asyncio_tasks")
        last.update(now)
        return now if steady else None

    before = await await_until(settled, interval=0.3, what="the warmed-up gateway to settle")
    sem = asyncio.Semaphore(50)

    async def bounded(i: int) -> None:
        async with sem:
            await cycle(i % 3)

    await asyncio.gather(*(bounded(i) for i in range(10_000)))

    async def back_to_baseline() -> dict[str, float] | None:
        now = await baseline()
        if now["sse_gateway_open_streams"] == 0 and now["sse_gateway_asyncio_tasks"] <= before[
                "sse_gateway_asyncio_tasks"]:
            return now
        return None

    after = await await_until(back_to_baseline, interval=0.3, what="every stream and its tasks to be gone")
    assert after["sse_gateway_open_streams"] == 0
    assert after["sse_gateway_asyncio_tasks"] <= before["sse_gateway_asyncio_tasks"]
    assert after["process_open_fds"] <= before["process_open_fds"] + 2
    assert after["process_resident_memory_bytes"] < before["process_resident_memory_bytes"] + 16 * 2**20
    async with httpx.AsyncClient(base_url=gw.url) as c:
        assert (await c.get("/v1/sessions/big")).json()["subscribers"] == 0

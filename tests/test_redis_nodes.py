"""Several gateway processes on one Redis: ids, live feed, node and Redis failures, presence, Cluster."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess

import httpx
import pytest
from conftest import free_port, require_binary
from httpx_sse import aconnect_sse
from util import Heard, RawStream, Received, await_until, metric, read_stream

from sse_gateway.errors import Unavailable
from sse_gateway.log.redis import RedisLog
from sse_gateway.models import NewEvent

pytestmark = pytest.mark.system  # redis-server and gateways on real ports


def node(start_gateway, url: str):
    return start_gateway("--backend", "redis", "--redis-url", url, "--heartbeat", "1")


async def session_info(client: httpx.AsyncClient, base: str, session: str) -> dict:
    return (await client.get(f"{base}/v1/sessions/{session}")).json()


async def feeds_subscribed(*urls: str, count: int) -> None:
    """Wait until ``count`` feeds listen on the appends channel, summed over the Redis servers at ``urls``
    (what a feed misses before it listens, it never hears)."""
    import redis.asyncio as aredis

    from sse_gateway.log.redis import CHANNEL

    async def listening() -> bool:
        total = 0
        for url in urls:
            async with aredis.Redis.from_url(url) as raw:
                total += (await raw.pubsub_numsub(CHANNEL))[0][1]
        return total >= count

    await await_until(listening, what=f"{count} feed subscription(s)")


async def redis_busy(port: int) -> None:
    """Wait until Redis stops answering (a DEBUG SLEEP has begun)."""

    async def silent() -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await asyncio.wait_for(reader.readline(), 0.2)  # an answer within 0.2 s: still answering
            return False
        except TimeoutError:
            return True
        finally:
            writer.close()

    await await_until(silent, what="Redis to stop answering (DEBUG SLEEP)")


@pytest.mark.timeout(60)
async def test_two_nodes_append_contiguous_ids(redis_server, start_gateway):
    nodes = [node(start_gateway, redis_server), node(start_gateway, redis_server)]
    per_publisher = 25

    async def publisher(client: httpx.AsyncClient, p: int) -> list[int]:
        base = nodes[p % 2].url
        ids = []
        for n in range(per_publisher):
            r = await client.post(f"{base}/v1/sessions/run/events", json={"data": {"p": p, "n": n}})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        return ids

    async with httpx.AsyncClient(timeout=10) as client:
        results = await asyncio.gather(*(publisher(client, p) for p in range(20)))
        total = 20 * per_publisher
        assert sorted(i for ids in results for i in ids) == list(range(1, total + 1))
        for ids in results:
            assert ids == sorted(ids)
        events, after = [], 0
        while len(events) < total:
            page = (await client.get(f"{nodes[1].url}/v1/sessions/run/events",
                                     params={"after": after, "limit": 1000})).json()
            events += page["events"]
            after = page["next_after"]
    by_id = {e["id"]: e["data"] for e in events}
    for p, ids in enumerate(results):
        assert [by_id[i] for i in ids] == [{"p": p, "n": n} for n in range(per_publisher)]


@pytest.mark.timeout(60)
async def test_live_feed_across_nodes_and_resume_after_kill(redis_server, start_gateway):
    a, b = node(start_gateway, redis_server), node(start_gateway, redis_server)
    total = 20 * 10
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"{a.url}/v1/sessions", json={"id": "live"})).status_code == 201
        got = Received()
        reader = asyncio.create_task(read_stream(b.url, "live", received=got, until_id=total, timeout=30))
        await await_until(lambda: _subscribers(client, b.url, "live", 1), what="the stream on B")

        async def publisher(p: int) -> None:
            for n in range(10):
                r = await client.post(f"{a.url}/v1/sessions/live/events", json={"data": [p, n]})
                assert r.status_code == 201, r.text
                await asyncio.sleep(0.005)

        publishers = asyncio.gather(*(publisher(p) for p in range(20)))
        await await_until(lambda: len(got.ids) >= total // 4, what="live events on B")
        b.kill()  # kill -9, mid-stream
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        seen_on_b = len(got.ids)
        await read_stream(a.url, "live", received=got, until_id=total, timeout=30)
        await publishers
    assert 0 < seen_on_b < total
    assert got.ids == list(range(1, total + 1))
    assert got.connects >= 2


@pytest.mark.timeout(90)
async def test_events_from_another_node_cost_one_read_per_node_not_per_subscriber(redis_server, start_gateway):
    """50 streams on B and 10 on A, 300 events published on A: B reads each new event once for all 50
    (one shared read per notification; read per subscriber, it was 15,000), A reads none (its writer
    hands the hub its own events; its own feed lines are skipped), and every stream gets exactly 1..300."""
    a, b = node(start_gateway, redis_server), node(start_gateway, redis_server)
    streams, total = 50, 300
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"{a.url}/v1/sessions", json={"id": "wide"})).status_code == 201
        readers = [read_stream(gw.url, "wide", until_id=total, timeout=60) for gw in [b] * streams + [a] * 10]
        reading = asyncio.gather(*readers)
        await await_until(lambda: _subscribers(client, b.url, "wide", streams + 10), what="60 streams")
        for n in range(total):
            assert (await client.post(f"{a.url}/v1/sessions/wide/events", json={"data": n})).status_code == 201
        got = await reading
    assert all(r.ids == list(range(1, total + 1)) for r in got)
    fills = await metric(b.url, "sse_gateway_window_fills_total")
    replayed = await metric(b.url, "sse_gateway_replayed_total")
    assert 1 <= fills <= total and replayed == 0, (fills, replayed)
    assert await metric(a.url, "sse_gateway_window_fills_total") == 0
    assert await metric(a.url, "sse_gateway_replayed_total") == 0


@pytest.mark.timeout(90)
async def test_hundreds_of_streams_attaching_at_once_wait_for_a_redis_connection(redis_server, start_gateway):
    """600 streams open at the same moment: each attach reads Redis, more at once than the connection pool
    holds. They queue for a connection (none is refused with 503), and each gets the whole session."""
    gw = node(start_gateway, redis_server)
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"{gw.url}/v1/sessions/crowd/events", json={"data": 1})).status_code == 201
        streams = [RawStream(gw.port, "crowd") for _ in range(600)]
        running = asyncio.gather(*(s.run() for s in streams))
        await await_until(lambda: all(s.status for s in streams), what="600 answers")
        assert (await client.post(f"{gw.url}/v1/sessions/crowd/complete", json={"result": "ok"})).status_code == 200
        await asyncio.wait_for(running, 30)
    assert {s.status for s in streams} == {200}
    assert all(s.ids == [1, 2] and s.events[-1] == "gateway.end" for s in streams)


async def _subscribers(client: httpx.AsyncClient, base: str, session: str, count: int) -> bool:
    return (await session_info(client, base, session))["subscribers"] == count


async def resuming_reader(base: str, session: str, until_id: int, got: Received) -> None:
    """Like EventSource, plus: a 503 (store unavailable) is retried too, from the same cursor."""
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(5.0, read=30.0)) as client:
        while not got.ids or got.ids[-1] < until_id:
            headers = {"Last-Event-ID": got.cursor} if got.cursor else {}
            try:
                async with aconnect_sse(client, "GET", f"/v1/sessions/{session}/stream", headers=headers) as source:
                    got.connects += 1
                    if source.response.status_code != 200:
                        assert source.response.status_code == 503, source.response.status_code
                        await asyncio.sleep(0.1)
                        continue
                    async for sse in source.aiter_sse():
                        if not sse.id and not sse.data:
                            continue  # the `retry:` block, which carries no event
                        if sse.event in ("gateway.gap", "gateway.reset"):
                            got.notices.append((sse.event, sse.data))
                            continue
                        got.cursor = sse.id
                        got.ids.append(int(sse.id.split(":")[0]))
                        if got.ids[-1] >= until_id:
                            return
            except (httpx.HTTPError, OSError):
                await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_redis_restart_keeps_acknowledged_events(start_redis, start_gateway):
    redis = start_redis(aof=True)  # appendonly yes, appendfsync always
    gw = node(start_gateway, redis.url)
    publishers, per_publisher = 4, 30
    total = publishers * per_publisher
    acked: dict[int, tuple[int, int]] = {}  # id -> (publisher, n)
    refused = 0  # publishes that failed (Redis down), retried

    async def publisher(client: httpx.AsyncClient, p: int) -> None:
        nonlocal refused
        for n in range(per_publisher):
            while True:  # retry until acknowledged; the idempotency key makes a retry safe
                try:
                    r = await client.post(f"{gw.url}/v1/sessions/durable/events", json={"data": [p, n]},
                                          headers={"Idempotency-Key": f"{p}-{n}"})
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code in (200, 201):
                    acked[r.json()["id"]] = (p, n)
                    break
                assert r is None or r.status_code == 503, r.text
                refused += 1
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.01)

    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"{gw.url}/v1/sessions", json={"id": "durable"})).status_code == 201
        epoch = (await session_info(client, gw.url, "durable"))["epoch"]
        got = Received()
        reader = asyncio.create_task(resuming_reader(gw.url, "durable", total, got))
        running = asyncio.gather(*(publisher(client, p) for p in range(publishers)))
        await await_until(lambda: len(acked) >= total // 3, what="the first acknowledged events")

        redis.kill()
        r = await client.post(f"{gw.url}/v1/sessions/durable/events", json={"data": "down"})
        assert r.status_code == 503 and "retry-after" in r.headers, r.text
        assert r.json()["error"]["code"] == "store_unavailable"
        assert (await client.get(f"{gw.url}/readyz")).status_code == 503
        refused_before = refused
        await await_until(lambda: refused >= refused_before + publishers,
                          what="the publishers to be refused while Redis is down")

        redis.start()
        await await_until(lambda: _ready(client, gw.url), what="readyz after Redis came back")
        await running
        await asyncio.wait_for(reader, 30)
        info = await session_info(client, gw.url, "durable")
        history = (await client.get(f"{gw.url}/v1/sessions/durable/events", params={"limit": 1000})).json()
    assert info["epoch"] == epoch and info["last_id"] == total
    assert sorted(acked) == list(range(1, total + 1))
    assert {e["id"]: tuple(e["data"]) for e in history["events"]} == acked
    assert got.ids == list(range(1, total + 1))


async def _ready(client: httpx.AsyncClient, base: str) -> bool:
    return (await client.get(f"{base}/readyz")).status_code == 200


@pytest.mark.timeout(60)
async def test_presence_is_summed_over_nodes_and_forgets_a_killed_node(redis_server, start_gateway):
    a, b = node(start_gateway, redis_server), node(start_gateway, redis_server)

    async def hold(base: str) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=None)) as c, \
                c.stream("GET", f"{base}/v1/sessions/seen/stream") as r:
            async for _ in r.aiter_bytes():
                pass

    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"{a.url}/v1/sessions", json={"id": "seen"})).status_code == 201
        on_a = asyncio.create_task(hold(a.url))
        on_b = [asyncio.create_task(hold(b.url)) for _ in range(2)]
        for base in (a.url, b.url):
            await await_until(lambda base=base: _subscribers(client, base, "seen", 3), what="3 subscribers")
        b.kill()  # its two streams must stop counting once its liveness key expires (6 s)
        await await_until(lambda: _subscribers(client, a.url, "seen", 1), what="B's streams to vanish")
        on_a.cancel()
        await await_until(lambda: _subscribers(client, a.url, "seen", 0), what="no subscribers")
        assert (await session_info(client, a.url, "seen"))["last_seen_at"] is not None
        for task in on_b:
            task.cancel()
        await asyncio.gather(on_a, *on_b, return_exceptions=True)


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s, contextlib.suppress(OSError):
                s.bind(("127.0.0.1", port + 10000))
                return port


@pytest.mark.timeout(60)
async def test_redis_cluster_appends_reads_and_feed(start_redis):
    cli = require_binary("redis-cli")
    servers = [start_redis(port=cluster_port(), args=("--cluster-enabled", "yes", "--cluster-config-file",
                                                      "nodes.conf", "--cluster-node-timeout", "2000"))
               for _ in range(3)]
    subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers), "--cluster-replicas",
                    "0", "--cluster-yes"], check=True, capture_output=True, timeout=30)
    for s in servers:
        await await_until(lambda s=s: b"cluster_state:ok" in subprocess.run(
            [cli, "-p", str(s.port), "cluster", "info"], capture_output=True, check=False).stdout,
            interval=0.1, what=f"cluster_state:ok on {s.port}")

    url = f"redis+cluster://127.0.0.1:{servers[0].port}"
    writer, watcher = RedisLog(url), RedisLog(url)
    await writer.open()
    await watcher.open()
    try:
        names = [f"c{i}" for i in range(6)]  # spread over the slots of all three masters
        heads: dict[str, int] = {}
        watcher.watched = set(names)
        watcher.add_observer(Heard(lambda s, events, row: row and heads.__setitem__(s, row.last_id)))
        await feeds_subscribed(*(s.url for s in servers), count=2)  # the writer's and the watcher's
        jobs = [(name, i) for name in names for i in range(20)]
        results = await asyncio.gather(*(writer.append(name, [NewEvent("message", f'"{name}-{i}"')])
                                         for name, i in jobs))
        for name in names:
            assert sorted(r.ids[0] for (n, _), r in zip(jobs, results) if n == name) == list(range(1, 21))
            assert [e.id for e in await watcher.read(name, 0, 100)] == list(range(1, 21))
        await await_until(lambda: all(heads.get(n) == 20 for n in names), what="the feed on the watcher")
        assert (await writer.complete("c0", {"ok": True})).last_id == 21
        assert {r.id for r in await watcher.list_sessions()} == set(names)
        assert await writer.delete_session("c1") is True
        assert await watcher.get_session("c1") is None
        # a lapsed lease ends the run there too; the index of deadlines is written right after the script
        lapsed = await writer.create_session("lapsed", lease_seconds=1)
        assert await watcher.expire(lapsed.deadline - 1) == 0
        await await_until(lambda: watcher.expire(lapsed.deadline), what="the run ended by the other node")
        assert (await writer.get_session("lapsed")).outcome == "timed_out"
        assert await writer.expire(lapsed.deadline) == 0
    finally:
        await writer.close()
        await watcher.close()


@pytest.mark.timeout(30)
async def test_wait_replicas_acknowledges_only_replicated_writes(start_redis):
    primary = start_redis(args=("--repl-diskless-sync-delay", "0"))
    replica = start_redis(args=("--replicaof", "127.0.0.1", str(primary.port)))
    log, demanding = RedisLog(primary.url, wait_replicas=1), RedisLog(primary.url, wait_replicas=2)
    await log.open()
    await demanding.open()
    try:
        await await_until(lambda: _replica_online(primary.port), what="the replica to sync")
        assert (await log.append("w", [NewEvent("message", "1")])).ids == [1]
        with pytest.raises(Unavailable) as exc:
            await demanding.append("w", [NewEvent("message", "2", idempotency_key="k")])
        assert exc.value.code == "store_not_replicated"
        retry = await log.append("w", [NewEvent("message", "2", idempotency_key="k")])
        assert retry.ids == [2] and retry.new == [False]  # it was stored; the retry learns its id
    finally:
        await log.close()
        await demanding.close()
        replica.kill()


def _replica_online(port: int) -> bool:
    info = subprocess.run([require_binary("redis-cli"), "-p", str(port), "info", "replication"],
                          capture_output=True, text=True, check=False).stdout
    return "state=online" in info


@pytest.mark.timeout(60)
async def test_a_write_whose_reply_was_lost_still_reaches_this_nodes_streams(start_redis):
    """A node skips its own feed lines (its writer hands the hub the events), except when the writer
    never got the reply: Redis, busy for 4 s, runs the append after the node gave up waiting (2 s,
    503 to the publisher); the line that follows is then this node's only news of it."""
    server = start_redis(args=("--enable-debug-command", "local"))
    store = RedisLog(server.url)
    await store.open()
    heads: list[int] = []
    try:
        await store.create_session("late")
        store.watched = {"late"}
        store.add_observer(Heard(lambda s, events, row: row and heads.append(row.last_id)))
        await feeds_subscribed(server.url, count=1)
        busy = subprocess.Popen([require_binary("redis-cli"), "-p", str(server.port), "DEBUG", "SLEEP", "4"])
        await redis_busy(server.port)
        with pytest.raises(Unavailable):
            await store.append("late", [NewEvent("message", '"late"')])
        assert heads == []
        busy.wait(timeout=10)
        await await_until(lambda: heads == [1], what="the head from this node's own feed line")
        assert [e.id for e in await store.read("late", 0, 10)] == [1]
    finally:
        await store.close()


@pytest.mark.timeout(30)
async def test_feed_takes_lines_of_older_nodes_and_survives_garbage(redis_server):
    """The live feed's line is SESSION, EPOCH, LAST_ID, STATUS and, since nodes skip their own, NODE. A line
    without NODE (an older node, mid rolling upgrade) still moves the head; junk on the channel is logged
    and skipped, and the feed goes on."""
    import redis.asyncio as aredis

    from sse_gateway.log.redis import CHANNEL

    writer, watcher = RedisLog(redis_server), RedisLog(redis_server)
    raw = aredis.Redis.from_url(redis_server)
    await writer.open()
    await watcher.open()
    heads: list[int] = []
    try:
        epoch = (await writer.create_session("mixed")).epoch
        watcher.watched = {"mixed"}
        watcher.add_observer(Heard(lambda s, events, row: row and heads.append(row.last_id)))
        await feeds_subscribed(redis_server, count=2)
        for junk in (b"", b"no tabs", b"mixed\tx\tnot-a-number\topen", b"\xff\xfe", b"a\tb"):
            await raw.publish(CHANNEL, junk)
        await raw.publish(CHANNEL, f"mixed\t{epoch}\t7\topen")  # the shape an older node publishes
        await await_until(lambda: heads == [7], what="the older node's line")
        await writer.append("mixed", [NewEvent("message", '"x"')])
        await await_until(lambda: heads == [7, 1], what="a line from a current node")
    finally:
        await raw.aclose()
        await writer.close()
        await watcher.close()

"""The bench's scenarios. Each takes a started server and returns its figures as a flat dict.

Every scenario uses sessions of its own (``ctx.prefix``), times only its
measured part (``Meter``), and reads around it the wall time and, from
``/proc``, the CPU time and run-queue wait of the server and of the load
generator: ``client_busy`` near 1.0 means the load generator was the limit.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from .profile import Profiler
from .servers import ProcessTree, Server
from .wire import Endpoint, Group, HTTPError, Publisher

#: fan-out: the publisher waits while the slowest subscriber is this many events behind
MAX_LAG = 200
BATCH = 100  # events per request in ingest-batch
BULK_PUBLISHERS = 8  # concurrent publishers in ingest-batch and ingest-ndjson
FLEET_RATE = 20.0  # events/s per session
MAX_IN_FLIGHT = 1000  # paced publishing: unanswered requests per connection before events are skipped
SUSTAIN_DRAIN = 0.05  # sustained: the backlog left at the end drains within this share of the duration
LATENCY_RATE = 1000.0
LATENCY_SUBSCRIBERS = 100


@dataclass(frozen=True)
class Sizes:
    ingest_seconds: float
    fanout_seconds: float
    fleet_sessions: int
    fleet_seconds: float
    latency_seconds: float
    replay_events: int
    idle_streams: int
    heartbeat_seconds: float
    drain_timeout: float  # for subscribers to get the last event once publishing stops
    replay_timeout: float
    answers: int = 100  # messages: answers in the session
    deltas: int = 1000  # messages: deltas per answer


FULL = Sizes(ingest_seconds=5, fanout_seconds=10, fleet_sessions=1000, fleet_seconds=10, latency_seconds=10,
             replay_events=100_000, idle_streams=10_000, heartbeat_seconds=10, drain_timeout=30, replay_timeout=60)
QUICK = Sizes(ingest_seconds=1, fanout_seconds=1, fleet_sessions=100, fleet_seconds=1.5, latency_seconds=1.5,
              replay_events=10_000, idle_streams=500, heartbeat_seconds=2, drain_timeout=10, replay_timeout=15,
              answers=10, deltas=100)


@dataclass
class Context:
    server: Server
    sizes: Sizes
    prefix: str  # unique to this run and target: no two scenarios share a session
    profile: Path | None = None  # where py-spy writes the measured part's profile (``--profile``)
    profiler: Profiler | None = None

    def meter(self) -> Meter:
        """Start the clocks (and the profiler) of the measured part."""
        if self.profile is not None and self.server.tree is not None:
            self.profiler = Profiler(self.server.tree.pid, self.profile, f"py-spy profile of {self.profile.name}")
        return Meter(self.server, self.stop_profiler)

    def stop_profiler(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def publisher(self, k: int = 0) -> Publisher:
        """Publisher ``k``: on node k mod N (subscribers start from the next node: ``Group.subscribe``)."""
        nodes = self.server.nodes
        return nodes[k % len(nodes)].publisher()

    def group(self, **kw) -> Group:
        t = self.server.target
        return Group([Endpoint(n.stream_url) for n in self.server.nodes], last_event_id_style=t.last_event_id_style,
                     **kw)


class Meter:
    """Wall time, and the CPU and run-queue wait of the server and of the load generator, until ``stop``.

    The server's named parts (Redis under the ``redis-*`` targets) are
    also reported alone: ``redis_cpu_s``, its share of one core, and per
    published event.

    ``client_busy`` is the share of the time the load generator was running or
    waiting to run: near 1.0 it was the limit. ``client_wait`` and
    ``server_wait`` are the shares spent runnable but kept off the CPU by
    other processes: the machine's noise, in the figures' own units.
    """

    def __init__(self, server: Server, on_stop: Callable[[], None] = lambda: None) -> None:
        self.server = server
        self.on_stop = on_stop
        self.client = ProcessTree(os.getpid(), descendants=False)  # not the servers it started
        self.cpu0 = server.cpu_seconds()
        self.parts0 = {name: tree.cpu_seconds() for name, tree in server.parts.items()}
        self.wait0 = server.wait_seconds()
        self.client_cpu0, self.client_wait0 = time.process_time(), self.client.wait_seconds()
        self.t0 = time.perf_counter()

    def stop(self, events: int | None = None, published: int | None = None) -> dict:
        seconds = time.perf_counter() - self.t0
        client_cpu = time.process_time() - self.client_cpu0
        client_wait = self.client.wait_seconds() - self.client_wait0
        out = {"seconds": seconds, "client_busy": (client_cpu + client_wait) / seconds,
               "client_wait": client_wait / seconds}
        if self.cpu0 is not None:
            cpu = self.server.cpu_seconds() - self.cpu0
            out["server_cpu_s"] = cpu
            out["server_wait"] = (self.server.wait_seconds() - self.wait0) / seconds
            if events:
                out["server_cpu_us_per_event"] = cpu / events * 1e6
        for name, cpu0 in self.parts0.items():
            cpu = self.server.parts[name].cpu_seconds() - cpu0
            out[f"{name}_cpu_s"] = cpu
            out[f"{name}_cpu_share"] = cpu / seconds  # of one core
            if published:
                out[f"{name}_cpu_us_per_published"] = cpu / published * 1e6
        self.on_stop()
        return out


async def quiesce(server: Server, timeout: float = 10.0) -> None:
    """Wait until the server has been (nearly) idle for 0.2 s: the work setup started is done."""
    if server.cpu_seconds() is None:
        await asyncio.sleep(0.5)
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = server.cpu_seconds()
    while loop.time() < deadline:
        await asyncio.sleep(0.2)
        now = server.cpu_seconds()
        if now - last <= 0.02:
            return
        last = now


async def gather_bounded(coros, limit: int = 100) -> list:
    gate = asyncio.Semaphore(limit)

    async def one(coro):
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


def percentiles(latencies) -> dict:
    """p50 / p99 / max of latencies in nanoseconds, as milliseconds."""
    if not latencies:
        return {}
    ns = sorted(latencies)
    return {"p50_ms": ns[len(ns) // 2] / 1e6, "p99_ms": ns[min(len(ns) - 1, int(len(ns) * 0.99))] / 1e6,
            "max_ms": ns[-1] / 1e6}


# -- ingest --------------------------------------------------------------------


async def _ingest(ctx: Context, publishers: int, mode: str) -> dict:
    loop = asyncio.get_running_loop()
    sessions = [f"{ctx.prefix}-{mode}{publishers}-{i}" for i in range(publishers)]
    pubs = [ctx.publisher(k) for k in range(len(sessions))]
    try:
        for pub, session in zip(pubs, sessions, strict=True):
            await pub.connect()
            await pub.publish(session, 0)  # creates the session outside the timed part
        meter = ctx.meter()
        until = loop.time() + ctx.sizes.ingest_seconds

        async def single(pub: Publisher, session: str) -> int:
            n = 0
            while loop.time() < until:
                n += 1
                await pub.publish(session, n)
            return n

        async def batch(pub: Publisher, session: str) -> int:
            n = 0
            while loop.time() < until:
                await pub.post(pub.request(session, pub.batch_body(n + 1, BATCH)))
                n += BATCH
            return n

        async def ndjson(pub: Publisher, session: str) -> int:
            return await pub.ndjson(session, until)

        work = {"single": single, "batch": batch, "ndjson": ndjson}[mode]
        total = sum(await asyncio.gather(*(work(p, s) for p, s in zip(pubs, sessions, strict=True))))
        m = meter.stop(total, published=total)
        return {"events_per_s": total / m["seconds"], "events": total, "publishers": publishers, **m}
    finally:
        for pub in pubs:
            pub.close()


async def ingest_1(ctx: Context) -> dict:
    return await _ingest(ctx, 1, "single")


async def ingest_32(ctx: Context) -> dict:
    return await _ingest(ctx, 32, "single")


async def ingest_batch(ctx: Context) -> dict:
    return await _ingest(ctx, BULK_PUBLISHERS, "batch")


async def ingest_ndjson(ctx: Context) -> dict:
    return await _ingest(ctx, BULK_PUBLISHERS, "ndjson")


# -- fan-out ---------------------------------------------------------------------


async def _attach(group: Group, primes, timeout: float) -> None:
    """Publish event 0 (``primes``), subscribe every member, wait until each has it."""
    await gather_bounded(primes)
    await group.open_all()
    group.finish_at(0)
    if not await group.wait_settled(timeout):
        raise RuntimeError(f"only {group.settled} of {len(group.members)} subscribers got the first event "
                           f"in {timeout}s ({group.failures[:3]})")
    if group.failures:
        raise RuntimeError(f"{len(group.failures)} subscribers failed: {group.failures[:3]}")


async def _fanout(ctx: Context, subscribers: int) -> dict:
    loop = asyncio.get_running_loop()
    session = f"{ctx.prefix}-fanout{subscribers}"
    pub = await ctx.publisher().connect()
    group = ctx.group()
    try:
        for _ in range(subscribers):
            group.subscribe(session)
        await _attach(group, [pub.publish(session, 0)], ctx.sizes.drain_timeout)
        await quiesce(ctx.server)
        meter = ctx.meter()
        until = loop.time() + ctx.sizes.fanout_seconds
        n = 0
        while loop.time() < until:
            if n % 16 == 0:
                while n + 1 - group.min_next() > MAX_LAG and loop.time() < until:
                    await asyncio.sleep(0.001)
            n += 1
            await pub.publish(session, n)
        group.finish_at(n)
        drained = await group.wait_settled(ctx.sizes.drain_timeout)
        delivered = group.received - subscribers  # event 0 came before the clock started
        m = meter.stop(delivered, published=n)
        out = {"delivered_per_s": delivered / m["seconds"], "published_per_s": n / m["seconds"],
               "exact": drained and group.exact, "subscribers": subscribers, "delivered": delivered,
               "reconnects": group.reconnects, **m}
        if "server_cpu_us_per_event" in m:  # known when the bench can read the server's /proc
            out["cpu_us_per_delivered"] = m["server_cpu_us_per_event"]
        return out
    finally:
        group.close()
        pub.close()


async def fanout_100(ctx: Context) -> dict:
    return await _fanout(ctx, 100)


async def fanout_1000(ctx: Context) -> dict:
    return await _fanout(ctx, 1000)


# -- paced publishing: fleet and latency ---------------------------------------------


async def _paced(pubs: list[Publisher], sessions: list[str], rate: float, start: float, until: float) -> list[int]:
    """Offer ``rate`` events/s to each session from ``start`` to ``until`` (loop time); events sent to each.

    Open loop: event j of the run goes to session j % count at start +
    j / (count * rate), one ticker paces them all, and each event is sent
    when it is due whether or not the previous one was answered (HTTP/1.1
    pipelining keeps a connection's requests in order). A slow server
    cannot slow the offered load down and so hide its queue: the queue
    shows in the latencies and in the drain after publishing stops.
    """
    loop = asyncio.get_running_loop()
    count = len(sessions)
    sent, in_flight = [0] * count, [0] * count
    errors: list[str] = []

    def answered(i: int, status: int, body: bytes) -> None:
        in_flight[i] -= 1
        if not 200 <= status < 300:
            errors.append(f"{sessions[i]}: {status or 'connection broken'} {body[:100]!r}")

    callbacks = [functools.partial(answered, i) for i in range(count)]
    step = 1 / (count * rate)
    j = 0
    while (now := loop.time()) < until:
        while (due := start + j * step) <= now and due < until:
            i = j % count
            if in_flight[i] < MAX_IN_FLIGHT:
                sent[i] += 1
                in_flight[i] += 1
                pub = pubs[i]
                pub.send(pub.request(sessions[i], pub.event_body(sent[i])), callbacks[i])
            j += 1
        await asyncio.sleep(max(0.001, start + j * step - loop.time()))
    deadline = loop.time() + 30
    while any(in_flight) and loop.time() < deadline:
        await asyncio.sleep(0.005)
    if errors:
        raise HTTPError(f"{len(errors)} publishes failed, first: {errors[0]}")
    return sent


def _sustained(exact: bool, published: int, wanted: float, drain: float, duration: float) -> bool:
    """Every event delivered, (nearly) all offered, and no backlog left: the last arrived soon after the end."""
    return exact and published >= 0.95 * wanted and drain <= max(0.1, SUSTAIN_DRAIN * duration)


async def fleet(ctx: Context) -> dict:
    loop = asyncio.get_running_loop()
    count = ctx.sizes.fleet_sessions
    sessions = [f"{ctx.prefix}-fleet-{i}" for i in range(count)]
    pubs = [ctx.publisher(k) for k in range(count)]
    group = ctx.group(latencies=True)
    try:
        await gather_bounded(p.connect() for p in pubs)
        subs = [group.subscribe(s) for s in sessions]
        primes = (p.publish(s, 0) for p, s in zip(pubs, sessions, strict=True))
        await _attach(group, primes, ctx.sizes.drain_timeout)
        await quiesce(ctx.server)
        del group.latencies[:]
        meter = ctx.meter()
        start = loop.time()
        until = start + ctx.sizes.fleet_seconds
        sent = await _paced(pubs, sessions, FLEET_RATE, start, until)
        for sub, last in zip(subs, sent, strict=True):
            sub.finish_at(last)
        drained = await group.wait_settled(ctx.sizes.drain_timeout)
        drain = loop.time() - until
        published, wanted = sum(sent), count * FLEET_RATE * ctx.sizes.fleet_seconds
        m = meter.stop(group.received - count, published=published)
        exact = drained and group.exact
        return {"sessions": count, "published_per_s": published / ctx.sizes.fleet_seconds,
                "wanted_per_s": wanted / ctx.sizes.fleet_seconds, "drain_s": drain,
                "sustained": _sustained(exact, published, wanted, drain, ctx.sizes.fleet_seconds), "exact": exact,
                **percentiles(group.latencies), **m}
    finally:
        group.close()
        for pub in pubs:
            pub.close()


async def latency(ctx: Context) -> dict:
    loop = asyncio.get_running_loop()
    session = f"{ctx.prefix}-latency"
    pub = await ctx.publisher().connect()
    group = ctx.group(latencies=True)
    try:
        for _ in range(LATENCY_SUBSCRIBERS):
            group.subscribe(session)
        await _attach(group, [pub.publish(session, 0)], ctx.sizes.drain_timeout)
        await quiesce(ctx.server)
        del group.latencies[:]
        meter = ctx.meter()
        start = loop.time()
        until = start + ctx.sizes.latency_seconds
        published, = await _paced([pub], [session], LATENCY_RATE, start, until)
        group.finish_at(published)
        drained = await group.wait_settled(ctx.sizes.drain_timeout)
        drain = loop.time() - until
        m = meter.stop(group.received - LATENCY_SUBSCRIBERS, published=published)
        wanted = LATENCY_RATE * ctx.sizes.latency_seconds
        exact = drained and group.exact
        return {"subscribers": LATENCY_SUBSCRIBERS, "published_per_s": published / ctx.sizes.latency_seconds,
                "drain_s": drain, "exact": exact,
                "sustained": _sustained(exact, published, wanted, drain, ctx.sizes.latency_seconds),
                **percentiles(group.latencies), **m}
    finally:
        group.close()
        pub.close()


# -- replay and idle ---------------------------------------------------------------------


async def replay(ctx: Context) -> dict:
    session = f"{ctx.prefix}-replay"
    total = ctx.sizes.replay_events
    pub = await ctx.publisher().connect()
    try:
        if ctx.server.target.batch:
            for first in range(0, total, 1000):
                await pub.post(pub.request(session, pub.batch_body(first, min(1000, total - first))))
        else:  # one event per request, pipelined: order is kept, round trips are not waited for
            for first in range(0, total, 100):
                await pub.pipeline([pub.request(session, pub.event_body(n))
                                    for n in range(first, min(first + 100, total))])
    finally:
        pub.close()
    probe = ctx.group()
    first = probe.subscribe(session)
    await first.open()
    first.finish_at(0)
    got_first = await probe.wait_settled(ctx.sizes.drain_timeout)
    probe.close()
    if not got_first or first.first_id is None:
        raise RuntimeError(f"could not read the first event's id ({probe.failures[:1]})")
    await quiesce(ctx.server)  # let the server finish with the probe
    group = ctx.group()
    sub = group.subscribe(session, first_n=1)
    sub.finish_at(total - 1)
    meter = ctx.meter()
    try:
        await sub.open(first.first_id)
        finished = await group.wait_settled(ctx.sizes.replay_timeout)
        m = meter.stop(sub.received)
    finally:
        group.close()
    return {"stored": total, "received": sub.received, "finished": finished and not group.failures,
            "exact": finished and group.exact, **m}


DELTA = "tok "  # about 4 bytes, as a token of a model's answer
DELTAS_PER_POST = 100  # as the Python client batches them


async def messages(ctx: Context) -> dict:
    """A session of ``answers`` × ``deltas`` tokens, written twice: as messages (``message.start``, a
    ``message.append`` per token, ``message.end``) and as plain ``token`` events, in POSTs of 100. Figures:
    the publish cost per delta of each form, and for a reader that joins at the end (``live=false`` from
    the start), the bytes on the wire and the seconds to catch up: compacted messages vs plain events."""
    answers, deltas = ctx.sizes.answers, ctx.sizes.deltas
    out: dict = {"deltas": answers * deltas}
    for form in ("messages", "plain"):
        session = f"{ctx.prefix}-{form}"
        bodies = []
        for a in range(answers):
            mid = b'{"message":"a%d"' % a
            items = [b'{"event":"message.start","data":%s,"type":"answer"}}' % mid] if form == "messages" else []
            for _ in range(deltas):
                items.append(b'{"event":"message.append","data":%s,"text":"%s"}}' % (mid, DELTA.encode())
                             if form == "messages" else b'{"event":"token","data":{"text":"%s"}}' % DELTA.encode())
            if form == "messages":
                items.append(b'{"event":"message.end","data":%s}}' % mid)
            bodies += [b"[" + b",".join(items[i:i + DELTAS_PER_POST]) + b"]"
                       for i in range(0, len(items), DELTAS_PER_POST)]
        pub = await ctx.publisher().connect()
        try:
            meter = ctx.meter()
            for body in bodies:
                await pub.post(pub.request(session, body))
            m = meter.stop(answers * deltas)
        finally:
            pub.close()
        out[f"{form}_publish_us_per_delta"] = m["seconds"] / (answers * deltas) * 1e6
        if "server_cpu_us_per_event" in m:
            out[f"{form}_publish_cpu_us_per_delta"] = m["server_cpu_us_per_event"]
        await quiesce(ctx.server)
        meter = ctx.meter()
        wire, events = await _catch_up(Endpoint(ctx.server.nodes[0].stream_url), session)
        m = meter.stop(events)
        out[f"{form}_catch_up_bytes"] = wire
        out[f"{form}_catch_up_events"] = events
        out[f"{form}_catch_up_s"] = m["seconds"]
        if "server_cpu_s" in m:
            out[f"{form}_catch_up_cpu_s"] = m["server_cpu_s"]
        out["client_busy"] = m["client_busy"]
    out["catch_up_bytes_ratio"] = out["plain_catch_up_bytes"] / max(1, out["messages_catch_up_bytes"])
    out["exact"] = out["messages_catch_up_events"] == answers and out["plain_catch_up_events"] == answers * deltas
    return out


async def _catch_up(endpoint: Endpoint, session: str) -> tuple[int, int]:
    """Read ``session`` from its start to its end (``live=false``) on one connection: bytes on the wire
    (headers and chunk framing included), and the events (``id:`` lines) received."""
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    path = endpoint.path(session)
    writer.write(b"GET %s%slive=false HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                 % (path, b"&" if b"?" in path else b"?", endpoint.host_header))
    wire = events = 0
    tail = b""
    try:
        while chunk := await reader.read(1 << 16):
            wire += len(chunk)
            events += (tail + chunk).count(b"\nid: ")
            tail = chunk[-4:]  # a match across two reads, never one counted twice
    finally:
        writer.close()
    return wire, events


SOAK_SECONDS = 5.0  # the gateway the bench starts sends a heartbeat every second


async def idle(ctx: Context) -> dict:
    session = f"{ctx.prefix}-idle"
    pub = await ctx.publisher().connect()
    try:
        await pub.publish(session, 0)
    finally:
        pub.close()
    gc.collect()
    await asyncio.sleep(0.5)
    before = ctx.server.rss_kb()
    group = ctx.group()
    try:
        for _ in range(ctx.sizes.idle_streams):
            group.subscribe(session)
        meter = ctx.meter()
        await group.open_all()
        all_open = await group.wait_opened(60)
        m = meter.stop(group.opened)  # seconds to open them all, and server CPU per stream opened
        await asyncio.sleep(1.0)  # let the server settle
        after = ctx.server.rss_kb()
        out = {"streams": group.opened, "all_open": all_open and not group.failures, **m}
        if before is not None and group.opened:
            out["rss_kb_per_stream"] = (after - before) / group.opened
            out["server_rss_mb"] = after / 1024
        cpu0 = ctx.server.cpu_seconds()
        if cpu0 is not None and group.opened:  # the soak: idle streams kept open by heartbeats alone
            await asyncio.sleep(SOAK_SECONDS)
            out["idle_cpu_us_per_stream_second"] = (ctx.server.cpu_seconds() - cpu0) / SOAK_SECONDS \
                / group.opened * 1e6
        return out
    finally:
        group.close()


async def heartbeat(ctx: Context) -> dict:
    """Quiet streams kept open by heartbeats alone (the gateway the bench starts sends one every second):
    server CPU per stream per second, and the heartbeats (SSE comments) each stream received per second."""
    session = f"{ctx.prefix}-heartbeat"
    pub = await ctx.publisher().connect()
    try:
        await pub.publish(session, 0)
    finally:
        pub.close()
    group = ctx.group(comments=True)
    try:
        for _ in range(ctx.sizes.idle_streams):
            group.subscribe(session)
        await group.open_all()
        all_open = await group.wait_opened(60)
        await asyncio.sleep(1.5)  # let the server finish opening them; the clock starts between two heartbeats
        comments0 = group.comments
        meter = ctx.meter()
        await asyncio.sleep(ctx.sizes.heartbeat_seconds)
        m = meter.stop()
        out = {"streams": group.opened, "all_open": all_open and not group.failures, **m}
        if group.opened:
            out["heartbeats_per_stream_second"] = (group.comments - comments0) / m["seconds"] / group.opened
            if "server_cpu_s" in m:
                out["cpu_us_per_stream_second"] = m["server_cpu_s"] / m["seconds"] / group.opened * 1e6
        return out
    finally:
        group.close()


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Context], Awaitable[dict]]
    needs_batch: bool = False
    needs_messages: bool = False


SCENARIOS = {s.name: s for s in [
    Scenario("ingest-1", ingest_1),
    Scenario("ingest-32", ingest_32),
    Scenario("ingest-batch", ingest_batch, needs_batch=True),
    Scenario("ingest-ndjson", ingest_ndjson, needs_batch=True),
    Scenario("fanout-100", fanout_100),
    Scenario("fanout-1000", fanout_1000),
    Scenario("fleet", fleet),
    Scenario("latency", latency),
    Scenario("replay", replay),
    Scenario("messages", messages, needs_messages=True),
    Scenario("idle", idle),
    Scenario("heartbeat", heartbeat),
]}

"""What writing SSE frames costs: sse-starlette's EventSourceResponse vs the gateway's own EventStream.

One process, no sockets: N streams of one session are served as ASGI apps with a
send() that only counts bytes, M events are published, and the process CPU time
is divided by the events delivered (N x M).

* ``starlette``: sse-starlette's ``EventSourceResponse`` fed by an asyncio.Queue
  per stream (the usual way, as in sse_gateway/bench/_baseline.py): each event is
  encoded for every stream and sent in a write of its own.
* ``gateway``: the gateway's ``EventStream`` on its hub and the memory log: each
  event is encoded once into the hub's window, every stream copies the frames
  after its cursor; ``--coalesce-ms`` as the gateway's option.

``--lockstep`` publishes the next event only once every stream has written the
previous one (one write per event for both); without it the publisher appends
back to back, yielding to the event loop after each event.

    .venv/bin/python scripts/sse_starlette_cost.py --streams 1000 --events 200 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import orjson
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from sse_gateway.hub import Hub
from sse_gateway.log.memory import MemoryLog
from sse_gateway.models import NewEvent, StoredEvent
from sse_gateway.sse import encode_event
from sse_gateway.stream import EventStream

SCOPE = {"type": "http", "method": "GET", "path": "/stream", "headers": [], "query_string": b""}
DATA = orjson.dumps({"text": "x" * 80}).decode()  # ~100-byte events, as in the fan-out bench


class Counter:
    def __init__(self, streams: int) -> None:
        self.writes = 0
        self.bytes = 0
        self.frames = [0] * streams
        self.changed = asyncio.Event()


def sender(counter: Counter, i: int):
    async def send(message) -> None:
        body = message.get("body")
        if body:
            counter.writes += 1
            counter.bytes += len(body)
            counter.frames[i] += body.count(b"data:")
            counter.changed.set()
    return send


async def never_disconnect():
    await asyncio.Event().wait()


async def wait_all(counter: Counter, at_least: int) -> None:
    while min(counter.frames) < at_least:
        counter.changed.clear()
        await counter.changed.wait()


async def run_starlette(n: int, m: int, lockstep: bool) -> tuple[float, int]:
    counter = Counter(n)
    queues = [asyncio.Queue() for _ in range(n)]

    def serve(i: int):
        async def gen():
            q = queues[i]
            while True:
                item = await q.get()
                if item is None:
                    return
                yield item
        return EventSourceResponse(gen(), ping=15)(SCOPE, never_disconnect, sender(counter, i))

    tasks = [asyncio.create_task(serve(i)) for i in range(n)]
    await asyncio.sleep(0.2)
    counter.writes = 0
    started = time.process_time()
    for k in range(1, m + 1):
        item = {"id": f"{k}:abcdef", "event": "token", "data": DATA}
        for q in queues:
            q.put_nowait(item)
        if lockstep:
            await wait_all(counter, k)
        else:
            await asyncio.sleep(0)
    await wait_all(counter, m)
    cpu = time.process_time() - started
    for q in queues:
        q.put_nowait(None)
    await asyncio.gather(*tasks)
    return cpu, counter.writes


async def run_gateway(n: int, m: int, lockstep: bool, coalesce_ms: float) -> tuple[float, int]:
    counter = Counter(n)
    log = MemoryLog()
    await log.open()
    await log.create_session("s")
    hub = Hub(log, coalesce=coalesce_ms / 1000)
    streams = [EventStream(hub, "s", 0, None, prelude=b"retry: 1000\n\n", live=True, heartbeat=60)
               for _ in range(n)]
    tasks = [asyncio.create_task(s(SCOPE, never_disconnect, sender(counter, i))) for i, s in enumerate(streams)]
    await asyncio.sleep(0.2)
    counter.writes = 0
    started = time.process_time()
    for k in range(1, m + 1):
        await log.append("s", [NewEvent("token", DATA)])
        if lockstep:
            await wait_all(counter, k)
        else:
            await asyncio.sleep(0)
    await wait_all(counter, m)
    cpu = time.process_time() - started
    await log.complete("s")
    await asyncio.gather(*tasks)
    return cpu, counter.writes


def encode_only(m: int) -> tuple[float, float]:
    """µs to encode one event: sse-starlette's ServerSentEvent vs the gateway's encode_event."""
    ev = StoredEvent(1, "token", DATA, True, 0)
    started = time.perf_counter()
    for k in range(m):
        ServerSentEvent(id=f"{k}:abcdef", event="token", data=DATA).encode()
    star = time.perf_counter() - started
    started = time.perf_counter()
    for k in range(m):
        ev.id = k
        encode_event(ev, "abcdef")
    gw = time.perf_counter() - started
    return star / m * 1e6, gw / m * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--coalesce-ms", type=float, default=5.0)
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    n, m = args.streams, args.events
    cases = {
        "encode one event, sse-starlette ServerSentEvent (µs)": None,
        "lockstep, sse-starlette EventSourceResponse": lambda: run_starlette(n, m, True),
        "lockstep, gateway EventStream, coalesce 0": lambda: run_gateway(n, m, True, 0),
        "back to back, sse-starlette EventSourceResponse": lambda: run_starlette(n, m, False),
        "back to back, gateway EventStream, coalesce 0": lambda: run_gateway(n, m, False, 0),
        f"back to back, gateway EventStream, coalesce {args.coalesce_ms:g}":
            lambda: run_gateway(n, m, False, args.coalesce_ms),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    enc = []
    for _ in range(args.runs):
        enc.append(encode_only(100_000))
        for name, case in cases.items():
            if case is None:
                continue
            cpu, writes = asyncio.run(case())
            results[name].append((cpu / (n * m) * 1e6, n * m / writes))
    print(f"{n} streams x {m} events, median of {args.runs} run(s); CPU µs per delivered event, events per write")
    print(f"  encode one event: sse-starlette {statistics.median(e[0] for e in enc):.2f} µs, "
          f"gateway encode_event {statistics.median(e[1] for e in enc):.2f} µs")
    for name, rows in results.items():
        if rows:
            print(f"  {name:55s} {statistics.median(r[0] for r in rows):7.2f} µs   "
                  f"{statistics.median(r[1] for r in rows):6.1f} ev/write   (runs: "
                  + ", ".join(f"{r[0]:.2f}" for r in rows) + ")")


if __name__ == "__main__":
    main()

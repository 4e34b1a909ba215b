"""Prometheus metrics.

The hot path only adds to plain attributes of ``Stats``; a custom collector
turns them into Prometheus families when ``/metrics`` is scraped, so
counting costs nothing measurable per event. No label carries a session id:
label values come from small fixed sets (outcome, route), so cardinality
stays bounded whatever the traffic.
"""

from __future__ import annotations

import asyncio
import bisect
import re
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .log.base import LogObserver
from .models import END_EVENT, OUTCOMES, Session, StoredEvent

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """A fixed-bucket histogram that costs one loop over the bounds per observation."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple = SECONDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        cumulative, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            cumulative += count
            out.append((bound, cumulative))
        return out


@dataclass
class Stats(LogObserver):
    """The gateway's counters; also the log's observer of group commits (``committed``)."""

    published: int = 0            # events appended
    publish_duplicates: int = 0   # idempotent replays: nothing appended
    publish_rejected: int = 0     # publish requests refused with an error
    delivered: int = 0            # events written to streams
    stream_writes: int = 0        # writes that carried them (several events per write when coalesced)
    replayed: int = 0             # of which a stream read back from the log on its own
    window_fills: int = 0         # shared reads that extended a session's window (events appended elsewhere)
    gaps: int = 0
    resets: int = 0
    heartbeats: int = 0
    slow_consumer_disconnects: int = 0
    auth_failures: int = 0
    streams_opened: int = 0
    store_errors: int = 0
    webhooks_succeeded: int = 0   # webhooks a receiver accepted (2xx)
    webhooks_retried: int = 0     # attempts that failed and are tried again
    webhooks_failed: int = 0      # webhooks given up
    loop_lag: float = 0.0
    append_seconds: Histogram = field(default_factory=Histogram)
    commit_seconds: Histogram = field(default_factory=Histogram)
    commit_batch: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZES))
    requests: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # (route, status class)
    runs_ended: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))  # by outcome
    runs_expired: int = 0         # of which the gateway ended (lease or cancel grace ran out)

    def appended(self, session: str, events: list[StoredEvent], row: Session) -> None:
        if events[-1].event == END_EVENT:  # the end is always the last event of its write
            self.runs_ended[row.outcome or "completed"] += 1

    def committed(self, operations: int, seconds: float) -> None:
        self.commit_batch.observe(operations)
        self.commit_seconds.observe(seconds)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        key = (route, f"{status // 100}xx")
        hist = self.requests.get(key)
        if hist is None:
            hist = self.requests[key] = Histogram()
        hist.observe(seconds)


_COUNTERS = {
    "delivered": "Events written to SSE streams",
    "stream_writes": "Writes of events to SSE streams; delivered / stream_writes is the events one write carries "
                     "(see --coalesce-ms)",
    "replayed": "Events a stream read back from the log on its own (replay from behind the window)",
    "window_fills": "Shared log reads of events appended elsewhere, one for all of a session's streams on this node",
    "gaps": "gateway.gap notices sent (history already trimmed)",
    "resets": "gateway.reset notices sent (cursor from another epoch or the future)",
    "heartbeats": "Heartbeat comments sent",
    "slow_consumer_disconnects": "Streams cut because the client accepted nothing for --send-timeout",
    "auth_failures": "Requests refused for missing or bad credentials",
    "streams_opened": "SSE streams opened",
    "store_errors": "Writes the store failed",
    "runs_expired": "Runs this gateway ended itself: the agent's lease or a cancel's grace ran out",
}

_ROUTE = re.compile(r"^/v1/sessions(?:/[^/]+(?:/(events|stream|complete|lease|ack|state|trim|tokens|input))?)?$")


def route_of(method: str, path: str) -> str:
    """A small fixed label for a request path (never the session id)."""
    m = _ROUTE.match(path)
    if m is None:
        return path if path in ("/healthz", "/readyz", "/metrics", "/") else "other"
    action = m.group(1)
    if action == "events":
        return "publish" if method == "POST" else "history"
    return action or ("session" if path.count("/") == 3 else "sessions")


class _Collector:
    def __init__(self, gateway) -> None:
        self.gw = gateway

    def collect(self):
        st: Stats = self.gw.stats
        pub = CounterMetricFamily("sse_gateway_events_published", "Publish outcomes per event",
                                  labels=["outcome"])
        pub.add_metric(["appended"], st.published)
        pub.add_metric(["duplicate"], st.publish_duplicates)
        pub.add_metric(["rejected"], st.publish_rejected)
        yield pub
        ended = CounterMetricFamily("sse_gateway_runs_ended", "Runs that ended on this gateway, by outcome",
                                    labels=["outcome"])
        for outcome, count in st.runs_ended.items():
            ended.add_metric([outcome], count)
        yield ended
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"sse_gateway_{name}", doc, value=getattr(st, name))
        yield CounterMetricFamily("sse_gateway_store_wakeups", "Wake-ups heard from other processes on the same "
                                  "SQLite file, each telling what one of their commits changed",
                                  value=self.gw.log.wakeups_heard)
        yield CounterMetricFamily("sse_gateway_store_rereads", "Re-reads of every watched session's row because "
                                  "another process committed something no wake-up told of",
                                  value=self.gw.log.watched_rereads)
        hub = self.gw.hub
        yield GaugeMetricFamily("sse_gateway_open_streams", "SSE streams open now",
                                value=hub.slots.total)
        yield GaugeMetricFamily("sse_gateway_watched_sessions", "Sessions with at least one stream attached",
                                value=len(hub.channels))
        yield GaugeMetricFamily("sse_gateway_asyncio_tasks", "asyncio tasks alive in the gateway's loop",
                                value=len(asyncio.all_tasks(self.gw.loop)))
        yield GaugeMetricFamily("sse_gateway_event_loop_lag_seconds", "Event-loop lag, measured every second",
                                value=st.loop_lag)
        yield GaugeMetricFamily("sse_gateway_draining", "1 while the gateway drains before exiting",
                                value=int(self.gw.draining))
        hooks = CounterMetricFamily("sse_gateway_webhook_deliveries", "Webhooks accepted by their receiver "
                                    "(succeeded), attempts that failed and are tried again (retried), webhooks "
                                    "given up (failed)", labels=["outcome"])
        for outcome in ("succeeded", "retried", "failed"):
            hooks.add_metric([outcome], getattr(st, "webhooks_" + outcome))
        yield hooks
        yield GaugeMetricFamily("sse_gateway_webhook_outbox_pending", "Webhooks in the outbox, not yet delivered "
                                "or given up", value=self.gw.webhooks.pending if self.gw.webhooks else 0)
        for name, hist, doc in (
                ("sse_gateway_append_seconds", st.append_seconds, "Publish: from append call to committed"),
                ("sse_gateway_store_commit_seconds", st.commit_seconds, "One group commit of the store"),
                ("sse_gateway_store_commit_operations", st.commit_batch, "Operations carried by one group commit")):
            yield HistogramMetricFamily(name, doc, buckets=hist.buckets(), sum_value=hist.total)
        req = HistogramMetricFamily("sse_gateway_request_seconds", "HTTP request latency (streams: until the "
                                    "response starts)", labels=["route", "status"])
        for (route, status), hist in sorted(st.requests.items()):
            req.add_metric([route, status], hist.buckets(), hist.total)
        yield req


def make_registry(gateway) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(gateway))
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_open_fds, CPU seconds
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


class RequestTimer:
    """Pure ASGI middleware: time each request until its response starts (never touches a body)."""

    def __init__(self, app, stats_of) -> None:
        self.app = app
        self.stats_of = stats_of

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"].endswith("/stream"):
            return await self.app(scope, receive, send)  # streams stay off this path: counted elsewhere
        start = time.perf_counter()

        async def timed_send(message) -> None:
            if message["type"] == "http.response.start":
                stats = self.stats_of()
                if stats is not None:
                    stats.observe_request(route_of(scope["method"], scope["path"]), message["status"],
                                          time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, timed_send)


async def measure_loop_lag(stats: Stats, every: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(every)
        stats.loop_lag = max(0.0, loop.time() - start - every)

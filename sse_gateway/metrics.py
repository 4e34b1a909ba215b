"""Prometheus metrics.

The hot path only adds to plain integer attributes of ``Stats``; a custom
collector turns them into Prometheus families when ``/metrics`` is scraped,
so counting costs nothing measurable per event. No label carries a session
id: cardinality stays bounded whatever the traffic.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """A tiny fixed-bucket histogram (seconds)."""

    __slots__ = ("counts", "total", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        i = 0
        while i < len(_BUCKETS) and seconds > _BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.total += seconds
        self.n += 1

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, _BUCKETS), "+Inf"), self.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.total)


@dataclass
class Stats:
    published: int = 0            # events appended
    publish_duplicates: int = 0   # idempotent replays, nothing appended
    publish_rejected: int = 0     # publish requests answered with an error
    delivered: int = 0            # events written to streams
    replayed: int = 0             # of which read back from the log
    gaps: int = 0
    resets: int = 0
    heartbeats: int = 0
    slow_consumer_disconnects: int = 0
    auth_failures: int = 0
    streams_opened: int = 0
    commit_batches: int = 0
    commit_ops: int = 0
    store_errors: int = 0
    loop_lag: float = 0.0
    append_latency: Histogram = field(default_factory=Histogram)


_COUNTERS = {
    "published": "Events appended to the log",
    "publish_duplicates": "Idempotent publish retries that appended nothing",
    "publish_rejected": "Publish requests refused with an error",
    "delivered": "Events written to SSE streams",
    "replayed": "Events read back from the log for a stream (replay or catch-up)",
    "gaps": "gateway.gap notices sent",
    "resets": "gateway.reset notices sent",
    "heartbeats": "Heartbeat comments sent",
    "slow_consumer_disconnects": "Streams cut because the client did not keep up",
    "auth_failures": "Requests refused for missing or bad credentials",
    "streams_opened": "SSE streams opened",
    "commit_batches": "Group commits of the store",
    "commit_ops": "Write operations carried by group commits",
    "store_errors": "Writes the store failed",
}


class _Collector:
    def __init__(self, app_state) -> None:
        self.state = app_state

    def collect(self):
        st: Stats = self.state.stats
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"sse_gateway_{name}", doc, value=getattr(st, name))
        hub = self.state.hub
        yield GaugeMetricFamily("sse_gateway_open_streams", "SSE streams attached now",
                                value=sum(ch.subscribers for ch in hub.channels.values()))
        yield GaugeMetricFamily("sse_gateway_watched_sessions", "Sessions with at least one stream",
                                value=len(hub.channels))
        yield GaugeMetricFamily("sse_gateway_event_loop_lag_seconds", "Last measured event-loop lag",
                                value=st.loop_lag)
        yield st.append_latency.family("sse_gateway_append_seconds", "Time from publish to commit")


def make_registry(app_state) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(app_state))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


async def measure_loop_lag(stats: Stats, every: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(every)
        stats.loop_lag = max(0.0, loop.time() - start - every)

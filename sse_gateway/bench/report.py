"""Medians over runs, the table, and the machine the figures come from."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from .scenarios import Sizes

#: (scenario, figure, label, kind) for each line of the table, in order
ROWS = [
    ("ingest-1", "events_per_s", "ingest, 1 publisher, 1 event/POST: events/s", "rate"),
    ("ingest-32", "events_per_s", "ingest, 32 publishers, 1 event/POST: events/s", "rate"),
    ("ingest-32", "server_cpu_us_per_event", "ingest-32: server CPU µs/event (all processes)", "us"),
    ("ingest-32", "redis_cpu_us_per_published", "ingest-32: Redis CPU µs/event", "us"),
    ("ingest-batch", "events_per_s", "ingest, 8 publishers, batches of 100: events/s", "rate"),
    ("ingest-batch", "redis_cpu_us_per_published", "ingest-batch: Redis CPU µs/event", "us"),
    ("ingest-ndjson", "events_per_s", "ingest, 8 NDJSON streams: events/s", "rate"),
    ("fanout-100", "cpu_us_per_delivered", "fan-out, 100 subscribers: server CPU µs/delivered", "us"),
    ("fanout-100", "delivered_per_s", "fan-out, 100 subscribers: delivered/s", "rate"),
    ("fanout-100", "exact", "fan-out, 100 subscribers: exact", "bool"),
    ("fanout-1000", "cpu_us_per_delivered", "fan-out, 1,000 subscribers: server CPU µs/delivered", "us"),
    ("fanout-1000", "delivered_per_s", "fan-out, 1,000 subscribers: delivered/s", "rate"),
    ("fanout-1000", "exact", "fan-out, 1,000 subscribers: exact", "bool"),
    ("fanout-1000", "redis_cpu_share", "fan-out, 1,000 subscribers: Redis CPU, share of one core", "share"),
    ("fleet", "sustained", "fleet, {fleet_sessions:,} sessions × 20 ev/s: sustained", "bool"),
    ("fleet", "published_per_s", "fleet: published events/s", "rate"),
    ("fleet", "p50_ms", "fleet: p50 publish→receive ms", "ms"),
    ("fleet", "p99_ms", "fleet: p99 publish→receive ms", "ms"),
    ("fleet", "drain_s", "fleet: backlog after the last publish, s", "s"),
    ("fleet", "redis_cpu_us_per_published", "fleet: Redis CPU µs/published", "us"),
    ("fleet", "redis_cpu_share", "fleet: Redis CPU, share of one core", "share"),
    ("latency", "sustained", "latency, 1k ev/s × 100 subscribers: sustained", "bool"),
    ("latency", "p50_ms", "latency: p50 ms", "ms"),
    ("latency", "p99_ms", "latency: p99 ms", "ms"),
    ("latency", "max_ms", "latency: max ms", "ms"),
    ("latency", "drain_s", "latency: backlog after the last publish, s", "s"),
    ("replay", "seconds", "replay of {replay_events:,} events: seconds", "s"),
    ("replay", "exact", "replay: exact", "bool"),
    ("messages", "messages_catch_up_bytes", "messages, {answers} answers × {deltas:,} deltas: bytes to catch up",
     "count"),
    ("messages", "plain_catch_up_bytes", "messages: the same as plain events: bytes to catch up", "count"),
    ("messages", "messages_catch_up_s", "messages: seconds to catch up", "s"),
    ("messages", "plain_catch_up_s", "messages: as plain events: seconds to catch up", "s"),
    ("messages", "messages_publish_cpu_us_per_delta", "messages: publish, server CPU µs/delta", "us"),
    ("messages", "plain_publish_cpu_us_per_delta", "messages: as plain events: publish, server CPU µs/delta", "us"),
    ("messages", "exact", "messages: each answer once, whole", "bool"),
    ("idle", "rss_kb_per_stream", "idle, {idle_streams:,} streams: server RSS KB/stream", "kb"),
    ("idle", "streams", "idle: streams open (within 60 s)", "count"),
    ("idle", "seconds", "idle: seconds to open them", "s"),
    ("idle", "idle_cpu_us_per_stream_second", "idle: server CPU µs per stream per second (1 s heartbeat)", "us"),
    ("heartbeat", "cpu_us_per_stream_second",
     "heartbeat, {idle_streams:,} quiet streams: server CPU µs per stream per second", "us"),
    ("heartbeat", "heartbeats_per_stream_second", "heartbeat: heartbeats received per stream per second", "us"),
]
BUSY = 0.9  # load generator CPU share from which a figure is marked client-bound


def summarize(runs: list[dict | None]) -> dict | None:
    """Median of each figure over the runs that worked; None if the target cannot run the scenario."""
    if all(r is None for r in runs):
        return None
    good = [r for r in runs if r is not None and "error" not in r]
    errors = [r["error"] for r in runs if r is not None and "error" in r]
    median: dict = {}
    for key in dict.fromkeys(k for r in good for k in r):
        values = [r[key] for r in good if r.get(key) is not None]
        if not values:
            continue
        if isinstance(values[0], bool):
            median[key] = all(values)
            median[key + "_runs"] = f"{sum(values)}/{len(values)}"
        elif isinstance(values[0], (int, float)):
            median[key] = statistics.median(values)
    out = {"median": median, "runs": runs}
    if errors:
        out["errors"] = errors
    return out


def cell(summary: dict | None, scenario_figure: str, kind: str) -> str:
    if summary is None:
        return "n/a"
    med = summary["median"]
    if scenario_figure not in med:
        return "error" if summary.get("errors") else "-"
    value = med[scenario_figure]
    if kind == "bool":
        text = "yes" if value else "no"
        runs = med.get(scenario_figure + "_runs", "")
        if not value and runs and not runs.startswith("0/"):
            text += f" ({runs})"
        return text
    if kind == "count":
        text = f"{value:,.0f}"
    elif kind == "rate":
        text = f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"
    elif kind == "share":
        text = f"{value:.0%}"
    elif kind == "s":
        text = f"{value:.3f}" if value < 10 else f"{value:.1f}"
    else:
        text = f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return text + "*" if med.get("client_busy", 0) >= BUSY else text


def _shows(summary: dict | None, figure: str) -> bool:
    """A row is shown if some target has its figure, or failed the scenario (the row says so)."""
    return summary is not None and (figure in summary["median"] or bool(summary.get("errors")))


def table(results: dict, sizes: Sizes, header: str) -> str:
    targets = list(results)
    rows = [(label.format(**vars(sizes)), [cell(results[t].get(s), fig, kind) for t in targets])
            for s, fig, label, kind in ROWS if any(_shows(results[t].get(s), fig) for t in targets)]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(t), 8) for t in targets]
    lines = [header, "", " " * width + "".join(f"  {t:>{w}}" for t, w in zip(targets, cols, strict=True))]
    for label, cells in rows:
        lines.append(f"{label:<{width}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, cols, strict=True)))
    lines.append("")
    lines.append(f"* the load generator was ≥{BUSY:.0%} busy: the figure is (partly) the client's limit; "
                 "compare with the floor.")
    for t in targets:
        for s, summary in results[t].items():
            for err in (summary or {}).get("errors", []):
                lines.append(f"! {t} {s}: {err}")
    return "\n".join(lines)


def headline(scenario: str, figures: dict | None) -> str:
    """A short line of progress for one scenario run."""
    if figures is None:
        return "n/a"
    if "error" in figures:
        return f"error: {figures['error']}"
    parts = []
    for s, fig, _, kind in ROWS:
        if s == scenario and figures.get(fig) is not None:
            parts.append(f"{fig}={cell({'median': {fig: figures[fig]}}, fig, kind)}")
    parts.append(f"client {figures.get('client_busy', 0):.0%} busy")
    return "  ".join(parts)


def machine(server_cpu: int | None, client_cpu: int | None) -> dict:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(), "python": sys.version.split()[0],
            "server_cpu": server_cpu, "client_cpu": client_cpu}
    for module in ("uvloop", "uvicorn", "fastapi", "sse_starlette", "aiosqlite"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            info[module] = None
    try:
        info["nchan"] = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-nchan"],
                                       capture_output=True, text=True, timeout=5).stdout or None
    except (OSError, subprocess.TimeoutExpired):
        info["nchan"] = None
    return info

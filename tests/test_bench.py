"""``sse-gateway bench`` as a product feature: its JSON, its exactness checks, its SSE parser, the baseline.

Nothing here is timed: the figures depend on the machine. What is checked
is that the bench runs against each kind of server, reports every figure
it promises, and that exactness (every event, in order, once) holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest

from conftest import ROOT, free_port, require_binary, wait_for_port
from sse_gateway.bench.profile import summarize
from sse_gateway.bench.wire import Endpoint, Group
from util import read_stream

pytestmark = pytest.mark.timeout(120)


def bench(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "sse_gateway", "bench", "--quick", "--runs", "1", "--no-pin", "--json", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def check_exact(doc: dict, target: str) -> None:
    results = doc["results"][target]
    fanout = results["fanout-100"]["median"]
    assert fanout["exact"] is True, results["fanout-100"]
    assert fanout["delivered"] > 0 and fanout["delivered_per_s"] > 0
    replay = results["replay"]["median"]
    assert replay["exact"] is True and replay["finished"] is True, results["replay"]
    assert replay["received"] == doc["sizes"]["replay_events"] - 1  # everything after the first event


@pytest.mark.system  # runs the benchmark or its baseline server
def test_quick_bench_against_gateway_baseline_and_floor():
    doc = bench("--target", "gateway,baseline,floor", "--scenarios", "ingest-1,ingest-batch,fanout-100,replay")
    assert doc["runs"] == 1 and doc["quick"] is True
    assert set(doc["results"]) == {"gateway", "baseline", "floor"}
    assert {"cpu", "cpus", "python"} <= set(doc["machine"])
    for target in ("gateway", "baseline", "floor"):
        results = doc["results"][target]
        assert set(results) == {"ingest-1", "ingest-batch", "fanout-100", "replay"}
        assert all("errors" not in (r or {}) for r in results.values()), results
        ingest = results["ingest-1"]["median"]
        assert ingest["events_per_s"] > 0 and ingest["server_cpu_us_per_event"] > 0
        assert 0 < ingest["client_busy"] <= 1.5
        assert results["fanout-100"]["median"]["cpu_us_per_delivered"] > 0
        assert len(results["replay"]["runs"]) == 1
        check_exact(doc, target)
    assert doc["results"]["baseline"]["ingest-batch"] is None  # the baseline takes one event per request
    assert doc["results"]["gateway"]["ingest-batch"]["median"]["events_per_s"] > 0


@pytest.mark.system  # runs the benchmark or its baseline server
def test_quick_bench_against_nchan():
    require_binary("nginx")
    doc = bench("--target", "nchan", "--scenarios", "fanout-100,replay")
    check_exact(doc, "nchan")


@pytest.mark.system  # runs the benchmark or its baseline server
def test_quick_bench_against_one_and_two_nodes_on_redis():
    """Two nodes: publishers on node 1, subscribers spread from node 2, events cross through Redis;
    Redis' own CPU is reported apart from the gateways'."""
    require_binary("redis-server")
    doc = bench("--target", "redis-1,redis-2", "--scenarios", "ingest-32,fanout-100,replay")
    for target in ("redis-1", "redis-2"):
        results = doc["results"][target]
        assert all("errors" not in (r or {}) for r in results.values()), results
        check_exact(doc, target)
        ingest = results["ingest-32"]["median"]
        assert ingest["events_per_s"] > 0
        # Redis' CPU is part of the server's (every process of the target), not all of it
        assert 0 < ingest["redis_cpu_s"] < ingest["server_cpu_s"]
        assert 0 < ingest["redis_cpu_us_per_published"] < ingest["server_cpu_us_per_event"]
        assert 0 <= results["fanout-100"]["median"]["redis_cpu_share"] < 1.5  # CPU time comes in 10 ms ticks


@pytest.mark.system  # runs the benchmark or its baseline server
def test_quick_bench_against_one_and_two_workers():
    """``gateway-2`` is ``serve --workers 2`` on one port: its subscribers and publishers land on both workers
    and everything stays exact; its CPU is every process's (the supervisor's and both workers')."""
    doc = bench("--target", "gateway,gateway-2", "--scenarios", "ingest-32,fanout-100,replay")
    for target in ("gateway", "gateway-2"):
        results = doc["results"][target]
        assert all("errors" not in (r or {}) for r in results.values()), results
        check_exact(doc, target)
        assert results["ingest-32"]["median"]["events_per_s"] > 0


@pytest.mark.system  # runs the benchmark or its baseline server
def test_quick_bench_drives_a_gateway_already_running(tmp_path):
    # Started here rather than by the ``gateway`` fixture: stopped the way the bench stops its own
    # servers (one SIGTERM, no drain), which is what this test is about.
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sse_gateway", "serve", "--port", str(port), "--db",
                                 str(tmp_path / "g.db"), "--drain-seconds", "0"], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc=proc)
        doc = bench("--url", f"http://127.0.0.1:{port}", "--scenarios", "ingest-1,fanout-100")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    results = doc["results"]["gateway"]
    assert results["ingest-1"]["median"]["events_per_s"] > 0
    fanout = results["fanout-100"]["median"]
    assert fanout["exact"] is True
    assert "cpu_us_per_delivered" not in fanout  # no --pid: the server's CPU is not known
    assert "Traceback" not in log_path.read_text(errors="replace")


@pytest.mark.system  # runs the benchmark or its baseline server
def test_quick_bench_messages_compares_compacted_and_plain_catch_up():
    doc = bench("--target", "gateway", "--scenarios", "messages")
    figures = doc["results"]["gateway"]["messages"]["median"]
    assert figures["exact"] is True  # each answer came once, whole; each plain token once
    assert figures["plain_catch_up_bytes"] > 5 * figures["messages_catch_up_bytes"]
    assert figures["messages_publish_cpu_us_per_delta"] > 0 and figures["plain_publish_cpu_us_per_delta"] > 0


@pytest.mark.system  # runs the benchmark or its baseline server
def test_quick_bench_heartbeat_reports_cpu_and_heartbeats_per_stream():
    doc = bench("--target", "gateway", "--scenarios", "heartbeat")
    figures = doc["results"]["gateway"]["heartbeat"]["median"]
    assert figures["all_open"] is True and figures["streams"] == doc["sizes"]["idle_streams"]
    assert figures["heartbeats_per_stream_second"] > 0 and figures["cpu_us_per_stream_second"] > 0


@pytest.mark.system  # runs the benchmark or its baseline server
def test_bench_refuses_unknown_names():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["--target", "nginx"], ["--target", "gateway-1"], ["--scenarios", "fanout-7"], ["--pid", "1"]):
        proc = subprocess.run([sys.executable, "-m", "sse_gateway", "bench", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "sse-gateway bench:" in proc.stderr, (args, proc.stderr)


# -- the subscriber's parser, without a server -------------------------------------------


def frames(ids: list[int], sep: bytes = b"\n") -> bytes:
    return b"".join(b"id: %d:ep%s" % (i, sep) + b'data: {"n":%d,"t":%d,"p":"x"}%s%s' % (i, 5, sep, sep)
                    for i in ids)


def chunked(body: bytes, size: int) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size))
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n" + out


def feed(raw: bytes, piece: int, **kw):
    group = Group([Endpoint("http://127.0.0.1:9/s/{session}")], **kw)
    sub = group.subscribe("s")
    for i in range(0, len(raw), piece):
        sub.data_received(raw[i:i + piece])
    return group, sub


@pytest.mark.parametrize("piece", [1, 7, 64, 100_000])
@pytest.mark.parametrize("sep", [b"\n", b"\r\n"])
def test_parser_reads_chunked_sse_split_anywhere(piece, sep):
    raw = chunked(b"retry: 1000\n\n: ping\n\n" + frames(list(range(0, 50)), sep), 37)
    group, sub = feed(raw, piece)
    assert group.opened == 1
    assert sub.received == 50 and sub.next_n == 50 and sub.exact
    assert sub.first_id == b"0:ep" and sub.last_id == b"49:ep"
    sub.finish_at(49)
    assert group.exact and group.settled == 1


@pytest.mark.parametrize("piece", [1, 2, 7, 100_000])
def test_parser_counts_comment_lines_split_anywhere(piece):
    body = b"retry: 1000\n\n: ping\n" + frames([0, 1]) + b": ping\n: ping\n" + frames([2]) + b": ping\n"
    group, sub = feed(chunked(body, 5), piece, comments=True)
    assert group.comments == 4
    assert sub.received == 3 and sub.exact


def test_parser_reads_a_raw_body_and_notices_a_missing_event():
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    group, sub = feed(head + frames([0, 1, 2, 4, 5]), 3)
    assert sub.received == 5 and sub.next_n == 6
    assert not sub.exact
    sub.finish_at(5)
    assert not group.exact


def test_parser_counts_a_refused_stream_as_a_failure():
    group, sub = feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 100)
    assert group.failures and group.settled == 1 and not group.exact


def test_profile_summary_attributes_samples_to_the_event_loop_thread():
    collapsed = "\n".join([
        "thread (1): MainThread;_run_module_as_main (<frozen runpy>:198);Runner.run (asyncio/runners.py:118);"
        "EventStream._pump (sse_gateway/stream.py:150) 6",
        "thread (1): MainThread;EventStream._send (sse_gateway/stream.py:120) 2",  # a coroutine's frames alone
        "thread (1): MainThread 2",
        "thread (9): Thread-1 (_connection_worker_thread);Thread.run (threading.py:975) 5",
    ])
    text = summarize(collapsed)
    assert "10 samples of the event-loop thread" in text
    assert "Thread-1 (_connection_worker_thread) 5" in text
    assert "  60.0%  EventStream._pump (sse_gateway/stream.py)" in text
    assert "  20.0%  (no Python frame: native code)" in text
    assert "  80.0%  sse_gateway/stream.py" in text  # own time by package


# -- the naive baseline ------------------------------------------------------------------------


@pytest.fixture
def baseline(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "sse_gateway.bench._baseline", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.system  # runs the benchmark or its baseline server
def test_baseline_serves_a_stream_and_resumes(baseline):
    with httpx.Client(base_url=baseline, timeout=5) as client:
        for text in ("one", "two", "three"):
            resp = client.post("/v1/sessions/run1/events", json={"data": {"text": text}})
            assert resp.status_code == 201
        assert resp.json() == {"id": 3, "session": "run1", "last_id": 3}
    got = asyncio.run(read_stream(baseline, "run1", until_id=3, timeout=20))
    assert got.ids == [1, 2, 3]
    assert [json.loads(d)["text"] for d in got.data] == ["one", "two", "three"]
    resumed = asyncio.run(read_stream(baseline, "run1", until_id=3, timeout=20, headers={"Last-Event-ID": "1"}))
    assert resumed.ids == [2, 3]


def test_table_shows_a_row_only_where_some_target_has_its_figure():
    from sse_gateway.bench.report import summarize as medians
    from sse_gateway.bench.report import table
    from sse_gateway.bench.scenarios import QUICK

    results = {"gateway": {"ingest-32": medians([{"events_per_s": 8000.0, "server_cpu_us_per_event": 120.0}])},
               "redis-1": {"ingest-32": medians([{"events_per_s": 6000.0, "server_cpu_us_per_event": 160.0,
                                                   "redis_cpu_us_per_published": 18.0}])}}
    both = table(results, QUICK, "both")
    assert "Redis CPU µs/event" in both and "18.0" in both
    alone = table({"gateway": results["gateway"]}, QUICK, "gateway only")
    assert "Redis" not in alone and "8.0k" in alone
    failed = table({"gateway": {"ingest-32": medians([{"error": "server did not start"}])}}, QUICK, "failed")
    assert "ingest, 32 publishers" in failed and "error" in failed

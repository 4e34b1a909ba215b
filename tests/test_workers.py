"""``serve --workers N``: several gateway processes on one port, over one SQLite file (or one Redis).

Real processes, real sockets (system tier): every connection goes through the one port, and the kernel
hands it to whichever worker accepts it, so the tests never choose a worker; they read which worker did
what from ``/metrics``, whose samples carry ``worker="N"`` whichever worker answers. What is proven:

* ids stay exact across workers: concurrent publishers through the port, each request on a connection
  of its own so they land on every worker, get every id 1..n of a session once;
* every stream, whichever worker serves it, gets every event once, in order, including those another
  worker committed, and gets them live, told by wake-ups; with no wake-ups the poller still delivers;
* the supervisor: a killed worker is started again, SIGTERM drains every worker, Ctrl-C twice stops
  them at once, and a supervisor killed with -9 takes its workers with it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest
from util import RawStream, Received, await_until, free_port, read_stream, wait_until

from sse_gateway.cli import bind_socket
from sse_gateway.config import Settings
from sse_gateway.log.wake import wake_dir
from sse_gateway.workers import Supervisor, WorkerInfo

pytestmark = pytest.mark.timeout(180)

CLOSE = {"Connection": "close"}  # a connection per request: requests land on every worker


async def per_worker(url: str, name: str, labels: str = "") -> dict[int, float]:
    """One sample of every worker's ``/metrics``: {worker number: value}."""
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=CLOSE) as c:
        text = (await c.get("/metrics")).text
    found = {}
    for line in text.splitlines():
        m = re.fullmatch(rf'{name}\{{(.*)worker="(\d+)"\}} (\S+)', line)
        if m and m.group(1) == (labels + "," if labels else ""):
            found[int(m.group(2))] = float(m.group(3))
    return found


async def publish(url: str, session: str, data) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=CLOSE) as c:
        r = await c.post(f"/v1/sessions/{session}/events", json={"data": data})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def pids_of(gw) -> dict[int, int]:
    """Worker number -> the pid its last start logged."""
    return {int(n): int(pid) for n, pid in re.findall(r"worker (\d+) of \d+ starting \(pid (\d+)\)", gw.log())}


def started(gw, index: int) -> int:
    """How many times worker ``index`` has come to serve (its application started: it drains on a signal)."""
    return gw.log().count(f"[worker {index}] uvicorn.error: Application startup complete.")


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # exited, not yet reaped by whoever inherited it


async def test_workers_on_one_port_keep_ids_exact_and_give_every_stream_every_event_once(start_gateway):
    gw = start_gateway("--workers", "2", "--heartbeat", "1")
    sessions, publishers, each = ["w1", "w2"], 6, 40
    for session in sessions:
        assert httpx.post(f"{gw.url}/v1/sessions", json={"id": session}).status_code == 201
    readers: list[tuple[str, Received, asyncio.Task]] = []

    def subscribe(session: str) -> None:
        got = Received()
        readers.append((session, got, asyncio.create_task(read_stream(gw.url, session, received=got, timeout=150))))

    for session in sessions:
        for _ in range(10):
            subscribe(session)

    async def on_every_worker() -> bool:
        """Every stream open, and some on each worker; while one worker has none, open more."""
        counts = await per_worker(gw.url, "sse_gateway_open_streams")
        if sum(counts.values()) < len(readers):
            return False
        if len(counts) == 2 and min(counts.values()) > 0:
            return True
        for session in sessions:
            subscribe(session)
        return False

    await await_until(on_every_worker, interval=0.2, what="streams through the port on both workers")

    async def publisher(session: str, n: int) -> list[int]:
        return [await publish(gw.url, session, {"p": n, "i": i}) for i in range(each)]

    jobs = [(s, asyncio.create_task(publisher(s, n))) for s in sessions for n in range(publishers)]
    for session in sessions:
        runs = [await task for s, task in jobs if s == session]
        assert all(ids == sorted(ids) for ids in runs)  # a publisher's own events keep their order
        assert sorted(i for ids in runs for i in ids) == list(range(1, publishers * each + 1))  # each id once

    async def published_by_both() -> dict[int, float] | None:
        counts = await per_worker(gw.url, "sse_gateway_events_published_total", 'outcome="appended"')
        return counts if sum(counts.values()) == len(sessions) * publishers * each else None

    counts = await await_until(published_by_both, interval=0.2, what="every worker's count of appends")
    assert len(counts) == 2 and min(counts.values()) > 0  # the publishes landed on both workers
    async with httpx.AsyncClient(base_url=gw.url, headers=CLOSE) as c:
        for session in sessions:
            assert (await c.post(f"/v1/sessions/{session}/complete")).status_code == 200
    for session, got, task in readers:
        await task
        assert got.ids == list(range(1, publishers * each + 2)), (session, got.ids[:20])  # + gateway.end
        assert got.events[-1] == "gateway.end"
    wakeups = await per_worker(gw.url, "sse_gateway_store_wakeups_total")
    assert len(wakeups) == 2 and min(wakeups.values()) > 0  # each heard the other's commits


async def live_across_workers(gw, session: str) -> tuple[int, dict[int, float]]:
    """One stream on whichever worker takes it; events published one at a time, each on a connection of its
    own, each received on that stream before the next is sent, until the other worker has committed some
    of them (by its count of appends). The stream's worker, and every worker's counts of appends."""
    assert httpx.post(f"{gw.url}/v1/sessions", json={"id": session}).status_code == 201
    got = Received()
    reader = asyncio.create_task(read_stream(gw.url, session, received=got, timeout=150))
    streams = await await_until(lambda: _one_stream(gw.url), what="the stream to open")
    serving = next(w for w, n in streams.items() if n)
    sent = 0

    async def committed_elsewhere() -> dict[int, float] | None:
        nonlocal sent
        counts = await per_worker(gw.url, "sse_gateway_events_published_total", 'outcome="appended"')
        if sent >= 20 and sum(counts.values()) == sent and any(n for w, n in counts.items() if w != serving):
            return counts
        sent += 1
        await publish(gw.url, session, sent)
        await await_until(lambda: len(got.ids) == sent, interval=0.005, what=f"event {sent} on the open stream")
        return None

    counts = await await_until(committed_elsewhere, interval=0, what="events committed by the other worker")
    async with httpx.AsyncClient(base_url=gw.url, headers=CLOSE) as c:
        await c.post(f"/v1/sessions/{session}/complete")
    await reader
    assert got.ids == list(range(1, sent + 2)) and got.connects == 1  # live, on one connection, each once
    return serving, counts


async def every_worker(url: str, count: int) -> dict[int, float] | None:
    """When every worker's metrics are there: their start times."""
    started = await per_worker(url, "process_start_time_seconds")
    return started if len(started) == count else None


async def _one_stream(url: str) -> dict[int, float] | None:
    counts = await per_worker(url, "sse_gateway_open_streams")
    return counts if sum(counts.values()) == 1 else None


async def test_a_stream_gets_the_other_worker_s_commits_live_by_wake_ups(start_gateway):
    gw = start_gateway("--workers", "2")
    serving, _ = await live_across_workers(gw, "live")
    wakeups = await per_worker(gw.url, "sse_gateway_store_wakeups_total")
    assert wakeups[serving] > 0  # the stream's worker was told of the other's commits


async def test_without_wake_ups_the_poller_still_delivers_across_workers(start_gateway, tmp_path: Path):
    db = tmp_path / "nowake.db"
    Path(wake_dir(str(db))).write_text("a file where the directory of wake-up sockets would be")
    gw = start_gateway("--workers", "2", db=db)
    serving, _ = await live_across_workers(gw, "polled")
    assert set((await per_worker(gw.url, "sse_gateway_store_wakeups_total")).values()) == {0}
    assert (await per_worker(gw.url, "sse_gateway_store_rereads_total"))[serving] > 0
    assert gw.log().count("no wake-ups between the processes") == 2  # each worker says so


async def test_workers_on_one_redis(start_gateway, redis_server):
    gw = start_gateway("--workers", "2", backend="redis", env={"SSE_GATEWAY_REDIS_URL": redis_server})
    await live_across_workers(gw, "on-redis")


async def test_a_killed_worker_is_started_again_and_sigterm_drains_every_worker(start_gateway):
    gw = start_gateway("--workers", "2", "--drain-seconds", "3", "--heartbeat", "1")
    before = wait_until(lambda: len(pids_of(gw)) == 2 and pids_of(gw), what="both workers' pids in the log")
    first = await await_until(lambda: every_worker(gw.url, 2), what="both workers' metrics")
    wait_until(lambda: "2 workers serving" in gw.log(), what="both workers serving")  # not a failed start
    os.kill(before[1], signal.SIGKILL)
    wait_until(lambda: started(gw, 1) == 2, what="worker 1 started again, serving")
    assert pids_of(gw)[1] != before[1]
    assert re.search(rf"worker 1 \(pid {before[1]}\) exited \(signal SIGKILL\).*starting it again", gw.log())

    async def restarted() -> bool:
        now = await per_worker(gw.url, "process_start_time_seconds")
        return now.get(1) not in (None, first[1]) and now.get(2) == first[2]

    await await_until(restarted, interval=0.2, what="the new worker 1's metrics, worker 2's unchanged")
    assert [await publish(gw.url, "after", i) for i in range(2)] == [1, 2]
    streams = [RawStream(gw.port, "after") for _ in range(10)]
    tasks = [asyncio.create_task(s.run()) for s in streams]

    async def all_open() -> bool:
        return sum((await per_worker(gw.url, "sse_gateway_open_streams")).values()) == len(streams)

    await await_until(all_open, interval=0.1, what="10 streams open")
    gw.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{gw.url}/readyz", headers=CLOSE).status_code == 503,
               what="/readyz to answer 503 as the drain begins")  # whichever worker answers
    await await_until(lambda: gw.proc.poll() is not None, what="the supervisor to exit once every worker drained")
    await asyncio.gather(*tasks)
    assert gw.proc.returncode == 0
    for s in streams:  # each stream ended cleanly, having had both events: its client resumes elsewhere
        assert s.ids == [1, 2] and s.clean_end
    log = gw.log()
    assert "draining 2 worker(s)" in log and log.count("draining: new streams get 503") == 2
    assert all(gone(pid) for pid in pids_of(gw).values())


async def test_ctrl_c_twice_stops_every_worker_at_once(start_gateway):
    gw = start_gateway("--workers", "2", "--drain-seconds", "60")
    httpx.post(f"{gw.url}/v1/sessions/c/events", json={"data": 1})
    stream = RawStream(gw.port, "c")
    task = asyncio.create_task(stream.run())
    await await_until(lambda: _one_stream(gw.url), what="the stream to open")
    wait_until(lambda: "2 workers serving" in gw.log(), what="both workers serving")
    gw.proc.send_signal(signal.SIGINT)
    wait_until(lambda: gw.log().count("draining: new streams get 503") == 2, what="both workers draining")
    gw.proc.send_signal(signal.SIGINT)  # 60 s of drain are not waited for
    await await_until(lambda: gw.proc.poll() is not None, what="the supervisor to exit")
    await task  # all of this within the wait's 30 s, not the drain's 60
    assert stream.ids == [1] and stream.clean_end and gw.proc.returncode == 0
    assert all(gone(pid) for pid in pids_of(gw).values())


def test_a_supervisor_killed_takes_its_workers_with_it(start_gateway):
    gw = start_gateway("--workers", "3")
    pids = wait_until(lambda: len(pids_of(gw)) == 3 and pids_of(gw), what="the workers' pids in the log")
    gw.kill()
    wait_until(lambda: all(gone(pid) for pid in pids.values()), what="every worker to die with the supervisor")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gw.url}/healthz")


def _exits_before_serving(settings, sock, info, ready, parent) -> None:
    """A worker that cannot start (in the spawned process): it exits before it says it serves."""
    sys.exit(3)


@pytest.mark.system  # spawns processes
def test_a_worker_that_cannot_start_stops_them_all_with_status_1(tmp_path: Path, caplog):
    sock, problem = bind_socket("127.0.0.1", free_port())
    assert sock is not None, problem
    settings = Settings(db=str(tmp_path / "x.db"), workers=2)
    try:
        assert Supervisor(settings, sock, target=_exits_before_serving).run() == 1
    finally:
        sock.close()
    assert "could not start (status 3); stopping" in caplog.text


# -- without processes ---------------------------------------------------------------------------------


def test_metrics_of_every_worker_in_one_answer(tmp_path: Path):
    """``/metrics`` through the shared port: the answering worker's own, live, and the others' snapshots,
    each family once, every sample labelled with its worker."""
    info = WorkerInfo(2, 3, str(tmp_path))
    WorkerInfo(1, 3, str(tmp_path)).write_snapshot(
        b'# HELP a_total A\n# TYPE a_total counter\na_total 1.0\n# HELP h H\n# TYPE h histogram\n'
        b'h_bucket{le="1.0"} 2.0\nh_count 2.0\n')
    text = info.metrics(b'# HELP a_total A\n# TYPE a_total counter\na_total 5.0\n# HELP b B\n# TYPE b gauge\n'
                        b'b{route="x"} 3.0\n').decode()  # worker 3 has written nothing yet
    assert text.splitlines() == [
        "# HELP a_total A", "# TYPE a_total counter", 'a_total{worker="2"} 5.0', 'a_total{worker="1"} 1.0',
        "# HELP b B", "# TYPE b gauge", 'b{route="x",worker="2"} 3.0',
        "# HELP h H", "# TYPE h histogram", 'h_bucket{le="1.0",worker="1"} 2.0', 'h_count{worker="1"} 2.0']

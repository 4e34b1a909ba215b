"""Wake-ups between the processes on one SQLite file (sse_gateway/log/wake.py), in this process.

Two ``SqliteLog`` instances on one file are two processes as far as the store goes: each binds its own
socket in ``<db>-wake/``. What one commits reaches the other's observers by a datagram alone (the
poller is made too slow to matter); without wake-ups, or when one is lost, the poller tells instead.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from util import await_until

from sse_gateway.log.base import LogObserver
from sse_gateway.log.sqlite import SqliteLog
from sse_gateway.log.wake import MAX_DATAGRAM, Wake, wake_dir
from sse_gateway.models import NewEvent, NewInput

pytestmark = pytest.mark.timeout(60)

NEVER = 3600.0  # a poll interval that never comes during a test: only wake-ups can tell


def ev(data: str = "1") -> NewEvent:
    return NewEvent("message", data, True, None)


class Facts(LogObserver):
    def __init__(self) -> None:
        self.facts: list[tuple] = []

    def moved(self, session, row) -> None:
        self.facts.append(("moved", session, row.epoch, row.last_id, row.status, row.input_last_id))

    def deleted(self, session) -> None:
        self.facts.append(("deleted", session))

    def last(self, session: str) -> tuple | None:
        found = [f for f in self.facts if f[1] == session]
        return found[-1] if found else None


async def opened(path: Path, **kw) -> SqliteLog:
    log = SqliteLog(str(path), **kw)
    await log.open()
    return log


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[tuple[SqliteLog, SqliteLog, Facts]]:
    """``here`` (its poller never looks, it watches "s") and ``there``, on one file; the facts ``here`` hears."""
    here = await opened(tmp_path / "two.db", poll_interval=NEVER)
    there = await opened(tmp_path / "two.db")
    facts = Facts()
    here.add_observer(facts)
    here.watched = {"s"}
    yield here, there, facts
    await here.close()
    await there.close()


async def test_another_process_s_commits_reach_the_watching_one_by_wake_ups_alone(two):
    here, there, facts = two
    await there.append("s", [ev(), ev()])
    await there.append("unwatched", [ev()])
    await await_until(lambda: facts.last("s") and facts.last("s")[3] == 2, what="the other's append, told")
    epoch = facts.last("s")[2]
    assert facts.last("s") == ("moved", "s", epoch, 2, "open", 0)
    await there.append_input("s", NewInput("message", '"hi"', None, None, None))
    await await_until(lambda: facts.last("s")[5] == 1, what="the other's input (its input_last_id), told")
    assert facts.last("s")[3] == 3  # its mirror event
    await there.complete("s")
    await await_until(lambda: facts.last("s")[4] == "completed", what="the other's completion, told")
    await there.delete_session("s")
    await await_until(lambda: facts.last("s") == ("deleted", "s"), what="the other's delete, told")
    await there.append("s", [ev()])
    await await_until(lambda: facts.last("s")[0] == "moved" and facts.last("s")[2] != epoch,
                      what="the session's new life, told")
    assert all(f[1] == "s" for f in facts.facts)  # nothing of the unwatched session
    assert here.wakeups_heard >= 6 and here.watched_rereads == 0  # the store was never read for it


async def test_news_of_an_older_life_is_dropped(two):
    """Datagrams of two senders may cross: news of a session's life older than one told of changes nothing."""
    here, _, facts = two
    here._heard("a.sock", 1, [["s", 9, "new", 1, "open", 0]])
    here._heard("b.sock", 1, [["s", 5, "old", 7, "open", 0], ["s", 5, None, 0, "", 0]])
    assert facts.facts == [("moved", "s", "new", 1, "open", 0)]


async def test_the_poller_drops_a_row_of_a_life_older_than_one_told_of(tmp_path: Path):
    """A re-read may cross a wake-up of the session's next life: the older row it read changes nothing."""
    here = await opened(tmp_path / "cross.db", poll_interval=0.01, wake=False)
    there = await opened(tmp_path / "cross.db")
    await there.create_session("s")
    facts = Facts()
    here.add_observer(facts)
    here._sids["s"] = 1000  # as if a wake-up had told of a later life
    here.watched = {"s"}
    try:
        await await_until(lambda: here.watched_rereads, what="the poller's first read")
        await there.append("s", [ev()])
        await await_until(lambda: here.watched_rereads > 1, what="the poller to read the row again")
        assert facts.facts == []
    finally:
        await here.close()
        await there.close()


async def test_without_wake_ups_the_poller_tells(tmp_path: Path):
    here = await opened(tmp_path / "poll.db", poll_interval=0.01, wake=False)
    there = await opened(tmp_path / "poll.db")
    facts = Facts()
    here.add_observer(facts)
    here.watched = {"s"}
    try:
        await there.append("s", [ev(), ev(), ev()])
        await await_until(lambda: facts.last("s") and facts.last("s")[3] == 3, what="the other's append, polled")
        assert here.wakeups_heard == 0 and here.watched_rereads >= 1
    finally:
        await here.close()
        await there.close()


async def test_a_lost_wake_up_is_made_good_by_the_poller(tmp_path: Path):
    """The datagram of the last commit never arrives (a full buffer): the store's data_version moved and no
    wake-up came by the next look, so the poller re-reads the watched row."""
    here = await opened(tmp_path / "lost.db", poll_interval=0.01)
    there = await opened(tmp_path / "lost.db")
    facts = Facts()
    here.add_observer(facts)
    here.watched = {"s"}
    try:
        await there.append("s", [ev()])
        await await_until(lambda: facts.last("s") and facts.last("s")[3] == 1, what="the first append, told")
        rereads = here.watched_rereads
        there._wake._send_all = lambda body: None  # every datagram from now on is lost
        await there.append("s", [ev()])
        await await_until(lambda: facts.last("s")[3] == 2, what="the second append, polled")
        assert here.watched_rereads > rereads
    finally:
        await here.close()
        await there.close()


async def test_a_gap_in_a_sender_s_sequence_is_noticed(two):
    """Each datagram carries its sender's sequence number: a number skipped is a datagram lost, and the
    poller re-reads at its next look (``SqliteLog._poll_loop``) even though wake-ups keep coming."""
    here, _, _ = two
    here._heard("a.sock", 7, [])  # the first heard of a sender: nothing to compare with
    here._heard("a.sock", 8, [])
    here._heard("b.sock", 1, [])
    assert not here._missed
    here._heard("a.sock", 10, [])
    assert here._missed


async def test_a_long_path_and_a_dead_process_s_socket(tmp_path: Path):
    """A socket address holds 108 bytes: a deeper directory is reached through /proc/self/fd. The socket
    a killed process left behind refuses datagrams; the first sender removes it."""
    deep = tmp_path / ("d" * 80) / ("e" * 80)
    deep.mkdir(parents=True)
    db = deep / "deep.db"
    here = await opened(db, poll_interval=NEVER)
    there = await opened(db)
    facts = Facts()
    here.add_observer(facts)
    here.watched = {"s"}
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(f"/proc/self/fd/{there._wake._dirfd}/1-dead.sock")
    dead.close()
    wakes = Path(wake_dir(str(db)))
    assert "1-dead.sock" in os.listdir(wakes)
    there._wake._stale = True
    try:
        await there.append("s", [ev()])
        await await_until(lambda: facts.last("s"), what="the other's append, told through a long path")
        assert "1-dead.sock" not in os.listdir(wakes)
    finally:
        await here.close()
        await there.close()
    assert sorted(os.listdir(wakes)) == ["writer.lock"]  # each removed its own socket


def test_many_sessions_go_in_several_datagrams_each_within_the_limit():
    wake = Wake("/nonexistent/x.db", lambda *a: None)
    entries = [[f"session-{i:05d}-" + "x" * 100, i, "epoch1", i, "open", 0] for i in range(1000)]
    datagrams = list(wake._datagrams(entries))
    assert len(datagrams) > 1 and all(len(d) <= MAX_DATAGRAM for d in datagrams)
    decoded = [orjson.loads(d[1:]) for d in datagrams]
    assert [seq for seq, _ in decoded] == list(range(1, len(datagrams) + 1))
    assert [e for _, part in decoded for e in part] == entries
    assert [orjson.loads(d[1:]) for d in wake._datagrams([])] == [[len(datagrams) + 1, []]]


async def test_writers_of_two_processes_take_turns_and_ids_stay_contiguous(tmp_path: Path):
    a, b = await opened(tmp_path / "turns.db"), await opened(tmp_path / "turns.db")
    try:
        assert a._wake.lock is not None and b._wake.lock is not None

        async def publish(log: SqliteLog, n: int) -> list[int]:
            return [(await log.append("s", [ev(f'"{n}-{i}"')])).ids[0] for i in range(100)]

        results = await asyncio.gather(*(publish(a if n % 2 else b, n) for n in range(8)))
        assert sorted(i for ids in results for i in ids) == list(range(1, 801))
    finally:
        await a.close()
        await b.close()


async def test_a_wake_directory_that_cannot_be_made_leaves_the_poller(tmp_path: Path, caplog):
    Path(wake_dir(str(tmp_path / "blocked.db"))).write_text("not a directory")
    log = await opened(tmp_path / "blocked.db")
    try:
        assert log._wake is None
        assert "no wake-ups between the processes" in caplog.text
        assert (await log.append("s", [ev()])).ids == [1]
    finally:
        await log.close()

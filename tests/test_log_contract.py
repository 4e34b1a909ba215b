"""The EventLog contract (sse_gateway/log/base.py), run against every backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from sse_gateway.errors import Conflict, NotFound, PreconditionFailed
from sse_gateway.log.base import EventLog
from sse_gateway.log.memory import MemoryLog
from sse_gateway.log.redis import RedisLog
from sse_gateway.log.sqlite import SqliteLog
from sse_gateway.models import END_EVENT, NewEvent

pytestmark = pytest.mark.timeout(60)


def ev(data: str = "1", key: str | None = None, event: str = "message") -> NewEvent:
    return NewEvent(event, data, True, key)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_log(request, tmp_path) -> Callable[..., EventLog]:
    """``make_log(**limits)`` builds a log of the parametrised backend; the same store on every call."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_server")

        def make_redis(**kw) -> EventLog:
            return RedisLog(url, **kw)
        return make_redis
    if request.param == "memory":
        shared = {}

        def make(**kw) -> EventLog:
            if "log" not in shared:
                shared["log"] = MemoryLog(**kw)
            return shared["log"]
        return make

    def make_sqlite(**kw) -> EventLog:
        return SqliteLog(str(tmp_path / "log.db"), **kw)
    return make_sqlite


@pytest.fixture
async def log(make_log) -> AsyncIterator[EventLog]:
    event_log = make_log()
    await event_log.open()
    yield event_log
    await event_log.close()


async def test_first_id_is_one_and_ids_are_contiguous(log):
    r = await log.append("s", [ev("1")])
    assert r.ids == [1] and r.last_id == 1
    r = await log.append("s", [ev("2"), ev("3")])
    assert r.ids == [2, 3]
    assert [e.id for e in await log.read("s", 0, 10)] == [1, 2, 3]


async def test_concurrent_appends_are_contiguous(log):
    async def worker(n: int) -> list[int]:
        ids = []
        for i in range(200):
            ids += (await log.append("s", [ev(f'"{n}-{i}"')])).ids
        return ids

    results = await asyncio.gather(*(worker(n) for n in range(50)))
    every = sorted(i for ids in results for i in ids)
    assert every == list(range(1, 10_001))
    for ids in results:
        assert ids == sorted(ids)  # each publisher's own events keep their order
    read, after = [], 0
    while chunk := await log.read("s", after, 1000):
        read += chunk
        after = chunk[-1].id
    assert [e.id for e in read] == list(range(1, 10_001))


async def test_batch_is_atomic_and_contiguous_under_concurrency(log):
    async def batch(n: int):
        return (await log.append("s", [ev(f'"{n}-{i}"') for i in range(10)])).ids

    results = await asyncio.gather(*(batch(n) for n in range(30)))
    for ids in results:
        assert ids == list(range(ids[0], ids[0] + 10))
    assert sorted(i for ids in results for i in ids) == list(range(1, 301))


async def test_read_after_with_limit(log):
    await log.append("s", [ev(str(i)) for i in range(1, 11)])
    assert [e.id for e in await log.read("s", 3, 4)] == [4, 5, 6, 7]
    assert await log.read("s", 10, 5) == []
    assert await log.read("unknown", 0, 5) == []
    got = await log.read("s", 0, 1)
    assert got[0].data == "1" and got[0].event == "message" and got[0].ts > 0


async def test_unknown_session_without_create(log):
    with pytest.raises(NotFound):
        await log.append("nope", [ev()], create=False)
    assert await log.get_session("nope") is None


async def test_create_conflict_and_metadata(log):
    row = await log.create_session("s", metadata={"user": "u1"}, ttl_seconds=60)
    assert row.last_id == 0 and row.status == "open" and len(row.epoch) >= 4
    with pytest.raises(Conflict) as exc:
        await log.create_session("s")
    assert exc.value.code == "session_exists"
    got = await log.get_session("s")
    assert got.metadata == {"user": "u1"} and got.ttl_seconds == 60 and got.epoch == row.epoch


async def test_idempotency_keys(log):
    first = await log.append("s", [ev("1", key="k1")])
    again = await log.append("s", [ev("1", key="k1")])
    assert again.ids == first.ids and again.new == [False] and again.events == []
    mixed = await log.append("s", [ev("2", key="k2"), ev("1", key="k1"), ev("3", key="k2")])
    assert mixed.ids == [2, 1, 2] and mixed.new == [True, False, False]
    assert [e.id for e in await log.read("s", 0, 10)] == [1, 2]


async def test_concurrent_retries_with_one_key_append_once(log):
    results = await asyncio.gather(*(log.append("s", [ev("x", key="same")]) for _ in range(20)))
    assert {r.ids[0] for r in results} == {1}
    assert sum(r.new[0] for r in results) == 1
    assert len(await log.read("s", 0, 100)) == 1


async def test_complete_appends_end_and_refuses_more(log):
    await log.append("s", [ev("1", key="k")])
    row = await log.complete("s", {"answer": 42})
    assert row.completed and row.last_id == 2 and row.result == {"answer": 42}
    events = await log.read("s", 0, 10)
    assert events[-1].event == END_EVENT and events[-1].data == '{"answer":42}'
    again = await log.complete("s", {"answer": 42})  # idempotent
    assert again.last_id == 2
    with pytest.raises(Conflict):
        await log.complete("s", {"answer": 43})
    with pytest.raises(Conflict) as exc:
        await log.append("s", [ev("2")])
    assert exc.value.code == "session_completed"
    replay = await log.append("s", [ev("1", key="k")])  # a retry of a stored event still learns its id
    assert replay.ids == [1] and replay.new == [False]


async def test_ack_moves_forward_only(log):
    await log.append("s", [ev(), ev(), ev()])
    assert (await log.ack("s", 2)).acked_id == 2
    assert (await log.ack("s", 1)).acked_id == 2
    with pytest.raises(Exception):
        await log.ack("s", 9)


async def test_state_versions(log):
    await log.append("s", [ev(), ev()])
    row = await log.put_state("s", {"step": 1}, None)
    assert row.state_version == 1 and row.state_as_of == 2
    with pytest.raises(PreconditionFailed):
        await log.put_state("s", {"step": 2}, 0)
    row = await log.put_state("s", {"step": 2}, 1)
    assert row.state_version == 2
    assert (await log.get_session("s")).state == {"step": 2}


async def test_delete_and_recreate_gets_new_epoch(log):
    await log.append("s", [ev(), ev()])
    old = await log.get_session("s")
    assert await log.delete_session("s") is True
    assert await log.delete_session("s") is False
    assert await log.get_session("s") is None
    assert await log.read("s", 0, 10) == []
    r = await log.append("s", [ev("new")])
    assert r.ids == [1]
    new = await log.get_session("s")
    assert new.epoch != old.epoch
    assert [e.data for e in await log.read("s", 0, 10)] == ["new"]


async def test_trim_and_max_events(make_log):
    event_log = make_log(max_events=5)
    await event_log.open()
    try:
        await event_log.append("s", [ev(str(i)) for i in range(1, 13)])
        row = await event_log.get_session("s")
        assert row.trimmed_id == 7 and row.earliest_id == 8
        assert [e.id for e in await event_log.read("s", 0, 100)] == [8, 9, 10, 11, 12]
        row = await event_log.trim("s", 10)
        assert [e.id for e in await event_log.read("s", 3, 100)] == [11, 12]
        await event_log.sweep(0)  # physically removes what was trimmed; reads are unchanged
        assert [e.id for e in await event_log.read("s", 0, 100)] == [11, 12]
        r = await event_log.append("s", [ev("13")])
        assert r.ids == [13]  # ids are never reused after trimming
    finally:
        await event_log.close()


async def test_sweep_removes_expired_completed_sessions(log):
    await log.create_session("short", ttl_seconds=1)
    await log.complete("short")
    await log.append("open", [ev()])
    row = await log.get_session("short")
    assert await log.sweep(row.completed_at + 500) == 0
    assert await log.sweep(row.completed_at + 1500) == 1
    assert await log.get_session("short") is None
    assert await log.get_session("open") is not None


async def test_listeners_see_new_events_in_order(log):
    seen = []
    log.add_listener(lambda session, events, row: seen.append((session, [e.id for e in events])))
    await asyncio.gather(*(log.append("s", [ev()]) for _ in range(20)))
    ids = [i for s, evs in seen if s == "s" for i in evs]
    assert ids == list(range(1, 21))


async def test_sqlite_is_durable_across_reopen_with_stable_epoch(tmp_path):
    def make_log() -> EventLog:
        return SqliteLog(str(tmp_path / "reopen.db"))

    first = make_log()
    await first.open()
    await first.append("s", [ev(f'"{i}"') for i in range(100)])
    epoch = (await first.get_session("s")).epoch
    await first.close()
    second = make_log()
    await second.open()
    try:
        row = await second.get_session("s")
        assert row.epoch == epoch and row.last_id == 100
        assert (await second.append("s", [ev()])).ids == [101]
    finally:
        await second.close()


async def test_list_sessions(log):
    await log.append("a", [ev()])
    await log.append("b", [ev()])
    await log.complete("b")
    assert {r.id for r in await log.list_sessions()} == {"a", "b"}
    assert [r.id for r in await log.list_sessions(status="completed")] == ["b"]
    assert len(await log.list_sessions(limit=1)) == 1

"""The EventLog contract (sse_gateway/log/base.py), run against every backend.

A new backend that passes this suite works: ids, atomicity, idempotency,
epochs, retention, error codes, what its observers hear (its own appends,
deletes, commits; another instance's writes on a shared store), that close
drains pending writes, and presence.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sse_gateway.errors import BadRequest, Conflict, NotFound, PreconditionFailed, Unavailable
from sse_gateway.log.base import EventLog, LogObserver, OpenStreams
from sse_gateway.log.memory import MemoryLog
from sse_gateway.log.redis import RedisLog
from sse_gateway.log.sqlite import SqliteLog
from sse_gateway.models import APPROVAL_REQUEST, END_EVENT, INPUT_EVENT, NewEvent, NewInput, dump_json, load_json

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


class Heard(LogObserver):
    """Every fact a log tells, in order."""

    def __init__(self) -> None:
        self.facts: list[tuple] = []
        self.commits: list[int] = []

    def appended(self, session, events, row) -> None:
        assert events and [e.id for e in events] == list(range(events[0].id, row.last_id + 1))
        self.facts.append(("appended", session, [e.id for e in events], row.status))

    def moved(self, session, row) -> None:
        self.facts.append(("moved", session, row.epoch, row.last_id, row.status))

    def deleted(self, session) -> None:
        self.facts.append(("deleted", session))

    def committed(self, operations, seconds) -> None:
        assert operations >= 1 and seconds >= 0
        self.commits.append(operations)

    def of(self, kind: str, session: str = "s") -> list[tuple]:
        return [f for f in self.facts if f[0] == kind and f[1] == session]


class Counted(OpenStreams):
    """What limits.StreamSlots gives a log: this process's open streams per session."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.closed_at: dict[str, int] = {}

    def count(self, session: str) -> int:
        return self.counts.get(session, 0)

    def last_closed(self, session: str) -> int | None:
        return self.closed_at.get(session)


async def until(check: Callable[[], object], what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        await asyncio.sleep(0.01)


async def until_async(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        await asyncio.sleep(0.01)


async def test_observer_hears_appends_in_order(log):
    heard = Heard()
    log.add_observer(heard)
    await asyncio.gather(*(log.append("s", [ev()]) for _ in range(20)))
    await log.append("s", [ev("x", key="k")])
    await log.append("s", [ev("x", key="k")])  # a replay adds nothing: nothing to hear
    await log.complete("s", {"ok": True})
    ids = [i for f in heard.of("appended") for i in f[2]]
    assert ids == list(range(1, 23))
    assert heard.of("appended")[-1] == ("appended", "s", [22], "completed")
    assert heard.of("moved") == []  # this instance's own writes are appends, never moves


async def test_observer_hears_deletes_and_nothing_for_writes_without_events(log):
    heard = Heard()
    log.add_observer(heard)
    await log.create_session("s")
    await log.append("s", [ev(), ev()])
    await log.ack("s", 1)
    await log.put_state("s", {"step": 1}, None)
    await log.trim("s", 1)
    assert [f[0] for f in heard.facts] == ["appended"]
    assert await log.delete_session("s") is True
    assert await log.delete_session("s") is False
    assert heard.facts[1:] == [("deleted", "s")]
    await log.create_session("short", ttl_seconds=1)
    row = await log.complete("short")
    assert await log.sweep(row.completed_at + 1500) == 1
    assert heard.facts[-1] == ("deleted", "short")


async def test_an_observer_that_overrides_nothing_is_never_called(log):
    class Deaf(LogObserver):
        pass

    log.add_observer(Deaf())
    assert await log.append("s", [ev()])  # and nothing breaks


async def test_commits_are_observed_by_backends_that_batch(log):
    heard = Heard()
    log.add_observer(heard)
    await asyncio.gather(*(log.append("s", [ev()]) for _ in range(50)))
    if isinstance(log, MemoryLog):
        assert heard.commits == []  # it writes in place: no commit to time
    else:
        assert sum(heard.commits) == 50 and len(heard.commits) < 50  # every write counted, commits shared


async def test_a_write_whose_caller_went_away_does_not_fail_the_rest_of_its_batch(log):
    """A publisher that disconnects cancels its append; the group commit it was queued in still answers
    every other write of the batch (setting the result of a cancelled future raised, on Redis, and failed
    them all with 503)."""
    await log.create_session("s")
    writes = [asyncio.create_task(log.append("s", [ev(f'"{i}"')])) for i in range(20)]
    await asyncio.sleep(0)  # every write is queued
    writes[0].cancel()
    results = await asyncio.gather(*writes[1:])
    ids = sorted(r.ids[0] for r in results)
    stored = [e.id for e in await log.read("s", 0, 100)]
    assert stored == list(range(1, len(stored) + 1)) and set(ids) <= set(stored) and len(ids) == 19


def nested(levels: int):
    value = 1
    for _ in range(levels):
        value = [value]
    return value


async def test_a_value_the_store_cannot_keep_fails_alone(log):
    """Text with a lone surrogate, a document that is not JSON or too deep to write: each such write is
    ``400`` on every backend, and the writes queued with it are stored as if it had not been there (SQLite
    serialised a state document inside its group commit: one bad one failed the whole batch with 503).
    Integers beyond 64 bits are kept exactly in a row's documents too."""
    await log.create_session("s")
    heard = Heard()
    log.add_observer(heard)
    good = [*(log.append(f"g{i % 4}", [ev(f'"{i}"')]) for i in range(16)),
            log.put_state("s", {"big": 2**70, "deep": nested(100)}, None),
            log.create_session("m", metadata={"big": -(2**80)}),
            log.ack("s", 0)]
    bad = [log.append("s", [ev('"\ud800"')]),
           log.append("s", [NewEvent("message", "text \udfff", False)]),
           log.append("g0", [ev('"fine"'), ev('"\udc00"')]),  # all or nothing: the good event is not kept
           log.put_state("s", {"x": {1, 2}}, None),
           log.put_state("s", {"\ud800": 1}, None),
           log.create_session("b", metadata=nested(5000)),
           log.complete("s", {"r": object()})]
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    failed = [r for r in results[:len(good)] if isinstance(r, BaseException)]
    assert not failed, failed
    refused = results[len(good):]
    assert [(type(r), r.status, r.code) for r in refused] == [
        (BadRequest, 400, "invalid_json"), (BadRequest, 400, "invalid_utf8"), (BadRequest, 400, "invalid_json"),
        (BadRequest, 400, "invalid_json"), (BadRequest, 400, "invalid_json"), (BadRequest, 400, "json_too_deep"),
        (BadRequest, 400, "invalid_json")], refused
    for i in range(4):
        assert [e.data for e in await log.read(f"g{i}", 0, 10)] == [f'"{n}"' for n in range(i, 16, 4)]
        assert heard.of("appended", f"g{i}") and len(sum((f[2] for f in heard.of("appended", f"g{i}")), [])) == 4
    row = await log.get_session("s")
    assert row.state == {"big": 2**70, "deep": nested(100)} and row.state_version == 1
    assert row.last_id == 0 and row.status == "open" and await log.read("s", 0, 10) == []
    assert (await log.get_session("m")).metadata == {"big": -(2**80)}
    assert await log.get_session("b") is None
    done = await log.complete("s", {"n": 2**70})
    assert done.result == {"n": 2**70} and (await log.get_session("s")).result == {"n": 2**70}
    assert (await log.complete("s", {"n": 2**70})).status == "completed"  # the same result again: idempotent
    assert [e.data for e in await log.read("s", 0, 10)] == ['{"n":1180591620717411303424}']


async def refuse_writes_to(log: EventLog, session: str) -> None:
    """Make the store itself refuse every write to ``session``, as a store can refuse one row."""
    if isinstance(log, SqliteLog):
        await log.create_session(session)
        with sqlite3.connect(log.path) as db:
            db.execute("CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.sid = "
                       f"(SELECT sid FROM sessions WHERE name = '{session}') "
                       "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END")
            db.execute("CREATE TRIGGER refuse_state BEFORE UPDATE OF state ON sessions WHEN NEW.name = "
                       f"'{session}' BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END")
    elif isinstance(log, RedisLog):
        await log._redis.set(log._keys(session)[0], "not a hash")  # every script on it fails: WRONGTYPE
    else:
        pytest.skip(reason=f"{type(log).__name__} writes in place: no write shares a commit with another")


async def test_a_write_the_store_refuses_fails_alone_and_its_batch_commits(log):
    """One write of a group commit that the store refuses (a trigger on SQLite, a key of the wrong type on
    Redis) fails with its own error; every other write queued with it commits and is answered."""
    await log.create_session("s")
    await log.append("s", [ev("0")])
    await refuse_writes_to(log, "poisoned")
    heard = Heard()
    log.add_observer(heard)
    for _ in range(3):  # the writer goes on writing batches, and they keep failing only the refused write
        before = (await log.get_session("s")).last_id
        writes = [*(log.append("s", [ev(f'"{i}"')]) for i in range(8)),
                  log.append("poisoned", [ev('"x"')]),
                  log.put_state("poisoned", {"x": 1}, None),
                  *(log.append("s", [ev(f'"{i}"'), ev(f'"{i}b"')]) for i in range(8, 16)),
                  log.put_state("s", {"step": before}, None),
                  log.ack("s", before)]
        results = await asyncio.gather(*writes, return_exceptions=True)
        errors = [type(r) for r in results if isinstance(r, BaseException)]
        assert errors == [Unavailable, Unavailable], results
        assert all(r.status == 503 for r in results if isinstance(r, BaseException))  # the store's error
        ids = sorted(i for r in results[:8] + results[10:18] for i in r.ids)
        assert ids == list(range(before + 1, before + 25))
        stored = await log.read("s", before, 100)
        assert [e.id for e in stored] == ids
        row = await log.get_session("s")
        assert row.last_id == before + 24 and row.state == {"step": before} and row.acked_id == before
    assert not heard.of("appended", "poisoned")
    assert sum(len(f[2]) for f in heard.of("appended", "s")) == 72
    assert max(heard.commits) > 2  # the refused writes shared commits with the others


async def test_a_write_the_writer_cannot_encode_fails_alone(log, monkeypatch):
    """Should a value slip past the checks before the queue (here they are turned off), the write that
    SQLite cannot bind or redis-py cannot encode fails alone; the rest of its batch commits."""
    if isinstance(log, MemoryLog):
        pytest.skip(reason="MemoryLog writes in place: nothing to encode, no write shares a commit")
    monkeypatch.setattr(f"{type(log).__module__}.stored_text", lambda events: None, raising=False)
    results = await asyncio.gather(*(log.append("s", [ev(f'"{i}"')]) for i in range(8)),
                                   log.append("s", [ev('"\ud800"')]),
                                   *(log.append("t", [ev(f'"{i}"')]) for i in range(8)), return_exceptions=True)
    refused = results[8]
    assert isinstance(refused, Unavailable) and refused.code == "store_error", refused
    good = results[:8] + results[9:]
    assert not [r for r in good if isinstance(r, BaseException)], good
    assert [e.id for e in await log.read("s", 0, 100)] == list(range(1, 9))
    assert [e.id for e in await log.read("t", 0, 100)] == list(range(1, 9))


async def test_error_codes(log):
    for call in (lambda: log.append("nope", [ev()], create=False), lambda: log.complete("nope"),
                 lambda: log.ack("nope", 0), lambda: log.put_state("nope", {}, None), lambda: log.trim("nope", 0)):
        with pytest.raises(NotFound) as exc:
            await call()
        assert exc.value.status == 404 and exc.value.code == "session_not_found"
    await log.create_session("s")
    with pytest.raises(Conflict) as exc:
        await log.create_session("s")
    assert exc.value.status == 409 and exc.value.code == "session_exists"
    await log.append("s", [ev(), ev()])
    for bad in (3, -1):
        with pytest.raises(BadRequest) as exc:
            await log.ack("s", bad)
        assert exc.value.status == 400 and exc.value.code == "invalid_ack"
    with pytest.raises(BadRequest) as exc:
        await log.trim("s", -1)
    assert exc.value.status == 400 and exc.value.code == "invalid_trim"
    await log.put_state("s", {"v": 1}, 0)
    with pytest.raises(PreconditionFailed) as exc:
        await log.put_state("s", {"v": 2}, 0)
    assert exc.value.status == 412 and exc.value.code == "state_version_mismatch"
    assert exc.value.extra == {"version": 1}
    await log.complete("s")
    with pytest.raises(Conflict) as exc:
        await log.append("s", [ev()])
    assert exc.value.status == 409 and exc.value.code == "session_completed"
    row = await log.get_session("s")
    assert row.last_id == 3 and row.acked_id == 0 and row.state_version == 1  # refused writes changed nothing


async def test_close_drains_pending_writes(make_log):
    first = make_log()
    await first.open()
    writes = [asyncio.create_task(first.append("s", [ev(f'"{i}"')])) for i in range(200)]
    await asyncio.sleep(0)  # every write is queued (or done) before close
    await first.close()
    assert all(w.done() for w in writes)
    assert sorted(w.result().ids[0] for w in writes) == list(range(1, 201))
    with pytest.raises(Unavailable) as exc:
        await first.append("s", [ev()])
    assert exc.value.status == 503 and exc.value.code == "store_closed"
    again = make_log()  # another instance on the same store (memory: the same one, opened again)
    await again.open()
    try:
        assert [e.id for e in await again.read("s", 0, 1000)] == list(range(1, 201))
    finally:
        await again.close()


async def test_presence_is_this_process_s_streams_by_default(log):
    assert await log.presence("s") == (0, None)  # nobody handed the log a count: none
    streams = Counted()
    log.streams = streams
    await log.create_session("s")
    streams.counts["s"] = 2
    log.streams_changed("s")
    assert await log.presence("s") == (2, None)
    streams.counts["s"] = 0
    streams.closed_at["s"] = 1234
    log.streams_changed("s")
    if not log.shared_presence:
        assert await log.presence("s") == (0, 1234)
    else:  # the store keeps when an instance's count last fell to 0, once that instance has written it
        async def recorded() -> bool:
            count, last_seen = await log.presence("s")
            return count == 0 and last_seen is not None

        await until_async(recorded, "the store records when the last stream closed")


async def test_the_hub_hands_the_log_the_one_count_of_streams(log):
    """limits.StreamSlots counts the streams; the hub's channels, its presence and the log's read that count."""
    from sse_gateway.hub import Hub
    from sse_gateway.limits import StreamSlots

    slots = StreamSlots()
    hub = Hub(log, slots=slots)
    assert log.streams is slots and log.watched == hub.channels.keys()
    row = await log.create_session("s")
    releases = [slots.take("s"), slots.take("s")]  # what the stream route does before a stream starts
    assert hub.presence("s") == (2, None) and (await log.presence("s"))[0] == 2
    first, second = hub.settle(hub.attach("s"), row), hub.settle(hub.attach("s"), row)
    assert first is second and "s" in log.watched
    releases[0]()
    hub.detach(first)
    assert "s" in hub.channels  # the session still has a stream
    releases[1]()
    hub.detach(second)
    assert "s" not in hub.channels and "s" not in log.watched
    count, last_seen = hub.presence("s")
    assert count == 0 and last_seen is not None and slots.total == 0
    assert (await log.presence("s"))[0] == 0
    await log.delete_session("s")
    assert hub.presence("s") == (0, None)  # a deleted session's last close is forgotten


# -- two instances on one store: another process (SQLite) or node (Redis) ------------------------


@pytest.fixture
async def other(make_log, log) -> AsyncIterator[EventLog]:
    """A second instance of ``log``'s backend on the same store."""
    if not log.shared_store:
        pytest.skip(reason=f"{type(log).__name__} declares no store other instances can share (shared_store)")
    second = make_log()
    await second.open()
    yield second
    await second.close()


async def test_another_instance_s_writes_reach_this_one_s_observer(log, other):
    heard = Heard()
    log.add_observer(heard)
    epoch = (await log.create_session("s")).epoch
    await log.create_session("unwatched")
    log.watched = {"s"}
    await other.append("s", [ev(), ev()])
    await other.append("unwatched", [ev()])
    await until(lambda: any(f[3] == 2 for f in heard.of("moved")), "this instance hears the other's append")
    assert all(f[2] == epoch for f in heard.of("moved"))
    assert [e.id for e in await log.read("s", 0, 10)] == [1, 2]  # the events themselves come from the log
    assert heard.of("appended") == []  # not this instance's append
    await other.complete("s")
    await until(lambda: ("moved", "s", epoch, 3, "completed") in heard.facts, "the other's completion")
    await other.delete_session("s")
    await until(lambda: heard.of("deleted"), "the other's delete")
    await other.append("s", [ev()])
    new_epoch = (await other.get_session("s")).epoch
    await until(lambda: any(f[2] == new_epoch for f in heard.of("moved")), "the new life of the session")
    assert heard.of("moved", "unwatched") == [] and heard.of("deleted", "unwatched") == []


async def test_both_instances_allocate_contiguous_ids(log, other):
    async def worker(store: EventLog, n: int) -> list[int]:
        return [(await store.append("s", [ev(f'"{n}-{i}"')])).ids[0] for i in range(50)]

    results = await asyncio.gather(*(worker(log if n % 2 else other, n) for n in range(10)))
    assert sorted(i for ids in results for i in ids) == list(range(1, 501))


async def test_presence_of_another_instance(log, other):
    await log.create_session("s")
    here, there = Counted(), Counted()
    log.streams, other.streams = here, there
    here.counts["s"] = 2
    there.counts["s"] = 3
    log.streams_changed("s")
    other.streams_changed("s")
    if log.shared_presence:
        async def counted(expected: int) -> bool:
            return (await log.presence("s"))[0] == expected

        await until_async(lambda: counted(5), "the other instance's streams counted here")
        there.counts["s"] = 0
        other.streams_changed("s")
        await until_async(lambda: counted(2), "the other instance's closed streams no longer counted")
    else:
        assert await log.presence("s") == (2, None)  # each process counts its own


async def test_sqlite_own_commits_cost_the_poller_no_reread(tmp_path):
    """The poller re-reads watched rows only when another process committed; ``PRAGMA data_version``
    of a reader moved on this process's own commits too, so a busy session was re-read every 50 ms."""
    log = SqliteLog(str(tmp_path / "busy.db"), poll_interval=0.01)
    heard = Heard()
    log.add_observer(heard)
    log.watched = {"s"}
    await log.open()
    try:
        await until(lambda: heard.facts, "the first poll reads the watched rows once")
        await log.create_session("s")
        heard.facts.clear()
        for i in range(50):  # over 20 poll intervals, each with a commit of this process
            await log.append("s", [ev(f'"{i}"')])
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert heard.of("moved") == []
        assert len(heard.of("appended")) == 50
    finally:
        await log.close()


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


# -- input (user -> agent), its mirror, approvals --------------------------------------------------


def inp(kind: str = "message", data: str = '"hi"', key: str | None = None, approval_id: str | None = None,
        decision: str | None = None) -> NewInput:
    return NewInput(kind, data, key, approval_id, decision)


def approve(approval_id: str, decision: str = "approve", key: str | None = None) -> NewInput:
    return NewInput("approval", "null", key, approval_id, decision)


class InputHeard(LogObserver):
    """The facts about input and output, in order: what the hub and the input waiters hear."""

    def __init__(self) -> None:
        self.facts: list[tuple] = []

    def appended(self, session, events, row) -> None:
        self.facts.append(("appended", session, [e.id for e in events]))

    def input_appended(self, session, inputs, row) -> None:
        assert row.input_last_id == inputs[-1].id
        self.facts.append(("input", session, [i.id for i in inputs], row.last_id))

    def moved(self, session, row) -> None:
        self.facts.append(("moved", session, row.epoch, row.last_id, row.input_last_id))


async def test_input_has_ids_of_its_own_and_a_mirror_in_the_output(log):
    await log.create_session("s")
    await log.append("s", [ev("1"), ev("2")])
    first = await log.append_input("s", inp(data='{"text":"hi"}'))
    assert first.new and first.input.id == 1 and first.input_last_id == 1
    assert first.input.event_id == 3 and first.last_id == 3
    second = await log.append_input("s", inp("cancel", data="null"))
    assert (second.input.id, second.input.event_id) == (2, 4)
    events = await log.read("s", 0, 10)
    assert [(e.id, e.event) for e in events] == [(1, "message"), (2, "message"), (3, INPUT_EVENT), (4, INPUT_EVENT)]
    # the same bytes on every backend: the mirror is the input, told in the output's order
    assert events[2].data == '{"input_id":1,"kind":"message","data":{"text":"hi"}}'
    assert events[3].data == '{"input_id":2,"kind":"cancel","data":null}'
    got = await log.read_input("s", 0, 10)
    assert [(i.id, i.kind, i.data, i.event_id) for i in got] == [(1, "message", '{"text":"hi"}', 3),
                                                                 (2, "cancel", "null", 4)]
    assert [i.id for i in await log.read_input("s", 1, 10)] == [2]
    assert [i.id for i in await log.read_input("s", 0, 1)] == [1]
    assert await log.read_input("s", 2, 10) == [] and await log.read_input("nope", 0, 10) == []
    row = await log.get_session("s")
    assert (row.last_id, row.input_last_id, row.input_acked_id) == (4, 2, 0)


async def test_concurrent_inputs_are_contiguous_and_each_with_its_own_mirror(log):
    await log.create_session("s")

    async def user(n: int) -> list[tuple[int, int]]:
        out = []
        for i in range(20):
            r = await log.append_input("s", inp(data=f'"{n}-{i}"'))
            out.append((r.input.id, r.input.event_id))
        return out

    async def agent() -> None:
        for i in range(50):
            await log.append("s", [ev(f'"out-{i}"')])

    *results, _ = await asyncio.gather(*(user(n) for n in range(10)), agent())
    ids = sorted(i for got in results for i, _ in got)
    assert ids == list(range(1, 201))
    for got in results:
        assert got == sorted(got)  # each sender's inputs keep their order
    stored = await log.read_input("s", 0, 1000)
    mirrors = {e.id: e for e in await log.read("s", 0, 1000) if e.event == INPUT_EVENT}
    assert len(mirrors) == 200 and len(await log.read("s", 0, 1000)) == 250
    for item in stored:  # every input's mirror names it, and mirrors come in input order
        assert load_json(mirrors[item.event_id].data) == {"input_id": item.id, "kind": "message",
                                                          "data": load_json(item.data)}
    assert [item.event_id for item in stored] == sorted(mirrors)


async def test_input_is_idempotent_by_key_in_a_key_space_of_its_own(log):
    await log.append("s", [ev("1", key="k")])  # an output key does not name an input
    first = await log.append_input("s", inp(key="k"))
    again = await log.append_input("s", inp(data='"other"', key="k"))
    assert first.new and not again.new
    assert again.input == first.input and again.input_last_id == 1
    assert len(await log.read_input("s", 0, 10)) == 1
    assert [e.event for e in await log.read("s", 0, 10)] == ["message", INPUT_EVENT]  # one mirror
    assert (await log.append_input("s", inp(key="k2"))).input.id == 2


async def test_input_errors_change_nothing(log):
    with pytest.raises(NotFound):
        await log.append_input("nope", inp())
    assert await log.get_session("nope") is None  # input never creates a session
    await log.append("s", [ev()])
    await log.append_input("s", inp(key="done"))
    with pytest.raises(BadRequest) as exc:
        await log.append_input("s", inp(data='"\udc80"'))
    assert exc.value.code == "invalid_json"
    await log.complete("s")
    with pytest.raises(Conflict) as exc:
        await log.append_input("s", inp())
    assert exc.value.code == "session_completed"
    assert not (await log.append_input("s", inp(key="done"))).new  # a repeat still learns its input
    row = await log.get_session("s")
    assert (row.last_id, row.input_last_id) == (3, 1)


async def test_approvals_open_with_a_request_and_close_with_one_answer(log):
    await log.create_session("s")
    with pytest.raises(NotFound) as exc:
        await log.append_input("s", approve("a1"))
    assert exc.value.code == "approval_not_found"
    await log.append("s", [ev('{"approval_id":"a1","tool":"rm"}', event=APPROVAL_REQUEST),
                           ev('{"approval_id":"a2"}', event=APPROVAL_REQUEST)])
    assert await log.approvals("s") == {"a1": 0, "a2": 0}
    answer = await log.append_input("s", approve("a1", key="answer-1"))
    assert answer.new and answer.input.approval_id == "a1" and answer.input.decision == "approve"
    assert await log.approvals("s") == {"a1": 1, "a2": 0}
    with pytest.raises(Conflict) as exc:
        await log.append_input("s", approve("a1", "deny"))
    assert exc.value.code == "approval_answered"
    assert not (await log.append_input("s", approve("a1", key="answer-1"))).new  # a retry is not a second answer
    await log.append("s", [ev('{"approval_id":"a1"}', event=APPROVAL_REQUEST)])  # never reopens
    assert (await log.approvals("s"))["a1"] == 1
    deny = await log.append_input("s", approve("a2", "deny"))
    assert deny.input.id == 2
    mirror = (await log.read("s", deny.input.event_id - 1, 1))[0]
    assert mirror.data == '{"input_id":2,"kind":"approval","data":null,"approval_id":"a2","decision":"deny"}'
    row = await log.get_session("s")
    assert (row.input_last_id, row.last_id) == (2, 5)


async def test_only_well_formed_approval_requests_open_approvals(log):
    await log.append("s", [
        ev('{"approval_id":1}', event=APPROVAL_REQUEST), ev('["a"]', event=APPROVAL_REQUEST),
        ev('{"approval_id":""}', event=APPROVAL_REQUEST), ev('{"approval_id":"' + "x" * 129 + '"}',
                                                            event=APPROVAL_REQUEST),
        ev('{"approval_id":"a\\n"}', event=APPROVAL_REQUEST), ev('{"approval_id":"\\u00e9"}', event=APPROVAL_REQUEST),
        NewEvent(APPROVAL_REQUEST, '{"approval_id":"text"}', False), ev('{"approval_id":"b"}', event="other"),
        ev('{"approval_id":"' + "y" * 128 + '","n":[1,2]}', event=APPROVAL_REQUEST),
        ev('{"approval_id":"ok ~!"}', event=APPROVAL_REQUEST),
    ])
    assert await log.approvals("s") == {"y" * 128: 0, "ok ~!": 0}


async def test_input_ack_moves_forward_only(log):
    await log.create_session("s")
    for _ in range(3):
        await log.append_input("s", inp())
    assert (await log.ack_input("s", 2)).input_acked_id == 2
    assert (await log.ack_input("s", 1)).input_acked_id == 2
    for bad in (4, -1):
        with pytest.raises(BadRequest) as exc:
            await log.ack_input("s", bad)
        assert exc.value.code == "invalid_ack"
    row = await log.get_session("s")
    assert (row.input_acked_id, row.acked_id) == (2, 0)  # the output's acks are another thing
    with pytest.raises(NotFound):
        await log.ack_input("nope", 0)


async def test_delete_removes_input_keys_and_approvals(log):
    await log.append("s", [ev('{"approval_id":"a"}', event=APPROVAL_REQUEST)])
    await log.append_input("s", inp(key="k"))
    await log.append_input("s", approve("a"))
    await log.ack_input("s", 1)
    assert await log.delete_session("s")
    assert await log.read_input("s", 0, 10) == [] and await log.approvals("s") == {}
    row = await log.create_session("s")
    assert (row.input_last_id, row.input_acked_id) == (0, 0)
    again = await log.append_input("s", inp(key="k"))  # the old life's key is gone
    assert again.new and again.input.id == 1 and again.input.event_id == 1
    with pytest.raises(NotFound):
        await log.append_input("s", approve("a"))


async def test_observers_hear_the_mirror_then_the_input(log):
    heard = InputHeard()
    log.add_observer(heard)
    await log.create_session("s")
    await log.append("s", [ev()])
    await log.append_input("s", inp(key="k"))
    await log.append_input("s", inp(key="k"))  # a repeat adds nothing: nothing told
    assert heard.facts == [("appended", "s", [1]), ("appended", "s", [2]), ("input", "s", [1], 2)]


async def test_input_survives_a_reopen(make_log, log):
    if isinstance(log, MemoryLog):
        pytest.skip(reason="MemoryLog keeps nothing across a restart")
    await log.append("s", [ev('{"approval_id":"a"}', event=APPROVAL_REQUEST)])
    await log.append_input("s", inp(key="k"))
    await log.ack_input("s", 1)
    await log.close()
    second = make_log()
    await second.open()
    try:
        row = await second.get_session("s")
        assert (row.input_last_id, row.input_acked_id) == (1, 1)
        assert not (await second.append_input("s", inp(key="k"))).new
        assert (await second.append_input("s", approve("a"))).input.id == 2
    finally:
        await second.close()  # (the fixture's close of the first is a no-op now)


async def test_another_instance_s_input_reaches_this_one_s_observer(log, other):
    heard = InputHeard()
    log.add_observer(heard)
    await log.create_session("s")
    log.watched = {"s"}
    await other.append_input("s", inp())
    await until(lambda: any(f[0] == "moved" and f[4] == 1 for f in heard.facts),
                "this instance hears the other's input (its input_last_id)")
    assert [i.id for i in await log.read_input("s", 0, 10)] == [1]
    assert not [f for f in heard.facts if f[0] == "input"]


async def test_sqlite_adds_the_input_columns_to_an_older_file(tmp_path):
    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE sessions (sid INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
        epoch TEXT NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'open', completed_at INTEGER,
        last_id INTEGER NOT NULL DEFAULT 0, trimmed_id INTEGER NOT NULL DEFAULT 0,
        purged_id INTEGER NOT NULL DEFAULT 0, metadata TEXT, ttl_seconds INTEGER,
        acked_id INTEGER NOT NULL DEFAULT 0, state TEXT, state_version INTEGER NOT NULL DEFAULT 0,
        state_as_of INTEGER NOT NULL DEFAULT 0, result TEXT);
        INSERT INTO sessions (name, epoch, created_at, last_id) VALUES ('old', 'abc', 1, 0);""")
    db.commit()
    db.close()
    log = SqliteLog(path)
    await log.open()
    try:
        row = await log.get_session("old")
        assert (row.epoch, row.input_last_id, row.input_acked_id) == ("abc", 0, 0)
        assert (await log.append_input("old", inp())).input.id == 1
    finally:
        await log.close()


# -- lifecycle: every run ends, with its outcome; leases, cancels, fencing ------------------------------------------


async def test_a_run_ends_with_its_outcome_and_the_end_event_says_which(log):
    await log.append("ok", [ev()])
    row = await log.complete("ok", {"answer": 42})
    assert (row.outcome, row.run_status, row.result) == ("completed", "completed", {"answer": 42})
    assert load_json((await log.read("ok", 1, 10))[0].data) == {"answer": 42}  # v1: the result itself
    await log.append("bad", [ev()])
    row = await log.complete("bad", outcome="failed", error={"code": "tool", "message": "the tool broke"})
    assert (row.status, row.outcome, row.error) == ("completed", "failed", {"code": "tool", "message": "the tool broke"})
    end = (await log.read("bad", 1, 10))[0]
    assert end.event == END_EVENT
    assert load_json(end.data) == {"status": "failed", "error": {"code": "tool", "message": "the tool broke"}}
    await log.append("stop", [ev()])
    await log.complete("stop", {"partial": "draft"}, outcome="cancelled")
    assert load_json((await log.read("stop", 1, 10))[0].data) == {"status": "cancelled", "error": None,
                                                                  "result": {"partial": "draft"}}
    assert (await log.complete("bad", outcome="failed")).last_id == 2  # the same end again: nothing new
    with pytest.raises(Conflict) as err:
        await log.complete("bad", {"answer": 1})  # another outcome
    assert err.value.code == "session_completed" and err.value.extra == {"outcome": "failed"}
    assert (await log.get_session("bad")).last_id == 2


async def test_a_lease_ends_a_silent_run_as_timed_out(log):
    row = await log.create_session("s", lease_seconds=5)
    assert row.lease_seconds == 5 and row.deadline == row.created_at + 5000
    await log.append("s", [ev()])
    row = await log.get_session("s")
    assert row.deadline >= row.created_at + 5000  # the append renewed it
    assert await log.expire(row.deadline - 1) == 0
    assert (await log.get_session("s")).run_status == "running"
    assert await log.expire(row.deadline) == 1
    row = await log.get_session("s")
    assert (row.status, row.outcome, row.deadline) == ("completed", "timed_out", None)
    assert row.error["code"] == "lease_expired"
    end = (await log.read("s", 1, 10))[0]
    assert end.event == END_EVENT and load_json(end.data)["status"] == "timed_out"
    assert await log.expire(row.completed_at + 10**9) == 0  # ended once
    with pytest.raises(Conflict):
        await log.append("s", [ev()])
    with pytest.raises(Conflict):
        await log.lease("s")


async def test_renewing_and_changing_a_lease(log):
    await log.create_session("s")
    assert (await log.get_session("s")).deadline is None  # no lease: nothing ends it but its producer
    assert await log.expire(2**62) == 0
    row = await log.lease("s", seconds=3)
    assert row.lease_seconds == 3 and row.deadline is not None
    row = await log.lease("s", seconds=0)
    assert (row.lease_seconds, row.deadline) == (None, None)
    with pytest.raises(NotFound):
        await log.lease("nope")


async def test_the_log_s_default_lease_covers_every_new_session(make_log):
    log = make_log(lease_seconds=7)
    await log.open()
    try:
        await log.append("auto", [ev()])  # created by its first append
        await log.create_session("made")
        await log.create_session("own", lease_seconds=0)
        assert (await log.get_session("auto")).lease_seconds == 7
        assert (await log.get_session("made")).lease_seconds == 7
        assert (await log.get_session("own")).deadline is None
    finally:
        await log.close()


async def test_a_cancel_is_asked_then_confirmed_or_ended_by_the_grace(make_log):
    log = make_log(cancel_grace=3)
    await log.open()
    try:
        await log.create_session("s", lease_seconds=60)
        await log.append_input("s", inp("cancel", "null"))
        row = await log.get_session("s")
        assert row.run_status == "cancelling" and row.cancel_requested_at is not None
        assert row.deadline == row.cancel_requested_at + 3000
        await log.append("s", [ev()])  # the agent still writes: that does not put the grace off
        await log.append_input("s", inp("cancel", "null"))  # a second cancel does not either
        assert (await log.get_session("s")).deadline == row.deadline
        await log.complete("s", outcome="cancelled")  # the agent confirms
        assert (await log.get_session("s")).run_status == "cancelled"
        await log.create_session("t")  # no lease: the grace alone ends it
        await log.append_input("t", inp("cancel", "null"))
        row = await log.get_session("t")
        assert await log.expire(row.deadline - 1) == 0
        assert await log.expire(row.deadline) == 1
        row = await log.get_session("t")
        assert (row.outcome, row.error["code"]) == ("cancelled", "cancel_unconfirmed")
    finally:
        await log.close()


async def test_a_stale_producer_is_fenced_and_writes_nothing(log):
    from sse_gateway.errors import Forbidden

    await log.append("s", [ev()], producer=0)
    row = await log.lease("s", claim=True)  # a restarted agent takes over
    assert row.producer_epoch == 1
    for write in (lambda: log.append("s", [ev()], producer=0),
                  lambda: log.append("s", [ev(key="k")], producer=0),
                  lambda: log.put_state("s", {"x": 1}, None, producer=0),
                  lambda: log.lease("s", producer=0),
                  lambda: log.complete("s", outcome="failed", producer=0)):
        with pytest.raises(Forbidden) as err:
            await write()
        assert err.value.code == "producer_fenced" and err.value.extra == {"producer_epoch": 1}
    row = await log.get_session("s")
    assert (row.last_id, row.state_version, row.status) == (1, 0, "open")
    assert [e.id for e in await log.read("s", 0, 10)] == [1]
    assert (await log.append("s", [ev()], producer=1)).ids == [2]
    assert (await log.append("s", [ev()])).ids == [3]  # a write that names no epoch is not fenced
    assert (await log.append("s", [ev()], producer=4)).ids == [4]  # a newer epoch takes over
    assert (await log.get_session("s")).producer_epoch == 4
    assert (await log.lease("s", claim=True)).producer_epoch == 5


async def test_two_instances_end_a_run_once(log, other):
    row = await log.create_session("s", lease_seconds=1)
    ended = await asyncio.gather(log.expire(row.deadline), other.expire(row.deadline))
    assert sorted(ended) == [0, 1]
    assert [e.event for e in await log.read("s", 0, 10)] == [END_EVENT]


async def test_a_refused_write_never_moves_the_producer_epoch(log):
    """A write refused for another reason (412, 409) must not take the session over: the live producer
    would be fenced by a write that never happened. Concurrent, so a batching backend commits them together."""
    from sse_gateway.errors import Forbidden

    await log.append("s", [ev()])
    assert (await log.lease("s", claim=True)).producer_epoch == 1
    for first_state in (True, False):
        calls = [log.put_state("s", {"x": 1}, 99, producer=5), log.append("s", [ev()], producer=1)]
        done = await asyncio.gather(*(calls if first_state else calls[::-1]), return_exceptions=True)
        refused = [d for d in done if isinstance(d, BaseException)]
        assert [type(d) for d in refused] == [PreconditionFailed], done
        assert not any(isinstance(d, Forbidden) for d in done)
        assert (await log.get_session("s")).producer_epoch == 1
    await log.complete("s", {"a": 1}, producer=1)
    with pytest.raises(Conflict):
        await log.complete("s", {"a": 2}, producer=7)  # another result: refused, and no takeover either
    assert (await log.get_session("s")).producer_epoch == 1


# -- messages (sse_gateway/messages.py): checked atomically with the append, on every backend --------------


def msg(event: str, mid: str, **fields) -> NewEvent:
    return NewEvent(event, dump_json({"message": mid, **fields}), True, fields.pop("key", None))


async def test_message_operations_are_checked_with_the_append(log):
    r = await log.append("s", [msg("message.start", "m1", type="answer"), msg("message.append", "m1", text="Hel"),
                               msg("message.start", "m2")])
    assert r.ids == [1, 2, 3]
    refused = [
        ([msg("message.start", "m1")], "message_exists"),
        ([msg("message.append", "nope", text="x")], "message_not_found"),
        ([ev("1"), msg("message.end", "m2"), msg("message.append", "m2", text="late")], "message_closed"),
        ([msg("message.end", "m1"), msg("message.reset", "m1")], "message_closed"),
    ]
    for events, code in refused:
        with pytest.raises(Conflict) as exc:
            await log.append("s", events)
        assert exc.value.code == code
        assert (await log.get_session("s")).last_id == 3  # nothing of the batch was appended
    with pytest.raises(BadRequest) as exc:
        await log.append("s", [ev("1"), NewEvent("message.append", '{"message": "m1"}')])
    assert exc.value.code == "invalid_message"
    # what was refused changed no message: m2 still takes its end, m1 its deltas
    r = await log.append("s", [msg("message.append", "m1", text="lo"), msg("message.end", "m2", status="failed"),
                               msg("message.replace", "m2", text="whole")])
    assert r.ids == [4, 5, 6]
    # an idempotent repeat is not checked again: it learns its id
    await log.append("s", [NewEvent("message.end", '{"message":"m1"}', True, "k1")])
    r = await log.append("s", [NewEvent("message.end", '{"message":"m1"}', True, "k1")])
    assert r.ids == [7] and r.new == [False]
    assert [e.event for e in await log.read("s", 0, 100)] == [
        "message.start", "message.append", "message.start", "message.append", "message.end", "message.replace",
        "message.end"]


async def test_ending_a_run_closes_its_open_messages(log):
    await log.append("s", [msg("message.start", "a"), msg("message.start", "b"), msg("message.start", "c"),
                           msg("message.end", "b")])
    row = await log.complete("s", outcome="failed", error={"code": "boom"})
    assert row.last_id == 7
    tail = await log.read("s", 4, 100)
    assert [(e.id, e.event, load_json(e.data)) for e in tail[:2]] == [
        (5, "message.end", {"message": "a", "status": "failed"}),
        (6, "message.end", {"message": "c", "status": "failed"})]
    assert tail[2].event == END_EVENT
    await log.append("t", [msg("message.start", "a")])
    await log.complete("t", {"ok": True})
    assert load_json((await log.read("t", 1, 1))[0].data) == {"message": "a", "status": "finished"}


async def test_retention_never_cuts_a_message(make_log):
    event_log = make_log(max_events=3)
    await event_log.open()
    try:
        await event_log.append("s", [msg("message.start", "m"), *[msg("message.append", "m", text="x")] * 5])
        assert (await event_log.get_session("s")).trimmed_id == 0  # an open message keeps everything from its start
        await event_log.append("s", [msg("message.end", "m"), ev("1"), ev("2"), ev("3")])
        assert (await event_log.get_session("s")).trimmed_id == 10 - 3
        await event_log.append("s", [msg("message.start", "n"), msg("message.append", "n", text="y"), ev("4"),
                                     msg("message.end", "n"), ev("5")])
        assert (await event_log.get_session("s")).trimmed_id == 10  # 12 would cut n (11-14): it stays whole
        row = await event_log.trim("s", 15)
        assert row.trimmed_id == 15
        await event_log.append("s", [msg("message.start", "o"), ev("6"), ev("7"), ev("8")])
        row = await event_log.trim("s", 19)
        assert row.trimmed_id == 15  # o is open
    finally:
        await event_log.close()

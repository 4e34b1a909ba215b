"""Messages (sse_gateway/messages.py): the rules of the operations, and the replay rule for every cursor.

The property test writes random interleavings of start/append/end/replace/reset over several open
messages (and plain events) through the memory log, which refuses what the rules refuse; then a reader
that replays from the beginning, and a reader that resumes from every cursor it was ever given (and
again from every cursor the resumed stream gave it), each catching up to a random head before going
live, must assemble exactly what a reader that never disconnected assembled.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messages_util import View

from sse_gateway import messages
from sse_gateway.errors import BadRequest, Conflict
from sse_gateway.log.memory import MemoryLog
from sse_gateway.messages import Compactor, DictBook, cursor_text, keep_whole, merge_appends
from sse_gateway.models import NewEvent, StoredEvent, dump_json, load_json
from sse_gateway.stream import parse_position

MIDS = ["m0", "m1", "m2", "m3"]

operation = st.one_of(
    st.tuples(st.just("plain"), st.integers(0, 99)),
    st.tuples(st.just(messages.START), st.sampled_from(MIDS)),
    st.tuples(st.just(messages.APPEND), st.sampled_from(MIDS), st.text("abé\n", min_size=1, max_size=3)),
    st.tuples(st.just(messages.END), st.sampled_from(MIDS), st.sampled_from(["finished", "failed"])),
    st.tuples(st.just(messages.REPLACE), st.sampled_from(MIDS), st.text("xy", max_size=3)),
    st.tuples(st.just(messages.RESET), st.sampled_from(MIDS)),
)


def new_event(op: tuple) -> NewEvent:
    if op[0] == "plain":
        return NewEvent("token", dump_json({"n": op[1]}))
    body: dict = {"message": op[1]}
    if op[0] == messages.START:
        body["type"] = "answer"
    elif op[0] in (messages.APPEND, messages.REPLACE):
        body["text"] = op[2]
    elif op[0] == messages.END:
        body["status"] = op[2]
    return NewEvent(op[0], dump_json(body))


async def write(ops: list[list[tuple]], complete: bool = False) -> list[StoredEvent]:
    """Each inner list is one append (a batch); refused ones must leave the log as it was."""
    log = MemoryLog()
    await log.open()
    await log.create_session("s")
    for batch in ops:
        before = await log.read("s", 0, 10_000)
        try:
            await log.append("s", [new_event(op) for op in batch])
        except Conflict as exc:
            assert exc.code in ("message_exists", "message_not_found", "message_closed")
            assert await log.read("s", 0, 10_000) == before
    events = await log.read("s", 0, 10_000)
    if complete:  # a run that ends closes what is open
        await log.complete("s", {"ok": True})
        events = await log.read("s", 0, 10_000)
    return events


def replay(events: list[StoredEvent], cursor: str, head: int) -> list[tuple[str, str, object]]:
    """What a stream sends from ``cursor`` when it catches up at ``head``, then live: (cursor, type, data)."""
    p, hold, _ = parse_position(cursor)
    walk = Compactor(p, hold)
    out = merge_appends([pair for ev in events if walk.walk_from < ev.id <= head for pair in walk.feed(ev)])
    out += walk.flush()
    out += [(ev, 0) for ev in events if ev.id > max(head, walk.pos)]
    return [(cursor_text(ev.id, h), ev.event, load_json(ev.data)) for ev, h in out]


def view(start: View | None, sent: list[tuple[str, str, object]]) -> View:
    v = View()
    if start is not None:
        v.plain, v.messages, v.cursor = list(start.plain), {k: dict(m) for k, m in start.messages.items()}, start.cursor
    for cursor, event, data in sent:
        v.take(event, data, cursor)
    return v


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(operation, min_size=1, max_size=3), max_size=25), st.booleans(), st.integers(0, 2**32))
def test_every_cursor_assembles_what_a_live_reader_did(ops, complete, seed):
    rng = random.Random(seed)
    events = asyncio.run(write(ops, complete))
    last = events[-1].id if events else 0
    live = view(None, [(str(ev.id), ev.event, load_json(ev.data)) for ev in events]).state()

    def head_from(cursor: str) -> int:
        return rng.randint(parse_position(cursor)[0], last)

    first = replay(events, "0", head_from("0"))
    assert view(None, first).state() == live
    for i in range(len(first) + 1):
        had = view(None, first[:i])
        again = replay(events, had.cursor, head_from(had.cursor))
        assert view(had, again).state() == live, (had.cursor, first, again)
        for j in rng.sample(range(len(again) + 1), min(3, len(again) + 1)):
            had2 = view(had, again[:j])
            assert view(had2, replay(events, had2.cursor, head_from(had2.cursor))).state() == live


def test_a_reader_from_the_start_gets_each_message_once_and_whole():
    events = asyncio.run(write([[(messages.START, "m0")], [(messages.START, "m1")], [("plain", 1)],
                                [(messages.APPEND, "m0", "Hel")], [(messages.APPEND, "m1", "x")],
                                [(messages.APPEND, "m0", "lo")], [(messages.END, "m0", "finished")],
                                [(messages.APPEND, "m1", "y")]]))
    sent = replay(events, "0", events[-1].id)
    assert sent == [
        ("3/1", "token", {"n": 1}),
        ("7/2", "message.snapshot", {"message": "m0", "type": "answer", "metadata": None, "text": "Hello",
                                     "status": "finished", "start": 1}),
        ("8", "message.snapshot", {"message": "m1", "type": "answer", "metadata": None, "text": "xy",
                                   "status": "open", "start": 2}),
    ]
    # the reader cut after the plain event has not seen m0's first delta: it gets m0 whole, then m1
    assert [c for c, _, _ in replay(events, "3/1", 8)] == ["7/2", "8"]
    # a reader inside both messages gets exactly the deltas after its cursor
    assert [(c, e) for c, e, _ in replay(events, "5", 8)] == [("6", "message.append"), ("7", "message.end"),
                                                             ("8", "message.append")]
    # a reader behind gets a run of deltas of one message as one, which says how many it stands for
    events = asyncio.run(write([[(messages.START, "m")], [(messages.APPEND, "m", t) for t in "abc"],
                                [("plain", 1)], [(messages.APPEND, "m", "d")]]))
    assert replay(events, "1", 6) == [("4", messages.APPEND, {"message": "m", "text": "abc", "count": 3}),
                                      ("5", "token", {"n": 1}), ("6", messages.APPEND, {"message": "m", "text": "d"})]


def test_operations_are_checked():
    book = DictBook({"done": (1, 5), "open": (3, 0)})
    with pytest.raises(Conflict) as exc:
        messages.check(book, [(9, messages.START, "open")])
    assert exc.value.code == "message_exists"
    for op in (messages.APPEND, messages.END, messages.RESET):
        with pytest.raises(Conflict) as exc:
            messages.check(book, [(9, op, "done")])
        assert exc.value.code == "message_closed"
        with pytest.raises(Conflict) as exc:
            messages.check(book, [(9, op, "nope")])
        assert exc.value.code == "message_not_found"
    assert messages.check(book, [(9, messages.REPLACE, "done"), (10, messages.REPLACE, "open")]) == \
        {"open": (3, 10)}  # a closed message replaced stays closed where it was
    assert messages.check(book, [(9, messages.START, "new"), (10, messages.END, "new")]) == {"new": (9, 10)}
    assert book.changes == {}  # check writes nothing


@pytest.mark.parametrize(("event", "data", "why"), [
    (messages.START, '"m1"', "must be an object"),
    (messages.START, '{"message": 7}', "message must be"),
    (messages.START, '{"message": "a b"}', "message must be"),
    (messages.APPEND, '{"message": "m"}', "needs text"),
    (messages.APPEND, '{"message": "m", "text": 3}', "must be a string"),
    (messages.END, '{"message": "m", "status": "done"}', "finished or failed"),
    (messages.RESET, '{"message": "m", "text": ""}', "unknown field"),
    (messages.START, '{"message": "m", "type": "a b"}', "type must be"),
])
def test_malformed_operations_are_refused(event, data, why):
    with pytest.raises(BadRequest) as exc:
        messages.operations([NewEvent("token", "1"), NewEvent(event, data)])
    assert exc.value.code == "invalid_message" and why in exc.value.message
    with pytest.raises(BadRequest):
        messages.operations([NewEvent(messages.START, "m1", is_json=False)])


def test_trimming_never_cuts_a_message():
    spans = {"a": (2, 4), "b": (5, 0), "c": (7, 9)}.values()

    def between(after, through):
        return [s for s in spans if after < s[0] <= through]
    assert keep_whole(3, 0, between) == 1  # inside a: before it
    assert keep_whole(4, 0, between) == 4  # a closed at 4: whole
    assert keep_whole(8, 0, between) == 4  # b is open: nothing from its start
    assert keep_whole(8, 4, between) == 4


def test_cursors():
    assert parse_position(" 7/3:abc ") == (7, 3, "abc")
    assert parse_position("5/6") == parse_position("5/0") == parse_position("5") == (5, 0, None)  # holds nothing
    for bad in ("x/1", "5/", "/5", "5/1/1"):
        with pytest.raises(BadRequest):
            parse_position(bad)


def test_history_compacted_pages_through_every_cursor(app_client):
    """GET .../events?compact=true: the replay rule, page by page; any page size assembles the same."""
    c = app_client
    body = [{"event": messages.START, "data": {"message": "a", "type": "answer"}},
            {"event": messages.START, "data": {"message": "b"}}]
    for i in range(5):
        body += [{"event": messages.APPEND, "data": {"message": "a", "text": f"{i}"}},
                 {"event": "tool", "data": i},
                 {"event": messages.APPEND, "data": {"message": "b", "text": "b"}}]
    body += [{"event": messages.END, "data": {"message": "a"}}]
    assert c.post("/v1/sessions/h/events", json=body).status_code == 201
    plain = c.get("/v1/sessions/h/events", params={"limit": 1000}).json()["events"]
    whole = view(None, [(str(e["id"]), e["event"], e["data"]) for e in plain]).state()
    for limit in (1, 2, 3, 100):
        got, after = View(), "0"
        for _ in range(50):
            page = c.get("/v1/sessions/h/events", params={"compact": "true", "after": after, "limit": limit}).json()
            for e in page["events"]:
                got.take(e["event"], e["data"], e["cursor"])
            if after == page["next_after"]:
                break
            after = page["next_after"]
        assert got.state() == whole, limit
    page = c.get("/v1/sessions/h/events", params={"compact": "true"}).json()
    assert [(e["cursor"], e["event"]) for e in page["events"]] == [
        ("4/1", "tool"), ("7/1", "tool"), ("10/1", "tool"), ("13/1", "tool"), ("16/1", "tool"),
        ("18/2", messages.SNAPSHOT), ("18", messages.SNAPSHOT)]
    assert page["next_after"] == "18"
    r = c.get("/v1/sessions/h/events", params={"after": "3/x"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_after")
    r = c.get("/v1/sessions/h/events", params={"compact": "maybe"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_compact")


def test_the_state_with_the_messages_as_of_its_cursor(app_client):
    c = app_client
    body = [{"event": messages.START, "data": {"message": "a", "type": "answer"}},
            {"event": messages.APPEND, "data": {"message": "a", "text": "Hel"}},
            {"event": messages.START, "data": {"message": "b"}},
            {"event": messages.END, "data": {"message": "b", "status": "failed"}}]
    assert c.post("/v1/sessions/st/events", json=body).status_code == 201
    assert c.put("/v1/sessions/st/state", json={"step": 2}).status_code == 200
    c.post("/v1/sessions/st/events", json={"event": messages.APPEND, "data": {"message": "a", "text": "lo"}})
    got = c.get("/v1/sessions/st/state", params={"messages": "true"}).json()
    assert got["as_of"].startswith("4:") and got["state"] == {"step": 2}
    assert got["messages"] == [
        {"message": "a", "type": "answer", "metadata": None, "text": "Hel", "status": "open", "start": 1},
        {"message": "b", "type": None, "metadata": None, "text": "", "status": "failed", "start": 3}]
    assert "messages" not in c.get("/v1/sessions/st/state").json()
    r = c.get("/v1/sessions/st/state", params={"messages": "yes"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_messages")


def test_operations_stored_before_messages_existed_read_as_plain_events():
    legacy = [StoredEvent(1, messages.START, '"m"', True, 0), StoredEvent(2, messages.APPEND, "text", False, 0),
              StoredEvent(3, messages.APPEND, '{"message": "m", "text": 1}', True, 0)]
    walk = Compactor(0)
    assert [e for ev in legacy for e, _ in walk.feed(ev)] == legacy and walk.flush() == []
    assert merge_appends([(ev, 0) for ev in legacy]) == [(ev, 0) for ev in legacy]


def _sse(app_client, session: str, cursor: str) -> list[tuple[str, str, object]]:
    """What a ``live=false`` stream sends from ``cursor``: (id or None, type, data)."""
    import json

    from httpx_sse import EventSource
    with app_client.stream("GET", f"/v1/sessions/{session}/stream", params={"live": "false"},
                           headers={"Last-Event-ID": cursor}) as r:
        return [(sse.id or None, sse.event, json.loads(sse.data)) for sse in EventSource(r).iter_sse() if sse.data]


def test_a_resume_from_a_trimmed_cursor_reports_the_gap_and_no_half_message(app_client):
    c = app_client
    body = [{"event": messages.START, "data": {"message": "a"}}, {"event": "tool", "data": 1},
            {"event": messages.APPEND, "data": {"message": "a", "text": "x"}},
            {"event": messages.END, "data": {"message": "a"}},
            {"event": messages.START, "data": {"message": "b"}}, {"event": "tool", "data": 2},
            {"event": messages.APPEND, "data": {"message": "b", "text": "y"}}]
    assert c.post("/v1/sessions/tr/events", json=body).status_code == 201
    assert c.post("/v1/sessions/tr/trim", json={"through": 6}).json()["earliest_id"] == 5  # b (5-) stays whole
    got = _sse(c, "tr", "2/1")  # cut after the first tool event, a held back: a was trimmed meanwhile
    assert got[0] == (None, "gateway.gap", {"from": 1, "to": 4})
    assert [(i.split(":")[0], e) for i, e, _ in got[1:]] == [("6/5", "tool"), ("7", messages.SNAPSHOT)]
    assert got[2][2]["text"] == "y"

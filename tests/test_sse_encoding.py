"""SSE framing: whatever a publisher sends round-trips exactly and cannot forge a field or an event."""

from __future__ import annotations

import re

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from httpx_sse._decoders import SSEDecoder

from sse_gateway.models import StoredEvent
from sse_gateway.sse import encode_control, encode_event, encode_retry

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
event_types = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)


def parse(stream: bytes) -> list:
    """Parse with a standard SSE decoder (httpx-sse), lines split as the SSE standard does."""
    decoder = SSEDecoder()
    events = []
    for line in re.split(r"\r\n|\r|\n", stream.decode())[:-1]:  # the last piece is not a line
        sse = decoder.decode(line)
        if sse is not None:
            events.append(sse)
    return events


@settings(max_examples=400)
@given(value=json_values, event=event_types, id_=st.integers(1, 2**53))
def test_json_data_round_trips_as_one_event(value, event, id_):
    data = orjson.dumps(value).decode()
    frame = encode_event(StoredEvent(id_, event, data, True, 0), "ep0ch1")
    assert frame.count(b"\n\n") == 1 and frame.endswith(b"\n\n")
    (sse,) = parse(frame)
    assert sse.id == f"{id_}:ep0ch1"
    assert sse.event == event
    assert orjson.loads(sse.data) == value


@settings(max_examples=400)
@given(text=st.text(), event=event_types)
def test_text_data_round_trips_with_line_breaks_normalised(text, event):
    frame = encode_event(StoredEvent(7, event, text, False, 0), "abc")
    (sse,) = parse(frame)
    assert sse.data == re.sub(r"\r\n|\r", "\n", text)
    assert sse.id == "7:abc" and sse.event == event


@settings(max_examples=300)
@given(texts=st.lists(st.lists(st.sampled_from(["\r", "\n", ":", "a", "data", "event", "id", " ", "\x00", "\u2028",
                                                "\ufeff", "retry"])).map("".join), min_size=1, max_size=5))
def test_hostile_text_never_forges_frames(texts):
    stream = b"".join(encode_event(StoredEvent(i + 1, "message", t, False, 0), "e") for i, t in enumerate(texts))
    events = parse(stream)
    assert [e.id for e in events] == [f"{i + 1}:e" for i in range(len(texts))]
    assert all(e.event == "message" for e in events)
    assert [e.retry for e in events] == [None] * len(texts)


def test_forged_frame_arrives_as_data_of_one_event():
    text = "hello\r\n\r\nevent: forged\ndata: x\nid: 999"
    (sse,) = parse(encode_event(StoredEvent(1, "message", text, False, 0), "e"))
    assert sse.event == "message" and sse.id == "1:e"
    assert sse.data == "hello\n\nevent: forged\ndata: x\nid: 999"


def test_control_frames_carry_no_id():
    frame = encode_control("gateway.gap", {"from": 3, "to": 9})
    assert b"id:" not in frame
    (sse,) = parse(frame)
    assert sse.event == "gateway.gap" and orjson.loads(sse.data) == {"from": 3, "to": 9}


def test_retry_is_jittered_upwards():
    values = {int(encode_retry(1000).split()[1]) for _ in range(50)}
    assert min(values) >= 1000 and max(values) <= 1500 and len(values) > 5


@settings(max_examples=300)
@given(value=json_values, id_=st.integers(1, 2**53),
       forged=st.lists(st.sampled_from(["\u2028", "\u2029", "\x85", "id: 999:x", "event: gateway.end", "data: x",
                                        "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]), max_size=8))
def test_json_data_is_one_line_even_for_parsers_that_split_like_splitlines(value, id_, forged):
    """A decoder splitting with ``str.splitlines`` (httpx-sse 0.4.0 did) still sees one event, unchanged."""
    data = orjson.dumps([value, "".join(forged)]).decode()
    frame = encode_event(StoredEvent(id_, "token", data, True, 0), "ep0ch1")
    decoder = SSEDecoder()
    events = [e for line in frame.decode().splitlines() if (e := decoder.decode(line)) is not None]
    assert len(events) == 1
    assert events[0].id == f"{id_}:ep0ch1" and events[0].event == "token"
    assert orjson.loads(events[0].data) == [value, "".join(forged)]

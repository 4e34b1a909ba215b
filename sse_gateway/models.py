"""What the log holds: events, sessions, and the rules for their names.

These are plain slotted dataclasses, not Pydantic models: they sit on the
hot path (every published and every delivered event).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from . import rules
from .errors import BadRequest

SESSION_ID_RE = re.compile(rules.SESSION_ID)
EVENT_TYPE_RE = re.compile(rules.EVENT_TYPE)
END_EVENT = "gateway.end"

_EPOCH_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def check_session_id(session: str) -> str:
    if not SESSION_ID_RE.fullmatch(session):
        raise BadRequest(
            "session id must be 1-128 characters of A-Z a-z 0-9 _ . ~ - and not '.' or '..'",
            "invalid_session_id",
        )
    return session


def check_event_type(event: Any) -> str:
    if not isinstance(event, str) or not EVENT_TYPE_RE.fullmatch(event):
        raise BadRequest("event type must be 1-64 characters of A-Z a-z 0-9 _ . : -", "invalid_event_type")
    if event.startswith(rules.RESERVED_PREFIX):
        raise BadRequest("event types beginning with 'gateway.' are reserved", "reserved_event_type")
    return event


def new_epoch() -> str:
    """A short random token that tells one life of a session id from another."""
    return "".join(secrets.choice(_EPOCH_ALPHABET) for _ in range(6))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    secs, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


@dataclass(slots=True)
class NewEvent:
    """An event a publisher asked to append. ``data`` is JSON text when ``is_json``."""

    event: str
    data: str
    is_json: bool = True
    idempotency_key: str | None = None


@dataclass(slots=True)
class StoredEvent:
    id: int
    event: str
    data: str
    is_json: bool
    ts: int  # milliseconds since the epoch, UTC

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "event": self.event,
            "data": orjson.Fragment(self.data) if self.is_json else self.data,
            "ts": rfc3339(self.ts),
        }


def dump_json(value: Any) -> str:
    """Compact JSON on one line (control characters escaped), integers of any size kept exact."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits (orjson's limit); rare, so the slow path is fine
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


#: one C pass over a body (bytes.translate) answers two questions: digits become 0, so a run of 19 of them is an
#: integer orjson may turn into a float (LONG_DIGITS); "{" becomes "[", so one count gives the opening brackets
DIGITS_TO_ZERO = bytes.maketrans(b"123456789{", b"000000000[")
LONG_DIGITS = b"0" * 19


def load_json(text: str) -> Any:
    """A JSON document the log stored (``dump_json``'s text), read back as it was written: orjson turns an
    integer beyond 64 bits into a float, so a text with a run of 19 digits is read by the standard library."""
    raw = text.encode()
    if LONG_DIGITS in raw.translate(DIGITS_TO_ZERO):
        return json.loads(text)
    return orjson.loads(raw)



@dataclass(slots=True)
class Session:
    """One session's row: everything but its events and idempotency keys."""

    id: str
    epoch: str
    created_at: int
    status: str = "open"  # or "completed"
    completed_at: int | None = None
    last_id: int = 0
    trimmed_id: int = 0  # every id <= trimmed_id was removed by retention
    metadata: Any = None
    ttl_seconds: int | None = None
    acked_id: int = 0
    state: Any = None
    state_version: int = 0
    state_as_of: int = 0
    result: Any = None
    input_last_id: int = 0  # the last input id (user -> agent), 0 before the first
    input_acked_id: int = 0  # every input id <= this the agent confirmed it handled
    outcome: str | None = None  # how the run ended (OUTCOMES), None while open
    error: Any = None  # what the run ended with when it did not complete
    lease_seconds: int | None = None  # the producer's lease (None or 0: no lease)
    deadline: int | None = None  # when an open run ends unless its producer writes or renews (ms)
    cancel_requested_at: int | None = None  # when the first cancel input was stored (ms)
    producer_epoch: int = 0  # writes that name an older producer epoch are refused
    webhook_url: str | None = None  # where to notify when nobody watches (else the gateway's)

    @property
    def earliest_id(self) -> int:
        return self.trimmed_id + 1

    @property
    def run_status(self) -> str:
        """``running``, ``cancelling`` (a cancel was asked for), or the outcome once the run ended."""
        if self.outcome is not None:
            return self.outcome
        return "running" if self.cancel_requested_at is None else "cancelling"

    @property
    def completed(self) -> bool:
        return self.status == "completed"


INPUT_KINDS = ("message", "steer", "approval", "cancel")
OUTCOMES = ("completed", "failed", "cancelled", "timed_out")  # how a run ends; the agent names the first three
DECISIONS = ("approve", "deny")
INPUT_EVENT = "gateway.input"  # the mirror of an input in the output stream
APPROVAL_REQUEST = "approval.request"  # an output event that opens an approval (data: {"approval_id": ...})


@dataclass(slots=True)
class NewInput:
    """An input a client sends to a session's agent. ``data`` is JSON text."""

    kind: str
    data: str = "null"
    idempotency_key: str | None = None
    approval_id: str | None = None  # kind approval: the request it answers
    decision: str | None = None  # kind approval: approve | deny


@dataclass(slots=True)
class StoredInput:
    id: int
    kind: str
    data: str  # JSON text
    ts: int
    event_id: int  # the id of its mirror (``gateway.input``) in the output log
    approval_id: str | None = None
    decision: str | None = None

    def to_json(self) -> dict:
        body = {"id": self.id, "kind": self.kind, "data": orjson.Fragment(self.data), "ts": rfc3339(self.ts),
                "event_id": self.event_id}
        if self.approval_id is not None:
            body["approval_id"] = self.approval_id
            body["decision"] = self.decision
        return body


@dataclass(slots=True)
class InputResult:
    """What ``append_input`` did: ``new`` is False for an idempotent repeat (nothing stored again)."""

    input: StoredInput
    new: bool
    input_last_id: int
    last_id: int  # the output log's last id after the mirror event
    epoch: str


def mirror_tail(item: NewInput) -> str:
    """The mirror event's JSON after its leading ``{"input_id":N,`` (which only the store can write: N is
    given at commit). Every backend joins the two the same way (``mirror_data``; Redis in Lua)."""
    body: dict = {"kind": item.kind, "data": orjson.Fragment(item.data)}
    if item.approval_id is not None:
        body["approval_id"] = item.approval_id
        body["decision"] = item.decision
    return orjson.dumps(body).decode()[1:]


def mirror_data(input_id: int, tail: str) -> str:
    return '{"input_id":%d,%s' % (input_id, tail)


@dataclass(slots=True)
class AppendResult:
    """What an append did: one id per event asked for; ``new`` is False for an idempotent replay."""

    ids: list[int]
    new: list[bool]
    last_id: int
    events: list[StoredEvent]  # the events actually appended, in id order
    epoch: str  # the session's epoch: with an id, the cursor ``ID:EPOCH`` of an event

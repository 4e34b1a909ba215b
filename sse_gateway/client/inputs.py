"""The return path: what users send an agent (messages, steering, approvals, cancels), read by the agent.

``Input`` is one input as the agent reads it; ``InputSent`` the gateway's answer to whoever sent it;
``InputReader`` the agent's stream of inputs (``GET /v1/sessions/{id}/input/stream``), with the
exact resume of ``Subscriber``: after a drop it reconnects with ``Last-Event-ID`` set to the last
input it yielded, and a reader opened without a cursor starts right after ``input_acked_id``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from .http import session_path
from .subscriber import Event, Reconnect, Subscriber

#: The kinds of input the gateway takes.
InputKind = Literal["message", "steer", "approval", "cancel"]
INPUT_KINDS: tuple[str, ...] = ("message", "steer", "approval", "cancel")
#: The answers to an approval request.
Decision = Literal["approve", "deny"]
DECISIONS: tuple[str, ...] = ("approve", "deny")


@dataclass(frozen=True)
class InputSent:
    """The answer to ``send_input``: the input's ``id``, the ``event_id`` of its ``gateway.input``
    mirror in the output, and ``created`` False when the idempotency key named an input stored before."""

    id: int
    session: str
    kind: str
    event_id: int
    input_last_id: int
    epoch: str | None
    created: bool
    raw: dict[str, Any]


@dataclass(frozen=True)
class Input:
    """One input, as the agent reads it.

    ``id`` counts the session's inputs (1, 2, ...; apart from event ids), ``cursor`` is
    ``ID:EPOCH``, ``event_id`` the id of its mirror in the output. ``approval_id`` and ``decision``
    are set for ``kind == "approval"``. ``await item.ack()`` confirms this input and every one
    before it (``input_acked_id`` only moves forward).
    """

    id: int
    kind: str
    data: Any
    ts: str | None
    event_id: int | None
    cursor: str | None
    approval_id: str | None = None
    decision: str | None = None
    _ack: Callable[[int], Awaitable[Any]] | None = field(default=None, repr=False, compare=False)

    @property
    def reason(self) -> str | None:
        """For a cancel: the ``reason`` its data gives (``{"reason": ...}`` or a plain string), if any."""
        if isinstance(self.data, dict) and isinstance(self.data.get("reason"), str):
            return self.data["reason"]
        return self.data if isinstance(self.data, str) else None

    async def ack(self) -> None:
        """Confirm this input (and those before it) as handled: a restarted agent is not given it again."""
        if self._ack is None:
            raise RuntimeError("this input was not read by a reader that can ack it")
        await self._ack(self.id)


def input_from(body: dict[str, Any], cursor: str | None = None,
               ack: Callable[[int], Awaitable[Any]] | None = None) -> Input:
    """An ``Input`` from the JSON of the stream's ``data:`` or of ``GET .../input``."""
    return Input(int(body["id"]), str(body["kind"]), body.get("data"), body.get("ts"),
                 int(body["event_id"]) if body.get("event_id") is not None else None, cursor,
                 body.get("approval_id"), body.get("decision"), ack)


def input_body(kind: str, data: Any = None, *, approval_id: str | None = None, decision: str | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
    """The body of ``POST .../input``, checked here for the mistakes the gateway would refuse."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"invalid input kind {kind!r}: one of {', '.join(INPUT_KINDS)}")
    body: dict[str, Any] = {"kind": kind}
    if data is not None:
        body["data"] = data
    if kind == "approval":
        if not approval_id or decision not in DECISIONS:
            raise ValueError("an approval needs approval_id and decision ('approve' or 'deny')")
        body["approval_id"], body["decision"] = approval_id, decision
    elif approval_id is not None or decision is not None:
        raise ValueError("approval_id and decision go only with kind 'approval'")
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    return body


def input_sent(response: httpx.Response) -> InputSent:
    data = response.json()
    return InputSent(int(data["id"]), str(data["session"]), str(data["kind"]), int(data["event_id"]),
                     int(data["input_last_id"]), data.get("epoch"), response.status_code == 201, data)


class InputReader(Subscriber):
    """An agent's input, in order, each once, resuming exactly after every drop.

    ``async for item in InputReader("run1", key=KEY):`` yields ``Input``. Without ``cursor`` or
    ``from_`` it starts right after the session's ``input_acked_id``: a restarted agent gets exactly
    what it had not acked. ``from_`` is ``"earliest"``, ``"acked"``, ``"latest"`` or a cursor. It
    reconnects like ``Subscriber`` (the same backoff, ``give_up_after``, ``on_reconnect``) and never
    ends by itself while the session exists (a deleted session raises ``GatewayError(404)``).
    Opening the stream does not ack: ack with ``item.ack()`` (given ``ack``) or ``Publisher.ack_input``.
    """

    _latest_field = "input_last_id"  # from_="latest": after the last input, not the last output event

    def __init__(self, session: str, *, url: str | None = None, key: str | None = None, cursor: str | None = None,
                 from_: str | None = None, give_up_after: float = 60.0, read_timeout: float = 60.0,
                 backoff_cap: float = 10.0, client: httpx.AsyncClient | None = None,
                 on_reconnect: Callable[[Reconnect], None] | None = None,
                 ack: Callable[[int], Awaitable[Any]] | None = None) -> None:
        super().__init__(session, url=url, key=key, cursor=cursor, from_=from_, live=True,
                         give_up_after=give_up_after, read_timeout=read_timeout, backoff_cap=backoff_cap,
                         parse_json=True, client=client, on_reconnect=on_reconnect)
        self.stream_url = self.url + session_path(self.session) + "/input/stream"
        self._ack = ack

    def __aiter__(self) -> AsyncIterator[Input]:  # type: ignore[override]
        return self.inputs()

    async def inputs(self) -> AsyncIterator[Input]:
        async for event in self.events():
            item = self.to_input(event)
            if item is not None:
                yield item

    def to_input(self, event: Event) -> Input | None:
        """The input an event of the stream carries (None for notices such as ``gateway.reset``)."""
        if event.id is None or not isinstance(event.data, dict) or "kind" not in event.data:
            return None
        return input_from(event.data, event.cursor, self._ack)

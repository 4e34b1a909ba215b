"""Simulated agent runs for the demo page: the gateway publishes into its own log.

``POST /v1/demo/runs`` creates a session and starts a background task that
writes its answer as one message (``message.start``, then a few hundred
``message.append`` token deltas), asks for approval before its "tool
call" (an ``approval.request``) and waits for the answer for the heartbeat
plus one second (so a visitor sees a quiet stream stay open, the answer
still open; no answer: it goes ahead by itself, so the demo never hangs),
calls the tool (or skips it when denied), types some more, ends the message
(``message.end``) and completes the session with the whole text as its
result. It reads its session's input as an agent does: a ``cancel`` stops
it at once, and it ends the message as ``failed`` and the run as
``cancelled``, both with the error ``{"code": "cancelled", "message": <the
cancel's reason>}``, and the text typed so far as the run's result. The run publishes through the same path as
an HTTP publisher, so the demo shows exactly what a real agent gets.

The task is kept by ``Gateway.spawn`` and cancelled at shutdown; a run cut
short that way leaves its session open, like an agent that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from .auth import INPUT_SCOPE, SCOPE
from .bodies import json_object
from .errors import BadRequest, GatewayError, TooManyRequests
from .models import NewEvent, StoredInput

log = logging.getLogger("sse_gateway.demo")

router = APIRouter(tags=["demo"])

DEFAULT_DURATION = 20.0
MAX_DURATION = 300.0
MIN_TYPING = 2.0  # seconds of typing, however short the requested run
KEEP_SECONDS = 3600  # a finished demo session is removed after this
MAX_BODY = 4096
TOOL_SECONDS = 1.0  # the tool call itself, once it may run
APPROVAL_ID = "search_docs-1"
MAX_RUNS = 16  # simulated runs at once per process; one more is 429 (each is a task of up to MAX_DURATION)
RUNS_RETRY_AFTER = 10
STOPPED = "the user pressed Stop"  # a cancelled run's error message when its cancel gave no reason
ANSWER = "answer"  # the id of the run's one message

PART_ONE = (
    "You asked why an agent's answer sometimes vanishes when the connection drops. The short version: the "
    "answer lived in the connection, and connections are fragile. Proxies close streams that look idle, "
    "phones switch from Wi-Fi to cellular, laptops sleep, and every deploy restarts the servers one by one. "
    "Each of those ends an HTTP response, and whatever the agent wrote after that point is lost.\n\n"
    "Press Drop connection while I type, or reload the page: this text continues exactly where it stopped. "
    "Meanwhile, let me look up how the gateway does it: I will ask you first."
)
PART_TWO = (
    "\n\nHere is what I found. The gateway separates the session from the connection. The agent publishes "
    "every token into a durable, append-only log, and each event gets the next id: 1, 2, 3, with no holes. "
    "The browser reads that log as Server-Sent Events, so it always knows the id of the last event it has: "
    "its cursor. When a connection drops, EventSource reconnects by itself and sends the cursor back as "
    "Last-Event-ID. The gateway replays exactly the events after it, then continues live. Nothing is lost "
    "and nothing arrives twice.\n\n"
    "While that lookup was running, nothing was published for a while. The gateway filled the silence with "
    "heartbeat comments, so no proxy closed the stream as idle. Your browser never shows them, but they kept "
    "this connection open.\n\n"
    "And this answer is one message: each token is a delta appended to it. A page that opens the run late "
    "gets the message whole, in one event, then the deltas that follow. "
    "Done: the final result is this whole text, delivered as gateway.end."
)

START_RUN_DOC: dict[str, Any] = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"duration": {"type": "number", "minimum": 1, "maximum": MAX_DURATION,
                                        "description": "approximate length of the run in seconds (default 20); "
                                        "the tool-call pause always lasts the heartbeat plus one second"}},
        }}},
    },
}


def split_tokens(text: str) -> list[str]:
    """Word pieces the way a language model emits them: a word with its leading space, long ones split."""
    pieces = []
    for word in re.findall(r"\s*\S+", text):
        rest = word
        while len(rest) > 6:
            pieces.append(rest[:4])
            rest = rest[4:]
        pieces.append(rest)
    return pieces


@router.post("/v1/demo/runs", status_code=201, openapi_extra=START_RUN_DOC,
             summary="Start a simulated agent run (the demo page)")
async def start_run(request: Request) -> Response:
    gw = request.app.state.gw
    gw.auth.publisher(request)
    spec = await json_object(request, MAX_BODY, frozenset({"duration"}), '{"duration"?}', "invalid_body")
    duration = _duration(spec)
    runs = _running(request)
    if len(runs) >= MAX_RUNS:
        raise TooManyRequests(f"{MAX_RUNS} demo runs are already running here; try again shortly", "too_many_demo_runs",
                          retry_after=RUNS_RETRY_AFTER)
    await gw.writes.admit_session()
    session = "demo-" + secrets.token_urlsafe(8)
    row = await gw.log.create_session(session, metadata={"demo": True}, ttl_seconds=KEEP_SECONDS)
    runs.add(session)
    gw.spawn(simulate(gw, session, duration, done=lambda: runs.discard(session)))
    stream_url = f"/v1/sessions/{session}/stream"
    token = gw.auth.mint(session, epoch=row.epoch, scopes=(SCOPE, INPUT_SCOPE))  # the page may also Stop, approve
    if token:
        stream_url += f"?token={token[0]}"
    body = {"session": session, "stream_url": stream_url, "heartbeat": gw.settings.heartbeat,
            "duration": duration}
    return Response(orjson.dumps(body), 201, media_type="application/json")


def _running(request: Request) -> set[str]:
    """The sessions of this app's demo runs that are still typing."""
    state = request.app.state
    if not hasattr(state, "demo_runs"):
        state.demo_runs = set()
    return state.demo_runs


def _duration(spec: dict) -> float:
    duration = spec.get("duration", DEFAULT_DURATION)
    if isinstance(duration, bool) or not isinstance(duration, int | float) or not 1 <= duration <= MAX_DURATION:
        raise BadRequest(f"duration must be a number of seconds between 1 and {MAX_DURATION:g}", "invalid_duration")
    return float(duration)


class RunInput:
    """The simulated run's reading of its session's input, as an agent reads it: in order, from after its
    ack, each input handled once and then acked. A ``cancel`` sets ``cancelled``; an approval answers
    ``decisions``. ``changed`` is set on each input, for whoever waits on one of these."""

    def __init__(self, gw, session: str) -> None:
        self.gw = gw
        self.session = session
        self.cancelled = False
        self.reason: str | None = None
        self.decisions: dict[str, str] = {}
        self.changed = asyncio.Event()

    async def read(self) -> None:
        row = await self.gw.log.get_session(self.session)
        if row is None:
            return
        waiter = self.gw.inputs.watch(self.session, row.input_acked_id, row.epoch)
        try:
            while not waiter.closed:
                waiter.clear()
                items = await self.gw.log.read_input(self.session, waiter.cursor, 100)
                if not items:
                    await waiter.wait(3600)
                    continue
                for item in items:
                    self._handle(item)
                waiter.cursor = items[-1].id
                await self.gw.log.ack_input(self.session, waiter.cursor)
                self.changed.set()
        except GatewayError as exc:
            log.info("demo run %s stopped reading its input: %s", self.session, exc.message)
        finally:
            self.gw.inputs.unwatch(waiter)

    def _handle(self, item: StoredInput) -> None:
        data = orjson.loads(item.data)
        if item.kind == "cancel" and not self.cancelled:
            self.cancelled = True
            reason = data.get("reason") if isinstance(data, dict) else data
            self.reason = reason if isinstance(reason, str) else None
        elif item.kind == "approval" and item.approval_id and item.decision:
            self.decisions[item.approval_id] = item.decision

    async def wait(self, seconds: float, until) -> None:
        """Up to ``seconds``, or until ``until()`` holds (checked on each input)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not until() and (left := deadline - loop.time()) > 0:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.changed.wait()


async def simulate(gw, session: str, duration: float, done=lambda: None) -> None:
    """Type PART_ONE into the answer (a message), ask to run a slow tool and wait for the answer for longer
    than the heartbeat, run it (or skip it), type PART_TWO, end the answer, complete. A cancel input stops
    it wherever it is, and the answer ends failed and the run cancelled."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    pause = gw.settings.heartbeat + 1.0
    first, second = split_tokens(PART_ONE), split_tokens(PART_TWO)
    interval = max(duration - pause, MIN_TYPING) / (len(first) + len(second))
    typed: list[str] = []
    inputs = RunInput(gw, session)
    reader = asyncio.create_task(inputs.read())

    async def publish(event: str, data: Any) -> None:
        await gw.writes.append(session, [NewEvent(event, orjson.dumps(data).decode())])

    async def type_out(pieces: list[str]) -> None:
        begin = loop.time()
        for i, piece in enumerate(pieces):
            if inputs.cancelled:
                return
            await publish("message.append", {"message": ANSWER, "text": piece})
            typed.append(piece)
            await inputs.wait(begin + (i + 1) * interval - loop.time(), lambda: inputs.cancelled)

    try:
        await publish("status", {"step": "thinking"})
        await publish("message.start", {"message": ANSWER, "type": "answer"})
        await type_out(first)
        quiet_since = loop.time()
        if not inputs.cancelled:
            await publish("approval.request", {"approval_id": APPROVAL_ID, "tool": "search_docs",
                                               "args": {"query": "Last-Event-ID resume"}, "timeout": round(pause, 1)})
            await inputs.wait(pause, lambda: inputs.cancelled or APPROVAL_ID in inputs.decisions)
        decision = inputs.decisions.get(APPROVAL_ID, "timeout")
        if not inputs.cancelled and decision == "deny":
            await publish("tool", {"name": "search_docs", "status": "skipped", "decision": decision})
            await type_out(split_tokens(PART_TWO.replace("Here is what I found.", "Without the lookup, from memory.")))
        elif not inputs.cancelled:
            await publish("tool", {"name": "search_docs", "status": "running", "decision": decision,
                                   "args": {"query": "Last-Event-ID resume"}})
            await inputs.wait(TOOL_SECONDS, lambda: inputs.cancelled)
            await publish("tool", {"name": "search_docs", "status": "done",
                                   "seconds": round(loop.time() - quiet_since, 1)})
            await type_out(second)
        result: dict[str, Any] = {"text": "".join(typed), "tokens": len(typed),
                                  "seconds": round(loop.time() - started, 1), "tool": decision}
        if inputs.cancelled:  # the partial result goes with the outcome
            error = {"code": "cancelled", "message": inputs.reason or STOPPED}
            await publish("message.end", {"message": ANSWER, "status": "failed", "error": error})
            await gw.log.complete(session, result, outcome="cancelled", error=error)
        else:
            await publish("message.end", {"message": ANSWER})
            await gw.log.complete(session, result)
    except GatewayError as exc:  # the session was deleted or completed by someone else, or the store failed
        log.info("demo run %s stopped: %s", session, exc.message)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        done()

"""Simulated agent runs for the demo page: the gateway publishes into its own log.

``POST /v1/demo/runs`` creates a session and starts a background task that
types a few hundred ``token`` events, pauses on a slow "tool call" for longer
than the heartbeat (so a visitor sees a quiet stream stay open), types some
more, and completes the session with the whole text as its result. The run
publishes through the same path as an HTTP publisher, so the demo shows
exactly what a real agent gets.

The task is kept by ``Gateway.spawn`` and cancelled at shutdown; a run cut
short that way leaves its session open, like an agent that died.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from .bodies import json_object
from .errors import BadRequest, GatewayError, TooManyRequests
from .models import NewEvent

log = logging.getLogger("sse_gateway.demo")

router = APIRouter(tags=["demo"])

DEFAULT_DURATION = 20.0
MAX_DURATION = 300.0
MIN_TYPING = 2.0  # seconds of typing, however short the requested run
KEEP_SECONDS = 3600  # a finished demo session is removed after this
MAX_BODY = 4096
MAX_RUNS = 16  # simulated runs at once per process; one more is 429 (each is a task of up to MAX_DURATION)
RUNS_RETRY_AFTER = 10

PART_ONE = (
    "You asked why an agent's answer sometimes vanishes when the connection drops. The short version: the "
    "answer lived in the connection, and connections are fragile. Proxies close streams that look idle, "
    "phones switch from Wi-Fi to cellular, laptops sleep, and every deploy restarts the servers one by one. "
    "Each of those ends an HTTP response, and whatever the agent wrote after that point is lost.\n\n"
    "Press Drop connection while I type, or reload the page: this text continues exactly where it stopped. "
    "Meanwhile, let me look up how the gateway does it."
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
    "this connection open. Done: the final result is this whole text, delivered as gateway.end."
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
    token = gw.auth.mint(session, epoch=row.epoch)
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


async def simulate(gw, session: str, duration: float, done=lambda: None) -> None:
    """Type PART_ONE, wait on a slow tool for longer than the heartbeat, type PART_TWO, complete."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    pause = gw.settings.heartbeat + 1.0
    first, second = split_tokens(PART_ONE), split_tokens(PART_TWO)
    interval = max(duration - pause, MIN_TYPING) / (len(first) + len(second))

    async def publish(event: str, data: Any) -> None:
        await gw.writes.append(session, [NewEvent(event, orjson.dumps(data).decode())])

    async def type_out(pieces: list[str]) -> None:
        begin = loop.time()
        for i, piece in enumerate(pieces):
            await publish("token", {"text": piece})
            await asyncio.sleep(max(0.0, begin + (i + 1) * interval - loop.time()))

    try:
        await publish("status", {"step": "thinking"})
        await type_out(first)
        await publish("tool", {"name": "search_docs", "status": "running", "args": {"query": "Last-Event-ID resume"}})
        await asyncio.sleep(pause)
        await publish("tool", {"name": "search_docs", "status": "done", "seconds": round(pause, 1)})
        await type_out(second)
        await gw.log.complete(session, {"text": PART_ONE + PART_TWO, "tokens": len(first) + len(second),
                                        "seconds": round(loop.time() - started, 1)})
    except GatewayError as exc:  # the session was deleted or completed by someone else, or the store failed
        log.info("demo run %s stopped: %s", session, exc.message)
    finally:
        done()

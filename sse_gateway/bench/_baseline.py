"""The naive baseline: what a Python developer writes by hand, kept to compare against.

FastAPI, sse-starlette's ``EventSourceResponse``, an in-memory list of
events per session and an ``asyncio.Queue`` per subscriber. It serves the
gateway's publish and stream URLs (one JSON object per POST; resume with
``Last-Event-ID``) and nothing else: no durability, no batches, no limits.
It is written carefully enough to be exact (the subscriber's queue is
registered before the history is copied, and ids already sent are skipped),
so the bench compares speed, not bugs.

    python -m sse_gateway.bench._baseline --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

app = FastAPI(title="naive SSE baseline")
events: dict[str, list[dict]] = defaultdict(list)
queues: dict[str, set[asyncio.Queue]] = defaultdict(set)


@app.post("/v1/sessions/{session}/events")
async def publish(session: str, request: Request) -> JSONResponse:
    body = await request.json()
    log = events[session]
    event = {"id": len(log) + 1, "event": body.get("event", "message"), "data": json.dumps(body["data"])}
    log.append(event)
    for queue in queues[session]:
        queue.put_nowait(event)
    return JSONResponse({"id": event["id"], "session": session, "last_id": event["id"]}, status_code=201)


@app.get("/v1/sessions/{session}/stream")
async def stream(session: str, request: Request) -> EventSourceResponse:
    cursor = request.headers.get("last-event-id") or request.query_params.get("last_event_id") or "0"
    last_sent = int(cursor.split(":")[0])
    queue: asyncio.Queue = asyncio.Queue()
    queues[session].add(queue)
    history = events[session][last_sent:]

    async def generate():
        nonlocal last_sent
        try:
            for event in history:
                last_sent = event["id"]
                yield {"id": str(event["id"]), "event": event["event"], "data": event["data"]}
            while True:
                event = await queue.get()
                if event["id"] > last_sent:
                    last_sent = event["id"]
                    yield {"id": str(event["id"]), "event": event["event"], "data": event["data"]}
        finally:
            queues[session].discard(queue)

    return EventSourceResponse(generate(), ping=15)


def main() -> None:
    parser = argparse.ArgumentParser(description="The naive FastAPI + sse-starlette baseline.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

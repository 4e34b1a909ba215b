"""The HTTP API, one router per area; ``sse_gateway.app.create_app`` assembles them.

publish.py      POST /v1/sessions/{id}/events
stream.py       GET  /v1/sessions/{id}/stream, GET /v1/sessions/{id}/events
sessions.py     /v1/sessions (create, list), /{id} (get, delete), /{id}/tokens
runs.py         /v1/sessions/{id}/complete, /ack, /state, /trim
inputs.py       /v1/sessions/{id}/input (send, read as JSON), /input/stream, /input/ack
operations.py   /healthz, /readyz, /metrics, /
common.py       what the routers share (the gateway, JSON answers, readers' access)
errors.py       every error as the gateway's JSON
dispatch.py     the hot paths (publish, stream) past the framework's layers
"""

from . import inputs, operations, publish, runs, sessions, stream

ROUTERS = (publish.router, stream.router, sessions.router, runs.router, inputs.router, operations.router)

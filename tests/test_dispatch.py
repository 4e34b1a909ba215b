"""The hot-path dispatcher renders every error as the gateway's JSON, the way FastAPI's routes do.

A bug (an exception that is not a ``GatewayError``) in a publish or a stream
request must still be ``500 internal_error`` in JSON, never the server's
plain-text 500. A bug cannot be provoked through the public API, so these
tests give the app a log whose reads or appends raise.
"""

from __future__ import annotations

import httpx
import pytest

from sse_gateway.app import create_app
from sse_gateway.config import Settings
from sse_gateway.log.memory import MemoryLog


class BrokenLog(MemoryLog):
    """A log with a bug: every read of a session's row and every append raise ``RuntimeError``."""

    async def get_session(self, session):
        raise RuntimeError("a bug in the log")

    async def append(self, session, events, *, create=True, producer=None):
        raise RuntimeError("a bug in the log")


@pytest.fixture
async def client():
    app = create_app(Settings(backend="memory"), event_log=BrokenLog())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            yield c


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1"], ids=["hot path", "framework path"])
@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/sessions/s1/stream", None),
    ("POST", "/v1/sessions/s1/events", b'{"data": 1}'),
    ("GET", "/v1/sessions/s1", None),
])
async def test_a_bug_is_a_json_500_on_every_path(client, caplog, method, path, body, origin):
    headers = {"content-type": "application/json"}
    if origin:
        headers["origin"] = origin
    r = await client.request(method, path, content=body, headers=headers)
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "internal_error"
    assert "a bug in the log" in caplog.text  # logged with its traceback for the operator


async def test_refusals_on_the_hot_path_are_the_same_json(client):
    r = await client.post("/v1/sessions/bad%20id/events", json={"data": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_session_id"
    r = await client.get("/v1/sessions/s1/stream", headers={"last-event-id": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor"

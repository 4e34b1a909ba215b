"""A Python client of sse-gateway: ``Publisher`` for agents, ``Subscriber`` for readers.

``Publisher`` (async; ``SyncPublisher`` is its blocking twin) appends events with stable
idempotency keys, batches tokens, retries what can be retried and runs a session as a block::

    async with Publisher() as pub, pub.run("run1") as run:
        for piece in ("Hel", "lo"):
            await run.token(piece)
        run.result = {"text": "Hello"}

The run reads what its users send (``run.inputs()``, ``run.cancelled``, ``run.wait_approval``);
``Publisher.send_input`` sends it from a backend.

``Subscriber`` reads a session with exact resume::

    async for event in Subscriber("run1"):
        print(event.id, event.event, event.data)

Both take the gateway's base URL and a credential, or read ``SSE_GATEWAY_URL`` and
``SSE_GATEWAY_PUBLISH_KEY`` when they are not given. See docs/python.md.

The package: ``http`` (where the gateway is, credentials, errors, retries), ``publisher``, ``inputs``,
``sync`` (the blocking twin), ``subscriber``.
"""

from .http import (
                   DEFAULT_URL,
                   ENV_KEY,
                   ENV_URL,
                   GatewayError,
                   GatewayUnreachable,
                   Retry,
                   RetryNotice,
                   resolve_key,
                   resolve_url,
)
from .inputs import Input, InputReader, InputSent
from .publisher import (
    InputPage,
    Published,
    Publisher,
    Run,
    SessionInfo,
    State,
    Token,
    Watchers,
    error_object,
)
from .subscriber import Event, Reconnect, Subscriber
from .sync import SyncPublisher, SyncRun

__all__ = ["DEFAULT_URL", "ENV_KEY", "ENV_URL", "Event", "GatewayError", "GatewayUnreachable", "Input",
           "InputPage", "InputReader", "InputSent", "Published",
           "Publisher", "Reconnect", "Retry", "RetryNotice", "Run", "SessionInfo", "State", "Subscriber",
           "SyncPublisher", "SyncRun", "Token", "Watchers", "error_object", "resolve_key",
           "resolve_url"]

"""schemathesis against the gateway's own /openapi.json, on a real server with keys and a token secret.

Every operation gets generated requests, valid and invalid (bounded: ``SCHEMATHESIS_EXAMPLES`` per
operation, default 40); every response must be below 500 and match the description: status, content type,
headers and body schema. Requests carry the publisher key (schemathesis' auth configuration), so requests
with the credentials removed or broken must be 401, and ``ignored_auth`` replays them without the key. The
endless stream is read with ``live=false`` so that it ends.
"""

from __future__ import annotations

import collections
import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

pytestmark = [pytest.mark.timeout(600), pytest.mark.system]  # schemathesis against a real gateway

KEY = "st-key-" + "k" * 32
SECRET = "st-secret-" + "s" * 32
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "40"))
SENT: collections.Counter = collections.Counter()
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # schemathesis' defaults, for valid requests
REJECTED = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]  # invalid ones
CONFIG = schemathesis.Config.from_dict({
    "auth": {"openapi": {"bearer": {"bearer": KEY}}},
    # Unknown query parameters are ignored, as HTTP APIs do (unknown body fields are refused: test_hostile_input).
    "generation": {"allow-extra-parameters": False},
    "operations": [
        # Answers to valid requests that depend on the session's state, not on the request:
        # a stale If-Match is 412 whatever the body.
        {"include-name": "PUT /v1/sessions/{session}/state",
         "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "412"]}}},
        # An ack beyond the session's last id is 400 invalid_ack: the range depends on the session.
        {"include-name": "POST /v1/sessions/{session}/ack",
         "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "400"]}}},
        # An input ack beyond the session's input_last_id is 400 invalid_ack, as above.
        {"include-name": "POST /v1/sessions/{session}/input/ack",
         "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "400"]}}},
        # An input's data beyond --max-event-bytes is documented as 413 input_too_large.
        {"include-name": "POST /v1/sessions/{session}/input",
         "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "413"]},
                    "negative_data_rejection": {"expected-statuses": [*REJECTED, "413"]}}},
        # A batch over its limit is documented as 413 batch_too_large.
        {"include-name": "POST /v1/sessions/{session}/events",
         "checks": {"negative_data_rejection": {"expected-statuses": [*REJECTED, "413"]}}},
    ],
})


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value) -> bytes:
    """The description gives an NDJSON body as the array of its lines' objects."""
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def one_key_too_many(case) -> bool:
    """A rule OpenAPI cannot state (it is in the parameter's description): the Idempotency-Key header is
    for one event; with a batch, an NDJSON stream or an event that has its own key it is a 400."""
    if "Idempotency-Key" not in (case.headers or {}):
        return False
    body = case.body
    own_key = isinstance(body, dict) and body.get("idempotency_key") is not None
    return isinstance(body, list) or own_key or "ndjson" in (case.media_type or "")


@pytest.fixture(scope="module")
def api_schema(start_module_gateway):
    gw = start_module_gateway("--publish-key", KEY, "--token-secret", SECRET, "--heartbeat", "1")
    yield schemathesis.openapi.from_url(f"{gw.url}/openapi.json", config=CONFIG)
    print(f"\nschemathesis: {sum(SENT.values())} generated requests over {len(SENT)} method/path pairs "
          "(with the unsupported-method probes)")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_gateway_does_what_its_openapi_says(case):
    if case.path.endswith("/stream"):
        case.query = {**(case.query or {}), "live": "false"}
    if case.path.endswith("/input") and case.method == "GET" and isinstance((case.query or {}).get("wait"), int):
        case.query["wait"] = min(case.query["wait"], 1)  # a long poll of up to 30 s is valid, but slow to test
    if case.path.endswith("/events") and case.method == "POST" and one_key_too_many(case):
        del case.headers["Idempotency-Key"]
    SENT[f"{case.method} {case.path}"] += 1
    case.call_and_validate(timeout=10)

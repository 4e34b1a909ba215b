"""The OpenAPI description tells a generated client everything it meets, whatever the deployment."""

from __future__ import annotations

import pytest

from sse_gateway.app import create_app
from sse_gateway.config import Settings


@pytest.mark.parametrize("settings", [Settings(), Settings(publish_key=("k" * 20,), token_secret="s" * 32)],
                         ids=["open", "keyed"])
def test_credentials_errors_and_the_gateways_own_events_are_described(settings):
    doc = create_app(settings).openapi()
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "token", "cookie"}
    publish = doc["paths"]["/v1/sessions/{session}/events"]["post"]
    assert {"401", "403", "507"} <= set(publish["responses"])
    assert {"bearer": []} in publish["security"]
    assert ({} in publish["security"]) == (not settings.publish_keys)  # anyone may publish only when open
    stream = doc["paths"]["/v1/sessions/{session}/stream"]["get"]
    assert {"token": []} in stream["security"] and {"cookie": []} in stream["security"]
    schemas = doc["components"]["schemas"]
    assert {"GatewayEnd", "GatewayGap", "GatewayReset"} <= set(schemas)
    assert set(schemas["GatewayGap"]["required"]) == {"from", "to"}
    event = stream["responses"]["200"]["content"]["text/event-stream"]["schema"]["properties"]["event"]
    assert all(name in event["description"] for name in ("gateway.end", "gateway.gap", "gateway.reset"))


def test_the_batch_limit_is_this_deployments():
    doc = create_app(Settings(max_batch=7)).openapi()
    body = doc["paths"]["/v1/sessions/{session}/events"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["oneOf"][1]["maxItems"] == 7
    assert create_app(Settings()).openapi()["paths"]["/v1/sessions/{session}/events"]["post"]["requestBody"][
        "content"]["application/json"]["schema"]["oneOf"][1]["maxItems"] == 1000

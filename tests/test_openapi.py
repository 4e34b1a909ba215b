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


def test_input_is_sent_with_a_token_and_read_with_a_key():
    doc = create_app(Settings(publish_key=("k" * 20,), token_secret="s" * 32)).openapi()
    paths = doc["paths"]
    send = paths["/v1/sessions/{session}/input"]["post"]
    assert {"token": []} in send["security"] and {"bearer": []} in send["security"]
    assert {"201", "200", "403", "404", "409"} <= set(send["responses"])
    for method, path in (("get", "/v1/sessions/{session}/input"), ("get", "/v1/sessions/{session}/input/stream"),
                         ("post", "/v1/sessions/{session}/input/ack")):
        assert paths[path][method]["security"] == [{"bearer": []}], path
    kinds = [s["properties"]["kind"] for s in send["requestBody"]["content"]["application/json"]["schema"]["oneOf"]]
    assert kinds == [{"type": "string", "enum": ["message", "steer", "cancel"]}, {"const": "approval"}]
    assert {"input_last_id", "input_acked_id"} <= set(doc["components"]["schemas"]["Session"]["properties"])

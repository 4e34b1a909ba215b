"""The OpenAPI description: bodies the routes parse by hand, every response, the credentials.

The routes give their request bodies and extra parameters
(``openapi_extra``); ``describe`` then owns what FastAPI cannot know: the
responses of each operation (errors are always the gateway's JSON, never
FastAPI's 422), the session id rule, the limits this deployment was
started with (``--max-batch``) and the security schemes it enforces.
Patterns and bounds are the objects of ``rules`` that the validators use.
The description is tested against the running gateway with schemathesis
(tests/test_schemathesis.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from . import rules
from .auth import COOKIE
from .config import Settings
from .models import OUTCOMES
from .rules import CURSOR, SESSION_ID

_PRINTABLE = rules.IDEMPOTENCY_KEY

_EVENT_TYPE = {"type": "string", "pattern": rules.EVENT_TYPE,
               "not": {"pattern": "^" + rules.RESERVED_PREFIX.replace(".", r"\.")},
               "default": "message", "description": f"types beginning with {rules.RESERVED_PREFIX} are reserved"}
_EVENT = {
    "type": "object",
    "properties": {"event": _EVENT_TYPE, "data": {},
                   "idempotency_key": {"anyOf": [{"type": "string", "pattern": _PRINTABLE}, {"type": "null"}],
                                       "description": "null or absent: none"}},
    "required": ["data"],
    "additionalProperties": False,
}

_PRODUCER_EPOCH = {"name": "Producer-Epoch", "in": "header", "required": False,
                   "schema": {"type": "string", "pattern": r"^\s*[0-9]{1,16}\s*$"},
                   "description": "the writer's producer epoch (fencing): a write naming an epoch older than the "
                   "session's is refused with 403 producer_fenced; a newer one becomes the session's"}

PUBLISH = {
    "parameters": [
        _PRODUCER_EPOCH,
        {"name": "event", "in": "query", "required": False, "schema": _EVENT_TYPE,
         "description": "event type of a text/plain body (checked, and ignored, with other bodies)"},
        {"name": "Idempotency-Key", "in": "header", "required": False,
         "schema": {"type": "string", "pattern": _PRINTABLE},
         "description": "makes a retry of one event safe; a batch or an NDJSON stream takes a per-item "
         "idempotency_key instead, and an event with its own idempotency_key takes no header (400)"},
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [_EVENT, {"type": "array", "items": _EVENT, "minItems": 1}]}},
            "text/plain": {"schema": {"type": "string"}},
            "application/x-ndjson": {"schema": {"type": "array", "items": _EVENT},
                                     "description": "one event object per line, each appended as its line "
                                     "arrives; blank lines are skipped"},
        },
    },
}

STREAM = {
    "parameters": [
        {"name": "Last-Event-ID", "in": "header", "required": False,
         "schema": {"anyOf": [{"type": "string", "pattern": CURSOR}, {"type": "string", "pattern": r"^\s*$"}]},
         "description": "the cursor EventSource sends back: ID:EPOCH or ID; empty means none"},
        {"name": "last_event_id", "in": "query", "required": False, "schema": {"type": "string", "pattern": CURSOR}},
        {"name": "from", "in": "query", "required": False, "description": "earliest, latest or a cursor",
         "schema": {"anyOf": [{"type": "string", "enum": ["earliest", "latest"]},
                              {"type": "string", "pattern": CURSOR}]}},
        {"name": "live", "in": "query", "required": False,
         "schema": {"type": "string", "enum": ["true", "false", "1", "0"], "default": "true"},
         "description": "false: replay what exists, then close"},
    ],
}

_TTL = rules.SESSION_TTL.schema()
_SESSION_SETTINGS = {
    "metadata": {}, "ttl_seconds": {"anyOf": [_TTL, {"type": "null"}]},
    "lease_seconds": {"anyOf": [rules.LEASE.schema(), {"type": "null"}],
                      "description": "the agent's lease: the run ends as timed_out when its producer neither writes "
                      "nor renews for this long (0: no lease; null or absent: --lease)"},
    "webhook_url": {"anyOf": [{"type": "string", "pattern": rules.WEBHOOK_URL}, {"type": "null"}],
                    "description": "where to notify when the run ends or asks for approval and nobody watches "
                    "(null or absent: the gateway's --webhook-url)"},
}

CREATE = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object",
    "properties": {"id": {"anyOf": [{"type": "string", "pattern": SESSION_ID}, {"type": "null"}],
                          "description": "null or absent: a generated id"}, **_SESSION_SETTINGS},
    "additionalProperties": False,
}}}}}

PUT_SESSION = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": _SESSION_SETTINGS, "additionalProperties": False,
}}}}}

TOKENS = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object",
    "properties": {"ttl_seconds": {"anyOf": [rules.TOKEN_TTL.schema(), {"type": "null"}],
                                   "description": "null or absent: --token-ttl"},
                   "scopes": {"anyOf": [{"type": "array", "uniqueItems": True, "minItems": 1,
                                         "items": {"type": "string", "enum": list(rules.SCOPES)},
                                         "contains": {"const": "subscribe"}}, {"type": "null"}],
                              "description": "what the token allows: subscribe (always), input (send input to the "
                              "session); null or absent: subscribe"}},
    "additionalProperties": False}}}}}

_KEY = {"anyOf": [{"type": "string", "pattern": _PRINTABLE}, {"type": "null"}], "description": "null or absent: none"}
_APPROVAL_ID = {"type": "string", "pattern": rules.APPROVAL_ID}
INPUT = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    {"type": "object", "required": ["kind"], "additionalProperties": False,
     "properties": {"kind": {"type": "string", "enum": ["message", "steer", "cancel"]}, "data": {},
                    "idempotency_key": _KEY, "approval_id": {"type": "null"}, "decision": {"type": "null"}}},
    {"type": "object", "required": ["kind", "approval_id", "decision"], "additionalProperties": False,
     "properties": {"kind": {"const": "approval"}, "data": {}, "idempotency_key": _KEY,
                    "approval_id": {**_APPROVAL_ID, "description": "the approval.request it answers"},
                    "decision": {"type": "string", "enum": ["approve", "deny"]}}},
]}}}}}

INPUT_READ = {"parameters": [
    {"name": "after", "in": "query", "required": False, "schema": rules.READ_AFTER.schema(),
     "description": "absent: the session's input_acked_id"},
    {"name": "limit", "in": "query", "required": False, "schema": rules.READ_LIMIT.schema()},
    {"name": "wait", "in": "query", "required": False, "schema": rules.INPUT_WAIT.schema(),
     "description": "seconds to wait for input when there is none after the cursor (long poll)"},
]}

INPUT_STREAM = {"parameters": [
    {"name": "Last-Event-ID", "in": "header", "required": False,
     "schema": {"anyOf": [{"type": "string", "pattern": CURSOR}, {"type": "string", "pattern": r"^\s*$"}]},
     "description": "the cursor of the last input received: ID:EPOCH or ID; empty means none"},
    {"name": "last_event_id", "in": "query", "required": False, "schema": {"type": "string", "pattern": CURSOR}},
    {"name": "from", "in": "query", "required": False,
     "description": "earliest, acked (the default: after input_acked_id), latest or a cursor",
     "schema": {"anyOf": [{"type": "string", "enum": ["earliest", "acked", "latest"]},
                          {"type": "string", "pattern": CURSOR}]}},
    {"name": "live", "in": "query", "required": False,
     "schema": {"type": "string", "enum": ["true", "false", "1", "0"], "default": "true"},
     "description": "false: replay what exists, then close"},
]}

INPUT_ACK = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object",
    "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": CURSOR}],
                          "description": "at most the session's input_last_id"}},
    "required": ["id"], "additionalProperties": False}}}}}

COMPLETE = {"parameters": [_PRODUCER_EPOCH], "requestBody": {"required": False, "content": {"application/json": {
    "schema": {"type": "object",
               "properties": {"result": {}, "status": {"type": "string", "enum": list(rules.END_STATUSES),
                                                       "default": "completed"},
                              "error": {"description": "why the run failed or was cancelled (any JSON; "
                                        "{\"code\", \"message\"} is what the gateway itself writes)"}},
               "additionalProperties": False,
               "if": {"required": ["error"]},
               "then": {"required": ["status"], "properties": {"status": {"enum": ["failed", "cancelled"]}}}}}}}}

LEASE = {"parameters": [_PRODUCER_EPOCH], "requestBody": {"required": False, "content": {"application/json": {
    "schema": {"type": "object", "additionalProperties": False,
               "properties": {"seconds": {**rules.LEASE.schema(), "description": "the lease's new length "
                                          "(0: none); absent: as it was"},
                              "claim": {"type": "boolean", "default": False,
                                        "description": "take the session over: its producer_epoch goes up by one, "
                                        "and writes naming an older one are refused"}}}}}}}

ACK = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object",
    "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": CURSOR}],
                          "description": "at most the session's last id"}},
    "required": ["id"], "additionalProperties": False}}}}}

STATE = {
    "parameters": [
        _PRODUCER_EPOCH,{"name": "If-Match", "in": "header", "required": False,
                    "schema": {"type": "string", "pattern": r'^\s*(\*|(W/)?"?[0-9]{1,18}"?)\s*$'}}],
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
}

TRIM = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"through": {"type": "integer", "minimum": 0}}, "required": ["through"],
    "additionalProperties": False}}}}}

LIST = {"parameters": [
    {"name": "status", "in": "query", "required": False, "schema": {"type": "string", "enum": ["open", "completed"]}},
    {"name": "limit", "in": "query", "required": False, "schema": rules.LIST_LIMIT.schema()},
]}

STATE_READ = {"parameters": [
    {"name": "messages", "in": "query", "required": False,
     "description": "true: also every message as of as_of, whole (docs/api.md, State)",
     "schema": {"type": "string", "enum": ["true", "false", "1", "0"]}},
]}
HISTORY = {"parameters": [
    {"name": "after", "in": "query", "required": False,
     "description": "an id; with compact=true, a cursor ID or ID/HOLD",
     "schema": {"anyOf": [rules.READ_AFTER.schema(), {"type": "string", "pattern": r"^[0-9]{1,18}(/[0-9]{1,18})?$"}]}},
    {"name": "limit", "in": "query", "required": False, "schema": rules.READ_LIMIT.schema()},
    {"name": "compact", "in": "query", "required": False,
     "description": "true: messages as a replay sends them (docs/api.md, Messages)",
     "schema": {"type": "string", "enum": ["true", "false", "1", "0"]}},
]}

# -- responses ------------------------------------------------------------------

_ID = {"type": "integer", "minimum": 0}
_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"anyOf": [_TIME, {"type": "null"}]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message"],
                                 "properties": {"code": {"type": "string", "pattern": "^[a-z0-9_]+$"},
                                                "message": {"type": "string"}}}},
    },
    "Appended": {
        "type": "object", "required": ["session", "last_id"],
        "properties": {"id": {"type": "integer", "minimum": 1}, "ids": {"type": "array", "items": _ID},
                       "session": {"type": "string"}, "last_id": _ID, "epoch": {"type": "string"}},
    },
    "Event": {
        "type": "object", "required": ["id", "event", "data", "ts"],
        "properties": {"id": {"type": "integer", "minimum": 1}, "event": {"type": "string"}, "data": {},
                       "ts": _TIME, "cursor": {"type": "string"}},
    },
    "History": {
        "type": "object", "required": ["events", "epoch", "earliest_id", "last_id", "next_after"],
        "properties": {
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
            "epoch": {"type": "string"}, "earliest_id": _ID, "last_id": _ID,
            "next_after": {"anyOf": [_ID, {"type": "string"}]},  # compact=true: a cursor
            "gap": {"type": "object", "required": ["from", "to"], "properties": {"from": _ID, "to": _ID}},
        },
    },
    "Session": {
        "type": "object",
        "required": ["id", "epoch", "status", "created_at", "completed_at", "earliest_id", "last_id", "metadata",
                     "subscribers", "last_seen_at", "acked_id", "state_version"],
        "properties": {
            "id": {"type": "string"}, "epoch": {"type": "string"},
            "status": {"type": "string", "enum": ["open", "completed"]},
            "created_at": _TIME, "completed_at": _NULLABLE_TIME, "earliest_id": _ID, "last_id": _ID,
            "metadata": {}, "subscribers": _ID, "last_seen_at": _NULLABLE_TIME, "acked_id": _ID,
            "state_version": _ID, "ttl_seconds": {"anyOf": [_ID, {"type": "null"}]}, "result": {},
            "input_last_id": _ID, "input_acked_id": _ID,
            "run_status": {"type": "string", "enum": ["running", "cancelling", *OUTCOMES]},
            "outcome": {"anyOf": [{"type": "string", "enum": list(OUTCOMES)}, {"type": "null"}]},
            "error": {}, "lease_seconds": {"anyOf": [_ID, {"type": "null"}]}, "lease_until": _NULLABLE_TIME,
            "cancel_requested_at": _NULLABLE_TIME, "producer_epoch": _ID,
        },
    },
    "Input": {
        "type": "object", "required": ["id", "kind", "data", "ts", "event_id"],
        "properties": {"id": {"type": "integer", "minimum": 1},
                       "kind": {"type": "string", "enum": ["message", "steer", "approval", "cancel"]},
                       "data": {}, "ts": _TIME, "event_id": {"type": "integer", "minimum": 1},
                       "approval_id": {"type": "string"}, "decision": {"type": "string", "enum": ["approve", "deny"]}},
    },
    "InputSent": {
        "type": "object", "required": ["id", "session", "kind", "event_id", "input_last_id", "epoch"],
        "properties": {"id": {"type": "integer", "minimum": 1}, "session": {"type": "string"},
                       "kind": {"type": "string"}, "event_id": {"type": "integer", "minimum": 1},
                       "input_last_id": _ID, "epoch": {"type": "string"}},
    },
    "InputPage": {
        "type": "object", "required": ["inputs", "epoch", "input_last_id", "input_acked_id", "next_after"],
        "properties": {"inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Input"}},
                       "epoch": {"type": "string"}, "input_last_id": _ID, "input_acked_id": _ID, "next_after": _ID},
    },
    "InputAcked": {"type": "object", "required": ["session", "input_acked_id", "input_last_id"],
                   "properties": {"session": {"type": "string"}, "input_acked_id": _ID, "input_last_id": _ID}},
    "SessionList": {"type": "object", "required": ["sessions"],
                    "properties": {"sessions": {"type": "array", "items": {"$ref": "#/components/schemas/Session"}}}},
    "Created": {
        "type": "object", "required": ["id", "epoch", "stream_url", "subscribe_token"],
        "properties": {"id": {"type": "string"}, "epoch": {"type": "string"}, "stream_url": {"type": "string"},
                       "subscribe_token": {"type": ["string", "null"]}, "token_expires_at": _TIME},
    },
    "Token": {"type": "object", "required": ["token", "expires_at", "stream_url"],
              "properties": {"token": {"type": "string"}, "expires_at": _TIME, "stream_url": {"type": "string"}}},
    "Acked": {"type": "object", "required": ["session", "acked_id"],
              "properties": {"session": {"type": "string"}, "acked_id": _ID}},
    "State": {"type": "object", "required": ["version", "state", "as_of"],
              "properties": {"version": _ID, "state": {"type": ["object", "null"]},
                             "as_of": {"type": "string", "pattern": "^[0-9]+:[A-Za-z0-9]+$"},
                             "messages": {"type": "array", "items": {"type": "object"}}}},
    "Trimmed": {"type": "object", "required": ["session", "earliest_id", "last_id"],
                "properties": {"session": {"type": "string"}, "earliest_id": _ID, "last_id": _ID}},
    "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
}

_WHY = {
    400: "bad input (invalid_session_id, invalid_json, invalid_cursor, ...)",
    401: "no or bad credentials",
    403: "a subscribe token for another session, or without the scope needed (insufficient_scope); a write from "
         "a site --cors-origin does not list; a write from a fenced producer (producer_fenced, with the current "
         "Producer-Epoch)",
    404: "no such session (or, for an approval input, no such approval: approval_not_found)",
    408: "the body arrived too slowly; the connection is closed",
    409: "conflict: the session exists, or its run has ended (session_completed); an ack's cursor is of another "
         "life of the session; the approval was answered already (approval_answered)",
    412: "the state version moved (If-Match)",
    413: "too large: event, batch, body or NDJSON line",
    415: "unsupported content type or charset (a JSON body must be sent as application/json)",
    429: "too many streams of this session, or demo runs; try again after Retry-After",
    503: "overloaded, draining, or the store is unavailable; try again after Retry-After",
    507: "the store's disk is full; nothing was written; try again after Retry-After",
}


def _json(name: str) -> dict:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _header(description: str) -> dict:
    return {"description": description, "required": True, "schema": {"type": "string"}}


def _error(status: int) -> dict:
    response: dict = {"description": _WHY[status], "content": _json("Error")}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": _header("Bearer challenge")}
    elif status in (429, 503, 507):
        response["headers"] = {"Retry-After": _header("seconds to wait")}
    return response


#: one event of the stream, as an SSE reader delivers it (OpenAPI 3.1: the schema of text/event-stream
#: describes each event). Log entries carry an id; gateway.gap and gateway.reset carry JSON data and no id.
SSE_EVENT = {
    "type": "object",
    "required": ["data", "event"],
    "properties": {
        "event": {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,64}$",
                  "description": "the publisher's event type ('message' when the SSE frame names none), or one "
                  "of the gateway's own: gateway.end (with an id; data: the session's result, see GatewayEnd; the "
                  "last event), gateway.input (with an id; data: GatewayInput, the mirror of an input), "
                  "gateway.gap (no id; data: GatewayGap), gateway.reset (no id; data: GatewayReset). "
                  "Heartbeats are SSE comments (': ping'), never events.",
                  "examples": ["token", "gateway.end", "gateway.gap", "gateway.reset"]},
        "data": {"type": "string", "description": "compact JSON for JSON events, the text for text events"},
        "id": {"type": "string", "pattern": r"^[0-9]+:[a-z0-9]+$",
               "description": "ID:EPOCH, the cursor to resume after this event (Last-Event-ID)"},
        "retry": {"type": "integer", "minimum": 0, "description": "sent once, first: the reconnect delay in ms"},
    },
    "additionalProperties": False,
}
#: the data of the gateway's own events (JSON in the ``data`` field of SSE_EVENT)
GATEWAY_EVENTS = {
    "GatewayEnd": {"description": "gateway.end: the run has ended. A completed run's data is its result (any "
                   "JSON, null if none); a run that failed, was cancelled or timed out has data "
                   "{\"status\": \"failed\"|\"cancelled\"|\"timed_out\", \"error\", \"result\"?} (the session's "
                   "outcome says which, too). A reconnect after it is answered 204."},
    "GatewayGap": {"type": "object", "required": ["from", "to"], "properties": {"from": _ID, "to": _ID},
                   "description": "gateway.gap: events from..to were removed by retention before they were read; "
                   "the stream goes on after them"},
    "GatewayInput": {"type": "object", "required": ["input_id", "kind", "data"],
                     "properties": {"input_id": {"type": "integer", "minimum": 1}, "kind": {"type": "string"},
                                    "data": {}, "approval_id": {"type": "string"},
                                    "decision": {"type": "string", "enum": ["approve", "deny"]}},
                     "description": "gateway.input: an input a user sent the agent (POST .../input), mirrored "
                     "into the output in the same commit; on the input stream itself, event is the input's kind"},
    "GatewayReset": {"type": "object", "required": ["epoch", "last_id"],
                     "properties": {"epoch": {"type": "string"}, "last_id": _ID},
                     "description": "gateway.reset: the cursor was of another life of the session (or beyond its "
                     "end); the stream starts again from its first event. Drop what the cursor's life showed."},
}
_STREAM_OK = {
    "200": {"description": "the event stream: replay after the cursor, then live (with live=false, replay only)",
            "content": {"text/event-stream": {"schema": SSE_EVENT}}},
    "204": {"description": "the session is completed and the cursor is at its end: stop reconnecting"},
}
_STATE_OK = {"description": "the state document", "content": _json("State"),
             "headers": {"ETag": _header("the version, quoted")}}

#: (method, path) -> (success responses, error statuses, who may call it)
OPERATIONS: dict[tuple[str, str], tuple[dict, tuple[int, ...], str | None]] = {
    ("post", "/v1/sessions/{session}/events"): (
        {"201": {"description": "appended", "content": _json("Appended")},
         "200": {"description": "an idempotent retry: nothing appended", "content": _json("Appended")}},
        (400, 401, 404, 408, 409, 413, 415, 503), "publisher"),
    ("get", "/v1/sessions/{session}/stream"): (_STREAM_OK, (400, 401, 403, 404, 429, 503), "reader"),
    ("get", "/v1/sessions/{session}/events"): (
        {"200": {"description": "events after the cursor", "content": _json("History")}},
        (400, 401, 403, 404), "reader"),
    ("post", "/v1/sessions"): (
        {"201": {"description": "created", "content": _json("Created")}},
        (400, 401, 408, 409, 413, 415, 503), "publisher"),
    ("put", "/v1/sessions/{session}"): (
        {"201": {"description": "created", "content": _json("Created")},
         "200": {"description": "it exists with this metadata and ttl_seconds (a retried create)",
                 "content": _json("Created")}},
        (400, 401, 408, 409, 413, 415, 503), "publisher"),
    ("post", "/v1/sessions/{session}/tokens"): (
        {"201": {"description": "a subscribe token", "content": _json("Token")}},
        (400, 401, 403, 408, 413, 415), "publisher"),
    ("get", "/v1/sessions"): (
        {"200": {"description": "sessions, newest first", "content": _json("SessionList")}}, (400, 401),
        "publisher"),
    ("get", "/v1/sessions/{session}"): (
        {"200": {"description": "the session", "content": _json("Session")}}, (400, 401, 403, 404), "reader"),
    ("delete", "/v1/sessions/{session}"): (
        {"204": {"description": "deleted; open streams end"}}, (400, 401, 404, 503), "publisher"),
    ("post", "/v1/sessions/{session}/complete"): (
        {"200": {"description": "ended (or already was, the same way)", "content": _json("Session")}},
        (400, 401, 404, 408, 409, 413, 415, 503), "publisher"),
    ("post", "/v1/sessions/{session}/lease"): (
        {"200": {"description": "renewed (or claimed): the session", "content": _json("Session")}},
        (400, 401, 404, 408, 409, 413, 415, 503), "publisher"),
    ("post", "/v1/sessions/{session}/ack"): (
        {"200": {"description": "acked", "content": _json("Acked")}},
        (400, 401, 403, 404, 408, 409, 413, 415, 503), "reader"),
    ("get", "/v1/sessions/{session}/state"): ({"200": _STATE_OK}, (400, 401, 403, 404), "reader"),
    ("put", "/v1/sessions/{session}/state"): (
        {"200": _STATE_OK}, (400, 401, 404, 408, 412, 413, 415, 503), "publisher"),
    ("post", "/v1/sessions/{session}/trim"): (
        {"200": {"description": "trimmed", "content": _json("Trimmed")}},
        (400, 401, 404, 408, 413, 415, 503), "publisher"),
    ("post", "/v1/sessions/{session}/input"): (
        {"201": {"description": "stored, with its gateway.input mirror in the output", "content": _json("InputSent")},
         "200": {"description": "a repeat of an idempotency key: nothing stored again", "content": _json("InputSent")}},
        (400, 401, 403, 404, 408, 409, 413, 415, 503), "sender"),
    ("get", "/v1/sessions/{session}/input"): (
        {"200": {"description": "inputs after the cursor", "content": _json("InputPage")}}, (400, 401, 404),
        "publisher"),
    ("get", "/v1/sessions/{session}/input/stream"): (
        {"200": {"description": "the input stream: replay after the cursor, then live (with live=false, replay only)",
                 "content": {"text/event-stream": {"schema": SSE_EVENT}}}}, (400, 401, 404, 503), "publisher"),
    ("post", "/v1/sessions/{session}/input/ack"): (
        {"200": {"description": "acked", "content": _json("InputAcked")}},
        (400, 401, 404, 408, 409, 413, 415, 503), "publisher"),
    ("post", "/v1/demo/runs"): (
        {"201": {"description": "a simulated run has started", "content": {"application/json": {"schema": {
            "type": "object", "required": ["session", "stream_url"],
            "properties": {"session": {"type": "string"}, "stream_url": {"type": "string"},
                           "heartbeat": {"type": "number"}, "duration": {"type": "number"}}}}}}},
        (400, 401, 413, 415, 429, 503), "publisher"),
    ("get", "/healthz"): ({"200": {"description": "alive", "content": _json("Status")}}, (), None),
    ("get", "/readyz"): ({"200": {"description": "ready", "content": _json("Status")},
                          "503": {"description": "draining or the store is unreachable",
                                  "content": {"application/json": {"schema": {"type": "object"}}},
                                  "headers": {"Retry-After": _header("seconds to wait")}}}, (), None),
    ("get", "/metrics"): ({"200": {"description": "Prometheus text format",
                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}, (), None),
}


def _security(settings: Settings) -> tuple[dict, dict[str | None, list]]:
    """Every way to present credentials, and what each kind of operation accepts on this deployment.

    The schemes are always described, so a client generated from an open
    gateway also works with a closed one; ``{}`` (no credentials) is listed
    where this deployment lets anyone through.
    """
    schemes = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "a publisher key (--publish-key), or (reading; sending input with the input "
                   "scope) a subscribe token"},
        "token": {"type": "apiKey", "in": "query", "name": "token",
                  "description": "a subscribe token (reading; sending input with the input scope)"},
        "cookie": {"type": "apiKey", "in": "cookie", "name": COOKIE,
                   "description": "a subscribe token (reading; sending input with the input scope)"},
    }
    anyone = [] if settings.publish_keys else [{}]
    readers = [{"bearer": []}, {"token": []}, {"cookie": []}, *anyone]
    return schemes, {"publisher": [{"bearer": []}, *anyone], "reader": readers, "sender": readers, None: []}


def describe(app: FastAPI, settings: Settings) -> dict:
    """The OpenAPI document of this gateway (built once)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemes, security = _security(settings)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            op["responses"].pop("422", None)  # validation errors are the gateway's own 400
            if (method, path) not in OPERATIONS:
                continue
            ok, errors, role = OPERATIONS[(method, path)]
            if role is not None:  # credentials are checked (401, 403), and a browser's writes (403)
                errors = {*errors, 401, 403}
            if method != "get" and 503 in errors:  # a write the store may refuse for want of disk
                errors = {*errors, 507}
            errors = sorted(errors)
            op["responses"] = {**ok, **{str(s): _error(s) for s in errors}}
            if role is not None:
                op["security"] = security[role]
            for param in op.get("parameters", ()):
                if param["name"] == "session" and param["in"] == "path":
                    param["schema"] = {"type": "string", "pattern": SESSION_ID}
    body = doc["paths"]["/v1/sessions/{session}/events"]["post"]["requestBody"]["content"]["application/json"]
    one, many = body["schema"]["oneOf"]  # shared with the route's openapi_extra: replaced, not changed
    body["schema"] = {"oneOf": [one, {**many, "maxItems": settings.max_batch}]}  # this deployment's --max-batch
    doc.setdefault("components", {}).pop("schemas", None)  # FastAPI's validation error models, never sent
    doc["components"]["schemas"] = {**SCHEMAS, **GATEWAY_EVENTS}
    doc["components"]["securitySchemes"] = schemes
    app.openapi_schema = doc
    return doc

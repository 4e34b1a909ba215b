"""OpenAPI fragments for the bodies the routes parse by hand."""

from __future__ import annotations

_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,64}$", "default": "message"},
        "data": {},
        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 256},
    },
    "required": ["data"],
    "additionalProperties": False,
}

_JSON = {"application/json": {"schema": {"type": "object"}}}

PUBLISH = {
    "parameters": [
        {"name": "event", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "event type of a text/plain body"},
        {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [_EVENT, {"type": "array", "items": _EVENT,
                                                               "minItems": 1, "maxItems": 1000}]}},
            "text/plain": {"schema": {"type": "string"}},
            "application/x-ndjson": {"schema": {"type": "string"},
                                     "description": "one event object per line, appended as each line arrives"},
        },
    },
    "responses": {
        "201": {"description": "appended", "content": _JSON},
        "200": {"description": "idempotent retry: nothing appended", "content": _JSON},
    },
}

STREAM = {
    "parameters": [
        {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
        {"name": "last_event_id", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "from", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "earliest, latest or an id"},
        {"name": "live", "in": "query", "required": False, "schema": {"type": "boolean", "default": True}},
        {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}},
    ],
    "responses": {
        "200": {"description": "the event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        "204": {"description": "the session is completed and the cursor is at its end"},
    },
}

CREATE = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": {
            "type": "object",
            "properties": {"id": {"type": "string", "pattern": r"^[A-Za-z0-9_.~-]{1,128}$"}, "metadata": {},
                           "ttl_seconds": {"type": "integer", "minimum": 1}},
            "additionalProperties": False,
        }}},
    },
    "responses": {"201": {"description": "created", "content": _JSON}},
}

COMPLETE = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"result": {}}, "additionalProperties": False}}}}}

ACK = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0}}, "required": ["id"]}}}}}

STATE = {
    "parameters": [{"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}],
    "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
}

TRIM = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"through": {"type": "integer", "minimum": 0}}, "required": ["through"]}}}}}

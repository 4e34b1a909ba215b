"""Reading and checking what a request sends: bodies, JSON, events, query numbers.

Bodies are parsed with orjson by hand rather than through Pydantic models:
the publish path runs for every event, and every refusal must be the
gateway's own JSON error (``400`` with a code naming what is wrong). The
rules themselves (patterns, bounds) come from ``rules``; the OpenAPI
description reads the same objects.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson
from starlette.requests import Request

from . import limits, rules
from .cors import FROM_PAGE
from .errors import BadRequest, TooLarge, UnsupportedMedia
from .models import DECISIONS, DIGITS_TO_ZERO, INPUT_KINDS, LONG_DIGITS, NewEvent, NewInput, check_event_type, dump_json


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes, arrived within ``--body-timeout`` (see limits.py)."""
    return await limits.read_body(request, limit, request.app.state.gw.settings.body_timeout)


#: the deepest nesting of arrays and objects a JSON body may have (``400 json_too_deep`` beyond). orjson reads
#: 1,024 levels but writes only 254, and the gateway sends a stored document inside up to 3 levels of its own
#: (a session's metadata in ``GET /v1/sessions``), so 200 leaves every stored value room to be sent again.
MAX_JSON_DEPTH = 200
#: orjson refuses to write a value nested deeper than this (its recursion limit, found by experiment)
ORJSON_WRITES = 254
_SHALLOW_BYTES = 2 * MAX_JSON_DEPTH + 1  # a body this short cannot open and close more levels




def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is infinity when parsed as double")
    return value


def _too_deep(value: Any) -> bool:
    """Whether ``value`` (of a body with more than ``MAX_JSON_DEPTH`` opening brackets) nests too deep.

    orjson writes the value inside ``254 - MAX_JSON_DEPTH`` more levels, which it refuses exactly when
    the value is too deep; a value orjson cannot write for another reason (an integer beyond 64 bits)
    is measured in Python.
    """
    wrapped: Any = value
    for _ in range(ORJSON_WRITES - MAX_JSON_DEPTH):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
        return False
    except TypeError:  # orjson.JSONEncodeError: too deep, or an integer beyond 64 bits
        return _depth(value) > MAX_JSON_DEPTH


def _depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value (0 for a scalar), without recursion."""
    deepest = 0
    todo = [(value, 0)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        level += 1
        if level > deepest:
            deepest = level
            if deepest > MAX_JSON_DEPTH:
                break
        todo.extend((child, level) for child in item if isinstance(child, (dict, list)))
    return deepest


def _deep_error() -> BadRequest:
    return BadRequest(f"body is JSON nested more than {MAX_JSON_DEPTH} levels deep", "json_too_deep")


def parse_json(body: bytes) -> Any:
    """The body's JSON value, one the gateway can store and send again, or ``400``.

    orjson parses, except bodies with integers beyond 64 bits, which the standard library keeps exact
    (``models.load_json`` reads them back the same way). Refused: anything that is not strict UTF-8 JSON,
    a lone surrogate, a number that is infinite as a double (``invalid_json``), and nesting deeper than
    ``MAX_JSON_DEPTH`` (``json_too_deep``), which orjson reads up to 1,024 levels but cannot write again.
    """
    scan = body.translate(DIGITS_TO_ZERO)  # a C pass; a regex search was 5x slower per event
    if LONG_DIGITS in scan:
        return _parse_exact(body, scan)
    try:
        value = orjson.loads(body)
    except ValueError as exc:  # orjson.JSONDecodeError and UnicodeError are ValueErrors
        raise _refused(exc) from None
    # Each level takes two bytes and an opening bracket: a small body, or one with few brackets, is never
    # too deep, so nearly every event costs a length test here, and a larger body one count of its brackets
    # (by deleting them: memchr, 4-7x faster than bytes.count).
    if len(body) > _SHALLOW_BYTES and len(scan) - len(scan.replace(b"[", b"")) > MAX_JSON_DEPTH \
            and _too_deep(value):
        raise _deep_error()
    return value


def _parse_exact(body: bytes, scan: bytes) -> Any:
    """``parse_json`` for a body with an integer orjson may not keep exactly: the standard library's parser."""
    try:
        # Decoded first, as orjson does: strict UTF-8, no byte order mark, no UTF-16 guessing.
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constants, parse_float=_finite)
    except RecursionError:  # deeper than the stack allows
        raise _deep_error() from None
    except ValueError as exc:
        raise _refused(exc) from None
    if len(scan) - len(scan.replace(b"[", b"")) > MAX_JSON_DEPTH and _too_deep(value):
        raise _deep_error()
    try:
        dump_json(value).encode()  # lone surrogates (which orjson refuses) cannot be stored or sent
    except ValueError as exc:
        raise _refused(exc) from None
    return value


def _refused(exc: ValueError) -> BadRequest:
    if "depth limit" in str(exc):  # orjson's: more than 1,024 levels
        return _deep_error()
    return BadRequest(f"body is not valid JSON: {exc}", "invalid_json")


async def read_json(request: Request, limit: int) -> Any:
    """A JSON body: ``415`` unless it is sent as ``application/json`` (see ``json_object``)."""
    body = await read_body(request, limit)
    require_json(request, body)
    return parse_json(body)


def require_json(request: Request, body: bytes) -> None:
    """``415 unsupported_media_type`` for a body a browser sent as anything but ``application/json``.

    A web page can send ``text/plain`` or a form to any address without
    asking first (no CORS preflight); JSON only with the gateway's consent.
    So a request from a page (it carries ``Origin``) must say its body is
    JSON. Other clients are taken at their word, as they always were.
    """
    if FROM_PAGE not in request.scope:  # set by cors.SiteGuard, which runs before every route
        return
    kind, charset = content_type(request)
    if kind != "application/json" or charset not in ("", "utf-8", "utf8"):
        raise UnsupportedMedia("this request takes an application/json body", "unsupported_media_type")


async def json_object(request: Request, limit: int, fields: frozenset[str], shape: str, code: str, *,
                      unknown_code: str | None = None, empty: bool = True) -> dict:
    """The request's body as a JSON object with no keys beyond ``fields`` (an empty body is ``{}`` if ``empty``).

    Not an object is ``400 code`` with ``shape`` as the message; an unknown
    key is ``400 unknown_code`` (``code`` if not given); a body not sent as
    JSON is ``415`` (``require_json``).
    """
    body = await read_body(request, limit)
    if body.strip() or not empty:
        require_json(request, body)
        value = parse_json(body)
    else:
        value = {}
    if not isinstance(value, dict):
        raise BadRequest(f"body must be a JSON object {shape}", code)
    if not value.keys() <= fields:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(set(value) - fields))}", unknown_code or code)
    return value


def content_type(request: Request) -> tuple[str, str]:
    """The media type and charset of the request body, lower case ("" when absent)."""
    raw = request.headers.get("content-type", "")
    kind, _, params = raw.partition(";")
    charset = ""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return kind.strip().lower(), charset


def json_int(value: Any) -> int | None:
    """An integer as JSON Schema counts them (``3`` and ``3.0`` alike); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def bounded_int(value: Any, bound: rules.Bound, name: str, code: str) -> int | None:
    """An optional JSON integer within ``bound``: None stays None, anything else out of it is ``400 code``."""
    if value is None:
        return None
    number = json_int(value)
    if number is None or not bound.holds(number):
        raise BadRequest(f"{name} must be an integer from {bound.low} to {bound.high}", code)
    return number


def query_int(request: Request, name: str, bound: rules.Bound) -> int:
    """The query parameter ``name`` as an integer within ``bound`` (its default when absent)."""
    raw = request.query_params.get(name)
    if raw is None:
        return bound.default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19):
        raise BadRequest(f"{name} must be an integer", f"invalid_{name}")
    value = int(raw)
    if not bound.holds(value):
        raise BadRequest(f"{name} must be between {bound.low} and {bound.high}", f"invalid_{name}")
    return value


def check_key(key: Any) -> str:
    """An idempotency key (header or body)."""
    if not isinstance(key, str) or not 1 <= len(key) <= rules.MAX_IDEMPOTENCY_KEY or not key.isprintable() \
            or not key.isascii():
        raise BadRequest(f"idempotency key must be 1-{rules.MAX_IDEMPOTENCY_KEY} printable ASCII characters",
                         "invalid_idempotency_key")
    return key


def producer_epoch(request: Any) -> int | None:
    """The ``Producer-Epoch`` header of a write (fencing), if it has one: ``400 invalid_producer_epoch`` unless
    it is a whole number from 0 to 2^53 - 1."""
    raw = request.headers.get("producer-epoch")
    if raw is None:
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 16 and rules.PRODUCER_EPOCH.holds(int(raw))):
        raise BadRequest("Producer-Epoch must be a whole number from 0 to 2^53 - 1", "invalid_producer_epoch")
    return int(raw)


def check_size(data: str, max_bytes: int, what: str = "event") -> None:
    """``413 {what}_too_large`` if ``data`` encodes to more than ``max_bytes`` bytes (``--max-event-bytes``)."""
    if len(data) > max_bytes // 4 and len(data.encode()) > max_bytes:
        raise TooLarge(f"{what} data is larger than {max_bytes} bytes", f"{what}_too_large")


_EVENT_FIELDS = frozenset({"event", "data", "idempotency_key"})
_VALID_TYPES: set[str] = set()  # event types already found valid (bounded)


def parse_event(item: Any, max_bytes: int, key: str | None = None) -> NewEvent:
    """One event object of a publish body; ``key`` is the ``Idempotency-Key`` header, if any."""
    if not isinstance(item, dict):
        raise BadRequest("each event must be a JSON object {\"event\"?, \"data\", \"idempotency_key\"?}",
                         "invalid_event")
    if not item.keys() <= _EVENT_FIELDS:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(set(item) - _EVENT_FIELDS))}", "unknown_field")
    if "data" not in item:
        raise BadRequest("an event needs a \"data\" field", "missing_data")
    event = item.get("event", "message")
    if type(event) is not str or event not in _VALID_TYPES:  # publishers reuse a few types: each is checked once
        check_event_type(event)
        if len(_VALID_TYPES) < 1024:
            _VALID_TYPES.add(event)
    if item.get("idempotency_key") is not None:
        if key is not None:
            raise BadRequest("give the idempotency key in the header or the body, not both",
                             "invalid_idempotency_key")
        key = check_key(item["idempotency_key"])
    data = dump_json(item["data"])
    check_size(data, max_bytes)
    return NewEvent(event, data, True, key)


_INPUT_FIELDS = frozenset({"kind", "data", "idempotency_key", "approval_id", "decision"})
INPUT_SHAPE = '{"kind", "data"?, "idempotency_key"?, "approval_id"?, "decision"?}'
_APPROVAL_ID = re.compile(rules.APPROVAL_ID)


def parse_input(item: Any, max_bytes: int) -> NewInput:
    """The body of ``POST /v1/sessions/{id}/input`` (already parsed JSON) as an input, or ``400``/``413``."""
    if not isinstance(item, dict):
        raise BadRequest(f"body must be a JSON object {INPUT_SHAPE}", "invalid_body")
    if not item.keys() <= _INPUT_FIELDS:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(set(item) - _INPUT_FIELDS))}", "unknown_field")
    kind = item.get("kind")
    if kind not in INPUT_KINDS or type(kind) is not str:
        raise BadRequest(f"kind must be one of {', '.join(INPUT_KINDS)}", "invalid_kind")
    key = None if item.get("idempotency_key") is None else check_key(item["idempotency_key"])
    approval_id, decision = item.get("approval_id"), item.get("decision")
    if kind == "approval":
        if not isinstance(approval_id, str) or not _APPROVAL_ID.fullmatch(approval_id):
            raise BadRequest(f"an approval names its request: approval_id, 1-{rules.MAX_APPROVAL_ID} printable ASCII "
                             "characters", "invalid_approval_id")
        if decision not in DECISIONS or type(decision) is not str:
            raise BadRequest("an approval needs a decision: approve or deny", "invalid_decision")
    else:
        if approval_id is not None:
            raise BadRequest("only an input of kind approval names an approval_id", "invalid_approval_id")
        if decision is not None:
            raise BadRequest("only an input of kind approval has a decision", "invalid_decision")
    data = dump_json(item.get("data"))
    check_size(data, max_bytes, "input")
    return NewInput(kind, data, key, approval_id, decision)


def parse_scopes(value: Any) -> tuple[str, ...]:
    """A token's ``scopes``: absent or null is ``subscribe``; otherwise a list of distinct known scopes that
    includes ``subscribe`` (every token reads its session), else ``400 invalid_scopes``."""
    if value is None:
        return ("subscribe",)
    if not isinstance(value, list) or not all(type(s) is str and s in rules.SCOPES for s in value) \
            or len(set(value)) != len(value) or "subscribe" not in value:
        raise BadRequest(f"scopes must be a list of distinct scopes from {', '.join(rules.SCOPES)}, with subscribe",
                         "invalid_scopes")
    return tuple(s for s in rules.SCOPES if s in value)

"""The rules a request must keep: name patterns, numeric bounds, fixed limits.

One source for both sides: the validators (``models``, ``bodies``, the
routes) and the OpenAPI description (``openapi``) read these objects, so
what is checked and what is documented cannot drift apart. Limits that a
deployment sets (``--max-batch``, ``--max-event-bytes``, ...) live in
``Settings``; ``openapi.describe`` reads them from there.

Patterns are written once, in the subset of regular expressions that both
Python's ``re`` and JSON Schema (ECMA 262) understand.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A session id: 1-128 of A-Z a-z 0-9 _ . ~ -, and neither "." nor ".." (they are path segments).
SESSION_ID = r"^(?!\.{1,2}$)[A-Za-z0-9_.~-]{1,128}$"
#: An event type a publisher may use; types beginning with ``gateway.`` are the gateway's own.
EVENT_TYPE = r"^[A-Za-z0-9_.:-]{1,64}$"
RESERVED_PREFIX = "gateway."
#: A cursor: ``ID`` or ``ID:EPOCH``, or with the start of the first message a replay holds back, ``ID/HOLD``
#: or ``ID/HOLD:EPOCH`` (surrounding blanks are ignored; see ``messages``).
CURSOR = r"^\s*([0-9]{1,18})(?:/([0-9]{1,18}))?(?::([A-Za-z0-9]{1,32}))?\s*$"
#: A message id (the ``message`` of a ``message.*`` event's data).
MESSAGE_ID = r"^[A-Za-z0-9_.:~-]{1,128}$"
#: An idempotency key: 1-256 printable ASCII characters.
MAX_IDEMPOTENCY_KEY = 256
IDEMPOTENCY_KEY = r"^[\x20-\x7e]{1,256}$"


@dataclass(frozen=True)
class Bound:
    """An integer that must lie in ``low..high``; ``default`` when it is not given."""

    low: int
    high: int
    default: int | None = None

    def holds(self, value: int) -> bool:
        return self.low <= value <= self.high

    def schema(self) -> dict:
        return {"type": "integer", "minimum": self.low, "maximum": self.high}


SESSION_TTL = Bound(1, 10**9 - 1)           # ttl_seconds of a session
TOKEN_TTL = Bound(1, 30 * 86400)            # ttl_seconds of a minted subscribe token
LIST_LIMIT = Bound(1, 1000, default=100)    # GET /v1/sessions?limit=
READ_LIMIT = Bound(1, 1000, default=100)    # GET .../events?limit=
READ_AFTER = Bound(0, 2**62, default=0)     # GET .../events?after=
INPUT_WAIT = Bound(0, 30, default=0)        # GET .../input?wait= (seconds)
LEASE = Bound(0, 10**9 - 1)                 # lease_seconds of a session (0: no lease)
PRODUCER_EPOCH = Bound(0, 2**53 - 1)        # the Producer-Epoch header (fencing)
#: How a publisher may end a run (the gateway itself ends runs as timed_out, or cancelled after a cancel's grace).
END_STATUSES = ("completed", "failed", "cancelled")
#: A webhook URL: http(s), a host, printable ASCII without blanks, at most 2,048 characters.
WEBHOOK_URL = r"^https?://[\x21-\x2e\x30-\x7e][\x21-\x7e]{0,2039}$"
#: An approval id (``approval.request`` data, an approval input): 1-128 printable ASCII characters.
APPROVAL_ID = r"^[\x20-\x7e]{1,128}$"
MAX_APPROVAL_ID = 128
SCOPES = ("subscribe", "input")             # what a subscribe token may allow
SMALL_BODY = 4096                           # bodies of ack, trim and token requests

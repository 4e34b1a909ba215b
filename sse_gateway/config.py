"""Settings: the only reader of the environment.

Every field is a ``serve`` option (``--heartbeat``) and an environment
variable (``SSE_GATEWAY_HEARTBEAT``); an option given on the command line
wins over the environment, which wins over the default. The CLI builds its
``--help`` from the ``help`` of each field, so the two never disagree.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "SSE_GATEWAY_"


def _opt(default: Any, help: str, *, metavar: str | None = None, repeat: bool = False, flag: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "metavar": metavar, "repeat": repeat, "flag": flag})


@dataclass(frozen=True)
class Settings:
    host: str = _opt("127.0.0.1", "address to listen on", metavar="ADDR")
    port: int = _opt(8000, "port to listen on")
    db: str = _opt("./sse-gateway.db", "SQLite file of the default backend", metavar="PATH")
    backend: str = _opt("sqlite", "event log backend: sqlite, memory (nothing kept) or redis", metavar="NAME")
    redis_url: str = _opt("redis://127.0.0.1:6379/0", "Redis URL for --backend redis (redis+cluster://HOST:PORT "
                          "for Redis Cluster)", metavar="URL")
    redis_wait_replicas: int = _opt(0, "Redis replicas that must confirm each write before it is acknowledged "
                                    "(WAIT; 0: do not wait)", metavar="N")
    heartbeat: float = _opt(15.0, "seconds of silence before a ': ping' comment", metavar="SECONDS")
    coalesce_ms: float = _opt(5.0, "a busy session's streams are woken again this many ms after they have "
                              "written, so they write its events in batches (0: wake on every event)", metavar="MS")
    retry_ms: int = _opt(1000, "reconnect delay sent to clients as 'retry:' (plus up to 50%% jitter)", metavar="MS")
    publish_key: tuple[str, ...] = _opt((), "publisher key (repeatable; env: comma-separated); none means open",
                                        metavar="KEY", repeat=True)
    token_secret: str | None = _opt(None, "secret that signs subscribe tokens", metavar="SECRET")
    token_ttl: int = _opt(3600, "lifetime of minted subscribe tokens", metavar="SECONDS")
    insecure: bool = _opt(False, "allow a non-loopback --host with no publisher keys, or with placeholder or short "
                          "keys and secrets", flag=True)
    cors_origin: tuple[str, ...] = _opt((), "allowed CORS origin (repeatable; env: comma-separated)",
                                        metavar="ORIGIN", repeat=True)
    allowed_host: tuple[str, ...] = _opt((), "host name a gateway without publisher keys answers to, besides "
                                         "IP addresses and localhost (repeatable; env: comma-separated; '*': any)",
                                         metavar="NAME", repeat=True)
    max_event_bytes: int = _opt(1 << 20, "largest data of one event", metavar="BYTES")
    max_batch: int = _opt(1000, "most events in one batch", metavar="N")
    max_body_bytes: int = _opt(16 << 20, "largest request body (NDJSON streams: largest line)", metavar="BYTES")
    max_sessions: int = _opt(100_000, "sessions the log may hold; creating one more is 503 (0: no limit)",
                             metavar="N")
    max_streams: int = _opt(10_000, "open SSE streams in this process; one more is 503 (0: no limit)", metavar="N")
    max_streams_per_session: int = _opt(1000, "open SSE streams of one session in this process; one more is 429 "
                                        "(0: no limit)", metavar="N")
    header_timeout: float = _opt(10.0, "seconds a client may take to send a request's headers; then the "
                                 "connection is closed", metavar="SECONDS")
    body_timeout: float = _opt(30.0, "seconds a request body (not NDJSON) may take to arrive; then 408",
                               metavar="SECONDS")
    ndjson_line_timeout: float = _opt(300.0, "seconds an NDJSON publish stream may take to complete its next line "
                                      "(a blank line counts); then 408", metavar="SECONDS")
    max_events: int = _opt(0, "events kept per session; older ones are trimmed (0: keep all)", metavar="N")
    session_ttl: int = _opt(86400, "seconds a completed session is kept (0: forever)", metavar="SECONDS")
    lease: int = _opt(3600, "seconds an open run may go without a write or a lease renewal from its agent; then the "
                      "gateway ends it as timed_out (0: never; a session may set its own lease_seconds)",
                      metavar="SECONDS")
    cancel_grace: int = _opt(30, "seconds an agent has to confirm a cancel; then the gateway ends the run as "
                             "cancelled itself (0: no grace of its own: the lease, which writes no longer "
                             "renew after a cancel, ends it)", metavar="SECONDS")
    auto_create: bool = _opt(True, "publishing to an unknown session creates it", flag=True)
    send_timeout: float = _opt(10.0, "a stream whose client accepts nothing for this long is cut", metavar="SECONDS")
    sqlite_synchronous: str = _opt("NORMAL", "SQLite synchronous mode: NORMAL (survives a crash) or FULL "
                                   "(also survives a power cut)", metavar="MODE")
    workers: int = _opt(1, "gateway processes serving the port, each on its own core, over one SQLite file or one "
                        "Redis (not --backend memory); a supervisor restarts any that dies", metavar="N")
    drain_seconds: float = _opt(10.0, "on SIGTERM, spread the closing of streams over this window",
                                metavar="SECONDS")
    keep_alive: int = _opt(75, "seconds an idle keep-alive connection stays open (keep it above a load "
                           "balancer's idle timeout: an AWS ALB's is 60)", metavar="SECONDS")
    log_level: str = _opt("info", "debug, info, warning or error", metavar="LEVEL")
    access_log: bool = _opt(False, "log every request (query strings redacted)", flag=True)
    demo: bool = _opt(True, "serve the demo page's simulated agent runs (POST /v1/demo/runs)", flag=True)
    webhook_url: str | None = _opt(None, "URL that gets a signed POST when a run ends or asks for approval while "
                                   "nobody watches its session (needs --webhook-secret)", metavar="URL")
    webhook_secret: str | None = _opt(None, "secret that signs webhooks: whsec_BASE64 (as Standard Webhooks "
                                      "libraries take it) or any other string, used as its bytes", metavar="SECRET")
    webhook_outbox: str | None = _opt(None, "SQLite file of the webhooks not yet delivered (default: beside --db, "
                                      "NAME.webhooks.db; with --backend memory: in memory)", metavar="PATH")
    webhook_attempts: int = _opt(12, "attempts of one webhook before it is given up", metavar="N")
    webhook_max_age: float = _opt(86400.0, "seconds after which a webhook not yet delivered is given up",
                                  metavar="SECONDS")
    webhook_backoff: float = _opt(5.0, "wait before a webhook's second attempt; doubled after each failed "
                                  "attempt up to an hour, plus up to 50%% jitter", metavar="SECONDS")
    webhook_timeout: float = _opt(15.0, "seconds a webhook's receiver has to answer one attempt", metavar="SECONDS")

    @property
    def publish_keys(self) -> tuple[str, ...]:
        return self.publish_key

    @property
    def outbox_path(self) -> str:
        """The webhook outbox's file: ``--webhook-outbox``, else beside the data file (memory: in memory)."""
        if self.webhook_outbox:
            return self.webhook_outbox
        if self.backend == "memory":
            return ":memory:"
        return os.path.splitext(self.db)[0] + ".webhooks.db"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``SSE_GATEWAY_*`` from ``env``, then ``overrides`` (None means not given)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = parse_value(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.backend not in ("sqlite", "memory", "redis"):
            raise ValueError(f"unknown backend {self.backend!r}: use sqlite, memory or redis")
        if self.heartbeat <= 0:
            raise ValueError("heartbeat must be positive")
        if self.coalesce_ms < 0:
            raise ValueError("coalesce_ms must be 0 or more")
        if self.sqlite_synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError("sqlite_synchronous must be NORMAL or FULL")
        if self.redis_wait_replicas < 0:
            raise ValueError("redis_wait_replicas must be 0 or more")
        if self.redis_wait_replicas and "+cluster://" in self.redis_url:
            raise ValueError("redis_wait_replicas is not supported with Redis Cluster")
        if self.workers < 1:
            raise ValueError("workers must be 1 or more")
        if self.workers > 1 and self.backend == "memory":
            raise ValueError("the memory backend lives in one process, so workers cannot share it: use --backend "
                             "sqlite or redis with --workers")
        if not (0 < self.port < 65536):
            raise ValueError("port must be between 1 and 65535")
        for name in ("max_sessions", "max_streams", "max_streams_per_session", "lease", "cancel_grace"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (no limit) or positive")
        self.check_credentials()
        if self.token_ttl <= 0:
            raise ValueError("token_ttl must be positive")
        for name in ("header_timeout", "body_timeout", "ndjson_line_timeout", "webhook_attempts", "webhook_max_age",
                     "webhook_backoff", "webhook_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.webhook_url is not None:
            if problem := url_problem(self.webhook_url):
                raise ValueError(f"webhook_url is not a URL webhooks can be sent to: {problem}")
            if self.webhook_secret is None:
                raise ValueError("webhook_url needs webhook_secret: every webhook is signed "
                                 f"(make one with {GENERATE_WHSEC})")

    @property
    def loopback(self) -> bool:
        """The gateway listens on this machine only (``--host`` 127.0.0.1, ::1 or localhost)."""
        return is_loopback(self.host)

    def check_credentials(self) -> None:
        """Refuse keys and secrets that protect nothing.

        An empty or blank one (what ``--publish-key "$UNSET"`` gives) is always
        refused: it would leave a gateway open while its operator thinks it is
        closed. A placeholder of the example files is refused unless
        ``insecure``; so is a key or secret too short to be secret, on a gateway
        that listens beyond this machine (on loopback ``serve`` only warns:
        ``weak_credentials``).
        """
        for key in self.publish_key:
            if not key.strip():
                raise ValueError("a publisher key is empty or blank (an unset variable?): give a real key, or none")
        if self.token_secret is not None and not self.token_secret.strip():
            raise ValueError("the token secret is empty or blank (an unset variable?): give a real secret, or none")
        if self.webhook_secret is not None:
            if not self.webhook_secret.strip():
                raise ValueError("the webhook secret is empty or blank (an unset variable?): give a real secret, "
                                 "or none")
            webhook_key(self.webhook_secret)  # a whsec_ secret that is not base64 is refused here
        if self.insecure:
            return
        if any(_placeholder(v) for v in (*self.publish_key, self.token_secret or "", self.webhook_secret or "")):
            raise ValueError(f"a publisher key, the token secret or the webhook secret is a placeholder of the "
                             f"example files: use a random one ({GENERATE}), or pass --insecure")
        if not self.loopback and (weak := self.weak_credentials()):
            raise ValueError(f"{weak[0]}; {self.host} is reachable from other machines (or pass --insecure)")

    def weak_credentials(self) -> list[str]:
        """Keys and secrets too short to be secret (or placeholders), one line each."""
        problems = []
        if any(_placeholder(key) or len(key) < MIN_KEY_CHARS for key in self.publish_key):
            problems.append(f"a publisher key is shorter than {MIN_KEY_CHARS} characters: use a random one "
                            f"({GENERATE})")
        secret = self.token_secret
        if secret is not None and (_placeholder(secret) or len(secret.encode()) < MIN_SECRET_BYTES):
            problems.append(f"the token secret is shorter than {MIN_SECRET_BYTES} bytes: tokens can be forged by "
                            f"guessing it; use a random one ({GENERATE})")
        secret = self.webhook_secret
        if secret is not None and (_placeholder(secret) or len(webhook_key(secret)) < MIN_SECRET_BYTES):
            problems.append(f"the webhook secret is shorter than {MIN_SECRET_BYTES} bytes: webhooks can be forged by "
                            f"guessing it from any signature; use a random one ({GENERATE_WHSEC})")
        return problems


def _placeholder(value: str) -> bool:
    return value.strip().lower() in PLACEHOLDERS


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a webhook secret: ``whsec_`` and base64 (the Standard Webhooks form), else its UTF-8 bytes."""
    if not secret.startswith(WHSEC):
        return secret.encode()
    text = secret[len(WHSEC):].rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the webhook secret starts with {WHSEC} but the rest is not base64: give the secret as "
                         f"its receivers have it") from None


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot receive webhooks (one phrase), or None: an absolute http(s) URL with a host."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "it has spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises for a port that is not a number from 0 to 65535
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "use http:// or https://"
    if not parts.hostname:
        return "it names no host"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: Values the example files ship, refused as keys or secrets.
PLACEHOLDERS = frozenset({"change-me", "change-me-too", "changeme", "secret", "password"})
MIN_KEY_CHARS = 16  # a publisher key guessed online: 16 random characters are ~95 bits
MIN_SECRET_BYTES = 32  # the token secret can be attacked offline from any token: as strong as HS256's key
GENERATE = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
WHSEC = "whsec_"
GENERATE_WHSEC = ("python -c 'import base64, secrets; "
                  "print(\"whsec_\" + base64.b64encode(secrets.token_bytes(32)).decode())'")


def parse_value(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if f.metadata.get("repeat"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if f.metadata.get("flag"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind}") from None
    return raw

"""The ``sse-gateway`` command: serve, publish, tail (and bench).

``serve`` options are generated from ``Settings``: each has an environment
variable ``SSE_GATEWAY_<NAME>``; the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import logging
import os
import random
import re
import sys
import time
import urllib.parse

import orjson

from . import __version__
from .bench import add_parser as add_bench
from .config import ENV_PREFIX, Settings, parse_value

log = logging.getLogger("sse_gateway")

DESCRIPTION = """\
sse-gateway keeps long-running agents and their users connected.

Agents POST events into a durable per-session log; browsers, curl and
scripts read it as Server-Sent Events and resume exactly where they were
after any dropped connection (Last-Event-ID).

  sse-gateway serve                       start the gateway on 127.0.0.1:8000 (SQLite)
  sse-gateway publish run1 '{"text":"hi"}'  append an event to session run1
  sse-gateway tail run1                   print run1's events as they arrive, resuming by itself
"""


def _add_settings_options(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Settings):
        meta = f.metadata
        env = ENV_PREFIX + f.name.upper()
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = "none" if default in (None, ()) else default
        help_text = f"{meta['help']} [env {env}; default {shown}]"
        if meta.get("flag"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif meta.get("repeat"):
            parser.add_argument(flag, action="append", default=None, metavar=meta.get("metavar"), help=help_text)
        else:
            parser.add_argument(flag, default=None, metavar=meta.get("metavar"), help=help_text,
                                type=lambda raw, f=f: parse_value(f, raw))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sse-gateway", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sse-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway", description="Run the gateway. Every option also "
                           f"reads an environment variable {ENV_PREFIX}<NAME>.")
    _add_settings_options(serve)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", default=os.environ.get(ENV_PREFIX + "URL", "http://127.0.0.1:8000"),
                        help=f"gateway base URL [env {ENV_PREFIX}URL]")
    client.add_argument("--key", default=os.environ.get(ENV_PREFIX + "KEY"),
                        help=f"publisher key or subscribe token [env {ENV_PREFIX}KEY]")

    pub = sub.add_parser("publish", parents=[client], help="append an event to a session",
                         description="Append one event. DATA is sent as JSON if it parses as JSON, else as "
                         "text; '-' streams standard input, one JSON event object per line (NDJSON).")
    pub.add_argument("session")
    pub.add_argument("data", metavar="DATA")
    pub.add_argument("--event", default="message", help="event type (default: message)")
    pub.add_argument("--text", action="store_true", help="send DATA as text even if it parses as JSON")
    pub.add_argument("--idempotency-key", help="make a retry of this publish safe")

    tail = sub.add_parser("tail", parents=[client], help="print a session's events as they arrive",
                          description="Stream a session and print its events; reconnects by itself after a "
                          "dropped connection and resumes exactly after the last event it printed.")
    tail.add_argument("session")
    tail.add_argument("--from", dest="start", default=None, metavar="N",
                      help="start after event N (default: from the first event)")
    tail.add_argument("--json", action="store_true", help="print one JSON object per event")
    tail.add_argument("--no-follow", action="store_true", help="print what exists, then exit")

    add_bench(sub)  # only the options: the bench itself is imported when it runs
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "serve":
        return serve(args)
    if args.command == "publish":
        return publish(args)
    if args.command == "tail":
        return asyncio.run(tail(args))
    return args.run(args)


# -- serve ---------------------------------------------------------------------


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr)
    logging.getLogger("uvicorn.access").addFilter(_RedactTokens())
    logging.getLogger("uvicorn.error").addFilter(_QuietSlowConsumerCut())


class _RedactTokens(logging.Filter):
    """Subscribe tokens travel in query strings; they never reach the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_query(target: str) -> str:
    """``target`` with the value of every ``token`` query parameter replaced, however its name is encoded."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        if eq and urllib.parse.unquote_plus(name).lower() == "token":
            part = name + "=REDACTED"
        parts.append(part)
    return path + "?" + "&".join(parts)


class _QuietSlowConsumerCut(logging.Filter):
    """A stream cut for a slow client ends without finishing its response, on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing response."


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .protocol import header_deadline

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    for name in ("publish_key", "cors_origin", "allowed_host"):
        if overrides[name] is not None:
            overrides[name] = tuple(overrides[name])
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        print(f"sse-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    if not settings.publish_keys:
        if not is_loopback(settings.host) and not settings.insecure:
            print(f"sse-gateway: refusing to listen on {settings.host} with no publisher keys: anyone could "
                  "publish and read. Set --publish-key (and --token-secret), or pass --insecure.", file=sys.stderr)
            return 2
        log.warning("no publisher keys: the gateway is open to anyone who can reach %s", settings.host)
    elif not settings.token_secret:
        log.warning("publisher keys but no --token-secret: only publishers can read; browsers get no tokens")
    if settings.token_secret and len(settings.token_secret.encode()) < 32:
        log.warning("the token secret is shorter than 32 bytes: tokens can be forged by guessing it; generate one "
                    "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if settings.backend == "sqlite":
        from .log.sqlite import preflight

        problem = preflight(settings.db)
        if problem:
            log.error("cannot start: %s", problem)
            return 1
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=settings.access_log, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=int(settings.drain_seconds) + 5,
                            timeout_keep_alive=settings.keep_alive, server_header=False,
                            http=header_deadline(settings.header_timeout))
    server = GatewayServer(config, app)
    where = "memory (nothing is kept)" if settings.backend == "memory" else (
        settings.db if settings.backend == "sqlite" else re.sub(r"//[^@/]*@", "//***@", settings.redis_url))
    log.info("sse-gateway %s on http://%s:%d  backend=%s (%s)  heartbeat=%gs", __version__, settings.host,
             settings.port, settings.backend, where, settings.heartbeat)
    return 0 if server.run() else 1


class GatewayServer:
    """uvicorn's server: the first SIGTERM/SIGINT drains, the second ends all streams and exits now."""

    def __init__(self, config, app) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                outer.on_signal(self, sig, frame)

        self.server = _Server(config)
        self.app = app
        self._signals = 0

    def on_signal(self, server, sig, frame) -> None:
        self._signals += 1
        gw = getattr(self.app.state, "gw", None)
        if self._signals == 1 and gw is not None and gw.settings.drain_seconds > 0:
            log.info("draining: new streams get 503, open streams close over %gs; signal again to exit now",
                     gw.settings.drain_seconds)
            gw.loop.call_soon_threadsafe(gw.begin_drain, lambda: setattr(server, "should_exit", True))
            return
        if gw is not None:  # end every stream now, then shut down cleanly (the store is closed)
            gw.loop.call_soon_threadsafe(gw.hub.shutdown)
        server.should_exit = True
        if self._signals > 2:
            server.force_exit = True

    def run(self) -> bool:
        self.server.run()
        return self.server.started


# -- publish ---------------------------------------------------------------------


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def publish(args: argparse.Namespace) -> int:
    import httpx

    url = f"{args.url.rstrip('/')}/v1/sessions/{args.session}/events"
    headers = _headers(args.key)
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    with httpx.Client(timeout=None) as client:
        if args.data == "-":
            resp = client.post(url, content=_stdin_lines(), headers={**headers,
                               "Content-Type": "application/x-ndjson"})
        else:
            value = None
            if not args.text:
                try:
                    value = orjson.loads(args.data)
                except orjson.JSONDecodeError:
                    value = None
            if value is not None or args.data.strip() == "null" and not args.text:
                resp = client.post(url, content=orjson.dumps({"event": args.event, "data": value}),
                                   headers={**headers, "Content-Type": "application/json"})
            else:
                resp = client.post(url, params={"event": args.event}, content=args.data.encode(),
                                   headers={**headers, "Content-Type": "text/plain; charset=utf-8"})
    print(resp.text)
    return 0 if resp.status_code < 400 else 1


def _stdin_lines():
    for line in sys.stdin.buffer:
        yield line


# -- tail -------------------------------------------------------------------------


async def tail(args: argparse.Namespace) -> int:
    import httpx
    from httpx_sse import aconnect_sse

    url = f"{args.url.rstrip('/')}/v1/sessions/{args.session}/stream"
    cursor = args.start
    delay = 1.0
    params = {"live": "false"} if args.no_follow else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client:
        while True:
            headers = _headers(args.key)
            if cursor is not None:
                headers["Last-Event-ID"] = cursor
            try:
                async with aconnect_sse(client, "GET", url, headers=headers, params=params) as source:
                    if source.response.status_code == 204:
                        return 0
                    if source.response.status_code != 200:
                        await source.response.aread()
                        print(f"sse-gateway tail: {source.response.status_code} {source.response.text}",
                              file=sys.stderr)
                        return 1
                    async for sse in source.aiter_sse():
                        if sse.retry:
                            delay = sse.retry / 1000
                        if not sse.data and sse.id in ("", cursor):
                            continue  # a block without an event (httpx-sse reports one)
                        if sse.event in ("gateway.gap", "gateway.reset"):
                            print(f"# {sse.event} {sse.data}", file=sys.stderr, flush=True)
                            if sse.event == "gateway.reset":
                                cursor = None
                            continue
                        if sse.id:
                            cursor = sse.id
                        _print_event(sse, args.json)
                        if sse.event == "gateway.end":
                            return 0
                    if args.no_follow:
                        return 0
            except httpx.HTTPError as exc:
                print(f"# connection lost ({exc.__class__.__name__}); resuming after {cursor or 'the start'}",
                      file=sys.stderr, flush=True)
            await asyncio.sleep(delay * (1 + random.random() / 2))


def _print_event(sse, as_json: bool) -> None:
    if as_json:
        print(orjson.dumps({"id": sse.id, "event": sse.event, "data": sse.data}).decode(), flush=True)
    else:
        stamp = time.strftime("%H:%M:%S")
        print(f"{stamp} {sse.id:>12} {sse.event:<16} {sse.data}", flush=True)

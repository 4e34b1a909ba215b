"""The ``sse-gateway`` command: serve, publish, tail, create, complete, token, send, cancel (and bench).

``serve`` options are generated from ``Settings``: each has an environment
variable ``SSE_GATEWAY_<NAME>``; the command line wins. The client commands
use ``sse_gateway.client`` and read ``SSE_GATEWAY_URL`` and
``SSE_GATEWAY_PUBLISH_KEY``, the variable ``serve`` reads its keys from.

Every mistake and every failure is one line on standard error and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
from typing import Any, NoReturn

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
  sse-gateway create run1                 create session run1 (or take it up if it exists)
  sse-gateway token run1                  mint a subscribe token for run1 and print its stream URL
  sse-gateway complete run1 --result '{"text":"hi"}'  end run1 with its result
  sse-gateway send run1 steer '{"text":"shorter"}'  send run1's agent input (message, steer, approval)
  sse-gateway cancel run1 --reason "enough"  ask run1's agent to stop
"""

#: The client commands' credential; SSE_GATEWAY_KEY is its former name, still read with a warning.
KEY_ENV = ENV_PREFIX + "PUBLISH_KEY"
OLD_KEY_ENV = ENV_PREFIX + "KEY"


class Parser(argparse.ArgumentParser):
    """argparse, with its mistakes told in one line (usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _kind(f: dataclasses.Field) -> str:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {"int": "an integer", "float": "a number", "bool": "a boolean"}.get(kind.split(" ")[0], kind)


def _setting_type(f: dataclasses.Field):
    def convert(raw: str) -> Any:
        try:
            return parse_value(f, raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not {_kind(f)}") from None

    convert.__name__ = f.name
    return convert


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
                                type=_setting_type(f))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sse-gateway", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sse-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway", description="Run the gateway. Every option also "
                           f"reads an environment variable {ENV_PREFIX}<NAME>.")
    _add_settings_options(serve)

    client = Parser(add_help=False)
    client.add_argument("--url", default=None,
                        help=f"gateway base URL [env {ENV_PREFIX}URL; default http://127.0.0.1:8000]")
    client.add_argument("--key", default=None,
                        help=f"publisher key (for tail: or a subscribe token) [env {KEY_ENV}]")
    client.add_argument("--retry-for", type=_seconds, default=None, metavar="SECONDS",
                        help="keep trying a gateway that cannot be reached or is busy this long, then give up "
                             f"(default {RETRY_FOR:g}; for tail {TAIL_RETRY_FOR:g})")

    pub = sub.add_parser("publish", parents=[client], help="append an event to a session",
                         description="Append one event. DATA is sent as JSON if it parses as JSON, else as "
                         "text; '-' reads standard input, one JSON event object per line (NDJSON), sent in "
                         "batches as the lines arrive. Retries are safe: every event has an idempotency key.")
    pub.add_argument("session")
    pub.add_argument("data", metavar="DATA")
    pub.add_argument("--event", default="message", help="event type (default: message)")
    pub.add_argument("--text", action="store_true", help="send DATA as text even if it parses as JSON")
    pub.add_argument("--idempotency-key", help="the event's idempotency key (default: a fresh one)")

    tail = sub.add_parser("tail", parents=[client], help="print a session's events as they arrive",
                          description="Stream a session and print its events; reconnects by itself after a "
                          "dropped connection and resumes exactly after the last event it printed. Gives up "
                          "when the gateway cannot be reached for --retry-for seconds.")
    tail.add_argument("session")
    tail.add_argument("--from", dest="start", default=None, metavar="N",
                      help="start after event N (a cursor ID or ID:EPOCH), or 'earliest' or 'latest' "
                           "(default: from the first event)")
    tail.add_argument("--json", action="store_true", help="print one JSON object per event")
    tail.add_argument("--no-follow", action="store_true", help="print what exists, then exit")

    create = sub.add_parser("create", parents=[client], help="create a session (or take up an existing one)",
                            description="Create a session and print the gateway's answer (id, epoch, "
                            "stream_url, subscribe_token) as JSON, with \"created\": false when it existed.")
    create.add_argument("session", nargs="?", default=None, metavar="ID", help="its id (default: a fresh one)")
    create.add_argument("--metadata", type=_json_arg, default=None, metavar="JSON", help="any JSON value")
    create.add_argument("--ttl", type=_positive_int, default=None, metavar="SECONDS",
                        help="how long the session is kept after completion")
    create.add_argument("--lease", type=int, default=None, metavar="SECONDS",
                        help="end the run as timed_out when its agent neither writes nor renews for this long "
                        "(0: never; default: the gateway's --lease)")

    complete = sub.add_parser("complete", parents=[client], help="end a session's run: completed, failed or "
                              "cancelled", description="End a session's run: its streams get gateway.end with the "
                              "result (completed) or {status, error, result?} (failed, cancelled). Prints the "
                              "session as JSON.")
    complete.add_argument("session", metavar="ID")
    complete.add_argument("--result", type=_json_arg, default=None, metavar="JSON", help="the result, any JSON")
    complete.add_argument("--status", choices=("completed", "failed", "cancelled"), default="completed",
                          help="how the run ended (default: completed)")
    complete.add_argument("--error", type=_json_arg, default=None, metavar="JSON",
                          help="why it failed or was cancelled, any JSON (with --status failed or cancelled)")

    token = sub.add_parser("token", parents=[client], help="mint a subscribe token and print its stream URL",
                           description="Mint a subscribe token for one session (the gateway needs "
                           "--token-secret) and print {token, expires_at, stream_url} as JSON; stream_url is "
                           "the full URL a browser or curl can read.")
    token.add_argument("session", metavar="ID")
    token.add_argument("--ttl", type=_positive_int, default=None, metavar="SECONDS",
                       help="the token's lifetime (default: the gateway's --token-ttl)")
    token.add_argument("--input", action="store_true",
                       help="the token may also send input to the session (scopes subscribe and input)")

    send = sub.add_parser("send", parents=[client], help="send a session's agent input (user -> agent)",
                          description="Send input to the agent of a session: KIND is message, steer, approval "
                          "or cancel; DATA is sent as JSON if it parses as JSON, else as text. An approval needs "
                          "--approval-id and --decision. Prints the gateway's answer (the input's id, and the "
                          "event_id of its gateway.input mirror) as JSON. Retries are safe: the input has an "
                          "idempotency key. --key may be a token minted with --input.")
    send.add_argument("session", metavar="ID")
    send.add_argument("kind", metavar="KIND", choices=("message", "steer", "approval", "cancel"))
    send.add_argument("data", metavar="DATA", nargs="?", default=None)
    send.add_argument("--approval-id", default=None, help="for KIND approval: the approval_id it answers")
    send.add_argument("--decision", choices=("approve", "deny"), default=None, help="for KIND approval")
    send.add_argument("--text", action="store_true", help="send DATA as text even if it parses as JSON")
    send.add_argument("--idempotency-key", help="the input's idempotency key (default: a fresh one)")

    cancel = sub.add_parser("cancel", parents=[client], help="ask a session's agent to stop",
                            description="Send a cancel input (data {\"reason\": ...} with --reason). The agent "
                            "decides what it does (an agent of the Python client ends its run as cancelled); the "
                            "session shows run_status cancelling until then. Prints the gateway's answer as JSON.")
    cancel.add_argument("session", metavar="ID")
    cancel.add_argument("--reason", default=None, help="why, for the agent and the other viewers")
    cancel.add_argument("--idempotency-key", help="the input's idempotency key (default: a fresh one)")

    add_bench(sub)  # only the options: the bench itself is imported when it runs
    return parser


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds (0 or more)")
    return value


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{raw!r} is not positive")
    return value


def strict_json(raw: str | bytes) -> Any:
    """JSON as the gateway reads it: NaN and Infinity are not JSON."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw, parse_constant=refuse)


def _json_arg(raw: str) -> Any:
    try:
        return strict_json(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{raw!r} is not JSON ({exc})") from None


CLIENT_COMMANDS = ("publish", "tail", "create", "complete", "token", "send", "cancel")
#: How long the client commands keep trying a gateway that is down or busy: long enough for a restart;
#: tail, which usually runs for long, rides out longer outages.
RETRY_FOR = 10.0
TAIL_RETRY_FOR = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "serve":
        return serve(args)
    if args.command in CLIENT_COMMANDS:
        return run_client_command(args)
    return args.run(args)


# -- serve ---------------------------------------------------------------------


def setup_logging(level: str, who: str | None = None) -> None:
    """Log lines to standard error; ``who`` (``worker 2``, ``supervisor``) says which process of several wrote."""
    where = f"[{who}] " if who else ""
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s %(levelname)-7s {where}%(name)s: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr)
    logging.getLogger("uvicorn.access").addFilter(_RedactTokens())
    logging.getLogger("uvicorn.error").addFilter(_QuietSlowConsumerCut())
    # httpx tells every webhook attempt with its whole URL; the notifier logs what goes wrong, without it
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))


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


def serve(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    for name in ("publish_key", "cors_origin", "allowed_host"):
        if overrides[name] is not None:
            overrides[name] = tuple(overrides[name])
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        print(f"sse-gateway: {exc}", file=sys.stderr)
        return 2
    if not settings.publish_keys and not settings.loopback and not settings.insecure:
        print(f"sse-gateway: refusing to listen on {settings.host} with no publisher keys: anyone could "
              "publish and read. Set --publish-key (and --token-secret), or pass --insecure.", file=sys.stderr)
        return 2
    sock, problem = bind_socket(settings.host, settings.port)
    if sock is None:  # before anything is logged or any file is made
        print(f"sse-gateway: {problem}", file=sys.stderr)
        return 1
    try:
        return _serve(settings, sock)
    finally:
        sock.close()


def bind_socket(host: str, port: int) -> tuple[socket.socket | None, str]:
    """The listening address bound now (uvicorn serves this very socket), or why it cannot be.

    Bound as uvicorn binds it: IPv6 for an address with a colon, else IPv4 (so ``localhost`` is
    127.0.0.1), with SO_REUSEADDR (a port in TIME_WAIT is free).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if isinstance(exc, socket.gaierror):
            return None, f"cannot listen on {host}: {exc.strerror or exc}"
        if exc.errno == errno.EADDRINUSE:
            return None, f"port {port} is in use on {host} (another sse-gateway?); choose another with --port"
        if exc.errno == errno.EACCES:
            return None, f"no permission to listen on port {port} (ports below 1024 need privileges)"
        if exc.errno == errno.EADDRNOTAVAIL:
            return None, f"cannot listen on {host}: no such address on this machine"
        return None, f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    sock.set_inheritable(True)
    return sock, ""


def _serve(settings: Settings, sock: socket.socket) -> int:
    """Check, say what is served, and serve: in this process, or in ``--workers`` processes (``workers.py``)."""
    setup_logging(settings.log_level, "supervisor" if settings.workers > 1 else None)
    if not settings.publish_keys:
        log.warning("no publisher keys: the gateway is open to anyone who can reach %s", settings.host)
        if settings.loopback and "*" not in settings.allowed_host:
            log.info("it answers only to localhost and IP addresses, not to other host names (a page could "
                     "rebind one to this machine); add names with --allowed-host")
    elif not settings.token_secret:
        log.warning("publisher keys but no --token-secret: only publishers can read; browsers get no tokens")
    for problem in settings.weak_credentials():
        log.warning("%s", problem)
    from .log.sqlite import preflight

    files = [settings.db] if settings.backend == "sqlite" else []
    if settings.webhook_secret and settings.outbox_path != ":memory:":
        files.append(settings.outbox_path)
    for path in files:
        if problem := preflight(path):
            log.error("cannot start: %s", problem)
            return 1
    where = "memory (nothing is kept)" if settings.backend == "memory" else (
        settings.db if settings.backend == "sqlite" else re.sub(r"//[^@/]*@", "//***@", settings.redis_url))
    log.info("sse-gateway %s on http://%s:%d  backend=%s (%s)  heartbeat=%gs  keys=%s  tokens=%s  cors=%s%s",
             __version__, settings.host, settings.port, settings.backend, where, settings.heartbeat,
             len(settings.publish_keys) or "none", "on" if settings.token_secret else "off",
             ",".join(settings.cors_origin) or "none", f"  workers={settings.workers}" if settings.workers > 1 else "")
    if settings.webhook_secret:  # only the URL's site is logged: its user, path or query may hold a credential
        site = urllib.parse.urlsplit(settings.webhook_url or "").netloc.rpartition("@")[2]
        log.info("webhooks on (to %s), outbox %s", site or "no --webhook-url", settings.outbox_path)
    if settings.workers > 1:
        from .workers import Supervisor

        return Supervisor(settings, sock).run()
    return run_gateway(settings, sock)


def run_gateway(settings: Settings, sock: socket.socket, *, worker=None, on_started=None) -> int:
    """The gateway on the listening ``sock`` until it is stopped: 0, or 1 if it never started. ``worker``
    (``workers.WorkerInfo``) when it is one of several processes; ``on_started()`` once it serves."""
    import uvicorn

    from .app import create_app
    from .protocol import gateway_protocol

    app = create_app(settings, worker=worker)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            access_log=settings.access_log, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=int(settings.drain_seconds) + 5,
                            timeout_keep_alive=settings.keep_alive, server_header=False,
                            http=gateway_protocol(settings.header_timeout, app))
    server = GatewayServer(config, app, worker=worker is not None, on_started=on_started)
    return 0 if server.run(sockets=[sock]) else 1


class GatewayServer:
    """uvicorn's server: the first SIGTERM/SIGINT drains, the second ends all streams and exits now.

    A worker of several (``worker``) takes its orders from the supervisor (``workers.py``), which
    may be sent to every process at once: it ignores SIGINT, drains once however many SIGTERMs come,
    and ends all streams and exits on SIGQUIT."""

    def __init__(self, config, app, *, worker: bool = False, on_started=None) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                outer.on_signal(self, sig, frame)

            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if self.started and on_started is not None:
                    on_started()

        self.server = _Server(config)
        self.app = app
        self.worker = worker
        self._signals = 0

    def on_signal(self, server, sig, frame) -> None:
        if self.worker and (sig == signal.SIGINT or sig == signal.SIGTERM and self._signals):
            return
        self._signals = max(self._signals + 1, 2 if sig == signal.SIGQUIT else 1)
        gw = getattr(self.app.state, "gw", None)
        if self._signals == 1 and gw is not None and gw.settings.drain_seconds > 0:
            log.info("draining: new streams get 503, open streams close over %gs%s", gw.settings.drain_seconds,
                     "" if self.worker else "; signal again to exit now")
            gw.loop.call_soon_threadsafe(gw.begin_drain, lambda: setattr(server, "should_exit", True))
            return
        if gw is not None:  # end every stream now, then shut down cleanly (the store is closed)
            gw.loop.call_soon_threadsafe(gw.hub.shutdown)
        server.should_exit = True
        if self._signals > 2:
            server.force_exit = True

    def run(self, sockets: list[socket.socket] | None = None) -> bool:
        if self.worker:  # uvicorn handles SIGINT and SIGTERM; SIGQUIT is the supervisor's "stop now"
            signal.signal(signal.SIGQUIT, lambda sig, frame: self.on_signal(self.server, sig, frame))
        self.server.run(sockets=sockets)
        return self.server.started


# -- the client commands ---------------------------------------------------------


def fail(command: str, message: str) -> int:
    print(f"sse-gateway {command}: {message}", file=sys.stderr, flush=True)
    return 1


def client_key(given: str | None) -> str | None:
    """--key, else SSE_GATEWAY_PUBLISH_KEY (as ``serve`` reads it), else the former SSE_GATEWAY_KEY, with a warning."""
    from .client import resolve_key

    key = resolve_key(given)
    if key is None and os.environ.get(OLD_KEY_ENV, "").strip():
        print(f"sse-gateway: warning: {OLD_KEY_ENV} is deprecated, use {KEY_ENV} (the variable serve reads)",
              file=sys.stderr)
        key = os.environ[OLD_KEY_ENV].strip()
    return key


def run_client_command(args: argparse.Namespace) -> int:
    from .client import GatewayError, Retry, resolve_url

    try:
        url = resolve_url(args.url)
    except ValueError as exc:
        return fail(args.command, str(exc))
    key = client_key(args.key)
    retry_for = args.retry_for
    if retry_for is None:
        retry_for = TAIL_RETRY_FOR if args.command == "tail" else RETRY_FOR
    retry = Retry(attempts=1_000_000, timeout=retry_for)
    commands = {"publish": publish, "tail": tail, "create": create, "complete": complete, "token": mint_token,
                "send": send_input, "cancel": cancel_run}
    try:
        return asyncio.run(commands[args.command](args, url, key, retry))
    except (GatewayError, ValueError) as exc:  # a refusal, or a session id or event type the gateway would refuse
        return fail(args.command, str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sse-gateway tail run1 | head`
        sys.stderr.close()
        return 0


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


# -- publish ---------------------------------------------------------------------


async def publish(args: argparse.Namespace, url: str, key: str | None, retry) -> int:
    from .client import Publisher

    async with Publisher(url, key, retry=retry) as pub:
        if args.data == "-":
            return await _publish_lines(pub, args)
        if not args.text:
            try:
                value = strict_json(args.data)
            except ValueError:
                pass
            else:
                _print_json((await pub.publish(args.session, args.event, value,
                                               idempotency_key=args.idempotency_key)).raw)
                return 0
        _print_json((await pub.publish_text(args.session, args.data, event=args.event,
                                            idempotency_key=args.idempotency_key)).raw)
        return 0


async def _publish_lines(pub, args: argparse.Namespace) -> int:
    """Standard input, one event object per line, in batches as lines arrive (every line has a key)."""
    futures = []
    number = 0
    while line := await asyncio.to_thread(sys.stdin.buffer.readline):
        number += 1
        if not line.strip():
            continue
        try:
            item = strict_json(line)
        except ValueError as exc:
            await pub.flush()
            return fail("publish", f"standard input line {number} is not JSON ({exc}); the lines before it "
                        "were published")
        if not isinstance(item, dict) or "data" not in item or set(item) - {"event", "data", "idempotency_key"}:
            await pub.flush()
            return fail("publish", f"standard input line {number} is not an event object "
                        '{"event"?, "data", "idempotency_key"?}; the lines before it were published')
        try:
            futures.append(await pub.send(args.session, item.get("event") or "message", item["data"],
                                          idempotency_key=item.get("idempotency_key")))
        except ValueError as exc:
            await pub.flush()
            return fail("publish", f"standard input line {number}: {exc}")
    await pub.flush()
    ids = [f.result() for f in futures]
    _print_json({"ids": ids, "session": args.session, "last_id": ids[-1] if ids else 0})
    return 0


# -- tail -------------------------------------------------------------------------


async def tail(args: argparse.Namespace, url: str, key: str | None, retry) -> int:
    from .client import Reconnect, Subscriber

    def reconnecting(note: Reconnect) -> None:
        where = f"resuming after {note.cursor}" if note.cursor else "retrying"
        print(f"# {note.reason}; {where} in {note.delay:.1f} s", file=sys.stderr, flush=True)

    start = args.start
    cursor = None
    if start is not None and start not in ("earliest", "latest"):
        cursor, start = start, None  # a cursor resumes after it (Last-Event-ID), as a reconnect would
    subscriber = Subscriber(args.session, url=url, key=key, cursor=cursor, from_=start, live=not args.no_follow,
                            give_up_after=retry.timeout, on_reconnect=reconnecting)
    async for event in subscriber:
        if event.id is None:  # gateway.gap, gateway.reset: notices, not events of the log
            print(f"# {event.event} {event.text}", file=sys.stderr, flush=True)
            continue
        _print_event(event, args.json)
    return 0


def _print_event(event, as_json: bool) -> None:
    if as_json:
        _print_json({"id": event.cursor, "event": event.event, "data": event.text})
    else:
        stamp = time.strftime("%H:%M:%S")
        text = describe_input(event.data) if event.event == "gateway.input" else event.text
        print(f"{stamp} {event.cursor:>12} {event.event:<16} {text}", flush=True)


def describe_input(mirror: Any) -> str:
    """A ``gateway.input`` mirror as one readable line: ``input 2 approval rm-1: approve``."""
    if not isinstance(mirror, dict) or "kind" not in mirror:
        return json.dumps(mirror, ensure_ascii=False)
    line = f"input {mirror.get('input_id')} {mirror['kind']}"
    if mirror.get("approval_id") is not None:
        line += f" {mirror['approval_id']}: {mirror.get('decision')}"
    data = mirror.get("data")
    if data is not None:
        line += " " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False))
    return line


# -- create, complete, token ----------------------------------------------------------


async def create(args: argparse.Namespace, url: str, key: str | None, retry) -> int:
    from .client import Publisher

    async with Publisher(url, key, retry=retry) as pub:
        info = await pub.create(args.session, metadata=args.metadata, ttl_seconds=args.ttl, lease_seconds=args.lease)
    answer = dataclasses.asdict(info)
    answer["stream_url"] = url + info.stream_url
    _print_json(answer)
    return 0


async def complete(args: argparse.Namespace, url: str, key: str | None, retry) -> int:
    from .client import Publisher

    async with Publisher(url, key, retry=retry) as pub:
        _print_json(await pub.complete(args.session, args.result, status=args.status, error=args.error))
    return 0


async def mint_token(args: argparse.Namespace, url: str, key: str | None, retry) -> int:
    from .client import Publisher

    async with Publisher(url, key, retry=retry) as pub:
        token = await pub.mint_token(args.session, ttl_seconds=args.ttl,
                                     scopes=["subscribe", "input"] if args.input else None)
    _print_json({"token": token.token, "expires_at": token.expires_at, "stream_url": url + token.stream_url})
    return 0


# -- send, cancel ------------------------------------------------------------------------


async def send_input(args: argparse.Namespace, url: str, key: str | None, retry) -> int:
    from .client import Publisher

    data: Any = args.data
    if data is not None and not args.text:
        try:
            data = strict_json(data)
        except ValueError:
            pass
    async with Publisher(url, key, retry=retry) as pub:
        sent = await pub.send_input(args.session, args.kind, data, approval_id=args.approval_id,
                                    decision=args.decision, idempotency_key=args.idempotency_key)
    _print_json(sent.raw)
    return 0


async def cancel_run(args: argparse.Namespace, url: str, key: str | None, retry) -> int:
    from .client import Publisher

    async with Publisher(url, key, retry=retry) as pub:
        sent = await pub.send_input(args.session, "cancel", None if args.reason is None else {"reason": args.reason},
                                    idempotency_key=args.idempotency_key)
    _print_json(sent.raw)
    return 0

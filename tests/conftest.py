"""Shared fixtures: the gateway in this process, real gateway processes on free ports, private servers.

Two tiers. The API that answers and ends (auth, hostile input, sessions, publishing, limits that are
not about streams) runs in process: ``start_app`` serves ``create_app(Settings(...))`` through
httpx's ASGI transport, no socket and no subprocess. Streaming, proxies, browsers, crashes, restarts
and whatever needs a real socket talk to a real ``sse-gateway serve`` (uvicorn) over TCP
(``start_gateway``); such tests are marked ``system`` (see ``pytest_collection_modifyitems``), and
``pytest -m "not system"`` is the fast tier.

Anything the machine may lack (redis-server, nginx, chromium, node) makes a test fail in CI, never
skip: see ``require_binary``. Tests never sleep to synchronise: they wait on a condition with
``util.wait_until`` / ``util.await_until``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from util import WAIT_TIMEOUT, free_port, wait_until

from sse_gateway.app import create_app
from sse_gateway.config import Settings

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

__all__ = ["ROOT", "IN_CI", "free_port", "require_binary", "wait_for_port", "Gateway", "InProcessGateway",
           "RedisServer", "Nginx"]


def require_binary(name: str, *candidates: str) -> str:
    """The path of a program the test needs; missing means failure in CI, a skip elsewhere."""
    for cand in (name, *candidates):
        path = shutil.which(cand) or (cand if os.path.isabs(cand) and os.access(cand, os.X_OK) else None)
        if path:
            return path
    message = f"{name} is not installed (.ci/run installs it)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(reason=message)


def wait_for_port(port: int, timeout: float = WAIT_TIMEOUT, proc: subprocess.Popen | None = None) -> None:
    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(listening, timeout=timeout, interval=0.05, what=f"something to listen on port {port}")


class Gateway:
    """A ``sse-gateway serve`` process. ``url`` is its base URL."""

    def __init__(self, tmp: Path, *, backend: str = "sqlite", db: Path | None = None, port: int | None = None,
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.backend = backend
        self.db = db or tmp / "gateway.db"
        self.port = port or free_port()
        self.args = args
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / f"gateway-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Gateway:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}
        env["PYTHONPATH"] = str(ROOT)
        env.update(self.env)
        cmd = [sys.executable, "-m", "sse_gateway", "serve", "--port", str(self.port), "--backend", self.backend,
               "--db", str(self.db), *self.args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.tmp, env=env)
        wait_for_port(self.port, proc=self.proc)

        def ready() -> bool:
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(ready, interval=0.05, what=f"the gateway on port {self.port} to be ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{self.log()}") from None
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def restart(self) -> Gateway:
        self.kill()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class _Bridge(httpx.AsyncBaseTransport):
    """Hands each request to the app's event loop (its own thread) and brings the answer back.

    The app lives on one loop (aiosqlite, the hub and their futures belong to it), while tests call it
    from sync code or from pytest-asyncio's loop; the whole answer is read there, so an endless
    stream cannot go through here (those tests use a real server).
    """

    def __init__(self, gateway: InProcessGateway) -> None:
        self.gateway = gateway

    async def _forward(self, request: httpx.Request) -> tuple[int, list, bytes]:
        body = request.content
        inner = httpx.Request(request.method, request.url, headers=request.headers.raw, content=body)
        response = await self.gateway.transport.handle_async_request(inner)
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
        return response.status_code, response.headers.raw, raw

    def forward_sync(self, request: httpx.Request) -> httpx.Response:
        request.read()
        status, headers, raw = self.gateway.call(self._forward(request))
        return httpx.Response(status, headers=headers, content=raw, request=request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        future = asyncio.run_coroutine_threadsafe(self._forward(request), self.gateway.loop)
        status, headers, raw = await asyncio.wait_for(asyncio.wrap_future(future), WAIT_TIMEOUT * 2)
        return httpx.Response(status, headers=headers, content=raw, request=request)


class _SyncBridge(httpx.BaseTransport):
    def __init__(self, bridge: _Bridge) -> None:
        self.bridge = bridge

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.bridge.forward_sync(request)


class _Tracebacks(logging.Handler):
    """Log records that carry a traceback: the in-process twin of "the gateway logged a traceback"."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.exc_text or record.stack_info:
            self.records.append(record)


class InProcessGateway:
    """``create_app(Settings(**settings))`` with its lifespan, served in this process (no socket).

    ``client()`` is an ``httpx.Client``, ``async_client()`` an ``httpx.AsyncClient``: the same API a
    real gateway has, minus endless streams (``live=false`` reads work). The app runs on an event loop
    of its own, on a thread, so sync and async tests drive it alike. An exception the app does not
    turn into an answer fails the request that raised it (httpx's ``raise_app_exceptions``).
    """

    # No ``url``: nothing listens, so code written for a real gateway fails at once instead of retrying.
    base = "http://127.0.0.1"  # a local name: a gateway without keys answers no other (cors.SiteGuard)

    def __init__(self, tmp: Path, **settings) -> None:
        settings.setdefault("db", str(tmp / "gateway.db"))
        self.settings = Settings(**settings)
        self.settings.check()
        self.app = create_app(self.settings)
        self.transport = httpx.ASGITransport(app=self.app, client=("127.0.0.1", 40000))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="in-process-gateway", daemon=True)
        self._bridge = _Bridge(self)
        self._tracebacks = _Tracebacks()
        self._lifespan = None

    def call(self, coro, timeout: float = WAIT_TIMEOUT * 2):
        """Run ``coro`` on the app's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> InProcessGateway:
        logging.getLogger().addHandler(self._tracebacks)
        self._thread.start()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.call(self._lifespan.__aenter__())
        return self

    def stop(self) -> None:
        try:
            if self._lifespan is not None:
                self.call(self._lifespan.__aexit__(None, None, None))
                self._lifespan = None
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            logging.getLogger().removeHandler(self._tracebacks)

    def tracebacks(self) -> list[str]:
        formatter = logging.Formatter("%(name)s: %(message)s")
        return [formatter.format(r) for r in self._tracebacks.records]

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(transport=_SyncBridge(self._bridge), base_url=self.base, **kw)

    def async_client(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self._bridge, base_url=self.base, **kw)


def _apps(tmp: Path) -> Iterator:
    started: list[InProcessGateway] = []

    def start(**settings) -> InProcessGateway:
        home = tmp / f"app-{len(started)}"
        home.mkdir(parents=True, exist_ok=True)
        gw = InProcessGateway(home, **settings)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()
    for gw in started:
        assert not gw.tracebacks(), "the gateway logged a traceback:\n" + "\n".join(gw.tracebacks())


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator:
    """``start_app(**settings)``: a gateway in this process (``Settings`` fields, e.g. ``max_batch=10``)."""
    yield from _apps(tmp_path)


@pytest.fixture(scope="module")
def start_module_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Like ``start_app``, for an in-process gateway that the tests of one module share."""
    yield from _apps(tmp_path_factory.mktemp("app"))


@pytest.fixture
def app_gateway(start_app) -> InProcessGateway:
    """The in-process twin of ``gateway``: SQLite, a short heartbeat."""
    return start_app(heartbeat=1)


@pytest.fixture
def app_client(app_gateway: InProcessGateway) -> Iterator[httpx.Client]:
    """The in-process twin of ``client``."""
    with app_gateway.client(timeout=10) as c:
        yield c


class RedisServer:
    """A private ``redis-server`` on a free loopback port; ``aof`` keeps its data across ``restart``."""

    def __init__(self, tmp: Path, *, aof: bool = False, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.binary = require_binary("redis-server")
        self.port = port or free_port()
        self.dir = tmp / f"redis-{self.port}"
        self.dir.mkdir(parents=True)
        self.args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir),
                     "--appendonly", "yes" if aof else "no", "--appendfsync", "always", *args]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self._log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen([self.binary, *self.args], stdout=self._log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator:
    """``start_redis(aof=False, port=None, args=())`` starts a private redis-server, killed after the test."""
    started: list[RedisServer] = []

    def start(**kw) -> RedisServer:
        server = RedisServer(tmp_path, **kw)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def redis_server(start_redis) -> str:
    """The URL of a fresh private redis-server (no persistence), for one test."""
    return start_redis().url


class Nginx:
    """Real nginx processes running deploy/nginx.conf (``tests/nginx_conf.py``) in the foreground.

    ``start(*upstream_ports, read_timeout=None, port=None)`` renders the shipped file into ``tmp``
    (``read_timeout`` replaces the stream's ``proxy_read_timeout``) and answers the port it listens
    on; ``stop(port)`` ends that nginx at once (fast shutdown: every connection through it is cut,
    as a proxy that dies would), and ``start(..., port=port)`` brings one back on the same port.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.binary = require_binary("nginx", "/usr/sbin/nginx")
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, *upstream_ports: int, read_timeout: str | None = None, port: int | None = None) -> int:
        import nginx_conf

        port = port or free_port()
        conf = nginx_conf.render(self.tmp, upstreams=[f"127.0.0.1:{p}" for p in upstream_ports], port=port,
                                 read_timeout=read_timeout)
        with open(self.tmp / "nginx.out", "ab") as out:
            proc = subprocess.Popen([self.binary, "-p", str(self.tmp), "-e", str(self.tmp / "error.log"), "-c",
                                     str(conf), "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT)
        self.procs[port] = proc
        wait_for_port(port, proc=proc)
        return port

    def stop(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.terminate()
        proc.wait(timeout=10)

    def close(self) -> None:
        for port in list(self.procs):
            self.stop(port)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    """Starts and stops real nginx processes (see ``Nginx``); every one is stopped after the test."""
    servers = Nginx(tmp_path)
    yield servers
    servers.close()


def _gateways(tmp: Path) -> Iterator:
    """A starter of gateways in ``tmp``; each is stopped afterwards and must not have logged a traceback."""
    started: list[Gateway] = []

    def start(*args: str, **kw) -> Gateway:
        gw = Gateway(tmp, args=args, **kw)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()
    for gw in started:
        assert "Traceback" not in gw.log(), f"the gateway logged a traceback:\n{gw.log()}"


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator:
    """``start_gateway(*args, backend=..., env=...)`` starts a gateway that is stopped after the test."""
    yield from _gateways(tmp_path)


@pytest.fixture
def gateway(start_gateway) -> Gateway:
    """A gateway on SQLite with a short heartbeat."""
    return start_gateway("--heartbeat", "1")


@pytest.fixture
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def start_module_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Like ``start_gateway``, for a gateway that the tests of one module share."""
    yield from _gateways(tmp_path_factory.mktemp("gateway"))


# -- tiers ----------------------------------------------------------------------------------

#: Fixtures that start real servers: a test that uses one is a system test.
SYSTEM_FIXTURES = {"start_gateway", "start_module_gateway", "gateway", "start_redis", "redis_server", "nginx"}


def pytest_configure(config: pytest.Config) -> None:
    # Registered in pyproject.toml too; here as well so that a run from another directory knows it.
    config.addinivalue_line("markers", "system: real servers over real sockets (subprocess gateways, redis, "
                            "nginx, a browser, benchmarks, fuzzing); deselect with -m 'not system'")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark as ``system`` every test that starts a real server: by the fixtures it uses, or a Redis
    backend among its parameters (fixtures that start one on demand). Modules and tests that start
    other servers (nginx, chromium, the benchmark) say so with ``pytestmark`` or a mark."""
    for item in items:
        if SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)
        elif "redis" in getattr(getattr(item, "callspec", None), "params", {}).values():
            item.add_marker(pytest.mark.system)  # parametrized with the Redis backend: a redis-server

"""Shared fixtures: real gateway processes on free ports, private servers, a chaos proxy.

Tests talk to a real ``sse-gateway serve`` (uvicorn) over TCP. Anything the
machine may lack (redis-server, nginx, chromium, node) makes a test fail in
CI, never skip: see ``require_binary``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


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
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready; log:\n{self.log()}")
            time.sleep(0.05)
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

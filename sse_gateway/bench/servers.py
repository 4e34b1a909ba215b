"""What the bench drives: URL presets per kind of server, and the server processes it starts.

A started server runs pinned to its own CPU (``taskset``), with a raised
open-files limit, its output in a log file of the run's temporary
directory. The bench reads the CPU time (``utime + stime``) and the
resident memory of the server's whole process tree (nginx is a master and
its worker) from ``/proc``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from .wire import Endpoint, HTTPError, Publisher

ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the sse_gateway package
NCHAN_CONF = ROOT / "deploy" / "nchan.conf"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Target:
    """How to talk to one kind of server. URLs are templates with ``{session}``."""

    name: str
    publish_url: str
    stream_url: str
    last_event_id_style: str = "header"  # or "query": ?last_event_id=
    envelope: bool = True  # publish {"data": PAYLOAD}; False: the payload is the whole body
    batch: bool = False  # takes JSON arrays and NDJSON streams
    messages: bool = False  # keeps messages (message.* events) and replays them compacted

    def resolve(self, base_url: str) -> Target:
        """The same target with URLs made absolute against ``base_url``."""
        base = base_url.rstrip("/")
        return replace(self, publish_url=_absolute(base, self.publish_url),
                       stream_url=_absolute(base, self.stream_url))

    def publisher(self) -> Publisher:
        return Publisher(Endpoint(self.publish_url), self.envelope)


def _absolute(base: str, url: str) -> str:
    return url if url.startswith("http://") else base + url


_GATEWAY_URLS = ("/v1/sessions/{session}/events", "/v1/sessions/{session}/stream")
PRESETS = {
    "gateway": Target("gateway", *_GATEWAY_URLS, batch=True, messages=True),
    "baseline": Target("baseline", *_GATEWAY_URLS),
    "nchan": Target("nchan", "/pub/{session}", "/sub/{session}", envelope=False),
    "floor": Target("floor", *_GATEWAY_URLS, batch=True),
    "redis-1": Target("redis-1", *_GATEWAY_URLS, batch=True, messages=True),
    "redis-2": Target("redis-2", *_GATEWAY_URLS, batch=True, messages=True),
}
#: targets that are gateways on a private redis-server: name -> number of gateway nodes
REDIS_NODES = {"redis-1": 1, "redis-2": 2}
_WORKERS = re.compile(r"gateway-([1-9][0-9]*)")


def workers_of(name: str) -> int:
    """How many worker processes the target ``gateway-N`` (``serve --workers N``, N from 2) has; 1 for others."""
    m = _WORKERS.fullmatch(name)
    return int(m.group(1)) if m and int(m.group(1)) > 1 else 1


def preset(name: str) -> Target | None:
    """The target called ``name``: a preset, or ``gateway-N``; None if there is none."""
    if name in PRESETS:
        return PRESETS[name]
    if workers_of(name) > 1:
        return replace(PRESETS["gateway"], name=name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    """Open files: up to the hard limit (10,000 idle streams need 10,000 sockets)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ProcessTree:
    """CPU seconds and resident memory of a process and its descendants, from ``/proc``."""

    def __init__(self, pid: int, *, descendants: bool = True) -> None:
        self.pid = pid
        self.descendants = descendants

    def pids(self) -> list[int]:
        if not self.descendants:
            return [self.pid]
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, ()))
        return out

    def cpu_seconds(self) -> float:
        ticks = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / CLK_TCK

    def wait_seconds(self) -> float:
        """Time the tree's threads were runnable but waiting for a CPU (``/proc/*/task/*/schedstat``)."""
        ns = 0
        for pid in self.pids():
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    ns += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
                except (OSError, IndexError):
                    continue
        return ns / 1e9

    def rss_kb(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
            except OSError:
                continue
        return total


class ProcessTrees:
    """Several process trees measured as one (``ProcessTree``'s figures, summed); ``pid`` is the first's."""

    def __init__(self, trees: list[ProcessTree]) -> None:
        self.trees = trees
        self.pid = trees[0].pid

    def cpu_seconds(self) -> float:
        return sum(t.cpu_seconds() for t in self.trees)

    def wait_seconds(self) -> float:
        return sum(t.wait_seconds() for t in self.trees)

    def rss_kb(self) -> int:
        return sum(t.rss_kb() for t in self.trees)


def spawn(cmd: list[str], *, cpu: int | str | None, log_path: Path, cwd: Path | None = None,
          env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own, pinned to ``cpu`` if given (a CPU, or a list ``0,2`` for
    ``taskset -c``), its output appended to ``log_path``."""
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                preexec_fn=raise_nofile, start_new_session=True)


def terminate(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL to the whole process group after 15 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Server:
    """A server under test: started by the bench (``command``), or already running (``url``).

    ``nodes`` are the targets publishers and subscribers spread over (one
    for every server but ``RedisNodes``); ``parts`` names process trees
    whose CPU the bench also reports on their own.
    """

    def __init__(self, target: Target, url: str, *, command: list[str] | None = None, pid: int | None = None,
                 workdir: Path | None = None, cpu: int | str | None = None, env: dict | None = None) -> None:
        self.target = target.resolve(url)
        self.url = url
        self.command = command
        self.workdir = workdir
        self.cpu = cpu
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.tree: ProcessTree | ProcessTrees | None = ProcessTree(pid) if pid else None
        self.nodes = [self.target]
        self.parts: dict[str, ProcessTree] = {}
        self.log_path = workdir / f"{target.name}.log" if workdir else None

    async def start(self, timeout: float = 30.0) -> None:
        if self.command is not None:
            self.proc = spawn(self.command, cpu=self.cpu, log_path=self.log_path, cwd=self.workdir, env=self.env)
            self.tree = ProcessTree(self.proc.pid)
        await self.ready(timeout)

    async def ready(self, timeout: float) -> None:
        """Wait until a publish succeeds: the server listens and its publish path works."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = ""
        while loop.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.target.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            pub = self.target.publisher()
            try:
                await pub.connect()
                await pub.publish("bench-probe", 0)
                return
            except (OSError, HTTPError) as exc:
                last = repr(exc)
            finally:
                pub.close()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.target.name} not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def stop(self) -> None:
        terminate(self.proc)

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self) -> float | None:
        return self.tree.cpu_seconds() if self.tree else None

    def wait_seconds(self) -> float | None:
        return self.tree.wait_seconds() if self.tree else None

    def rss_kb(self) -> int | None:
        return self.tree.rss_kb() if self.tree else None


class RedisNodes(Server):
    """``count`` gateways (``--backend redis``) on one private ``redis-server``, started and stopped together.

    Redis runs as a deployment would (AOF on, ``appendfsync everysec``,
    no snapshots) in the run's directory. Every process is pinned to the
    server CPU, so the figures of ``Server`` (CPU, wait, memory) cover
    them all, Redis included; ``parts["redis"]`` is Redis alone.
    """

    def __init__(self, target: Target, workdir: Path, *, cpu: int | None, count: int) -> None:
        redis = shutil.which("redis-server")
        if redis is None:
            raise RuntimeError(f"{target.name} needs redis-server (Debian package redis-server)")
        port = free_port()
        self.redis_command = [redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(workdir)]
        self.redis_port = port
        self.redis_proc: subprocess.Popen | None = None
        self.gateways = [gateway_server(target, workdir / f"node{i + 1}", cpu=cpu,
                                        extra=["--backend", "redis", "--redis-url", f"redis://127.0.0.1:{port}/0"])
                         for i in range(count)]
        super().__init__(target, self.gateways[0].url, workdir=workdir, cpu=cpu)
        self.nodes = [g.target for g in self.gateways]
        self.log_path = workdir / "redis.log"

    async def start(self, timeout: float = 30.0) -> None:
        self.redis_proc = spawn(self.redis_command, cpu=self.cpu, log_path=self.log_path, cwd=self.workdir)
        await self._redis_ready(timeout)
        for gateway in self.gateways:
            await gateway.start(timeout)
        self.parts = {"redis": ProcessTree(self.redis_proc.pid)}
        self.tree = ProcessTrees([*(g.tree for g in self.gateways), self.parts["redis"]])  # pid: node 1's

    async def _redis_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.redis_proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.redis_proc.returncode}:\n{self.log_tail()}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
                writer.write(b"PING\r\n")
                answer = await reader.readline()
                writer.close()
                if answer.startswith(b"+PONG"):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"redis-server not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        terminate(self.redis_proc)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(filter(None, [super().log_tail(lines), *(g.log_tail(lines) for g in self.gateways)]))


def gateway_server(target: Target, home: Path, *, cpu: int | str | None, extra: list[str] = ()) -> Server:
    """``sse-gateway serve`` on a free port with its files in ``home``, as the bench runs it."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "sse_gateway", "serve", "--port", str(port), "--db", str(home / "bench.db"),
           "--drain-seconds", "0", "--log-level", "warning", "--heartbeat", "1",
           # the bench opens more streams than a deployment allows by default
           "--max-streams", "0", "--max-streams-per-session", "0", "--max-sessions", "0", *extra]
    return Server(target, f"http://127.0.0.1:{port}", command=cmd, workdir=home, cpu=cpu, env=python_env())


def python_env() -> dict:
    """The environment of a Python server: this checkout's package first, no gateway settings inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def nchan_config(template: str, port: int) -> str:
    """The recipe with the bench's port; nginx runs in the foreground with ``-p`` as its prefix."""
    conf, count = re.subn(r"listen\s+[^;]+;", f"listen 127.0.0.1:{port};", template)
    if count != 1:
        raise ValueError("the nchan recipe must have exactly one 'listen' directive")
    return conf


def server_cpus(name: str, cpu: int | None, spare: list[int]) -> int | str | None:
    """The CPUs target ``name`` is pinned to: ``cpu``, and for ``gateway-N`` up to N-1 of the ``spare`` ones
    (those neither the server nor the load generator was given) so that each worker may have a core."""
    workers = workers_of(name)
    if cpu is None or workers == 1:
        return cpu
    return ",".join(map(str, [cpu, *spare[:workers - 1]]))


def make_server(name: str, workdir: Path, *, cpu: int | None, spare: list[int] = (),
                nchan_conf: Path = NCHAN_CONF) -> Server:
    """A server of kind ``name``, not started yet, in its own part of ``workdir``."""
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    target = preset(name)
    if name == "gateway":
        return gateway_server(target, home, cpu=cpu)
    if workers_of(name) > 1:
        return gateway_server(target, home, cpu=server_cpus(name, cpu, list(spare)),
                              extra=["--workers", str(workers_of(name))])
    if name in REDIS_NODES:
        return RedisNodes(target, home, cpu=cpu, count=REDIS_NODES[name])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    py = [sys.executable, "-m"]
    if name == "baseline":
        if importlib.util.find_spec("sse_starlette") is None:
            raise RuntimeError("the baseline needs sse-starlette: pip install 'sse-gateway[bench]'")
        cmd = py + ["sse_gateway.bench._baseline", "--port", str(port)]
    elif name == "floor":
        cmd = py + ["sse_gateway.bench.floor", "--port", str(port)]
    elif name == "nchan":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.access(nginx, os.X_OK) or not NCHAN_MODULE.exists():
            raise RuntimeError("nchan needs the Debian packages nginx and libnginx-mod-nchan")
        for sub in ("logs", "tmp"):
            (home / sub).mkdir(exist_ok=True)
        (home / "nginx.conf").write_text(nchan_config(nchan_conf.read_text(), port))
        cmd = [nginx, "-p", str(home), "-c", str(home / "nginx.conf"), "-e", str(home / "logs" / "error.log")]
    else:
        raise ValueError(f"unknown target {name!r}")
    return Server(target, url, command=cmd, workdir=home, cpu=cpu, env=python_env())

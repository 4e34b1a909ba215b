"""What the bench drives: URL presets per kind of server, and the server processes it starts.

A started server runs pinned to its own CPU (``taskset``), with a raised
open-files limit, its output in a log file of the run's temporary
directory. The bench reads the CPU time (``utime + stime``) and the
resident memory of the server's whole process tree (nginx is a master and
its worker) from ``/proc``.
"""

from __future__ import annotations

import asyncio
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
    "gateway": Target("gateway", *_GATEWAY_URLS, batch=True),
    "baseline": Target("baseline", *_GATEWAY_URLS),
    "nchan": Target("nchan", "/pub/{session}", "/sub/{session}", envelope=False),
    "floor": Target("floor", *_GATEWAY_URLS, batch=True),
}


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


class Server:
    """A server under test: started by the bench (``command``), or already running (``url``)."""

    def __init__(self, target: Target, url: str, *, command: list[str] | None = None, pid: int | None = None,
                 workdir: Path | None = None, cpu: int | None = None, env: dict | None = None) -> None:
        self.target = target.resolve(url)
        self.url = url
        self.command = command
        self.workdir = workdir
        self.cpu = cpu
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.tree = ProcessTree(pid) if pid else None
        self.log_path = workdir / f"{target.name}.log" if workdir else None

    async def start(self, timeout: float = 30.0) -> None:
        if self.command is not None:
            cmd = self.command
            if self.cpu is not None:
                cmd = ["taskset", "-c", str(self.cpu), *cmd]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                             env=self.env, preexec_fn=raise_nofile, start_new_session=True)
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
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

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


def make_server(name: str, workdir: Path, *, cpu: int | None, nchan_conf: Path = NCHAN_CONF) -> Server:
    """A server of kind ``name``, not started yet, in its own part of ``workdir``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    target = PRESETS[name]
    py = [sys.executable, "-m"]
    if name == "gateway":
        cmd = py + ["sse_gateway", "serve", "--port", str(port), "--db", str(home / "bench.db"),
                    "--drain-seconds", "0", "--log-level", "warning", "--heartbeat", "1",
                    # the bench opens more streams than a deployment allows by default
                    "--max-streams", "0", "--max-streams-per-session", "0", "--max-sessions", "0"]
    elif name == "baseline":
        cmd = py + ["sse_gateway.baseline", "--port", str(port)]
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

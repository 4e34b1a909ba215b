"""``serve --workers N``: a supervisor and N gateway processes on one listening socket.

The supervisor (the process ``serve`` started in) binds the port once
(``cli.bind_socket``) and checks the data file once, then starts N
workers. Each is a fresh interpreter (multiprocessing's ``spawn``: no
thread, loop or connection of the supervisor is copied into it) that
inherits the listening socket and runs the whole gateway on it: its own
event loop, hub, store connections, sweeper and drain
(``cli.run_gateway``). All of them accept from the one queue of that
socket, so the kernel hands each new connection to whichever worker
accepts first: a busy or stuck worker takes fewer, and when one dies the
connections still waiting are taken by the others (only those it had
accepted are lost). uvicorn's own ``--workers`` is not used: it runs plain
``uvicorn.Server``s from an import string, without the gateway's drain.

The workers share the store: one SQLite file (ids come from its write
lock; what one worker commits reaches the streams of the others by
wake-ups, ``log/wake.py``) or one Redis. ``--backend memory`` cannot be
shared and is refused (``Settings.check``).

Signals. The supervisor alone decides what a signal means, so a signal
sent to every process at once (systemd's control group, a terminal's
Ctrl-C to its process group) means what it means sent to the supervisor:

* the first SIGTERM or SIGINT: every worker drains (SIGTERM, which a
  worker obeys once: ``cli.GatewayServer``), and the supervisor exits
  when all have;
* the second: every worker ends its streams at once and exits (SIGQUIT;
  SIGQUIT to the supervisor means this at once);
* the third: SIGKILL.

A worker ignores SIGINT. A worker sent SIGTERM on its own drains, exits
and is started again: a way to recycle one.

A worker that exits while the supervisor is not stopping is started
again, and the log says so: at once if it had served for ``STEADY``
seconds, else after a pause that doubles up to ``MAX_PAUSE``. A worker
that cannot start in the first place (it exits before serving) stops
them all, with exit status 1, as one process would. If the supervisor
itself dies, even by SIGKILL, Linux kills its workers too
(``PR_SET_PDEATHSIG``), as if the gateway were one process.

Logs say ``[worker N]`` or ``[supervisor]``. Metrics: each worker writes
a snapshot of its own every second in the supervisor's run directory, and
``/metrics`` on any worker answers with its own, live, and the others'
snapshots, every sample labelled ``worker="N"`` (``WorkerInfo.metrics``),
so a scrape through the shared port sees every worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from .config import Settings

log = logging.getLogger("sse_gateway")

STEADY = 10.0  # a worker that served this long is started again at once when it exits
FIRST_PAUSE = 0.5  # else the pause before starting it again, doubled each time, up to
MAX_PAUSE = 10.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's place: its number (1 to ``count``) and the supervisor's run directory."""

    index: int
    count: int
    run_dir: str

    def _snapshot(self, index: int) -> Path:
        return Path(self.run_dir) / f"worker-{index}.prom"

    def write_snapshot(self, text: bytes) -> None:
        """This worker's metrics, for the ``/metrics`` of the others (written whole, then renamed)."""
        path = self._snapshot(self.index)
        part = path.with_suffix(".part")
        part.write_bytes(text)
        os.replace(part, path)

    def metrics(self, own: bytes) -> bytes:
        """Every worker's metrics in one exposition: this one's ``own`` (live) and the others' last
        snapshots, each family once, every sample labelled ``worker="N"``."""
        families: dict[str, tuple[list[str], list[str]]] = {}
        texts = [(self.index, own)]
        for index in range(1, self.count + 1):
            if index != self.index:
                with contextlib.suppress(OSError):
                    texts.append((index, self._snapshot(index).read_bytes()))
        for index, text in texts:
            headers: list[str] | None = None
            samples: list[str] = []
            for line in text.decode().splitlines():
                if line.startswith("# "):
                    name = line.split(" ", 3)[2]
                    headers, samples = families.setdefault(name, ([], []))
                    if len(headers) < 2:
                        headers.append(line)
                    continue
                if not line or headers is None:
                    continue
                key, _, value = line.rpartition(" ")
                label = f'worker="{index}"'
                key = key[:-1] + "," + label + "}" if key.endswith("}") else key + "{" + label + "}"
                samples.append(key + " " + value)
        lines = [line for headers, samples in families.values() for line in (*headers, *samples)]
        return ("\n".join(lines) + "\n").encode()


# -- a worker --------------------------------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """Be killed when the supervisor dies, however it dies (Linux); elsewhere, exit when it is gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def _quit_now(sig, frame) -> None:
    os._exit(0)  # stop now before serving: there is nothing to end yet


def worker_main(settings: Settings, sock: socket.socket, info: WorkerInfo, ready: Connection, parent: int) -> None:
    """A worker's life (in the spawned interpreter): the gateway on the inherited socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor says what a Ctrl-C means
    signal.signal(signal.SIGQUIT, _quit_now)  # until the server takes it over
    _die_with(parent)
    from .cli import run_gateway, setup_logging

    setup_logging(settings.log_level, f"worker {info.index}")
    log.info("worker %d of %d starting (pid %d)", info.index, info.count, os.getpid())

    def started() -> None:
        with contextlib.suppress(OSError):
            ready.send(True)

    sys.exit(run_gateway(settings, sock, worker=info, on_started=started))


# -- the supervisor ------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    ready: Connection  # the supervisor's end: the worker sends True once it serves
    started_at: float
    up: bool = False


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


class Supervisor:
    """Starts ``settings.workers`` workers on ``sock``, keeps them running, stops them on a signal."""

    def __init__(self, settings: Settings, sock: socket.socket, target=worker_main) -> None:
        self.settings = settings
        self.sock = sock
        self.target = target  # what a worker runs (``worker_main``; a test may give another)
        self.count = settings.workers
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.due: dict[int, float] = {}  # worker number -> when to start it again (monotonic)
        self.pauses: dict[int, float] = {}  # worker number -> its last pause before a start again
        self.level = 0  # 0 running, 1 draining, 2 stopping now, 3 killed
        self.serving = False  # every worker has served once
        self.status = 0
        self.signals: list[int] = []
        self.run_dir = ""

    def run(self) -> int:
        """Until every worker has exited after a stop, or one could not start; the exit status."""
        self.run_dir = tempfile.mkdtemp(prefix="sse-gateway-")
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        previous = {sig: signal.signal(sig, self._signalled) for sig in (signal.SIGTERM, signal.SIGINT,
                                                                          signal.SIGQUIT)}
        old_wakeup = signal.set_wakeup_fd(wake_write)
        try:
            for index in range(1, self.count + 1):
                if not self._start(index):
                    self.status = 1
                    self._escalate(2)
                    break
            while self.workers or (self.due and self.level == 0):
                self._turn(wake_read)
            return self.status
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_read)
            os.close(wake_write)
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _signalled(self, sig, frame) -> None:
        self.signals.append(sig)  # handled in _turn: wait() returns, woken by the wakeup fd

    def _turn(self, wake_read: int) -> None:
        now = time.monotonic()
        timeout = max(0.0, min(self.due.values()) - now) if self.due and self.level == 0 else None
        waiting: list = [wake_read]
        for w in self.workers.values():
            waiting.append(w.process.sentinel)
            if not w.up:
                waiting.append(w.ready)
        wait(waiting, timeout)
        with contextlib.suppress(OSError):
            while os.read(wake_read, 512):
                pass
        while self.signals:
            sig = self.signals.pop(0)
            self._escalate(2 if sig == signal.SIGQUIT else 1)
        for w in list(self.workers.values()):
            if not w.up and w.process.exitcode is None and w.ready.poll():
                with contextlib.suppress(EOFError, OSError):
                    w.up = bool(w.ready.recv())
            if w.process.exitcode is not None:
                self._ended(w)
        if not self.serving and len(self.workers) == self.count and all(w.up for w in self.workers.values()):
            self.serving = True
            log.info("%d workers serving on http://%s:%d", self.count, self.settings.host, self.settings.port)
        now = time.monotonic()
        for index, at in list(self.due.items()):
            if at <= now and self.level == 0:
                del self.due[index]
                if not self._start(index):
                    self.due[index] = now + MAX_PAUSE

    def _start(self, index: int) -> bool:
        """Start worker ``index``; False (and why, in the log) if no process could be made."""
        try:
            ours, theirs = self.context.Pipe(duplex=False)
            info = WorkerInfo(index, self.count, self.run_dir)
            process = self.context.Process(target=self.target, name=f"sse-gateway worker {index}",
                                           args=(self.settings, self.sock, info, theirs, os.getpid()))
            process.start()
        except OSError as exc:  # out of processes, memory or file descriptors
            log.error("cannot start worker %d: %s", index, exc.strerror or exc)
            return False
        theirs.close()
        self.workers[index] = _Worker(index, process, ours, time.monotonic())
        return True

    def _ended(self, w: _Worker) -> None:
        del self.workers[w.index]
        w.ready.close()
        w.process.join()
        if self.level:
            log.info("worker %d (pid %d) exited (%s)", w.index, w.process.pid, _how(w.process.exitcode))
            return
        if not self.serving and not w.up:
            log.error("worker %d (pid %d) could not start (%s); stopping", w.index, w.process.pid,
                      _how(w.process.exitcode))
            self.status = 1
            self._escalate(2)
            return
        lived = time.monotonic() - w.started_at
        if w.up and lived >= STEADY:
            self.pauses.pop(w.index, None)
            pause = 0.0
        else:
            pause = self.pauses[w.index] = min(MAX_PAUSE, self.pauses.get(w.index, FIRST_PAUSE / 2) * 2)
        log.warning("worker %d (pid %d) exited (%s) after %.1f s; starting it again%s", w.index, w.process.pid,
                    _how(w.process.exitcode), lived, f" in {pause:g} s" if pause else "")
        self.due[w.index] = time.monotonic() + pause

    def _escalate(self, at_least: int) -> None:
        """One step further towards the end (or straight to ``at_least``): drain, stop now, kill."""
        level = max(self.level + 1, at_least)
        if level == 1 and self.settings.drain_seconds <= 0:
            level = 2
        self.level = level
        self.due.clear()
        self.sock.close()  # the workers hold their own copies until they stop; no worker will start again
        sig, what = {1: (signal.SIGTERM, "draining"), 2: (signal.SIGQUIT, "stopping")}.get(
            level, (signal.SIGKILL, "killing"))
        if self.workers:
            log.info("%s %d worker(s)%s", what, len(self.workers),
                     "; signal again to stop them at once" if level == 1 else "")
        for w in self.workers.values():
            with contextlib.suppress(ProcessLookupError):  # one not serving yet has nothing to end
                os.kill(w.process.pid, sig if w.up or level == 1 else signal.SIGKILL)

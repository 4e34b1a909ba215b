"""``--profile DIR``: sample the server with py-spy during each scenario's measured part.

For every Python server (gateway, baseline, floor) and scenario, py-spy
records while the scenario's clock runs (from ``Meter`` to ``Meter.stop``)
and leaves two files in ``DIR``:

* ``TARGET-SCENARIO-runN.txt``: collapsed stacks, the input of
  flamegraph.pl, inferno and speedscope;
* ``TARGET-SCENARIO-runN.top.txt``: the event-loop thread's functions by
  own time (where the CPU goes) and by inclusive time (what for).

py-spy reads the server's memory from outside (``--nonblocking``): the
server is not paused, and its figures move little while it is sampled.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

RATE = 250  # samples per second


def available() -> bool:
    return shutil.which("py-spy") is not None


class Profiler:
    """One py-spy recording of process ``pid`` into ``stem``.txt, summarised on ``stop``."""

    def __init__(self, pid: int, stem: Path, title: str) -> None:
        self.stem = stem
        self.title = title
        self.raw = stem.with_suffix(".txt")
        self.log = open(stem.with_suffix(".log"), "wb")  # py-spy's own messages; closed in stop()
        self.proc = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw",
                                      "--threads", "--nonblocking", "--output", str(self.raw)],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output and exits
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        text = summarize(self.raw.read_text()) if self.raw.exists() else "py-spy wrote no samples; see the .log"
        self.stem.with_suffix(".top.txt").write_text(f"{self.title}\n{text}\n")


def _package(frame: str) -> str:
    """Where a function lives, coarsely: the gateway's module, or the top package of a dependency."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")")
    if name == "Runner.run" and path == "asyncio/runners.py":
        return "event loop, native code (uvloop: polling, socket I/O, callbacks)"
    if path.startswith("sse_gateway/"):
        return path
    return path.split("/")[0] if "/" in path else path or name


def _frame(raw: str) -> str:
    """``func (path/file.py:123)`` -> ``func (path/file.py)``: one entry per function, not per line."""
    name, _, where = raw.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize(collapsed: str, top: int = 25) -> str:
    """The event-loop thread's top functions, by own and by inclusive share of its samples.

    Stacks are recorded with ``--threads``: each begins ``thread (TID): NAME``,
    and the event loop runs in ``MainThread``. (Under uvloop a sample may hold
    only the running coroutine's frames, without the loop's: the thread's name
    still tells whose it is.)
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        thread, _, rest = stack.partition(";")
        name = thread.partition(": ")[2]
        if name != "MainThread":
            threads[name] += n
            continue
        total += n
        if not rest:
            own["(no Python frame: native code)"] += n
            continue
        frames = [_frame(f) for f in rest.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return "no samples of the event-loop thread"
    lines = [f"{total} samples of the event-loop thread (MainThread); other threads, in samples of the same "
             f"length: " + (", ".join(f"{name} {n}" for name, n in threads.most_common(6)) or "none"),
             "", "own time (where the CPU goes):"]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in own.most_common(top)]
    packages: Counter[str] = Counter()
    for f, n in own.items():
        packages[_package(f)] += n
    lines += ["", "own time by package:"]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in packages.most_common(12)]
    lines += ["", "inclusive time (what it goes to; frames in 90% of the samples or more, the roots, left out):"]
    lines += [f"{100 * n / total:6.1f}%  {f}" for f, n in inclusive.most_common() if n < 0.9 * total][:top]
    return "\n".join(lines)

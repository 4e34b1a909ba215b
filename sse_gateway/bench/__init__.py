"""``sse-gateway bench``: measure the gateway beside nginx + nchan, a naive baseline and the floor.

The bench is the load generator: one process (uvloop when installed) on
its own CPU, driving the server under test over loopback HTTP/1.1 with raw
asyncio connections. By default it starts each server itself, pinned to
another CPU (``taskset``), and reads the server's CPU time and memory from
``/proc``; ``--url`` drives a server that is already running instead.

Targets, all run in the same invocation so their ratios are fair:

* ``gateway``: ``sse-gateway serve`` on a fresh SQLite file (durable);
* ``baseline``: ``sse_gateway.baseline``, FastAPI + sse-starlette + lists;
* ``nchan``: nginx with ``deploy/nchan.conf`` (C, in memory);
* ``floor``: ``sse_gateway.bench.floor``, a raw asyncio server writing
  pre-encoded bytes: the load generator's own ceiling;
* ``redis-1``, ``redis-2``: one or two gateways (``--backend redis``) on
  a private ``redis-server``. Publisher k posts to node k mod N and
  subscriber k streams from node (k + 1) mod N, so on two nodes events
  cross from one node to the other through Redis; Redis' own CPU is
  reported per published event. Not part of ``all``.

Every scenario of every run gets a freshly started server (see ``measure``);
the table shows the median of the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

from .. import __version__
from . import profile
from .report import headline, machine, summarize, table
from .scenarios import FULL, QUICK, SCENARIOS, Context, Scenario, Sizes
from .servers import NCHAN_CONF, PRESETS, REDIS_NODES, Server, make_server, raise_nofile

ALL_TARGETS = ("gateway", "baseline", "nchan", "floor")

DESCRIPTION = """\
Measure a gateway from a separate load-generating process and print a table
(or --json). By default the bench starts the server(s) itself, pinned to CPU 0
while it runs on CPU 1, and reports the median of --runs runs.

  sse-gateway bench                               the gateway, every scenario, 3 runs
  sse-gateway bench --target all                  gateway, baseline, nchan and floor in one run
  sse-gateway bench --target redis-1,redis-2      one vs two gateway nodes on one Redis
  sse-gateway bench --quick --scenarios ingest    a smoke run of the ingest scenarios
  sse-gateway bench --url http://127.0.0.1:8000 --pid 1234    a gateway already running

Scenarios: ingest-1, ingest-32, ingest-batch, ingest-ndjson, fanout-100,
fanout-1000, fleet, latency, replay, idle (a prefix such as 'ingest' picks a group).
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure throughput, fan-out, latency, replay and memory",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="gateway",
                   help="gateway, baseline, nchan, floor, all (those four), redis-1 or redis-2 (one or two "
                        "gateway nodes on a private redis-server); comma-separated (default: gateway)")
    p.add_argument("--scenarios", default="", metavar="LIST",
                   help="comma-separated scenario names or prefixes (default: all)")
    p.add_argument("--runs", type=int, default=3, help="runs per target; the table shows medians (default: 3)")
    p.add_argument("--quick", action="store_true", help="small sizes and short durations, for a smoke run")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--no-pin", action="store_true", help="do not pin the server and the load generator to CPUs")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record py-spy profiles of the (Python) server during each measured part into DIR")
    remote = p.add_argument_group("a server that is already running")
    remote.add_argument("--url", help="base URL of the server to drive (no server is started)")
    remote.add_argument("--pid", type=int, help="its process id, to read its CPU time and memory from /proc")
    remote.add_argument("--preset", choices=sorted(set(PRESETS) - set(REDIS_NODES)), default="gateway",
                        help="its URL shape (default: gateway)")
    remote.add_argument("--publish-url", metavar="TEMPLATE",
                        help="publish URL with {session}, absolute or a path under --url")
    remote.add_argument("--stream-url", metavar="TEMPLATE",
                        help="stream URL with {session}, absolute or a path under --url")
    remote.add_argument("--last-event-id-style", choices=["header", "query"],
                        help="resume with a Last-Event-ID header or ?last_event_id=")
    p.add_argument("--nchan-conf", type=Path, default=NCHAN_CONF, metavar="PATH",
                   help="nginx config of --target nchan (default: deploy/nchan.conf)")
    p.set_defaults(run=run)


@dataclass
class Plan:
    targets: list[str]
    scenarios: list[Scenario]
    runs: int
    sizes: Sizes
    server_cpu: int | None
    client_cpu: int | None
    nchan_conf: Path
    remote: Server | None = None
    profile: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        if args.runs < 1:
            raise ValueError("--runs must be at least 1")
        scenarios = pick_scenarios(args.scenarios)
        overrides = {"publish_url": args.publish_url, "stream_url": args.stream_url,
                     "last_event_id_style": args.last_event_id_style}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        remote = None
        if args.url:
            target = replace(PRESETS[args.preset], **overrides)
            remote = Server(target, args.url, pid=args.pid)
            targets = [target.name]
        else:
            if overrides or args.pid:
                raise ValueError("--publish-url, --stream-url, --last-event-id-style and --pid go with --url")
            targets = list(ALL_TARGETS) if args.target == "all" else [t.strip() for t in args.target.split(",")]
            unknown = [t for t in targets if t not in PRESETS]
            if unknown or not targets:
                raise ValueError(f"unknown target(s) {', '.join(unknown)}: use {', '.join(PRESETS)} or all")
        if args.profile is not None:
            if not profile.available():
                raise ValueError("--profile needs py-spy (pip install py-spy)")
            args.profile.mkdir(parents=True, exist_ok=True)
        server_cpu, client_cpu = pick_cpus(args.no_pin or remote is not None and args.pid is None)
        return cls(targets, scenarios, args.runs, QUICK if args.quick else FULL, server_cpu, client_cpu,
                   args.nchan_conf, remote, args.profile)


def pick_scenarios(spec: str) -> list[Scenario]:
    if not spec.strip():
        return list(SCENARIOS.values())
    chosen: dict[str, Scenario] = {}
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        matches = [s for name, s in SCENARIOS.items() if name == word or name.startswith(word + "-")]
        if not matches:
            raise ValueError(f"unknown scenario {word!r}: use {', '.join(SCENARIOS)}")
        chosen.update((s.name, s) for s in matches)
    return [s for s in SCENARIOS.values() if s.name in chosen]


def pick_cpus(no_pin: bool) -> tuple[int | None, int | None]:
    """(server CPU, load-generator CPU): the first two this process may use, if there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2 or shutil.which("taskset") is None:
        return None, None
    return cpus[0], cpus[1]


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def measure(plan: Plan) -> dict:
    """Every scenario on every target, ``plan.runs`` times: figures per target, scenario and run.

    Each (run, scenario, target) gets a server of its own, started afresh, so
    no scenario inherits another's memory or data; the targets of one
    scenario run one after the other, so they see the same machine.
    """
    # SIGTERM cancels like Ctrl-C does, so every server started is stopped on the way out.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    results = {t: {s.name: [] for s in plan.scenarios} for t in plan.targets}
    timeout = 600 if plan.sizes is FULL else 90
    with tempfile.TemporaryDirectory(prefix="sse-bench-") as tmp:
        for run_no in range(1, plan.runs + 1):
            for scenario in plan.scenarios:
                for name in plan.targets:
                    began = time.monotonic()
                    figures = await run_one(plan, scenario, name, Path(tmp) / f"run{run_no}-{scenario.name}",
                                            timeout, run_no)
                    results[name][scenario.name].append(figures)
                    say(f"run {run_no}/{plan.runs} {scenario.name} {name} ({time.monotonic() - began:.0f}s): "
                        f"{headline(scenario.name, figures)}")
    return results


async def run_one(plan: Plan, scenario: Scenario, name: str, workdir: Path, timeout: float,
                  run_no: int) -> dict | None:
    if scenario.needs_batch and not (plan.remote.target if plan.remote else PRESETS[name]).batch:
        return None
    server = None
    try:
        server = plan.remote or make_server(name, workdir, cpu=plan.server_cpu, nchan_conf=plan.nchan_conf)
        await server.start()
    except (OSError, RuntimeError) as exc:
        if server is not None:
            server.stop()
        return {"error": f"server did not start: {exc}"}
    ctx = Context(server, plan.sizes, prefix=f"b{secrets.token_hex(3)}r{run_no}")
    if plan.profile is not None and name != "nchan":
        ctx.profile = plan.profile / f"{name}-{scenario.name}-run{run_no}"
    gc.collect()
    try:
        return await asyncio.wait_for(scenario.run(ctx), timeout)
    except Exception as exc:  # one failed scenario is reported in the table; the others still run
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        ctx.stop_profiler()
        await asyncio.sleep(0.3)  # let the server finish with the scenario's connections
        server.stop()


def run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(args: argparse.Namespace) -> int:
    try:
        plan = Plan.from_args(args)
    except ValueError as exc:
        print(f"sse-gateway bench: {exc}", file=sys.stderr)
        return 2
    raise_nofile()
    if plan.client_cpu is not None:
        os.sched_setaffinity(0, {plan.client_cpu})
    say(f"targets {', '.join(plan.targets)}; scenarios {', '.join(s.name for s in plan.scenarios)}; "
        f"{plan.runs} run(s); server on CPU {plan.server_cpu}, load generator on CPU {plan.client_cpu}")
    try:
        raw = run_async(measure(plan))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("sse-gateway bench: interrupted", file=sys.stderr)
        return 130
    results = {t: {s: summarize(runs) for s, runs in by_scenario.items()} for t, by_scenario in raw.items()}
    info = machine(plan.server_cpu, plan.client_cpu)
    if args.json:
        doc = {"bench": "sse-gateway", "version": __version__, "command": " ".join(["sse-gateway", *sys.argv[1:]]),
               "runs": plan.runs, "quick": plan.sizes is QUICK, "sizes": vars(plan.sizes), "machine": info,
               "results": results}
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        pinned = (f"server pinned to CPU {plan.server_cpu}, load generator to CPU {plan.client_cpu}"
                  if plan.client_cpu is not None else "not pinned")
        print(table(results, plan.sizes, f"sse-gateway bench {__version__}: median of {plan.runs} run(s); "
                    f"{pinned}; {info['cpu']} ({info['cpus']} CPUs), Python {info['python']}"))
    failed = any(s and s.get("errors") for by_scenario in results.values() for s in by_scenario.values())
    return 1 if failed else 0

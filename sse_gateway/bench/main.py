"""The bench itself: plans, runs and reports (``sse-gateway bench``; see the package docstring)."""


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
from . import ALL_TARGETS, profile
from .report import headline, machine, summarize, table
from .scenarios import FULL, QUICK, SCENARIOS, Context, Scenario, Sizes
from .servers import NCHAN_CONF, PRESETS, Server, make_server, preset, raise_nofile, server_cpus, workers_of


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
    spare_cpus: tuple[int, ...] = ()  # CPUs neither pinned one has: the other workers of a gateway-N target

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
            unknown = [t for t in targets if preset(t) is None]
            if unknown or not targets:
                raise ValueError(f"unknown target(s) {', '.join(unknown)}: use {', '.join(PRESETS)}, gateway-N "
                                 "or all")
        if args.profile is not None:
            if not profile.available():
                raise ValueError("--profile needs py-spy (pip install py-spy)")
            args.profile.mkdir(parents=True, exist_ok=True)
        server_cpu, client_cpu = pick_cpus(args.no_pin or remote is not None and args.pid is None)
        spare = tuple(sorted(set(os.sched_getaffinity(0)) - {server_cpu, client_cpu})) if client_cpu is not None else ()
        return cls(targets, scenarios, args.runs, QUICK if args.quick else FULL, server_cpu, client_cpu,
                   args.nchan_conf or NCHAN_CONF, remote, args.profile, spare)


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
    target = plan.remote.target if plan.remote else preset(name)
    if (scenario.needs_batch and not target.batch) or (scenario.needs_messages and not target.messages):
        return None
    server = None
    try:
        server = plan.remote or make_server(name, workdir, cpu=plan.server_cpu, spare=plan.spare_cpus,
                                            nchan_conf=plan.nchan_conf)
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
    for name in plan.targets:
        workers = workers_of(name)
        if workers > 1 and plan.client_cpu is not None:
            cpus = server_cpus(name, plan.server_cpu, list(plan.spare_cpus))
            if str(cpus).count(",") + 1 < workers:
                say(f"{name}: its {workers} workers share CPU(s) {cpus}: the machine has no more beside the load "
                    "generator's, so the figures cannot show them scaling")
            else:
                say(f"{name}: {workers} workers on CPUs {cpus}")
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

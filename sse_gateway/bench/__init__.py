"""``sse-gateway bench``: measure the gateway beside nginx + nchan, a naive baseline and the floor.

The bench is the load generator: one process (uvloop when installed) on
its own CPU, driving the server under test over loopback HTTP/1.1 with raw
asyncio connections. By default it starts each server itself, pinned to
another CPU (``taskset``), and reads the server's CPU time and memory from
``/proc``; ``--url`` drives a server that is already running instead.

Targets, all run in the same invocation so their ratios are fair:

* ``gateway``: ``sse-gateway serve`` on a fresh SQLite file (durable);
* ``baseline``: ``sse_gateway.bench._baseline``, FastAPI + sse-starlette + lists
  (what a developer writes by hand; not a part of the product);
* ``nchan``: nginx with ``deploy/nchan.conf`` (C, in memory);
* ``floor``: ``sse_gateway.bench.floor``, a raw asyncio server writing
  pre-encoded bytes: the load generator's own ceiling;
* ``gateway-N`` (``gateway-2``, ``gateway-4``, ...): ``sse-gateway serve
  --workers N`` on a fresh SQLite file, on one port; pinned to the server
  CPU and N-1 more besides the load generator's, where the machine has
  them, so its figures beside ``gateway``'s show how ingest and fan-out
  scale with workers. Not part of ``all``;
* ``redis-1``, ``redis-2``: one or two gateways (``--backend redis``) on
  a private ``redis-server``. Publisher k posts to node k mod N and
  subscriber k streams from node (k + 1) mod N, so on two nodes events
  cross from one node to the other through Redis; Redis' own CPU is
  reported per published event. Not part of ``all``.

Every scenario of every run gets a freshly started server (see ``measure``);
the table shows the median of the runs.

This module only adds the command to the command line; the bench itself
(``main``, ``servers``, ``scenarios``, ``wire``, ...) is loaded when
``sse-gateway bench`` runs, so ``serve`` never imports it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ALL_TARGETS = ("gateway", "baseline", "nchan", "floor")

DESCRIPTION = """\
Measure a gateway from a separate load-generating process and print a table
(or --json). By default the bench starts the server(s) itself, pinned to CPU 0
while it runs on CPU 1, and reports the median of --runs runs.

  sse-gateway bench                               the gateway, every scenario, 3 runs
  sse-gateway bench --target all                  gateway, baseline, nchan and floor in one run
  sse-gateway bench --target gateway,gateway-2    one vs two worker processes on one SQLite file
  sse-gateway bench --target redis-1,redis-2      one vs two gateway nodes on one Redis
  sse-gateway bench --quick --scenarios ingest    a smoke run of the ingest scenarios
  sse-gateway bench --url http://127.0.0.1:8000 --pid 1234    a gateway already running

Scenarios: ingest-1, ingest-32, ingest-batch, ingest-ndjson, fanout-100,
fanout-1000, fleet, latency, replay, messages, idle, heartbeat (a prefix such as 'ingest' picks a group).
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure throughput, fan-out, latency, replay and memory",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="gateway",
                   help="gateway, baseline, nchan, floor, all (those four), gateway-N (the gateway with --workers "
                        "N), redis-1 or redis-2 (one or two gateway nodes on a private redis-server); "
                        "comma-separated (default: gateway)")
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
    remote.add_argument("--preset", choices=sorted(ALL_TARGETS), default="gateway",
                        help="its URL shape (default: gateway)")
    remote.add_argument("--publish-url", metavar="TEMPLATE",
                        help="publish URL with {session}, absolute or a path under --url")
    remote.add_argument("--stream-url", metavar="TEMPLATE",
                        help="stream URL with {session}, absolute or a path under --url")
    remote.add_argument("--last-event-id-style", choices=["header", "query"],
                        help="resume with a Last-Event-ID header or ?last_event_id=")
    p.add_argument("--nchan-conf", type=Path, default=None, metavar="PATH",
                   help="nginx config of --target nchan (default: deploy/nchan.conf)")
    p.set_defaults(run=_run)



def _run(args: argparse.Namespace) -> int:
    from .main import run

    return run(args)

"""The gateway process: what every request needs, built in the lifespan, and its life.

``Gateway`` owns the event log, the hub, the input waiters, auth, stream slots, metrics and the
background tasks (the sweep that ends runs past their deadline and applies retention, slow-client watchdog,
heartbeat tick, loop-lag probe).
It is created when the app starts (never at import: every asyncio object
belongs to the running loop), drains on SIGTERM, and closes the log last.
With a webhook secret it also runs the webhooks (``webhooks.py``), whose outbox closes after the log.
As one worker of ``serve --workers`` (``workers.py``) it also writes a snapshot of its metrics every
second, for the ``/metrics`` of the others.
"""

from __future__ import annotations

import asyncio
import logging

from . import limits
from .auth import Auth
from .config import Settings
from .errors import GatewayError
from .hub import Hub
from .inputs import InputWaiters, Watched
from .log.base import EventLog
from .metrics import Stats, make_registry, measure_loop_lag, render
from .models import now_ms
from .webhooks import Notifier
from .writes import Writes

log = logging.getLogger("sse_gateway")

SNAPSHOT_EVERY = 1.0  # seconds between a worker's snapshots of its metrics (``serve --workers``)


class Gateway:
    """Everything a request needs (``request.app.state.gw``)."""

    def __init__(self, settings: Settings, log_: EventLog, worker=None) -> None:
        self.settings = settings
        #: this process's place among ``serve --workers`` (``workers.WorkerInfo``), None when it serves alone
        self.worker = worker
        self.log = log_
        self.stats = Stats()
        self.streams = limits.StreamSlots(settings.max_streams, settings.max_streams_per_session)
        self.hub = Hub(log_, self.stats, coalesce=self.settings.coalesce_ms / 1000, slots=self.streams)
        self.inputs = InputWaiters()  # the agents reading sessions' input (inputs.py)
        log_.add_observer(self.inputs)
        log_.watched = Watched(self.hub.channels, self.inputs.waiting)
        self.auth = Auth(settings.publish_keys, settings.token_secret, settings.token_ttl)
        self.writes = Writes(settings, log_, self.stats)
        #: webhooks (webhooks.py), with a secret to sign them; the outbox outlives the process
        self.webhooks = Notifier(settings, log_, self.stats) if settings.webhook_secret else None
        if self.webhooks:
            log_.add_observer(self.webhooks)
        self.registry = make_registry(self)
        self.draining = False
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        log_.add_observer(self.stats)

    def spawn(self, coro) -> None:
        """Run ``coro`` in the background, keeping a reference until it is done (cancelled at stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.log.open()
        self._tasks = [asyncio.create_task(self._sweep(), name="sweep"),
                       asyncio.create_task(self.hub.cut_slow_clients(self.settings.send_timeout),
                                           name="slow-clients"),
                       asyncio.create_task(self.hub.send_heartbeats(self.settings.heartbeat), name="heartbeats"),
                       asyncio.create_task(measure_loop_lag(self.stats), name="loop-lag")]
        if self.worker is not None:
            self._tasks.append(asyncio.create_task(self._snapshot_metrics(), name="metrics-snapshot"))
        if self.webhooks:
            await self.webhooks.open()

    def begin_drain(self, then) -> None:
        """Refuse new streams, close open ones spread over the drain window, then call ``then``."""
        self.draining = True
        window = self.settings.drain_seconds
        self.hub.begin_drain(window * 0.8)
        self.inputs.drain()

        async def wait_for_streams() -> None:
            deadline = self.loop.time() + window
            while self.hub.channels and self.loop.time() < deadline:
                await asyncio.sleep(0.05)
            then()

        self.spawn(wait_for_streams())

    async def stop(self) -> None:
        self.hub.shutdown()
        self.inputs.drain()
        pending = [*self._tasks, *self._background]  # background work must not outlive the log
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.log.close()
        if self.webhooks:  # after the log: the writes it commits on closing may still call a webhook
            await self.webhooks.close()

    def metrics(self) -> bytes:
        """``/metrics``: this process's, or with ``--workers`` every worker's, each sample labelled with its own."""
        text = render(self.registry)
        return self.worker.metrics(text) if self.worker is not None else text

    async def _snapshot_metrics(self) -> None:
        """A worker's metrics, every second, where the other workers' ``/metrics`` read them."""
        while True:
            try:
                self.worker.write_snapshot(render(self.registry))
            except OSError as exc:
                log.warning("cannot write this worker's metrics for the others: %s", exc)
            await asyncio.sleep(SNAPSHOT_EVERY)

    async def _sweep(self) -> None:
        """Once a second: end the runs whose lease (or cancel grace) ran out, then apply retention."""
        while True:
            await asyncio.sleep(1.0)
            try:
                ended = await self.log.expire(now_ms())
                if ended:
                    self.stats.runs_expired += ended
                    log.info("ended %d run(s) whose agent went silent or did not confirm a cancel", ended)
                removed = await self.log.sweep(now_ms())
                if removed:
                    log.info("retention removed %d expired session(s)", removed)
            except GatewayError as exc:
                log.warning("the sweep failed: %s", exc.message)

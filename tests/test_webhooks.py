"""Webhooks: signed, sent only when nobody watches, retried, and kept in the outbox across restarts.

The notifier's rules run in process against the memory log, with httpx's ``MockTransport`` as the receiver
(no socket). The system test runs a real gateway process against a real HTTP receiver and restarts it in the
middle of a delivery. Every signature is checked with the receivers' own code, as docs/api.md gives it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from conftest import ROOT
from util import await_until, metric, read_stream

from sse_gateway.config import Settings, webhook_key
from sse_gateway.limits import StreamSlots
from sse_gateway.log.memory import MemoryLog
from sse_gateway.metrics import Stats
from sse_gateway.models import NewEvent
from sse_gateway.webhooks import MAX_BACKOFF, Notifier, backoff, retry_after, sign

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()

pytestmark = pytest.mark.timeout(60)


API_DOC = (ROOT / "docs" / "api.md").read_text()


def receivers_check() -> Callable:
    """``verify(secret, headers, body)`` as docs/api.md#webhooks gives it to receivers (it uses nothing of the
    gateway's): the payload of a request signed with ``secret``, else ValueError."""
    code = re.search(r"```python\n(.*?def verify.*?)```", API_DOC, re.S)
    scope: dict = {}
    exec(code.group(1), scope)
    return scope["verify"]


verify = receivers_check()


def test_the_documented_request_is_signed_with_the_documented_secret():
    request = re.search(r"```\n(POST /your/hook .*?)\n```", API_DOC, re.S).group(1)
    head, _, body = request.partition("\n\n")
    headers = dict(line.split(": ", 1) for line in head.splitlines()[1:])
    secret = re.search(r"signed with the secret `(whsec_[^`]+)`", API_DOC).group(1)
    assert verify(secret, headers, body.encode(), tolerance=10**10)["type"] == "run.ended"
    assert sign(webhook_key(secret), headers["webhook-id"], int(headers["webhook-timestamp"]), body.encode()) == \
        headers["webhook-signature"]


def test_the_receivers_check_refuses_what_is_not_signed_now_with_the_secret():
    body, stamp = b'{"type":"run.ended"}', int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(stamp),
               "webhook-signature": "v1,bm9wZQ== " + sign(webhook_key(SECRET), "msg_1", stamp, body)}
    assert verify(SECRET, headers, body) == {"type": "run.ended"}  # one good signature among several
    for secret, changed in ((SECRET, body + b" "), ("whsec_" + base64.b64encode(b"x" * 32).decode(), body)):
        with pytest.raises(ValueError, match="signature"):
            verify(secret, headers, changed)
    with pytest.raises(ValueError, match="replay"):
        verify(SECRET, {**headers, "webhook-timestamp": str(stamp - 600)}, body)


# -- signing and backoff ---------------------------------------------------------------------


def test_the_signature_is_the_standard_webhooks_one():
    """The vector of the Standard Webhooks reference libraries."""
    key = webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert key == webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw==")  # padded or not
    assert webhook_key("not-base64-just-bytes") == b"not-base64-just-bytes"  # no prefix: the string's own bytes


def test_backoff_doubles_up_to_an_hour_with_up_to_half_again_of_jitter():
    assert [backoff(n, 5, rand=lambda: 0.0) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert backoff(30, 5, rand=lambda: 0.0) == backoff(10_000, 5, rand=lambda: 0.0) == MAX_BACKOFF
    assert backoff(3, 5, rand=lambda: 0.999) == pytest.approx(20 * 1.4995)
    waits = {backoff(2, 5) for _ in range(200)}
    assert all(10 <= w < 15 for w in waits) and len(waits) > 100  # spread out, never early
    # a receiver's Retry-After: seconds are honoured up to the same bound; anything else asks for nothing
    assert [retry_after(v) for v in ("30", "1e308", "-5", "nan", "Wed, 21 Oct 2015 07:28:00 GMT", None)] == \
        [30, MAX_BACKOFF, 0, 0, 0, 0]


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings, says", [
    ({"webhook_url": "hooks.example/in", "webhook_secret": SECRET}, "use http:// or https://"),
    ({"webhook_url": "ftp://hooks.example/in", "webhook_secret": SECRET}, "use http:// or https://"),
    ({"webhook_url": "https:///in", "webhook_secret": SECRET}, "names no host"),
    ({"webhook_url": "https://hooks.example:99999/in", "webhook_secret": SECRET}, "out of range"),
    ({"webhook_url": "https://hooks.example/a b", "webhook_secret": SECRET}, "spaces"),
    ({"webhook_url": "https://hooks.example/in"}, "webhook_url needs webhook_secret"),
    ({"webhook_secret": "  "}, "webhook secret is empty or blank"),
    ({"webhook_secret": "whsec_not*base64"}, "the rest is not base64"),
    ({"webhook_secret": "change-me"}, "placeholder"),
    ({"webhook_secret": "s" * 31, "host": "0.0.0.0"}, "webhook secret is shorter than 32 bytes"),
    ({"webhook_secret": "whsec_" + base64.b64encode(b"k" * 24).decode(), "host": "0.0.0.0"}, "shorter than 32"),
    ({"webhook_secret": SECRET, "webhook_attempts": 0}, "webhook_attempts must be positive"),
    ({"webhook_secret": SECRET, "webhook_backoff": -1}, "webhook_backoff must be positive"),
])
def test_webhook_settings_that_cannot_work_are_refused_with_a_reason(settings, says):
    with pytest.raises(ValueError, match=says):
        Settings(publish_key=("k" * 40,), **settings).check()


def test_the_outbox_lives_beside_the_data_file_unless_told():
    assert Settings(db="/var/lib/gw/events.db").outbox_path == "/var/lib/gw/events.webhooks.db"
    assert Settings(db="/var/lib/gw/events.db", webhook_outbox="/x/o.db").outbox_path == "/x/o.db"
    assert Settings(backend="memory").outbox_path == ":memory:"
    weak = Settings(webhook_secret="s" * 20).weak_credentials()  # on loopback only a warning, as for tokens
    assert len(weak) == 1 and "webhook secret" in weak[0]


# -- the notifier, in process ------------------------------------------------------------------


class Hooks:
    """A memory log with a notifier whose receiver is ``answer(request) -> status`` (may be async)."""

    def __init__(self, tmp: Path, answer: Callable, **settings) -> None:
        self.tmp = tmp
        self.answer = answer
        self.requests: list[httpx.Request] = []
        self.settings = Settings(backend="memory", webhook_url="http://hooks.test/in", webhook_secret=SECRET,
                                 webhook_outbox=str(tmp / "outbox.db"), webhook_backoff=0.01, **settings)
        self.log = MemoryLog()
        self.log.streams = self.slots = StreamSlots()
        self.stats = Stats()

    async def start(self, answer: Callable | None = None) -> Notifier:
        self.answer = answer or self.answer

        async def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            status = self.answer(request)
            return httpx.Response(await status if asyncio.iscoroutine(status) else status)

        self.notifier = Notifier(self.settings, self.log, self.stats, transport=httpx.MockTransport(handle))
        self.log.add_observer(self.notifier)
        await self.notifier.open()
        return self.notifier

    async def end(self, session: str, result=None) -> None:
        """Run ``session`` and end it, with nobody watching unless a test took a stream slot."""
        if await self.log.get_session(session) is None:
            await self.log.create_session(session)
        await self.log.complete(session, result)

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]

    def outbox(self) -> list[tuple]:
        with sqlite3.connect(self.tmp / "outbox.db") as db:
            return db.execute("SELECT id, session, attempts FROM deliveries").fetchall()


@pytest.fixture
async def hooks(tmp_path: Path) -> AsyncIterator[Callable[..., Hooks]]:
    made: list[Hooks] = []

    def make(answer: Callable = lambda request: 200, **settings) -> Hooks:
        made.append(Hooks(tmp_path, answer, **settings))
        return made[-1]

    yield make
    for h in made:
        await h.notifier.close()


async def test_an_end_and_an_approval_request_nobody_watches_are_posted_signed(hooks):
    h = hooks()
    await h.start()
    await h.log.create_session("run1")
    epoch = (await h.log.get_session("run1")).epoch
    await h.log.append("run1", [NewEvent("token", '{"text":"hi"}'),
                                NewEvent("approval.request", '{"approval_id":"rm-1","command":"rm -rf build/"}')])
    await h.end("run1", {"text": "done"})
    await await_until(lambda: h.stats.webhooks_succeeded == 2, what="both webhooks to be delivered")
    ask, end = sorted(h.bodies(), key=lambda b: b["event_id"])
    assert ask == {"type": "approval.requested", "session": "run1", "event_id": 2, "cursor": f"2:{epoch}",
                   "data": {"approval_id": "rm-1", "command": "rm -rf build/"}, "ts": ask["ts"]}
    assert end == {"type": "run.ended", "session": "run1", "event_id": 3, "cursor": f"3:{epoch}",
                   "data": {"text": "done"}, "ts": end["ts"]}
    assert end["ts"].endswith("Z")
    for r in h.requests:
        assert verify(SECRET, r.headers, r.content)
        assert r.headers["content-type"] == "application/json" and r.headers["webhook-timestamp"].isdigit()
        assert r.headers["webhook-id"].startswith("msg_") and "." not in r.headers["webhook-id"]
    assert len({r.headers["webhook-id"] for r in h.requests}) == 2
    await await_until(lambda: h.notifier.pending == 0 and not h.outbox(), what="the outbox to be empty")


async def test_a_session_someone_watches_calls_no_webhook(hooks):
    h = hooks()
    await h.start()
    release = h.slots.take("watched")  # a stream open while the run ends
    await h.end("watched")
    left = h.slots.take("seen-then-left")  # a stream that gets gateway.end and closes at once
    await h.end("seen-then-left")
    left()
    await h.end("alone")  # written after the others: once it is delivered, they were decided
    await await_until(lambda: h.stats.webhooks_succeeded, what="the webhook of the session nobody watched")
    await await_until(lambda: h.notifier.pending == 0, what="the outbox to be empty")
    assert [b["session"] for b in h.bodies()] == ["alone"]
    release()


async def test_a_session_s_own_url_wins_and_the_payload_says_how_the_run_ended(hooks):
    h = hooks()
    await h.start()
    await h.log.create_session("own", webhook_url="https://agent.example/hooks/own")
    await h.log.complete("own", outcome="failed", error={"code": "oom"})
    row = await h.log.create_session("silent", lease_seconds=5)
    assert await h.log.expire(row.deadline) == 1  # the gateway ends it: timed_out
    await await_until(lambda: h.stats.webhooks_succeeded == 2, what="both webhooks to be delivered")
    by_session = {json.loads(r.content)["session"]: r for r in h.requests}
    assert str(by_session["own"].url) == "https://agent.example/hooks/own"
    assert str(by_session["silent"].url) == "http://hooks.test/in"  # the gateway's
    assert json.loads(by_session["own"].content)["data"] == {"status": "failed", "error": {"code": "oom"}}
    assert json.loads(by_session["silent"].content)["data"]["status"] == "timed_out"


async def test_a_failed_attempt_is_retried_with_the_same_id_until_a_2xx(hooks):
    statuses = iter([500, 503, 302, 204])
    h = hooks(lambda request: next(statuses))
    await h.start()
    await h.end("run1", {"n": 1})
    await await_until(lambda: h.stats.webhooks_succeeded == 1, what="the fourth attempt to be accepted")
    assert len(h.requests) == 4 and h.stats.webhooks_retried == 3 and h.stats.webhooks_failed == 0
    assert len({r.headers["webhook-id"] for r in h.requests}) == 1
    assert len({r.content for r in h.requests}) == 1  # the same body on every attempt
    assert all(verify(SECRET, r.headers, r.content) for r in h.requests)


@pytest.mark.parametrize("settings, statuses, attempts", [
    ({"webhook_attempts": 3}, [500] * 10, 3),
    ({}, [410], 1),  # Gone: the receiver wants no more
    ({"webhook_max_age": 0.001}, [500] * 10, 1),  # its next attempt would come after the max age
])
async def test_a_webhook_is_given_up_after_its_attempts_its_age_or_a_410(hooks, settings, statuses, attempts):
    answers = iter(statuses)
    h = hooks(lambda request: next(answers), **settings)
    await h.start()
    await h.end("run1")
    await await_until(lambda: h.stats.webhooks_failed == 1, what="the webhook to be given up")
    assert len(h.requests) == attempts and h.stats.webhooks_succeeded == 0
    await await_until(lambda: h.notifier.pending == 0 and not h.outbox(), what="the outbox to be empty")


async def test_a_delivery_cut_by_a_stop_is_sent_again_by_the_next_start(hooks):
    h = hooks()
    never = asyncio.Event()

    async def hang(request):
        await never.wait()

    await h.start(hang)
    await h.end("run1")
    await await_until(lambda: h.requests, what="the first attempt to be under way")
    await h.notifier.close()  # mid-attempt
    assert [(s, n) for _, s, n in h.outbox()] == [("run1", 1)]
    h.log = MemoryLog()  # a new process: nothing in memory but what the outbox holds
    await h.start(lambda request: 200)
    await await_until(lambda: h.stats.webhooks_succeeded == 1, what="the next start to deliver it")
    assert len(h.requests) == 2 and h.requests[0].headers["webhook-id"] == h.requests[1].headers["webhook-id"]
    await await_until(lambda: not h.outbox(), what="the outbox to be empty")


async def test_a_second_process_on_the_outbox_leaves_a_row_under_way_alone(hooks):
    """A rolling restart on one SQLite file: two gateways share the outbox; a claimed row is one's alone."""
    never = asyncio.Event()

    async def hang(request):
        await never.wait()

    first = hooks()
    await first.start(hang)
    await first.end("run1")
    await await_until(lambda: first.requests, what="the first process's attempt to be under way")
    second = hooks()  # the same outbox file
    await second.start(lambda request: 200)
    await await_until(lambda: second.notifier.pending == 1, what="the second process to look at the outbox")
    assert second.requests == [] and first.outbox()[0][2] == 1


async def test_the_metrics_show_webhooks(start_app):
    app = start_app(backend="memory", webhook_url="http://127.0.0.1:9/in", webhook_secret=SECRET)
    for outcome in ("succeeded", "retried", "failed"):
        assert await metric(app, "sse_gateway_webhook_deliveries_total", f'outcome="{outcome}"') == 0
    assert await metric(app, "sse_gateway_webhook_outbox_pending") == 0


# -- a real gateway, a real receiver, a restart --------------------------------------------------


class Receiver:
    """A webhook receiver on a real port (HTTP/1.1, one request per connection).

    It answers its first ``failures`` requests with 500; later ones wait for ``accept`` and get 200, so a
    test decides which gateway process may deliver."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.accept = asyncio.Event()

    async def __aenter__(self) -> Receiver:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hooks"
        return self

    async def __aexit__(self, *exc) -> None:
        self.accept.set()
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {name.strip().lower(): value.strip() for name, _, value in
                       (line.partition(":") for line in head[1:] if line)}
            self.requests.append((headers, await reader.readexactly(int(headers.get("content-length", 0)))))
            if len(self.requests) > self.failures:
                await self.accept.wait()
                status = b"200 OK"
            else:
                status = b"500 Internal Server Error"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # a gateway that stopped mid-attempt
        finally:
            writer.close()


async def test_a_webhook_outlives_a_restart_and_a_watched_run_calls_none(start_gateway, tmp_path: Path):
    async with Receiver(failures=2) as receiver:
        gw = start_gateway("--webhook-url", receiver.url, "--webhook-secret", SECRET, "--webhook-backoff", "0.05",
                           "--webhook-timeout", "5")
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            (await c.post("/v1/sessions", json={"id": "watched"})).raise_for_status()
            reader = asyncio.create_task(read_stream(gw.url, "watched"))
            await await_until(lambda: metric(gw.url, "sse_gateway_open_streams"), what="a stream of 'watched'")
            (await c.post("/v1/sessions/watched/complete", json={"result": {"seen": True}})).raise_for_status()
            assert (await reader).ended
            (await c.post("/v1/sessions", json={"id": "run1"})).raise_for_status()
            epoch = (await c.post("/v1/sessions/run1/complete", json={"result": {"text": "done"}})).json()["epoch"]
        await await_until(lambda: receiver.requests, what="the receiver to see the first attempt")
        gw.kill(signal.SIGTERM)  # drains, stops; the delivery stays in the outbox
        assert gw.proc.returncode == 0 and (tmp_path / "gateway.webhooks.db").exists()
        gw.start()
        receiver.accept.set()

        async def delivered() -> bool:
            return (await metric(gw.url, "sse_gateway_webhook_deliveries_total", 'outcome="succeeded"') == 1
                    and await metric(gw.url, "sse_gateway_webhook_outbox_pending") == 0)

        await await_until(delivered, what="the restarted gateway to deliver the webhook")
    assert len(receiver.requests) >= 3  # two refusals, then the one accepted
    assert len({headers["webhook-id"] for headers, _ in receiver.requests}) == 1
    for headers, body in receiver.requests:
        doc = verify(SECRET, headers, body)
        assert doc == {"type": "run.ended", "session": "run1", "event_id": 1, "cursor": f"1:{epoch}",
                       "data": {"text": "done"}, "ts": doc["ts"]}  # nothing ever came for 'watched'

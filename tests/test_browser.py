"""Chromium end to end: what a real browser does with the gateway's streams.

* native ``EventSource`` through a proxy that keeps dropping every connection;
* the client helper (``static/sse-gateway.js``): a page reloaded mid-answer
  and after the end rebuilds its whole view (replayed, or restored from
  storage), gets the result (also after a ``204``) and acknowledges the end;
  failures are reported with a code (401, 404, a stopped gateway, a refused
  origin); an expired subscribe token is refreshed;
* the demo page, with a screenshot in ``test-artifacts/demo.png``: its Stop
  button ends a run as cancelled, and another tab sees the cancel once;
* Stop pressed as the network is cut, through the shipped nginx config: the
  page retries the cancel with its idempotency key, the agent gets it once,
  and both tabs show the run cancelled (``test-artifacts/demo-stop-cut.png``).

Pages are served from the gateway's origin (or the proxy's), so every
stream is same-origin and reconnects go where the page came from. The
async Playwright API is used: the sync one runs on greenlets, which upset
CPython 3.11's recursion bookkeeping for code parsed later in the run.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from urllib.parse import parse_qs, quote, urlparse

import httpx
import jwt
import pytest
import pytest_asyncio

from conftest import ROOT, require_binary
from util import WAIT_TIMEOUT, ChaosProxy, await_until

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-features=LocalNetworkAccessChecks"]  # a page of another origin may reach 127.0.0.1
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.system]  # chromium, real gateways


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium():
    path = require_binary("chromium", "/usr/bin/chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(chromium):
    context = await chromium.new_context(viewport={"width": 1280, "height": 900})
    tab = await context.new_page()
    errors: list = []
    tab.on("pageerror", lambda exc: errors.append(exc))  # Playwright cannot wrap a builtin method
    yield tab
    await context.close()
    assert not errors, f"the page threw: {errors}"


def publish_paced(base_url: str, session: str, total: int, batch: int, pause: float) -> threading.Thread:
    """Publish ``total`` events ``{"n": i}`` in batches from a thread; returns the started thread."""

    def run() -> None:
        with httpx.Client(base_url=base_url, timeout=10) as client:
            for first in range(1, total + 1, batch):
                items = [{"data": {"n": n}} for n in range(first, min(first + batch, total + 1))]
                client.post(f"/v1/sessions/{session}/events", json=items).raise_for_status()
                time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


NATIVE_PAGE = """<!doctype html><meta charset="utf-8"><title>native EventSource</title>
<script>
  window.ids = []; window.data = []; window.opens = 0; window.ended = false;
  const source = new EventSource("/v1/sessions/SESSION/stream");
  source.onopen = () => { window.opens++; };
  source.onmessage = (e) => { window.ids.push(parseInt(e.lastEventId, 10)); window.data.push(JSON.parse(e.data).n); };
  source.addEventListener("gateway.end", (e) => {
    window.ids.push(parseInt(e.lastEventId, 10));
    window.ended = true;
    source.close();
  });
</script>"""


@pytest.mark.timeout(90)
async def test_native_eventsource_resumes_exactly_through_dropped_connections(start_gateway, page):
    total = 1200
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "50")
    api = httpx.AsyncClient(base_url=gw.url)
    (await api.post("/v1/sessions", json={"id": "native"})).raise_for_status()
    with ChaosProxy(gw.port) as proxy:
        await page.goto(f"http://127.0.0.1:{proxy.port}/healthz")  # the page's origin is the proxy
        await page.set_content(NATIVE_PAGE.replace("SESSION", "native"))
        await page.wait_for_function("window.opens === 1", timeout=10_000)

        publisher = publish_paced(gw.url, "native", total, batch=20, pause=0.05)
        cuts = []  # connections open at each drop
        while publisher.is_alive() or len(cuts) < 6:
            seen = await page.evaluate("window.ids.length")
            if seen < total:
                await page.wait_for_function(f"window.ids.length > {seen}", timeout=10_000)
            cuts.append(await asyncio.to_thread(proxy.drop_all))
            await page.wait_for_function(f"window.opens > {len(cuts)}", timeout=10_000)
        await asyncio.to_thread(publisher.join)
        (await api.post("/v1/sessions/native/complete", json={"result": "done"})).raise_for_status()
        await page.wait_for_function("window.ended", timeout=20_000)

        ids = await page.evaluate("window.ids")
        data = await page.evaluate("window.data")
        opens = await page.evaluate("window.opens")
    await api.aclose()
    drops_mid_stream = sum(1 for n in cuts if n > 0)
    print(f"native: {len(ids)} events, {len(cuts)} drops ({drops_mid_stream} with a stream open), "
          f"{opens - 1} reconnects, {proxy.connections} proxied connections")
    assert drops_mid_stream >= 5
    assert opens - 1 >= len(cuts)
    assert ids == list(range(1, total + 2)), "ids are not exactly 1..N+1 in order"
    assert data == list(range(1, total + 1))


TOKEN_PAGE = """<!doctype html><meta charset="utf-8"><title>helper with expiring tokens</title>
<script src="/static/sse-gateway.js"></script>
<script>
  const q = new URLSearchParams(location.search);
  window.ids = []; window.tokenRequests = 0; window.ended = false;
  window.stream = SSEGateway.connect(`/v1/sessions/${q.get("session")}/stream?token=${q.get("token")}`, {
    retryMs: 100,
    async getToken() {
      window.tokenRequests++;
      return (await (await fetch("/fresh-token")).json()).token;
    },
    onEvent: (e) => window.ids.push(e.id),
    onEnd: (e) => { window.ids.push(e.id); window.ended = true; },
  });
</script>"""


@pytest.mark.timeout(120)
async def test_helper_gets_a_new_token_when_the_old_one_expired(start_gateway, page):
    secret, key = "a-token-secret-of-at-least-32-bytes", "pk-" + "k" * 20
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "50", "--publish-key", key, "--token-secret", secret,
                       "--token-ttl", "4")
    api = httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {key}"})
    token = (await api.post("/v1/sessions", json={"id": "tok"})).json()["subscribe_token"]
    refused: list[str] = []
    page.on("response", lambda resp: refused.append(resp.url) if resp.status == 401 else None)

    async def serve(route) -> None:
        if "/fresh-token" in route.request.url:
            fresh = jwt.encode({"sub": "tok", "exp": int(time.time()) + 600, "scope": "subscribe"}, secret,
                               algorithm="HS256")
            await route.fulfill(json={"token": fresh})
        else:
            await route.fulfill(body=TOKEN_PAGE, content_type="text/html")

    with ChaosProxy(gw.port) as proxy:
        origin = f"http://127.0.0.1:{proxy.port}"
        await page.route(f"{origin}/token-test*", serve)
        await page.route(f"{origin}/fresh-token", serve)
        await page.goto(f"{origin}/token-test?session=tok&token={token}")
        (await api.post("/v1/sessions/tok/events", json=[{"data": n} for n in range(50)])).raise_for_status()
        await page.wait_for_function("window.ids && window.ids.length === 50", timeout=20_000)
        exp = jwt.decode(token, secret, algorithms=["HS256"])["exp"]
        await await_until(lambda: time.time() > exp + 0.01, interval=0.1,
                          what="the token in the stream's URL to expire")
        await asyncio.to_thread(proxy.drop_all)  # the browser reconnects with it and gets 401
        (await api.post("/v1/sessions/tok/events", json=[{"data": n} for n in range(50)])).raise_for_status()
        (await api.post("/v1/sessions/tok/complete")).raise_for_status()
        await api.aclose()
        await page.wait_for_function("window.ended", timeout=40_000)
        ids = await page.evaluate("window.ids")
        token_requests = await page.evaluate("window.tokenRequests")
    print(f"token: {len(refused)} refused request(s), {token_requests} new token(s), {len(ids)} events")
    assert ids == list(range(1, 102))
    assert token_requests == 1
    assert 1 <= len(refused) <= 2, f"the helper looped on 401: {refused}"
    async with httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}) as api:
        async def acked() -> bool:  # the page acked with its own token
            return (await api.get("/v1/sessions/tok")).json()["acked_id"] == 101

        await await_until(acked, what="the end to be acknowledged with the stream's token")


VIEW_PAGE = """<!doctype html><meta charset="utf-8"><title>a page that rebuilds its view</title>
<pre id="out"></pre><p id="result"></p>
<script type="module">
  import { connect } from "/static/sse-gateway.mjs";
  const q = new URLSearchParams(location.search);
  const out = document.getElementById("out");
  sessionStorage.setItem("loads", String(Number(sessionStorage.getItem("loads") || 0) + 1));
  window.ids = []; window.ends = []; window.errors = []; window.states = [];
  const common = {
    events: ["token"],
    retryMs: 50,
    maxAttempts: Number(q.get("attempts") || 1000),
    giveUpMs: Number(q.get("giveup") || 60000),
    onEnd: (end) => {
      window.ends.push(end && { result: end.result, json: end.json, id: end.id, fromSession: !!end.fromSession });
      document.getElementById("result").textContent = JSON.stringify(end && end.json);
    },
    onError: (err) => window.errors.push(err),
    onState: (state) => window.states.push(state),
  };
  const url = q.get("url");
  if (q.get("model") === "persist") {
    window.stream = connect(url, { ...common, persist: true, initial: { text: "", ids: [] },
      reduce: (view, e) => ({ text: view.text + e.json.t, ids: [...view.ids, e.id] }),
      onView: (view) => { out.textContent = view.text; window.ids = view.ids; } });
  } else {
    window.stream = connect(url, { ...common,
      onEvent: (e) => { out.textContent += e.json.t; window.ids.push(e.id); } });
  }
</script>"""


def token_text(n: int) -> str:
    return f"w{n} "


def publish_tokens(base_url: str, session: str, total: int, batch: int, pause: float,
                   headers: dict | None = None) -> threading.Thread:
    """Publish ``total`` token events ``{"t": "wN "}`` in batches from a thread."""

    def run() -> None:
        with httpx.Client(base_url=base_url, timeout=10, headers=headers or {}) as client:
            for first in range(1, total + 1, batch):
                items = [{"event": "token", "data": {"t": token_text(n)}}
                         for n in range(first, min(first + batch, total + 1))]
                client.post(f"/v1/sessions/{session}/events", json=items).raise_for_status()
                time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def serve_view_page(page, base: str) -> None:
    async def fulfill(route) -> None:
        await route.fulfill(body=VIEW_PAGE, content_type="text/html")

    await page.route(f"{base}/view-test**", fulfill)


async def page_view(page) -> dict:
    return await page.evaluate("""({ text: document.getElementById('out').textContent, ids: window.ids,
        ends: window.ends, errors: window.errors, loads: sessionStorage.getItem('loads') })""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["replay", "persist"])
async def test_a_page_reloaded_mid_answer_and_after_the_end_shows_the_whole_text_once(start_gateway, page, model):
    total = 400
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "100")
    api = httpx.AsyncClient(base_url=gw.url)
    (await api.post("/v1/sessions", json={"id": "answer"})).raise_for_status()
    await serve_view_page(page, gw.url)
    streams: list[str] = []
    page.on("request", lambda req: streams.append(req.url) if urlparse(req.url).path.endswith("/stream") else None)
    address = f"{gw.url}/view-test?model={model}&url=/v1/sessions/answer/stream"
    await page.goto(address)

    publisher = publish_tokens(gw.url, "answer", total, batch=5, pause=0.03)
    await page.wait_for_function("window.ids && window.ids.length >= 100", timeout=20_000)
    assert publisher.is_alive(), "the reload must happen while the answer is still being written"
    await page.reload()
    await page.wait_for_function("sessionStorage.getItem('loads') === '2'", timeout=10_000)
    await asyncio.to_thread(publisher.join)
    expected = "".join(token_text(n) for n in range(1, total + 1))
    (await api.post("/v1/sessions/answer/complete", json={"result": {"text": expected}})).raise_for_status()
    await page.wait_for_function("window.ends && window.ends.length === 1", timeout=30_000)

    view = await page_view(page)
    assert view["text"] == expected, "the page does not show the whole text exactly once after a reload"
    assert view["ids"] == list(range(1, total + 1))
    assert view["ends"] == [{"result": {"text": expected}, "json": {"text": expected}, "id": total + 1,
                             "fromSession": False}]
    assert view["errors"] == []
    if model == "persist":  # the second page resumed after its stored cursor instead of reading it all again
        resumed = parse_qs(urlparse(streams[-1]).query)["last_event_id"][0]
        assert 100 <= int(resumed.partition(":")[0]) < total
    else:
        assert "last_event_id" not in parse_qs(urlparse(streams[-1]).query)

    # Reloaded once the run has ended: the whole text again, and the result (never null).
    before = len(streams)
    await page.reload()
    await page.wait_for_function("sessionStorage.getItem('loads') === '3'", timeout=10_000)
    await page.wait_for_function("window.ends && window.ends.length === 1", timeout=30_000)
    view = await page_view(page)
    assert view["text"] == expected
    assert view["ids"] == list(range(1, total + 1))
    assert view["ends"][0]["result"] == {"text": expected}
    assert await page.locator("#result").inner_text() == f'{{"text":"{expected}"}}'
    if model == "persist":
        assert len(streams) == before, "an ended run restored from storage needs no stream"

    session = (await api.get("/v1/sessions/answer")).json()
    await api.aclose()
    assert session["acked_id"] == session["last_id"] == total + 1, "the end of the run was not acknowledged"


MESSAGE_PAGE = """<!doctype html><meta charset="utf-8"><title>a page that shows messages</title>
<div id="messages"></div><p id="result"></p>
<script src="/static/sse-gateway.js"></script>
<script>
  const q = new URLSearchParams(location.search);
  sessionStorage.setItem("loads", String(Number(sessionStorage.getItem("loads") || 0) + 1));
  window.shown = []; // [id, text, status] at each onMessage of this page life
  window.ends = [];
  window.stream = SSEGateway.connect(q.get("url"), {
    retryMs: 50,
    persist: q.get("model") === "persist", // the messages and the cursor, stored together
    onMessage: (m) => {
      window.shown.push([m.id, m.text, m.status]);
      let el = document.getElementById("m-" + m.id);
      if (!el) {
        el = document.createElement("pre");
        el.id = "m-" + m.id;
        document.getElementById("messages").append(el);
      }
      el.textContent = m.text;
      el.dataset.status = m.status;
    },
    onEnd: (end) => {
      window.ends.push(end.result);
      document.getElementById("result").textContent = JSON.stringify(end.result);
    },
  });
</script>"""


def delta(n: int) -> str:
    """The n-th delta of the long answer: a word, now and then an accent, an emoji or a line break."""
    return f" mot{n}" + ("é" if n % 5 == 0 else "") + ("🙂" if n % 37 == 0 else "") + ("\n" if n % 60 == 0 else "")


def upto(n: int) -> str:
    """The answer's text after its first ``n`` deltas."""
    return "".join(delta(i) for i in range(1, n + 1))


def message_items(first: int, last: int) -> list[dict]:
    """Deltas ``first..last`` of the answer, with a plain event every 25 (a replay holds the answer back
    across them, so their cursors are ID/HOLD:EPOCH)."""
    items = []
    for n in range(first, last + 1):
        items.append({"event": "message.append", "data": {"message": "answer", "text": delta(n)}})
        if n % 25 == 0:
            items.append({"event": "progress", "data": {"n": n}})
    return items


def publish_deltas(base_url: str, session: str, first: int, last: int, batch: int, pause: float,
                   gate: threading.Event | None = None, at: int = 0) -> threading.Thread:
    """Publish deltas ``first..last`` in batches from a thread; before delta ``at``, wait for ``gate``."""

    def run() -> None:
        with httpx.Client(base_url=base_url, timeout=10) as client:
            for start in range(first, last + 1, batch):
                if gate is not None and start <= at < start + batch:
                    assert gate.wait(WAIT_TIMEOUT), "the test never opened the gate"
                client.post(f"/v1/sessions/{session}/events",
                            json=message_items(start, min(start + batch - 1, last))).raise_for_status()
                time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def shown_answer(page) -> dict:
    return await page.evaluate("""(() => {
        const el = document.getElementById('m-answer');
        const mine = window.shown.filter((s) => s[0] === 'answer').map((s) => s[1]);
        return { text: el ? el.textContent : null, status: el ? el.dataset.status : null, texts: mine,
                 loads: sessionStorage.getItem('loads'), duplicates: window.stream.duplicates };
    })()""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["replay", "persist"])
async def test_a_page_reloaded_mid_message_shows_it_whole_then_continues_it(start_gateway, page, model):
    """A long answer published as one message (token deltas), plain events between them and a short
    message beside it. The page is reloaded twice while the answer is open: once with the publisher
    stopped, once as it publishes. Each time the page shows the answer whole at once (a replay's
    message.snapshot, or the messages restored from storage), then continues it: every text the page
    ever shows is a prefix of what was published, and the last is all of it, exactly."""
    total, first_half, gate_at = 600, 250, 450
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "100")
    api = httpx.AsyncClient(base_url=gw.url)
    (await api.post("/v1/sessions", json={"id": "long"})).raise_for_status()

    async def fulfill(route) -> None:
        await route.fulfill(body=MESSAGE_PAGE, content_type="text/html")

    await page.route(f"{gw.url}/message-test**", fulfill)
    streams: list[str] = []
    page.on("request", lambda req: streams.append(req.url) if urlparse(req.url).path.endswith("/stream") else None)
    await page.goto(f"{gw.url}/message-test?model={model}&url=/v1/sessions/long/stream")
    await page.wait_for_function("window.stream && window.stream.state === 'open'", timeout=20_000)

    expected = "".join(delta(n) for n in range(1, total + 1)) + " Fin."
    start = {"event": "message.start", "data": {"message": "answer", "type": "answer", "metadata": {"lang": "fr"}}}
    first = [start, {"event": "progress", "data": {"n": 0}}]
    (await api.post("/v1/sessions/long/events", json=first)).raise_for_status()
    publisher = publish_deltas(gw.url, "long", 1, 100, batch=10, pause=0.01)
    await asyncio.to_thread(publisher.join)
    (await api.post("/v1/sessions/long/events", json=[  # a short message that begins and ends inside the answer
        {"event": "message.start", "data": {"message": "tool", "type": "tool"}},
        {"event": "message.append", "data": {"message": "tool", "text": "searching…"}},
        {"event": "message.replace", "data": {"message": "tool", "text": "3 pages found"}},
    ])).raise_for_status()
    publisher = publish_deltas(gw.url, "long", 101, first_half, batch=10, pause=0.01)
    await asyncio.to_thread(publisher.join)
    await page.wait_for_function(f"(document.getElementById('m-answer') || {{}}).textContent === {upto(first_half)!r}",
                                 timeout=20_000)

    # Reload 1, the publisher stopped: the answer as published so far, whole, at once.
    await page.reload()
    await page.wait_for_function("sessionStorage.getItem('loads') === '2' && window.shown.length > 0",
                                 timeout=10_000)
    shown = await shown_answer(page)
    assert shown["texts"][0] == upto(first_half), "the reloaded page did not show the answer whole at once"
    assert shown["status"] == "open"

    # Reload 2, as the publisher goes on (held at a gate further on, so the answer stays open).
    gate = threading.Event()
    publisher = publish_deltas(gw.url, "long", first_half + 1, total, batch=10, pause=0.01, gate=gate, at=gate_at)
    before = len(upto(first_half + 50))
    await page.wait_for_function(f"document.getElementById('m-answer').textContent.length >= {before}",
                                 timeout=20_000)
    lives = [await shown_answer(page)]
    await page.reload()
    await page.wait_for_function("sessionStorage.getItem('loads') === '3' && window.shown.length > 0",
                                 timeout=10_000)
    first_shown = (await shown_answer(page))["texts"][0]
    assert len(first_shown) >= len(lives[0]["text"]), "the reloaded page showed less than it had"
    assert expected.startswith(first_shown)
    gate.set()
    await asyncio.to_thread(publisher.join)
    (await api.post("/v1/sessions/long/events", json=[
        {"event": "message.append", "data": {"message": "answer", "text": " Fin."}},
        {"event": "message.end", "data": {"message": "answer"}},
    ])).raise_for_status()
    (await api.post("/v1/sessions/long/complete", json={"result": "done"})).raise_for_status()
    await page.wait_for_function("window.ends.length === 1", timeout=30_000)
    lives.append(await shown_answer(page))
    messages = await page.evaluate("window.stream.messages")
    await api.aclose()

    for life in lives:  # no text ever shown twice or skipped: each step is a prefix of the whole
        assert all(expected.startswith(t) for t in life["texts"]), "a text shown was not a prefix of the answer"
        assert [len(t) for t in life["texts"]] == sorted(len(t) for t in life["texts"])
        assert life["duplicates"] == 0
    assert lives[-1]["text"] == expected and lives[-1]["status"] == "finished"
    assert await page.locator("#m-answer").text_content() == expected
    # in the order they began, though a reload got the (closed) tool message before the (open) answer
    starts = [m.pop("start") for m in messages]
    assert starts == sorted(starts) and [m["id"] for m in messages] == ["answer", "tool"], starts
    assert {m["id"]: m for m in messages} == {
        "answer": {"id": "answer", "type": "answer", "metadata": {"lang": "fr"}, "text": expected,
                   "status": "finished", "error": None},
        "tool": {"id": "tool", "type": "tool", "metadata": None, "text": "3 pages found", "status": "finished",
                 "error": None}}
    resumed = [parse_qs(urlparse(u).query).get("last_event_id", [None])[0] for u in streams]
    if model == "persist":  # the reloads resumed after the stored cursor; the page never read it all again
        assert resumed[0] is None and all(resumed[1:]), resumed
    else:  # each load read the session from its start, and got the answer whole
        assert resumed == [None] * len(resumed), resumed


def minimal_page() -> str:
    """The minimal page of docs/javascript.md, as written there."""
    doc = (ROOT / "docs" / "javascript.md").read_text()
    start = doc.index("```html\n", doc.index("## A minimal page")) + len("```html\n")
    return doc[start:doc.index("\n```", start)]


@pytest.mark.timeout(90)
async def test_the_documented_minimal_page_survives_reloads(start_gateway, page):
    total = 300
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "100")
    api = httpx.AsyncClient(base_url=gw.url)
    (await api.post("/v1/sessions", json={"id": "docs"})).raise_for_status()

    async def fulfill(route) -> None:
        await route.fulfill(body=minimal_page(), content_type="text/html")

    await page.route(f"{gw.url}/minimal-test**", fulfill)
    await page.goto(f"{gw.url}/minimal-test?run=docs")

    def run() -> None:
        with httpx.Client(base_url=gw.url, timeout=10) as client:
            for first in range(1, total + 1, 5):
                items = [{"event": "token", "data": {"text": token_text(n)}} for n in range(first, first + 5)]
                client.post("/v1/sessions/docs/events", json=items).raise_for_status()
                time.sleep(0.03)

    publisher = threading.Thread(target=run, daemon=True)
    publisher.start()
    await page.wait_for_function("(document.getElementById('answer') || {}).textContent?.length > 300",
                                 timeout=20_000)
    assert publisher.is_alive(), "the reload must happen while the answer is still being written"
    await page.reload()
    await asyncio.to_thread(publisher.join)
    expected = "".join(token_text(n) for n in range(1, total + 1))
    (await api.post("/v1/sessions/docs/complete", json={"result": "ok"})).raise_for_status()
    await api.aclose()
    for _ in range(2):  # mid-answer, then once more after the end
        await page.wait_for_function("(document.getElementById('note') || {}).textContent?.startsWith('done')",
                                     timeout=30_000)
        assert await page.locator("#answer").text_content() == expected
        assert await page.locator("#note").inner_text() == 'done: "ok"'
        await page.reload()


@pytest.mark.timeout(60)
async def test_a_cursor_already_at_the_end_gets_the_result_from_the_session(start_gateway, page):
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "100")
    api = httpx.AsyncClient(base_url=gw.url)
    epoch = (await api.post("/v1/sessions", json={"id": "done"})).json()["epoch"]
    (await api.post("/v1/sessions/done/events", json={"event": "token", "data": {"t": "hi"}})).raise_for_status()
    (await api.post("/v1/sessions/done/complete", json={"result": {"answer": 42}})).raise_for_status()
    await serve_view_page(page, gw.url)
    answers: list[int] = []
    page.on("response", lambda resp: answers.append(resp.status) if urlparse(resp.url).path.endswith("/stream")
            else None)
    await page.goto(f"{gw.url}/view-test?url=/v1/sessions/done/stream%3Flast_event_id%3D2:{epoch}")
    await page.wait_for_function("window.ends && window.ends.length === 1", timeout=20_000)
    view = await page_view(page)
    assert view["ends"] == [{"result": {"answer": 42}, "json": {"answer": 42}, "id": 2, "fromSession": True}]
    assert view["errors"] == [] and view["ids"] == []
    assert 204 in answers
    assert await page.evaluate("window.stream.state") == "ended"
    await await_until(lambda: api.get("/v1/sessions/done"), what="the session")
    session = (await api.get("/v1/sessions/done")).json()
    await api.aclose()
    assert session["acked_id"] == 2


@pytest.mark.timeout(60)
async def test_the_end_of_a_run_is_acknowledged(start_gateway, page):
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "100")
    api = httpx.AsyncClient(base_url=gw.url)
    (await api.post("/v1/sessions", json={"id": "acked"})).raise_for_status()
    await serve_view_page(page, gw.url)
    await page.goto(f"{gw.url}/view-test?url=/v1/sessions/acked/stream")
    await page.wait_for_function("window.stream && window.stream.state === 'open'", timeout=20_000)
    (await api.post("/v1/sessions/acked/events", json=[{"event": "token", "data": {"t": "a"}}] * 3)).raise_for_status()
    (await api.post("/v1/sessions/acked/complete", json={"result": "aaa"})).raise_for_status()
    await page.wait_for_function("window.ends && window.ends.length === 1", timeout=20_000)

    async def acked() -> bool:
        session = (await api.get("/v1/sessions/acked")).json()
        return session["acked_id"] == session["last_id"] == 4

    await await_until(acked, what="acked_id to reach last_id once gateway.end was received")
    # the page learns of the ack when the answer arrives, a moment after the gateway stored it
    await page.wait_for_function("window.stream.acked !== null", timeout=10_000)
    assert await page.evaluate("window.stream.acked") == await page.evaluate("window.stream.cursor")
    await api.aclose()


async def wait_for_error(page) -> dict:
    await page.wait_for_function("window.errors && window.errors.length > 0", timeout=30_000)
    errors = await page.evaluate("window.errors")
    assert len(errors) == 1, errors
    assert await page.evaluate("window.stream.state") == "failed"
    return errors[0]


@pytest.mark.timeout(60)
async def test_an_expired_token_without_refresh_is_reported_as_unauthorized(start_gateway, page):
    secret, key = "a-token-secret-of-at-least-32-bytes", "pk-" + "k" * 20
    gw = start_gateway("--heartbeat", "1", "--publish-key", key, "--token-secret", secret)
    api = httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {key}"})
    (await api.post("/v1/sessions", json={"id": "expired"})).raise_for_status()
    await api.aclose()
    stale = jwt.encode({"sub": "expired", "exp": int(time.time()) - 10, "scope": "subscribe"}, secret,
                       algorithm="HS256")
    await serve_view_page(page, gw.url)
    refused: list[str] = []
    page.on("response", lambda resp: refused.append(resp.url) if resp.status == 401 else None)
    await page.goto(f"{gw.url}/view-test?url=/v1/sessions/expired/stream%3Ftoken%3D{stale}")
    error = await wait_for_error(page)
    assert (error["code"], error["status"]) == ("unauthorized", 401)
    assert len(refused) <= 2, f"the helper looped on 401: {refused}"


@pytest.mark.timeout(60)
async def test_a_deleted_session_is_reported_as_not_found(start_gateway, page):
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "100")
    api = httpx.AsyncClient(base_url=gw.url)
    (await api.post("/v1/sessions", json={"id": "gone"})).raise_for_status()
    await serve_view_page(page, gw.url)
    await page.goto(f"{gw.url}/view-test?url=/v1/sessions/gone/stream")
    (await api.post("/v1/sessions/gone/events", json={"event": "token", "data": {"t": "x"}})).raise_for_status()
    await page.wait_for_function("window.ids && window.ids.length === 1", timeout=20_000)
    (await api.delete("/v1/sessions/gone")).raise_for_status()
    await api.aclose()
    error = await wait_for_error(page)
    assert (error["code"], error["status"]) == ("not_found", 404)


@pytest.mark.timeout(90)
async def test_a_stopped_gateway_is_reported_as_unreachable(start_gateway, page):
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "100")
    async with httpx.AsyncClient(base_url=gw.url) as api:
        (await api.post("/v1/sessions", json={"id": "away"})).raise_for_status()
        await serve_view_page(page, gw.url)
        await page.goto(f"{gw.url}/view-test?attempts=3&url=/v1/sessions/away/stream")
        (await api.post("/v1/sessions/away/events", json={"event": "token", "data": {"t": "x"}})).raise_for_status()
        await page.wait_for_function("window.ids && window.ids.length === 1", timeout=20_000)
    await asyncio.to_thread(gw.stop)
    error = await wait_for_error(page)
    assert (error["code"], error["status"]) == ("unreachable", 0)
    assert "reconnecting" in await page.evaluate("window.states")


async def serve_helper_from_disk(page, origin: str) -> None:
    async def helper(route) -> None:
        await route.fulfill(path=ROOT / "static" / urlparse(route.request.url).path.rpartition("/")[2],
                            content_type="text/javascript")

    await page.route(f"{origin}/static/*", helper)


@pytest.mark.timeout(60)
async def test_a_gateway_that_never_answers_is_reported_as_unreachable_after_give_up_ms(page):
    with socket.socket() as hole:  # accepts connections (the kernel does), never answers them
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        origin = f"http://127.0.0.1:{hole.getsockname()[1]}"
        await serve_view_page(page, origin)
        await serve_helper_from_disk(page, origin)
        await page.goto(f"{origin}/view-test?giveup=1500&url=/v1/sessions/hole/stream")
        error = await wait_for_error(page)
    assert (error["code"], error["status"]) == ("unreachable", 0)


@pytest.mark.timeout(60)
async def test_a_page_of_an_origin_the_gateway_does_not_allow_is_told_so(start_gateway, page):
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "100")
    async with httpx.AsyncClient(base_url=gw.url) as api:
        (await api.post("/v1/sessions", json={"id": "elsewhere"})).raise_for_status()
    other = "http://localhost:8765"  # never reached: the page and the helper come from routes
    await serve_view_page(page, other)
    await serve_helper_from_disk(page, other)
    await page.goto(f"{other}/view-test?url={gw.url}/v1/sessions/elsewhere/stream")
    error = await wait_for_error(page)
    assert (error["code"], error["status"]) == ("cors", 0)


async def demo_view(page) -> dict:
    """The demo's run as the helper persisted it: {"session", "cursor", "view", "end"}."""
    return await page.evaluate("""(() => {
        const run = JSON.parse(sessionStorage.getItem('sse-gateway-demo:run') || 'null');
        if (!run) return {};
        const key = 'sse-gateway:view:/v1/sessions/' + run.session + '/stream';
        return { session: run.session, ...JSON.parse(sessionStorage.getItem(key) || '{}') };
    })()""")


@pytest.mark.timeout(90)
async def test_demo_page_runs_drops_reloads_resumes_and_ends(start_gateway, page):
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "200")
    await page.goto(f"{gw.url}/?duration=8")
    assert await page.locator("h1").inner_text() == "Agent runs that outlive the connection."
    await page.click("text=Start a simulated agent run")
    await page.wait_for_function("Number(document.getElementById('events').textContent) > 40", timeout=15_000)
    assert (await page.locator("#text").inner_text()).startswith("You asked")
    await page.click("text=Drop connection")
    await page.wait_for_function("document.getElementById('reconnects').textContent === '1'", timeout=10_000)
    await page.wait_for_function("Number(document.getElementById('events').textContent) > 120", timeout=15_000)
    stored = await demo_view(page)
    assert stored["view"]["events"] > 0 and stored["end"] is None, "reload the page before the run ends"
    await page.reload()
    await page.wait_for_function("document.getElementById('timeline').textContent.includes('page reloaded')",
                                 timeout=10_000)
    await page.wait_for_function("document.getElementById('state').textContent === 'ended'", timeout=30_000)

    run = await demo_view(page)
    async with httpx.AsyncClient(base_url=gw.url) as api:
        session = (await api.get(f"/v1/sessions/{run['session']}")).json()
        metrics = (await api.get("/metrics")).text
    assert session["status"] == "completed"
    view = run["view"]
    assert (await page.locator("#text").inner_text()).strip() == session["result"]["text"].strip()
    assert run["messages"] == [{"id": "answer", "type": "answer", "metadata": None, "text": session["result"]["text"],
                                "status": "finished", "error": None, "start": 2}]
    assert 0 < view["events"] <= session["last_id"] - 1  # every event but gateway.end, once (the answer maybe whole)
    assert await page.locator("#cursor").inner_text() == f"{session['last_id']}:{session['epoch']}"
    assert await page.locator("#message").inner_text() == f"finished, {len(session['result']['text']):,} characters"
    verdict = await page.locator("#verdict").inner_text()
    assert verdict.startswith("Complete.") and "none repeated" in verdict and "matches the final result" in verdict
    timeline = await page.locator("#timeline").inner_text()
    assert "page reloaded" in timeline and "gateway.end" in timeline
    heartbeats = next(line for line in metrics.splitlines() if line.startswith("sse_gateway_heartbeats_total"))
    assert float(heartbeats.split()[1]) >= 1, "the run's quiet tool call sent no heartbeat"
    await await_until(lambda: httpx.get(f"{gw.url}/v1/sessions/{run['session']}").json()["acked_id"]
                      == session["last_id"], what="the demo page to acknowledge the end")

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    print(f"demo: {view['events']} events; screenshot in {ARTIFACTS / 'demo.png'}")

    await page.reload()  # after the end: the text and the verdict come back from storage
    await page.wait_for_function("document.getElementById('verdict').textContent.startsWith('Complete.')",
                                 timeout=10_000)
    assert (await page.locator("#text").inner_text()).strip() == session["result"]["text"].strip()


WATCH_PAGE = """<!doctype html><meta charset="utf-8"><title>another tab</title>
<script src="/static/sse-gateway.js"></script>
<script>
  window.inputs = []; window.ended = null;
  SSEGateway.connect(new URLSearchParams(location.search).get("stream"), {
    events: ["token"],
    onInput: (input) => window.inputs.push([input.inputId, input.kind, input.event.id]),
    onEnd: (end) => { window.ended = { data: end.result, outcome: end.outcome }; },
  });
</script>"""


@pytest.mark.timeout(90)
async def test_the_demo_pages_stop_button_stops_the_run_and_another_tab_sees_the_cancel_once(
        start_gateway, page, chromium):
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "200", "--token-secret", "demo-secret-" + "s" * 32)
    await page.goto(f"{gw.url}/?duration=60")
    assert await page.locator("#stop").is_disabled()
    await page.click("text=Start a simulated agent run")
    await page.wait_for_function("Number(document.getElementById('events').textContent) > 20", timeout=15_000)
    run = await demo_view(page)
    stream_url = await page.evaluate("JSON.parse(sessionStorage.getItem('sse-gateway-demo:run')).streamUrl")
    assert "?token=" in stream_url, "a gateway with a token secret gives the page a token (with the input scope)"

    other = await (await chromium.new_context()).new_page()  # another browser, on the same run

    async def fulfill(route) -> None:
        await route.fulfill(body=WATCH_PAGE, content_type="text/html")

    await other.route(f"{gw.url}/watch-test**", fulfill)
    await other.goto(f"{gw.url}/watch-test?stream={quote(stream_url)}")
    await other.wait_for_function("window.inputs !== undefined", timeout=10_000)
    await page.click("#stop")
    await page.wait_for_function("document.getElementById('status').textContent === 'cancelled'", timeout=30_000)
    verdict = await page.locator("#verdict").inner_text()
    assert verdict.startswith("Cancelled after"), verdict
    assert "none repeated" in verdict and "matches the partial result" in verdict
    assert await page.locator("#stop").is_disabled()
    assert await page.locator("#outcome-label").inner_text() == "Cancelled"
    assert "the user pressed Stop" in await page.locator("#outcome-detail").inner_text()
    timeline = await page.locator("#timeline").inner_text()
    assert "gateway.input #1: cancel" in timeline and "gateway.end: the run ended cancelled;" in timeline

    await other.wait_for_function("window.ended !== null", timeout=30_000)
    inputs = await other.evaluate("window.inputs")
    ended = await other.evaluate("window.ended")
    await other.context.close()
    session = httpx.get(f"{gw.url}/v1/sessions/{run['session']}").json()
    assert [kind for _, kind, _ in inputs] == ["cancel"] and inputs[0][0] == 1, "the other tab saw it once"
    error = {"code": "cancelled", "message": "the user pressed Stop"}
    assert (session["run_status"], session["error"]) == ("cancelled", error)
    assert ended["outcome"] == {"status": "cancelled", "error": error, "result": session["result"]}
    assert ended["data"] == {"status": "cancelled", "error": error, "result": session["result"]}
    assert session["result"]["tokens"] < 300, "the run stopped typing"
    assert (await page.locator("#text").inner_text()).strip() == session["result"]["text"].strip()


@pytest.mark.timeout(90)
async def test_the_demo_pages_approval_prompt_approves_the_tool_call(start_gateway, page):
    gw = start_gateway("--heartbeat", "20", "--retry-ms", "200")  # the run waits 21 s for the answer
    await page.goto(f"{gw.url}/?duration=4")
    await page.click("text=Start a simulated agent run")
    await page.wait_for_selector("#approval:not([hidden])", timeout=30_000)
    assert "search_docs" in await page.locator("#approval").inner_text()
    assert await page.locator("#status").inner_text() == "waiting for approval"
    await page.click("#approve")
    await page.wait_for_selector("#approval", state="hidden", timeout=15_000)
    await page.wait_for_function("document.getElementById('status').textContent === 'completed'", timeout=30_000)
    run = await demo_view(page)
    session = httpx.get(f"{gw.url}/v1/sessions/{run['session']}").json()
    assert session["result"]["tool"] == "approve" and session["run_status"] == "completed"
    assert await page.locator("#outcome-label").inner_text() == "Completed"
    assert session["input_last_id"] == session["input_acked_id"] == 1
    timeline = await page.locator("#timeline").inner_text()
    assert "you sent approve for search_docs" in timeline and "gateway.input #1: approve" in timeline
    verdict = await page.locator("#verdict").inner_text()
    assert verdict.startswith("Complete.") and "none repeated" in verdict
    assert run["messages"][0]["text"] == session["result"]["text"]


async def shows(tab, condition: str, timeout: float = 30_000) -> None:
    """Wait until ``condition`` holds on a demo tab (``text(id)``: an element's text); polled, not on
    animation frames, which a tab in the background may not get."""
    await tab.wait_for_function(f"(() => {{ const text = (id) => document.getElementById(id).textContent; "
                                f"return {condition}; }})()", polling=100, timeout=timeout)


async def demo_tab_state(tab) -> dict:
    """What a demo tab shows and what its helper stored: status, outcome banner, timeline, view, end."""
    return await tab.evaluate("""(() => {
        const run = JSON.parse(sessionStorage.getItem('sse-gateway-demo:run') || 'null');
        const key = run && 'sse-gateway:view:/v1/sessions/' + run.session + '/stream';
        const record = key ? JSON.parse(sessionStorage.getItem(key) || '{}') : {};
        const end = record.end ? JSON.parse(record.end.data) : null;
        const text = (id) => document.getElementById(id).textContent;
        return { status: text('status'), label: text('outcome-label'), detail: text('outcome-detail'),
                 state: text('state'), reconnects: Number(text('reconnects')), timeline: text('timeline'),
                 verdict: text('verdict'), view: record.view, messages: record.messages, end,
                 outcome: end === null ? null : SSEGateway.outcomeOf(end) };
    })()""")


@pytest.mark.timeout(180)
async def test_stop_pressed_as_the_network_is_cut_cancels_the_run_once_through_nginx(start_gateway, nginx, chromium):
    """Chromium, through the shipped nginx config, on a real gateway (SQLite), with an agent in this process.

    Two tabs of one browser show the same run on the demo page (the second opened by the page's own
    "another tab" link). The user presses Stop. The cancel's POST goes through nginx and the gateway
    stores it (both tabs get its gateway.input mirror), but before the answer is back the network
    goes: the browser goes offline and nginx is stopped (fast shutdown: every connection through it
    is cut), so the page never gets the answer and both tabs' streams drop. The agent hears the
    cancel and, while the tabs are cut off, writes once more. Then nginx comes back on the same port
    and the browser goes online: the page retries the POST with the same idempotency key (the
    gateway answers 200 with the input it already has), both tabs resume after their cursors, and
    the agent ends the run as cancelled. Proved: the gateway holds one input and the agent read one
    cancel (input ids counted); the run ended cancelled (the session's run_status and the gateway.end
    data); both tabs show cancelled and saw the cancel's mirror once, and the answer the agent left
    open (a message, closed by the gateway at the end) whole and once across the cut. Conditions
    only: each step waits for what the previous one caused.
    """
    from sse_gateway.client import Publisher

    session, words, reason = "stop-cut", [f"w{n} " for n in range(1, 41)], "the user pressed Stop"
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "200", "--cancel-grace", "0",  # only the agent ends it
                       "--token-secret", "stop-cut-secret-" + "s" * 32)
    site = f"http://127.0.0.1:{nginx.start(gw.port)}"
    proxy_port = int(site.rpartition(":")[2])

    started = asyncio.Event()  # the agent's session exists
    cut = asyncio.Event()  # the network is down: the agent writes once more while the tabs cannot see it
    may_end = asyncio.Event()  # the page has its answer: the agent may end the run
    received: list[tuple[int, str]] = []  # every input the agent read: (input id, kind)

    async def agent(pub: Publisher) -> dict:
        async with pub.run(session, listen=True) as run:
            started.set()

            async def read() -> None:
                async for item in run.inputs():
                    received.append((item.id, item.kind))

            reader = asyncio.create_task(read())
            await run.publish("message.start", {"message": "answer", "type": "answer"})  # the demo page shows it
            for word in words:
                await pub.send(session, "message.append", {"message": "answer", "text": word})
            await run.flush()
            await run.cancelled.wait()
            await cut.wait()
            await run.publish("status", {"step": "stopping: keeping the draft"})
            await may_end.wait()
            last = (await run.publisher.get(session))["input_last_id"]
            await await_until(lambda: received and received[-1][0] >= last, what="the agent to read every input")
            reader.cancel()
            await run.ack_input(run.cancel_input.id)
            error = {"code": "cancelled", "message": run.cancel_input.reason}
            return await run.complete({"text": "".join(words)}, status="cancelled", error=error)

    async with Publisher(gw.url) as pub:
        agent_run = asyncio.create_task(agent(pub))
        context = await chromium.new_context(viewport={"width": 1280, "height": 900})
        api = httpx.AsyncClient(base_url=gw.url)
        try:
            await await_until(started.is_set, what="the agent's session")
            token = (await pub.mint_token(session, scopes=["subscribe", "input"])).token

            async def typed() -> bool:
                return (await api.get(f"/v1/sessions/{session}")).json()["last_id"] >= len(words) + 1

            await await_until(typed, what="the agent to type its words")

            errors: list = []
            tab = await context.new_page()
            tab.on("pageerror", lambda exc: errors.append(exc))
            await tab.goto(f"{site}/?session={session}&token={quote(token)}")
            answer = "".join(words)
            await shows(tab, f"text('text') === {answer!r}")  # the open answer, whole
            link = await tab.get_attribute("#watch", "href")
            assert link.startswith(f"{site}/?session={session}&token="), link
            second = await context.new_page()
            second.on("pageerror", lambda exc: errors.append(exc))
            await second.goto(link)
            await shows(second, f"text('text') === {answer!r}")
            for t in (tab, second):
                state = await demo_tab_state(t)
                assert (state["status"], state["label"], state["state"]) == ("running", "Running", "open"), state

            posts: list[str] = []  # the idempotency key of each POST of the cancel the page made
            answers: list[int] = []
            tab.on("request", lambda r: posts.append(r.post_data_json["idempotency_key"])
                   if r.method == "POST" and r.url.endswith("/input") else None)
            tab.on("response", lambda r: answers.append(r.status)
                   if r.request.method == "POST" and r.url.endswith("/input") else None)

            async def lose_the_answer(route) -> None:
                """Deliver the first POST through nginx, then cut the network before its answer is back."""
                delivered = await route.fetch()
                assert delivered.status == 201, await delivered.text()
                for t in (tab, second):  # the gateway stored it: its mirror reaches both tabs first
                    await shows(t, "text('timeline').includes('gateway.input #1: cancel')")
                await context.set_offline(True)
                await asyncio.to_thread(nginx.stop, proxy_port)
                await route.abort("internetdisconnected")
                cut.set()

            await tab.route("**/v1/sessions/*/input", lose_the_answer, times=1)
            await tab.click("#stop")
            await await_until(cut.is_set, what="the network to be cut after the cancel was delivered")

            # Cut off: both tabs lost their stream; the page has no answer yet and shows the run cancelling.
            for t in (tab, second):
                await shows(t, "text('state') === 'reconnecting' && text('status') === 'cancelling…'")
            assert "you sent a cancel" not in (await demo_tab_state(tab))["timeline"]
            ARTIFACTS.mkdir(exist_ok=True)
            await second.screenshot(path=str(ARTIFACTS / "demo-cancelling.png"))
            assert await tab.locator("#stop").is_disabled(), "Stop stays pressed while its cancel is retried"

            async def agent_wrote_while_cut() -> bool:
                return (await api.get(f"/v1/sessions/{session}")).json()["last_id"] == len(words) + 3

            await await_until(agent_wrote_while_cut, what="the agent to write while the tabs are cut off")

            # The network comes back: nginx on the same port, then the browser online.
            await asyncio.to_thread(nginx.start, gw.port, port=proxy_port)
            await context.set_offline(False)
            await shows(tab, "text('timeline').includes('you sent a cancel: input #1')")
            for t in (tab, second):  # resumed after the cut: what the agent wrote meanwhile arrived
                await shows(t, "text('state') === 'open' && text('step') === 'stopping: keeping the draft'")
            may_end.set()
            ended = await asyncio.wait_for(agent_run, WAIT_TIMEOUT)
            for t in (tab, second):
                await shows(t, "text('status') === 'cancelled'")
            tabs = [await demo_tab_state(t) for t in (tab, second)]
            await tab.screenshot(path=str(ARTIFACTS / "demo-stop-cut.png"), full_page=True)
            inputs = (await pub.read_inputs(session, after=0)).inputs
            row = (await api.get(f"/v1/sessions/{session}")).json()
            events = (await api.get(f"/v1/sessions/{session}/events", params={"limit": 1000})).json()["events"]
        finally:
            agent_run.cancel()
            await asyncio.gather(agent_run, return_exceptions=True)
            await api.aclose()
            await context.close()

    print(f"stop through a cut: {len(posts)} POSTs of the cancel (one key), answers {answers}; "
          f"reconnects {[t['reconnects'] for t in tabs]}; screenshot in {ARTIFACTS / 'demo-stop-cut.png'}")
    # The agent received the cancel exactly once: one input in the gateway, one read by the agent.
    assert [(i.id, i.kind, i.data) for i in inputs] == [(1, "cancel", {"reason": reason})]
    assert received == [(1, "cancel")]
    assert len(posts) >= 2 and set(posts) == {posts[0]}, f"the page must retry with one key: {posts}"
    assert answers == [200], "the retry is answered with the input the gateway already had"
    # The run ended cancelled, by the agent.
    error = {"code": "cancelled", "message": reason}
    end = {"status": "cancelled", "error": error, "result": {"text": "".join(words)}}
    assert (row["status"], row["run_status"], row["outcome"], row["error"]) == ("completed", "cancelled",
                                                                                "cancelled", error)
    assert ended["run_status"] == "cancelled"
    assert (row["input_last_id"], row["input_acked_id"]) == (1, 1)
    assert events[-1]["event"] == "gateway.end" and events[-1]["data"] == end
    assert [e["event"] for e in events].count("gateway.input") == 1
    # Both tabs show it, each saw the cancel's mirror once and every event once, across the cut.
    for state in tabs:
        assert (state["status"], state["label"]) == ("cancelled", "Cancelled"), state
        assert reason in state["detail"]
        assert state["end"] == end and state["outcome"] == {"status": "cancelled", "error": error,
                                                            "result": end["result"]}
        assert state["timeline"].count("gateway.input #1: cancel") == 1, state["timeline"]
        assert state["reconnects"] >= 1, "the cut must have dropped the tab's stream"
        assert state["view"]["cancels"] == 1, state["view"]
        # The answer the run left open, closed by the gateway when the run ended: whole, once.
        assert state["messages"] == [{"id": "answer", "type": "answer", "metadata": None, "text": "".join(words),
                                      "status": "failed", "error": None, "start": 1}]
        assert "none repeated" in state["verdict"] and "matches the partial result" in state["verdict"], state
    assert [e["event"] for e in events][-2:] == ["message.end", "gateway.end"]
    assert not errors, f"a page threw: {errors}"

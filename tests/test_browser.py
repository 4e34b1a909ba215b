"""Chromium end to end: what a real browser does with the gateway's streams.

* native ``EventSource`` through a proxy that keeps dropping every connection;
* the client helper (``static/sse-gateway.js``) across a page reload, and
  when its subscribe token expires;
* the demo page, with a screenshot in ``test-artifacts/demo.png``.

Pages are served from the gateway's origin (or the proxy's), so every
stream is same-origin and reconnects go where the page came from. The
async Playwright API is used: the sync one runs on greenlets, which upset
CPython 3.11's recursion bookkeeping for code parsed later in the run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from urllib.parse import parse_qs, urlparse

import httpx
import jwt
import pytest
import pytest_asyncio

from conftest import ROOT, require_binary
from util import ChaosProxy, await_until

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
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


RELOAD_PAGE = """<!doctype html><meta charset="utf-8"><title>helper across a reload</title>
<script type="module">
  import { connect } from "/static/sse-gateway.mjs";
  const session = new URLSearchParams(location.search).get("session");
  const got = JSON.parse(sessionStorage.getItem("got") || "[]");
  sessionStorage.setItem("loads", String(Number(sessionStorage.getItem("loads") || 0) + 1));
  const keep = (e) => { got.push(e.id); sessionStorage.setItem("got", JSON.stringify(got)); };
  window.stream = connect(`/v1/sessions/${session}/stream`, {
    onEvent: keep,
    onEnd: (e) => { keep(e); sessionStorage.setItem("ended", "1"); },
  });
</script>"""


@pytest.mark.timeout(60)
async def test_helper_resumes_exactly_across_a_page_reload(start_gateway, page):
    total = 600
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "100")
    api = httpx.AsyncClient(base_url=gw.url)
    epoch = (await api.post("/v1/sessions", json={"id": "reload"})).json()["epoch"]

    async def serve_page(route) -> None:
        await route.fulfill(body=RELOAD_PAGE, content_type="text/html")

    await page.route(f"{gw.url}/reload-test*", serve_page)
    streams: list[str] = []
    page.on("request", lambda req: streams.append(req.url) if "/stream" in req.url else None)
    await page.goto(f"{gw.url}/reload-test?session=reload")

    publisher = publish_paced(gw.url, "reload", total, batch=10, pause=0.04)
    await page.wait_for_function("JSON.parse(sessionStorage.getItem('got') || '[]').length >= 150", timeout=10_000)
    assert publisher.is_alive(), "the reload must happen while events are still being published"
    await page.reload()
    await page.wait_for_function("sessionStorage.getItem('loads') === '2'", timeout=10_000)
    await asyncio.to_thread(publisher.join)
    (await api.post("/v1/sessions/reload/complete")).raise_for_status()
    await api.aclose()
    await page.wait_for_function("sessionStorage.getItem('ended') === '1'", timeout=20_000)

    got = await page.evaluate("JSON.parse(sessionStorage.getItem('got'))")
    assert got == list(range(1, total + 2)), "ids across the reload are not exactly 1..N+1"
    assert len(streams) == 2, streams
    assert "last_event_id" not in parse_qs(urlparse(streams[0]).query)
    resumed = parse_qs(urlparse(streams[1]).query)["last_event_id"][0]
    after, _, cursor_epoch = resumed.partition(":")
    print(f"reload: resumed after {resumed}; {len(got)} events in all")
    assert cursor_epoch == epoch
    assert 150 <= int(after) < total, "the reload did not happen mid-stream"


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
        await page.wait_for_function("window.ids.length === 50", timeout=20_000)
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


async def demo_state(page) -> dict:
    return await page.evaluate("JSON.parse(sessionStorage.getItem('sse-gateway-demo:run') || '{}')")


@pytest.mark.timeout(90)
async def test_demo_page_runs_drops_resumes_and_ends(start_gateway, page):
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "200")
    await page.goto(f"{gw.url}/?duration=8")
    assert await page.locator("h1").inner_text() == "Agent runs that outlive the connection."
    await page.click("text=Start a simulated agent run")
    await page.wait_for_function("(JSON.parse(sessionStorage.getItem('sse-gateway-demo:run')) || {}).events > 40",
                           timeout=15_000)
    assert (await page.locator("#text").inner_text()).startswith("You asked")
    await page.click("text=Drop connection")
    await page.wait_for_function("document.getElementById('reconnects').textContent === '1'", timeout=10_000)
    await page.wait_for_function("document.getElementById('state').textContent === 'ended'", timeout=30_000)

    run = await demo_state(page)
    async with httpx.AsyncClient(base_url=gw.url) as api:
        session = (await api.get(f"/v1/sessions/{run['session']}")).json()
        metrics = (await api.get("/metrics")).text
    assert session["status"] == "completed"
    assert (await page.locator("#text").inner_text()).strip() == session["result"]["text"].strip()
    assert run["text"] == session["result"]["text"]
    assert (run["lastId"], run["missing"], run["duplicates"]) == (session["last_id"], 0, 0)
    assert run["events"] == session["last_id"]
    assert await page.locator("#cursor").inner_text() == f"{session['last_id']}:{session['epoch']}"
    assert (await page.locator("#verdict").inner_text()).startswith("Complete.")
    timeline = await page.locator("#timeline").inner_text()
    assert "reconnected, resuming after" in timeline and "gateway.end" in timeline
    heartbeats = next(line for line in metrics.splitlines() if line.startswith("sse_gateway_heartbeats_total"))
    assert float(heartbeats.split()[1]) >= 1, "the run's quiet tool call sent no heartbeat"

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    print(f"demo: {run['events']} events, {run['reconnects']} reconnect(s); screenshot in {ARTIFACTS / 'demo.png'}")

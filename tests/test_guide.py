"""docs/guide.md, followed literally: its agent, backend and page run as written, and a browser reloads the page.

How the guide marks what this test runs. In docs/guide.md, a fenced code block whose line just
before the opening fence is

* ``<!-- file: NAME -->`` is written, as it stands, to the file NAME of a fresh directory
  (``agent.py``, ``app.py``, ``index.html``, ``delivered.py``);
* ``<!-- run: STEP -->`` is a shell step, run by ``bash`` in that directory with the environment
  the guide builds (``install`` makes a virtual environment from the lock; ``keys`` writes the two
  secrets to ``.env``; ``terminal`` is how each terminal starts; ``gateway``, ``backend`` and
  ``agent`` start the processes; ``helper`` copies the browser helper; ``status`` and
  ``delivered`` ask about the session).

Every code block of the guide carries such a line (checked here), so every one is run. The
``install`` step runs on its own (it downloads the locked packages); for the others, ``.venv`` is
this interpreter's environment, which holds the same packages. The only changes made: in shell
steps, the guide's ports 8000 (the gateway) and 3000 (the app) become free ports, and every process
gets ``SSE_GATEWAY_URL``, the variable the guide's agent and backend read for the gateway's address.
The programs come from this interpreter's directory first on ``PATH`` (``python``, ``sse-gateway``,
``uvicorn``), as in the guide's activated virtual environment.

What it checks: the secrets the guide generates start a gateway with keys and ``--cors-origin``;
the backend mints subscribe tokens; Chromium loads the page from the app's origin, which streams
from the gateway's origin and receives live words; the page is reloaded mid-answer (the agent is
paused with SIGSTOP while the browser starts and while the page reloads, so that the reload comes
mid-answer on any machine, then continued) and again after the end,
and each time shows the whole answer exactly once and the result; the guide's status command
shows the session completed with ``acked_id == last_id``, and ``delivered.py`` says "running"
mid-answer and "finished and delivered" after the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from conftest import ROOT, require_binary
from util import await_until, free_port, wait_until

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-features=LocalNetworkAccessChecks"]  # a page of another origin may reach 127.0.0.1
GUIDE = ROOT / "docs" / "guide.md"
FILES = {"agent.py", "app.py", "index.html", "delivered.py"}
STEPS = {"install", "keys", "terminal", "gateway", "helper", "backend", "agent", "status", "delivered"}
RUN = "run1"  # the run id the guide's commands use

pytestmark = pytest.mark.timeout(240)


def guide_blocks() -> dict[tuple[str, str], str]:
    """{("file", NAME) or ("run", STEP): the block's text}, for every marked block of the guide."""
    found: dict[tuple[str, str], str] = {}
    for kind, name, body in re.findall(r"^<!-- (file|run): (\S+) -->\n```[\w-]*\n(.*?)^```", GUIDE.read_text(),
                                       re.DOTALL | re.MULTILINE):
        assert (kind, name) not in found, f"docs/guide.md marks two blocks '{kind}: {name}'"
        found[kind, name] = body
    return found


def test_every_block_of_the_guide_is_run():
    blocks = guide_blocks()
    assert {name for kind, name in blocks if kind == "file"} == FILES
    assert {name for kind, name in blocks if kind == "run"} == STEPS
    fences = re.findall(r"^```", GUIDE.read_text(), re.MULTILINE)
    assert len(fences) == 2 * len(blocks), "a code block of docs/guide.md is not marked, so nothing runs it"


@pytest.mark.system  # a fresh virtual environment from the lock
@pytest.mark.timeout(600)
def test_the_install_step_gives_everything_the_guide_uses(tmp_path: Path):
    """Steps 0 and 1's keys, as written, in an app directory beside the checkout (network: the lock from PyPI)."""
    (tmp_path / "sse-gateway").symlink_to(ROOT)
    app = tmp_path / "app"
    app.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSE_GATEWAY_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    check = "python -c 'import sse_gateway.client, starlette, uvicorn' && sse-gateway serve --help && uvicorn --version"
    steps = "\n".join(guide_blocks()["run", step] for step in ("install", "keys", "terminal"))
    out = subprocess.run(["bash", "-c", f"set -e\n{steps}\n{check}"], cwd=app, env=env,
                         check=False, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (app / ".venv" / "bin" / "sse-gateway").exists()
    keys = dict(re.findall(r"^export (\w+)=(\S+)$", (app / ".env").read_text(), re.MULTILINE))
    assert set(keys) == {"SSE_GATEWAY_PUBLISH_KEY", "SSE_GATEWAY_TOKEN_SECRET"}
    assert all(len(value) >= 32 for value in keys.values()) and len(set(keys.values())) == 2
    assert (app / ".env").stat().st_mode & 0o077 == 0, "the secrets' file is readable by others"


class Guide:
    """The guide's directory, its environment and the processes its steps started."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.blocks = guide_blocks()
        self.gateway_port, self.app_port = free_port(), free_port()
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        self.app_url = f"http://127.0.0.1:{self.app_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = str(ROOT)  # the checkout under test, as the guide's `pip install -e`
        env["SSE_GATEWAY_URL"] = self.gateway_url
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        # Step 0's environment: this interpreter's (test_the_install_step... makes a real one from the lock).
        if (Path(sys.prefix) / "bin" / "activate").exists():
            (home / ".venv").symlink_to(sys.prefix)
        else:
            (home / ".venv" / "bin").mkdir(parents=True)
            (home / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
        for (kind, name), body in self.blocks.items():
            if kind == "file":
                (home / name).write_text(body)

    def command(self, step: str) -> str:
        body = self.blocks["run", step]
        body = re.sub(r"\b8000\b", str(self.gateway_port), body)
        return re.sub(r"\b3000\b", str(self.app_port), body)

    def export(self, step: str) -> None:
        """Run a step that exports variables, and keep them for the steps after it."""
        out = subprocess.run(["bash", "-c", f"set -e\n{self.command(step)}\nenv -0"], cwd=self.home, env=self.env,
                             check=False, capture_output=True, timeout=60)
        assert out.returncode == 0, out.stderr.decode()
        self.env = dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)

    def run(self, step: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f"set -e\n{self.command(step)}"], cwd=self.home, env=self.env,
                              check=False, capture_output=True, text=True, timeout=60)

    def start(self, step: str) -> subprocess.Popen:
        """Start a step that keeps running, in a process group of its own (so it can be paused and stopped)."""
        with open(self.home / f"{step}.log", "ab") as log:
            proc = subprocess.Popen(["bash", "-c", self.command(step)], cwd=self.home, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[step] = proc
        return proc

    def signal(self, step: str, sig: int) -> None:
        proc = self.procs[step]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)

    def log(self, step: str) -> str:
        path = self.home / f"{step}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for step in reversed(list(self.procs)):
            proc = self.procs[step]
            if proc.poll() is not None:
                continue
            self.signal(step, signal.SIGCONT)
            self.signal(step, signal.SIGINT)  # Ctrl-C
            if step == "gateway":
                self.signal(step, signal.SIGINT)  # a second one skips the drain of its streams
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.signal(step, signal.SIGKILL)
                proc.wait(timeout=10)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def guide(tmp_path: Path):
    g = Guide(tmp_path)
    yield g
    g.stop()
    for step in ("gateway", "backend"):  # the agent exits 0 on its own (asserted); a Ctrl-C of a failed test is no bug
        assert "Traceback" not in g.log(step), f"the {step} logged a traceback:\n{g.log(step)}"


@pytest.mark.system  # a gateway, the app, the agent, Chromium
@pytest.mark.asyncio
async def test_the_guide_followed_literally(guide: Guide):
    path = require_binary("chromium", "/usr/bin/chromium")
    from playwright.async_api import async_playwright

    # 1. Keys, once; every terminal reads them; the gateway with them.
    made = await asyncio.to_thread(guide.run, "keys")
    assert made.returncode == 0, made.stderr
    guide.export("terminal")
    key, secret = guide.env["SSE_GATEWAY_PUBLISH_KEY"], guide.env["SSE_GATEWAY_TOKEN_SECRET"]
    assert len(key) >= 32 and len(secret) >= 32 and key != secret
    gateway = guide.start("gateway")
    await asyncio.to_thread(wait_until, lambda: gateway.poll() is not None or answers(f"{guide.gateway_url}/readyz"),
                            what="the guide's gateway to be ready")
    assert gateway.poll() is None, f"the guide's gateway stopped:\n{guide.log('gateway')}"
    keyed = {"Authorization": f"Bearer {key}"}
    api = httpx.AsyncClient(base_url=guide.gateway_url, timeout=10)
    assert (await api.post(f"/v1/sessions/{RUN}/events", json={"data": 1})).status_code == 401, "no key needed"

    # 2.-3. The helper copied next to the page, and the backend.
    copied = await asyncio.to_thread(guide.run, "helper")
    assert copied.returncode == 0, copied.stderr
    assert (guide.home / "sse-gateway.js").read_bytes() == (ROOT / "static" / "sse-gateway.js").read_bytes()
    backend = guide.start("backend")
    await asyncio.to_thread(wait_until, lambda: backend.poll() is not None or answers(guide.app_url + "/"),
                            what="the guide's backend to answer")
    assert backend.poll() is None, f"the guide's backend stopped:\n{guide.log('backend')}"

    # 5. The agent, then the page.
    agent = guide.start("agent")

    async def session() -> dict:
        response = await api.get(f"/v1/sessions/{RUN}", headers=keyed)
        return response.json() if response.status_code == 200 else {}

    async def writing() -> bool:
        assert agent.poll() is None, f"the guide's agent stopped:\n{guide.log('agent')}"
        return (await session()).get("last_id", 0) >= 5

    # The agent is paused (SIGSTOP) while the browser starts, and again while the page reloads, so
    # that the reload comes mid-answer however slow the machine; between the pauses it writes live.
    await await_until(writing, what="the agent to write its first events")
    guide.signal("agent", signal.SIGSTOP)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        page = await browser.new_page()
        errors: list = []
        page.on("pageerror", lambda exc: errors.append(exc))  # not a builtin: Playwright wraps it
        streams: list[str] = []
        page.on("request", lambda req: streams.append(req.url) if urlparse(req.url).path.endswith("/stream")
                else None)
        answer = "document.getElementById('answer').textContent"
        note = "document.getElementById('note').textContent"

        async def wait_for(condition: str, timeout: float) -> None:
            """Wait until ``condition`` holds in the page; fail at once if the page stopped with an error."""
            await page.wait_for_function(f"({condition}) || {note}.startsWith('Stopped')", timeout=timeout)
            assert not (await page.evaluate(note)).startswith("Stopped"), await page.evaluate(note)

        await page.goto(f"{guide.app_url}/?run={RUN}")
        await wait_for(f"{answer}.length > 0", timeout=60_000)
        shown = len((await page.evaluate(answer)).split())
        guide.signal("agent", signal.SIGCONT)
        await wait_for(f"{answer}.split(' ').length > {shown + 3}", timeout=60_000)  # live words arrive

        # The reload, mid-answer.
        guide.signal("agent", signal.SIGSTOP)
        assert (await session())["status"] == "open", "the reload must happen while the agent is still writing"
        before = await page.evaluate(answer)
        await page.reload()
        await wait_for(f"{answer}.startsWith({json.dumps(before)})", timeout=60_000)
        assert not (await page.evaluate(note)).startswith("Finished")
        running = await asyncio.to_thread(guide.run, "delivered")
        assert re.fullmatch(rf"{RUN}: running \(\d+ events so far\)\n", running.stdout), running.stdout + running.stderr
        guide.signal("agent", signal.SIGCONT)

        await wait_for(f"{note}.startsWith('Finished')", timeout=120_000)
        assert await asyncio.to_thread(agent.wait, 60) == 0, guide.log("agent")
        row = await session()
        result = row["result"]
        assert row["status"] == "completed" and result["text"].startswith("Server-Sent Events keep")

        async def shows_the_whole_answer_once() -> None:
            assert await page.evaluate(answer) == result["text"]
            body = await page.evaluate("document.body.innerText")
            assert body.count(result["text"].strip()) == 1, "the answer is not shown exactly once"
            assert await page.evaluate(note) == f"Finished ({result['words']} words)"

        await shows_the_whole_answer_once()

        # Delivered: the helper acknowledged the end; the guide's status command shows it.
        def status() -> dict:
            out = guide.run("status")
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        def delivered() -> dict:
            row = status()
            return row if row["acked_id"] == row["last_id"] else {}

        row = await asyncio.to_thread(wait_until, delivered, what="acked_id to reach last_id after the end")
        assert row["status"] == "completed" and row["result"] == result
        said = await asyncio.to_thread(guide.run, "delivered")
        assert said.stdout == f"{RUN}: finished and delivered\n", said.stdout + said.stderr

        # Reloaded after the end: the whole answer and the result again.
        await page.reload()
        await wait_for(f"{note}.startsWith('Finished')", timeout=60_000)
        await shows_the_whole_answer_once()

        assert streams and all(url.startswith(guide.gateway_url + "/") for url in streams), streams
        assert errors == [], f"the page threw: {errors}"
        await browser.close()
    await api.aclose()

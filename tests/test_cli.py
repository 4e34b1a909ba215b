"""The sse-gateway command as a user meets it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from conftest import ROOT, free_port
from util import ChaosProxy, wait_until

pytestmark = pytest.mark.timeout(60)


def cli(*args: str, env: dict | None = None, timeout: float = 20, input: str | None = None):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "sse_gateway", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=input)


def test_help_explains_itself():
    out = cli("--help").stdout
    assert "serve" in out and "publish" in out and "tail" in out and "Last-Event-ID" in out
    serve = cli("serve", "--help").stdout
    for option in ("--host", "--port", "--db", "--backend", "--redis-url", "--heartbeat", "--retry-ms",
                   "--publish-key", "--token-secret", "--insecure"):
        assert option in serve
    assert "SSE_GATEWAY_HEARTBEAT" in serve


def test_refuses_open_non_loopback_host_without_insecure(tmp_path):
    r = cli("serve", "--host", "0.0.0.0", "--db", str(tmp_path / "x.db"))
    assert r.returncode == 2 and "--insecure" in r.stderr and "Traceback" not in r.stderr
    r = cli("serve", "--heartbeat", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = cli("serve", "--coalesce-ms", "-1")
    assert r.returncode == 2 and "coalesce_ms" in r.stderr and "Traceback" not in r.stderr
    r = cli("serve", env={"SSE_GATEWAY_PORT": "notaport"})
    assert r.returncode == 2 and "SSE_GATEWAY_PORT" in r.stderr


@pytest.mark.system  # a real serve on a real port
def test_environment_configures_serve(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sse_gateway", "serve"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "SSE_GATEWAY_PORT": str(port),
                                 "SSE_GATEWAY_DB": str(tmp_path / "env.db"), "SSE_GATEWAY_HEARTBEAT": "0.5"},
                            stderr=subprocess.PIPE, text=True)
    def published() -> bool:
        try:
            return httpx.post(f"http://127.0.0.1:{port}/v1/sessions/e/events", json={"data": 1}).status_code == 201
        except httpx.HTTPError:
            return False

    try:
        wait_until(published, interval=0.1, what=f"serve to listen on SSE_GATEWAY_PORT {port}")
        with httpx.stream("GET", f"http://127.0.0.1:{port}/v1/sessions/e/stream") as r:
            seen = ""
            for chunk in r.iter_text():
                seen += chunk
                if ": ping" in seen:
                    break
        assert (tmp_path / "env.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "open to anyone" in err and "backend=sqlite" in err and "Traceback" not in err
    assert "heartbeat=0.5s" in err  # the heartbeat from the environment (the ping above came from it)


def test_publish_and_tail(gateway):
    url = ["--url", gateway.url]
    assert json.loads(cli("publish", "t", '{"text": "hi"}', "--event", "token", *url).stdout)["id"] == 1
    assert json.loads(cli("publish", "t", "plain words", *url).stdout)["id"] == 2
    out = cli("publish", "t", "-", *url, input='{"data": 3}\n{"data": 4}\n').stdout
    assert json.loads(out)["ids"] == [3, 4]
    httpx.post(f"{gateway.url}/v1/sessions/t/complete", json={"result": "ok"})
    r = cli("tail", "t", "--json", *url)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [int(x["id"].split(":")[0]) for x in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["data"] == '{"text":"hi"}' and lines[1]["data"] == "plain words" and lines[-1]["data"] == '"ok"'
    r = cli("tail", "t", "--from", "3", "--no-follow", *url)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2


def test_tail_resumes_by_itself_after_drops(gateway):
    with ChaosProxy(gateway.port) as proxy:
        proc = subprocess.Popen([sys.executable, "-m", "sse_gateway", "tail", "r", "--json", "--url",
                                 f"http://127.0.0.1:{proxy.port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        with httpx.Client(base_url=gateway.url) as c:
            c.post("/v1/sessions", json={"id": "r"})
            for i in range(1, 301):
                c.post("/v1/sessions/r/events", json={"data": i})
                if i % 60 == 0:  # wait until tail is attached again, then cut it
                    wait_until(lambda: c.get("/v1/sessions/r").json()["subscribers"] == 1, what="tail to attach")
                    proxy.drop_all()
            c.post("/v1/sessions/r/complete")
        out, err = proc.communicate(timeout=30)
    ids = [int(json.loads(line)["id"].split(":")[0]) for line in out.splitlines()]
    assert ids == list(range(1, 302))
    assert err.count("connection lost") == 5


def test_serve_does_not_load_the_bench_or_the_naive_baseline():
    """The command line only declares the bench's options; its code loads when ``bench`` runs."""
    code = ("import sys; from sse_gateway import cli; cli.build_parser(); "
            "from sse_gateway.app import create_app; create_app(); "
            "print(sorted(m for m in sys.modules if m.startswith('sse_gateway.bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["['sse_gateway.bench']"]
    from sse_gateway.bench import ALL_TARGETS
    from sse_gateway.bench.servers import PRESETS, REDIS_NODES
    assert set(ALL_TARGETS) == set(PRESETS) - set(REDIS_NODES)  # --preset's choices are the presets


@pytest.mark.parametrize("args, says", [
    (("--publish-key", ""), "publisher key is empty or blank"),
    (("--publish-key", "   "), "publisher key is empty or blank"),
    (("--publish-key", "k" * 40, "--token-secret", ""), "token secret is empty or blank"),
    (("--publish-key", "", "--insecure"), "publisher key is empty or blank"),
    (("--publish-key", "change-me"), "placeholder"),
    (("--publish-key", "k" * 40, "--token-secret", "change-me-too"), "placeholder"),
    (("--publish-key", "short-key"), "shorter than 16"),
    (("--publish-key", "k" * 40, "--token-secret", "s" * 31), "shorter than 32"),
], ids=["empty key", "blank key", "empty secret", "empty key despite --insecure", "placeholder key",
        "placeholder secret", "short key", "short secret"])
def test_keys_and_secrets_that_protect_nothing_are_refused_with_one_line(tmp_path, args, says):
    r = cli("serve", "--host", "0.0.0.0", "--port", str(free_port()), "--db", str(tmp_path / "x.db"), *args)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "k" * 40 not in r.stderr  # a refusal never prints a key


def test_the_example_environment_file_does_not_start_as_shipped(tmp_path):
    example = (ROOT / "deploy" / "sse-gateway.env.example").read_text()
    env = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    r = cli("serve", "--db", str(tmp_path / "x.db"), env=env)
    assert r.returncode == 2 and "placeholder" in r.stderr

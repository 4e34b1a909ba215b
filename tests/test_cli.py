"""The sse-gateway command as a user meets it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from conftest import ROOT, free_port
from util import ChaosProxy, wait_until

pytestmark = pytest.mark.timeout(60)


KEY = "cli-test-key-" + "k" * 20
SECRET = "s" * 40


def clean_environ() -> dict[str, str]:
    """This process's environment without SSE_GATEWAY_*: a test says which it sets."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}


def cli(*args: str, env: dict | None = None, timeout: float = 20, input: str | None = None):
    full_env = {**clean_environ(), "PYTHONPATH": str(ROOT), **(env or {})}
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
    assert "keys=none" in err and "tokens=off" in err and "cors=none" in err


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
        proxy_url = f"http://127.0.0.1:{proxy.port}"
        proc = subprocess.Popen([sys.executable, "-m", "sse_gateway", "tail", "r", "--json", "--url", proxy_url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**clean_environ(), "PYTHONPATH": str(ROOT)})
        notes: list[str] = []
        reader = threading.Thread(target=lambda: notes.extend(iter(proc.stderr.readline, "")), daemon=True)
        reader.start()
        with httpx.Client(base_url=gateway.url) as c:
            c.post("/v1/sessions", json={"id": "r"})
            connections = 0
            for i in range(1, 301):
                c.post("/v1/sessions/r/events", json={"data": i})
                if i % 60 == 0:  # wait until tail is attached again (on a new connection), then cut it
                    wait_until(lambda: proxy.connections > connections
                               and c.get("/v1/sessions/r").json()["subscribers"] == 1, what="tail to attach")
                    connections, reported = proxy.connections, len(notes)
                    assert proxy.drop_all() >= 1
                    wait_until(lambda: len(notes) > reported, what="tail to see the drop")
            c.post("/v1/sessions/r/complete")
        out = proc.communicate(timeout=30)[0]
        reader.join(10)
    ids = [int(json.loads(line)["id"].split(":")[0]) for line in out.splitlines()]
    assert ids == list(range(1, 302))
    assert len(notes) == 5 and all(line.startswith("# ") and proxy_url in line for line in notes), notes
    assert proc.returncode == 0


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


@pytest.mark.parametrize("host, args, says", [
    ("127.0.0.1", ("--publish-key", ""), "publisher key is empty or blank"),
    ("127.0.0.1", ("--publish-key", "   "), "publisher key is empty or blank"),
    ("127.0.0.1", ("--publish-key", "k" * 40, "--token-secret", ""), "token secret is empty or blank"),
    ("0.0.0.0", ("--publish-key", "", "--insecure"), "publisher key is empty or blank"),
    ("127.0.0.1", ("--publish-key", "change-me"), "placeholder"),
    ("127.0.0.1", ("--publish-key", "k" * 40, "--token-secret", "change-me-too"), "placeholder"),
    ("0.0.0.0", ("--publish-key", "short-key"), "shorter than 16 characters"),
    ("0.0.0.0", ("--publish-key", "k" * 40, "--token-secret", "s" * 31), "shorter than 32 bytes"),
    ("127.0.0.1", ("--webhook-secret", " "), "webhook secret is empty or blank"),
    ("0.0.0.0", ("--publish-key", "k" * 40, "--webhook-secret", "w" * 20), "webhook secret is shorter than 32"),
], ids=["empty key", "blank key", "empty secret", "empty key despite --insecure", "placeholder key",
        "placeholder secret", "short key beyond loopback", "short secret beyond loopback", "blank webhook secret",
        "short webhook secret beyond loopback"])
def test_keys_and_secrets_that_protect_nothing_are_refused_with_one_line(tmp_path, host, args, says):
    r = cli("serve", "--host", host, "--port", str(free_port()), "--db", str(tmp_path / "x.db"), *args)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "k" * 40 not in r.stderr  # a refusal never prints a key
    assert not (tmp_path / "x.db").exists()


def test_the_example_environment_file_does_not_start_as_shipped(tmp_path):
    example = (ROOT / "deploy" / "sse-gateway.env.example").read_text()
    env = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    r = cli("serve", "--db", str(tmp_path / "x.db"), env=env)
    assert r.returncode == 2 and "placeholder" in r.stderr


# -- one clear line for every mistake --------------------------------------------------------


def one_line_error(r: subprocess.CompletedProcess, *says: str) -> str:
    """The command failed with one line on standard error, saying ``says``, and no traceback."""
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for text in says:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (("publish",), "the following arguments are required: session, DATA"),
    (("tail", "x", "--bogus"), "unrecognized arguments: --bogus"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    (("serve", "--port", "abc"), "argument --port: 'abc' is not an integer"),
    (("serve", "--heartbeat", "soon"), "argument --heartbeat: 'soon' is not a number"),
    (("serve", "--port", "70000"), "port must be between 1 and 65535"),
    (("serve", "--webhook-url", "hooks.example/in"), "webhook_url is not a URL webhooks can be sent to: use http"),
    (("serve", "--webhook-url", "https://hooks.example/in"), "webhook_url needs webhook_secret"),
    (("serve", "--workers", "0"), "workers must be 1 or more"),
    (("serve", "--workers", "2", "--backend", "memory"), "the memory backend lives in one process, so workers "
                                                         "cannot share it"),
    (("publish", "x", "1", "--url", "localhost:8000"), "the gateway URL must be http://"),
    (("tail", "x", "--retry-for", "soon"), "argument --retry-for: 'soon' is not a number of seconds"),
    (("create", "--metadata", "{nope"), "argument --metadata: '{nope' is not JSON"),
    (("create", "--metadata", "NaN"), "argument --metadata: 'NaN' is not JSON"),
    (("create", "--ttl", "-1"), "argument --ttl: '-1' is not positive"),
    (("complete", "x", "--result", "{"), "argument --result: '{' is not JSON"),
    (("token", "x", "--ttl", "an hour"), "argument --ttl: 'an hour' is not a whole number"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_every_mistake_is_one_line_that_says_which_option_and_why(args, says):
    line = one_line_error(cli(*args), says)
    assert "<lambda>" not in line and "usage:" not in line


def test_a_port_in_use_is_one_line_and_leaves_no_file(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("serve", "--port", str(port), "--db", str(tmp_path / "x.db"))
    one_line_error(r, f"port {port} is in use")
    assert "on http://" not in r.stderr  # no "listening" banner for a gateway that never listened
    assert list(tmp_path.iterdir()) == []


def test_publish_to_a_gateway_that_is_down_is_one_line_naming_its_url():
    url = f"http://127.0.0.1:{free_port()}"
    r = cli("publish", "down", '{"text": "hi"}', "--url", url, "--retry-for", "1")
    one_line_error(r, "sse-gateway publish: cannot reach the gateway at " + url)
    assert r.stdout == ""


def test_tail_of_a_dead_url_gives_up_after_retry_for_and_names_it():
    url = f"http://127.0.0.1:{free_port()}"
    r = cli("tail", "dead", "--url", url, "--retry-for", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    *retries, last = r.stderr.strip().splitlines()
    assert last.startswith("sse-gateway tail: cannot reach the gateway at " + url) and "gave up after 1 s" in last
    assert all(line.startswith("# ") and url in line for line in retries)


@pytest.mark.system  # a gateway that starts while publish is retrying
def test_publish_waits_for_a_gateway_that_is_starting(start_gateway):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sse_gateway", "publish", "late", '{"n": 1}', "--url",
                             f"http://127.0.0.1:{port}", "--retry-for", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**clean_environ(), "PYTHONPATH": str(ROOT)})
    start_gateway(port=port)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and json.loads(out)["id"] == 1 and err == ""


# -- one name for the key, and the commands users ran by hand ---------------------------------------


@pytest.fixture(scope="module")
def keyed(start_module_gateway):
    """A gateway with a publisher key and a token secret, and the environment that reaches it."""
    gw = start_module_gateway("--publish-key", KEY, "--token-secret", SECRET)
    return gw, {"SSE_GATEWAY_URL": gw.url, "SSE_GATEWAY_PUBLISH_KEY": KEY}


def test_the_client_commands_read_the_key_that_serve_reads(keyed):
    gw, env = keyed
    r = cli("publish", "keyed", '{"n": 1}', env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == 1 and r.stderr == ""
    r = cli("tail", "keyed", "--no-follow", "--json", env=env)
    assert r.returncode == 0 and [json.loads(line)["data"] for line in r.stdout.splitlines()] == ['{"n":1}']
    old = cli("publish", "keyed", '{"n": 2}', env={"SSE_GATEWAY_URL": gw.url, "SSE_GATEWAY_KEY": KEY})
    assert old.returncode == 0 and json.loads(old.stdout)["id"] == 2
    assert old.stderr.strip() == ("sse-gateway: warning: SSE_GATEWAY_KEY is deprecated, use SSE_GATEWAY_PUBLISH_KEY "
                                  "(the variable serve reads)")
    one_line_error(cli("publish", "keyed", "3", env={**env, "SSE_GATEWAY_PUBLISH_KEY": "w" * 24}),
                   "sse-gateway publish: 401 invalid_credentials")
    one_line_error(cli("tail", "keyed", env={"SSE_GATEWAY_URL": gw.url}), "sse-gateway tail: 401 missing_credentials")


def test_create_token_and_complete(keyed):
    gw, env = keyed
    made = json.loads(cli("create", "c1", "--metadata", '{"model": "m"}', "--ttl", "60", env=env).stdout)
    assert made["created"] and made["id"] == "c1" and made["subscribe_token"]
    assert made["stream_url"].startswith(gw.url + "/v1/sessions/c1/stream?token=")
    again = json.loads(cli("create", "c1", "--metadata", '{"model": "m"}', "--ttl", "60", env=env).stdout)
    assert not again["created"] and again["epoch"] == made["epoch"]
    assert json.loads(cli("create", env=env).stdout)["id"].startswith("s_")

    assert cli("publish", "c1", "hello", env=env).returncode == 0
    token = json.loads(cli("token", "c1", "--ttl", "120", env=env).stdout)
    assert set(token) == {"token", "expires_at", "stream_url"}
    assert "data: hello" in httpx.get(token["stream_url"] + "&live=false", timeout=10).text  # the token reads it
    steer = {"kind": "steer", "data": "shorter"}
    r = httpx.post(f"{gw.url}/v1/sessions/c1/input", json=steer, params={"token": token["token"]}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    sender = json.loads(cli("token", "c1", "--input", env=env).stdout)["token"]
    r = httpx.post(f"{gw.url}/v1/sessions/c1/input", json=steer, params={"token": sender}, timeout=10)
    assert r.status_code == 201 and r.json()["id"] == 1

    done = json.loads(cli("complete", "c1", "--result", '{"text": "hello"}', env=env).stdout)
    assert done["status"] == "completed" and done["result"] == {"text": "hello"}
    lines = [json.loads(line) for line in cli("tail", "c1", "--json", env=env).stdout.splitlines()]
    assert [x["event"] for x in lines] == ["message", "gateway.input", "gateway.end"]
    one_line_error(cli("complete", "c1", "--result", '"other"', env=env), "409 session_completed")
    one_line_error(cli("complete", "nowhere", env=env), "404 session_not_found")
    one_line_error(cli("create", "bad id", env=env), "sse-gateway create: invalid session id 'bad id'")

    made = json.loads(cli("create", "c2", "--lease", "600", env=env).stdout)
    assert made["created"]
    failed = json.loads(cli("complete", "c2", "--status", "failed", "--error", '{"code": "oom"}', env=env).stdout)
    assert (failed["run_status"], failed["error"], failed["lease_seconds"]) == ("failed", {"code": "oom"}, 600)
    end = json.loads(cli("tail", "c2", "--json", env=env).stdout.splitlines()[-1])
    assert end["event"] == "gateway.end" and json.loads(end["data"]) == {"status": "failed", "error": {"code": "oom"}}


def test_send_and_cancel_reach_the_agent_and_tail_shows_them(keyed):
    gw, env = keyed
    assert cli("create", "in1", env=env).returncode == 0
    sent = json.loads(cli("send", "in1", "steer", '{"text": "shorter"}', "--idempotency-key", "k-1", env=env).stdout)
    assert (sent["id"], sent["kind"]) == (1, "steer") and sent["event_id"] == 1
    again = json.loads(cli("send", "in1", "steer", '{"text": "shorter"}', "--idempotency-key", "k-1", env=env).stdout)
    assert again["id"] == 1  # a retried command is one input
    assert cli("publish", "in1", '{"approval_id": "rm-1", "command": "rm -rf build/"}', "--event",
               "approval.request", env=env).returncode == 0
    token = json.loads(cli("token", "in1", "--input", env=env).stdout)["token"]  # a user's token sends too
    as_user = {"SSE_GATEWAY_URL": gw.url}
    approved = json.loads(cli("send", "in1", "approval", "--approval-id", "rm-1", "--decision", "approve",
                              "--key", token, env=as_user).stdout)
    assert approved["id"] == 2
    one_line_error(cli("send", "in1", "approval", "--approval-id", "rm-1", "--decision", "deny", env=env),
                   "sse-gateway send: 409 approval_answered")
    one_line_error(cli("send", "in1", "approval", env=env), "sse-gateway send: an approval needs approval_id")
    one_line_error(cli("send", "in1", "shout", env=env), "invalid choice: 'shout'")
    cancelled = json.loads(cli("cancel", "in1", "--reason", "enough", env=env).stdout)
    assert (cancelled["id"], cancelled["kind"]) == (3, "cancel")

    inputs = httpx.get(f"{gw.url}/v1/sessions/in1/input", params={"after": 0},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["inputs"]
    assert [(i["kind"], i["data"]) for i in inputs] == [("steer", {"text": "shorter"}), ("approval", None),
                                                        ("cancel", {"reason": "enough"})]
    shown = cli("tail", "in1", "--no-follow", env=env).stdout.splitlines()
    assert [line.split(None, 3)[2:] for line in shown] == [
        ["gateway.input", 'input 1 steer {"text": "shorter"}'],
        ["approval.request", '{"approval_id":"rm-1","command":"rm -rf build/"}'],
        ["gateway.input", "input 2 approval rm-1: approve"],
        ["gateway.input", 'input 3 cancel {"reason": "enough"}']]
    assert cli("complete", "in1", env=env).returncode == 0
    one_line_error(cli("cancel", "in1", env=env), "sse-gateway cancel: 409 session_completed")


def test_publish_from_standard_input_stops_at_a_bad_line_in_one_line(keyed):
    _, env = keyed
    lines = '{"data": 1}\n\n{"event": "log", "data": 2}\nnot json\n{"data": 4}\n'
    r = cli("publish", "lines", "-", env=env, input=lines)
    one_line_error(r, "standard input line 4 is not JSON")
    r = cli("tail", "lines", "--no-follow", "--json", env=env)
    assert [json.loads(line)["data"] for line in r.stdout.splitlines()] == ["1", "2"]
    r = cli("publish", "lines", "-", env=env, input='{"data": 3, "idempotency_key": "k3"}\n' * 2)
    assert json.loads(r.stdout)["ids"] == [3, 3]  # the line's own key is the event's key


def test_tail_stops_quietly_on_ctrl_c(keyed):
    gw, env = keyed
    assert cli("create", "quiet", env=env).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "sse_gateway", "tail", "quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**clean_environ(), "PYTHONPATH": str(ROOT), **env})
    headers = {"Authorization": f"Bearer {KEY}"}
    wait_until(lambda: httpx.get(f"{gw.url}/v1/sessions/quiet", headers=headers).json()["subscribers"] == 1,
               what="tail to attach")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "Traceback" not in err

"""The browser helper as an npm package: ``npm pack`` of ``static/`` installs and works, with types.

The tarball is installed with ``npm install <tarball>`` into a scratch project, which then imports
it by name from Node (ESM, ``require()``, the script build, the React hook) and reads runs on a
real gateway through it (``tests/node/package/use-package.mjs``), and ``tsc`` type-checks an app's
usage of it (``tests/node/package/usage.ts``) against the installed ``.d.ts`` files. React, the
React test renderer, ``eventsource`` and TypeScript come from ``tests/node`` (its lock file pins
them); the package itself depends on nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, require_binary

NODE_TESTS = ROOT / "tests" / "node"
FROM_TESTS = ("eventsource", "react", "react-test-renderer")  # what the scratch project borrows

pytestmark = pytest.mark.system  # node, npm, a real gateway


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false",
           "npm_config_audit": "false"}
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A scratch project with the packed package installed from its tarball."""
    npm = require_binary("npm")
    require_binary("node")
    if not (NODE_TESTS / "node_modules" / "typescript").is_dir():
        pytest.fail("tests/node has no node_modules: run `npm ci` there (scripts/test.sh does)")
    tmp = tmp_path_factory.mktemp("npm-package")
    packed = json.loads(run([npm, "pack", str(ROOT / "static"), "--json", "--pack-destination", str(tmp)],
                            cwd=tmp).stdout)
    tarball = tmp / packed[0]["filename"]
    with tarfile.open(tarball) as tar:
        names = sorted(m.name.removeprefix("package/") for m in tar.getmembers())
    assert names == ["package.json", "react.d.ts", "react.mjs", "sse-gateway.d.ts", "sse-gateway.js",
                     "sse-gateway.mjs"], "the package holds the helper, its types and the hook, not the demo"

    project = tmp / "app"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "app", "private": True, "type": "module"}))
    run([npm, "install", "--no-audit", "--no-fund", "--prefer-offline", str(tarball)], cwd=project)
    manifest = json.loads((project / "package.json").read_text())
    assert manifest["dependencies"]["sse-gateway-client"].endswith(".tgz")
    assert (project / "node_modules" / "sse-gateway-client" / "sse-gateway.d.ts").is_file()
    assert not (project / "node_modules" / "react").exists(), "react is an optional peer, never installed"
    for name in FROM_TESTS:
        (project / "node_modules" / name).symlink_to(NODE_TESTS / "node_modules" / name, target_is_directory=True)
    for name in ("use-package.mjs", "usage.ts", "global.ts", "tsconfig.json", "tsconfig.node16.json"):
        shutil.copy(NODE_TESTS / "package" / name, project / name)
    return project


@pytest.mark.timeout(180)
def test_the_packed_package_installs_and_reads_a_run_from_node(installed, start_gateway):
    gw = start_gateway("--heartbeat", "1", "--retry-ms", "100")
    done = run([require_binary("node"), "use-package.mjs", gw.url], cwd=installed, timeout=120)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "timeout" not in found, found
    assert (found["esm"], found["cjs"], found["script"], found["react"]) == (True, True, True, True)
    assert found["version"] == json.loads((ROOT / "static" / "package.json").read_text())["version"]

    text = "".join(f"w{n} " for n in range(1, 51))
    assert found["helper"] == {"text": text, "result": {"text": text}, "acked": found["helper"]["cursor"],
                               "cursor": found["helper"]["cursor"], "state": "ended",
                               "outcome": {"status": "completed", "result": {"text": text}, "error": None}}
    assert found["helper"]["cursor"].startswith("51:")
    session = httpx.get(f"{gw.url}/v1/sessions/pkg").json()
    assert session["acked_id"] == session["last_id"] == 51

    sent = found["input"]
    assert "error" not in sent, sent
    assert sent["requests"] == ["rm-1"] and sent["answers"] == [1, 2, 3] and sent["badKind"] == "invalid_kind"
    assert sent["second"] == {"code": "approval_answered", "status": 409, "inputId": 1}
    assert sent["inputs"] == [[1, "approval", "approve"], [2, "steer", None], [3, "cancel", None]]
    assert sent["view"] == ["gateway.input:approval", "gateway.input:steer", "gateway.input:cancel"]
    assert sent["approvals"]["rm-1"]["decision"] == "approve" and sent["approvals"]["rm-1"]["inputId"] == 1
    assert sent["late"] == "session_completed" and sent["cancelling"] == "cancelling"
    error = {"code": "cancelled", "message": "enough"}
    assert sent["result"] == {"status": "cancelled", "error": error, "result": {"text": "partial"}}  # the data
    assert sent["outcome"] == sent["streamOutcome"] == {"status": "cancelled", "error": error,
                                                        "result": {"text": "partial"}}
    assert sent["runStatus"] == "cancelled"

    ends = found["ends"]
    completed = {"status": "completed", "result": {"text": "hi"}, "error": None}
    failed = {"status": "failed", "result": None, "error": {"code": "tool_failed", "message": "boom"}}
    for name, outcome in (("end-ok", completed), ("end-none", {**completed, "result": None}), ("end-failed", failed)):
        for how, from_session in (("replay", False), ("after204", True)):
            assert ends[name][how] == {"outcome": outcome, "fromSession": from_session, "stream": outcome,
                                       "runStatus": outcome["status"]}, (name, how, ends[name][how])
    # A completed run whose result looks like a failure: the data alone says failed, the session says
    # completed (an end made from the session after a 204 follows it).
    lookalike = {"status": "failed", "error": "not really"}
    assert ends["end-lookalike"]["replay"]["outcome"] == {"status": "failed", "result": None, "error": "not really"}
    assert ends["end-lookalike"]["replay"]["runStatus"] == "completed"
    assert ends["end-lookalike"]["after204"]["outcome"] == {"status": "completed", "result": lookalike, "error": None}
    assert found["outcomeOf"] == [
        {"status": "timed_out", "result": None, "error": {"code": "lease_expired"}},
        {"status": "completed", "result": [1], "error": None},
        {"status": "completed", "result": {"status": "failed"}, "error": None},
        {"status": "completed", "result": None, "error": None},
    ]
    assert found["missing"] == {"code": "session_not_found", "status": 404}

    hook = found["hook"]
    assert hook["last"] == {"status": "ended", "count": 20, "ended": True, "outcome": "completed"}
    assert hook["rendered"] == json.dumps({"text": "".join(f"w{n} " for n in range(1, 21))}, separators=(",", ":"))
    assert "connecting" in hook["statuses"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("config", ["tsconfig.json", "tsconfig.node16.json"])  # bundlers; Node's own resolution
def test_the_type_declarations_check_an_apps_usage(installed, config):
    tsc = NODE_TESTS / "node_modules" / ".bin" / "tsc"
    done = subprocess.run([str(tsc), "-p", config], cwd=installed, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, f"tsc found errors:\n{done.stdout}\n{done.stderr}"

"""The deploy files, checked as far as this machine allows (no Docker engine, no running systemd).

nginx.conf runs for real in test_nginx.py; here nginx only parses it.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys

import pytest
import yaml

import nginx_conf
from conftest import ROOT, free_port, require_binary

DEPLOY = ROOT / "deploy"


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_dockerfile_builds_a_small_non_root_image_with_a_healthcheck():
    ins = dockerfile()
    keywords = [k for k, _ in ins]
    assert ins[0] == ("FROM", "python:3.11-slim")
    users = [arg for k, arg in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the gateway must not run as root"
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), "RUN after USER"
    healthcheck = " ".join(arg for k, arg in ins if k == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "--interval" in healthcheck
    cmd = next(arg for k, arg in ins if k == "CMD")
    assert cmd.startswith('["sse-gateway", "serve"') and '"--host", "0.0.0.0"' in cmd
    assert ("EXPOSE", "8000") in ins
    for k, arg in ins:
        if k == "COPY":
            *sources, _ = arg.split()
            assert all((ROOT / src).exists() for src in sources), f"COPY of a missing path: {arg}"
        if k in ("ENV", "ARG"):
            assert "PUBLISH_KEY" not in arg and "TOKEN_SECRET" not in arg, "keys belong in the run-time environment"


def test_compose_runs_two_redis_gateways_behind_the_shipped_nginx():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "gateway1", "gateway2", "nginx"} <= set(services)
    for service in services.values():
        depends = service.get("depends_on", {})
        assert set(depends) <= set(services), f"depends_on names an unknown service: {depends}"

    redis = services["redis"]
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert any(v.endswith(":/data") for v in redis["volumes"])

    for name in ("gateway1", "gateway2"):
        gw = services[name]
        command = gw["command"]
        assert command[:2] == ["sse-gateway", "serve"]
        assert command[command.index("--backend") + 1] == "redis"
        assert command[command.index("--redis-url") + 1] == "redis://redis:6379/0"
        assert (DEPLOY / gw["build"]["context"] / gw["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        env = gw["environment"]
        assert {"SSE_GATEWAY_PUBLISH_KEY", "SSE_GATEWAY_TOKEN_SECRET"} <= set(env)
        assert all(value.startswith("${") for value in env.values()), "no key is written in the compose file"
        assert gw["depends_on"]["redis"]["condition"] == "service_healthy"

    nginx = services["nginx"]
    source, target, *_ = nginx["volumes"][0].split(":")
    assert (DEPLOY / source).resolve() == DEPLOY / "nginx.conf" and target == "/etc/nginx/nginx.conf"
    assert set(nginx["depends_on"]) == {"gateway1", "gateway2"}
    upstreams = nginx_conf.upstream_servers()
    assert sorted(upstreams) == ["gateway1:8000", "gateway2:8000"], "nginx.conf upstreams are not the gateways"


@pytest.mark.system  # runs nginx -t
def test_nginx_accepts_the_shipped_config(tmp_path):
    binary = require_binary("nginx", "/usr/sbin/nginx")
    conf = nginx_conf.render(tmp_path, upstreams=["127.0.0.1:8001", "127.0.0.1:8002"], port=free_port())
    check = subprocess.run([binary, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)],
                           check=False, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert "test is successful" in check.stderr

    text = nginx_conf.SHIPPED.read_text()
    stream = text[text.index("location ~ ^/v1/sessions/[^/]+/stream$"):]
    stream = stream[:stream.index("}")]
    for directive in ("proxy_buffering off;", "proxy_cache off;", "gzip off;", "proxy_read_timeout"):
        assert directive in stream, f"the stream location lacks {directive}"
    for directive in ("proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                      "proxy_set_header Last-Event-ID $http_last_event_id;", "keepalive 64;"):
        assert directive in text, f"nginx.conf lacks {directive}"
    gzip_types = re.search(r"gzip_types ([^;]*);", text).group(1)
    assert "text/event-stream" not in gzip_types


def systemd_unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(DEPLOY / "sse-gateway.service")
    return unit


def test_systemd_unit_is_hardened_and_restarts():
    service = systemd_unit()["Service"]
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root", "0")
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"].startswith("/etc/")
    assert service["ExecStart"].split()[1:] == ["serve"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes"}.items():
        assert service.get(key) == value, f"{key}={value} is missing"
    assert systemd_unit()["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip(reason="systemd-analyze is not installed; the structural test above still runs")
    program = systemd_unit()["Service"]["ExecStart"].split()[0]
    unit = tmp_path / "sse-gateway.service"  # the same unit, with a program that exists on this machine
    unit.write_text((DEPLOY / "sse-gateway.service").read_text().replace(program, sys.executable))
    result = subprocess.run([analyze, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "sse-gateway.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr

"""deploy/nginx.conf made runnable here: the shipped file with only its addresses, paths and timeout replaced.

Every replacement must match exactly as often as expected, so a change in
the shipped file that the tests no longer cover fails loudly instead of
being tested in a form that is not shipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

SHIPPED = ROOT / "deploy" / "nginx.conf"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render(tmp: Path, *, upstreams: list[str], port: int, read_timeout: str | None = None) -> Path:
    """Write a copy of deploy/nginx.conf into ``tmp`` that runs unprivileged on ``port``; returns its path."""
    text = SHIPPED.read_text()

    def sub(pattern: str, repl: str) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
        assert n == 1, f"deploy/nginx.conf: {pattern!r} matched {n} times, expected once"

    sub(r"^([ \t]+server \S+:\d+;\n)+", "".join(f"        server {u};\n" for u in upstreams))
    sub(r"^([ \t]+)listen \d+;", rf"\g<1>listen 127.0.0.1:{port};")
    sub(r"^pid \S+;", f"pid {tmp}/nginx.pid;")
    sub(r"^error_log \S+", f"error_log {tmp}/error.log")
    sub(r"^([ \t]+)access_log \S+;", rf"\g<1>access_log {tmp}/access.log;")
    sub(r"^http \{\n", "http {\n" + "".join(f"    {name}_temp_path {tmp}/{name};\n" for name in TEMP_PATHS))
    if read_timeout is not None:
        sub(r"proxy_read_timeout \S+;", f"proxy_read_timeout {read_timeout};")
    out = tmp / "nginx.conf"
    out.write_text(text)
    return out


def upstream_servers() -> list[str]:
    """The ``host:port`` of each upstream server in the shipped file."""
    return re.findall(r"^[ \t]+server (\S+:\d+);", SHIPPED.read_text(), flags=re.MULTILINE)

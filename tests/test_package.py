"""The built wheel is the whole product: it serves the demo page and the helper without a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import httpx
import pytest
from conftest import ROOT, Gateway

pytestmark = pytest.mark.timeout(300)


def test_a_wheel_serves_the_demo_page_and_the_helper_without_a_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                    str(ROOT)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("sse_gateway-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "sse_gateway").rglob("*") if p.suffix in (".py", ".lua")}
    assert sources - set(names) == set(), "modules the wheel lacks (a subpackage missing from pyproject.toml?)"
    for name in ("sse_gateway/static/index.html", "sse_gateway/static/sse-gateway.js", "sse_gateway/static/react.mjs"):
        assert name in names, name
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    gw = Gateway(tmp_path, env={"PYTHONPATH": str(site)})  # the wheel's package, not the checkout's
    gw.start()
    try:
        served_from = subprocess.run([sys.executable, "-c", "import sse_gateway; print(sse_gateway.__file__)"],
                                     env={"PYTHONPATH": str(site)}, cwd=tmp_path, capture_output=True,
                                     text=True, check=True).stdout
        assert served_from.startswith(str(site))
        page = httpx.get(gw.url + "/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        helper = httpx.get(gw.url + "/static/sse-gateway.js")
        assert helper.status_code == 200
        assert helper.text == (ROOT / "static" / "sse-gateway.js").read_text()
    finally:
        gw.stop()

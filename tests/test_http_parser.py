"""Requests the HTTP parser refuses get the gateway's JSON error, and the header limit holds in one read."""

from __future__ import annotations

import json
import socket

import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def gw(start_module_gateway):
    return start_module_gateway()


def exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` in one write; the status line and the body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        try:
            s.sendall(request)
        except OSError:
            pass
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /healthz HTTP/1.1\r\nHost: [::1]\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", b"431", "headers_too_large"),
    (b"GET /" + b"p" * 70_000 + b" HTTP/1.1\r\nHost: [::1]\r\n\r\n", b"431", "headers_too_large"),
    (b"POST /v1/sessions/a/events HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n{}",
     b"400", "invalid_http"),
    (b"POST /v1/sessions/a/events HTTP/1.1\r\nHost: [::1]\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
     b"400", "invalid_http"),
    (b"GET /healthz HTTP/1.1\r\nHost: [::1]\r\nX-Nul: a\x00b\r\n\r\n", b"400", "invalid_http"),
    (b"GET /v1/sessions/\xff HTTP/1.1\r\nHost: [::1]\r\n\r\n", b"400", "invalid_http"),
], ids=["one huge header in one write", "huge request line", "two Content-Lengths", "bad chunk size",
        "NUL in a header", "0xFF in the path"])
def test_refused_by_the_parser_with_a_json_error(gw, request_bytes, status, code):
    line, body = exchange(gw.port, request_bytes)
    assert line.split(b" ")[1] == status, line
    assert json.loads(body)["error"]["code"] == code
    line, _ = exchange(gw.port, b"GET /healthz HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n")
    assert line.split(b" ")[1] == b"200"  # the gateway serves on


def test_a_large_body_in_the_same_read_as_the_headers_is_not_a_large_header(gw):
    body = json.dumps({"data": "x" * 200_000}).encode()
    line, answer = exchange(gw.port, b"POST /v1/sessions/big/events HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n"
                            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert line.split(b" ")[1] == b"201", answer


@pytest.mark.parametrize("path", ["/v1/sessions/left/events", "/v1/sessions", "/v1/sessions/left/complete"])
def test_a_client_that_leaves_mid_body_is_not_logged_as_a_bug(start_gateway, path):
    gw = start_gateway()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
            s.sendall(b"POST %s HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
                      b"\r\n{\"data\":" % path.encode())
        line, _ = exchange(gw.port, b"GET /healthz HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n")
        assert line.split(b" ")[1] == b"200"
    gw.stop()
    assert "Traceback" not in gw.log() and "this is a bug" not in gw.log()

"""A web page cannot write to a gateway across sites, nor reach an open one through a rebound name.

Browsers send a form or a ``text/plain`` POST to any address without a CORS
preflight, and a page can make its own host name resolve to 127.0.0.1 (DNS
rebinding). These tests send exactly what such a page's browser would send.
"""

from __future__ import annotations

import socket

import httpx
import pytest
from util import wait_until

pytestmark = pytest.mark.timeout(60)

EVIL = "https://evil.example"
# (method, path, body, content type) of every write a page might try, the JSON ones sent as a browser may
WRITES = [
    ("POST", "/v1/sessions/s1/events", b"hello", "text/plain"),
    ("POST", "/v1/sessions/s1/trim", b'{"through": 5}', "text/plain"),
    ("POST", "/v1/sessions/s1/complete", b'{"result": "forged"}', "text/plain"),
    ("POST", "/v1/sessions/s1/ack", b'{"id": 5}', "application/x-www-form-urlencoded"),
    ("POST", "/v1/sessions", b'{"id": "s2"}', "text/plain"),
    ("POST", "/v1/demo/runs", b"", "text/plain"),
    ("DELETE", "/v1/sessions/s1", b"", "text/plain"),
    ("PUT", "/v1/sessions/s1/state", b'{"a": 1}', "text/plain"),
    ("POST", "/v1/sessions/s1/input", b'{"kind": "cancel"}', "text/plain"),
    ("POST", "/v1/sessions/s1/input", b'{"kind": "approval", "approval_id": "a", "decision": "approve"}',
     "multipart/form-data"),
    ("POST", "/v1/sessions/s1/input/ack", b'{"id": 0}', "text/plain"),
]


@pytest.fixture(scope="module")
def gw(start_module_gateway):
    return start_module_gateway("--cors-origin", "https://app.example")


@pytest.fixture
def session(gw):
    with httpx.Client(base_url=gw.url) as c:
        c.delete("/v1/sessions/s1")
        c.delete("/v1/sessions/s2")
        ids = c.post("/v1/sessions/s1/events", json=[{"data": i} for i in range(10)]).json()["ids"]
        assert ids == list(range(1, 11))
        yield c


def unchanged(c: httpx.Client) -> None:
    row = c.get("/v1/sessions/s1").json()
    assert (row["status"], row["earliest_id"], row["last_id"], row["acked_id"], row["state_version"]) == \
        ("open", 1, 10, 0, 0)
    assert (row["input_last_id"], row["input_acked_id"]) == (0, 0)
    assert c.get("/v1/sessions/s2").status_code == 404
    assert [s["id"] for s in c.get("/v1/sessions").json()["sessions"]] == ["s1"]


@pytest.mark.parametrize("method, path, body, kind", WRITES, ids=[f"{m} {p}" for m, p, *_ in WRITES])
def test_a_write_from_another_site_is_refused_and_changes_nothing(session, method, path, body, kind):
    r = session.request(method, path, content=body, headers={"origin": EVIL, "content-type": kind})
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_refused"
    r = session.request(method, path, content=body, headers={"origin": "null", "content-type": kind})
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_refused"
    unchanged(session)


JSON_WRITES = [w for w in WRITES if w[2] and w[1] != "/v1/sessions/s1/events"]


@pytest.mark.parametrize("method, path, body, kind", JSON_WRITES, ids=[f"{m} {p}" for m, p, *_ in JSON_WRITES])
def test_a_json_request_from_a_page_must_say_it_is_json(gw, session, method, path, body, kind):
    own = f"http://127.0.0.1:{gw.port}"  # even the gateway's own page: a form is not JSON
    r = session.request(method, path, content=body, headers={"content-type": kind, "origin": own})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    unchanged(session)


def test_clients_that_are_not_browsers_are_taken_at_their_word(session):
    """No Origin: a JSON body sent as a form (curl -d) is read as JSON, as it always was."""
    r = session.post("/v1/sessions/s1/ack", content=b'{"id": 3}',
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["acked_id"] == 3


def test_a_read_from_another_site_is_served_without_side_effects(session):
    for headers in ({"origin": EVIL}, {"sec-fetch-site": "cross-site"}):  # an EventSource, an <img>
        r = session.get("/v1/sessions/s1/stream", params={"live": "false", "last_event_id": "7"}, headers=headers)
        assert r.status_code == 200
    r = session.get("/v1/sessions/s1/stream", params={"live": "false", "last_event_id": "3"})
    assert r.status_code == 200
    wait_until(lambda: session.get("/v1/sessions/s1").json()["acked_id"] >= 3,
               what="a read from no other site to count as an ack")
    assert session.get("/v1/sessions/s1").json()["acked_id"] == 3  # acks only move up: 7 was never taken


def test_two_host_or_origin_headers_are_refused(gw):
    for name in (b"Host", b"Origin"):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
            s.sendall(b"POST /v1/sessions/s1/trim HTTP/1.1\r\nHost: 127.0.0.1\r\n%s: http://127.0.0.1:%d\r\n"
                      b"%s: https://evil.example\r\nContent-Type: application/json\r\nContent-Length: 14\r\n"
                      b"Connection: close\r\n\r\n{\"through\": 5}" % (name, gw.port, name))
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400") and b'"invalid_http"' in answer, answer[:200]


def test_the_gateways_own_page_and_listed_sites_may_write(gw, session):
    port = gw.port
    for origin in (f"http://127.0.0.1:{port}", "https://app.example"):
        r = session.post("/v1/sessions/s1/events", json={"data": origin}, headers={"origin": origin})
        assert r.status_code == 201, r.text
    r = session.post("/v1/sessions/s1/events", json={"data": 1}, headers={"origin": f"http://127.0.0.1:{port + 1}"})
    assert r.status_code == 403  # another port of the same machine is another site


@pytest.mark.parametrize("host", ["evil.example", f"evil.example:{8000}", "rebind.attacker.test"])
def test_an_open_gateway_answers_only_local_names(gw, session, host):
    for method, path in (("GET", "/v1/sessions/s1"), ("GET", "/v1/sessions/s1/events"),
                         ("GET", "/v1/sessions/s1/stream?live=false"), ("POST", "/v1/sessions/s1/trim")):
        r = session.request(method, path, headers={"host": host}, json={"through": 9} if method == "POST" else None)
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", (path, r.text)
    unchanged(session)
    for ok in ("localhost", f"localhost:{gw.port}", "127.0.0.1", "[::1]:80", "app.localhost"):
        assert session.get("/v1/sessions/s1", headers={"host": ok}).status_code == 200, ok


def test_named_hosts_keyed_and_network_gateways_answer_to_their_names(start_gateway):
    named = start_gateway("--allowed-host", "gw.internal")
    assert httpx.get(named.url + "/healthz", headers={"host": "gw.internal"}).status_code == 200
    assert httpx.get(named.url + "/healthz", headers={"host": "other.internal"}).status_code == 403
    network = start_gateway("--host", "0.0.0.0", "--insecure")  # open to the network by choice
    assert httpx.get(network.url + "/healthz", headers={"host": "gateway.svc"}).status_code == 200
    keyed = start_gateway("--publish-key", "k" * 40)
    assert httpx.get(keyed.url + "/healthz", headers={"host": "gw.example.com"}).status_code == 200
    r = httpx.post(keyed.url + "/v1/sessions/s/events", json={"data": 1},
                   headers={"authorization": "Bearer " + "k" * 40, "origin": EVIL})
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_refused"

"""Limits and slow clients: overload is refused at once (with Retry-After), never queued.

The session limit runs in process (tests/conftest.py ``start_app``); open streams and slow sockets need
a real gateway. A slow client is "cut" when the gateway hangs up before the client has sent all it
meant to: no test measures how long that took.
"""

from __future__ import annotations

import socket
import threading

import httpx
import pytest
from util import WAIT_TIMEOUT, wait_until

pytestmark = pytest.mark.timeout(60)


def assert_overloaded(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert int(r.headers["retry-after"]) > 0


def test_max_sessions_counts_every_way_of_creating_one(start_app):
    gw = start_app(max_sessions=3)
    with gw.client(timeout=10) as c:
        assert c.post("/v1/sessions", json={"id": "s1"}).status_code == 201
        assert c.post("/v1/sessions/s2/events", json={"data": 1}).status_code == 201  # auto-created
        assert c.put("/v1/sessions/s3/state", json={"a": 1}).status_code == 200  # auto-created
        assert_overloaded(c.post("/v1/sessions", json={"id": "s4"}), 503, "too_many_sessions")
        assert_overloaded(c.post("/v1/sessions/s4/events", json={"data": 1}), 503, "too_many_sessions")
        assert_overloaded(c.post("/v1/sessions/s4/events", content="x", headers={"content-type": "text/plain"}),
                          503, "too_many_sessions")
        assert_overloaded(c.put("/v1/sessions/s4/state", json={"a": 1}), 503, "too_many_sessions")
        assert c.get("/v1/sessions/s4").status_code == 404
        assert c.post("/v1/sessions/s2/events", json={"data": 2}).status_code == 201  # existing sessions: fine
        assert c.delete("/v1/sessions/s1").status_code == 204
        assert c.post("/v1/sessions/s4/events", json={"data": 1}).status_code == 201


def test_max_streams_in_total_and_per_session(start_gateway):
    gw = start_gateway("--max-streams", "3", "--max-streams-per-session", "2", "--heartbeat", "1")
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        for s in ("a", "b", "c"):
            c.post(f"/v1/sessions/{s}/events", json={"data": 1})

        def open_stream(session: str):
            cm = c.stream("GET", f"/v1/sessions/{session}/stream")
            r = cm.__enter__()
            return cm, r

        a1, a2 = open_stream("a"), open_stream("a")
        assert a1[1].status_code == a2[1].status_code == 200
        cm, r = open_stream("a")
        r.read()
        assert_overloaded(r, 429, "too_many_streams_for_session")
        cm.__exit__(None, None, None)
        b1 = open_stream("b")
        assert b1[1].status_code == 200
        cm, r = open_stream("c")
        r.read()
        assert_overloaded(r, 503, "too_many_streams")
        cm.__exit__(None, None, None)
        assert c.get("/v1/sessions/a").json()["subscribers"] == 2
        # replay-only reads count while they run, and give their slot back
        assert_overloaded(c.get("/v1/sessions/c/stream", params={"live": "false"}), 503, "too_many_streams")
        a1[0].__exit__(None, None, None)  # a stream ends: its slot is free again
        wait_until(lambda: c.get("/v1/sessions/a").json()["subscribers"] == 1,
                   what="a closed stream of a to give its slot back")
        for _ in range(5):
            assert c.get("/v1/sessions/c/stream", params={"live": "false"}).status_code == 200
        cm, r = open_stream("c")
        assert r.status_code == 200
        for held in (cm, a2[0], b1[0]):
            held.__exit__(None, None, None)


# -- slow clients -------------------------------------------------------------------------


class Trickler(threading.Thread):
    """A raw socket that sends ``head`` and then ``trickle`` one byte at a time, every ``pause`` seconds.

    The pause is the slow client under test, not a wait for something. ``sent`` counts the trickled
    bytes that went out, ``cut`` says the gateway hung up (the trickle failed, or its answer ended
    while the trickle was still going), and ``closed_by_server`` that the answer ended in a close,
    not in this socket's timeout.
    """

    def __init__(self, port: int, head: bytes, trickle: bytes, pause: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_TIMEOUT)
        self.head, self.trickle, self.pause = head, trickle, pause
        self.answer = b""
        self.sent = 0
        self.cut = threading.Event()
        self.closed_by_server = False
        self._pause = threading.Event()  # never set: waiting on it is the pause

    def run(self) -> None:
        try:
            self.sock.sendall(self.head)
            for byte in self.trickle:
                self.sock.sendall(bytes([byte]))
                self.sent += 1
                if self._pause.wait(self.pause):
                    break
        except OSError:
            self.cut.set()  # the server hung up on us, as it should
        try:
            while chunk := self.sock.recv(65536):
                self.answer += chunk
            self.closed_by_server = True
        except OSError:
            pass
        self.cut.set()
        self.sock.close()

    def assert_cut(self) -> None:
        """The gateway hung up before the trickle was through (it would have taken minutes)."""
        self.join(WAIT_TIMEOUT)
        assert not self.is_alive(), "the gateway never cut a trickling client"
        assert self.closed_by_server and self.sent < len(self.trickle), (self.sent, len(self.trickle), self.answer)


def responsive(url: str, holding: list[Trickler]) -> int:
    """Requests served one after another while every trickler holds its connection; each must succeed."""
    served = 0
    with httpx.Client(base_url=url, timeout=WAIT_TIMEOUT) as c:
        while not any(t.cut.is_set() for t in holding):
            assert c.post("/v1/sessions/other/events", json={"data": served}).status_code == 201
            served += 1
    return served


@pytest.fixture
def slow_gw(start_gateway):
    return start_gateway("--header-timeout", "1", "--body-timeout", "1", "--ndjson-line-timeout", "1")


def test_trickling_headers_are_cut_and_others_are_served(slow_gw):
    endless = b"X-Slow: " + b"a" * 1000
    clients = [Trickler(slow_gw.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", endless) for _ in range(20)]
    silent = Trickler(slow_gw.port, b"", b"")  # connects and says nothing
    for t in (*clients, silent):
        t.start()
    assert responsive(slow_gw.url, clients) >= 3  # served while 20 clients trickled their headers
    for t in clients:
        t.assert_cut()
    silent.join(WAIT_TIMEOUT)
    assert silent.closed_by_server
    for t in clients:
        assert t.answer.startswith(b"HTTP/1.1 408") and b'"header_timeout"' in t.answer
    assert silent.answer == b""  # nothing was asked: closed without a word


def test_a_keep_alive_connection_cannot_trickle_its_next_request(slow_gw):
    first = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    t = Trickler(slow_gw.port, first + b"GET /healthz HTTP/1.1\r\n", b"X-Slow: " + b"a" * 100)
    t.start()
    t.assert_cut()
    assert t.answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in t.answer


def test_oversized_headers_are_refused(slow_gw):
    with socket.create_connection(("127.0.0.1", slow_gw.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for _ in range(100):
                s.sendall(b"X-Big: " + b"b" * 4000 + b"\r\n")
        except OSError:
            pass
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431") and b'"headers_too_large"' in answer


def test_trickling_bodies_are_cut_and_nothing_is_appended(slow_gw):
    head = (b"POST /v1/sessions/slow/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n")
    clients = [Trickler(slow_gw.port, head, b'{"data": "' + b"z" * 180 + b'"}') for _ in range(10)]
    for t in clients:
        t.start()
    assert responsive(slow_gw.url, clients) >= 3  # served while 10 clients trickled their bodies
    for t in clients:
        t.assert_cut()
        assert t.answer.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in t.answer, t.answer
        assert b"connection: close" in t.answer.lower()
    assert httpx.get(f"{slow_gw.url}/v1/sessions/slow").status_code == 404


def test_an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not(start_gateway):
    """--keep-alive counts from a connection's last answer: one that keeps asking, a request a second for
    longer than the keep-alive, stays open; one that asked once is closed."""
    gw = start_gateway("--keep-alive", "3")
    request = (b"POST /v1/sessions/ka/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: 11\r\n\r\n{\"data\": 1}")

    def ask(s: socket.socket) -> None:
        s.sendall(request)
        assert s.recv(65536).startswith(b"HTTP/1.1 201")

    with socket.create_connection(("127.0.0.1", gw.port), timeout=WAIT_TIMEOUT) as idle, \
            socket.create_connection(("127.0.0.1", gw.port), timeout=WAIT_TIMEOUT) as busy:
        ask(idle)
        for _ in range(5):  # 5 s of requests, one a second: pacing, the behaviour under test
            ask(busy)
            threading.Event().wait(1)
        ask(busy)
        assert idle.recv(65536) == b""  # closed by the gateway (waits for it, up to WAIT_TIMEOUT)


def test_an_ndjson_stream_must_complete_a_line_in_time(slow_gw):
    head = (b"POST /v1/sessions/nd/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-ndjson\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    pause = threading.Event()  # never set: .wait(t) is a pause that is the slow client under test
    unfinished = b'{"data": "trickled, never finished, one byte at a time, for as long as it takes"'
    with socket.create_connection(("127.0.0.1", slow_gw.port), timeout=WAIT_TIMEOUT) as s:
        s.sendall(head + chunk(b'{"data": 1}\n'))
        for _ in range(3):  # blank lines keep a quiet stream alive
            pause.wait(0.6)
            s.sendall(chunk(b"\n"))
        s.sendall(chunk(b'{"data": 2}\n'))
        sent = 0
        try:
            for byte in unfinished:
                s.sendall(chunk(bytes([byte])))
                sent += 1
                pause.wait(0.1)
        except OSError:
            pass
        answer = b""
        while data := s.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 408") and b'"line_timeout"' in answer and b'"ids":[1,2]' in answer
    assert sent < len(unfinished)  # cut while trickling, not after
    assert httpx.get(f"{slow_gw.url}/v1/sessions/nd").json()["last_id"] == 2


def test_a_body_nobody_reads_ends_the_connection(start_gateway):
    gw = start_gateway("--publish-key", "k" * 40)
    head = b"POST /v1/sessions/x/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
    t = Trickler(gw.port, head, b"y" * 1000, pause=0.05)  # 50 s of a body that would never be complete
    t.start()
    t.assert_cut()
    assert t.answer.startswith(b"HTTP/1.1 401") and b"connection: close" in t.answer.lower()

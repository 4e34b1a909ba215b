"""Wake-ups between the processes on one SQLite file (a Unix datagram socket each), and their writers' turn.

Every process that opens the log (``SqliteLog``) binds a socket
``<db>-wake/<pid>-<random>.sock``; the directory is made mode 0700, so only
the file's owner can send to it. After each transaction it commits, the
writer's thread sends every other socket there one small datagram (a few
when many sessions moved at once) that says what changed: for each
session whose events, life or input moved, ``[name, sid, epoch, last_id,
status, input_last_id]`` (``epoch`` None: deleted; ``sid`` is the row's,
never reused, so a later life has a larger one). A transaction that moved
nothing a reader needs (an ack, a state, a purge) still sends an empty
one: the receiver then knows that the store's ``PRAGMA data_version``
moved for a reason it was told of. The receiving log turns the entries of
the sessions it watches into ``moved``/``deleted`` facts without reading
the store (``SqliteLog._heard``).

Sending never blocks the writer: a datagram that does not fit in a peer's
buffer is dropped. Each carries its sender's sequence number, so the
receiver notices a gap, and the log's ``PRAGMA data_version`` poller,
which stays, re-reads the watched rows then (``SqliteLog._poll_loop``).
So correctness never depends on a datagram, only promptness does; a
process that sends none (an older gateway, another program) is noticed
by the poller alone.

The directory also holds ``writer.lock``. Each process holds it
(``flock``) around every write transaction (``SqliteLog._transaction``),
so the writers on the file queue in the kernel and the next one begins the
moment the last one commits; without it, a writer that finds SQLite's
write lock taken polls it in sleeps of 1, 2, 5, 10 ms and more (SQLite's
busy handler), which idles every writer but one when several commit all
the time. A process that does not take it (an older gateway) still waits
on SQLite's lock, as before.

Peers are found by listing the directory, at most once a second when
sending, and at once when a process says hello (each one sends every
peer a hello when it joins). A socket whose process died refuses
datagrams; the first sender that meets it removes it. The directory is
reached through a descriptor of its own, and the sockets through
``/proc/self/fd/N/NAME`` when their full path is too long for a socket
address (108 bytes on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator

import orjson

#: the largest datagram sent; more entries than fit go in several
MAX_DATAGRAM = 16 << 10
#: how often a sender lists the directory for peers that joined without its hearing their hello
PEERS_EVERY = 1.0
_HELLO = b"H"
_COMMIT = b"C"
_ADDRESS_MAX = 100  # bytes of a socket path; sun_path holds 108 with its NUL


def wake_dir(db_path: str) -> str:
    """The directory of the wake-up sockets of the processes on ``db_path``."""
    return db_path + "-wake"


class Wake:
    """This process's wake-up socket on one SQLite file: sends what each commit changed, hears the others'.

    ``heard(sender, seq, entries)`` is called on the event loop for every datagram of another process.
    ``send`` is called on the writer's thread; everything else on the loop.
    """

    def __init__(self, db_path: str, heard: Callable[[str, int, list], None]) -> None:
        self.dir = wake_dir(db_path)
        self.heard = heard
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        self.sock: socket.socket | None = None
        self.seq = 0  # the sequence number of the last datagram sent
        self.dropped = 0  # datagrams a peer had no room for
        self._dirfd: int | None = None
        self._prefix = ""  # how a socket's name becomes its address
        self._peers: list[str] = []
        self._listed = float("-inf")  # when the directory was last listed (monotonic)
        self._stale = True  # a peer joined or left: list the directory before the next send
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lock: int | None = None  # the writers' turn: a descriptor of writer.lock, for flock

    def open(self, loop: asyncio.AbstractEventLoop) -> str | None:
        """Bind this process's socket and greet the peers; returns why it cannot (then nothing is sent
        or heard: the poller alone notices the other processes' commits)."""
        sock = None
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self._dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)  # a file there: ENOTDIR
            full = os.path.join(os.path.abspath(self.dir), "")
            self._prefix = full if len(os.fsencode(full + self.name)) <= _ADDRESS_MAX \
                else f"/proc/self/fd/{self._dirfd}/"
            self.lock = os.open("writer.lock", os.O_RDWR | os.O_CREAT, 0o600, dir_fd=self._dirfd)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(self._prefix + self.name)
            with contextlib.suppress(OSError):  # room for bursts; the kernel caps it at net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError as exc:
            if sock is not None:
                sock.close()
            self._close_dir()
            return f"{self.dir}: {exc.strerror or exc}"
        self.sock = sock
        self._loop = loop
        loop.add_reader(sock.fileno(), self._readable)
        self._list_peers()
        self._send_all(_HELLO)
        return None

    def close(self) -> None:
        if self.sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        with contextlib.suppress(OSError):
            os.unlink(self.name, dir_fd=self._dirfd)
        self._close_dir()

    def _close_dir(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None

    # -- sending (the writer's thread) ------------------------------------------------------------

    def send(self, entries: list[list]) -> None:
        """Tell every peer what one commit changed (``entries`` may be empty: something else moved)."""
        if self.sock is None:
            return
        if self._stale or time.monotonic() - self._listed > PEERS_EVERY:
            self._list_peers()
        if not self._peers:
            return
        for body in self._datagrams(entries):
            self._send_all(body)

    def _datagrams(self, entries: list[list]) -> Iterator[bytes]:
        """``C[seq,[entry,...]]`` datagrams of at most ``MAX_DATAGRAM`` bytes (one entry each at least)."""
        parts = [orjson.dumps(entry) for entry in entries]
        start = 0
        while True:
            self.seq += 1
            head = b"%s[%d,[" % (_COMMIT, self.seq)
            size, end = len(head) + 2, start
            while end < len(parts) and (end == start or size + len(parts[end]) + 1 <= MAX_DATAGRAM):
                size += len(parts[end]) + 1
                end += 1
            yield head + b",".join(parts[start:end]) + b"]]"
            if end >= len(parts):
                return
            start = end

    def _send_all(self, body: bytes) -> None:
        for peer in self._peers:
            try:
                self.sock.sendto(body, self._prefix + peer)
            except (BlockingIOError, InterruptedError):
                self.dropped += 1  # its buffer is full: it sees the gap in our sequence and polls
            except ConnectionRefusedError:  # nobody reads it: its process died
                with contextlib.suppress(OSError):
                    os.unlink(peer, dir_fd=self._dirfd)
                self._stale = True
            except OSError:  # gone meanwhile, or any other trouble: the poller is the safety net
                self._stale = True

    def _list_peers(self) -> None:
        try:
            names = os.listdir(self._dirfd)
        except OSError:
            names = []
        self._peers = [n for n in names if n.endswith(".sock") and n != self.name]
        self._listed = time.monotonic()
        self._stale = False

    # -- hearing (the event loop) ------------------------------------------------------------------

    def _readable(self) -> None:
        for _ in range(256):  # then let the loop run; the rest is read on its next turn
            try:
                data, sender = self.sock.recvfrom(MAX_DATAGRAM + 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if data[:1] == _HELLO:
                self._stale = True
                continue
            if data[:1] != _COMMIT:
                continue
            try:
                seq, entries = orjson.loads(data[1:])
            except (orjson.JSONDecodeError, ValueError, TypeError):
                continue
            self.heard(os.path.basename(sender or ""), seq, entries)

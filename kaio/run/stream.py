"""The other nodes' journals streamed to the head over TCP, and each node's clock measured against the head's.

A node's kaio (not its ranks: the training never waits) sends the head what its
``journal.jsonl`` holds past what the head already has; the head appends it to
its copy, ``nodes/<rank>-<host>/journal.jsonl``, which its live view
(``NodeWatch``) and the job's report read as they read a shared folder. On a
shared filesystem the head finds the node's own folder (its ``stream-token``)
and keeps no copy: the connection then only measures the clock.

Nothing is queued in memory: the journal on disk is the buffer. After a
disconnection the node connects again (every 1-10 s) and the head says how many
bytes of that journal it holds; the node resends from there, whole lines only,
so nothing is lost or written twice.

The transport is the standard library's: one TCP connection per node, a
``socketserver`` thread per connection on the head. What is needed is "append
these bytes after the last one you hold", which no message queue gives by
itself (ZeroMQ drops or blocks, and does not resume from an offset); the
journal's offsets make it a few frames on a socket, with no new dependency.

Every connection is authenticated by the job's secret, ``KAIO_JOB_SECRET``,
the same on every node (SLURM passes the batch script's environment to every
task). The head sends a random challenge; the node's hello is signed with
HMAC-SHA256 over it; a hello not signed with the secret is refused before
anything is written. The secret is never written anywhere.

Clock: every 10 s a node sends its time ``t0``, the head answers its own
``t1``, the node reads its time ``t3``: the node's clock minus the head's is
``(t0 + t3) / 2 - t1``, within half the round trip; the sample with the
shortest round trip of the last 8 is kept. The merge itself compares no clocks
(it goes by global step); the offset says how far the nodes' wall times in
their records may be from the head's.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import socket
import socketserver
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import msgspec

from kaio.fsutil import atomic_write_bytes
from kaio.nodes import ENV_JOB_SECRET, job_secret
from kaio.record.paths import ProjectPaths, is_node_folder
from kaio.record.types import ClockOffset

MAX_FRAME = 4 << 20  # one frame's payload at most
SEND_BYTES = 1 << 20  # what one data frame carries, unless a single line is longer (then up to MAX_FRAME)
HELLO_LIMIT = 4 << 10
HANDSHAKE_S = 5.0  # a connection that has not proved the secret by then is closed
PROBE_EVERY_S = 10.0
PROBES_KEPT = 8
IDLE_S = 0.5  # a node looks for new journal lines this often
SILENT_LIMIT_S = 120.0  # the head drops a connection silent this long (a node probes every 10 s)
_PROTOCOL = b"kaio-stream-1"
_HEADER = struct.Struct("!cI")
_PROBE = struct.Struct("!d")
_REPLY = struct.Struct("!dd")
_OFFSET = struct.Struct("!Q")
_BROKEN = (OSError, ConnectionError, ValueError, struct.error, msgspec.MsgspecError)  # a connection to drop


class Hello(msgspec.Struct):
    """A node's first frame (after the MAC): which journal it streams, and where it stands."""

    folder: str  # <node rank>-<host>, its folder under the project's nodes/
    token: str  # what its stream-token file holds
    journal_size: int
    journal_start: str  # sha256 of its journal's first line ("" while empty): the head's copy is of this journal
    nonce: str  # the node's challenge: the head's answer is signed over it


class Accept(msgspec.Struct):
    offset: int  # the bytes of the node's journal the head holds: the node sends from there
    shared: bool  # the head reads the node's own folder: no copy, no data


def _mac(secret: bytes, nonce: bytes, body: bytes) -> bytes:
    return hmac.new(secret, _PROTOCOL + nonce + body, hashlib.sha256).digest()


def _send(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    chunks, left = [], n
    while left:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionError("too slow")
            sock.settimeout(remaining)
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("closed by the other end")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket, limit: int = MAX_FRAME, deadline: float | None = None) -> tuple[bytes, bytes]:
    """One frame; ``deadline`` (monotonic): the whole frame by then, however slowly it trickles in."""
    kind, size = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
    if size > limit:
        raise ConnectionError(f"a frame of {size} bytes (at most {limit})")
    return kind, _recv_exact(sock, size, deadline)


def _first_line_digest(path: Path) -> tuple[str, int]:
    """sha256 of the file's first whole line ("" when it has none yet), and the file's size."""
    try:
        with open(path, "rb") as f:
            line = f.readline(MAX_FRAME)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return "", 0
    return (hashlib.sha256(line).hexdigest() if line.endswith(b"\n") else ""), size


# ---------------------------------------------------------------- the head


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # a head started again at once finds its port free
    daemon_threads = True


class JournalReceiver:
    """On the head: accepts the other nodes' streams, keeps a copy of each journal under ``nodes/``.

    One thread per connection, at most ``2 × nodes + 8`` at once (a node reconnecting overlaps its old
    connection); a connection must prove the secret within ``HANDSHAKE_S``, with a hello of at most
    ``HELLO_LIMIT`` bytes: a stranger holds nothing for long."""

    def __init__(self, paths: ProjectPaths, secret: bytes, port: int, host: str = "", nodes: int = 64) -> None:
        self.paths = paths
        self._secret = secret
        self._address = (host, port)
        self._id = _head_mark(paths)  # the project's head's mark on the copies it writes
        self._slots = threading.BoundedSemaphore(2 * nodes + 8)
        self._lock = threading.Lock()
        self._warnings: list[str] = []
        self._said: set[str] = set()
        self._active: dict[str, socket.socket] = {}
        self._folder_locks: dict[str, threading.Lock] = {}
        self._dropped: dict[str, float] = {}  # folder -> when its stream ended without the node's end (monotonic)
        self._server: _Server | None = None

    def start(self) -> None:
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                if not receiver._slots.acquire(blocking=False):
                    return  # too many connections at once: closed unread
                try:
                    receiver._serve(self.request, self.client_address[0])
                finally:
                    receiver._slots.release()

        server = _Server(self._address, Handler)
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.5,), name="kaio-stream-in", daemon=True).start()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def close(self, timeout_s: float = 0.0) -> bool:
        """Stop taking the nodes' records (after the job's report, which waited for them); ``timeout_s``:
        the same call as a node's, nothing to wait for here."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                for sock in self._active.values():
                    _shut(sock)
        return True

    def pop_warnings(self) -> list[str]:
        with self._lock:
            taken, self._warnings = self._warnings, []
        return taken

    def gone_for(self, folder: str) -> float | None:
        """Seconds since the node's stream ended without its end and was not resumed (its kaio is gone,
        or its machine); None while it streams, after it ended properly, or if it never streamed."""
        with self._lock:
            dropped = self._dropped.get(folder)
        return None if dropped is None else time.monotonic() - dropped

    def _say_once(self, text: str) -> None:
        with self._lock:
            if text not in self._said:
                self._said.add(text)
                self._warnings.append(text)

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            hello = self._authenticate(sock, peer)
            if hello is None:
                return
            with self._lock:
                previous = self._active.get(hello.folder)
                folder_lock = self._folder_locks.setdefault(hello.folder, threading.Lock())
            if previous is not None:
                _shut(previous)  # the node reconnected: its old connection ends before the new one writes
            with folder_lock:
                with self._lock:
                    self._active[hello.folder] = sock
                    self._dropped.pop(hello.folder, None)
                ended = False
                try:
                    ended = self._receive(sock, hello)
                finally:
                    with self._lock:
                        if self._active.get(hello.folder) is sock:
                            del self._active[hello.folder]
                            if not ended:
                                self._dropped[hello.folder] = time.monotonic()
        except _BROKEN:
            return  # the node reconnects and resends from what the copy holds
        finally:
            _shut(sock)

    def _authenticate(self, sock: socket.socket, peer: str) -> Hello | None:
        deadline = time.monotonic() + HANDSHAKE_S
        nonce = secrets.token_bytes(32)
        _send(sock, b"N", nonce)
        kind, payload = _recv(sock, limit=HELLO_LIMIT, deadline=deadline)
        mac, body = payload[:32], payload[32:]
        if kind != b"H" or not hmac.compare_digest(mac, _mac(self._secret, nonce, body)):
            self._say_once(f"refused a connection from {peer}: not signed with this job's secret ({ENV_JOB_SECRET})")
            return None
        hello = msgspec.json.decode(body, type=Hello)
        if "/" in hello.folder or hello.folder.startswith("0-") or not is_node_folder(self.paths.nodes / hello.folder):
            raise ValueError(f"not another node's folder: {hello.folder!r}")
        return hello

    def _receive(self, sock: socket.socket, hello: Hello) -> bool:
        """The node's stream until it ends; True when it ended with the node's end (not a dropped connection)."""
        node = ProjectPaths(self.paths.nodes / hello.folder)
        shared = _reads(node.stream_token) == hello.token
        if not shared and not self._claim_copy(node):
            # A journal this head did not create, without the node's token: the node's own, on a shared
            # filesystem that does not show its token yet? Never a second writer: the node tries again.
            self._say_once(
                f"node folder {hello.folder}: holds a journal this head did not copy, without the node's token "
                "(a shared filesystem slow to show it?); not copied, the node retries"
            )
            return True  # not a node gone: one the head will not copy
        offset = 0 if shared else _prepare_copy(node.journal, hello)
        accept = msgspec.json.encode(Accept(offset=offset, shared=shared))
        _send(sock, b"A", _mac(self._secret, hello.nonce.encode(), accept) + accept)
        sock.settimeout(SILENT_LIMIT_S)
        with open(node.journal, "ab") if not shared else contextlib.nullcontext() as copy:
            while True:
                kind, payload = _recv(sock)
                if kind == b"D" and copy is not None:
                    copy.write(payload)
                    copy.flush()
                elif kind == b"P":
                    (t0,) = _PROBE.unpack(payload)
                    _send(sock, b"R", _REPLY.pack(t0, time.time()))
                elif kind == b"C":
                    clock = msgspec.json.decode(payload, type=ClockOffset)
                    atomic_write_bytes(node.clock, msgspec.json.encode(clock))
                elif kind == b"E":  # the node's end: confirmed once its copy is on disk
                    if copy is not None:
                        copy.flush()
                        os.fsync(copy.fileno())
                        held = copy.tell()
                    else:
                        held = _OFFSET.unpack(payload)[0]
                    _send(sock, b"K", _OFFSET.pack(held))
                    return True

    def _claim_copy(self, node: ProjectPaths) -> bool:
        """Whether the journal in ``node``'s folder is this head's copy, creating it if there is none. Both
        files are created exclusively (O_EXCL, which NFS servers enforce): a journal the node itself
        writes there (a shared folder whose token cannot be seen yet) is never taken over."""
        mark = _reads(node.stream_copy)
        if mark is not None:
            return mark == self._id
        node.report_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(node.stream_copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return _reads(node.stream_copy) == self._id
        with os.fdopen(fd, "w") as f:
            f.write(self._id + "\n")
        try:
            os.close(os.open(node.journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            node.stream_copy.unlink(missing_ok=True)
            return False
        return True


def _prepare_copy(journal: Path, hello: Hello) -> int:
    """The head's copy of a node's journal, ready for the node to append to; the bytes it holds. A copy of
    another journal (the node started over) is moved aside and started again; a line cut short (the head
    stopped mid-write) is dropped."""
    start, size = _first_line_digest(journal)
    if size and (start != hello.journal_start or size > hello.journal_size):
        os.replace(journal, journal.with_name(f"journal.replaced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
        journal.touch()
        return 0
    if size:
        with open(journal, "rb") as f:
            f.seek(max(0, size - MAX_FRAME))
            tail = f.read(size)
        end = tail.rfind(b"\n")
        held = size - len(tail) + end + 1 if end >= 0 else 0
        if held != size:
            with open(journal, "ab") as f:
                f.truncate(held)
        size = held
    return size


def _head_mark(paths: ProjectPaths) -> str:
    """The mark of the project's head, the same for every session: a resumed head continues its own copies
    (a new mark each time refused them as "a journal this head did not copy")."""
    mark = _reads(paths.stream_mark)
    if mark:
        return mark
    paths.report_dir.mkdir(parents=True, exist_ok=True)
    mark = secrets.token_hex(16)
    written = paths.stream_mark.with_name(f".stream-mark-{mark}")
    written.write_text(mark + "\n")
    try:
        os.link(written, paths.stream_mark)  # whole or not at all; never over another process's
    except FileExistsError:  # written at the same moment by another process: its mark is the project's
        return _reads(paths.stream_mark) or mark
    except OSError:  # no hard links there: this session's mark only (a resumed head will not know its copies)
        return mark
    finally:
        written.unlink(missing_ok=True)
    return mark


def _reads(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# ---------------------------------------------------------------- a node


class JournalSender:
    """On a node other than the head: streams its journal to the head and measures its clock, in a thread."""

    def __init__(self, paths: ProjectPaths, head: str, port: int, secret: bytes) -> None:
        self.paths = paths
        self._address = (head, port)
        self._secret = secret
        self._token = secrets.token_hex(16)
        self._closing = threading.Event()
        self._done = threading.Event()
        self._gone = threading.Event()  # close() has given up waiting
        self._lock = threading.Lock()
        self._warnings: list[str] = []
        self._down_since: float | None = None
        self._said_down = False
        self._probes: deque[tuple[float, float, float]] = deque(maxlen=PROBES_KEPT)  # (rtt, offset, head's time)
        self._sent_clock: tuple[float, float, float] | None = None
        self._delay = 1.0  # before the next attempt to connect: doubles while the head cannot be reached, to 10 s
        self.sent_bytes = 0
        self.connections = 0
        self.shared = False  # the head reads this node's own folder (a shared filesystem): nothing is copied
        self._thread = threading.Thread(target=self._run, name="kaio-stream-out", daemon=True)

    def start(self) -> None:
        self.paths.report_dir.mkdir(parents=True, exist_ok=True)
        self.paths.stream_token.write_text(self._token + "\n")
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> bool:
        """Send what the journal holds now, then stop; True once the head has confirmed it holds all of it, or
        where it reads this node's own folder (a head that ended first has nothing of it to confirm)."""
        self._closing.set()
        self._thread.join(timeout_s)
        self._gone.set()
        return self._done.is_set() or self.shared

    def pop_warnings(self) -> list[str]:
        with self._lock:
            taken, self._warnings = self._warnings, []
        return taken

    def _run(self) -> None:
        while True:
            try:
                with socket.create_connection(self._address, timeout=5.0) as sock:
                    if self._session(sock):
                        self._done.set()
                        return
            except _BROKEN as exc:
                self._down(exc)
            if not self._closing.is_set():
                self._closing.wait(self._delay)  # close() wakes it: the last lines are sent at once
            elif self._gone.wait(min(self._delay, 1.0)):
                return  # the head could not be reached in time: the node's own folder has it all
            self._delay = min(self._delay * 2, 10.0)

    def _down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        # Before the first connection the head may just not be up yet (a node's kaio started first, as srun
        # often starts them): nothing waits on it, the job's rendezvous holds every rank. Said after a minute.
        patience = 10.0 if self.connections else 60.0
        if not self._said_down and time.monotonic() - self._down_since > patience:
            self._said_down = True
            with self._lock:
                self._warnings.append(
                    f"no stream to the head ({self._address[0]}:{self._address[1]}: {exc}); kaio keeps trying and "
                    "resends from where the head stopped: nothing is lost"
                )

    def _session(self, sock: socket.socket) -> bool:
        """One connection; True once the head confirmed it holds the whole journal, after ``close``."""
        kind, challenge = _recv(sock, limit=64)
        if kind != b"N":
            raise ConnectionError("not a kaio head")
        start, size = _first_line_digest(self.paths.journal)
        nonce = secrets.token_hex(16)
        hello = Hello(self.paths.report_dir.name, self._token, size, start, nonce)
        body = msgspec.json.encode(hello)
        _send(sock, b"H", _mac(self._secret, challenge, body) + body)
        try:
            kind, payload = _recv(sock, limit=HELLO_LIMIT)
        except ConnectionError:
            raise ConnectionError(
                f"the head closed the connection at the hello (a different {ENV_JOB_SECRET}, or a folder it "
                "will not copy into: see the head's warnings)"
            ) from None
        mac, body = payload[:32], payload[32:]
        if kind != b"A" or not hmac.compare_digest(mac, _mac(self._secret, nonce.encode(), body)):
            raise ConnectionError(f"not this job's head (its answer is not signed with {ENV_JOB_SECRET})")
        accept = msgspec.json.decode(body, type=Accept)
        self.connections += 1
        self.shared = accept.shared
        if self._said_down and self._down_since is not None:  # the warning of it stands: say it is over
            with self._lock:
                self._warnings.append(
                    f"the stream to the head is back after {time.monotonic() - self._down_since:.0f} s; what it "
                    "missed was sent from where the head stopped"
                )
        self._down_since, self._said_down, self._delay = None, False, 1.0  # a drop from now: back within 1 s
        offset = accept.offset
        next_probe = 0.0
        for _ in range(3):  # a first estimate at once
            self._probe(sock)
        while True:
            closing = self._closing.is_set()  # read before the journal: what was written before close is sent
            sent = 0 if accept.shared else self._send_new(sock, offset)
            offset += sent
            if time.monotonic() >= next_probe:
                self._probe(sock)
                next_probe = time.monotonic() + PROBE_EVERY_S
            if closing and not sent:
                return self._confirm_end(sock, offset, accept.shared)
            if not sent:
                self._closing.wait(IDLE_S)

    def _confirm_end(self, sock: socket.socket, offset: int, shared: bool) -> bool:
        """The head says how much it holds once its copy is on disk: the whole journal, or not done."""
        _send(sock, b"E", _OFFSET.pack(offset))
        kind, payload = _recv(sock, limit=_OFFSET.size)
        if kind != b"K":
            raise ConnectionError("an unexpected answer to the end")
        (held,) = _OFFSET.unpack(payload)
        try:
            size = self.paths.journal.stat().st_size
        except FileNotFoundError:
            size = 0
        return shared or held == offset == size

    def _send_new(self, sock: socket.socket, offset: int) -> int:
        try:
            with open(self.paths.journal, "rb") as f:
                f.seek(offset)
                chunk = f.read(SEND_BYTES)
                if len(chunk) == SEND_BYTES and b"\n" not in chunk:
                    chunk += f.read(MAX_FRAME - SEND_BYTES)  # one long line
        except FileNotFoundError:
            return 0
        whole = chunk[: chunk.rfind(b"\n") + 1]  # whole lines only: a line being written waits
        if not whole and len(chunk) >= MAX_FRAME:
            raise ValueError(f"a line of {self.paths.journal.name} longer than {MAX_FRAME} bytes at byte {offset}")
        if whole:
            _send(sock, b"D", whole)
            self.sent_bytes += len(whole)
        return len(whole)

    def _probe(self, sock: socket.socket) -> None:
        t0 = time.time()
        _send(sock, b"P", _PROBE.pack(t0))
        kind, payload = _recv(sock, limit=64)
        t3 = time.time()
        if kind != b"R":
            raise ConnectionError("an unexpected answer to a clock probe")
        echoed, t1 = _REPLY.unpack(payload)
        if echoed != t0:
            raise ConnectionError("an answer to another probe")
        self._probes.append((t3 - t0, (t0 + t3) / 2 - t1, t1))
        best = min(self._probes)
        if self._sent_clock != best:
            self._sent_clock = best
            rtt, offset, at = best
            _send(sock, b"C", msgspec.json.encode(ClockOffset(offset_s=offset, rtt_s=rtt, measured_at=at)))


# ---------------------------------------------------------------- wiring


def for_node(
    node_rank: int, nnodes: int, paths: ProjectPaths, head: str | None, port: int, notify: Callable[[str], None]
) -> JournalReceiver | JournalSender | None:
    """The stream of this node of a job of several machines, started; None on one machine or without
    the job's secret (then the head sees the others through a shared filesystem, or at the end by --merge)."""
    if nnodes < 2:
        return None
    secret = job_secret(os.environ)
    if secret is None:
        notify(
            f"note: {ENV_JOB_SECRET} is not set: the nodes do not stream to the head; without a shared "
            "filesystem the head sees them only at the end (`kaio report PROJECT --merge`)"
        )
        return None
    if len(secret) < 16:
        notify(f"warning: {ENV_JOB_SECRET} is short ({len(secret)} characters): anyone guessing it can send records")
    stream: JournalReceiver | JournalSender
    if node_rank == 0:
        stream = JournalReceiver(paths, secret, port, nodes=nnodes)
    else:
        stream = JournalSender(paths, head or "127.0.0.1", port, secret)
    try:
        stream.start()
    except (OSError, RuntimeError) as exc:
        notify(
            f"warning: the stream of the nodes' records could not start on port {port} "
            f"({getattr(exc, 'strerror', None) or exc}); the head sees the other nodes only through a shared "
            "filesystem, or at the end (`kaio report PROJECT --merge`)"
        )
        return None
    return stream

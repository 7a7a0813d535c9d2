"""The nodes' journals streamed to the head over real loopback TCP: a byte-exact copy that survives a dropped
connection, no copy over a shared folder, the clock measured, and a stranger without the job's secret refused."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from kaio.record.paths import ProjectPaths
from kaio.run import stream
from kaio.run.stream import JournalReceiver, JournalSender

SECRET = b"a job's secret, the same on every node"


def _wait(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _lines(first: int, last: int) -> bytes:
    return b"".join(
        json.dumps({"type": "note", "text": f"line {i}", "pad": "x" * 200}).encode() + b"\n" for i in range(first, last)
    )


@pytest.fixture
def head(tmp_path):
    receiver = JournalReceiver(ProjectPaths(tmp_path / "head" / "t"), SECRET, port=0, host="127.0.0.1")
    receiver.start()
    yield receiver
    receiver.close()


def _node(tmp_path: Path, head: JournalReceiver, secret: bytes = SECRET) -> JournalSender:
    paths = ProjectPaths(tmp_path / "node" / "t" / "nodes" / "1-gpu08")
    paths.report_dir.mkdir(parents=True, exist_ok=True)
    return JournalSender(paths, "127.0.0.1", head.port, secret)


def test_the_head_holds_a_byte_exact_copy_whole_lines_only_and_resent_from_its_offset_after_a_drop(tmp_path, head):
    node = _node(tmp_path, head)
    copy = head.paths.nodes / "1-gpu08" / "journal.jsonl"
    node.paths.journal.write_bytes(_lines(0, 50) + b'{"type": "note", "te')  # a line being written
    node.start()
    _wait(lambda: copy.is_file() and copy.read_bytes() == _lines(0, 50))
    with open(node.paths.journal, "ab") as f:
        f.write(b'xt": "finished"}\n')
    _wait(lambda: copy.read_bytes().endswith(b'"finished"}\n'))

    # The connection drops (the head's side closes it); what the node writes meanwhile is sent once, in order.
    with head._lock:
        active = list(head._active.values())
    assert len(active) == 1
    stream._shut(active[0])
    with open(node.paths.journal, "ab") as f:
        f.write(_lines(50, 5000))  # ~1.1 MB: more than one frame
        f.write(json.dumps({"type": "note", "text": "y" * 1_500_000}).encode() + b"\n")  # one line over a frame
    assert node.close(timeout_s=20)
    assert copy.read_bytes() == node.paths.journal.read_bytes()
    assert node.connections == 2
    assert node.sent_bytes == node.paths.journal.stat().st_size  # nothing sent twice
    clock = json.loads((copy.parent / "clock.json").read_text())
    assert 0 < clock["rtt_s"] < 1 and abs(clock["offset_s"]) <= clock["rtt_s"]  # one machine: one clock
    assert head.pop_warnings() == []


def test_a_copy_cut_mid_line_is_trimmed_and_a_copy_of_another_journal_moved_aside(tmp_path, head):
    copy = head.paths.nodes / "1-gpu08" / "journal.jsonl"
    node = _node(tmp_path, head)
    node.paths.journal.write_bytes(_lines(0, 10))
    node.start()
    assert node.close()
    with open(copy, "ab") as f:
        f.write(b'{"cut')  # the head's write stopped mid-line (a full disk)
    with open(node.paths.journal, "ab") as f:
        f.write(_lines(10, 20))
    again = JournalSender(node.paths, "127.0.0.1", head.port, SECRET)
    again.start()
    assert again.close()
    assert copy.read_bytes() == _lines(0, 20) and again.sent_bytes == len(_lines(10, 20))

    node.paths.journal.write_bytes(_lines(100, 105))  # the node started over: another journal
    third = JournalSender(node.paths, "127.0.0.1", head.port, SECRET)
    third.start()
    assert third.close()
    assert copy.read_bytes() == _lines(100, 105)
    (aside,) = copy.parent.glob("journal.replaced-*.jsonl")
    assert aside.read_bytes() == _lines(0, 20)  # the head's copy of the old journal is kept


def test_a_resumed_head_continues_its_own_copies(tmp_path, head):
    """`kaio resume` on every node: the head is a new process, the copies under nodes/ are still its project's
    (a new mark per process refused them: node 1's second session never reached the head)."""
    copy = head.paths.nodes / "1-gpu08" / "journal.jsonl"
    node = _node(tmp_path, head)
    node.paths.journal.write_bytes(_lines(0, 10))
    node.start()
    assert node.close()
    head.close()
    resumed = JournalReceiver(head.paths, SECRET, port=0, host="127.0.0.1")
    resumed.start()
    try:
        with open(node.paths.journal, "ab") as f:
            f.write(_lines(10, 20))  # the node's resumed session
        again = JournalSender(node.paths, "127.0.0.1", resumed.port, SECRET)
        again.start()
        assert again.close()
        assert copy.read_bytes() == _lines(0, 20) and resumed.pop_warnings() == []
    finally:
        resumed.close()


def test_over_a_shared_folder_the_head_copies_nothing_and_measures_the_clock(tmp_path, head):
    paths = ProjectPaths(head.paths.nodes / "1-gpu08")  # the node writes where the head reads
    paths.report_dir.mkdir(parents=True)
    paths.journal.write_bytes(_lines(0, 30))
    node = JournalSender(paths, "127.0.0.1", head.port, SECRET)
    node.start()
    _wait(lambda: paths.clock.is_file())
    assert node.close()
    assert paths.journal.read_bytes() == _lines(0, 30) and node.sent_bytes == 0
    assert not paths.stream_copy.exists()
    # A head that ended first (it read the node's closed record from the folder) has nothing to confirm: the
    # node said "the head did not confirm the end of this node's record" after a whole job.
    head.close()
    for shared in (True, False):
        late = JournalSender(paths, "127.0.0.1", head.port, SECRET)
        late.shared = shared  # as its earlier connection was accepted
        late.start()
        assert late.close(timeout_s=1) is shared


def test_a_node_without_the_jobs_secret_is_refused_and_nothing_is_written(tmp_path, head):
    node = _node(tmp_path, head, secret=b"another job's secret")
    node.paths.journal.write_bytes(_lines(0, 5))
    node.start()
    _wait(lambda: head._said)
    assert not node.close(timeout_s=1)
    assert head.pop_warnings() == [
        "refused a connection from 127.0.0.1: not signed with this job's secret (KAIO_JOB_SECRET)"
    ]
    assert not head.paths.nodes.exists()
    # A stranger speaking anything else is closed at once, too.
    with socket.create_connection(("127.0.0.1", head.port), timeout=5) as sock:
        assert sock.recv(64)[:1] == b"N"
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(64) == b""
    assert not head.paths.nodes.exists()


@pytest.mark.parametrize("copy_mark", [None, "another head's mark\n"])
def test_a_journal_this_head_did_not_create_is_never_written(tmp_path, head, copy_mark):
    """A shared folder whose token the head cannot see yet: the node's own journal is there; the head never
    becomes its second writer (nor of a copy another head process made)."""
    theirs = head.paths.nodes / "1-gpu08" / "journal.jsonl"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(_lines(0, 3))
    if copy_mark is not None:
        (theirs.parent / "stream-copy").write_text(copy_mark)
    node = _node(tmp_path, head)
    node.paths.journal.write_bytes(_lines(0, 8))
    node.start()
    _wait(lambda: head._said)
    assert not node.close(timeout_s=1)
    assert theirs.read_bytes() == _lines(0, 3)
    assert "not copied, the node retries" in head.pop_warnings()[0]
    assert (theirs.parent / "stream-copy").exists() == (copy_mark is not None)


def test_a_stranger_holds_no_connection_and_a_node_trusts_no_stranger_as_its_head(tmp_path, head, monkeypatch):
    # A connection that never proves the secret is closed after the handshake's time, however it trickles.
    monkeypatch.setattr(stream, "HANDSHAKE_S", 0.5)
    with socket.create_connection(("127.0.0.1", head.port), timeout=5) as sock:
        assert sock.recv(64)[:1] == b"N"
        sock.sendall(b"H")
        started = time.monotonic()
        assert sock.recv(64) == b""
        assert time.monotonic() - started < 3
    # A listener that is not this job's head (it cannot sign its answer): the node sends it nothing.
    with socket.create_server(("127.0.0.1", 0)) as fake:
        node = JournalSender(_node(tmp_path, head).paths, "127.0.0.1", fake.getsockname()[1], SECRET)
        node.paths.journal.write_bytes(_lines(0, 5))
        node.start()
        conn, _ = fake.accept()
        with conn:
            conn.sendall(stream._HEADER.pack(b"N", 32) + b"x" * 32)
            conn.settimeout(5)
            hello = conn.recv(4096)
            accept = b'{"offset":0,"shared":false}'
            conn.sendall(stream._HEADER.pack(b"A", 32 + len(accept)) + b"\0" * 32 + accept)
            assert conn.recv(4096) == b""  # closed with no data, no probe: the answer was not signed
        assert not node.close(timeout_s=1) and hello[:1] == b"H"


def test_a_head_not_up_yet_is_given_a_minute_before_a_warning_and_a_lost_one_ten_seconds(tmp_path, head):
    """A node whose kaio srun started before the head's: "no stream to the head (Connection refused)" and then
    "back after 35 s" were the job report's warnings of an ordinary start."""
    node = _node(tmp_path, head)
    refused = ConnectionRefusedError(111, "Connection refused")
    node._down_since = time.monotonic() - 35  # never connected yet
    node._down(refused)
    assert node.pop_warnings() == []
    node._down_since = time.monotonic() - 61
    node._down(refused)
    assert node.pop_warnings()[0].startswith("no stream to the head (127.0.0.1:")
    node.connections, node._said_down, node._down_since = 1, False, time.monotonic() - 11  # a head lost later
    node._down(refused)
    assert len(node.pop_warnings()) == 1


def test_a_stream_that_comes_back_after_its_warning_says_so(tmp_path, head):
    """A node started before its head warned 'no stream to the head': once connected, the record says it is
    over, rather than keeping a warning that was true only for a while."""
    node = _node(tmp_path, head)
    node.paths.journal.write_bytes(_lines(0, 3))
    node._said_down, node._down_since = True, time.monotonic() - 42  # as after a head that was not up yet
    node.start()
    assert node.close(timeout_s=20)
    (back,) = node.pop_warnings()
    assert back.startswith("the stream to the head is back after 42 s")

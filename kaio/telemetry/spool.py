"""The spool: every event a rank emitted, on disk, until the supervisor has journaled it.

Files are ``spool-s<session>-r<rank>-p<pid>-<first seq>.jsonl``; each process
numbers its events 1, 2, 3... (``seq``). The FIFO keeps order, so what the
supervisor received from one process is nearly always a prefix of that
sequence; a line lost on the way (junk written into the pipe that spoiled the
next event) leaves a gap. ``Received`` remembers the highest seq and the gaps
per process, so the merge at a session's end (and after a supervisor died)
fills exactly what the journal lacks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import msgspec

from kaio.telemetry.protocol import ChildEvent, ProtocolError, decode

SPOOL_PART_EVENTS = 10_000
MAX_GAPS = 10_000  # seqs remembered as missing per process (a pipe that lost more has bigger problems)
_PART = re.compile(r"^spool-s(\d+)-r(\d+)-p(\d+)-(\d+)\.jsonl$")


class Received(msgspec.Struct, kw_only=True):
    """Which events of each child process are journaled: every seq up to ``top``, except ``gaps``."""

    top: dict[int, int] = {}
    gaps: dict[int, list[int]] = {}

    def add(self, pid: int, seq: int) -> None:
        top = self.top.get(pid, 0)
        if seq > top:
            if seq > top + 1:
                gaps = self.gaps.setdefault(pid, [])
                gaps.extend(range(top + 1, min(seq, top + 1 + MAX_GAPS - len(gaps))))
            self.top[pid] = seq
        elif seq in self.gaps.get(pid, ()):
            self.gaps[pid].remove(seq)
            if not self.gaps[pid]:
                del self.gaps[pid]

    def has(self, pid: int, seq: int) -> bool:
        return seq <= self.top.get(pid, 0) and seq not in self.gaps.get(pid, ())

    def complete_through(self, pid: int) -> int:
        """Every seq of ``pid`` up to this one is journaled."""
        gaps = self.gaps.get(pid)
        return min(gaps) - 1 if gaps else self.top.get(pid, 0)


def part_name(session: int, rank: int, pid: int, first_seq: int) -> str:
    return f"spool-s{session}-r{rank}-p{pid}-{first_seq:012d}.jsonl"


def _parts(spool_dir: Path) -> list[tuple[int, int, Path]]:
    """``(pid, first_seq, path)`` of every spool part."""
    parts = []
    if spool_dir.is_dir():
        for path in spool_dir.iterdir():
            match = _PART.match(path.name)
            if match:
                parts.append((int(match.group(3)), int(match.group(4)), path))
    return sorted(parts)


def missing_events(spool_dir: Path, received: Received) -> tuple[list[ChildEvent], int]:
    """Spooled events the journal lacks, in the order they happened, and how many lines were not valid events."""
    events: list[ChildEvent] = []
    bad = 0
    for pid, _first, path in _parts(spool_dir):
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                event = decode(line)
            except ProtocolError:
                bad += 1  # a torn last line if the child died mid-write, or a damaged file
                continue
            if event.seq is not None and not received.has(pid, event.seq):
                events.append(event)
    # Every event has a wall time (t_mono is not on every kind, and the two clocks do not compare);
    # seq orders one process's events that share a timestamp.
    events.sort(key=lambda e: (e.session, e.t_wall or 0, e.pid or 0, e.seq or 0))
    return events, bad


def prune(spool_dir: Path, received: Received) -> None:
    """Delete the parts whose every event is journaled."""
    parts = _parts(spool_dir)
    for index, (pid, _first, path) in enumerate(parts):
        next_first = next((f for p, f, _ in parts[index + 1 :] if p == pid), None)
        if next_first is not None and next_first - 1 <= received.complete_through(pid):
            path.unlink(missing_ok=True)


def merge_into(
    spool_dir: Path, received: Received, record: Callable[[ChildEvent], None], written_out: Callable[[], bool]
) -> tuple[int, int]:
    """Journal what only the spool has, then delete the spool if ``written_out()`` says every record is on
    disk (on a full disk the spool stays: it holds what the journal could not write yet); returns how
    many events were merged and how many lines were not valid events (skipped)."""
    events, bad = missing_events(spool_dir, received)
    for event in events:
        record(event)
    if not written_out():
        return len(events), bad
    for _pid, _first, path in _parts(spool_dir):
        path.unlink(missing_ok=True)
    try:
        spool_dir.rmdir()  # nothing left to merge: no folder to wonder about
    except OSError:
        pass
    return len(events), bad

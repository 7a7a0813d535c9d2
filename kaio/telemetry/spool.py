"""The spool: every event a rank emitted, on disk, until the supervisor has journaled it.

Files are ``spool-s<session>-r<rank>-p<pid>-<first seq>.jsonl``; each process
numbers its events 1, 2, 3... (``seq``). What a supervisor received through
the FIFO from one process is always a prefix of that sequence (the FIFO keeps
order), so "the highest seq journaled per pid" says exactly which spooled
events are missing from the journal.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from kaio.telemetry.protocol import ProtocolError, decode

SPOOL_DIR_NAME = "spool"
SPOOL_PART_EVENTS = 10_000
_PART = re.compile(r"^spool-s(\d+)-r(\d+)-p(\d+)-(\d+)\.jsonl$")


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


def missing_events(spool_dir: Path, max_seq_by_pid: dict[int, int]) -> tuple[list[dict], int]:
    """Spooled events the journal lacks (seq above what was journaled for their pid), and bad lines."""
    events, bad = [], 0
    for pid, _first, path in _parts(spool_dir):
        seen = max_seq_by_pid.get(pid, 0)
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                event = decode(line)
            except ProtocolError:
                bad += 1  # a torn last line if the child died mid-write
                continue
            if event.get("seq", 0) > seen:
                events.append(event)
    # In the order they happened: every event has a wall time (t_mono is not on every kind, and
    # the two clocks do not compare); seq orders one process's events that share a timestamp.
    events.sort(key=lambda e: (e.get("session", 0), e.get("t_wall") or 0, e.get("pid", 0), e.get("seq", 0)))
    return events, bad


def prune(spool_dir: Path, max_seq_by_pid: dict[int, int], *, everything_for: set[int] | None = None) -> None:
    """Delete parts whose every event is journaled; ``everything_for``: pids that have exited."""
    parts = _parts(spool_dir)
    for index, (pid, first, path) in enumerate(parts):
        next_first = next((f for p, f, _ in parts[index + 1 :] if p == pid), None)
        complete = next_first is not None and next_first - 1 <= max_seq_by_pid.get(pid, 0)
        if complete or (everything_for is not None and pid in everything_for):
            path.unlink(missing_ok=True)


def merge_into(spool_dir: Path, max_seq_by_pid: dict[int, int], record: Callable[[dict], None]) -> int:
    """Journal what only the spool has, then delete the spool (all its events are journaled now)."""
    events, _bad = missing_events(spool_dir, max_seq_by_pid)
    for event in events:
        record(event)
    for _pid, _first, path in _parts(spool_dir):
        path.unlink(missing_ok=True)
    try:
        spool_dir.rmdir()  # nothing left to merge: no folder to wonder about
    except OSError:
        pass
    return len(events)

"""The journal: every event and sample of a project, appended as it arrives.

``journal.jsonl`` is the source of truth; ``history.json`` and the reports are
derived from it. Appends go straight to the OS (a killed supervisor loses
nothing written), and are fsynced about once a second (a power loss loses at
most that second). A torn last line, from a crash mid-write, is skipped on
reading.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

from kaio.telemetry.protocol import json_line

JOURNAL_NAME = "journal.jsonl"


class Journal:
    def __init__(self, path: Path, fsync_interval_s: float = 1.0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        self._fsync_interval_s = fsync_interval_s
        self._last_fsync = time.monotonic()
        self._pending = bytearray()
        self.offset = os.lseek(self._fd, 0, os.SEEK_END)  # bytes handed to the OS so far
        if self.offset and os.pread(self._fd, 1, self.offset - 1) != b"\n":
            # A torn last line from a crash: end it, so the next record starts a line of its own.
            os.write(self._fd, b"\n")
            self.offset += 1

    def append(self, record: dict[str, Any]) -> None:
        self._pending += json_line(record)
        if len(self._pending) >= 1 << 16:
            self.flush()

    def flush(self, fsync: bool = False) -> None:
        """Hand buffered lines to the OS; fsync when asked or when the interval has passed."""
        if self._pending:
            written = 0
            while written < len(self._pending):  # a regular file may take part of it (a full disk)
                written += os.write(self._fd, memoryview(self._pending)[written:])
            self.offset += written
            self._pending.clear()
        now = time.monotonic()
        if fsync or now - self._last_fsync >= self._fsync_interval_s:
            os.fsync(self._fd)
            self._last_fsync = now

    def close(self) -> None:
        self.flush(fsync=True)
        os.close(self._fd)


def whole_lines(path: Path, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """``(offset after the line, line)`` for each complete line from ``start`` (a torn last line is left)."""
    offset = start
    with open(path, "rb") as f:
        f.seek(start)
        for line in f:
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            yield offset, line

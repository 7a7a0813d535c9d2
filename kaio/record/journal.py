"""The journal: every record of a project, appended as it arrives: the source of truth.

Appends go straight to the OS (a killed supervisor loses nothing written) and
are fsynced about once a second (a power loss loses at most that second). A
torn last line, from a crash mid-write, is ended before the next append and
skipped on reading. One writer per file (the project lock's holder), so the
journal is safe on NFS and Lustre.

A write that fails (a full disk) never stops the run it records: the lines
stay buffered in memory (up to ``MAX_BUFFERED_BYTES``; the child's spool holds
the events beyond that) and are written when the disk takes them again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

from kaio.record.types import Record, decode_record, encode_record

MAX_BUFFERED_BYTES = 256 << 20


class Journal:
    def __init__(self, path: Path, fsync_interval_s: float = 1.0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self._fsync_interval_s = fsync_interval_s
        self._last_fsync = time.monotonic()
        self._pending = bytearray()
        self.dropped_bytes = 0  # lines given up on after the disk stayed full too long
        self.write_error: OSError | None = None  # the last failed write, until one succeeds
        self.offset = os.lseek(self._fd, 0, os.SEEK_END)  # bytes handed to the OS so far
        if self.offset and os.pread(self._fd, 1, self.offset - 1) != b"\n":
            # A torn last line from a crash: end it, so the next record starts a line of its own.
            os.write(self._fd, b"\n")
            self.offset += 1

    def append(self, record: Record) -> None:
        self.append_line(encode_record(record))

    def append_line(self, line: bytes) -> None:
        """A record already encoded (``encode_record``: one line)."""
        self._pending += line
        if len(self._pending) >= 1 << 16:
            self.flush()

    def flush(self, fsync: bool = False) -> None:
        """Hand buffered lines to the OS; fsync when asked or when the interval has passed."""
        try:
            while self._pending:  # a regular file may take part of it (a full disk)
                written = os.write(self._fd, self._pending)
                del self._pending[:written]
                self.offset += written
            now = time.monotonic()
            if fsync or now - self._last_fsync >= self._fsync_interval_s:
                os.fsync(self._fd)
                self._last_fsync = now
            self.write_error = None
        except OSError as exc:
            self.write_error = exc
            if len(self._pending) > MAX_BUFFERED_BYTES:
                cut = self._pending.rfind(b"\n", 0, len(self._pending) - MAX_BUFFERED_BYTES) + 1
                self.dropped_bytes += cut
                del self._pending[:cut]

    def write_out(self) -> bool:
        """Flush and fsync; True when every record handed in is on disk (False while the disk is full)."""
        self.flush(fsync=True)
        return not self._pending

    def close(self) -> Path | None:
        """Returns where the lines the disk never took were saved (it stayed full to the end), or None."""
        self.flush(fsync=True)
        rescued = self._rescue() if self._pending else None
        os.close(self._fd)
        return rescued

    def _rescue(self) -> Path | None:
        """The lines a full disk never took, in the temp folder (usually another filesystem): appended to the
        journal once there is space, they continue it exactly (a line the disk took part of included)."""
        import tempfile

        try:
            fd, name = tempfile.mkstemp(prefix=f"kaio-{self.path.parent.name}-journal-", suffix=".jsonl")
            with os.fdopen(fd, "wb") as f:
                f.write(self._pending)
        except OSError:
            return None
        return Path(name)


def read_records(path: Path, start: int = 0) -> Iterator[tuple[int, Record | None]]:
    """``(offset after the line, record)`` for each complete line from byte ``start``; ``None`` for a
    line that is not a valid record (counted by the caller). A torn last line is left for later."""
    offset = start
    with open(path, "rb") as f:
        f.seek(start)
        for line in f:
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            if line.strip():
                try:
                    yield offset, decode_record(line)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    yield offset, None


def journal_head(path: Path, length: int, head_bytes: int = 4096) -> bytes:
    """The journal's first bytes: they identify it (a run moved aside and started over has others)."""
    with open(path, "rb") as f:
        return f.read(min(length, head_bytes))

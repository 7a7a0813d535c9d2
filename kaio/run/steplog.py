"""``steps.jsonl``: a run's finished per-step entries, one compact JSON line each, in step order.

``RunState`` keeps only the steps still being filled in (their GPU samples or
other ranks' events may not have arrived); once a step is final it is written
here and dropped from memory, so the supervisor's memory does not grow with
the run. The lines are exactly ``history.json``'s step entries, so writing
``history.json`` is a copy of this file, not a re-encoding.

A resumed session trains again the steps after its checkpoint: those lines
are cut off (``truncate_after``). The file is a cache derived from the
journal: ``state.json`` records how much of it is valid, and anything beyond
is rebuilt from the journal.

Read-only mode (``kaio report`` while a supervisor owns the project) never
touches the file: new lines are kept in memory, and a cut only shortens the
part of the file that is read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

from kaio.fsutil import json_safe

STEPS_NAME = "steps.jsonl"
READ_BLOCK = 1 << 20
_STEP_PREFIX = re.compile(rb'^\{"step":(-?\d+)[,}]')


def encode_entry(entry: dict) -> bytes:
    """One step entry as one line (non-finite numbers as null; ``step`` is the first key)."""
    return (json.dumps(json_safe(entry), separators=(",", ":"), allow_nan=False, default=str) + "\n").encode()


def line_step(line: bytes) -> int:
    match = _STEP_PREFIX.match(line)
    if match is None:
        raise ValueError(f"not a step entry: {line[:60]!r}")
    return int(match.group(1))


class StepLog:
    def __init__(self, path: Path | None = None, *, writable: bool = False, valid_bytes: int | None = None) -> None:
        """``path`` None: memory only. ``valid_bytes``: how much of the file is trusted (the rest is dropped)."""
        self.path = path
        size = path.stat().st_size if path is not None and path.is_file() else 0
        self._file_bytes = _line_start_at_or_before(path, size if valid_bytes is None else min(valid_bytes, size))
        self._memory: list[tuple[int, bytes]] = []  # (step, line) not in the file
        self._fd: int | None = None
        if path is not None and writable:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if size != self._file_bytes:
                os.ftruncate(self._fd, self._file_bytes)
            os.lseek(self._fd, self._file_bytes, os.SEEK_SET)

    @property
    def file_bytes(self) -> int:
        """Bytes of the file that hold valid entries (what ``state.json`` records)."""
        return self._file_bytes

    def last_line(self) -> bytes:
        """The file's last valid line (state.json keeps its hash: the file must still end with it)."""
        if self.path is None or self._file_bytes == 0:
            return b""
        with open(self.path, "rb") as f:
            start = max(0, self._file_bytes - READ_BLOCK)
            f.seek(start)
            block = f.read(self._file_bytes - start)
        return block[block.rfind(b"\n", 0, len(block) - 1) + 1 :]

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def append(self, step: int, line: bytes) -> None:
        if self._fd is not None:
            os.write(self._fd, line)
            self._file_bytes += len(line)
        else:
            self._memory.append((step, line))

    def truncate_after(self, step: int) -> None:
        """Forget every entry after ``step`` (a resumed session trains those steps again)."""
        if self._memory and self._memory[0][0] <= step:
            self._memory = [(s, line) for s, line in self._memory if s <= step]
            return
        self._memory.clear()
        cut = self._file_offset_after(step)
        if cut < self._file_bytes:
            self._file_bytes = cut
            if self._fd is not None:
                os.ftruncate(self._fd, cut)
                os.lseek(self._fd, cut, os.SEEK_SET)

    def _file_offset_after(self, step: int) -> int:
        """Byte offset just past the last line whose step is <= ``step``, scanning back from the end
        (a resume is usually from a recent checkpoint)."""
        if self.path is None or self._file_bytes == 0:
            return 0
        with open(self.path, "rb") as f:
            end = self._file_bytes
            carry: bytes | None = None  # the end of a line that began before `end` (its newline follows it)
            while end > 0:
                start = max(0, end - READ_BLOCK)
                f.seek(start)
                data = f.read(end - start) + (b"" if carry is None else carry + b"\n")
                lines = data.split(b"\n")[:-1]
                whole = lines if start == 0 else lines[1:]
                line_end = start + len(data)
                for line in reversed(whole):
                    if line_step(line) <= step:
                        return line_end
                    line_end -= len(line) + 1
                carry = lines[0] if start else None
                end = start
            return 0

    def chunks(self) -> Iterator[bytes]:
        """The entries' lines, in order, in blocks that end at a line end."""
        if self.path is not None and self._file_bytes:
            with open(self.path, "rb") as f:
                left = self._file_bytes
                while left > 0:
                    block = f.read(min(READ_BLOCK, left))
                    left -= len(block)
                    if left <= 0 or not block:
                        # A supervisor may cut the file meanwhile (a resume): never pass on half a line.
                        block = block[: block.rfind(b"\n") + 1]
                        left = 0
                    yield block
        for _step, line in self._memory:
            yield line

    def entries(self) -> Iterator[dict]:
        """Every entry, decoded (slow on a long run: for tests and rare fallbacks)."""
        partial = b""
        for block in self.chunks():
            *lines, partial = (partial + block).split(b"\n")
            for line in lines:
                if line:
                    yield json.loads(line)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _line_start_at_or_before(path: Path | None, offset: int) -> int:
    """``offset``, moved back to just after a newline: a valid part of the file holds whole lines."""
    if path is None or offset <= 0:
        return 0
    with open(path, "rb") as f:
        while offset > 0:
            start = max(0, offset - READ_BLOCK)
            f.seek(start)
            block = f.read(offset - start)
            cut = block.rfind(b"\n")
            if cut != -1:
                return start + cut + 1
            offset = start
    return 0

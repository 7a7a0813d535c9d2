"""The FIFO that carries events from every rank to the supervisor.

``accelerate launch`` closes inherited file descriptors, so a plain pipe never
reaches the trainer; a named FIFO whose path travels in an environment
variable does. The supervisor keeps a write end of its own open until the
child has exited, so the reader sees EOF only then, never when one rank
restarts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kaio.telemetry.protocol import MAX_LINE_BYTES, ChildEvent, ProtocolError, decode


class TelemetryFifo:
    """A FIFO (mode 0600) in a private temp dir, with the supervisor's two ends."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="kaio-"))
        self.path = self._dir / "telemetry.fifo"
        os.mkfifo(self.path, 0o600)
        # Opening the read end non-blocking first lets us open our own write
        # end without waiting for a child; then reads may block again.
        self.read_fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._write_fd: int | None = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        os.set_blocking(self.read_fd, True)

    def close_write_end(self) -> None:
        """Called once the child has exited: the reader then drains and sees EOF."""
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def close(self) -> None:
        self.close_write_end()
        try:
            os.close(self.read_fd)
        except OSError:
            pass
        shutil.rmtree(self._dir, ignore_errors=True)


@dataclass
class ReaderStats:
    lines: int = 0
    events: int = 0
    malformed: int = 0
    oversized: int = 0


class FifoReader(threading.Thread):
    """Reads lines from the FIFO, hands each valid event (decoded and checked against its type) to
    ``on_event``. Malformed and oversized lines are counted and skipped, never fatal."""

    def __init__(self, read_fd: int, on_event: Callable[[ChildEvent], None], chunk_bytes: int = 1 << 16) -> None:
        super().__init__(name="kaio-fifo-reader", daemon=True)
        self._fd = read_fd
        self._on_event = on_event
        self._chunk = chunk_bytes
        self.stats = ReaderStats()

    def run(self) -> None:
        pending = b""
        skipping = False  # inside an oversized line: drop bytes up to its newline
        while True:
            try:
                chunk = os.read(self._fd, self._chunk)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if skipping:
                    skipping = False
                    continue
                self._handle(line)
            if len(pending) >= MAX_LINE_BYTES:
                if not skipping:
                    self.stats.oversized += 1
                skipping = True
                pending = b""
        if pending and not skipping:
            self._handle(pending)  # a last line without newline: still try it

    def _handle(self, line: bytes) -> None:
        if not line.strip():
            return
        self.stats.lines += 1
        if len(line) >= MAX_LINE_BYTES:
            self.stats.oversized += 1
            return
        try:
            event = decode(line)
        except ProtocolError:
            self.stats.malformed += 1
            return
        self.stats.events += 1
        self._on_event(event)

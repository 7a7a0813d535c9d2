"""Writes events from a rank: to its spool file, then to the FIFO while it has a reader.

Standard library only; runs inside the trainer. Each event is one ``os.write``
of one line under PIPE_BUF, so lines from several ranks never tear.

Every event is also appended to this rank's spool (``<report>/spool/``),
numbered by ``seq``. Events in the FIFO's kernel buffer die with a killed
supervisor without any error reaching the writer, so the spool is what makes
"no step lost" true: the next ``kaio report`` or ``kaio resume`` merges the
events the journal lacks. When the FIFO has no reader (ENXIO at open, EPIPE
at write) training carries on, spool only. The spool rotates every
``SPOOL_PART_EVENTS`` events so the supervisor can delete parts it has
journaled: its size stays bounded however long the run.

While the FIFO has a reader, spool lines are buffered and written together
(every ``SPOOL_FLUSH_EVENTS`` events, and by a background thread every
``SPOOL_FLUSH_S``), which halves the system calls on the training's path.
That loses nothing: the buffer is written as soon as a FIFO write fails (the
supervisor died: the events stuck in the FIFO are in the buffer), when the
emitter closes, and at least once a second. Only a child hard-killed within
a second of its supervisor could lose its last events.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from kaio.telemetry.protocol import (
    ENV_NODE_RANK,
    ENV_PIPE,
    ENV_SESSION,
    ENV_SPOOL_DIR,
    ChildEvent,
    ProtocolError,
    encode,
)
from kaio.telemetry.spool import SPOOL_PART_EVENTS, part_name

SPOOL_FLUSH_EVENTS = 64
SPOOL_FLUSH_S = 1.0


class EventEmitter:
    def __init__(
        self, pipe_path: str | None, spool_dir: str | None, rank: int, session: int, node_rank: int = 0
    ) -> None:
        self.rank = rank
        self.session = session
        self.node_rank = node_rank
        self.pid = os.getpid()
        self._seq = 0
        self._spool_dir = Path(spool_dir) if spool_dir else None
        self._spool_fd: int | None = None
        self._spool_buffer = bytearray()
        self._spool_buffered = 0
        self._spool_lock = threading.Lock()  # the training thread appends, the flusher thread writes
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._fd: int | None = None
        self.dropped = 0
        if pipe_path:
            try:
                fd = os.open(pipe_path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO at once if no reader
                os.set_blocking(fd, True)  # then back-pressure rather than loss
                self._fd = fd
            except OSError:
                self._fd = None

    @classmethod
    def from_env(cls, rank: int) -> EventEmitter:
        return cls(
            os.environ.get(ENV_PIPE),
            os.environ.get(ENV_SPOOL_DIR),
            rank=rank,
            session=int(os.environ.get(ENV_SESSION, "1")),
            node_rank=int(os.environ.get(ENV_NODE_RANK, "0")),
        )

    @property
    def connected(self) -> bool:
        return self._fd is not None

    def emit(self, event: ChildEvent) -> None:
        """Stamp ``event`` with this process (session, node, pid, seq) and send it."""
        self._seq += 1
        event.rank, event.session, event.node_rank, event.pid, event.seq = (
            self.rank,
            self.session,
            self.node_rank,
            self.pid,
            self._seq,
        )
        try:
            line = encode(event)
        except ProtocolError as exc:
            self.dropped += 1
            if self.dropped == 1:  # said where the run's output goes (child.log), once: not silently lost
                print(f"kaio: an event was not recorded: {exc}", file=sys.stderr, flush=True)
            return
        with self._spool_lock:
            self._spool(line)
        if self._fd is not None:
            try:
                os.write(self._fd, line)
            except OSError:
                # EPIPE: the supervisor went away. Keep training; the spool has everything.
                self._close_fd()
        if self._fd is None or self._spool_buffered >= SPOOL_FLUSH_EVENTS:
            with self._spool_lock:
                self._flush_spool()
        elif self._flusher is None and self._spool_dir is not None:
            self._flusher = threading.Thread(target=self._flush_every_second, name="kaio-spool", daemon=True)
            self._flusher.start()

    def _flush_every_second(self) -> None:
        while not self._closed:
            time.sleep(SPOOL_FLUSH_S)
            with self._spool_lock:
                self._flush_spool()

    def _spool(self, line: bytes) -> None:
        if self._spool_dir is None:
            return
        if self._spool_fd is None or (self._seq - 1) % SPOOL_PART_EVENTS == 0:
            self._flush_spool()  # what is buffered belongs to the part before
            self._close_spool()
            try:
                self._spool_dir.mkdir(parents=True, exist_ok=True)
                path = self._spool_dir / part_name(self.session, self.rank, self.pid, self._seq)
                self._spool_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError:
                self._spool_fd = None
        self._spool_buffer += line
        self._spool_buffered += 1

    def _flush_spool(self) -> None:
        if not self._spool_buffer:
            return
        try:
            if self._spool_fd is None:
                raise OSError("no spool part open")
            os.write(self._spool_fd, self._spool_buffer)
        except OSError:
            self.dropped += self._spool_buffered  # a full disk must not stop training
        self._spool_buffer.clear()
        self._spool_buffered = 0

    def _close_spool(self) -> None:
        if self._spool_fd is not None:
            os.close(self._spool_fd)
            self._spool_fd = None

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def close(self) -> None:
        self._closed = True
        self._close_fd()
        with self._spool_lock:
            self._flush_spool()
            self._close_spool()

"""Writes events from a rank: to the FIFO while it has a reader, else to a spool file.

Standard library only; runs inside the trainer. Each event is one ``os.write``
of one line under PIPE_BUF, so lines from several ranks never tear. When the
supervisor is gone (the FIFO has no reader: ENXIO at open, EPIPE at write),
training carries on and events go to ``spool-s<session>-r<rank>-<pid>.jsonl``
in the report folder, to be merged by the next ``kaio report`` or
``kaio resume``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from kaio.telemetry.protocol import ENV_PIPE, ENV_SESSION, ENV_SPOOL_DIR, ProtocolError, encode


class EventEmitter:
    def __init__(self, pipe_path: str | None, spool_dir: str | None, rank: int, session: int) -> None:
        self.rank = rank
        self.session = session
        self._spool_dir = Path(spool_dir) if spool_dir else None
        self._spool = None
        self._fd: int | None = None
        self.spooled = 0
        self.dropped = 0
        if pipe_path:
            try:
                fd = os.open(pipe_path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO at once if no reader
                os.set_blocking(fd, True)  # then back-pressure rather than loss
                self._fd = fd
            except OSError:
                self._fd = None

    @classmethod
    def from_env(cls, rank: int) -> "EventEmitter":
        return cls(
            os.environ.get(ENV_PIPE),
            os.environ.get(ENV_SPOOL_DIR),
            rank=rank,
            session=int(os.environ.get(ENV_SESSION, "1")),
        )

    @property
    def connected(self) -> bool:
        return self._fd is not None

    def emit(self, event: dict[str, Any]) -> None:
        event = {"rank": self.rank, "session": self.session, **event}
        try:
            line = encode(event)
        except ProtocolError:
            self.dropped += 1
            return
        if self._fd is not None:
            try:
                os.write(self._fd, line)
                return
            except OSError as exc:
                # EPIPE: the supervisor went away. Keep training; spool from here on.
                if exc.errno not in (errno.EPIPE, errno.EBADF, errno.ENXIO):
                    self.dropped += 1
                    return
                self._close_fd()
        self._write_spool(line)

    def _write_spool(self, line: bytes) -> None:
        if self._spool_dir is None:
            self.dropped += 1
            return
        if self._spool is None:
            self._spool_dir.mkdir(parents=True, exist_ok=True)
            name = f"spool-s{self.session}-r{self.rank}-{os.getpid()}.jsonl"
            self._spool = open(self._spool_dir / name, "ab", buffering=0)
        self._spool.write(line)
        self.spooled += 1

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def close(self) -> None:
        self._close_fd()
        if self._spool is not None:
            self._spool.close()
            self._spool = None

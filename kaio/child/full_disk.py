"""A full disk does not end the training: the processes' output goes to child.log, a file on the report's disk,
and a print that fails there for want of space (the Trainer prints every log) raised OSError in the script.

``sys.stdout`` and ``sys.stderr`` are wrapped: a write or flush that fails with no space left is dropped (the
rest of child.log is kept; the training's record goes through the spool and the FIFO, not this output). Output
written by native code to the file descriptors never raises.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class _SpaceTolerant:
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer...
        return getattr(self._stream, name)


def keep_writing_on_a_full_disk() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _SpaceTolerant):
            setattr(sys, name, _SpaceTolerant(stream))

"""The processes' output goes to child.log, a file on the report's disk: it holds no secret, and a full disk does
not end the training.

``sys.stdout`` and ``sys.stderr`` are wrapped: the values the secrets rule names (a secret-looking flag's in the
process's arguments, HF_TOKEN, COMET_API_KEY: ``kaio.secrets.secret_values``) are masked in what is written (an
argparse error quoting the arguments, a traceback), and a write or flush that fails for want of space is dropped
(the Trainer prints every log, and that print raised OSError in the script; the record goes through the spool and
the FIFO, not this output). Output written by native code to the file descriptors is neither masked nor stopped.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence
from typing import Any

from kaio.secrets import REDACTED, mask, secret_values

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class _Guarded:
    """A text stream, or its binary ``buffer`` (accelerate's launcher copies its ranks' stderr through it)."""

    def __init__(self, stream: Any, secrets: Sequence[str], *, binary: bool = False) -> None:
        self._stream = stream
        self._secret_texts = secrets
        self._binary = binary
        self._secrets: list[Any] = [value.encode() for value in secrets] if binary else list(secrets)
        self._marker: Any = REDACTED.encode() if binary else REDACTED

    def write(self, data: Any) -> int:
        size = len(data)
        if self._binary and not isinstance(data, bytes):
            data = bytes(data)  # a bytearray or memoryview
        data = mask(data, self._secrets, self._marker)
        try:
            self._stream.write(data)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
        return size

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise

    @property
    def buffer(self) -> Any:
        if self._binary:
            raise AttributeError("buffer")
        return _Guarded(self._stream.buffer, self._secret_texts, binary=True)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding...
        return getattr(self._stream, name)


def the_process_secrets() -> list[str]:
    return secret_values(sys.argv, os.environ)


def guard_output() -> None:
    secrets = the_process_secrets()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Guarded):
            setattr(sys, name, _Guarded(stream, secrets))

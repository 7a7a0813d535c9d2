"""Atomic file writes: a crash leaves the old version or the new one, never half."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, rename."""
    atomic_write_chunks(path, (data,))


def atomic_write_chunks(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """``atomic_write_bytes`` for data too big to hold at once (a long run's history.json)."""
    with atomic_file(path) as f:
        for chunk in chunks:
            write_all(f.fileno(), chunk)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content into (unbuffered: its descriptor may be written directly
    too); on leaving, fsync and rename over ``path``. An exception leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a report is an ordinary file
        with os.fdopen(fd, "wb", buffering=0) as f:
            yield f
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def copy_range(source: int, target: int, start: int, end: int) -> None:
    """Bytes ``start``..``end`` of the file open as ``source`` appended at ``target``'s position: copied by
    the kernel where it can (``copy_file_range``; a reflink on filesystems that share blocks), else read
    and written."""
    offset = start
    try:
        while offset < end:
            copied = os.copy_file_range(source, target, end - offset, offset)
            if copied == 0:
                raise EOFError(f"the file ends at {offset}, before {end}")
            offset += copied
        return
    except OSError as exc:  # a filesystem or kernel without it (EXDEV, EINVAL, ENOSYS, EOPNOTSUPP)
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            raise
    while offset < end:
        data = os.pread(source, min(end - offset, 8 << 20), offset)
        if not data:
            raise EOFError(f"the file ends at {offset}, before {end}")
        write_all(target, data)
        offset += len(data)


def write_all(fd: int, data: bytes) -> None:
    """``data`` written whole at ``fd``'s position (``os.write`` may write part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False, default=str) + "\n")


def json_safe(value: Any) -> Any:
    """``value`` fit for strict JSON: non-finite floats become null (nested dicts and lists too)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""One run per project: an advisory ``flock`` on ``<report_dir>/.lock``.

The kernel releases a flock when its holder dies, however it dies, so a
killed supervisor can never leave the project stuck.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from kaio.errors import ProjectError

LOCK_NAME = ".lock"


class ProjectLock:
    def __init__(self, report_dir: Path) -> None:
        self.path = report_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ProjectError(
                f"project {self.path.parent.name!r} is running right now (pid {holder}); "
                "wait for it, or stop it with Ctrl-C in its terminal (or `kill <pid>`)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ProjectLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(report_dir: Path) -> bool:
    """True while a supervisor holds the project's lock (for read-only commands)."""
    path = report_dir / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False

"""One run per project: an advisory ``flock`` on ``<report_dir>/.lock``.

The kernel releases a flock when its holder dies, however it dies, so a
killed supervisor can never leave the project stuck.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from kaio.errors import ProjectError
from kaio.record.paths import is_node_folder, node_rank_of

LOCK_NAME = ".lock"


class ProjectLock:
    def __init__(self, report_dir: Path) -> None:
        self.path = report_dir / LOCK_NAME
        self._fd: int | None = None
        self._made_folder = False

    def acquire(self) -> None:
        report_dir = self.path.parent
        self._made_folder = not report_dir.exists()
        try:
            report_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProjectError(
                f"{report_dir}: cannot create the report folder ({exc.strerror}); choose another reporting.output_dir"
            ) from None
        check_report_folder(report_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise ProjectError(f"{self.path}: cannot open the project's lock ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            stop = f"`kill {holder}`" if holder.isdigit() else "`kill` on its pid"
            folder = self.path.parent
            what = (  # a node's own record, under the job's nodes/
                f"node {node_rank_of(folder)} of project {folder.parent.parent.name!r} ({folder})"
                if is_node_folder(folder)
                else f"project {folder.name!r}"
            )
            raise ProjectError(
                f"{what} is running right now (pid {holder}); "
                f"wait for it, or stop it with Ctrl-C in its terminal (or {stop})"
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

    def __exit__(self, exc_type, *exc) -> None:
        self.release()
        if exc_type is not None and self._made_folder:  # refused before anything was recorded: leave nothing
            with contextlib.suppress(OSError):
                if [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
                    self.path.unlink()
                    self.path.parent.rmdir()


def check_report_folder(report_dir: Path) -> None:
    """Refuse a report folder where another user could plant files for kaio to write through: one that
    someone else owns, or whose folder is writable by others without the sticky bit, or that holds symbolic
    links where kaio's own files go."""
    me = os.geteuid()
    for folder in (report_dir.parent, report_dir):
        st = folder.stat()
        if st.st_uid not in (me, 0) and folder == report_dir:
            raise ProjectError(f"{folder}: owned by another user (uid {st.st_uid}); kaio writes only its own folders")
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise ProjectError(
                f"{folder}: writable by other users (mode {stat.filemode(st.st_mode)}, no sticky bit), who could plant "
                "files for kaio to write through; use a folder of your own, or `chmod o-w` (or `+t`) it"
            )
    links = sorted(p.name for p in report_dir.iterdir() if p.is_symlink())
    if links:
        raise ProjectError(
            f"{report_dir}: {', '.join(links)} {'is a symbolic link' if len(links) == 1 else 'are symbolic links'}; "
            "kaio does not write through links in a report folder: remove them, or use another reporting.output_dir"
        )


def is_locked(report_dir: Path) -> bool:
    """True while a supervisor holds the project's lock (for read-only commands)."""
    try:  # never follow a link, never block on something that is not a file
        fd = os.open(report_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False

"""Drivers that put snapshots in front of a person: the live dashboard, or plain lines.

What a snapshot looks like is ``kaio.dashboard``'s business (pure functions);
these classes only decide when and where it is shown.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import time
from typing import IO, TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.live import Live

from kaio.run.snapshot import Snapshot, as_shown


class PipeSafe(io.TextIOBase):
    """A text stream whose reader may go away: after the first broken pipe (or a terminal's hang-up), writes go
    to /dev/null."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def _lost(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # later writes, and Python's own flush at exit, go nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        self._stream = open(os.devnull, "w")  # noqa: SIM115 - replaces the lost stream for the process's life

    def write(self, text: str) -> int:
        try:
            self._stream.write(text)
        except OSError:  # a broken pipe; a terminal that hung up (EIO)
            self._lost()
        return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._lost()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        """The stream's (Rich draws ASCII boxes for one that is not UTF-8)."""
        return getattr(self._stream, "encoding", None) or "utf-8"

    def fileno(self) -> int:
        return self._stream.fileno()


PLAIN_INTERVAL_S = 5.0  # one status line every few seconds when not in a terminal
LIVE_REFRESH_HZ = 4
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
FINAL_LINES_ROWS = 6  # rows printed under the last frame: the final line, the record, a stop message
_TERMINAL = 1  # the terminal the dashboard draws on (stdout); stdin may be a pipe (`true | kaio run ...`)


class _NoEcho:
    """While the dashboard is drawn, the terminal echoes no key (Ctrl-C still interrupts) and a Ctrl-C does
    not discard what kaio wrote.

    An echo lands after the frame's last, full-width line and wraps it (``^C`` does): the frame
    moves one row down and leaves a stale header above each later redraw. The dashboard reads no
    keys, so nothing typed is lost. And a terminal's Ctrl-C flushes the output not yet shown
    (unless NOFLSH): a second Ctrl-C right after the first discarded the last frame and the final
    line. Echo comes back when the dashboard stops; NOFLSH stays until kaio exits, once its last
    lines are shown.
    """

    def __init__(self) -> None:
        self._saved: list | None = None

    def quiet(self) -> None:
        try:
            import termios
        except ImportError:  # not a POSIX terminal
            return
        try:
            if os.tcgetpgrp(_TERMINAL) != os.getpgrp():  # a background job (`&`): changing it would stop kaio
                return
            self._saved = termios.tcgetattr(_TERMINAL)
            quiet = termios.tcgetattr(_TERMINAL)
            quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
            quiet[3] |= termios.NOFLSH
            termios.tcsetattr(_TERMINAL, termios.TCSANOW, quiet)
        except (OSError, termios.error):  # not a terminal
            self._saved = None

    def restore(self) -> None:
        if self._saved is None:
            return
        import atexit
        import termios

        saved, self._saved = self._saved, None
        with contextlib.suppress(OSError, termios.error):
            echoing = termios.tcgetattr(_TERMINAL)
            echoing[3] = (echoing[3] & ~(termios.ECHO | termios.ECHOCTL)) | (
                saved[3] & (termios.ECHO | termios.ECHOCTL)
            )
            termios.tcsetattr(_TERMINAL, termios.TCSANOW, echoing)
        atexit.register(_restore_at_exit, saved)


def _restore_at_exit(saved: list) -> None:
    import termios

    with contextlib.suppress(OSError, termios.error):
        termios.tcsetattr(_TERMINAL, termios.TCSADRAIN, saved)  # once what kaio wrote is shown


class LiveView:
    """Rich ``Live`` pulling the latest immutable snapshot at most 4 times a second."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._snapshot: Snapshot | None = None
        self._live: Live | None = None
        self._echo = _NoEcho()
        self._rows_after = 0  # rows left free under the frame

    def _renderable(self):
        from kaio.dashboard import render

        if self._snapshot is None:
            return ""
        self._clear_a_rewrapped_frame()
        return render(self._snapshot, rows_after=self._rows_after)

    def _clear_a_rewrapped_frame(self) -> None:
        """The terminal narrowed: it re-wrapped the last frame's full-width lines, each now over several rows,
        and Rich would move up only one row a line before drawing the next frame, leaving pieces of the old one
        above it. Up over the rows the old frame takes now (the terminal stops at its top row), erase from
        there down, and let Rich draw from that point. (A terminal that does not re-wrap, xterm's kind, loses
        from view the lines just above the frame instead.)"""
        live_render = getattr(self._live, "_live_render", None)
        shape = getattr(live_render, "_shape", None)
        width = self.console.size.width
        if shape is None or shape[0] <= width:
            return
        old_width, height = shape
        rows = height * -(-old_width // width)  # each line's rows, rounded up
        self.console.file.write(f"\r\x1b[{rows - 1}A\x1b[J" if rows > 1 else "\r\x1b[J")
        live_render._shape = None  # type: ignore[union-attr]  # nothing left to move over

    def start(self, snapshot: Snapshot) -> None:
        from rich.live import Live

        self._snapshot = snapshot
        self._live = Live(
            get_renderable=self._renderable,
            console=self.console,
            refresh_per_second=LIVE_REFRESH_HZ,
            screen=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._echo.quiet()
        self._live.start()

    def child_output(self, line: str) -> None:
        """Shown in the dashboard's log panel (from the snapshot); the full log is in child.log."""

    def update(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def stop(self, snapshot: Snapshot, said_after: str | None = None) -> None:
        from kaio.dashboard import final_line

        self._snapshot = snapshot
        # Below the last frame come the final line, where the record is, and how the run stopped (each may
        # wrap): a frame with a long output panel would push its own header off the screen.
        self._rows_after = FINAL_LINES_ROWS
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
        self._echo.restore()
        self.console.print(final_line(snapshot), markup=False, highlight=False)


class PlainView:
    """No terminal (CI, nohup, a pipe) or ``--plain``: the child's output, and a status line every few seconds."""

    def __init__(self, console: Console, *, echo_child: bool = True, interval_s: float = PLAIN_INTERVAL_S) -> None:
        self.console = console
        self.echo_child = echo_child
        self.interval_s = interval_s
        self._next = 0.0
        self._last_line = ""
        self._last_status = ""
        self._warned: set[str] = set()

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def start(self, snapshot: Snapshot) -> None:
        """``snapshot``: the project as the session begins; its warnings are the earlier sessions' (in the report
        already), not news of this one."""
        self._next = time.monotonic() + self.interval_s
        self._last_status = snapshot.status
        self._warned.update(snapshot.warnings)

    def child_output(self, line: str) -> None:
        """A line as a terminal would have shown it: a progress bar's redraws (carriage returns) were one ever
        longer line in a log, and the child's colour codes were noise there."""
        if not self.echo_child:
            return
        shown = as_shown(line)
        if shown.strip() or "\r" not in line.rstrip("\r\n"):  # a bar cleared by its redraw shows nothing
            self._print(shown)

    def update(self, snapshot: Snapshot) -> None:
        from kaio.dashboard import plain_line

        self._warn(snapshot)
        now = time.monotonic()
        if now < self._next and snapshot.status == self._last_status:  # a new status (STOPPING) is said at once
            return
        self._next, self._last_status = now + self.interval_s, snapshot.status
        line = plain_line(snapshot)
        if line != self._last_line:
            self._print(line)
            self._last_line = line

    def _warn(self, snapshot: Snapshot) -> None:
        """Each warning once, as it comes (a CI log has no warnings panel; the status line only counts them).
        A live one once per wording: it counts its seconds up ("no step for 61 s") without being a new one."""
        for warning in snapshot.warnings:
            wording = _NUMBER.sub("#", warning) if warning in snapshot.live_warnings else warning
            if wording not in self._warned:
                self._warned.add(wording)
                self._print(f"kaio: warning: {warning}")

    def stop(self, snapshot: Snapshot, said_after: str | None = None) -> None:
        from kaio.dashboard import final_line, plain_line

        if said_after is not None:  # how the run stopped comes after the final line, once
            self._warned.add(said_after)
        self._warn(snapshot)
        self._print(plain_line(snapshot))
        self._print(final_line(snapshot))


def is_terminal(console: Console) -> bool:
    """Whether the console writes to a terminal. Rich's ``is_terminal`` also says yes under FORCE_COLOR (a CI log
    that renders colours), where a live dashboard would write every frame, cursor moves and all, into a file."""
    isatty = getattr(console.file, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # a closed file
        return False


def choose_view(console: Console, plain: bool):
    if plain or not is_terminal(console) or console.is_dumb_terminal:
        return PlainView(console)
    return LiveView(console)

"""Stopping a session on request: Ctrl-C, SIGTERM, a scheduler's warning, a closed terminal.

A first request stops gracefully (the ranks get SIGTERM; the Trainer saves a checkpoint and returns); a second one,
or the end of ``launch.grace_seconds``, kills every process of the session. The supervisor loop calls ``check``
each turn; the signal handlers only post records to its queue (they run between any two bytecodes of the loop).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from kaio import launch
from kaio.record.types import Note, Record
from kaio.run.state import RunState
from kaio.telemetry.protocol import stop_marker_name


@dataclass
class StopRequests:
    """What was asked, and where the session was then: the first press stops gracefully, the second kills."""

    requests: int = 0
    because: str | None = None  # what asked first ("Ctrl-C", "SIGTERM"...): the status says why it stops
    signal: str | None = None  # the signal that asked first (SIGINT for a Ctrl-C, SIGUSR1...): the session's record
    started: bool = False  # the stopped session had a rank, or a process of the launcher's (looked up until so)
    ended_unstarted: bool = False  # killed with nothing started: the stop asked for, not a kill (exit 143)
    first_at: float | None = None  # when the grace period started (a scheduler's warning starts none)
    warned: bool = False  # the stop came from a scheduler's time-limit warning (SIGUSR1)
    killed: bool = False
    step_at_request: int = 0  # the session's last step at the stop: a checkpoint from it on is the stop's
    trained_before: bool = False  # the Trainer had ended its training before the stop was asked for
    killed_in: str | None = None  # the session's phase when the grace period ended (kaio.run.stalls' words)


STARTING_GRACE_S = 5.0  # the grace before a rank has started: nothing to save yet


class StopControl:
    """The stop requests of a run's sessions, and the signals that make them."""

    def __init__(
        self,
        state: RunState,
        grace_seconds: float,
        *,
        post: Callable[[Record], None],
        note: Callable[[str], None],
        phase: Callable[[], str],
        fifo_path: Callable[[], Path | None],
        spool: Path | None = None,
    ) -> None:
        self.state = state
        self.grace_seconds = grace_seconds
        self._post = post  # into the supervisor's queue: safe from a signal handler
        self._note = note  # journaled at once: from the loop only
        self._phase = phase  # what the session is doing now: a step, an evaluation, a save...
        self._fifo_path = fifo_path  # the session's FIFO: how its processes are found to kill them
        self._spool = spool  # the ranks' spool folder, where a stop leaves its marker (``stop_marker_name``)
        self.asked = StopRequests()

    @property
    def requested(self) -> bool:
        return self.asked.requests > 0

    def between_sessions(self) -> None:
        """A Ctrl-C while no child runs: no automatic restart follows."""
        self.asked.requests = max(self.asked.requests, 1)

    # ------------------------------------------------------------ signals

    def install(self, proc: subprocess.Popen) -> dict:
        """The handlers for the session of ``proc``; returns the ones they replace (for ``restore``)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if proc.poll() is not None:
                return  # the child has ended on its own: its record is being written, nothing to stop
            self.request(proc, because="Ctrl-C" if signum == signal.SIGINT else "SIGTERM", by=signum)

        def warned(signum, frame):
            # A scheduler's warning that the time is nearly up (SLURM's --signal=USR1@T): one graceful stop,
            # never a kill, however often it comes.
            if proc.poll() is None and not self.asked.requests:
                self._said("the scheduler warned that the job's time is nearly up (SIGUSR1): stopping gracefully")
                self.request(proc, warning=True, because="SIGUSR1: the scheduler's time is nearly up", by=signum)

        def hung_up(signum, frame):
            # The terminal closed (a window shut, an ssh connection dropped): nobody watches any more. Stopped as
            # by a Ctrl-C, so the run ends with a checkpoint and a whole record rather than training on unseen
            # with a record that stops at this moment. `nohup` (SIGHUP ignored) keeps a run going instead.
            closed = leave_a_hung_up_terminal()
            if proc.poll() is None and not self.asked.requests:
                why = "the terminal closed (SIGHUP)" if closed else "SIGHUP (a kill -HUP; the terminal is still there)"
                self._said(f"{why}: stopping gracefully (run kaio under nohup, tmux or screen to keep it going)")
                self.request(proc, because="the terminal closed" if closed else "SIGHUP", by=signum)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, warned)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup's choice stands
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hung_up)
        return previous

    @staticmethod
    def restore(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _said(self, text: str) -> None:
        self._post(Note(text=text, level="info", t_wall=time.time()))

    # ------------------------------------------------------------ requests

    def request(
        self, proc: subprocess.Popen, *, warning: bool = False, because: str | None = None, by: int | None = None
    ) -> None:
        """A first request stops gracefully (the Trainer saves a checkpoint); a second kills. A scheduler's
        warning stops gracefully with no deadline of kaio's (the scheduler's own SIGTERM is the deadline: it
        starts the grace period, without a second SIGTERM to the ranks). ``because``: what asked."""
        asked = self.asked
        asked.because = asked.because or because
        if asked.signal is None and by is not None:  # ``by``: the signal that asked
            asked.signal = signal.Signals(by).name
        if warning:
            asked.requests, asked.warned = 1, True
            self._mark()
            self._signal_the_ranks(proc)
            return
        if asked.warned and asked.first_at is None:
            asked.first_at = time.monotonic()
            return
        asked.requests += 1
        if asked.requests == 1:
            asked.first_at = time.monotonic()
            self._mark()
            ledger = self.state.ledger
            if ledger.every_script_ended(ledger.session):
                # Only the ranks' exits are left: no signal (torch elastic's agent would end the job as killed);
                # the grace period still holds, and a second Ctrl-C kills.
                return
            self._leave_the_marker()
            launch.signal_group(proc, signal.SIGTERM)
        else:
            asked.killed = True
            self.kill(proc)

    def _leave_the_marker(self) -> None:
        """Before the SIGTERM: a rank that has no handler yet, or is not started yet, finds the stop when it sets one
        (``kaio.child.stop.stop_asked_before_start``); the signal alone was lost on it, and it trained to its end."""
        if self._spool is not None:
            with contextlib.suppress(OSError):  # a full disk: the signal alone, as before
                self._spool.mkdir(parents=True, exist_ok=True)
                (self._spool / stop_marker_name(self.state.ledger.session)).touch()

    def check(self, proc: subprocess.Popen) -> None:
        """After the grace period, the first request turns into SIGKILL. A launcher that has started no process
        yet has nothing to save: one waiting in torch's rendezvous for the other nodes (which holds off its signal
        handlers) is killed after ``STARTING_GRACE_S``, not after the grace a checkpoint needs."""
        asked = self.asked
        if not asked.requests or asked.killed or asked.first_at is None:
            return
        waited = time.monotonic() - asked.first_at
        if waited <= min(self.grace_seconds, STARTING_GRACE_S):
            return  # (the processes are looked up only past the short grace, once a tick)
        started = self._a_rank_started(proc)
        grace = self.grace_seconds if started else min(self.grace_seconds, STARTING_GRACE_S)
        if waited > grace:
            asked.killed, asked.killed_in, asked.ended_unstarted = True, self._phase(), not started
            if started:
                self._note(f"the child did not stop within {grace:g} s of SIGTERM; killed")
            else:
                self._note(
                    f"no process of the training had started (in torch's rendezvous?): the launcher was ended after {grace:g} s"
                )
            self.kill(proc)

    def _a_rank_started(self, proc: subprocess.Popen) -> bool:
        """A rank said it began, or the launcher has a process of its own (a script that tells kaio nothing)."""
        if not self.asked.started:
            ledger = self.state.ledger
            record = ledger.session_record(ledger.session)
            try:
                self.asked.started = (
                    record is None or record.start_step is not None or bool(psutil.Process(proc.pid).children())
                )
            except psutil.Error:  # the launcher is gone: nothing left to wait for
                pass
        return self.asked.started

    def _signal_the_ranks(self, proc: subprocess.Popen) -> None:
        """A scheduler's warning goes to the ranks that said where they are, not to the launcher: torch elastic's
        agent, signalled, kills its ranks ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (the grace period) later, and a
        warning has no deadline of kaio's (a multi-node job's 50 s save was killed 35 s after the warning). Before
        any rank has, the launcher's group (there is nothing to save yet)."""
        fifo_path = self._fifo_path()
        pids = {r.pid for r in self.state.ledger.ranks.values() if r.pid}
        ranks = [p for p in launch.run_processes(fifo_path) if p.pid in pids] if fifo_path is not None else []
        if not ranks:
            launch.signal_group(proc, signal.SIGTERM)
        for rank in ranks:
            with contextlib.suppress(psutil.Error):
                rank.send_signal(signal.SIGTERM)

    def kill(self, proc: subprocess.Popen) -> None:
        """Every process of the session: the launcher's group, and ranks in sessions of their own."""
        launch.kill_group(proc)
        fifo_path = self._fifo_path()
        if fifo_path is not None:
            launch.kill_run(fifo_path)

    def _mark(self) -> None:
        """Where the session was when the stop was asked for."""
        ledger = self.state.ledger
        progress = ledger.progress.get(ledger.session)
        self.asked.step_at_request = (progress.last_step or 0) if progress is not None else 0
        self.asked.trained_before = progress is not None and progress.trained_to_end


def leave_a_hung_up_terminal() -> bool:
    """After a SIGHUP: stdout and stderr, where they are a terminal that hung up, write to /dev/null from now on
    (a write to a hung-up terminal fails with EIO, and the run's end still has its record to write). A terminal
    still there (a `kill -HUP`) is left as it is, its echo restored at the end as usual. Whether one hung up."""
    null = os.open(os.devnull, os.O_WRONLY)
    closed = False
    try:
        for fd in (1, 2):
            try:
                # A character device (isatty() is False on a hung-up terminal: its ioctl fails), not /dev/null...
                if not stat.S_ISCHR(os.fstat(fd).st_mode) or os.fstat(fd).st_rdev == os.fstat(null).st_rdev:
                    continue
                termios.tcgetattr(fd)
            except termios.error as exc:  # ...whose ioctl fails with EIO: hung up
                if exc.args and exc.args[0] == errno.EIO:
                    os.dup2(null, fd)
                    closed = True
            except OSError:
                continue
    finally:
        os.close(null)
    return closed

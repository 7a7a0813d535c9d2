"""The supervisor loop: start the child, gather everything it and the GPUs say, finalize.

Threads only produce (FIFO reader, GPU poller, child output); this loop on
the main thread is the single consumer that updates ``RunState``, appends to
the journal, refreshes the view and rewrites the history. Whatever way the
child ends (success, crash, Ctrl-C, SIGTERM) ``finalize`` runs.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import queue
import re
import signal
import stat
import subprocess
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec

from kaio import launch
from kaio.config import LaunchConfig, RunConfig, config_snapshot
from kaio.fsutil import atomic_write_json
from kaio.nodes import first_rank
from kaio.record import rules
from kaio.record.paths import ProjectPaths, start_over_command
from kaio.record.types import (
    ChildStarted,
    Note,
    PollStats,
    Record,
    SessionCounters,
    SessionEnd,
    SessionKind,
    SessionStart,
    Status,
)
from kaio.run import diagnose
from kaio.run.checkpoints import without_optimizer
from kaio.run.ledger import RunLedger
from kaio.run.node_watch import NodeWatch
from kaio.run.recorder import Recorder
from kaio.run.snapshot import Snapshot, add_output_line, as_shown, progress_bar
from kaio.run.stalls import StallWatch, capture_stacks
from kaio.run.state import RunState
from kaio.telemetry import spool
from kaio.telemetry.fifo import FifoReader, TelemetryFifo

LOG_TAIL_LINES = 200
# The dict the Trainer prints at every log ({'loss': '4.55', 'grad_norm': ...}, {'eval_loss': ...},
# {'train_runtime': ...}): child.log keeps it; the dashboard and plain output show its numbers on the status
# line, and the rest of the output (warnings, errors, the script's own prints, its own dicts among them) in full.
_TRAINER_LOG_LINE = re.compile(  # matched on what a terminal shows (as_shown)
    r"^\{'(?:loss|grad_norm|learning_rate|epoch|(?:train|eval|test)_[\w./-]+)': .*\}\s*$"
)
# transformers 5 prints each float of its dict as a string ('loss': '4.55'): a dict with a bare float (a script
# printing trainer.evaluate()'s metrics) is the script's own line.
_BARE_FLOAT = re.compile(r"': -?(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][-+]?\d+)?[,}]")
LOOP_INTERVAL_S = 0.1
RENDEZVOUS_PATIENCE_S = 120.0  # a job of several machines without a started rank by then: where the nodes meet
REFRESH_COST_FACTOR = 99  # wait at least 99x a refresh's duration before the next: the record costs <= 1% of the time


def rendezvous_warning(launch: LaunchConfig, ledger: RunLedger, now: float) -> str | None:
    """A job of several machines whose session has no started rank after ``RENDEZVOUS_PATIENCE_S``: torch's
    rendezvous waits for every node, in silence, for 15 minutes; where they must meet."""
    progress, record = ledger.progress.get(ledger.session), ledger.session_record(ledger.session)
    started = record is None or record.start_step is not None  # this session's first rank said it began
    if launch.nnodes < 2 or started or progress is None or progress.t_wall is None:
        return None
    waited = now - progress.t_wall
    if waited < RENDEZVOUS_PATIENCE_S:
        return None
    return (
        f"no rank has started after {waited:.0f} s: the job's {launch.nnodes} nodes meet at "
        f"{launch.main_addr}:{launch.main_port}; every node's kaio must be running with that --main-addr and "
        "--main-port (torch waits up to 15 minutes for a missing one)"
    )


def is_trainer_log_line(shown: str, transformers_version: str | None) -> bool:
    """Whether a line of the child's output is the dict the Trainer prints at each log (not the script's)."""
    if not _TRAINER_LOG_LINE.match(shown):
        return False
    major = (transformers_version or "").split(".")[0]
    return not (major.isdigit() and int(major) >= 5 and _BARE_FLOAT.search(shown))


class View(Protocol):
    """How the run is shown: the Rich dashboard or plain lines."""

    def start(self, snapshot: Snapshot) -> None: ...
    def child_output(self, line: str) -> None: ...
    def update(self, snapshot: Snapshot) -> None: ...
    def stop(self, snapshot: Snapshot) -> None: ...


@dataclass
class SessionRequest:
    kind: SessionKind = SessionKind.RUN
    resume_from: Path | None = None
    notes: list[str] = field(default_factory=list)  # recorded in the report (config changes, the checkpoint)


@dataclass
class SessionOutcome:
    exit_code: int
    status: Status
    signal: str | None = None
    error: str | None = None
    message: str | None = None  # what a stop on request kept, for the user
    error_at: float | None = None  # when the first rank failed (wall time)
    started: bool = True  # False: the training process could not be started at all


@dataclass
class _Stop:
    """Ctrl-C / SIGTERM bookkeeping: first press stops gracefully, second kills."""

    requests: int = 0
    first_at: float | None = None  # when the grace period started (a scheduler's warning starts none)
    warned: bool = False  # the stop came from a scheduler's time-limit warning (SIGUSR1)
    killed: bool = False
    step_at_request: int = 0  # the session's last step at the stop: a checkpoint from it on is the stop's
    trained_before: bool = False  # the Trainer had ended its training before the stop was asked for


class NodeStream(Protocol):
    def pop_warnings(self) -> list[str]: ...


class Supervisor:
    def __init__(
        self,
        cfg: RunConfig,
        recorder: Recorder,
        view: View,
        *,
        poller_factory: Callable | None = None,
        stream: NodeStream | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path  # the config the user gave (None: a resume of the saved one), for hints
        self.recorder = recorder
        self.state: RunState = recorder.state
        self.paths = ProjectPaths(cfg.report_dir)
        self.view = view
        self._poller_factory = poller_factory
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._stop = _Stop()
        self._reader: FifoReader | None = None
        self._fifo_path: Path | None = None
        self._stalls = StallWatch(cfg.reporting.stall_seconds, time.monotonic(), _lead_rank(cfg))
        self._capture: threading.Thread | None = None  # the stacks of a stall, being captured
        self._stop_after_capture: str | None = None  # on_stall: stop, once the stacks are read (what to say)
        self.sessions_started = 0
        self.on_refresh: list[Callable[[RunState], None]] = []  # report writers, the index commit
        self.on_loop: list[Callable[[RunState], None]] = []  # cheap consumers called every loop (Comet feed)
        self._refresh_failures: set[str] = set()
        # The head of a job of several machines follows the other nodes' records (on a shared filesystem).
        self._nodes = NodeWatch(self.paths) if cfg.launch.nnodes > 1 and cfg.launch.node_rank == 0 else None
        self._stream = stream  # the nodes' records streamed to the head (kaio.run.stream): its warnings are said

    # ------------------------------------------------------------ sessions

    def run(self, request: SessionRequest, latest_checkpoint: Callable[[], Path | None]) -> SessionOutcome:
        """One session, then automatic restarts from the latest checkpoint while it fails
        (``launch.max_restarts``), unless the user stopped it."""
        outcome = self.run_session(request)
        restarts = 0
        while (
            outcome.status == Status.FAILED
            and outcome.started  # a process that could not be started would fail again the same way
            and restarts < self.cfg.launch.max_restarts
            and not self.stop_requested
        ):
            restarts += 1
            checkpoint = latest_checkpoint()
            cause = outcome.error or outcome.signal or f"exit code {outcome.exit_code}"
            later = self.state.ledger.later_training_of(checkpoint) if checkpoint else None
            if checkpoint is not None and later is not None:  # as `kaio resume` refuses it (project.resume)
                said = (
                    f"no automatic restart after: {cause}: the latest checkpoint, {checkpoint.name}, was saved by "
                    f"the script's training {later}, and a restart hands it to the script's first train() only"
                )
                self._note(said)
                self.view.child_output(f"kaio: {said}")
                break
            origin = f"from {checkpoint.name}" if checkpoint else "from the start (no complete checkpoint yet)"
            note = f"automatic restart {restarts} of {self.cfg.launch.max_restarts} after: {cause}; {origin}"
            partial = without_optimizer(checkpoint) if checkpoint else None
            note += f" ({partial})" if partial else ""
            said = f"kaio: {note}"  # on screen, between the failed session's output and the new one's
            self._log_tail.append(said)
            self.view.child_output(said)
            outcome = self.run_session(
                SessionRequest(SessionKind.RESTART, checkpoint.resolve() if checkpoint else None, [note])
            )
        return outcome

    def run_session(self, request: SessionRequest) -> SessionOutcome:
        self.sessions_started += 1
        session = self.state.ledger.session + 1
        snapshot = config_snapshot(self.cfg)
        atomic_write_json(self.paths.config, snapshot)
        fifo = TelemetryFifo()
        plan = launch.LaunchPlan(
            fifo_path=fifo.path,
            report_dir=self.paths.report_dir.resolve(),
            config_path=self.paths.config.resolve(),
            session=session,
            main_process_port=launch.free_port(),
            resume_from=request.resume_from,
        )
        argv, env = launch.build_command(self.cfg, plan, os.environ)
        launch.adopt_orphans()
        self._fifo_path = fifo.path
        self.record(
            SessionStart(
                session=session,
                kind=request.kind,
                t_wall=time.time(),
                t_mono=time.monotonic(),
                resume_from=str(request.resume_from) if request.resume_from else None,
                poll_hz=self.cfg.reporting.poll_hz,
                config=snapshot,
                argv=launch.masked(argv),
            )
        )
        for text in request.notes:
            self._note(f"session {session}: {text}", level="info")
        self._stalls = StallWatch(self.cfg.reporting.stall_seconds, time.monotonic(), _lead_rank(self.cfg))
        reader = FifoReader(fifo.read_fd, lambda event: self._queue.put(("record", event)))
        reader.start()
        self._reader = reader
        poller = self._start_poller()
        with open(self.paths.child_log, "ab") as log_file:
            log_file.write(
                f"\n===== kaio session {session} ({request.kind.value}) {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode()
            )
            log_file.flush()
            offset = log_file.tell()
            try:
                proc = launch.spawn(argv, env, log_file)
            except OSError as exc:  # the interpreter missing, not executable, out of processes...
                return self._not_started(session, argv[0], exc, fifo, reader, poller)
        self.record(ChildStarted(session=session, pid=proc.pid, t_wall=time.time()))
        output = threading.Thread(
            target=self._follow_output, args=(proc, offset), name="kaio-child-output", daemon=True
        )
        output.start()
        previous_handlers = self._install_signal_handlers(proc)
        try:  # until session_end is journaled: a Ctrl-C during the teardown only counts as a press
            outcome = self._run_and_end(proc, session, fifo, reader, poller, output)
        finally:
            self._restore_signal_handlers(previous_handlers)
        return outcome

    def _run_and_end(self, proc, session: int, fifo, reader, poller, output) -> SessionOutcome:
        """Supervise the child until it exits, then gather what is left and journal the session's end."""
        outlived: list[int] = []
        try:
            self._loop(proc)
        finally:
            # Ranks that outlived the launcher (killed by an OOM killer, a scheduler...): adopted by kaio, stopped here.
            outlived = launch.end_run(fifo.path, self.cfg.launch.grace_seconds)
            fifo.close_write_end()
            reader.join(timeout=10)
            output.join(timeout=5)
            if self._capture is not None:
                self._capture.join(timeout=10)
            if poller is not None:
                poller.stop(closing_tick=True)  # the last steps get their samples and energy
            self._drain()
            fifo.close()
        journal = self.recorder.journal
        spooled, bad = spool.merge_into(self.paths.spool, self.state.ledger.received, self.record, journal.write_out)
        if outlived:
            self._note(
                f"{len(outlived)} process(es) of the run outlived the launcher and were stopped by kaio "
                f"(pids {', '.join(map(str, outlived))})"
            )
        outcome = self._outcome(proc.returncode, session)
        self._record_end(
            session,
            outcome,
            counters=SessionCounters(
                malformed_lines=reader.stats.malformed + bad,
                oversized_lines=reader.stats.oversized,
                spooled_events=spooled,
            ),
            poll_stats=msgspec.convert(poller.stats(), PollStats, strict=False) if poller is not None else None,
        )
        if reader.stats.malformed or reader.stats.oversized:
            self._note(
                f"telemetry: {reader.stats.malformed} malformed and {reader.stats.oversized} oversized lines skipped"
            )
        self.recorder.journal.flush(fsync=True)
        return outcome

    def _not_started(self, session: int, program: str, exc: OSError, fifo, reader, poller) -> SessionOutcome:
        """The training process could not be started: a FAILED session that says why, with a shell's exit code
        (127: not found, 126: found but not run)."""
        fifo.close_write_end()
        reader.join(timeout=10)
        if poller is not None:
            poller.stop()
        self._drain()
        fifo.close()
        # A shell's codes: 127 not found, 126 found but not executable; else (no memory, no process to spare) 1.
        code = 127 if exc.errno == errno.ENOENT else 126 if exc.errno in _NOT_EXECUTABLE else 1
        error = f"the training process could not be started: {exc.strerror or exc}: {exc.filename or program}"
        self.view.child_output(f"kaio: {error}")  # where the child's own output, had it started, would be
        outcome = SessionOutcome(code, Status.FAILED, error=error, started=False)
        self._record_end(session, outcome)
        self.recorder.journal.flush(fsync=True)
        return outcome

    def _record_end(self, session: int, outcome: SessionOutcome, **measured) -> None:
        """The session's end, journaled; ``measured``: the pipe's counters and the poller's statistics."""
        self.record(
            SessionEnd(
                session=session,
                t_wall=time.time(),
                t_mono=time.monotonic(),
                status=outcome.status,
                exit_code=outcome.exit_code,
                signal=outcome.signal,
                error=outcome.error,
                error_at=outcome.error_at,
                **measured,
            )
        )

    # ------------------------------------------------------------ the loop

    def _loop(self, proc: subprocess.Popen) -> None:
        refresh_s = self.cfg.reporting.refresh_seconds
        next_refresh = time.monotonic() + min(refresh_s, 2.0)
        while True:
            exited = proc.poll() is not None
            self._drain()
            self._check_stop(proc)
            self._check_stall(proc)
            if self._nodes is not None:
                self._follow_nodes()
            if self._stream is not None:
                for warning in self._stream.pop_warnings():
                    self._note(warning)
            now = time.monotonic()
            self.view.update(self.snapshot())
            for consumer in self.on_loop:
                consumer(self.state)
            if now >= next_refresh:
                self._refresh()
                # Rewriting a long run's reports takes a while and holds up this loop
                # (the dashboard, the queues): keep it to a hundredth of the time.
                took = time.monotonic() - now
                next_refresh = time.monotonic() + max(refresh_s, REFRESH_COST_FACTOR * took)
            if exited:
                return
            time.sleep(LOOP_INTERVAL_S)

    def _trainer_log_line(self, shown: str) -> bool:
        run = self.state.ledger.run
        return is_trainer_log_line(shown, run.environment.transformers if run and run.environment else None)

    def _drain(self) -> None:
        handled = 0
        while True:
            try:
                kind, item = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "log":
                if not self._trainer_log_line(as_shown(item)):  # the Trainer's metrics: on the status line
                    add_output_line(self._log_tail, item)
                    self.view.child_output(item)
            elif kind == "redraw":  # the panel shows a bar as it stands; a log gets its line when it is done
                add_output_line(self._log_tail, item)
            else:  # "record": a child event, a GPU tick, the device list
                self.record(item)
                self._stalls.seen(item, time.monotonic())
            handled += 1
        if handled:
            self.recorder.journal.flush()
            self._warn_once_about_the_journal()

    def record(self, record: Record) -> None:
        self.recorder.record(record)

    def _note(self, text: str, level: str = "warning") -> None:
        self.record(Note(text=text, level=level, t_wall=time.time()))  # type: ignore[arg-type]

    def _warn_once_about_the_journal(self) -> None:
        error = self.recorder.journal.write_error
        if error is not None:
            message = f"cannot write {self.paths.journal} ({error.strerror}): kaio keeps the records in memory and the child's spool, and writes them once it can; the training goes on"
            if message not in self._refresh_failures:
                self._refresh_failures.add(message)
                self.state.warn(message)

    def _refresh(self) -> None:
        if self.recorder.journal.write_out():  # else the spool holds what the journal could not write yet
            spool.prune(self.paths.spool, self.state.ledger.received)
        for writer in self.on_refresh:
            try:
                writer(self.state)
            except Exception as exc:
                message = f"a report refresh failed: {type(exc).__name__}: {exc}"
                if message not in self._refresh_failures:
                    self._refresh_failures.add(message)
                    self._note(message)

    def snapshot(self) -> Snapshot:
        running = self.state.status == Status.RUNNING
        status = "STOPPING" if self._stop.requests and running else None
        stall = self._stalls.live_warning(time.monotonic(), self.state.median_step_time()) if running else None
        live = self._live_warnings() + ((stall,) if stall else ())
        snapshot = self.state.snapshot(
            status=status, log_tail=tuple(self._log_tail), live_warnings=live, report_path=str(self.paths.report)
        )
        launch = self.cfg.launch
        if launch.nnodes > 1:
            where = f"{launch.nnodes} nodes at {launch.main_addr}:{launch.main_port}"
            snapshot = dataclasses.replace(snapshot, rendezvous=where)
        if self._nodes is not None:
            snapshot = dataclasses.replace(snapshot, nodes=self._nodes.rows())  # from memory: no I/O
        return dataclasses.replace(snapshot, eta_s=None) if stall else snapshot  # stalled: no time of arrival

    def _follow_nodes(self) -> None:
        """The other nodes' records (the head of a job of several machines): what goes wrong there costs the
        view of them, never this node's training."""
        assert self._nodes is not None
        try:
            lost = self._nodes.poll()
        except Exception as exc:
            message = f"the other nodes' records could not be followed: {type(exc).__name__}: {exc}"
            if message not in self._refresh_failures:
                self._refresh_failures.add(message)
                self._note(message)
            return
        for warning in lost:
            self._note(warning)

    def _live_warnings(self) -> tuple[str, ...]:
        return self._telemetry_warnings() + self._rendezvous_warning()

    def _rendezvous_warning(self) -> tuple[str, ...]:
        said = rendezvous_warning(self.cfg.launch, self.state.ledger, time.time())
        return (said,) if said else ()

    def _telemetry_warnings(self) -> tuple[str, ...]:
        stats = self._reader.stats if self._reader is not None else None
        if stats is not None and (stats.malformed or stats.oversized):
            return (f"telemetry: {stats.malformed} malformed and {stats.oversized} oversized lines skipped",)
        return ()

    # ------------------------------------------------------------ threads

    def _follow_output(self, proc: subprocess.Popen, offset: int) -> None:
        """``tail -f`` of the child's log, from this session's start, until the child has exited."""
        with open(self.paths.child_log, "rb") as log:
            log.seek(offset)
            partial = b""
            while True:
                exited = proc.poll() is not None
                chunk = log.read(1 << 16)
                if chunk:
                    *lines, partial = (partial + chunk).split(b"\n")
                    for raw in lines:
                        self._queue.put(("log", raw.decode("utf-8", errors="replace").rstrip("\r")))
                    partial = _recent_redraws(partial)
                    redrawn = _latest_bar(partial)  # a bar redrawn in place: its line ends only when it is done
                    if redrawn is not None:
                        self._queue.put(("redraw", redrawn))
                elif exited:
                    break
                else:
                    time.sleep(0.05)
            if partial:
                self._queue.put(("log", partial.decode("utf-8", errors="replace")))

    def _start_poller(self):
        if self._poller_factory is None:
            return None
        poller = self._poller_factory(lambda record: self._queue.put(("record", record)))
        if poller is not None:
            poller.start()
        return poller

    # ------------------------------------------------------------ stopping

    def _install_signal_handlers(self, proc: subprocess.Popen):
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if proc.poll() is not None:
                return  # the child has ended on its own: its record is being written, nothing to stop
            self._request_stop(proc)

        def warned(signum, frame):
            # A scheduler's warning that the time is nearly up (SLURM's --signal=USR1@T): one graceful stop,
            # never a kill, however often it comes.
            if proc.poll() is None and not self._stop.requests:
                said = "the scheduler warned that the job's time is nearly up (SIGUSR1): stopping gracefully"
                self._queue.put(("record", Note(text=said, level="info", t_wall=time.time())))
                self._request_stop(proc, warning=True)

        def hung_up(signum, frame):
            # The terminal closed (a window shut, an ssh connection dropped): nobody watches any more. Stopped as
            # by a Ctrl-C, so the run ends with a checkpoint and a whole record rather than training on unseen
            # with a record that stops at this moment. `nohup` (SIGHUP ignored) keeps a run going instead.
            closed = leave_a_hung_up_terminal()
            if proc.poll() is None and not self._stop.requests:
                why = "the terminal closed (SIGHUP)" if closed else "SIGHUP (a kill -HUP; the terminal is still there)"
                said = f"{why}: stopping gracefully (run kaio under nohup, tmux or screen to keep it going)"
                self._queue.put(("record", Note(text=said, level="info", t_wall=time.time())))
                self._request_stop(proc)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, warned)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup's choice stands
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, hung_up)
        return previous

    def _request_stop(self, proc: subprocess.Popen, *, warning: bool = False) -> None:
        """A first request stops gracefully (the Trainer saves a checkpoint); a second kills. A scheduler's
        warning stops gracefully with no deadline of kaio's (the scheduler's own SIGTERM is the deadline: it
        starts the grace period, without a second SIGTERM to the ranks)."""
        stop = self._stop
        if warning:
            stop.requests, stop.warned = 1, True
            self._mark_stop()
            launch.signal_group(proc, signal.SIGTERM)
            return
        if stop.warned and stop.first_at is None:
            stop.first_at = time.monotonic()
            return
        self._stop.requests += 1
        if self._stop.requests == 1:
            self._stop.first_at = time.monotonic()
            self._mark_stop()
            if self.state.ledger.every_script_ended(self.state.ledger.session):
                # Only the ranks' exits are left: no signal (torch elastic's agent would end the job as killed);
                # the grace period still holds, and a second Ctrl-C kills.
                return
            launch.signal_group(proc, signal.SIGTERM)
        else:
            self._stop.killed = True
            self._kill(proc)

    def _check_stall(self, proc: subprocess.Popen) -> None:
        """A stall, once per silence: every rank's stack is captured (in a thread: the dashboard goes on), and with
        ``reporting.on_stall: stop`` the run is stopped as by a Ctrl-C."""
        if self._stop_after_capture is not None and not (self._capture is not None and self._capture.is_alive()):
            # The stacks are read: a rank of a script without a Trainer dies of the stop's SIGTERM, stack unread.
            said, self._stop_after_capture = self._stop_after_capture, None
            if not self._stop.requests:
                self._note(said)
                self._request_stop(proc)
        check = self._stalls.check(time.monotonic(), self.state.median_step_time())
        if check is None or self._fifo_path is None or proc.poll() is not None:
            return
        session, step, fifo_path = self.state.ledger.session, self._stalls.last_step, self._fifo_path
        action = self.cfg.reporting.on_stall

        def capture() -> None:
            pids = {p.pid for p in launch.run_processes(fifo_path)}
            stall = capture_stacks(self.paths.stacks, self.paths.report_dir, session, pids, check, step)
            stall.action = action
            self._queue.put(("record", stall))

        self._capture = threading.Thread(target=capture, name="kaio-stall-stacks", daemon=True)
        self._capture.start()
        if action == "stop" and not self._stop.requests:  # once the stacks are read (above, at the next turn)
            self._stop_after_capture = (
                f"reporting.on_stall is stop: stopping the run, stalled after step {step} ({check.phase})"
            )

    def _restore_signal_handlers(self, previous) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _check_stop(self, proc: subprocess.Popen) -> None:
        """After the grace period, the first request turns into SIGKILL."""
        stop = self._stop
        if (
            stop.requests
            and not stop.killed
            and stop.first_at is not None
            and (time.monotonic() - stop.first_at > self.cfg.launch.grace_seconds)
        ):
            stop.killed = True
            self._note(f"the child did not stop within {self.cfg.launch.grace_seconds:g} s of SIGTERM; killed")
            self._kill(proc)

    def _kill(self, proc: subprocess.Popen) -> None:
        """Every process of the session: the launcher's group, and ranks in sessions of their own."""
        launch.kill_group(proc)
        if self._fifo_path is not None:
            launch.kill_run(self._fifo_path)

    def stop_requested_between_sessions(self) -> None:
        """A Ctrl-C while no child runs: no automatic restart follows."""
        self._stop.requests = max(self._stop.requests, 1)

    @property
    def stop_requested(self) -> bool:
        return self._stop.requests > 0

    # ------------------------------------------------------------ endings

    def _mark_stop(self) -> None:
        """Where the session was when the stop was asked for."""
        ledger = self.state.ledger
        progress = ledger.progress.get(ledger.session)
        self._stop.step_at_request = (progress.last_step or 0) if progress is not None else 0
        self._stop.trained_before = progress is not None and progress.trained_to_end

    def _what_the_stop_kept(self, session: int) -> str:
        """Said to the user and written in the report: whether the stop saved a checkpoint to resume from."""
        ledger = self.state.ledger
        stop = self._stop
        saved = [c for c in ledger.checkpoints if c.session == session and c.step >= stop.step_at_request]
        if saved and not stop.trained_before:  # else the checkpoint was the finished training's own
            step, path = saved[-1].step, saved[-1].path
            name = path if path and os.path.basename(path) != f"checkpoint-{step}" else f"checkpoint-{step}"
            resume = self.paths.command("resume")
            how = (
                f"`{resume}`"
                if self.cfg.launch.nnodes < 2
                else f"`{resume} --node-rank R` on each node R (or under srun)"
            )
            then = f"{how} continues from step {step + 1}"
            later = saved[-1].later_training
            if later is not None:  # kaio resume refuses it (project.resume says why)
                then = f"the script's training {later} saved it, which `kaio resume` cannot continue"
            text = f"stopped after step {step} with {name} saved: {then}"
            self._note(text, level="info")
            return text
        progress = ledger.progress.get(session)
        if stop.trained_before and progress is not None:  # the script's own work after train() was stopped
            text = (
                f"stopped after the training had ended (step {progress.last_step}): what ran after it was cut "
                "short; no step is left to train"
            )
            self._note(text)
            return text
        if progress is None or progress.last_step is None:
            why = "it was still starting: no step had been trained"
        elif stop.killed:
            why = (
                "a second Ctrl-C came"
                if stop.requests > 1
                else f"saving did not finish within launch.grace_seconds ({self.cfg.launch.grace_seconds:g} s)"
            )
        else:
            why = "the training process ended without saving one"
        earlier = [c.step for c in ledger.checkpoints]
        then = (
            f"the latest is checkpoint-{max(earlier)}, and the steps after it will be trained again by "
            f"`{self.paths.command('resume')}`"
            if earlier
            else f"there is none yet: `{start_over_command(self.config_path)}` starts the project again"
        )
        text = f"stopped without saving a checkpoint ({why}); {then}"
        self._note(text)
        return text

    def _planned_steps_done(self, session: int) -> int | None:
        """The planned steps, when the session's Trainer trained them all and ended."""
        ledger = self.state.ledger
        progress, run = ledger.progress.get(session), ledger.run
        planned = run.max_steps if run is not None else None
        last_step = progress.last_step if progress is not None else None
        return planned if rules.training_completed(ledger.trained_to_end(session), last_step or 0, planned) else None

    def _unended_training(self, session: int) -> None:
        """Exit code 0 is the script's word, but a Trainer that never reached its end did not finish: said."""
        ledger = self.state.ledger
        record, progress = ledger.session_record(session), ledger.progress.get(session)
        run = ledger.run
        if record is None or progress is None or record.start_step is None or progress.trained_to_end:
            return
        if run is None or run.reporter != "trainer":
            return
        at = f"after step {progress.last_step}" if progress.last_step is not None else "before its first step"
        self._note(
            f"the training process exited with code 0 {at}, before its Trainer ended the training "
            "(os._exit or sys.exit(0) inside it): the record ends there"
        )

    def _outcome(self, returncode: int, session: int) -> SessionOutcome:
        exit_code, signal_name = launch.describe_exit(returncode)
        cause = diagnose.root_cause(self.paths.errors, session) if returncode else diagnose.RootCause()
        error, signal_name = cause.text, signal_name or cause.signal
        planned = self._planned_steps_done(session)
        if self._stop.requests and returncode == 0 and self.state.ledger.script_ended(session):
            self._note(
                "a stop was asked for as the script's processes were exiting, its work done: it completed", "info"
            )
            return SessionOutcome(0, Status.COMPLETED)
        if self._stop.requests and returncode == 0 and planned is not None and not self._stop.trained_before:
            self._note(f"a stop was asked for as the training finished its {planned} steps: it completed", "info")
            return SessionOutcome(0, Status.COMPLETED)
        if self._stop.requests:
            # Stopped by the user: 143 (SIGTERM's code) even when the training stopped cleanly after saving,
            # and whatever the launcher made of it with several ranks; 137 when the second press killed it.
            code = exit_code if self._stop.killed and exit_code > 128 else 128 + signal.SIGTERM
            return SessionOutcome(
                code, Status.INTERRUPTED, signal_name, error, self._what_the_stop_kept(session), cause.t_wall
            )
        if returncode == 0 and planned is None and self.state.ledger.ended_by_stop(session):
            # Stopped with the rest of the job: the stop was asked of another node's kaio (a Ctrl-C on the head).
            self._note("the job was stopped from another node (its kaio was asked): this node stopped with it", "info")
            return SessionOutcome(
                128 + signal.SIGTERM, Status.INTERRUPTED, None, None, self._what_the_stop_kept(session)
            )
        if returncode == 0:
            self._unended_training(session)
            return SessionOutcome(0, Status.COMPLETED)
        if error is None and signal_name:
            error = f"killed by {signal_name}"
        return SessionOutcome(exit_code, Status.FAILED, signal_name, error, error_at=cause.t_wall)


_NOT_EXECUTABLE = (errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.EISDIR)


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


def _lead_rank(cfg: RunConfig) -> int:
    return first_rank(cfg.launch.node_rank, cfg.launch.num_processes)


PARTIAL_KEPT = 1 << 16  # of a line not ended yet that keeps being redrawn: its latest redraws


def _recent_redraws(partial: bytes) -> bytes:
    """A line not ended yet, its older redraws dropped once it is long: tqdm's bar redraws its line ten times a
    second all training long (tens of MB in a day), and each read appended to all of it. What a terminal shows
    of the line is its last redraw; child.log keeps every byte."""
    if len(partial) <= 2 * PARTIAL_KEPT:
        return partial
    cut = partial.find(b"\r", len(partial) - PARTIAL_KEPT)
    return partial[cut:] if cut >= 0 else partial


def _latest_bar(partial: bytes) -> str | None:
    """The newest whole state of a progress bar on a line not ended yet: its last redraw, or the one before (the
    last may be cut mid-write). Read from the end: a bar's line grows with every redraw, all training long."""
    end = len(partial)
    for _ in range(2):
        start = partial.rfind(b"\r", 0, end)
        if start < 0:
            return None
        redrawn = partial[start + 1 : end].decode("utf-8", errors="replace")
        if progress_bar(as_shown(redrawn)) is not None:
            return redrawn
        end = start
    return None

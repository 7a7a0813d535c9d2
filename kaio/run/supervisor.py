"""The supervisor loop: start the child, gather everything it and the GPUs say, finalize.

Threads only produce (FIFO reader, GPU poller, child output); this loop on
the main thread is the single consumer that updates ``RunState``, appends to
the journal, refreshes the view and rewrites the history. Whatever way the
child ends (success, crash, Ctrl-C, SIGTERM) ``finalize`` runs.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec

from kaio import launch
from kaio.config import RunConfig, code_digest, code_file, config_snapshot
from kaio.fsutil import atomic_write_json
from kaio.nodes import first_rank
from kaio.record.paths import ProjectPaths
from kaio.record.types import (
    ChildStarted,
    Note,
    PollStats,
    Record,
    SessionCounters,
    SessionKind,
    SessionStart,
    Status,
)
from kaio.run.checkpoints import without_optimizer
from kaio.run.child_output import follow_output, is_trainer_log_line
from kaio.run.job_follow import JobFollow, NodeStream, rendezvous_warning
from kaio.run.ledger import RunLedger
from kaio.run.outcome import SessionEndings, SessionOutcome
from kaio.run.recorder import Recorder
from kaio.run.snapshot import Snapshot, add_output_line, as_shown
from kaio.run.stall_response import StallResponse
from kaio.run.stalls import StallWatch
from kaio.run.state import RunState
from kaio.run.stopping import StopControl
from kaio.telemetry import spool
from kaio.telemetry.fifo import FifoReader, TelemetryFifo

LOG_TAIL_LINES = 200
LOOP_INTERVAL_S = 0.1
REFRESH_COST_FACTOR = 99  # wait at least 99x a refresh's duration before the next: the record costs <= 1% of the time


class View(Protocol):
    """How the run is shown: the Rich dashboard or plain lines."""

    def start(self, snapshot: Snapshot) -> None: ...
    def child_output(self, line: str) -> None: ...
    def update(self, snapshot: Snapshot) -> None: ...
    def stop(self, snapshot: Snapshot, said_after: str | None = None) -> None:
        """The last frame or line; ``said_after`` is how the run stopped, printed right after (not twice)."""


@dataclass
class SessionRequest:
    kind: SessionKind = SessionKind.RUN
    resume_from: Path | None = None
    notes: list[str] = field(default_factory=list)  # recorded in the report (config changes, the checkpoint)


def restart_request(
    outcome: SessionOutcome, checkpoint: Path | None, restart: int, cfg: RunConfig, ledger: RunLedger
) -> tuple[SessionRequest | None, str]:
    """The automatic restart after a failed session, from the latest complete checkpoint, and what to say of it;
    none from a checkpoint of a script's later training (``kaio resume`` refuses it too: ``project.resume``)."""
    cause = outcome.error or outcome.signal or f"exit code {outcome.exit_code}"
    later = ledger.later_training_of(checkpoint) if checkpoint else None
    if checkpoint is not None and later is not None:
        return None, (
            f"no automatic restart after: {cause}: the latest checkpoint, {checkpoint.name}, was saved by "
            f"the script's training {later}, and a restart hands it to the script's first train() only"
        )
    if checkpoint is not None:
        origin = f"from {checkpoint.name}"
    elif ledger.run is not None and ledger.run.reporter == "kaio.log":  # its checkpoints are its own
        origin = "the loop started again (a kaio.log loop resumes from its own checkpoint, if it keeps one)"
    else:
        origin = "from the start (no complete checkpoint yet)"
    note = f"automatic restart {restart} of {cfg.launch.max_restarts} after: {cause}; {origin}"
    partial = without_optimizer(checkpoint) if checkpoint else None
    note += f" ({partial})" if partial else ""
    return SessionRequest(SessionKind.RESTART, checkpoint.resolve() if checkpoint else None, [note]), note


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
        self._stop = StopControl(
            self.state,
            cfg.launch.grace_seconds,
            post=lambda record: self._queue.put(("record", record)),
            note=self._note,
            phase=lambda: self._stalls.phase,
            fifo_path=lambda: self._fifo_path,
            spool=self.paths.spool,
        )
        self._endings = SessionEndings(cfg, self.state, self._stop.asked, self._note, config_path)
        self._reader: FifoReader | None = None
        self._fifo_path: Path | None = None
        self._stalls = StallWatch(cfg.reporting.stall_seconds, time.monotonic(), _lead_rank(cfg))
        self._stall_response = StallResponse(
            self.paths,
            cfg.reporting.on_stall,
            lambda record: self._queue.put(("record", record)),
            self._note,
            self._stop,
        )
        self.sessions_started = 0
        self.on_refresh: list[Callable[[RunState], None]] = []  # report writers, the index commit
        self.on_loop: list[Callable[[RunState], None]] = []  # cheap consumers called every loop (Comet feed)
        self._said_once: set[str] = set()  # notes not to repeat at every refresh (a failing write, an unreadable node)
        self._job = JobFollow(cfg.launch, config_snapshot(cfg), self.paths, stream, self._note, self._note_once)

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
            and not self._stop.requested
        ):
            restarts += 1
            restart, said = restart_request(outcome, latest_checkpoint(), restarts, self.cfg, self.state.ledger)
            self.view.child_output(f"kaio: {said}")  # on screen, between the failed session's output and the next
            if restart is None:
                self._note(said)
                break
            self._log_tail.append(f"kaio: {said}")
            outcome = self.run_session(restart)
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
            accelerate_file=launch.script_accelerate_file(self.cfg.launch, os.environ),
        )
        argv, env = launch.build_command(self.cfg, plan, os.environ)
        launch.adopt_orphans()
        self._fifo_path = fifo.path
        code = code_file(self.cfg.launch)
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
                code_file=code,
                code_sha256=code_digest(code),
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
            target=follow_output,
            args=(proc, self.paths.child_log, offset, self._queue.put),
            name="kaio-child-output",
            daemon=True,
        )
        output.start()
        previous_handlers = self._stop.install(proc)
        try:  # until session_end is journaled: a Ctrl-C during the teardown only counts as a press
            outcome = self._run_and_end(proc, session, fifo, reader, poller, output)
        finally:
            self._stop.restore(previous_handlers)
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
            self._stall_response.join(timeout=10)
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
        outcome = self._endings.outcome(proc.returncode, session)
        self.record(
            outcome.record(
                session,
                counters=SessionCounters(
                    malformed_lines=reader.stats.malformed + bad,
                    oversized_lines=reader.stats.oversized,
                    spooled_events=spooled,
                ),
                poll_stats=msgspec.convert(poller.stats(), PollStats, strict=False) if poller is not None else None,
            )
        )
        if reader.stats.malformed or reader.stats.oversized:
            self._note(
                f"telemetry: {reader.stats.malformed} malformed and {reader.stats.oversized} oversized lines skipped"
            )
        self.recorder.journal.flush(fsync=True)
        return outcome

    def _not_started(self, session: int, program: str, exc: OSError, fifo, reader, poller) -> SessionOutcome:
        """The training process could not be started: a FAILED session that says why."""
        fifo.close_write_end()
        reader.join(timeout=10)
        if poller is not None:
            poller.stop()
        self._drain()
        fifo.close()
        outcome = SessionOutcome.not_started(program, exc)
        self.view.child_output(f"kaio: {outcome.error}")  # where the child's own output, had it started, would be
        self.record(outcome.record(session))
        self.recorder.journal.flush(fsync=True)
        return outcome

    # ------------------------------------------------------------ the loop

    def _loop(self, proc: subprocess.Popen) -> None:
        refresh_s = self.cfg.reporting.refresh_seconds
        next_refresh = time.monotonic() + min(refresh_s, 2.0)
        while True:
            exited = proc.poll() is not None
            self._drain()
            self._stop.check(proc)
            self._check_stall(proc)
            self._job.poll()
            now = time.monotonic()
            self.view.update(self.snapshot())
            for consumer in self.on_loop:
                consumer(self.state)
            if now >= next_refresh:
                self._refresh()
                # A long run's reports hold up this loop (the dashboard, the queues): a hundredth of the time.
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
            if message not in self._said_once:
                self._said_once.add(message)
                self.state.warn(message)

    def _refresh(self) -> None:
        if self.recorder.journal.write_out():  # else the spool holds what the journal could not write yet
            spool.prune(self.paths.spool, self.state.ledger.received)
        for writer in self.on_refresh:
            try:
                writer(self.state)
            except Exception as exc:
                self._note_once(f"a report refresh failed: {type(exc).__name__}: {exc}")

    def _note_once(self, message: str) -> None:
        if message not in self._said_once:
            self._said_once.add(message)
            self._note(message)

    def snapshot(self) -> Snapshot:
        running = self.state.status == Status.RUNNING
        status = "STOPPING" if self._stop.requested and running else None
        stall = self._stalls.live_warning(time.monotonic(), self.state.median_step_time()) if running else None
        live = self._live_warnings() + ((stall,) if stall else ())
        snapshot = self.state.snapshot(
            status=status, log_tail=tuple(self._log_tail), live_warnings=live, report_path=str(self.paths.report)
        )
        because = self._stop.asked.because if status == "STOPPING" else None  # what asked for the stop
        snapshot = dataclasses.replace(self._job.shown(snapshot), stopping_because=because)
        return dataclasses.replace(snapshot, eta_s=None) if stall else snapshot  # stalled: no time of arrival

    def _live_warnings(self) -> tuple[str, ...]:
        stats = self._reader.stats if self._reader is not None else None
        skipped = stats is not None and (stats.malformed or stats.oversized)
        said = (
            f"telemetry: {stats.malformed} malformed and {stats.oversized} oversized lines skipped"
            if stats and skipped
            else None,
            rendezvous_warning(self.cfg.launch, self.state.ledger, time.time()),
        )
        return tuple(text for text in said if text)

    # ------------------------------------------------------------ threads

    def _start_poller(self):
        if self._poller_factory is None:
            return None
        poller = self._poller_factory(lambda record: self._queue.put(("record", record)))
        if poller is not None:
            poller.start()
        return poller

    def stop_requested_between_sessions(self) -> None:
        """A Ctrl-C while no child runs: no automatic restart follows."""
        self._stop.between_sessions()

    # ------------------------------------------------------------ stalls

    def _check_stall(self, proc: subprocess.Popen) -> None:
        if self._fifo_path is not None:
            median = self.state.median_step_time()
            self._stall_response.check(proc, self._stalls, median, self.state.ledger.session, self._fifo_path)


def _lead_rank(cfg: RunConfig) -> int:
    return first_rank(cfg.launch.node_rank, cfg.launch.num_processes)

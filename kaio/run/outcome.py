"""How a session ended, in the record's words: its status and exit code, its root cause, and what a stop kept."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kaio import launch
from kaio.config import RunConfig, flag_value
from kaio.record import rules
from kaio.record.paths import ProjectPaths, start_over_command
from kaio.record.types import CheckpointSaved, SessionEnd, Status
from kaio.run import diagnose
from kaio.run.checkpoints import half_written, latest_checkpoint
from kaio.run.state import RESUME_FAILED_AT_ONCE, RunState, nonfinite_since
from kaio.run.stopping import StopRequests


@dataclass
class SessionOutcome:
    exit_code: int
    status: Status
    signal: str | None = None
    error: str | None = None
    message: str | None = None  # what a stop on request kept, for the user
    error_at: float | None = None  # when the first rank failed (wall time)
    started: bool = True  # False: the training process could not be started at all

    @classmethod
    def not_started(cls, program: str, exc: OSError) -> SessionOutcome:
        """The training process could not be started: FAILED, with a shell's exit code (127: not found, 126: found
        but not executable; else, no memory or no process to spare, 1)."""
        code = 127 if exc.errno == errno.ENOENT else 126 if exc.errno in _NOT_EXECUTABLE else 1
        error = f"the training process could not be started: {exc.strerror or exc}: {exc.filename or program}"
        return cls(code, Status.FAILED, error=error, started=False)

    def record(self, session: int, **measured) -> SessionEnd:
        """The session's end for the journal; ``measured``: the pipe's counters and the poller's statistics."""
        now_wall, now_mono = time.time(), time.monotonic()
        return SessionEnd(
            session=session,
            t_wall=now_wall,
            t_mono=now_mono,
            status=self.status,
            exit_code=self.exit_code,
            signal=self.signal,
            error=self.error,
            error_at=self.error_at,
            **measured,
        )


_NOT_EXECUTABLE = (errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.EISDIR)


class SessionEndings:
    """Reads a session's end from its exit code, its ranks' error files, the record, and the stop requests."""

    def __init__(
        self,
        cfg: RunConfig,
        state: RunState,
        asked: StopRequests,
        note: Callable[[str, str], None],
        config_path: Path | None,
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.asked = asked
        self.paths = ProjectPaths(cfg.report_dir)
        self._note = note  # (text, level): into the record
        self.config_path = config_path  # the config the user gave (None: a resume of the saved one), for hints

    def outcome(self, returncode: int, session: int) -> SessionOutcome:
        exit_code, signal_name = launch.describe_exit(returncode)
        cause = diagnose.root_cause(self.paths.errors, session) if returncode else diagnose.RootCause()
        error, signal_name = cause.text, signal_name or cause.signal
        planned = self._planned_steps_done(session)
        asked, ledger = self.asked, self.state.ledger
        if asked.requests and returncode == 0 and ledger.script_ended(session):
            self._note(
                "a stop was asked for as the script's processes were exiting, its work done: it completed", "info"
            )
            return SessionOutcome(0, Status.COMPLETED)
        if asked.requests and returncode == 0 and planned is not None and not asked.trained_before:
            self._note(f"a stop was asked for as the training finished its {planned} steps: it completed", "info")
            return SessionOutcome(0, Status.COMPLETED)
        if asked.requests:
            # Stopped by the user: 143 (SIGTERM's code) even when the training stopped cleanly after saving,
            # and whatever the launcher made of it with several ranks; 137 when the second press killed it.
            code = exit_code if asked.killed and exit_code > 128 and not asked.ended_unstarted else 128 + signal.SIGTERM
            # The signal is the one that asked (a SIGUSR1 from SLURM read SIGTERM: kaio's to the ranks), or, killed
            # by a second press, the one that ended it.
            said = signal_name if asked.killed else asked.signal or signal_name
            return SessionOutcome(
                code, Status.INTERRUPTED, said, error, self._what_the_stop_kept(session), cause.t_wall
            )
        if returncode == 0 and planned is None and ledger.ended_by_stop(session):
            # Stopped with the rest of the job: the stop was asked of another node's kaio (a Ctrl-C on the head).
            self._note("the job was stopped from another node (its kaio was asked): this node stopped with it", "info")
            return SessionOutcome(
                128 + signal.SIGTERM, Status.INTERRUPTED, None, None, self._what_the_stop_kept(session)
            )
        if returncode == 0:
            self._unended_training(session)
            return SessionOutcome(0, Status.COMPLETED)
        error_at = cause.t_wall
        if error is None and signal_name:
            # Killed with no error file (a node's whole process tree gone): when kaio saw it, a second or so after,
            # orders the job's nodes by their first failure (the others' ranks fail later, their peer gone).
            error, error_at = f"killed by {signal_name}", time.time()
        self._resume_failed_at_once(session)
        return SessionOutcome(exit_code, Status.FAILED, signal_name, error, error_at=error_at)

    def _resume_failed_at_once(self, session: int) -> None:
        """A resume that failed before its first step: the checkpoint it loaded may be damaged (a truncated file),
        and every later resume would load it again."""
        progress = self.state.ledger.progress.get(session)
        if progress is None or progress.resumed_at is None or progress.last_step is not None:
            return
        self._note(
            f"{RESUME_FAILED_AT_ONCE}checkpoint-{progress.resumed_at} failed before its first step: if the error "
            "(in Sessions) is in loading it (a damaged or truncated file), move that checkpoint's folder out of "
            "its output folder (renamed inside it, the Trainer's rotation of checkpoints may delete it) and "
            f"`{self.paths.command('resume')}` continues from the one before; if it is the script's, mend it and "
            "resume again",
            "warning",
        )

    def _what_the_stop_kept(self, session: int) -> str:
        """Said to the user and written in the report: whether the stop saved a checkpoint to resume from."""
        ledger = self.state.ledger
        asked = self.asked
        if asked.killed:  # wherever the kill came, a save it cut short is named
            self._half_written(max((c.step for c in ledger.checkpoints), default=0))
        saved = [c for c in ledger.checkpoints if c.session == session and c.step >= asked.step_at_request]
        if saved and not asked.trained_before:  # else the checkpoint was the finished training's own
            return self._stopped_with(saved[-1])
        progress = ledger.progress.get(session)
        if asked.trained_before and progress is not None:  # the script's own work after train() was stopped
            text = (
                f"stopped after the training had ended (step {progress.last_step}): what ran after it was cut "
                "short; no step is left to train"
            )
            self._note(text, "warning")
            return text
        run = ledger.run
        if run is not None and run.reporter == "kaio.log" and progress is not None and progress.last_step is not None:
            return self._loop_stopped(progress.last_step)
        if progress is None or progress.last_step is None:
            evaluated = self.state.parts.live.evaluated_in_session  # an evaluate-only script, or eval_on_start
            why = (
                "no step had been trained; the script had evaluated"
                if evaluated
                else "it was still starting: no step had been trained"
            )
        elif asked.killed:
            why = "a second Ctrl-C came" if asked.requests > 1 else self._grace_ended(progress.last_step)
        else:
            why = "the training process ended without saving one"
        written = self._written_unsaid(progress.last_step if progress is not None else None)
        if written is not None:
            step = int(written.name.removeprefix("checkpoint-"))
            text = (
                f"stopped after step {step}: {written} is complete on disk, though the training was stopped before it "
                f"said so ({why}); `{self.paths.command('resume')}` continues from step {step + 1}"
            )
            self._note(text, "info")
            return text
        earlier = [c.step for c in ledger.checkpoints]
        then = (
            f"the latest is checkpoint-{max(earlier)}, and the steps after it will be trained again by "
            f"`{self.paths.command('resume')}`"
            if earlier
            else f"there is none yet: `{start_over_command(self.config_path)}` starts the project again"
        )
        text = f"stopped without saving a checkpoint ({why}); {then}"
        self._note(text, "warning")
        return text

    def _loop_stopped(self, last_step: int) -> str:
        """A kaio.log loop: it took the stop itself (a KeyboardInterrupt), or was killed; its checkpoints are its own."""
        why = (
            ("a second Ctrl-C came" if self.asked.requests > 1 else self._grace_ended(last_step))
            if self.asked.killed
            else "a KeyboardInterrupt raised in it, as a Ctrl-C without kaio would: an `except KeyboardInterrupt:` of "
            "its own runs"
        )
        text = (
            f"stopped the loop after step {last_step} ({why}); a kaio.log loop's checkpoints are its own: "
            f"`{self.paths.command('resume')}` starts it again, to continue from its checkpoint in this record"
        )
        self._note(text, "info")
        return text

    def _stopped_with(self, checkpoint: CheckpointSaved) -> str:
        """The stop saved ``checkpoint``: what continues from it (not it, saved after the loss went NaN/inf for
        good: `kaio resume` skips it)."""
        step, path = checkpoint.step, checkpoint.path
        since = nonfinite_since(self.state)
        if since is not None and step >= since:
            text = (
                f"stopped after step {step} with checkpoint-{step} saved, after the loss went NaN/inf (from step "
                f"{since} on): its weights may be NaN, and `{self.paths.command('resume')}` continues from the latest "
                "checkpoint before that"
            )
            self._note(text, "warning")
            return text
        name = path if path and os.path.basename(path) != f"checkpoint-{step}" else f"checkpoint-{step}"
        resume = self.paths.command("resume")
        how = (
            f"`{resume}`" if self.cfg.launch.nnodes < 2 else f"`{resume} --node-rank R` on each node R (or under srun)"
        )
        then = f"{how} continues from step {step + 1}"
        own = flag_value(self.cfg.launch.script_args, "--resume_from_checkpoint")
        if own is not None:  # the script's own checkpoint wins over the one kaio hands it
            then += (
                f" once the script's own --resume_from_checkpoint {own} is taken out of launch.script_args (it "
                "wins over kaio's: `kaio resume --config` with the edited config)"
            )
        later = checkpoint.later_training
        if later is not None:  # kaio resume refuses it (project.resume says why)
            then = f"the script's training {later} saved it, which `kaio resume` cannot continue"
        text = f"stopped after step {step} with {name} saved: {then}"
        self._note(text, "info")
        return text

    def _written_unsaid(self, last_step: int | None) -> Path | None:
        """A complete checkpoint on disk newer than any the training said it saved: the stop's kill came after the
        Trainer wrote it, while the callbacks after a save ran (a script's upload of it, say)."""
        folder = self.state.ledger.checkpoint_folder()
        if folder is None or last_step is None:
            return None
        found = latest_checkpoint(Path(folder), notify=lambda text: None, at_most=last_step)
        said = max((c.step for c in self.state.ledger.checkpoints), default=0)
        return found if found is not None and int(found.name.removeprefix("checkpoint-")) > said else None

    def _half_written(self, saved_through: int) -> None:
        """A checkpoint whose save the kill cut short: kaio resume skips it, a script's get_last_checkpoint would
        not (it takes the newest folder), so it is named."""
        folder = self.state.ledger.checkpoint_folder()
        for path in half_written(Path(folder), saved_through) if folder else []:
            self._note(
                f"{path} is half-written (the kill cut its save short): `{self.paths.command('resume')}` skips it; "
                "delete it before the script resumes from its newest checkpoint without kaio",
                "warning",
            )

    def _grace_ended(self, last_step: int) -> str:
        """What the grace period cut short, from the session's phase then."""
        grace = f"launch.grace_seconds ({self.cfg.launch.grace_seconds:g} s)"
        if self.asked.killed_in == "evaluation":  # the Trainer stops at a step's end: after the evaluation going on
            return (
                f"the evaluation after step {last_step} was still running when {grace} ended: a longer one lets it end"
            )
        if self.asked.killed_in == "checkpoint save":
            return f"saving did not finish within {grace}"
        if self.asked.killed_in == "training step":
            return f"the step after step {last_step} did not end within {grace}"
        if self.asked.killed_in == "after training":
            return f"the script's work after its training did not end within {grace}"
        return f"the training process did not stop within {grace}"

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
            "(os._exit or sys.exit(0) inside it): the record ends there",
            "warning",
        )

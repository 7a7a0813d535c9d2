"""A project's life on disk: starting a run, refusing to mix histories, resuming, pushing.

``docs/reports/<project>/`` holds the journal (source of truth), the index, the
resolved config, the child's log and the reports. This module decides what a
command may do with that folder; the supervisor runs the sessions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from kaio.config import (
    LaunchConfig,
    RunConfig,
    code_digest,
    code_file,
    code_not_found,
    config_differences,
    config_from_dict,
    config_snapshot,
    load_config,
    saved_own_code,
    with_max_steps,
)
from kaio.errors import ProjectError
from kaio.nodes import Placement, node_folder_name, placed, resume_placement
from kaio.record.index import IndexDamaged
from kaio.record.lock import ProjectLock, is_locked
from kaio.record.paths import DEFAULT_OUTPUT_DIR, ProjectPaths, node_rank_of, start_over_command
from kaio.record.types import Note, SessionCounters, SessionEnd, SessionKind, Status
from kaio.report.summary import Summary, count_of
from kaio.run import recorder as loading
from kaio.run.checkpoints import is_checkpoint, latest_checkpoint, trainer_outputs, without_optimizer
from kaio.run.job import index_copies, node_folders
from kaio.run.recorder import Loaded, Recorder
from kaio.run.state import RunState, nonfinite_since
from kaio.run.stopping import leave_a_hung_up_terminal
from kaio.run.stream import JournalReceiver, JournalSender, for_node
from kaio.run.supervisor import SessionRequest, Supervisor, View
from kaio.secrets import REDACTED, secret_values

Notify = Callable[[str], None]


def known_projects(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    return sorted(
        p.name for p in output_dir.iterdir() if ProjectPaths(p).journal.is_file() and ".replaced-" not in p.name
    )


def project_paths(output_dir: Path, project: str) -> ProjectPaths:
    """The folder of a project that exists, or a ``ProjectError`` listing those that do."""
    from kaio.config import check_project_name

    check_project_name(project)
    paths = ProjectPaths(output_dir / project)
    if not paths.journal.is_file():
        raise unknown_project(output_dir, project)
    return paths


def unknown_project(output_dir: Path, project: str) -> ProjectError:
    if not output_dir.is_dir():
        here = "" if output_dir.is_absolute() else f" here ({os.getcwd()})"
        missing = "is a file, not a folder" if output_dir.exists() else "does not exist"
        return ProjectError(
            f"unknown project {project!r}: {output_dir}/ {missing}{here}; run kaio where you ran the project, "
            "or name the folder of its reports with --output-dir"
        )
    nodes = ProjectPaths(output_dir / project).nodes
    held = sorted(p.name for p in nodes.glob("*") if ProjectPaths(p).journal.is_file()) if nodes.is_dir() else []
    if held:  # a machine of a job without a shared filesystem: its node's record, not the head's
        return ProjectError(
            f"this machine holds node {held[0]}'s record of project {project!r}, not the head's: "
            f"`kaio report {held[0]} --output-dir {shlex.quote(str(nodes))}` reports this node alone; the job's "
            f"report is made on the head (copy {nodes / held[0]} there and run `kaio report {project} --merge FOLDER`)"
        )
    projects = known_projects(output_dir)
    listing = ", ".join(projects) if projects else "none yet; start one with `kaio run CONFIG`"
    elsewhere = (  # a config that sets reporting.output_dir keeps its project there
        "; a project whose config sets reporting.output_dir is found with --output-dir DIR"
        if output_dir == DEFAULT_OUTPUT_DIR
        else ""
    )
    return ProjectError(f"unknown project {project!r} in {output_dir}/ (known projects: {listing}){elsewhere}")


def saved_config(paths: ProjectPaths, state: RunState | None = None) -> tuple[RunConfig, dict]:
    """The config the project last ran with (config.json), validated, and as saved; without config.json (a
    node's journal copied from the head, which keeps none), the one ``state``'s journal last recorded."""
    if not paths.config.is_file() and state is not None and state.ledger.config is not None:
        return config_from_dict(state.ledger.config, source=str(paths.journal), saved=True), state.ledger.config
    if not paths.config.is_file():  # a start interrupted before its first session: nothing ran to continue
        raise ProjectError(
            f"{paths.report_dir}: no session of this project started (its first run was stopped before it began): "
            "start it with `kaio run CONFIG`"
        )
    saved = json.loads(paths.config.read_text())
    return config_from_dict(saved, source=str(paths.config), saved=True), saved


@contextlib.contextmanager
def opened(
    paths: ProjectPaths, notify: Notify, *, pids_here: bool = True, close: bool = True
) -> Iterator[tuple[Loaded, bool]]:
    """The project's state, recovered after a supervisor that died, with the lock held throughout.
    Yields it and whether a child still trains unsupervised. ``pids_here``: False for a record taken over
    from another machine, whose process ids mean nothing on this one. ``close``: False to merge what was
    spooled but leave an unfinished session open (its processes, elsewhere, may still train)."""
    with ProjectLock(paths.report_dir):
        loaded = loading.load(paths, writable=True)
        try:
            if loaded.invalid:
                notify(f"note: {loaded.invalid} unreadable line(s) in {paths.journal} skipped")
            if loaded.index_note:
                notify(f"note: {loaded.index_note}")
            yield loaded, recover_unfinished(paths, loaded.state, notify, pids_here=pids_here, close=close)
        finally:
            loaded.state.index.close()


def move_aside(cfg: RunConfig, checkpoint_dirs: list[Path]) -> list[tuple[str, Path]]:
    """``--overwrite``: keep the old record, and what its Trainer wrote in ``checkpoint_dirs`` (kaio's folder for
    the built-in recipe, a script's own output_dir, each one its sessions used: checkpoints, final model, results),
    under a dated name beside them; never delete them. Returns what was moved and where to."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    paths = ProjectPaths(cfg.report_dir)
    entries = (
        [p for p in paths.report_dir.iterdir() if p not in (paths.lock, paths.nodes)]
        if paths.report_dir.is_dir()
        else []
    )
    # Under nodes/: the other nodes' old records. A node of the new job may have opened its folder already (it
    # holds its lock), and a node moves its own old record aside next to it (".replaced-"): those stay.
    if paths.nodes.is_dir():
        entries += [p for p in paths.nodes.iterdir() if ".replaced-" not in p.name and not _live(p)]
    if entries:
        old_reports = paths.report_dir.with_name(f"{paths.report_dir.name}.replaced-{stamp}")
        old_reports.mkdir(parents=True, exist_ok=True)
        for entry in entries:
            target = old_reports / entry.relative_to(paths.report_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # moved meanwhile by its own node
                shutil.move(str(entry), target)
        moved.append(("record", old_reports))
    if cfg.launch.node_rank != 0:
        return moved  # the checkpoints are the head's to move (one folder for every node, when shared)
    # Only what the Trainer wrote there (training.output_dir may be a folder shared with other things), next to
    # the folder: a script that refuses an output_dir that is not empty then starts over in an empty one.
    for checkpoint_dir in checkpoint_dirs:
        outputs = trainer_outputs(checkpoint_dir)
        if outputs:
            target = checkpoint_dir.with_name(f"{checkpoint_dir.name}.replaced-{stamp}")
            if Path.cwd().resolve().is_relative_to(checkpoint_dir.resolve()):  # output_dir "." or above: inside
                target = checkpoint_dir / f"replaced-{stamp}"
            only_checkpoints = all(p.name == "final" or is_checkpoint(p) for p in outputs)
            target.mkdir(parents=True, exist_ok=True)
            for path in outputs:
                shutil.move(str(path), target / path.name)
            moved.append(("checkpoints" if only_checkpoints else "checkpoints and final outputs", target))
    return moved


def _live(folder: Path) -> bool:
    """A node folder whose lock a live kaio holds; unreadable, it is left where it is."""
    try:
        return is_locked(folder)
    except OSError:
        return True


def run_new(
    cfg: RunConfig,
    view: View,
    *,
    overwrite: bool = False,
    poller_factory_for: Callable | None = None,
    notify: Notify = print,
    config_path: Path | None = None,
) -> int:
    """``kaio run``: a new history for the project (after moving an old one aside with ``--overwrite``)."""
    paths = ProjectPaths(cfg.report_dir)
    with ProjectLock(paths.report_dir):
        old_checkpoints = [cfg.checkpoint_dir]
        earlier: RunState | None = None  # the project's record of a run that started
        if paths.journal.exists():
            state = loading.load(paths, writable=False).state
            if not _forget_a_run_that_never_started(paths, state):
                state.index.close()
                earlier = state
        if earlier is not None:
            old_checkpoints = checkpoint_folders(cfg, earlier)  # a script's own output_dir(s), when it said so
            refused = _refusal(cfg, paths, earlier, config_path, overwrite=overwrite)
            if refused is not None:
                raise refused
        _check_checkpoint_folder(cfg)
        moved = move_aside(cfg, old_checkpoints) if overwrite else []
        for what, path in moved:
            notify(f"moved the previous {what} aside: {path}")
        loaded = loading.load(paths, writable=True)
        try:
            factory = poller_factory_for(cfg) if poller_factory_for else None
            request = SessionRequest(SessionKind.RUN, notes=_launcher_notes(cfg, notify))
            return _supervise(cfg, loaded.state, view, request, factory, notify, config_path=config_path)
        except KeyboardInterrupt:  # before the first session began (then the supervisor answers Ctrl-C itself)
            if _forget_a_run_that_never_started(paths, loaded.state):  # no record of nothing (`kaio report`: RUNNING)
                for what, path in moved:
                    notify(f"the previous {what} is still where it was moved: {path}")
            raise
        finally:
            loaded.state.index.close()


def run_refusal(cfg: RunConfig, config_path: Path | None) -> str | None:
    """What `kaio run` would refuse the project for now, in its words, for `--dry-run` (which changes nothing:
    no lock taken, nothing forgotten); None: it would start."""
    paths = ProjectPaths(cfg.report_dir)
    if paths.journal.is_file() and is_locked(paths.report_dir):
        return f"project {cfg.project_name!r} is running right now"
    if not paths.journal.is_file():
        return None
    state = loading.load(paths, writable=False).state
    try:
        if not state.ledger.sessions:  # a run that never started: `kaio run` forgets it
            return None
        refused = _refusal(cfg, paths, state, config_path)
        return str(refused) if refused is not None else None
    finally:
        state.index.close()


def _refusal(
    cfg: RunConfig, paths: ProjectPaths, earlier: RunState, config_path: Path | None, *, overwrite: bool = False
) -> ProjectError | None:
    """Why `kaio run` refuses a project that has an earlier run's record (its processes still alive, or a history
    to keep without --overwrite); None: it may start. One rule for the run and its --dry-run."""
    alive = alive_pids(earlier)
    if alive:
        return ProjectError(
            f"project {cfg.project_name!r} has processes of an earlier session still alive (pids "
            f"{', '.join(map(str, alive))}); stop them before starting over"
        )
    return None if overwrite else _has_history(cfg, paths, earlier, checkpoint_folder(cfg, earlier), config_path)


def _forget_a_run_that_never_started(paths: ProjectPaths, state: RunState) -> bool:
    """A record without a session (a Ctrl-C, or a kill, before the first session began) holds nothing: it is no
    history to refuse a new run for. Its files go (call with the lock held); whether they went."""
    if state.ledger.sessions:
        return False
    state.index.close()
    for path in (paths.journal, paths.index, *paths.report_files):
        path.unlink(missing_ok=True)
    return True


def _has_history(
    cfg: RunConfig, paths: ProjectPaths, state: RunState, checkpoints: Path, config_path: Path | None
) -> ProjectError:
    """Why `kaio run` refuses a project with a record, and the one way on that works: a resume needs a checkpoint,
    and a finished run needs a longer one."""
    config = shlex.quote(str(config_path)) if config_path is not None else "CONFIG"
    overwrite = f"start over with `{start_over_command(config_path)}` (the old record and checkpoints are moved aside)"
    said = f"project {paths.project!r} already has a history ({state.last_step} steps, {state.status.value}) in {paths.report_dir}"
    if latest_checkpoint(checkpoints, notify=lambda _: None, at_most=state.last_step) is None:
        return ProjectError(f"{said}, and {_no_checkpoint_in(cfg, state, checkpoints)}; {overwrite}")
    if state.status is Status.COMPLETED:
        longer = (
            f"a longer run in launch.script_args and `{paths.command('resume')} --config {config}`"
            if saved_own_code(state.ledger.config)
            else f"`{paths.command('resume')} --max-steps N` (N > {state.last_step})"
        )
        return ProjectError(f"{said}; train it further with {longer}, or {overwrite}")
    return ProjectError(f"{said}; continue it with `{paths.command('resume')}`, or {overwrite}")


def _check_checkpoint_folder(cfg: RunConfig) -> None:
    """The built-in recipe saves to ``training.output_dir``: a folder it cannot create or write is one line
    now, not a traceback once the model has loaded (a script's own output_dir is the script's to make)."""
    if cfg.launch.own_code is not None:
        return
    folder = cfg.checkpoint_dir
    why: str | None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        why = "a file of that name is there"
    except OSError as exc:
        why = exc.strerror
    else:
        if os.access(folder, os.W_OK | os.X_OK):
            return
        why = "not writable"
    raise ProjectError(f"{folder}: cannot create the checkpoint folder ({why}); choose another training.output_dir")


def _launcher_notes(cfg: RunConfig, notify: Notify) -> list[str]:
    """What a script's launcher takes from the user's accelerate config file, and what kaio kept out of the
    training's environment (said on the console too: a shell's leftovers are worth knowing now). A restart reads
    the same: said once."""
    from kaio.launch import accelerate_file_note, other_launchers_note
    from kaio.preflight import push_will_fail

    leftover = other_launchers_note(os.environ)
    if leftover is not None:
        notify(f"note: {leftover}")
    cannot_push = push_will_fail(cfg, os.environ)
    if cannot_push is not None:
        cannot_push = (
            f"hub.push: {cannot_push}: the push at the end of the run will fail (the training is not held up for it; "
            f"`kaio push {cfg.project_name}` pushes once it can)"
        )
        notify(f"kaio: warning: {cannot_push}")
    said = [accelerate_file_note(cfg.launch, os.environ), leftover, cannot_push]
    return [note for note in said if note is not None]


def _supervise(
    cfg: RunConfig,
    state: RunState,
    view: View,
    request: SessionRequest,
    poller_factory,
    notify: Notify,
    *,
    config_path: Path | None = None,
) -> int:
    """The sessions (with automatic restarts), then the reports, Comet and the Hub push. ``config_path``: the
    config the user gave, for the hints kaio prints."""
    from kaio.run.finalize import FigureProcess, LiveReports, RunOutputs

    paths = ProjectPaths(cfg.report_dir)
    recorder = Recorder(paths, state, secret_values([*cfg.launch.script_args, *cfg.launch.accelerate_args], os.environ))
    launch = cfg.launch
    stream = for_node(launch.node_rank, launch.nnodes, paths, launch.main_addr, launch.head_stream_port, notify)
    supervisor = Supervisor(cfg, recorder, view, poller_factory=poller_factory, stream=stream, config_path=config_path)
    figure = FigureProcess(paths.report_dir)
    gone = stream.gone_for if isinstance(stream, JournalReceiver) else None
    outputs = RunOutputs(cfg, recorder.record, notify, figure, stream_gone=gone)
    supervisor.on_refresh.append(LiveReports(paths.report_dir, figure))
    supervisor.on_refresh.append(lambda _state: recorder.save())
    if isinstance(stream, JournalReceiver):  # the head keeps the nodes' journals: their indexes, too
        supervisor.on_refresh.append(lambda _state: index_copies(paths))
    supervisor.on_loop.append(outputs.feed)
    outcome, written = None, None
    finishing = _Finishing(outputs, supervisor)
    with finishing:
        try:
            outputs.start(state)
            figure.warm()  # matplotlib loads while the training starts: the figure is drawn at once when asked
            view.start(supervisor.snapshot())
            try:
                outcome = supervisor.run(
                    request,
                    lambda: latest_checkpoint(
                        checkpoint_folder(cfg, state),
                        notify=lambda text: None,
                        at_most=state.last_step,
                        nonfinite_since=nonfinite_since(state),
                    ),
                )
                figure.warm()  # in case the process was used up by the last refresh
            finally:
                view.stop(supervisor.snapshot(), said_after=outcome.message if outcome is not None else None)
                finishing.view_stopped()
            if outcome is not None and outcome.message:
                notify(outcome.message)
        finally:
            try:
                if supervisor.sessions_started:  # else interrupted before it began: nothing to record
                    written = _write_record(outputs, recorder, notify)
                recorder.save()
            finally:
                try:
                    figure.close()
                    _say_rescued(recorder.close(), paths, notify)
                finally:
                    if stream is not None:
                        _close_stream(stream, notify)
    if written is not None:
        _say_where_the_record_is(*written, paths, notify)
    return outcome.exit_code if outcome else 1


def _say_where_the_record_is(state: RunState, summary: Summary, paths: ProjectPaths, notify: Notify) -> None:
    """The run's last lines: the warnings of the whole history (NaN counts, gradient-norm spikes, slow steps) not
    said in these words while it ran, and the record's files with its count of warnings."""
    live = set(state.parts.warnings.listed())
    for warning in summary.warnings:
        if warning not in live:
            notify(f"kaio: warning: {warning}")
    hub = state.ledger.hub
    pushed = f" · pushed: {hub.url} at {hub.commit_sha}" if hub is not None and hub.commit_sha else ""
    if hub is not None and pushed and state.ledger.hub_later_failure:  # this run's push failed: an earlier commit
        pushed = f" · the Hub's adapter is an earlier push's: {hub.url} at {hub.commit_sha}"
    counted = f" ({count_of(len(summary.warnings), 'warning')})" if summary.warnings else ""
    notify(f"record: {paths.report}{counted} · {paths.figure} · {paths.history}{pushed}")


def _close_stream(stream: JournalReceiver | JournalSender, notify: Notify) -> None:
    """A node sends the head the end of its journal (bounded); the head stops taking the nodes' records."""
    if not stream.close(timeout_s=10.0):
        notify("note: the head did not confirm the end of this node's record; it is complete in this node's folder")
    for warning in stream.pop_warnings():  # after the supervisor's loop: said, no longer recorded
        notify(f"warning: {warning}")


def _write_record(outputs, recorder: Recorder, notify: Notify) -> tuple[RunState, Summary] | None:
    """The reports, Comet and the push once the child has ended; the state they were written from and the
    summary, or None when the disk was still too full (the training is done; its record waits for `kaio report`)."""
    paths = recorder.paths
    try:
        state = recorder.final_state()
        try:
            summary = outputs.finish(state)
        except IndexDamaged as exc:  # damaged on disk since it was written: the journal has it all
            notify(loading.damaged_index_note(paths, exc))
            state = recorder.rebuilt_state()
            summary = outputs.finish(state)
        return state, summary
    except (OSError, sqlite3.Error) as exc:
        notify(
            f"kaio: error: the record could not be written in {paths.report_dir} "
            f"({getattr(exc, 'strerror', None) or exc}); {paths.journal.name} and the child's spool keep what "
            f"they hold: once there is space, `{paths.command('report')}` writes it"
        )
        return None


def _say_rescued(rescued: Path | None, paths: ProjectPaths, notify: Notify) -> None:
    if rescued is not None:
        notify(
            f"kaio: error: the disk stayed full: the end of the run's journal, which kaio held in memory, is in "
            f"{rescued}; once there is space, `cat {rescued} >> {paths.journal}` and `{paths.command('report')}` "
            "write the whole record"
        )


_STOPPED = b"kaio: the run has stopped; writing its record (the Hub push, if any, is skipped)\n"


class _Finishing:
    """Ctrl-C (or SIGTERM) outside the supervisor's own handling (which holds while a child runs): before the
    first session starts it interrupts as usual; between sessions it stops the restarts; once the child is
    gone, the local files are always finished and a press only cuts the Hub push short. Said once, and not
    over the live dashboard (it would break its last frame): after it is drawn."""

    def __init__(self, outputs, supervisor: Supervisor) -> None:
        self.outputs = outputs
        self.supervisor = supervisor
        self._view_live = True
        self._say_when_drawn = False
        self._previous: dict = {}

    def __enter__(self) -> _Finishing:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup's choice stands
                self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)

    def _on_signal(self, signum, frame) -> None:
        if not self.supervisor.sessions_started:
            raise KeyboardInterrupt  # nothing started yet: nothing to record
        self.supervisor.stop_requested_between_sessions()
        if self.outputs.cancelled:
            return
        self.outputs.cancelled = True
        if self._view_live:
            self._say_when_drawn = True
        else:  # os.write, not print: a signal may land while the console is half-way through a write
            os.write(2, _STOPPED)

    def _on_hangup(self, signum, frame) -> None:
        """The terminal closed while no child runs: no restart follows, and the record and the push are
        finished as if it were open (nothing more is written to a terminal that is gone)."""
        leave_a_hung_up_terminal()
        if not self.supervisor.sessions_started:
            raise KeyboardInterrupt  # nothing started yet: nothing to record
        self.supervisor.stop_requested_between_sessions()

    def view_stopped(self) -> None:
        self._view_live = False
        if self._say_when_drawn:
            os.write(2, _STOPPED)


# ---------------------------------------------------------------- recovery


def recover_unfinished(
    paths: ProjectPaths, state: RunState, notify: Notify = print, *, pids_here: bool = True, close: bool = True
) -> bool:
    """Bring the record up to date after the supervisor died (kill -9); call with the lock held.

    Merges events the child spooled while nobody read the FIFO, and closes a
    session that has no end once its child is gone. Returns True while that
    child is still training unsupervised.
    """
    from kaio.telemetry import spool

    session = state.ledger.current
    open_session = session if session is not None and session.status == Status.RUNNING else None
    progress = state.ledger.progress.get(open_session.session) if open_session else None
    if progress is not None and pids_here and alive_pids(state):
        return True
    if open_session is None and not paths.spool.is_dir():
        return False  # the common case: nothing to recover
    recorder = Recorder(paths, state, secret_values([], os.environ))  # (the run's arguments are not kept)
    try:
        merged, bad = (
            spool.merge_into(paths.spool, state.ledger.received, recorder.record, recorder.journal.write_out)
            if paths.spool.is_dir()
            else (0, 0)
        )
        if merged:
            notify(f"merged {merged} event(s) the run spooled while no supervisor was listening")
        if bad:
            recorder.record(Note(text=f"{bad} line(s) of the spool were not valid events and were skipped"))
        if open_session is not None and progress is not None and close:
            number = open_session.session
            end = state.ledger.last_train_end
            # A stop asked of the training itself (a signal to it, once its supervisor was gone): saved and ended.
            stopped = progress.trained_to_end and end is not None and end.session == number and end.stopped
            finished = progress.trained_to_end and not stopped
            recorder.record(
                SessionEnd(
                    session=number,
                    t_wall=state.ledger.last_t_wall,
                    status=Status.INTERRUPTED if stopped else Status.COMPLETED if finished else Status.FAILED,
                    error=None
                    if finished or stopped
                    else "the supervisor stopped without recording an end (killed?) and the training did not finish",
                    counters=SessionCounters(spooled_events=merged),
                )
            )
            recorder.record(Note(text=f"session {number} lost its supervisor; " + _unsupervised_end(finished, stopped)))
        recorder.save()
    finally:
        recorder.close()
    return False


def _unsupervised_end(finished: bool, stopped: bool) -> str:
    if stopped:
        return "the training was stopped unsupervised (a signal to it) and saved its checkpoint (exit code unknown)"
    if finished:
        return "training finished unsupervised (exit code unknown)"
    return "its end was reconstructed from the journal"


def alive_pids(state: RunState) -> list[int]:
    """Processes of the latest session still alive: its launcher, and every rank that said where it was."""
    import psutil

    session = state.ledger.current
    progress = state.ledger.progress.get(session.session) if session is not None else None
    pids = (progress.pids if progress else []) + [r.pid for r in state.ledger.ranks.values() if r.pid]
    alive = []
    for pid in dict.fromkeys(pids):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive


# ---------------------------------------------------------------- resume


def checkpoint_folder(cfg: RunConfig, state: RunState) -> Path:
    """Where the project's checkpoints are: where its Trainer said it saved them (a script chooses its own
    ``output_dir``), else kaio's folder for the built-in recipe."""
    reported = state.ledger.checkpoint_folder()
    return Path(reported) if reported else cfg.checkpoint_dir


def checkpoint_folders(cfg: RunConfig, state: RunState) -> list[Path]:
    """Every folder the project's checkpoints are in: a script's output_dir computed from its arguments (a learning
    rate in its name) is another folder for a session resumed with other arguments."""
    saved = [Path(os.path.dirname(c.path)) for c in state.ledger.checkpoints if c.path]
    return list(dict.fromkeys([*saved, checkpoint_folder(cfg, state)]))


def _no_checkpoint_in(cfg: RunConfig, state: RunState, folder: Path) -> str:
    """Where no checkpoint was found, said truly: a script's Trainer that never started named no folder (kaio's
    own folder is the built-in recipe's, not the script's)."""
    if cfg.launch.own_code is not None and state.ledger.checkpoint_folder() is None and cfg.training.output_dir is None:
        return "no checkpoint to continue from (no Trainer of the script started, so none was saved)"
    return f"no complete checkpoint to continue from in {folder}/"


# Keys whose change makes a checkpoint unusable (a key, or a prefix ending in "."); the others may change
# between sessions: launch.script_args among them, where a script of the user's takes its length.
_FROZEN_KEYS = (
    "project_name",
    "model.",
    "lora.r",
    "lora.alpha",
    "lora.target_modules",
    "launch.script",
    "launch.module",
    "reporting.output_dir",
    "training.output_dir",  # one history, one set of checkpoints: in one place each
)


def _frozen(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in _FROZEN_KEYS)


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """``(refused, allowed)`` lists of ``key: old -> new`` between two config snapshots."""
    refused: list[str] = []
    allowed: list[str] = []
    for key, change in config_differences(old, new).items():
        (refused if _frozen(key) else allowed).append(f"{key}: {change}")
    return refused, allowed


def resume(
    project: str,
    output_dir: Path,
    view: View,
    *,
    config_path: Path | None = None,
    max_steps: int | None = None,
    placement_flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] = os.environ,
    poller_factory_for: Callable | None = None,
    notify: Notify = print,
) -> int:
    """``kaio resume``: continue from the latest complete checkpoint, as a new session of the same history. In
    a job of several machines each node resumes its own record (``kaio.nodes.resume_placement`` says which)."""
    where = resume_placement(_saved_launch(output_dir, project), placement_flags or {}, environ)
    if where.is_head:
        paths, moved = project_paths(output_dir, project), None
    else:
        paths, moved = _node_record(output_dir, project, where.node_rank, notify)
    recorded = paths.journal.stat().st_size if paths.journal.is_file() else 0
    with opened(paths, notify, pids_here=moved is None) as (loaded, running):
        try:
            cfg, checkpoint, notes = _resumable_session(
                paths, loaded.state, running, ResumeAsked(config_path, max_steps, where), notify
            )
        except ProjectError:
            if not running and paths.journal.stat().st_size > recorded:  # refused, after recovering the record
                _write_recovered_reports(paths, loaded.state, notify)
            raise
        if moved is not None:
            notes.insert(0, moved)
        factory = poller_factory_for(cfg) if poller_factory_for else None
        request = SessionRequest(
            SessionKind.RESUME, checkpoint.resolve() if checkpoint else None, notes + _launcher_notes(cfg, notify)
        )
        return _supervise(cfg, loaded.state, view, request, factory, notify, config_path=config_path)


def _write_recovered_reports(paths: ProjectPaths, state: RunState, notify: Notify) -> None:
    """The reports of a record the recovery brought up to date (what a killed supervisor's run spooled, its
    session's end): they were that supervisor's last refresh, a RUNNING report of fewer steps."""
    from kaio.run.finalize import FigureProcess, write_reports

    figure = FigureProcess(paths.report_dir)
    try:
        write_reports(state, paths.report_dir, figure=figure)
    finally:
        figure.close()
    notify(f"record brought up to date: {paths.report}")


@dataclass(frozen=True)
class ResumeAsked:
    """What `kaio resume` was asked for beyond the project: an edited config, more steps, this node's place."""

    config_path: Path | None
    max_steps: int | None
    where: Placement


def _saved_launch(output_dir: Path, project: str) -> LaunchConfig:
    """The job's shape as the project last ran: the head's config, else (a node without a shared filesystem)
    that of a node's record here."""
    from kaio.config import check_project_name

    folder = output_dir / check_project_name(project)
    records = [ProjectPaths(folder)] + [ProjectPaths(p) for p in node_folders(ProjectPaths(folder))]
    for paths in records:
        if paths.config.is_file():
            return saved_config(paths)[0].launch
    for paths in records:  # a node's journal copied from the head's (which keeps no config.json)
        if paths.journal.is_file():
            loaded = loading.load(paths, writable=False)
            loaded.state.index.close()
            return saved_config(paths, loaded.state)[0].launch
    raise unknown_project(output_dir, project)


def _node_record(output_dir: Path, project: str, rank: int, notify: Notify) -> tuple[ProjectPaths, str | None]:
    """This node's record to continue: its folder for this host, or the node's record from the machine it ran on
    before, renamed for this one (a shared filesystem, or a folder copied here). Returns it and, when it was
    moved, a note saying so."""
    nodes = ProjectPaths(output_dir / project).nodes
    mine = nodes / node_folder_name(rank)
    if ProjectPaths(mine).journal.is_file():
        return ProjectPaths(mine), None
    found = [p for p in node_folders(ProjectPaths(output_dir / project)) if node_rank_of(p) == rank]
    if not found:
        raise ProjectError(
            f"no record of node {rank} of project {project!r} in {nodes}/: copy its folder ({rank}-<host>) from "
            f"the machine it ran on (or the head's copy, when it was streamed) to {nodes}/, then resume again"
        )
    if len(found) > 1:
        raise ProjectError(
            f"several records of node {rank} in {nodes}/ ({', '.join(p.name for p in found)}): move aside the "
            "ones not to continue, then resume again"
        )
    if _live(found[0]):
        raise ProjectError(f"{found[0]}: node {rank}'s record is still held by a running kaio")
    try:
        found[0].rename(mine)
    except OSError as exc:  # a folder of that name left by a start that failed, or another node taking it
        raise ProjectError(
            f"cannot take over {found[0]} as {mine} ({exc.strerror}): move {mine} aside, then resume again"
        ) from None
    for head_file in (ProjectPaths(mine).stream_copy, ProjectPaths(mine).clock):  # a head's copy: this node's own now
        head_file.unlink(missing_ok=True)
    text = f"node {rank}'s record moved from nodes/{found[0].name} to nodes/{mine.name}: the job resumes on another machine"
    notify(text)
    return ProjectPaths(mine), text


def _resumable_session(paths: ProjectPaths, state: RunState, running: bool, asked: ResumeAsked, notify: Notify):
    """The config, checkpoint and notes of a resume, or the ``ProjectError`` that says why not."""
    cfg, changed = _resume_config(paths, state, running, asked)
    edited = _check_the_code(paths, cfg, state)
    if state.ledger.run is not None and state.ledger.run.reporter == "kaio.log":
        latest = state.ledger.current
        if latest is not None and latest.status == Status.COMPLETED:
            raise ProjectError(
                f"project {paths.project!r}: its loop ran to its end (session {latest.session} COMPLETED); nothing is "
                f"left to resume (a loop started again without a checkpoint of its own would train from its first "
                f"step): start it again with `{start_over_command(asked.config_path)}`"
            )
        return cfg, None, [_LOOP_RESUMED] + [f"config changed for this session: {c}" for c in changed]
    _refuse_a_finished_run(paths, cfg, state, changed)  # (first: the checkpoints' search notes what it skips)
    checkpoint = _resume_checkpoint(paths, cfg, state, asked, notify)
    later = state.ledger.later_training_of(checkpoint)
    if later is not None:
        raise ProjectError(
            f"project {paths.project!r}: its latest checkpoint, {checkpoint}, was saved by the script's training "
            f"{later} (another Trainer, or train() again), and `kaio resume` hands a checkpoint to the script's first "
            "train() only, which would load it into the wrong training; continue that training with your "
            f"script's own resume_from_checkpoint as a new project, or start over with `{start_over_command(asked.config_path)}`"
        )
    notes = [resumed_note(cfg, checkpoint)] + [f"config changed for this session: {c}" for c in changed]
    for warning in (edited, without_optimizer(checkpoint)):
        if warning is not None:
            notify(f"kaio: warning: {warning}")
            notes.append(warning)
    return cfg, checkpoint, notes


# A plain loop's checkpoints are its own: kaio starts it again, and the steps it logs continue the record (those it
# trains again replace the earlier session's, as a resume's do).
_LOOP_RESUMED = (
    "kaio started the loop again (a kaio.log loop resumes from its own checkpoint, if it keeps one): the steps it "
    "logs continue the record, replacing the earlier session's from its first"
)


def resumed_note(cfg: RunConfig, checkpoint: Path) -> str:
    """The session's note of its checkpoint. A script is handed it, and may load another of its own (the record
    then warns where its Trainer began): the note says only what kaio did."""
    if cfg.launch.own_code is not None:
        return f"kaio handed the script {checkpoint.name} to resume from"
    return f"resumed from {checkpoint.name}"


def _resume_config(
    paths: ProjectPaths, state: RunState, running: bool, asked: ResumeAsked
) -> tuple[RunConfig, list[str]]:
    """The config a resume runs with (the saved one, or the user's edited one, placed on this node, with
    ``--max-steps``) and the changes it makes, each as ``key: old -> new``."""
    project = paths.project
    if running:
        raise ProjectError(
            f"project {project!r} is still training without a supervisor (pids {', '.join(map(str, alive_pids(state)))} "
            "are alive); wait for them to finish or stop them, then `kaio resume` again"
        )
    cfg, saved = saved_config(paths, state)
    config_path, max_steps, where = asked.config_path, asked.max_steps, asked.where
    if config_path is None and REDACTED in [*cfg.launch.script_args, *cfg.launch.accelerate_args]:
        raise ProjectError(
            f"project {project!r} ran with a secret in its arguments, which kaio does not keep (config.json has "
            f"{REDACTED} in its place): resume with the original config, `{paths.command('resume')} --config CONFIG`, or "
            "better, pass the secret in an environment variable"
        )
    allowed: list[str] = []
    if config_path is not None:
        cfg = load_config(config_path)
        if cfg.project_name != project:
            raise ProjectError(
                f"{config_path}: the config of project {cfg.project_name!r}, not {project!r}: resume {project!r} with "
                f"its own config (edited), or run {cfg.project_name!r} with `kaio run {config_path}`"
            )
        refused, allowed = config_changes(saved, config_snapshot(cfg))
        allowed = [c for c in allowed if not c.startswith(_PLACEMENT_KEYS)]  # said below, once placed
        if refused:
            key, change = refused[0].split(": ", 1)
            raise ProjectError(
                f"{config_path}: cannot resume {project!r} with a changed {key} ({change}); its steps so far were "
                f"trained with the old value. Revert it, or start over with `{start_over_command(config_path)}`"
            )
    cfg = placed(cfg, where)
    before = saved.get("launch") or {}
    allowed += [
        f"launch.{key}: {before.get(key)!r} -> {getattr(cfg.launch, key)!r}"
        for key in ("main_addr", "main_port")
        if cfg.launch.nnodes > 1 and before.get(key) != getattr(cfg.launch, key)
    ]
    if max_steps is not None:
        if max_steps == -1:
            raise ProjectError(
                "--max-steps -1: a resume trains to a step count; to train by epochs instead, set "
                "training.max_steps: -1 and training.num_epochs in the config and pass it with --config"
            )
        if max_steps <= state.last_step:
            raise ProjectError(
                f"--max-steps {max_steps}: project {project!r} has trained {state.last_step} steps already; "
                f"pass a larger number to train more"
            )
        planned = cfg.training.max_steps
        cfg = with_max_steps(cfg, max_steps)
        if planned != max_steps:
            allowed.append(f"training.max_steps: {planned!r} -> {max_steps!r}")
    return cfg, allowed


def _check_the_code(paths: ProjectPaths, cfg: RunConfig, state: RunState) -> str | None:
    """The user's code is found from this folder, and is the file the run's latest session ran (not another copy of
    the package, in the folder a resume was started from: its steps would continue with other code, unsaid).
    Returns the warning that the file was edited since, if it was."""
    missing = code_not_found(cfg.launch)
    if missing is not None:
        raise ProjectError(f"project {paths.project!r}: {missing}: resume from the folder the run started in")
    then = state.ledger.code_file
    now = code_file(cfg.launch) if cfg.launch.own_code is not None else None
    if then is None or now is None:
        return None
    if os.path.realpath(then) == os.path.realpath(now):
        digest = state.ledger.code_sha256
        if digest is None or code_digest(now) in (None, digest):
            return None
        return (
            f"{os.path.basename(now)} was edited since the session before (its content is not what that session "
            "ran): the steps from here on ran the edited code"
        )
    raise ProjectError(
        f"project {paths.project!r} ran `{cfg.launch.own_code}` from {then}; from {os.getcwd()} that is {now}: "
        "resume from the folder the run started in, so that it goes on with the same code"
    )


def _resume_checkpoint(
    paths: ProjectPaths, cfg: RunConfig, state: RunState, asked: ResumeAsked, notify: Notify
) -> Path:
    """The latest complete checkpoint a resume starts from, or why there is none here."""
    project, where = paths.project, asked.where
    folder = checkpoint_folder(cfg, state)
    since = nonfinite_since(state)
    checkpoint = latest_checkpoint(folder, notify, at_most=state.last_step, nonfinite_since=since)
    if checkpoint is None and since is not None and latest_checkpoint(folder, lambda _: None) is not None:
        raise ProjectError(
            f"project {project!r}: its loss was NaN/inf from step {since} to the end, and every checkpoint "
            f"in {folder}/ was saved from there on: their weights may be NaN, and a resume would train on from them; "
            f"start it again with `{start_over_command(asked.config_path)}` (a lower learning rate, or gradient "
            "clipping, may keep the loss finite)"
        )
    if checkpoint is None:
        if not where.is_head:  # a node of a job: the head's checkpoint is the one to resume from, here too
            keep = (
                "your script's output_dir on a filesystem every node sees, or TrainingArguments(save_on_each_node=True)"
                if cfg.launch.own_code is not None
                else "training.output_dir on a filesystem every node sees (the built-in recipe saves on the head)"
            )
            raise ProjectError(
                f"project {project!r} has no complete checkpoint in {folder}/ on this machine (node "
                f"{where.node_rank}): every node loads the checkpoint the job resumes from; copy the head's latest "
                f"checkpoint folder here and `kaio resume` again (and for next time: {keep})"
            )
        reported = state.ledger.checkpoint_folder() is not None
        if reported and not folder.is_absolute() and not folder.exists():  # recorded from the folder kaio ran in
            raise ProjectError(
                f"project {project!r} saved its checkpoints in {folder}/, relative to the folder its run was "
                f"started in, and there is no {folder}/ here ({os.getcwd()}): run `kaio resume` from that folder "
                "(if it is this one, the checkpoints were moved or deleted)"
            )
        raise ProjectError(
            f"project {project!r} has {_no_checkpoint_in(cfg, state, folder)}; "
            f"start it again with `{start_over_command(asked.config_path)}`"
        )
    return checkpoint


def _refuse_a_finished_run(paths: ProjectPaths, cfg: RunConfig, state: RunState, changed: list[str]) -> None:
    """Trained to its planned length (completed, or stopped or failed in its last save): nothing is left to resume
    unless the resume asks for a longer run (``--max-steps``, or a script's edited arguments)."""
    project = paths.project
    if cfg.launch.own_code is None:
        planned = cfg.training.max_steps
        if planned != -1 and planned <= state.last_step:
            extend = f"`{paths.command('resume')} --max-steps N` (N > {state.last_step})"
            if _ended_before_its_final_save(cfg, state):
                raise ProjectError(
                    f"project {project!r} trained its {state.last_step} steps but ended before it saved its final "
                    f"adapter: {_COPY_THE_LAST_CHECKPOINT.format(final=cfg.checkpoint_dir / 'final')}, or train it "
                    f"further with {extend}"
                )
            raise ProjectError(
                f"project {project!r} already trained its {state.last_step} steps; extend it with {extend}"
            )
    elif not any(c.startswith("launch.script_args") for c in changed) and not _arguments_in_a_file(cfg):
        length = state.ledger.run.max_steps if state.ledger.run is not None else None
        if length is not None and 0 < length <= state.last_step:  # its Trainer's own length, as it reported it
            raise ProjectError(
                f"project {project!r} already trained the {length} steps its script asked for; to train further, "
                f"give the script a longer run in launch.script_args and resume with "
                f"`{paths.command('resume')} --config CONFIG`"
            )


def _arguments_in_a_file(cfg: RunConfig) -> bool:
    """The script reads its arguments from a file (``run_x.py args.json``, as the official examples allow): its
    length may have changed there, which kaio cannot see; the Trainer itself says how far it trains."""
    return any(Path(arg).suffix in (".json", ".yaml", ".yml") and Path(arg).is_file() for arg in cfg.launch.script_args)


_PLACEMENT_KEYS = ("launch.nnodes", "launch.node_rank", "launch.main_addr", "launch.main_port")


# ---------------------------------------------------------------- push


def push(project: str, output_dir: Path, *, repo_id: str | None = None, notify: Notify = print) -> bool:
    """``kaio push``: push (or retry pushing) a project's final adapter by hand."""
    from kaio.config import HUB_REPO_ID, SCRIPT_PUSHES_ITS_OWN
    from kaio.run.finalize import push_to_hub, write_reports

    if repo_id is not None and not HUB_REPO_ID.fullmatch(repo_id):
        raise ProjectError(f"--repo-id {repo_id!r}: not a Hub repo id of the form `user/name`")
    paths = project_paths(output_dir, project)
    with opened(paths, notify) as (loaded, _running):
        cfg, _ = saved_config(paths)
        if cfg.launch.own_code is not None:  # first: no repo id makes it pushable
            own = f"{cfg.launch.own_code_key} {cfg.launch.own_code}"
            raise ProjectError(f"project {project!r} trained with your own code ({own}): {SCRIPT_PUSHES_ITS_OWN}")
        repo = repo_id or cfg.hub.repo_id
        if not repo:
            raise ProjectError(
                f"no Hub repo for {project!r}: pass `--repo-id user/name` or set hub.repo_id in the config"
            )
        cfg = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"repo_id": repo, "push": True})})
        if not (cfg.checkpoint_dir / "final" / "adapter_config.json").is_file():
            raise ProjectError(_no_final_adapter(cfg, loaded.state, paths))
        state = loaded.state
        if state.status is not Status.COMPLETED:  # final/ is an earlier session's; the report and card are not
            raise ProjectError(
                f"project {project!r}: its latest session ended {state.status.value} at step {state.last_step}, before "
                f"it saved a final adapter: {cfg.checkpoint_dir / 'final'}/ holds an earlier session's, which the "
                f"report and model card would not describe; finish the training with `{paths.command('resume')}`, "
                "then push"
            )
        recorder = Recorder(paths, state)
        try:
            ok = push_to_hub(cfg, state, write_reports(state, paths.report_dir), recorder.record, notify)
            write_reports(state, paths.report_dir)
            recorder.save()
        finally:
            recorder.close()
        return ok


_COPY_THE_LAST_CHECKPOINT = (
    "copy the adapter files (adapter_config.json, adapter_model.safetensors) of its latest checkpoint to {final}/ "
    "(`kaio push` then pushes them)"
)


def _ended_before_its_final_save(cfg: RunConfig, state: RunState) -> bool:
    """The built-in recipe trained all its steps, but the run ended (killed, failed) before its final adapter was
    saved: a resume has no step left to train, and the checkpoint of its last step holds those weights."""
    planned = cfg.training.max_steps
    return (
        planned != -1
        and planned <= state.last_step
        and state.status is not Status.COMPLETED
        and not (cfg.checkpoint_dir / "final" / "adapter_config.json").is_file()
    )


def _no_final_adapter(cfg: RunConfig, state: RunState, paths: ProjectPaths) -> str:
    """Why there is no adapter to push, and the way on that works for the project as it is."""
    final = cfg.checkpoint_dir / "final"
    if state.status is Status.COMPLETED:
        return (
            f"no final adapter in {final}/: the run completed and saved it there, but it is gone (moved or "
            "deleted?); copy the adapter files of its last checkpoint there to push them"
        )
    if _ended_before_its_final_save(cfg, state):
        hint = _COPY_THE_LAST_CHECKPOINT.format(final=final)
    elif latest_checkpoint(checkpoint_folder(cfg, state), lambda text: None, at_most=state.last_step):
        hint = f"finish it with `{paths.command('resume')}`"
    else:
        hint = f"start it again with `{start_over_command(None)}` (no checkpoint to resume from)"
    return f"no final adapter in {final}/: the run has not completed ({state.status.value} at step {state.last_step}); {hint}"

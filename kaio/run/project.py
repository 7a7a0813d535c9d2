"""A project's life on disk: starting a run, refusing to mix histories, finalizing.

``docs/reports/<project>/`` holds the journal (source of truth), the resolved
config, the child's log, ``history.json`` and the reports. This module decides
what a command may do with that folder; the supervisor runs one session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from kaio.config import RunConfig
from kaio.errors import ProjectError
from kaio.run import derived
from kaio.run.journal import JOURNAL_NAME, Journal
from kaio.run.lock import LOCK_NAME, ProjectLock
from kaio.run.state import COMPLETED, FAILED, RUNNING, RunState
from kaio.run.steplog import STEPS_NAME, StepLog
from kaio.run.supervisor import SessionRequest, Supervisor, View

HISTORY_NAME = "history.json"


def known_projects(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if (p / JOURNAL_NAME).is_file())


def project_dir(output_dir: Path, project: str) -> Path:
    """The report folder of a project that exists, or a ``ProjectError`` listing those that do."""
    report_dir = output_dir / project
    if not (report_dir / JOURNAL_NAME).is_file():
        raise unknown_project(output_dir, project)
    return report_dir


def unknown_project(output_dir: Path, project: str) -> ProjectError:
    projects = known_projects(output_dir)
    listing = ", ".join(projects) if projects else "none yet; start one with `kaio run CONFIG`"
    return ProjectError(f"unknown project {project!r} in {output_dir}/ (known projects: {listing})")


def saved_config(report_dir: Path) -> tuple[RunConfig, dict]:
    """The config the project last ran with (config.json), validated, and as saved."""
    import json

    from kaio.config import config_from_dict
    from kaio.run.supervisor import CONFIG_NAME

    path = report_dir / CONFIG_NAME
    saved = json.loads(path.read_text())
    return config_from_dict(saved, source=str(path)), saved


def open_project(report_dir: Path, notify: Callable[[str], None] = print) -> tuple[derived.LoadedState, bool]:
    """The project's state, recovered after a supervisor that died; call with the lock held.
    Returns it and whether a child still trains unsupervised."""
    loaded = derived.load(report_dir, writable=True)
    if loaded.bad_lines:
        notify(f"note: {loaded.bad_lines} unreadable line(s) in {report_dir / JOURNAL_NAME} skipped (a torn write from a crash)")
    return loaded, recover_unfinished(report_dir, loaded, notify)


def move_aside(cfg: RunConfig) -> list[Path]:
    """``--overwrite``: keep the old record and checkpoints under a dated name, never delete them."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    report_dir = cfg.report_dir
    old_reports = report_dir.with_name(f"{report_dir.name}.replaced-{stamp}")
    entries = [p for p in report_dir.iterdir() if p.name != LOCK_NAME] if report_dir.is_dir() else []
    if entries:
        old_reports.mkdir(parents=True)
        for entry in entries:
            shutil.move(str(entry), old_reports / entry.name)
        moved.append(old_reports)
    checkpoints = cfg.checkpoint_dir
    if checkpoints.exists():
        target = checkpoints.with_name(f"{checkpoints.name}.replaced-{stamp}")
        shutil.move(str(checkpoints), target)
        moved.append(target)
    return moved


def run_new(cfg: RunConfig, view: View, *, overwrite: bool = False, poller_factory_for: Callable | None = None, notify: Callable[[str], None] = print) -> int:
    """``kaio run``: a new history for the project (after moving an old one aside with ``--overwrite``)."""
    report_dir = cfg.report_dir
    lock = ProjectLock(report_dir)
    lock.acquire()
    try:
        if (report_dir / JOURNAL_NAME).exists():
            if not overwrite:
                state = derived.load(report_dir, writable=False).state
                raise ProjectError(
                    f"project {cfg.project_name!r} already has a history ({state.last_step} steps, {state.status}) "
                    f"in {report_dir}; continue it with `kaio resume {cfg.project_name}`, "
                    "or start over with `--overwrite` (the old record and checkpoints are moved aside)"
                )
        if overwrite:
            for path in move_aside(cfg):
                notify(f"moved the previous record aside: {path}")
        factory = poller_factory_for(cfg) if poller_factory_for else None
        state = RunState(cfg.project_name, StepLog(report_dir / STEPS_NAME, writable=True, valid_bytes=0))
        return _supervise(cfg, state, view, SessionRequest("run"), factory, notify)
    finally:
        lock.release()


def _supervise(cfg: RunConfig, state: RunState, view: View, request: SessionRequest, poller_factory, notify) -> int:
    """One or more sessions (automatic restarts), then the reports, Comet and the Hub push."""
    from kaio.run.finalize import FigureProcess, LiveReports, RunOutputs

    report_dir = cfg.report_dir
    journal = Journal(report_dir / JOURNAL_NAME)
    supervisor = Supervisor(cfg, state, journal, view, poller_factory=poller_factory)
    figure = FigureProcess(report_dir)
    outputs = RunOutputs(cfg, supervisor.record, notify, figure)
    supervisor.on_refresh.append(LiveReports(report_dir, figure))
    supervisor.on_refresh.append(lambda s: derived.save(report_dir, s, journal))
    supervisor.on_loop.append(outputs.feed)
    outcome = None
    try:
        outputs.start(state)
        view.start()
        try:
            outcome = supervisor.run_session(request)
            restarts = 0
            while outcome.status == FAILED and restarts < cfg.launch.max_restarts and not supervisor.stop_requested:
                restarts += 1
                checkpoint = latest_checkpoint(cfg.checkpoint_dir, notify=lambda text: None)
                origin = f"from {checkpoint.name}" if checkpoint else "from the start (no complete checkpoint yet)"
                cause = outcome.error or outcome.signal or f"exit code {outcome.exit_code}"
                note = f"automatic restart {restarts} of {cfg.launch.max_restarts} after: {cause}; {origin}"
                outcome = supervisor.run_session(SessionRequest("restart", checkpoint.resolve() if checkpoint else None, [note]))
        finally:
            view.stop(supervisor.snapshot())
    finally:
        try:
            with _finishing(outputs):
                outputs.finish(state)
                derived.save(report_dir, state, journal)
        finally:
            figure.close()
            journal.close()
            state.step_log.close()
    return outcome.exit_code if outcome else 1


@contextlib.contextmanager
def _finishing(outputs):
    """Ctrl-C (or SIGTERM) while the run's record is written: the child is gone already, so the
    local files are always finished; a press only cuts the Hub push short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if not outputs.cancelled:
            # os.write, not print: a signal may land while the console is half-way through a write.
            os.write(2, b"kaio: the run has stopped; writing its record (the Hub push, if any, is skipped)\n")
        outputs.cancelled = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- recovery


def recover_unfinished(report_dir: Path, loaded: derived.LoadedState, notify: Callable[[str], None] = print) -> bool:
    """Bring a journal and its state up to date after the supervisor died (kill -9); call with the lock held.

    Merges events the child spooled while nobody read the FIFO, and closes a
    session that has no end once its child is gone. Returns True while that
    child is still training unsupervised.
    """
    from kaio.telemetry import spool

    state = loaded.state
    session = state.current_session
    open_session = session if session is not None and session["status"] == RUNNING else None
    if open_session is not None and _child_alive(open_session.get("_pids") or []):
        return True
    spool_dir = report_dir / spool.SPOOL_DIR_NAME
    if open_session is None and not spool_dir.is_dir():
        return False  # the common case: nothing to recover
    journal = Journal(report_dir / JOURNAL_NAME)

    def record(r: dict) -> None:
        journal.append(r)
        state.apply(r)

    try:
        merged = spool.merge_into(spool_dir, dict(state.max_seq_by_pid), record) if spool_dir.is_dir() else 0
        if merged:
            notify(f"merged {merged} event(s) the run spooled while no supervisor was listening")
        if open_session is not None:
            finished = open_session.get("_trained_to_end", False)
            number = open_session["session"]
            record(
                {
                    "type": "session_end",
                    "session": number,
                    "t_wall": state.last_t_wall,
                    "status": COMPLETED if finished else FAILED,
                    "exit_code": None,
                    "signal": None,
                    "counters": {"spooled_events": merged},
                    "error": None
                    if finished
                    else "the supervisor stopped without recording an end (killed?) and the training did not finish",
                }
            )
            record(
                {
                    "type": "note",
                    "text": f"session {number} lost its supervisor; "
                    + ("training finished unsupervised (exit code unknown)" if finished else "its end was reconstructed from the journal"),
                }
            )
    finally:
        journal.close()
    loaded.journal_offset = journal.offset  # what was appended is applied too
    return False


def _child_alive(pids: list[int]) -> bool:
    import psutil

    for pid in pids:
        try:
            if pid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            continue
    return False


# ---------------------------------------------------------------- resume


def latest_checkpoint(checkpoint_dir: Path, notify: Callable[[str], None] = print) -> Path | None:
    """The newest *complete* ``checkpoint-N``: its trainer_state.json (written last) says step N."""
    import json

    candidates = []
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.glob("checkpoint-*"):
            suffix = path.name.removeprefix("checkpoint-")
            if path.is_dir() and suffix.isdigit():
                candidates.append((int(suffix), path))
    for step, path in sorted(candidates, reverse=True):
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            complete = state.get("global_step") == step and any(
                (path / name).exists() for name in ("adapter_model.safetensors", "model.safetensors", "pytorch_model.bin", "adapter_model.bin")
            )
        except (OSError, ValueError):
            complete = False
        if complete:
            return path
        notify(f"note: skipping {path}: incomplete (half-written or damaged)")
    return None


def checkpoint_step(checkpoint: Path | None) -> int:
    """The step of ``checkpoint-N``; 0 for a start from scratch."""
    return int(checkpoint.name.removeprefix("checkpoint-")) if checkpoint is not None else 0


# Keys whose change makes a checkpoint unusable, and keys that may change between sessions.
_FROZEN_PREFIXES = ("project_name", "model.", "lora.r", "lora.alpha", "lora.target_modules", "launch.script")


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """``(refused, allowed)`` lists of ``key: old -> new`` between two config snapshots."""
    refused, allowed = [], []
    for key in sorted(set(_flatten(old)) | set(_flatten(new))):
        before, after = _flatten(old).get(key), _flatten(new).get(key)
        if before == after:
            continue
        change = f"{key}: {before!r} -> {after!r}"
        (refused if key.startswith(_FROZEN_PREFIXES) else allowed).append(change)
    return refused, allowed


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume(
    project: str,
    output_dir: Path,
    view: View,
    *,
    config_path: Path | None = None,
    max_steps: int | None = None,
    poller_factory_for: Callable | None = None,
    notify: Callable[[str], None] = print,
) -> int:
    """``kaio resume``: continue from the latest complete checkpoint, as a new session of the same history."""
    report_dir = project_dir(output_dir, project)
    lock = ProjectLock(report_dir)
    lock.acquire()
    try:
        loaded, running = open_project(report_dir, notify)
        try:
            session = _resumable_session(report_dir, loaded.state, running, config_path, max_steps, notify)
        except BaseException:
            loaded.state.step_log.close()
            raise
        cfg, checkpoint, notes = session
        factory = poller_factory_for(cfg) if poller_factory_for else None
        return _supervise(cfg, loaded.state, view, SessionRequest("resume", checkpoint.resolve(), notes), factory, notify)
    finally:
        lock.release()


def _resumable_session(report_dir: Path, state: RunState, running: bool, config_path: Path | None, max_steps: int | None, notify):
    """The config, checkpoint and notes of a resume, or the ``ProjectError`` that says why not."""
    from kaio.config import config_snapshot, load_config

    project = report_dir.name
    if running:
        raise ProjectError(
            f"project {project!r} is still training without a supervisor (its child process is alive); "
            "wait for it to finish or stop it, then `kaio resume` again"
        )
    cfg, saved = saved_config(report_dir)
    if config_path is not None:
        cfg = load_config(config_path)
        refused, allowed = config_changes(saved, config_snapshot(cfg))
        if refused:
            raise ProjectError(
                f"{config_path}: cannot resume {project!r} with a changed {refused[0].split(':')[0]} "
                f"({refused[0].split(': ', 1)[1]}); the checkpoint was trained with the old value. "
                "Revert it, or start over with `kaio run --overwrite`"
            )
    else:
        allowed = []
    if max_steps is not None:
        before = cfg.training.max_steps
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": max_steps})})
        if before != max_steps:
            allowed.append(f"training.max_steps: {before!r} -> {max_steps!r}")
    checkpoint = latest_checkpoint(cfg.checkpoint_dir, notify)
    if checkpoint is None:
        raise ProjectError(
            f"project {project!r} has no complete checkpoint in {cfg.checkpoint_dir}/ to resume from; "
            f"start it again with `kaio run CONFIG --overwrite`"
        )
    planned = cfg.training.max_steps
    if state.status == "COMPLETED" and planned != -1 and planned <= state.last_step:
        raise ProjectError(
            f"project {project!r} already completed {state.last_step} steps; "
            f"extend it with `kaio resume {project} --max-steps N` (N > {state.last_step})"
        )
    notes = [f"resumed from {checkpoint.name}"] + [f"config changed for this session: {c}" for c in allowed]
    return cfg, checkpoint, notes


# ---------------------------------------------------------------- push


def push(project: str, output_dir: Path, *, repo_id: str | None = None, notify: Callable[[str], None] = print) -> bool:
    """``kaio push``: push (or retry pushing) a project's final adapter by hand."""
    from kaio.run.finalize import push_to_hub, write_reports

    report_dir = project_dir(output_dir, project)
    with ProjectLock(report_dir):
        cfg, _ = saved_config(report_dir)
        repo = repo_id or cfg.hub.repo_id
        if not repo:
            raise ProjectError(f"no Hub repo for {project!r}: pass `--repo-id user/name` or set hub.repo_id in the config")
        cfg = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"repo_id": repo, "push": True})})
        if not (cfg.checkpoint_dir / "final" / "adapter_config.json").is_file():
            raise ProjectError(f"no final adapter in {cfg.checkpoint_dir / 'final'}/ (the run has not completed); finish it with `kaio resume {project}`")
        loaded, _running = open_project(report_dir, notify)
        state = loaded.state
        journal = Journal(report_dir / JOURNAL_NAME)

        def record(r: dict) -> None:
            journal.append(r)
            state.apply(r)

        try:
            ok = push_to_hub(cfg, state, write_reports(state, report_dir), record, notify)
            write_reports(state, report_dir)
            derived.save(report_dir, state, journal)
        finally:
            journal.close()
            state.step_log.close()
        return ok

"""A project's life on disk: starting a run, refusing to mix histories, finalizing.

``docs/reports/<project>/`` holds the journal (source of truth), the resolved
config, the child's log, ``history.json`` and the reports. This module decides
what a command may do with that folder; the supervisor runs one session.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from kaio.config import RunConfig
from kaio.errors import ProjectError
from kaio.run.journal import JOURNAL_NAME, Journal, read_journal
from kaio.run.lock import LOCK_NAME, ProjectLock
from kaio.run.state import RunState, replay
from kaio.run.supervisor import SessionRequest, Supervisor, View

HISTORY_NAME = "history.json"


def known_projects(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if (p / JOURNAL_NAME).is_file())


def load_state(report_dir: Path) -> RunState:
    records, _bad = read_journal(report_dir / JOURNAL_NAME)
    return replay(report_dir.name, records)


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


def write_history(state: RunState, report_dir: Path) -> None:
    """history.json and the reports, atomically. Reports come from kaio.report."""
    from kaio.report import write_reports

    write_reports(state.history(), report_dir)


def run_new(cfg: RunConfig, view: View, *, overwrite: bool = False, poller_factory: Callable | None = None, notify: Callable[[str], None] = print) -> int:
    """``kaio run``: a new history for the project (after moving an old one aside with ``--overwrite``)."""
    report_dir = cfg.report_dir
    lock = ProjectLock(report_dir)
    lock.acquire()
    try:
        if (report_dir / JOURNAL_NAME).exists():
            if not overwrite:
                state = load_state(report_dir)
                raise ProjectError(
                    f"project {cfg.project_name!r} already has a history ({state.last_step} steps, {state.status}) "
                    f"in {report_dir}; continue it with `kaio resume {cfg.project_name}`, "
                    "or start over with `--overwrite` (the old record and checkpoints are moved aside)"
                )
        if overwrite:
            for path in move_aside(cfg):
                notify(f"moved the previous record aside: {path}")
        return _supervise(cfg, RunState(cfg.project_name), view, SessionRequest("run"), poller_factory)
    finally:
        lock.release()


def _supervise(cfg: RunConfig, state: RunState, view: View, request: SessionRequest, poller_factory) -> int:
    report_dir = cfg.report_dir
    journal = Journal(report_dir / JOURNAL_NAME)
    supervisor = Supervisor(cfg, state, journal, view, poller_factory=poller_factory)
    supervisor.on_refresh.append(lambda s: write_history(s, report_dir))
    view.start()
    outcome = None
    try:
        outcome = supervisor.run_session(request)
    finally:
        try:
            write_history(state, report_dir)
        finally:
            journal.close()
            view.stop(supervisor.snapshot())
    return outcome.exit_code if outcome else 1

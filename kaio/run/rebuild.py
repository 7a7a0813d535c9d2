"""``kaio report``: rebuild history.json and the reports from what is on disk.

Works offline and without torch, after a normal run, after a crash and while
a run is still going. With the project's lock free it also brings the derived
files (steps.jsonl, state.json) up to date, so the next rebuild is quick;
while a supervisor holds the lock it only reads them, and writes only the
report files (atomically, as the supervisor does).
"""

from __future__ import annotations

from pathlib import Path

from kaio.errors import ProjectError
from kaio.run import derived
from kaio.run.journal import JOURNAL_NAME, Journal
from kaio.run.lock import ProjectLock
from kaio.run.project import HISTORY_NAME, open_project, unknown_project


def rebuild(project: str, output_dir: Path, notify=print) -> tuple[dict, Path]:
    """Returns ``(summary, report_dir)``."""
    from kaio.report import load_history, write_reports

    report_dir = output_dir / project
    journal_path = report_dir / JOURNAL_NAME
    history_path = report_dir / HISTORY_NAME
    if not journal_path.is_file():
        if history_path.is_file():
            history = load_history(history_path)  # raises ReportError naming the file
            return write_reports(history, report_dir), report_dir
        raise unknown_project(output_dir, project)

    lock = ProjectLock(report_dir)
    try:
        lock.acquire()
    except ProjectError:
        lock = None  # a supervisor holds the project: read only, no fight over the lock
    state = None
    try:
        if lock is not None:
            loaded, _running = open_project(report_dir, notify)
        else:
            loaded = derived.load(report_dir, writable=False)
        state = loaded.state
        if _looks_damaged(history_path):
            notify(f"note: {history_path}: truncated or corrupt JSON (the document does not end); rebuilding it from {journal_path}")
        summary = write_reports(state.history(), report_dir, tally=state.report_tally(), step_chunks=state.step_chunks())
        if lock is not None:
            journal = Journal(journal_path)
            try:
                derived.save(report_dir, state, journal)
            finally:
                journal.close()
        return summary, report_dir
    finally:
        if state is not None:
            state.step_log.close()
        if lock is not None:
            lock.release()


def _looks_damaged(history_path: Path) -> bool:
    """A cheap check (the file is about to be rewritten): a whole JSON document ends with '}'."""
    if not history_path.is_file():
        return False
    with open(history_path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 64))
        tail = f.read().rstrip()
    return not tail.endswith(b"}")

"""``kaio report``: rebuild history.json and the reports from what is on disk.

Works offline and without torch, after a normal run, after a crash and while
a run is still going (it never takes the project's lock to read; it writes
only the derived files, atomically).
"""

from __future__ import annotations

from pathlib import Path

from kaio.errors import ProjectError
from kaio.run.journal import JOURNAL_NAME, read_journal
from kaio.run.lock import ProjectLock
from kaio.run.project import HISTORY_NAME, recover_unfinished, unknown_project
from kaio.run.state import RUNNING, replay


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

    try:
        with ProjectLock(report_dir):
            running = recover_unfinished(report_dir, notify)  # True: a child still trains unsupervised
    except ProjectError:
        running = True  # a supervisor holds the project: read only, no fight over the lock
    records, bad = read_journal(journal_path)
    if bad:
        notify(f"note: {bad} unreadable line(s) in {journal_path} skipped (a torn write from a crash)")
    if _looks_damaged(history_path):
        notify(f"note: {history_path}: truncated or corrupt JSON (the document does not end); rebuilding it from {journal_path}")
    state = replay(project, records)
    del records  # the state holds what the report needs
    if running and state.sessions:
        state.sessions[-1]["status"] = RUNNING
    return write_reports(state.history(), report_dir), report_dir


def _looks_damaged(history_path: Path) -> bool:
    """A cheap check (the file is about to be rewritten): a whole JSON document ends with '}'."""
    if not history_path.is_file():
        return False
    with open(history_path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 64))
        tail = f.read().rstrip()
    return not tail.endswith(b"}")

"""``kaio report``: rebuild history.json and the reports from what is on disk.

Works offline and without torch, after a normal run, after a crash and while
a run is still going (it never takes the project's lock to read; it writes
only the derived files, atomically).
"""

from __future__ import annotations

from pathlib import Path

from kaio.errors import ProjectError, ReportError
from kaio.run.journal import JOURNAL_NAME, Journal, read_journal
from kaio.run.lock import ProjectLock, is_locked
from kaio.run.project import HISTORY_NAME, known_projects
from kaio.run.state import FAILED, RUNNING, replay
from kaio.run.supervisor import merge_spool


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
        projects = known_projects(output_dir)
        listing = ", ".join(projects) if projects else "none yet; start one with `kaio run CONFIG`"
        raise ProjectError(f"unknown project {project!r} in {output_dir}/ (known projects: {listing})")

    running = is_locked(report_dir)
    if not running:
        _adopt_orphaned_session(report_dir, notify)
    records, bad = read_journal(journal_path)
    if bad:
        notify(f"note: {bad} unreadable line(s) in {journal_path} skipped (a torn write from a crash)")
    if history_path.is_file():
        try:
            load_history(history_path)
        except ReportError as exc:
            notify(f"note: {exc}; rebuilding it from {journal_path}")
    state = replay(project, records)
    if running and state.sessions:
        state.sessions[-1]["status"] = RUNNING
    return write_reports(state.history(), report_dir), report_dir


def _adopt_orphaned_session(report_dir: Path, notify) -> None:
    """A supervisor that died (kill -9) left a session without an end, maybe a spool: record both.

    Done under the project's lock so it cannot race a ``kaio resume``.
    """
    lock = ProjectLock(report_dir)
    lock.acquire()
    try:
        records, _ = read_journal(report_dir / JOURNAL_NAME)
        journal = Journal(report_dir / JOURNAL_NAME)
        try:
            merged = merge_spool(report_dir, journal.append)
            if merged:
                notify(f"merged {merged} spooled event(s) written while no supervisor was listening")
            open_session = _open_session(records)
            if open_session is not None and not _child_alive(records, open_session):
                journal.append(
                    {
                        "type": "session_end",
                        "session": open_session,
                        "t_wall": _last_wall_time(records),
                        "status": FAILED,
                        "exit_code": None,
                        "signal": None,
                        "error": "the supervisor stopped without recording an end (killed?); the run did not complete",
                    }
                )
        finally:
            journal.close()
    finally:
        lock.release()


def _open_session(records: list[dict]) -> int | None:
    started = [r["session"] for r in records if r.get("type") == "session_start"]
    ended = {r.get("session") for r in records if r.get("type") == "session_end"}
    return started[-1] if started and started[-1] not in ended else None


def _child_alive(records: list[dict], session: int) -> bool:
    import psutil

    pids = [r.get("pid") for r in records if r.get("type") == "child_started" and r.get("session") == session]
    return any(pid and psutil.pid_exists(pid) for pid in pids)


def _last_wall_time(records: list[dict]) -> float | None:
    times = [r.get("t_wall") for r in records if isinstance(r.get("t_wall"), (int, float))]
    return max(times) if times else None

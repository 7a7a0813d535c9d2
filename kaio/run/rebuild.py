"""``kaio report``: rebuild history.json and the reports from what is on disk.

Works offline and without torch, after a normal run, after a crash and while
a run is still going. With the project's lock free it also brings the index up
to date, so the next rebuild is quick; while a supervisor holds the lock it
works on a private copy of the index, and writes only the report files
(atomically, as the supervisor does).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from kaio.config import check_project_name
from kaio.errors import ProjectError
from kaio.record.paths import ProjectPaths
from kaio.report.summary import Summary
from kaio.run import recorder as loading
from kaio.run.finalize import FigureProcess, write_reports
from kaio.run.job import NodeRecords
from kaio.run.project import opened, saved_config, unknown_project
from kaio.run.recorder import Recorder
from kaio.run.state import RunState


def rebuild(
    project: str,
    output_dir: Path,
    notify: Callable[[str], None] = print,
    merge: Sequence[Path] = (),
    phase: Callable[[str], None] = lambda text: None,
) -> tuple[Summary, Path]:
    """Returns ``(summary, report_dir)``. A job of several machines merges every node's record: the folders
    under the project's ``nodes/``, and the ``merge`` folders (copied from machines without a shared
    filesystem). ``phase`` is told what is being done (a long rebuild shows its progress)."""
    from kaio.report.history import history_from_file
    from kaio.report.history import write_reports as write_history_reports

    paths = ProjectPaths(output_dir / check_project_name(project))
    if not paths.journal.is_file():
        if paths.history.is_file():  # a record copied without its journal: the history is all there is
            header, index = history_from_file(paths.history)
            try:
                return write_history_reports(header, index, paths.report_dir)[0], paths.report_dir
            finally:
                index.close()
        raise unknown_project(output_dir, project)
    figure = FigureProcess(paths.report_dir)
    figure.warm()  # matplotlib loads in the other process while the record is read
    nodes = _job_nodes(paths, merge, notify, phase)
    _keep_merged(paths, merge, notify)
    phase(f"reading {paths.journal} ({paths.journal.stat().st_size / 2**20:,.0f} MiB; what the index lacks)…")
    try:
        return _rebuild(paths, figure, notify, nodes, phase)
    finally:
        figure.close()


def _keep_merged(paths: ProjectPaths, merge: Sequence[Path], notify: Callable[[str], None]) -> None:
    """Node folders merged from elsewhere are remembered (``merged-nodes.json``): a later `kaio report` of the
    project merges them again without being told."""
    from kaio.fsutil import atomic_write_json
    from kaio.run.job import merged_folders

    known = merged_folders(paths)
    added = [
        str(p.resolve()) for p in merge if p.resolve().parent != paths.nodes.resolve() and p.resolve() not in known
    ]
    if added:
        atomic_write_json(paths.merged_nodes, [str(p) for p in known] + added)
        notify(f"remembered {', '.join(added)} in {paths.merged_nodes.name}: later reports of the project merge it")


def _job_nodes(
    paths: ProjectPaths, merge: Sequence[Path], notify: Callable[[str], None], phase: Callable[[str], None]
) -> NodeRecords | None:
    """The other nodes' records of a job of several machines (None: a job of one)."""
    from kaio.run.job import load_nodes, node_folders

    folders = node_folders(paths, merge)
    config = saved_config(paths)[1] if paths.config.is_file() else None
    launch = (config or {}).get("launch") or {}
    if int(launch.get("node_rank") or 0) != 0:
        if merge:
            raise ProjectError(
                f"--merge: {paths.report_dir.name} is node {launch['node_rank']}'s own record; merge into the head's"
            )
        return None  # a node's own record: the job's is the head's
    if not folders and int(launch.get("nnodes") or 1) < 2:
        return None  # a job of one machine
    phase(f"reading the other nodes' records ({len(folders)})…")
    nodes = load_nodes(folders, config, explicit=merge, notify=notify)
    for problem in nodes.problems:
        notify(f"warning: {problem}")
    return nodes


def _rebuild(
    paths: ProjectPaths,
    figure: FigureProcess,
    notify: Callable[[str], None],
    nodes: NodeRecords | None,
    phase: Callable[[str], None],
) -> tuple[Summary, Path]:
    if _looks_damaged(paths.history):
        notify(
            f"note: {paths.history}: truncated or corrupt JSON (the document does not end); rebuilding it from {paths.journal}"
        )
    try:
        return _rebuild_locked(paths, figure, notify, nodes, phase), paths.report_dir
    except sqlite3.DatabaseError as exc:  # a damaged index: it is a cache, rebuilt from the journal
        notify(loading.damaged_index_note(paths, exc))
        paths.index.unlink(missing_ok=True)
        return _rebuild_locked(paths, figure, notify, nodes, phase), paths.report_dir
    except ProjectError:
        if not _held(paths):
            raise
    # A supervisor holds the project: a private copy of the index, no fight over the lock.
    loaded = loading.load(paths, writable=False)
    try:
        phase(_WRITING)
        return _write(loaded.state, paths, figure, notify, nodes), paths.report_dir
    finally:
        loaded.state.index.close()


_WRITING = "writing history.json and report.md, drawing telemetry.png…"


def _write(
    state: RunState,
    paths: ProjectPaths,
    figure: FigureProcess,
    notify: Callable[[str], None],
    nodes: NodeRecords | None,
) -> Summary:
    """The three files, the figure drawn by a child process on the other core while the rest is written."""
    summary = write_reports(state, paths.report_dir, figure=figure, nodes=nodes)
    if figure.failure:
        notify(f"warning: telemetry.png was not rendered: {figure.failure}")
        summary.warnings.append(f"telemetry.png was not rendered: {figure.failure}")
    return summary


def _rebuild_locked(
    paths: ProjectPaths,
    figure: FigureProcess,
    notify: Callable[[str], None],
    nodes: NodeRecords | None,
    phase: Callable[[str], None],
) -> Summary:
    with opened(paths, notify) as (loaded, unsupervised):
        if unsupervised:  # its supervisor gone (killed), its training on: the steps since are in its spool
            notify(
                f"note: session {loaded.state.ledger.session} lost its supervisor and trains on unsupervised: this "
                f"report stops at step {loaded.state.last_step}; the rest is spooled, and `{paths.command('report')}` "
                "after the training ends merges it"
            )
        phase(_WRITING)
        summary = _write(loaded.state, paths, figure, notify, nodes)
        recorder = Recorder(paths, loaded.state)  # the index brought up to date: the next rebuild is quick
        recorder.save()
        recorder.close()
        return summary


def _held(paths: ProjectPaths) -> bool:
    from kaio.record.lock import is_locked

    return is_locked(paths.report_dir)


def _looks_damaged(history_path: Path) -> bool:
    """A cheap check (the file is about to be rewritten): a whole JSON document ends with '}'."""
    if not history_path.is_file():
        return False
    with open(history_path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 64))
        tail = f.read().rstrip()
    return not tail.endswith(b"}")

"""A job of several nodes as one record: the head's merged with every other node's.

Each node's kaio keeps its own record (the head in the project's folder, node k
in ``nodes/<k>-<host>/``, one writer per file: safe on NFS and Lustre). The job's
report is the head's record with the others' merged into it **by global step**,
never by wall clock: each node's steps are timed by its own first rank, and its
GPU samples were folded into them on its own clock, so no clock is compared
across machines. Each node's GPUs keep their own key, prefixed with the node
(``n1/nvml:0``); the step's flat figures (power, energy, utilisation,
temperature, VRAM) cover every node's GPUs. Without a shared filesystem,
``kaio report PROJECT --merge DIR...`` reads the node folders copied from the
other machines: the same merge, the same report.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from kaio.errors import ProjectError
from kaio.nodes import config_mismatch, node_folder_name, shape_mismatch
from kaio.record.index import RunIndex
from kaio.record.lock import ProjectLock
from kaio.record.paths import NODES_DIR, ProjectPaths, is_node_folder, node_rank_of
from kaio.record.types import (
    ClockOffset,
    DeviceSummary,
    HistoryHeader,
    NodeSummary,
    Status,
    StepEntry,
    job_gpu_key,
)
from kaio.run import recorder as loading
from kaio.run.assembly import iso
from kaio.run.diagnose import root_cause
from kaio.run.state import RunState

NODE_WAIT_S = 60.0  # at the end of a run, how long the head waits at most for the other nodes' records to close...
GIVE_UP_S = 15.0  # ...and for one whose journal has stopped growing
STREAM_GONE_S = 5.0  # ...or whose stream ended without its end this long ago (a node reconnects within 1 s)


@dataclass
class NodeRecord:
    """One other node's record, loaded read-only."""

    node_rank: int
    folder: Path
    header: HistoryHeader
    entries: dict[int, StepEntry]  # its steps, decoded once, by global step
    clock: ClockOffset | None = None  # measured by the head over the node's stream (kaio.run.stream)

    def gpu_key(self, key: str) -> str:
        return job_gpu_key(self.node_rank, key)


def node_folders(paths: ProjectPaths, extra: Iterable[Path] = ()) -> list[Path]:
    """The node folders under the project's ``nodes/``, and the ones named (``--merge``)."""
    found = []
    if paths.nodes.is_dir():
        found = sorted(p for p in paths.nodes.iterdir() if is_node_folder(p) and ProjectPaths(p).journal.is_file())
    named = {e.resolve() for e in extra}
    # A remembered folder that is gone stays in the list: loading it says so (else its node is "not found" only).
    found += [p for p in merged_folders(paths) if p.resolve() not in named]
    for folder in extra:
        if not folder.is_dir():
            raise ProjectError(
                f"--merge {folder}: no such folder (give the node folders copied from the other machines)"
            )
        if not ProjectPaths(folder).journal.is_file():
            raise ProjectError(f"--merge {folder}: not a node's record (no journal.jsonl in it)")
        found.append(folder)
    return found


def merged_folders(paths: ProjectPaths) -> list[Path]:
    """The node folders an earlier `kaio report --merge` was given (absolute paths)."""
    try:
        listed = json.loads(paths.merged_nodes.read_text())
    except (OSError, ValueError):
        return []
    return [Path(p) for p in listed if isinstance(p, str)]


def load_nodes(
    folders: Iterable[Path],
    head_config: dict | None,
    explicit: Iterable[Path] = (),
    notify: Callable[[str], None] = lambda _: None,
) -> NodeRecords:
    """Each node's record as it is now (its own supervisor may still be writing it: a private copy is read).
    A folder that is not a node of this job (another project, another job's shape), or that cannot be read, is
    left out with a warning; one named on the command line (``explicit``) is refused instead."""
    named = {Path(p) for p in explicit}
    records: dict[int, NodeRecord] = {}
    problems: list[str] = []
    refused: dict[int, str] = {}  # node rank -> the folder of it that was not merged
    for folder in folders:
        if not ProjectPaths(folder).journal.is_file():
            problems.append(f"node folder {folder}: merged by an earlier `kaio report --merge`, but it is gone")
            refused.setdefault(_rank_named(folder), str(folder))
            continue
        try:
            record = _load_node(folder, head_config, notify)
        except (ProjectError, OSError, ValueError, sqlite3.DatabaseError, msgspec.MsgspecError) as exc:
            if folder in named:
                raise ProjectError(f"--merge {folder}: {exc}") from None
            problems.append(f"node folder {folder.name}: not merged ({exc})")
            refused.setdefault(_rank_named(folder), folder.name)
            continue
        earlier = records.get(record.node_rank)
        if earlier is not None:  # the same node twice: its record resumed on another machine, or --merge
            earlier, record = sorted((earlier, record), key=lambda r: (r.folder in named, _how_far(r)))
            if earlier.folder.name != record.folder.name:  # not one folder found twice (nodes/ and --merge)
                problems.append(_not_merged(earlier, record))
            else:
                if earlier.folder.resolve() != record.folder.resolve():
                    problems.append(
                        f"node {record.node_rank}: {record.folder} is merged in place of {earlier.folder} (the same "
                        "node's record; the one given is taken)"
                    )
                if record.clock is None:  # the streamed copy's clock probe: the copy merged by hand has none
                    record.clock = earlier.clock
        records[record.node_rank] = record
    problems += _missing_nodes(head_config, set(records), refused)
    return NodeRecords([records[rank] for rank in sorted(records)], problems)


def _rank_named(folder: Path) -> int:
    """The node rank a folder's name gives (``<rank>-<host>``), or -1 for a name of another form."""
    try:
        return node_rank_of(folder)
    except ValueError:
        return -1


def _missing_nodes(head_config: dict | None, found: set[int], refused: dict[int, str]) -> list[str]:
    """The job's nodes with no record here: said, with the way to add them, not left out silently."""
    config = head_config or {}
    nnodes = int((config.get("launch") or {}).get("nnodes") or 1)
    project = config.get("project_name") or "PROJECT"
    return [
        f"node {rank} of {nnodes}: not in the job's record: its folder {refused[rank]} was not merged (the warning "
        "before this one says why)"
        if rank in refused
        else f"node {rank} of {nnodes}: no record of it here (it never streamed to the head, and no folder of it is "
        f"under nodes/): copy its folder (nodes/{node_folder_name(rank, '<host>')}/ under the project on its machine) "
        f"and run `kaio report {project} --merge FOLDER`"
        for rank in range(1, nnodes)
        if rank not in found
    ]


def _not_merged(earlier: NodeRecord, latest: NodeRecord) -> str:
    """Why one of two records of a node is left out: an earlier one (the node resumed on another machine), or,
    with as many sessions each, two machines that both started as this node (one with the wrong --node-rank)."""
    rank = latest.node_rank
    if len(earlier.header.sessions) != len(latest.header.sessions):
        return f"node folder {earlier.folder.name}: not merged (an earlier record of node {rank}; {latest.folder.name} is its latest)"
    return (
        f"two machines started as node {rank} ({latest.folder.name} and {earlier.folder.name}; one had the wrong "
        f"--node-rank?): {latest.folder.name}, which trained, is merged; {earlier.folder.name} is not"
    )


def _how_far(record: NodeRecord) -> tuple[int, int, str]:
    """How far a node's record goes: its sessions (a record resumed on another machine continues the old one: it
    has one session more), then its steps (of two machines started as one node, the one that trained), then when
    its last session began."""
    sessions = record.header.sessions
    return len(sessions), max(record.entries, default=0), (sessions[-1].started_at or "") if sessions else ""


def _load_node(folder: Path, head_config: dict | None, notify: Callable[[str], None]) -> NodeRecord:
    paths = ProjectPaths(folder)
    if _orphaned(paths, head_config):
        try:
            return _recovered_node(paths, head_config, notify)
        except (ProjectError, OSError):  # its kaio holds it again, or the filesystem has no locks: read as it is
            pass
    with _loaded(paths, _copy_lock(paths)) as loaded:
        return _node_record(folder, loaded.state, head_config)


def _orphaned(node: ProjectPaths, head_config: dict | None) -> bool:
    """A node's own folder of this job (a shared filesystem) with events its ranks spooled that its kaio never
    merged (it was killed)."""
    if node.stream_copy.is_file() or not node.spool.is_dir():
        return False
    try:
        _check_same_job(json.loads(node.config.read_text()), head_config)
    except (OSError, ValueError, ProjectError):
        return False  # not of this job: refused as it is, never written to
    return True


def _recovered_node(node: ProjectPaths, head_config: dict | None, notify: Callable[[str], None]) -> NodeRecord:
    """Its record brought up to date under its lock, as `kaio report` on it would: the spool merged; and, on the
    machine it ran on, its session closed once its processes are gone. Elsewhere its processes cannot be looked up
    (they may still train): its session stays open."""
    from kaio.run.project import opened

    config = json.loads(node.config.read_text())
    rank = int((config.get("launch") or {}).get("node_rank") or 0)
    here = node_folder_name(rank) == node.report_dir.name
    said = node.report_dir.name
    with opened(node, lambda text: notify(f"node folder {said}: {text}"), pids_here=here, close=here) as (loaded, _):
        return _node_record(node.report_dir, loaded.state, head_config)


def index_copies(paths: ProjectPaths) -> None:
    """On the head, while the job runs: bring the index of each node's streamed copy up to date (what the node
    sent since the last time), so that the job's report at the end replays seconds of each node's journal,
    not all of it."""
    for folder in node_folders(paths):
        node = ProjectPaths(folder)
        lock = _copy_lock(node)
        if lock is not None:
            with contextlib.suppress(OSError, ValueError, sqlite3.Error), _loaded(node, lock):
                pass  # a cache: what is not indexed now is replayed at the end


@contextlib.contextmanager
def _loaded(node: ProjectPaths, lock: ProjectLock | None) -> Iterator[loading.Loaded]:
    """A node's record as it is now; with the lock of the head's copy (``_copy_lock``), its index is brought up
    to date in place (held and then released), else a private copy is read."""
    try:
        loaded = loading.load(node, writable=lock is not None)
        try:
            if lock is not None and loaded.replayed:
                with contextlib.suppress(OSError, sqlite3.Error):  # a cache: the next load replays what it lacks
                    loading.commit(loaded.state, node.journal, loaded.journal_offset)
            yield loaded
        finally:
            loaded.state.index.close()
    finally:
        if lock is not None:
            lock.release()


def _copy_lock(node: ProjectPaths) -> ProjectLock | None:
    """The lock of a node folder whose index this process may bring up to date: the head's copy of a streamed
    node (no kaio runs in it; the head only appends the journal), when no other process is indexing it. A
    node's own folder (a shared filesystem) is left to the node's kaio: None."""
    if not node.stream_copy.is_file():
        return None
    lock = ProjectLock(node.report_dir)
    try:
        lock.acquire()
    except ProjectError:
        return None
    return lock


def _node_record(folder: Path, state: RunState, head_config: dict | None) -> NodeRecord:
    header = state.header()
    config = header.config or {}
    _check_same_job(config, head_config)
    rank = int((config.get("launch") or {}).get("node_rank") or 0)
    with state.with_open_steps() as index:
        entries = {e.step: e for e in _entries(index)}
    return NodeRecord(rank, folder, header, entries, _clock(ProjectPaths(folder).clock))


def _check_same_job(config: dict, head_config: dict | None) -> None:
    """Raise ProjectError unless ``config`` is another node's of the head's job."""
    launch = config.get("launch") or {}
    if int(launch.get("node_rank") or 0) == 0:
        raise ProjectError("the record of a head (node rank 0), not of another node")
    if head_config is None:
        return
    if config.get("project_name") != head_config.get("project_name"):  # first: the other keys would differ too
        raise ProjectError(f"a node of project {config.get('project_name')!r}")
    differs = shape_mismatch(launch, head_config.get("launch") or {})
    if differs is not None:
        raise ProjectError(f"not a node of the job as the head last ran it: {differs}")


def _clock(path: Path) -> ClockOffset | None:
    try:
        return msgspec.json.decode(path.read_bytes(), type=ClockOffset)
    except (OSError, msgspec.MsgspecError):
        return None  # not streamed (a shared filesystem without the secret, a folder copied by hand)


@dataclass
class NodeRecords:
    """The other nodes' records, and why any folder was left out."""

    nodes: list[NodeRecord]
    problems: list[str]


def wait_for_nodes(
    paths: ProjectPaths,
    notify: Callable[[str], None],
    timeout_s: float = NODE_WAIT_S,
    stream_gone: Callable[[str], float | None] | None = None,
) -> list[str]:
    """At the end of the head's run: wait (bounded) for every node's record to say its session ended, reading
    what their journals add (``NodeWatch``); a node silent for ``GIVE_UP_S`` is not waited for (its kaio is
    gone), nor one whose stream ended without its end ``STREAM_GONE_S`` ago (``stream_gone``: the seconds
    since, per folder). Returns the folders whose record has not ended."""
    from kaio.run.node_watch import NodeWatch

    watch = NodeWatch(paths)
    start = time.monotonic()
    said = False
    while True:
        watch.poll(force=True)
        silent = watch.silent_s()
        running = sorted(name for name, ended in watch.ended().items() if ended is None)
        waiting = [name for name in running if silent[name] < GIVE_UP_S and not _gone(stream_gone, name)]
        if not waiting or time.monotonic() - start > timeout_s:
            if running:
                notify(
                    f"note: node(s) {', '.join(running)} did not record their end (lost, or still going); the "
                    f"report has what they wrote (`{paths.command('report')}` merges what they add later; a node's folder "
                    "copied from its machine: `--merge FOLDER`)"
                )
            return running
        if not said:
            notify(f"waiting for node(s) {', '.join(waiting)} to close their records (at most {timeout_s:.0f} s)")
            said = True
        time.sleep(0.5)


def _gone(stream_gone: Callable[[str], float | None] | None, folder: str) -> bool:
    seconds = stream_gone(folder) if stream_gone is not None else None
    return seconds is not None and seconds >= STREAM_GONE_S


def merge(header: HistoryHeader, index: RunIndex, nodes: NodeRecords) -> tuple[HistoryHeader, RunIndex]:
    """The job's record: the head's header and steps with every node's merged in (a new in-memory index)."""
    head = _NodeTally(0, header, None, len(header.run_gpu_keys()))  # the head's own, before the merge
    head_ended = header.status != Status.RUNNING
    header = msgspec.structs.replace(header)
    devices = list(header.devices)
    for node in nodes.nodes:
        devices += [
            DeviceSummary(key=node.gpu_key(d.key), info=d.info, energy_j=d.energy_j, energy_method=d.energy_method)
            for d in node.header.devices
        ]
    header.devices = devices
    warnings = list(header.warnings) + list(nodes.problems)
    warnings += [w for n in nodes.nodes for w in _unlike_the_head(n, header)]
    warnings += [f"node {n.node_rank}: {w}" for n in nodes.nodes for w in n.header.warnings]
    tallies = [head] + [
        _NodeTally(n.node_rank, n.header, n.folder, len(n.header.run_gpu_keys()), n.clock) for n in nodes.nodes
    ]
    by_node = [(n, dict(n.entries), tally) for n, tally in zip(nodes.nodes, tallies[1:])]
    missing = {n.node_rank: 0 for n in nodes.nodes}
    merged = RunIndex.in_memory()
    for entry in _entries(index):
        head.add(entry)
        util = _Util(entry.util, head.gpus)
        for node, entries, tally in by_node:
            other = entries.pop(entry.step, None)
            if other is None:
                missing[node.node_rank] += 1
                continue
            tally.add(other)
            _merge_step(entry, other, node.gpu_key)
            util.add(other.util, tally.gpus)
        entry.util = util.mean()
        merged.add_step(entry)
    for node, entries, _ in by_node:
        if missing[node.node_rank] or entries:
            warnings.append(
                f"node {node.node_rank}: {missing[node.node_rank]} of the head's steps not in its record, and "
                f"{len(entries)} of its steps not in the head's (not merged)"
            )
    for evaluation in index.evals():
        merged.add_eval(evaluation)
    header.warnings = warnings
    if header.run is not None:
        header.run = msgspec.structs.replace(header.run, nodes=[t.summary(head_ended) for t in tallies])
    return header, merged


def _unlike_the_head(node: NodeRecord, head: HistoryHeader) -> list[str]:
    """A node that ended FAILED where the head did not (its report would read COMPLETED), and one that trained
    with another config than the head's (each rank another learning rate: the model copies drift apart unseen)."""
    said = []
    last = node.header.sessions[-1] if node.header.sessions else None
    if node.header.status == Status.FAILED and head.status != Status.FAILED and last is not None:
        code = f" (exit code {last.exit_code})" if last.exit_code is not None else ""
        said.append(f"node {node.node_rank} FAILED{code}{f': {last.error}' if last.error else ''}")
    differs = config_mismatch(node.node_rank, head.config or {}, node.header.config or {})
    return said + ([differs] if differs else [])


class _Util:
    """The mean utilisation over every GPU that reported one in the step."""

    def __init__(self, util: float | None, gpus: int) -> None:
        self.total, self.gpus = 0.0, 0
        self.add(util, gpus)

    def add(self, util: float | None, gpus: int) -> None:
        if util is not None and gpus:
            self.total += util * gpus
            self.gpus += gpus

    def mean(self) -> float | None:
        return self.total / self.gpus if self.gpus else None


class _NodeTally:
    """One node's figures for the job's node table, from its own step entries."""

    def __init__(
        self, rank: int, header: HistoryHeader, folder: Path | None, gpus: int, clock: ClockOffset | None = None
    ) -> None:
        self.rank, self.header, self.folder, self.gpus, self.clock = rank, header, folder, gpus, clock
        self.power_weighted = self.power_time = 0.0
        self.vram_peak: int | None = None
        self.last: StepEntry | None = None

    def add(self, entry: StepEntry) -> None:
        if self.last is None or entry.step > self.last.step:
            self.last = entry
        if entry.power_avg is not None:
            seconds = entry.duration_s or entry.step_time_s or 1.0
            self.power_weighted += entry.power_avg * seconds
            self.power_time += seconds
        peaks = [v for v in entry.peak_vram_bytes.values() if v is not None]
        if peaks:
            self.vram_peak = max(self.vram_peak or 0, *peaks)

    def summary(self, head_ended: bool) -> NodeSummary:
        """``head_ended``: a node whose record is still RUNNING after the head's end never recorded its own:
        LOST (its kaio was killed, or its machine went away)."""
        header, rank = self.header, self.rank
        run = header.run
        environment = run.environment if run is not None else None
        in_run = [d for d in header.devices if d.info.in_run]
        energies = [d.energy_j for d in in_run]
        last = header.sessions[-1] if header.sessions else None
        lost = head_ended and rank and header.status == Status.RUNNING
        error, failed_at = (last.error, last.failed_at) if last else (None, None)
        if lost and last is not None and self.folder is not None and error is None:
            cause = root_cause(ProjectPaths(self.folder).errors, last.session)  # its kaio never said: its files
            error, failed_at = cause.text, iso(cause.t_wall)
        return NodeSummary(
            node_rank=rank,
            host=environment.hostname if environment else None,
            # Its name under nodes/, or the path of a folder merged from elsewhere (--merge).
            folder=(self.folder.name if self.folder.parent.name == NODES_DIR else str(self.folder))
            if self.folder is not None
            else None,
            status="LOST" if lost else header.status.value,
            exit_code=last.exit_code if last else None,
            gpus=[job_gpu_key(rank, d.key) for d in in_run],
            gpu_names=[d.info.name for d in in_run],
            energy_j=sum(e for e in energies if e is not None) if in_run and None not in energies else None,
            power_avg_w=self.power_weighted / self.power_time if self.power_time else None,
            vram_peak_bytes=self.vram_peak,
            last_step=self.last.step if self.last else None,
            last_step_at=self.last.timestamp if self.last else None,
            error=error,
            failed_at=failed_at,
            clock_offset_s=self.clock.offset_s if self.clock else None,
            clock_rtt_s=self.clock.rtt_s if self.clock else None,
        )


def _merge_step(entry: StepEntry, other: StepEntry, gpu_key: Callable[[str], str]) -> None:
    """``other`` (the same step on another node) into ``entry``: its ranks' peaks, its GPUs, the flat figures
    (power and energy add up; the power range is the sum of each node's, a bound rather than one moment's)."""
    entry.peak_vram_bytes.update(other.peak_vram_bytes)
    peaks = [v for v in entry.peak_vram_bytes.values() if v is not None]
    entry.vram_peak_bytes = max(peaks) if peaks else None
    for key, stats in other.gpus.items():
        entry.gpus[gpu_key(key)] = stats
    entry.power_avg = _sum(entry.power_avg, other.power_avg)
    entry.power_min = _sum(entry.power_min, other.power_min)
    entry.power_max = _sum(entry.power_max, other.power_max)
    entry.energy_j = _sum(entry.energy_j, other.energy_j)
    entry.temp = max((t for t in (entry.temp, other.temp) if t is not None), default=None)


def _sum(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return a if b is None else b
    return a + b


def _entries(index: RunIndex) -> Iterable[StepEntry]:
    decoder = msgspec.json.Decoder(StepEntry)
    for line in index.step_lines():
        yield decoder.decode(line)

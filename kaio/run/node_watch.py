"""The head's live view of the other nodes of its job, from their journals (a shared filesystem, or streamed).

Each node's kaio appends to its own ``nodes/<rank>-<host>/journal.jsonl``; the
head reads what was added since its last look, every couple of seconds. A
node is heard when its journal grows (its poller alone adds a tick twice a
second), on the head's own clock: no clock is compared across machines. A node
silent for 10 s is stale, for 60 s lost (or 5 and 30 of its poller's ticks, when
longer; said once, as a warning in the record); a node whose session ended says how. Without a shared filesystem the
journals read are the head's copies, streamed by the nodes (kaio.run.stream, with ``KAIO_JOB_SECRET``); without
either, the head sees no other node while the job runs (the report merges them later).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kaio.nodes import config_mismatch, shape_mismatch
from kaio.record.journal import read_records
from kaio.record.paths import ProjectPaths, is_node_folder, node_host_of, node_rank_of
from kaio.record.types import Devices, SessionEnd, SessionStart, Step, TickRecord
from kaio.run.snapshot import NodeRow

STALE_S = 10.0
LOST_S = 60.0
TICKS_STALE = 5  # with a slow poller (reporting.poll_hz), silence is counted in its ticks: 5 for stale...
TICKS_LOST = 30  # ...and 30 for lost, when that is longer than the seconds above
POLL_S = 2.0
MAX_READ_BYTES = 1 << 20  # a look reads at most this much of one journal (a node far ahead catches up over looks)
# The nodes of one session start within this of the head (a node's session start before it is an earlier session's:
# a resume's head, started first, read node 1's last config and warned that node 1 trained with another).
NODES_START_APART_S = 120.0


@dataclass
class _Node:
    rank: int
    folder: Path
    offset: int = 0
    heard: float = 0.0
    host: str | None = None
    session: int | None = None
    ended: str | None = None  # the status its session ended with
    step: int | None = None
    run_gpus: set[str] = field(default_factory=set)
    util: float | None = None
    power_w: float | None = None
    said_lost: bool = False
    unlike_the_head: str | None = None  # its session's launch or config is not the head's: said at the next look
    file_id: tuple[int, int] | None = None  # (device, inode) of the journal read
    tick_s: float = 0.5  # its poller's interval

    @property
    def stale_after(self) -> float:
        return max(STALE_S, TICKS_STALE * self.tick_s)

    @property
    def lost_after(self) -> float:
        return max(LOST_S, TICKS_LOST * self.tick_s)


class NodeWatch:
    """Follows every node folder of the project (``poll``), and says who is live, stale, lost or done."""

    def __init__(
        self,
        paths: ProjectPaths,
        now: Callable[[], float] = time.monotonic,
        head_config: dict | None = None,
    ) -> None:
        self.paths = paths
        self._now = now
        self._head_config = head_config  # the head's config: a node started for another job, or to train otherwise
        self._started = time.time()  # the head's session start: a node's earlier session is not compared with it
        self._nodes: dict[Path, _Node] = {}
        self._next_poll = 0.0

    def poll(self, *, force: bool = False) -> list[str]:
        """Read what the nodes added (at most every ``POLL_S``); returns the warnings of nodes newly lost, or
        started with another job's shape than the head's.
        A folder that cannot be read now (permissions, a network filesystem's hiccup) is skipped this time."""
        now = self._now()
        if not force and now < self._next_poll:
            return []
        self._next_poll = now + POLL_S
        said = []
        folders = self._folders()
        for superseded in [
            f for f in self._nodes if f not in folders and node_rank_of(f) in {node_rank_of(g) for g in folders}
        ]:
            del self._nodes[superseded]  # the same node's record continued in another folder
        for folder in folders:
            node = self._nodes.get(folder)
            if node is None:
                node = self._nodes[folder] = _Node(
                    rank=node_rank_of(folder), folder=folder, heard=now, host=node_host_of(folder)
                )
            try:
                self._read(node, now)
            except OSError:
                pass  # counted as silence: a node that stays unreadable becomes stale, then lost
            if node.unlike_the_head is not None:
                said.append(node.unlike_the_head)
                node.unlike_the_head = None
            if node.ended is None and now - node.heard > node.lost_after and not node.said_lost:
                node.said_lost = True
                at = f" (last at step {node.step})" if node.step is not None else ""
                said.append(
                    f"node {node.rank}{f' ({node.host})' if node.host else ''} lost: nothing from it for "
                    f"{now - node.heard:.0f} s{at}"
                )
        return said

    def ended(self) -> dict[str, str | None]:
        """Each node folder's ended status (None: its record has not said it ended)."""
        return {folder.name: node.ended for folder, node in self._nodes.items()}

    def silent_s(self) -> dict[str, float]:
        now = self._now()
        return {folder.name: now - node.heard for folder, node in self._nodes.items()}

    def rows(self) -> tuple[NodeRow, ...]:
        now = self._now()
        return tuple(
            NodeRow(
                node_rank=n.rank,
                host=n.host,
                state=self._state(n, now),
                silent_s=now - n.heard,
                step=n.step,
                gpus=len(n.run_gpus),
                util=n.util,
                power_w=n.power_w,
            )
            for n in sorted(self._nodes.values(), key=lambda n: n.rank)
        )

    @staticmethod
    def _state(node: _Node, now: float) -> str:
        if node.ended is not None:
            return node.ended.lower()
        silent = now - node.heard
        return "lost" if silent > node.lost_after else "stale" if silent > node.stale_after else "live"

    def _folders(self) -> list[Path]:
        try:
            if not self.paths.nodes.is_dir():
                return []
            folders = [p for p in self.paths.nodes.iterdir() if is_node_folder(p)]
        except OSError:
            return list(self._nodes)  # the listing failed this time: the nodes known so far
        latest: dict[int, tuple[float, Path]] = {}  # per node rank: its record resumed on another machine
        for folder in folders:  # leaves the earlier one (a head's old copy) with the other's name
            try:
                written = ProjectPaths(folder).journal.stat().st_mtime
            except FileNotFoundError:
                continue
            except OSError:
                if folder not in self._nodes:
                    continue
                written = float("inf")  # known, unreadable now: kept (its silence counts)
            rank = node_rank_of(folder)
            if rank not in latest or written > latest[rank][0]:
                latest[rank] = (written, folder)
        return sorted(folder for _, folder in latest.values())

    def _read(self, node: _Node, now: float) -> None:
        journal = ProjectPaths(node.folder).journal
        stat = journal.stat()
        file_id = (stat.st_dev, stat.st_ino)
        if file_id != node.file_id or stat.st_size < node.offset:  # a new record in the folder (started over)
            node.file_id, node.offset, node.step, node.ended, node.session = file_id, 0, None, None, None
        start = node.offset
        for end, record in read_records(journal, start):
            node.offset = end
            if record is not None:
                self._apply(node, record)
            if end - start > MAX_READ_BYTES:
                break
        if node.offset > start:
            node.heard, node.said_lost = now, False

    def _apply(self, node: _Node, record: object) -> None:
        if isinstance(record, SessionStart):
            node.session, node.ended, node.step = record.session, None, None
            if record.poll_hz:
                node.tick_s = 1.0 / record.poll_hz
            head, config = self._head_config, record.config
            this_job = record.t_wall is None or record.t_wall >= self._started - NODES_START_APART_S
            if head is not None and config is not None and this_job:
                node.unlike_the_head = _unlike_the_head(node, head, config)
        elif isinstance(record, SessionEnd):
            node.ended = record.status.value
            node.unlike_the_head = None  # (not said yet: an ended session, read in one look, is an earlier one's)
        elif isinstance(record, Devices):
            node.run_gpus = {d.key for d in record.devices if d.in_run}
        elif isinstance(record, TickRecord):
            mine = [g for g in record.gpus if g.key in node.run_gpus]
            utils = [g.util_pct for g in mine if g.util_pct is not None]
            powers = [g.power_w for g in mine if g.power_w is not None]
            node.util = sum(utils) / len(utils) if utils else None
            node.power_w = sum(powers) if powers else None
        elif isinstance(record, Step):
            node.step = max(node.step or 0, record.step)


def _unlike_the_head(node: _Node, head: dict, config: dict) -> str | None:
    """A node started for another job shape than the head's (both would wait in torch's rendezvous), or to train
    with another config."""
    shape = shape_mismatch(config.get("launch") or {}, head.get("launch") or {})
    if shape is None:
        return config_mismatch(node.rank, head, config)
    return (
        f"node {node.rank}{f' ({node.host})' if node.host else ''} was started for another job shape: {shape}. The "
        "nodes wait for each other in torch's rendezvous (up to 15 minutes): stop every node and start them again "
        "with the same --nnodes, --main-addr and --main-port"
    )

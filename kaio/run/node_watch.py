"""The head's live view of the other nodes of its job, from their journals on a shared filesystem.

Each node's kaio appends to its own ``nodes/<rank>-<host>/journal.jsonl``; the
head reads what was added since its last look, every couple of seconds. A
node is heard when its journal grows (its poller alone adds a tick twice a
second), on the head's own clock: no clock is compared across machines. A node
silent for 10 s is stale, for 60 s lost (said once, as a warning in the
record); a node whose session ended says how. Without a shared filesystem the
head sees no other node while the job runs (the report merges them later).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kaio.record.journal import read_records
from kaio.record.paths import ProjectPaths, is_node_folder
from kaio.record.types import Devices, SessionEnd, SessionStart, Step, TickRecord
from kaio.run.snapshot import NodeRow

STALE_S = 10.0
LOST_S = 60.0
POLL_S = 2.0
MAX_READ_BYTES = 4 << 20  # a look reads at most this much of one journal (a node far ahead catches up over looks)


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


class NodeWatch:
    """Follows every node folder of the project (``poll``), and says who is live, stale, lost or done."""

    def __init__(self, paths: ProjectPaths, now: Callable[[], float] = time.monotonic) -> None:
        self.paths = paths
        self._now = now
        self._nodes: dict[Path, _Node] = {}
        self._next_poll = 0.0

    def poll(self, *, force: bool = False) -> list[str]:
        """Read what the nodes added (at most every ``POLL_S``); returns the warnings of nodes newly lost."""
        now = self._now()
        if not force and now < self._next_poll:
            return []
        self._next_poll = now + POLL_S
        lost = []
        for folder in self._folders():
            node = self._nodes.get(folder)
            if node is None:
                rank, host = folder.name.split("-", 1)
                node = self._nodes[folder] = _Node(rank=int(rank), folder=folder, heard=now, host=host)
            self._read(node, now)
            if node.ended is None and now - node.heard > LOST_S and not node.said_lost:
                node.said_lost = True
                at = f" (last at step {node.step})" if node.step is not None else ""
                lost.append(
                    f"node {node.rank}{f' ({node.host})' if node.host else ''} lost: nothing from it for "
                    f"{now - node.heard:.0f} s{at}"
                )
        return lost

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
        return "lost" if silent > LOST_S else "stale" if silent > STALE_S else "live"

    def _folders(self) -> list[Path]:
        nodes = self.paths.nodes
        if not nodes.is_dir():
            return []
        return sorted(p for p in nodes.iterdir() if is_node_folder(p) and ProjectPaths(p).journal.is_file())

    def _read(self, node: _Node, now: float) -> None:
        journal = ProjectPaths(node.folder).journal
        try:
            size = journal.stat().st_size
        except OSError:
            return
        if size < node.offset:  # a record started over in the same folder
            node.offset, node.step, node.ended, node.session = 0, None, None, None
        start = node.offset
        try:
            for end, record in read_records(journal, start):
                node.offset = end
                if record is not None:
                    self._apply(node, record)
                if end - start > MAX_READ_BYTES:
                    break
        except OSError:
            return
        if node.offset > start:
            node.heard, node.said_lost = now, False

    @staticmethod
    def _apply(node: _Node, record: object) -> None:
        if isinstance(record, SessionStart):
            node.session, node.ended = record.session, None
        elif isinstance(record, SessionEnd):
            node.ended = record.status.value
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

"""What one node's kaio follows of a job of several machines while it runs, for its dashboard and record.

The head (node rank 0) reads the other nodes' records (``NodeWatch``: their journals on a shared filesystem or
streamed to it) and says when one goes silent; every node says what its record stream reports (a node that cannot
reach the head), and where the nodes meet when no rank has started after ``RENDEZVOUS_PATIENCE_S``. What goes
wrong while following the other nodes costs the view of them, never this node's training.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

from kaio.config import LaunchConfig
from kaio.record.paths import ProjectPaths
from kaio.run.ledger import RunLedger
from kaio.run.node_watch import NodeWatch
from kaio.run.snapshot import Snapshot

RENDEZVOUS_PATIENCE_S = 120.0  # a job of several machines without a started rank by then: where the nodes meet


class NodeStream(Protocol):
    def pop_warnings(self) -> list[str]: ...


def rendezvous_warning(launch: LaunchConfig, ledger: RunLedger, now: float) -> str | None:
    """A job of several machines whose session has no started rank after ``RENDEZVOUS_PATIENCE_S``: torch's
    rendezvous waits for every node, in silence, for 15 minutes; where they must meet."""
    progress, record = ledger.progress.get(ledger.session), ledger.session_record(ledger.session)
    started = record is None or record.start_step is not None  # this session's first rank said it began
    if launch.nnodes < 2 or started or progress is None or progress.t_wall is None:
        return None
    waited = now - progress.t_wall
    if waited < RENDEZVOUS_PATIENCE_S:
        return None
    return (
        f"no rank has started after {waited:.0f} s: the job's {launch.nnodes} nodes meet at "
        f"{launch.main_addr}:{launch.main_port}; every node's kaio must be running with that --main-addr and "
        "--main-port (torch waits up to 15 minutes for a missing one)"
    )


class JobFollow:
    def __init__(
        self,
        launch: LaunchConfig,
        head_config: dict,
        paths: ProjectPaths,
        stream: NodeStream | None,
        note: Callable[[str], None],
        note_once: Callable[[str], None],
    ) -> None:
        self.launch = launch
        head = head_config if launch.nnodes > 1 and launch.node_rank == 0 else None
        self._nodes = NodeWatch(paths, head_config=head) if head is not None else None
        self._stream = stream  # the nodes' records streamed to the head (kaio.run.stream): its warnings are said
        self._note = note
        self._note_once = note_once  # a failure that would repeat at every look

    def poll(self) -> None:
        """Called at every turn of the supervisor's loop (``NodeWatch`` reads the journals every couple of seconds)."""
        if self._nodes is not None:
            try:
                silent = self._nodes.poll()  # a node gone stale or lost
            except Exception as exc:
                silent = []
                self._note_once(f"the other nodes' records could not be followed: {type(exc).__name__}: {exc}")
            for warning in silent:
                self._note(warning)
        if self._stream is not None:
            for warning in self._stream.pop_warnings():
                self._note(warning)

    def shown(self, snapshot: Snapshot) -> Snapshot:
        """The dashboard's snapshot with where the nodes meet and, on the head, a row per node (from memory)."""
        if self.launch.nnodes > 1:
            where = f"{self.launch.nnodes} nodes at {self.launch.main_addr}:{self.launch.main_port}"
            snapshot = dataclasses.replace(snapshot, rendezvous=where)
        if self._nodes is not None:
            snapshot = dataclasses.replace(snapshot, nodes=self._nodes.rows())
        return snapshot

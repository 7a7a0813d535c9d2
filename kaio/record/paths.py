"""Every file of a project, named in one place."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

NODES_DIR = "nodes"
DEFAULT_OUTPUT_DIR = Path("docs/reports")  # reporting.output_dir's default, and the commands' --output-dir
_NODE_FOLDER = re.compile(r"^\d+-")  # <node rank>-<host>


def is_node_folder(folder: Path) -> bool:
    """``<project>/nodes/<node rank>-<host>/``: another machine's record of a job (not one moved aside)."""
    return folder.parent.name == NODES_DIR and bool(_NODE_FOLDER.match(folder.name)) and ".replaced-" not in folder.name


def node_rank_of(folder: Path) -> int:
    """The node rank a node folder's name gives (``<rank>-<host>``)."""
    return int(folder.name.split("-", 1)[0])


def node_host_of(folder: Path) -> str:
    """The host a node folder's name gives (``<rank>-<host>``: its short name, as written)."""
    return folder.name.split("-", 1)[1]


def start_over_command(config_path: Path | None) -> str:
    """``kaio run CONFIG --overwrite``, with the config's path when kaio was given one (a hint to paste)."""
    return f"kaio run {shlex.quote(str(config_path)) if config_path is not None else 'CONFIG'} --overwrite"


@dataclass(frozen=True)
class ProjectPaths:
    """The report folder of one project: ``<reporting.output_dir>/<project_name>/``."""

    report_dir: Path

    @property
    def project(self) -> str:
        """The project's name; a node's folder (``<project>/nodes/<rank>-<host>/``) belongs to its project."""
        if is_node_folder(self.report_dir):
            return self.report_dir.parent.parent.name
        return self.report_dir.name

    @property
    def output_dir(self) -> Path:
        """The reports directory the project is in (``reporting.output_dir``, the commands' ``--output-dir``)."""
        return self.report_dir.parents[2] if is_node_folder(self.report_dir) else self.report_dir.parent

    def command(self, verb: str) -> str:
        """``kaio VERB PROJECT`` as it reaches this project: with ``--output-dir`` unless it is the default."""
        where = "" if self.output_dir == DEFAULT_OUTPUT_DIR else f" --output-dir {shlex.quote(str(self.output_dir))}"
        return f"kaio {verb} {self.project}{where}"

    @property
    def nodes(self) -> Path:
        """The other nodes' records of a job of several machines, one folder each: ``<rank>-<host>/``."""
        return self.report_dir / NODES_DIR

    # The source of truth, and what is derived from it.
    @property
    def journal(self) -> Path:
        return self.report_dir / "journal.jsonl"

    @property
    def index(self) -> Path:
        return self.report_dir / "index.sqlite"

    @property
    def history(self) -> Path:
        return self.report_dir / "history.json"

    @property
    def report(self) -> Path:
        return self.report_dir / "report.md"

    @property
    def figure(self) -> Path:
        return self.report_dir / "telemetry.png"

    @property
    def report_files(self) -> tuple[Path, Path, Path]:
        """What the run leaves for people (and what Comet and the Hub get)."""
        return self.report, self.figure, self.history

    # What a session writes beside the record.
    @property
    def config(self) -> Path:
        return self.report_dir / "config.json"

    @property
    def child_log(self) -> Path:
        return self.report_dir / "child.log"

    @property
    def comet_key(self) -> Path:
        return self.report_dir / "comet.json"

    @property
    def comet_archive(self) -> Path:
        return self.report_dir / "comet"

    @property
    def lock(self) -> Path:
        return self.report_dir / ".lock"

    @property
    def spool(self) -> Path:
        return self.report_dir / "spool"

    @property
    def errors(self) -> Path:
        return self.report_dir / "errors"

    @property
    def stacks(self) -> Path:
        """Where each rank's Python stack is written when kaio asks (``kaio.child.stacks``)."""
        return self.report_dir / "errors" / "stacks"

    @property
    def stalls(self) -> Path:
        """One folder per stall with every rank's stack; NCCL's Flight Recorder dumps."""
        return self.report_dir / "stalls"

    # A job of several machines, streamed to the head (kaio.run.stream).
    @property
    def stream_token(self) -> Path:
        """A node's random token in its own folder: the head finding it under its ``nodes/`` knows the
        folder is shared and needs no copy."""
        return self.report_dir / "stream-token"

    @property
    def merged_nodes(self) -> Path:
        """The node folders `kaio report --merge` was given (outside ``nodes/``), merged again by later reports."""
        return self.report_dir / "merged-nodes.json"

    @property
    def stream_mark(self) -> Path:
        """On the head: the mark it writes in each node folder whose journal it copies (stream_copy), kept for
        the project so that a resumed head knows its own copies."""
        return self.report_dir / "stream-mark"

    @property
    def stream_copy(self) -> Path:
        """In a node folder on the head: the head keeps a copy of the node's journal here (it writes it)."""
        return self.report_dir / "stream-copy"

    @property
    def clock(self) -> Path:
        """The head's estimate of a node's clock (written by the head into the node's folder)."""
        return self.report_dir / "clock.json"

    # Caches of kaio before the index (history schema 1): ignored, removed when the index is built.
    @property
    def legacy_caches(self) -> tuple[Path, Path]:
        return self.report_dir / "steps.jsonl", self.report_dir / "state.json"

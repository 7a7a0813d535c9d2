"""The immutable view of a run that the dashboard and the plain console render.

The supervisor builds one from its ``RunState`` (at most a few times a
second); renderers never see the live state. Every sequence here is bounded
(recent windows), so rendering cost does not grow with the run.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# CSI / OSC / two-character escape sequences: colours and cursor moves, no text of their own.
ANSI_RE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI ... final byte
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL or ST
    r"|\x1b[@-Z\\-_]"  # other 2-byte escapes
)


def as_shown(line: str) -> str:
    """The text a terminal shows of a line of the child's output: progress bars (tqdm) redraw with
    carriage returns, so only what follows the last one stays, and escape sequences are no text."""
    line = line.rstrip("\r\n")
    return ANSI_RE.sub("", line[line.rfind("\r") + 1 :])


# tqdm's bar: "{desc}: {percent}%|{bar}| {n}/{total} [{elapsed}<{remaining}, {rate}{postfix}]", nothing after
# (a warning printed on the bar's line is a line of its own to keep).
_PROGRESS_BAR = re.compile(
    r"^(?P<desc>.*?)\s*\d{1,3}%\|[^|]*\|\s*[\d.]+[kMGT]?/(?P<total>[\d.]+[kMGT]?|\?)(?:\s*\[[^\]]*\])?\s*$"
)
_BAR_LOOKBACK = 8  # lines back to look for the same bar's earlier state
# The newest recorded warnings a snapshot carries: the panel shows 5, and the plain view prints each one once,
# so this bounds what may arrive between two snapshots (a few a second) without one going unprinted.
SNAPSHOT_WARNINGS = 50


def progress_bar(shown: str) -> tuple[str, str] | None:
    """``(description, total)`` of a tqdm progress bar's line, else None."""
    match = _PROGRESS_BAR.match(shown.strip())
    return (match["desc"].strip(), match["total"]) if match else None


def add_output_line(tail: deque[str], line: str) -> None:
    """Keep a line of the child's output as a terminal would show it: a progress bar redrawn (tqdm moves the
    cursor back up to redraw nested bars, which a log cannot) replaces its own earlier state instead of piling
    up, a bar cleared away (``leave=False``: blanks written over it) leaves nothing, and blank lines (the bars'
    positioning) take no room in the panel (child.log keeps every byte)."""
    *overwritten, last = line.rstrip("\r\n").split("\r")
    for segment in [*overwritten, last]:
        if "\x1b[" in segment and not ANSI_RE.sub("", segment).strip():  # blanks over a nested bar: cleared
            _remove_latest(tail, lambda kept: progress_bar(kept) is not None)
    shown = as_shown(line)
    if not shown.strip():
        return
    bar = progress_bar(shown)
    if bar is not None:
        _remove_latest(tail, lambda kept: progress_bar(kept) == bar)
    tail.append(line)


def _remove_latest(tail: deque[str], matches: Callable[[str], bool]) -> None:
    for i in range(len(tail) - 1, max(len(tail) - 1 - _BAR_LOOKBACK, -1), -1):
        if matches(as_shown(tail[i])):
            del tail[i]
            return


@dataclass(frozen=True, slots=True)
class GpuRow:
    key: str  # "nvml:0"
    name: str
    in_run: bool
    util_pct: float | None = None
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None
    power_w: float | None = None
    temp_c: float | None = None  # junction if known, else edge
    energy_j: float | None = None  # since the run started
    throttle: tuple[str, ...] | None = None  # active reasons, () when none; None: not read (unsupported, lost)
    rank: int | None = None  # the training rank placed on this GPU, if known (keys peak_vram_by_rank)


@dataclass(frozen=True, slots=True)
class HostRow:
    cpu_pct: float | None = None  # the whole host, 0..100
    ram_used_bytes: int | None = None
    ram_total_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class NodeRow:
    """Another node of the job, as the head sees it while it runs (kaio.run.node_watch)."""

    node_rank: int
    host: str | None
    state: str  # live | stale | lost | completed | failed | interrupted
    silent_s: float
    step: int | None
    gpus: int
    util: float | None
    power_w: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    project: str
    status: str  # STARTING (no step of this session yet) | RUNNING | STOPPING | COMPLETED | FAILED | INTERRUPTED
    session: int
    elapsed_s: float  # this session's wall time
    step: int  # latest optimizer step seen (global, across sessions)
    max_steps: int | None
    epoch: float | None
    loss: float | None  # last logged loss
    loss_smoothed: float | None  # EMA
    recent_losses: tuple[float, ...] = ()  # for the sparkline, oldest first (bounded)
    learning_rate: float | None = None
    grad_norm: float | None = None
    stopping_because: str | None = None  # STOPPING: what asked ("Ctrl-C", "SIGUSR1: the scheduler's time...")
    eval_loss: float | None = None  # the latest evaluation's
    evaluated_in_session: bool = False  # this session has evaluated (a resume's earlier evaluations are not its)
    eval_set: str | None = None  # its eval dataset, when there are several (eval_dataset={"a": ...})
    steps_per_s: float | None = None  # recent rate
    samples_per_s: float | None = None
    tokens_per_s_per_device: float | None = None  # the latest step's
    mfu: float | None = None  # the latest step's, 0..1
    eta_s: float | None = None
    peak_vram_by_rank: dict[int, int | None] = field(default_factory=dict)  # latest step's true peak
    gpus: tuple[GpuRow, ...] = ()
    host: HostRow | None = None
    nodes: tuple[NodeRow, ...] = ()  # the job's other machines (on its head)
    log_tail: tuple[str, ...] = ()  # last lines of the child's output (bounded)
    warnings: tuple[str, ...] = ()  # the latest recorded ones (at most SNAPSHOT_WARNINGS), then the live ones
    warnings_before: int = 0  # recorded warnings older than those in ``warnings`` (counted, not carried)
    live_warnings: tuple[str, ...] = ()  # those of ``warnings`` that say what is going on now (a stall's seconds)
    exit_code: int | None = None
    training_completed: bool = False  # this session's Trainer trained all its steps (a failure came after)
    ended_early_by: str | None = None  # what ended this session's training before max_steps (early stopping)
    rendezvous: str | None = None  # a job of several machines: where its nodes meet ("2 nodes at gpu01:29500")
    report_path: str | None = None  # report.md: where the record is (the last frame says so)

    @property
    def warning_count(self) -> int:
        """Every warning of the run so far, those not carried included."""
        return self.warnings_before + len(self.warnings)

"""Stalls: no step for longer than what the run is doing should take, and where every rank waits then.

``StallWatch`` keeps the budget of the phase the run is in, from the events as
they arrive (the supervisor's clock, so that a rank's clock does not matter):
start-up until a session's first step, a training step, an evaluation or a
checkpoint save after a step that announced one (``Step.evaluates`` /
``Step.saves``, or a ``Pause`` sent after the step), and the Trainer's end and
the script's own work after it (from the Trainer's closing log, ``TrainEnd``).
``capture_stacks`` then asks every rank of the session for
its Python stack (``kaio.child.stacks``), keeps them under
``<report dir>/stalls/<time>/`` and says in one line per rank where it waits.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kaio.record import rules
from kaio.record.types import Eval, Log, Pause, Record, RunStart, Save, Stall, StalledRank, Step, TrainEnd
from kaio.telemetry.protocol import STACK_SIGNAL, parse_stack_file_name

STARTUP_BUDGET_S = 1200.0  # launching, importing, loading a large model and its data
AFTER_TRAINING_BUDGET_S = 1200.0  # the script's own work after train(): a last evaluation, merging, saving
PAUSE_BUDGET_S = 600.0  # an evaluation or a checkpoint save, at least...
PAUSE_FACTOR = 3.0  # ...and 3x the longest one so far
ANSWER_WAIT_S = 3.0  # how long the ranks have to write their stacks
PAUSES = ("evaluation", "checkpoint save")  # what the Trainer does between two steps, in its order


@dataclass(frozen=True)
class StallCheck:
    phase: str
    idle_s: float
    threshold_s: float


class StallWatch:
    """One session's phase and the time of its latest sign of progress; one stall reported per silence."""

    def __init__(self, stall_seconds: float | None, now: float, lead_rank: int = 0) -> None:
        self.stall_seconds = stall_seconds
        self.lead_rank = lead_rank  # whose steps count: rank 0, or this node's first rank
        self.phase = "start-up"
        self.last_progress = now
        self.last_step = 0
        self.longest = {"evaluation": 0.0, "checkpoint save": 0.0}
        self._pending: list[str] = []  # what the latest step announced, in the Trainer's order
        self._trained = False  # the Trainer's training has ended (a later one's first step starts another)
        # Several eval datasets are evaluated one after another, each with its own on_evaluate: the evaluation
        # a step announced lasts until every one is (RunStart.eval_sets).
        self.eval_sets = 1
        self._evaluations_left = 0
        self.reported = False

    def seen(self, record: Record, now: float) -> None:
        if isinstance(record, Step):
            if record.rank != self.lead_rank:
                return
            self.last_step = max(self.last_step, record.step)
            self._pending = [p for p, on in zip(PAUSES, (record.evaluates, record.saves)) if on]
            self._evaluations_left = self.eval_sets
            self._trained = False
        elif isinstance(record, Pause):  # announced after the step (an epoch's end, a callback, the script)
            if record.rank != self.lead_rank:
                return
            if record.evaluates and "evaluation" not in self._pending:
                self._evaluations_left = self.eval_sets
            announced = {"evaluation": record.evaluates, "checkpoint save": record.saves}
            self._pending = [p for p in PAUSES if announced[p] or p in self._pending]
        elif isinstance(record, Log) and rules.closing_log(record.extra):
            self._pending, self._trained = [], True  # the Trainer's end: the best model loaded, checkpoints pruned
        elif isinstance(record, RunStart):
            if record.rank == self.lead_rank:
                self.eval_sets = max(1, record.eval_sets or 1)
            return
        elif isinstance(record, Eval):
            runtime = rules.evaluation_runtime(record.metrics)
            if runtime is not None:
                self.longest["evaluation"] = max(self.longest["evaluation"], runtime)
            self._evaluations_left -= 1
            if self._evaluations_left <= 0:  # every eval dataset evaluated: the evaluation is over
                self._pending = [p for p in self._pending if p != "evaluation"]
        elif isinstance(record, Save):
            if record.duration_s is not None:
                self.longest["checkpoint save"] = max(self.longest["checkpoint save"], record.duration_s)
            self._pending = []
        elif isinstance(record, TrainEnd):
            if record.rank != self.lead_rank:
                return
            self._pending, self._trained = [], True
        else:
            return
        # Before the first step (an eval_on_start, each of several eval datasets in turn): still starting up.
        idle = "after training" if self._trained else "training step" if self.last_step else "start-up"
        self.phase = self._pending[0] if self._pending else idle
        self.last_progress = now
        self.reported = False

    def threshold_s(self, median_step_s: float | None) -> float:
        step = self.stall_seconds if self.stall_seconds is not None else rules.stall_threshold_s(median_step_s)
        if self.phase == "training step":
            return step
        if self.phase == "start-up":
            return max(STARTUP_BUDGET_S, step)
        if self.phase == "after training":
            return max(AFTER_TRAINING_BUDGET_S, step)
        return max(PAUSE_BUDGET_S, PAUSE_FACTOR * self.longest[self.phase], step)

    def check(self, now: float, median_step_s: float | None) -> StallCheck | None:
        """The stall now under way, once per silence (``None`` while within budget, or once reported)."""
        idle = now - self.last_progress
        threshold = self.threshold_s(median_step_s)
        if self.reported or idle <= threshold:
            return None
        self.reported = True
        return StallCheck(self.phase, idle, threshold)

    def live_warning(self, now: float, median_step_s: float | None) -> str | None:
        idle = now - self.last_progress
        threshold = self.threshold_s(median_step_s)
        if idle <= threshold:
            return None
        return f"stall: no step for {idle:.0f} s ({self.phase}; the budget is {threshold:.0f} s)"


def capture_stacks(
    stacks_dir: Path, report_dir: Path, session: int, run_pids: set[int], check: StallCheck, step: int
) -> Stall:
    """Signals every rank of ``session`` still alive, waits for their stacks, keeps them, and says where each is."""
    targets = []
    for path in sorted(stacks_dir.glob("*.txt")):
        named = parse_stack_file_name(path.name)
        if named is None or named[0] != session or named[2] not in run_pids:
            continue
        _, rank, pid = named
        try:
            size = path.stat().st_size
            os.kill(pid, STACK_SIGNAL)
        except OSError:
            continue
        targets.append((rank, pid, path, size))
    answers = _wait_for_answers(targets)
    folder = report_dir / "stalls" / time.strftime("%Y%m%d-%H%M%S")
    ranks = []
    for rank, pid, _path, _size in targets:
        text = answers.get(pid, "")
        stack_file = None
        if text:
            folder.mkdir(parents=True, exist_ok=True)
            out = folder / f"rank{rank}-pid{pid}.txt"
            out.write_text(text)
            stack_file = str(out.relative_to(report_dir))
        ranks.append(StalledRank(rank=rank, pid=pid, where=where_it_waits(text), stack_file=stack_file))
    return Stall(
        session=session,
        step=step,
        phase=check.phase,
        idle_s=round(check.idle_s, 1),
        threshold_s=round(check.threshold_s, 1),
        ranks=ranks,
        t_wall=time.time(),
        t_mono=time.monotonic(),
    )


def _wait_for_answers(targets: list[tuple[int, int, Path, int]]) -> dict[int, str]:
    """What each rank appended to its file, once every one has written and stopped growing (or time is up)."""
    deadline = time.monotonic() + ANSWER_WAIT_S
    seen: dict[int, int] = {}
    while time.monotonic() < deadline:
        sizes = {pid: _size(path) for _rank, pid, path, _start in targets}
        all_answered = all(sizes[pid] > start for _rank, pid, _path, start in targets)
        if all_answered and sizes == seen:
            break
        seen = sizes
        time.sleep(0.2)
    answers = {}
    for _rank, pid, path, start in targets:
        try:
            with open(path, "rb") as f:
                f.seek(start)
                answers[pid] = f.read(1 << 20).decode("utf-8", errors="replace")
        except OSError:
            continue
    return answers


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ----------------------------------------------------------------------------- reading faulthandler's output

_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.+)$')
_LIBRARY_DIRS = ("site-packages", "dist-packages")
_STDLIB = re.compile(r"/lib/python\d+\.\d+/")  # another machine's standard library (a copied stack)


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str

    @property
    def package(self) -> str:
        """The library the frame is in ("torch", "transformers"), "python" for the standard library, "" for yours."""
        parts = Path(self.file).parts
        for marker in _LIBRARY_DIRS:
            if marker in parts:
                rest = parts[parts.index(marker) + 1 :]
                return rest[0] if len(rest) > 1 else "python"
        if self.file.startswith("<") or self.file.startswith(sys.base_prefix) or _STDLIB.search(self.file):
            return "python"
        return ""

    def at(self) -> str:
        return f"{Path(self.file).name}:{self.line}"


def main_thread_frames(text: str) -> list[Frame]:
    """The innermost-first frames of the thread that runs the training: the one not started by ``threading``."""
    threads: list[list[Frame]] = []
    for line in text.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            threads.append([])
        elif threads and (match := _FRAME.match(line)):
            threads[-1].append(Frame(match[1], int(match[2]), match[3]))
    for frames in threads:
        if frames and not (frames[-1].function.startswith("_bootstrap") and frames[-1].package == "python"):
            return frames
    return threads[0] if threads else []


def where_it_waits(text: str) -> str | None:
    """One line: the innermost frame, and the code that called into its library (with that code's line)."""
    frames = main_thread_frames(text)
    if not frames:
        return None
    inner = frames[0]
    if inner.package == "":
        return f"{inner.function} at {inner.at()}: {_source(inner)}".rstrip(": ")
    caller = next((f for f in frames[1:] if f.package != inner.package), None)
    said = f"{inner.function} ({inner.package} {inner.at()})"
    if caller is not None:
        said += f" ← {caller.function} at {caller.at()}"
        if caller.package == "":
            said += f": {_source(caller)}".rstrip(": ")
    return said


def _source(frame: Frame) -> str:
    import linecache

    return linecache.getline(frame.file, frame.line).strip()


def stall_lines(stall: Stall) -> list[str]:
    """What the dashboard and the report say of a stall: one line per rank."""
    head = f"stall after step {stall.step} ({stall.phase}, no step for {stall.idle_s:.0f} s)"
    if not stall.ranks:
        return [f"{head}: no rank's stack could be read"]
    return [
        f"{head}: rank {r.rank} in {r.where}" if r.where else f"{head}: rank {r.rank} did not answer"
        for r in stall.ranks
    ]

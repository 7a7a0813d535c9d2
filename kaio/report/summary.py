"""The run's summary (``kaio report --json``, report.md's figures): SQL over the index, no I/O besides.

Units live in the field names; ``None`` means "not measured", never zero.
Every figure is exact: medians are medians, means are sums over the steps.

Time weighting: a step's GPU aggregates (power, utilisation, temperature)
describe the samples that fell inside that step, so averages over the run
weight each step by its duration (``duration_s``: the gap since the previous
step's end in its session, which covers the whole window the samples came
from). A step without one takes the median duration; a history with no
timing at all weighs every step equally.
"""

from __future__ import annotations

import math
import sqlite3
import statistics
from typing import Any

import msgspec

from kaio.devices.base import device_order
from kaio.record import gpu_totals, rules
from kaio.record.gpu_totals import METRICS, GpuTotals
from kaio.record.index import RunIndex
from kaio.record.memory import estimate, unsized, workload_of
from kaio.record.types import (
    HALF_PRECISIONS,
    EvalEntry,
    HistoryHeader,
    NodeSummary,
    RunDescription,
    Session,
    Stall,
    StepEntry,
    Telemetry,
    Training,
)

ENERGY_METHOD_LABELS = {"counter": "hardware counter", "integrated": "integrated power"}
ENERGY_FROM_STEPS = "sum of per-step energy"
ENERGY_FROM_STEP_POWER = "integrated from per-step average power"


class EvalSetLoss(msgspec.Struct, kw_only=True):
    """One eval dataset's loss over the run (``name`` None: ``eval_loss``)."""

    name: str | None = None
    final: float | None = None
    best: float | None = None
    best_step: int | None = None


class TrainingLosses(msgspec.Struct, kw_only=True):
    """One of a script's trainings (``HistoryHeader.trainings``) over its own steps: each has its own objective
    (SFT, then DPO) or its own start (a search's trials), so its losses are not compared with the others'."""

    training: Training
    steps: int = 0
    last_step: int | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    loss_min: float | None = None
    eval_loss_best: float | None = None


class LoggedMetric(msgspec.Struct, kw_only=True):
    """A number the script logged at its steps besides the loss, learning rate and gradient norm (TRL's
    rewards/margins, an auxiliary loss), over the run."""

    name: str
    logged: int  # at how many steps
    first: float | None = None
    last: float | None = None
    last_step: int | None = None
    min: float | None = None
    min_step: int | None = None
    max: float | None = None
    max_step: int | None = None


class Summary(msgspec.Struct, kw_only=True):
    project: str
    status: str
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None
    sessions: int = 0
    training_time_s: float | None = None  # the sessions' wall time, all of it:
    startup_s: float | None = None  # launch to each session's first step (imports, model and data loading)
    steps_s: float | None = None  # in optimizer steps (data loading and logging between them included)
    eval_s: float | None = None  # evaluating
    save_s: float | None = None  # saving checkpoints
    closing_s: float | None = None  # after each session's last step (the final save, teardown)
    optimizer_steps: int = 0
    step_entries: int = 0
    epochs: float | None = None  # the Trainer's epoch at the last step (3.125: three passes and an eighth)
    max_steps: int | None = None
    training_ended: bool | None = None  # the last session's Trainer reached its end (None: unknown, or none ran)
    ended_early_by: str | None = None  # what ended the last session's training before max_steps, where known
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_pct: float | None = None
    loss_initial: float | None = None
    loss_initial_step: int | None = None  # ...logged at this step
    loss_final: float | None = None  # the last finite loss logged...
    loss_final_step: int | None = None  # ...at this step
    loss_nonfinite_after_final: int = 0  # losses logged after it that were NaN/inf: the run ended non-finite
    nonfinite_since: int | None = None  # ...from this step on (RunIndex.nonfinite_since): the weights may be NaN
    loss_final_smoothed: float | None = None
    loss_min: float | None = None
    loss_min_step: int | None = None
    grad_norm_median: float | None = None  # the logged gradient norms (before clipping)
    grad_norm_max: float | None = None
    grad_norm_max_step: int | None = None
    loss_logged_steps: int = 0
    loss_smoothed_over: int = 0  # the finite losses of the smoothed loss's curve (the latest training's)
    grad_norm_nonfinite_count: int = 0  # logged steps whose gradient norm was NaN/inf
    grad_norm_nonfinite_first_step: int | None = None
    loss_nan_count: int = 0
    loss_nan_first_step: int | None = None
    loss_inf_count: int = 0
    loss_inf_first_step: int | None = None
    # No loss logged during the training: logging_steps when it is more than the steps trained, and the Trainer's
    # own mean training loss (train_loss, in its closing log).
    loss_logging_steps_unreached: int | None = None
    trainer_mean_loss: float | None = None
    eval_count: int = 0  # evaluations and predictions (several eval datasets at a step: one), as report.md lists them
    eval_loss_final: float | None = None
    eval_loss_best: float | None = None
    eval_loss_best_step: int | None = None
    # Several eval datasets: each one's final and best loss, in the order they were first evaluated (the
    # eval_loss_* fields above are the first one's).
    eval_sets: list[EvalSetLoss] = []
    logged_metrics: list[LoggedMetric] = []  # by name, at most LOGGED_METRICS_LISTED...
    logged_metrics_not_listed: int = 0  # ...and how many more there are
    logged_at_step_0: bool = False  # some were logged before the first step ended (history.json's metrics_at_step_0)
    vram_true_peak_bytes: int | None = None
    vram_true_peak_by_rank_bytes: dict[str, int] = {}
    vram_true_peak_step_avg_bytes: int | None = None
    vram_device_used_peak_bytes: int | None = None
    vram_device_used_peak_by_gpu_bytes: dict[str, int] = {}
    vram_gap_bytes: int | None = None  # device minus allocator peak: CUDA context, cache, other processes
    # kaio.record.memory's estimate of what one GPU allocates at the step's peak, from what the run described
    vram_estimate_bytes: int | None = None
    vram_estimate_terms: dict[str, int] = {}
    vram_estimate_tokens: int | None = None  # in one micro-batch, the largest of the run's steps
    vram_estimate_missing: str | None = None  # why there is none: what the model's description lacks
    gpu_count: int = 0
    power_avg_w: float | None = None  # per GPU, time-weighted
    power_peak_w: float | None = None
    power_total_avg_w: float | None = None  # all the run's GPUs together
    power_total_gpus: int = 0  # of how many GPUs (those that read power)
    gpu_util_avg_pct: float | None = None
    temp_avg_c: float | None = None
    temp_peak_c: float | None = None
    samples: int | None = None
    samples_per_s: float | None = None  # each session's steps after its first (in its start-up), over their time
    tokens: int | None = None
    tokens_counted_by: str | None = None  # RunDescription's
    tokens_without_padding: bool = False  # the Trainer counted them (include_num_input_tokens_seen="non_padding")
    world_size: int | None = None  # the training processes, as the Trainer reported them
    tokens_per_s: float | None = None
    tokens_per_s_per_device: float | None = None  # over the steps' own time (kaio.record.flops)
    recomputed_steps: int = 0  # trained again after a resume or restart from an earlier checkpoint
    recomputed_s: float = 0.0
    later_trainings_startup_s: float = 0.0  # in startup_s: the start of the script's later trainings
    stall_s: float | None = None  # training steps that stalled
    productive_s: float | None = None  # optimizer steps, stalls taken out
    goodput_pct: float | None = None  # productive_s over the wall time of every session
    mfu: float | None = None  # 0..1, weighted by step time; None: no peak FLOPs known (a CPU)
    host_cpu_avg_pct: float | None = None
    host_ram_peak_bytes: int | None = None
    energy_kwh: float | None = None
    energy_method: str | None = None
    energy_unmeasured: list[str] = []  # run GPUs that gave neither power nor energy: not in the total
    energy_per_1k_samples_wh: float | None = None
    cpu_only: bool = False  # no GPU found, and no GPU number anywhere
    compiled: bool = False  # torch_compile: the first step, in the start-up, compiles the model
    nodes: list[NodeSummary] = []  # a job of several machines: each (the head first)
    trainings: list[TrainingLosses] = []  # a script that trained more than once: each training apart
    warnings: list[str] = []


class _Query:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def row(self, sql: str, *args: Any) -> tuple:
        return self.conn.execute(sql, args).fetchone() or ()

    def value(self, sql: str, *args: Any) -> Any:
        row = self.row(sql, *args)
        return row[0] if row else None

    def median(self, column: str, where: str = "1", table: str = "steps") -> float | None:
        sql_where = f"{column} IS NOT NULL AND {where}"
        count = self.value(f"SELECT COUNT(*) FROM {table} WHERE {sql_where}")
        if not count:
            return None
        middle = self.conn.execute(
            f"SELECT {column} FROM {table} WHERE {sql_where} ORDER BY {column} LIMIT ? OFFSET ?",
            (2 - count % 2, (count - 1) // 2),
        ).fetchall()
        return sum(v for (v,) in middle) / len(middle)


FIRST_STEPS = "step IN (SELECT MIN(step) FROM steps GROUP BY session)"  # in their sessions' start-ups
LOGGED_METRICS_LISTED = 40  # report.md's table of the other logged numbers: a script logging hundreds lists these

# Where the wall time went, in the order the report and the figure show it: (key, the report's label, the figure's).
TIME_BUCKETS = (
    ("startup_s", "Start-up (launch to the first step)", "start-up"),
    ("productive_s", "**Optimizer steps (goodput)**", "optimizer steps"),
    ("stall_s", "Stalled steps", "stalls"),
    ("recomputed_s", "Steps trained again after a resume", "trained again"),
    ("eval_s", "Evaluation", "evaluation"),
    ("save_s", "Checkpoint saves", "saves"),
    ("closing_s", "Closing (final save, teardown)", "closing"),
)
OTHER_TIME = ("Other (between sessions, restarts)", "other")


def time_buckets(s: Summary) -> list[tuple[str, str, float]]:
    """(report label, figure label, seconds) of each part of the wall time that took any; the rest is "other"
    when over 1% of it."""
    total = s.training_time_s or 0.0
    parts = [(report, figure, getattr(s, key) or 0.0) for key, report, figure in TIME_BUCKETS]
    if s.recomputed_steps:
        parts[3] = (f"{parts[3][0]} ({count_of(s.recomputed_steps, 'step')})", *parts[3][1:])
    if s.compiled:
        parts[0] = ("Start-up (launch to the first step, which torch.compile compiles)", *parts[0][1:])
    if s.later_trainings_startup_s:
        parts[0] = (f"{parts[0][0]}, and a later training's start", *parts[0][1:])
    elif not s.optimizer_steps:  # no first step: launching, loading, and whatever else the script did
        parts[0] = ("Start-up and the script's own work (no training step)", *parts[0][1:])
    rest = total - sum(seconds for *_, seconds in parts)
    if rest > 0.01 * total:
        parts.append((*OTHER_TIME, rest))
    return [part for part in parts if part[2] > 0]


def time_spent(header: HistoryHeader, index: RunIndex) -> Summary:
    """Only the wall time's parts (for the figure, drawn apart from the report)."""
    q = _Query(index.conn)
    s = Summary(project=header.project, status=header.status.value)
    s.training_time_s = _training_time_s(q, header.sessions)
    _time_spent(q, s, header.sessions, header.telemetry, header.stalls, index.evals())
    return s


def summarize(header: HistoryHeader, index: RunIndex) -> Summary:
    q = _Query(index.conn)
    sessions = header.sessions
    last = sessions[-1] if sessions else Session(session=0)
    run = header.run
    model = run.model if run else None
    s = Summary(
        project=header.project,
        status=header.status.value,
        exit_code=last.exit_code,
        signal=last.signal,
        error=last.error,
        sessions=len(sessions),
        max_steps=run.max_steps if run else None,
        training_ended=last.training_ended,
        ended_early_by=last.ended_early_by,
    )
    if model is not None:
        s.trainable_params, s.total_params = model.trainable_params, model.total_params
        if s.trainable_params is not None and s.total_params:
            s.trainable_pct = 100.0 * s.trainable_params / s.total_params
    s.step_entries, first, last_step = q.row("SELECT COUNT(*), MIN(step), COALESCE(MAX(step), 0) FROM steps")
    s.optimizer_steps = last_step
    line = q.value("SELECT entry FROM step_lines ORDER BY step DESC LIMIT 1")
    last_entry = msgspec.json.decode(line, type=StepEntry) if line is not None else None
    # Training data without a length (an IterableDataset): the Trainer's epoch is its step over max_steps,
    # no count of passes over the data, so none is given.
    unsized = run is not None and run.reporter == "trainer" and run.train_samples is None
    s.epochs = last_entry.epoch if last_entry is not None and not unsized else None
    weight = q.median("duration_s") or 1.0  # the duration that stands in for steps without one
    w = f"COALESCE(duration_s, {weight!r})"
    s.training_time_s = _training_time_s(q, sessions)
    evals = index.evals()  # few (one every eval_steps): read once, whole
    _time_spent(q, s, sessions, header.telemetry, header.stalls, evals)
    _loss(q, s, index)
    _logged_metrics(q, s)
    if not s.loss_logged_steps and not (s.loss_nan_count or s.loss_inf_count) and s.step_entries:
        _why_no_loss(s, run, last_entry)
    _evals(evals, s)
    s.trainings = _trainings(q, header.trainings, evals)
    totals = gpu_totals.read(index.conn)
    gpus = _gpus(q, s, header, totals, weight)
    _throughput(q, s)
    s.tokens_counted_by = run.tokens_counted_by if run is not None and s.tokens is not None else None
    counted = run.args.include_num_input_tokens_seen if run is not None else None
    s.tokens_without_padding = s.tokens_counted_by == "trainer" and counted == "non_padding"
    s.world_size = run.world_size if run is not None else None
    if run is not None:
        _vram_estimate(q, s, run)
    if header.host_use.samples:  # every poller sample, steps or not
        s.host_cpu_avg_pct, s.host_ram_peak_bytes = header.host_use.cpu_avg_pct, header.host_use.ram_peak_bytes
    else:  # a history written before kaio kept them: the steps' own
        s.host_cpu_avg_pct, s.host_ram_peak_bytes = q.row(
            f"SELECT SUM(host_cpu * {w}) / SUM(CASE WHEN host_cpu IS NOT NULL THEN {w} END), "
            "CAST(MAX(host_ram) AS INTEGER) FROM steps"
        )
    _energy(q, s, header, [totals[g] for g in gpus], weight)
    s.nodes = list(run.nodes) if run is not None else []
    s.compiled = bool(run is not None and run.args.torch_compile)
    s.cpu_only = not header.devices and all(
        v is None for v in (s.vram_true_peak_bytes, s.power_avg_w, s.gpu_util_avg_pct, s.temp_avg_c)
    )
    s.warnings = _warnings(q, header, s, first, last_step, totals)
    return s


def _training_time_s(q: _Query, sessions: list[Session]) -> float | None:
    """Sum of the sessions' wall time; a session still running counts its start-up (to its first step's end) and
    its steps' time span after it, as a finished one's duration does."""
    spans = dict(q.conn.execute("SELECT session, MAX(t_mono) - MIN(t_mono) FROM steps GROUP BY session").fetchall())
    known = [s.duration_s if s.duration_s is not None else _running_s(s, spans.get(s.session)) for s in sessions]
    present = [d for d in known if d is not None]
    return sum(present) if present else None


def _running_s(session: Session, steps_span_s: float | None) -> float | None:
    if steps_span_s is None:
        return None
    return (session.startup_s or 0.0) + steps_span_s


def _time_spent(
    q: _Query,
    s: Summary,
    sessions: list[Session],
    telemetry: Telemetry,
    stalls: list[Stall],
    evaluations: list[EvalEntry],
) -> None:
    """Where the wall time went, each second once. A session's first step is in its start-up (which
    ends with that step), and so is a later training's start before its first step; an evaluation or a save
    after a step sits in the next step's duration: it is taken out of the time in steps; a session's last
    step's pauses are in its closing. Evaluations before a
    session's first step (eval_on_start) or after its last are evaluation time, not start-up or closing; so
    are the script's own evaluations between two of its trainings."""
    early, late, between = _evaluations_outside_steps(q, sessions, evaluations)
    later = s.later_trainings_startup_s = q.value("SELECT COALESCE(SUM(training_start_s), 0) FROM steps")
    s.startup_s = _sum([*(x.startup_s for x in sessions), later or None])
    s.closing_s = _sum(x.closing_s for x in sessions)
    if s.startup_s is not None:
        s.startup_s -= early
    if s.closing_s is not None:
        s.closing_s -= late
    inside = "step NOT IN (SELECT MAX(step) FROM steps GROUP BY session)"
    total, first, evals, saves = q.row(
        f"SELECT SUM(COALESCE(duration_s, step_time_s)), SUM(CASE WHEN {FIRST_STEPS} THEN COALESCE(duration_s, step_time_s) END), "
        f"SUM(CASE WHEN {inside} THEN eval_s END), SUM(CASE WHEN {inside} THEN save_s END) FROM steps"
    )
    inner = (evals or 0.0) + (saves or 0.0)
    outside = early + late + between
    s.eval_s = (evals or 0.0) + outside if evals is not None or outside else None
    s.save_s = saves
    if total is not None:  # a later training's first step holds its start and the evaluations before it
        s.steps_s = max(total - (inner or 0.0) - later - between, 0.0)
    s.recomputed_steps, s.recomputed_s = telemetry.recomputed_steps, telemetry.recomputed_s
    # A stall within a training step: the step that finally came took the stall's time.
    s.stall_s = _sum(
        q.value(
            "SELECT COALESCE(duration_s, step_time_s) FROM steps WHERE step = ? AND session = ?",
            stall.step + 1,
            stall.session,
        )
        for stall in stalls
        if stall.phase == "training step"
    )
    if s.steps_s is not None:  # the time in steps (throughput's), less the first steps (in start-up) and stalls
        s.productive_s = max(s.steps_s - (first or 0.0) - (s.stall_s or 0.0), 0.0)
        if s.training_time_s:
            s.goodput_pct = 100.0 * s.productive_s / s.training_time_s


def _evaluations_outside_steps(
    q: _Query, sessions: list[Session], evals: list[EvalEntry]
) -> tuple[float, float, float]:
    """The evaluations' time in the sessions' start-ups (before each one's first step) and closings (at or after
    its last step: the Trainer's last evaluation, the script's own evaluate() and predict() after train()), each
    at most the start-up or closing it is in; and the script's own between two of its trainings (in the later
    one's first step)."""
    early_total = late_total = between_total = 0.0
    bounds = {
        session: (first, last)
        for session, first, last in q.conn.execute("SELECT session, MIN(step), MAX(step) FROM steps GROUP BY session")
    }
    for x in sessions:
        first, last = bounds.get(x.session, (None, None))
        mine = [(e, rules.evaluation_runtime(e.metrics) or 0.0) for e in evals if e.session == x.session]
        early = sum(t for e, t in mine if not e.after_training and (first is None or e.step < first))
        late = sum(t for e, t in mine if last is not None and e.step >= last)
        between_total += sum(t for e, t in mine if last is not None and e.after_training and e.step < last)
        early_total += min(early, x.startup_s or 0.0)
        late_total += min(late, x.closing_s or 0.0)
    return early_total, late_total, between_total


def _sum(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _loss(q: _Query, s: Summary, index: RunIndex) -> None:
    s.grad_norm_median = q.median("grad_norm")
    if s.grad_norm_median is not None:
        s.grad_norm_max_step, s.grad_norm_max = q.row(
            "SELECT step, grad_norm FROM steps WHERE grad_norm IS NOT NULL ORDER BY grad_norm DESC, step LIMIT 1"
        )
    s.grad_norm_nonfinite_count, s.grad_norm_nonfinite_first_step = q.row(
        "SELECT COUNT(*), MIN(step) FROM steps WHERE grad_norm_nonfinite IS NOT NULL"
    ) or (0, None)
    s.loss_initial_step, s.loss_initial = q.row(
        "SELECT step, loss FROM steps WHERE loss IS NOT NULL ORDER BY step LIMIT 1"
    ) or (None, None)
    s.loss_final_step, s.loss_final, s.loss_final_smoothed = q.row(
        "SELECT step, loss, loss_smoothed FROM steps WHERE loss IS NOT NULL ORDER BY step DESC LIMIT 1"
    ) or (None, None, None)
    s.loss_nonfinite_after_final = q.value(
        "SELECT COUNT(*) FROM steps WHERE loss_nonfinite IS NOT NULL AND step > ?", s.loss_final_step or 0
    )
    s.nonfinite_since = index.nonfinite_since()
    s.loss_min_step, s.loss_min, s.loss_logged_steps = q.row(
        "SELECT step, MIN(loss), COUNT(loss) FROM steps WHERE loss IS NOT NULL"
    ) or (None, None, 0)
    since = index.training_began_after()  # a later training of the script smooths its own loss
    s.loss_smoothed_over = (
        q.value("SELECT COUNT(loss) FROM steps WHERE step > ?", since) if since else s.loss_logged_steps
    ) or 0
    for tag, count, first in q.conn.execute(
        "SELECT loss_nonfinite, COUNT(*), MIN(step) FROM steps WHERE loss_nonfinite IS NOT NULL GROUP BY loss_nonfinite"
    ):
        if tag == "nan":
            s.loss_nan_count, s.loss_nan_first_step = count, first
        else:  # inf and -inf
            s.loss_inf_count += count
            s.loss_inf_first_step = first if s.loss_inf_first_step is None else min(first, s.loss_inf_first_step)


def _logged_metrics(q: _Query, s: Summary) -> None:
    """Two passes over the table (count, lowest, highest: SQLite gives a lone MIN's or MAX's row's step with it),
    then each listed metric's first and last by its key."""
    grouped = "FROM step_metrics GROUP BY name ORDER BY name"
    lows = q.conn.execute(f"SELECT name, COUNT(*), MIN(value), step {grouped}")
    listed = [row for row in lows if not rules.trainer_speed_or_total(row[0])]
    s.logged_metrics_not_listed = max(0, len(listed) - LOGGED_METRICS_LISTED)
    s.logged_at_step_0 = q.value("SELECT COUNT(*) FROM step_metrics WHERE step = 0") > 0
    listed = listed[:LOGGED_METRICS_LISTED]
    highs = {name: (high, step) for name, high, step in q.conn.execute(f"SELECT name, MAX(value), step {grouped}")}
    for name, logged, low, low_step in listed:
        first = q.value("SELECT value FROM step_metrics WHERE name = ? ORDER BY step LIMIT 1", name)
        last_step, last = q.row("SELECT step, value FROM step_metrics WHERE name = ? ORDER BY step DESC LIMIT 1", name)
        high, high_step = highs[name]
        s.logged_metrics.append(
            LoggedMetric(
                name=name,
                logged=logged,
                first=first,
                last=last,
                last_step=last_step,
                min=low,
                min_step=low_step if low is not None else None,
                max=high,
                max_step=high_step if high is not None else None,
            )
        )


def _why_no_loss(s: Summary, run: RunDescription | None, last_entry: StepEntry | None) -> None:
    args = run.args if run is not None else None
    every = args.logging_steps if args is not None and args.logging_strategy in (None, "steps") else None
    if every is not None and every >= 1 and s.optimizer_steps < every:  # below 1: a share of the steps
        s.loss_logging_steps_unreached = int(every)
    if last_entry is not None:
        value = last_entry.metrics.get("train_loss")
        s.trainer_mean_loss = value if isinstance(value, float) and math.isfinite(value) else None


def evaluation_rows(evals: list[EvalEntry]) -> list[EvalEntry]:
    """The evaluations as counted and listed: several eval datasets are evaluated one after the other at a step
    (eval_val_*, then eval_test_*), which is one evaluation (one row of the report's table, not a row per dataset
    with the others' columns empty)."""
    rows: list[EvalEntry] = []
    for e in evals:
        last = rows[-1] if rows else None
        if (
            last is not None
            and (last.step, last.session, last.after_training, last.before_training, last.prediction, last.other_model)
            == (e.step, e.session, e.after_training, e.before_training, e.prediction, e.other_model)
            and e.eval_set is not None
            and last.eval_set is not None
            and not (last.metrics.keys() - {"epoch"}) & (e.metrics.keys() - {"epoch"})
        ):
            rows[-1] = msgspec.structs.replace(
                last, metrics={**last.metrics, **e.metrics}, nonfinite={**last.nonfinite, **e.nonfinite}
            )
        else:
            rows.append(e)
    return rows


def _evals(evals: list[EvalEntry], s: Summary) -> None:
    """Each dataset's losses apart; the evaluations of another model than the one trained (a teacher's) are
    listed in the report, not counted here."""
    evals = [e for e in evals if not e.other_model]
    s.eval_count = len(evaluation_rows(evals))
    sets: dict[str | None, EvalSetLoss] = {}
    for e in evals:
        loss = e.loss
        if loss is None:
            continue
        found = sets.setdefault(e.eval_set, EvalSetLoss(name=e.eval_set))
        found.final = loss
        if found.best is None or loss < found.best:
            found.best, found.best_step = loss, e.step
    if sets:
        first = next(iter(sets.values()))
        s.eval_loss_final, s.eval_loss_best, s.eval_loss_best_step = first.final, first.best, first.best_step
    if len(sets) > 1:
        s.eval_sets = list(sets.values())


def _gpus(q: _Query, s: Summary, header: HistoryHeader, totals: dict[str, GpuTotals], weight: float) -> list[str]:
    """Per-GPU and pooled figures of the run's GPUs; returns their keys."""
    in_run = header.run_gpu_keys()
    gpus = [k for k in in_run if k in totals] + sorted(
        set(totals) - set(in_run) - {d.key for d in header.devices}, key=device_order
    )
    by_gpu = [totals[gpu] for gpu in gpus]
    s.gpu_count = len(set(in_run) | set(gpus))
    s.power_peak_w = _max(t.power_peak for t in by_gpu)
    s.temp_peak_c = _max(t.temp_peak for t in by_gpu)
    device_peaks = {gpu: int(t.vram_peak) for gpu, t in zip(gpus, by_gpu) if t.vram_peak is not None}
    s.vram_device_used_peak_by_gpu_bytes = device_peaks
    s.vram_device_used_peak_bytes = max(device_peaks.values()) if device_peaks else None
    averages = [average for t in by_gpu if (average := t.mean("power_avg", weight)) is not None]
    s.power_total_avg_w = sum(averages) if averages else None
    s.power_total_gpus = len(averages)
    s.power_avg_w, s.gpu_util_avg_pct, s.temp_avg_c = (_pooled(by_gpu, metric, weight) for metric in METRICS)
    by_rank = dict(q.conn.execute("SELECT rank, CAST(MAX(peak) AS INTEGER) FROM step_ranks GROUP BY rank").fetchall())
    s.vram_true_peak_by_rank_bytes = {r: by_rank[r] for r in sorted(by_rank, key=lambda r: (len(r), r))}
    s.vram_true_peak_bytes = max(by_rank.values()) if by_rank else None
    avg = q.value("SELECT AVG(vram_peak) FROM steps")
    s.vram_true_peak_step_avg_bytes = None if avg is None else int(round(avg))
    if s.vram_true_peak_bytes is not None and s.vram_device_used_peak_bytes is not None:
        s.vram_gap_bytes = s.vram_device_used_peak_bytes - s.vram_true_peak_bytes
    return gpus


def _pooled(by_gpu: list[GpuTotals], metric: str, weight: float) -> float | None:
    """A time-weighted mean over every GPU: their weighted sums and weights added up."""
    sums = [t.weighted(metric, weight) for t in by_gpu]
    weights = sum(w for _, w in sums)
    return sum(total for total, _ in sums) / weights if weights else None


def _throughput(q: _Query, s: Summary) -> None:
    """The pace of the training: each session's steps after its first, over their time (the pauses for
    evaluations and saves between them taken out, as from the time in steps). The first is in the start-up, where
    the time table puts it: a compilation (torch_compile: a minute for a step of 10 ms), the allocator's first
    growth, the data loader's workers starting. Samples and tokens each over the sessions that counted them; a run
    of one-step sessions over every step."""
    samples, tokens = q.row("SELECT MAX(samples_seen), MAX(tokens_seen) FROM steps") or (None, None)
    s.samples = None if samples is None else int(samples)
    s.tokens = None if tokens is None else int(tokens)
    sessions = q.conn.execute(
        "SELECT b.samples_seen - a.samples_seen, b.tokens_seen - a.tokens_seen, "
        "(SELECT SUM(COALESCE(duration_s, step_time_s)) - COALESCE(SUM(training_start_s), 0) FROM steps "
        " WHERE session = g.session AND step > g.first) "
        "- (SELECT COALESCE(SUM(COALESCE(eval_s, 0) + COALESCE(save_s, 0)), 0) FROM steps "
        "   WHERE session = g.session AND step >= g.first AND step < g.last) "
        "FROM (SELECT session, MIN(step) AS first, MAX(step) AS last FROM steps GROUP BY session) AS g "
        "JOIN steps AS a ON a.step = g.first JOIN steps AS b ON b.step = g.last"
    ).fetchall()
    after_first_s = (s.productive_s or 0.0) + (s.stall_s or 0.0)  # the time table's steps after each first
    s.samples_per_s = _pace(sessions, 0, samples, s.steps_s, after_first_s)
    s.tokens_per_s = _pace(sessions, 1, tokens, s.steps_s, after_first_s)
    # Each step's figure weighted by its time (the run's tokens over its step time), the first steps left out.
    weighted = (
        "SELECT SUM(tokens_per_s_dev * step_time_s) / SUM(CASE WHEN tokens_per_s_dev IS NOT NULL THEN step_time_s END), "
        "SUM(mfu * step_time_s) / SUM(CASE WHEN mfu IS NOT NULL THEN step_time_s END) FROM steps WHERE {}"
    )
    s.tokens_per_s_per_device, s.mfu = q.row(weighted.format(f"NOT {FIRST_STEPS}"))
    if s.tokens_per_s_per_device is None and s.mfu is None:
        s.tokens_per_s_per_device, s.mfu = q.row(weighted.format("1"))


def _pace(
    sessions: list[tuple], at: int, total: float | None, steps_s: float | None, after_first_s: float
) -> float | None:
    """A count's per-second pace after each session's first step, without the sessions that did not count it
    (their time, roughly: their steps' durations less the pauses between them); else over every step."""
    added = sum(row[at] for row in sessions if row[at] is not None)
    seconds = after_first_s - sum(row[2] or 0.0 for row in sessions if row[at] is None)
    if added > 0 and seconds > 0:
        return added / seconds
    return total / steps_s if total is not None and steps_s else None


POLL_SKIPPED_SHARE = 0.05  # the poller skipping more of its ticks than this is said (the latest session's)
UTIL_LAG_POINTS = 20.0  # a run GPU this many points below the median of the run's GPUs is not kept busy


def _lagging_utilisation(header: HistoryHeader, names: dict[str, str], totals: dict[str, GpuTotals]) -> list[str]:
    """A run GPU whose average utilisation lags the others' (a rank starved of data, a GPU left idle)."""
    in_run = header.run_gpu_keys()
    if len(in_run) < 2:
        return []
    averages = {gpu: totals[gpu].mean("util", 1.0) for gpu in in_run if gpu in totals}  # a step without a time: 1 s
    known = {gpu: util for gpu, util in averages.items() if util is not None}
    if len(known) < 2:
        return []
    median = sorted(known.values())[len(known) // 2]
    return [
        f"GPU {_gpu_label(gpu, names)} was {util:.0f} % busy on average against {median:.0f} % for the run's "
        "median GPU: its rank may be starved of data or waiting (see the Ranks table)"
        for gpu, util in sorted(known.items())
        if median - util >= UTIL_LAG_POINTS
    ]


def _vram_estimate(q: _Query, s: Summary, run: RunDescription) -> None:
    """The estimate for the largest micro-batch the run trained (its tokens as counted: the Trainer's, or kaio's
    count of rank 0's input ids times the world size; padding included)."""
    args = run.args
    if run.model is None or not run.world_size:
        return
    biggest_step = q.value(
        "SELECT MAX(tokens_seen - before) FROM "
        "(SELECT tokens_seen, LAG(tokens_seen) OVER (ORDER BY step) AS before FROM steps WHERE tokens_seen IS NOT NULL)"
    )
    micro_batches = (args.gradient_accumulation_steps or 1) * run.world_size
    if not biggest_step or biggest_step <= 0:
        return
    tokens = round(biggest_step / micro_batches)
    work = workload_of(
        run.model,
        run.peft,
        tokens=tokens,
        gradient_checkpointing=bool(args.gradient_checkpointing),
        optim=_optimizer(run),
        half_precision=run.precision in HALF_PRECISIONS,
    )
    if work is None:
        kind = run.model.architecture or run.model.model_class or "the model"
        s.vram_estimate_missing = (
            f"kaio sizes a decoder's layers from its config: {kind}'s has no {', '.join(unsized(run.model))}"
        )
        return
    estimated = estimate(work)
    s.vram_estimate_bytes, s.vram_estimate_tokens = estimated.total, tokens
    s.vram_estimate_terms = dict(estimated.terms())


def _optimizer(run: RunDescription) -> str | None:
    """The optimizer that trained, as the memory estimate names it: the script's own (SGD, AdamW: args.optim was not
    used), an SGD with momentum ("sgd_momentum": the script's, or optim="sgd" with optim_args "momentum=0.9")."""
    if run.script_optimizer is not None:
        return "sgd_momentum" if run.script_momentum else run.script_optimizer
    optim, extra = run.args.optim, run.args.optim_args or ""
    settings = dict(part.split("=", 1) for part in extra.replace(" ", "").split(",") if "=" in part)
    try:
        momentum = float(settings.get("momentum", 0))
    except ValueError:
        momentum = 0.0
    return "sgd_momentum" if optim is not None and optim.startswith("sgd") and momentum > 0 else optim


def _energy(q: _Query, s: Summary, header: HistoryHeader, gpus: list[GpuTotals], weight: float) -> None:
    """Best available total energy: device counters, else per-step energy, else power x time. The devices' totals
    cover the whole session (start-up and closing too); a run GPU without one (its card read on another device, or
    one that reports neither power nor energy) does not send the total to the steps' sums, which leave those out."""
    in_run = [d for d in header.devices if d.info.in_run]
    measured = [d for d in in_run if d.energy_j is not None]
    joules: float | None = None
    if measured:
        joules = sum(d.energy_j or 0.0 for d in measured)
        s.energy_method = " + ".join(
            sorted({ENERGY_METHOD_LABELS.get(d.energy_method or "", "device energy") for d in measured})
        )
        s.energy_unmeasured = [d.key for d in in_run if d.energy_j is None and not d.info.power_counted_elsewhere]
    elif (per_step := q.value("SELECT SUM(energy_j) FROM steps")) is not None:
        joules, s.energy_method = per_step, ENERGY_FROM_STEPS
    elif any(t.weighted("power_avg", weight)[1] for t in gpus):  # power x time, steps weighed as the means weigh them
        joules = sum(t.weighted("power_avg", weight)[0] for t in gpus)
        s.energy_method = ENERGY_FROM_STEP_POWER
    if joules is not None:
        s.energy_kwh = joules / 3.6e6
        if s.samples:
            s.energy_per_1k_samples_wh = 1000.0 * s.energy_kwh * 1000.0 / s.samples


def _warnings(
    q: _Query, header: HistoryHeader, s: Summary, first: int | None, last: int, totals: dict[str, GpuTotals]
) -> list[str]:
    found = list(header.warnings)
    for label, count, step in (
        ("NaN", s.loss_nan_count, s.loss_nan_first_step),
        ("inf", s.loss_inf_count, s.loss_inf_first_step),
    ):
        if count:
            found.append(f"loss was {label} at {count_of(count, 'logged step')} (first at step {step})")
    diverged, diverged_first, diverged_last = q.row(
        "SELECT COUNT(*), MIN(step), MAX(step) FROM steps WHERE loss_diverged"
    )
    if diverged:
        # A spike the loss came back from (a bad batch) is not a run that diverged: say which it was.
        back = q.value(
            "SELECT MIN(step) FROM steps WHERE step > ? AND loss_smoothed IS NOT NULL AND NOT loss_diverged",
            diverged_last,
        )
        came_back = f"; no longer from step {back}" if back is not None else ""
        found.append(
            f"loss diverging: the smoothed loss was above {rules.DIVERGENCE_FACTOR:g}x its running minimum "
            f"at {count_of(diverged, 'step')} (first at step {diverged_first}){came_back}"
        )
    found += _schedule_restarts(q, header)
    found += _no_gradient(q, s)
    found += _spikes_and_stalls(q, first)
    names = {d.key: d.info.name for d in header.devices}
    throttled = sorted((t.throttle_first_step or 0, gpu) for gpu, t in totals.items() if t.throttled_steps)
    for _, gpu in throttled:
        t = totals[gpu]
        found.append(
            f"GPU {_gpu_label(gpu, names)} throttled ({', '.join(t.throttle_reasons)}) during "
            f"{count_of(t.throttled_steps, 'step')}, first at step {t.throttle_first_step}"
        )
    found += _lagging_utilisation(header, names, totals)
    if s.energy_unmeasured:
        gpus = ", ".join(_gpu_label(gpu, names) for gpu in s.energy_unmeasured)
        found.append(f"energy of GPU {gpus} not measured (neither power nor an energy counter read): not in the total")
    found += _records_dropped(header.telemetry)
    poll = header.telemetry.poll
    skipped, ticks = (poll.skipped_ticks or 0, poll.ticks or 0) if poll is not None else (0, 0)
    if ticks and skipped > POLL_SKIPPED_SHARE * (ticks + skipped):
        every = f" every {1 / header.telemetry.poll_hz:g} s" if header.telemetry.poll_hz else ""
        found.append(
            f"the GPU sampling fell behind: {skipped:,} of {ticks + skipped:,} samples due{every} were skipped (a GPU "
            "or driver slow to answer holds up the reading of every GPU)"
        )
    fallbacks = poll.energy_fallbacks if poll is not None else {}
    for device in header.devices:
        if device.info.in_run and device.energy_method == "integrated":
            why = fallbacks.get(device.key)  # the counter's fault: a wrap, a reset, a GPU that stopped answering
            found.append(
                f"energy of GPU {_gpu_label(device.key, names)} integrated from power samples, "
                "not read from a hardware energy counter" + (f" ({why})" if why else "")
            )
    missing = last - (first or 0) + 1 - s.step_entries if s.step_entries else 0
    if missing > 0:
        missed = f"history has no entry for {count_of(missing, 'optimizer step')} between its first and last step"
        if header.run is not None and header.run.reporter == "kaio.log":  # a loop that reports every k steps
            missed += ": the loop did not call kaio.log at them (each is counted with the examples and tokens of the step reported after it)"
        found.append(missed)
    if s.energy_method == ENERGY_FROM_STEP_POWER:
        found.append("energy integrated from per-step average power: no device or per-step energy was recorded")
    return list(dict.fromkeys(found))


def _no_gradient(q: _Query, s: Summary) -> list[str]:
    """Every logged gradient norm 0 (the largest is): nothing was learned (a learning rate of 1e4 overflowed the
    weights to a constant output, frozen or detached parameters), and the run read COMPLETED with a flat loss."""
    if s.grad_norm_max != 0:
        return []
    logged = q.value("SELECT COUNT(grad_norm) FROM steps")
    if logged < rules.MIN_POINTS_FOR_MEDIAN:
        return []
    return [
        f"the gradient norm was 0 at every one of the {logged:,} logged steps: no parameter was updated (weights "
        "overflowed to a constant output by the learning rate, or parameters frozen or cut off from the loss?)"
    ]


def _spikes_and_stalls(q: _Query, first: int | None) -> list[str]:
    """Gradient-norm spikes after the warm-up (and the far larger ones before a window can judge them), and steps
    far slower than the median."""
    found = []
    judged = f"step > {(first or 0) + rules.WARMUP_STEPS - 1}"
    norms = q.conn.execute(f"SELECT step, grad_norm FROM steps WHERE grad_norm IS NOT NULL AND {judged} ORDER BY step")
    spikes = list(rules.grad_norm_spikes(norms))
    unjudged = q.conn.execute(
        f"SELECT step, grad_norm FROM steps WHERE grad_norm IS NOT NULL AND NOT ({judged}) UNION ALL "
        f"SELECT * FROM (SELECT step, grad_norm FROM steps WHERE grad_norm IS NOT NULL AND {judged} "
        f"ORDER BY step LIMIT {rules.MIN_POINTS_FOR_MEDIAN})"
    ).fetchall()
    # Against the first norms' own median, not the run's: a classifier that converges to a loss near zero ends
    # with norms a thousandth of its first ones, which were no spike.
    early_median = statistics.median(norm for _, norm in unjudged) if len(unjudged) >= 3 else None
    if early_median:
        early = [(step, norm) for step, norm in unjudged if norm > rules.GRAD_NORM_EARLY_FACTOR * early_median]
        if early:
            step, norm = max(early, key=lambda pair: pair[1])
            found.append(
                f"gradient norm of {norm:.3g} at step {step}, over {rules.GRAD_NORM_EARLY_FACTOR:g}x the median of "
                f"the first norms logged ({early_median:.3g}), where no spike window judges"
                + (f" ({count_of(len(early), 'step')} in all)" if len(early) > 1 else "")
            )
    if spikes:
        top_step, top, before = max(spikes, key=lambda spike: spike[1])
        found.append(
            f"gradient norm spiked above {rules.GRAD_NORM_SPIKE_FACTOR:g}x the median of the (up to "
            f"{rules.GRAD_NORM_WINDOW}) logged before it at {count_of(len(spikes), 'step')} (largest {top:.3g} at step "
            f"{top_step}, where that median was {before:.3g})"
        )
    # A session's first step carries start-up work (CUDA init, compilation): not a stall.
    steady = "step NOT IN (SELECT MIN(step) FROM steps GROUP BY session)"
    median_step = q.median("step_time_s", steady)
    if median_step and q.value(f"SELECT COUNT(step_time_s) FROM steps WHERE {steady}") >= rules.MIN_POINTS_FOR_MEDIAN:
        threshold = rules.stall_threshold_s(median_step)
        stalls, longest, longest_step = q.row(
            f"SELECT COUNT(*), MAX(step_time_s), step FROM steps WHERE {steady} AND step_time_s > ?", threshold
        )
        if stalls:
            found.append(
                f"{count_of(stalls, 'stalled step')}: step time above {threshold:.3g} s "
                f"(median {median_step:.3g} s; longest {longest:.3g} s at step {longest_step})"
            )
    return found


def _records_dropped(t: Telemetry) -> list[str]:
    found = []
    for count, what in (
        (t.malformed_lines, "malformed telemetry line"),
        (t.oversized_lines, "oversized telemetry line"),
        (t.invalid_records, "invalid record"),
    ):
        if count:
            found.append(f"{count_of(count, what)} dropped")
    if t.dropped_late_events:
        found.append(f"{t.dropped_late_events} late events dropped")
    return found


def _trainings(q: _Query, trainings: list[Training], evals: list[EvalEntry]) -> list[TrainingLosses]:
    """Each training's steps: its session's, from its first step to the next training's of the session."""
    rows = []
    for i, t in enumerate(trainings):
        end = next((n.first_step for n in trainings[i + 1 :] if n.session == t.session), None) or 2**62
        where, args = "session = ? AND step >= ? AND step < ?", (t.session, t.first_step, end)
        steps, last_step, loss_min = q.row(f"SELECT COUNT(*), MAX(step), MIN(loss) FROM steps WHERE {where}", *args)
        first, last = (
            q.value(f"SELECT loss FROM steps WHERE {where} AND loss IS NOT NULL ORDER BY step {order} LIMIT 1", *args)
            for order in ("ASC", "DESC")
        )
        mine = [
            e.loss
            for e in evals
            if e.session == t.session and t.first_step <= e.step < end and e.loss is not None and not e.other_model
        ]
        rows.append(
            TrainingLosses(
                training=t,
                steps=steps,
                last_step=last_step,
                loss_first=first,
                loss_last=last,
                loss_min=loss_min,
                eval_loss_best=min(mine) if mine else None,
            )
        )
    return rows


def _schedule_restarts(q: _Query, header: HistoryHeader) -> list[str]:
    """A resumed session whose learning rate jumped up from where the last one left it: the Trainer planned
    its schedule anew over the new length (``kaio resume --max-steps``), and the loss may show it."""
    kinds = {s.session: s.kind.value for s in header.sessions}
    later_trainings = {(t.session, t.first_step) for t in header.trainings if t.training > 1}
    found = []
    for step, session, before, after in q.conn.execute(
        "SELECT s.step, s.session, p.learning_rate, s.learning_rate FROM steps s JOIN steps p ON p.step = s.step - 1 "
        "WHERE s.session != p.session AND s.learning_rate > 2 * p.learning_rate + 1e-12"
    ):
        if (session, step) in later_trainings:
            continue  # another Trainer's schedule of its own, not the resumed one planned anew
        found.append(
            f"learning rate jumped from {before:.3g} to {after:.3g} at step {step}, where session {session} "
            f"({kinds.get(session, 'resume')}) began: its schedule was planned anew over the run's new length, or "
            "its learning rate was edited (a cosine schedule extended by --max-steps rises again from the checkpoint on)"
        )
    return found


def _max(values: Any) -> float | None:
    return max((v for v in values if v is not None), default=None)


def _gpu_label(key: str, names: dict[str, str]) -> str:
    name = names.get(key)
    return f"{key} ({name})" if name else key


def count_of(n: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"

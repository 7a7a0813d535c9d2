"""The run's record, declared once: every journal record, and the entries derived from them.

The journal (``journal.jsonl``) holds one record per line: the child's events
(``kaio.telemetry.protocol``) and the supervisor's own records below. Every
record is decoded and validated into its type here; one that does not fit is
counted and skipped, never half-applied (``decode_record``). The derived
entries (``StepEntry``, ``EvalEntry``, ``Session``) are what history.json,
report.md, telemetry.png, Comet and the dashboard read.

Every record carries its node (``node_rank``, ``hostname``) and, where it has one,
its rank, so that records of several nodes merge without new fields.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Literal

import msgspec

from kaio.devices.base import DeviceInfo, GpuSample, HostSample, visible_order
from kaio.telemetry.protocol import (
    ChildEvent,
    Environment,
    Eval,
    Log,
    Metric,
    ModelInfo,
    NonFiniteTag,
    Pause,
    PeftInfo,
    RunStart,
    Save,
    ScriptEnd,
    Step,
    TrainEnd,
    TrainingArgs,
    to_json,
)

SCHEMA_VERSION = 2  # history.json's; docs/history-schema.md


class Status(str, enum.Enum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"

    @property
    def finished(self) -> bool:
        return self is not Status.RUNNING


class SessionKind(str, enum.Enum):
    RUN = "run"  # kaio run
    RESUME = "resume"  # kaio resume
    RESTART = "restart"  # an automatic restart after a failure (launch.max_restarts)


class SupervisorRecord(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type"):
    """What every record of the supervisor carries: its node, and when."""

    node_rank: int = 0
    hostname: str | None = None
    t_wall: float | None = None
    t_mono: float | None = None


class SessionStart(SupervisorRecord, tag="session_start"):
    session: int
    kind: SessionKind = SessionKind.RUN
    resume_from: str | None = None
    poll_hz: float | None = None
    config: dict[str, Any] | None = None  # kaio's resolved config, secrets redacted
    argv: list[str] = []
    code_file: str | None = None  # the user's script, or the file its launch.module was found at (kaio resume checks)
    code_sha256: str | None = None  # that file's content (a resume says when it was edited)


class ChildStarted(SupervisorRecord, tag="child_started"):
    pid: int
    session: int | None = None


class SessionCounters(msgspec.Struct, kw_only=True, omit_defaults=True):
    malformed_lines: int = 0  # pipe lines that were not a valid event
    oversized_lines: int = 0
    spooled_events: int = 0  # events recovered from the spool


class PollStats(msgspec.Struct, kw_only=True, omit_defaults=True):
    ticks: int | None = None
    skipped_ticks: int | None = None
    mean_interval_s: float | None = None
    lateness_p99_s: float | None = None
    lateness_max_s: float | None = None
    energy_fallbacks: dict[str, str] = {}


class SessionEnd(SupervisorRecord, tag="session_end"):
    session: int | None = None
    status: Status = Status.FAILED
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None
    error_at: float | None = None  # when the first rank failed (wall time: the error files')
    counters: SessionCounters = msgspec.field(default_factory=SessionCounters)
    poll_stats: PollStats | None = None


class HostInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    cpu_count: int | None = None
    ram_total_bytes: int | None = None


class Devices(SupervisorRecord, tag="devices"):
    devices: list[DeviceInfo] = []
    notes: list[str] = []
    host: HostInfo | None = None


class TickRecord(SupervisorRecord, tag="tick"):
    """One poller tick: every GPU's sample, and the host's."""

    lateness_s: float | None = None
    gpus: list[GpuSample] = []
    host: HostSample | None = None


class Note(SupervisorRecord, tag="note"):
    text: str
    level: Literal["info", "warning"] = "warning"


class HubOutcome(SupervisorRecord, tag="hub"):
    repo_id: str | None = None
    commit_sha: str | None = None
    url: str | None = None
    adapter_config_url: str | None = None
    error: str | None = None
    # Only in the report files that the push uploads (never journaled): their commit does not exist yet.
    uploading: bool = False


class StalledRank(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One rank of a stalled run: where its Python stack was when kaio asked."""

    rank: int
    pid: int | None = None
    where: str | None = None  # "on_step_end (my_script.py:41): time.sleep(3600)"; None: it did not answer
    stack_file: str | None = None  # its whole stack, relative to the report folder


class Stall(SupervisorRecord, tag="stall"):
    """No step for longer than the budget of what the run was doing (``kaio.run.stalls``)."""

    session: int
    step: int  # the last step done
    phase: str  # "start-up", "training step", "evaluation" or "checkpoint save"
    idle_s: float
    threshold_s: float
    ranks: list[StalledRank] = []
    action: Literal["warn", "stop"] = "warn"


Record = (
    RunStart
    | Step
    | Log
    | Eval
    | Pause
    | Save
    | TrainEnd
    | ScriptEnd
    | SessionStart
    | ChildStarted
    | SessionEnd
    | Devices
    | TickRecord
    | Note
    | HubOutcome
    | Stall
)

_DECODER = msgspec.json.Decoder(Record)


def encode_record(record: Record | ChildEvent) -> bytes:
    """One record as one journal line."""
    return to_json(record) + b"\n"


def decode_record(line: bytes) -> Record:
    """A journal line as its record; ``msgspec.DecodeError``/``ValidationError`` (both ``ValueError``s) otherwise."""
    return _DECODER.decode(line)


# --------------------------------------------------------------------------- derived entries


class GpuStepStats(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One GPU over one step: the poller samples that fell inside it."""

    power_avg: float | None = None
    power_min: float | None = None
    power_max: float | None = None
    util_avg: float | None = None
    util_min: float | None = None
    util_max: float | None = None
    temp_max: float | None = None
    temp_junction_max: float | None = None
    energy_j: float | None = None
    vram_used_max_bytes: int | None = None
    run_vram_max_bytes: int | None = None
    throttle: list[str] | None = None
    samples: int = 0  # 0: no sample fell inside the step; the latest earlier one stands in

    @property
    def temp(self) -> float | None:
        """Junction where the GPU reports it, else edge."""
        return self.temp_junction_max if self.temp_junction_max is not None else self.temp_max


class HostStepStats(msgspec.Struct, kw_only=True):
    cpu_pct: float | None = None
    ram_used_bytes: int | None = None


class StepEntry(msgspec.Struct, kw_only=True):
    """One optimizer step, merged from every rank's events and the GPU samples inside it (history.json)."""

    step: int
    session: int
    epoch: float | None = None
    timestamp: str | None = None  # wall time of the step's end on rank 0, ISO 8601 UTC
    t_mono: float | None = None
    step_time_s: float | None = None  # rank 0's on_step_begin -> on_step_end
    duration_s: float | None = None  # since the previous step's end (this session), else step_time_s
    loss: float | None = None
    loss_nonfinite: NonFiniteTag | None = None  # the logged loss was NaN/inf (loss is then null)
    # ...from this earlier step on: the first step since the previous log whose loss was NaN/inf (the Trainer logs
    # every logging_steps; kaio sees every micro-batch's loss). A checkpoint saved from there may hold NaN weights.
    loss_nonfinite_from: int | None = None
    loss_smoothed: float | None = None  # the one smoothed loss (kaio.record.rules.LossSmoother)
    loss_diverged: bool = False  # the smoothed loss broke the divergence rule here
    learning_rate: float | None = None
    grad_norm: float | None = None
    grad_norm_nonfinite: NonFiniteTag | None = None
    metrics: dict[str, float] = {}  # any other number the Trainer logged at this step
    eval_s: float | None = None  # after this step: time spent evaluating...
    save_s: float | None = None  # ...and saving a checkpoint (both are in the next step's duration_s)
    # A later training's first step (a second Trainer, an out-of-memory retry): its duration_s holds the new
    # Trainer's start (building it, loading a model), start-up time, not optimizer work.
    training_start_s: float | None = None
    samples_seen: int | None = None
    tokens_seen: int | None = None
    tokens_per_s_per_device: float | None = None  # this step's tokens (all ranks) / its step time / world size
    mfu: float | None = None  # model FLOPs utilisation, 0..1 (kaio.record.flops); None: no peak known
    peak_vram_bytes: dict[str, int | None] = {}  # by rank
    vram_peak_bytes: int | None = None  # max over ranks
    power_avg: float | None = None  # W, the run's GPUs together
    power_min: float | None = None
    power_max: float | None = None
    temp: float | None = None  # C, max over the run's GPUs
    util: float | None = None  # %, mean over the run's GPUs
    energy_j: float | None = None
    gpus: dict[str, GpuStepStats] = {}
    gpus_carried: bool = False
    host: HostStepStats | None = None
    slowest_rank: int | None = None  # several ranks: the one whose own work (data + forward) was the longest...
    rank_lag_s: float | None = None  # ...and by how much over the other ranks' median


class EvalEntry(msgspec.Struct, kw_only=True):
    """One evaluation (history.json's ``evals``)."""

    step: int
    session: int
    epoch: float | None = None
    timestamp: str | None = None
    metrics: dict[str, float | None] = {}
    nonfinite: dict[str, NonFiniteTag] = {}
    after_training: bool = False  # the script's own evaluate() or predict() after its Trainer's train() ended
    before_training: bool = False  # the script's own evaluate() before train() (not the Trainer's eval_on_start)
    prediction: bool = False  # Trainer.predict()'s metrics (test_loss...), not an evaluation
    other_model: bool = False  # by a Trainer of another model than the one trained (a teacher's): not the run's
    weights: str | None = None  # after training: the checkpoint whose weights the model had (load_best_model_at_end)

    @property
    def loss_key(self) -> str | None:
        """``eval_loss``; with several eval datasets (``eval_dataset={"a": ..., "b": ...}``) each is evaluated on
        its own and logs its ``eval_a_loss``: the one such key."""
        if "eval_loss" in self.metrics:
            return "eval_loss"
        keys = [k for k in self.metrics if k.startswith("eval_") and k.endswith("_loss")]
        return keys[0] if len(keys) == 1 else None

    @property
    def eval_set(self) -> str | None:
        """The eval dataset's name (``a`` of ``eval_a_loss``); None for ``eval_loss``."""
        key = self.loss_key
        return key.removeprefix("eval_").removesuffix("_loss") if key not in (None, "eval_loss") else None

    @property
    def loss(self) -> float | None:
        key = self.loss_key
        return self.metrics.get(key) if key is not None else None


class Session(msgspec.Struct, kw_only=True):
    """One `kaio run`, `kaio resume` or automatic restart."""

    session: int
    kind: SessionKind = SessionKind.RUN
    started_at: str | None = None
    ended_at: str | None = None
    duration_s: float | None = None
    status: Status = Status.RUNNING
    exit_code: int | None = None
    signal: str | None = None
    start_step: int | None = None
    end_step: int | None = None
    startup_s: float | None = None  # from the session's start to its first step's end (no step: all of it)
    closing_s: float | None = None  # from its last step's end to the session's end (final save, teardown)
    error: str | None = None
    failed_at: str | None = None  # when the first rank failed (ISO 8601 UTC, this machine's clock)
    training_ended: bool | None = None  # its Trainer reached on_train_end; None: no Trainer started, or still going
    ended_early_by: str | None = None  # what ended its training before max_steps (an early-stopping callback)


# --------------------------------------------------------------------------- numbers


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else ``None``: the one finiteness rule."""
    if value.__class__ is float:  # the common case first
        return value if value - value == 0.0 else None  # NaN and inf give NaN
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def nonfinite_tag(value: Metric | Any) -> NonFiniteTag | None:
    """The tag of a NaN/inf metric (a tag as it travels, or a float), else ``None``."""
    if value in ("nan", "inf", "-inf"):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return None


# --------------------------------------------------------------------------- the history document


class ClockOffset(msgspec.Struct):
    """A node's clock minus the head's, from the probe with the shortest round trip (kaio.run.stream);
    the head writes it into the node's folder as ``clock.json``."""

    offset_s: float
    rtt_s: float
    measured_at: float  # the head's time.time()


def job_gpu_key(node_rank: int, key: str) -> str:
    """A GPU's key in a job's record: the head's (node 0) as its own record has it, another node's prefixed."""
    return key if node_rank == 0 else f"n{node_rank}/{key}"


def node_rank_of_gpu(job_key: str) -> int:
    """The node rank in a key ``job_gpu_key`` made (0: the head's, or a record of one machine)."""
    prefix, _, rest = job_key.partition("/")
    if rest and prefix[:1] == "n" and prefix[1:].isdigit():
        return int(prefix[1:])
    return 0


class NodeSummary(msgspec.Struct, kw_only=True):
    """One machine of a job of several (history.json's ``run.nodes``; kaio.run.job)."""

    node_rank: int
    host: str | None = None
    folder: str | None = None  # its record's folder, <rank>-<host> (under nodes/, or given to --merge); None: the head
    status: str | None = None
    exit_code: int | None = None
    gpus: list[str] = []  # the run's GPUs on it, by their key in the job's record
    gpu_names: list[str] = []
    energy_j: float | None = None
    power_avg_w: float | None = None  # its run GPUs together, time-weighted over its steps
    vram_peak_bytes: int | None = None  # the allocator's true peak, max over its ranks
    last_step: int | None = None  # the last step in its record...
    last_step_at: str | None = None  # ...and when it ended there (ISO 8601 UTC): where a LOST node was last heard of
    error: str | None = None  # its first failing rank's own error ("rank 9: RuntimeError: ..."), from its error files
    failed_at: str | None = None  # when that rank failed (ISO 8601 UTC, the node's clock)
    clock_offset_s: float | None = None  # its clock minus the head's (kaio.run.stream's probe); None: not measured
    clock_rtt_s: float | None = None  # the probe's round trip: the offset is known within half of it


HALF_PRECISIONS = ("bf16", "fp16", "fp8")


def training_precision(r: RunStart) -> str | None:
    """bf16, fp16 or fp8 where the Trainer's accelerator trains in it (accelerate launch --mixed_precision may set
    it without the arguments showing it), else as the TrainingArguments say."""
    if r.mixed_precision in HALF_PRECISIONS:
        return r.mixed_precision
    if r.mixed_precision == "no":  # the accelerator does not autocast, whatever the arguments asked
        return "fp32"
    args = r.args
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32" if args.bf16 is not None else None


class RunDescription(msgspec.Struct, kw_only=True):
    """What was trained, as the child reported it from the live objects (rank 0, latest session)."""

    reporter: str = "trainer"  # a transformers Trainer, or "kaio.log" (a plain loop)
    world_size: int | None = None
    distributed_type: str | None = None
    device: str | None = None
    max_steps: int | None = None
    start_step: int | None = None
    training: int = 1  # the script's how-manieth training (another Trainer, or train() again): after start_step
    precision: str | None = None  # bf16 | fp16 | fp32, from the TrainingArguments
    effective_batch_size: int | None = None  # per device x accumulation x world size
    loader_batch_size: int | None = None  # the training DataLoader's batch per device, where not the arguments'
    tokens_counted_by: str | None = None  # "trainer" (include_num_input_tokens_seen) or "kaio" (input_ids' sizes)
    model: ModelInfo | None = None
    peft: PeftInfo | None = None
    args: TrainingArgs = msgspec.field(default_factory=TrainingArgs)
    tokenizer: str | None = None
    script_optimizer: str | None = None  # the script's own optimizer (RunStart says more)
    script_learning_rate: float | None = None
    script_lr_scheduler: str | None = None
    script_momentum: bool = False
    kept_from_checkpoint: dict[str, tuple[float, float]] = {}  # RunStart's: name -> (used, asked)
    train_samples: int | None = None
    eval_samples: int | None = None
    eval_sets: int | None = None  # several eval datasets: how many (their examples add up in eval_samples)
    environment: Environment | None = None
    nodes: list[NodeSummary] = []  # a job of several machines: each one (the head first)

    @classmethod
    def from_run_start(cls, r: RunStart) -> RunDescription:
        args = r.args
        model = r.model
        if model is None and (r.total_params is not None or r.architecture is not None):  # protocol 1
            model = ModelInfo(
                architecture=r.architecture, total_params=r.total_params, trainable_params=r.trainable_params
            )
        precision = training_precision(r)
        return cls(
            reporter=r.reporter,
            world_size=r.world_size,
            distributed_type=r.distributed_type,
            device=r.device,
            max_steps=r.max_steps,
            start_step=r.start_step,
            training=r.training,
            precision=precision,
            effective_batch_size=r.samples_per_step,
            loader_batch_size=r.loader_batch_size,
            tokens_counted_by=r.tokens_counted_by,
            model=model,
            peft=r.peft,
            args=args,
            tokenizer=r.tokenizer,
            script_optimizer=r.script_optimizer,
            script_learning_rate=r.script_learning_rate,
            script_lr_scheduler=r.script_lr_scheduler,
            script_momentum=r.script_momentum,
            kept_from_checkpoint=dict(r.kept_from_checkpoint),
            train_samples=r.train_samples,
            eval_samples=r.eval_samples,
            eval_sets=r.eval_sets,
            environment=r.environment,
        )


class DeviceSummary(msgspec.Struct, kw_only=True):
    """A GPU of the host, with the energy the run used on it."""

    key: str
    info: DeviceInfo
    energy_j: float | None = None  # every session added up
    energy_method: str | None = None  # counter | integrated


class Telemetry(msgspec.Struct, kw_only=True):
    """How the record was gathered: what arrived, what was lost, how the GPUs were read."""

    events: int = 0
    malformed_lines: int = 0
    oversized_lines: int = 0
    spooled_events: int = 0
    invalid_records: int = 0
    dropped_late_events: int = 0
    samples: int = 0
    poll_hz: float | None = None
    poll: PollStats | None = None
    notes: list[str] = []
    # Steps trained again because a resume or a restart started from an earlier checkpoint, and their time.
    recomputed_steps: int = 0
    recomputed_s: float = 0.0


class FinalModel(msgspec.Struct, kw_only=True):
    """The latest training's best checkpoint, as its Trainer kept it (``metric_for_best_model``), and whether the
    model it ended with has that checkpoint's weights (``load_best_model_at_end``) rather than the last step's."""

    best_checkpoint: str | None = None  # its path
    metric: str | None = None  # eval_loss, eval_accuracy...
    value: float | str | None = None
    greater_is_better: bool | None = None
    loaded: str | None = None  # the checkpoint whose weights the final model has (load_best_model_at_end)


class CheckpointSaved(msgspec.Struct, kw_only=True):
    step: int
    path: str | None = None
    session: int | None = None
    training: int = 1  # which training of the script saved it (2: another Trainer, or train() again)

    @property
    def later_training(self) -> int | None:
        """The script's training that saved it, when not its first: ``kaio resume`` hands a checkpoint to a
        script's first train() only, so it cannot continue from this one."""
        return self.training if self.training > 1 else None


class HostUse(msgspec.Struct, kw_only=True):
    """The host's CPU and RAM over the whole run, from every poller sample (steps or not)."""

    samples: int = 0
    cpu_pct_sum: float = 0.0
    ram_peak_bytes: int | None = None

    @property
    def cpu_avg_pct(self) -> float | None:
        return self.cpu_pct_sum / self.samples if self.samples else None


class RankTiming(msgspec.Struct, kw_only=True):
    """One rank's own work over the run (kaio.run.stragglers): history.json's ``ranks``, with several ranks."""

    rank: int
    host: str | None = None
    device: str | None = None  # as the rank reported it (cuda:1)
    steps: int = 0  # steps that every rank timed
    data_s: float = 0.0  # summed over those steps: fetching micro-batches...
    forward_s: float = 0.0  # ...and forward passes
    slowest: int = 0  # steps in which this rank's own work was the longest
    lag_s: float = 0.0  # summed over those: how much longer than the other ranks' median

    def mean(self, seconds: float) -> float | None:
        return seconds / self.steps if self.steps else None


class Training(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One train() of a script that trains more than once (history.json's ``trainings``): a second Trainer (SFT,
    then DPO), train() again, a hyperparameter search's trials. Its steps are the session's from ``first_step`` to
    the next training's of the session."""

    session: int
    training: int  # the how-manieth of its session's process
    first_step: int  # the record's step its first step is
    trainer: str | None = None  # the Trainer's class
    learning_rate: float | None = None  # its arguments' (or its own optimizer's, when the script gave one)
    max_steps: int | None = None  # the record's step it was to end at
    retry_batch: int | None = None  # an out-of-memory retry's batch per device (auto_find_batch_size)


class HistoryHeader(msgspec.Struct, kw_only=True):
    """history.json without its ``evals`` and ``steps`` (docs/history-schema.md)."""

    schema_version: int = SCHEMA_VERSION
    project: str
    generated_at: str | None = None
    status: Status = Status.RUNNING
    config: dict[str, Any] | None = None  # kaio's own config (secrets redacted): launch, reporting, hub
    run: RunDescription | None = None
    sessions: list[Session] = []
    devices: list[DeviceSummary] = []
    host: HostInfo | None = None
    host_use: HostUse = msgspec.field(default_factory=HostUse)
    telemetry: Telemetry = msgspec.field(default_factory=Telemetry)
    warnings: list[str] = []
    hub: HubOutcome | None = None
    checkpoints: list[CheckpointSaved] = []
    final_model: FinalModel | None = None  # the best checkpoint and whether the model ended with its weights
    stalls: list[Stall] = []
    ranks: list[RankTiming] = []
    trainings: list[Training] = []  # a script's trainings, where it trained more than once

    def run_gpu_keys(self) -> list[str]:
        """The run's GPUs, node by node, each node's as its processes see them (local rank N on the N-th)."""
        run = [d for d in self.devices if d.info.in_run]
        return [d.key for d in sorted(run, key=lambda d: (node_rank_of_gpu(d.key), *visible_order(d.key, d.info)))]


class HistoryPrefix(msgspec.Struct, kw_only=True, frozen=True):
    """Where the final steps' lines lie in the history.json last written: the next write copies those bytes
    (by the kernel, nothing encoded again) and adds only the later steps. ``inode``, ``size`` and ``ctime_ns``
    identify the file; the lines of the steps up to ``through`` are bytes ``start``..``end`` (the last one's
    closing brace); ``count`` of them, ``through``'s row having the CRC ``crc`` (a resume that trained those
    steps again changes both: the whole file is written then)."""

    inode: int
    size: int
    ctime_ns: int  # the inode's change time: any write or touch moves it, and no one can set it back
    start: int
    end: int
    through: int
    count: int
    crc: int

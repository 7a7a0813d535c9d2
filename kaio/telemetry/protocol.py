"""The wire protocol between the child's callback and the supervisor: the child's event types.

One event is one JSON object on one line, shorter than ``PIPE_BUF`` (4096
bytes) so that a single ``os.write`` to the FIFO is atomic: lines from several
ranks interleave but never tear. Each event type is declared here once, as a
``msgspec.Struct``: the child builds it, the supervisor decodes and validates
it into the same type (a line that does not fit its type is rejected, never
half-applied), and the journal stores it as it came. This module is imported
inside the trainer: the standard library and msgspec only.

Non-finite numbers: JSON has no NaN, so a metric that may be NaN/inf travels
as the tag ``"nan"``, ``"inf"`` or ``"-inf"`` (the ``Metric`` type).
"""

from __future__ import annotations

import math
import re
import signal
from typing import Any, Literal

import msgspec

PROTOCOL_VERSION = 2
MAX_LINE_BYTES = 4096  # PIPE_BUF on Linux: the atomic-write limit

# Environment variables the supervisor sets for the child.
ENV_PIPE = "KAIO_TELEMETRY_PIPE"  # path of the FIFO
ENV_SPOOL_DIR = "KAIO_SPOOL_DIR"  # where events go when the FIFO has no reader
ENV_ERROR_DIR = "KAIO_ERROR_DIR"  # where a failing rank writes its traceback
# A Log extra: the metrics a script logged as tensors on the GPU, not read (reading one waits for the GPU).
SKIPPED_GPU_TENSORS = "kaio_skipped_gpu_tensors"
# A Log extra: true when the log was too large for one line and its other extras were left out.
TRUNCATED = "kaio_truncated"
# A Log extra: what the Trainer logged as the loss, where the real average since the previous log was NaN/inf.
TRAINER_LOGGED_LOSS = "trainer_logged_loss"
# A Log extra: the key a trainer logged its training loss under, where not ``loss`` (SetFit's ``embedding_loss``).
LOSS_LOGGED_AS = "kaio_loss_logged_as"
ENV_SESSION = "KAIO_SESSION"  # session number, stamped on every event
# kaio set PYTHONSAFEPATH for the launcher and the ranks (``python -m`` would put the folder kaio runs in first on
# the import path); each rank takes it back out, so that the script's own processes run as they would without kaio.
ENV_SAFE_PATH_SET = "KAIO_SET_PYTHONSAFEPATH"
ENV_RESUME_FROM = "KAIO_RESUME_FROM"  # checkpoint a resumed session starts from
ENV_NODE_RANK = "KAIO_NODE_RANK"  # the node this child runs on (0 on one machine)
ENV_STACKS_DIR = "KAIO_STACKS_DIR"  # where each rank writes its Python stack when kaio signals it
ENV_ON_NONFINITE = "KAIO_ON_NONFINITE"  # reporting.on_nonfinite: "warn" or "stop"

# A rank's Python stack, on request (kaio.child.stacks writes it; kaio.run.stalls asks and reads): the signal,
# and the file each process appends to in ENV_STACKS_DIR, whose name says which session, rank and process.
STACK_SIGNAL = signal.SIGUSR2  # SIGUSR1 is SLURM's usual warning signal (--signal=USR1@90)
_STACK_FILE = re.compile(r"s(\d+)-r(\d+)-(\d+)\.txt")


def stack_file_name(session: int, rank: int, pid: int) -> str:
    return f"s{session}-r{rank}-{pid}.txt"


def parse_stack_file_name(name: str) -> tuple[int, int, int] | None:
    """(session, rank, pid) of a ``stack_file_name``; None for another file."""
    match = _STACK_FILE.fullmatch(name)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def stop_marker_name(session: int) -> str:
    """The file the supervisor leaves in the spool folder when it asks session ``session`` to stop, before its
    SIGTERM: a rank that set its handler only after the signal came (the launcher, which ignores SIGTERM, may start
    it later still) finds the stop there."""
    return f"stop-s{session}"


NonFiniteTag = Literal["nan", "inf", "-inf"]
# A number that may be NaN/inf, as it travels: a finite float, a tag, or null (not measured).
Metric = float | NonFiniteTag | None


class ProtocolError(ValueError):
    """A line that is not a valid event."""


class Event(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type"):
    """What every child event carries: who sent it (node, host, rank, process) and when."""

    rank: int
    session: int = 1
    node_rank: int = 0
    hostname: str | None = None
    pid: int | None = None
    seq: int | None = None  # the process's event number (the spool merge's key)
    t_wall: float | None = None
    t_mono: float | None = None


class TrainingArgs(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The ``TrainingArguments`` a report needs, as the live object had them."""

    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    learning_rate: float | None = None
    lr_scheduler_type: str | None = None
    optim: str | None = None
    optim_args: str | None = None  # "momentum=0.9" for optim="sgd": SGD's momentum buffer (the memory estimate)
    warmup_steps: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    bf16: bool | None = None
    fp16: bool | None = None
    seed: int | None = None
    max_steps: int | None = None
    num_train_epochs: float | None = None
    logging_strategy: str | None = None
    logging_steps: float | None = None
    eval_strategy: str | None = None
    eval_steps: float | None = None
    save_strategy: str | None = None
    save_steps: float | None = None
    output_dir: str | None = None
    gradient_checkpointing: bool | None = None
    use_cpu: bool | None = None
    torch_compile: bool | None = None
    include_num_input_tokens_seen: str | None = None  # "all" (padding included), "non_padding", "no"
    # What changes the loss the Trainer computes and logs (the report says so beside it)
    label_smoothing_factor: float | None = None
    neftune_noise_alpha: float | None = None
    # Seq2SeqTrainingArguments: an evaluation that generates (its metrics are of generated text, and it is slower)
    predict_with_generate: bool | None = None
    generation_max_length: int | None = None
    generation_num_beams: int | None = None


class ModelInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    name_or_path: str | None = None
    model_class: str | None = None  # the class of the model the Trainer got (a PeftModel wraps another)
    architecture: str | None = None  # config.architectures[0], or the wrapped model's class
    dtype: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    total_params: int | None = None
    trainable_params: int | None = None
    # What MFU needs (kaio.record.flops): the weights doing matmuls (all but the input embedding: tied, it counts), trained or
    # frozen, and the attention's width (heads x head size).
    trainable_matmul_params: int | None = None
    frozen_matmul_params: int | None = None
    attention_dim: int | None = None
    # What the VRAM estimate needs (kaio.record.memory): the other sizes of the blocks, and the bytes as stored.
    intermediate_size: int | None = None
    vocab_size: int | None = None
    num_heads: int | None = None
    kv_dim: int | None = None  # key/value heads x head size
    weight_bytes: int | None = None  # every parameter at its own dtype
    trainable_bytes_per_param: int | None = None


class PeftInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    peft_type: str | None = None  # LORA, ...
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] | str | None = None
    adapted_modules: list[str] = []  # the adapted modules inside the decoder layers, by leaf name (q_proj, ...)
    modules_to_save: list[str] = []  # trained whole beside the adapters (a copy of lm_head...)
    use_dora: bool = False  # LoRA's weight-decomposed variant (DoRA): a magnitude vector trained too
    use_rslora: bool = False  # rank-stabilised LoRA: the adapters scaled by alpha / sqrt(r), not alpha / r
    num_virtual_tokens: int | None = None  # prompt, prefix and p-tuning: the virtual tokens learned
    feedforward_modules: list[str] | str | None = None  # IA3: the targets scaled on their input, not output


class Environment(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the child ran on and with: versions, machine, the script's source revision."""

    python: str | None = None
    torch: str | None = None
    cuda: str | None = None
    rocm: str | None = None
    transformers: str | None = None
    peft: str | None = None
    accelerate: str | None = None
    trl: str | None = None
    kaio: str | None = None
    hostname: str | None = None
    cpu: str | None = None
    gpus: list[str] = []
    git_commit: str | None = None
    git_dirty: bool | None = None
    argv: list[str] = []


class RunStart(Event, tag="run_start"):
    """Once per rank at ``on_train_begin``: what is being trained, from the live objects."""

    reporter: Literal["trainer", "kaio.log"] = "trainer"  # a transformers Trainer, or a plain loop calling kaio.log
    integrations: list[str] = []  # the Trainer's own reporting callbacks (report_to: CometCallback, WandbCallback...)
    world_size: int | None = None
    process_index: int | None = None
    local_rank: int | None = None
    distributed_type: str | None = None
    # checkpoint-N folders (their steps) already in the output_dir as a training began from step 0: another run's,
    # which this one's checkpoint rotation may delete, and a resume may take (rank 0's)
    checkpoints_before: list[int] = []
    start_step: int = 0
    max_steps: int | None = None
    # The how-manieth training of this process (a script may build several Trainers, or train() again), and what
    # is added to its Trainer's own steps to record them after the earlier trainings' (start_step and max_steps
    # include it).
    training: int = 1
    step_offset: int = 0
    trainer: str | None = None  # the Trainer's class (SFTTrainer, DPOTrainer...)
    # The evaluations before the script's first training (their t_wall) whose model this training shares no weight
    # with (a teacher's, a reference's): not the run's, which only became known when the training began.
    other_model_evals: list[float] = []
    # The Trainer began this training again itself, after the previous attempt ran out of memory
    # (auto_find_batch_size, each attempt with a smaller batch): not the script's doing.
    retry: bool = False
    start_tokens: int | None = None  # the Trainer's input tokens at train begin: a checkpoint's count, resumed
    # Who counts the input tokens: the Trainer (include_num_input_tokens_seen, all ranks gathered), or else kaio
    # (each micro-batch's input_ids, padding included, as the Trainer's "all" would: ``Step.tokens``).
    tokens_counted_by: Literal["trainer", "kaio"] | None = None
    device: str | None = None
    # The Trainer's accelerator's mixed precision ("no", "bf16", "fp16", "fp8"): set by the TrainingArguments, or by
    # `accelerate launch --mixed_precision bf16` / ACCELERATE_MIXED_PRECISION, which the arguments do not show.
    mixed_precision: str | None = None
    args: TrainingArgs = msgspec.field(default_factory=TrainingArgs)
    model: ModelInfo | None = None
    peft: PeftInfo | None = None
    tokenizer: str | None = None
    # The script passed the Trainer its own optimizer (Trainer(optimizers=(opt, sched)), optimizer_cls_and_kwargs):
    # args.optim and args.learning_rate did not make it. Its class, its learning rate at train begin, and its
    # scheduler's class when the script passed one too.
    script_optimizer: str | None = None
    script_learning_rate: float | None = None
    script_lr_scheduler: str | None = None
    script_momentum: bool = False  # the script's SGD keeps a momentum buffer per parameter (its memory estimate)
    # A resumed Trainer's values from its checkpoint where its arguments (or schedule) asked for others: name ->
    # (what it used, what was asked). learning_rate (the scheduler's restored base rate), logging_steps,
    # eval_steps, save_steps (trainer_state.json's), first_step_learning_rate (the rate the checkpoint's optimizer
    # held, which the first resumed step trains with, against the schedule's there: 0.0 after a finished schedule).
    kept_from_checkpoint: dict[str, tuple[float, float]] = {}
    train_samples: int | None = None
    eval_samples: int | None = None
    eval_sets: int | None = None  # several eval datasets (a dict): how many, each evaluated on its own
    # The training DataLoader's batch per device, where it is not the arguments' (a script's own
    # get_train_dataloader with its batch size, auto_find_batch_size's smaller one).
    loader_batch_size: int | None = None
    environment: Environment | None = None
    # Written by kaio before protocol 2 (kept so that old journals still read): now in ``model``.
    trainable_params: int | None = None
    total_params: int | None = None
    architecture: str | None = None

    @property
    def per_device_batch_size(self) -> int | None:
        return self.loader_batch_size or self.args.per_device_train_batch_size

    @property
    def samples_per_step(self) -> int | None:
        """Examples in one optimizer step: per device x accumulation x world size (None if one is unknown)."""
        parts = (self.per_device_batch_size, self.args.gradient_accumulation_steps, self.world_size)
        if all(isinstance(p, int) for p in parts):
            return parts[0] * parts[1] * parts[2]  # type: ignore[operator]
        return None


class Step(Event, tag="step"):
    """Every optimizer step, from every rank."""

    step: int
    epoch: float | None = None
    step_time_s: float | None = None  # on_step_begin -> on_step_end on this rank
    peak_vram_bytes: int | None = None  # the allocator's peak during the step; None without a GPU
    tokens_seen: int | None = None  # the Trainer's count, all ranks (include_num_input_tokens_seen)
    tokens: int | None = None  # the input_ids in this rank's micro-batches of the step, counted by kaio
    samples: int | None = None  # the examples in this rank's micro-batches of the step (an epoch's last may be short)
    evaluates: bool = False  # the Trainer evaluates after this step...
    saves: bool = False  # ...and/or saves a checkpoint, before the next one
    # This rank's own work before its first collective (kaio.child.timing): what tells a straggler.
    data_s: float | None = None  # fetching the step's micro-batches
    forward_s: float | None = None  # their forward passes (on a GPU: the ones completed by now)
    # A rank but the first: the first step whose own loss was NaN/inf, found at the Trainer's previous log (the
    # logged loss is the ranks' mean, which the Trainer's logging_nan_inf_filter keeps finite). Sent once.
    loss_nonfinite_from: int | None = None
    loss_nonfinite: str | None = None  # its kind: "nan", "inf" or "-inf"


class Log(Event, tag="log"):
    """Rank 0's Trainer logs: the training metrics, and any other number it logged in ``extra``."""

    step: int | None = None
    loss: Metric = None
    learning_rate: Metric = None
    grad_norm: Metric = None
    epoch: float | None = None
    extra: dict[str, Any] = {}
    nonfinite_from: int | None = None  # the first step since the previous log whose training loss was NaN/inf
    # The Trainer logged NaN/inf only from an earlier loss kept in its running sum (logging_nan_inf_filter=False):
    # ``loss`` is this log's own losses' average (kaio.child.nonfinite), the Trainer's is extra's trainer_logged_loss.
    nonfinite_carried: bool = False
    # The script's own log from inside training_step (its compute_loss's, at the Trainer's step before the one
    # training): ``extra`` holds each number's mean over the micro-batches logged so far at ``step``; a ``loss``
    # there is the script's, not the step's.
    within_step: bool = False


class Eval(Event, tag="eval"):
    """An evaluation (``on_evaluate``) on rank 0: its metrics as the Trainer returned them."""

    step: int
    epoch: float | None = None
    metrics: dict[str, Metric] = {}
    not_numbers: list[str] = []  # metrics whose values are not numbers (a string, a list): left out of ``metrics``
    left_out: int = 0  # metrics left out to keep the event one line (hundreds of per-class figures)
    prediction: bool = False  # Trainer.predict()'s (on_predict), not an evaluation
    other_model: bool = False  # a Trainer of a model none of the script's trainings trained (a teacher's)
    # Rank 0's batches whose loss was NaN/inf, of its batches: the Trainer's eval_loss leaves them out
    # (logging_nan_inf_filter). 0 where none was, or the filter is off (the eval_loss is then NaN itself).
    loss_batches_nonfinite: int = 0
    loss_batches: int = 0
    # How long it took where its metrics do not say (no ``<prefix>_runtime``): a kaio.log loop's, from the step's
    # report to the evaluation's.
    runtime_s: float | None = None


class Pause(Event, tag="pause"):
    """After step ``step``'s event, every rank: the Trainer evaluates and/or saves before the next step, which that
    event could not announce (an epoch strategy's, set at the epoch's end; a later callback's; the script's own
    ``trainer.evaluate()`` during the training). The supervisor gives the pause its budget, not a step's."""

    step: int
    evaluates: bool = False
    saves: bool = False


class Save(Event, tag="save"):
    """A checkpoint was written (rank 0)."""

    step: int
    path: str | None = None
    duration_s: float | None = None  # since the step (or the evaluation after it) ended: the time saving took
    removed: list[str] = []  # this training's earlier checkpoints gone since the previous save (save_total_limit)


class TrainEnd(Event, tag="train_end"):
    """``on_train_end``, every rank."""

    step: int | None = None
    # Rank 0: the checkpoints this training saved that are gone at its end (save_total_limit with
    # load_best_model_at_end removes the last one), and the one whose weights the model ends with.
    checkpoints_removed: list[str] = []
    best_loaded: str | None = None
    # Rank 0: load_best_model_at_end was asked, but the best evaluation's step saved no checkpoint, so the Trainer
    # loaded none: the step (None where the Trainer does not say it), and the metric's name and value.
    best_unsaved: bool = False
    best_unsaved_step: int | None = None
    stopped: bool = False  # the graceful stop ended it (asked here, or of another node's kaio)
    # Rank 0: what ended the training before its max_steps, where kaio can tell (an early-stopping callback).
    ended_early_by: str | None = None
    # Rank 0, with metric_for_best_model: the Trainer's best checkpoint and its metric (eval_accuracy, ...).
    best_checkpoint: str | None = None
    best_metric: Metric = None
    best_metric_name: str | None = None
    greater_is_better: bool | None = None


class ScriptEnd(Event, tag="script_end"):
    """The script (or the built-in recipe) returned, every rank, before any stop reached it: only the
    interpreter's exit is left, which a stop asked for from now on would cut short for nothing (the rank
    ignores it: kaio.child.__main__)."""


ChildEvent = RunStart | Step | Log | Eval | Pause | Save | TrainEnd | ScriptEnd


class RankError(msgspec.Struct, kw_only=True):
    """A failing rank's own account: ``<error dir>/error-r<rank>-<pid>.json`` (as torch elastic's ``@record``)."""

    rank: int
    session: int = 1
    pid: int | None = None
    t_wall: float | None = None
    exc_type: str | None = None
    message: str | None = None
    root_cause: str  # the traceback's last line: "ValueError: ..."
    traceback: str | None = None


LAUNCHER_FAILED = "the launcher: "  # a session's error that the launcher itself raised, before its ranks ran


class LaunchFailure(msgspec.Struct, kw_only=True):
    """The launcher's account of the first rank that failed: ``<error dir>/launch-s<session>.json``.

    Written from torch elastic's own failure record, so that a rank killed by a
    signal (which cannot write a ``RankError``) is named too.
    """

    session: int = 1
    rank: int | None  # None: the launcher itself failed before its ranks ran (a rendezvous that timed out)
    pid: int | None = None
    exit_code: int | None = None
    signal: str | None = None  # "SIGKILL" when the rank was killed
    message: str | None = None
    t_wall: float | None = None  # when torch elastic saw it fail


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(ChildEvent)
_EVAL_KEPT_FIRST = ("_loss", "_runtime", "_per_second")  # what an evaluation too large to send keeps first


def to_json(value: object) -> bytes:
    """``value`` as JSON. A path read under an ASCII locale without UTF-8 mode (``PYTHONUTF8=0 LC_ALL=C``)
    holds the surrogates Python gives undecodable bytes, which JSON cannot carry: it is written as the UTF-8
    text those bytes are."""
    try:
        return _ENCODER.encode(value)
    except UnicodeEncodeError:
        return _ENCODER.encode(_displayable(msgspec.to_builtins(value)))


def _displayable(value: object) -> object:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_displayable(k): _displayable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_displayable(v) for v in value]
    return value


def encode(event: ChildEvent) -> bytes:
    """One event as one line of bytes, guaranteed shorter than ``MAX_LINE_BYTES``.

    An event too large is shrunk by dropping its free-form parts (a log's
    ``extra``, a run_start's environment) or keeping the newest of the
    checkpoints it says were removed; if still too large, ``ProtocolError``.
    """
    line = to_json(event) + b"\n"
    if len(line) >= MAX_LINE_BYTES:
        if isinstance(event, Log) and event.extra:
            return encode(msgspec.structs.replace(event, extra={TRUNCATED: True}))
        if isinstance(event, RunStart) and event.environment is not None:
            return encode(msgspec.structs.replace(event, environment=None))
        if isinstance(event, Eval) and len(event.metrics) > 1:  # per-class figures of hundreds of labels
            first = sorted(event.metrics, key=lambda name: not name.endswith(_EVAL_KEPT_FIRST))  # loss, speed: kept
            kept = {name: event.metrics[name] for name in first[: len(first) // 2]}
            left = event.left_out + len(event.metrics) - len(kept)
            return encode(msgspec.structs.replace(event, metrics=kept, left_out=left))
        if isinstance(event, (Save, TrainEnd)):  # hundreds of checkpoints removed at once: the newest ones
            listed = event.removed if isinstance(event, Save) else event.checkpoints_removed
            if len(listed) > 8:
                field = "removed" if isinstance(event, Save) else "checkpoints_removed"
                return encode(msgspec.structs.replace(event, **{field: listed[-8:]}))
        raise ProtocolError(f"event of type {type(event).__name__} is {len(line)} bytes, over {MAX_LINE_BYTES}")
    return line


def decode(line: bytes | str) -> ChildEvent:
    """Parse and validate one line; ``ProtocolError`` for anything that is not a known, well-formed event."""
    try:
        return _DECODER.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(str(exc)) from None


def tag_nonfinite(value: float) -> float | NonFiniteTag:
    """A float as it travels: itself when finite, else its tag."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")

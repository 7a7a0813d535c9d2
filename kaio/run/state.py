"""``RunState``: what is known of a project's run, built by applying journal records in order.

It is built live by the supervisor (on its main thread) and offline by ``kaio
report`` replaying the journal, so both produce the same record. It composes
four parts, each with one job, and saves them together (``encode``) into the
index with the journal offset they cover:

* ``RunLedger``: sessions, what was trained, devices, checkpoints, Hub, counters;
* ``StepAssembler``: every rank's events and the GPU samples merged into final
  step entries, which go to the index (and to whoever listens: Comet);
* ``LiveStats``: the recent windows the dashboard shows;
* ``Warnings``: what went wrong or looks wrong, capped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import PurePath

import msgspec

from kaio.config import flag_value
from kaio.devices.base import device_order
from kaio.record import rules
from kaio.record.flops import Throughput
from kaio.record.index import RunIndex, smoother_at
from kaio.record.rules import LossSmoother
from kaio.record.types import (
    HALF_PRECISIONS,
    CheckpointSaved,
    ChildStarted,
    Devices,
    DeviceSummary,
    Eval,
    EvalEntry,
    FinalModel,
    HistoryHeader,
    HistoryPrefix,
    HubOutcome,
    Log,
    Note,
    Pause,
    Record,
    RunDescription,
    RunStart,
    Save,
    ScriptEnd,
    SessionEnd,
    SessionStart,
    Stall,
    Status,
    Step,
    StepEntry,
    TickRecord,
    TrainEnd,
    finite,
    nonfinite_tag,
)
from kaio.run.assembly import StepAssembler, iso
from kaio.run.ledger import RunLedger
from kaio.run.live import LiveStats, build_snapshot, silenced_warning
from kaio.run.snapshot import SNAPSHOT_WARNINGS, Snapshot
from kaio.run.stalls import stall_lines
from kaio.run.stragglers import StragglerWatch

MAX_WARNINGS = 200
RESUME_FAILED_AT_ONCE = "the resume from "  # its warning (SessionEndings), taken back once a later session trains
STATE_FORMAT = 4  # 2: stragglers; 3: the steps' samples in their own part (StepSamples); 4: the trainings


class Warnings(msgspec.Struct, kw_only=True):
    items: list[str] = []
    dropped: int = 0  # beyond MAX_WARNINGS (e.g. a NaN loss at every step: the summary counts those)

    def add(self, text: str) -> None:
        if text in self.items:
            return
        if len(self.items) >= MAX_WARNINGS:
            self.dropped += 1
            return
        self.items.append(text)

    def withdraw(self, prefix: str) -> bool:
        """Take back the warnings that begin with ``prefix`` (what came after showed them unfounded)."""
        kept = [text for text in self.items if not text.startswith(prefix)]
        withdrawn, self.items = len(kept) != len(self.items), kept
        return withdrawn

    def said(self, prefix: str) -> bool:
        return any(text.startswith(prefix) for text in self.items)

    def listed(self) -> list[str]:
        more = [f"{self.dropped} more warnings not kept (the first {MAX_WARNINGS} are listed)"] if self.dropped else []
        return self.items + more


class StateParts(msgspec.Struct, kw_only=True):
    """Everything ``RunState`` knows but the sealed steps (those are in the index)."""

    format: int = STATE_FORMAT
    records: int = 0  # records applied: the state changes with each
    history_mark: tuple[int, int, int] | None = None  # (records, size, mtime) when history.json was last written
    history_prefix: HistoryPrefix | None = None  # where its final steps lie in it: the next write copies them
    ledger: RunLedger
    steps: StepAssembler = msgspec.field(default_factory=StepAssembler)
    live: LiveStats = msgspec.field(default_factory=LiveStats)
    warnings: Warnings = msgspec.field(default_factory=Warnings)
    stragglers: StragglerWatch = msgspec.field(default_factory=StragglerWatch)


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(StateParts)


class RunState:
    def __init__(self, project: str, index: RunIndex, parts: StateParts | None = None) -> None:
        self.index = index
        self.parts = parts if parts is not None else StateParts(ledger=RunLedger(project=project))
        self.sealed_listeners: list[Callable[[StepEntry], None]] = []  # each sealed step, once (Comet)
        self.eval_listeners: list[Callable[[EvalEntry], None]] = []
        self._throughput: Throughput | None = None  # derived from the ledger; None: to be derived again

        self._handlers: dict[type, Callable] = {
            SessionStart: self._on_session_start,
            SessionEnd: self._on_session_end,
            ChildStarted: self.ledger.on_child_started,
            Devices: self._on_devices,
            HubOutcome: self.ledger.on_hub,
            Note: self._on_note,
            Stall: self._on_stall,
            TickRecord: self._on_tick,
            RunStart: self._on_run_start,
            Step: self._on_step,
            Log: self._on_log,
            Eval: self._on_eval,
            Pause: self._on_pause,
            Save: self._on_save,
            TrainEnd: self._on_train_end,
            ScriptEnd: self._on_script_end,
        }

    @property
    def ledger(self) -> RunLedger:
        return self.parts.ledger

    @property
    def project(self) -> str:
        return self.ledger.project

    @property
    def status(self) -> Status:
        return self.ledger.status

    @property
    def last_step(self) -> int:
        return max(self.parts.steps.sealed_through, max(self.parts.steps.open, default=0))

    # ------------------------------------------------------------------ persistence

    def encode(self) -> bytes:
        return _ENCODER.encode(self.parts)

    @classmethod
    def decode(cls, data: bytes, index: RunIndex) -> RunState:
        """A state saved by ``encode``; ``ValueError`` if it is not one (another kaio's)."""
        parts = _DECODER.decode(data)
        if parts.format != STATE_FORMAT:
            raise ValueError(f"state format {parts.format} is not {STATE_FORMAT}")
        return cls(parts.ledger.project, index, parts)

    # ------------------------------------------------------------------ applying records

    def apply(self, record: Record) -> None:
        self.parts.records += 1
        self._handlers[type(record)](record)
        t_wall = record.t_wall
        if t_wall is not None and (self.ledger.last_t_wall is None or t_wall > self.ledger.last_t_wall):
            self.ledger.last_t_wall = t_wall
        pid, seq = getattr(record, "pid", None), getattr(record, "seq", None)
        if seq is not None and pid is not None:
            self.ledger.received.add(pid, seq)

    def _on_session_start(self, r: SessionStart) -> None:
        self._throughput = None
        self.parts.steps.seal_all(self)
        self.ledger.note_energy(self.parts.live.latest_gpu)  # the last session's, before its samples go
        self.ledger.on_session_start(r)
        self.parts.steps.start_session(r.session)
        self.parts.live.start_session()
        self.parts.stragglers.start_session()
        lead = self.ledger.lead_rank
        self.parts.steps.lead_rank = self.parts.live.lead_rank = self.parts.stragglers.lead_rank = lead

    def _on_session_end(self, r: SessionEnd) -> None:
        self.parts.steps.seal_all(self)
        self.ledger.on_session_end(r)

    def _on_note(self, r: Note) -> None:
        if r.level == "info":
            self.ledger.add_note(r.text)
        else:
            self.warn(r.text)

    def _on_stall(self, r: Stall) -> None:
        self.ledger.on_stall(r)
        for line in stall_lines(r):
            self.warn(line)

    def _on_run_start(self, r: RunStart) -> None:
        self._throughput = None
        self.ledger.telemetry.events += 1
        before = self.ledger.run
        problem = self.ledger.on_run_start(r)
        if problem is not None:
            self.warn(problem)
        if r.rank == self.ledger.lead_rank:
            shifted = _data_place_shifted(before, r)
            if shifted is not None:
                self.warn(shifted)
            if r.start_step and r.training == 1 and self.parts.steps.sealed_through == 0 and not self.parts.steps.open:
                _record_begins_later(self.parts, r)
            for warning in _run_start_warnings(r, self.ledger.config):
                self.warn(warning)
            if r.other_model_evals:  # evaluated before the training began, by a model it does not train
                self.index.mark_other_model(r.session, {iso(t) for t in r.other_model_evals})
            self.parts.steps.resume_at(r.start_step, self, counts_from_zero=r.reporter == "kaio.log")
            if r.training > 1:  # a script's second Trainer, or train() again: its steps follow the earlier ones
                _later_training_begins(self.parts, r)
        self.parts.stragglers.on_run_start(r)

    def _on_step(self, r: Step) -> None:
        ledger = self.parts.ledger
        ledger.telemetry.events += 1
        self.parts.live.on_step(r)
        throughput = None
        if r.rank == self.parts.steps.lead_rank:  # RunLedger.lead_rank, kept at the session's start
            if ledger.on_step(r.session, r.step, r.t_wall):  # a session's first step: a failed resume is behind
                self.parts.warnings.withdraw(RESUME_FAILED_AT_ONCE)
            throughput = self._throughput_of_run()
        if not self.parts.steps.on_step(r, throughput, self):
            ledger.telemetry.dropped_late_events += 1
        elif throughput is not None and self.parts.steps.counts.last_samples_seen:
            self.parts.live.on_samples_seen(r.step, self.parts.steps.counts.last_samples_seen)
        found = self.parts.stragglers.on_step(r)
        if found is not None:
            entry = self.parts.steps.open.get(found.step)
            if entry is not None:  # else sealed already: the run's totals still count it
                entry.slowest_rank, entry.rank_lag_s = found.slowest_rank, found.lag_s
            if found.warning is not None:
                self.warn(found.warning)

    def _on_log(self, r: Log) -> None:
        self.ledger.telemetry.events += 1
        self.parts.steps.on_log(r, self)
        entry = self.parts.steps.open.get(r.step) if r.step is not None else None
        self.parts.live.on_log(r, entry, self.parts.steps.smoother.count)

    def _throughput_of_run(self) -> Throughput | None:
        """Derived once from what it depends on (the run description, the devices, the config), which the
        handlers of RunStart, Devices and SessionStart reset."""
        if self._throughput is None:
            self._throughput = self.ledger.throughput()
        return self._throughput

    def _on_devices(self, r: Devices) -> None:
        self._throughput = None
        self.ledger.on_devices(r)

    def _on_eval(self, r: Eval) -> None:
        self.ledger.telemetry.events += 1
        for name in r.not_numbers:
            self.ledger.add_note(rules.not_a_number_note(name))
        end = self.ledger.last_train_end
        after = self.ledger.trained_to_end(r.session)
        loaded = end.best_loaded if after and end is not None and end.session == r.session else None
        entry = EvalEntry(
            step=r.step,
            session=r.session,
            epoch=r.epoch,
            timestamp=iso(r.t_wall),
            metrics={k: finite(v) for k, v in r.metrics.items()},
            nonfinite={k: tag for k, v in r.metrics.items() if (tag := nonfinite_tag(v)) is not None},
            after_training=after,
            weights=PurePath(loaded).name if loaded else None,
            before_training=self.ledger.run is None or self.ledger.run.session != r.session,
            prediction=r.prediction,
            other_model=r.other_model,
        )
        for text in _evaluation_warnings(r, entry.loss, self.parts.warnings):
            self.warn(text)
        # What its log() added to the evaluation joins it; another model's Trainer logged at its own step 0.
        self.parts.steps.evaluated(r.step, entry.metrics, of_the_run=not entry.other_model)
        self.index.add_eval(entry)
        runtime = rules.evaluation_runtime(entry.metrics, measured=r.runtime_s)
        if runtime is not None and not entry.after_training:  # after train(): not a pause between steps
            self.parts.steps.add_pause(r.step, eval_s=runtime)
        elif runtime is not None:
            self.parts.steps.evaluated_after_training(runtime)
        live = self.parts.live
        if entry.other_model:
            return  # not the run's evaluation: the record lists it, the dashboard, Comet and the summary do not
        live.evaluated_in_session = True
        if entry.loss is not None and (live.eval_loss is None or entry.eval_set == live.eval_set):
            live.eval_loss, live.eval_set = entry.loss, entry.eval_set  # one dataset's, not each in turn
        for listener in self.eval_listeners:
            listener(entry)

    def _on_save(self, r: Save) -> None:
        self.ledger.telemetry.events += 1
        self.ledger.on_save(r)
        if r.duration_s is not None:
            self.parts.steps.add_pause(r.step, save_s=r.duration_s)

    def _on_train_end(self, r: TrainEnd) -> None:
        self.ledger.telemetry.events += 1
        self.ledger.on_train_end(r)
        if r.best_unsaved:
            self.warn(_best_not_loaded(r))

    def _on_pause(self, r: Pause) -> None:
        self.ledger.telemetry.events += 1  # (the supervisor's stall watch reads it as it arrives too)
        self.parts.live.on_pause(r)

    def _on_script_end(self, r: ScriptEnd) -> None:
        self.ledger.telemetry.events += 1
        self.ledger.on_script_end(r)

    def _on_tick(self, r: TickRecord) -> None:
        self.ledger.telemetry.samples += 1
        live = self.parts.live
        for key in live.on_gpus(r.gpus, self.ledger.run_keys):
            self.warn(silenced_warning(key, self.last_step))
        if r.host is not None:
            live.latest_host = r.host
            self.ledger.add_host_sample(r.host.cpu_pct, r.host.ram_used_bytes)
        self.parts.steps.on_tick(r, self.ledger.run_keys, self)

    # ------------------------------------------------------------------ AssemblyOutput

    def sealed(self, entry: StepEntry) -> None:
        self.index.add_step(entry)
        for listener in self.sealed_listeners:
            listener(entry)

    def warn(self, text: str) -> None:
        self.parts.warnings.add(text)

    def note(self, text: str) -> None:
        self.ledger.add_note(text)

    def throughput(self, tokens_per_s_per_device: float, mfu: float | None) -> None:
        self.parts.live.tokens_per_s_per_device, self.parts.live.mfu = tokens_per_s_per_device, mfu

    def truncate_after(self, step: int) -> LossSmoother:
        self.recomputed(*self.index.work_after(step))  # trained again from checkpoint-<step>: their time was lost
        self.index.truncate_after(step)
        self.ledger.trained_again_after(step)
        return smoother_at(self.index, step)

    def logged_at_step_0(self, name: str, value: float) -> None:
        self.index.add_metric(0, name, value)

    def seen_at(self, step: int) -> tuple[int | None, int | None]:
        return self.index.seen_at(step)

    def recomputed(self, steps: int, seconds: float) -> None:
        telemetry = self.ledger.telemetry
        telemetry.recomputed_steps += steps
        telemetry.recomputed_s = round(telemetry.recomputed_s + seconds, 3)

    # ------------------------------------------------------------------ views

    def header(self, uploading: HubOutcome | None = None) -> HistoryHeader:
        """history.json without its evals and steps (those come from the index). ``uploading``: the files are
        those a Hub push uploads: the push instead of the latest outcome (an earlier commit, or its failure)."""
        self.ledger.note_energy(self.parts.live.latest_gpu)
        return history_header(self.parts, uploading)

    @contextlib.contextmanager
    def with_open_steps(self) -> Iterator[RunIndex]:
        """The index with the steps still open in it as they are now, for a report written now;
        they leave it again after (they are sealed when final)."""
        with self.index.provisional():
            for step in sorted(self.parts.steps.open):
                if step > self.parts.steps.sealed_through:
                    self.index.add_step(self.parts.steps.open[step])
            yield self.index

    def snapshot(
        self,
        *,
        status: str | None = None,
        log_tail: tuple[str, ...] = (),
        live_warnings: tuple[str, ...] = (),
        report_path: str | None = None,
    ) -> Snapshot:
        """``live_warnings``: what is going on now (a stall's seconds), shown after the recorded warnings."""
        recorded = self.parts.warnings
        carried = recorded.items[-SNAPSHOT_WARNINGS:]
        self.ledger.note_energy(self.parts.live.latest_gpu)
        return build_snapshot(
            self.ledger,
            self.parts.live,
            self.last_step,
            (*carried, *live_warnings),
            warnings_before=len(recorded.items) - len(carried) + recorded.dropped,
            live_warnings=live_warnings,
            status=status,
            log_tail=log_tail,
            report_path=report_path,
        )

    def median_step_time(self) -> float | None:
        return self.parts.live.median_step_time()

    @property
    def last_step_t_mono(self) -> float | None:
        return self.parts.live.last_step_t_mono


def history_header(parts: StateParts, uploading: HubOutcome | None = None) -> HistoryHeader:
    ledger = parts.ledger
    run = RunDescription.from_run_start(ledger.run) if ledger.run is not None else None
    devices = [
        DeviceSummary(key=key, info=d.info, energy_j=d.energy_j, energy_method=d.energy_method)
        for key, d in sorted(ledger.devices.items(), key=lambda item: device_order(item[0]))
    ]
    derived = ledger.derived_notes() if uploading is None else []  # of the Hub's outcomes, which it stands for
    return HistoryHeader(
        project=ledger.project,
        generated_at=iso(time.time()),
        status=ledger.status,
        config=ledger.config,
        run=run,
        sessions=[ledger.as_of_now(s) for s in ledger.sessions],
        devices=devices,
        host=ledger.host,
        host_use=ledger.host_use,
        telemetry=(
            msgspec.structs.replace(ledger.telemetry, notes=[*ledger.telemetry.notes, *derived])
            if derived
            else ledger.telemetry
        ),
        warnings=parts.warnings.listed(),
        hub=ledger.hub if uploading is None else uploading,
        checkpoints=[
            CheckpointSaved(step=c.step, path=c.path, session=c.session, training=c.training)
            for c in ledger.checkpoints
        ],
        final_model=_final_model(ledger.last_train_end) if ledger.trained_to_end(ledger.session) else None,
        stalls=list(ledger.stalls),
        ranks=parts.stragglers.summary(),
        trainings=ledger.trainings if any(t.training > 1 for t in ledger.trainings) else [],
    )


def nonfinite_since(state: RunState) -> int | None:
    """The step from which every logged loss was NaN/inf to the end of the record (``RunIndex.nonfinite_since``),
    the steps still open included: a stop's message is written before they are sealed."""
    with state.with_open_steps() as index:
        return index.nonfinite_since()


_PART_OF_THE_DATA = "an evaluation loss of part of the data: "


def _evaluation_warnings(r: Eval, loss: float | None, warnings: Warnings) -> list[str]:
    said = []
    if r.left_out:
        said.append(f"the evaluation at step {r.step} returned too many metrics for one record: {r.left_out} left out")
    if r.loss_batches_nonfinite and loss is not None and not warnings.said(_PART_OF_THE_DATA):
        said.append(
            f"{_PART_OF_THE_DATA}at step {r.step}, eval_loss {loss:.4g} leaves out {r.loss_batches_nonfinite} of rank "
            f"0's {r.loss_batches} batches, whose loss was NaN/inf (the Trainer's logging_nan_inf_filter drops them); "
            "later evaluations may too (said once)"
        )
    return said


def _best_not_loaded(end: TrainEnd) -> str:
    value = end.best_metric if isinstance(end.best_metric, str) else f"{end.best_metric:.4g}"
    at = f" at step {end.best_unsaved_step}" if end.best_unsaved_step is not None else ""
    return (
        f"load_best_model_at_end loaded no checkpoint: the best evaluation ({end.best_metric_name} {value}{at}) was "
        "at a step that saved none (save_steps coarser than eval_steps), so the final model has the last step's "
        f"weights (step {end.step}), not the best's"
    )


def _final_model(end: TrainEnd | None) -> FinalModel | None:
    if end is None:
        return None
    # A stopped training has no final model (the script's save after train() did not run): its best checkpoint only.
    loaded = None if end.stopped else end.best_loaded
    if not (end.best_checkpoint or loaded):
        return None
    return FinalModel(
        best_checkpoint=end.best_checkpoint,
        metric=end.best_metric_name,
        value=end.best_metric,
        greater_is_better=end.greater_is_better,
        loaded=loaded,
    )


def _data_place_shifted(before: RunStart | None, r: RunStart) -> str | None:
    """A resume whose optimizer step takes another number of examples than the checkpoint's steps did (the world
    size, the batch or the accumulation changed): the Trainer finds its place in the data by counting the steps
    done in batches of the new size, so examples are skipped or trained again."""
    if before is None or before.session == r.session or r.training != 1 or not r.start_step:
        return None
    old, new = before.samples_per_step, r.samples_per_step
    if old is None or new is None or old == new:
        return None
    shapes = [
        f"{name} {a} -> {b}"
        for name, a, b in (
            ("world size", before.world_size, r.world_size),
            ("per-device batch", before.per_device_batch_size, r.per_device_batch_size),
            ("gradient accumulation", before.args.gradient_accumulation_steps, r.args.gradient_accumulation_steps),
        )
        if a != b
    ]
    done = "skipped" if new > old else "trained again"
    return (
        f"session {r.session}: resumed with {new} examples per optimizer step where the checkpoint's {r.start_step} "
        f"steps took {old} ({', '.join(shapes)}): the Trainer finds its place in the data by counting those steps in "
        f"batches of the new size, so about {abs(new - old) * r.start_step:,} examples were {done}"
    )


def _later_training_begins(parts: StateParts, r: RunStart) -> None:
    """A script's later training (another Trainer, train() again): its steps, losses and speed its own."""
    if parts.warnings.withdraw(_resumed_at_its_end(r.session, r.start_step)):  # the first training: a finished phase
        parts.ledger.add_note(
            f"session {r.session}: the script's first training resumed at its end (step {r.start_step}) and "
            "trained no step; its later training went on from there"
        )
    parts.steps.continue_counts_at(r.start_step)
    parts.steps.smoother = LossSmoother()  # maybe another objective (SFT, then DPO): its own curve
    parts.live.last_end = None  # the gap before its first step is no step's: not in the speed
    parts.ledger.add_note(_later_training_note(r))


def _record_begins_later(parts: StateParts, r: RunStart) -> None:
    """The first training of the record begins after step 1: its steps and counts are from there."""
    parts.steps.begin_counts_at(r.start_step, r.start_tokens)
    began = (
        f"the loop's first kaio.log step was {r.start_step + 1}"
        if r.reporter == "kaio.log"
        else f"the Trainer began at step {r.start_step} (the script resumed it from a checkpoint of its own)"
    )
    parts.ledger.add_note(f"session {r.session}: {began}: steps 1-{r.start_step} are not in this record")


def _run_start_warnings(r: RunStart, config: dict | None) -> list[str]:
    """What the lead rank's description of its training says is amiss."""
    return [
        *_resumed_against_the_arguments(r),
        *_precision_not_taken(r, config),
        *_twice(r, config),
        *_checkpoints_already_there(r),
    ]


def _checkpoints_already_there(r: RunStart) -> list[str]:
    """A training that began from step 0 in an output_dir holding checkpoints (two projects sharing the default
    trainer_output/, a run started over there by hand): they are another run's."""
    if not r.checkpoints_before or r.training != 1:
        return []
    found = ", ".join(f"checkpoint-{step}" for step in r.checkpoints_before[:5])
    more = f" and {len(r.checkpoints_before) - 5} more" if len(r.checkpoints_before) > 5 else ""
    return [
        f"session {r.session}: the script's output_dir ({r.args.output_dir}) already held {found}{more} as the "
        "training began from step 0: another run's? This run saves beside them, its save_total_limit may delete "
        "them, and a resume may take the newest; give each run an output_dir of its own"
    ]


def _twice(r: RunStart, config: dict | None) -> list[str]:
    """The script's Trainer reports to Comet ML itself (report_to) while kaio does: two experiments of one run."""
    kaios = ((config or {}).get("reporting") or {}).get("use_comet_ml", True)
    if not kaios or "CometCallback" not in r.integrations or r.training > 1:
        return []
    return [
        "the script's Trainer reports to Comet ML itself (report_to includes comet_ml, or all), as kaio does: two "
        "experiments of one run, the Trainer's restarting its steps at each training; set report_to='none' in the "
        "script (kaio's experiment has the run), or reporting.use_comet_ml: false"
    ]


def _precision_not_taken(r: RunStart, config: dict | None) -> list[str]:
    """Half precision asked for (the training arguments, or `accelerate_args`' --mixed_precision) where the
    accelerator does not autocast it (fp16 on the CPU): the training ran in fp32."""
    flag = flag_value(((config or {}).get("launch") or {}).get("accelerate_args") or [], "--mixed_precision")
    if r.args.fp16 or r.args.bf16:
        asked = "fp16" if r.args.fp16 else "bf16"
        said = f"the training arguments ask for {asked}"
    else:
        asked = flag or "no"
        said = f"launch.accelerate_args asks for {asked} (--mixed_precision)"
    if asked not in HALF_PRECISIONS or r.mixed_precision != "no":
        return []
    return [
        f"session {r.session}: {said}, but the training ran in fp32: accelerate does not autocast {asked} on this "
        f"device ({r.device or 'unknown'}); {asked} needs a GPU"
    ]


def _resumed_at_its_end(session: int, start_step: int) -> str:
    """How the warning of a training resumed with no step left to train begins (taken back by a later training)."""
    return f"session {session}: the Trainer resumed at step {start_step} with max_steps "


def _resumed_against_the_arguments(r: RunStart) -> list[str]:
    """What a resumed Trainer did other than its arguments said: it kept its checkpoint's learning rate or
    intervals, or it was asked for no more steps than were done."""
    if r.training != 1 or not r.start_step:
        return []
    said = []
    if r.max_steps is not None and 0 < r.max_steps <= r.start_step:
        said.append(
            f"{_resumed_at_its_end(r.session, r.start_step)}{r.max_steps}: the training's arguments asked for no "
            "step beyond the ones done, and the Trainer trains one more all the same (a longer run: `kaio resume "
            "--max-steps N` for the built-in recipe, a larger max_steps or num_train_epochs in a script's arguments)"
        )
    kept = dict(r.kept_from_checkpoint)
    first = kept.pop("first_step_learning_rate", None)
    if kept:
        values = ", ".join(f"{name} {used:g} (the arguments: {asked:g})" for name, (used, asked) in kept.items())
        said.append(
            f"session {r.session}: the resumed Trainer kept its checkpoint's {values}: a resume restores them (the "
            "scheduler's state, trainer_state.json), so the edit of the script's arguments did not take effect"
            + (" (the steps' learning rates are what trained)" if "learning_rate" in kept else "")
        )
    if first is not None:
        said.append(
            f"session {r.session}: the first resumed step trained at the learning rate the checkpoint's optimizer "
            f"held, {first[0]:g}, not its schedule's {first[1]:g} there (a resume restores the optimizer's state; "
            "the schedule sets the rate from the next step on)"
        )
    return said


def _later_training_note(r: RunStart) -> str:
    """A script's later training (another Trainer, train() again, an out-of-memory retry) began in the session."""
    own = r.start_step - r.step_offset
    if r.retry:
        return (
            f"session {r.session}: the Trainer began its training again at its own step {own} with "
            f"batch size {r.per_device_batch_size} after running out of memory "
            "(auto_find_batch_size); "
            + (
                f"its steps are recorded from step {r.start_step + 1}, after the earlier attempt's"
                if r.start_step
                else "no earlier attempt had finished a step"
            )
        )
    return (
        f"session {r.session}: training {r.training} of the script (another Trainer, or train() "
        f"again) began at its own step {own}; its steps are recorded from step {r.start_step + 1}, "
        "after the earlier training's, and the run's description (What was trained) is this training's"
    )

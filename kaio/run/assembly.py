"""Step assembly: every rank's events and the GPU samples inside a step, merged into its ``StepEntry``.

A step is open while its pieces may still arrive: the other ranks' events,
rank 0's log, the GPU samples that bracket it. GPU samples are folded into the
step whose time window they fell in, once a tick later than the step's end has
arrived (``StepSamples``). A step is *sealed* (final, handed to the index and to Comet, then
forgotten) once its samples are folded in and rank 0 is ``SEAL_LAG_STEPS``
further: every optimizer step all-reduces across ranks, so by then every rank
has reported it. Memory holds only the open steps and the ticks they need.

A resumed session trains the steps after its checkpoint again: the earlier
sessions' entries of those steps are dropped, and the smoothed loss goes back
to its value at the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Protocol

import msgspec

from kaio.record import rules
from kaio.record.flops import Throughput
from kaio.record.rules import LossSmoother
from kaio.record.types import Log, Step, StepEntry, TickRecord, finite, nonfinite_tag
from kaio.run.counts import SeenCounts
from kaio.run.step_samples import StepSamples
from kaio.telemetry.protocol import LOSS_LOGGED_AS, SKIPPED_GPU_TENSORS, TRAINER_LOGGED_LOSS, TRUNCATED

SEAL_LAG_STEPS = 2
NOT_METRICS = (TRAINER_LOGGED_LOSS, LOSS_LOGGED_AS)  # Log extras about the loss, not numbers the script logged


class AssemblyOutput(Protocol):
    """Where sealed steps and what they show go (the run state)."""

    def sealed(self, entry: StepEntry) -> None: ...
    def warn(self, text: str) -> None: ...
    def note(self, text: str) -> None: ...
    def truncate_after(self, step: int) -> LossSmoother: ...
    def seen_at(self, step: int) -> tuple[int | None, int | None]: ...
    def logged_at_step_0(self, name: str, value: float) -> None: ...
    def throughput(self, tokens_per_s_per_device: float, mfu: float | None) -> None: ...
    def recomputed(self, steps: int, seconds: float) -> None: ...


def iso(t_wall: float | None) -> str | None:
    if t_wall is None:
        return None
    return datetime.fromtimestamp(t_wall, tz=timezone.utc).isoformat(timespec="milliseconds")


class StepAssembler(msgspec.Struct, kw_only=True):
    session: int = 0
    lead_rank: int = 0  # whose step ends time the steps: rank 0, or this node's first rank (RunLedger.lead_rank)
    open: dict[int, StepEntry] = {}
    samples: StepSamples = msgspec.field(default_factory=StepSamples)  # the GPU and host samples of the steps
    last_end_mono: float | None = None  # rank 0's latest step end in this session
    newest_step: int = 0  # rank 0's newest step in this session
    sealed_through: int = 0  # every step up to this one is sealed
    smoother: LossSmoother = msgspec.field(default_factory=LossSmoother)
    warned_nonfinite: set[str] = set()
    # This session's numbers logged at the Trainer's step 0 (before its first step ended): those not written yet
    # (an evaluation's, logged there too, leave them when it comes), and the names written (the first is kept).
    at_step_0: dict[str, float] = {}
    kept_at_step_0: set[str] = set()
    latest_log: set[str] = set()  # the keys of rank 0's latest log: an evaluation's own, when one follows it
    counts: SeenCounts = msgspec.field(default_factory=SeenCounts)  # the examples and tokens seen
    later_training: bool = False  # a later training began (another Trainer, an out-of-memory retry): its first step
    evaluated_after_s: float = 0.0  # the script's own evaluations since rank 0's latest step (after a train() ended)
    mfu_impossible: bool = False  # a step's MFU came out above 100%: none is recorded from there on
    lead_nonfinite_from: int = 1 << 62  # the first step whose loss the first rank found NaN/inf, this session
    diverging: bool = False  # the latest step's smoothed loss diverged

    def start_session(self, session: int) -> None:
        self.session = session
        self.warned_nonfinite.clear()
        self.lead_nonfinite_from = 1 << 62
        self.kept_at_step_0.clear()
        self.at_step_0.clear()
        self.counts.start_session()
        self.later_training, self.evaluated_after_s = False, 0.0
        self.samples.start_session()
        self.last_end_mono = None
        self.newest_step = 0

    def continue_counts_at(self, start: int) -> None:
        """A later training of the session starts after step ``start``: its samples count on from there."""
        self.counts.continue_at(start)
        self.later_training = True

    def begin_counts_at(self, start: int, tokens: int | None) -> None:
        """The record begins after step ``start`` (the script resumed its Trainer from its own checkpoint, whose
        counts were ``tokens`` input tokens): samples and tokens count what this record trains."""
        self.counts.begin_at(start, tokens)

    def resume_at(self, start: int, out: AssemblyOutput, *, counts_from_zero: bool = False) -> None:
        """Rank 0 of this session starts from checkpoint ``start``: later steps are trained again.
        ``counts_from_zero``: see ``SeenCounts.resume_at``."""
        lost = [self.open.pop(k) for k in sorted(self.open) if k > start and self.open[k].session < self.session]
        out.recomputed(len(lost), sum(_step_work_s(e) for e in lost))
        if self.sealed_through > start:
            self.smoother = out.truncate_after(start)
            self.sealed_through = start
        # The checkpoint's step as recorded: the resumed steps count on from its counts.
        seen = out.seen_at(start) if start and self.sealed_through >= start else (None, None)
        self.counts.resume_at(start, *seen, counts_from_zero=counts_from_zero)

    # ------------------------------------------------------------------ events

    def _entry(self, step: int, session: int) -> StepEntry | None:
        """The open entry of ``step``, new if need be; None for a step already sealed (a late event)."""
        entry = self.open.get(step)
        if entry is None and step <= self.sealed_through:
            return None
        if entry is None or entry.session < session:
            entry = self.open[step] = StepEntry(step=step, session=session)
        return entry

    def on_step(self, event: Step, throughput: Throughput | None, out: AssemblyOutput) -> bool:
        """Returns False for a late event (its step is sealed already)."""
        entry = self._entry(event.step, event.session)
        if entry is None:
            return False
        entry.peak_vram_bytes[str(event.rank)] = event.peak_vram_bytes  # the max over ranks: when it is stored
        if event.rank != self.lead_rank:
            earlier = event.loss_nonfinite_from is not None and event.loss_nonfinite_from < self.lead_nonfinite_from
            if earlier and self._first("ranks"):  # (not said again when the first rank's went bad as early)
                out.warn(
                    f"non-finite loss ({event.loss_nonfinite}) on rank {event.rank} from step "
                    f"{event.loss_nonfinite_from}, in its own losses: the Trainer's logged loss, the ranks' mean, "
                    "leaves it out (its logging_nan_inf_filter)"
                )
            return True
        if self.at_step_0:  # the first step ended: what was logged before it is no evaluation's
            self._write_step_0(out)
        entry.epoch = event.epoch
        entry.timestamp = iso(event.t_wall)
        entry.t_mono = event.t_mono
        entry.step_time_s = event.step_time_s
        tokens = self.counts.tokens_seen(event, throughput)
        if tokens is not None:
            entry.tokens_seen = tokens
        seen = self.counts.samples_seen(event, throughput)
        if seen is not None:
            entry.samples_seen = seen
        if event.session != self.session:
            return True
        self._throughput(entry, event, throughput, out)
        if event.t_mono is not None:
            gap = event.t_mono - self.last_end_mono if self.last_end_mono is not None else None
            entry.duration_s = gap if gap is not None and gap > 0 else event.step_time_s
            if self.later_training:
                self._later_training_started(entry, gap, event)
            self.last_end_mono = event.t_mono
            self.samples.step_ended(event.step, self.open)
        self.evaluated_after_s = 0.0
        self.newest_step = max(self.newest_step, event.step)
        self.seal_ready(out)
        return True

    def _later_training_started(self, entry: StepEntry, gap: float | None, event: Step) -> None:
        """The first step of a later training: its gap since the earlier training's last step holds the new
        Trainer's start (building it, loading a model, an out-of-memory retry's set-up), not optimizer work; less
        the pauses after that last step and the script's own evaluations between the two trainings, which are
        evaluation and saving time already."""
        self.later_training = False
        if gap is None or gap <= 0:
            entry.training_start_s = 0.0  # not measured, but marked: a later training's loss is smoothed from here
            return
        before = self.open.get(self.newest_step)
        paused = ((before.eval_s or 0.0) + (before.save_s or 0.0)) if before is not None else 0.0
        entry.training_start_s = max(gap - (event.step_time_s or 0.0) - paused - self.evaluated_after_s, 0.0)

    def _throughput(self, entry: StepEntry, event: Step, throughput: Throughput | None, out: AssemblyOutput) -> None:
        """Tokens/s per device and MFU over the step's own time (not the pauses between steps)."""
        tokens = self.counts.step_tokens(event, throughput.world_size if throughput is not None else 1)
        if throughput is None or tokens is None or not event.step_time_s:
            return
        entry.tokens_per_s_per_device, entry.mfu = throughput.of_step(tokens, event.step_time_s)
        if entry.mfu is not None and entry.mfu > 1.0 and not self.mfu_impossible:  # more than any device does
            out.note(
                f"MFU came out at {entry.mfu:.0%} at step {entry.step}, more than any device does: the peak "
                "(reporting.peak_tflops, or kaio's table of GPUs) or the tokens counted do not fit this model "
                "and device; MFU is left out of the record from there on"
            )
            self.mfu_impossible = True
        if self.mfu_impossible:
            entry.mfu = None
        if entry.tokens_per_s_per_device is not None:
            out.throughput(entry.tokens_per_s_per_device, entry.mfu)

    def on_log(self, event: Log, out: AssemblyOutput) -> None:
        """Into its step's entry, which rank 0's step event opened (sent before its log). A log at a step this
        session did not train (the Trainer's closing log when it began at its last step and trained none) is no
        step's."""
        self.latest_log = set(event.extra)
        if event.step is None:
            return
        entry = self.open.get(event.step)
        if entry is None and event.step == 0 and event.session == self.session:
            self._logged_at_step_0(event, out)
        if entry is None or entry.session != event.session:
            return
        if event.epoch is not None:
            entry.epoch = event.epoch
        if event.learning_rate is not None:
            entry.learning_rate = finite(event.learning_rate)
        if event.grad_norm is not None:
            entry.grad_norm = finite(event.grad_norm)
            entry.grad_norm_nonfinite = nonfinite_tag(event.grad_norm)
        for key, value in _script_numbers(event, out, self._first).items():
            _keep_metric(entry, key, value, out, self._first, mean=event.within_step)
        renamed = event.extra.get(LOSS_LOGGED_AS)
        if renamed is not None and self._first("loss logged as"):
            out.note(f"the training loss is what the Trainer logged as {renamed} (it logs no `loss`)")
        if event.loss is not None:
            self._record_loss(entry, event, out)
        if entry.grad_norm_nonfinite is not None and entry.loss_nonfinite is None and self._first("grad_norm"):
            out.warn(f"non-finite gradient norm ({entry.grad_norm_nonfinite}) at step {entry.step}")

    def _logged_at_step_0(self, event: Log, out: AssemblyOutput) -> None:
        """The script's own numbers logged before its first step ended (its counts before train(), a loss part
        logged from compute_loss in the first step): the Trainer's step 0, which is no step's entry. Written at the
        next step or the session's end: an evaluation logged there (eval_on_start, another Trainer's evaluate()
        after the training) takes its own metrics back first. The Trainer's count of tokens, in every log, is
        nothing yet."""
        kept = StepEntry(step=0, session=event.session)
        for key, value in _script_numbers(event, out, self._first).items():
            new = key not in self.kept_at_step_0 and (event.within_step or key not in self.at_step_0)
            if new and key != "num_input_tokens_seen":
                _keep_metric(kept, key, value, out, self._first)
        self.at_step_0.update(kept.metrics)

    def _write_step_0(self, out: AssemblyOutput) -> None:
        for key, number in self.at_step_0.items():
            self.kept_at_step_0.add(key)
            out.logged_at_step_0(key, number)
        self.at_step_0.clear()

    def _first(self, what: str) -> bool:
        """True the first time this session: a NaN at every step is one warning, and counted in the summary."""
        first = what not in self.warned_nonfinite
        self.warned_nonfinite.add(what)
        return first

    def _record_loss(self, entry: StepEntry, event: Log, out: AssemblyOutput) -> None:
        raw = event.loss
        tag = nonfinite_tag(raw)
        entry.loss = finite(raw)
        if tag is not None:
            entry.loss_nonfinite = tag
            self.lead_nonfinite_from = min(self.lead_nonfinite_from, event.nonfinite_from or entry.step)
            if event.nonfinite_from is not None and event.nonfinite_from < entry.step:
                entry.loss_nonfinite_from = event.nonfinite_from
            if self._first("loss"):
                out.warn(_nonfinite_loss_warning(tag, entry.step, event))
            return
        if entry.loss is None:
            return
        if event.nonfinite_carried and self._first("carried loss"):
            logged = event.extra.get(TRAINER_LOGGED_LOSS)
            out.warn(
                f"the Trainer logged a {logged} training loss from step {entry.step} on, though every loss since the "
                "one before was finite: with logging_nan_inf_filter=False its running loss sum keeps an earlier "
                "NaN/inf to the end; the record's loss from there is kaio's, the average of the losses training_step "
                "returned, as the Trainer averages them"
            )
        again = entry.loss_smoothed is not None  # this step's loss was smoothed already: the new one replaces it
        was_diverging = self.diverging
        entry.loss_smoothed, entry.loss_diverged = self.smoother.add(entry.loss, again=again)
        self.diverging = entry.loss_diverged
        if entry.loss_diverged and not was_diverging:  # once as it begins (the summary counts the steps)
            out.warn(
                f"loss diverging at step {entry.step}: smoothed loss {entry.loss_smoothed:.4g} is over "
                f"{rules.DIVERGENCE_FACTOR:g}x its minimum so far ({self.smoother.low:.4g})"
            )

    def on_tick(self, tick: TickRecord, run_keys: set[str], out: AssemblyOutput) -> None:
        self.samples.add_tick(tick, run_keys, self.open)
        self.seal_ready(out)

    def evaluated(self, step: int, metrics: dict[str, float | None], *, of_the_run: bool = True) -> None:
        """An evaluation at ``step``, its ``metrics`` as on_evaluate gave them: evaluate() logged them just before,
        into the step, with what a trainer's own log() added (TRL's eval_rewards...). What carries the
        evaluation's prefix (eval_*, eval_<set>_*, test_*) is the evaluation's: it leaves the step for
        ``metrics``; the rest (the tokens seen, a number a trainer adds to every log) stays the step's too. A log at
        the Trainer's step 0 (eval_on_start, another Trainer's evaluate() after the training) is given back too."""
        _take_evaluation(self.at_step_0, metrics, self.latest_log)
        entry = self.open.get(step) if of_the_run else None  # another model's: nothing in the run's step
        if entry is not None:
            _take_evaluation(entry.metrics, metrics, self.latest_log)

    def evaluated_after_training(self, seconds: float) -> None:
        """The script's own evaluation after a train() ended (no pause of a step): a later training's first step
        may hold it."""
        self.evaluated_after_s += seconds

    def add_pause(self, step: int, *, eval_s: float = 0.0, save_s: float = 0.0) -> None:
        """Time spent after ``step`` evaluating or saving a checkpoint (the next step's gap holds it)."""
        entry = self.open.get(step)
        if entry is None:
            return  # sealed already: a very late event; the time stays in the next step's duration
        if eval_s:
            entry.eval_s = (entry.eval_s or 0.0) + eval_s
        if save_s:
            entry.save_s = (entry.save_s or 0.0) + save_s

    # ------------------------------------------------------------------ sealing

    def seal_ready(self, out: AssemblyOutput) -> None:
        """Seal, in step order, the open steps that are final."""
        horizon = self.newest_step - SEAL_LAG_STEPS
        while (step := self._first_open_through(horizon)) is not None and not self.samples.waits_for(step):
            self._seal(step, out)

    def _first_open_through(self, horizon: int) -> int | None:
        """The smallest open step if it is at most ``horizon``, else None. Every open step is past
        ``sealed_through``: the steps from there are looked up one by one, not the smallest of all found, where
        other ranks ran far ahead of rank 0 (a kaio.log loop's ranks run apart: a scan of 50k open steps at each
        event made a 2-rank loop's record quadratic)."""
        start = self.sealed_through + 1
        if not self.open or start > horizon:
            return None
        if horizon - start >= len(self.open):  # a wide gap (steps numbered far apart): the smallest, once
            step = min(self.open)
            return step if step <= horizon else None
        return next((step for step in range(start, horizon + 1) if step in self.open), None)

    def seal_all(self, out: AssemblyOutput) -> None:
        """A session ends: what it did not report now never will be. Steps only other ranks reached (a loop of
        kaio.log calls runs its ranks apart, and a stop ends them at different steps) are no steps of the record,
        which rank 0's steps time and count."""
        beyond = sorted(step for step in self.open if 0 < self.newest_step < step)
        if beyond:
            for step in beyond:
                del self.open[step]
            out.note(
                f"session {self.session}: steps {beyond[0]}-{beyond[-1]} were reached by other ranks only, not by "
                f"rank {self.lead_rank}, whose last was {self.newest_step}: not in the record"
            )
        self.samples.fold_all(self.open)
        for step in sorted(self.open):
            self._seal(step, out)
        if self.at_step_0:
            self._write_step_0(out)

    def _seal(self, step: int, out: AssemblyOutput) -> None:
        entry = self.open.pop(step)
        self.sealed_through = max(self.sealed_through, step)
        out.sealed(entry)


def _script_numbers(event: Log, out: AssemblyOutput, first: Callable[[str], bool]) -> dict[str, object]:
    """What a log holds beyond the Trainer's own fields: the script's numbers. A ``loss`` logged from inside a
    step (a compute_loss's own) is not the step's loss, which the Trainer logs after it: said, not kept."""
    numbers = {key: value for key, value in event.extra.items() if key not in NOT_METRICS}
    if event.within_step and numbers.pop("loss", None) is not None and first("loss within step"):
        out.note(
            "the script logged `loss` from inside training_step (its compute_loss?): the record's loss is the "
            "Trainer's own for each step; the script's numbers of that name are in child.log only (log them under "
            "another name to have them in the record)"
        )
    return numbers


def _keep_metric(
    entry: StepEntry, key: str, value: object, out: AssemblyOutput, first: Callable[[str], bool], *, mean: bool = False
) -> None:
    """A number the script logged, in the step's metrics (a bool as 0 or 1). What is not a finite number is
    said once a session, not dropped unseen: a NaN is what its author would look for. ``mean``: the number is
    the mean of the step's micro-batches' so far (a log from inside training_step), which replaces the last."""
    if key == TRUNCATED:
        if value is True and first(key):
            out.warn(f"a log at step {entry.step} was too large for one record: its other metrics were left out")
    elif key == SKIPPED_GPU_TENSORS:
        if isinstance(value, list) and first(key):
            out.warn(
                f"logged metric(s) {', '.join(map(str, value))} were tensors on the GPU: not read (reading one "
                "waits for the GPU at every log); log them as numbers (.item()) to have them in the record"
            )
    elif (number := float(value) if isinstance(value, bool) else finite(value)) is not None:
        if mean and entry.metrics.get(key, number) != number and first(f"mean {key}"):
            out.note(
                f"logged metric {key} was logged from inside training_step more than once a step (once per "
                "micro-batch): the record keeps each step's mean of them"
            )
        if key not in entry.metrics or mean or rules.trainer_speed_or_total(key):  # the closing log's is final
            entry.metrics[key] = number
        elif entry.metrics[key] != number and first(f"repeated {key}"):  # the Trainer's own stays
            out.note(
                f"logged metric {key} was logged more than once at step {entry.step}, with other numbers (a log "
                "from a callback beside the Trainer's?): the record keeps the first number logged at each step"
            )
    elif (tag := nonfinite_tag(value)) is not None:
        if first(f"metric {key}"):
            out.warn(
                f"logged metric {key} was {tag} at step {entry.step}: history.json leaves its non-finite values out"
            )
    elif value is not None and first(f"metric {key}"):  # a fact, as an evaluation's text metric is
        out.note(rules.not_a_number_note(key))


def _take_evaluation(logged: dict[str, float], metrics: dict[str, float | None], its_log: set[str]) -> None:
    """An evaluation's metrics out of what was logged with them (``StepAssembler.evaluated``): in its own log, the
    one just before it (a script's earlier log of final_accuracy is not a final_ evaluation's)."""
    prefix = rules.evaluation_prefix(metrics)
    if prefix is None:  # no speed metrics to name it: the evaluation's own keys only
        for key in metrics:
            logged.pop(key, None)
        return
    # One of several eval datasets (eval_<set>): a trainer's own eval_* keys (TRL's eval_accuracy) are unprefixed
    # by set, and the latest logged are this set's (an earlier set's were taken by its own evaluation).
    family = "eval" if prefix.startswith("eval_") else prefix
    for key in [k for k in logged if k.startswith(f"{family}_") and k in its_log]:
        value = logged.pop(key)
        metrics.setdefault(key, value)


def _nonfinite_loss_warning(tag: str, step: int, event: Log) -> str:
    first = event.nonfinite_from
    said = f"non-finite loss ({tag}) at step {step}"
    if first is not None and first < step:
        said = f"non-finite loss ({tag}) from step {first} (logged at step {step})"
    hidden = event.extra.get(TRAINER_LOGGED_LOSS)
    if isinstance(hidden, (int, float)):
        said += f"; the Trainer logged {hidden:g} (its logging_nan_inf_filter hides NaN/inf losses)"
    return said


def _step_work_s(entry: StepEntry) -> float:
    """A step's time without the evaluation and save after it (as the index's ``steps_after`` counts it)."""
    spent = entry.duration_s if entry.duration_s is not None else entry.step_time_s
    return max((spent or 0.0) - (entry.eval_s or 0.0) - (entry.save_s or 0.0), 0.0)

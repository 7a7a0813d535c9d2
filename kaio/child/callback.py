"""``KaioCallback``: the eyes inside the trainer.

At train begin every rank says what it trains, from the live objects (the
``TrainingArguments``, the model and its PEFT config, the data, the
environment); then every optimizer step's true peak VRAM from every rank, rank
0's logs and evaluations, checkpoint saves and the end. It adds no GPU
synchronisation: the peak-memory calls read the caching allocator's host-side
counters, times are host clocks, and a log value that is a GPU tensor is left
out rather than copied to the host.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from kaio.child import process_group, same_start, stop
from kaio.child.describe import (
    describe_run,
    describe_script_optimizer,
    kept_from_checkpoint,
    trainer_counts_tokens,
)
from kaio.child.emitter import EventEmitter
from kaio.child.memory import peak_memory_functions
from kaio.child.nonfinite import LossWatch, stop_on_nonfinite
from kaio.child.paths import recorded_path
from kaio.child.timing import StepTiming
from kaio.telemetry.protocol import (
    ENV_RESUME_FROM,
    LOSS_LOGGED_AS,
    SKIPPED_GPU_TENSORS,
    TRAINER_LOGGED_LOSS,
    Eval,
    Log,
    Metric,
    Pause,
    Save,
    Step,
    TrainEnd,
    tag_nonfinite,
)

_LOG_FIELDS = ("loss", "learning_rate", "grad_norm")  # Trainer log keys with a field of their own


def trainer_field_keys(logs: dict[str, Any]) -> dict[str, str]:
    """Where a training log holds the Trainer's learning rate and gradient norm (and ``loss``): under their own
    names, or renamed ``train/<name>`` by a ``log()`` override in W&B's style."""
    keys = {}
    for field in _LOG_FIELDS:
        if field in logs:
            keys[field] = field
        elif field != "loss" and f"train/{field}" in logs:  # (a renamed loss is found by training_loss_key)
            keys[field] = f"train/{field}"
    return keys


def training_loss_key(logs: dict[str, Any]) -> str | None:
    """The key of a training log's loss: ``loss``; else, in a log with the Trainer's learning rate and gradient norm
    (its training log, with the loss renamed), its one ``<name>_loss`` or ``<name>/loss`` that is no evaluation's and
    not the closing mean (SetFit logs ``embedding_loss``). A script's own log of an auxiliary loss has no gradient norm."""
    if "loss" in logs:
        return "loss"
    if not {"learning_rate", "grad_norm"} <= trainer_field_keys(logs).keys():
        return None
    keys = [
        k
        for k in logs
        if k.endswith(("_loss", "/loss"))  # a log() override's train/loss as well
        and k != "train_loss"
        and not k.startswith(("eval_", "test_", "train_", "eval/", "test/"))
    ]
    return keys[0] if len(keys) == 1 else None


class _Trainings:
    """What this process's trainings have recorded. A script may build several Trainers (a first phase, then a
    second) or call ``train()`` again, each counting its steps from 0; the record has one step axis, so a
    later training's steps (and tokens) are recorded after the earlier ones', not over them."""

    def __init__(self) -> None:
        self.count = 0
        self.last_step = 0  # the latest step recorded
        self.last_tokens = 0  # the input tokens recorded by then
        # The parameters of the models they trained, by identity: a WeakSet compares tensors with ==, which runs
        # on the GPU (a tensor the size of the embedding) and raises for any parameter of more than one number.
        self.weights: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self.untrained_evals: list[tuple[float, list[weakref.ref]]] = []  # before any training: when, which weights

    def evaluated_untrained(self, t_wall: float, model: Any) -> None:
        """An evaluation before any training: whose it was is known once a training begins."""
        with contextlib.suppress(AttributeError, TypeError):
            self.untrained_evals.append((t_wall, [weakref.ref(p) for p in itertools.islice(model.parameters(), 64)]))

    def evaluations_of_other_models(self) -> list[float]:
        """Of the evaluations before the first training, those of a model it shares no weight with (their t_wall)."""
        others = [
            t_wall
            for t_wall, refs in self.untrained_evals
            if not any((p := ref()) is not None and self.weights.get(id(p)) is p for ref in refs)
        ]
        self.untrained_evals.clear()
        return others

    def began_at(self, step: int, tokens: int | None) -> None:
        """A training began at ``step`` (resumed at its end, it trains none: a later one's follow its checkpoint)."""
        self.last_step = max(self.last_step, step)
        if tokens is not None:
            self.last_tokens = max(self.last_tokens, tokens)

    def trained(self, model: Any) -> None:
        with contextlib.suppress(AttributeError, TypeError):
            for parameter in model.parameters():
                self.weights[id(parameter)] = parameter

    def of_another_model(self, model: Any) -> bool:
        """An evaluation by a Trainer of a model none trained, once one has (a teacher's, a reference's): not
        the run's. One that shares weights with a trained model (the trained model given to another Trainer to
        evaluate it on other data, its LoRA merged, the base model a PEFT wrapper adapted) is the run's."""
        if not self.weights or model is None:
            return False
        try:
            return not any(self.weights.get(id(p)) is p for p in itertools.islice(model.parameters(), 64))
        except (AttributeError, TypeError):  # not a torch module: nothing to compare
            return False


_TRAININGS = _Trainings()


def _loss_of_the_window(window: Any, fields: dict[str, Any], extra: dict[str, Any]) -> bool:
    """The log's loss where the window of micro-batch losses since the previous log tells better than the
    Trainer's number (``fields`` and ``extra`` changed in place). True: the NaN was an earlier one, carried."""
    if window is None:
        return False
    if window.nonfinite is not None:  # taken at a log with the loss
        # What the loss since the previous log really averaged to; the Trainer's filter showed a number.
        if fields.get("loss") not in ("nan", "inf", "-inf"):
            extra[TRAINER_LOGGED_LOSS] = fields.get("loss")
        fields["loss"] = window.nonfinite.tag
        return False
    if window.mean is not None:
        # Every loss of the window was finite: the NaN is an earlier one, kept in the Trainer's running sum
        # (logging_nan_inf_filter=False). The window's own average is the loss.
        extra[TRAINER_LOGGED_LOSS], fields["loss"] = fields.get("loss"), window.mean
        return True
    return False


class MicroBatchLogs:
    """The script's own logs from inside ``training_step`` (a ``compute_loss`` calling ``self.log``, once per
    micro-batch). The Trainer gives them its step before this one ends (``global_step`` has not moved): each number
    is sent as the mean of those logged so far at that step, so that the record keeps the mean of the micro-batches'
    numbers, as the Trainer's loss is their mean."""

    def __init__(self) -> None:
        self.within = False  # set by the patched Trainer's training_step while it runs
        self._step: int | None = None
        self._sums: dict[str, tuple[float, int]] = {}

    def means(self, step: int, logged: dict[str, Any]) -> dict[str, Any]:
        """The script's numbers of one such log, each the mean of the step's so far. The Trainer's count of tokens,
        which its log() adds to every log, is left out: the Trainer's own log of the step has it."""
        if step != self._step:
            self._step, self._sums = step, {}
        means = {key: value for key, value in logged.items() if key != "num_input_tokens_seen"}
        for key, value in list(means.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                total, count = self._sums.get(key, (0.0, 0))
                self._sums[key] = (total + value, count + 1)
                means[key] = (total + value) / (count + 1)
        return means


class KaioCallback(TrainerCallback):
    def __init__(self, emitter: EventEmitter, trainer: Any = None) -> None:
        self.emitter = emitter
        self._trainer = weakref.ref(trainer) if trainer is not None else None  # its datasets, for the description
        self.rank = emitter.rank
        self._step_began_mono: float | None = None
        self._busy_until_mono: float | None = None  # the end of the latest step or evaluation
        self._peak_memory: tuple[Callable[[], None], Callable[[], int]] | None = (
            None  # on a GPU, resolved at train begin
        )
        self._skipped_gpu_values: set[str] = set()
        self.losses = LossWatch()  # fed by the patched Trainer's training_step
        self.eval_losses = LossWatch()  # ...and its prediction_step (each evaluation batch's)
        self.micro_batch_logs = MicroBatchLogs()  # told by the patched Trainer's training_step
        # A rank but the first: its own first non-finite loss (step, kind) for its next step event; True once sent.
        self._nonfinite_found: tuple[int, str] | bool | None = None
        self._step_offset = 0  # added to this Trainer's own step: the record's step (``_Trainings``)
        self._tokens_offset = 0
        self.timing = StepTiming()  # fed by the patched Trainer's get_batch_samples and compute_loss
        self._saved = _SavedCheckpoints()
        self.samples_in_step: int | None = 0  # fed by the patched Trainer's training_step; None: not countable
        self.tokens_in_step: int | None = 0  # likewise
        self._trainer_counts_tokens = True  # its num_input_tokens_seen counts tokens (on_train_begin says)
        self._training = False  # this Trainer's training began and has not ended
        self._trained = False  # this Trainer's training began, at some time
        self.script_optimizer = False  # the script gave the Trainer its own optimizer (kaio.child.patch)
        self.script_lr_scheduler = False  # ...and its own scheduler
        self.evaluations_seen = 0  # on_evaluate calls (kaio.child.patch: an evaluate() that makes none)
        self._stopping_at: int | None = None  # the Trainer's step a graceful stop saves and ends at
        self._saved_at: int | None = None  # the Trainer's step of the latest checkpoint saved, on every rank
        self._in_order = _AfterItsStep(emitter)

    # -- helpers -----------------------------------------------------------

    def _step(self, state: Any) -> int:
        return self._step_offset + int(state.global_step)

    def _reset_peak(self) -> None:
        if self._peak_memory is not None:
            self._peak_memory[0]()

    def _peak_vram_bytes(self) -> int | None:
        return self._peak_memory[1]() if self._peak_memory is not None else None

    def _value(self, key: str, value: Any) -> Any:
        """A log or metric value as it travels: a number (NaN/inf tagged), a string, or None."""
        if _on_gpu(value):
            # Reading it would wait for the GPU (a sync): the Trainer logs floats; a custom one may not.
            self._skipped_gpu_values.add(key)
            return None
        if hasattr(value, "item") and not isinstance(value, (int, float)):
            try:
                value = value.item()
            except (ValueError, RuntimeError):
                return str(value)
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return tag_nonfinite(float(value)) if isinstance(value, float) else value
        return str(value)

    def _metric(self, key: str, value: Any) -> Metric:
        """A value that should be a number: a float (NaN/inf tagged), or None when it is not one."""
        return _as_metric(self._value(key, value))

    # -- Trainer hooks ----------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self._trainer() if self._trainer is not None else None
        own = getattr(trainer, "model", None)
        if not hasattr(model, "parameters") and hasattr(own, "parameters"):
            model = own  # a wrapper handed to the callbacks (SetFit's SetFitModel): the Trainer's own model
        self._trainer_counts_tokens = trainer_counts_tokens(model)
        stop.training(True)
        process_group.note_backend()
        self._peak_memory = peak_memory_functions()
        start = self._in_order.step_sent = int(state.global_step)
        _TRAININGS.count += 1
        if getattr(state, "is_world_process_zero", True):  # the rank that tells evaluations apart (on_evaluate)
            _TRAININGS.trained(model)
        if _TRAININGS.count > 1 and self._step_offset + start < _TRAININGS.last_step:
            self._step_offset, self._tokens_offset = _TRAININGS.last_step - start, _TRAININGS.last_tokens
        seen = int(getattr(state, "num_input_tokens_seen", None) or 0) if self._trainer_counts_tokens else 0
        _TRAININGS.began_at(self._step(state), self._tokens_offset + seen if seen else None)
        run = describe_run(self.rank, args, state, model, kwargs, trainer)
        self._saved.found_in(getattr(args, "output_dir", None))
        if self.script_optimizer:
            describe_script_optimizer(
                run, kwargs.get("optimizer"), kwargs.get("lr_scheduler") if self.script_lr_scheduler else None
            )
        # The script's own optimizer: args.learning_rate was never its rate, so not one a resume kept from it.
        schedule = None if self.script_optimizer else kwargs.get("lr_scheduler")
        run.kept_from_checkpoint = kept_from_checkpoint(args, state, schedule, kwargs.get("optimizer"))
        run.training, run.step_offset = _TRAININGS.count, self._step_offset
        if _TRAININGS.count == 1:
            run.other_model_evals = _TRAININGS.evaluations_of_other_models()
        run.retry = self._training and bool(getattr(args, "auto_find_batch_size", False))
        self._training = self._trained = True
        run.start_step += self._step_offset
        if run.max_steps is not None and run.max_steps > 0:
            run.max_steps += self._step_offset
        self.emitter.emit(run)
        # Every rank from one step, or none trains (a node resumed from other checkpoints, or started afresh).
        same_start.check(int(state.global_step), self.rank, os.environ.get(ENV_RESUME_FROM))
        self._reset_peak()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_began_mono = time.monotonic()
        self.samples_in_step = self.tokens_in_step = 0
        self._reset_peak()

    def count_batch(self, samples: int | None, tokens: int | None) -> None:
        """A micro-batch of this step held ``samples`` examples and ``tokens`` input ids (None: not countable)."""
        if self.samples_in_step is not None:
            self.samples_in_step = None if samples is None else self.samples_in_step + samples
        if self.tokens_in_step is not None:
            self.tokens_in_step = None if tokens is None else self.tokens_in_step + tokens

    def on_step_end(self, args, state, control, **kwargs):
        now_mono = self._busy_until_mono = time.monotonic()
        tokens = getattr(state, "num_input_tokens_seen", 0) if self._trainer_counts_tokens else 0
        step = _TRAININGS.last_step = self._step(state)
        if tokens:
            tokens = _TRAININGS.last_tokens = self._tokens_offset + int(tokens)
        data_s, forward_s = self.timing.take()
        # A graceful stop: checkpoint-N after this step, then the Trainer returns.
        step_s = (now_mono - self._step_began_mono) if self._step_began_mono is not None else None
        if stop.stops_after(int(state.global_step), getattr(state, "max_steps", None), step_s):
            control.should_save = True
            control.should_training_stop = True
            self._stopping_at = int(state.global_step)
        # Sent now, not with the log that follows: after another rank died, the Trainer's log
        # (an all-gather) never returns, and this step would be lost.
        self.emitter.emit(
            Step(
                rank=self.rank,
                step=step,
                epoch=state.epoch,
                t_wall=time.time(),
                t_mono=now_mono,
                step_time_s=step_s,
                peak_vram_bytes=self._peak_vram_bytes(),
                tokens_seen=tokens or None,
                samples=self.samples_in_step or None,
                tokens=self.tokens_in_step or None,
                evaluates=bool(control.should_evaluate),
                saves=bool(control.should_save),
                data_s=data_s,
                forward_s=forward_s,
                **_said_once(self),
            )
        )
        self._in_order.sent(int(state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The training-loss log (every rank makes it, gathering the loss): the losses since the previous one.
        # To stop, the ranks agree first, so that all stop at the same step.
        stopping = stop_on_nonfinite()
        # A NaN/inf logged loss (the same on every rank: gathered) is checked against the window's own losses.
        # The script's own log() after train() ended (a final perplexity, a "loss" of its own): numbers it logged,
        # not the last step's training loss or learning rate.
        after_training = self._trained and not self._training
        within_step = self.micro_batch_logs.within  # the script's own log from inside a step: not the step's loss
        loss_key = training_loss_key(logs) if logs and not (after_training or within_step) else None
        logged = logs.get(loss_key) if logs and loss_key else None
        logged_nonfinite = isinstance(logged, (int, float)) and not math.isfinite(logged)
        window = self.losses.take(agree=stopping, average=logged_nonfinite) if loss_key else None
        nonfinite = window.nonfinite if window is not None else None
        first_nonfinite = nonfinite.first_step + self._step_offset if nonfinite is not None else None
        if first_nonfinite is not None and stopping:
            stop.nonfinite(first_nonfinite, self._step(state))
            control.should_training_stop = True  # no checkpoint: its weights would be the non-finite ones
        if not state.is_world_process_zero:  # its own finding goes with its next step's event (no collective)
            if nonfinite is not None and first_nonfinite is not None and self._nonfinite_found is None:
                self._nonfinite_found = (first_nonfinite, nonfinite.tag)
            return
        if not logs:
            return
        logs = _with_what_printing_took(logs, state)
        field_keys = {} if after_training or within_step else trainer_field_keys(logs)
        fields: dict[str, Any] = {field: self._metric(key, logs[key]) for field, key in field_keys.items()}
        extra = {
            key: self._value(key, value)
            for key, value in logs.items()
            if key not in field_keys.values() and key not in ("epoch", loss_key)
        }
        if within_step:
            extra = self.micro_batch_logs.means(int(state.global_step), extra)
        if loss_key is not None and loss_key != "loss":  # the trainer's own name for its training loss
            fields["loss"], extra[LOSS_LOGGED_AS] = self._metric(loss_key, logs[loss_key]), loss_key
        if self._skipped_gpu_values:
            extra[SKIPPED_GPU_TENSORS] = sorted(self._skipped_gpu_values)
        carried = _loss_of_the_window(window, fields, extra)
        epoch = logs.get("epoch")
        log = Log(
            rank=self.rank,
            step=self._step(state),
            t_wall=time.time(),
            epoch=epoch if isinstance(epoch, (int, float)) else None,
            extra=extra,
            nonfinite_from=first_nonfinite,
            nonfinite_carried=carried,
            within_step=within_step,
            **fields,
        )
        self._in_order.send(log, int(state.global_step), self._training)

    def on_evaluate(self, args, state, control, metrics=None, *, prediction: bool = False, **kwargs):
        self.evaluations_seen += 1
        hidden, batches = self.eval_losses.nonfinite_of() if getattr(args, "logging_nan_inf_filter", False) else (0, 0)
        if not state.is_world_process_zero or not metrics:
            return
        values = {key: self._metric(key, value) for key, value in metrics.items() if key != "epoch"}
        other = _TRAININGS.of_another_model(kwargs.get("model"))
        # A string or a list is not a missing number: left out, and named (null stays for a None logged).
        not_numbers = [key for key, value in values.items() if value is None and metrics[key] is not None]
        self._busy_until_mono, t_wall = time.monotonic(), time.time()
        if not _TRAININGS.count:
            _TRAININGS.evaluated_untrained(t_wall, kwargs.get("model"))
        self._in_order.send(
            Eval(
                rank=self.rank,
                # A Trainer that never trained, after one that did (a teacher's, or one given the trained model to
                # evaluate it on other data), is at its own step 0: the evaluation is where the run was.
                step=self._step(state) if self._trained or not _TRAININGS.count else _TRAININGS.last_step,
                epoch=state.epoch,
                t_wall=t_wall,
                t_mono=self._busy_until_mono,
                metrics={key: value for key, value in values.items() if key not in not_numbers},
                not_numbers=not_numbers,
                prediction=prediction,
                other_model=other,
                loss_batches_nonfinite=hidden,
                loss_batches=batches,
            ),
            int(state.global_step),
            self._training,
        )

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        """``Trainer.predict``'s metrics (``test_loss``...): recorded with the evaluations, marked as a prediction."""
        self.on_evaluate(args, state, control, metrics=metrics, prediction=True, **kwargs)

    def on_epoch_end(self, args, state, control, **kwargs):
        # A stop ends the training at its step, where the Trainer comes here once more before it returns (and
        # evaluates and saves again for an epoch strategy): its checkpoint is saved once, at the step unless
        # save_strategy="best" vetoed it there (the evaluation due found no new best), else here; and the epoch it
        # cut short is not evaluated (which would veto that save again, or outlast the grace period).
        if self._stopping_at == state.global_step:
            control.should_evaluate = False
            control.should_save = self._saved_at != state.global_step
        if control.should_evaluate or control.should_save:  # an epoch strategy's, after the step's event
            self._announce(state, evaluates=bool(control.should_evaluate), saves=bool(control.should_save))

    def evaluation_begins(self, state: Any) -> None:
        """The Trainer's evaluate() was called (kaio.child.patch): during the training, a pause its step's event may
        not have announced (a later callback's, the script's own from a callback)."""
        if self._training:
            self._announce(state, evaluates=True)

    def _announce(self, state: Any, *, evaluates: bool = False, saves: bool = False) -> None:
        step, now = self._step(state), time.monotonic()
        self.emitter.emit(
            Pause(rank=self.rank, step=step, t_wall=time.time(), t_mono=now, evaluates=evaluates, saves=saves)
        )

    def on_save(self, args, state, control, **kwargs):
        self._saved_at = int(state.global_step)
        if self._stopping_at == state.global_step and getattr(args, "save_total_limit", None) == 1:
            # Ending a training, the Trainer deletes every checkpoint but the best when the limit is 1: the stop's
            # too, which `kaio resume` continues from. The limit is 2 for what is left of this training.
            args.save_total_limit = 2
        # The job's save, in every node's record (each node's first rank): a node stopped with the job's
        # checkpoint saved says so, and its save pause is its own.
        if not (state.is_world_process_zero or getattr(state, "is_local_process_zero", False)):
            return
        saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = recorded_path(saved)
        removed = self._saved.gone()  # the Trainer's rotation (save_total_limit), just before this
        self._saved.add(saved, path)
        now = time.monotonic()
        took = now - self._busy_until_mono if self._busy_until_mono is not None else None
        self.emitter.emit(
            Save(
                rank=self.rank,
                step=self._step(state),
                path=path,
                t_wall=time.time(),
                t_mono=now,
                duration_s=took,
                removed=removed,
            )
        )

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False
        self._in_order.flush()  # a step that never sent its event (an exception in a later callback)
        end = TrainEnd(rank=self.rank, step=self._step(state), t_wall=time.time(), t_mono=time.monotonic())
        end.stopped = stop.requested()
        if state.is_world_process_zero:
            trainer = self._trainer() if self._trainer is not None else None
            end.ended_early_by = None if end.stopped else _ended_early_by(trainer, args, state)
            end.checkpoints_removed = self._saved.gone()
            _the_best(end, args, state, self._step_offset)
        self.emitter.emit(end)
        stop.training(False)  # after the end is sent: a stop's KeyboardInterrupt from now on lands in the script


def _the_best(end: TrainEnd, args: Any, state: Any, step_offset: int) -> None:
    """The Trainer's best checkpoint (metric_for_best_model), and whether the model ends with its weights."""
    best = getattr(state, "best_model_checkpoint", None)
    if getattr(args, "load_best_model_at_end", False) and isinstance(best, str):
        end.best_loaded = recorded_path(best)
    metric = getattr(args, "metric_for_best_model", None)
    if getattr(args, "load_best_model_at_end", False) and best is None and not end.stopped:
        _best_not_saved(end, state, metric, step_offset)
    if isinstance(best, str) and isinstance(metric, str):
        end.best_checkpoint = recorded_path(best)
        value = getattr(state, "best_metric", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            end.best_metric = tag_nonfinite(float(value))
        end.best_metric_name = _as_the_trainer_reads(metric)
        greater = getattr(args, "greater_is_better", None)
        end.greater_is_better = greater if isinstance(greater, bool) else None


def _best_not_saved(end: TrainEnd, state: Any, metric: Any, step_offset: int) -> None:
    """load_best_model_at_end found no best checkpoint though the Trainer kept a best metric: the best evaluation
    was at a step that saved none (eval_steps finer than save_steps), and the model keeps the last step's weights."""
    value = getattr(state, "best_metric", None)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return  # no evaluation, or none with the metric: nothing was best
    end.best_unsaved = True
    step = getattr(state, "best_global_step", None)  # (transformers 4.54 and later)
    end.best_unsaved_step = step_offset + step if isinstance(step, int) and step > 0 else None
    end.best_metric = tag_nonfinite(float(value))
    end.best_metric_name = _as_the_trainer_reads(metric) if isinstance(metric, str) else "eval_loss"


def _as_metric(value: Any) -> Metric:
    """A value as it travels (``KaioCallback._value``), as a number: a float, a NaN/inf tag, or None."""
    if isinstance(value, bool):  # a flag, as 0 or 1 (as a step's logged metrics keep it)
        return float(value)
    if value is None:
        return None
    if isinstance(value, int):
        return float(value)
    return value if isinstance(value, float) or value in ("nan", "inf", "-inf") else None


def _said_once(callback: KaioCallback) -> dict[str, Any]:
    """A rank but the first: its own non-finite loss, with the step event after the log that found it, once."""
    found = callback._nonfinite_found
    if not isinstance(found, tuple):
        return {}
    callback._nonfinite_found = True
    return {"loss_nonfinite_from": found[0], "loss_nonfinite": found[1]}


def send_the_step_an_error_ended(trainer: Any) -> None:
    """The training ended by an exception raised after the Trainer counted its step and before kaio's callback, the
    last, heard of its end (an earlier callback's on_step_end): the step trained, and its event is sent now."""
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, KaioCallback)), None)
    state = getattr(trainer, "state", None)
    if callback is None or state is None or not callback._training:
        return
    if int(state.global_step) == callback._in_order.step_sent + 1:
        with contextlib.suppress(Exception):  # the script's own error is the one to tell of
            callback.on_step_end(trainer.args, state, trainer.control)
    callback._in_order.flush()


class _SavedCheckpoints:
    """The checkpoints a training saved, as the script sees their paths and as the record names them: those gone
    since (the Trainer's rotation, save_total_limit; its end, with load_best_model_at_end), each said once."""

    def __init__(self) -> None:
        self._saved: list[tuple[str, str]] = []

    def add(self, saved: str, recorded: str) -> None:
        self._saved.append((saved, recorded))

    def found_in(self, output_dir: object) -> None:
        """The checkpoints already in the training's folder as it begins (an earlier session's, resumed from): its
        rotation and its end may remove them too, and the record, which lists them, must hear of it."""
        if not isinstance(output_dir, str) or not os.path.isdir(output_dir):
            return
        known = {saved for saved, _ in self._saved}
        for name in sorted(os.listdir(output_dir)):
            saved = os.path.join(output_dir, name)
            if name.startswith("checkpoint-") and name[11:].isdigit() and saved not in known and os.path.isdir(saved):
                self._saved.append((saved, recorded_path(saved)))

    def gone(self) -> list[str]:
        gone = [recorded for saved, recorded in self._saved if not os.path.isdir(saved)]
        self._saved = [(saved, recorded) for saved, recorded in self._saved if os.path.isdir(saved)]
        return gone


class _AfterItsStep:
    """A callback before kaio's logs (trainer.log) or evaluates in on_step_end: the step's own event is not sent yet,
    and the record puts a log or an evaluation's metrics in the entry that event opens. Held until it is sent (one
    step at most: a loop that sends no step events holds nothing)."""

    def __init__(self, emitter: EventEmitter) -> None:
        self.emitter = emitter
        self.step_sent = 0  # the Trainer's step whose Step event was sent last
        self._held: list[Log | Eval] = []

    def send(self, event: Log | Eval, trainer_step: int, training: bool) -> None:
        if training and trainer_step == self.step_sent + 1:
            self._held.append(event)
        else:
            self.flush()
            self.emitter.emit(event)

    def sent(self, trainer_step: int) -> None:
        """The Step event of the Trainer's ``trainer_step`` was sent: what waited for it follows."""
        self.step_sent = trainer_step
        self.flush()

    def flush(self) -> None:
        for event in self._held:
            self.emitter.emit(event)
        self._held.clear()


def _ended_early_by(trainer: Any, args: Any, state: Any) -> str | None:
    """The early-stopping callback that ended the training before its max_steps, if one did."""
    max_steps = getattr(state, "max_steps", None)
    if not isinstance(max_steps, int) or max_steps <= 0 or state.global_step >= max_steps:
        return None
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", None) or []:
        said = _early_stopping_said(callback, args)
        if said is not None:
            return said
    return None


def _early_stopping_said(callback: Any, args: Any) -> str | None:
    """transformers' EarlyStoppingCallback (or one like it) that ran out of patience: what it waited for."""
    patience = getattr(callback, "early_stopping_patience", None)
    counter = getattr(callback, "early_stopping_patience_counter", None)
    if not (isinstance(patience, int) and isinstance(counter, int) and counter >= patience > 0):
        return None
    metric = _as_the_trainer_reads(getattr(args, "metric_for_best_model", None) or "loss")
    threshold = getattr(callback, "early_stopping_threshold", None)
    # With a threshold, a smaller gain still makes a new best checkpoint but counts as no improvement: said.
    by = f" by more than {threshold:g}" if isinstance(threshold, (int, float)) and threshold > 0 else ""
    return (
        f"{type(callback).__name__}: {metric} did not improve{by} for {patience} "
        f"evaluation{'s' if patience != 1 else ''}"
    )


def _as_the_trainer_reads(metric: str) -> str:
    """metric_for_best_model as the Trainer looks it up in an evaluation's metrics ("loss" is "eval_loss")."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def _on_gpu(value: Any) -> bool:
    device = getattr(value, "device", None)
    return device is not None and getattr(device, "type", "cpu") != "cpu" and hasattr(value, "item")


def _with_what_printing_took(logs: dict, state: Any) -> dict:
    """``logs`` with the ``total_flos`` transformers' PrinterCallback (``disable_tqdm=True``) pops from it before
    this callback sees it, taken from the copy ``Trainer.log`` keeps in ``log_history``."""
    history = getattr(state, "log_history", None)
    kept = history[-1] if history else None
    if "total_flos" in logs or not isinstance(kept, dict) or kept.get("step") != state.global_step:
        return logs
    return {**logs, "total_flos": kept["total_flos"]} if "total_flos" in kept else logs

"""``kaio.log``: the way in for a training loop that has no transformers ``Trainer``.

Each call reports one optimizer step, exactly as ``KaioCallback`` does for a
Trainer: a step event from every rank (with the step's true peak VRAM on a GPU)
and, from rank 0, the loss and the other numbers given. Outside kaio (no pipe,
no spool) it does nothing, so the script runs unchanged on its own.
"""

from __future__ import annotations

import os
import time
from typing import Any

from kaio.child import stop
from kaio.child.describe import environment
from kaio.child.memory import peak_memory_functions
from kaio.child.nonfinite import stop_on_nonfinite
from kaio.child.patch import shared_emitter, world_size
from kaio.telemetry.protocol import ENV_PIPE, ENV_SPOOL_DIR, Eval, Log, Metric, RunStart, Step, TrainEnd, tag_nonfinite

_TRAINING_FIELDS = ("learning_rate", "grad_norm")
_EVALUATION = ("eval_", "test_")  # an evaluation's numbers, as the Trainer names them


class _Reporter:
    def __init__(self) -> None:
        self.emitter = shared_emitter()
        self.rank = self.emitter.rank
        self.last_step: int | None = None
        self.last_mono = time.monotonic()
        self.peak = peak_memory_functions()
        self.tokens_seen = 0  # the ``tokens=`` of every step so far (this rank's)
        # What is added to the loop's own step numbers: 1 for a loop counting from 0 (`for step in range(n)`: step
        # 0 is the record's "before training"), and more where its numbering starts again (each epoch's from 0).
        self.offset = 0
        self.last_given: int | None = None
        self.started = False  # the loop's RunStart is sent
        self.start_step = 0  # the step after which it trains (its first call's)

    def start(self, start_step: int) -> None:
        """The loop's first call: it trains the steps after ``start_step``."""
        self.started = True
        self.start_step = max(start_step, 0)
        self.emitter.emit(
            RunStart(
                rank=self.rank,
                reporter="kaio.log",
                pid=os.getpid(),
                t_wall=time.time(),
                t_mono=time.monotonic(),
                world_size=world_size(),
                start_step=self.start_step,
                environment=environment(),
            )
        )
        stop.loop_reports()

    def log(self, step: int, loss: Any, metrics: dict[str, Any]) -> None:
        evaluation = {k: metrics.pop(k) for k in list(metrics) if k.startswith(_EVALUATION)}
        evaluation = {k: v for k, v in evaluation.items() if v is not None}  # eval_loss=None: not evaluated
        now = time.monotonic()
        if evaluation and loss is None and not metrics and self.last_step is None:
            # Before the loop's first step (its baseline): an evaluation at the step given, and no step of its own.
            if not self.started:
                self.start(step)
            self._evaluated(step, evaluation, runtime_s=None)
            self.last_mono = time.monotonic()
            return
        step = self._recorded(step, loss is not None)
        if not self.started:
            self.start(step - 1)
        if evaluation and loss is None and not metrics and self.last_step is not None and step <= self.last_step:
            # A reported step's evaluation: its time is the time since that step's report (or its last evaluation's).
            self._evaluated(step, evaluation, runtime_s=now - self.last_mono)
            self.last_mono = time.monotonic()  # its time is no part of the next step's own
            return
        tokens = metrics.pop("tokens", None)
        samples = _metric(metrics.pop("samples", None))
        if step != self.last_step:  # a second call for a step (its evaluation, say) adds numbers, not a step
            if tokens is not None:  # steps the loop did not report (it calls every k steps) count as this one
                since = self.last_step if self.last_step is not None else self.start_step
                self.tokens_seen += int(_metric(tokens) or 0) * max(step - since, 1)
            peak = self.peak[1]() if self.peak else None
            self.emitter.emit(
                Step(
                    rank=self.rank,
                    step=step,
                    t_wall=time.time(),
                    t_mono=now,
                    step_time_s=now - self.last_mono,
                    peak_vram_bytes=peak,
                    tokens_seen=self.tokens_seen or None,
                    samples=int(samples) if isinstance(samples, float) else None,
                )
            )
            if self.peak:
                self.peak[0]()  # the next step's peak starts now
            self.last_mono = now
        reported = _metric(loss)
        if self.rank == 0:
            fields: dict[str, Any] = {name: _metric(metrics.pop(name)) for name in _TRAINING_FIELDS if name in metrics}
            self.emitter.emit(
                Log(
                    rank=0,
                    step=step,
                    t_wall=time.time(),
                    loss=reported,
                    extra={k: _metric(v) for k, v in metrics.items()},
                    **fields,
                )
            )
        if evaluation:  # an evaluation's numbers given with the step's (wandb.log's way): the step's evaluation
            self._evaluated(step, evaluation, runtime_s=None)
        self.last_step = step
        if isinstance(reported, str) and stop_on_nonfinite():  # as for a Trainer: the training failed there
            raise SystemExit(
                f"the training loss was not finite ({reported}) at step {step}; stopped there "
                "(reporting.on_nonfinite: stop)"
            )

    def _recorded(self, step: int, a_step: bool) -> int:
        """The record's step for the loop's ``step``: counted from 1, and on where the loop's numbering starts
        again (a call with a loss is a training step; one without, numbers for a step already reported)."""
        if self.last_given is None and step == 0:
            self.offset = 1
        elif a_step and self.last_given is not None and step < self.last_given and self.last_step is not None:
            self.offset = self.last_step + 1 - step
        self.last_given = step
        return step + self.offset

    def _evaluated(self, step: int, evaluation: dict[str, Any], runtime_s: float | None) -> None:
        """``runtime_s``: how long the evaluation took, where the loop's calls tell (the Trainer's ``eval_runtime``)."""
        if self.rank == 0:
            values = {k: _metric(v) for k, v in evaluation.items()}
            now, wall = time.monotonic(), time.time()
            self.emitter.emit(Eval(rank=0, step=step, t_wall=wall, t_mono=now, metrics=values, runtime_s=runtime_s))

    def finish(self) -> None:
        if self.last_step is not None:
            self.emitter.emit(
                TrainEnd(rank=self.rank, step=self.last_step, t_wall=time.time(), t_mono=time.monotonic())
            )


_reporter: _Reporter | None = None


def log(step: int, loss: float | None = None, **metrics: float) -> None:
    """Report optimizer step ``step`` (call it once the step is done): its loss, ``tokens`` (the step's input
    tokens, all ranks together, as the Trainer counts them: the record's throughput), ``samples`` (the examples
    this process trained on in the step: samples/s), ``learning_rate``,
    ``grad_norm``, and any other number, kept per step. A second call for the same step adds numbers to it (a
    loss given again replaces the first). ``eval_*`` (or ``test_*``) numbers are the step's evaluation, given alone
    or with the loss; alone before the first step, the baseline at ``step``. Outside kaio it does nothing."""
    global _reporter
    if not (os.environ.get(ENV_PIPE) or os.environ.get(ENV_SPOOL_DIR)):
        return  # not under kaio: nothing read, nothing converted (a value kaio could not take cannot fail here)
    if _reporter is None:
        _reporter = _Reporter()
    _reporter.log(int(step), loss, dict(metrics))


def finish() -> None:
    """The script has ended (called by kaio's child entry point)."""
    if _reporter is not None:
        _reporter.finish()


def _metric(value: Any) -> Metric:
    """A number as it travels (NaN/inf tagged); None for what is not one number (a list, a word, a dict): never an
    exception in the training (it is left out of the record)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:  # scheduler.get_last_lr()
        value = value[0]
    try:
        if hasattr(value, "numel") and value.numel() != 1:
            return None
        if hasattr(value, "item"):
            value = value.item()  # a tensor: the caller's own value, read where the caller chose to
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return tag_nonfinite(number)

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

from kaio.child.describe import environment
from kaio.child.memory import peak_memory_functions
from kaio.child.nonfinite import stop_on_nonfinite
from kaio.child.patch import shared_emitter
from kaio.telemetry.protocol import Log, Metric, RunStart, Step, TrainEnd, tag_nonfinite

_TRAINING_FIELDS = ("learning_rate", "grad_norm")


class _Reporter:
    def __init__(self) -> None:
        self.emitter = shared_emitter()
        self.rank = self.emitter.rank
        self.last_step: int | None = None
        self.last_mono = time.monotonic()
        self.peak = peak_memory_functions()
        self.tokens_seen = 0  # the ``tokens=`` of every step so far (this rank's)

    def start(self, step: int) -> None:
        self.emitter.emit(
            RunStart(
                rank=self.rank,
                reporter="kaio.log",
                pid=os.getpid(),
                t_wall=time.time(),
                t_mono=time.monotonic(),
                world_size=int(os.environ.get("WORLD_SIZE", "1")),
                start_step=max(step - 1, 0),
                environment=environment(),
            )
        )

    def log(self, step: int, loss: float | None, metrics: dict[str, float]) -> None:
        if self.last_step is None:
            self.start(step)
        now = time.monotonic()
        tokens = metrics.pop("tokens", None)
        if step != self.last_step:  # a second call for a step (its evaluation, say) adds numbers, not a step
            if tokens is not None:
                self.tokens_seen += int(_metric(tokens) or 0)
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
        self.last_step = step
        if isinstance(reported, str) and stop_on_nonfinite():  # as for a Trainer: the training failed there
            raise SystemExit(
                f"the training loss was not finite ({reported}) at step {step}; stopped there "
                "(reporting.on_nonfinite: stop)"
            )

    def finish(self) -> None:
        if self.last_step is not None:
            self.emitter.emit(
                TrainEnd(rank=self.rank, step=self.last_step, t_wall=time.time(), t_mono=time.monotonic())
            )


_reporter: _Reporter | None = None


def log(step: int, loss: float | None = None, **metrics: float) -> None:
    """Report optimizer step ``step`` (call it once the step is done): its loss, ``tokens`` (the step's input
    tokens, all ranks together, as the Trainer counts them: the record's throughput), ``learning_rate``,
    ``grad_norm``, and any other number, kept per step. A second call for the same step adds numbers to it
    (an evaluation's, say)."""
    global _reporter
    if _reporter is None:
        _reporter = _Reporter()
    _reporter.log(int(step), loss, dict(metrics))


def finish() -> None:
    """The script has ended (called by kaio's child entry point)."""
    if _reporter is not None:
        _reporter.finish()


def _metric(value: Any) -> Metric:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()  # a tensor: the caller's own value, read where the caller chose to
    return tag_nonfinite(float(value))

"""A graceful stop that keeps the work: the first SIGTERM asks the Trainer to save a checkpoint at the end of
the current step and stop.

The supervisor turns a first Ctrl-C into SIGTERM (a batch scheduler's preemption sends one too; its warning
before a time limit, SIGUSR1 under SLURM's ``--signal=USR1@T``, asks for the same stop and never ends a rank). While a
Trainer trains, the signal only raises a flag: ``KaioCallback.on_step_end`` then sets the Trainer's own
``should_save`` and ``should_training_stop``, the Trainer writes checkpoint-N and returns, and ``kaio
resume`` continues from step N+1. Outside training (loading, a script without a Trainer) and at a second
SIGTERM the signal does what it always does: end the process. With several ranks each gets the signal from
torch elastic at the same moment and stops at the same step end; should one rank already be past that
check, the ranks cannot agree, the save does not finish within ``launch.grace_seconds``, and the supervisor
kills the job and says that no checkpoint was saved.
"""

from __future__ import annotations

import os
import signal

_state = {"training": False, "requested": False, "terminated": False}  # terminated: a first SIGTERM came
_nonfinite_step: list[int] = []  # the step whose non-finite loss stopped the training (reporting.on_nonfinite)


def install() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A batch scheduler's warning that the job's time is nearly up (SLURM: --signal=USR1@90): the same graceful
    # stop while training; ignored otherwise (a warning, not an order to end).
    signal.signal(signal.SIGUSR1, _on_warning)


def training(active: bool) -> None:
    """The Trainer's loop started (``on_train_begin``) or ended (``on_train_end``)."""
    _state["training"] = active


def requested() -> bool:
    return _state["requested"]


def nonfinite(step: int) -> None:
    """The training stops after a non-finite loss at ``step`` (``reporting.on_nonfinite: stop``)."""
    _nonfinite_step[:] = [step]


def fail_if_stopped_for_nonfinite() -> None:
    """After ``Trainer.train``: a training that stopped on a non-finite loss failed, and what it trained is not
    worth saving; the ``SystemExit`` is the rank's root cause (its error file)."""
    if _nonfinite_step:
        raise SystemExit(
            f"the training loss was not finite from step {_nonfinite_step[0]} on; stopped there "
            "(reporting.on_nonfinite: stop)"
        )


def _on_sigterm(signum: int, frame: object) -> None:
    if _state["training"] and not _state["terminated"]:  # a scheduler's warning before does not count
        _state["requested"] = _state["terminated"] = True
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _on_warning(signum: int, frame: object) -> None:
    if _state["training"]:
        _state["requested"] = True

"""The training loss as it really was: a NaN or inf that the Trainer's logs hide is found.

The Trainer's default ``logging_nan_inf_filter=True`` replaces a non-finite
step loss in its running sum (after a log, by 0), so its logs never show it.
``LossWatch`` keeps each micro-batch's loss as ``training_step`` returned it (a
reference to a 0-d tensor: no device work, no synchronisation) and looks at
them only when the Trainer logs its training loss, where it has just read that
loss from the device anyway. Only with ``reporting.on_nonfinite: stop`` and
several ranks is the finding shared (one small all-reduce at each such log, a
log every rank makes: the Trainer gathers the loss for it), so that every rank
stops at the same step; a warning needs rank 0's own finding only.

With ``logging_nan_inf_filter=False`` the Trainer keeps a non-finite loss in
its running sum until the training ends: every later log says NaN, however
healthy the steps after it. At such a log, when no loss of its window was
non-finite, the window's own average is taken instead (its micro-batches'
sum over its optimizer steps, as the Trainer averages it; on several ranks
their mean, one small all-reduce at that log, which every rank makes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from kaio.telemetry.protocol import ENV_ON_NONFINITE

_FOLD_AT = 4096  # losses kept before they are folded into one tensor (a run that never logs)
_NO_STEP = 1 << 40  # above any step: the all-reduce's "nothing found"


@dataclass(frozen=True)
class NonfiniteLoss:
    """What the losses since the previous log held: the first step whose loss was not finite, and its kind."""

    first_step: int
    tag: str  # "nan", "inf" or "-inf"


@dataclass(frozen=True)
class LossWindow:
    """The losses since the previous log: the first non-finite one, and their average as the Trainer takes it
    (``mean``: None where one was not finite, on any rank, or none was seen)."""

    nonfinite: NonfiniteLoss | None = None
    mean: float | None = None


class LossWatch:
    def __init__(self) -> None:
        self._losses: list[Any] = []  # 0-d tensors, on the loss's device
        self._steps: list[int] = []
        self._folded: list[tuple[Any, list[int]]] = []  # (stacked losses, their steps) of long windows

    def observe(self, loss: Any, step: int) -> None:
        """``training_step`` returned ``loss`` for one micro-batch of optimizer step ``step``."""
        if getattr(loss, "ndim", None) != 0:
            return  # not a scalar tensor: not what the Trainer sums
        self._losses.append(loss)
        self._steps.append(step)
        if len(self._losses) >= _FOLD_AT:
            import torch

            self._folded.append((torch.stack(self._losses), self._steps))
            self._losses, self._steps = [], []

    def take(self, agree: bool = False, average: bool = False) -> LossWindow:
        """The losses since the previous call; forgets what it read. With ``agree`` (a stop is to follow), the
        earliest non-finite step any rank found; with ``average``, the window's mean loss, all ranks: every rank
        must call it with the same arguments at the same log."""
        found, tag, device = _NO_STEP, "nan", None
        total, steps_seen = 0.0, set()
        for losses, steps in self._windows():
            values, device = _read(losses)
            first = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
            if first is not None and found == _NO_STEP:
                found = steps[first]
                tag = "nan" if math.isnan(values[first]) else ("inf" if values[first] > 0 else "-inf")
            if average:
                total += sum(values)  # inf + -inf is NaN here (math.fsum raises): no average then
                steps_seen.update(steps)
            elif found != _NO_STEP:
                break  # the first non-finite loss is found: the rest need not be read
        self._losses, self._steps, self._folded = [], [], []
        if agree:
            found = _agree(found, device)
        nonfinite = None if found == _NO_STEP else NonfiniteLoss(first_step=found, tag=tag)
        mean = _mean_of_ranks(total, len(steps_seen), device) if average else None
        return LossWindow(nonfinite, mean if mean is not None and math.isfinite(mean) else None)

    def nonfinite_of(self) -> tuple[int, int]:
        """(losses NaN/inf, losses) since the previous call; forgets them. An evaluation's batches (the patched
        Trainer's prediction_step): its eval_loss leaves the NaN/inf ones out (logging_nan_inf_filter), and the
        record says so rather than show a finite loss of part of the data."""
        values = [value for losses, _ in self._windows() for value in _read(losses)[0]]
        self._losses, self._steps, self._folded = [], [], []
        return sum(1 for value in values if not math.isfinite(value)), len(values)

    def _windows(self) -> list[tuple[Any, list[int]]]:
        return [*self._folded, (self._losses, self._steps)] if self._losses else list(self._folded)


def _read(losses: Any) -> tuple[list[float], Any]:
    """The losses as floats, and their device: on the CPU one by one (a few us); on a GPU in one copy (the
    Trainer has just waited for the GPU to log its own loss)."""
    if isinstance(losses, list):
        device = losses[0].device
        if device.type == "cpu":
            return [loss.item() for loss in losses], device
        import torch

        losses = torch.stack(losses)
    return losses.tolist(), losses.device


def _agree(step: int, device: Any) -> int:
    """The earliest step any rank found (``_NO_STEP`` when none did); this rank's own without torch.distributed."""
    import torch

    from kaio.child.process_group import initialized

    distributed = initialized()
    if distributed is None or distributed.get_world_size() < 2:
        return step
    # The MAX of this over the ranks is the MIN step.
    value = torch.tensor([_NO_STEP - step], dtype=torch.long, device=_device_of(distributed, device))
    distributed.all_reduce(value, op=distributed.ReduceOp.MAX)
    return _NO_STEP - int(value.item())


def _mean_of_ranks(total: float, steps: int, device: Any) -> float | None:
    """The Trainer's logged loss from these sums: the ranks' mean of their losses' sum, over the window's optimizer
    steps (None where a rank saw none)."""
    import torch

    from kaio.child.process_group import initialized

    distributed = initialized()
    if distributed is None or distributed.get_world_size() < 2:
        return total / steps if steps else None
    # (sum of the ranks' totals, ranks that saw no loss, ranks): a NaN total anywhere makes the sum NaN.
    sums = torch.tensor(
        [total, 0.0 if steps else 1.0, 1.0], dtype=torch.float64, device=_device_of(distributed, device)
    )
    distributed.all_reduce(sums, op=distributed.ReduceOp.SUM)
    ranks_total, missing, ranks = sums.tolist()
    return ranks_total / ranks / steps if steps and not missing else None


def _device_of(distributed: Any, device: Any) -> Any:
    """Where a collective's tensor goes: the losses' device (the CPU on gloo); a rank that saw no loss since the
    last log takes part all the same, from its own device."""
    import torch

    if distributed.get_backend() == "gloo":
        return "cpu"
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return device


def stop_on_nonfinite() -> bool:
    return os.environ.get(ENV_ON_NONFINITE) == "stop"

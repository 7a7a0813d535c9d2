"""The run's vocabulary: each judgement about the numbers, defined once.

The dashboard, the report, the figure and the warnings all use these; none
keeps a variant of its own.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Iterator, Mapping

import msgspec

WARMUP_STEPS = 10  # a randomly initialised model's first steps are not judged (loss, grad norm)
DIVERGENCE_FACTOR = 3.0  # the smoothed loss above 3x its running minimum...
DIVERGENCE_RISE = 0.1  # ...and back up by a tenth of its fall: diverging (LossSmoother.diverging)
GRAD_NORM_SPIKE_FACTOR = 10.0  # a gradient norm above 10x the median of the ones logged just before: a spike
GRAD_NORM_WINDOW = 20  # ...of the 20 before it (the run's own median flags a converging run's early norms)
STALL_FACTOR = 10.0  # no step for 10x the median step time...
STALL_FLOOR_S = 60.0  # ...and at least a minute: a stall
MIN_POINTS_FOR_MEDIAN = 10  # fewer points give no median worth comparing against
# A gradient norm among the first ones, which no window judges (warm-up, then too few before it), is flagged only
# when far beyond anything a warm-up shows: over 1000x the median of those first norms.
GRAD_NORM_EARLY_FACTOR = 1000.0
MIN_LOSSES_TO_SMOOTH = 10  # a smoothed loss of fewer logged losses is mostly the first one: not shown as a level


def trainer_speed_or_total(name: str) -> bool:
    """The Trainer's own running time and speeds (train_runtime, train_*_per_second: logged at every log while it
    counts tokens, and in its closing log) and totals (total_flos, train_loss): kaio measures those itself; not
    metrics of the training."""
    return name in ("total_flos", "train_loss") or (
        name.startswith("train_") and name.endswith(("_runtime", "_per_second"))
    )


def closing_log(extra: Mapping[str, object]) -> bool:
    """The Trainer's closing log (its train_loss, the mean over the training), after its last step: what follows is
    its end (loading the best checkpoint, pruning checkpoints), not a step."""
    return "train_loss" in extra


def not_a_number_note(name: str) -> str:
    """Said once of a logged or evaluation metric that is not a number (text, a list): left out of the record."""
    return f"metric {name} is not a number: not in the record (child.log has it)"


def too_few_to_smooth(finite_losses: int) -> bool:
    """Whether the smoothed loss of this many finite logged losses is no level to show (a loss per epoch: the EMA
    is mostly the first loss, far above the last)."""
    return finite_losses < MIN_LOSSES_TO_SMOOTH


def evaluation_prefix(metrics: Mapping[str, object]) -> str | None:
    """The prefix of an evaluation's own metrics: ``eval``; ``eval_<set>`` with several eval datasets (each an
    evaluation of its own); ``test`` for the script's ``evaluate(metric_key_prefix="test")``. The Trainer's speed
    metrics name it (``<prefix>_runtime`` beside ``<prefix>_samples_per_second``); else the one ``*_runtime``."""
    keys = [k for k in metrics if k.endswith("_runtime")]
    timed = [k for k in keys if f"{k.removesuffix('_runtime')}_samples_per_second" in metrics]
    chosen = timed if timed else keys
    return chosen[0].removesuffix("_runtime") if len(chosen) == 1 else None


def evaluation_runtime(metrics: Mapping[str, object], measured: float | None = None) -> float | None:
    """How long one evaluation took: its ``<prefix>_runtime``, else what was ``measured`` (a kaio.log loop's)."""
    prefix = evaluation_prefix(metrics)
    value = metrics.get(f"{prefix}_runtime") if prefix is not None else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else measured


def training_completed(trained_to_end: bool | None, step: int, max_steps: int | None) -> bool:
    """The Trainer reached its end having trained every step it planned: whatever failed after was the script's
    own code after train() (a push, an evaluation), not the training."""
    return bool(trained_to_end) and max_steps is not None and 0 < max_steps <= step


class LossSmoother(msgspec.Struct, kw_only=True):
    """The one smoothed loss: an EMA over the finite logged losses of one training, in step order.

    Its span grows with the points seen (2% of them, at least 5), so that a short
    run is smoothed lightly and a million-step one still reads as a curve; an
    online pass cannot know the final count. Divergence (``diverging``): judged on
    the smoothed loss, so that one noisy batch near a low minimum is not one.
    """

    smoothed: float | None = None
    count: int = 0  # finite losses seen
    low: float | None = None  # the running minimum of the smoothed loss...
    high: float | None = None  # ...and its maximum
    positive: bool = True  # every loss so far was above 0 (a cross-entropy; not an RL objective around 0)
    before: tuple[float | None, int, float | None, float | None, bool] | None = None  # as it was before the last add

    def add(self, loss: float, *, again: bool = False) -> tuple[float, bool]:
        """The smoothed loss after ``loss``, and whether it diverges there. ``again``: a second loss for the step
        the last one was of (a loop that reports a step's loss twice): it replaces that one."""
        if again and self.before is not None:
            self.smoothed, self.count, self.low, self.high, self.positive = self.before
        self.before = (self.smoothed, self.count, self.low, self.high, self.positive)
        self.count += 1
        self.positive = self.positive and loss > 0
        if self.smoothed is None:
            self.smoothed = loss
        else:
            span = max(5.0, self.count / 50.0)
            alpha = 2.0 / (span + 1.0)
            self.smoothed = alpha * loss + (1.0 - alpha) * self.smoothed
        diverged = self.count > WARMUP_STEPS and self.diverging()
        if self.low is None or self.smoothed < self.low:
            self.low = self.smoothed
        if self.high is None or self.smoothed > self.high:
            self.high = self.smoothed
        return self.smoothed, diverged

    def diverging(self) -> bool:
        """The smoothed loss above ``DIVERGENCE_FACTOR`` times its running minimum, and back up by more than
        ``DIVERGENCE_RISE`` of its fall from its maximum: a loss that had fallen to 0.001 and stands at 0.004 has
        not blown up. Only for a loss that has stayed above 0: the ratio of a loss around 0 (GRPO's, PPO's) to
        its minimum says nothing."""
        s, low, high = self.smoothed, self.low, self.high
        if s is None or low is None or high is None or not self.positive:
            return False
        return s > DIVERGENCE_FACTOR * low and s - low > DIVERGENCE_RISE * (high - low)


def stall_threshold_s(median_step_s: float | None) -> float:
    """How long without a step is a stall, when steps take ``median_step_s``."""
    return STALL_FLOOR_S if median_step_s is None else max(STALL_FACTOR * median_step_s, STALL_FLOOR_S)


def grad_norm_spikes(norms: Iterable[tuple[int, float]]) -> Iterator[tuple[int, float, float]]:
    """``(step, norm, median before it)`` of each logged gradient norm above ``GRAD_NORM_SPIKE_FACTOR`` times
    the median of the ``GRAD_NORM_WINDOW`` logged before it (at least ``MIN_POINTS_FOR_MEDIAN`` of them).
    ``norms``: ``(step, norm)`` in step order. Against what came just before: a fine-tune's norms fall tenfold
    as it converges, and its first ones are no spike against the last ones' median."""
    window: deque[float] = deque(maxlen=GRAD_NORM_WINDOW)
    ordered: list[float] = []  # the window's values, sorted
    for step, norm in norms:
        if len(ordered) >= MIN_POINTS_FOR_MEDIAN:
            middle = len(ordered) // 2
            median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
            if norm > GRAD_NORM_SPIKE_FACTOR * median:
                yield step, norm, median
        if len(window) == window.maxlen:
            del ordered[bisect.bisect_left(ordered, window[0])]
        window.append(norm)
        bisect.insort(ordered, norm)

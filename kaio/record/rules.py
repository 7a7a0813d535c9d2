"""The run's vocabulary: each judgement about the numbers, defined once.

The dashboard, the report, the figure and the warnings all use these; none
keeps a variant of its own.
"""

from __future__ import annotations

import msgspec

WARMUP_STEPS = 10  # a randomly initialised model's first steps are not judged (loss, grad norm)
DIVERGENCE_FACTOR = 3.0  # the smoothed loss above 3x its running minimum: diverging
GRAD_NORM_SPIKE_FACTOR = 10.0  # a gradient norm above 10x the run's median: a spike
STALL_FACTOR = 10.0  # no step for 10x the median step time...
STALL_FLOOR_S = 60.0  # ...and at least a minute: a stall
MIN_POINTS_FOR_MEDIAN = 10  # fewer points give no median worth comparing against


class LossSmoother(msgspec.Struct, kw_only=True):
    """The one smoothed loss: an EMA over the finite logged losses, in step order.

    Its span grows with the points seen (2% of them, at least 5), so that a short
    run is smoothed lightly and a million-step one still reads as a curve; an
    online pass cannot know the final count. Divergence: after the warm-up, the
    smoothed loss above ``DIVERGENCE_FACTOR`` times its running minimum (on the
    smoothed loss, so that one noisy batch near a low minimum is not a divergence).
    """

    smoothed: float | None = None
    count: int = 0  # finite losses seen
    low: float | None = None  # the running minimum of the smoothed loss

    def add(self, loss: float) -> tuple[float, bool]:
        """The smoothed loss after ``loss``, and whether it diverges there."""
        self.count += 1
        if self.smoothed is None:
            self.smoothed = loss
        else:
            span = max(5.0, self.count / 50.0)
            alpha = 2.0 / (span + 1.0)
            self.smoothed = alpha * loss + (1.0 - alpha) * self.smoothed
        diverged = self.count > WARMUP_STEPS and self.low is not None and self.smoothed > DIVERGENCE_FACTOR * self.low
        if self.low is None or self.smoothed < self.low:
            self.low = self.smoothed
        return self.smoothed, diverged


def stall_threshold_s(median_step_s: float | None) -> float:
    """How long without a step is a stall, when steps take ``median_step_s``."""
    return STALL_FLOOR_S if median_step_s is None else max(STALL_FACTOR * median_step_s, STALL_FLOOR_S)

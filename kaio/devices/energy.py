"""Energy of one device since the poller started.

The hardware counter is preferred: it sees every millisecond, where polling
sees two readings a second. It is only trusted after a check, as the Zeus
project does for AMD GPUs: over a short window at the start, the counter's
increase must roughly agree with the integral of the power readings (within
a factor of 10 either way: only obviously broken counters are rejected).
A counter that stands still while power is drawn, goes backwards or wraps is
abandoned for trapezoidal integration of the power samples, at the start or
at any later point, keeping the energy accumulated so far.
"""

from __future__ import annotations

from collections.abc import Sequence

COUNTER = "counter"
INTEGRATED = "integrated"

# Loose bounds (Zeus uses the same): catch broken counters, not calibration differences
# between a windowed power average and an energy accumulator.
_AGREEMENT_MIN_RATIO = 0.1
_AGREEMENT_MAX_RATIO = 10.0
# Below this much integrated energy a ratio says nothing (idle GPU): keep checking.
_MIN_CHECK_ENERGY_J = 1.0
# A counter that has not moved for this long while this much energy was drawn is stuck.
_STUCK_MIN_S = 2.0
_STUCK_MIN_ENERGY_J = 5.0
# A counter that cannot be read for this long no longer covers the run.
_MAX_COUNTER_GAP_S = 10.0


def trapezoid_step_j(t0: float, p0: float, t1: float, p1: float) -> float:
    """Energy between two power readings, assuming power changed linearly."""
    dt = t1 - t0
    return 0.5 * (p0 + p1) * dt if dt > 0 else 0.0


def trapezoid_energy_j(times_s: Sequence[float], powers_w: Sequence[float | None]) -> float | None:
    """Trapezoidal integral of power over time, for unevenly spaced samples.

    ``None`` readings are gaps: the integral bridges them linearly between the
    neighbouring readings. ``None`` when fewer than one reading is available;
    ``0.0`` for a single reading.
    """
    if len(times_s) != len(powers_w):
        raise ValueError("times_s and powers_w must have the same length")
    integrator = PowerIntegrator()
    for t, p in zip(times_s, powers_w):
        integrator.add(t, p)
    return integrator.total_j


def counter_agrees(counter_delta_j: float, integrated_j: float) -> bool:
    """Whether a counter's increase is plausible against integrated power (same window)."""
    if integrated_j <= 0:
        return False
    return _AGREEMENT_MIN_RATIO < counter_delta_j / integrated_j < _AGREEMENT_MAX_RATIO


class PowerIntegrator:
    """Running trapezoidal integral of power readings (``None`` readings are bridged)."""

    def __init__(self) -> None:
        self.total_j: float | None = None  # None until the first power reading
        self._last: tuple[float, float] | None = None

    def add(self, t_s: float, power_w: float | None) -> float | None:
        if power_w is None:
            return self.total_j
        if self._last is None or self.total_j is None:
            self.total_j = 0.0
        else:
            self.total_j += trapezoid_step_j(*self._last, t_s, power_w)
        self._last = (t_s, power_w)
        return self.total_j


class EnergyTracker:
    """Counter first, integration as fallback; ``update`` once per sample of one device."""

    def __init__(self, check_window_s: float = 2.0) -> None:
        self._check_window_s = check_window_s
        self._integrator = PowerIntegrator()
        self.fallback_reason: str | None = None  # why the counter was abandoned, in a user's words
        self.counter_unverified = False  # trusted without a power reading to check it against
        self._state = "checking"  # checking -> counter | integrated
        self._counter_origin: tuple[float, float, float | None] | None = None  # (t, counter_j, integrated_j)
        self._last_counter: tuple[float, float] | None = None  # (t, counter_j) of the latest reading
        self._last_change: tuple[float, float | None] | None = None  # (t, integrated_j) when the counter last moved
        self._energy_at_fallback_j = 0.0
        self._integrated_at_fallback_j: float | None = None

    def update(self, t_s: float, power_w: float | None, counter_j: float | None) -> tuple[float | None, str | None]:
        """Energy since the first update and the method that produced it."""
        integrated = self._integrator.add(t_s, power_w)
        if self._state != INTEGRATED:
            self._watch_counter(t_s, counter_j, integrated)
        if self._state == "checking" and self._counter_origin is not None:
            self._check_counter(t_s, integrated)
        return self._report(integrated)

    def _counter_energy_j(self) -> float:
        assert self._counter_origin is not None and self._last_counter is not None
        return self._last_counter[1] - self._counter_origin[1]

    def _watch_counter(self, t_s: float, counter_j: float | None, integrated: float | None) -> None:
        if counter_j is None:
            last_seen = self._last_counter[0] if self._last_counter else None
            if last_seen is not None and t_s - last_seen > _MAX_COUNTER_GAP_S:
                self._fall_back(f"the energy counter could not be read for over {_MAX_COUNTER_GAP_S:.0f} s")
            return
        if self._counter_origin is None:
            self._counter_origin = (t_s, counter_j, integrated)
            self._last_counter = (t_s, counter_j)
            self._last_change = (t_s, integrated)
            return
        assert self._last_counter is not None and self._last_change is not None
        previous = self._last_counter[1]
        if counter_j < previous:
            self._fall_back("the energy counter went backwards (wrapped or was reset)")
            return
        self._last_counter = (t_s, counter_j)
        if counter_j > previous:
            self._last_change = (t_s, integrated)
            return
        since_t, since_integrated = self._last_change
        drawn = None if integrated is None or since_integrated is None else integrated - since_integrated
        if t_s - since_t >= _STUCK_MIN_S and drawn is not None and drawn >= _STUCK_MIN_ENERGY_J:
            self._fall_back(f"the energy counter stood still for {t_s - since_t:.1f} s while power was drawn")

    def _check_counter(self, t_s: float, integrated: float | None) -> None:
        assert self._counter_origin is not None
        origin_t, _, origin_integrated = self._counter_origin
        if t_s - origin_t < self._check_window_s:
            return
        if integrated is None or origin_integrated is None:
            # Nothing to check against (no power reading): a moving counter is still the best figure.
            if self._counter_energy_j() > 0:
                self._state = COUNTER
                self.counter_unverified = True
            return
        window_j = integrated - origin_integrated
        if window_j < _MIN_CHECK_ENERGY_J:
            return
        counter_j = self._counter_energy_j()
        if counter_agrees(counter_j, window_j):
            self._state = COUNTER
        else:
            self._fall_back(
                f"the energy counter disagreed with integrated power ({counter_j:.1f} J vs {window_j:.1f} J)"
            )

    def _fall_back(self, reason: str) -> None:
        if self._state == COUNTER:
            # The counter is good up to the last time it moved; integrate from there.
            assert self._last_change is not None
            self._energy_at_fallback_j = self._counter_energy_j()
            self._integrated_at_fallback_j = self._last_change[1]
        else:  # while checking, the integral was what we reported: carry on with it
            self._energy_at_fallback_j = self._integrator.total_j or 0.0
            self._integrated_at_fallback_j = self._integrator.total_j
        self._state = INTEGRATED
        self.fallback_reason = reason

    def _report(self, integrated: float | None) -> tuple[float | None, str | None]:
        if self._state == COUNTER:
            return self._counter_energy_j(), COUNTER
        if self._state == INTEGRATED:
            if integrated is None:
                return None, None  # no power reading to integrate: the energy is not known
            since = integrated - (self._integrated_at_fallback_j or 0.0)
            return self._energy_at_fallback_j + since, INTEGRATED
        # Still checking the counter: the integral is the honest figure meanwhile.
        return (integrated, INTEGRATED) if integrated is not None else (None, None)

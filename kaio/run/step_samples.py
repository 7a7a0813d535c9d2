"""A step's GPU and host samples: each poller tick kept until the steps around it have ended, then folded into the
step whose time window it fell in (``StepEntry.gpus``, power, utilisation, temperature, energy, host).

A step waits for a tick later than its end (``waits_for``); a step with no tick inside its window (faster than the
poller) carries the latest sample before its end (``StepEntry.gpus_carried``). Each GPU's energy counter is
interpolated linearly at both ends of the step. Memory holds only the ticks the waiting steps need.
"""

from __future__ import annotations

import msgspec

from kaio.devices.base import GpuSample, HostSample, device_order
from kaio.record.types import GpuStepStats, HostStepStats, StepEntry, TickRecord

MAX_UNAGGREGATED_STEPS = 1000  # steps faster than the poller: fold in what is there rather than wait
TICKS_BEFORE_FIRST_STEP = 1200  # 10 minutes at 2 Hz while a big model loads


class TickWindow(msgspec.Struct, kw_only=True):
    """What a tick gives the steps around it: each GPU's sample, the host's, and the run's GPUs together."""

    t_mono: float
    gpus: dict[str, GpuSample]
    run_keys: set[str] = set()  # the GPUs the run uses (the others are recorded, not counted in the totals)
    host: HostSample | None = None
    power: float | None = None  # W, sum over the run's GPUs
    util: float | None = None  # %, mean over the run's GPUs
    temp: float | None = None  # C, max over the run's GPUs (junction where known)


class StepSamples(msgspec.Struct, kw_only=True):
    ticks: list[TickWindow] = []
    pending: list[int] = []  # rank 0's ended steps still waiting for a tick after their end, in order
    prev_end_mono: float | None = None  # the end of the latest step whose samples were folded in

    def start_session(self) -> None:
        self.ticks.clear()
        self.pending.clear()
        self.prev_end_mono = None

    def step_ended(self, step: int, open_steps: dict[int, StepEntry]) -> None:
        """Rank 0's ``step`` ended (its entry's ``t_mono`` set): it waits for a tick after its end."""
        if not self.ticks:  # no poller, no samples to wait for
            return
        self.pending.append(step)
        if len(self.pending) > MAX_UNAGGREGATED_STEPS:
            self._fold(self.pending.pop(0), open_steps)

    def waits_for(self, step: int) -> bool:
        """``step`` (or one before it) still waits for its samples: it may not be sealed yet."""
        return bool(self.pending) and step >= self.pending[0]

    def add_tick(self, tick: TickRecord, run_keys: set[str], open_steps: dict[int, StepEntry]) -> None:
        if tick.t_mono is None:
            return
        mine = [g for g in tick.gpus if g.key in run_keys]
        power = [g.power_w for g in mine if g.power_w is not None]
        utils = [g.util_pct for g in mine if g.util_pct is not None]
        temps = [t for g in mine if (t := g.temp_junction_c if g.temp_junction_c is not None else g.temp_c) is not None]
        self.ticks.append(
            TickWindow(
                t_mono=tick.t_mono,
                gpus={g.key: g for g in sorted(tick.gpus, key=_by_key)},
                run_keys={g.key for g in mine},
                host=tick.host,
                power=sum(power) if power else None,
                util=sum(utils) / len(utils) if utils else None,
                temp=max(temps) if temps else None,
            )
        )
        while self.pending:
            entry = open_steps.get(self.pending[0])
            if entry is not None and entry.t_mono is not None and entry.t_mono > tick.t_mono:
                break
            self._fold(self.pending.pop(0), open_steps)
        self._trim_ticks(open_steps)

    def fold_all(self, open_steps: dict[int, StepEntry]) -> None:
        """A session ends: the waiting steps take the samples there are."""
        while self.pending:
            self._fold(self.pending.pop(0), open_steps)

    def _trim_ticks(self, open_steps: dict[int, StepEntry]) -> None:
        """Drop ticks no pending step can need; keep one before the window for energy interpolation."""
        horizon = self.prev_end_mono
        if self.pending:
            first = open_steps.get(self.pending[0])
            if first is not None and first.t_mono is not None:
                start = first.t_mono - (first.step_time_s or 0.0)
                horizon = start if horizon is None else min(horizon, start)
        if horizon is None:  # no step has ended yet (a big model still loading): a bounded window
            del self.ticks[:-TICKS_BEFORE_FIRST_STEP]
            return
        drop = 0
        while len(self.ticks) - drop > 2 and self.ticks[drop + 1].t_mono <= horizon:
            drop += 1
        del self.ticks[:drop]

    def _fold(self, step: int, open_steps: dict[int, StepEntry]) -> None:
        entry = open_steps.get(step)
        if entry is None or entry.t_mono is None:
            return
        end = entry.t_mono
        start = self.prev_end_mono
        if start is None or start >= end:
            start = end - (entry.step_time_s or 0.0)
        self.prev_end_mono = end
        inside = [t for t in self.ticks if start < t.t_mono <= end]
        carried = not inside
        if carried:
            before = [t for t in self.ticks if t.t_mono <= end]
            if not before:
                return
            inside = [before[-1]]
        entry.gpus_carried = carried
        entry.power_avg, entry.power_min, entry.power_max = _avg_min_max([t.power for t in inside])
        entry.util = _avg_min_max([t.util for t in inside])[0]
        entry.temp = _max([t.temp for t in inside])
        energies = []
        run_keys = inside[0].run_keys if len(inside) == 1 else {k for t in inside for k in t.run_keys}
        by_key = self._energies_between(start, end)
        keys = inside[0].gpus if len(inside) == 1 else sorted({k for t in inside for k in t.gpus})
        for key in keys:
            samples = [t.gpus[key] for t in inside if key in t.gpus]
            energy = by_key.get(key)
            entry.gpus[key] = _gpu_stats(samples, 0 if carried else len(samples), energy)
            if energy is not None and key in run_keys:
                energies.append(energy)
        entry.energy_j = round(sum(energies), 6) if energies else None
        hosts = [t.host for t in inside if t.host is not None]
        if hosts:
            entry.host = HostStepStats(
                cpu_pct=_avg_min_max([h.cpu_pct for h in hosts])[0],
                ram_used_bytes=_max([h.ram_used_bytes for h in hosts]),
            )

    def _energies_between(self, start: float, end: float) -> dict[str, float]:
        """Each GPU's energy counter interpolated linearly at both ends of the step (one pass over the ticks)."""
        points: dict[str, list[tuple[float, float]]] = {}
        for tick in self.ticks:
            for key, sample in tick.gpus.items():
                if sample.energy_j is not None:
                    points.setdefault(key, []).append((tick.t_mono, sample.energy_j))
        return {
            key: round(max(_interpolate(p, end) - _interpolate(p, start), 0.0), 6)
            for key, p in points.items()
            if len(p) > 1
        }


def _gpu_stats(samples: list[GpuSample], count: int, energy_j: float | None) -> GpuStepStats:
    s = samples[0]
    # One or two samples (a step about as long as the poll interval, the usual case): no lists to build.
    if len(samples) == 1:
        power = (_rounded(s.power_w), s.power_w, s.power_w)
        util = (_rounded(s.util_pct), s.util_pct, s.util_pct)
        temp, junction, vram, run_vram = s.temp_c, s.temp_junction_c, s.vram_used_bytes, s.run_vram_bytes
        throttle = sorted(s.throttle) if s.throttle else None
    elif len(samples) == 2:
        t = samples[1]
        power, util = _pair(s.power_w, t.power_w), _pair(s.util_pct, t.util_pct)
        temp, junction = _max2(s.temp_c, t.temp_c), _max2(s.temp_junction_c, t.temp_junction_c)
        vram, run_vram = _max2(s.vram_used_bytes, t.vram_used_bytes), _max2(s.run_vram_bytes, t.run_vram_bytes)
        throttle = sorted({*(s.throttle or ()), *(t.throttle or ())}) or None
    else:
        power = _avg_min_max([s.power_w for s in samples])
        util = _avg_min_max([s.util_pct for s in samples])
        temp, junction = _max([s.temp_c for s in samples]), _max([s.temp_junction_c for s in samples])
        vram, run_vram = _max([s.vram_used_bytes for s in samples]), _max([s.run_vram_bytes for s in samples])
        throttle = sorted({r for s in samples for r in (s.throttle or ())}) or None
    return GpuStepStats(
        power_avg=power[0],
        power_min=power[1],
        power_max=power[2],
        util_avg=util[0],
        util_min=util[1],
        util_max=util[2],
        temp_max=temp,
        temp_junction_max=junction,
        energy_j=energy_j,
        vram_used_max_bytes=vram,
        run_vram_max_bytes=run_vram,
        throttle=throttle,
        samples=count,
    )


def _by_key(sample: GpuSample) -> tuple:
    return device_order(sample.key)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _pair(a: float | None, b: float | None) -> tuple[float | None, float | None, float | None]:
    """``_avg_min_max`` of two values."""
    if a is None or b is None:
        value = a if b is None else b
        return _rounded(value), value, value
    return round((a + b) / 2, 3), (a if a < b else b), (a if a > b else b)


def _max2(a, b):
    if a is None:
        return b
    return a if b is None or a >= b else b


def _avg_min_max(values: list) -> tuple[float | None, float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None, None
    return round(sum(present) / len(present), 3), min(present), max(present)


def _max(values: list):
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _interpolate(points: list[tuple[float, float]], t: float) -> float:
    """Linear interpolation of a cumulative counter at time ``t`` (clamped inside the known span)."""
    if t <= points[0][0]:
        return points[0][1]
    for (t0, e0), (t1, e1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return e0 if t1 == t0 else e0 + (e1 - e0) * (t - t0) / (t1 - t0)
    return points[-1][1]

"""``RunTally``: everything the report needs from a run's steps, accumulated one step at a time.

The supervisor keeps only a window of steps in memory: each final step entry
(the dict of history.json's ``steps[i]``, docs/history-schema.md) is fed once,
in step order, to ``RunTally.add``. The tally's size depends on the number of
GPUs, ranks, sessions and throttle reasons, never on the number of steps.
``summary.summarize`` and ``plot.build_figure`` read only the tally. Pure
maths, no I/O; stdlib only (``kaio --help`` must stay fast).

Exact figures: counts, sums, first/last/min/max (with their step), the
per-session time spans, the cumulative sample counters. A time-weighted mean
keeps (sum of value x duration, sum of duration) over steps of known duration
and (sum of value, count) over the rest, so the median-duration weight of the
rest applies at the end and the mean is the same as weighting step by step.

Approximations, chosen for bounded memory:

* Medians (gradient norm, step time, known step durations) come from a
  ``Sketch``: exact while it holds at most ``EXACT_VALUES`` values, then a
  sparse histogram of log-scale bins of ratio ``GAMMA`` (1.001), so a median
  is within 0.05 % of a value of the middle bin. "Values above k x the median"
  counts whole bins: a bin straddling the threshold counts by its centre.
  Beyond ``MAX_BINS`` bins, pairs of bins merge (ratio squared, 0.1 %). Values
  of zero or below count as 0.
* The smoothed loss is an EMA whose span grows with the logged points seen so
  far: ``alpha_n = 2 / (max(5, n / 50) + 1)`` for the n-th logged loss (a
  span of about 2 % of the points, at least 5). An online pass cannot know
  the final count, so the early points get more weight than a fixed span over
  the whole run would give them. The final smoothed loss, the exploding-loss
  check and the figure's smoothed line all use it.
* The figure's lines: a min/max decimation on one step grid shared by every
  channel, at most ``BUCKETS`` buckets over [first step, last step]. When a
  step falls beyond the last bucket, adjacent buckets merge in pairs (bucket
  width doubles). Each bucket keeps its lowest and highest value with their
  steps, so a one-step spike survives and points keep their order. With no
  more steps than buckets, every step is its own bucket: the lines are exact.
"""

from __future__ import annotations

import base64
import math
import sys
from array import array
from typing import Any, Iterable

# Logged losses before the "exploding loss" check starts: the running minimum
# of the first few points is not meaningful yet.
LOSS_WARMUP_POINTS = 10
EXPLODING_LOSS_FACTOR = 3.0

BUCKETS = 1024
GAMMA = 1.001
EXACT_VALUES = 256
MAX_BINS = 8192

SEED_GPU = "all GPUs"  # the pseudo-GPU of a hand-made history with only step-level keys
FORMAT_VERSION = 1

_INF = math.inf
_NAN = math.nan
_LOG_GAMMA = math.log(GAMMA)
# Weighted sums: (sum x*duration, sum duration) for known durations, (sum x, count) for the rest.
_KNOWN, _UNKNOWN = 0, 2


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else ``None``."""
    if value.__class__ is float:  # the common case first: this runs millions of times on long runs
        return value if value - value == 0.0 else None  # NaN and inf give NaN
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def smoothing_alpha(points_seen: int) -> float:
    """EMA weight of the ``points_seen``-th logged loss: a span of ~2% of the points so far, at least 5."""
    span = max(5.0, points_seen / 50.0)
    return 2.0 / (span + 1.0)


def tally_steps(steps: Iterable[dict]) -> "RunTally":
    """A tally of ``steps`` (step entries, in step order)."""
    tally = RunTally()
    for entry in steps:
        tally.add(entry)
    return tally


# --- serialisation helpers ----------------------------------------------------


def _pack(values: array) -> str:
    """An array as base64 of its little-endian bytes: compact and exact."""
    if sys.byteorder == "big":
        values = array(values.typecode, values)
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def _unpack(text: str, typecode: str = "d") -> array:
    values = array(typecode)
    values.frombytes(base64.b64decode(text))
    if sys.byteorder == "big":
        values.byteswap()
    return values


def _plain_copy(value: Any) -> Any:
    """A scalar as it is, a short list (exploded_first) copied: a snapshot must not change with later steps."""
    return list(value) if isinstance(value, list) else value


def _weighted_mean(sums: Iterable[float], fallback: float) -> float | None:
    """Mean from (sum x*d, sum d, sum x, n) with ``fallback`` as the duration of the unknown steps."""
    xd, d, xu, nu = sums
    weight = d + fallback * nu
    return (xd + fallback * xu) / weight if weight > 0 else None


# --- building blocks ------------------------------------------------------------


class Sketch:
    """Median and "count above a threshold" of a stream of values, in bounded memory (module docstring)."""

    __slots__ = ("count", "exact", "bins", "zeros", "level")

    def __init__(self) -> None:
        self.count = 0
        self.exact: list[float] | None = []  # None once the values moved into bins
        self.bins: dict[int, int] = {}
        self.zeros = 0
        self.level = 0  # bins merged in pairs this many times: ratio GAMMA ** (2 ** level)

    def add(self, value: float) -> None:
        self.count += 1
        exact = self.exact
        if exact is not None:
            exact.append(value)
            if len(exact) > EXACT_VALUES:
                self.exact = None
                for x in exact:
                    self._bin(x)
            return
        self._bin(value)

    def _bin(self, value: float) -> None:
        if value <= 0.0:
            self.zeros += 1
            return
        key = math.ceil(math.log(value) / (_LOG_GAMMA * (1 << self.level)))
        bins = self.bins
        bins[key] = bins.get(key, 0) + 1
        if len(bins) > MAX_BINS:
            self._coarsen()

    def _coarsen(self) -> None:
        """Merge bins in pairs: bin k of ratio g covers (g^(k-1), g^k], so bins 2k-1 and 2k become k."""
        merged: dict[int, int] = {}
        for key, n in self.bins.items():
            half = -((-key) // 2)
            merged[half] = merged.get(half, 0) + n
        self.bins = merged
        self.level += 1

    def _centre(self, key: int) -> float:
        return math.exp((key - 0.5) * _LOG_GAMMA * (1 << self.level))

    def _sorted_bins(self) -> list[tuple[float, int]]:
        pairs = [(0.0, self.zeros)] if self.zeros else []
        return pairs + [(self._centre(k), self.bins[k]) for k in sorted(self.bins)]

    def median(self) -> float | None:
        if not self.count:
            return None
        if self.exact is not None:
            ordered = sorted(self.exact)
            middle = len(ordered) // 2
            return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2.0
        wanted = [(self.count - 1) // 2, self.count // 2]  # ranks of the middle value(s)
        found: list[float] = []
        seen = 0
        for centre, n in self._sorted_bins():
            seen += n
            while wanted and wanted[0] < seen:
                found.append(centre)
                wanted.pop(0)
            if not wanted:
                break
        return (found[0] + found[1]) / 2.0

    def count_above(self, threshold: float) -> int:
        if self.exact is not None:
            return sum(1 for x in self.exact if x > threshold)
        return sum(n for centre, n in self._sorted_bins() if centre > threshold)

    def copy(self) -> "Sketch":
        clone = Sketch()
        clone.count, clone.zeros, clone.level = self.count, self.zeros, self.level
        clone.exact = None if self.exact is None else list(self.exact)
        clone.bins = dict(self.bins)
        return clone

    def to_dict(self) -> dict:
        keys = sorted(self.bins)
        return {
            "count": self.count, "zeros": self.zeros, "level": self.level,
            "exact": None if self.exact is None else _pack(array("d", self.exact)),
            "keys": _pack(array("q", keys)), "counts": _pack(array("q", (self.bins[k] for k in keys))),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Sketch":
        sketch = cls()
        sketch.count, sketch.zeros, sketch.level = d["count"], d["zeros"], d["level"]
        sketch.exact = None if d["exact"] is None else _unpack(d["exact"]).tolist()
        sketch.bins = dict(zip(_unpack(d["keys"], "q"), _unpack(d["counts"], "q")))
        return sketch


class _Line:
    """One figure line on the shared grid: per bucket, the lowest and highest value with their steps.

    ``gaps``: a bucket that has steps but no value draws as a gap (NaN), as for a
    GPU reading; otherwise the line connects over it, as for the logged loss.
    """

    __slots__ = ("gaps", "lo", "lo_x", "hi", "hi_x")

    def __init__(self, gaps: bool, buckets: int = 0) -> None:
        self.gaps = gaps
        self.lo = array("d", [_INF]) * buckets
        self.lo_x = array("d", [_NAN]) * buckets
        self.hi = array("d", [-_INF]) * buckets
        self.hi_x = array("d", [_NAN]) * buckets

    def put(self, bucket: int, step: int, value: float) -> None:
        if value < self.lo[bucket]:
            self.lo[bucket] = value
            self.lo_x[bucket] = step
        if value > self.hi[bucket]:
            self.hi[bucket] = value
            self.hi_x[bucket] = step

    def grow(self) -> None:
        self.lo.append(_INF)
        self.lo_x.append(_NAN)
        self.hi.append(-_INF)
        self.hi_x.append(_NAN)

    def merge_pairs(self) -> None:
        lo, lo_x, hi, hi_x = (array("d") for _ in range(4))
        for i in range(0, len(self.lo), 2):
            j = i + 1 if i + 1 < len(self.lo) and self.lo[i + 1] < self.lo[i] else i  # ties keep the earlier
            lo.append(self.lo[j])
            lo_x.append(self.lo_x[j])
            j = i + 1 if i + 1 < len(self.hi) and self.hi[i + 1] > self.hi[i] else i
            hi.append(self.hi[j])
            hi_x.append(self.hi_x[j])
        self.lo, self.lo_x, self.hi, self.hi_x = lo, lo_x, hi, hi_x

    def points(self, grid: "_Grid") -> tuple[list[float], list[float]]:
        """The line to draw: each bucket's min and max in step order; a NaN where ``gaps`` and no value."""
        xs: list[float] = []
        ys: list[float] = []
        for b, n in enumerate(grid.counts):
            if not n:
                continue
            low, high = self.lo[b], self.hi[b]
            if low == _INF:
                if self.gaps:
                    xs.append(grid.first[b])
                    ys.append(_NAN)
                continue
            pair = [(self.lo_x[b], low), (self.hi_x[b], high)]
            if pair[0][0] > pair[1][0]:
                pair.reverse()
            for x, y in pair[: 1 if pair[0][0] == pair[1][0] else 2]:
                xs.append(x)
                ys.append(y)
        return xs, ys

    def copy(self) -> "_Line":
        clone = _Line(self.gaps)
        clone.lo, clone.lo_x, clone.hi, clone.hi_x = (array("d", a) for a in (self.lo, self.lo_x, self.hi, self.hi_x))
        return clone

    def to_dict(self) -> dict:
        return {"gaps": self.gaps, **{name: _pack(getattr(self, name)) for name in ("lo", "lo_x", "hi", "hi_x")}}

    @classmethod
    def from_dict(cls, d: dict) -> "_Line":
        line = cls(d["gaps"])
        line.lo, line.lo_x, line.hi, line.hi_x = (_unpack(d[name]) for name in ("lo", "lo_x", "hi", "hi_x"))
        return line


class _Band:
    """A shaded band on the shared grid: per bucket, the lowest low and the highest high."""

    __slots__ = ("lo", "hi")

    def __init__(self, buckets: int = 0) -> None:
        self.lo = array("d", [_INF]) * buckets
        self.hi = array("d", [-_INF]) * buckets

    def put(self, bucket: int, low: float, high: float) -> None:
        if low < self.lo[bucket]:
            self.lo[bucket] = low
        if high > self.hi[bucket]:
            self.hi[bucket] = high

    def grow(self) -> None:
        self.lo.append(_INF)
        self.hi.append(-_INF)

    def merge_pairs(self) -> None:
        self.lo = array("d", (min(self.lo[i : i + 2]) for i in range(0, len(self.lo), 2)))
        self.hi = array("d", (max(self.hi[i : i + 2]) for i in range(0, len(self.hi), 2)))

    def points(self, grid: "_Grid") -> tuple[list[float], list[float], list[float]]:
        """At each bucket's first step, its band (NaN where no value: a gap in the shading)."""
        xs, lows, highs = [], [], []
        for b, n in enumerate(grid.counts):
            if n:
                xs.append(grid.first[b])
                lows.append(self.lo[b] if self.lo[b] != _INF else _NAN)
                highs.append(self.hi[b] if self.hi[b] != -_INF else _NAN)
        return xs, lows, highs

    def copy(self) -> "_Band":
        clone = _Band()
        clone.lo, clone.hi = array("d", self.lo), array("d", self.hi)
        return clone

    def to_dict(self) -> dict:
        return {"lo": _pack(self.lo), "hi": _pack(self.hi)}

    @classmethod
    def from_dict(cls, d: dict) -> "_Band":
        band = cls()
        band.lo, band.hi = _unpack(d["lo"]), _unpack(d["hi"])
        return band


class _Grid:
    """The step grid every channel shares: bucket b covers steps [origin + b*2^shift, origin + (b+1)*2^shift).

    Also the figure's NaN/inf loss marks: per bucket, how many and the first such step.
    """

    __slots__ = ("origin", "shift", "counts", "first", "marks", "mark_x")

    def __init__(self) -> None:
        self.origin: int | None = None
        self.shift = 0
        self.counts = array("d")  # steps in each bucket
        self.first = array("d")  # each bucket's first step
        self.marks = array("d")
        self.mark_x = array("d")

    def grow(self) -> None:
        for values, empty in ((self.counts, 0.0), (self.first, _NAN), (self.marks, 0.0), (self.mark_x, _NAN)):
            values.append(empty)

    def merge_pairs(self) -> None:
        counts, first, marks, mark_x = (array("d") for _ in range(4))
        for i in range(0, len(self.counts), 2):
            j = i + 1 if i + 1 < len(self.counts) else i  # an odd last bucket merges with nothing
            counts.append(self.counts[i] + (self.counts[j] if j != i else 0.0))
            first.append(self.first[i] if self.counts[i] else self.first[j])
            marks.append(self.marks[i] + (self.marks[j] if j != i else 0.0))
            mark_x.append(self.mark_x[i] if self.marks[i] else self.mark_x[j])
        self.counts, self.first, self.marks, self.mark_x = counts, first, marks, mark_x
        self.shift += 1

    def copy(self) -> "_Grid":
        clone = _Grid()
        clone.origin, clone.shift = self.origin, self.shift
        for name in ("counts", "first", "marks", "mark_x"):
            setattr(clone, name, array("d", getattr(self, name)))
        return clone

    def to_dict(self) -> dict:
        return {"origin": self.origin, "shift": self.shift,
                **{name: _pack(getattr(self, name)) for name in ("counts", "first", "marks", "mark_x")}}

    @classmethod
    def from_dict(cls, d: dict) -> "_Grid":
        grid = cls()
        grid.origin, grid.shift = d["origin"], d["shift"]
        for name in ("counts", "first", "marks", "mark_x"):
            setattr(grid, name, _unpack(d[name]))
        return grid


# Offsets of each time-weighted field in a GPU's ``sums`` (4 numbers each: see _KNOWN/_UNKNOWN).
_POWER, _UTIL, _TEMP = 0, 4, 8
GPU_MEAN_FIELDS = {"power": _POWER, "util": _UTIL, "temp": _TEMP}
GPU_LINES = ("util", "power", "temp")


class _GpuTally:
    """One GPU's summary figures and figure channels."""

    __slots__ = ("sums", "power_peak", "temp_peak", "vram_peak", "has_value",
                 "throttle_steps", "throttle_first", "throttle_reasons", "lines", "power_band")

    def __init__(self, buckets: int = 0) -> None:
        self.sums = array("d", [0.0]) * 12
        self.power_peak: float | None = None
        self.temp_peak: float | None = None
        self.vram_peak: float | None = None
        self.has_value = False
        self.throttle_steps = 0
        self.throttle_first: int | None = None
        self.throttle_reasons: dict[str, None] = {}  # an ordered set
        self.lines = {name: _Line(gaps=True, buckets=buckets) for name in GPU_LINES}
        self.power_band = _Band(buckets)

    def channels(self) -> list:
        return [*self.lines.values(), self.power_band]

    def add(self, e: dict, step: int, bucket: int, weight: float, known: int) -> float | None:
        """One step's aggregate of this GPU; returns its device-used VRAM (for the max over GPUs)."""
        power, low, high = finite(e.get("power_avg")), finite(e.get("power_min")), finite(e.get("power_max"))
        util = finite(e.get("util_avg"))
        temp = finite(e.get("temp_junction_max"))
        if temp is None:
            temp = finite(e.get("temp_max"))
        vram = finite(e.get("vram_used_max_bytes"))
        sums, lines = self.sums, self.lines
        if power is not None:
            sums[_POWER + known] += power * weight
            sums[_POWER + known + 1] += weight
            lines["power"].put(bucket, step, power)
        peak = high if high is not None else power
        if peak is not None:
            if self.power_peak is None or peak > self.power_peak:
                self.power_peak = peak
            band_low = low if low is not None else power
            self.power_band.put(bucket, _INF if band_low is None else band_low, peak)
        elif low is not None:
            self.power_band.put(bucket, low, -_INF)
        if util is not None:
            sums[_UTIL + known] += util * weight
            sums[_UTIL + known + 1] += weight
            lines["util"].put(bucket, step, util)
        if temp is not None:
            sums[_TEMP + known] += temp * weight
            sums[_TEMP + known + 1] += weight
            lines["temp"].put(bucket, step, temp)
            if self.temp_peak is None or temp > self.temp_peak:
                self.temp_peak = temp
        if vram is not None and (self.vram_peak is None or vram > self.vram_peak):
            self.vram_peak = vram
        if not self.has_value and (power is not None or low is not None or high is not None
                                   or util is not None or temp is not None or vram is not None):
            self.has_value = True
        reasons = e.get("throttle")
        if reasons:
            if not self.throttle_steps:
                self.throttle_first = step
            self.throttle_steps += 1
            self.throttle_reasons.update(dict.fromkeys(reasons))
        return vram

    def mean(self, field: str, fallback: float) -> float | None:
        offset = GPU_MEAN_FIELDS[field]
        return _weighted_mean(self.sums[offset : offset + 4], fallback)

    def copy(self) -> "_GpuTally":
        clone = _GpuTally()
        for name in ("power_peak", "temp_peak", "vram_peak", "has_value", "throttle_steps", "throttle_first"):
            setattr(clone, name, getattr(self, name))
        clone.sums = array("d", self.sums)
        clone.throttle_reasons = dict(self.throttle_reasons)
        clone.lines = {name: line.copy() for name, line in self.lines.items()}
        clone.power_band = self.power_band.copy()
        return clone

    def to_dict(self) -> dict:
        return {
            "sums": _pack(self.sums), "power_peak": self.power_peak, "temp_peak": self.temp_peak,
            "vram_peak": self.vram_peak, "has_value": self.has_value, "throttle_steps": self.throttle_steps,
            "throttle_first": self.throttle_first, "throttle_reasons": list(self.throttle_reasons),
            "lines": {name: line.to_dict() for name, line in self.lines.items()},
            "power_band": self.power_band.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "_GpuTally":
        gpu = cls()
        for name in ("power_peak", "temp_peak", "vram_peak", "has_value", "throttle_steps", "throttle_first"):
            setattr(gpu, name, d[name])
        gpu.sums = _unpack(d["sums"])
        gpu.throttle_reasons = dict.fromkeys(d["throttle_reasons"])
        gpu.lines = {name: _Line.from_dict(line) for name, line in d["lines"].items()}
        gpu.power_band = _Band.from_dict(d["power_band"])
        return gpu


# Step-level keys of a hand-made ("seed") history that stand in for one GPU's aggregate.
_SEED_KEYS = {"power_avg": "power_avg", "power_min": "power_min", "power_max": "power_max",
              "util_avg": "util", "temp_junction_max": "temp"}

STEP_LINES = ("loss", "loss_smoothed", "learning_rate", "vram_true_peak", "vram_device_used")

# Plain values saved as they are by to_dict (numbers, None, short lists).
_SCALARS = (
    "entries", "first_step", "last_step", "prev_session", "prev_t",
    "loss_count", "loss_first", "loss_last", "loss_min", "loss_min_step", "loss_smoothed", "loss_smoothed_min",
    "exploded_count", "exploded_first", "nan_count", "nan_first", "inf_count", "inf_first",
    "grad_norm_max", "grad_norm_max_step", "stall_max", "stall_max_step",
    "step_peak_sum", "step_peak_count", "host_ram_peak",
    "samples_carried", "samples_last", "tokens_carried", "tokens_last",
    "step_energy_sum", "step_energy_count", "real_gpus_seen",
)


class RunTally:
    """Online accumulator of a run's step entries: the summary's figures and the figure's lines.

    Feed final step entries in step order with ``add``; read the results with
    the methods below (``summary.summarize`` and ``plot.build_figure`` do).
    Attributes are read-only for callers.
    """

    __slots__ = (*_SCALARS, "sessions", "session_starts", "durations", "grad_norms", "step_times",
                 "rank_peaks", "ranks_seen", "host_cpu", "gpus", "seed_gpu", "grid", "lines", "vram_band")

    def __init__(self) -> None:
        self.entries = 0
        self.first_step: int | None = None
        self.last_step = 0
        self.prev_session: Any = None
        self.prev_t: float | None = None
        # session -> [first t_mono, last t_mono, how many t_mono]: a running session's training time
        self.sessions: dict[Any, list] = {}
        self.session_starts: list[tuple[int, Any]] = []  # (first step, session) at each change of session
        self.durations = Sketch()  # known step durations: their median stands in for unknown ones
        self.loss_count = 0
        self.loss_first = self.loss_last = self.loss_min = self.loss_smoothed = self.loss_smoothed_min = None
        self.loss_min_step = None
        self.exploded_count = 0
        self.exploded_first: list | None = None  # [step, smoothed loss, running minimum]
        self.nan_count = self.inf_count = 0
        self.nan_first = self.inf_first = None
        self.grad_norms = Sketch()
        self.grad_norm_max = self.grad_norm_max_step = None
        self.step_times = Sketch()  # step_time_s, each session's first step left out (start-up work)
        self.stall_max = self.stall_max_step = None
        self.rank_peaks: dict[str, float] = {}
        self.ranks_seen: dict[str, None] = {}  # every rank named, measured or not (the figure's label)
        self.step_peak_sum = 0.0
        self.step_peak_count = 0
        self.host_cpu = array("d", [0.0]) * 4
        self.host_ram_peak = None
        self.samples_carried = self.tokens_carried = 0.0
        self.samples_last = self.tokens_last = None
        self.step_energy_sum = 0.0
        self.step_energy_count = 0
        self.gpus: dict[str, _GpuTally] = {}
        self.real_gpus_seen = False  # once a step names a GPU, the seed pseudo-GPU is dropped
        self.seed_gpu: _GpuTally | None = _GpuTally()
        self.grid = _Grid()
        self.lines = {name: _Line(gaps=name.startswith("vram")) for name in STEP_LINES}
        self.vram_band = _Band()  # the lowest and highest rank's allocator peak

    # --- accumulate ---------------------------------------------------------

    def add(self, entry: dict) -> None:
        """Account for one final step entry; entries must come in increasing step order."""
        step = int(entry["step"])
        bucket = self._bucket(step)
        grid = self.grid
        if not grid.counts[bucket]:
            grid.first[bucket] = step
        grid.counts[bucket] += 1
        if self.first_step is None:
            self.first_step = step
        self.last_step = step
        lines = self.lines

        session = entry.get("session")
        t_mono = finite(entry.get("t_mono"))
        same_session = self.entries > 0 and session == self.prev_session
        if self.entries and not same_session:
            self.session_starts.append((step, session))
        if t_mono is not None:
            span = self.sessions.get(session)
            if span is None:
                self.sessions[session] = [t_mono, t_mono, 1]
            else:
                span[1] = t_mono
                span[2] += 1
        step_time = finite(entry.get("step_time_s"))
        duration = None
        if same_session and self.prev_t is not None and t_mono is not None and t_mono > self.prev_t:
            duration = t_mono - self.prev_t
        elif step_time is not None and step_time > 0:
            duration = step_time
        if duration is not None:
            self.durations.add(duration)
            weight, known = duration, _KNOWN
        else:
            weight, known = 1.0, _UNKNOWN
        if same_session and step_time is not None:
            self.step_times.add(step_time)
            if self.stall_max is None or step_time > self.stall_max:
                self.stall_max, self.stall_max_step = step_time, step
        self.prev_session, self.prev_t = session, t_mono
        self.entries += 1

        self._add_loss(entry, step, bucket)
        learning_rate = finite(entry.get("learning_rate"))
        if learning_rate is not None:
            lines["learning_rate"].put(bucket, step, learning_rate)
        grad_norm = finite(entry.get("grad_norm"))
        if grad_norm is not None:
            self.grad_norms.add(grad_norm)
            if self.grad_norm_max is None or grad_norm > self.grad_norm_max:
                self.grad_norm_max, self.grad_norm_max_step = grad_norm, step

        self._add_vram(entry, step, bucket)
        device_used = None
        gpus = entry.get("gpus")
        if gpus:
            if not self.real_gpus_seen:
                self.real_gpus_seen, self.seed_gpu = True, None
            tallies = self.gpus
            for key, values in gpus.items():
                gpu = tallies.get(key)
                if gpu is None:
                    gpu = tallies[key] = _GpuTally(len(grid.counts))
                if values:
                    used = gpu.add(values, step, bucket, weight, known)
                    if used is not None and (device_used is None or used > device_used):
                        device_used = used
        elif self.seed_gpu is not None:
            self.seed_gpu.add({field: entry.get(name) for field, name in _SEED_KEYS.items()},
                              step, bucket, weight, known)
        if device_used is not None:
            lines["vram_device_used"].put(bucket, step, device_used)

        host = entry.get("host")
        if host:
            cpu = finite(host.get("cpu_pct"))
            if cpu is not None:
                self.host_cpu[known] += cpu * weight
                self.host_cpu[known + 1] += weight
            ram = finite(host.get("ram_used_bytes"))
            if ram is not None and (self.host_ram_peak is None or ram > self.host_ram_peak):
                self.host_ram_peak = ram
        samples = finite(entry.get("samples_seen"))
        if samples is not None:
            if self.samples_last is not None and samples < self.samples_last:
                self.samples_carried += self.samples_last  # a resumed session counted from zero again
            self.samples_last = samples
        tokens = finite(entry.get("tokens_seen"))
        if tokens is not None:
            if self.tokens_last is not None and tokens < self.tokens_last:
                self.tokens_carried += self.tokens_last
            self.tokens_last = tokens
        energy = finite(entry.get("energy_j"))
        if energy is not None:
            self.step_energy_sum += energy
            self.step_energy_count += 1

    def _add_loss(self, entry: dict, step: int, bucket: int) -> None:
        raw = entry.get("loss")
        marker = entry.get("loss_nonfinite")  # hand-made files may hold a raw NaN/inf float instead
        raw_nonfinite = isinstance(raw, float) and not math.isfinite(raw)
        if marker == "nan" or (raw_nonfinite and math.isnan(raw)):
            self.nan_count += 1
            self.nan_first = step if self.nan_first is None else self.nan_first
            self._mark_nonfinite_loss(step, bucket)
        elif marker == "inf" or raw_nonfinite:
            self.inf_count += 1
            self.inf_first = step if self.inf_first is None else self.inf_first
            self._mark_nonfinite_loss(step, bucket)
        loss = finite(raw)
        if loss is None:
            return
        self.loss_count += 1
        if self.loss_first is None:
            self.loss_first = smoothed = loss
        else:
            alpha = smoothing_alpha(self.loss_count)
            smoothed = alpha * loss + (1.0 - alpha) * self.loss_smoothed
        self.loss_last, self.loss_smoothed = loss, smoothed
        if self.loss_min is None or loss < self.loss_min:
            self.loss_min, self.loss_min_step = loss, step
        # On the smoothed loss: one noisy batch near a low minimum is not an explosion, a divergence is.
        low = self.loss_smoothed_min
        if self.loss_count > LOSS_WARMUP_POINTS and smoothed > EXPLODING_LOSS_FACTOR * low:
            self.exploded_count += 1
            if self.exploded_first is None:
                self.exploded_first = [step, smoothed, low]
        if low is None or smoothed < low:
            self.loss_smoothed_min = smoothed
        self.lines["loss"].put(bucket, step, loss)
        self.lines["loss_smoothed"].put(bucket, step, smoothed)

    def _mark_nonfinite_loss(self, step: int, bucket: int) -> None:
        grid = self.grid
        if not grid.marks[bucket]:
            grid.mark_x[bucket] = step
        grid.marks[bucket] += 1

    def _add_vram(self, entry: dict, step: int, bucket: int) -> None:
        high = low = None
        ranks = entry.get("peak_vram_bytes")
        if ranks:
            peaks, seen = self.rank_peaks, self.ranks_seen
            for rank, value in ranks.items():
                if rank not in seen:
                    seen[rank] = None
                x = finite(value)
                if x is None:
                    continue
                if rank not in peaks or x > peaks[rank]:
                    peaks[rank] = x
                if high is None or x > high:
                    high = x
                if low is None or x < low:
                    low = x
            if high is not None:
                self.step_peak_sum += high
                self.step_peak_count += 1
        if high is None:
            seed = finite(entry.get("vram_gb"))  # a seed-style history: only the max over ranks, in GB
            if seed is not None:
                high = low = seed * 1e9
        if high is not None:
            self.lines["vram_true_peak"].put(bucket, step, high)
            self.vram_band.put(bucket, low, high)

    def _bucket(self, step: int) -> int:
        grid = self.grid
        if grid.origin is None:
            grid.origin = step
        offset = max(0, step - grid.origin)
        bucket = offset >> grid.shift
        if bucket < len(grid.counts):
            return bucket
        while bucket >= BUCKETS:
            for channel in self._channels():
                channel.merge_pairs()
            bucket = offset >> grid.shift
        while bucket >= len(grid.counts):
            for channel in self._channels():
                channel.grow()
        return bucket

    def _channels(self) -> list:
        """Everything laid out on the grid (the grid last: its shift counts the merges)."""
        found: list = [*self.lines.values(), self.vram_band]
        for gpu in [*self.gpus.values(), self.seed_gpu]:
            if gpu is not None:
                found += gpu.channels()
        return found + [self.grid]

    # --- read: summary ------------------------------------------------------

    def median_duration(self) -> float:
        """The duration that stands in for steps with no timing; 1 s when no step has one (equal weights)."""
        median = self.durations.median()
        return 1.0 if median is None else median

    def session_span_s(self, session: Any) -> float | None:
        """Last minus first ``t_mono`` of a session's steps (a session still running has no duration_s)."""
        span = self.sessions.get(session)
        return span[1] - span[0] if span and span[2] > 1 else None

    def gpu_labels(self, device_keys: Iterable[str] = ()) -> list[str]:
        """GPUs that have data in the steps: ``device_keys``' order first, then the rest sorted.

        A history whose steps name no GPU but carry the step-level seed keys gives the pseudo-GPU SEED_GPU.
        """
        ordered = [k for k in device_keys if k in self.gpus]
        labels = ordered + sorted(set(self.gpus) - set(ordered))
        if not labels and self.entries and self.seed_gpu is not None and self.seed_gpu.has_value:
            labels = [SEED_GPU]
        return labels

    def gpu(self, label: str) -> _GpuTally:
        return self.seed_gpu if label == SEED_GPU and label not in self.gpus else self.gpus[label]

    def gpu_mean(self, label: str, field: str) -> float | None:
        """Time-weighted mean of ``field`` (power, util, temp) on one GPU."""
        return self.gpu(label).mean(field, self.median_duration())

    def pooled_mean(self, labels: Iterable[str], field: str) -> float | None:
        """Time-weighted mean of ``field`` over every step of every GPU in ``labels``."""
        offset = GPU_MEAN_FIELDS[field]
        totals = [0.0] * 4
        for label in labels:
            for i, x in enumerate(self.gpu(label).sums[offset : offset + 4]):
                totals[i] += x
        return _weighted_mean(totals, self.median_duration())

    def host_cpu_mean(self) -> float | None:
        return _weighted_mean(self.host_cpu, self.median_duration())

    def integrated_energy_j(self, labels: Iterable[str]) -> float | None:
        """Sum over steps of (the GPUs' power sum x the step's duration); ``None`` without any power."""
        known = False
        total = 0.0
        fallback = self.median_duration()
        for label in labels:
            xd, d, xu, nu = self.gpu(label).sums[_POWER : _POWER + 4]
            if d or nu:
                known = True
                total += xd + fallback * xu
        return total if known else None

    def samples_total(self) -> float | None:
        return None if self.samples_last is None else self.samples_carried + self.samples_last

    def tokens_total(self) -> float | None:
        return None if self.tokens_last is None else self.tokens_carried + self.tokens_last

    def throttled(self) -> dict[str, tuple[int, list[str], int]]:
        """Per GPU that throttled: (steps throttled, reasons in the order seen, first such step)."""
        found = [(g.throttle_first, order, key) for order, (key, g) in enumerate(self.gpus.items()) if g.throttle_steps]
        return {
            key: (self.gpus[key].throttle_steps, list(self.gpus[key].throttle_reasons), first)
            for first, _, key in sorted(found)
        }

    # --- read: figure -------------------------------------------------------

    def line(self, name: str, gpu: str | None = None) -> tuple[list[float], list[float]]:
        """Points of a decimated line: a STEP_LINES name, or with ``gpu`` one of GPU_LINES."""
        line = self.lines[name] if gpu is None else self.gpu(gpu).lines[name]
        return line.points(self.grid)

    def band(self, name: str, gpu: str | None = None) -> tuple[list[float], list[float], list[float]]:
        """(x, low, high) of a band: "vram_ranks", or "power" with ``gpu`` (min-max of the samples)."""
        band = self.vram_band if gpu is None else self.gpu(gpu).power_band
        if name != ("vram_ranks" if gpu is None else "power"):
            raise KeyError(name)
        return band.points(self.grid)

    def loss_marks(self) -> list[float]:
        """Where to mark NaN/inf losses: the first such step of each bucket that has one."""
        grid = self.grid
        return [grid.mark_x[b] for b in range(len(grid.marks)) if grid.marks[b]]

    @property
    def nonfinite_loss_count(self) -> int:
        return self.nan_count + self.inf_count

    # --- persistence --------------------------------------------------------

    def copy(self) -> "RunTally":
        clone = RunTally()
        for name in _SCALARS:
            value = getattr(self, name)
            setattr(clone, name, _plain_copy(value))
        clone.sessions = {k: list(v) for k, v in self.sessions.items()}
        clone.session_starts = list(self.session_starts)
        clone.durations, clone.grad_norms, clone.step_times = (
            s.copy() for s in (self.durations, self.grad_norms, self.step_times))
        clone.rank_peaks, clone.ranks_seen = dict(self.rank_peaks), dict(self.ranks_seen)
        clone.host_cpu = array("d", self.host_cpu)
        clone.gpus = {k: g.copy() for k, g in self.gpus.items()}
        clone.seed_gpu = None if self.seed_gpu is None else self.seed_gpu.copy()
        clone.grid = self.grid.copy()
        clone.lines = {k: line.copy() for k, line in self.lines.items()}
        clone.vram_band = self.vram_band.copy()
        return clone

    def to_dict(self) -> dict:
        """A JSON-serialisable snapshot (float arrays as base64); ``from_dict`` restores it exactly."""
        return {
            "version": FORMAT_VERSION,
            **{name: _plain_copy(getattr(self, name)) for name in _SCALARS},
            "sessions": [[session, *span] for session, span in self.sessions.items()],
            "session_starts": [list(pair) for pair in self.session_starts],
            "durations": self.durations.to_dict(),
            "grad_norms": self.grad_norms.to_dict(),
            "step_times": self.step_times.to_dict(),
            "rank_peaks": dict(self.rank_peaks),
            "ranks_seen": list(self.ranks_seen),
            "host_cpu": _pack(self.host_cpu),
            "gpus": {key: gpu.to_dict() for key, gpu in self.gpus.items()},
            "seed_gpu": None if self.seed_gpu is None else self.seed_gpu.to_dict(),
            "grid": self.grid.to_dict(),
            "lines": {name: line.to_dict() for name, line in self.lines.items()},
            "vram_band": self.vram_band.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RunTally":
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"RunTally format {d.get('version')!r} is not supported (this kaio reads {FORMAT_VERSION})")
        tally = cls()
        for name in _SCALARS:
            setattr(tally, name, d[name])
        tally.sessions = {session: list(span) for session, *span in d["sessions"]}
        tally.session_starts = [tuple(pair) for pair in d["session_starts"]]
        tally.durations, tally.grad_norms, tally.step_times = (
            Sketch.from_dict(d[k]) for k in ("durations", "grad_norms", "step_times"))
        tally.rank_peaks = dict(d["rank_peaks"])
        tally.ranks_seen = dict.fromkeys(d["ranks_seen"])
        tally.host_cpu = _unpack(d["host_cpu"])
        tally.gpus = {key: _GpuTally.from_dict(gpu) for key, gpu in d["gpus"].items()}
        tally.seed_gpu = None if d["seed_gpu"] is None else _GpuTally.from_dict(d["seed_gpu"])
        tally.grid = _Grid.from_dict(d["grid"])
        tally.lines = {name: _Line.from_dict(line) for name, line in d["lines"].items()}
        tally.vram_band = _Band.from_dict(d["vram_band"])
        return tally

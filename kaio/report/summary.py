"""Summary maths over a history dict (docs/history-schema.md): pure, no I/O.

``summarize(history)`` returns a flat, JSON-serialisable dict (what
``kaio report --json`` prints). Units live in the key names; ``None`` means
"not measured", never zero.

Time weighting: a step's GPU aggregates (power, utilisation, temperature)
describe the poller samples that fell inside that step, so averages over the
run weight each step by its duration. The duration is the gap between the
step's ``t_mono`` and the previous step's of the same session, which covers the
whole wall-clock window the samples came from (data loading and logging
included). The first step of a session has no previous step, so it uses
``step_time_s``; a step with neither takes the median known duration, and a
history with no timing at all weighs every step equally.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Sequence

# Logged losses before the "exploding loss" check starts: the running minimum
# of the first few points is not meaningful yet.
LOSS_WARMUP_POINTS = 10
EXPLODING_LOSS_FACTOR = 3.0
GRAD_NORM_SPIKE_FACTOR = 10.0
MIN_POINTS_FOR_MEDIAN = 10
STALL_FACTOR = 5.0

# Per-GPU step aggregate fields, and the step-level seed keys that stand in for them.
GPU_FIELDS = ("power_avg", "power_min", "power_max", "util_avg", "temp_junction_max", "temp_max", "vram_used_max_bytes")
STEP_LEVEL_FIELDS = {"power_avg": "power_avg", "power_min": "power_min", "power_max": "power_max",
                     "util_avg": "util", "temp_junction_max": "temp"}

ENERGY_METHOD_LABELS = {"counter": "hardware counter", "integrated": "integrated power"}
ENERGY_FROM_STEPS = "sum of per-step energy"
ENERGY_FROM_STEP_POWER = "integrated from per-step average power"


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else ``None``."""
    if value.__class__ is float:  # the common case first: this runs millions of times on long runs
        return value if value - value == 0.0 else None  # NaN and inf give NaN
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def ema(values: Iterable[float | None], alpha: float) -> list[float | None]:
    """Exponential moving average aligned with ``values``.

    ``None`` and non-finite entries stay ``None`` and leave the average
    untouched, so sparse logging does not drag the curve towards zero.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    smoothed: list[float | None] = []
    state: float | None = None
    for value in values:
        x = finite(value)
        if x is None:
            smoothed.append(None)
            continue
        state = x if state is None else alpha * x + (1.0 - alpha) * state
        smoothed.append(state)
    return smoothed


def smoothing_alpha(points: int) -> float:
    """EMA weight whose span is ~2% of the points (at least 5): visible trend, any run length."""
    span = max(5.0, points / 50.0)
    return 2.0 / (span + 1.0)


def step_durations(steps: Sequence[dict]) -> list[float]:
    """Seconds each step stands for, as described in the module docstring."""
    raw: list[float | None] = []
    previous: dict | None = None
    for step in steps:
        duration = None
        if previous is not None and previous.get("session") == step.get("session"):
            t0, t1 = finite(previous.get("t_mono")), finite(step.get("t_mono"))
            if t0 is not None and t1 is not None and t1 > t0:
                duration = t1 - t0
        if duration is None:
            step_time = finite(step.get("step_time_s"))
            duration = step_time if step_time is not None and step_time > 0 else None
        raw.append(duration)
        previous = step
    known = [d for d in raw if d is not None]
    fallback = statistics.median(known) if known else 1.0
    return [fallback if d is None else d for d in raw]


def weighted_mean(pairs: Iterable[tuple[float | None, float]]) -> float | None:
    """Mean of ``(value, weight)`` pairs, skipping unknown values; ``None`` if none is known."""
    total = weight_sum = 0.0
    for value, weight in pairs:
        x = finite(value)
        if x is not None:
            total += x * weight
            weight_sum += weight
    return total / weight_sum if weight_sum > 0 else None


def run_gpu_keys(history: dict) -> list[str]:
    """Keys of the GPUs the run used: in-run devices first, then any only the steps name."""
    keys = _in_run_device_keys(history)
    return keys + sorted(_keys_in_steps(history.get("steps") or []) - set(keys))


def _in_run_device_keys(history: dict) -> list[str]:
    return [d["key"] for d in history.get("devices") or [] if d.get("in_run", True) and d.get("key")]


def _keys_in_steps(steps: Sequence[dict]) -> set[str]:
    seen: set[str] = set()
    for step in steps:
        seen.update(step.get("gpus") or ())
    return seen


def gpu_columns(history: dict) -> dict[str, dict[str, list[float | None]]]:
    """Per GPU that has data in the steps, each of GPU_FIELDS over the steps (``None`` = not measured).

    "temp" is the junction temperature, else the edge one. A history with no
    per-GPU entries but the step-level seed keys gives one pseudo-GPU, "all GPUs".
    """
    steps = history.get("steps") or []
    with_data = _keys_in_steps(steps)
    devices = _in_run_device_keys(history)
    empty: dict = {}
    tables = {}
    for key in [k for k in devices if k in with_data] + sorted(with_data - set(devices)):
        entries = [(s.get("gpus") or empty).get(key) or empty for s in steps]
        tables[key] = {field: [finite(e.get(field)) for e in entries] for field in GPU_FIELDS}
    if not tables and steps:
        seed = {field: [finite(s.get(name)) for s in steps] for field, name in STEP_LEVEL_FIELDS.items()}
        if any(v is not None for column in seed.values() for v in column):
            tables["all GPUs"] = {field: seed.get(field, [None] * len(steps)) for field in GPU_FIELDS}
    for columns in tables.values():
        columns["temp"] = [e if j is None else j for j, e in zip(columns["temp_junction_max"], columns["temp_max"])]
    return tables


def cumulative_total(values: Iterable[Any]) -> float | None:
    """Last value of a cumulative counter, adding what came before each restart.

    A resumed session may count samples from zero again; a drop marks the
    restart and the total so far is carried over.
    """
    carried = 0.0
    last: float | None = None
    for value in values:
        x = finite(value)
        if x is None:
            continue
        if last is not None and x < last:
            carried += last
        last = x
    return None if last is None else carried + last


def summarize(history: dict) -> dict:
    steps: list[dict] = history.get("steps") or []
    sessions: list[dict] = history.get("sessions") or []
    run: dict = history.get("run") or {}
    durations = step_durations(steps)
    gpus = gpu_columns(history)
    last_session = sessions[-1] if sessions else {}

    training_time_s = _training_time_s(sessions, steps)
    summary: dict[str, Any] = {
        "project": history.get("project"),
        "status": history.get("status"),
        "exit_code": last_session.get("exit_code"),
        "signal": last_session.get("signal"),
        "error": last_session.get("error"),
        "sessions": len(sessions),
        "training_time_s": training_time_s,
        "duration_h": None if training_time_s is None else training_time_s / 3600.0,
        "optimizer_steps": steps[-1]["step"] if steps else 0,
        "step_entries": len(steps),
        "max_steps": run.get("max_steps"),
        **_params(run),
        **_loss(steps),
        **_vram(steps, gpus),
        "gpu_count": len(run_gpu_keys(history)),
        **_power(gpus, durations),
        "gpu_util_avg_pct": _time_weighted(gpus, "util_avg", durations),
        "temp_avg_c": _time_weighted(gpus, "temp", durations),
        "temp_peak_c": _peak(gpus, "temp"),
        **_throughput(steps, training_time_s),
        **_host(steps, durations),
    }
    summary.update(_energy(history, steps, durations, gpus, summary["samples"]))
    # No GPU found and no GPU number anywhere: say "no GPU", not "not measured".
    summary["cpu_only"] = not history.get("devices") and all(
        summary[k] is None for k in ("vram_true_peak_bytes", "power_avg_w", "gpu_util_avg_pct", "temp_avg_c")
    )
    summary["warnings"] = _warnings(history, steps, summary)
    return summary


def _training_time_s(sessions: Sequence[dict], steps: Sequence[dict]) -> float | None:
    """Sum of session durations; a session still running counts its steps' time span."""
    total = 0.0
    known = False
    for session in sessions:
        duration = finite(session.get("duration_s"))
        if duration is None:
            number = session.get("session")
            times = [t for s in steps if s.get("session") == number and (t := finite(s.get("t_mono"))) is not None]
            duration = times[-1] - times[0] if len(times) > 1 else None
        if duration is not None:
            total += duration
            known = True
    return total if known else None


def _params(run: dict) -> dict:
    trainable, total = finite(run.get("trainable_params")), finite(run.get("total_params"))
    pct = 100.0 * trainable / total if trainable is not None and total else None
    return {
        "trainable_params": run.get("trainable_params"),
        "total_params": run.get("total_params"),
        "trainable_pct": pct,
    }


def _loss(steps: Sequence[dict]) -> dict:
    logged = [(s["step"], x) for s in steps if (x := finite(s.get("loss"))) is not None]
    nan_steps, inf_steps = nonfinite_loss_steps(steps)
    losses = [x for _, x in logged]
    smoothed = ema(losses, smoothing_alpha(len(losses))) if losses else []
    min_step, min_loss = min(logged, key=lambda pair: pair[1]) if logged else (None, None)
    return {
        "loss_initial": losses[0] if losses else None,
        "loss_final": losses[-1] if losses else None,
        "loss_final_smoothed": smoothed[-1] if smoothed else None,
        "loss_min": min_loss,
        "loss_min_step": min_step,
        "loss_logged_steps": len(losses),
        "loss_nan_steps": nan_steps,
        "loss_inf_steps": inf_steps,
    }


def nonfinite_loss_steps(steps: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Steps whose loss was NaN / inf: marked by ``loss_nonfinite`` or, in hand-made files, a raw float."""
    nan_steps, inf_steps = [], []
    for step in steps:
        marker = step.get("loss_nonfinite")
        loss = step.get("loss")
        if marker == "nan" or (isinstance(loss, float) and math.isnan(loss)):
            nan_steps.append(step["step"])
        elif marker == "inf" or (isinstance(loss, float) and math.isinf(loss)):
            inf_steps.append(step["step"])
    return nan_steps, inf_steps


def _vram(steps: Sequence[dict], gpus: dict) -> dict:
    by_rank: dict[str, float] = {}
    step_peaks: list[float] = []
    for step in steps:
        ranks = step.get("peak_vram_bytes") or {}
        step_peak = None
        for rank, value in ranks.items():
            x = finite(value)
            if x is not None:
                by_rank[rank] = max(by_rank.get(rank, x), x)
                step_peak = x if step_peak is None else max(step_peak, x)
        if step_peak is not None:
            step_peaks.append(step_peak)
    device_by_gpu = {
        label: peak for label, columns in gpus.items() if (peak := _max(columns["vram_used_max_bytes"])) is not None
    }
    true_peak = max(by_rank.values()) if by_rank else None
    device_peak = max(device_by_gpu.values()) if device_by_gpu else None
    both = true_peak is not None and device_peak is not None
    return {
        "vram_true_peak_bytes": _as_int(true_peak),
        "vram_true_peak_by_rank_bytes": {r: int(by_rank[r]) for r in sorted(by_rank, key=_rank_order)},
        "vram_true_peak_step_avg_bytes": _as_int(statistics.fmean(step_peaks)) if step_peaks else None,
        "vram_device_used_peak_bytes": _as_int(device_peak),
        "vram_device_used_peak_by_gpu_bytes": {k: int(v) for k, v in device_by_gpu.items()},
        # Device minus allocator peak: CUDA context, allocator cache, other processes.
        "vram_gap_bytes": _as_int(device_peak - true_peak) if both else None,
    }


def _rank_order(rank: str) -> tuple[int, str]:
    return (int(rank), rank) if rank.isdigit() else (1 << 30, rank)


def _as_int(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def _time_weighted(gpus: dict, field: str, durations: Sequence[float]) -> float | None:
    """Mean of ``field`` over every step of every GPU, each step weighted by its duration."""
    return weighted_mean(pair for columns in gpus.values() for pair in zip(columns[field], durations))


def _max(values: Iterable[float | None]) -> float | None:
    return max((v for v in values if v is not None), default=None)


def _peak(gpus: dict, field: str) -> float | None:
    return _max(_max(columns[field]) for columns in gpus.values())


def _power(gpus: dict, durations: Sequence[float]) -> dict:
    per_gpu_avg = [weighted_mean(zip(columns["power_avg"], durations)) for columns in gpus.values()]
    known_avgs = [a for a in per_gpu_avg if a is not None]
    peaks = [_max(m if m is not None else a for m, a in zip(c["power_max"], c["power_avg"])) for c in gpus.values()]
    return {
        "power_avg_w": _time_weighted(gpus, "power_avg", durations),
        "power_peak_w": _max(peaks),
        # Draw of all the run's GPUs together: the sum of each GPU's own time-weighted average.
        "power_total_avg_w": sum(known_avgs) if known_avgs else None,
    }


def _host(steps: Sequence[dict], durations: Sequence[float]) -> dict:
    """The host's CPU (whole host, 0-100 %) and RAM: the only load figures a CPU-only run has."""
    hosts = [s.get("host") or {} for s in steps]
    return {
        "host_cpu_avg_pct": weighted_mean(zip((h.get("cpu_pct") for h in hosts), durations)),
        "host_ram_peak_bytes": _as_int(_max(finite(h.get("ram_used_bytes")) for h in hosts)),
    }


def _throughput(steps: Sequence[dict], training_time_s: float | None) -> dict:
    samples = cumulative_total(s.get("samples_seen") for s in steps)
    tokens = cumulative_total(s.get("tokens_seen") for s in steps)

    def rate(count: float | None) -> float | None:
        return count / training_time_s if count is not None and training_time_s else None

    return {
        "samples": _as_int(samples),
        "samples_per_s": rate(samples),
        "tokens": _as_int(tokens),
        "tokens_per_s": rate(tokens),
    }


def _energy(history: dict, steps: Sequence[dict], durations: Sequence[float], gpus: dict, samples) -> dict:
    joules, method = _energy_j(history, steps, durations, gpus)
    kwh = None if joules is None else joules / 3.6e6
    per_1k = 1000.0 * kwh * 1000.0 / samples if kwh is not None and samples else None
    return {"energy_kwh": kwh, "energy_method": method, "energy_per_1k_samples_wh": per_1k}


def _energy_j(history: dict, steps: Sequence[dict], durations: Sequence[float], gpus: dict):
    """Best available total energy: device counters, else per-step energy, else power x time."""
    in_run = [d for d in history.get("devices") or [] if d.get("in_run", True)]
    counters = [finite(d.get("energy_j")) for d in in_run]
    if in_run and all(c is not None for c in counters):
        labels = sorted({ENERGY_METHOD_LABELS.get(d.get("energy_method"), "device energy") for d in in_run})
        return sum(counters), " + ".join(labels)
    step_energy = [x for s in steps if (x := finite(s.get("energy_j"))) is not None]
    if step_energy:
        return sum(step_energy), ENERGY_FROM_STEPS
    integrated = 0.0
    known = False
    for index, duration in enumerate(durations):
        powers = [p for columns in gpus.values() if (p := columns["power_avg"][index]) is not None]
        if powers:
            integrated += sum(powers) * duration
            known = True
    return (integrated, ENERGY_FROM_STEP_POWER) if known else (None, None)


def _warnings(history: dict, steps: Sequence[dict], summary: dict) -> list[str]:
    found = [str(w) for w in history.get("warnings") or []]
    found += _loss_warnings(steps, summary)
    found += _grad_norm_warnings(steps)
    found += _stall_warnings(steps)
    found += _throttle_warnings(history, steps)
    found += _telemetry_warnings(history)
    found += _missing_step_warnings(steps)
    if summary["energy_method"] == ENERGY_FROM_STEP_POWER:
        found.append("energy integrated from per-step average power: no device or per-step energy was recorded")
    return list(dict.fromkeys(found))


def _loss_warnings(steps: Sequence[dict], summary: dict) -> list[str]:
    found = []
    for label, at in (("NaN", summary["loss_nan_steps"]), ("inf", summary["loss_inf_steps"])):
        if at:
            found.append(f"loss was {label} at {_count(len(at), 'step')} (first at step {at[0]})")
    # On the smoothed loss: one noisy batch near a low minimum is not an explosion, a divergence is.
    logged = [(s["step"], x) for s in steps if (x := finite(s.get("loss"))) is not None]
    smoothed = ema([x for _, x in logged], smoothing_alpha(len(logged)))
    running_min = math.inf
    exploded: list[tuple[int, float, float]] = []
    for index, ((step, _), loss) in enumerate(zip(logged, smoothed)):
        if index >= LOSS_WARMUP_POINTS and loss > EXPLODING_LOSS_FACTOR * running_min:
            exploded.append((step, loss, running_min))
        running_min = min(running_min, loss)
    if exploded:
        step, loss, low = exploded[0]
        found.append(
            f"loss exploded: smoothed loss above {EXPLODING_LOSS_FACTOR:g}x its running minimum at "
            f"{_count(len(exploded), 'logged step')} (first at step {step}: {loss:.4g} vs {low:.4g})"
        )
    return found


def _grad_norm_warnings(steps: Sequence[dict]) -> list[str]:
    norms = [(s["step"], x) for s in steps if (x := finite(s.get("grad_norm"))) is not None]
    if len(norms) < MIN_POINTS_FOR_MEDIAN:
        return []
    median = statistics.median(x for _, x in norms)
    spikes = [(step, x) for step, x in norms if median > 0 and x > GRAD_NORM_SPIKE_FACTOR * median]
    if not spikes:
        return []
    step, largest = max(spikes, key=lambda pair: pair[1])
    return [
        f"gradient norm spiked above {GRAD_NORM_SPIKE_FACTOR:g}x its median ({median:.3g}) at "
        f"{_count(len(spikes), 'step')} (largest {largest:.3g} at step {step})"
    ]


def _stall_warnings(steps: Sequence[dict]) -> list[str]:
    # A session's first step carries start-up work (CUDA init, compilation): not a stall.
    timed = [
        (s["step"], x)
        for i, s in enumerate(steps)
        if i > 0 and steps[i - 1].get("session") == s.get("session") and (x := finite(s.get("step_time_s"))) is not None
    ]
    if len(timed) < MIN_POINTS_FOR_MEDIAN:
        return []
    median = statistics.median(x for _, x in timed)
    stalls = [(step, x) for step, x in timed if x > STALL_FACTOR * median]
    if not stalls:
        return []
    step, longest = max(stalls, key=lambda pair: pair[1])
    return [
        f"{_count(len(stalls), 'stalled step')}: step time above {STALL_FACTOR:g}x the median "
        f"{median:.3g} s (longest {longest:.3g} s at step {step})"
    ]


def _throttle_warnings(history: dict, steps: Sequence[dict]) -> list[str]:
    """Per GPU, the throttle reasons seen in steps (``gpus[key].throttle``: active reasons)."""
    by_gpu: dict[str, dict[str, Any]] = {}
    for step in steps:
        for key, entry in (step.get("gpus") or {}).items():
            reasons = (entry or {}).get("throttle") or ()
            if reasons:
                seen = by_gpu.setdefault(key, {"reasons": {}, "steps": 0, "first": step["step"]})
                seen["steps"] += 1
                seen["reasons"].update(dict.fromkeys(reasons))
    names = {d.get("key"): d.get("name") for d in history.get("devices") or []}
    return [
        f"GPU {_gpu_label(key, names)} throttled ({', '.join(seen['reasons'])}) during "
        f"{_count(seen['steps'], 'step')}, first at step {seen['first']}"
        for key, seen in by_gpu.items()
    ]


def _telemetry_warnings(history: dict) -> list[str]:
    telemetry = history.get("telemetry") or {}
    found = []
    for key, what in (("malformed_lines", "malformed"), ("oversized_lines", "oversized")):
        count = finite(telemetry.get(key))
        if count:
            found.append(f"{_count(int(count), f'{what} telemetry line')} dropped")
    for key, value in telemetry.items():
        count = finite(value)
        if key.startswith("dropped_") and count:
            found.append(f"{int(count)} {key.removeprefix('dropped_').replace('_', ' ')} dropped")
    names = {d.get("key"): d.get("name") for d in history.get("devices") or []}
    for device in history.get("devices") or []:
        if device.get("in_run", True) and device.get("energy_method") == "integrated":
            found.append(
                f"energy of GPU {_gpu_label(device.get('key'), names)} integrated from power samples, "
                "not read from a hardware energy counter"
            )
    return found


def _missing_step_warnings(steps: Sequence[dict]) -> list[str]:
    if not steps:
        return []
    missing = steps[-1]["step"] - steps[0]["step"] + 1 - len(steps)
    if missing <= 0:
        return []
    return [f"history has no entry for {_count(missing, 'optimizer step')} between its first and last step"]


def _gpu_label(key: str | None, names: dict) -> str:
    name = names.get(key)
    return f"{key} ({name})" if name else str(key)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

"""The run's summary (what ``kaio report --json`` prints and report.md shows): pure, no I/O.

``summarize(history, tally)`` returns a flat, JSON-serialisable dict. Units
live in the key names; ``None`` means "not measured", never zero. Every figure
over the steps comes from a ``RunTally`` (kaio/report/tally.py), fed one step
entry at a time, so a long run's steps never have to be in memory at once;
the rest comes from the history's header (sessions, run, devices, telemetry).

Time weighting: a step's GPU aggregates (power, utilisation, temperature)
describe the poller samples that fell inside that step, so averages over the
run weight each step by its duration. The duration is the gap between the
step's ``t_mono`` and the previous step's of the same session, which covers the
whole wall-clock window the samples came from (data loading and logging
included). The first step of a session has no previous step, so it uses
``step_time_s``; a step with neither takes the median known duration, and a
history with no timing at all weighs every step equally.

Medians (gradient-norm spikes, stalls) are exact up to 256 values and within
0.1 % beyond; the smoothed loss is an EMA whose span grows with the points
seen (tally.py says how and why).
"""

from __future__ import annotations

from typing import Any, Sequence

from kaio.report.tally import EXPLODING_LOSS_FACTOR, RunTally, finite, tally_steps

GRAD_NORM_SPIKE_FACTOR = 10.0
MIN_POINTS_FOR_MEDIAN = 10
STALL_FACTOR = 5.0

ENERGY_METHOD_LABELS = {"counter": "hardware counter", "integrated": "integrated power"}
ENERGY_FROM_STEPS = "sum of per-step energy"
ENERGY_FROM_STEP_POWER = "integrated from per-step average power"


def run_gpu_keys(history: dict, tally: RunTally) -> list[str]:
    """Keys of the GPUs the run used: in-run devices first, then any only the steps name."""
    keys = _in_run_device_keys(history)
    return keys + sorted(set(tally.gpus) - set(keys))


def _in_run_device_keys(history: dict) -> list[str]:
    return [d["key"] for d in history.get("devices") or [] if d.get("in_run", True) and d.get("key")]


def summarize(history: dict, tally: RunTally | None = None) -> dict:
    """The summary of ``history``; its steps come from ``tally`` when given, else from ``history["steps"]``.

    With a tally, ``history`` needs only its header (no "steps" key).
    """
    if tally is None:
        tally = tally_steps(history.get("steps") or [])
    sessions: list[dict] = history.get("sessions") or []
    run: dict = history.get("run") or {}
    gpus = tally.gpu_labels(_in_run_device_keys(history))
    last_session = sessions[-1] if sessions else {}

    training_time_s = _training_time_s(sessions, tally)
    summary: dict[str, Any] = {
        "project": history.get("project"),
        "status": history.get("status"),
        "exit_code": last_session.get("exit_code"),
        "signal": last_session.get("signal"),
        "error": last_session.get("error"),
        "sessions": len(sessions),
        "training_time_s": training_time_s,
        "duration_h": None if training_time_s is None else training_time_s / 3600.0,
        "optimizer_steps": tally.last_step,
        "step_entries": tally.entries,
        "max_steps": run.get("max_steps"),
        **_params(run),
        **_loss(tally),
        **_vram(tally, gpus),
        "gpu_count": len(run_gpu_keys(history, tally)),
        **_power(tally, gpus),
        "gpu_util_avg_pct": tally.pooled_mean(gpus, "util"),
        "temp_avg_c": tally.pooled_mean(gpus, "temp"),
        "temp_peak_c": _max(tally.gpu(label).temp_peak for label in gpus),
        **_throughput(tally, training_time_s),
        "host_cpu_avg_pct": tally.host_cpu_mean(),  # the whole host, 0-100 %: all a CPU-only run has
        "host_ram_peak_bytes": _as_int(tally.host_ram_peak),
    }
    summary.update(_energy(history, tally, gpus, summary["samples"]))
    # No GPU found and no GPU number anywhere: say "no GPU", not "not measured".
    summary["cpu_only"] = not history.get("devices") and all(
        summary[k] is None for k in ("vram_true_peak_bytes", "power_avg_w", "gpu_util_avg_pct", "temp_avg_c")
    )
    summary["warnings"] = _warnings(history, tally, summary)
    return summary


def _training_time_s(sessions: Sequence[dict], tally: RunTally) -> float | None:
    """Sum of session durations; a session still running counts its steps' time span."""
    total = 0.0
    known = False
    for session in sessions:
        duration = finite(session.get("duration_s"))
        if duration is None:
            duration = tally.session_span_s(session.get("session"))
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


def _loss(tally: RunTally) -> dict:
    return {
        "loss_initial": tally.loss_first,
        "loss_final": tally.loss_last,
        "loss_final_smoothed": tally.loss_smoothed,
        "loss_min": tally.loss_min,
        "loss_min_step": tally.loss_min_step,
        "loss_logged_steps": tally.loss_count,
        "loss_nan_count": tally.nan_count,
        "loss_nan_first_step": tally.nan_first,
        "loss_inf_count": tally.inf_count,
        "loss_inf_first_step": tally.inf_first,
    }


def _vram(tally: RunTally, gpus: Sequence[str]) -> dict:
    by_rank = tally.rank_peaks
    device_by_gpu = {label: peak for label in gpus if (peak := tally.gpu(label).vram_peak) is not None}
    true_peak = max(by_rank.values()) if by_rank else None
    device_peak = max(device_by_gpu.values()) if device_by_gpu else None
    both = true_peak is not None and device_peak is not None
    step_avg = tally.step_peak_sum / tally.step_peak_count if tally.step_peak_count else None
    return {
        "vram_true_peak_bytes": _as_int(true_peak),
        "vram_true_peak_by_rank_bytes": {r: int(by_rank[r]) for r in sorted(by_rank, key=_rank_order)},
        "vram_true_peak_step_avg_bytes": _as_int(step_avg),
        "vram_device_used_peak_bytes": _as_int(device_peak),
        "vram_device_used_peak_by_gpu_bytes": {k: int(v) for k, v in device_by_gpu.items()},
        # Device minus allocator peak: CUDA context, allocator cache, other processes.
        "vram_gap_bytes": _as_int(device_peak - true_peak) if both else None,
    }


def _rank_order(rank: str) -> tuple[int, str]:
    return (int(rank), rank) if rank.isdigit() else (1 << 30, rank)


def _as_int(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def _max(values) -> float | None:
    return max((v for v in values if v is not None), default=None)


def _power(tally: RunTally, gpus: Sequence[str]) -> dict:
    known_avgs = [a for label in gpus if (a := tally.gpu_mean(label, "power")) is not None]
    return {
        "power_avg_w": tally.pooled_mean(gpus, "power"),
        "power_peak_w": _max(tally.gpu(label).power_peak for label in gpus),
        # Draw of all the run's GPUs together: the sum of each GPU's own time-weighted average.
        "power_total_avg_w": sum(known_avgs) if known_avgs else None,
    }


def _throughput(tally: RunTally, training_time_s: float | None) -> dict:
    samples, tokens = tally.samples_total(), tally.tokens_total()

    def rate(count: float | None) -> float | None:
        return count / training_time_s if count is not None and training_time_s else None

    return {
        "samples": _as_int(samples),
        "samples_per_s": rate(samples),
        "tokens": _as_int(tokens),
        "tokens_per_s": rate(tokens),
    }


def _energy(history: dict, tally: RunTally, gpus: Sequence[str], samples) -> dict:
    joules, method = _energy_j(history, tally, gpus)
    kwh = None if joules is None else joules / 3.6e6
    per_1k = 1000.0 * kwh * 1000.0 / samples if kwh is not None and samples else None
    return {"energy_kwh": kwh, "energy_method": method, "energy_per_1k_samples_wh": per_1k}


def _energy_j(history: dict, tally: RunTally, gpus: Sequence[str]):
    """Best available total energy: device counters, else per-step energy, else power x time."""
    in_run = [d for d in history.get("devices") or [] if d.get("in_run", True)]
    counters = [finite(d.get("energy_j")) for d in in_run]
    if in_run and all(c is not None for c in counters):
        labels = sorted({ENERGY_METHOD_LABELS.get(d.get("energy_method"), "device energy") for d in in_run})
        return sum(counters), " + ".join(labels)
    if tally.step_energy_count:
        return tally.step_energy_sum, ENERGY_FROM_STEPS
    integrated = tally.integrated_energy_j(gpus)
    return (integrated, ENERGY_FROM_STEP_POWER) if integrated is not None else (None, None)


def _warnings(history: dict, tally: RunTally, summary: dict) -> list[str]:
    found = [str(w) for w in history.get("warnings") or []]
    found += _loss_warnings(tally)
    found += _grad_norm_warnings(tally)
    found += _stall_warnings(tally)
    found += _throttle_warnings(history, tally)
    found += _telemetry_warnings(history)
    found += _missing_step_warnings(tally)
    if summary["energy_method"] == ENERGY_FROM_STEP_POWER:
        found.append("energy integrated from per-step average power: no device or per-step energy was recorded")
    return list(dict.fromkeys(found))


def _loss_warnings(tally: RunTally) -> list[str]:
    found = []
    for label, count, first in (("NaN", tally.nan_count, tally.nan_first), ("inf", tally.inf_count, tally.inf_first)):
        if count:
            found.append(f"loss was {label} at {_count(count, 'step')} (first at step {first})")
    # On the smoothed loss (tally.py): one noisy batch near a low minimum is not an explosion, a divergence is.
    if tally.exploded_count:
        step, loss, low = tally.exploded_first
        found.append(
            f"loss exploded: smoothed loss above {EXPLODING_LOSS_FACTOR:g}x its running minimum at "
            f"{_count(tally.exploded_count, 'logged step')} (first at step {step}: {loss:.4g} vs {low:.4g})"
        )
    return found


def _grad_norm_warnings(tally: RunTally) -> list[str]:
    norms = tally.grad_norms
    if norms.count < MIN_POINTS_FOR_MEDIAN:
        return []
    median = norms.median()
    spikes = norms.count_above(GRAD_NORM_SPIKE_FACTOR * median) if median > 0 else 0
    if not spikes:
        return []
    # The largest spike is the largest norm: spikes are the norms above the threshold.
    return [
        f"gradient norm spiked above {GRAD_NORM_SPIKE_FACTOR:g}x its median ({median:.3g}) at "
        f"{_count(spikes, 'step')} (largest {tally.grad_norm_max:.3g} at step {tally.grad_norm_max_step})"
    ]


def _stall_warnings(tally: RunTally) -> list[str]:
    # The tally leaves each session's first step out: it carries start-up work (CUDA init, compilation).
    times = tally.step_times
    if times.count < MIN_POINTS_FOR_MEDIAN:
        return []
    median = times.median()
    stalls = times.count_above(STALL_FACTOR * median)
    if not stalls:
        return []
    return [
        f"{_count(stalls, 'stalled step')}: step time above {STALL_FACTOR:g}x the median "
        f"{median:.3g} s (longest {tally.stall_max:.3g} s at step {tally.stall_max_step})"
    ]


def _throttle_warnings(history: dict, tally: RunTally) -> list[str]:
    """Per GPU, the throttle reasons seen in steps (``gpus[key].throttle``: active reasons)."""
    names = {d.get("key"): d.get("name") for d in history.get("devices") or []}
    return [
        f"GPU {_gpu_label(key, names)} throttled ({', '.join(reasons)}) during {_count(steps, 'step')}, "
        f"first at step {first}"
        for key, (steps, reasons, first) in tally.throttled().items()
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


def _missing_step_warnings(tally: RunTally) -> list[str]:
    if not tally.entries:
        return []
    missing = tally.last_step - tally.first_step + 1 - tally.entries
    if missing <= 0:
        return []
    return [f"history has no entry for {_count(missing, 'optimizer step')} between its first and last step"]


def _gpu_label(key: str | None, names: dict) -> str:
    name = names.get(key)
    return f"{key} ({name})" if name else str(key)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

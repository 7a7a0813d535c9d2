"""kaio.report.tally: the online accumulator behind the summary and the figure."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from kaio.report.summary import summarize
from kaio.report.tally import BUCKETS, EXACT_VALUES, SEED_GPU, RunTally, Sketch, smoothing_alpha, tally_steps
from test_report import gpu_entry, make_history, make_step


def irregular_history(n_steps=1500, n_gpus=3, seed=1) -> dict:
    """Sessions, missing steps and values, NaN/inf losses, stalls, spikes, throttling: everything at once."""
    rng = random.Random(seed)
    steps, t_mono = [], 0.0
    for i in range(1, n_steps + 1):
        t_mono += rng.choice([0.5, 0.5, 0.6, 3.0])
        gpus = {
            f"nvml:{g}": gpu_entry(
                power=None if rng.random() < 0.05 else 200 + rng.random() * 100, util=rng.random() * 100,
                temp=None if rng.random() < 0.1 else 60 + rng.random() * 10,
                throttle=["sw_thermal"] if rng.random() < 0.01 else None)
            for g in range(n_gpus)
        }
        step = make_step(
            i, session=1 + min(2, 3 * (i - 1) // n_steps), gpus={} if rng.random() < 0.02 else gpus,
            t_mono=None if rng.random() < 0.05 else t_mono,
            step_time_s=None if rng.random() < 0.1 else rng.uniform(0.3, 0.7) * (20 if rng.random() < 0.01 else 1),
            loss=None if i % 3 else 3 * math.exp(-i / 1000) + rng.random() * 0.1,
            grad_norm=rng.lognormvariate(0, 0.3) * (30 if rng.random() < 0.01 else 1),
            peak_vram={"0": 8e9 + i, "1": 7e9 + i}, host={"cpu_pct": rng.random() * 100, "ram_used_bytes": 1e9 + i},
        )
        if i % 97 == 0:
            step["loss"], step["loss_nonfinite"] = None, "nan"
        if i % 401 == 0:
            step["loss"] = float("inf")  # a hand-made file's raw inf
        if i not in (700, 701):
            steps.append(step)
    return make_history(steps=steps, devices=[])


def header_of(history: dict) -> dict:
    return {k: v for k, v in history.items() if k != "steps"}


def round_trip(tally: RunTally) -> RunTally:
    return RunTally.from_dict(json.loads(json.dumps(tally.to_dict(), allow_nan=False)))


# --- the summary ------------------------------------------------------------


def test_an_online_tally_with_copies_and_round_trips_gives_the_same_summary():
    history = irregular_history()
    tally = RunTally()
    for index, step in enumerate(history["steps"]):
        if index == 500:
            tally = tally.copy()  # as the supervisor keeps one at a checkpoint
        if index == 1000:
            tally = round_trip(tally)  # as after a restart from a saved tally
        tally.add(step)
    online = summarize(header_of(history), tally)
    assert online == summarize(history)
    assert online["step_entries"] == len(history["steps"]) and online["optimizer_steps"] == 1500
    assert online["loss_nan_count"] == 15 and online["loss_nan_first_step"] == 97
    assert (online["loss_inf_count"], online["loss_inf_first_step"]) == (3, 401)
    assert "history has no entry for 2 optimizer steps between its first and last step" in online["warnings"]
    assert any(w.startswith("GPU nvml:0 throttled (sw_thermal)") for w in online["warnings"])
    assert any(w.startswith("gradient norm spiked above 10x") for w in online["warnings"])
    assert any("stalled step" in w for w in online["warnings"])


def test_to_dict_from_dict_and_copy_are_exact_and_independent():
    history = irregular_history(600)
    tally = tally_steps(history["steps"][:400])
    saved = tally.to_dict()
    restored, clone = round_trip(tally), tally.copy()
    assert restored.to_dict() == saved and clone.to_dict() == saved
    for step in history["steps"][400:]:
        tally.add(step)
        restored.add(step)
    assert restored.to_dict() == tally.to_dict()
    assert summarize(header_of(history), restored) == summarize(history)
    assert clone.to_dict() == saved  # the copy did not move with the original
    assert RunTally().to_dict() == round_trip(RunTally()).to_dict()
    with pytest.raises(ValueError, match="format 99"):
        RunTally.from_dict({**saved, "version": 99})


def test_time_weighted_means_are_exact_with_steps_of_unknown_duration():
    # Many known durations (the median comes from the sketch) and every tenth step untimed.
    rng = random.Random(3)
    steps, t_mono = [], 0.0
    for i in range(1, 2001):
        t_mono += rng.uniform(0.2, 2.0)
        steps.append(make_step(i, t_mono=t_mono, step_time_s=None,
                               gpus={"nvml:0": gpu_entry(power=100.0 + rng.random() * 300)}))
        if i % 10 == 0:
            steps[-1]["t_mono"] = None
    tally = tally_steps(steps)
    fallback = tally.median_duration()
    known, previous = [], None
    for step in steps:  # a gap needs both ends: the step after an untimed one is untimed too
        t = step["t_mono"]
        known.append(t - previous if t is not None and previous is not None else None)
        previous = t
    durations = [fallback if d is None else d for d in known]
    powers = [s["gpus"]["nvml:0"]["power_avg"] for s in steps]
    expected = sum(p * d for p, d in zip(powers, durations)) / sum(durations)
    assert tally.pooled_mean(["nvml:0"], "power") == pytest.approx(expected, rel=1e-12)
    assert tally.integrated_energy_j(["nvml:0"]) == pytest.approx(sum(p * d for p, d in zip(powers, durations)),
                                                                   rel=1e-12)
    assert fallback == pytest.approx(statistics.median(d for d in known if d is not None), rel=1e-3)


def test_the_median_sketch_is_exact_when_small_and_within_a_tenth_of_a_percent_after():
    rng = random.Random(7)
    sketch = Sketch()
    values = []
    for _ in range(EXACT_VALUES):
        values.append(rng.lognormvariate(0, 1))
        sketch.add(values[-1])
    assert sketch.median() == statistics.median(values)
    for _ in range(200_000):
        values.append(rng.lognormvariate(0, 2))  # a range of ~1e5: it fits the bins at full resolution
        sketch.add(values[-1])
    exact = statistics.median(values)
    assert sketch.median() == pytest.approx(exact, rel=1e-3)
    threshold = 10 * exact
    near = sum(1 for x in values if abs(x - threshold) <= 2e-3 * threshold)  # the bins that straddle it
    assert abs(sketch.count_above(threshold) - sum(1 for x in values if x > threshold)) <= near
    assert len(sketch.bins) < 15_000 and sketch.exact is None


def test_stalls_leave_out_each_sessions_first_step():
    steps = [make_step(i, step_time_s=0.2, session=1 if i <= 15 else 2) for i in range(1, 31)]
    steps[15]["step_time_s"] = 9.0  # session 2's first step: start-up work, not a stall
    assert not [w for w in summarize(make_history(steps=steps))["warnings"] if "stalled" in w]
    steps[16]["step_time_s"] = 9.0
    assert "1 stalled step: step time above 5x the median 0.2 s (longest 9 s at step 17)" in summarize(
        make_history(steps=steps))["warnings"]


def test_the_smoothed_loss_span_grows_with_the_points_seen():
    assert smoothing_alpha(1) == smoothing_alpha(250) == pytest.approx(1 / 3)
    assert smoothing_alpha(1000) == pytest.approx(2 / 21)
    losses = [5.0 / (1 + 0.01 * i) for i in range(600)]
    tally = tally_steps(make_step(i + 1, loss=x) for i, x in enumerate(losses))
    smoothed = losses[0]
    for n, x in enumerate(losses[1:], start=2):
        smoothed += smoothing_alpha(n) * (x - smoothed)
    assert tally.loss_smoothed == pytest.approx(smoothed, rel=1e-12)
    assert tally.line("loss_smoothed")[1][-1] == tally.loss_smoothed


def test_a_seed_style_history_is_one_pseudo_gpu_until_a_step_names_a_gpu():
    steps = [make_step(i, gpus={}, power_avg=200.0 + i, util=90.0, temp=60.0) for i in range(1, 6)]
    tally = tally_steps(steps)
    assert tally.gpu_labels() == [SEED_GPU] and tally.gpu_mean(SEED_GPU, "power") == pytest.approx(203.0)
    tally.add(make_step(6, gpus={"nvml:0": gpu_entry(power=100.0)}))
    assert tally.gpu_labels() == ["nvml:0"] and tally.seed_gpu is None


# --- the figure's lines -----------------------------------------------------


def test_short_runs_are_drawn_step_by_step():
    history = make_history(30, n_gpus=2)
    tally = tally_steps(history["steps"])
    x, y = tally.line("util", gpu="nvml:1")
    assert x == [float(s["step"]) for s in history["steps"]]
    assert y == [s["gpus"]["nvml:1"]["util_avg"] for s in history["steps"]]


def test_decimation_keeps_one_step_spikes_their_order_gaps_and_a_bounded_size():
    n = 300_000
    peaks, dips = {123_457: 100.0, 150_001: 99.0, 170_513: 98.0}, {234_567: 0.0, 240_000: 1.0, 200_000: 2.0}
    tally = RunTally()
    for i in range(1, n + 1):
        util = peaks.get(i, dips.get(i, 50.0 + math.sin(i / 500.0)))
        gpus = {} if 100_000 <= i < 110_000 else {"nvml:0": {"util_avg": util}}
        loss = None if i % 7 or 50_000 <= i < 60_000 else 2.0  # sparse, with a long unlogged stretch
        tally.add({"step": i, "loss": 50.0 if i == 200_002 else loss, "gpus": gpus})
    assert len(tally.grid.counts) <= BUCKETS and tally.grid.counts[0] == 512
    x, y = tally.line("util", gpu="nvml:0")
    assert len(x) <= 2 * BUCKETS
    for step, value in {**peaks, **dips}.items():
        assert value in y and x[y.index(value)] == step
    assert all(a < b for a, b in zip(x, x[1:]))
    in_gap = [v for s, v in zip(x, y) if 100_500 <= s < 109_500]
    assert in_gap and all(math.isnan(v) for v in in_gap)  # steps but no reading: a gap in the line
    lx, ly = tally.line("loss")
    assert 50.0 in ly and lx[ly.index(50.0)] == 200_002
    assert not any(math.isnan(v) for v in ly)  # unlogged steps: the loss line connects over them


def test_tally_size_does_not_grow_with_steps():
    eight_gpus = [{f"nvml:{g}": gpu_entry(power=600.0 + i % 37 + g, util=90.0 + i % 11, temp=65.0 + i % 5,
                                          vram_used=70_000_000_000 + i, energy_j=300.0,
                                          throttle=["power_cap"] if i % 101 == 0 else None)
                   for g in range(8)} for i in range(1000)]
    ranks = [{str(r): 60e9 + (i * 7919 + r) % 1000 * 1e6 for r in range(8)} for i in range(1000)]
    rng = random.Random(0)
    tally, sizes = RunTally(), {}
    for i in range(1, 200_001):
        tally.add({"step": i, "session": 1, "t_mono": i * 0.5, "step_time_s": 0.45 + rng.random() * 0.01,
                   "loss": 2.0 + rng.random() if i % 10 == 0 else None, "learning_rate": 1e-4,
                   "grad_norm": rng.lognormvariate(0, 0.5), "samples_seen": 64 * i, "peak_vram_bytes": ranks[i % 1000],
                   "gpus": eight_gpus[i % 1000], "host": {"cpu_pct": 40.0, "ram_used_bytes": 1e11}})
        if i in (10_000, 200_000):
            sizes[i] = len(json.dumps(tally.to_dict()))
    # add()'s cost is measured by benchmarks/bench_memory.py, not asserted here (a timed test flakes).
    assert sizes[200_000] < 1.5 * sizes[10_000] and sizes[200_000] < 3_000_000, sizes

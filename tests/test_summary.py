"""kaio.report.summary, kaio.report.figure_data and kaio.record.rules.LossSmoother: hand-computed figures
over an in-memory index."""

from __future__ import annotations

import itertools
import json

import msgspec
import pytest

from kaio.devices.base import DeviceInfo
from kaio.record.index import RunIndex, smoother_at
from kaio.record.rules import WARMUP_STEPS, LossSmoother
from kaio.record.types import (
    DeviceSummary,
    EvalEntry,
    GpuStepStats,
    HistoryHeader,
    HostStepStats,
    RunDescription,
    Session,
    SessionKind,
    Status,
    StepEntry,
    Telemetry,
)
from kaio.report.figure_data import BUCKETS, figure_data
from kaio.report.summary import ENERGY_FROM_STEP_POWER, ENERGY_FROM_STEPS, summarize

# --- building blocks ----------------------------------------------------------


def gpu(power=None, util=None, temp=None, vram=None, **extra) -> GpuStepStats:
    return GpuStepStats(
        power_avg=power,
        power_min=None if power is None else power - 10,
        power_max=None if power is None else power + 10,
        util_avg=util,
        temp_junction_max=temp,
        vram_used_max_bytes=vram,
        samples=1,
        **extra,
    )


def step(n: int, session: int = 1, **fields) -> StepEntry:
    return StepEntry(step=n, session=session, **fields)


def device(i: int, *, energy_j=None, method=None, in_run=True) -> DeviceSummary:
    info = DeviceInfo(backend="nvml", index=i, name="NVIDIA H100", in_run=in_run)
    return DeviceSummary(key=info.key, info=info, energy_j=energy_j, energy_method=method)


def index_of(steps=(), evals=()) -> RunIndex:
    index = RunIndex.in_memory()
    for entry in steps:
        index.add_step(entry)
    for evaluation in evals:
        index.add_eval(evaluation)
    return index


def header(**fields) -> HistoryHeader:
    return HistoryHeader(project="p", **fields)


def summary_of(steps=(), evals=(), **header_fields):
    return summarize(header(**header_fields), index_of(steps, evals))


def grad_norm_warning(warnings: list[str]) -> list[str]:
    return [w for w in warnings if w.startswith("gradient norm spiked")]


def stall_warning(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "stalled step" in w]


# --- time-weighted means --------------------------------------------------------


def test_gpu_means_are_weighted_by_step_duration_and_an_untimed_step_takes_the_median():
    # Durations 1, 2, 4 s and one step without one: the median duration (2 s) stands in for it.
    steps = [
        step(1, duration_s=1.0, gpus={"nvml:0": gpu(power=100.0, util=50.0, temp=70.0)}),
        step(2, duration_s=2.0, gpus={"nvml:0": gpu(power=200.0, util=None, temp=None, temp_max=75.0)}),
        step(3, duration_s=4.0, gpus={"nvml:0": gpu(power=300.0, util=100.0, temp=80.0)}),
        step(4, duration_s=None, gpus={"nvml:0": gpu(power=400.0, util=80.0, temp=60.0)}),
    ]
    s = summary_of(steps, devices=[device(0)])
    weights = (1.0, 2.0, 4.0, 2.0)
    assert s.power_avg_w == pytest.approx((100 * 1 + 200 * 2 + 300 * 4 + 400 * 2) / 9)  # 277.8; a plain mean says 250
    assert s.power_total_avg_w == pytest.approx(2500 / 9)  # one GPU: the same
    assert s.gpu_util_avg_pct == pytest.approx((50 * 1 + 100 * 4 + 80 * 2) / (1 + 4 + 2))  # step 2 has no reading
    assert s.temp_avg_c == pytest.approx((70 * 1 + 75 * 2 + 80 * 4 + 60 * 2) / sum(weights))  # edge stands in at step 2
    assert (s.power_peak_w, s.temp_peak_c) == (410.0, 80.0)  # power_max of step 4, the junction of step 3
    assert s.gpu_count == 1 and not s.cpu_only


def test_host_cpu_is_time_weighted_and_ram_is_its_peak():
    steps = [
        step(1, duration_s=3.0, host=HostStepStats(cpu_pct=20.0, ram_used_bytes=5_000)),
        step(2, duration_s=1.0, host=HostStepStats(cpu_pct=100.0, ram_used_bytes=7_000)),
        step(3, duration_s=1.0, host=HostStepStats(cpu_pct=None, ram_used_bytes=6_000)),
    ]
    s = summary_of(steps)
    assert s.host_cpu_avg_pct == pytest.approx((20 * 3 + 100 * 1) / 4)  # 40, where a plain mean says 60
    assert s.host_ram_peak_bytes == 7_000
    assert s.cpu_only and s.gpu_count == 0 and s.power_avg_w is None and s.energy_kwh is None


def test_a_history_without_any_timing_weighs_every_step_equally():
    steps = [step(i, gpus={"nvml:0": gpu(power=p)}) for i, p in enumerate((100.0, 200.0, 600.0), start=1)]
    s = summary_of(steps, devices=[device(0)])
    assert s.power_avg_w == pytest.approx(300.0)
    assert s.steps_s is None and s.samples_per_s is None


# --- medians: gradient-norm spikes and stalls -----------------------------------

# Steps 11..20 (after the warm-up of steps 1..10): sorted 0.5 1 1.5 2 2.5 3 3.5 4 4.5 5.
GRAD_NORMS = [1.0, 3.0, 2.0, 5.0, 4.0, 1.5, 2.5, 3.5, 4.5, 0.5]


def grad_steps(*after: float) -> list[StepEntry]:
    warm_up = [step(i, grad_norm=1000.0) for i in range(1, WARMUP_STEPS + 1)]  # huge, but not judged
    judged = GRAD_NORMS + list(after)
    return warm_up + [step(WARMUP_STEPS + 1 + i, grad_norm=g) for i, g in enumerate(judged)]


def test_the_gradient_norms_median_and_largest_are_in_the_key_metrics_even_where_no_spike_can_be_judged():
    """A norm of 1e6 at step 3, in the warm-up, where no spike window judges it: the report shows it, and warns."""
    from kaio.report.markdown import render_markdown

    steps = [step(i, grad_norm=g) for i, g in enumerate([1.0, 2.0, 1.13e6, 3.0, 2.5], start=1)]
    s = summary_of(steps)
    assert (s.grad_norm_median, s.grad_norm_max, s.grad_norm_max_step) == (2.5, 1.13e6, 3)
    assert grad_norm_warning(s.warnings) == []  # no window judges it: too early
    assert "| Gradient norm (median · largest) | 2.5 · 1.13e+06 at step 3 |" in render_markdown(header(), s, [])
    # ...but one so far beyond the first norms' median (over 1000x) is warned about all the same.
    assert [w for w in s.warnings if w.startswith("gradient norm of")] == [
        "gradient norm of 1.13e+06 at step 3, over 1000x the median of the first norms logged (2.5), where no "
        "spike window judges"
    ]
    ordinary = summary_of([step(i, grad_norm=g) for i, g in enumerate([40.0, 9.0, 3.0, 2.5, 2.0], start=1)])
    assert not any(w.startswith("gradient norm") for w in ordinary.warnings)  # a warm-up's large first norms
    # A classifier converging to a loss near zero: its norms end at a thousandth of its first ones (run_glue: 1.74
    # at step 30, a median of 0.00107 after a long resumed session). No spike.
    converging = [step(i, grad_norm=1.74 / (1.1**i)) for i in range(1, 400)]
    assert summary_of(converging).grad_norm_median < 1.74 / 1000
    assert not any(w.startswith("gradient norm") for w in summary_of(converging).warnings)


def test_grad_norm_spike_against_an_odd_count_median():
    # 11 values before step 22: the median is the 6th, 3.0, so the threshold is 30: 31 is a spike.
    warnings = summary_of(grad_steps(3.0, 31.0)).warnings
    assert grad_norm_warning(warnings) == [
        "gradient norm spiked above 10x the median of the (up to 20) logged before it at 1 step (largest 31 at step 22, "
        "where that median was 3)"
    ]


def test_grad_norm_spike_against_an_even_count_median_is_the_mean_of_the_middle_two():
    # 10 values before step 21: median (2.5 + 3) / 2 = 2.75, threshold 27.5: 28 is a spike, 27 is not.
    # (The lower middle value would flag both, the upper one neither.)
    assert grad_norm_warning(summary_of(grad_steps(27.0)).warnings) == []
    assert grad_norm_warning(summary_of(grad_steps(28.0)).warnings) == [
        "gradient norm spiked above 10x the median of the (up to 20) logged before it at 1 step (largest 28 at step 21, "
        "where that median was 2.75)"
    ]


def test_a_converging_runs_falling_norms_are_no_spike_and_a_late_spike_is_judged_by_the_norms_before_it():
    """A classifier's norms fall from about 1 to 0.03 as its loss goes to 0: against the run's median (0.04)
    its early norms looked like spikes; against the ones just before them they are not. A late 0.35 among
    0.03s is a spike, though under 10x the run's median of its first half."""
    falling = [1.0, 0.5, 1.1, 0.3, 0.8, 1.8, 0.9, 0.3, 0.1, 0.06, 0.05, 0.04] + [0.03] * 30
    steps = [step(WARMUP_STEPS + 1 + i, grad_norm=g) for i, g in enumerate(falling)]
    assert grad_norm_warning(summary_of(steps).warnings) == []
    steps.append(step(WARMUP_STEPS + 1 + len(falling), grad_norm=0.35))
    assert grad_norm_warning(summary_of(steps).warnings) == [
        "gradient norm spiked above 10x the median of the (up to 20) logged before it at 1 step (largest 0.35 at step 53, "
        "where that median was 0.03)"
    ]


def test_a_gradient_norm_of_zero_at_every_logged_step_is_a_run_that_learned_nothing():
    """--learning_rate 1e4: the weights overflowed, every norm 0.0 and the loss flat at ln(384); it read COMPLETED."""
    dead = summary_of([step(i, grad_norm=0.0, loss=5.95) for i in range(1, 31)])
    assert [w for w in dead.warnings if w.startswith("the gradient norm was 0")] == [
        "the gradient norm was 0 at every one of the 30 logged steps: no parameter was updated (weights overflowed "
        "to a constant output by the learning rate, or parameters frozen or cut off from the loss?)"
    ]
    alive = [step(i, grad_norm=0.0 if i < 30 else 1e-3) for i in range(1, 31)]  # one step learned something
    few = [step(i, grad_norm=0.0) for i in range(1, 6)]  # too few logged to say
    assert not any("gradient norm was 0" in w for s in (alive, few) for w in summary_of(s).warnings)


def test_grad_norm_spikes_need_enough_points_after_the_warm_up():
    steps = [step(i, grad_norm=1000.0) for i in range(1, 11)] + [step(i, grad_norm=1.0) for i in range(11, 19)]
    steps.append(step(19, grad_norm=50.0))  # 9 judged points: too few for a median worth comparing against
    assert grad_norm_warning(summary_of(steps).warnings) == []


# Steady step times of session 1 after its first (start-up) step: sorted 5 6 6.5 7 7.5 8 8.5 9 9.5 10.
STEP_TIMES = [6.0, 7.0, 8.0, 9.0, 10.0, 6.5, 7.5, 8.5, 9.5, 5.0]


def timed_steps(*after: float) -> list[StepEntry]:
    first = [step(1, step_time_s=500.0)]  # CUDA init, compilation: a session's first step is never a stall
    times = STEP_TIMES + list(after)
    steps = first + [step(2 + i, step_time_s=t) for i, t in enumerate(times)]
    n = len(steps)
    return steps + [step(n + 1, session=2, step_time_s=900.0)]  # session 2's first step: left out too


def test_a_stall_against_an_odd_count_median_step_time():
    # 11 steady values: median 8 s, threshold max(10 x 8, 60) = 80 s: 81 s is a stall.
    assert stall_warning(summary_of(timed_steps(81.0)).warnings) == [
        "1 stalled step: step time above 80 s (median 8 s; longest 81 s at step 12)"
    ]


def test_a_stall_against_an_even_count_median_step_time():
    # 12 steady values: median (8 + 8.5) / 2 = 8.25 s, threshold 82.5 s: 81 s is not a stall, 83 s is.
    assert stall_warning(summary_of(timed_steps(81.0, 83.0)).warnings) == [
        "1 stalled step: step time above 82.5 s (median 8.25 s; longest 83 s at step 13)"
    ]


def test_short_steps_use_the_one_minute_floor_for_stalls():
    steps = [step(i, step_time_s=0.2) for i in range(1, 13)] + [step(13, step_time_s=59.0), step(14, step_time_s=61.0)]
    assert stall_warning(summary_of(steps).warnings) == [
        "1 stalled step: step time above 60 s (median 0.2 s; longest 61 s at step 14)"
    ]


# --- loss ---------------------------------------------------------------------------


def test_loss_figures_nonfinite_counts_and_their_first_steps():
    steps = [
        step(1),  # not logged
        step(2, loss=5.0, loss_smoothed=5.0),
        step(3, loss_nonfinite="nan"),
        step(4, loss=1.5, loss_smoothed=3.8333),
        step(5, loss_nonfinite="inf"),
        step(6, loss=2.0, loss_smoothed=3.2222),
        step(7, loss_nonfinite="nan"),
        step(8, loss_nonfinite="-inf"),
    ]
    s = summary_of(steps)
    assert (s.loss_initial, s.loss_final, s.loss_final_smoothed) == (5.0, 2.0, 3.2222)
    assert (s.loss_min, s.loss_min_step, s.loss_logged_steps) == (1.5, 4, 3)
    assert (s.loss_nan_count, s.loss_nan_first_step) == (2, 3)
    assert (s.loss_inf_count, s.loss_inf_first_step) == (2, 5)  # inf and -inf together
    assert "loss was NaN at 2 logged steps (first at step 3)" in s.warnings
    assert "loss was inf at 2 logged steps (first at step 5)" in s.warnings
    assert (s.loss_final_step, s.loss_nonfinite_after_final) == (6, 2)  # steps 7 and 8: the run ended non-finite


def test_diverged_steps_are_counted_with_the_first():
    steps = [step(i, loss=1.0, loss_diverged=i in (12, 13, 15)) for i in range(1, 16)]
    assert (
        "loss diverging: the smoothed loss was above 3x its running minimum at 3 steps (first at step 12)"
        in summary_of(steps).warnings
    )


def test_a_loss_spike_the_smoothed_loss_came_back_from_says_so():
    """One bad batch at step 15 lifts the smoothed loss over 3x its minimum for two steps; from 17 it is under."""
    steps = [
        step(i, loss=1.0, loss_smoothed=3.5 if i in (15, 16) else 1.0, loss_diverged=i in (15, 16))
        for i in range(1, 21)
    ]
    assert (
        "loss diverging: the smoothed loss was above 3x its running minimum at 2 steps (first at step 15); no longer "
        "from step 17"
    ) in summary_of(steps).warnings


def test_a_missing_step_is_warned_about_but_a_late_first_step_is_not():
    s = summary_of([step(i) for i in range(3, 11) if i != 6])
    assert (s.optimizer_steps, s.step_entries) == (10, 7)
    assert "history has no entry for 1 optimizer step between its first and last step" in s.warnings
    s = summary_of([step(i) for i in range(3, 11)])  # a history that starts at step 3: nothing is missing there
    assert not any("no entry" in w for w in s.warnings)


# --- VRAM ----------------------------------------------------------------------------


def test_true_peak_vram_per_rank_and_the_gap_to_the_device_peak():
    steps = [
        step(
            1,
            peak_vram_bytes={"0": 4_000_000_000, "1": 3_000_000_000, "10": 1_000},
            gpus={"nvml:0": gpu(vram=5_000_000_000), "nvml:1": gpu(vram=4_500_000_000)},
        ),
        step(
            2,
            peak_vram_bytes={"0": 5_000_000_000, "1": None, "10": None, "2": 2_000},
            gpus={"nvml:0": gpu(vram=5_500_000_000), "nvml:1": gpu(vram=None)},
        ),
        step(3),
    ]
    s = summary_of(steps, devices=[device(0), device(1)])
    assert s.vram_true_peak_bytes == 5_000_000_000
    assert list(s.vram_true_peak_by_rank_bytes.items()) == [  # numeric rank order: 2 before 10
        ("0", 5_000_000_000),
        ("1", 3_000_000_000),
        ("2", 2_000),
        ("10", 1_000),
    ]
    assert s.vram_true_peak_step_avg_bytes == 4_500_000_000  # the steps' max over ranks: 4e9 and 5e9
    assert s.vram_device_used_peak_bytes == 5_500_000_000
    assert s.vram_device_used_peak_by_gpu_bytes == {"nvml:0": 5_500_000_000, "nvml:1": 4_500_000_000}
    assert s.vram_gap_bytes == 500_000_000
    assert s.gpu_count == 2


# --- energy and throughput --------------------------------------------------------


def test_energy_from_device_counters_first():
    devices = [
        device(0, energy_j=1_800_000.0, method="counter"),
        device(1, energy_j=1_800_000.0, method="integrated"),
        device(7, energy_j=9e9, method="counter", in_run=False),
    ]  # another job's GPU: not the run's energy
    steps = [step(i, energy_j=360.0, samples_seen=1000 * i) for i in range(1, 5)]
    s = summary_of(steps, devices=devices)
    assert s.energy_kwh == pytest.approx(1.0)
    assert s.energy_method == "hardware counter + integrated power"
    assert s.energy_per_1k_samples_wh == pytest.approx(1000.0 * 1000.0 / 4000)  # 1 kWh over 4,000 samples
    assert (
        "energy of GPU nvml:1 (NVIDIA H100) integrated from power samples, not read from a hardware energy counter"
        in s.warnings
    )
    # Why its counter was left, where the poller said it (a wrap, a GPU that stopped answering).
    from kaio.record.types import PollStats

    lost = "the energy counter could not be read for over 10 s"
    poll = PollStats(energy_fallbacks={"nvml:1": lost})
    s = summary_of(steps, devices=devices, telemetry=Telemetry(samples=8, poll_hz=2.0, poll=poll))
    assert (
        f"energy of GPU nvml:1 (NVIDIA H100) integrated from power samples, not read from a hardware energy counter ({lost})"
        in s.warnings
    )


def test_energy_from_the_devices_that_measured_it_when_a_run_gpu_has_no_reading_of_its_own():
    """A tester's fake MI300X in CPX mode (one card, 8 partitions, its energy read on partition 0): the total fell
    to the steps' sums (1.84 Wh, without the start-up and closing) for the card's 3.92 Wh. A GPU that reads neither
    power nor energy is said to be left out; a partition whose card is read on another is not."""
    import msgspec

    counted_elsewhere = msgspec.structs.replace(
        device(1), info=msgspec.structs.replace(device(1).info, power_counted_elsewhere=True)
    )
    steps = [step(i, energy_j=360.0, gpus={"nvml:0": gpu(power=999.0)}) for i in range(1, 11)]
    partitioned = summary_of(steps, devices=[device(0, energy_j=1_800_000.0, method="counter"), counted_elsewhere])
    assert partitioned.energy_kwh == pytest.approx(0.5) and partitioned.energy_method == "hardware counter"
    assert partitioned.energy_unmeasured == [] and not any("not measured" in w for w in partitioned.warnings)
    unread = summary_of(steps, devices=[device(0, energy_j=1_800_000.0, method="counter"), device(1)])
    assert unread.energy_kwh == pytest.approx(0.5) and unread.energy_unmeasured == ["nvml:1"]
    said = (
        "energy of GPU nvml:1 (NVIDIA H100) not measured (neither power nor an energy counter read): not in the total"
    )
    assert said in unread.warnings


def test_energy_from_per_step_energy_when_no_run_gpu_has_a_total():
    steps = [step(i, energy_j=None if i == 4 else 360.0, gpus={"nvml:0": gpu(power=999.0)}) for i in range(1, 11)]
    s = summary_of(steps, devices=[device(0), device(1)])  # a record of a kaio before the devices' totals
    assert s.energy_kwh == pytest.approx(9 * 360.0 / 3.6e6)
    assert s.energy_method == ENERGY_FROM_STEPS == "sum of per-step energy"
    assert not any(w.startswith("energy integrated") for w in s.warnings)


def test_energy_integrated_from_step_power_as_the_last_resort():
    steps = [
        step(1, duration_s=1.0, samples_seen=8, gpus={"nvml:0": gpu(power=100.0)}),
        step(2, duration_s=1.0, samples_seen=16, gpus={"nvml:0": gpu(power=200.0)}),
        step(3, duration_s=3.0, samples_seen=24, gpus={"nvml:0": gpu(power=300.0)}),
        step(4, duration_s=0.5, samples_seen=32, gpus={"nvml:0": gpu(power=400.0)}),
    ]
    s = summary_of(steps, devices=[device(0)])
    joules = 100 * 1 + 200 * 1 + 300 * 3 + 400 * 0.5  # 1400 J
    assert s.energy_kwh == pytest.approx(joules / 3.6e6)
    assert s.energy_method == ENERGY_FROM_STEP_POWER
    assert s.energy_per_1k_samples_wh == pytest.approx(joules / 3600 / 32 * 1000)
    assert "energy integrated from per-step average power: no device or per-step energy was recorded" in s.warnings


def test_throughput_is_over_the_time_spent_in_steps_after_each_sessions_first():
    """A session's first step is in its start-up: with torch_compile, a minute for a 10 ms step, which made the
    report's throughput a hundredth of the training's pace."""
    steps = [
        step(1, duration_s=60.0, step_time_s=59.0, samples_seen=16, tokens_seen=2_000, tokens_per_s_per_device=34.0),
        step(2, duration_s=2.0, step_time_s=1.0, samples_seen=32, tokens_seen=4_000, tokens_per_s_per_device=2_000.0),
        step(3, duration_s=None, step_time_s=0.5, samples_seen=48, tokens_seen=6_000),  # no gap: its own time
        step(4, duration_s=4.0, step_time_s=1.0, samples_seen=64, tokens_seen=8_000, tokens_per_s_per_device=1_000.0),
        step(5, session=2, duration_s=30.0, step_time_s=30.0, samples_seen=80, tokens_seen=10_000),  # resumed
        step(6, session=2, duration_s=1.5, step_time_s=1.5, samples_seen=96, tokens_seen=12_000),
    ]
    s = summary_of(steps)
    assert s.steps_s == pytest.approx(98.0)
    assert (s.samples, s.tokens) == (96, 12_000)
    assert s.samples_per_s == pytest.approx((48 + 16) / (6.5 + 1.5))  # steps 2-4 and 6
    assert s.tokens_per_s == pytest.approx(8_000 / 8.0)
    assert s.tokens_per_s_per_device == pytest.approx((2_000.0 * 1.0 + 1_000.0 * 1.0) / 2.0)  # not step 1's 34
    single = summary_of([step(1, duration_s=2.0, step_time_s=2.0, samples_seen=8, tokens_seen=800)])
    assert single.samples_per_s == pytest.approx(4.0)  # one step: its own time is all there is
    # Each count over the sessions that have it: tokens alone (no samples counted), and a resumed session that
    # counted no tokens (its time is not the tokens' time).
    tokens_only = [step(1, duration_s=60.0, tokens_seen=1_000)] + [
        step(n, duration_s=1.0, tokens_seen=1_000 * n) for n in range(2, 11)
    ]
    assert summary_of(tokens_only).tokens_per_s == pytest.approx(1_000.0)
    uncounted = [*tokens_only, step(11, session=2, duration_s=9.0), step(12, session=2, duration_s=5.0)]
    assert summary_of(uncounted).tokens_per_s == pytest.approx(1_000.0)
    # An evaluation after a step is in the next step's time: not the training's pace.
    paused = [step(1, duration_s=5.0, samples_seen=4), step(2, duration_s=1.0, samples_seen=8, eval_s=3.0)]
    paused += [step(3, duration_s=4.0, samples_seen=12), step(4, duration_s=1.0, samples_seen=16)]
    assert summary_of(paused).samples_per_s == pytest.approx(12 / (6.0 - 3.0))


def test_training_time_adds_the_sessions_and_a_running_one_counts_its_steps_span():
    sessions = [Session(session=1, duration_s=100.0, status=Status.COMPLETED), Session(session=2)]
    steps = [
        step(1, t_mono=10.0),
        step(2, t_mono=11.0),
        step(3, session=2, t_mono=500.0),
        step(4, session=2, t_mono=504.5),
    ]
    s = summary_of(steps, sessions=sessions)
    assert s.training_time_s == pytest.approx(104.5)
    assert s.sessions == 2


def test_the_epochs_are_the_trainers_unless_its_training_data_had_no_length():
    """An IterableDataset's epoch is the Trainer's step over max_steps ("20 of 20 planned, 1 epoch"), no pass over
    the data: not given. A plain loop's own epoch, and a record without the run's description, keep theirs."""
    steps = [step(1, epoch=0.5), step(2, epoch=1.0)]
    assert summary_of(steps, run=RunDescription(train_samples=16)).epochs == 1.0
    assert summary_of(steps, run=RunDescription(train_samples=None)).epochs is None
    assert summary_of(steps, run=RunDescription(reporter="kaio.log")).epochs == 1.0
    assert summary_of(steps).epochs == 1.0


# --- evaluations --------------------------------------------------------------------


def test_eval_best_and_final():
    evals = [
        EvalEntry(step=10, session=1, metrics={"eval_loss": 2.0}),
        EvalEntry(step=20, session=1, metrics={"eval_loss": 1.5}),
        EvalEntry(step=30, session=1, metrics={"eval_loss": 1.7}),
        EvalEntry(step=40, session=1, metrics={"eval_loss": None}, nonfinite={"eval_loss": "nan"}),
        EvalEntry(step=50, session=1, metrics={"eval_accuracy": 0.9}),
    ]
    s = summary_of(evals=evals)
    assert s.eval_count == 5
    assert (s.eval_loss_best, s.eval_loss_best_step) == (1.5, 20)
    assert s.eval_loss_final == 1.7  # the latest evaluation with a finite loss


# --- warnings from the header, throttling, and a healthy run ------------------------


def test_throttling_dropped_lines_and_the_supervisors_warnings():
    steps = [step(i) for i in range(1, 4)]
    steps[1].gpus = {"nvml:0": gpu(throttle=["hw_slowdown", "sw_thermal"])}
    steps[2].gpus = {"nvml:0": gpu(throttle=["sw_thermal"])}
    s = summary_of(
        steps,
        devices=[device(0)],
        warnings=["a warning from the supervisor"],
        telemetry=Telemetry(malformed_lines=3, oversized_lines=1, invalid_records=2, dropped_late_events=4),
    )
    assert s.warnings == [
        "a warning from the supervisor",
        "GPU nvml:0 (NVIDIA H100) throttled (hw_slowdown, sw_thermal) during 2 steps, first at step 2",
        "3 malformed telemetry lines dropped",
        "1 oversized telemetry line dropped",
        "2 invalid records dropped",
        "4 late events dropped",
    ]


def test_a_healthy_run_has_no_warnings_and_a_strict_json_summary():
    steps = [
        step(
            i,
            duration_s=0.5,
            step_time_s=0.5,
            loss=4.0 / i,
            loss_smoothed=4.0 / i,
            grad_norm=1.0,
            samples_seen=8 * i,
            gpus={"nvml:0": gpu(power=250.0, util=90.0, temp=60.0)},
        )
        for i in range(1, 41)
    ]
    s = summary_of(steps, devices=[device(0, energy_j=3600.0, method="counter")])
    assert s.warnings == []
    document = json.loads(msgspec.json.encode(s))
    assert json.loads(json.dumps(document, allow_nan=False)) == document
    assert (document["energy_kwh"], document["samples_per_s"]) == (pytest.approx(0.001), pytest.approx(320 / 20))


# --- figure data: decimation ----------------------------------------------------------


def test_figure_lines_are_exact_with_fewer_steps_than_buckets():
    steps = [
        step(
            i,
            loss=10.0 / i,
            learning_rate=1e-3 * i,
            gpus={"nvml:0": gpu(util=50.0 + i), "nvml:1": gpu(util=20.0 + 2 * i, power=100.0 + i)},
        )
        for i in range(1, 31)
    ]
    data = figure_data(header(devices=[device(0), device(1)]), index_of(steps))
    assert data.loss.x == list(range(1, 31)) and data.loss.y == [10.0 / i for i in range(1, 31)]
    assert data.learning_rate.y == [1e-3 * i for i in range(1, 31)]
    assert [g.key for g in data.gpus] == ["nvml:0", "nvml:1"]
    assert data.gpus[1].util.x == list(range(1, 31)) and data.gpus[1].util.y == [20.0 + 2 * i for i in range(1, 31)]
    assert data.gpus[1].power_band.low == [90.0 + i for i in range(1, 31)]
    assert data.gpus[1].power_band.high == [110.0 + i for i in range(1, 31)]
    assert data.gpus[0].power.x == []  # nvml:0 reported no power
    assert data.title == "p: RUNNING, 30 steps" and not data.no_gpu


def test_figure_lines_keep_one_step_spikes_in_order_with_more_steps_than_buckets():
    n = 20_000
    spikes = {12_345: 40.0}
    dips = {7_001: -5.0}
    steps = []
    for i in range(1, n + 1):
        util = {15_001: 100.0, 3_333: 0.0}.get(i, 50.0)
        loss = spikes.get(i, dips.get(i, 2.0 + (i % 7) * 0.01))
        steps.append(
            step(
                i,
                session=1 if i <= n // 2 else 2,
                loss=loss,
                gpus={"nvml:0": gpu(util=util)},
                loss_nonfinite="nan" if i % 1000 == 0 else None,
            )
        )
    data = figure_data(header(devices=[device(0)], status=Status.COMPLETED), index_of(steps))
    assert data.title == "p: COMPLETED, 20,000 steps"
    x, y = data.loss.x, data.loss.y
    assert len(x) <= 2 * BUCKETS
    assert all(a < b for a, b in itertools.pairwise(x))  # in step order, no duplicates
    width = 20_000 / BUCKETS  # a bucket's steps: a value is drawn within its bucket
    assert max(y) == 40.0 and abs(x[y.index(40.0)] - 12_345) < width
    assert min(y) == -5.0 and abs(x[y.index(-5.0)] - 7_001) < width
    ux, uy = data.gpus[0].util.x, data.gpus[0].util.y
    assert len(ux) <= 2 * BUCKETS and all(a < b for a, b in itertools.pairwise(ux))
    assert abs(ux[uy.index(100.0)] - 15_001) < width and abs(ux[uy.index(0.0)] - 3_333) < width
    assert data.nonfinite_losses == 20 and data.loss_marks == [1000.0 * k for k in range(1, 21)]
    assert data.session_starts == [(10_001, 2)]


# --- the one smoothing rule -----------------------------------------------------------


def test_loss_smoother_against_a_hand_computation():
    smoother = LossSmoother()
    # The span is max(5, count / 50): alpha 2 / 6 = 1/3 for the first 250 points.
    assert smoother.add(3.0) == (3.0, False)
    assert smoother.add(6.0) == (pytest.approx(4.0), False)  # 3 + (6 - 3) / 3
    assert smoother.add(0.0) == (pytest.approx(8 / 3), False)  # 4 - 4 / 3
    assert (smoother.count, smoother.low) == (3, pytest.approx(8 / 3))


def test_loss_smoother_span_grows_with_the_points_seen():
    smoother = LossSmoother()
    for _ in range(299):
        smoother.add(1.0)
    # 300th point: span 300 / 50 = 6, alpha 2 / 7: 2/7 x 7.3 + 5/7 x 1 = 2.8 (alpha 1/3 would give 3.1)
    smoothed, diverged = smoother.add(7.3)
    assert smoothed == pytest.approx(2.8)
    assert not diverged  # 2.8 is not above 3 x 1
    assert smoother.count == 300 and smoother.low == 1.0


def test_loss_smoother_flags_divergence_only_after_the_warm_up():
    early = LossSmoother()
    for _ in range(WARMUP_STEPS - 1):
        early.add(1.0)
    assert early.add(10.0) == (pytest.approx(4.0), False)  # 1/3 x 10 + 2/3 x 1 = 4 > 3 x 1, but in the warm-up

    late = LossSmoother()
    for _ in range(WARMUP_STEPS):
        late.add(1.0)
    assert late.add(10.0) == (pytest.approx(4.0), True)  # the 11th point: judged
    assert late.low == 1.0  # the running minimum is of the smoothed loss, and did not move
    assert late.add(0.5) == (pytest.approx(17 / 6), False)  # 4 - 3.5 / 3 = 2.83: back under 3 x 1


def test_a_resume_continues_the_smoothed_loss_from_the_index():
    losses = [5.0, 4.0, 4.5, 3.0, 3.5, 2.0, 2.5, 1.0]
    whole = LossSmoother()
    results = [whole.add(x) for x in losses]
    index = index_of([step(i + 1, loss=x, loss_smoothed=r[0]) for i, (x, r) in enumerate(zip(losses, results))])
    index.add_step(step(9))  # a step without a loss does not count
    resumed = smoother_at(index, 5)
    assert (resumed.count, resumed.smoothed, resumed.low) == (5, results[4][0], min(r[0] for r in results[:5]))
    assert [resumed.add(x) for x in losses[5:]] == [(pytest.approx(r[0]), r[1]) for r in results[5:]]


def test_a_learning_rate_that_jumps_up_where_a_resume_began_is_said():
    steps = [step(i, session=1, learning_rate=1e-3 * (10 - i) / 10) for i in range(1, 11)]
    steps += [step(i, session=2, learning_rate=8e-4) for i in range(11, 14)]
    sessions = [
        Session(session=1, status=Status.COMPLETED),
        Session(session=2, kind=SessionKind.RESUME, status=Status.COMPLETED),
    ]
    s = summarize(header(sessions=sessions), index_of(steps))
    jump = [w for w in s.warnings if w.startswith("learning rate jumped")]
    assert jump == [
        "learning rate jumped from 0 to 0.0008 at step 11, where session 2 (resume) began: its schedule was planned "
        "anew over the run's new length, or its learning rate was edited (a cosine schedule extended by --max-steps "
        "rises again from the checkpoint on)"
    ]


def test_a_loss_around_zero_or_one_that_had_fallen_near_it_is_not_called_diverging():
    """GRPO's loss sits around 0 and goes negative: its ratio to its minimum means nothing (a false warning at
    every step, seen on a GRPOTrainer script). A loss that fell from 2 to 0.01 and stands at 0.04 tripled, but
    has not blown up; back at 1 it has."""
    around_zero = LossSmoother()
    flagged = [around_zero.add(x)[1] for x in [0.0, -0.2, -0.4, -0.1, 0.0, -0.3] * 4 + [0.3, 0.4, 0.5]]
    assert not any(flagged) and not around_zero.positive

    fallen = LossSmoother()
    for x in [2.0, 1.0, 0.5] + [0.01] * 40:
        fallen.add(x)
    assert [fallen.add(0.04)[1] for _ in range(10)] == [False] * 10  # 4x its minimum, 2% of its fall back up
    assert fallen.add(3.0)[1]  # a blow-up: smoothed ~1, half its fall back up


def test_a_resumed_smoother_keeps_its_maximum_and_whether_the_loss_was_ever_at_or_below_zero():
    losses = [4.0, 2.0, 1.0, -0.5, 0.5]
    whole = LossSmoother()
    index = index_of([step(i + 1, loss=x, loss_smoothed=whole.add(x)[0]) for i, x in enumerate(losses)])
    assert (smoother_at(index, 3).high, smoother_at(index, 3).positive) == (4.0, True)
    assert (smoother_at(index, 5).high, smoother_at(index, 5).positive) == (4.0, False)


def test_the_other_numbers_a_training_logged_are_summed_up_by_name_and_the_trainers_closing_log_is_not():
    """DPO's rewards/margins, SFT's mean_token_accuracy, a compute_loss's auxiliary loss: in report.md, each with
    where it was first, last, lowest and highest. A resume's steps trained again replace the earlier ones'."""
    from kaio.report.markdown import render_markdown

    # train_tokens_per_second and train_runtime: the Trainer's own speed, at every log while it counts tokens
    speed = {"train_tokens_per_second": 7000.0, "train_runtime": 1.5}
    steps = [step(k, metrics={"rewards/margins": 0.1 * k, "aux_loss": 5.0 - k, **speed}) for k in range(1, 6)]
    steps[-1].metrics |= {"train_runtime": 9.0, "train_loss": 2.0, "num_tokens": 123456.0}
    index = index_of(steps)
    index.truncate_after(4)  # the resume from checkpoint-4 trains step 5 again
    index.add_step(step(5, session=2, metrics={"rewards/margins": -0.5, "aux_loss": 7.0}))
    s = summarize(header(), index)
    assert [(m.name, m.logged, m.first, m.last, m.last_step) for m in s.logged_metrics] == [
        ("aux_loss", 5, 4.0, 7.0, 5),
        ("rewards/margins", 5, 0.1, -0.5, 5),
    ]
    margins = s.logged_metrics[1]
    assert (margins.min, margins.min_step, margins.max, margins.max_step) == (-0.5, 5, pytest.approx(0.4), 4)
    report = render_markdown(header(), s, [])
    assert "## Other logged metrics" in report
    assert "| aux_loss | 5 | 4 | 7 (step 5) | 1 (step 4) | 7 (step 5) |" in report
    assert "train_runtime" not in report and "train_tokens_per_second" not in report


def test_a_poller_that_fell_behind_is_said():
    """A tester's fake GPU slow to answer held up every GPU's reading (47 samples skipped) under "at 2 Hz"."""
    from kaio.record.types import PollStats

    def said(ticks: int, skipped: int) -> list[str]:
        telemetry = Telemetry(samples=ticks, poll_hz=2.0, poll=PollStats(ticks=ticks, skipped_ticks=skipped))
        return [w for w in summary_of([step(1)], telemetry=telemetry).warnings if "fell behind" in w]

    assert said(53, 47) == [
        "the GPU sampling fell behind: 47 of 100 samples due every 0.5 s were skipped (a GPU or driver slow to "
        "answer holds up the reading of every GPU)"
    ]
    assert said(97, 3) == []  # a few late ticks: the machine's, not worth a warning

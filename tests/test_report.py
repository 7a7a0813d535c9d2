"""kaio.report: summary maths, report.md sections, the telemetry figure, reading and writing histories."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kaio.errors import ReportError
from kaio.report import load_history, write_reports
from kaio.report.markdown import render_markdown
from kaio.report.plot import PANEL_TITLES, build_figure, render_telemetry_png
from kaio.report.summary import summarize
from kaio.report.tally import RunTally

HF_SECRET = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"


@pytest.fixture(autouse=True)
def _matplotlib_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))


# --- synthetic histories ----------------------------------------------------


def gpu_entry(power=250.0, util=97.0, temp=61.0, vram_used=9_000_000_000, **extra) -> dict:
    entry = {
        "power_avg": power, "power_min": None if power is None else power - 10,
        "power_max": None if power is None else power + 10,
        "util_avg": util, "temp_max": None if temp is None else temp - 6, "temp_junction_max": temp,
        "energy_j": None, "vram_used_max_bytes": vram_used, "samples": 1,
    }
    entry.update(extra)
    return entry


def make_step(step: int, *, session=1, t_mono=None, step_time_s=0.5, loss=2.0, gpus=None, peak_vram=None, **extra):
    entry = {
        "step": step, "epoch": step / 100, "session": session,
        "timestamp": f"2026-11-27T10:00:{step % 60:02d}+00:00",
        "t_mono": 1000.0 + step * 0.5 if t_mono is None else t_mono, "step_time_s": step_time_s,
        "loss": loss, "learning_rate": 1e-3 * (1 - step / 1000), "grad_norm": 1.0,
        "samples_seen": 8 * step, "tokens_seen": 1024 * step,
        "peak_vram_bytes": peak_vram, "gpus": gpus or {}, "host": None,
    }
    entry.update(extra)
    return entry


def make_history(n_steps=20, n_gpus=1, session_lengths=None, **overrides) -> dict:
    """A coherent history: ``n_gpus`` 0 means a CPU-only host; ``session_lengths`` splits the steps."""
    session_lengths = session_lengths or [n_steps]
    keys = [f"nvml:{i}" for i in range(n_gpus)]
    steps, sessions, step = [], [], 0
    for number, length in enumerate(session_lengths, start=1):
        start = step
        for _ in range(length):
            step += 1
            gpus = {k: gpu_entry(power=200.0 + 10 * i + step, util=90.0 + i, temp=60.0 + i + step % 5)
                    for i, k in enumerate(keys)}
            peak = {str(i): 8_000_000_000 + 1_000_000 * step - 100_000_000 * i for i in range(n_gpus)} or None
            steps.append(make_step(step, session=number, loss=4.0 / (1 + 0.1 * step), gpus=gpus, peak_vram=peak))
        sessions.append({
            "session": number, "kind": "run" if number == 1 else "resume",
            "started_at": f"2026-11-27T1{number}:00:00+00:00", "ended_at": f"2026-11-27T1{number}:10:00+00:00",
            "duration_s": 0.5 * length + 5.0, "status": "COMPLETED", "exit_code": 0, "signal": None,
            "start_step": start, "end_step": step, "error": None,
        })
    history = {
        "schema_version": 1, "project": "tiny-default", "generated_at": "2026-11-27T10:00:00+00:00",
        "status": "COMPLETED",
        "config": {"project_name": "tiny-default", "model": {"name": "kaio/tiny-llama"}, "training": {"lr": 0.003}},
        "run": {
            "world_size": max(n_gpus, 1), "max_steps": step, "trainable_params": 1_048_576,
            "total_params": 134_217_728, "architecture": "LlamaForCausalLM", "base_model": "kaio/tiny-llama",
            "precision": "bf16", "per_device_batch_size": 8, "gradient_accumulation_steps": 2,
            "effective_batch_size": 16 * max(n_gpus, 1), "learning_rate": 0.003, "lr_scheduler_type": "cosine",
            "optimizer": "adamw_torch", "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
            "seq_length": 128,
        },
        "sessions": sessions,
        "devices": [{"key": k, "name": "NVIDIA H100", "uuid": f"GPU-{k}", "in_run": True, "power_kind": "average",
                     "energy_method": "counter", "energy_j": 90_000.0} for k in keys],
        "host": {"cpu_count": 2, "ram_total_bytes": 25_769_803_776},
        "telemetry": {"events": 3 * step, "malformed_lines": 0, "oversized_lines": 0, "spooled_events": 0,
                      "samples": 2 * step, "poll_hz": 2.0, "poll_interval_mean_s": 0.5, "poll_lateness_p99_s": 0.002},
        "warnings": [],
        "hub": None,
        "steps": steps,
    }
    history.update(overrides)
    return history


def cpu_only_history(n_steps=12) -> dict:
    history = make_history(n_steps, n_gpus=0)
    for step in history["steps"]:
        step["host"] = {"cpu_pct": 50.0 + step["step"] % 2 * 20, "ram_used_bytes": 4_000_000_000 + step["step"]}
    assert history["devices"] == [] and all(s["gpus"] == {} and s["peak_vram_bytes"] is None for s in history["steps"])
    return history


def no_data_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if "not reported" in t.get_text() or "no " in t.get_text()]


# --- summary maths ----------------------------------------------------------


def test_loss_statistics_ignore_unlogged_and_nonfinite_steps():
    steps = [
        make_step(1, loss=None),
        make_step(2, loss=5.0),
        make_step(3, loss=None, loss_nonfinite="nan"),
        make_step(4, loss=1.5),
        make_step(5, loss=None, loss_nonfinite="inf"),
        make_step(6, loss=2.0),
        make_step(7, loss=None, loss_nonfinite="nan"),
    ]
    summary = summarize(make_history(steps=steps))
    assert (summary["loss_initial"], summary["loss_final"]) == (5.0, 2.0)
    assert (summary["loss_min"], summary["loss_min_step"]) == (1.5, 4)
    assert summary["loss_logged_steps"] == 3
    assert (summary["loss_nan_count"], summary["loss_nan_first_step"]) == (2, 3)
    assert (summary["loss_inf_count"], summary["loss_inf_first_step"]) == (1, 5)
    assert "loss was NaN at 2 steps (first at step 3)" in summary["warnings"]
    assert "loss was inf at 1 step (first at step 5)" in summary["warnings"]


def test_step_durations_use_t_mono_gaps_and_step_time_for_a_sessions_first_step():
    def at(step, power, **timing):
        return make_step(step, gpus={"nvml:0": gpu_entry(power=power)}, **timing)

    steps = [
        at(1, 100.0, t_mono=10.0, step_time_s=1.0),
        at(2, 200.0, t_mono=11.0),
        at(3, 300.0, t_mono=14.0),
        at(4, 400.0, session=2, t_mono=500.0, step_time_s=2.5),  # new session: the t_mono gap is downtime
        at(5, 500.0, session=2, step_time_s=None),  # unknown: the median of the known durations
    ]
    steps[4]["t_mono"] = None
    durations = [1.0, 1.0, 3.0, 2.5, 1.75]
    summary = summarize(make_history(steps=steps))
    expected = sum(p * d for p, d in zip([100, 200, 300, 400, 500], durations)) / sum(durations)
    assert summary["power_avg_w"] == pytest.approx(expected, rel=1e-12)


def test_energy_and_power_are_integrated_over_unevenly_spaced_steps():
    # No device counter, no per-step energy: power x duration, with steps of 1 s, 1 s, 3 s and 0.5 s.
    steps = [
        make_step(1, t_mono=10.0, step_time_s=1.0, gpus={"nvml:0": gpu_entry(power=100.0)}),
        make_step(2, t_mono=11.0, gpus={"nvml:0": gpu_entry(power=200.0)}),
        make_step(3, t_mono=14.0, gpus={"nvml:0": gpu_entry(power=300.0)}),
        make_step(4, t_mono=14.5, gpus={"nvml:0": gpu_entry(power=400.0)}),
    ]
    history = make_history(steps=steps, devices=[])
    summary = summarize(history)
    joules = 100 * 1 + 200 * 1 + 300 * 3 + 400 * 0.5
    assert summary["energy_kwh"] == pytest.approx(joules / 3.6e6)
    assert summary["power_avg_w"] == pytest.approx(joules / 5.5)  # a plain mean would say 250 W
    assert summary["power_peak_w"] == 410.0
    assert summary["energy_method"] == "integrated from per-step average power"
    assert any(w.startswith("energy integrated from per-step average power") for w in summary["warnings"])
    assert summary["samples"] == 32
    assert summary["energy_per_1k_samples_wh"] == pytest.approx(joules / 3600 / 32 * 1000)


def test_energy_prefers_device_counters_then_per_step_energy():
    history = make_history(10, n_gpus=2)
    history["devices"][0]["energy_j"] = 1_800_000.0
    history["devices"][1].update(energy_j=1_800_000.0, energy_method="integrated")
    history["devices"].append({"key": "nvml:7", "name": "other job", "in_run": False, "energy_j": 9e9})
    summary = summarize(history)
    assert summary["energy_kwh"] == pytest.approx(1.0)
    assert summary["energy_method"] == "hardware counter + integrated power"
    assert ("energy of GPU nvml:1 (NVIDIA H100) integrated from power samples, not read from a hardware energy "
            "counter") in summary["warnings"]

    history["devices"][1]["energy_j"] = None  # one run GPU without a counter: fall back to the steps
    for i, step in enumerate(history["steps"]):
        step["energy_j"] = None if i == 3 else 360.0
    summary = summarize(history)
    assert summary["energy_kwh"] == pytest.approx(9 * 360.0 / 3.6e6)
    assert summary["energy_method"] == "sum of per-step energy"


def test_gpu_averages_are_time_weighted_and_skip_missing_values():
    steps = [
        make_step(1, t_mono=10.0, step_time_s=1.0, gpus={"nvml:0": gpu_entry(util=50.0, temp=70.0)}),
        make_step(2, t_mono=13.0, gpus={"nvml:0": gpu_entry(util=None, temp=None)}),
        make_step(3, t_mono=16.0, gpus={"nvml:0": gpu_entry(util=100.0, temp=80.0)}),
    ]
    steps[1]["gpus"]["nvml:0"]["temp_max"] = 75.0  # no junction reading: the edge temperature stands in
    summary = summarize(make_history(steps=steps))
    assert summary["gpu_util_avg_pct"] == pytest.approx((50 * 1 + 100 * 3) / 4)
    assert summary["temp_avg_c"] == pytest.approx((70 * 1 + 75 * 3 + 80 * 3) / 7)
    assert summary["temp_peak_c"] == 80.0


def test_vram_true_peak_per_rank_and_device_gap():
    steps = [
        make_step(1, peak_vram={"0": 4_000_000_000, "1": 3_000_000_000},
                  gpus={"nvml:0": gpu_entry(vram_used=5_000_000_000), "nvml:1": gpu_entry(vram_used=4_500_000_000)}),
        make_step(2, peak_vram={"0": 5_000_000_000, "1": None},
                  gpus={"nvml:0": gpu_entry(vram_used=5_500_000_000), "nvml:1": gpu_entry(vram_used=None)}),
        make_step(3, peak_vram=None, gpus={}),
    ]
    summary = summarize(make_history(steps=steps, devices=[]))
    assert summary["vram_true_peak_bytes"] == 5_000_000_000
    assert summary["vram_true_peak_by_rank_bytes"] == {"0": 5_000_000_000, "1": 3_000_000_000}
    assert summary["vram_true_peak_step_avg_bytes"] == 4_500_000_000
    assert summary["vram_device_used_peak_bytes"] == 5_500_000_000
    assert summary["vram_device_used_peak_by_gpu_bytes"] == {"nvml:0": 5_500_000_000, "nvml:1": 4_500_000_000}
    assert summary["vram_gap_bytes"] == 500_000_000
    assert summary["gpu_count"] == 2


def test_throughput_and_duration_add_up_across_sessions_that_restart_counters():
    history = make_history(session_lengths=[3, 2])
    for step, seen in zip(history["steps"], [8, 16, 24, 8, 16]):  # session 2 counts from zero again
        step["samples_seen"], step["tokens_seen"] = seen, None
    history["sessions"][0]["duration_s"], history["sessions"][1]["duration_s"] = 3600.0, 1800.0
    summary = summarize(history)
    assert summary["samples"] == 40
    assert summary["samples_per_s"] == pytest.approx(40 / 5400)
    assert summary["tokens"] is None and summary["tokens_per_s"] is None
    assert summary["duration_h"] == pytest.approx(1.5)
    assert (summary["optimizer_steps"], summary["step_entries"], summary["sessions"]) == (5, 5, 2)
    assert summary["trainable_pct"] == pytest.approx(100 * 1_048_576 / 134_217_728)


def test_warnings_for_explosions_spikes_stalls_throttling_and_lost_telemetry():
    steps = [make_step(i, loss=1.0, step_time_s=0.2, t_mono=float(i)) for i in range(1, 31)]
    steps[1]["loss"] = 4.0  # a single noisy batch is not an explosion
    for step in steps[24:]:
        step["loss"] = 5.0  # a sustained divergence is: EMA (alpha 1/3) 2.333, then 3.222 > 3 x 1.0 at step 26
    steps[20]["grad_norm"] = 50.0
    steps[15]["step_time_s"] = 2.0
    steps[10]["gpus"] = {"nvml:0": gpu_entry(throttle=["hw_slowdown", "sw_thermal"])}
    steps[11]["gpus"] = {"nvml:0": gpu_entry(throttle=["sw_thermal"])}
    del steps[5]  # a step the history never got
    history = make_history(steps=steps, warnings=["a warning from the supervisor"])
    history["telemetry"].update(malformed_lines=3, oversized_lines=1, dropped_samples=4)
    warnings = summarize(history)["warnings"]
    assert warnings[0] == "a warning from the supervisor"
    exploded = [w for w in warnings if w.startswith("loss exploded")]
    assert exploded == ["loss exploded: smoothed loss above 3x its running minimum at 5 logged steps "
                        "(first at step 26: 3.222 vs 1)"]
    assert "gradient norm spiked above 10x its median (1) at 1 step (largest 50 at step 21)" in warnings
    assert "1 stalled step: step time above 5x the median 0.2 s (longest 2 s at step 16)" in warnings
    assert ("GPU nvml:0 (NVIDIA H100) throttled (hw_slowdown, sw_thermal) during 2 steps, first at step 11"
            in warnings)
    assert "3 malformed telemetry lines dropped" in warnings
    assert "1 oversized telemetry line dropped" in warnings
    assert "4 samples dropped" in warnings
    assert "history has no entry for 1 optimizer step between its first and last step" in warnings


def test_a_healthy_run_has_no_warnings_and_its_summary_is_strict_json():
    summary = summarize(make_history(40, n_gpus=2))
    assert summary["warnings"] == []
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


# --- report.md --------------------------------------------------------------


def test_completed_single_session_report_has_its_sections_and_no_optional_ones():
    history = make_history(20)
    md = render_markdown(history, summarize(history))
    for heading in ("# Training report: tiny-default", "## Executive summary", "## Key metrics",
                    "## Configuration snapshot", "## Telemetry"):
        assert heading in md
    for absent in ("## Sessions", "## Warnings", "## Hugging Face deployment", "## Notes", "Latest checkpoint",
                   "not measured"):
        assert absent not in md
    assert "**Status:** ✅ COMPLETED" in md
    assert "**Optimizer steps:** 20 of 20 planned" in md
    assert "**Trainable params:** 1,048,576 of 134,217,728 (0.781 %)" in md
    assert "![telemetry](telemetry.png)" in md
    assert "| Loss (initial → final) | 3.636 → 1.333 |" in md
    assert "| Energy | 0.0250 kWh (25 Wh), hardware counter |" in md
    assert "| Throughput | 10.7 samples/s · 1,365 tokens/s |" in md
    for setting in ("| Base model | kaio/tiny-llama |", "| Architecture | LlamaForCausalLM |", "| Precision | bf16 |",
                    "| Effective batch size | 16 |", "| Gradient accumulation steps | 2 |",
                    "| LoRA r / alpha | 16 / 32 |", "| LoRA target modules | q_proj, v_proj |",
                    "| Learning rate | 0.003 |", "| Optimizer | adamw_torch |", "| LR scheduler | cosine |"):
        assert setting in md


def test_failed_multi_session_report_shows_root_cause_sessions_and_warnings():
    history = make_history(session_lengths=[5, 3], status="FAILED")
    history["sessions"][1].update(status="FAILED", exit_code=1,
                                  error="torch.OutOfMemoryError: CUDA out of memory | tried 2 GiB")
    history["steps"][6]["loss"], history["steps"][6]["loss_nonfinite"] = None, "nan"
    history["checkpoints"] = [{"step": 4, "path": "checkpoints/tiny-default/checkpoint-4", "session": 1}]
    history["telemetry"]["notes"] = ["resumed from checkpoint-4"]
    md = render_markdown(history, summarize(history))
    assert "- **Latest checkpoint:** step 4 (`checkpoints/tiny-default/checkpoint-4`)" in md
    assert "## Notes\n\n- resumed from checkpoint-4" in md
    assert "**Status:** ❌ FAILED (exit code 1): `torch.OutOfMemoryError: CUDA out of memory | tried 2 GiB`" in md
    assert "over 2 sessions" in md
    sessions = md.split("## Sessions")[1].split("##")[0]
    assert "| 1 | run |" in sessions and "| 2 | resume |" in sessions
    assert "CUDA out of memory \\| tried 2 GiB" in sessions  # the pipe cannot split the table row
    assert "## Warnings" in md and "loss was NaN at 1 step (first at step 7)" in md


def test_interrupted_single_session_gets_a_sessions_table():
    history = make_history(5, status="INTERRUPTED")
    history["sessions"][0].update(status="INTERRUPTED", exit_code=None, signal="SIGINT")
    md = render_markdown(history, summarize(history))
    assert "**Status:** ⏹️ INTERRUPTED (signal SIGINT)" in md
    assert "| 1 | run |" in md and "signal SIGINT" in md.split("## Sessions")[1]


def test_hub_section_links_the_commit_or_says_why_the_push_failed():
    sha = "91dbf5834c14434dc9f9b4c8c2fa242d35ab66eb"
    history = make_history(5, hub={"repo_id": "me/tiny", "commit_sha": sha, "url": None, "error": None})
    md = render_markdown(history, summarize(history))
    assert "## Hugging Face deployment" in md
    assert "[me/tiny](https://huggingface.co/me/tiny)" in md
    assert f"`{sha}`" in md
    assert f"(https://huggingface.co/me/tiny/blob/{sha}/adapter_config.json)" in md

    history["hub"] = {"repo_id": "me/tiny", "commit_sha": None, "url": None, "error": "401 Unauthorized"}
    md = render_markdown(history, summarize(history))
    assert "- push failed: 401 Unauthorized" in md and "adapter_config.json" not in md


def test_secrets_in_config_and_errors_never_reach_the_report():
    comet_key = "Zq8Rk2Lm5Np7Tv9Xw1Yb3Dc6Ef"
    history = make_history(5, hub={"repo_id": "me/tiny", "commit_sha": None, "url": None,
                                   "error": f"401: token {HF_SECRET} rejected"})
    history["config"].update(hub={"repo_id": "me/tiny", "token": HF_SECRET},
                             reporting={"comet": {"api_key": comet_key, "project": "kaio"}},
                             extra=[{"client_secret": "s3cr3t-value-123"}])
    md = render_markdown(history, summarize(history))
    for secret in (HF_SECRET, comet_key, "s3cr3t-value-123"):
        assert secret not in md
    assert '"token": "‹redacted›"' in md and '"api_key": "‹redacted›"' in md
    assert '"project": "kaio"' in md  # the rest of the config is still there


def test_cpu_only_report_says_not_measured_instead_of_zero():
    history = cpu_only_history()
    summary = summarize(history)
    assert summary["cpu_only"] and summary["power_avg_w"] is None and summary["energy_kwh"] is None
    md = render_markdown(history, summary)
    metrics = md.split("## Key metrics")[1].split("##")[0]
    for row in ("True peak VRAM (allocator, max over ranks)", "Power per GPU (average / peak)", "Energy",
                "GPU utilisation (average)", "Temperature (average / peak)"):
        assert f"| {row} | not measured (no GPU) |" in metrics
    assert " 0 W" not in metrics and "0.0000 kWh" not in metrics
    assert "| Host CPU (average) / RAM used (peak) | 60 % / 4.00 GB |" in metrics  # what a CPU-only run does have


# --- telemetry.png ----------------------------------------------------------


def test_figure_has_six_titled_panels_all_with_data():
    fig = build_figure(make_history(30, n_gpus=2, session_lengths=[18, 12]))
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == list(PANEL_TITLES)
    assert all(not no_data_texts(ax) for ax in axes)
    loss_ax = axes[0]
    assert [line.get_label() for line in loss_ax.get_lines()][:2] == ["raw", "smoothed (EMA)"]
    assert loss_ax.get_lines()[1].get_color() == "tab:orange"
    assert {line.get_label() for line in axes[3].get_lines()} >= {"nvml:0", "nvml:1"}  # one line per GPU
    assert len(axes[4].collections) == 2  # a min/max band per GPU
    boundary_labels = [t.get_text().strip() for t in axes[5].texts]
    assert boundary_labels == ["session 2"]


def test_cpu_only_figure_says_so_in_the_gpu_panels():
    axes = build_figure(cpu_only_history()).get_axes()
    for ax in axes[2:]:
        assert no_data_texts(ax) == ["no GPU data (CPU-only run)"]
        assert not ax.get_lines()
    assert not no_data_texts(axes[0]) and not no_data_texts(axes[1])


def test_figure_names_what_a_gpu_did_not_report():
    history = make_history(10)
    for step in history["steps"]:
        step["gpus"]["nvml:0"].update(power_avg=None, power_min=None, power_max=None)
        step["loss"] = None
    axes = build_figure(history).get_axes()
    assert no_data_texts(axes[0]) == ["no finite loss logged"]
    assert no_data_texts(axes[4]) == ["power not reported by the GPU"]
    assert not no_data_texts(axes[3])


def test_nonfinite_losses_are_marked_once_per_bucket_and_counted_in_full():
    steps = [make_step(i, loss=None, loss_nonfinite="nan") if i % 3 == 0 else make_step(i) for i in range(1, 5001)]
    axes = build_figure(make_history(steps=steps)).get_axes()
    marks = [line for line in axes[0].get_lines() if line.get_label().startswith("NaN/inf loss")]
    assert [m.get_label() for m in marks] == ["NaN/inf loss (1,666 steps)"]
    assert 0 < len(marks[0].get_xdata()) <= 1024 and marks[0].get_xdata()[0] == 3


def test_a_long_run_renders_from_its_tally_with_bounded_lines_that_keep_a_spike(tmp_path):
    """The supervisor feeds steps to the tally as they seal; the figure then costs the same at any length
    (its time is measured by benchmarks/bench_memory.py's refreshes, not asserted here)."""
    import numpy as np

    n = 300_000
    rng = np.random.default_rng(0)
    loss = 3.0 * np.exp(-np.arange(n) / 6e4) + rng.normal(0, 0.05, n)
    loss[254_321] = 40.0  # one diverging batch: the drawn line must still reach it
    power = (250 + rng.normal(0, 20, 1000)).tolist()
    gpu_pool = [{"nvml:0": gpu_entry(power=p, util=90.0 + i % 10, temp=60.0 + i % 7)} for i, p in enumerate(power)]
    tally = RunTally()
    for i in range(n):
        tally.add({"step": i + 1, "session": 1 if i < n // 2 else 2, "t_mono": i * 0.1, "step_time_s": 0.1,
                   "loss": float(loss[i]) if i % 10 == 0 or i == 254_321 else None, "learning_rate": 1e-3,
                   "samples_seen": 8 * (i + 1), "peak_vram_bytes": {"0": 8e9}, "gpus": gpu_pool[i % 1000]})
    header = make_history(steps=[])
    del header["steps"]
    render_telemetry_png(header, tmp_path / "telemetry.png", tally)
    assert (tmp_path / "telemetry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss_line = build_figure(header, tally).get_axes()[0].get_lines()[0]
    assert len(loss_line.get_xdata()) <= 2048 and max(loss_line.get_ydata()) == 40.0
    assert summarize(header, tally)["optimizer_steps"] == n


# --- files ------------------------------------------------------------------


def test_write_reports_writes_all_three_files_and_nulls_nonfinite_numbers(tmp_path):
    history = make_history(10, n_gpus=2, session_lengths=[6, 4])
    history["steps"][3]["loss"] = float("nan")
    history["steps"][4]["grad_norm"] = float("inf")
    history["config"]["hub"] = {"token": HF_SECRET}
    summary = write_reports(history, tmp_path / "reports" / "tiny-default")
    out = tmp_path / "reports" / "tiny-default"
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "report.md", "telemetry.png"]
    saved = load_history(out / "history.json")
    assert saved["steps"][3]["loss"] is None and saved["steps"][3]["loss_nonfinite"] == "nan"
    assert saved["steps"][4]["grad_norm"] is None
    assert saved["config"]["hub"]["token"] == "‹redacted›" and HF_SECRET not in (out / "history.json").read_text()
    assert (summary["loss_nan_count"], summary["loss_nan_first_step"]) == (1, 4)
    assert (out / "telemetry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss was NaN at 1 step (first at step 4)" in (out / "report.md").read_text()


def test_write_reports_without_png_leaves_no_png(tmp_path):
    write_reports(make_history(5), tmp_path, png=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "report.md"]


def test_load_history_names_a_truncated_file_and_its_line(tmp_path):
    path = tmp_path / "history.json"
    text = json.dumps(make_history(5), indent=1)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ReportError, match=r"history\.json: truncated or corrupt JSON at line \d+") as info:
        load_history(path)
    assert str(path) in str(info.value) and "kaio report" in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h.update(schema_version=2), "schema_version 2 is not supported (this kaio reads 1)"),
        (lambda h: (h.pop("steps"), h.pop("status")), "missing key(s) status, steps"),
        (lambda h: h["steps"].append({"loss": 1.0}), "steps[5] has no integer 'step'"),
        (lambda h: h.update(sessions={}), "'sessions' must be a list"),
    ],
)
def test_load_history_rejects_histories_it_cannot_render(tmp_path, change, message):
    history = make_history(5)
    change(history)
    path = tmp_path / "history.json"
    path.write_text(json.dumps(history))
    with pytest.raises(ReportError) as info:
        load_history(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_load_history_of_a_missing_file(tmp_path):
    with pytest.raises(ReportError, match="no such file"):
        load_history(tmp_path / "nope.json")


def test_importing_kaio_report_does_not_import_matplotlib():
    code = "import sys, kaio.report; print('matplotlib' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_running_session_counts_its_steps_time_and_shows_in_the_sessions_table():
    history = make_history(10, status="RUNNING")
    history["sessions"][0].update(status="RUNNING", ended_at=None, duration_s=None, exit_code=None)
    summary = summarize(history)
    assert summary["training_time_s"] == pytest.approx(4.5)  # t_mono of step 10 minus step 1's, 0.5 s apart
    md = render_markdown(history, summary)
    assert "**Status:** 🔄 RUNNING" in md
    assert "| 1 | run |" in md.split("## Sessions")[1]


def test_a_plotting_failure_still_leaves_history_and_report(tmp_path, monkeypatch):
    def broken_renderer(history, path, tally=None):
        raise RuntimeError("no usable font")

    monkeypatch.setattr("kaio.report.render_telemetry_png", broken_renderer)
    summary = write_reports(make_history(5), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "report.md"]
    assert "telemetry.png was not rendered: RuntimeError: no usable font" in summary["warnings"]
    assert "telemetry.png was not rendered: RuntimeError: no usable font" in (tmp_path / "report.md").read_text()

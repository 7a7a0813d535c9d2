"""kaio.report: report.md sections, the telemetry figure, writing history.json and reading it back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from conftest import history_of, replay
from kaio.devices.base import DeviceInfo
from kaio.errors import ReportError
from kaio.record.index import RunIndex
from kaio.record.rules import LossSmoother
from kaio.record.types import (
    CheckpointSaved,
    DeviceSummary,
    EvalEntry,
    FinalModel,
    GpuStepStats,
    HistoryHeader,
    HostInfo,
    HostStepStats,
    HubOutcome,
    RunDescription,
    Session,
    SessionKind,
    Status,
    StepEntry,
    Telemetry,
    job_gpu_key,
)
from kaio.report.figure_data import BUCKETS, figure_data
from kaio.report.history import history_document, history_from_file, write_reports
from kaio.report.markdown import render_markdown
from kaio.report.plot import (
    HOST_PANEL_TITLES,
    NO_GPU_TEXT,
    PANEL_TITLES,
    build_figure,
    render_telemetry_png,
)
from kaio.report.summary import summarize
from kaio.telemetry.protocol import Environment, ModelInfo, PeftInfo, TrainingArgs
from kaio.units import GIB, MIB

HF_SECRET = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
V1_HISTORY = Path(__file__).parent / "fixtures" / "v1-project" / "history.json"


# --- synthetic runs -------------------------------------------------------------


def gpu(power=250.0, util=97.0, temp=61.0, vram_used=10 * GIB, **extra) -> GpuStepStats:
    return GpuStepStats(
        power_avg=power,
        power_min=None if power is None else power - 10,
        power_max=None if power is None else power + 10,
        util_avg=util,
        temp_max=None if temp is None else temp - 6,
        temp_junction_max=temp,
        vram_used_max_bytes=vram_used,
        samples=1,
        **extra,
    )


def make_step(n: int, *, session=1, loss=2.0, gpus=None, ranks=None, **extra) -> StepEntry:
    ranks = ranks or {}
    peaks = [v for v in ranks.values() if v is not None]
    fields = {
        "step": n,
        "session": session,
        "epoch": n / 100,
        "timestamp": f"2026-11-27T10:00:{n % 60:02d}+00:00",
        "t_mono": 1000.0 + 0.5 * n,
        "step_time_s": 0.5,
        "duration_s": 0.5,
        "loss": loss,
        "learning_rate": 1e-3 * (1 - n / 1000),
        "grad_norm": 1.0,
        "samples_seen": 8 * n,
        "tokens_seen": 1024 * n,
        "peak_vram_bytes": ranks,
        "vram_peak_bytes": max(peaks) if peaks else None,
        "gpus": gpus or {},
    }
    fields.update(extra)
    return StepEntry(**fields)


def smooth(steps: list[StepEntry]) -> list[StepEntry]:
    """The smoothed loss as the assembler fills it in."""
    smoother = LossSmoother()
    for entry in steps:
        if entry.loss is not None:
            entry.loss_smoothed, entry.loss_diverged = smoother.add(entry.loss)
    return steps


def device(i: int, energy_j=90_000.0) -> DeviceSummary:
    info = DeviceInfo(backend="nvml", index=i, name="NVIDIA H100", uuid=f"GPU-{i}", vram_total_bytes=80 * GIB)
    return DeviceSummary(key=info.key, info=info, energy_j=energy_j, energy_method="counter")


def run_description(n_gpus: int, max_steps: int) -> RunDescription:
    return RunDescription(
        world_size=max(n_gpus, 1),
        distributed_type="MULTI_GPU" if n_gpus > 1 else "NO",
        device="cuda:0",
        max_steps=max_steps,
        precision="bf16",
        effective_batch_size=16 * max(n_gpus, 1),
        model=ModelInfo(
            name_or_path="kaio/tiny-llama",
            model_class="PeftModelForCausalLM",
            architecture="LlamaForCausalLM",
            dtype="bfloat16",
            trainable_params=1_048_576,
            total_params=134_217_728,
        ),
        peft=PeftInfo(peft_type="LORA", r=16, alpha=32.0, dropout=0.05, target_modules=["q_proj", "v_proj"]),
        args=TrainingArgs(
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            learning_rate=0.003,
            lr_scheduler_type="cosine",
            optim="adamw_torch",
            seed=7,
            bf16=True,
            max_steps=max_steps,
            logging_strategy="steps",
            logging_steps=1,
            save_strategy="steps",
            save_steps=100,
            eval_strategy="no",
        ),
        tokenizer="kaio/tiny-llama",
        train_samples=640,
        eval_samples=64,
    )


def make_run(n_steps=20, n_gpus=1, session_lengths=None, *, steps=None, evals=(), **overrides):
    """A coherent run as (header, index): ``n_gpus`` 0 is a CPU-only host; ``session_lengths`` splits the steps.

    Step k has loss 4 / (1 + 0.1 k), 8 k samples, 1024 k tokens, 0.5 s; GPU i draws 200 + 2 k + 10 i W at
    90 + i % and 60 + i + k % 5 °C junction, with 10 GiB used on the device; rank i's true peak is
    8 GiB + k MiB - 100 MiB x i.
    """
    session_lengths = session_lengths or [n_steps]
    keys = [f"nvml:{i}" for i in range(n_gpus)]
    made, sessions, k = [], [], 0
    for number, length in enumerate(session_lengths, start=1):
        start = k
        for _ in range(length):
            k += 1
            gpus = {
                key: gpu(power=200.0 + 2 * k + 10 * i, util=90.0 + i, temp=60.0 + i + k % 5)
                for i, key in enumerate(keys)
            }
            ranks = {str(i): 8 * GIB + k * MIB - 100 * MIB * i for i in range(n_gpus)}
            made.append(make_step(k, session=number, loss=4.0 / (1 + 0.1 * k), gpus=gpus, ranks=ranks))
        sessions.append(
            Session(
                session=number,
                kind=SessionKind.RUN if number == 1 else SessionKind.RESUME,
                started_at=f"2026-11-27T1{number}:00:00+00:00",
                ended_at=f"2026-11-27T1{number}:10:00+00:00",
                duration_s=0.5 * length + 5.0,
                status=Status.COMPLETED,
                exit_code=0,
                start_step=start,
                end_step=k,
            )
        )
    fields = {
        "project": "tiny-default",
        "generated_at": "2026-11-27T10:00:00+00:00",
        "status": Status.COMPLETED,
        "config": {
            "project_name": "tiny-default",
            "model": {"base_model": "kaio/tiny-llama"},
            "training": {"learning_rate": 0.003},
            "launch": {"num_processes": max(n_gpus, 1), "script": None},
            "reporting": {"poll_hz": 2.0},
            "hub": {"push": False},
        },
        "run": run_description(n_gpus, k),
        "sessions": sessions,
        "devices": [device(i) for i in range(n_gpus)],
        "host": HostInfo(cpu_count=2, ram_total_bytes=24 * GIB),
        "telemetry": Telemetry(events=3 * k, samples=2 * k, poll_hz=2.0),
    }
    fields.update(overrides)
    header = HistoryHeader(**fields)
    index = RunIndex.in_memory()
    for entry in smooth(made if steps is None else steps):
        index.add_step(entry)
    for evaluation in evals:
        index.add_eval(evaluation)
    return header, index


def report_of(header: HistoryHeader, index: RunIndex) -> str:
    return render_markdown(header, summarize(header, index), index.evals())


def cpu_only_run(n_steps=12):
    steps = [
        make_step(
            k, loss=4.0 / (1 + 0.1 * k), host=HostStepStats(cpu_pct=50.0 + k % 2 * 20, ram_used_bytes=4 * GIB + k * MIB)
        )
        for k in range(1, n_steps + 1)
    ]
    return make_run(n_steps, n_gpus=0, steps=steps)


def section(md: str, title: str) -> str:
    return md.split(f"## {title}\n")[1].split("\n## ")[0]


def labels(ax) -> list[str]:
    """The labelled lines of a panel (a session boundary is an unlabelled line)."""
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def no_data_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if "not reported" in t.get_text() or "no " in t.get_text()]


# --- report.md --------------------------------------------------------------------


def test_completed_single_session_report_has_its_sections_units_and_numbers():
    md = report_of(*make_run(20))
    for heading in (
        "# Training report: tiny-default",
        "## Executive summary",
        "## Key metrics",
        "## Telemetry",
        "## What was trained",
        "## kaio configuration",
    ):
        assert heading in md
    for absent in (
        "## Sessions",
        "## Warnings",
        "## Hugging Face deployment",
        "## Notes",
        "## Evaluation",
        "## Environment",
        "Latest checkpoint",
        "not measured",
        "Evaluation loss, best",
    ):
        assert absent not in md
    assert "**Status:** ✅ COMPLETED" in md
    assert "**Duration:** 15 s" in md  # 20 x 0.5 s + 5 s
    assert "**Optimizer steps:** 20 of 20 planned" in md
    assert "| Gradient checkpointing |" not in md  # shown only when on
    header, index = make_run(20)
    assert header.run is not None
    header.run.args.gradient_checkpointing = header.run.args.torch_compile = True
    md = report_of(header, index)
    assert "| Gradient checkpointing | on |" in md and "| torch.compile | on |" in md
    header, index = make_run(12, run=run_description(1, 200))
    header.sessions[-1].training_ended = True  # an EarlyStoppingCallback's run
    assert "**Optimizer steps:** 12 of 200 planned (the Trainer ended the training early: " in report_of(header, index)
    header.sessions[-1].training_ended = False  # os._exit(0) at step 12
    assert "12 of 200 planned (the training process exited with code 0 before its Trainer ended" in report_of(
        header, index
    )
    assert "**Trainable params:** 1,048,576 of 134,217,728 (0.781 %)" in md
    assert "![telemetry](telemetry.png)" in md
    metrics = section(md, "Key metrics")
    for row in (
        "| Loss (initial → final) | 3.636 → 1.333 |",  # 4 / 1.1 and 4 / 3
        "| Loss, minimum | 1.333 at step 20 |",
        "| True peak VRAM (allocator, max over ranks) | 8.0 GiB |",  # 8 GiB + 20 MiB
        "| True peak VRAM, average over steps | 8.0 GiB |",
        # 10 GiB - (8 GiB + 20 MiB) = 2028 MiB: binary units
        (
            "| Device VRAM used, peak (driver) | 10.0 GiB (2.0 GiB above the true peak: CUDA context, allocator cache, "
            "other processes) |"
        ),
        "| Power per GPU (average / peak) | 221 / 250 W |",  # 200 + 2 x mean(1..20); 240 + 10
        "| Energy | 25 Wh, hardware counter |",  # 90 kJ
        "| Energy per 1k samples | 156 Wh |",  # 25 Wh over 160 samples
        "| Samples processed | 160 |",
        "| Throughput (optimizer steps after each session's first) | 16 samples/s · 2,048 tokens/s |",  # over 20 x 0.5 s
        "| GPU utilisation (average) | 90 % |",
        "| Temperature (average / peak) | 62 / 64 °C |",
    ):
        assert row in metrics
    assert "| Power, all" not in metrics  # one GPU: no total row
    assert "Host CPU" not in metrics  # no host numbers recorded
    assert "history schema 2 · 40 telemetry samples at 2 Hz · 60 training events" in md


def test_what_was_trained_comes_from_the_run_description():
    trained = section(report_of(*make_run(20)), "What was trained")
    for row in (
        "| Model | kaio/tiny-llama |",
        "| Architecture | LlamaForCausalLM |",
        "| Weights dtype | bfloat16 |",
        "| Precision (training) | bf16 |",
        "| PEFT | LORA r=16 alpha=32 dropout=0.05 on q_proj, v_proj |",
        "| Tokenizer | kaio/tiny-llama |",
        "| Training / evaluation examples | 640 / 64 |",
        "| Per-device batch size | 8 |",
        "| Gradient accumulation steps | 2 |",
        "| World size (processes) | 1 |",
        "| Effective batch size | 16 |",
        "| Max steps | 20 |",
        "| Learning rate | 0.003 |",
        "| LR scheduler | cosine |",
        "| Optimizer | adamw_torch |",
        "| Seed | 7 |",
        "| Logging / evaluation / saving | log: steps every 1 · eval: no · save: steps every 100 |",
    ):
        assert row in trained


def test_a_run_measured_in_epochs_shows_them_beside_the_steps_they_came_to():
    header, index = make_run(20)
    header.run.args.max_steps, header.run.args.num_train_epochs = -1, 2.0  # the script set epochs, not steps
    trained = section(report_of(header, index), "What was trained")
    assert "| Max steps | 20 |" in trained and "| Epochs | 2 |" in trained
    assert "| Epochs |" not in section(report_of(*make_run(20)), "What was trained")  # max_steps set: no row


def test_what_was_trained_without_a_trainer_says_so():
    md = report_of(*make_run(5, run=None))
    assert "No transformers `Trainer` started" in section(md, "What was trained")
    assert "**Trainable params:** not reported" in md
    assert "**Optimizer steps:** 5" in md and "planned" not in md


def test_full_fine_tune_and_multi_gpu_rows():
    header, index = make_run(20, n_gpus=2)
    header.run.peft = None
    header.run.model.trainable_params = header.run.model.total_params
    md = report_of(header, index)
    assert "| PEFT | none: every parameter trained |" in md
    assert "| World size (processes) | 2 |" in md and "| Distributed | MULTI_GPU |" in md
    # Per-GPU average over both GPUs (221 and 231 W), their sum, the energy of both counters (180 kJ).
    assert "| Power per GPU (average / peak) | 226 / 260 W |" in md
    assert "| Power, all 2 GPUs (average) | 452 W |" in md
    # A GPU that reads no power is not in the sum, and the row says so (a tester's 5 GPUs summed to 4's power).
    steps = [make_step(k, gpus={"nvml:0": gpu(power=300.0), "nvml:1": gpu(power=None)}) for k in range(1, 6)]
    header, index = make_run(5, n_gpus=2, steps=steps)
    assert "| Power, the 1 of 2 GPUs that read it (average) | 300 W |" in report_of(header, index)
    assert "| Energy | 50 Wh, hardware counter |" in md
    # Rank 0 peaks at 8 GiB + 20 MiB, rank 1 100 MiB lower.
    assert "| True peak VRAM (allocator, max over ranks) | 8.0 GiB (rank 0: 8.0 GiB, rank 1: 7.9 GiB) |" in md


def test_kaio_configuration_shows_the_built_in_recipe_only_when_it_ran():
    header, index = make_run(5)
    config = section(report_of(header, index), "kaio configuration")
    assert '"base_model": "kaio/tiny-llama"' in config and '"num_processes": 1' in config
    header.config = {**header.config, "launch": {"script": "train.py", "num_processes": 1}}
    config = section(report_of(header, index), "kaio configuration")
    assert '"script": "train.py"' in config and '"poll_hz": 2.0' in config
    assert "base_model" not in config and '"training"' not in config  # a script never saw those
    header.config = None
    assert "## kaio configuration" not in report_of(header, index)


def test_environment_section():
    header, index = make_run(5)
    header.run.environment = Environment(
        python="3.11.9", torch="2.5.1", transformers="4.46.0", gpus=["H100", "H100"], argv=["train.py", "--lr", "1e-4"]
    )
    env = section(report_of(header, index), "Environment")
    assert "| python | 3.11.9 |" in env and "| torch | 2.5.1 |" in env
    assert "| gpus | H100, H100 |" in env and "| command | train.py --lr 1e-4 |" in env
    assert "cuda" not in env  # not reported: not listed


def test_failed_multi_session_report_shows_root_cause_sessions_notes_and_warnings():
    steps = [make_step(k, session=1 if k <= 5 else 2, loss=4.0 / (1 + 0.1 * k)) for k in range(1, 9)]
    steps[6].loss, steps[6].loss_nonfinite = None, "nan"
    header, index = make_run(
        session_lengths=[5, 3],
        steps=steps,
        status=Status.FAILED,
        checkpoints=[CheckpointSaved(step=4, path="checkpoints/tiny-default/checkpoint-4", session=1)],
        telemetry=Telemetry(notes=["resumed from checkpoint-4"]),
    )
    header.sessions[1].status, header.sessions[1].exit_code = Status.FAILED, 1
    header.sessions[1].error = "torch.OutOfMemoryError: CUDA out of memory | tried 2 GiB"
    md = report_of(header, index)
    assert "- **Latest checkpoint:** step 4 (`checkpoints/tiny-default/checkpoint-4`)" in md
    assert "## Notes\n\n- resumed from checkpoint-4" in md
    assert "**Status:** ❌ FAILED (exit code 1): `torch.OutOfMemoryError: CUDA out of memory | tried 2 GiB`" in md
    assert "**Duration:** 14 s over 2 sessions" in md  # 7.5 s + 6.5 s
    sessions = section(md, "Sessions")
    assert "| # | Kind | Started | Duration | Steps | Status | Exit | Error |" in sessions
    assert "| 1 | run | 2026-11-27T11:00:00+00:00 | 8 s | 0 → 5 | COMPLETED | 0 |  |" in sessions
    assert (
        "| 2 | resume | 2026-11-27T12:00:00+00:00 | 6 s | 5 → 8 | FAILED | 1 | "
        "torch.OutOfMemoryError: CUDA out of memory \\| tried 2 GiB |"
    ) in sessions  # the pipe cannot split the row
    assert "- ⚠️ loss was NaN at 1 logged step (first at step 7)" in section(md, "Warnings")
    assert "| Loss (initial → final) | 3.636 → 2.222 |" in md  # step 8's loss was finite again


def test_a_run_that_ended_on_nan_losses_does_not_pass_its_last_finite_loss_for_its_final_one():
    steps = [make_step(k, loss=4.0 / (1 + 0.1 * k)) for k in range(1, 11)]
    for entry in steps[6:]:
        entry.loss, entry.loss_nonfinite = None, "nan"
    md = report_of(*make_run(steps=steps))
    assert "| Loss (initial → final) | 3.636 → 2.5 (at step 6: the 4 losses logged after it were NaN/inf) |" in md


def test_interrupted_single_session_gets_a_sessions_table():
    header, index = make_run(5, status=Status.INTERRUPTED)
    header.sessions[0].status, header.sessions[0].exit_code, header.sessions[0].signal = (
        Status.INTERRUPTED,
        None,
        "SIGINT",
    )
    md = report_of(header, index)
    assert "**Status:** ⏹️ INTERRUPTED (signal SIGINT)" in md
    assert "| 1 | run | 2026-11-27T11:00:00+00:00 | 8 s | 0 → 5 | INTERRUPTED | signal SIGINT |  |" in section(
        md, "Sessions"
    )


def test_running_session_counts_its_steps_time_and_shows_in_the_sessions_table():
    header, index = make_run(10, status=Status.RUNNING)
    header.sessions[0].status, header.sessions[0].ended_at, header.sessions[0].duration_s = Status.RUNNING, None, None
    header.sessions[0].exit_code = None
    summary = summarize(header, index)
    assert summary.training_time_s == pytest.approx(4.5)  # t_mono of step 10 minus step 1's, 0.5 s apart
    md = render_markdown(header, summary, [])
    assert "**Status:** 🔄 RUNNING (report written while the run goes on)" in md
    assert "**Duration:** 4 s" in md
    assert "| 1 | run |" in section(md, "Sessions")


def test_hub_section_links_the_commit_or_says_why_the_push_failed():
    sha = "91dbf5834c14434dc9f9b4c8c2fa242d35ab66eb"
    header, index = make_run(5, hub=HubOutcome(repo_id="me/tiny", commit_sha=sha))
    hub = section(report_of(header, index), "Hugging Face deployment")
    assert "- **Repo:** [me/tiny](https://huggingface.co/me/tiny)" in hub
    assert f"- **Commit:** `{sha}`" in hub
    assert f"[adapter_config.json](https://huggingface.co/me/tiny/blob/{sha}/adapter_config.json)" in hub

    private = "http://127.0.0.1:8080/me/tiny"  # HF_ENDPOINT: the push recorded its own URLs
    header.hub = HubOutcome(repo_id="me/tiny", commit_sha=sha, url=private, adapter_config_url=f"{private}/blob/x")
    hub = section(report_of(header, index), "Hugging Face deployment")
    assert f"[me/tiny]({private})" in hub and f"[adapter_config.json]({private}/blob/x)" in hub

    header.hub = HubOutcome(repo_id="me/tiny", error="push failed: 401 Unauthorized")
    md = report_of(header, index)
    assert "## Hugging Face deployment\n\n- push failed: 401 Unauthorized" in md and "adapter_config.json" not in md


def test_secrets_in_config_errors_and_argv_never_reach_the_report():
    comet_key = "Zq8Rk2Lm5Np7Tv9Xw1Yb3Dc6Ef"
    header, index = make_run(
        5, status=Status.FAILED, hub=HubOutcome(repo_id="me/tiny", error=f"401: token {HF_SECRET} rejected")
    )
    header.config.update(
        hub={"repo_id": "me/tiny", "token": HF_SECRET},
        reporting={
            "comet": {"api_key": comet_key, "project": "kaio"},
            "sinks": [{"client_secret": "s3cr3t-value-123", "name": "x"}],
        },
    )
    header.sessions[0].error = f"HTTPError: 401 for token {HF_SECRET}"
    header.run.environment = Environment(argv=["train.py", "--push_to_hub", f"--note={HF_SECRET}"])
    md = report_of(header, index)
    for secret in (HF_SECRET, comet_key, "s3cr3t-value-123"):
        assert secret not in md
    config = section(md, "kaio configuration")
    assert '"token": "‹redacted›"' in config and '"api_key": "‹redacted›"' in config
    assert '"client_secret": "‹redacted›"' in config  # inside a list too
    assert '"project": "kaio"' in config and '"repo_id": "me/tiny"' in config  # the rest is still there
    assert "- push failed: 401: token ‹redacted› rejected" in md  # HF-token shapes are scrubbed anywhere
    assert "| command | train.py --push_to_hub --note=‹redacted› |" in md


def test_cpu_only_report_says_not_measured_instead_of_zero():
    header, index = cpu_only_run()
    summary = summarize(header, index)
    assert summary.cpu_only and summary.power_avg_w is None and summary.energy_kwh is None
    metrics = section(render_markdown(header, summary, []), "Key metrics")
    for row in (
        "True peak VRAM (allocator, max over ranks)",
        "True peak VRAM, average over steps",
        "Device VRAM used, peak (driver)",
        "Power per GPU (average / peak)",
        "Energy",
        "Energy per 1k samples",
        "GPU utilisation (average)",
        "Temperature (average / peak)",
    ):
        assert f"| {row} | not measured (no GPU) |" in metrics
    assert " 0 W" not in metrics and "0.000 kWh" not in metrics and "0 Wh" not in metrics
    # What a CPU-only run does have: cpu 50 % and 70 % alternating; RAM up to 4 GiB + 12 MiB.
    assert "| Host CPU (average) / RAM used (peak), whole host | 60 % / 4.0 GiB |" in metrics
    assert "| Throughput (optimizer steps after each session's first) | 16 samples/s · 2,048 tokens/s |" in metrics


def test_a_gpu_run_missing_one_reading_says_not_measured_without_blaming_the_host():
    steps = [make_step(k, gpus={"nvml:0": gpu(temp=None)}) for k in range(1, 6)]
    metrics = section(report_of(*make_run(5, steps=steps)), "Key metrics")
    assert "| Temperature (average / peak) | not measured |" in metrics
    assert "(no GPU)" not in metrics
    assert "| GPU utilisation (average) | 97 % |" in metrics


def test_no_finite_loss_and_no_steps_are_told_apart():
    steps = [make_step(k, loss=None, loss_nonfinite="nan") for k in range(1, 4)]
    metrics = section(report_of(*make_run(3, steps=steps)), "Key metrics")
    assert "| Loss (initial → final) | no finite loss logged (see the warnings) |" in metrics
    steps = [make_step(k, loss=None) for k in range(1, 4)]
    assert "| Loss, minimum | not logged |" in report_of(*make_run(3, steps=steps))
    assert "| Loss, minimum | no training step recorded |" in report_of(*make_run(3, steps=[]))


# --- evaluations ----------------------------------------------------------------------


def test_an_evaluation_after_load_best_model_at_end_names_the_weights_it_evaluated():
    """run_glue's "20 (after training)" row showed checkpoint-10's loss beside a better row of step 20, with no
    word of why in the table (only the executive summary's Final model line)."""
    evals = [
        EvalEntry(step=5, session=1, metrics={"eval_loss": 0.5}, after_training=True),  # an earlier training's end
        EvalEntry(step=10, session=1, metrics={"eval_loss": 0.25}),
        EvalEntry(step=20, session=1, metrics={"eval_loss": 0.07}),
        EvalEntry(step=20, session=1, metrics={"eval_loss": 0.25}, after_training=True, weights="checkpoint-10"),
    ]
    header, index = make_run(20, evals=evals)
    header.final_model = FinalModel(
        best_checkpoint="out/checkpoint-10", metric="eval_accuracy", loaded="out/checkpoint-10"
    )
    evaluation = section(render_markdown(header, summarize(header, index), index.evals()), "Evaluation")
    assert "| 20 (after training, checkpoint-10's weights) | 0.25 |" in evaluation
    assert "| 20 | 0.07 |" in evaluation
    assert "| 5 (after training) | 0.5 |" in evaluation  # not the later training's best weights


def test_each_sessions_evaluation_after_training_keeps_the_weights_it_evaluated():
    """run_summarization extended by `kaio resume`: session 1's after-training rows lost their "checkpoint-20's
    weights" once session 2 ended with another best (the final model is the latest training's only)."""
    from conftest import replay

    def session(n: int, last: int, best: str, loss: float) -> list[dict]:
        return [
            {"type": "session_start", "session": n},
            {"type": "run_start", "rank": 0, "session": n, "start_step": last - 10},
            {"type": "step", "rank": 0, "session": n, "step": last, "t_mono": float(last), "step_time_s": 1.0},
            {"type": "train_end", "rank": 0, "session": n, "step": last, "best_loaded": f"out/{best}"},
            {"type": "eval", "rank": 0, "session": n, "step": last, "metrics": {"eval_loss": loss}},
            {"type": "session_end", "session": n, "status": "COMPLETED", "exit_code": 0},
        ]

    state = replay([*session(1, 20, "checkpoint-10", 0.5), *session(2, 30, "checkpoint-30", 0.25)])
    with state.with_open_steps() as index:
        header = state.header()
        evaluation = section(render_markdown(header, summarize(header, index), index.evals()), "Evaluation")
    assert "| 20 (after training, checkpoint-10's weights) | 0.5 |" in evaluation
    assert "| 30 (after training, checkpoint-30's weights) | 0.25 |" in evaluation


def test_evaluation_table_names_the_best_loss_and_its_step():
    evals = [
        EvalEntry(step=5, session=1, metrics={"eval_loss": 2.0, "eval_accuracy": 0.5}),
        EvalEntry(step=10, session=1, metrics={"eval_loss": 1.2, "eval_accuracy": 0.75}),
        EvalEntry(
            step=15, session=1, metrics={"eval_loss": 1.4, "eval_accuracy": None}, nonfinite={"eval_accuracy": "nan"}
        ),
        EvalEntry(step=20, session=1, metrics={"eval_loss": 1.3, "eval_runtime": 3.25}),
        EvalEntry(step=20, session=1, metrics={"test_loss": 1.1}, prediction=True, after_training=True),
    ]
    header, index = make_run(20, evals=evals)
    summary = summarize(header, index)
    assert (summary.eval_count, summary.eval_loss_best, summary.eval_loss_best_step, summary.eval_loss_final) == (
        5,
        1.2,
        10,
        1.3,
    )
    md = render_markdown(header, summary, index.evals())
    assert "| Evaluation loss, best | 1.2 at step 10 |" in section(md, "Key metrics")
    evaluation = section(md, "Evaluation")
    # predict()'s test-set loss is listed in the table, but neither the best evaluation loss nor an evaluation.
    assert evaluation.startswith("\nBest evaluation loss **1.2** at step 10 (4 evaluations).")
    assert "| Step | eval_loss | eval_accuracy | eval_runtime |" in evaluation
    assert "| 5 | 2 | 0.5 | — |" in evaluation
    assert "| 10 | 1.2 | 0.75 | — |" in evaluation
    assert "| 15 | 1.4 | nan | — |" in evaluation  # a NaN metric says so
    assert "| 20 | 1.3 | — | 3.25 |" in evaluation
    assert md.index("## Key metrics") < md.index("## Evaluation") < md.index("## Telemetry")


def test_several_eval_datasets_each_have_their_best_loss_and_their_points():
    """eval_dataset={"val": ..., "test": ...}: the Trainer evaluates each on its own (eval_val_loss, then
    eval_test_loss, at each eval step). Each set's best is its own, never the minimum of both."""
    from kaio.report.figure_data import figure_data

    losses = {5: (2.0, 1.0), 10: (1.5, 1.1), 15: (1.7, 0.9)}
    evals = [
        EvalEntry(step=step, session=1, metrics={f"eval_{name}_loss": loss, f"eval_{name}_runtime": 0.1})
        for step, pair in losses.items()
        for name, loss in zip(("val", "test"), pair)
    ]
    header, index = make_run(15, evals=evals)
    summary = summarize(header, index)
    assert [(e.name, e.best, e.best_step, e.final) for e in summary.eval_sets] == [
        ("val", 1.5, 10, 1.7),
        ("test", 0.9, 15, 0.9),
    ]
    assert (summary.eval_loss_best, summary.eval_loss_best_step, summary.eval_loss_final) == (1.5, 10, 1.7)  # val's
    md = render_markdown(header, summary, index.evals())
    assert "| Evaluation loss, best | 1.5 (val) at step 10; 0.9 (test) at step 15 |" in section(md, "Key metrics")
    assert "Best evaluation loss **1.5** (val) at step 10; **0.9** (test) at step 15 (3 evaluations)." in md  # of both
    evaluation = section(md, "Evaluation")  # one row a step for both sets, not one each with half the cells empty
    assert "| Step | eval_val_loss | eval_val_runtime | eval_test_loss | eval_test_runtime |" in evaluation
    assert "| 10 | 1.5 | 0.1 | 1.1 | 0.1 |" in evaluation and "—" not in evaluation
    lines = figure_data(header, index).eval_losses
    assert {name: (line.x, line.y) for name, line in lines.items()} == {
        "val": ([5, 10, 15], [2.0, 1.5, 1.7]),
        "test": ([5, 10, 15], [1.0, 1.1, 0.9]),
    }
    state = replay([{"type": "eval", "rank": 0, "session": 1, "step": e.step, "metrics": e.metrics} for e in evals])
    assert state.parts.live.eval_loss == 1.7  # the dashboard shows one set's latest (the first's), not each in turn


def test_evaluation_table_lists_the_latest_twenty_but_always_names_the_best():
    evals = [
        EvalEntry(step=10 * i, session=1, metrics={"eval_loss": 0.5 if i == 2 else 3.0 - 0.01 * i})
        for i in range(1, 26)
    ]
    evaluation = section(report_of(*make_run(250, evals=evals)), "Evaluation")
    assert "Best evaluation loss **0.5** at step 20 (25 evaluations)." in evaluation
    assert "The latest 20 of 25 evaluations (all are in history.json):" in evaluation
    rows = [line for line in evaluation.splitlines() if line.startswith("| ") and not line.startswith("| Step")]
    assert [int(r.split("|")[1]) for r in rows] == [10 * i for i in range(6, 26)]


# --- telemetry.png ------------------------------------------------------------------


def test_figure_has_six_titled_panels_all_with_data():
    fig = build_figure(figure_data(*make_run(30, n_gpus=2, session_lengths=[18, 12])))
    *axes, bar = fig.get_axes()
    assert [ax.get_title() for ax in axes] == list(PANEL_TITLES)
    # Under the panels, where the wall time went: one bar, the optimizer steps' share (goodput) named.
    assert bar.get_title().startswith("Where the time went: goodput ")
    shares = [text.get_text() for text in bar.get_legend().get_texts()]
    assert shares[0].startswith("optimizer steps ")
    assert sum(int(text.rsplit(" ", 1)[1].rstrip("%")) for text in shares) in (99, 100, 101)  # rounded shares
    assert all(not no_data_texts(ax) for ax in axes)
    assert fig._suptitle.get_text() == "tiny-default: COMPLETED, 30 steps"
    loss_ax = axes[0]
    assert labels(loss_ax) == ["raw", "smoothed (EMA)"]
    assert loss_ax.get_lines()[1].get_color() == "tab:orange"
    assert list(loss_ax.get_lines()[0].get_xdata()) == list(range(1, 31))  # 30 steps: drawn step by step
    assert labels(axes[2]) == ["true peak, allocator (max of 2 ranks)", "device used, driver (max of 2 GPUs)"]
    assert max(axes[2].get_lines()[1].get_ydata()) == 10.0  # GiB
    assert labels(axes[3]) == ["nvml:0", "nvml:1"]  # one line per GPU
    assert len(axes[4].collections) == 2  # a min/max band per GPU
    assert [t.get_text().strip() for t in axes[5].texts] == ["session 2"]


def test_labels_of_sessions_begun_a_few_steps_apart_are_not_printed_over_each_other():
    # Resumes 2 and 3 steps apart in a run of 200 steps: four labels within a few pixels.
    fig = build_figure(figure_data(*make_run(200, session_lengths=[150, 2, 3, 3, 42])))
    fig.canvas.draw()
    texts = [t for t in fig.get_axes()[0].texts if t.get_text().strip().startswith("session")]
    assert [t.get_text().strip() for t in texts] == ["session 2", "session 3", "session 4", "session 5"]
    boxes = [t.get_window_extent() for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_cpu_only_figure_shows_host_ram_and_cpu_instead_of_empty_gpu_panels():
    fig = build_figure(figure_data(*cpu_only_run()))
    axes = fig.get_axes()[:6]  # the panels; the time bar under them
    assert [ax.get_title() for ax in axes] == [*PANEL_TITLES[:2], *HOST_PANEL_TITLES, *PANEL_TITLES[4:]]
    assert fig._suptitle.get_text().endswith(" · CPU-only run, no GPU")
    ram = axes[2].get_lines()
    assert [line.get_label() for line in ram] == ["RAM used, whole host", "RAM total"]
    assert max(ram[0].get_ydata()) == pytest.approx(4 + 12 / 1024)  # GiB
    assert list(ram[1].get_ydata()) == [24.0, 24.0]  # the host's total, a horizontal line
    assert list(axes[3].get_lines()[0].get_ydata())[:2] == [70.0, 50.0]  # step 1 odd: 70 %, step 2: 50 %
    for ax in axes[4:]:
        assert no_data_texts(ax) == [NO_GPU_TEXT] and not ax.get_lines()
    assert not no_data_texts(axes[0]) and not no_data_texts(axes[1])


def test_figure_names_what_a_gpu_did_not_report():
    steps = [make_step(k, loss=None, gpus={"nvml:0": gpu(power=None)}) for k in range(1, 11)]
    axes = build_figure(figure_data(*make_run(10, steps=steps))).get_axes()
    assert no_data_texts(axes[0]) == ["no loss logged"]  # none at all (logging_steps beyond the run, say)
    nan = [make_step(k, loss=None, loss_nonfinite="nan") for k in range(1, 11)]
    assert no_data_texts(build_figure(figure_data(*make_run(10, steps=nan))).get_axes()[0]) == ["no finite loss logged"]
    assert labels(axes[2]) == ["device used, driver"]  # no rank reported its allocator peak
    assert no_data_texts(axes[4]) == ["power not reported by the GPU"]
    assert not no_data_texts(axes[3]) and not no_data_texts(axes[5])


def test_nonfinite_losses_are_marked_once_per_bucket_and_counted_in_full():
    steps = [make_step(k, loss=None, loss_nonfinite="nan") if k % 3 == 0 else make_step(k) for k in range(1, 5001)]
    axes = build_figure(figure_data(*make_run(steps=steps))).get_axes()
    marks = [line for line in axes[0].get_lines() if line.get_label().startswith("NaN/inf loss")]
    assert [m.get_label() for m in marks] == ["NaN/inf loss (1,666 steps)"]
    assert 0 < len(marks[0].get_xdata()) <= BUCKETS and marks[0].get_xdata()[0] == 3


def test_a_few_logged_losses_are_drawn_as_points_and_a_lone_one_is_seen():
    """One finite loss before NaNs is a line of one point: without a marker it is not drawn at all."""
    steps = [make_step(5)] + [make_step(k, loss=None, loss_nonfinite="nan") for k in (10, 15, 20)]
    raw = build_figure(figure_data(*make_run(steps=steps))).get_axes()[0].get_lines()[0]
    assert list(raw.get_xdata()) == [5] and raw.get_marker() == "o"
    few = build_figure(figure_data(*make_run(12))).get_axes()[0].get_lines()
    assert [line.get_marker() for line in few[:2]] == ["o", "o"]
    many = build_figure(figure_data(*make_run(100))).get_axes()[0].get_lines()[0]
    assert many.get_marker() in ("None", "", None)  # a line of 100 steps is a line


def test_a_smoothed_loss_of_a_few_logged_losses_is_not_given_as_the_runs_level():
    """Three losses (one a epoch): an EMA of span 5 is mostly the first, far above the last (2.757 against
    1.199 in a user's run): not drawn, and the report says why instead of a number."""
    header, index = make_run(3)
    axes = build_figure(figure_data(header, index)).get_axes()
    assert labels(axes[0]) == ["raw"]  # the raw points alone
    report = render_markdown(header, summarize(header, index), [])
    assert "| Loss, final smoothed (EMA) | too few losses logged to smooth (3): see the final loss |" in report


def test_a_long_run_renders_bounded_lines_that_keep_a_spike(tmp_path):
    n = 12_000  # about 23 steps to a bucket
    steps = [
        make_step(
            k,
            session=1 if k <= n // 2 else 2,
            loss=40.0 if k == 10_432 else 3.0 - k / n,
            gpus={"nvml:0": gpu(power=250.0 + k % 13)},
        )
        for k in range(1, n + 1)
    ]
    header, index = make_run(steps=steps)
    data = figure_data(header, index)
    render_telemetry_png(data, tmp_path / "telemetry.png")
    assert (tmp_path / "telemetry.png").read_bytes()[:8] == PNG_MAGIC
    loss_line = build_figure(data).get_axes()[0].get_lines()[0]
    assert len(loss_line.get_xdata()) <= 2 * BUCKETS and max(loss_line.get_ydata()) == 40.0
    assert summarize(header, index).optimizer_steps == n


def job_of(nodes: int, gpus_per_node: int = 8, n_steps: int = 40):
    """A merged job's record: node r's GPU i (key ``n<r>/nvml:i``, the head's unprefixed) draws 100 r + 10 i + k W
    at 50 + 5 i % and 60 + r + i °C at step k."""
    keys = {(r, i): job_gpu_key(r, f"nvml:{i}") for r in range(nodes) for i in range(gpus_per_node)}
    steps = [
        make_step(
            k,
            gpus={
                key: gpu(power=100.0 * r + 10 * i + k, util=50.0 + 5 * i, temp=60.0 + r + i)
                for (r, i), key in keys.items()
            },
        )
        for k in range(1, n_steps + 1)
    ]
    devices = [msgspec.structs.replace(device(i), key=key) for (_, i), key in keys.items()]
    return make_run(n_steps, steps=steps, devices=devices)


def test_a_job_over_sixteen_gpus_draws_one_line_per_node_with_its_gpus_folded():
    data = figure_data(*job_of(3))
    assert data.per_node and data.gpu_count == 24
    assert [g.key for g in data.gpus] == ["node 0", "node 1", "node 2"]
    node2 = data.gpus[2]
    assert node2.util.y[0] == pytest.approx(sum(50.0 + 5 * i for i in range(8)) / 8)  # the mean of its GPUs
    assert node2.power.y[0] == pytest.approx(sum(200.0 + 10 * i + 1 for i in range(8)))  # their sum, at step 1
    assert node2.power_band.low[0] == pytest.approx(sum(200.0 + 10 * i + 1 - 10 for i in range(8)))
    assert node2.temp.y[0] == 60.0 + 2 + 7  # the hottest of them
    axes = build_figure(data).get_axes()
    assert labels(axes[3]) == ["node 0", "node 1", "node 2"] and "node's mean" in axes[3].get_ylabel()
    assert "per node" in axes[4].get_ylabel()
    assert labels(axes[2])[-1] == "device used, driver (max of 24 GPUs)"


def test_a_panel_of_more_lines_than_a_legend_holds_counts_them_instead():
    axes = build_figure(figure_data(*job_of(20, gpus_per_node=1))).get_axes()  # 20 GPUs, one per node
    assert axes[3].get_legend() is None
    assert "20 nodes, one line each" in [t.get_text() for t in axes[3].texts]
    small = build_figure(figure_data(*make_run(5, n_gpus=8))).get_axes()  # one machine: a line per GPU
    assert len(labels(small[3])) == 8 and small[3].get_legend() is not None


# --- files ----------------------------------------------------------------------------


def test_write_reports_writes_all_three_files_through_the_real_record(tmp_path):
    """Journal records as the supervisor gets them: a NaN loss and an inf gradient norm become null and a tag."""
    records = [
        {
            "type": "session_start",
            "session": 1,
            "t_wall": 1e9,
            "config": {"project_name": "p", "hub": {"token": "***"}},
        },
        {"type": "devices", "devices": [{"backend": "nvml", "index": 0, "name": "GPU"}]},
    ]
    for k in range(1, 6):
        records.append(
            {
                "type": "step",
                "rank": 0,
                "session": 1,
                "step": k,
                "t_mono": float(k),
                "t_wall": 1e9 + k,
                "step_time_s": 1.0,
                "peak_vram_bytes": 1000 * k,
            }
        )
        records.append(
            {
                "type": "log",
                "rank": 0,
                "session": 1,
                "step": k,
                "learning_rate": 0.1,
                "loss": "nan" if k == 4 else 3.0 - 0.1 * k,
                "grad_norm": "inf" if k == 5 else 1.0,
            }
        )
    records.append({"type": "eval", "rank": 0, "session": 1, "step": 5, "metrics": {"eval_loss": 1.25}})
    records.append({"type": "session_end", "session": 1, "status": "COMPLETED", "exit_code": 0, "t_wall": 1e9 + 6})
    state = replay(records)
    out = tmp_path / "reports" / "p"
    with state.with_open_steps() as index:
        summary, _ = write_reports(state.header(), index, out)
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "report.md", "telemetry.png"]
    saved = json.loads((out / "history.json").read_text())
    assert saved["schema_version"] == 2 and list(saved)[-2:] == ["evals", "steps"]
    assert saved["evals"][0]["metrics"] == {"eval_loss": 1.25}
    assert [s["step"] for s in saved["steps"]] == [1, 2, 3, 4, 5]
    assert (saved["steps"][3]["loss"], saved["steps"][3]["loss_nonfinite"]) == (None, "nan")
    assert (saved["steps"][4]["grad_norm"], saved["steps"][4]["grad_norm_nonfinite"]) == (None, "inf")
    assert saved["steps"][2]["vram_peak_bytes"] == 3000 and "vram_gb" not in saved["steps"][2]
    assert (summary.loss_nan_count, summary.loss_nan_first_step) == (1, 4)
    assert (summary.vram_true_peak_bytes, summary.eval_loss_best) == (5000, 1.25)
    assert (out / "telemetry.png").read_bytes()[:8] == PNG_MAGIC
    md = (out / "report.md").read_text()
    assert "loss was NaN at 1 logged step (first at step 4)" in md
    assert "| Evaluation loss, best | 1.25 at step 5 |" in md
    assert "| True peak VRAM (allocator, max over ranks) | 0.00477 MiB |" in md  # 5000 bytes, binary units
    again = history_of(state)  # the document as the state gives it, at another time
    assert again == {**saved, "generated_at": again["generated_at"], "warnings": again["warnings"]}
    # history.json lists every warning report.md does: the run's own, then what only the whole history shows.
    assert saved["warnings"] == [*again["warnings"], "loss was NaN at 1 logged step (first at step 4)"]


def test_history_document_is_one_step_per_line_with_evals_before_steps():
    header, index = make_run(3, evals=[EvalEntry(step=2, session=1, metrics={"eval_loss": 1.0})])
    text = b"".join(history_document(header, index)).decode()
    lines = text.splitlines()
    assert lines[0].startswith('{"schema_version":2,"project":"tiny-default",')
    assert lines[0].endswith(
        ',"evals":[{"step":2,"session":1,"epoch":null,"timestamp":null,'
        '"metrics":{"eval_loss":1.0},"nonfinite":{},"after_training":false,"before_training":false,"prediction":false,"other_model":false,"weights":null}],"steps":['
    )
    assert [json.loads(line.rstrip(","))["step"] for line in lines[1:4]] == [1, 2, 3]
    assert lines[1].endswith(",") and lines[2].endswith(",") and not lines[3].endswith(",")
    assert lines[4] == "]}"
    empty = json.loads(b"".join(history_document(*make_run(3, steps=[]))))
    assert (empty["evals"], empty["steps"]) == ([], [])


def test_write_reports_without_png_leaves_no_png(tmp_path):
    write_reports(*make_run(5), tmp_path, png=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "report.md"]
    write_reports(*make_run(5), tmp_path / "md-only", png=False, history_json=False, extra_warnings=["from the caller"])
    assert sorted(p.name for p in (tmp_path / "md-only").iterdir()) == ["report.md"]
    assert "- ⚠️ from the caller" in (tmp_path / "md-only" / "report.md").read_text()


def test_a_history_read_back_gives_the_same_summary_figure_and_report(tmp_path):
    evals = [
        EvalEntry(step=6, session=1, metrics={"eval_loss": 1.5}),
        EvalEntry(step=10, session=2, metrics={"eval_loss": 1.4}),
    ]
    header, index = make_run(
        10,
        n_gpus=2,
        session_lengths=[6, 4],
        evals=evals,
        checkpoints=[CheckpointSaved(step=6, path="checkpoints/x/checkpoint-6", session=1)],
        hub=HubOutcome(repo_id="me/tiny", commit_sha="abc"),
        warnings=["a warning"],
    )
    summary, _ = write_reports(header, index, tmp_path, png=False)
    read_header, read_index = history_from_file(tmp_path / "history.json")
    assert read_header == header
    assert summarize(read_header, read_index) == summary
    assert figure_data(read_header, read_index) == figure_data(header, index)
    assert report_of(read_header, read_index) == (tmp_path / "report.md").read_text()


def test_history_from_file_reads_a_schema_1_history():
    document = json.loads(V1_HISTORY.read_text())
    header, index = history_from_file(V1_HISTORY)
    assert (header.schema_version, header.project, header.status) == (2, "v1proj", Status.COMPLETED)
    assert [(s.session, s.kind, s.start_step, s.end_step) for s in header.sessions] == [
        (1, SessionKind.RUN, 0, 16),
        (2, SessionKind.RESUME, 16, 24),
    ]
    assert header.devices == [] and header.host == HostInfo(cpu_count=2, ram_total_bytes=25_276_510_208)
    assert header.telemetry.events == 55 and header.telemetry.samples == 84
    assert header.telemetry.notes[-1] == "session 2: config changed for this session: training.max_steps: 16 -> 24"
    summary = summarize(header, index)
    steps = document["steps"]
    losses = [s["loss"] for s in steps if s["loss"] is not None]
    assert (summary.optimizer_steps, summary.step_entries, summary.sessions) == (24, 24, 2)
    assert (summary.loss_initial, summary.loss_final, summary.loss_min) == (losses[0], losses[-1], min(losses))
    assert summary.samples == 96 and summary.tokens == steps[-1]["tokens_seen"]
    assert summary.training_time_s == pytest.approx(10.847 + 10.007)
    assert summary.cpu_only and summary.host_ram_peak_bytes == max(s["host"]["ram_used_bytes"] for s in steps)
    md = render_markdown(header, summary, index.evals())
    assert "**Optimizer steps:** 24" in md and "**Duration:** 21 s over 2 sessions" in md
    assert "| Samples processed | 96 |" in md
    assert "| Power per GPU (average / peak) | not measured (no GPU) |" in md
    assert "history schema 2" in md


def test_history_from_file_carries_what_a_schema_1_run_described():
    header, index = history_from_file(V1_HISTORY)
    assert header.run is not None and header.run.model is not None
    assert (header.run.model.trainable_params, header.run.model.total_params) == (2176, 37088)
    assert (header.run.max_steps, header.run.precision, header.run.effective_batch_size) == (24, "fp32", 4)
    assert [c.step for c in header.checkpoints] == [8, 16, 24]
    md = report_of(header, index)
    assert "**Optimizer steps:** 24 of 24 planned" in md
    assert "**Trainable params:** 2,176 of 37,088 (5.87 %)" in md
    assert "- **Latest checkpoint:** step 24 (`checkpoints/v1proj/checkpoint-24`)" in md
    trained = section(md, "What was trained")
    for row in (
        "| Model | kaio/tiny-llama |",
        "| Architecture | LlamaForCausalLM |",
        "| Precision (training) | fp32 |",
        "| PEFT | LORA r=4 alpha=8 on q_proj, v_proj, lm_head |",
        "| Per-device batch size | 4 |",
        "| Learning rate | 0.005 |",
        "| Optimizer | adamw_torch |",
        "| LR scheduler | cosine |",
    ):
        assert row in trained
    # A resumed Trainer that kept its checkpoint's rate and logging interval: the table says what trained.
    header.run.kept_from_checkpoint = {"learning_rate": (0.005, 0.001), "logging_steps": (1, 5)}
    header.run.args.logging_strategy, header.run.args.logging_steps = "steps", 5
    trained = section(report_of(header, index), "What was trained")
    assert "| Learning rate | 0.005 (the checkpoint's, kept by the resumed Trainer; the arguments': 0.001) |" in trained
    assert "log: steps every 1 (the checkpoint's; the arguments': 5)" in trained


def test_history_from_file_derives_a_schema_1_historys_step_durations_and_smoothed_loss():
    document = json.loads(V1_HISTORY.read_text())
    header, index = history_from_file(V1_HISTORY)
    saved = [json.loads(line) for line in index.step_lines()]
    steps = document["steps"]
    # A step's duration: the gap since the previous step's end in its session; a session's first step its own time.
    assert saved[0]["duration_s"] == steps[0]["step_time_s"]
    assert saved[1]["duration_s"] == pytest.approx(steps[1]["t_mono"] - steps[0]["t_mono"])
    assert saved[16]["session"] == 2 and saved[16]["duration_s"] == steps[16]["step_time_s"]
    smoother = LossSmoother()
    expected = [smoother.add(s["loss"])[0] for s in steps]
    assert [s["loss_smoothed"] for s in saved] == pytest.approx(expected)
    summary = summarize(header, index)
    assert summary.loss_final_smoothed == pytest.approx(expected[-1])
    gaps = [s["duration_s"] for s in saved]
    assert summary.steps_s == pytest.approx(sum(gaps))
    # The pace: each session's steps after its first (in its start-up), over their time.
    sessions = {s["session"]: [t for t in saved if t["session"] == s["session"]] for s in saved}
    after_first = sum(mine[-1]["samples_seen"] - mine[0]["samples_seen"] for mine in sessions.values())
    seconds = sum(gaps) - sum(mine[0]["duration_s"] for mine in sessions.values())
    assert summary.samples_per_s == pytest.approx(after_first / seconds)


def test_history_from_file_marks_raw_nonfinite_numbers_of_a_hand_made_file(tmp_path):
    document = {
        "schema_version": 2,
        "project": "x",
        "sessions": [],
        "steps": [
            {"step": 1, "session": 1, "loss": float("nan")},
            {"step": 2, "session": 1, "loss": float("inf"), "grad_norm": float("inf")},
            {"step": 3, "session": 1, "loss": 1.0},
        ],
    }
    path = tmp_path / "history.json"
    path.write_text(json.dumps(document))  # Python writes NaN and Infinity
    header, index = history_from_file(path)
    summary = summarize(header, index)
    assert (summary.loss_initial, summary.loss_final, summary.loss_logged_steps) == (1.0, 1.0, 1)
    assert (summary.loss_nan_count, summary.loss_nan_first_step) == (1, 1)
    assert (summary.loss_inf_count, summary.loss_inf_first_step) == (1, 2)
    saved = [json.loads(line) for line in index.step_lines()]
    assert (saved[1]["grad_norm"], saved[1]["grad_norm_nonfinite"]) == (None, "inf")


def test_history_from_file_names_a_truncated_file_and_its_line(tmp_path):
    path = tmp_path / "history.json"
    text = json.dumps(json.loads(V1_HISTORY.read_text()), indent=1)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ReportError, match=r"history\.json: truncated or corrupt JSON at line \d+") as info:
        history_from_file(path)
    assert str(info.value).startswith(f"{path}: ") and "kaio report" in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe not text", "corrupt (not UTF-8 text)"),
        (b"[1, 2]", "expected a JSON object, found list"),
        (
            b'{"schema_version": 3, "project": "x", "sessions": [], "steps": []}',
            "schema_version 3 is not supported (this kaio reads 1 and 2)",
        ),
        (b'{"schema_version": 2, "project": "x", "sessions": []}', "missing key 'steps'; not a kaio history.json"),
        (
            b'{"schema_version": 2, "project": "x", "sessions": [], "steps": [{"step": 1, "session": 1}, {"loss": 1.0}]}',
            "missing required field `step` - at `$[1]`",
        ),
        (b'{"schema_version": 2, "project": "x", "sessions": {}, "steps": []}', "Expected `array`, got `object`"),
        (
            b'{"schema_version": 1, "project": "x", "sessions": [{"session": "one"}], "steps": []}',
            "Expected `int`, got `str`",
        ),
    ],
)
def test_history_from_file_rejects_what_it_cannot_read_naming_the_file(tmp_path, content, message):
    path = tmp_path / "history.json"
    path.write_bytes(content)
    with pytest.raises(ReportError) as info:
        history_from_file(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "kaio report" in str(info.value)


def test_history_from_file_of_a_missing_file(tmp_path):
    with pytest.raises(ReportError, match=r"nope\.json: no such file"):
        history_from_file(tmp_path / "nope.json")


def test_writing_the_record_does_not_import_matplotlib_and_drawing_it_does_not_import_the_report():
    code = "import sys, kaio.report.history; print('matplotlib' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    # The drawing process (one per figure) loads only what the figure needs: not the markdown, not pydantic.
    code = "import sys, kaio.report.plot; print('kaio.report.markdown' in sys.modules, 'pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_plotting_failure_still_leaves_history_and_report(tmp_path, monkeypatch):
    def broken_renderer(data, path):
        raise RuntimeError("no usable font")

    monkeypatch.setattr("kaio.report.plot.render_telemetry_png", broken_renderer)
    summary, _ = write_reports(*make_run(5), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "report.md"]
    assert "telemetry.png was not rendered: RuntimeError: no usable font" in summary.warnings
    assert "- ⚠️ telemetry.png was not rendered: RuntimeError: no usable font" in (tmp_path / "report.md").read_text()


def test_summary_is_strict_json_without_nan():
    header, index = make_run(40, n_gpus=2)
    summary = summarize(header, index)
    assert summary.warnings == []
    document = json.loads(msgspec.json.encode(summary))
    assert json.loads(json.dumps(document, allow_nan=False)) == document


def test_a_jobs_report_names_each_nodes_first_failing_rank_and_which_failed_first_on_the_heads_clock():
    """Node 1's rank 9 failed at 12:00:03 on its clock, which runs 2.5 s ahead of the head's: 12:00:00.5 on the
    head's, before the head's rank 0 (12:00:02), which only followed it."""
    from kaio.record.types import NodeSummary

    header, index = make_run(5, status=Status.FAILED)
    header.run.world_size = 16
    header.run.nodes = [
        NodeSummary(
            node_rank=0,
            host="gpu01",
            status="FAILED",
            exit_code=1,
            error="rank 0: RuntimeError: Connection closed by peer",
            failed_at="2026-11-27T12:00:02.000+00:00",
        ),
        NodeSummary(
            node_rank=1,
            host="gpu08",
            folder="1-gpu08",
            status="FAILED",
            exit_code=1,
            error="rank 9: torch.OutOfMemoryError: CUDA out of memory",
            failed_at="2026-11-27T12:00:03.000+00:00",
            clock_offset_s=2.5,
            clock_rtt_s=0.001,
        ),
        NodeSummary(node_rank=2, host="gpu10", folder="2-gpu10", status="COMPLETED", exit_code=0),
    ]
    nodes = section(report_of(header, index), "Nodes")
    assert (
        "Failures, each node's first failing rank (its own error files):\n\n"
        "- node 0 (gpu01) at 2026-11-27 12:00:02 UTC: rank 0: RuntimeError: Connection closed by peer\n"
        "- node 1 (gpu08) at 2026-11-27 12:00:00 UTC (head's clock): rank 9: torch.OutOfMemoryError: CUDA out of memory\n\n"
        "First to fail: node 1 (gpu08): rank 9: torch.OutOfMemoryError: CUDA out of memory"
    ) in nodes
    assert "gpu10" in nodes and "node 2 (gpu10) at" not in nodes
    # The headline names the cause (node 1's), not what followed on the head (a peer's connection closed).
    header.sessions[-1].exit_code, header.sessions[-1].error = 1, "rank 0: RuntimeError: Connection closed by peer"
    assert (
        "**Status:** ❌ FAILED (exit code 1): node 1 first: `rank 9: torch.OutOfMemoryError: CUDA out of memory`"
        in (report_of(header, index))
    )


def test_adapters_peft_resolved_to_every_layer_are_named_once_with_their_count():
    from kaio.report.markdown import _peft

    every_layer = [f"model.layers.{i}.{m}" for i in range(32) for m in ("self_attn.q_proj", "mlp.down_proj")]
    resolved = PeftInfo(peft_type="LORA", r=8, alpha=16.0, target_modules=sorted(every_layer))
    assert _peft(resolved) == "LORA r=8 alpha=16 on down_proj, q_proj (64 modules)"
    named = PeftInfo(peft_type="LORA", r=8, alpha=16.0, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"])
    assert _peft(named) == "LORA r=8 alpha=16 on model.layers.0.self_attn.q_proj, v_proj"  # as the user named them
    mixed = PeftInfo(peft_type="LORA", r=8, alpha=16.0, target_modules=["model.layers.0.self_attn.q_proj", "q_proj"])
    assert _peft(mixed) == "LORA r=8 alpha=16 on model.layers.0.self_attn.q_proj, q_proj"


def test_a_script_that_failed_after_its_training_completed_is_said_to_have_trained_whole():
    """`trainer.push_to_hub()` failing after 8 of 8 steps: the training is whole, the script failed after it."""
    header, index = make_run(8, status=Status.FAILED)
    last = header.sessions[-1]
    last.status, last.exit_code, last.training_ended = Status.FAILED, 1, True
    last.error = "rank 0: httpx.ConnectError: [Errno -2] Name or service not known"
    header.run.max_steps = 8
    md = report_of(header, index)
    assert (
        "**Status:** ❌ FAILED (exit code 1) after its training completed (8 of 8 steps): the script failed "
        "afterwards: `rank 0: httpx.ConnectError" in md
    )
    last.training_ended = False  # the process ended inside the training: a failed training, said as before
    assert "**Status:** ❌ FAILED (exit code 1): `rank 0: httpx" in report_of(header, index)


def test_a_nodes_clock_offset_under_a_tenth_of_a_millisecond_is_not_negative_zero():
    from kaio.record.types import NodeSummary
    from kaio.report.markdown import _clock

    node = NodeSummary(node_rank=1, status="COMPLETED", clock_offset_s=-0.00001, clock_rtt_s=0.0004)
    assert _clock(node) == "+0.0 ms (± 0.2 ms)"


def test_the_vram_estimate_counts_the_optimizer_the_script_gave_the_trainer():
    """Trainer(optimizers=(SGD(...), None)): the estimate counted args.optim's AdamW moments, which never existed."""
    import msgspec

    def optimizer_term(**run_fields) -> int:
        described = run_description(1, 20)
        model = msgspec.structs.replace(
            described.model,
            num_layers=2,
            hidden_size=64,
            intermediate_size=256,
            num_heads=4,
            vocab_size=384,
            attention_dim=64,
            kv_dim=64,
            weight_bytes=2_000_000,
            trainable_bytes_per_param=4,
        )
        header, index = make_run(20, run=msgspec.structs.replace(described, model=model, **run_fields))
        if not run_fields:  # the row's label, on a GPU host (a tester found "per GPU (; kaio plan's")
            assert "| VRAM estimate per GPU (kaio plan's, for what ran) | 19.3 MiB (weights" in report_of(header, index)
        return summarize(header, index).vram_estimate_terms["optimizer states"]

    assert optimizer_term() == 2 * 4 * 1_048_576  # AdamW (args.optim): two fp32 moments per trained parameter
    assert optimizer_term(script_optimizer="SGD") == 0
    assert optimizer_term(script_optimizer="Adafactor") == 4 * 1_048_576
    # SGD with momentum keeps one buffer per trained parameter: the script's own, or optim="sgd" with optim_args.
    assert optimizer_term(script_optimizer="SGD", script_momentum=True) == 4 * 1_048_576
    sgd = TrainingArgs(optim="sgd", optim_args="momentum=0.9, nesterov=True")
    assert optimizer_term(args=sgd) == 4 * 1_048_576
    assert optimizer_term(args=TrainingArgs(optim="sgd")) == 0


def test_key_metrics_say_where_the_losses_were_logged_and_round_the_estimate_so_its_terms_add_up():
    """A tester's audit: "5.826 → 1.048" under "90 of 90 steps" were steps 4 and 88's; the estimate's terms (whole
    MiB beside 3 digits) summed to 12.98 MiB against "14 MiB"; "saves 0.0 s" for 0.3 % of the time; 5716 beside
    130,168 in one column."""
    from kaio.report.markdown import _logged, _seconds
    from kaio.units import MIB, gib

    logged_every_4 = [make_step(k, loss=4.0 / k if k % 4 == 0 else None) for k in range(1, 91)]
    header, index = make_run(90, steps=logged_every_4)
    assert "| Loss (initial → final) | 1 → 0.04545 (logged at steps 4 and 88 of 90) |" in report_of(header, index)
    assert "| Loss (initial → final) | 3.636 → 1.818 |" in report_of(*make_run(12))  # every step's: no steps said
    terms = [int(1.956 * MIB), int(0.328 * MIB), int(8.461 * MIB), int(2.25 * MIB)]
    shown = [float(gib(t, digits=3).split()[0]) for t in terms]
    assert gib(sum(terms), digits=3) == "13 MiB" and sum(shown) == pytest.approx(13.0, abs=0.01)
    assert gib(3 * 2**30, digits=3) == "3 GiB" and gib(int(1.5 * 2**30)) == "1.5 GiB"
    assert _seconds(0.036) == "0.036 s" and _seconds(0.0) == "0.0 s" and _seconds(12.34) == "12.3 s"
    assert _logged(5716.0) == "5,716" and _logged(130168.0) == "130,168" and _logged(0.0327) == "0.0327"


def test_the_figures_device_vram_line_is_the_run_gpus_not_another_jobs():
    """A tester's CUDA_VISIBLE_DEVICES=3,1 on 8 GPUs: the VRAM panel drew 17 GiB, nvml:7's (not in the run), where
    report.md said the run's peak was 13.0 GiB."""
    import msgspec

    steps = [
        make_step(k, gpus={"nvml:0": gpu(vram_used=(10 + k % 3) * GIB), "nvml:1": gpu(vram_used=17 * GIB)})
        for k in range(1, 21)
    ]
    outside = msgspec.structs.replace(device(1), info=msgspec.structs.replace(device(1).info, in_run=False))
    header, index = make_run(20, steps=steps, devices=[device(0), outside])
    line = figure_data(header, index).vram_device_used
    assert line.y and max(line.y) == 12 * GIB and min(line.y) == 10 * GIB
    assert "| Device VRAM used, peak (driver) | 12.0 GiB" in report_of(header, index)
    everyone = figure_data(*make_run(20, steps=steps, devices=[device(0), device(1)])).vram_device_used
    assert max(everyone.y) == 17 * GIB  # both in the run: the steps' own maximum


def test_a_model_kaio_cannot_size_is_said_in_the_estimate_row_not_left_out():
    """A tester's GPT-2, T5 and custom modules had no estimate row and no word why."""
    md = report_of(*make_run(20))  # a model described without its sizes (a script's own, or another family's config)
    assert (
        "| VRAM estimate per GPU (kaio plan's, for what ran) | none: kaio sizes a decoder's layers from its config: "
        "LlamaForCausalLM's has no num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, vocab_size, "
        "the attention's width, the key/value width, the weights' bytes |"
    ) in md


def test_a_throughput_of_thousands_of_samples_is_written_as_a_number_not_in_scientific_notation():
    """A small model's 7,580 samples/s read '7.58e+03 samples/s' beside '6,387 tokens/s'."""
    from kaio.record.types import Status
    from kaio.report.markdown import _throughput
    from kaio.report.summary import Summary

    def said(rate: float) -> str:
        return _throughput(Summary(project="p", status=Status.COMPLETED, samples_per_s=rate))

    assert [said(rate) for rate in (7580.4, 123.4, 16.04, 0.01234)] == [
        "7,580 samples/s",
        "123 samples/s",
        "16 samples/s",
        "0.0123 samples/s",
    ]

"""`kaio run` end to end: real accelerate launch, real FIFO, real training of the tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import kaio, write_config, journal_steps, read_history, wait_for








def _spawn_kaio(project_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kaio", *args], cwd=project_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_tiny_run_records_every_step_with_falling_loss(project_dir):
    write_config(project_dir, max_steps=12, save_steps=6)
    result = kaio("run", "cfg.yaml", cwd=project_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    history = read_history(project_dir)
    steps = history["steps"]
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert all(s["loss"] is not None and s["learning_rate"] is not None for s in steps)
    assert steps[0]["loss"] > 5 and steps[-1]["loss"] < steps[0]["loss"]
    assert all(s["peak_vram_bytes"] == {"0": None} for s in steps)  # no GPU: null, never 0
    assert all(s["session"] == 1 and s["timestamp"] for s in steps)
    assert history["status"] == "COMPLETED"
    assert history["sessions"][0]["exit_code"] == 0
    assert history["run"]["trainable_params"] > 0 and history["run"]["architecture"] == "LlamaForCausalLM"
    report_dir = project_dir / "docs" / "reports" / "t"
    for name in ("report.md", "telemetry.png", "journal.jsonl", "child.log", "config.json"):
        assert (report_dir / name).is_file(), name
    assert (project_dir / "checkpoints" / "t" / "checkpoint-6").is_dir()
    assert (project_dir / "checkpoints" / "t" / "final" / "adapter_config.json").is_file()
    # Not a terminal: plain lines, no escape codes; the child's output is echoed and logged.
    assert "\x1b[" not in result.stdout
    assert "[kaio] t COMPLETED: 12/12 steps" in result.stdout
    assert "train_runtime" in (report_dir / "child.log").read_text()


def test_one_run_per_project_and_no_silent_mixing(project_dir):
    write_config(project_dir, max_steps=400, save_steps=1000)
    first = _spawn_kaio(project_dir, "run", "cfg.yaml")
    try:
        wait_for(lambda: journal_steps(project_dir) >= 2, 120, "the first run to train")
        second = kaio("run", "cfg.yaml", cwd=project_dir, timeout=60)
        assert second.returncode == 2
        assert "is running right now" in second.stderr
        assert journal_steps(project_dir) >= 2  # the first run is untouched
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    # A finished history is not mixed or destroyed without asking.
    again = kaio("run", "cfg.yaml", cwd=project_dir, timeout=60)
    assert again.returncode == 2
    assert "already has a history" in again.stderr and "kaio resume t" in again.stderr
    write_config(project_dir, max_steps=3)
    fresh = kaio("run", "cfg.yaml", "--overwrite", cwd=project_dir)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert [s["step"] for s in read_history(project_dir)["steps"]] == [1, 2, 3]
    moved = list((project_dir / "docs" / "reports").glob("t.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "journal.jsonl").is_file()
    assert list((project_dir / "checkpoints").glob("t.replaced-*"))


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_the_run_keeps_history_and_leaves_no_process(project_dir, presses):
    write_config(project_dir, max_steps=5000, save_steps=10000)
    proc = _spawn_kaio(project_dir, "run", "cfg.yaml")
    wait_for(lambda: journal_steps(project_dir) >= 3, 120, "training to start")
    family = _descendants(proc.pid)
    assert family, "the supervisor has no child processes"
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    history = read_history(project_dir)
    assert history["status"] == "INTERRUPTED"
    assert len(history["steps"]) >= 3
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    assert "INTERRUPTED" in output


USER_SCRIPT = textwrap.dedent(
    """
    # A user's own script: its own Trainer subclass, no kaio import anywhere.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    class MyTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.my_flag = True

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 32
        def __getitem__(self, i):
            ids = torch.arange(16) % 7 + i % 3
            return {"input_ids": ids, "labels": ids}

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    args = TrainingArguments(output_dir="out", max_steps=5, per_device_train_batch_size=4, logging_steps=1,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    MyTrainer(model=model, args=args, train_dataset=Data()).train()
    """
)


def test_user_script_with_its_own_trainer_subclass_gets_telemetry_unchanged(project_dir):
    (project_dir / "train.py").write_text(USER_SCRIPT)
    write_config(project_dir, extra="launch:\n  script: train.py\n".replace("launch:", "launch_unused:"))
    cfg = (project_dir / "cfg.yaml").read_text().replace("launch_unused:\n  script: train.py\n", "")
    cfg = cfg.replace("launch:\n", "launch:\n  script: train.py\n")
    (project_dir / "cfg.yaml").write_text(cfg)
    result = kaio("run", "cfg.yaml", cwd=project_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    history = read_history(project_dir)
    assert [s["step"] for s in history["steps"]] == [1, 2, 3, 4, 5]
    assert all(s["loss"] is not None for s in history["steps"])
    assert history["run"]["architecture"] == "LlamaForCausalLM"


def test_two_ranks_cpu_ddp_both_report_every_step_and_loss_once(project_dir):
    write_config(project_dir, max_steps=6, num_processes=2)
    result = kaio("run", "cfg.yaml", cwd=project_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    journal = [json.loads(l) for l in (project_dir / "docs/reports/t/journal.jsonl").read_text().splitlines()]
    for rank in (0, 1):
        assert [e["step"] for e in journal if e.get("type") == "step" and e["rank"] == rank] == list(range(1, 7))
    logged = [e["step"] for e in journal if e.get("type") == "log" and "loss" in e]
    assert logged == list(range(1, 7))  # once per step, from rank 0 only
    history = read_history(project_dir)
    assert history["run"]["world_size"] == 2
    assert all(set(s["peak_vram_bytes"]) == {"0", "1"} for s in history["steps"])

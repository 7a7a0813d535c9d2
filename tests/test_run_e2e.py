"""`kaio run` end to end: real accelerate launch, real FIFO, real training of the tiny model."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import journal_steps, kaio, read_history, wait_for, write_config


def _spawn_kaio(project_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kaio", *args],
        cwd=project_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
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
    assert (
        history["run"]["model"]["trainable_params"] > 0
        and history["run"]["model"]["architecture"] == "LlamaForCausalLM"
    )
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

"""`kaio run` end to end: real accelerate launch, real FIFO, real training of the tiny model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import pytest

from conftest import REPO, journal_steps, kaio, read_history, spawn_kaio, wait_for, write_config

LIGHT = REPO / "tests" / "scripts" / "light_loop.py"  # no torch, no Trainer


def test_the_readme_run_in_a_fresh_clone_records_every_step_and_leaves_git_clean(tmp_path):
    """The README's first command's run, in a clone of the repository: the record is complete, the dashboard's
    plain form says where it is, and `git status` is as clean after as before (the example report is not a
    user run's folder; build artefacts are not tracked)."""
    clone = tmp_path / "kaio"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    (clone / "kaio.egg-info").mkdir()  # what the README's `pip install -e .` leaves
    result = kaio("run", "configs/finetuning_config.yaml", cwd=clone, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    git = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, capture_output=True, text=True
    )
    assert git.stdout == ""
    history = read_history(clone, "tiny-default")
    steps = history["steps"]
    assert [s["step"] for s in steps] == list(range(1, 401))
    assert all(s["loss"] is not None and s["learning_rate"] is not None for s in steps)
    assert steps[0]["loss"] > 5 and steps[-1]["loss_smoothed"] < 1.0
    assert all(s["peak_vram_bytes"] == {"0": None} for s in steps)  # no GPU: null, never 0
    assert history["status"] == "COMPLETED" and history["sessions"][0]["exit_code"] == 0
    model = history["run"]["model"]
    assert model["name_or_path"] == "kaio/tiny-llama" and model["architecture"] == "LlamaForCausalLM"
    report_dir = clone / "docs" / "reports" / "tiny-default"
    for name in ("report.md", "telemetry.png", "journal.jsonl", "index.sqlite", "child.log", "config.json"):
        assert (report_dir / name).is_file(), name
    assert (clone / "checkpoints" / "tiny-default" / "final" / "adapter_config.json").is_file()
    # Not a terminal: plain lines, no escape codes, no Trainer dict per step (child.log keeps those).
    assert "\x1b[" not in result.stdout
    assert "[kaio] tiny-default COMPLETED: 400/400 steps" in result.stdout
    assert "{'loss'" not in result.stdout and "{'loss'" in (report_dir / "child.log").read_text()
    last = result.stdout.strip().splitlines()[-1]
    assert last == (
        "record: docs/reports/tiny-default/report.md · docs/reports/tiny-default/telemetry.png · "
        "docs/reports/tiny-default/history.json"
    )
    # The Trainer's own figure and kaio's, over the steps' time, agree (within 5%).
    trainer = next(e for e in steps[-1:] if "train_samples_per_second" in e["metrics"])["metrics"][
        "train_samples_per_second"
    ]
    summary = json.loads(kaio("report", "tiny-default", "--json", cwd=clone).stdout)
    assert summary["samples_per_s"] == pytest.approx(trainer, rel=0.05)
    # Where the time went: the buckets cover the session's wall time; goodput is the optimizer steps' share.
    buckets = ("startup_s", "productive_s", "stall_s", "recomputed_s", "eval_s", "save_s", "closing_s")
    assert sum(summary[k] or 0 for k in buckets) == pytest.approx(summary["training_time_s"], rel=0.01)
    assert summary["goodput_pct"] == pytest.approx(100 * summary["productive_s"] / summary["training_time_s"])
    report_md = (report_dir / "report.md").read_text()
    assert "**Goodput: " in report_md and "- **Optimizer steps:** 400 of 400 planned, 3.125 epochs\n" in report_md
    # `kaio plan`'s estimate (the model on the meta device) is the report's (the live model, as the child saw it).
    plan = json.loads(kaio("plan", "configs/finetuning_config.yaml", "--json", cwd=clone).stdout)
    planned = plan["model"]["estimates"]["without_gradient_checkpointing"]
    assert summary["vram_estimate_tokens"] == 4 * 128  # the longest micro-batch: 4 examples of 128 tokens
    assert summary["vram_estimate_bytes"] == planned["total_bytes"] > 0
    assert (
        "Memory estimate per process (RAM: no GPU; kaio plan's, for what ran)" in (report_dir / "report.md").read_text()
    )


def test_one_run_per_project_and_no_silent_mixing(project_dir):
    """While a run goes, a second run of the project is refused and `kaio report` reads without
    disturbing it; a finished history is not mixed or destroyed without asking."""
    write_config(project_dir, max_steps=5000, save_steps=10000)  # not finished when the SIGTERM comes, on any machine
    first = spawn_kaio("run", "cfg.yaml", cwd=project_dir)
    try:
        wait_for(lambda: journal_steps(project_dir) >= 5, 120, "the first run to train")
        second = kaio("run", "cfg.yaml", cwd=project_dir, timeout=60)
        assert second.returncode == 2
        assert "is running right now" in second.stderr
        report = kaio("report", "t", "--json", cwd=project_dir, timeout=120)
        assert report.returncode == 0, report.stderr
        assert json.loads(report.stdout)["status"] == "RUNNING"
        assert first.poll() is None and journal_steps(project_dir) >= 5  # the first run is undisturbed
    finally:
        first.send_signal(signal.SIGTERM)  # as a batch scheduler preempts: a checkpoint is saved first
        output, _ = first.communicate(timeout=60)
    assert first.returncode == 143 and "saved: `kaio resume t` continues from step" in output, output
    assert read_history(project_dir)["status"] == "INTERRUPTED"
    pushed = kaio("push", "t", "--repo-id", "a/b", cwd=project_dir, timeout=60)  # no final adapter yet
    assert pushed.returncode == 2 and "the run has not completed (INTERRUPTED at step " in pushed.stderr
    assert "finish it with `kaio resume t`" in pushed.stderr
    # An earlier session's final adapter (a run completed, then resumed to train further and stopped) is not pushed
    # under the report and card of the unfinished session.
    final = project_dir / "checkpoints" / "t" / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text("{}")
    pushed = kaio("push", "t", "--repo-id", "a/b", cwd=project_dir, timeout=60)
    assert pushed.returncode == 2 and "its latest session ended INTERRUPTED at step " in pushed.stderr
    assert "holds an earlier session's" in pushed.stderr
    shutil.rmtree(final)
    dry = kaio("run", "cfg.yaml", "--dry-run", cwd=project_dir, timeout=60)  # says what the real one would refuse
    # A finished history is not mixed or destroyed without asking.
    again = kaio("run", "cfg.yaml", cwd=project_dir, timeout=60)
    assert again.returncode == 2
    assert (
        dry.returncode == 0
        and f"note: `kaio run` would refuse it: {again.stderr.removeprefix('kaio: error: ')}" in dry.stdout
    )
    assert "already has a history" in again.stderr and "continue it with `kaio resume t`" in again.stderr
    assert "or start over with `kaio run cfg.yaml --overwrite`" in again.stderr  # the config it was given
    # Starting over moves the old record and the Trainer's checkpoints aside, whatever trains next: here a
    # torch-free loop (the recipe's own start-up costs a test ~10 s of CPU and shows nothing more).
    (project_dir / "cfg.yaml").write_text(
        f"project_name: t\nlaunch:\n  script: {LIGHT}\n  script_args: ['3']\nreporting:\n  use_comet_ml: false\n"
    )
    fresh = kaio("run", "cfg.yaml", "--overwrite", cwd=project_dir)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert [s["step"] for s in read_history(project_dir)["steps"]] == [1, 2, 3]
    moved = list((project_dir / "docs" / "reports").glob("t.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "journal.jsonl").is_file()
    (aside,) = (project_dir / "checkpoints").glob("t.replaced-*")  # beside the folder, which is left empty
    assert list(aside.glob("checkpoint-*")) and not list((project_dir / "checkpoints" / "t").glob("checkpoint-*"))


def test_a_ctrl_c_before_the_first_session_leaves_no_record_of_nothing_and_says_where_the_old_one_went(project_dir):
    """`kaio run --overwrite` moved the old record aside, then a Ctrl-C came before the launch: kaio said 'nothing
    was run or recorded' and left a record of no session behind, which `kaio report` called RUNNING."""
    from kaio.config import load_config
    from kaio.record.paths import ProjectPaths
    from kaio.run.project import run_new

    class InterruptedView:  # the Ctrl-C as the dashboard comes up, before the supervisor's handlers are set
        def start(self, snapshot):
            raise KeyboardInterrupt

    cfg = load_config(write_config(project_dir))
    old = ProjectPaths(cfg.report_dir)
    old.report_dir.mkdir(parents=True)
    old.journal.write_text('{"type":"session_start","session":1,"t_wall":1.0}\n')  # an earlier run's history
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_new(cfg, InterruptedView(), overwrite=True, notify=said.append)  # type: ignore[arg-type]
    assert not old.journal.exists() and not old.index.exists()  # nothing recorded: no project to report
    moved = [line for line in said if line.startswith("moved the previous record aside: ")]
    assert len(moved) == 1 and f"the previous record is still where it was moved: {moved[0].split(': ')[1]}" in said
    assert kaio("report", "t", cwd=project_dir).returncode == 2
    # A stub left by a kaio before this one (a journal, no config.json): one line, not a traceback.
    old.report_dir.mkdir(parents=True, exist_ok=True)
    old.journal.write_text("")
    resumed = kaio("resume", "t", cwd=project_dir)
    assert resumed.returncode == 2 and "no session of this project started" in resumed.stderr, resumed.stderr

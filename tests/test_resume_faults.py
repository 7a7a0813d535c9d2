"""`kaio resume` and surviving faults, each with real processes on small configs.

After every fault the history's steps run 1..N with no gap and no duplicate.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import psutil
import pytest

from conftest import REPO, journal_steps, kaio, read_history, replay, spawn_kaio, wait_for, write_config
from kaio.run.project import config_changes

FAULTY = REPO / "tests" / "scripts" / "faulty_train.py"
LIGHT = REPO / "tests" / "scripts" / "light_loop.py"  # no torch, no Trainer: for the tests about processes


def _steps(history: dict) -> list[int]:
    return [s["step"] for s in history["steps"]]


def _script_config(project_dir: Path, script: Path, *script_args: str, num_processes: int = 1) -> None:
    args = ", ".join(json.dumps(a) for a in script_args)
    (project_dir / "cfg.yaml").write_text(
        f"project_name: t\nlaunch:\n  num_processes: {num_processes}\n  script: {script}\n"
        f"  script_args: [{args}]\n  grace_seconds: 5\n"
        "reporting:\n  use_comet_ml: false\n  poll_hz: 4\n  refresh_seconds: 5\n"
    )


def test_a_stop_signal_saves_a_checkpoint_there_resume_continues_exactly_and_refuses_what_it_cannot_do(project_dir):
    """A first SIGINT between two save_steps (a batch scheduler's SIGTERM: tests/test_run_e2e.py; a second
    Ctrl-C at once in a terminal: tests/test_dashboard_terminal.py): the Trainer saves checkpoint-k at the
    end of step k and stops; `kaio resume` trains k+1.. with no gap and no duplicate."""
    write_config(project_dir, max_steps=120, save_steps=100)  # a fast machine trains ~130 steps/s
    proc = spawn_kaio("run", "cfg.yaml", "--plain", cwd=project_dir)
    wait_for(lambda: journal_steps(project_dir) >= 12, 120, "a few steps")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output  # stopped by the user (kaio's code for it, as for SIGTERM)
    interrupted = read_history(project_dir)
    assert interrupted["status"] == "INTERRUPTED"
    stopped_at = max(_steps(interrupted))
    assert 12 <= stopped_at < 100, "Ctrl-C should land between two save_steps"
    # The checkpoint is the state at the end of step k: the Trainer's own state says so, with step k's loss.
    saved = json.loads((project_dir / f"checkpoints/t/checkpoint-{stopped_at}/trainer_state.json").read_text())
    assert saved["global_step"] == stopped_at
    logged = [e for e in saved["log_history"] if "loss" in e]
    assert logged[-1]["step"] == stopped_at
    assert logged[-1]["loss"] == pytest.approx(interrupted["steps"][stopped_at - 1]["loss"], rel=1e-6)
    said = f"stopped after step {stopped_at} with checkpoint-{stopped_at} saved: `kaio resume t` continues from step {stopped_at + 1}"
    assert said in output
    assert (
        f"stopped after step {stopped_at} with checkpoint-{stopped_at} saved"
        in (project_dir / "docs/reports/t/report.md").read_text()
    )

    # The resume continues it with an edited config (a lower learning rate, three more steps); a resume of a
    # finished run from its final checkpoint: tests/test_integration.py and tests/test_multinode.py.
    edited = (project_dir / "cfg.yaml").read_text()
    (project_dir / "lr.yaml").write_text(edited.replace("learning_rate: 5.0e-3", "learning_rate: 1.0e-3"))
    result = kaio("resume", "t", "--config", "lr.yaml", "--max-steps", "123", cwd=project_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    history = read_history(project_dir)
    assert _steps(history) == list(range(1, 124))
    assert [s["kind"] for s in history["sessions"]] == ["run", "resume"]
    assert history["sessions"][1]["start_step"] == stopped_at
    assert history["status"] == "COMPLETED"
    # Nothing was trained twice: the journal holds each step once.
    journal = [json.loads(line) for line in (project_dir / "docs/reports/t/journal.jsonl").read_text().splitlines()]
    assert sorted(e["step"] for e in journal if e.get("type") == "step") == list(range(1, 124))
    notes = " ".join(history["telemetry"]["notes"])
    assert f"session 2: resumed from checkpoint-{stopped_at}" in notes
    assert "training.learning_rate: 0.005 -> 0.001" in notes and "training.max_steps: 120 -> 123" in notes
    assert "learning_rate: 0.005 -> 0.001" in (project_dir / "docs/reports/t/report.md").read_text()
    # And it took effect: a resumed Trainer keeps its checkpoint's rate (the scheduler's state) unless told
    # otherwise. The resumed steps trained on the edited config's cosine over 123 steps (warm-up: 4 steps; step k
    # trains with the schedule's value after k - 1 steps), as the first session's did on its 120.
    for entry in history["steps"]:
        rate, total = (5e-3, 120) if entry["step"] <= stopped_at else (1e-3, 123)
        done = entry["step"] - 1
        expected = rate * (done / 4 if done < 4 else 0.5 * (1 + math.cos(math.pi * (done - 4) / (total - 4))))
        assert entry["learning_rate"] == pytest.approx(expected, rel=1e-6, abs=1e-12), entry["step"]
    assert not [w for w in history["warnings"] if "kept its checkpoint's" in w]

    # The finished project: what `kaio resume` refuses.
    unknown = kaio("resume", "nope", cwd=project_dir, timeout=60)
    assert (
        unknown.returncode == 2 and "unknown project 'nope'" in unknown.stderr and "known projects: t" in unknown.stderr
    )
    assert "sets reporting.output_dir is found with --output-dir DIR" in unknown.stderr  # another folder of reports
    finished = kaio("resume", "t", cwd=project_dir, timeout=60)
    assert finished.returncode == 2 and "--max-steps" in finished.stderr
    fewer = kaio("resume", "t", "--max-steps", "3", cwd=project_dir, timeout=60)
    assert fewer.returncode == 2 and "has trained 123 steps already" in fewer.stderr
    by_epochs = kaio("resume", "t", "--max-steps", "-1", cwd=project_dir, timeout=60)
    assert by_epochs.returncode == 2 and "--max-steps -1: a resume trains to a step count" in by_epochs.stderr
    (project_dir / "lora.yaml").write_text(edited.replace("  r: 4\n", "  r: 8\n"))
    refused = kaio("resume", "t", "--config", "lora.yaml", "--max-steps", "126", cwd=project_dir, timeout=60)
    assert refused.returncode == 2
    assert "lora.r" in refused.stderr and "4 -> 8" in refused.stderr
    (project_dir / "moved.yaml").write_text(edited.replace("reporting:\n", "reporting:\n  output_dir: elsewhere\n"))
    moved = kaio("resume", "t", "--config", "moved.yaml", "--max-steps", "126", cwd=project_dir, timeout=60)
    assert (
        moved.returncode == 2 and "unknown project 't': elsewhere/ does not exist" in moved.stderr
    )  # --config says where
    moved = kaio(
        "resume", "t", "--config", "moved.yaml", "--output-dir", "docs/reports", "--max-steps", "126", cwd=project_dir
    )
    assert moved.returncode == 2 and "reporting.output_dir" in moved.stderr  # one history, in one place
    (project_dir / "elsewhere").mkdir()  # its checkpoints' folder is recorded relative to where the run started
    away = kaio(
        "resume",
        "t",
        "--output-dir",
        str(project_dir / "docs/reports"),
        "--max-steps",
        "200",
        cwd=project_dir / "elsewhere",
    )
    assert away.returncode == 2 and "relative to the folder its run was started in" in away.stderr
    assert "run `kaio resume` from that folder" in away.stderr and "--overwrite" not in away.stderr

    # No complete checkpoint at all (the last ones removed, one half-written): say so, suggest `kaio run`.
    for path in (project_dir / "checkpoints/t").glob("checkpoint-*"):
        shutil.rmtree(path)
    (project_dir / "checkpoints/t/checkpoint-199").mkdir()  # half-written: no trainer_state.json
    missing = kaio("resume", "t", "--max-steps", "200", cwd=project_dir, timeout=60)
    assert missing.returncode == 2
    assert "no complete checkpoint" in missing.stderr and "kaio run" in missing.stderr
    assert "skipping" in missing.stdout and "checkpoint-199" in missing.stdout


def test_a_rank_killed_with_sigkill_is_named(project_dir):
    _script_config(
        project_dir, LIGHT, "100", "--step-seconds", "0.02", "--fault", "sigkill", "--rank", "1", num_processes=2
    )
    result = kaio("run", "cfg.yaml", cwd=project_dir)
    assert result.returncode == 137, result.stdout + result.stderr  # the job's own code, as a shell gives it
    assert "ChildFailedError" not in result.stdout + result.stderr  # the launcher's traceback: its ranks' are theirs
    session = read_history(project_dir)["sessions"][0]
    assert session["status"] == "FAILED" and session["signal"] == "SIGKILL" and session["exit_code"] == 137
    assert session["error"].startswith("rank 1:") and "SIGKILL" in session["error"]


def test_the_whole_child_killed_is_failed_with_the_signal(project_dir):
    _script_config(project_dir, LIGHT, "5000", "--step-seconds", "0.02")
    proc = spawn_kaio("run", "cfg.yaml", cwd=project_dir, output=False)
    wait_for(lambda: journal_steps(project_dir) >= 3, 120, "training")
    # kaio's children: the launcher, and the process that draws telemetry.png.
    launcher = next(p for p in psutil.Process(proc.pid).children() if "kaio.child.launcher" in p.cmdline())
    os.killpg(launcher.pid, signal.SIGKILL)  # the child's whole process group
    assert proc.wait(timeout=60) == 137
    session = read_history(project_dir)["sessions"][0]
    assert session["status"] == "FAILED" and session["signal"] == "SIGKILL"
    assert session["exit_code"] == 137


def test_supervisor_killed_child_keeps_training_and_no_step_is_lost(project_dir):
    _script_config(project_dir, LIGHT, "800", "--step-seconds", "0.01")  # 8 s: seconds left after the kill
    proc = spawn_kaio("run", "cfg.yaml", cwd=project_dir, output=False)
    wait_for(lambda: journal_steps(project_dir) >= 5, 120, "training")
    child = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()  # SIGKILL to the supervisor alone
    proc.wait(timeout=30)
    assert any(p.is_running() for p in child), "the child should carry on without its supervisor"
    # While the orphan trains, resume refuses.
    busy = kaio("resume", "t", cwd=project_dir, timeout=60)
    assert busy.returncode == 2 and "still training without a supervisor" in busy.stderr, busy.stderr
    # A report meanwhile says its steps stop where the supervisor did, and when the rest is merged.
    stale = kaio("report", "t", cwd=project_dir, timeout=120)
    assert stale.returncode == 0 and "lost its supervisor and trains on unsupervised: this report stops at step" in (
        stale.stdout
    ), stale.stdout + stale.stderr
    psutil.wait_procs(child, timeout=120)
    # A resume, refused (the loop ran to its end), merges what was spooled and leaves the reports up to date:
    # they were the dead supervisor's last refresh (RUNNING, a few steps).
    refused = kaio("resume", "t", cwd=project_dir, timeout=120)
    assert refused.returncode == 2 and "ran to its end" in refused.stderr, refused.stdout + refused.stderr
    merged = re.search(r"merged (\d+) event\(s\) the run spooled", refused.stdout)
    assert merged, refused.stdout
    assert "**Status:** ✅ COMPLETED" in (project_dir / "docs/reports/t/report.md").read_text()
    result = kaio("report", "t", cwd=project_dir, timeout=120)
    assert result.returncode == 0, result.stderr
    history = read_history(project_dir)
    assert history["telemetry"]["spooled_events"] == int(merged[1]) > 0  # counted where the schema says
    assert _steps(history) == list(range(1, 801))
    assert all(s["loss"] is not None for s in history["steps"])
    assert history["status"] == "COMPLETED"
    assert "lost its supervisor" in " ".join(history["telemetry"]["notes"] + history["warnings"])


NOISY = """\
import os, runpy, sys
fd = os.open(os.environ["KAIO_TELEMETRY_PIPE"], os.O_WRONLY)
os.write(fd, b'{"type":"step","rank":0}\\n')  # decodable, but no step: once it crashed the supervisor
os.write(fd, b'{"type":"log","rank":0,"step":"three"}\\n')
os.close(fd)
sys.argv[0] = FAULTY = sys.argv.pop(1)
runpy.run_path(FAULTY, run_name="__main__")
"""


def test_an_exception_in_one_rank_of_two_is_named_and_max_restarts_resumes_from_the_latest_checkpoint(project_dir):
    """Rank 1 of 2 raises at step 6 (once): the session fails with that rank's exception as its root cause,
    then kaio restarts by itself from checkpoint-4 and completes. Each session's ranks also write two bad
    lines on the pipe first: counted and skipped, they stop nothing."""
    noisy = project_dir / "noisy.py"
    noisy.write_text(NOISY)
    marker = project_dir / "fired"
    (project_dir / "cfg.yaml").write_text(
        f"project_name: t\nlaunch:\n  num_processes: 2\n  script: {noisy}\n"
        f"  script_args: {json.dumps([str(FAULTY), '10', '4', '--fault', 'raise', '--rank', '1', '--at', '6', '--once', str(marker)])}\n"
        "  grace_seconds: 5\n  max_restarts: 2\n"
        "reporting:\n  use_comet_ml: false\n  poll_hz: 4\n  refresh_seconds: 5\n"
    )
    result = kaio("run", "cfg.yaml", cwd=project_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    history = read_history(project_dir)
    first, restart = history["sessions"]
    assert (first["kind"], first["status"]) == ("run", "FAILED")
    # Where in the script: "KeyError: None" alone (run_glue) said nothing of where.
    raised = "rank 1: RuntimeError: injected failure at step 6 (at faulty_train.py:76, in on_step_end)"
    assert first["error"] == raised
    said = f"kaio: automatic restart 1 of 2 after: {raised}; from checkpoint-4"
    assert said in result.stdout  # on screen as it happens, not only in the report's notes
    assert first["started_at"] < first["failed_at"] < first["ended_at"]  # when rank 1 raised (its error file)
    assert (restart["kind"], restart["status"], restart["start_step"]) == ("restart", "COMPLETED", 4)
    assert _steps(history) == list(range(1, 11))
    assert all(s["session"] == (1 if s["step"] <= 4 else 2) for s in history["steps"])
    report = (project_dir / "docs/reports/t/report.md").read_text()
    assert "restart" in report and "RuntimeError: injected failure at step 6" in report
    assert history["telemetry"]["malformed_lines"] == 2 * 2 * 2  # two lines, two ranks, two sessions
    # Steps 5.. of the failed session were trained again from checkpoint-4: lost time, in the goodput table.
    assert history["telemetry"]["recomputed_steps"] >= 1 and history["telemetry"]["recomputed_s"] > 0
    assert "Steps trained again after a resume" in report
    assert any("malformed" in w for w in history["warnings"])
    # Finished: its script's own length (10) is reached; a resume as it is would train past it, so it is refused.
    again = kaio("resume", "t", cwd=project_dir, timeout=60)
    assert again.returncode == 2 and "already trained the 10 steps its script asked for" in again.stderr
    assert "launch.script_args" in again.stderr and len(read_history(project_dir)["sessions"]) == 2


def test_overwrite_moves_a_scripts_checkpoints_from_its_own_folder_and_resume_skips_another_runs(tmp_path):
    from kaio.config import RunConfig
    from kaio.run.checkpoints import latest_checkpoint
    from kaio.run.project import move_aside

    script_dir = tmp_path / "out"  # the script's own output_dir, which the old record names
    for step in (30, 45):
        folder = script_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "model.safetensors").write_bytes(b"w")
    (script_dir / "notes.txt").write_text("the user's own")
    cfg = RunConfig(project_name="t", reporting={"output_dir": str(tmp_path / "reports")})
    said: list[str] = []
    assert latest_checkpoint(script_dir, said.append, at_most=9) is None  # both after this record's step 9
    assert len(said) == 2 and "after step 9" in said[0]
    assert latest_checkpoint(script_dir, said.append, at_most=45) == script_dir / "checkpoint-45"
    ((what, moved),) = move_aside(cfg, [script_dir])
    assert what == "checkpoints"
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoint-30", "checkpoint-45"]
    assert moved.name.startswith("out.replaced-") and moved.parent == tmp_path  # beside it: "out" holds no old run
    assert [p.name for p in script_dir.iterdir()] == ["notes.txt"]  # only what the Trainer wrote is moved


def test_overwrite_moves_the_checkpoints_of_every_folder_the_scripts_sessions_saved_in(tmp_path):
    """A script computing its output_dir from its arguments (out/lr0.005, then resumed with --lr 0.001: out/lr0.001)
    saved in two folders: --overwrite moved the latest only, and the new run's save_total_limit deleted the
    other's checkpoints."""
    from kaio.config import RunConfig
    from kaio.run.project import checkpoint_folders, move_aside

    first, second = tmp_path / "out" / "lr0.005", tmp_path / "out" / "lr0.001"
    events = [{"type": "session_start", "session": 1}]
    for session, folder, step in ((1, first, 10), (1, first, 18), (2, second, 30)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if session == 2 and events[-1].get("session") == 1:
            events.append({"type": "session_start", "session": 2, "kind": "resume"})
        events.append(
            {"type": "save", "rank": 0, "session": session, "step": step, "path": f"{folder}/checkpoint-{step}"}
        )
    cfg = RunConfig(project_name="t", reporting={"output_dir": str(tmp_path / "reports")})
    assert checkpoint_folders(cfg, replay(events)) == [first, second]
    moved = move_aside(cfg, [first, second])
    assert [what for what, _ in moved] == ["checkpoints", "checkpoints"]
    assert [sorted(p.name for p in where.iterdir()) for _, where in moved] == [
        ["checkpoint-10", "checkpoint-18"],
        ["checkpoint-30"],
    ]


def test_overwrite_moves_a_scripts_final_model_and_results_where_its_trainer_saved_them(tmp_path, monkeypatch):
    """run_glue's --overwrite failed ("output directory ... is not empty"), and run_clm's new run sat beside the old
    run's final model and eval_results.json: only the checkpoints had been moved, into the folder itself."""
    from kaio.config import RunConfig
    from kaio.run.project import move_aside

    script_dir = tmp_path / "out"
    (script_dir / "checkpoint-10").mkdir(parents=True)
    (script_dir / "runs").mkdir()
    trainers = ["trainer_state.json", "training_args.bin", "model.safetensors", "config.json", "eval_results.json"]
    for name in (*trainers, "tokenizer.json", "predict_results_mnli.txt", "data.csv"):
        (script_dir / name).write_text("{}")
    (script_dir / "README.md").write_text("---\n---\n\n<!-- This model card has been generated automatically ...")
    cfg = RunConfig(project_name="t", reporting={"output_dir": str(tmp_path / "reports")})
    ((what, moved),) = move_aside(cfg, [script_dir])
    assert what == "checkpoints and final outputs"
    assert [p.name for p in script_dir.iterdir()] == ["data.csv"]  # the user's own file stays
    assert len(list(moved.iterdir())) == 10
    # A folder the Trainer did not save in (no trainer_state.json or training_args.bin at its top): the
    # checkpoints only, and a README that is no model card stays. Where the folder holds the working
    # directory (output_dir "."), the checkpoints go into it, not next to it.
    (script_dir / "checkpoint-20").mkdir()
    (script_dir / "config.json").write_text("{}")
    (script_dir / "README.md").write_text("# my project")
    monkeypatch.chdir(script_dir)
    ((what, moved),) = move_aside(cfg, [script_dir])
    assert what == "checkpoints" and [p.name for p in moved.iterdir()] == ["checkpoint-20"]
    assert moved.parent == script_dir
    assert sorted(p.name for p in script_dir.iterdir()) == ["README.md", "config.json", "data.csv", moved.name]


@pytest.mark.parametrize(
    ("saved", "whole"),
    [
        (["model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"], True),
        (["adapter_model.safetensors", "optimizer.bin"], True),  # accelerate's own save
        (["pytorch_model_fsdp_0", "optimizer_0"], True),  # FSDP, sharded
        (["global_step40", "trainer_state.json"], True),  # DeepSpeed
        (["model.safetensors", "trainer_state.json"], False),  # TrainingArguments(save_only_model=True)
    ],
)
def test_a_checkpoint_of_the_weights_only_is_said_to_restart_the_optimizer_and_the_schedule(tmp_path, saved, whole):
    from kaio.run.checkpoints import without_optimizer

    checkpoint = tmp_path / "checkpoint-18"
    checkpoint.mkdir()
    for name in saved:
        (checkpoint / name).touch()
    said = without_optimizer(checkpoint)
    assert (said is None) == whole
    if said is not None:
        assert said.startswith("checkpoint-18 holds the model's weights only") and "start afresh" in said


@pytest.mark.parametrize(
    ("saved", "complete"),
    [
        (["model.safetensors"], True),
        (["adapter_model.bin"], True),
        # A model over save_pretrained's max_shard_size (5 GB in transformers 4, 50 GB in 5): shards, then the index.
        (
            ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"],
            True,
        ),
        (["pytorch_model-00001-of-00001.bin", "pytorch_model.bin.index.json"], True),
        (["model-00001-of-00002.safetensors", "model.safetensors.index.json"], False),  # a shard missing
        (["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], False),  # killed before the index
        (["pytorch_model_fsdp_0/"], True),  # FSDP, sharded state dict
        (["pytorch_model_fsdp.bin"], True),  # FSDP, full state dict
        (["global_step40/"], True),  # DeepSpeed
        (["default/adapter_model.safetensors", "other/adapter_model.safetensors"], True),  # several adapters
        (["config.json", "optimizer.pt"], False),  # no weights at all
    ],
)
def test_a_checkpoint_is_complete_in_every_layout_the_trainer_resumes_from(tmp_path, saved, complete):
    """A sharded model's checkpoint was "incomplete (half-written or damaged)": `kaio resume` refused it, and an
    automatic restart began again at step 0 (any full fine-tune of a model over the shard size)."""
    from kaio.run.checkpoints import is_complete, latest_checkpoint

    checkpoint = tmp_path / "checkpoint-40"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    for name in saved:
        if name.endswith("/"):
            (checkpoint / name).mkdir()
        else:
            (checkpoint / name).parent.mkdir(exist_ok=True)
            (checkpoint / name).write_bytes(b"w")
    if "model.safetensors.index.json" in saved:
        shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    if "pytorch_model.bin.index.json" in saved:
        shards = {"a": "pytorch_model-00001-of-00001.bin"}
        (checkpoint / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": shards}))
    assert is_complete(checkpoint, 40) is complete
    said: list[str] = []
    assert latest_checkpoint(tmp_path, said.append) == (checkpoint if complete else None)
    assert said == ([] if complete else [f"note: skipping {checkpoint}: incomplete (half-written or damaged)"])
    # A save a kill cut short is past the record's last step as well: half-written, not another run's.
    said.clear()
    latest_checkpoint(tmp_path, said.append, at_most=39)
    why = "incomplete (half-written or damaged)" if not complete else "after step 39, this project's last"
    assert len(said) == 1 and said[0].startswith(f"note: skipping {checkpoint}: {why}")


def test_a_resume_of_a_script_edited_since_says_so(tmp_path, monkeypatch):
    """run_clm.py edited between the sessions: the resume ran the new code, and nothing in the record said it."""
    from conftest import replay
    from kaio.config import RunConfig, code_digest
    from kaio.record.paths import ProjectPaths
    from kaio.run.project import _check_the_code

    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text("print('one')\n")
    ran = {"type": "session_start", "session": 1, "code_file": str(script), "code_sha256": code_digest(str(script))}
    state = replay([ran])
    cfg = RunConfig.model_validate({"project_name": "t", "launch": {"script": "train.py"}})
    paths = ProjectPaths(tmp_path / "docs" / "reports" / "t")
    assert _check_the_code(paths, cfg, state) is None
    script.write_text("print('two')\n")
    assert _check_the_code(paths, cfg, state) == (
        "train.py was edited since the session before (its content is not what that session ran): the steps from "
        "here on ran the edited code"
    )
    older = replay([{**ran, "code_sha256": None}])  # a record from before the digest: nothing to compare
    assert _check_the_code(paths, cfg, older) is None


def test_a_resume_may_change_a_scripts_arguments_but_not_the_script():
    old = {"launch": {"script": "train.py", "script_args": ["10"]}, "lora": {"r": 4, "rslora": False}}
    longer = {"launch": {"script": "train.py", "script_args": ["20"]}, "lora": {"r": 4, "rslora": True}}
    assert config_changes(old, longer) == ([], ["launch.script_args: ['10'] -> ['20']", "lora.rslora: False -> True"])
    other = {"launch": {"script": "other.py", "script_args": ["10"]}, "lora": {"r": 8, "rslora": False}}
    assert config_changes(old, other)[0] == ["launch.script: 'train.py' -> 'other.py'", "lora.r: 4 -> 8"]
    # A project saved by an older kaio kept the recipe's sections for a script run: they are not changes.
    assert config_changes({**old, "model": {"base_model": "kaio/tiny-llama"}}, old) == ([], [])
    # A long argument list: only what changed, after its flag (run_clm.py's 28 arguments were printed twice).
    argv = ["--model_name_or_path", "tiny", "--max_steps", "30", "--output_dir", "out dir", "--do_eval"]
    edited = [*argv[:3], "50", *argv[4:6], "--bf16", "false"]
    assert config_changes({"launch": {"script_args": argv}}, {"launch": {"script_args": edited}}) == (
        [],
        ["launch.script_args: --max_steps 30 -> --max_steps 50; 'out dir' --do_eval -> 'out dir' --bf16 false"],
    )


def test_a_project_without_a_checkpoint_is_pointed_at_overwrite_by_run_and_resume_alike(project_dir):
    """No loop of hints: `kaio run` does not send a project it cannot resume to `kaio resume`, which would send
    it back to `kaio run --overwrite`."""
    _script_config(project_dir, LIGHT, "3")  # kaio.log steps, no Trainer, no checkpoint
    first = kaio("run", "cfg.yaml", "--plain", cwd=project_dir, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    again = kaio("run", "cfg.yaml", cwd=project_dir, timeout=60)
    assert again.returncode == 2
    assert "already has a history (3 steps, COMPLETED)" in again.stderr
    assert (
        "and no checkpoint to continue from (no Trainer of the script started, so none was saved); "
        "start over with `kaio run cfg.yaml --overwrite`" in again.stderr
    )
    assert "kaio resume" not in again.stderr
    resumed = kaio("resume", "t", cwd=project_dir, timeout=60)
    assert resumed.returncode == 2 and "its loop ran to its end (session 1 COMPLETED)" in resumed.stderr
    assert "checkpoints/t" not in resumed.stderr  # kaio's folder for the recipe is not the script's
    assert "--overwrite" in resumed.stderr
    # Another project's config is named as such, not as a list of keys that differ.
    (project_dir / "other.yaml").write_text(
        (project_dir / "cfg.yaml").read_text().replace("project_name: t", "project_name: u")
    )
    mixed = kaio("resume", "t", "--config", "other.yaml", cwd=project_dir, timeout=60)
    assert mixed.returncode == 2
    assert "kaio: error: other.yaml: the config of project 'u', not 't'" in mixed.stderr


def test_a_script_reading_its_arguments_from_a_file_is_not_refused_a_resume_for_its_length(tmp_path):
    """`run_ner.py args.json` (the official examples' form): the training's length is in the file, which kaio
    cannot see change; the refusal's advice (a longer run in launch.script_args) could not be followed."""
    from kaio.config import RunConfig
    from kaio.run.project import _arguments_in_a_file

    script = tmp_path / "run_ner.py"
    script.write_text("")
    (tmp_path / "args.json").write_text('{"num_train_epochs": 6}')
    launch = {"script": str(script), "script_args": [str(tmp_path / "args.json")]}
    assert _arguments_in_a_file(RunConfig(project_name="t", launch=launch))
    flags = {**launch, "script_args": ["--num_train_epochs", "6", str(tmp_path / "missing.json")]}
    assert not _arguments_in_a_file(RunConfig(project_name="t", launch=flags))


def test_a_run_killed_in_its_final_save_is_told_how_to_get_its_adapter_by_resume_and_push_alike(tmp_path, monkeypatch):
    """Killed while the built-in recipe saved its final adapter, after its last step's checkpoint: `kaio resume`
    said only "already trained its 50 steps; extend it", and `kaio push` "finish it with kaio resume", which then
    refused. Both now say where the weights are."""
    from conftest import replay
    from kaio.config import RunConfig
    from kaio.errors import ProjectError
    from kaio.record.paths import ProjectPaths
    from kaio.run.project import _no_final_adapter, _refuse_a_finished_run

    monkeypatch.chdir(tmp_path)
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    events += [{"type": "step", "rank": 0, "session": 1, "step": k, "t_mono": float(k)} for k in (1, 2, 3)]
    events += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 9, "status": "FAILED", "exit_code": -9}]
    state = replay(events, project="t")
    cfg = RunConfig.model_validate({"project_name": "t", "training": {"max_steps": 3}})
    paths = ProjectPaths(tmp_path / "docs" / "reports" / "t")
    copy = "copy the adapter files (adapter_config.json, adapter_model.safetensors) of its latest checkpoint to "
    with pytest.raises(ProjectError) as refused:
        _refuse_a_finished_run(paths, cfg, state, [])
    assert str(refused.value).startswith(
        f"project 't' trained its 3 steps but ended before it saved its final adapter: {copy}checkpoints/t/final/"
    )
    assert _no_final_adapter(cfg, state, paths).endswith(f"{copy}checkpoints/t/final/ (`kaio push` then pushes them)")
    (tmp_path / "checkpoints" / "t" / "final").mkdir(parents=True)
    (tmp_path / "checkpoints" / "t" / "final" / "adapter_config.json").write_text("{}")  # copied: pushable now
    with pytest.raises(ProjectError, match="already trained its 3 steps; extend it with"):
        _refuse_a_finished_run(paths, cfg, state, [])


def test_a_resume_that_fails_before_its_first_step_points_at_the_checkpoint_it_loaded(tmp_path, monkeypatch):
    """A truncated adapter file in the newest checkpoint: every resume failed the same way (a SafetensorError
    traceback) with nothing to say that moving that checkpoint aside lets the one before be used."""
    from conftest import replay
    from kaio.config import RunConfig
    from kaio.run.outcome import SessionEndings
    from kaio.run.stopping import StopRequests

    monkeypatch.chdir(tmp_path)
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    events += [{"type": "step", "rank": 0, "session": 1, "step": k, "t_mono": float(k)} for k in (1, 2, 3)]
    events += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 9, "status": "COMPLETED", "exit_code": 0}]
    events += [{"type": "session_start", "session": 2, "kind": "resume", "resume_from": "checkpoints/t/checkpoint-3"}]
    said: list[tuple[str, str]] = []
    cfg = RunConfig.model_validate({"project_name": "t"})
    endings = SessionEndings(cfg, replay(events, project="t"), StopRequests(), lambda *n: said.append(n), None)
    assert endings.outcome(1, 2).status.value == "FAILED"
    warning = (
        "the resume from checkpoint-3 failed before its first step: if the error (in Sessions) is in loading it (a "
        "damaged or truncated file), move that checkpoint's folder out of its output folder (renamed inside it, the "
        "Trainer's rotation of checkpoints may delete it) and `kaio resume t` continues from the one before; if it is "
        "the script's, mend it and resume again"
    )
    assert said == [(warning, "warning")]
    said.clear()
    trained = replay([*events, {"type": "step", "rank": 0, "session": 2, "step": 4, "t_mono": 4.0}], project="t")
    SessionEndings(cfg, trained, StopRequests(), lambda *n: said.append(n), None).outcome(1, 2)
    assert said == []  # it trained a step: the checkpoint loaded
    # Resumed again once mended (a script's bug): the warning of the failed resume is taken back.
    noted = {"type": "note", "text": warning, "level": "warning", "t_wall": 1e9 + 20}
    failed = {"type": "session_end", "session": 2, "t_wall": 1e9 + 20, "status": "FAILED", "exit_code": 1}
    mended = [{"type": "session_start", "session": 3, "kind": "resume"}]
    mended += [{"type": "step", "rank": 0, "session": 3, "step": 4, "t_mono": 40.0}]
    assert warning in replay([*events, noted, failed], project="t").header().warnings
    assert warning not in replay([*events, noted, failed, *mended], project="t").header().warnings

"""Training scripts kaio did not write, run unchanged through ``launch.script``: the record describes
the run that actually happened (model, LoRA, batch, world size, evaluations, other logged numbers),
and a loop with no Trainer is said plainly."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, kaio, read_history

SCRIPTS = REPO / "tests" / "scripts"


def _config(directory: Path, project: str, script: str, args: list[str], num_processes: int = 1) -> Path:
    path = directory / f"{project}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        project_name: {project}
        launch:
          script: {SCRIPTS / script}
          script_args: {json.dumps(args)}
          num_processes: {num_processes}
          grace_seconds: 20  # a graceful stop on a loaded machine: a save, then each process's exit
        reporting:
          use_comet_ml: false
          poll_hz: 4
          refresh_seconds: 5
        """)
    )
    return path


def _row(report: str, name: str) -> str:
    match = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", report, re.M)
    assert match, f"no row {name!r} in report.md"
    return match.group(1)


@pytest.fixture(scope="module")
def clm_two_ranks(tmp_path_factory):
    """run_clm-style, unchanged, as 2 processes on a host without GPUs, with evaluation every 4 steps."""
    directory = tmp_path_factory.mktemp("clm")
    args = [
        "--output_dir",
        str(directory / "out"),
        "--max_steps",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--learning_rate",
        "0.001",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "4",
        "--per_device_eval_batch_size",
        "4",
        "--do_eval",
        "--do_predict",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--seed",
        "3",
    ]
    cfg = _config(directory, "clm", "clm_train.py", args, num_processes=2)
    result = kaio("run", cfg.name, cwd=directory, timeout=300)
    return directory, result


@pytest.mark.xdist_group("clm")
def test_an_unchanged_script_on_two_cpu_ranks_is_one_job_of_world_size_two(clm_two_ranks):
    directory, result = clm_two_ranks
    assert result.returncode == 0, result.stdout + result.stderr
    history = read_history(directory, "clm")
    assert history["run"]["world_size"] == 2 and history["run"]["distributed_type"] == "MULTI_CPU"
    assert [s["step"] for s in history["steps"]] == list(range(1, 9))
    assert all(set(s["peak_vram_bytes"]) == {"0", "1"} for s in history["steps"])  # both ranks, every step
    # The script does not ask the Trainer to count tokens: kaio counts the input ids, 4 x 16 a rank and step.
    assert history["run"]["tokens_counted_by"] == "kaio"
    assert [s["tokens_seen"] for s in history["steps"]] == [128 * k for k in range(1, 9)]
    assert all(s["tokens_per_s_per_device"] == pytest.approx(64 / s["step_time_s"]) for s in history["steps"])
    assert not any("trained independently" in w for w in history["warnings"])
    journal = [json.loads(line) for line in (directory / "docs/reports/clm/journal.jsonl").read_text().splitlines()]
    for rank in (0, 1):
        assert [e["step"] for e in journal if e["type"] == "step" and e["rank"] == rank] == list(range(1, 9))
    assert [e["step"] for e in journal if e["type"] == "log" and "loss" in e] == list(range(1, 9))  # rank 0 only
    log = (directory / "docs/reports/clm/child.log").read_text()
    assert len(re.findall(r"\{'loss': ", log)) == 8  # each step logged once: one job, not two copies
    assert "{'n_train': 96, 'n_eval': 24}" in result.stdout and "{'loss'" not in result.stdout
    report = (directory / "docs/reports/clm/report.md").read_text()
    assert _row(report, "World size (processes)") == "2"
    assert _row(report, "Per-device batch size") == "4" and _row(report, "Effective batch size") == "8"
    assert _row(report, "Architecture") == "LlamaForCausalLM" and _row(report, "Max steps") == "8"
    assert _row(report, "Model") == "no name or path: built by the script, not loaded"
    assert _row(report, "PEFT").startswith("none")
    assert "tokens/s (kaio's count of rank 0's input ids × 2 ranks, padding included)" in _row(
        report, "Throughput (optimizer steps after each session's first)"
    )


@pytest.mark.xdist_group("clm")
def test_every_evaluation_is_kept_with_its_step(clm_two_ranks):
    directory, _ = clm_two_ranks
    history = read_history(directory, "clm")
    evals = history["evals"]
    assert [e["step"] for e in evals] == [4, 8, 8, 8]  # at 4 and 8, then trainer.evaluate(), trainer.predict()
    assert [e["after_training"] for e in evals] == [False, False, True, True]  # the script's own, told apart
    assert [e["prediction"] for e in evals] == [False, False, False, True]  # predict()'s, from on_predict
    assert all(e["metrics"]["eval_loss"] > 0 and "eval_runtime" in e["metrics"] for e in evals[:3])
    assert evals[3]["metrics"]["test_loss"] > 0 and "eval_loss" not in evals[3]["metrics"]
    assert history["run"]["eval_samples"] == 24 and history["run"]["train_samples"] == 96
    report = (directory / "docs/reports/clm/report.md").read_text()
    best = min(evals[:3], key=lambda e: e["metrics"]["eval_loss"])
    assert f"Best evaluation loss **{best['metrics']['eval_loss']:.4g}** at step {best['step']}" in report
    assert "## Evaluation" in report and "eval_loss" in report and "test_loss" in report
    assert "| 8 (after training) |" in report and "| 8 (after training, predict()) |" in report


def test_a_trl_style_trainer_with_its_own_lora_is_described_as_it_ran(project_dir):
    cfg = _config(project_dir, "sft", "sft_style.py", [str(project_dir / "out"), "5"])
    result = kaio("run", cfg.name, cwd=project_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    # Its metric lines come under the Trainer's progress bars (carriage returns, cursor moves): not echoed.
    assert "{'loss'" not in result.stdout and "it/s]" in result.stdout
    history = read_history(project_dir, "sft")
    assert history["run"]["peft"] == {
        "peft_type": "LORA",
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "adapted_modules": ["q_proj", "v_proj"],
    }
    assert history["steps"][-1]["metrics"]["mean_token_accuracy"] == 0.25
    assert history["steps"][-1]["metrics"]["num_tokens"] == 5 * 3 * 2 * 12  # steps x accumulation x batch x tokens
    report = (project_dir / "docs/reports/sft/report.md").read_text()
    assert _row(report, "PEFT") == "LORA r=8 alpha=16 dropout=0 on q_proj, v_proj"
    assert _row(report, "Architecture") == "LlamaForCausalLM"
    assert _row(report, "Per-device batch size") == "2" and _row(report, "Gradient accumulation steps") == "3"
    assert _row(report, "Effective batch size") == "6" and _row(report, "Learning rate") == "0.003"
    # kaio's recipe keys play no part in a script's run, and the report does not pretend they did.
    assert "kaio/tiny-llama" not in report and '"lora"' not in report


def test_a_script_training_in_two_phases_with_two_trainers_is_one_step_axis_the_second_after_the_first(
    project_dir,
):
    """Phase 1: 6 steps of 4 samples, then an evaluation; phase 2, a new Trainer counting from 0 again: 4 steps
    of 2 samples, an evaluation. The record has steps 1..10 once each, phase 2's after phase 1's."""
    truth = project_dir / "logged.json"
    cfg = _config(project_dir, "phases", "two_phases.py", [str(truth), str(project_dir / "out")])
    result = kaio("run", cfg.name, cwd=project_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = json.loads(truth.read_text())
    history = read_history(project_dir, "phases")
    steps = history["steps"]
    assert [s["step"] for s in steps] == list(range(1, 11))
    expected = [e["loss"] for e in first if "loss" in e] + [e["loss"] for e in second if "loss" in e]
    assert [s["loss"] for s in steps] == pytest.approx(expected)  # each phase's own losses, in order
    assert [s["samples_seen"] for s in steps] == [4, 8, 12, 16, 20, 24, 26, 28, 30, 32]
    evals = [(e["step"], e["metrics"]["eval_loss"]) for e in history["evals"]]
    truth_evals = [(6, first[-1]["eval_loss"]), (10, second[-1]["eval_loss"])]
    assert evals == [(step, pytest.approx(loss)) for step, loss in truth_evals]
    assert history["run"]["max_steps"] == 10 and history["run"]["args"]["per_device_train_batch_size"] == 2
    (session,) = history["sessions"]
    assert (session["start_step"], session["end_step"], session["status"]) == (0, 10, "COMPLETED")
    assert any("training 2 of the script" in n and "recorded from step 7" in n for n in history["telemetry"]["notes"])
    report = (project_dir / "docs/reports/phases/report.md").read_text()
    assert "**Optimizer steps:** 10 of 10 planned" in report and _row(report, "Samples processed") == "32"
    # Extended (a longer run in its arguments), the script would get its second phase's checkpoint in its first
    # phase's train(): refused, saying why.
    longer = re.sub(r"(script_args: \[.*)\]", r'\1, "--longer"]', cfg.read_text())
    (project_dir / "longer.yaml").write_text(longer)
    resumed = kaio("resume", "phases", "--config", "longer.yaml", cwd=project_dir)
    assert resumed.returncode == 2
    assert "out/b/checkpoint-4, was saved by the script's training 2" in resumed.stderr, resumed.stderr


def test_a_plain_loop_without_a_trainer_is_said_plainly_and_reports_through_kaio_log(project_dir):
    cfg = _config(project_dir, "plain", "plain_loop.py", ["6"])
    # A folder named kaio where kaio runs (its clone's parent folder, with the README's editable install): the
    # script's `import kaio` is kaio's, not that folder (`python -m` put the folder kaio runs in on the path).
    (project_dir / "kaio").mkdir()
    result = kaio("run", cfg.name, "--plain", cwd=project_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    history = read_history(project_dir, "plain")
    assert history["run"]["reporter"] == "kaio.log"
    assert [s["step"] for s in history["steps"]] == list(range(1, 7))
    assert all(s["loss"] is not None and s["metrics"]["my_metric"] == s["step"] / 10 for s in history["steps"])
    assert [s["tokens_seen"] for s in history["steps"]] == [512 * k for k in range(1, 7)]
    assert [s["samples_seen"] for s in history["steps"]] == [64 * k for k in range(1, 7)]
    assert [(e["step"], e["metrics"]) for e in history["evals"]] == [  # the step's evaluation, not a new step
        (s["step"], {"eval_mse": pytest.approx(s["loss"] / 2)}) for s in history["steps"] if s["step"] in (3, 6)
    ]
    assert all(s["step_time_s"] > 0 for s in history["steps"])
    report = (project_dir / "docs/reports/plain/report.md").read_text()
    assert "A training loop without a transformers `Trainer`, reporting its steps through `kaio.log`" in report
    assert "Host CPU (average) / RAM used (peak)" in report
    # kaio push uploads the recipe's final adapter: a script's project is told where its push belongs, not to
    # resume a completed run.
    pushed = kaio("push", "plain", cwd=project_dir, timeout=60)  # no repo id: the same answer, not "pass --repo-id"
    assert pushed.returncode == 2 and "trained with your own code (launch.script " in pushed.stderr
    assert "push your model from it (the Trainer's push_to_hub=True" in pushed.stderr and "resume" not in pushed.stderr


def test_kaio_log_outside_kaio_does_nothing(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "light_loop.py"), "3"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "light loop done" in result.stdout and not list(tmp_path.iterdir())


def test_a_script_ends_as_python_would_end_it_threads_then_exit_handlers_then_open_files(project_dir):
    """kaio ends a rank whose script succeeded on gloo before the interpreter's finalization (where gloo can
    abort a finished rank); what a script can observe of a normal exit still happens, in its order."""
    script = project_dir / "exits.py"
    script.write_text(
        textwrap.dedent("""\
        import atexit, socket, sys, threading, time
        from concurrent.futures import ThreadPoolExecutor

        import torch.distributed as dist

        with socket.socket() as s:  # a gloo group, as a CPU job's: kaio ends this rank before finalization
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        sys.held = open("unclosed.txt", "w")  # alive to the end, as a module's log file is; never flushed
        sys.held.write("kept\\n")
        sys.pool = ThreadPoolExecutor(1)  # an idle pool worker: Python's thread shutdown wakes it (or it hangs)
        sys.pool.submit(print, "pool task")

        def late():
            time.sleep(0.5)
            with open("thread.txt", "w") as f:
                f.write("done\\n")

        def handler():
            with open("atexit.txt", "w") as f:
                f.write("thread finished first\\n" if open("thread.txt").read() == "done\\n" else "too early\\n")

        atexit.register(handler)
        threading.Thread(target=late).start()
        sys.exit(0)
        """)
    )
    cfg = project_dir / "exits.yaml"
    cfg.write_text(f"project_name: exits\nlaunch:\n  script: {script}\nreporting:\n  use_comet_ml: false\n")
    result = kaio("run", cfg.name, "--plain", cwd=project_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETED" in result.stdout
    assert (project_dir / "unclosed.txt").read_text() == "kept\n"
    assert (project_dir / "atexit.txt").read_text() == "thread finished first\n"


def test_recipe_keys_a_script_never_sees_are_refused_before_anything_starts(project_dir):
    cfg = _config(project_dir, "refused", "plain_loop.py", ["3"])
    cfg.write_text(cfg.read_text() + "training:\n  max_steps: 5\n")
    result = kaio("run", cfg.name, cwd=project_dir)
    assert result.returncode == 2
    assert "training.max_steps: your script (launch.script) never sees this key" in result.stderr
    assert "launch.script_args" in result.stderr
    cfg.write_text(cfg.read_text().replace("training:\n  max_steps: 5\n", "hub:\n  push: true\n  repo_id: a/b\n"))
    pushing = kaio("run", cfg.name, cwd=project_dir)  # the recipe's adapter, which a script does not write
    assert pushing.returncode == 2 and "hub.push: kaio pushes the built-in recipe's final adapter" in pushing.stderr
    cfg.write_text(cfg.read_text().replace("hub:\n  push: true\n  repo_id: a/b\n", ""))
    cfg.write_text(cfg.read_text().replace("training:\n  max_steps: 5\n", ""))
    flag = kaio("run", cfg.name, "--max-steps", "5", cwd=project_dir)
    assert flag.returncode == 2 and flag.stderr.startswith("kaio: error: --max-steps: your script")
    assert not (project_dir / "docs").exists()


def test_a_script_with_no_trainer_and_no_kaio_log_is_said_plainly_and_its_exit_code_is_kaios(project_dir):
    script = project_dir / "no_trainer.py"
    script.write_text("import sys\nprint('just printing')\nsys.exit(3)\n")
    cfg = project_dir / "nt.yaml"
    cfg.write_text(f"project_name: nt\nlaunch:\n  script: {script}\nreporting:\n  use_comet_ml: false\n  poll_hz: 4\n")
    result = kaio("run", cfg.name, "--plain", cwd=project_dir)
    assert result.returncode == 3, result.stdout + result.stderr  # the script's own code, as the README says
    assert "CalledProcessError" not in result.stdout + result.stderr  # no traceback of kaio's launcher
    session = read_history(project_dir, "nt")["sessions"][0]
    assert (session["status"], session["exit_code"], session["training_ended"]) == ("FAILED", 3, None)
    report = (project_dir / "docs/reports/nt/report.md").read_text()
    assert "no transformers `Trainer` began training before the script failed" in report
    assert "- **Optimizer steps:** none recorded (no Trainer began training before the script failed" in report
    assert "`kaio.log(step=..., loss=...)`" in report
    assert "no finite loss logged" not in report  # nothing suggests NaN losses
    assert "Host CPU (average) / RAM used (peak)" in report


def test_a_file_locked_by_a_stuck_daemon_thread_does_not_hang_the_ranks_end(tmp_path):
    """A daemon thread blocked in a write to a full pipe holds that file's lock: flushing it at the end would
    wait for ever (a rank hung for 5 minutes in CI after a finished run). The rank ends after the flush budget,
    with its code, and the files that could be flushed are."""
    import subprocess
    import sys
    import time

    script = tmp_path / "stuck.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, threading, time
            from kaio.child import quick_exit
            quick_exit.FLUSH_BUDGET_S = 1.0
            kept = open({str(tmp_path / "kept.txt")!r}, "w")
            kept.write("kept\\n")
            read_end, write_end = os.pipe()  # nobody reads: a write larger than the pipe blocks
            stuck = open(write_end, "wb", buffering=1 << 20)
            threading.Thread(target=lambda: (stuck.write(b"x" * (1 << 21)), stuck.flush()), daemon=True).start()
            time.sleep(0.5)
            quick_exit.exit_after_script(0)
            """
        )
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30
    assert (tmp_path / "kept.txt").read_text() == "kept\n"


def test_a_stopped_scripts_code_after_train_does_not_run_on_the_half_trained_model(project_dir):
    """Ctrl-C: the Trainer saves a checkpoint and returns early, and kaio makes `train()` raise there, as a Ctrl-C
    without kaio would: the script's evaluation (or its save of a "final" model, its push) after `train()` is
    skipped, with no failure said."""
    import signal

    from conftest import journal_steps, spawn_kaio, wait_for

    args = ["--output_dir", "out", "--max_steps", "5000", "--per_device_train_batch_size", "4", "--logging_steps", "1"]
    args += ["--save_strategy", "steps", "--save_steps", "10000", "--do_eval", "--report_to", "none"]
    # DataLoader workers: the stop's SIGTERM reaches the rank's whole process group, workers included (and a
    # scheduler's reaches every process of the job); they must live on to the checkpoint.
    args += ["--dataloader_num_workers", "2"]
    _config(project_dir, "t", "clm_train.py", args)
    proc = spawn_kaio("run", "t.yaml", "--plain", cwd=project_dir)
    wait_for(lambda: journal_steps(project_dir) >= 5, 120, "a few steps")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    history = read_history(project_dir)
    stopped_at = max(s["step"] for s in history["steps"])
    assert history["status"] == "INTERRUPTED" and (project_dir / f"out/checkpoint-{stopped_at}").is_dir()
    assert history["evals"] == []  # trainer.evaluate() after train() did not run
    assert not list((project_dir / "docs/reports/t/errors").glob("error-*.json"))  # no rank failed
    assert "Traceback" not in (project_dir / "docs/reports/t/child.log").read_text()
    assert "outlived the launcher" not in output  # the workers ended with their rank


def test_a_ctrl_c_in_the_scripts_work_after_its_training_reaches_its_own_handler_and_offers_no_resume(project_dir):
    """The training ended (its checkpoint saved); the script's long work after `train()` is interrupted as a
    Ctrl-C without kaio would interrupt it (its `except KeyboardInterrupt:` runs), and kaio says the training
    had ended rather than offering a resume that would refuse."""
    import signal

    from conftest import spawn_kaio, wait_for

    _config(project_dir, "t", "post_train_work.py", [])
    proc = spawn_kaio("run", "t.yaml", "--plain", cwd=project_dir)
    child_log = project_dir / "docs/reports/t/child.log"
    wait_for(
        lambda: child_log.is_file() and "final evaluation, batch 3" in child_log.read_text(), 120, "the work after"
    )
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert "interrupted in the final evaluation: cleaning up" in child_log.read_text()
    assert proc.returncode == 143, output  # a Ctrl-C's, whatever the script's handler exited with (3)
    assert "stopped after the training had ended (step 4)" in output
    assert "kaio resume" not in output
    history = read_history(project_dir)
    assert max(s["step"] for s in history["steps"]) == 4


def test_a_ctrl_c_once_the_script_has_returned_cuts_nothing_short_and_the_run_completed(project_dir):
    """Only the interpreter's exit is left (its exit handlers, 1-2 s of teardown with transformers loaded): a
    Ctrl-C there, as the dashboard shows the run at its end, used to kill the rank and record a finished run as
    interrupted. The ranks now ignore a stop then, and kaio sends none once every rank's script has returned (torch
    elastic's agent, which runs several ranks, would end the job as killed); the run is COMPLETED."""
    import signal

    from conftest import spawn_kaio, wait_for

    script = project_dir / "ends_slowly.py"
    script.write_text(
        "import atexit, time, kaio\n"
        "for step in range(1, 4):\n"
        "    kaio.log(step=step, loss=1.0 / step)\n"
        "atexit.register(time.sleep, 3)  # the interpreter's exit, made long enough to be reached\n"
        "print('script done', flush=True)\n"
    )
    (project_dir / "cfg.yaml").write_text(
        f"project_name: t\nlaunch:\n  script: {script}\n  num_processes: 2\nreporting:\n  use_comet_ml: false\n"
    )
    proc = spawn_kaio("run", "cfg.yaml", "--plain", cwd=project_dir)
    journal = project_dir / "docs/reports/t/journal.jsonl"
    ended = lambda: journal.is_file() and journal.read_text().count('"type":"script_end"') == 2  # noqa: E731
    wait_for(ended, 120, "both ranks' scripts to return")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    history = read_history(project_dir)
    assert history["status"] == "COMPLETED" and history["sessions"][0]["exit_code"] == 0
    assert "a stop was asked for as the script's processes were exiting, its work done: it completed" in " ".join(
        history["telemetry"]["notes"]
    )


def test_the_comet_ml_kaio_installs_does_not_make_transformers_warn_in_the_users_script():
    """transformers (and TRL at every save) warn that comet_ml has no API key whenever it is installed: kaio
    installed it, for its own sink in the supervisor, so the training process drops that one warning (its text
    read from the installed transformers, not imported: seconds), and no other."""
    import importlib.util
    import logging
    from pathlib import Path

    from kaio.child import patch

    spec = importlib.util.find_spec("transformers")
    assert spec is not None and spec.submodule_search_locations
    source = Path(next(iter(spec.submodule_search_locations))) / "integrations" / "integration_utils.py"
    assert patch._COMET_KEY_WARNING in source.read_text()  # the warning as this transformers words it
    patch._hide_warnings_about_kaios_comet_ml()
    logger = logging.getLogger("transformers.integrations.integration_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)  # on the logger itself: transformers may stop its records propagating
    try:
        logger.warning(patch._COMET_KEY_WARNING + ". Please set the `COMET_API_KEY` environment variable")
        logger.warning("comet_ml version 1.0 is installed, but version 3.43.2 or higher is required")
    finally:
        logger.removeHandler(handler)
    assert [message[:17] for message in seen] == ["comet_ml version "]


def test_a_script_refusing_its_arguments_is_named_with_argparses_own_message(project_dir):
    """A typo in launch.script_args: argparse prints its error and exits 2, which the record read as
    'rank 0: SystemExit: 2' with the message only in child.log."""
    script = project_dir / "run_glue.py"
    script.write_text(
        "import argparse\nparser = argparse.ArgumentParser()\n"
        "parser.add_argument('--lr_scheduler_type', choices=['linear', 'cosine'])\nparser.parse_args()\n"
    )
    cfg = project_dir / "typo.yaml"
    cfg.write_text(
        f"project_name: typo\nlaunch:\n  script: {script}\n  script_args: [--lr_scheduler_type, cosin]\n"
        "reporting:\n  use_comet_ml: false\n"
    )
    result = kaio("run", cfg.name, "--plain", cwd=project_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    error = read_history(project_dir, "typo")["sessions"][0]["error"]
    assert error.startswith("rank 0: the script's arguments: run_glue.py: error: argument --lr_scheduler_type")
    assert "invalid choice: 'cosin'" in error


def test_a_module_in_a_package_runs_as_python_m_runs_it(project_dir):
    """`python -m mypkg.train` (relative imports, the package in the folder kaio runs in), as axolotl's
    `accelerate launch -m axolotl.cli.train` is: launch.module, its arguments in script_args. As a script it failed
    with "attempted relative import with no known parent package"."""
    package = project_dir / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "common.py").write_text("LOSS = 2.0\n")
    (package / "train.py").write_text(
        textwrap.dedent(
            """\
            import sys

            import kaio

            from .common import LOSS

            steps = int(sys.argv[1])
            for step in range(1, steps + 1):
                kaio.log(step=step, loss=LOSS + 1 / step, learning_rate=1e-3)
            print(f"trained {steps} steps as {__name__} from {__spec__.name}, argv[0] {sys.argv[0].split('/')[-1]}")
            """
        )
    )
    (project_dir / "cfg.yaml").write_text(
        "project_name: t\nlaunch:\n  module: mypkg.train\n  script_args: ['6']\nreporting:\n  use_comet_ml: false\n"
    )
    result = kaio("run", "cfg.yaml", cwd=project_dir, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trained 6 steps as __main__ from mypkg.train, argv[0] train.py" in result.stdout
    history = read_history(project_dir)
    assert [s["step"] for s in history["steps"]] == list(range(1, 7)) and history["status"] == "COMPLETED"
    assert history["config"]["launch"]["module"] == "mypkg.train" and "model" not in history["config"]
    command = history["run"]["environment"]["argv"]  # the command that runs it again: not its file alone
    assert command[1:] == ["-m", "mypkg.train", "6"]

    # Resumed from another folder that holds another copy of the package: refused, not run with the other code.
    elsewhere = project_dir / "elsewhere"
    shutil.copytree(package, elsewhere / "mypkg")
    shutil.copy(project_dir / "cfg.yaml", elsewhere / "cfg.yaml")
    reports = str(project_dir / "docs" / "reports")
    result = kaio("resume", "t", "--output-dir", reports, "--config", "cfg.yaml", cwd=elsewhere, timeout=60)
    assert result.returncode == 2
    assert f"project 't' ran `-m mypkg.train` from {(package / 'train.py').resolve()}; from {elsewhere} that is" in (
        result.stderr
    )

    # Where the package is not: the record is rebuilt all the same; a resume says where to run it from.
    nowhere = project_dir / "nowhere"
    nowhere.mkdir()
    assert kaio("report", "t", "--output-dir", reports, cwd=nowhere, timeout=120).returncode == 0
    result = kaio("resume", "t", "--output-dir", reports, cwd=nowhere, timeout=60)
    assert result.returncode == 2 and "module 'mypkg.train' not found: no 'mypkg' in" in result.stderr
    assert "resume from the folder the run started in" in result.stderr

    # A module that is not there, or both a script and a module: one line before anything starts.
    (project_dir / "bad.yaml").write_text("project_name: u\nlaunch:\n  module: nopkg.train\n")
    result = kaio("run", "bad.yaml", cwd=project_dir, timeout=60)
    assert result.returncode == 2 and "module 'nopkg.train' not found: no 'nopkg' in" in result.stderr
    (project_dir / "typo.yaml").write_text("project_name: u\nlaunch:\n  module: mypkg.trian\n")  # found before it runs
    result = kaio("run", "typo.yaml", cwd=project_dir, timeout=60)
    assert result.returncode == 2 and "module 'mypkg.trian' not found: no 'trian' in package 'mypkg'" in result.stderr
    (project_dir / "both.yaml").write_text("project_name: u\nlaunch:\n  module: mypkg.train\n  script: nowhere.py\n")
    result = kaio("run", "both.yaml", cwd=project_dir, timeout=60)
    assert result.returncode == 2 and "launch.script and launch.module both set" in result.stderr

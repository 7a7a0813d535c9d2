"""Run health: a hang explained by every rank's stack, a NaN loss caught even when the Trainer's logs hide it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import textwrap
import time

import psutil
import pytest

from conftest import REPO, journal_steps, kaio, read_history, spawn_kaio, wait_for
from kaio.record.types import Eval, Log, Pause, RunStart, Save, Step, TrainEnd
from kaio.run.stalls import PAUSE_BUDGET_S, STARTUP_BUDGET_S, StallWatch, where_it_waits

FAULTY = REPO / "tests" / "scripts" / "faulty_train.py"


def _config(project_dir, args: list[str], reporting: str) -> None:
    (project_dir / "cfg.yaml").write_text(
        f"project_name: t\nlaunch:\n  script: {FAULTY}\n  script_args: {json.dumps(args)}\n  grace_seconds: 2\n"
        "reporting:\n  use_comet_ml: false\n  poll_hz: 4\n" + textwrap.indent(reporting, "  ")
    )


def test_a_hidden_nan_is_warned_at_its_step_and_a_hang_is_a_stall_with_every_ranks_stack(project_dir):
    """Under default TrainingArguments (logging_nan_inf_filter on) the loss is NaN from step 5, which the
    Trainer logs as 0; then the script sleeps forever at the end of step 10. kaio says where."""
    _config(
        project_dir,
        ["40", "1000", "--nan-at", "5", "--fault", "hang", "--at", "10"],
        "stall_seconds: 3\non_stall: stop\n",
    )
    result = kaio("run", "cfg.yaml", cwd=project_dir, timeout=120)
    assert result.returncode in (137, 143), result.stdout + result.stderr
    history = read_history(project_dir)
    steps = history["steps"]
    assert [s["step"] for s in steps] == list(range(1, 10))  # step 10 never ended
    assert all(s["loss"] is not None for s in steps[:4])
    assert all(s["loss"] is None and s["loss_nonfinite"] == "nan" for s in steps[4:])
    assert all(s["grad_norm"] is None and s["grad_norm_nonfinite"] == "nan" for s in steps[4:])
    nan_warnings = [w for w in history["warnings"] if "non-finite loss" in w]
    assert nan_warnings == [
        "non-finite loss (nan) at step 5; the Trainer logged 0 (its logging_nan_inf_filter hides NaN/inf losses)"
    ]
    # The stall: after step 9, within a training step; rank 0's stack names the sleeping line.
    (stall,) = history["stalls"]
    assert stall["step"] == 9 and stall["phase"] == "training step" and stall["action"] == "stop"
    (rank,) = stall["ranks"]
    sleep_line = FAULTY.read_text().splitlines().index("        time.sleep(3600)") + 1
    assert rank["rank"] == 0 and rank["where"] == f"wait_forever at faulty_train.py:{sleep_line}: time.sleep(3600)"
    stack = (project_dir / "docs/reports/t" / rank["stack_file"]).read_text()
    assert f'faulty_train.py", line {sleep_line} in wait_forever' in stack and "in on_step_end" in stack
    said = f"stall after step 9 (training step, no step for 3 s): rank 0 in {rank['where']}"
    assert said in history["warnings"]
    for warning in (nan_warnings[0], said):  # said as they came: a CI log has no warnings panel
        assert f"kaio: warning: {warning}" in result.stdout
    report = (project_dir / "docs/reports/t/report.md").read_text()
    assert "## Stalls" in report and f"[stack]({rank['stack_file']})" in report
    assert history["status"] == "INTERRUPTED"


def test_on_nonfinite_stop_ends_the_training_at_the_log_that_finds_it_and_fails_the_run(project_dir):
    """Logged every 4 steps: the NaN of step 15 is found at the log of step 16, named at step 15, and the
    training stops there on every rank, failed, with no final save."""
    _config(project_dir, ["40", "1000", "--fault", "nan", "--at", "15", "--logging-steps", "4"], "on_nonfinite: stop\n")
    result = kaio("run", "cfg.yaml", cwd=project_dir, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    history = read_history(project_dir)
    assert [s["step"] for s in history["steps"]][-1] == 16
    session = history["sessions"][0]
    assert history["status"] == "FAILED" and session["status"] == "FAILED"
    assert (
        "the training loss was not finite from step 15 on; stopped at step 16, the log that found it"
        in (session["error"])
    )
    assert "reporting.on_nonfinite: stop" in session["error"]
    (warning,) = [w for w in history["warnings"] if "non-finite loss" in w]
    assert warning.startswith("non-finite loss (nan) from step 15 (logged at step 16); the Trainer logged ")


def test_a_straggler_is_named_with_its_parts_and_slurms_warning_to_every_process_stops_the_job_with_a_checkpoint(
    project_dir,
):
    """Two ranks on gloo; rank 1 takes 20 ms more per example it loads (4 a step: 80 ms) and 20 ms more per
    forward. Both ranks end every step together (DDP), yet kaio names rank 1, with where its time goes.
    Then SLURM's time-limit warning (`srun --signal=USR1@90`) reaches every process of the job step, twice:
    kaio, the launcher (torch elastic's agent) and both ranks, and then its SIGTERM. None dies of either; the job
    saves a checkpoint at the end of the step and stops, once."""
    # And a NaN loss value at step 5 that the Trainer's running sum keeps (its logging_nan_inf_filter off): the
    # record's later losses are the steps' own, the ranks' mean as the Trainer would log it.
    losses = str(project_dir / "losses-{rank}.txt")
    fault = ["--rank", "1", "--slow-data", "0.02", "--slow-forward", "0.02"]
    _config(project_dir, ["400", "1000", *fault, "--nan-value-at", "5", "--no-nan-filter", "--losses-to", losses], "")
    cfg = project_dir / "cfg.yaml"
    # Two ranks saving a checkpoint on a busy 2-core machine: more than the hang tests' 2 s of grace.
    text = cfg.read_text().replace("launch:\n", "launch:\n  num_processes: 2\n")
    cfg.write_text(text.replace("grace_seconds: 2", "grace_seconds: 60"))
    proc = spawn_kaio("run", "cfg.yaml", "--plain", cwd=project_dir)
    wait_for(lambda: journal_steps(project_dir) >= 2 * 25, 150, "25 steps of both ranks")
    everyone = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(everyone) >= 4  # kaio, the launcher, two ranks
    for _ in range(2):
        for pid in everyone:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
    # Then the time limit's SIGTERM, to every process too, while the step ends and the checkpoint is saved: each
    # rank gets it twice (the scheduler's, and torch elastic's agent passing its own on). That killed the ranks.
    time.sleep(0.3)
    for pid in everyone:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode == 143, output
    assert "SignalException" not in output  # torch elastic's agent stopping its ranks: the stop, not a crash
    # The job's log says why it stops, at once (a SIGTERM from the scheduler later would not change it).
    assert "STOPPING (SIGUSR1: the scheduler's time is nearly up; a second Ctrl-C or SIGTERM kills it)" in output
    history = read_history(project_dir)
    n = max(s["step"] for s in history["steps"])
    assert history["status"] == "INTERRUPTED" and 25 <= n < 400
    assert (project_dir / f"trainer-output/checkpoint-{n}/trainer_state.json").is_file()
    notes = history["telemetry"]["notes"]
    assert "the scheduler warned that the job's time is nearly up (SIGUSR1): stopping gracefully" in notes
    assert not any("killed" in note for note in notes) and history["sessions"][0]["error"] is None

    fast, slow = history["ranks"]
    assert (fast["rank"], slow["rank"]) == (0, 1) and fast["steps"] == slow["steps"] == n
    # A busy machine may make rank 0 slow for a step now and then: nearly always rank 1, not always.
    assert slow["slowest"] >= 0.9 * n and fast["slowest"] == n - slow["slowest"]
    assert slow["data_s"] / n == pytest.approx(0.08, abs=0.02) and fast["data_s"] / n < 0.01
    assert slow["forward_s"] / n - fast["forward_s"] / n == pytest.approx(0.02, abs=0.008)
    lags = sorted(s["rank_lag_s"] for s in history["steps"] if s["slowest_rank"] == 1)
    assert lags[len(lags) // 2] == pytest.approx(0.1, abs=0.025)  # the median step: 80 ms of data, 20 of forward
    (warning,) = [w for w in history["warnings"] if w.startswith("straggler:")]
    assert re.match(r"straggler: rank 1 \(.+\) was the slowest in (1[5-9]|20) of the last 20 steps", warning)
    assert "data loading +0.0" in warning and "forward +0.0" in warning
    report = (project_dir / "docs/reports/t/report.md").read_text()
    assert "## Ranks" in report and f"| {slow['slowest']:,} of {n:,} |" in report

    # Each rank's model loss is its tokens' loss over all ranks' tokens (transformers' average_tokens_across_devices):
    # the Trainer logs their sum, as its own logs of steps 1-4 show, and kaio's from step 6 on are the same.
    rank_0, rank_1 = ([float(v) for v in (project_dir / f"losses-{r}.txt").read_text().split()] for r in (0, 1))
    logged = {s["step"]: s["loss"] for s in history["steps"]}
    assert logged[5] is None and history["steps"][4]["loss_nonfinite"] == "nan"
    for k in [*range(1, 5), *range(6, n + 1)]:
        assert logged[k] == pytest.approx(rank_0[k - 1] + rank_1[k - 1], rel=1e-6), k
    # That one NaN value's gradients were finite (the weights healthy), yet the Trainer logged NaN at every later
    # step, its running sum never clearing it: the record says so, once, and keeps each step's own loss.
    trainer_logged = [line for line in (project_dir / "docs/reports/t/child.log").read_text().splitlines()]
    trainer_logged = [line for line in trainer_logged if "'loss'" in line]
    assert len(trainer_logged) == n and all("'loss': 'nan'" in line for line in trainer_logged[4:])
    assert [w for w in history["warnings"] if "logging_nan_inf_filter=False" in w] == [
        "the Trainer logged a nan training loss from step 6 on, though every loss since the one before was finite: "
        "with logging_nan_inf_filter=False its running loss sum keeps an earlier NaN/inf to the end; the record's "
        "loss from there is kaio's, the average of the losses training_step returned, as the Trainer averages them"
    ]
    assert f"→ {logged[n]:.4g}" in report and "loss was NaN at 1 logged step (first at step 5)" in report
    # What only the whole history shows is said at the end too, and the record's line counts every warning.
    assert "kaio: warning: loss was NaN at 1 logged step (first at step 5)" in output
    listed = report.split("## Warnings")[1].split("\n## ")[0].count("⚠️")
    assert f"record: docs/reports/t/report.md ({listed} warnings) · " in output and listed >= 3


@pytest.mark.parametrize(
    ("slowest", "lag_s", "flagged"),
    [
        ([0, 1] * 10, 0.2, None),  # the slowest rank alternates: noise
        ([1] * 20, 0.004, None),  # always rank 1, but by less than 10% of a step (and 5 ms)
        ([1] * 4 + [0] + [1] * 15, 0.2, 1),  # rank 1 in 19 of 20 steps, by 0.2 s of a 1 s step
        # 16 of 20 is over 75%, but of two equal ranks one is the slowest in 15 of 20 every 50 windows or so: a
        # two-rank run (run_glue) was warned about in 4 runs of 5, with an even split over the run.
        ([1] * 4 + [0, 0, 0, 0] + [1] * 12, 0.2, None),
    ],
)
def test_a_straggler_is_a_rank_consistently_slowest_by_more_than_noise(slowest, lag_s, flagged):
    from kaio.record.types import RunStart
    from kaio.run.stragglers import StragglerWatch

    watch = StragglerWatch()
    for rank in (0, 1):
        watch.on_run_start(RunStart(rank=rank, world_size=2, hostname=f"node{rank}", device=f"cuda:{rank}"))
    warnings = []
    for step, slow in enumerate(slowest, start=1):
        for rank in (0, 1):
            data = 0.01 + (lag_s if rank == slow else 0.0)
            found = watch.on_step(Step(rank=rank, step=step, step_time_s=1.0, data_s=data, forward_s=0.02))
        assert found is not None and found.slowest_rank == slow and found.lag_s == pytest.approx(lag_s)
        warnings += [found.warning] if found.warning else []
    assert watch.flagged == flagged
    if flagged is None:
        assert warnings == []
    else:
        assert warnings == [
            "straggler: rank 1 (node1, cuda:1) was the slowest in 19 of the last 20 steps, 0.2 s a step behind "
            "the other ranks (data loading +0.2 s, forward +0 s)"
        ]


# ----------------------------------------------------------------------------- without processes

ALL_REDUCE_STACK = """\
Thread 0x00007f452458e6c0 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
  File "/usr/lib/python3.11/threading.py", line 1045 in _bootstrap_inner
  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap

Current thread 0x00007f454c659b80 (most recent call first):
  File "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 2801 in all_reduce
  File "/venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py", line 81 in wrapper
  File "/venv/lib/python3.11/site-packages/transformers/trainer.py", line 2490 in _maybe_log_save_evaluate
  File "/venv/lib/python3.11/site-packages/transformers/trainer.py", line 1957 in _run_epoch
  File "/home/me/train.py", line 12 in <module>
"""


def test_where_a_rank_waits_is_its_main_threads_innermost_frame_and_the_code_that_called_that_library():
    assert (
        where_it_waits(ALL_REDUCE_STACK)
        == "all_reduce (torch distributed_c10d.py:2801) ← _maybe_log_save_evaluate at trainer.py:2490"
    )
    assert where_it_waits("") is None
    assert where_it_waits("Fatal Python error: nothing we know\n") is None


@pytest.mark.parametrize(
    ("events", "phase", "threshold"),
    [
        ([], "start-up", STARTUP_BUDGET_S),
        ([Step(rank=0, step=3)], "training step", 5.0),
        ([Step(rank=0, step=3, evaluates=True, saves=True)], "evaluation", PAUSE_BUDGET_S),
        (
            [
                Step(rank=0, step=3, evaluates=True, saves=True),
                Eval(rank=0, step=3, metrics={"eval_runtime": 400.0}),
            ],
            "checkpoint save",
            PAUSE_BUDGET_S,
        ),
        (
            [
                Step(rank=0, step=3, saves=True),
                Save(rank=0, step=3, duration_s=250.0),
                Step(rank=0, step=6, saves=True),
            ],
            "checkpoint save",
            750.0,  # 3x the longest save so far
        ),
        ([Step(rank=0, step=3, saves=True), Save(rank=0, step=3)], "training step", 5.0),
        # Several eval datasets: each is evaluated on its own (an Eval each); the evaluation lasts until the last.
        (
            [
                RunStart(rank=0, eval_sets=2),
                Step(rank=0, step=3, evaluates=True),
                Eval(rank=0, step=3, metrics={"eval_a_loss": 1.0, "eval_a_runtime": 400.0}),
            ],
            "evaluation",
            1200.0,  # 3x the longest evaluation so far, its eval_a_runtime
        ),
        (
            [
                RunStart(rank=0, eval_sets=2),
                Step(rank=0, step=3, evaluates=True),
                Eval(rank=0, step=3, metrics={"eval_a_runtime": 1.0}),
                Eval(rank=0, step=3, metrics={"eval_b_runtime": 1.0}),
            ],
            "training step",
            5.0,
        ),
        # Before the first step (eval_on_start, one eval dataset after another): still starting up.
        (
            [RunStart(rank=0, eval_sets=2), Eval(rank=0, step=0, metrics={"eval_a_runtime": 1.0})],
            "start-up",
            STARTUP_BUDGET_S,
        ),
        # The script's own work after its Trainer ended (a final evaluate, merging weights): not a training step.
        ([Step(rank=0, step=3), TrainEnd(rank=0, step=3), Eval(rank=0, step=3)], "after training", 1200.0),
        # An evaluation and save the step's event could not announce (an epoch strategy's, set at the epoch's end;
        # a later callback's; the script's own evaluate() from a callback): announced after it.
        ([Step(rank=0, step=4), Pause(rank=0, step=4, evaluates=True, saves=True)], "evaluation", PAUSE_BUDGET_S),
        (
            [Step(rank=0, step=4), Pause(rank=0, step=4, evaluates=True, saves=True), Eval(rank=0, step=4)],
            "checkpoint save",
            PAUSE_BUDGET_S,
        ),
        ([Step(rank=0, step=4), Pause(rank=1, step=4, evaluates=True)], "training step", 5.0),  # the lead rank's
        # The Trainer's end, from its closing log (loading the best checkpoint, pruning): not a training step.
        ([Step(rank=0, step=3), Log(rank=0, step=3, extra={"train_loss": 2.0})], "after training", 1200.0),
        ([Step(rank=0, step=3), Log(rank=0, step=3, extra={"train_runtime": 2.0})], "training step", 5.0),
    ],
)
def test_each_phase_has_its_own_budget(events, phase, threshold):
    watch = StallWatch(stall_seconds=5.0, now=100.0)  # a session starts at 100 s
    for event in events:
        watch.seen(event, 100.0)
    assert watch.phase == phase and watch.threshold_s(median_step_s=0.1) == threshold
    assert watch.check(100.0 + threshold - 0.5, 0.1) is None
    stall = watch.check(100.0 + threshold + 0.5, 0.1)
    assert stall is not None and stall.phase == phase
    assert watch.check(100.0 + threshold + 60, 0.1) is None  # once per silence
    watch.seen(Step(rank=0, step=99), 200.0)
    assert watch.check(200.0 + 6, 0.1) is not None  # a new silence after progress


def test_peak_flops_come_from_the_table_for_16_bit_runs_on_known_gpus_only():
    from kaio.record.flops import peak_tflops

    assert peak_tflops(["NVIDIA H100 80GB HBM3"], half_precision=True) == 989.5
    assert peak_tflops(["NVIDIA H100 PCIe"], half_precision=True) == 756.0
    assert peak_tflops(["AMD Instinct MI300X", "AMD Instinct MI250X"], half_precision=True) == 191.5  # the slowest
    assert peak_tflops(["NVIDIA H200"], half_precision=False) is None  # fp32: set reporting.peak_tflops
    assert peak_tflops(["NVIDIA GeForce RTX 4090"], half_precision=True) is None  # not in the table
    assert peak_tflops([], half_precision=True) is None  # a CPU

    # bf16 from `accelerate launch --mixed_precision bf16`, the arguments saying fp32: the run's MFU has a peak.
    from conftest import replay

    devices = {"type": "devices", "devices": [{"backend": "nvml", "index": 0, "name": "NVIDIA H100 80GB HBM3"}]}
    run = {"type": "run_start", "rank": 0, "session": 1, "world_size": 1, "args": {"bf16": False}}
    for mixed, peak in (("bf16", 989.5), ("no", None)):
        state = replay([{"type": "session_start", "session": 1}, devices, {**run, "mixed_precision": mixed}])
        assert state.ledger.throughput().peak_tflops == peak


def test_an_mfu_over_100_percent_is_left_out_and_said_once():
    """A peak set too low (or pixels counted as tokens) gave "MFU 620%": no device does more than its peak."""
    from conftest import replay

    model = {"trainable_matmul_params": 1000, "frozen_matmul_params": 0}
    run = {"type": "run_start", "rank": 0, "session": 1, "world_size": 1, "model": model}
    run["args"] = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1}
    config = {"reporting": {"peak_tflops": 1e-9}}  # 1,000 FLOP/s
    steps = [{"type": "step", "rank": 0, "session": 1, "step": k, "step_time_s": 1.0, "tokens": 8} for k in (1, 2)]
    state = replay([{"type": "session_start", "session": 1, "config": config}, run, *steps])
    entries = [state.parts.steps.open[k] for k in (1, 2)]
    assert [e.tokens_per_s_per_device for e in entries] == [8.0, 8.0] and [e.mfu for e in entries] == [None, None]
    notes = [n for n in state.ledger.telemetry.notes if n.startswith("MFU came out at")]
    assert notes == [
        "MFU came out at 4800% at step 1, more than any device does: the peak (reporting.peak_tflops, or kaio's table "
        "of GPUs) or the tokens counted do not fit this model and device; MFU is left out of the record from there on"
    ]


def test_the_speed_and_eta_leave_out_evaluation_and_save_pauses_and_carry_over_a_resume():
    from kaio.run.live import LiveStats

    live = LiveStats()
    t = 100.0
    for step in range(1, 11):  # 0.5 s a step; step 5 announces an evaluation that takes 60 s
        live.on_step(Step(rank=0, step=step, t_mono=t, evaluates=step == 5))
        t += 60.5 if step == 5 else 0.5
    assert live.steps_per_s() == pytest.approx(2.0)  # not 9 steps / 64.5 s
    assert live.median_step_time() == pytest.approx(0.5)
    # The ETA counts the pauses at the pace seen: 60 s in the 9 steps since the first (a user saw "ETA 0:03" for
    # a run with 26 s to go, its evaluations left out).
    assert live.eta_s(90) == pytest.approx(90 * (0.5 + 60 / 9))
    # An epoch strategy's evaluation, announced after the step's event (a Pause): a pause too, not a slow step.
    epochs = LiveStats()
    for step in range(1, 11):
        epochs.on_step(Step(rank=0, step=step, t_mono=100.0 + 0.5 * step + (60.0 if step > 5 else 0.0)))
        if step == 5:
            epochs.on_pause(Pause(rank=0, step=5, evaluates=True))
    assert epochs.steps_per_s() == pytest.approx(2.0)
    live.start_session()  # a resume: its start-up is not a step, and the last speed stands until its own
    live.on_step(Step(rank=0, step=11, t_mono=500.0))
    assert live.steps_per_s() == pytest.approx(2.0)
    live.on_step(Step(rank=0, step=12, t_mono=500.25))
    assert live.steps_per_s() > 2.0


def test_ranks_agree_on_the_step_a_graceful_stop_ends_at_through_the_stores_first_proposal(monkeypatch):
    """Rank 0 sees the signal at the end of step 10, rank 1 only at the end of step 11 (it was already past
    10's check): both stop after step 12, the step rank 0 proposed in torch.distributed's (real) store."""
    import torch.distributed as dist

    from kaio.child import stop

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    decisions = {}
    for rank, first_step in ((0, 10), (1, 11)):
        monkeypatch.setattr(stop, "_state", {"training": True, "requested": True, "terminated": False})
        monkeypatch.setattr(stop, "_agreed", [])
        monkeypatch.setattr(stop.process_group, "store", lambda: store)
        decisions[rank] = [step for step in range(first_step, 15) if stop.stops_after(step)][:1]
    assert decisions == {0: [12], 1: [12]}
    assert store.get(stop.STORE_KEY) == b"12"
    monkeypatch.setattr(stop, "_agreed", [])
    monkeypatch.setattr(stop.process_group, "store", lambda: dist.TCPStore("127.0.0.1", store.port, is_master=False))
    store.delete_key(stop.STORE_KEY)
    assert [step for step in (38, 39, 40) if stop.stops_after(step, max_steps=39)] == [39, 40]  # not past the end
    assert store.get(stop.STORE_KEY) == b"39"
    monkeypatch.setattr(stop, "_agreed", [])
    monkeypatch.setattr(stop.process_group, "store", lambda: None)  # one process: at once
    assert stop.stops_after(3)


def test_ranks_resumed_at_different_steps_all_end_with_the_reason_instead_of_training():
    """Three ranks compare the step they start at through a real TCPStore: the same step, they train; rank 2
    at another (its node saw other checkpoints, or started afresh), every rank ends with the same one-line
    reason."""
    import threading

    import torch.distributed as dist

    from kaio.child import same_start

    def ranks(steps: list[int]) -> list[str | None]:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        outcome: list[str | None] = [None] * len(steps)

        def rank(r: int) -> None:
            client = dist.TCPStore("127.0.0.1", store.port, is_master=False)
            try:
                same_start.compare(client, steps[r], r, len(steps), "/shared/checkpoints/checkpoint-40")
                outcome[r] = "trains"
            except SystemExit as exc:
                outcome[r] = str(exc)

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(steps))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        return outcome

    assert ranks([40, 40, 40]) == ["trains"] * 3
    ended = ranks([40, 40, 30])
    assert len(set(ended)) == 1 and ended[0] is not None
    reason = ended[0]  # whichever rank compared first, the reason names both steps
    assert "at step 30" in reason and "at step 40" in reason and "do not resume from the same checkpoint" in reason
    # Every rank says it, on every node: the checkpoint is named as the rank's that differed, not "this rank's".
    assert "this rank's" not in reason and "'s: /shared/checkpoints/checkpoint-40)" in reason


def test_the_count_that_flags_a_straggler_grows_where_chance_alone_reaches_it():
    from kaio.run.stragglers import consistent_count

    # Two ranks: each the slowest with odds 1/2; 19 of 20 happens by chance once in 50,000 windows.
    assert [consistent_count(n) for n in (2, 3, 4, 8, 64)] == [19, 16, 15, 15, 15]

"""RunState: journal records in, history and snapshots out (hand-computed values)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import history_of, records, replay
from kaio.record.rules import MIN_LOSSES_TO_SMOOTH


def _devices(*keys_in_run: tuple[str, bool]) -> dict:
    devices = [
        {"backend": k.split(":")[0], "index": int(k.split(":")[1]), "name": f"GPU {k}", "in_run": r}
        for k, r in keys_in_run
    ]
    return {"type": "devices", "devices": devices, "notes": ["a note"]}


def _tick(t: float, power: dict[str, float], energy: dict[str, float] | None = None) -> dict:
    gpus = []
    for key, watts in power.items():
        sample = {"key": key, "t_mono": t, "t_wall": 1e9 + t, "power_w": watts, "util_pct": 50.0, "temp_c": 60.0}
        if energy:
            sample["energy_j"] = energy[key]
            sample["energy_method"] = "counter"
        gpus.append(sample)
    return {"type": "tick", "t_mono": t, "lateness_s": 0.0, "gpus": gpus}


def _step(step: int, t_end: float, rank: int = 0, session: int = 1, dt: float = 1.0) -> dict:
    return {
        "type": "step",
        "rank": rank,
        "session": session,
        "step": step,
        "t_mono": t_end,
        "t_wall": 1e9 + t_end,
        "step_time_s": dt,
        "peak_vram_bytes": 1000 * (rank + 1),
    }


def _report_now(state) -> str:
    """report.md as a report written now would be (the open steps in it)."""
    from kaio.report.markdown import render_markdown
    from kaio.report.summary import summarize

    with state.with_open_steps() as index:
        header = state.header()
        return render_markdown(header, summarize(header, index), index.evals())


def _log(step: int, loss, session: int = 1) -> dict:
    return {"type": "log", "rank": 0, "session": session, "step": step, "loss": loss, "learning_rate": 0.1}


def test_ticks_fold_into_the_step_they_fell_in_with_interpolated_energy():
    records = [
        {"type": "session_start", "session": 1, "t_wall": 1e9},
        _devices(("nvml:0", True), ("nvml:1", False)),
        _tick(0.0, {"nvml:0": 100.0, "nvml:1": 10.0}, {"nvml:0": 0.0, "nvml:1": 0.0}),
        _step(1, 1.0),  # window (0, 1]: no tick inside yet
        _tick(1.5, {"nvml:0": 200.0, "nvml:1": 10.0}, {"nvml:0": 150.0, "nvml:1": 15.0}),
        _step(2, 2.0),  # window (1, 2]: the tick at 1.5
        _tick(2.5, {"nvml:0": 300.0, "nvml:1": 10.0}, {"nvml:0": 400.0, "nvml:1": 25.0}),
    ]
    history = history_of(replay(records))
    first, second = history["steps"]
    # Step 1 had no tick inside: the latest earlier one stands in, marked as carried.
    assert first["gpus_carried"] is True and first["power_avg"] == 100.0
    # Energy interpolated linearly at the step's ends: E(1.0)=100, E(0)=0 -> 100 J; E(2.0)=275 -> 175 J.
    assert first["energy_j"] == pytest.approx(100.0)
    assert second["energy_j"] == pytest.approx(175.0)
    assert second["gpus_carried"] is False
    assert second["power_avg"] == 200.0  # only the run's GPU counts in the flat keys
    assert second["gpus"]["nvml:1"]["power_avg"] == 10.0  # but every GPU is recorded
    assert history["devices"][0]["energy_j"] == 400.0 and history["devices"][0]["energy_method"] == "counter"
    assert history["devices"][0]["key"] == "nvml:0" and history["devices"][1]["info"]["in_run"] is False
    assert history["telemetry"]["notes"] == ["a note"]


def test_peak_vram_per_rank_and_loss_once_from_rank_zero():
    records = [
        {"type": "session_start", "session": 1, "t_wall": 1e9},
        _step(1, 1.0, rank=0),
        _step(1, 1.1, rank=1),
        _log(1, 2.5),
    ]
    entry = history_of(replay(records))["steps"][0]
    assert entry["peak_vram_bytes"] == {"0": 1000, "1": 2000}
    assert entry["vram_peak_bytes"] == 2000
    assert entry["loss"] == 2.5 and entry["t_mono"] == 1.0  # rank 0's time


def test_nan_loss_is_null_with_a_marker_and_a_warning():
    records = [{"type": "session_start", "session": 1, "t_wall": 1e9}, _step(1, 1.0), _log(1, "nan")]
    state = replay(records)
    entry = history_of(state)["steps"][0]
    assert entry["loss"] is None and entry["loss_nonfinite"] == "nan" and entry["loss_smoothed"] is None
    assert any("non-finite loss (nan) at step 1" in w for w in state.parts.warnings.items)


def test_a_resumed_session_supersedes_the_steps_after_its_checkpoint():
    records = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    for step in range(1, 7):
        records += [_step(step, float(step)), _log(step, 10.0 - step)]
    records += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 7, "status": "FAILED", "exit_code": 1}]
    records += [
        {"type": "session_start", "session": 2, "t_wall": 1e9 + 8, "kind": "resume"},
        {
            "type": "run_start",
            "rank": 0,
            "session": 2,
            "start_step": 4,
            "max_steps": 8,
            "kept_from_checkpoint": {"learning_rate": [0.005, 0.001], "first_step_learning_rate": [0.0, 4e-4]},
        },
    ]
    for step in range(5, 9):
        records += [_step(step, 10.0 + step, session=2), _log(step, 1.0, session=2)]
    records += [{"type": "session_end", "session": 2, "t_wall": 1e9 + 20, "status": "COMPLETED", "exit_code": 0}]
    history = history_of(replay(records))
    assert [s["step"] for s in history["steps"]] == list(range(1, 9))
    assert [s["session"] for s in history["steps"]] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [s["loss"] for s in history["steps"][4:]] == [1.0] * 4
    assert [(s["status"], s["start_step"], s["end_step"]) for s in history["sessions"]] == [
        ("FAILED", None, 6),
        ("COMPLETED", 4, 8),
    ]
    assert history["status"] == "COMPLETED"
    assert history["run"]["kept_from_checkpoint"] == {
        "learning_rate": [0.005, 0.001],
        "first_step_learning_rate": [0.0, 4e-4],
    }
    kept, first = [w for w in history["warnings"] if w.startswith("session 2: the ")]
    assert kept.startswith(
        "session 2: the resumed Trainer kept its checkpoint's learning_rate 0.005 (the arguments: 0.001): a resume "
        "restores them"
    )
    assert first.startswith(
        "session 2: the first resumed step trained at the learning rate the checkpoint's optimizer held, 0, not "
        "its schedule's 0.0004 there"
    )


def test_a_resume_asked_for_no_more_steps_than_were_done_is_warned_about():
    """A script resumed at step 10 with max_steps 8 (its arguments not extended): the Trainer still trained a step,
    and the record said "11/8 (100%)" without a word."""
    records = [
        {"type": "session_start", "session": 2, "t_wall": 1e9, "kind": "resume"},
        {"type": "run_start", "rank": 0, "session": 2, "start_step": 10, "max_steps": 8},
        _step(11, 1.0, session=2),
    ]
    (warning,) = history_of(replay(records))["warnings"]
    assert warning.startswith(
        "session 2: the Trainer resumed at step 10 with max_steps 8: the training's arguments asked for no"
    )
    # A script of two phases resumed at the end of its first: the first trains nothing, as it should; the second
    # goes on. Not a problem: the warning is taken back, and a note says what happened.
    phases = [
        {"type": "session_start", "session": 2, "t_wall": 1e9, "kind": "resume"},
        {"type": "run_start", "rank": 0, "session": 2, "start_step": 24, "max_steps": 24},
        {"type": "run_start", "rank": 0, "session": 2, "start_step": 24, "max_steps": 30, "training": 2},
        _step(25, 1.0, session=2),
    ]
    history = history_of(replay(phases))
    assert history["warnings"] == []
    assert "session 2: the script's first training resumed at its end (step 24) and trained no step" in " ".join(
        history["telemetry"]["notes"]
    )


def test_what_a_resumed_trainer_kept_from_its_checkpoint_over_the_arguments_is_named():
    """A script resumed with an edited learning rate or interval: the Trainer keeps the checkpoint's (the scheduler's
    state, trainer_state.json), where the record said the arguments' were used; an extended run's first step
    trains at the rate the restored optimizer held (0.0 after a finished schedule)."""
    from kaio.child.describe import kept_from_checkpoint

    args = SimpleNamespace(learning_rate=1e-3, logging_steps=5, eval_steps=None, save_steps=0.25)
    state = SimpleNamespace(global_step=10, max_steps=40, logging_steps=1, eval_steps=1, save_steps=10)
    schedule = SimpleNamespace(base_lrs=[5e-3, 5e-3], lr_lambdas=[lambda n: (40 - n) / 40] * 2, last_epoch=10)
    wrapped = SimpleNamespace(scheduler=schedule)  # accelerate's AcceleratedScheduler
    finished = SimpleNamespace(param_groups=[{"lr": 0.0}, {"lr": 0.0}])  # the old schedule ended at step 10
    assert kept_from_checkpoint(args, state, wrapped, finished) == {
        "learning_rate": (5e-3, 1e-3),
        "logging_steps": (1, 5),  # save_steps 0.25 of 40 is the 10 the state holds; eval_steps unset
        "first_step_learning_rate": (0.0, pytest.approx(5e-3 * 30 / 40)),
    }
    going_on = SimpleNamespace(param_groups=[{"lr": 5e-3 * 30 / 40}] * 2)  # a resume mid-run: the same rate
    assert "first_step_learning_rate" not in kept_from_checkpoint(args, state, wrapped, going_on)
    assert kept_from_checkpoint(args, SimpleNamespace(**{**vars(state), "global_step": 0}), wrapped) == {}  # fresh
    per_group = SimpleNamespace(base_lrs=[1e-4, 5e-3])  # a script's own rates per group: not the arguments' to keep
    same = SimpleNamespace(global_step=10, max_steps=40, logging_steps=5, eval_steps=None, save_steps=10)
    assert kept_from_checkpoint(args, same, per_group) == {} and kept_from_checkpoint(args, same, None) == {}


def test_snapshot_places_ranks_on_the_run_gpus_and_computes_rate_and_eta():
    state = replay(
        [
            {"type": "session_start", "session": 1, "t_wall": 1e9},
            _devices(("nvml:0", False), ("nvml:1", True), ("nvml:2", True)),
            {
                "type": "run_start",
                "rank": 0,
                "session": 1,
                "start_step": 0,
                "max_steps": 100,
                "world_size": 2,
                "args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2},
            },
            _step(1, 10.0),
            _step(2, 10.5),
            _step(3, 11.0),
            _log(3, 1.25),
        ]
    )
    snap = state.snapshot()
    assert [(g.key, g.rank) for g in snap.gpus] == [("nvml:0", None), ("nvml:1", 0), ("nvml:2", 1)]
    assert snap.steps_per_s == pytest.approx(2.0)
    assert snap.samples_per_s == pytest.approx(2.0 * 4 * 2 * 2)
    assert snap.eta_s == pytest.approx(97 / 2.0)
    assert snap.loss == 1.25 and snap.step == 3 and snap.max_steps == 100
    # A resume, launching: no speed until it trains (the earlier session's is not this one's).
    state.apply(records({"type": "session_start", "session": 2, "t_wall": 1e9 + 60, "kind": "resume"})[0])
    starting = state.snapshot()
    assert starting.status == "STARTING" and starting.steps_per_s is None and starting.eta_s is None


def test_a_record_that_begins_at_a_later_step_counts_the_samples_and_tokens_of_its_own_steps():
    """The script resumed its Trainer from its own checkpoint-12 (4,800 input tokens by then): the Trainer's
    counts include steps 1-12, the record's are its own 8 steps of 4 samples and 400 tokens."""
    from kaio.report.summary import summarize

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 12, "start_tokens": 4_800, "max_steps": 20}
    run |= {"world_size": 1, "args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    for k in range(13, 21):
        events += [{**_step(k, float(k)), "tokens_seen": 400 * k}, _log(k, 1.0)]
    state = replay(events)
    history = history_of(state)
    assert [s["samples_seen"] for s in history["steps"]] == [4 * k for k in range(1, 9)]
    assert [s["tokens_seen"] for s in history["steps"]] == [400 * k for k in range(1, 9)]
    assert any("began at step 12" in n for n in history["telemetry"]["notes"])
    with state.with_open_steps() as index:
        s = summarize(state.header(), index)
    assert (s.samples, s.tokens) == (32, 3_200)
    assert s.samples_per_s == pytest.approx(32 / 8.0)


def test_the_closing_summary_log_keeps_the_last_loss_on_screen():
    records = [
        {"type": "session_start", "session": 1, "t_wall": 1e9},
        _step(1, 1.0),
        _log(1, 2.5),
        {"type": "log", "rank": 0, "session": 1, "step": 1, "epoch": 1.0, "extra": {"train_runtime": 3.2}},
    ]
    snap = replay(records).snapshot()
    assert snap.loss == 2.5 and snap.learning_rate == 0.1 and snap.epoch == 1.0


def test_the_dashboard_and_the_report_show_the_same_smoothed_loss():
    records = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    losses = [5.0, 4.0, 4.5, 3.0, 3.5, 2.0] * 2
    for step, loss in enumerate(losses, start=1):
        records += [_step(step, float(step)), _log(step, loss)]
    # Too few losses for a level: neither shows it (the report says so).
    assert replay(records[: 2 * MIN_LOSSES_TO_SMOOTH - 1]).snapshot().loss_smoothed is None
    state = replay(records)
    # The one rule: an EMA whose span is max(5, n/50) points, so alpha = 2/6 here.
    expected = losses[0]
    for loss in losses[1:]:
        expected = loss / 3 + expected * 2 / 3
    assert state.snapshot().loss_smoothed == pytest.approx(expected)
    assert history_of(state)["steps"][-1]["loss_smoothed"] == pytest.approx(expected)


def test_a_resume_continues_the_smoothed_loss_from_its_checkpoint():
    records = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    for step in range(1, 7):
        records += [_step(step, float(step)), _log(step, float(10 - step))]
    records += [
        {"type": "session_end", "session": 1, "status": "INTERRUPTED"},
        {"type": "session_start", "session": 2, "kind": "resume"},
        {"type": "run_start", "rank": 0, "session": 2, "start_step": 3},
    ]
    uninterrupted = replay(records[: 1 + 2 * 3])  # steps 1-3 only
    records += [_step(4, 20.0, session=2), _log(4, 1.0, session=2)]
    resumed = history_of(replay(records))
    before = history_of(uninterrupted)["steps"][-1]["loss_smoothed"]
    assert [s["step"] for s in resumed["steps"]] == [1, 2, 3, 4]
    assert resumed["steps"][3]["loss_smoothed"] == pytest.approx(1.0 / 3 + before * 2 / 3)


def test_a_late_event_for_a_sealed_step_is_counted_not_applied():
    records = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    for step in range(1, 6):
        records.append(_step(step, float(step)))
    records.append(_step(1, 1.5, rank=1))  # rank 1's step 1, after rank 0 sealed it
    state = replay(records)
    assert state.ledger.telemetry.dropped_late_events == 1
    assert history_of(state)["steps"][0]["peak_vram_bytes"] == {"0": 1000}


def test_processes_that_train_independently_are_called_out():
    """Two processes of an unchanged script on a GPU-less host without a gloo group: both say rank 0."""
    launch = {"launch": {"num_processes": 2}}
    start = [{"type": "session_start", "session": 1, "t_wall": 1e9, "config": launch}]
    duplicates = replay(
        start
        + [
            {"type": "run_start", "rank": 0, "session": 1, "pid": 11, "world_size": 1},
            {"type": "run_start", "rank": 0, "session": 1, "pid": 12, "world_size": 1},
        ]
    )
    warnings = " | ".join(duplicates.parts.warnings.items)
    assert "two processes both said they were rank 0 (pids 11 and 12)" in warnings
    assert "2 processes were launched, but the trainer reports world size 1" in warnings
    one_job = replay(
        start
        + [
            {"type": "run_start", "rank": 0, "session": 1, "pid": 11, "world_size": 2},
            {"type": "run_start", "rank": 1, "session": 1, "pid": 12, "world_size": 2},
        ]
    )
    assert one_job.parts.warnings.items == []


def test_a_failed_push_after_a_pushed_one_is_noted_until_a_later_push_succeeds():
    pushed = {"type": "hub", "repo_id": "me/tiny", "commit_sha": "aaa"}
    failed = {"type": "hub", "repo_id": "me/tiny", "error": "push failed: cannot reach the Hub"}
    state = replay([{"type": "session_start", "session": 1}, pushed, failed])
    header = state.header()
    assert header.hub is not None and header.hub.commit_sha == "aaa"  # the Hub still holds that adapter
    assert header.telemetry.notes == [
        "a later push to me/tiny failed (push failed: cannot reach the Hub); the adapter stays at aaa"
    ]
    state.apply(*records({**pushed, "commit_sha": "bbb"}))  # `kaio push` retried it
    header = state.header()
    assert header.hub is not None and header.hub.commit_sha == "bbb" and header.telemetry.notes == []


def test_a_session_that_never_reached_a_step_spent_its_time_starting():
    """A script that fails before its first step (in TrainingArguments, say): its session's time is start-up,
    not time between sessions."""
    from kaio.report.summary import summarize

    state = replay(
        [
            {"type": "session_start", "session": 1, "t_wall": 1000.0},
            {"type": "session_end", "session": 1, "status": "FAILED", "exit_code": 1, "t_wall": 1008.7},
        ]
    )
    (session,) = state.header().sessions
    assert session.startup_s == pytest.approx(8.7) and session.closing_s is None
    with state.with_open_steps() as index:
        summary = summarize(state.header(), index)
    assert summary.startup_s == pytest.approx(8.7) and summary.training_time_s == pytest.approx(8.7)


def test_samples_are_what_the_ranks_counted_so_an_epochs_short_last_batch_is_not_a_full_one():
    """10 examples, batch 4, one rank: steps of 4, 4 and 2 examples an epoch. A step whose batch the child could
    not count takes the full batch, and the counted ones go on from there."""
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 7, "world_size": 1}
    run |= {"args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}}
    counted = [4, 4, 2, 4, 4, 2, None]
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    events += [{**_step(k, float(k)), "samples": n} for k, n in enumerate(counted, start=1)]
    history = history_of(replay(events))
    assert [s["samples_seen"] for s in history["steps"]] == [4, 8, 10, 14, 18, 20, 28]
    two_ranks = {**run, "world_size": 2}  # even batches on every rank: rank 0's count times the world size
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, two_ranks]
    events += [{**_step(k, float(k)), "samples": n} for k, n in enumerate([4, 1], start=1)]
    assert [s["samples_seen"] for s in history_of(replay(events))["steps"]] == [8, 10]


def test_tokens_a_trainer_does_not_count_are_kaios_count_of_the_input_ids_on_from_the_checkpoint_on_a_resume():
    """Without include_num_input_tokens_seen the Trainer counts no tokens: the child counts each micro-batch's
    input ids (rank 0's, times the world size, as samples), so tokens/s per device, MFU and the run's tokens are
    there. A resume from checkpoint-2 counts on from step 2's recorded count; the Trainer's own count, where it
    has one, is taken instead."""
    from kaio.report.summary import summarize

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 4, "world_size": 2}
    run |= {"args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}}
    run |= {"tokens_counted_by": "kaio"}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    events += [{**_step(k, float(k), dt=0.5), "tokens": n} for k, n in [(1, 100), (2, 120), (3, 80)]]
    events += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 5, "status": "INTERRUPTED", "exit_code": 143}]
    events += [{"type": "session_start", "session": 2, "t_wall": 1e9 + 10, "kind": "resume"}]
    events += [{**run, "session": 2, "start_step": 2}]
    events += [{**_step(k, 10.0 + k, session=2, dt=0.5), "tokens": 90} for k in (3, 4)]
    state = replay(events)
    steps = history_of(state)["steps"]
    assert [s["tokens_seen"] for s in steps] == [200, 440, 620, 800]  # 2 ranks: 2 x (100, 120, 90, 90) added up
    assert [s["tokens_per_s_per_device"] for s in steps] == [200.0, 240.0, 180.0, 180.0]  # rank 0's over 0.5 s
    with state.with_open_steps() as index:
        summary = summarize(state.header(), index)
    assert summary.tokens == 800 and summary.tokens_counted_by == "kaio"
    # A step missing from the record (a late event) is counted as the next one, as samples are: the count goes on.
    gap = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    gap += [{**_step(k, float(k), dt=0.5), "tokens": n} for k, n in [(1, 100), (3, 80), (4, 90)]]
    assert [s["tokens_seen"] for s in history_of(replay(gap))["steps"]] == [200, 520, 700]
    # The Trainer counts (all ranks, gathered): its count, not kaio's.
    counted = {**run, "tokens_counted_by": "trainer"}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, counted]
    events += [{**_step(k, float(k), dt=0.5), "tokens": 100, "tokens_seen": 150 * k} for k in (1, 2, 3)]
    steps = history_of(replay(events))["steps"]
    assert [s["tokens_seen"] for s in steps] == [150, 300, 450]
    assert [s["tokens_per_s_per_device"] for s in steps] == [150.0, 150.0, 150.0]  # step 1: counted from 0
    # The report says whose count it is, and whether padding is in it (the Trainer's "non_padding" leaves it out).
    from kaio.report.markdown import _throughput

    for counting, said in (("all", "padding included"), ("non_padding", "padding excluded")):
        args = {**run["args"], "include_num_input_tokens_seen": counting}
        state = replay([events[0], {**counted, "args": args}, *events[2:]])
        with state.with_open_steps() as index:
            assert _throughput(summarize(state.header(), index)).endswith(f"tokens/s (the Trainer's count, {said})")


def test_a_resume_whose_steps_take_another_number_of_examples_says_the_data_was_skipped_or_trained_again():
    """The Trainer finds its place in the data by counting the checkpoint's steps in batches of the new size: one
    rank resumed on two skipped 240 of 512 examples, two resumed on one trained 160 again, with only a config note."""
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 80, "world_size": 1}
    run |= {"args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run, _step(1, 1.0)]
    events += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 5, "status": "INTERRUPTED", "exit_code": 143}]
    events += [{"type": "session_start", "session": 2, "t_wall": 1e9 + 10, "kind": "resume"}]
    resumed = {**run, "session": 2, "start_step": 60}
    assert not [w for w in history_of(replay([*events, resumed]))["warnings"] if "examples per optimizer step" in w]
    warnings = history_of(replay([*events, {**resumed, "world_size": 2}]))["warnings"]
    assert warnings == [
        "session 2: resumed with 8 examples per optimizer step where the checkpoint's 60 steps took 4 (world size "
        "1 -> 2): the Trainer finds its place in the data by counting those steps in batches of the new size, so "
        "about 240 examples were skipped"
    ]
    fewer = {**resumed, "args": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}}
    assert "about 120 examples were trained again" in history_of(replay([*events, fewer]))["warnings"][0]


def test_steps_only_other_ranks_reached_are_not_steps_of_the_record():
    """A loop of kaio.log calls runs its ranks apart: stopped, rank 1 had logged 39 steps rank 0 never reached, and
    the record had them as empty steps (no loss, no time) in its count of optimizer steps."""
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    events += [_step(k, float(k)) for k in (1, 2, 3)] + [_step(k, float(k), rank=1) for k in (1, 2, 3, 4, 5)]
    events += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 9, "status": "INTERRUPTED", "exit_code": 143}]
    history = history_of(replay(events))
    assert [s["step"] for s in history["steps"]] == [1, 2, 3]
    assert (
        "session 1: steps 4-5 were reached by other ranks only, not by rank 0, whose last was 3: not in the record"
        in (history["telemetry"]["notes"])
    )


def test_samples_go_on_from_the_checkpoints_count_after_a_resume_and_never_exceed_the_batch():
    """A resume from checkpoint-3 counts on from step 3's recorded samples (an epoch's short batch in it), not
    from 3 full batches; a collator that stacks each example's rows (DPO's chosen and rejected) counts 8 rows
    for a batch of 4 examples: the count is at most the batch. The dashboard's samples/s is the same count's."""
    from kaio.run.live import build_snapshot

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 6, "world_size": 1}
    run |= {"args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    events += [{**_step(k, float(k)), "samples": n} for k, n in enumerate([4, 2, 4, 4], start=1)]
    events += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 5, "status": "INTERRUPTED", "exit_code": 143}]
    events += [{"type": "session_start", "session": 2, "t_wall": 1e9 + 10, "kind": "resume"}]
    events += [{**run, "session": 2, "start_step": 3}]
    events += [{**_step(k, 10.0 + k, session=2), "samples": n} for k, n in [(4, 8), (5, 2), (6, 4)]]
    state = replay(events)
    assert [s["samples_seen"] for s in history_of(state)["steps"]] == [4, 6, 10, 14, 16, 20]
    snapshot = build_snapshot(state.ledger, state.parts.live, 6, ())
    assert snapshot.samples_per_s == pytest.approx(snapshot.steps_per_s * 3)  # (20 - 14) / 2 steps, not the batch


def test_evaluations_after_train_are_marked_and_a_later_training_clears_the_earlier_ones_end():
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 2, "world_size": 1}
    evaluation = {"type": "eval", "rank": 0, "session": 1, "step": 2, "metrics": {"eval_loss": 1.0}}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run, _step(1, 1.0), _step(2, 2.0)]
    events += [evaluation, {"type": "train_end", "rank": 0, "session": 1, "step": 2}, evaluation]
    events += [{**run, "training": 2, "start_step": 2, "step_offset": 2, "max_steps": 4}, _step(3, 3.0)]
    events += [{**evaluation, "step": 3}]  # during the second training
    prediction = {"test_loss": 2.0, "num_input_tokens_seen": 12288.0}
    events += [{**evaluation, "step": 3, "metrics": prediction, "prediction": True}]  # predict() after it
    state = replay(events)
    evals = history_of(state)["evals"]
    assert [(e["step"], e["after_training"], e["prediction"]) for e in evals] == [
        (2, False, False),
        (2, True, False),
        (3, False, False),
        (3, False, True),
    ]

    report = _report_now(state)
    assert "| 3 (predict()) | — | 2 | 12,288 |" in report  # a count as a count, not 1.229e+04


def test_every_eval_datasets_time_is_its_steps_evaluation_and_no_evaluation_is_a_steps_metric():
    """eval_dataset={"a": ..., "b": ...}: each set is an evaluation of its own, timed by its eval_<set>_runtime;
    evaluate() also logs each one's metrics, which are the evaluation's (evals), not the step's. The script's own
    evaluate(metric_key_prefix="test") after train() is not a pause of the last step."""
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 2, "world_size": 1}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, {**run, "eval_sets": 2}, _step(1, 1.0)]
    for name, runtime in (("a", 0.5), ("b", 2.0)):
        metrics = {f"eval_{name}_loss": 1.0, f"eval_{name}_runtime": runtime, f"eval_{name}_samples_per_second": 9.0}
        events += [{"type": "log", "rank": 0, "session": 1, "step": 1, "extra": metrics}]
        events += [{"type": "eval", "rank": 0, "session": 1, "step": 1, "metrics": metrics}]
    closing = {"train_runtime": 3.0, "train_samples_per_second": 4.0}  # the training's own closing log
    events += [_step(2, 5.0), {"type": "log", "rank": 0, "session": 1, "step": 2, "extra": closing}]
    events += [{"type": "train_end", "rank": 0, "session": 1, "step": 2}]
    test = {"test_loss": 0.3, "test_runtime": 7.0, "test_samples_per_second": 9.0}
    events += [{"type": "log", "rank": 0, "session": 1, "step": 2, "extra": test}]
    events += [{"type": "eval", "rank": 0, "session": 1, "step": 2, "metrics": test}]
    state = replay(events)
    history = history_of(state)
    first, last = history["steps"]
    assert first["eval_s"] == 2.5 and first["metrics"] == {}
    assert last["eval_s"] is None and last["metrics"] == closing
    assert [e["metrics"] for e in history["evals"]][2] == test and history["run"]["eval_sets"] == 2
    from kaio.dashboard import plain_line
    from kaio.run.live import build_snapshot

    assert " eval loss 1 (a) " in plain_line(build_snapshot(state.ledger, state.parts.live, 2, ()))  # which set's


@pytest.mark.parametrize(
    ("metrics", "runtime"),
    [
        ({"eval_loss": 1.0, "eval_runtime": 2.0, "eval_samples_per_second": 5.0}, 2.0),
        # compute_metrics adds a time of its own: the Trainer's speed metrics say which is the evaluation's
        ({"eval_runtime": 2.0, "eval_samples_per_second": 5.0, "eval_gen_runtime": 9.0}, 2.0),
        ({"eval_a_runtime": 3.0}, 3.0),  # the one *_runtime there is
        ({"eval_loss": 1.0}, None),
        ({"eval_x_runtime": 1.0, "eval_y_runtime": 2.0}, None),  # which: unknown
    ],
)
def test_an_evaluations_runtime_is_the_one_its_speed_metrics_name(metrics, runtime):
    from kaio.record import rules

    assert rules.evaluation_runtime(metrics) == runtime


def test_an_evaluation_takes_its_own_metrics_from_the_log_before_it_and_leaves_the_steps():
    """evaluate() logs its metrics, then calls on_evaluate with them: what carries the evaluation's prefix is the
    evaluation's, with what a trainer's own log() added to that log (TRL's eval_rewards). The tokens seen, and a
    number a trainer adds to every log, stay the step's; so do a kaio.log loop's look-alikes."""
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, _step(1, 1.0), _step(2, 2.0)]
    evaluation = {"eval_loss": 1.0, "eval_runtime": 0.5, "eval_samples_per_second": 9.0, "num_input_tokens_seen": 720}
    training = {"num_input_tokens_seen": 720, "my_extra": 1.1}
    events += [{"type": "log", "rank": 0, "session": 1, "step": 1, "extra": training}]
    events += [{"type": "log", "rank": 0, "session": 1, "step": 1, "extra": {**evaluation, "eval_rewards": 0.7}}]
    events += [{"type": "eval", "rank": 0, "session": 1, "step": 1, "metrics": evaluation}]
    looks_alike = {"val_runtime": 0.5, "val_samples_per_second": 9.0, "acc": 0.9}  # no Eval follows
    events += [{"type": "log", "rank": 0, "session": 1, "step": 2, "extra": looks_alike}]
    events += [{"type": "log", "rank": 0, "session": 1, "step": 2, "extra": {"kaio_truncated": True}}]
    history = history_of(replay(events))
    assert [s["metrics"] for s in history["steps"]] == [{"num_input_tokens_seen": 720.0, "my_extra": 1.1}, looks_alike]
    assert history["evals"][0]["metrics"] == {**evaluation, "eval_rewards": 0.7}
    assert history["steps"][0]["eval_s"] == 0.5
    assert history["warnings"] == ["a log at step 2 was too large for one record: its other metrics were left out"]
    # The script's own log of final_* numbers, then evaluate(metric_key_prefix="final"): the evaluation takes what
    # its own log (the one just before it) holds, not the script's numbers of the same prefix.
    final = {"final_loss": 0.8, "final_runtime": 0.5, "final_samples_per_second": 9.0}
    events += [{"type": "log", "rank": 0, "session": 1, "step": 2, "extra": {"final_accuracy": 0.875}}]
    events += [{"type": "log", "rank": 0, "session": 1, "step": 2, "extra": final}]
    events += [{"type": "eval", "rank": 0, "session": 1, "step": 2, "metrics": final}]
    history = history_of(replay(events))
    assert history["evals"][1]["metrics"] == final
    assert history["steps"][1]["metrics"] == {**looks_alike, "final_accuracy": 0.875}


def test_a_report_of_a_run_still_going_counts_its_start_up_in_its_wall_time_and_its_steps_so_far():
    """`kaio report` while a session runs: its wall time so far is its start-up and its steps (a share of 113 %
    and a goodput of 99 % came of leaving the start-up out), and its sessions row says where it is."""
    from kaio.report.markdown import render_markdown
    from kaio.report.summary import summarize

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 10, "world_size": 1}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    events += [_step(k, 10.0 + k) for k in range(1, 6)]  # the first step ends 11 s after the start
    state = replay(events)
    with state.with_open_steps() as index:
        header = state.header()
        summary = summarize(header, index)
        report = render_markdown(header, summary, index.evals())
    assert (summary.startup_s, summary.training_time_s) == (11.0, 15.0)  # 11 s to the first step's end, 4 after
    assert "| Start-up (launch to the first step) | 11.0 s | 73.3 % |" in report
    assert "| 0 → 5 | RUNNING |" in report


def test_evaluations_before_the_first_step_and_after_the_last_are_evaluation_time_not_start_up_or_closing():
    """eval_on_start's evaluation (3 s) was counted in the start-up, and the last evaluation (2 s) in the closing:
    the time table said 'Evaluation' for neither. Each second still counts once."""
    from kaio.report.summary import summarize, time_buckets

    def evaluation(step: int, seconds: float) -> dict:
        metrics = {"eval_loss": 1.0, "eval_runtime": seconds, "eval_samples_per_second": 1.0}
        return {"type": "eval", "rank": 0, "session": 1, "step": step, "metrics": metrics}

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 4, "world_size": 1}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, evaluation(0, 3.0), run]
    events += [_step(k, 10.0 + k) for k in range(1, 5)] + [evaluation(4, 2.0)]
    events += [{"type": "train_end", "rank": 0, "session": 1, "step": 4}]
    events += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 20.0, "status": "COMPLETED", "exit_code": 0}]
    state = replay(events)
    with state.with_open_steps() as index:
        summary = summarize(state.header(), index)
    assert [(figure, seconds) for _, figure, seconds in time_buckets(summary)] == [
        ("start-up", 8.0),  # 11 s to the first step's end, less the 3 s evaluation
        ("optimizer steps", 3.0),
        ("evaluation", 5.0),
        ("closing", 4.0),  # 6 s after the last step, less the 2 s evaluation
    ]
    assert summary.training_time_s == 20.0


def test_a_loss_never_logged_because_logging_steps_outruns_the_training_says_so_with_the_trainers_mean():

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 5, "world_size": 1}
    run |= {"args": {"logging_strategy": "steps", "logging_steps": 50}}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    events += [_step(k, float(k)) for k in range(1, 6)]
    events += [{"type": "log", "rank": 0, "session": 1, "step": 5, "extra": {"train_loss": 5.1333, "train_runtime": 2}}]
    state = replay(events)
    report = _report_now(state)
    assert (
        "| Loss (initial → final) | not logged: logging_steps (50) is more than the 5 steps trained; the Trainer's "
        "mean training loss (train_loss): 5.133 |" in report
    )
    assert "| Loss, minimum | not logged |" in report


def test_what_a_script_logs_that_is_not_a_finite_number_is_said_once_not_dropped_unseen():
    extra = {"frozen": True, "phase": "warmup", "ppl": "nan", "dropped": 24, "kaio_skipped_gpu_tensors": ["aux"]}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    for k in (1, 2):
        events += [_step(k, float(k)), {"type": "log", "rank": 0, "session": 1, "step": k, "extra": extra}]
    history = history_of(replay(events))
    assert [s["metrics"] for s in history["steps"]] == [{"frozen": 1.0, "dropped": 24.0}] * 2  # a bool as 0 or 1
    assert "metric phase is not a number: not in the record (child.log has it)" in " ".join(
        history["telemetry"]["notes"]
    )
    assert history["warnings"] == [
        "logged metric ppl was nan at step 1: history.json leaves its non-finite values out",
        "logged metric(s) aux were tensors on the GPU: not read (reading one waits for the GPU at every log); "
        "log them as numbers (.item()) to have them in the record",
    ]


def test_an_evaluation_before_train_is_told_from_the_trainers_eval_on_start():

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 2, "world_size": 1}
    evaluation = {"type": "eval", "rank": 0, "session": 1, "step": 0, "metrics": {"eval_loss": 5.7}}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, evaluation, run, evaluation]
    events += [_step(1, 1.0), _step(2, 2.0)]
    state = replay(events)
    evals = history_of(state)["evals"]
    assert [(e["step"], e["before_training"], e["after_training"]) for e in evals] == [
        (0, True, False),
        (0, False, False),
    ]
    report = _report_now(state)
    assert "| 0 (before training) | 5.7 |" in report and "| 0 | 5.7 |" in report


def test_a_script_that_only_evaluates_is_said_to_have_evaluated_not_to_have_no_trainer():

    evaluation = {"type": "eval", "rank": 0, "session": 1, "step": 0, "metrics": {"eval_loss": 1.37}}
    end = {"type": "session_end", "session": 1, "t_wall": 1e9 + 20, "status": "COMPLETED", "exit_code": 0}
    state = replay([{"type": "session_start", "session": 1, "t_wall": 1e9}, evaluation, end])
    report = _report_now(state)
    assert "**Optimizer steps:** none recorded (a Trainer evaluated, but never trained: see What was trained)" in report
    assert "a transformers `Trainer` evaluated (see Evaluation) but never trained" in report
    assert "kaio.log" not in report
    # Its evaluation is not "before training" (there was none), and its time is not all start-up.
    assert "| 0 (no training) | 1.37 |" in report and "(before training)" not in report
    assert "| Start-up and the script's own work (no training step) |" in report


def test_a_failure_after_the_training_completed_is_said_so_on_the_last_line():
    from kaio.run.live import build_snapshot

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 2, "world_size": 1}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run, _step(1, 1.0), _step(2, 2.0)]
    ended = [{"type": "session_end", "session": 1, "t_wall": 1e9 + 3, "status": "FAILED", "exit_code": 1}]
    state = replay(events + ended)
    assert not build_snapshot(state.ledger, state.parts.live, 2, ()).training_completed  # it ended inside train()
    state = replay(events + [{"type": "train_end", "rank": 0, "session": 1, "step": 2}] + ended)
    assert build_snapshot(state.ledger, state.parts.live, 2, ()).training_completed


def test_a_training_the_trainer_began_again_after_running_out_of_memory_is_said_as_such():
    """auto_find_batch_size: the Trainer itself starts the training again with a smaller batch after an
    out-of-memory error; its steps follow the earlier attempt's, and the note says why, not 'another Trainer'."""
    from kaio.child.describe import _training_args

    args = SimpleNamespace(per_device_train_batch_size=8, auto_find_batch_size=True, n_gpu=1)
    assert _training_args(args, SimpleNamespace(train_batch_size=7)).per_device_train_batch_size == 7
    first = {"type": "run_start", "rank": 0, "session": 1, "max_steps": 8, "args": {"per_device_train_batch_size": 8}}
    retry = {**first, "training": 2, "step_offset": 2, "start_step": 2, "max_steps": 10, "retry": True}
    retry["args"] = {"per_device_train_batch_size": 7}
    state = replay([{"type": "session_start", "session": 1}, first, _step(1, 1.0), _step(2, 2.0), retry, _step(3, 3.0)])
    notes = state.header().telemetry.notes
    assert (
        "session 1: the Trainer began its training again at its own step 0 with batch size 7 after running out of "
        "memory (auto_find_batch_size); its steps are recorded from step 3, after the earlier attempt's"
    ) in notes
    assert not any("of the script" in n for n in notes)
    # The Trainings table marks the attempt that ran out of memory and the one that began again.

    report = _report_now(state)
    assert "1 of them ran out of memory and the Trainer began again with a smaller batch" in report
    assert "| 1 | — | 1–2 (2 of 8; out of memory) |" in report
    assert "| 2 | —, again at batch 7 | 3–3 (1 of 8) |" in report


def test_out_of_memory_retries_that_trained_nothing_are_no_trainings_of_the_losses_nor_marks_on_the_figure():
    """auto_find_batch_size halving the batch until it fits: the attempts before the one that trained finished no
    step; the report said the losses were 'across 3 trainings' and the figure marked each at the first step."""
    from kaio.report.figure_data import figure_data

    first = {"type": "run_start", "rank": 0, "session": 1, "max_steps": 4, "args": {"per_device_train_batch_size": 32}}
    retries = [
        {**first, "training": n, "retry": True, "args": {"per_device_train_batch_size": 32 >> (n - 1)}} for n in (2, 3)
    ]
    events = [{"type": "session_start", "session": 1}, first, *retries]
    for k in range(1, 5):
        events += [_step(k, float(k)), _log(k, 4.0 - k / 2)]
    state = replay(events)
    notes = state.header().telemetry.notes
    assert sum("no earlier attempt had finished a step" in n for n in notes) == 2
    report = _report_now(state)
    assert "| Loss (initial → final) | 3.5 → 2 (all of training 3: see Trainings) |" in report
    with state.with_open_steps() as index:
        assert figure_data(state.header(), index).training_starts == []


def test_a_diverging_loss_is_warned_as_it_begins_not_at_every_step_it_stays_up():
    """A loss that blew up and stayed up gave a warning per step: 200 lines of a report's warnings, then '162 more
    warnings not kept'. The summary counts the steps."""
    events = [{"type": "session_start", "session": 1}]
    losses = [4.0 / k for k in range(1, 21)] + [50.0] * 30 + [0.1] * 200 + [50.0] * 30
    for k, loss in enumerate(losses, 1):
        events += [_step(k, float(k)), _log(k, loss)]
    warnings = [w for w in replay(events).header().warnings if w.startswith("loss diverging at step")]
    assert len(warnings) == 2 and warnings[0].startswith("loss diverging at step 21:")


def test_an_automatic_restart_of_a_kaio_log_loop_says_the_loop_goes_on_from_its_own_checkpoint(tmp_path):
    """A loop restarted after a crash went on from its own checkpoint, while kaio's line said 'from the start (no
    complete checkpoint yet)': kaio keeps no checkpoint of a loop's."""
    from kaio.config import RunConfig
    from kaio.record.types import Status
    from kaio.run.outcome import SessionOutcome
    from kaio.run.supervisor import restart_request

    (tmp_path / "loop.py").write_text("import kaio\n")
    cfg = RunConfig.model_validate(
        {"project_name": "p", "launch": {"script": str(tmp_path / "loop.py"), "max_restarts": 1}}
    )
    crashed = SessionOutcome(1, Status.FAILED, error="rank 0: RuntimeError: boom")
    for reporter, said in (
        ("kaio.log", "the loop started again (a kaio.log loop resumes from its own checkpoint, if it keeps one)"),
        ("trainer", "from the start (no complete checkpoint yet)"),
    ):
        run = {"type": "run_start", "rank": 0, "session": 1, "reporter": reporter, "world_size": 1}
        ledger = replay([{"type": "session_start", "session": 1}, run]).ledger
        request, note = restart_request(crashed, None, 1, cfg, ledger)
        assert request is not None and note == f"automatic restart 1 of 1 after: rank 0: RuntimeError: boom; {said}"


def test_a_resume_from_an_earlier_checkpoint_drops_the_later_ones_it_trains_past_from_the_record():
    """checkpoint-25 was deleted (or damaged), the resume went on from checkpoint-20 and saved 30: the report still
    named checkpoint-25 as the latest, and history.json's checkpoints listed it beside 30."""
    run = {"type": "run_start", "rank": 0, "session": 1, "max_steps": 40}
    events = [{"type": "session_start", "session": 1}, run]
    for k in range(1, 26):
        events += [_step(k, float(k))]
        if k in (20, 25):
            events += [{"type": "save", "rank": 0, "session": 1, "step": k, "path": f"out/checkpoint-{k}"}]
    events += [{"type": "session_start", "session": 2, "kind": "resume"}, {**run, "session": 2, "start_step": 20}]
    for k in range(21, 31):
        events += [_step(k, 100.0 + k, session=2)]
    events += [{"type": "save", "rank": 0, "session": 2, "step": 30, "path": "out/checkpoint-30"}]
    checkpoints = history_of(replay(events))["checkpoints"]
    assert [(c["step"], c["session"]) for c in checkpoints] == [(20, 1), (30, 2)]


def test_a_training_from_step_0_in_an_output_dir_holding_checkpoints_is_warned_about(tmp_path):
    """Two projects sharing a script's default trainer_output/: the second's save_total_limit deleted the first's
    checkpoints, and nothing said the folder held another run's."""
    from kaio.child.describe import _checkpoints_before

    out = tmp_path / "trainer_output"
    for name in ("checkpoint-10", "checkpoint-18", "checkpoint-x", "runs"):
        (out / name).mkdir(parents=True)
    (out / "checkpoint-5").write_text("a file, not a checkpoint")
    args = SimpleNamespace(output_dir=str(out))
    assert _checkpoints_before(args, SimpleNamespace(global_step=0)) == [10, 18]
    assert _checkpoints_before(args, SimpleNamespace(global_step=18)) == []  # resumed from them: its own
    assert _checkpoints_before(SimpleNamespace(output_dir=str(tmp_path / "new")), SimpleNamespace(global_step=0)) == []
    run = {"type": "run_start", "rank": 0, "session": 1, "checkpoints_before": [10, 18]}
    run["args"] = {"output_dir": "trainer_output"}
    warnings = replay([{"type": "session_start", "session": 1}, run]).header().warnings
    assert warnings == [
        "session 1: the script's output_dir (trainer_output) already held checkpoint-10, checkpoint-18 as the "
        "training began from step 0: another run's? This run saves beside them, its save_total_limit may delete "
        "them, and a resume may take the newest; give each run an output_dir of its own"
    ]


def test_a_job_of_several_machines_without_a_started_rank_says_where_its_nodes_meet():
    """torch's rendezvous waits for a missing node for 15 minutes without a word: after two minutes, kaio says
    where the nodes must meet; a started rank, or a job of one machine, says nothing."""
    from kaio.config import LaunchConfig
    from kaio.run.job_follow import rendezvous_warning

    job = LaunchConfig(nnodes=2, main_addr="gpu01", main_port=29710)
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    ledger = replay(events).ledger
    assert rendezvous_warning(job, ledger, 1e9 + 60) is None  # not yet
    said = rendezvous_warning(job, ledger, 1e9 + 130)
    assert said is not None and said.startswith(
        "no rank has started after 130 s: the job's 2 nodes meet at gpu01:29710"
    )
    assert rendezvous_warning(LaunchConfig(), ledger, 1e9 + 130) is None
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 5, "world_size": 2}
    assert rendezvous_warning(job, replay([*events, run]).ledger, 1e9 + 130) is None


def test_a_trainers_own_unprefixed_eval_metrics_with_several_eval_sets_are_each_sets_evaluations():
    """TRL's RewardTrainer, with eval_dataset={"val": ..., "val2": ...}, logs eval_val_loss but an unprefixed
    eval_accuracy for each set: each set's is its own evaluation's, and none stays in the step's metrics."""
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, _step(1, 1.0)]
    events += [{"type": "log", "rank": 0, "session": 1, "step": 1, "extra": {"accuracy": 0.5}}]
    for name, accuracy in (("val", 0.25), ("val2", 0.75)):
        metrics = {f"eval_{name}_loss": 1.0, f"eval_{name}_runtime": 0.5, f"eval_{name}_samples_per_second": 9.0}
        events += [{"type": "log", "rank": 0, "session": 1, "step": 1, "extra": {**metrics, "eval_accuracy": accuracy}}]
        events += [{"type": "eval", "rank": 0, "session": 1, "step": 1, "metrics": metrics}]
    history = history_of(replay(events))
    assert history["steps"][0]["metrics"] == {"accuracy": 0.5}
    assert [e["metrics"]["eval_accuracy"] for e in history["evals"]] == [0.25, 0.75]


def test_a_later_training_of_the_script_smooths_its_own_loss_and_every_warning_is_counted():
    """SFT, then DPO in one script: the DPO's loss (0.69) is not smoothed on from the SFT's (3.6), and the DPO's
    few losses are no level yet on the dashboard (nor in the report). A warning at every step (more than a
    snapshot carries) is counted whole."""
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 12, "world_size": 1}
    run |= {"trainer": "SFTTrainer", "args": {"learning_rate": 2e-5}}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    for k in range(1, 13):
        events += [_step(k, float(k)), _log(k, 3.6)]
    dpo = {**run, "training": 2, "start_step": 12, "step_offset": 12, "max_steps": 20, "trainer": "DPOTrainer"}
    events += [{**dpo, "args": {"learning_rate": 5e-7}}]
    for k in range(13, 17):
        events += [_step(k, float(k)), _log(k, 0.69)]
    from kaio.run.live import build_snapshot

    state = replay(events)
    steps = history_of(state)["steps"]
    assert steps[11]["loss_smoothed"] == pytest.approx(3.6) and steps[-1]["loss_smoothed"] == pytest.approx(0.69)
    snapshot = build_snapshot(state.ledger, state.parts.live, 16, ())
    assert snapshot.loss == 0.69 and snapshot.loss_smoothed is None  # 4 losses of this training: too few

    report = _report_now(state)
    assert "too few losses logged to smooth (4)" in report
    assert history_of(state)["run"]["training"] == 2
    # Each training's own losses, apart: cross-entropy then DPO's sigmoid loss are not one curve.
    assert [(t["training"], t["first_step"], t["trainer"]) for t in history_of(state)["trainings"]] == [
        (1, 1, "SFTTrainer"),
        (2, 13, "DPOTrainer"),
    ]
    assert "| Loss (initial → final) | 3.6 → 0.69 (across 2 trainings: see Trainings) |" in report
    assert "| 1 | SFTTrainer | 1–12 (12) | 2e-05 | 3.6 → 3.6 (3.6) | — |" in report
    assert "| 2 | DPOTrainer | 13–16 (4 of 8) | 5e-07 | 0.69 → 0.69 (0.69) | — |" in report  # ended early

    for k in range(60):
        state.warn(f"warning number {k}")
    snapshot = state.snapshot()
    assert snapshot.warning_count == 60 and len(snapshot.warnings) == 50 and snapshot.warnings[-1].endswith("59")


def test_a_later_trainings_start_is_start_up_time_not_its_first_steps():
    """auto_find_batch_size's retries, or a second Trainer built and its model loaded after the first trained:
    the gap before the later training's first step is start-up, not an optimizer step (ten retries' 14.7 s
    were counted as goodput, and the samples/s divided by them). The script's own evaluation between the two is
    evaluation time; a resume that trains that step again drops its start with it; and a later training that
    never reached its first step leaves nothing for the next session's steps."""
    from kaio.report.summary import summarize, time_buckets

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 4, "world_size": 1}
    run |= {"args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}}
    second = {**run, "training": 2, "start_step": 2, "step_offset": 2, "max_steps": 4}
    evaluation = {"eval_loss": 1.0, "eval_runtime": 3.0, "eval_samples_per_second": 3.0}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run, _step(1, 1.0), _step(2, 2.0)]
    events += [{"type": "train_end", "rank": 0, "session": 1, "step": 2}]
    events += [{"type": "eval", "rank": 0, "session": 1, "step": 2, "metrics": evaluation}]  # the script's own
    events += [second, _step(3, 12.0), _step(4, 13.0)]  # 10 s after step 2: 3 s evaluating, 6 s starting, 1 s step
    ended = {"type": "session_end", "session": 1, "t_wall": 1e9 + 14.0, "status": "COMPLETED", "exit_code": 0}
    state = replay([*events, ended])
    assert [s["training_start_s"] for s in history_of(state)["steps"]] == [None, None, pytest.approx(6.0), None]
    with state.with_open_steps() as index:
        s = summarize(state.header(), index)
    assert s.productive_s == pytest.approx(3.0)  # steps 2, 3 and 4 (step 1 ends the session's start-up)
    assert (s.startup_s, s.eval_s) == (pytest.approx(1.0 + 6.0), pytest.approx(3.0))
    assert s.samples_per_s == pytest.approx(16 / 4.0)  # 16 samples over the 4 steps' own seconds
    assert time_buckets(s)[0][0] == "Start-up (launch to the first step), and a later training's start"
    s.compiled = True  # torch_compile: the first step's minute is the compilation's, said where it is counted
    assert time_buckets(s)[0][0] == (
        "Start-up (launch to the first step, which torch.compile compiles), and a later training's start"
    )

    # Failed after step 3; the resume trains step 3 again from checkpoint-2 (its start is in its new entry only).
    failed = {**ended, "status": "FAILED", "exit_code": 1}
    resumed = [{"type": "session_start", "session": 2, "t_wall": 1e9 + 100}, {**run, "session": 2, "start_step": 2}]
    resumed += [_step(3, 101.0, session=2), _step(4, 102.0, session=2)]
    steps = history_of(replay([*events[:-1], failed, *resumed]))["steps"]
    assert [s["training_start_s"] for s in steps] == [None, None, None, None]

    # The second training's RunStart, then the process died: the next session's steps are no training's start.
    died = [*events[:4], second, failed, *resumed[:2], _step(3, 101.0, session=2), _step(4, 130.0, session=2)]
    assert all(s["training_start_s"] is None for s in history_of(replay(died))["steps"])


def test_a_resume_inside_a_later_training_continues_that_trainings_smoothed_loss():
    """An automatic restart from a checkpoint of the script's second training: the smoothed loss it continues is
    the second training's (0.69), not one mixed with the first's (3.6)."""
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 12, "world_size": 1}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    events += [e for k in range(1, 13) for e in (_step(k, float(k)), _log(k, 3.6))]
    events += [{**run, "training": 2, "start_step": 12, "step_offset": 12, "max_steps": 24}]
    events += [e for k in range(13, 21) for e in (_step(k, float(k)), _log(k, 0.69))]
    events += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 30, "status": "FAILED", "exit_code": 1}]
    events += [{"type": "session_start", "session": 2, "t_wall": 1e9 + 40, "kind": "restart"}]
    events += [{**run, "session": 2, "start_step": 18, "max_steps": 24}]  # the script again, from checkpoint-18
    smoother = replay(events).parts.steps.smoother
    assert smoother.count == 6 and smoother.high == pytest.approx(0.69) and smoother.low == pytest.approx(0.69)


def test_a_resume_whose_script_passed_its_own_checkpoint_says_where_its_trainer_began():
    """The official example scripts pass --resume_from_checkpoint to train() themselves: kaio's checkpoint is
    then not the one the Trainer loads. The record says so instead of 'resumed from checkpoint-32' alone."""
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 40, "world_size": 1}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    events += [_step(k, float(k)) for k in range(1, 33)]
    events += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 40, "status": "INTERRUPTED", "exit_code": 143}]
    resumed = {"type": "session_start", "session": 2, "t_wall": 1e9 + 50, "kind": "resume"}
    from pathlib import Path

    from kaio.config import RunConfig
    from kaio.run.project import resumed_note

    script = RunConfig.model_validate({"project_name": "p", "launch": {"script": __file__}})  # any script
    said = resumed_note(script, Path("/ck/checkpoint-32"))  # the session's note (kaio.run.project)
    note = {"type": "note", "level": "info", "text": f"session 2: {said}"}
    events += [{**resumed, "resume_from": "/ck/checkpoint-32"}, note, {**run, "session": 2, "start_step": 20}]
    state = replay(events)
    assert state.parts.warnings.items == [
        "session 2: kaio resumed the script from checkpoint-32, but its Trainer began at step 20 (the script passed "
        "its own resume_from_checkpoint, which kaio does not override): steps 21-32 are trained again"
    ]
    # The session's note does not say "resumed from checkpoint-32" beside it: only what kaio did.
    assert state.ledger.telemetry.notes == ["session 2: kaio handed the script checkpoint-32 to resume from"]
    recipe = RunConfig.model_validate({"project_name": "p"})  # kaio's own recipe loads what it is handed
    assert resumed_note(recipe, Path("/ck/checkpoint-32")) == "resumed from checkpoint-32"
    assert replay([*events[:-1], {**run, "session": 2, "start_step": 32}]).parts.warnings.items == []


def test_a_trainer_that_began_at_its_last_step_trained_none_and_its_closing_log_is_no_step():
    """get_last_checkpoint found checkpoint-120 of 120: the Trainer trains nothing, logs its closing summary
    (train_loss 0) at step 120. That is no optimizer step of this record (it read '1 recorded', train_loss 0)."""
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 120, "max_steps": 120, "world_size": 1}
    closing = {"train_runtime": 0.0083, "train_loss": 0.0, "train_samples_per_second": 0.0}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    events += [{"type": "log", "rank": 0, "session": 1, "step": 120, "extra": closing}]
    events += [{"type": "train_end", "rank": 0, "session": 1, "step": 120}]
    assert history_of(replay(events))["steps"] == []


def test_which_training_of_the_script_saved_a_checkpoint_is_known_for_a_resume_and_a_restart(tmp_path):
    """kaio hands a checkpoint to the script's first train() only: one saved by a later training is refused by
    `kaio resume` and, the same way, by an automatic restart (which loaded it into the first training)."""
    from pathlib import Path

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 4, "world_size": 1}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run, _step(1, 1.0), _step(2, 2.0)]
    events += [{"type": "save", "rank": 0, "session": 1, "step": 2, "path": str(tmp_path / "a/checkpoint-2")}]
    events += [{**run, "training": 2, "start_step": 2, "step_offset": 2, "max_steps": 4}, _step(3, 3.0)]
    events += [{"type": "save", "rank": 0, "session": 1, "step": 3, "path": str(tmp_path / "b/checkpoint-1")}]
    ledger = replay(events).ledger
    assert ledger.later_training_of(tmp_path / "a/checkpoint-2") is None
    assert ledger.later_training_of(tmp_path / "b/checkpoint-1") == 2
    assert ledger.later_training_of(Path("/elsewhere/checkpoint-9")) is None
    # The later training saving into the first one's folder overwrites its checkpoint-2: one entry, the latest.
    events += [
        _step(4, 4.0),
        {"type": "save", "rank": 0, "session": 1, "step": 4, "path": str(tmp_path / "a/checkpoint-2")},
    ]
    listed = [(c["step"], c["path"]) for c in history_of(replay(events))["checkpoints"]]
    assert listed == [(3, str(tmp_path / "b/checkpoint-1")), (4, str(tmp_path / "a/checkpoint-2"))]


def test_numbers_logged_before_the_first_step_and_again_within_a_step_keep_the_first_and_the_trainers_own():
    """A script's `trainer.log({"n_params": ...})` before train() is the Trainer's step 0, no step's entry: it was
    dropped unsaid. A compute_loss that logs from each micro-batch logs at the step before the one it trains
    (the Trainer's global_step), after the Trainer's own log there: the Trainer's numbers (the tokens seen) were
    overwritten by the last micro-batch's. The first number of a step is kept, and the repetition said."""
    from kaio.report.history import history_from_file
    from kaio.report.summary import summarize

    def log(step: int, **extra) -> dict:
        return {"type": "log", "rank": 0, "session": 1, "step": step, "extra": extra}

    evaluation = {"eval_loss": 3.0, "eval_runtime": 0.5, "eval_samples_per_second": 8.0}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, log(0, n_params=12384, n_train=400)]
    # eval_on_start: evaluate() logs its metrics at step 0 too; they are the evaluation's, not the step's.
    events += [log(0, **evaluation, num_input_tokens_seen=0), {"type": "eval", "rank": 0, "session": 1, "step": 0}]
    events[-1]["metrics"] = evaluation
    events += [log(0, micro=50.0), log(0, micro=51.0)]  # the first step's micro-batches: the Trainer's step 0
    events += [_step(1, 1.0), {**_log(1, 2.0), "extra": {"num_input_tokens_seen": 436}}]
    events += [log(1, micro=43.0, num_input_tokens_seen=608), log(1, micro=44.0), _step(2, 2.0), _step(3, 3.0)]
    # Another Trainer's evaluate() after the training logs at its own step 0: the evaluation's too.
    later = {"eval_loss": 0.9, "eval_runtime": 2.0}
    events += [log(0, **later), {"type": "eval", "rank": 0, "session": 1, "step": 3, "metrics": later}]
    state = replay(events)
    history = history_of(state)
    assert history["metrics_at_step_0"] == {"micro": 50.0, "n_params": 12384.0, "n_train": 400.0}
    assert history["steps"][0]["metrics"] == {"num_input_tokens_seen": 436.0, "micro": 43.0}
    notes = history["telemetry"]["notes"]
    assert any("logged metric micro was logged more than once at step 1" in n for n in notes)
    assert [e["metrics"]["eval_loss"] for e in history["evals"]] == [3.0, 0.9]
    # The Trainer adds its count of tokens to every log: the same number again is no repetition to tell of.
    again = [{"type": "session_start", "session": 1, "t_wall": 1e9}, _step(1, 1.0)]
    again += [{**_log(1, 2.0), "extra": {"num_input_tokens_seen": 100}}, log(1, num_input_tokens_seen=100)]
    assert not history_of(replay(again))["telemetry"]["notes"]
    # Its running time too, in every log while it counts tokens: the closing log's is the training's, unsaid.
    closing = [*again[:2], {**_log(1, 2.0), "extra": {"train_runtime": 26.96}}, log(1, train_runtime=27.02)]
    closed = history_of(replay(closing))
    assert closed["steps"][0]["metrics"]["train_runtime"] == 27.02 and not closed["telemetry"]["notes"]
    with state.with_open_steps() as index:
        s = summarize(state.header(), index)
    micro = next(m for m in s.logged_metrics if m.name == "micro")
    assert (micro.logged, micro.first, micro.last, micro.last_step) == (2, 50.0, 43.0, 1)
    assert next(m for m in s.logged_metrics if m.name == "n_params").first == 12384.0 and s.logged_at_step_0
    # A history.json read back (its journal gone) still has them.
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "history.json"
        path.write_text(json.dumps(history))
        _, read_back = history_from_file(path)
        assert read_back.metrics_at(0) == history["metrics_at_step_0"]


def test_a_training_ended_early_by_a_callback_says_so_in_the_report_and_on_the_last_line():
    from kaio.dashboard import final_line

    said = "EarlyStoppingCallback: eval_loss did not improve for 3 evaluations"
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 400, "world_size": 1}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run, _step(1, 1.0), _step(2, 2.0)]
    events += [{"type": "train_end", "rank": 0, "session": 1, "step": 2, "ended_early_by": said}]
    events += [{"type": "session_end", "session": 1, "t_wall": 1e9 + 9, "status": "COMPLETED", "exit_code": 0}]
    state = replay(events)
    report = _report_now(state)
    assert f"**Optimizer steps:** 2 of 400 planned (ended early by {said})" in report
    assert f"[kaio] p COMPLETED: 2/400 steps in 0:09 (ended early by {said})" in final_line(state.snapshot())


@pytest.mark.parametrize(
    ("phase", "said"),
    [
        ("evaluation", "the evaluation after step 30 was still running when launch.grace_seconds (8 s) ended"),
        ("checkpoint save", "saving did not finish within launch.grace_seconds (8 s)"),
        ("training step", "the step after step 30 did not end within launch.grace_seconds (8 s)"),
    ],
)
def test_a_stop_killed_at_the_end_of_the_grace_period_names_what_it_cut_short(phase, said):
    """A Ctrl-C during a 30 s evaluation, with 8 s of grace: the Trainer stops at a step's end, after the
    evaluation; the kill was blamed on "saving", which had not begun."""
    from kaio.config import RunConfig
    from kaio.run.outcome import SessionEndings
    from kaio.run.stopping import StopRequests

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 100, "world_size": 1}
    state = replay([{"type": "session_start", "session": 1, "t_wall": 1e9}, run, _step(30, 30.0)])
    asked = StopRequests(requests=1, killed=True, killed_in=phase, step_at_request=30)
    cfg = RunConfig.model_validate({"project_name": "p", "launch": {"grace_seconds": 8}})
    notes: list[str] = []
    outcome = SessionEndings(cfg, state, asked, lambda text, level: notes.append(text), None).outcome(137, 1)
    assert outcome.status.value == "INTERRUPTED" and outcome.exit_code == 137
    assert outcome.message is not None and f"stopped without saving a checkpoint ({said}" in outcome.message


def test_a_checkpoint_written_whole_before_the_kill_that_the_training_never_said_is_the_one_to_resume(
    tmp_path, monkeypatch
):
    """The grace period ended while a script's on_save callback (an upload, 6 s) ran after the Trainer had written
    checkpoint-26: kaio said 'there is none yet: --overwrite starts the project again', which throws it away."""
    import json

    from kaio.config import RunConfig
    from kaio.run.outcome import SessionEndings
    from kaio.run.stopping import StopRequests

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "out" / "checkpoint-26"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 26}))
    (folder / "model.safetensors").write_bytes(b"w")
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 300, "world_size": 1}
    run["args"] = {"output_dir": "out"}
    state = replay([{"type": "session_start", "session": 1, "t_wall": 1e9}, run, _step(26, 26.0)])
    asked = StopRequests(requests=1, killed=True, killed_in="checkpoint save", step_at_request=20)
    cfg = RunConfig.model_validate({"project_name": "gs", "launch": {"grace_seconds": 2}})
    outcome = SessionEndings(cfg, state, asked, lambda text, level: None, None).outcome(137, 1)
    assert outcome.message is not None and outcome.message.startswith(
        "stopped after step 26: out/checkpoint-26 is complete on disk, though the training was stopped before it "
        "said so (saving did not finish within launch.grace_seconds (2 s)); `kaio resume gs` continues from step 27"
    )


@pytest.mark.parametrize("evaluated", [False, True])
def test_a_stop_before_any_step_says_whether_the_script_had_evaluated(evaluated):
    """A Ctrl-C in an evaluate-only script (or during eval_on_start) was "it was still starting"."""
    from kaio.config import RunConfig
    from kaio.run.outcome import SessionEndings
    from kaio.run.stopping import StopRequests

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 100, "world_size": 1}
    evaluation = {"type": "eval", "rank": 0, "session": 1, "step": 0, "metrics": {"eval_loss": 2.0}, "t_wall": 1e9}
    state = replay([{"type": "session_start", "session": 1, "t_wall": 1e9}, run, *([evaluation] if evaluated else [])])
    asked = StopRequests(requests=1, step_at_request=0)
    cfg = RunConfig.model_validate({"project_name": "p"})
    outcome = SessionEndings(cfg, state, asked, lambda text, level: None, None).outcome(143, 1)
    said = "no step had been trained; the script had evaluated" if evaluated else "it was still starting"
    assert outcome.message is not None and f"stopped without saving a checkpoint ({said}" in outcome.message


def test_a_stops_promise_of_a_resume_names_the_scripts_own_resume_from_checkpoint(tmp_path):
    """trl.scripts.sft with --resume_from_checkpoint out/checkpoint-300 in launch.script_args, stopped at 311:
    "`kaio resume` continues from step 312" was false (the script's own argument wins: it began at 300 again)."""
    from kaio.config import RunConfig
    from kaio.run.outcome import SessionEndings
    from kaio.run.stopping import StopRequests

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 300, "max_steps": 1500, "world_size": 1}
    saved = {"type": "save", "rank": 0, "session": 1, "step": 311, "path": "out/checkpoint-311"}
    state = replay([{"type": "session_start", "session": 1}, run, _step(311, 1.0), saved])
    script = tmp_path / "sft.py"
    script.write_text("")
    args = ["--output_dir", "out", "--resume_from_checkpoint", "out/checkpoint-300"]
    cfg = RunConfig.model_validate({"project_name": "p", "launch": {"script": str(script), "script_args": args}})
    asked = StopRequests(requests=1, step_at_request=311)
    outcome = SessionEndings(cfg, state, asked, lambda text, level: None, None).outcome(143, 1)
    assert outcome.message is not None and outcome.message.startswith(
        "stopped after step 311 with checkpoint-311 saved: `kaio resume p` continues from step 312 once the "
        "script's own --resume_from_checkpoint out/checkpoint-300 is taken out of launch.script_args"
    )


def test_steps_another_rank_reported_far_ahead_of_rank_0_are_sealed_in_order_once_rank_0_reaches_them():
    """A kaio.log loop's ranks run apart (no collective holds them together): rank 1 50k steps ahead made every
    event scan all its open steps (a 2-rank, 50k-step record took 34 s to rebuild, 6 s now; docs/performance.md)."""
    run = {"type": "run_start", "rank": 0, "session": 1, "reporter": "kaio.log", "world_size": 2}
    ahead = [_step(k, float(k), rank=1) for k in range(1, 301)]
    behind = [_step(k, float(k)) for k in range(1, 301)]
    steps = history_of(replay([{"type": "session_start", "session": 1}, run, {**run, "rank": 1}, *ahead, *behind]))
    assert [s["step"] for s in steps["steps"]] == list(range(1, 301))
    assert all(set(s["peak_vram_bytes"]) == {"0", "1"} for s in steps["steps"])
    assert steps["telemetry"]["dropped_late_events"] == 0


def test_a_stopped_kaio_log_loop_is_said_as_a_loop_with_checkpoints_of_its_own():
    """A Ctrl-C in a plain loop: it said "stopped without saving a checkpoint... none yet", of a loop that saved its
    own in its `except KeyboardInterrupt:` (which kaio's stop now reaches)."""
    from kaio.config import RunConfig
    from kaio.run.outcome import SessionEndings
    from kaio.run.stopping import StopRequests

    run = {"type": "run_start", "rank": 0, "session": 1, "reporter": "kaio.log", "world_size": 1}
    state = replay([{"type": "session_start", "session": 1}, run, _step(1, 1.0), _step(2, 2.0)])
    cfg = RunConfig.model_validate({"project_name": "p"})
    outcome = SessionEndings(cfg, state, StopRequests(requests=1, step_at_request=2), lambda *n: None, None)
    assert outcome.outcome(143, 1).message == (
        "stopped the loop after step 2 (a KeyboardInterrupt raised in it, as a Ctrl-C without kaio would: an "
        "`except KeyboardInterrupt:` of its own runs); a kaio.log loop's checkpoints are its own: `kaio resume p` "
        "starts it again, to continue from its checkpoint in this record"
    )
    later = replay([{"type": "session_start", "session": 1}, {**run, "start_step": 999}, _step(1000, 1.0)])
    assert "session 1: the loop's first kaio.log step was 1000: steps 1-999 are not in this record" in (
        later.header().telemetry.notes
    )  # not "the Trainer began at step 999 (the script resumed it from a checkpoint of its own)"


def test_a_checkpoint_whose_save_the_kill_cut_short_is_named(tmp_path, monkeypatch):
    """A second Ctrl-C during a save leaves checkpoint-30 with its config only: kaio resume skips it, but a plain
    run of a script that resumes from get_last_checkpoint() takes the newest folder and crashes on it."""
    from kaio.config import RunConfig
    from kaio.run.outcome import SessionEndings
    from kaio.run.stopping import StopRequests

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "checkpoint-30").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-30" / "config.json").write_text("{}")
    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 100, "world_size": 1}
    run |= {"args": {"output_dir": "out"}}
    state = replay([{"type": "session_start", "session": 1, "t_wall": 1e9}, run, _step(30, 30.0)])
    asked = StopRequests(requests=2, killed=True, step_at_request=30)
    notes: list[str] = []
    cfg = RunConfig.model_validate({"project_name": "p"})
    SessionEndings(cfg, state, asked, lambda text, level: notes.append(text), None).outcome(137, 1)
    assert any(n.startswith("out/checkpoint-30 is half-written (the kill cut its save short)") for n in notes), notes
    # checkpoint-30 saved whole at the stop, the kill cut the next one short: named as well.
    (tmp_path / "out" / "checkpoint-31").mkdir()
    saved = {"type": "save", "rank": 0, "session": 1, "step": 30, "path": "out/checkpoint-30"}
    state = replay([{"type": "session_start", "session": 1, "t_wall": 1e9}, run, _step(30, 30.0), saved])
    notes.clear()
    kept = SessionEndings(cfg, state, asked, lambda text, level: notes.append(text), None).outcome(137, 1).message
    assert kept is not None and kept.startswith("stopped after step 30 with checkpoint-30 saved")
    assert [n for n in notes if "half-written" in n] == [
        "out/checkpoint-31 is half-written (the kill cut its save short): `kaio resume p` skips it; delete it "
        "before the script resumes from its newest checkpoint without kaio"
    ]


def test_a_checkpoint_saved_after_the_loss_went_nan_for_good_is_said_so_and_resume_skips_it(tmp_path):
    """The loss went NaN at step 7, the Trainer logged it at step 10 (logging_steps=5), and saved checkpoint-8 in
    between: the report named checkpoint-8 as the latest with no caveat, and `kaio resume` trained on from its NaN
    weights. The record keeps the first NaN step; the report says the latest checkpoint may hold NaN weights and
    names the one before; the resume skips it. A later finite loss (the weights were not NaN) clears it."""
    import json

    from kaio.report.markdown import render_markdown
    from kaio.report.summary import summarize
    from kaio.run.checkpoints import latest_checkpoint

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 30, "world_size": 1}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    for k in range(1, 11):
        events.append(_step(k, 10.0 + k))
        if k == 5:
            events.append(_log(5, 3.0))
        if k in (4, 8):
            events.append({"type": "save", "rank": 0, "session": 1, "step": k, "path": f"out/checkpoint-{k}"})
    events.append({**_log(10, "nan"), "nonfinite_from": 7})
    state = replay(events)
    with state.with_open_steps() as index:
        assert index.nonfinite_since() == 7
        header = state.header()
        report = render_markdown(header, summarize(header, index), index.evals())
    assert (
        "- **Latest checkpoint:** step 8 (`out/checkpoint-8`), saved after the loss went non-finite (from step 7 on): "
        "its weights may be NaN; the latest before it: step 4 (`out/checkpoint-4`)"
    ) in report
    assert history_of(state)["steps"][9]["loss_nonfinite_from"] == 7
    for step in (4, 8):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "model.safetensors").write_bytes(b"w")
    said: list[str] = []
    assert latest_checkpoint(tmp_path, said.append, at_most=10, nonfinite_since=7) == tmp_path / "checkpoint-4"
    assert said == [
        f"note: skipping {tmp_path / 'checkpoint-8'}: saved after the loss went NaN/inf (step 7): its weights may be NaN"
    ]
    recovered = replay([*events, _step(11, 21.0), _log(11, 2.5)])
    with recovered.with_open_steps() as index:
        assert index.nonfinite_since() is None


def test_non_finite_gradient_norms_are_counted_in_the_key_metrics_as_non_finite_losses_are():
    """A NaN gradient norm at steps 7 and 8 with finite losses: warned once (at step 7), and the Key metrics'
    gradient norm row said nothing of them, where the loss row counts its NaNs."""
    from kaio.report.markdown import render_markdown
    from kaio.report.summary import summarize

    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    for k in range(1, 11):
        norm = "nan" if k in (7, 8) else 1.0 + k / 10
        events += [_step(k, 10.0 + k), {**_log(k, 3.0 - k / 10), "grad_norm": norm}]
    state = replay(events)
    with state.with_open_steps() as index:
        header = state.header()
        report = render_markdown(header, summarize(header, index), index.evals())
    assert (
        "| Gradient norm (median · largest) | 1.45 · 2 at step 10; NaN/inf at 2 logged steps (first at step 7) |"
        in (report)
    )
    assert header.warnings == ["non-finite gradient norm (nan) at step 7"]


def test_a_stop_that_saved_a_checkpoint_after_the_loss_went_nan_does_not_promise_it():
    """on_nonfinite: warn, the loss NaN from step 7, a SIGTERM at step 17: the stop's checkpoint-18 was said to be
    where `kaio resume` continues from, though its weights are NaN and the resume skips it."""
    from kaio.config import RunConfig
    from kaio.run.outcome import SessionEndings
    from kaio.run.stopping import StopRequests

    run = {"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 30, "world_size": 1}
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}, run]
    for k in range(1, 19):
        events += [_step(k, float(k))] + ([{**_log(10, "nan"), "nonfinite_from": 7}] if k == 10 else [])
    events += [{"type": "save", "rank": 0, "session": 1, "step": 18, "path": "out/checkpoint-18"}]
    state = replay(events)
    cfg = RunConfig.model_validate({"project_name": "p"})
    asked = StopRequests(requests=1, step_at_request=17)
    outcome = SessionEndings(cfg, state, asked, lambda text, level: None, None).outcome(143, 1)
    assert outcome.message == (
        "stopped after step 18 with checkpoint-18 saved, after the loss went NaN/inf (from step 7 on): its weights "
        "may be NaN, and `kaio resume p` continues from the latest checkpoint before that"
    )


def test_a_script_whose_trainer_reports_to_comet_itself_is_told_of_the_second_experiment():
    """report_to="comet_ml" (or "all") with a Comet key: the Trainer's own CometCallback made a second experiment
    of the run beside kaio's, its steps restarting at each training, and nothing said so."""
    from transformers import DefaultFlowCallback

    from kaio.child.describe import _integrations

    comet = type("CometCallback", (), {"__module__": "transformers.integrations.integration_utils"})
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[DefaultFlowCallback(), comet()]))
    assert _integrations(trainer) == ["CometCallback"]
    run = {"type": "run_start", "rank": 0, "session": 1, "integrations": ["CometCallback"], "world_size": 1}
    start = {"type": "session_start", "session": 1, "config": {"reporting": {"use_comet_ml": True}}}
    (said,) = replay([start, run]).header().warnings
    assert said.startswith("the script's Trainer reports to Comet ML itself (report_to includes comet_ml, or all)")
    start["config"] = {"reporting": {"use_comet_ml": False}}  # kaio's own is off: one experiment, the script's
    assert replay([start, run]).header().warnings == []


def test_a_session_killed_with_no_error_file_is_timed_for_the_jobs_first_failure(tmp_path, monkeypatch):
    """A node's launcher and rank killed together (its machine gone, an OOM killer): no error file, so no time,
    and the job's report put the head's later 'connection reset' first, with no 'First to fail'."""
    import time

    from kaio.config import RunConfig
    from kaio.run.outcome import SessionEndings
    from kaio.run.stopping import StopRequests

    monkeypatch.chdir(tmp_path)
    state = replay([{"type": "session_start", "session": 1, "t_wall": 1e9}, _step(1, 1.0)])
    cfg = RunConfig.model_validate({"project_name": "p"})
    before = time.time()
    outcome = SessionEndings(cfg, state, StopRequests(), lambda text, level: None, None).outcome(-9, 1)
    assert (outcome.error, outcome.signal) == ("killed by SIGKILL", "SIGKILL")
    assert outcome.error_at is not None and before <= outcome.error_at <= time.time()


def test_a_run_gpu_that_stops_answering_is_said_once_and_one_that_never_answered_is_not():
    """A tester's fake GPU lost 12 s into the run (NVML_ERROR_GPU_IS_LOST on every call): its dashboard row showed
    dashes and a green 'ok', and nothing said it."""
    from conftest import replay

    devices = {
        "type": "devices",
        "devices": [{"backend": "nvml", "index": g, "name": "GPU", "in_run": True} for g in range(2)],
    }

    def tick(t: float) -> dict:
        lost = t >= 5.0
        return {
            "type": "tick",
            "t_mono": t,
            "gpus": [
                # nvml:0 answers, then only its energy (the poller's last) is left; nvml:1 never answers anything.
                {"key": "nvml:0", "t_mono": t, "t_wall": 1e9 + t, "energy_j": 10.0}
                if lost
                else {"key": "nvml:0", "t_mono": t, "t_wall": 1e9 + t, "util_pct": 90.0, "energy_j": 10.0},
                {"key": "nvml:1", "t_mono": t, "t_wall": 1e9 + t},
            ],
        }

    start = [{"type": "session_start", "session": 1, "t_wall": 1e9, "t_mono": 0.0, "kind": "run"}, devices]
    state = replay(start + [tick(0.5 * i) for i in range(60)])  # 30 s: silent from 5 s
    said = [w for w in state.parts.warnings.listed() if "stopped answering" in w]
    assert said == [
        "GPU nvml:0 stopped answering after step 0: nothing read from it for 10 s (lost, or its driver hung); its "
        "figures from then on are missing"
    ]
    quiet = replay(start + [tick(0.5 * i) for i in range(29)])  # answered, then silent for 9 s only
    assert not [w for w in quiet.parts.warnings.listed() if "stopped answering" in w]

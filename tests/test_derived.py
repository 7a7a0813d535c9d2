"""Bounded run state: sealed steps go to steps.jsonl and the tally; state.json + the journal's tail
rebuild exactly what a full replay does."""

from __future__ import annotations

import json

import pytest

from kaio.report.summary import summarize
from kaio.run import derived
from kaio.run.journal import JOURNAL_NAME, Journal
from kaio.run.state import RunState, replay
from kaio.run.steplog import STEPS_NAME, StepLog


def _run_records(steps: int, *, gpus: int = 2, ranks: int = 2, save_every: int = 0, session: int = 1,
                 first_step: int = 1, t0: float = 0.0) -> list[dict]:
    """A session's records as the supervisor journals them: ticks at 2 Hz, one step every 0.3 s."""
    records = [
        {"type": "session_start", "session": session, "t_wall": 1e9 + t0, "t_mono": t0, "kind": "run" if session == 1 else "resume"},
        {"type": "devices", "devices": [{"key": f"nvml:{g}", "name": "GPU", "in_run": True} for g in range(gpus)]},
        {"type": "run_start", "rank": 0, "session": session, "start_step": first_step - 1, "max_steps": 10_000, "world_size": ranks,
         "args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}},
    ]
    t, next_tick, energy = t0, t0, 0.0
    for step in range(first_step, first_step + steps):
        t += 0.3
        while next_tick <= t:
            energy += 100.0
            records.append({"type": "tick", "t_mono": next_tick, "gpus": [
                {"key": f"nvml:{g}", "power_w": 200.0 + step % 7, "util_pct": 90.0, "temp_c": 60.0 + g,
                 "vram_used_bytes": 10**9 * (g + 1), "energy_j": energy, "energy_method": "counter"} for g in range(gpus)]})
            next_tick += 0.5
        for rank in range(ranks):
            records.append({"type": "step", "rank": rank, "session": session, "step": step, "t_mono": t, "t_wall": 1e9 + t,
                            "step_time_s": 0.25, "peak_vram_bytes": 10**8 * (rank + 1) + step})
        records.append({"type": "log", "rank": 0, "session": session, "step": step, "loss": 5.0 / step + (step % 3) * 0.01,
                        "learning_rate": 1e-3, "grad_norm": 1.0 + (step % 5)})
        if save_every and step % save_every == 0:
            records.append({"type": "save", "rank": 0, "session": session, "step": step, "path": f"ck/checkpoint-{step}"})
    return records


def _end(session: int, status: str = "COMPLETED") -> dict:
    return {"type": "session_end", "session": session, "t_wall": 2e9, "status": status, "exit_code": 0 if status == "COMPLETED" else 1}


def _comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "warnings"} | {"warnings": sorted(summary["warnings"])}


def test_sealed_steps_leave_memory_and_the_step_log_holds_them_in_order():
    state = replay("p", _run_records(3000))
    assert len(state.open_steps) <= 4  # two steps of lag, plus the one waiting for its tick
    entries = list(state.step_log.entries())
    assert [e["step"] for e in entries] == list(range(1, len(entries) + 1))
    assert state.tally.entries == len(entries) and state.last_step == 3000
    assert entries[10]["gpus"]["nvml:1"]["power_avg"] is not None and entries[10]["peak_vram_bytes"] == {"0": 10**8 + 11, "1": 2 * 10**8 + 11}
    ended = replay("p", _run_records(3000) + [_end(1)])
    assert not ended.open_steps and ended.tally.entries == 3000


def test_the_tally_of_a_resumed_run_equals_one_of_its_final_steps():
    """A resume from a checkpoint step (tally copy kept) and from an older one (recounted) both drop
    the superseded steps from the step log and from every figure."""
    first = _run_records(500, save_every=100) + [_end(1, "FAILED")]
    for checkpoint in (400, 250):
        records = first + _run_records(300, session=2, first_step=checkpoint + 1, t0=1000.0) + [_end(2)]
        state = replay("p", records)
        history = state.history_with_steps()
        assert [e["step"] for e in history["steps"]] == list(range(1, checkpoint + 301))
        assert {e["session"] for e in history["steps"][checkpoint:]} == {2}
        assert _comparable(summarize(history)) == _comparable(summarize(state.history(), state.report_tally()))
        assert history["sessions"][1]["start_step"] == checkpoint and history["sessions"][1]["end_step"] == checkpoint + 300


def test_an_event_for_a_step_already_sealed_is_counted_not_lost_silently():
    records = _run_records(20, ranks=1)
    records.append({"type": "step", "rank": 1, "session": 1, "step": 3, "t_mono": 0.9, "peak_vram_bytes": 5})
    state = replay("p", records)
    assert state.counters["dropped_late_events"] == 1
    assert state.history()["telemetry"]["dropped_late_events"] == 1


def _journal_project(tmp_path, records: list[dict], *, save_after: int | None) -> RunState:
    """Apply records as the supervisor does (journal, then state), saving state.json after ``save_after`` records."""
    report_dir = tmp_path / "p"
    state = RunState("p", StepLog(report_dir / STEPS_NAME, writable=True, valid_bytes=0))
    journal = Journal(report_dir / JOURNAL_NAME)
    for index, record in enumerate(records, 1):
        journal.append(record)
        state.apply(record)
        if index == save_after:
            derived.save(report_dir, state, journal)
    journal.close()
    state.step_log.close()
    return state


@pytest.mark.parametrize("save_after", [None, 1, 2500, 4999])
def test_state_json_plus_the_journal_tail_equals_a_full_replay(tmp_path, save_after):
    records = _run_records(1500, save_every=200)[:5000]
    live = _journal_project(tmp_path, records, save_after=save_after)
    loaded = derived.load(tmp_path / "p", writable=False)
    assert loaded.from_checkpoint == (save_after is not None)
    assert loaded.replayed == len(records) - (save_after or 0)
    expected, got = replay("p", records), loaded.state
    assert got.history_with_steps()["steps"] == expected.history_with_steps()["steps"] == live.history_with_steps()["steps"]
    assert _comparable(summarize(got.history(), got.report_tally())) == _comparable(summarize(expected.history(), expected.report_tally()))
    assert got.snapshot(now_mono=1.0).recent_losses == expected.snapshot(now_mono=1.0).recent_losses


def test_a_read_only_load_leaves_the_files_alone_and_a_writable_one_repairs_them(tmp_path):
    records = _run_records(600)
    _journal_project(tmp_path, records, save_after=1000)
    report_dir = tmp_path / "p"
    state_doc = json.loads((report_dir / derived.STATE_NAME).read_text())
    size = (report_dir / STEPS_NAME).stat().st_size
    assert size > state_doc["steps_bytes"]  # steps sealed after the save
    read_only = derived.load(report_dir, writable=False)
    assert (report_dir / STEPS_NAME).stat().st_size == size
    writable = derived.load(report_dir, writable=True)
    writable.state.step_log.close()
    assert (report_dir / STEPS_NAME).stat().st_size == size  # cut back to state.json's mark, then re-sealed
    assert read_only.state.history_with_steps()["steps"] == writable.state.history_with_steps()["steps"]


def test_a_damaged_or_foreign_state_json_falls_back_to_a_full_replay(tmp_path):
    records = _run_records(300)
    _journal_project(tmp_path, records, save_after=600)
    report_dir = tmp_path / "p"
    expected = replay("p", records).history_with_steps()["steps"]
    (report_dir / derived.STATE_NAME).write_text('{"format": 1, "journal_offset": 12')  # torn
    loaded = derived.load(report_dir, writable=False)
    assert not loaded.from_checkpoint and loaded.state.history_with_steps()["steps"] == expected
    # a journal that is not the one state.json describes (the run was moved aside and restarted)
    _journal_project(tmp_path / "other", records, save_after=600)
    report_dir = tmp_path / "other" / "p"
    journal = report_dir / JOURNAL_NAME
    journal.write_bytes(journal.read_bytes().replace(b'"t_wall":1000000000.0', b'"t_wall":1000000001.0', 1))
    assert not derived.load(report_dir, writable=False).from_checkpoint


def test_the_journal_ends_a_torn_last_line_before_appending(tmp_path):
    path = tmp_path / JOURNAL_NAME
    path.write_bytes(b'{"type":"note","text":"a"}\n{"type":"no')
    journal = Journal(path)
    journal.append({"type": "note", "text": "b"})
    journal.close()
    lines = path.read_bytes().splitlines()
    assert lines[-1] == b'{"type":"note","text":"b"}' and journal.offset == path.stat().st_size


def test_a_resume_cut_after_the_last_state_json_then_a_crash_still_loads_exactly(tmp_path):
    """state.json saved, then a resume cuts steps.jsonl below its mark and new steps regrow past it,
    then the supervisor dies before saving again: the load must notice and replay, not splice."""
    first = _run_records(400, save_every=100)
    second = [_end(1, "FAILED")] + _run_records(200, session=2, first_step=301, t0=1000.0)
    live = _journal_project(tmp_path, first + second, save_after=len(first))
    report_dir = tmp_path / "p"
    for writable in (False, True):
        loaded = derived.load(report_dir, writable=writable)
        assert not loaded.from_checkpoint  # steps.jsonl no longer ends where state.json says
        assert loaded.state.history_with_steps()["steps"] == live.history_with_steps()["steps"]
        loaded.state.step_log.close()
    lines = (report_dir / STEPS_NAME).read_bytes().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 499))  # 499, 500: not final yet


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_the_step_log_cuts_on_line_ends_across_blocks_and_from_a_mid_line_mark(tmp_path, monkeypatch, block):
    from kaio.run import steplog

    monkeypatch.setattr(steplog, "READ_BLOCK", block)
    path = tmp_path / STEPS_NAME
    log = StepLog(path, writable=True, valid_bytes=0)
    for step in range(1, 40):
        log.append(step, steplog.encode_entry({"step": step, "pad": "x" * (step % 9)}))
    log.close()
    mid_line = path.read_bytes().index(b'{"step":22,') + 5
    log = StepLog(path, writable=True, valid_bytes=mid_line)  # a mark that is not a line end
    assert [e["step"] for e in log.entries()] == list(range(1, 22))
    log.truncate_after(9)
    assert [e["step"] for e in log.entries()] == list(range(1, 10)) and path.stat().st_size == log.file_bytes
    log.truncate_after(0)
    assert list(log.entries()) == [] and log.file_bytes == 0
    log.close()


def test_spooled_events_merge_in_the_order_they_happened(tmp_path):
    """Step events carry a monotonic time, logs only a wall time: merged by wall time, each step's
    log follows it, so none arrives after its step was sealed."""
    from kaio.telemetry import spool
    from kaio.telemetry.protocol import encode

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    lines = []
    for seq, step in enumerate(range(1, 1500), start=1):
        lines.append(encode({"type": "step", "rank": 0, "session": 1, "pid": 7, "seq": 2 * seq - 1, "step": step,
                             "t_mono": 100.0 + step, "t_wall": 1e9 + step}))
        lines.append(encode({"type": "log", "rank": 0, "session": 1, "pid": 7, "seq": 2 * seq, "step": step,
                             "loss": 1.0, "t_wall": 1e9 + step + 0.5}))
    (spool_dir / spool.part_name(1, 0, 7, 1)).write_bytes(b"".join(lines))
    state = replay("p", _run_records(0, ranks=1))
    spool.merge_into(spool_dir, {}, state.apply)
    state.apply(_end(1))
    history = state.history_with_steps()
    assert state.counters["dropped_late_events"] == 0
    assert all(s["loss"] == 1.0 for s in history["steps"]) and len(history["steps"]) == 1499

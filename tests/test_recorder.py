"""The record on disk: the journal (truth), the SQLite index saved with the state, and loading one
from the other, exactly as a full replay would, whatever was damaged or cut."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import msgspec
import pytest

from conftest import history_of, records, replay
from kaio.record import gpu_totals
from kaio.record.index import RunIndex
from kaio.record.journal import Journal
from kaio.record.paths import ProjectPaths
from kaio.report.history import history_document
from kaio.report.summary import summarize
from kaio.run import recorder as loading
from kaio.run.recorder import Recorder


def _run_records(
    steps: int,
    *,
    gpus: int = 2,
    ranks: int = 2,
    save_every: int = 0,
    session: int = 1,
    first_step: int = 1,
    t0: float = 0.0,
) -> list[dict]:
    """A session's records as the supervisor journals them: ticks at 2 Hz, one step every 0.3 s."""
    out = [
        {
            "type": "session_start",
            "session": session,
            "t_wall": 1e9 + t0,
            "t_mono": t0,
            "kind": "run" if session == 1 else "resume",
        },
        {
            "type": "devices",
            "devices": [{"backend": "nvml", "index": g, "name": "GPU", "in_run": True} for g in range(gpus)],
        },
        {
            "type": "run_start",
            "rank": 0,
            "session": session,
            "start_step": first_step - 1,
            "max_steps": 10_000,
            "world_size": ranks,
            "args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
        },
    ]
    t, next_tick, energy = t0, t0, 0.0
    for step in range(first_step, first_step + steps):
        t += 0.3
        while next_tick <= t:
            energy += 100.0
            out.append(
                {
                    "type": "tick",
                    "t_mono": next_tick,
                    "gpus": [
                        {
                            "key": f"nvml:{g}",
                            "t_mono": next_tick,
                            "t_wall": 1e9 + next_tick,
                            "power_w": 200.0 + step % 7,
                            "util_pct": 90.0,
                            "temp_c": 60.0 + g,
                            "vram_used_bytes": 10**9 * (g + 1),
                            "energy_j": energy,
                            "energy_method": "counter",
                        }
                        for g in range(gpus)
                    ],
                }
            )
            next_tick += 0.5
        for rank in range(ranks):
            out.append(
                {
                    "type": "step",
                    "rank": rank,
                    "session": session,
                    "step": step,
                    "t_mono": t,
                    "t_wall": 1e9 + t,
                    "step_time_s": 0.25,
                    "peak_vram_bytes": 10**8 * (rank + 1) + step,
                }
            )
        out.append(
            {
                "type": "log",
                "rank": 0,
                "session": session,
                "step": step,
                "loss": 5.0 / step + (step % 3) * 0.01,
                "learning_rate": 1e-3,
                "grad_norm": 1.0 + (step % 5),
            }
        )
        if save_every and step % save_every == 0:
            out.append({"type": "save", "rank": 0, "session": session, "step": step, "path": f"ck/checkpoint-{step}"})
    return out


def _end(session: int, status: str = "COMPLETED") -> dict:
    return {
        "type": "session_end",
        "session": session,
        "t_wall": 2e9,
        "status": status,
        "exit_code": 0 if status == "COMPLETED" else 1,
    }


def _document(state) -> dict:
    """What history.json would say now, minus its generation time."""
    history = history_of(state)
    history.pop("generated_at")
    return history


def _summary(state):
    with state.with_open_steps() as index:
        return _Summed(msgspec.to_builtins(summarize(state.header(), index)))


class _Summed:
    """A summary compared with another: the same, but for the last bits of its means, which are sums kept as the
    steps were added (in batches that differ between a replay and an index loaded then replayed on)."""

    def __init__(self, value) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Summed) and _close(self.value, other.value)

    def __repr__(self) -> str:
        return repr(self.value)


def _close(a, b) -> bool:
    import math

    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def _journaled(tmp_path, dicts, *, save_after: int | None = None):
    """Apply records as the supervisor does (journal, then state), committing the index after ``save_after``."""
    paths = ProjectPaths(tmp_path / "p")
    loaded = loading.load(paths, writable=True)
    recorder = Recorder(paths, loaded.state)
    for count, record in enumerate(records(*dicts), start=1):
        recorder.record(record)
        if count == save_after:
            recorder.save()
    recorder.journal.flush(fsync=True)
    recorder.close()
    loaded.state.index.close()
    return paths


def test_sealed_steps_leave_memory_for_the_index_in_order():
    state = replay(_run_records(3000))
    assert len(state.parts.steps.open) <= 4  # two steps of lag, plus the one waiting for its tick
    lines = [json.loads(line) for line in state.index.step_lines()]
    assert [e["step"] for e in lines] == list(range(1, len(lines) + 1)) and len(lines) >= 2996
    assert lines[10]["gpus"]["nvml:1"]["power_avg"] is not None
    assert lines[10]["peak_vram_bytes"] == {"0": 10**8 + 11, "1": 2 * 10**8 + 11}
    ended = replay(_run_records(3000) + [_end(1)])
    assert not ended.parts.steps.open and ended.index.last_step() == 3000


@pytest.mark.parametrize("save_after", [None, 5, 400, 1500])
def test_the_index_plus_the_journal_tail_equals_a_full_replay(tmp_path, save_after):
    dicts = (
        _run_records(300, save_every=50) + [_end(1, "FAILED")] + _run_records(200, session=2, first_step=101, t0=200.0)
    )
    paths = _journaled(tmp_path, dicts, save_after=save_after)
    loaded = loading.load(paths, writable=True)
    assert loaded.from_index is (save_after is not None)
    assert loaded.replayed == (len(dicts) - save_after if save_after else len(dicts))
    assert _document(loaded.state) == _document(replay(dicts, project="p"))
    assert _summary(loaded.state) == _summary(replay(dicts, project="p"))
    loaded.state.index.close()


def test_a_read_only_load_touches_nothing_on_disk(tmp_path):
    dicts = _run_records(100) + [_end(1)]
    paths = _journaled(tmp_path, dicts, save_after=50)
    before = {p.name: p.read_bytes() for p in paths.report_dir.iterdir()}
    loaded = loading.load(paths, writable=False)
    assert loaded.from_index and loaded.state.index.last_step() == 100
    loaded.state.index.close()
    assert {p.name: p.read_bytes() for p in paths.report_dir.iterdir()} == before


def test_a_damaged_foreign_or_stale_index_falls_back_to_a_full_replay(tmp_path):
    dicts = _run_records(80) + [_end(1)]
    expected = _document(replay(dicts, project="p"))
    paths = _journaled(tmp_path, dicts, save_after=len(dicts))
    paths.index.write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)  # damaged
    loaded = loading.load(paths, writable=True)
    assert not loaded.from_index and _document(loaded.state) == expected
    loaded.state.index.close()

    paths = _journaled(tmp_path / "b", dicts, save_after=len(dicts))
    conn = sqlite3.connect(paths.index)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'journal_head'", (b"another journal",))
    conn.commit()
    conn.close()
    loaded = loading.load(paths, writable=True)
    assert not loaded.from_index and _document(loaded.state) == expected
    loaded.state.index.close()

    paths = _journaled(tmp_path / "c", dicts, save_after=len(dicts))
    paths.journal.write_bytes(paths.journal.read_bytes()[:1000])  # the journal is shorter than the index says
    loaded = loading.load(paths, writable=True)
    assert not loaded.from_index and loaded.replayed < len(dicts)
    loaded.state.index.close()


def test_a_poison_journal_line_is_counted_warned_and_skipped(tmp_path):
    dicts = _run_records(20) + [_end(1)]
    paths = _journaled(tmp_path, dicts)
    lines = paths.journal.read_bytes().splitlines(keepends=True)
    poisoned = lines[:10] + [b'{"type":"step","rank":0}\n', b"garbage\n"] + lines[10:]
    paths.journal.write_bytes(b"".join(poisoned))
    loaded = loading.load(paths, writable=True)
    assert loaded.invalid == 2 and loaded.state.index.last_step() == 20
    header = loaded.state.header()
    assert header.telemetry.invalid_records == 2
    assert any("2 line(s) of journal.jsonl were not valid records" in w for w in header.warnings)
    loaded.state.index.close()


def test_the_journal_ends_a_torn_last_line_before_appending(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"type":"note","text":"a"}\n{"type":"no')
    journal = Journal(path)
    journal.append(records({"type": "note", "text": "b"})[0])
    journal.close()
    assert path.read_bytes().splitlines()[-1] == b'{"type":"note","text":"b"}'


def test_a_full_disk_keeps_records_in_memory_until_it_can_write(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "journal.jsonl")
    real_write = __import__("os").write
    full = {"on": True}

    def write(fd, data):
        if full["on"] and fd == journal._fd:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("kaio.record.journal.os.write", write)
    journal.append(records({"type": "note", "text": "kept"})[0])
    journal.flush()
    assert journal.write_error is not None and journal.offset == 0
    full["on"] = False
    journal.flush()
    assert journal.write_error is None
    journal.close()
    assert b'"kept"' in (tmp_path / "journal.jsonl").read_bytes()


def test_a_disk_still_full_when_the_run_ends_leaves_the_journals_end_in_the_temp_folder(tmp_path, monkeypatch):
    """kaio's records held in memory were lost with its exit when the disk stayed full to the end (the report
    then said FAILED, 'the supervisor stopped without recording an end'). They are saved to the temp folder; the
    file appended to the journal continues it exactly, the line the disk took half of included."""
    import os

    from kaio.record.journal import read_records

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = tmp_path / "p" / "journal.jsonl"
    journal = Journal(path)
    journal.append(records({"type": "note", "text": "on disk"})[0])
    journal.flush()
    real_write = os.write

    def half_then_full(fd, data):  # the disk takes 10 bytes, then nothing
        if fd != journal._fd:
            return real_write(fd, data)
        if not getattr(half_then_full, "took", False):
            half_then_full.took = True  # type: ignore[attr-defined]
            return real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kaio.record.journal.os.write", half_then_full)
    for text in ("a", "b", "c"):
        journal.append(records({"type": "note", "text": text})[0])
    rescued = journal.close()
    assert rescued is not None and rescued.parent == tmp_path / "tmp" and rescued.name.startswith("kaio-p-journal-")
    with open(path, "ab") as f:  # `cat rescued >> journal.jsonl`, once there is space
        f.write(rescued.read_bytes())
    assert [r.text for _, r in read_records(path)] == ["on disk", "a", "b", "c"]  # type: ignore[union-attr]
    assert Journal(tmp_path / "q" / "journal.jsonl").close() is None  # all on disk: nothing to rescue


def test_a_filesystem_that_refuses_locks_keeps_the_index_in_a_temp_folder(tmp_path, monkeypatch):
    def refuse(conn):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr("kaio.record.index._check_writable", refuse)
    index = RunIndex.open(ProjectPaths(tmp_path / "p"), writable=True)
    try:
        assert index.temporary and index.note and "temp folder" in index.note
        assert not (tmp_path / "p" / "index.sqlite").exists() or index.path != tmp_path / "p" / "index.sqlite"
    finally:
        index.close()


def test_a_resume_cuts_the_index_after_its_checkpoint_and_history_has_each_step_once(tmp_path):
    dicts = (
        _run_records(60, save_every=20)
        + [_end(1, "FAILED")]
        + _run_records(30, session=2, first_step=41, t0=100.0)
        + [_end(2)]
    )
    paths = _journaled(tmp_path, dicts, save_after=len(_run_records(60, save_every=20)))  # saved before the resume
    loaded = loading.load(paths, writable=True)
    history = json.loads(b"".join(history_document(loaded.state.header(), loaded.state.index)))
    assert [s["step"] for s in history["steps"]] == list(range(1, 71))
    assert {s["session"] for s in history["steps"] if s["step"] > 40} == {2}
    loaded.state.index.close()


def test_spooled_events_merge_in_the_order_they_happened(tmp_path):
    """Step events carry a monotonic time, logs only a wall time: merged by wall time, each step's
    log follows it, so none arrives after its step was sealed."""
    from kaio.telemetry import spool
    from kaio.telemetry.protocol import Log, Step, encode

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    lines = []
    for seq, step in enumerate(range(1, 1500), start=1):
        lines.append(
            encode(Step(rank=0, session=1, pid=7, seq=2 * seq - 1, step=step, t_mono=100.0 + step, t_wall=1e9 + step))
        )
        lines.append(encode(Log(rank=0, session=1, pid=7, seq=2 * seq, step=step, loss=1.0, t_wall=1e9 + step + 0.5)))
    (spool_dir / spool.part_name(1, 0, 7, 1)).write_bytes(b"".join(lines))
    state = replay(_run_records(0, ranks=1))
    spool.merge_into(spool_dir, spool.Received(), state.apply, written_out=lambda: True)
    state.apply(records(_end(1))[0])
    history = history_of(state)
    assert state.ledger.telemetry.dropped_late_events == 0
    assert all(s["loss"] == 1.0 for s in history["steps"]) and len(history["steps"]) == 1499


def test_an_index_of_an_older_kaio_is_rebuilt_tables_and_all(tmp_path):
    dicts = _run_records(30) + [_end(1)]
    paths = _journaled(tmp_path, dicts, save_after=len(dicts))
    conn = sqlite3.connect(paths.index)
    conn.execute("DROP TABLE step_gpus")
    conn.execute("CREATE TABLE step_gpus (gpu TEXT, step INTEGER, power_avg REAL)")  # another layout
    conn.execute("UPDATE meta SET value = ? WHERE key = 'format'", (b"1",))
    conn.commit()
    conn.close()
    loaded = loading.load(paths, writable=True)
    assert not loaded.from_index and _document(loaded.state) == _document(replay(dicts, project="p"))
    loaded.state.index.close()


def test_history_json_is_written_when_missing_and_not_rewritten_when_nothing_changed(tmp_path):
    from kaio.run.finalize import write_reports

    dicts = _run_records(20) + [_end(1)]
    paths = _journaled(tmp_path, dicts)
    loaded = loading.load(paths, writable=True)
    write_reports(loaded.state, paths.report_dir, draw=False)
    written = paths.history.stat().st_mtime_ns
    assert json.loads(paths.history.read_text())["steps"][-1]["step"] == 20
    write_reports(loaded.state, paths.report_dir, draw=False)  # nothing happened since: left as it is
    assert paths.history.stat().st_mtime_ns == written
    paths.history.write_text("damaged")  # changed under kaio: written again
    write_reports(loaded.state, paths.report_dir, draw=False)
    assert json.loads(paths.history.read_text())["steps"][-1]["step"] == 20
    loaded.state.index.close()


def test_history_json_copies_the_lines_of_the_final_steps_it_wrote_before_and_adds_only_the_new_ones(tmp_path):
    """A long run's history.json is GBs: a new write copies the final steps' lines from the file written
    before (proved by step 1's line changed in the index behind the file's back: the file keeps what it had),
    unless the file (any write, a touch: its change time) or those steps (a resume's) changed."""
    import os
    import re
    import zlib

    from kaio.run.finalize import write_reports

    session_1 = _run_records(60)
    cut = next(i for i, d in enumerate(session_1) if d["type"] == "log" and d["step"] == 40) + 1
    paths = ProjectPaths(tmp_path / "p")
    loaded = loading.load(paths, writable=True)
    recorder = Recorder(paths, loaded.state)
    state = loaded.state

    def feed(dicts):
        for record in records(*dicts):
            recorder.record(record)
        state.parts.history_mark = None  # written again whatever the marks say

    def step_1_says(number: int) -> None:
        """Step 1's line in the index says another step: a write that reads it shows it, a copy does not."""
        (line,) = state.index.conn.execute("SELECT entry FROM step_lines WHERE step = 1").fetchone()
        changed = re.sub(rb'^\{"step":\d+,', b'{"step":%d,' % number, bytes(line))
        state.index.conn.execute(
            "UPDATE step_lines SET entry = ?, crc = ? WHERE step = 1", (changed, zlib.crc32(changed))
        )

    def steps_written():
        return [s["step"] for s in json.loads(paths.history.read_text())["steps"]]

    def written():
        document = json.loads(paths.history.read_text())
        document.pop("generated_at")
        return document

    feed(session_1[:cut])
    write_reports(state, paths.report_dir, draw=False)
    prefix = state.parts.history_prefix
    assert prefix is not None and 30 < prefix.through < 40  # the steps still open are written, not kept
    assert written() == _document(state)
    step_1_says(7)
    feed(session_1[cut:])
    write_reports(state, paths.report_dir, draw=False)
    assert steps_written() == [*range(1, 61)]  # step 1's line copied from the file, not read from the index again

    os.utime(paths.history, ns=(prefix.ctime_ns, prefix.ctime_ns))  # touched (times set back: its ctime moves)
    feed([_end(1, "INTERRUPTED")])
    write_reports(state, paths.report_dir, draw=False)
    assert steps_written() == [7, *range(2, 61)]  # the whole file from the index

    step_1_says(9)
    feed(_run_records(30, session=2, first_step=41, t0=100.0) + [_end(2)])  # a resume trains steps 41.. again
    write_reports(state, paths.report_dir, draw=False)
    assert steps_written() == [9, *range(2, 71)]  # the whole file from the index
    document = written()
    assert document == _document(state)
    assert [s["session"] for s in document["steps"]] == [1] * 40 + [2] * 30
    recorder.close()
    state.index.close()


@pytest.mark.parametrize("source_folder", ["same", "other filesystem"])
def test_copy_range_copies_a_files_bytes_within_a_filesystem_and_across_filesystems(tmp_path, source_folder):
    """Across filesystems the kernel refuses copy_file_range (EXDEV): the bytes are read and written instead."""
    import os
    import tempfile

    from kaio.fsutil import copy_range

    if source_folder == "same":
        folder = tmp_path
    elif Path("/dev/shm").is_dir() and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        folder = Path(tempfile.mkdtemp(dir="/dev/shm"))
    else:
        pytest.skip("no second filesystem (/dev/shm) here")
    data = bytes(range(256)) * 40_000  # 10 MB: more than one read of the fallback
    source = folder / "source"
    source.write_bytes(data)
    target = tmp_path / "target"
    with open(source, "rb") as src, open(target, "wb", buffering=0) as dst:
        dst.write(b"head")
        copy_range(src.fileno(), dst.fileno(), 7, len(data) - 5)
        dst.write(b"tail")
    assert target.read_bytes() == b"head" + data[7:-5] + b"tail"
    if folder != tmp_path:
        source.unlink()
        folder.rmdir()


def _scanned_totals(conn, weight: float) -> dict:
    """What the report read from every step_gpus row before the totals were kept (the oracle)."""
    w = f"COALESCE(duration_s, {weight!r})"
    means = ", ".join(
        f"SUM({c} * {w}), SUM(CASE WHEN {c} IS NOT NULL THEN {w} END)" for c in ("power_avg", "util", "temp")
    )
    found = {}
    for gpu, power, temp, vram, *sums in conn.execute(
        f"SELECT gpu, MAX(COALESCE(power_max, power_avg)), MAX(temp), MAX(vram_used), {means} FROM step_gpus GROUP BY gpu"
    ):
        found[gpu] = {
            "peaks": (power, temp, vram),
            "means": [(a or 0.0, b or 0.0) for a, b in zip(sums[::2], sums[1::2])],
        }
    for gpu, count, first, reasons in conn.execute(
        "SELECT gpu, COUNT(*), MIN(step), GROUP_CONCAT(DISTINCT throttle) FROM step_gpus WHERE throttle IS NOT NULL "
        "GROUP BY gpu"
    ):
        found[gpu]["throttle"] = (count, first, sorted({r for part in reasons.split(",") for r in [part] if r}))
    return found


def test_the_gpu_totals_kept_as_rows_come_are_what_a_scan_of_every_row_gives(tmp_path):
    """The report's per-GPU peaks, means and throttling read one row per GPU (a scan of 8M rows at 1M steps
    before): batches of steps, steps without a duration or a power reading, throttling seen by several batches,
    a report's provisional steps, a resume's truncation and an index of a kaio before the totals."""
    from kaio.record.types import GpuStepStats, StepEntry

    def entry(step: int, session: int = 1) -> StepEntry:
        gpus = {
            f"nvml:{g}": GpuStepStats(
                power_avg=None if step % 7 == g else 100.0 + step % 13 + 50 * g,
                power_max=None if step % 11 == 0 else 200.0 + step % 17,
                util_avg=float(step % 100),
                temp_max=None if step % 5 == 0 else 40.0 + step % 9,
                vram_used_max_bytes=10**9 + step * g,
                # Each batch of steps (256) sees reasons the ones before did not.
                throttle=(["thermal"] if step < 300 else ["power", "thermal"] if step < 500 else ["sw_slowdown"])
                if step % 50 in (1, 2, 3) and g == 1
                else None,
                samples=1,
            )
            for g in range(3)
        }
        return StepEntry(
            step=step, session=session, duration_s=None if step % 9 == 0 else 0.5 + step % 4 / 10, gpus=gpus
        )

    def check(index: RunIndex) -> None:
        for weight in (1.0, 0.73):
            oracle = _scanned_totals(index.conn, weight)
            kept = gpu_totals.read(index.conn)
            assert set(kept) == set(oracle)
            for gpu, t in kept.items():
                assert (t.power_peak, t.temp_peak, t.vram_peak) == oracle[gpu]["peaks"]
                for (total, w), (want_total, want_w) in zip(
                    (t.weighted(m, weight) for m in gpu_totals.METRICS), oracle[gpu]["means"]
                ):
                    assert total == pytest.approx(want_total) and w == pytest.approx(want_w)
                throttle = (t.throttled_steps, t.throttle_first_step, sorted(t.throttle_reasons))
                assert throttle == oracle[gpu].get("throttle", (0, None, []))

    paths = ProjectPaths(tmp_path / "p")
    index = RunIndex.open(paths, writable=True)
    for step in range(1, 701):  # several insert batches
        index.add_step(entry(step))
    check(index)
    with index.provisional():  # a report's open steps: in, then out
        for step in range(701, 720):
            index.add_step(entry(step))
        check(index)
    check(index)
    index.truncate_after(420)  # a resume trains the steps after 420 again
    check(index)
    for step in range(421, 600):
        index.add_step(entry(step, session=2))
    check(index)
    index.conn.commit()
    index.conn.execute("DROP TABLE gpu_totals")  # an index written by a kaio before the totals
    index.conn.execute("DELETE FROM meta WHERE key = 'gpu_totals'")
    index.conn.commit()
    index.close()
    reopened = RunIndex.open(paths, writable=True)
    check(reopened)
    assert len(gpu_totals.read(reopened.conn)) == 3
    reopened.close()


FULL_DISK_RUN = """\
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from conftest import history_of, records
from test_recorder import _end, _run_records
from kaio.record.paths import ProjectPaths
from kaio.run import recorder as loading

paths = ProjectPaths(Path(sys.argv[1]))
journal_records = records(*_run_records(3000), _end(1))
loaded = loading.load(paths, writable=True)
recorder = loading.Recorder(paths, loaded.state)
for record in journal_records[:2000]:
    recorder.record(record)
recorder.save()
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # the disk is full: every write fails, SQLite's too
for record in journal_records[2000:]:
    recorder.record(record)
recorder.save()
failed, journal_error = recorder.state.index.failed, str(recorder.journal.write_error)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space again
state = recorder.final_state()
recorder.save()
print(json.dumps({"failed": failed, "journal_error": journal_error, "history": history_of(state)}))
recorder.close()
loaded.state.index.close()
"""


def test_an_index_that_a_full_disk_stopped_is_rebuilt_from_the_journal_at_the_end(tmp_path):
    """SQLite's own writes fail on a full disk (a real failure: RLIMIT_FSIZE at 0 in a subprocess). The
    index stops taking writes instead of stopping the run; at the end the state is loaded again from
    the index's last commit and the journal, once the journal is written out: nothing is lost."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "full_disk_run.py"
    script.write_text(FULL_DISK_RUN)
    project = tmp_path / "p"
    result = subprocess.run(
        [sys.executable, str(script), str(project), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["failed"] and out["failed"].startswith("index.sqlite could not be written"), out["failed"]
    assert "File too large" in out["journal_error"]
    expected = history_of(replay(_run_records(3000) + [_end(1)]))
    history = out["history"]
    assert [s["step"] for s in history["steps"]] == [s["step"] for s in expected["steps"]]
    assert history["steps"] == expected["steps"]
    assert any("index.sqlite could not be written" in w for w in history["warnings"]), history["warnings"]
    # The index on disk is whole again: a later load needs no replay.
    loaded = loading.load(ProjectPaths(project), writable=False)
    try:
        assert loaded.from_index and loaded.replayed == 0
        assert history_of(loaded.state)["steps"] == expected["steps"]
    finally:
        loaded.state.index.close()


def test_bytes_damaged_inside_the_index_are_found_and_the_history_rebuilt_from_the_journal(tmp_path):
    """SQLite checks its pages' structure, not what they hold: a number or an entry damaged on disk
    would go into history.json and the summary. Each step's entry and its row are checked against each
    other as history.json is written; a mismatch is IndexDamaged, and `kaio report` rebuilds."""
    from kaio.record.index import IndexDamaged
    from kaio.run.rebuild import rebuild

    dicts = _run_records(80) + [_end(1)]
    expected = _document(replay(dicts, project="p"))
    for damage in (
        "UPDATE steps SET loss = 123.0 WHERE step = 40",  # a number in the row
        "UPDATE step_lines SET entry = CAST(REPLACE(CAST(entry AS TEXT), '\"step\":7,', 'XXXXXXXX') AS BLOB)"
        " WHERE step = 7",  # the entry's bytes
    ):
        paths = _journaled(tmp_path / str(len(damage)), dicts, save_after=len(dicts))
        conn = sqlite3.connect(paths.index)
        assert conn.execute(damage).rowcount == 1
        conn.commit()
        conn.close()
        loaded = loading.load(paths, writable=False)
        try:
            with pytest.raises(IndexDamaged):
                b"".join(history_document(loaded.state.header(), loaded.state.index))
        finally:
            loaded.state.index.close()
    # What `kaio report` does with the last one (it draws the figure too: once is enough here).
    notes: list[str] = []
    rebuild("p", paths.report_dir.parent, notes.append)
    assert any("is damaged" in n and "rebuilding it from" in n for n in notes), notes
    assert json.loads(paths.history.read_text())["steps"] == expected["steps"]


def test_kaio_report_in_a_terminal_says_what_it_is_doing_and_keeps_its_json_alone_on_stdout(tmp_path):
    """A report of a long run takes seconds to minutes: in a terminal a spinner on stderr names each phase;
    with --json, stdout is the JSON alone even when there is a note to say (it goes to stderr)."""
    import subprocess
    import sys

    import pexpect

    paths = _journaled(tmp_path / "reports", _run_records(40) + [_end(1)])
    argv = ["-m", "kaio", "report", "p", "--output-dir", str(tmp_path / "reports")]
    terminal = pexpect.spawn(sys.executable, argv, cwd=tmp_path, dimensions=(24, 120), encoding="utf-8")
    shown = terminal.read()
    terminal.close()
    assert terminal.exitstatus == 0, shown
    assert "\x1b[32m" in shown and "writing history.json and report.md, drawing telemetry.png…" in shown
    assert shown.rstrip().endswith(f"report written: {paths.report}")
    from kaio.run.rebuild import rebuild

    phases: list[str] = []  # each phase, also those too short for the spinner to draw
    rebuild("p", tmp_path / "reports", notify=lambda text: None, phase=phases.append)
    assert phases == [
        f"reading {paths.journal} (0 MiB; what the index lacks)…",
        "writing history.json and report.md, drawing telemetry.png…",
    ]
    paths.history.write_text('{"project": "p", "steps": [')  # truncated: a note to say
    piped = subprocess.run([sys.executable, *argv, "--json"], cwd=tmp_path, capture_output=True, text=True)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["project"] == "p"
    assert "truncated or corrupt JSON" in piped.stderr and "\x1b" not in piped.stderr  # not a terminal: no spinner


def test_a_record_of_a_run_stopped_before_its_first_session_is_no_history_to_refuse_a_new_run(tmp_path):
    """A Ctrl-C (or a kill) in the second between the project's files and the first session: a journal with no
    session, "0 steps, RUNNING", and `kaio run` refused the project until --overwrite. It holds nothing: it goes.
    A record with a session stays."""
    from kaio.record.types import Note, SessionStart
    from kaio.run import recorder as loading
    from kaio.run.project import _forget_a_run_that_never_started

    paths = ProjectPaths(tmp_path / "p")
    paths.report_dir.mkdir()
    journal = Journal(paths.journal)
    journal.append(Note(text="a note before any session", level="info", t_wall=1.0))
    journal.close()
    paths.report.write_text("# Training report: p\n")
    _forget_a_run_that_never_started(paths, loading.load(paths, writable=False).state)
    assert not paths.journal.exists() and not paths.report.exists() and not paths.index.exists()

    journal = Journal(paths.journal)
    journal.append(SessionStart(session=1, t_wall=1.0))
    journal.close()
    kept = loading.load(paths, writable=False).state
    _forget_a_run_that_never_started(paths, kept)
    kept.index.close()
    assert paths.journal.exists()


def test_a_training_stopped_by_a_signal_after_its_supervisor_died_is_interrupted_not_completed(tmp_path):
    """kill -9 of kaio, then a SIGTERM to its training (what `kaio resume`'s refusal asks: stop them): the
    training saved its checkpoint and ended, and `kaio report` closed the session as COMPLETED."""
    from kaio.record.types import Status
    from kaio.run.project import recover_unfinished

    paths = ProjectPaths(tmp_path / "p")
    loaded = loading.load(paths, writable=True)
    recorder = Recorder(paths, loaded.state)
    events = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
    events += [{"type": "run_start", "rank": 0, "session": 1, "max_steps": 300, "world_size": 1}]
    events += [{"type": "step", "rank": 0, "session": 1, "step": k, "t_mono": float(k)} for k in range(1, 65)]
    events += [{"type": "save", "rank": 0, "session": 1, "step": 64, "path": "out/checkpoint-64"}]
    events += [{"type": "train_end", "rank": 0, "session": 1, "step": 64, "stopped": True}]
    for record in records(*events):
        recorder.record(record)
    recorder.save()
    recorder.close()
    state = loading.load(paths, writable=True).state
    assert recover_unfinished(paths, state, pids_here=False) is False
    state.index.close()
    state = loading.load(paths, writable=False).state
    session = state.header().sessions[0]
    assert (session.status, session.error) == (Status.INTERRUPTED, None)
    warnings = state.header().warnings
    assert any("stopped unsupervised (a signal to it) and saved its checkpoint" in w for w in warnings), warnings
    state.index.close()

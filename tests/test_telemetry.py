"""The wire protocol and the FIFO, with real FIFOs and real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import history_of, replay
from kaio.child.emitter import EventEmitter
from kaio.record import rules
from kaio.record.types import SessionStart, decode_record, encode_record
from kaio.telemetry import spool
from kaio.telemetry.fifo import FifoReader, TelemetryFifo
from kaio.telemetry.protocol import (
    MAX_LINE_BYTES,
    Eval,
    Log,
    ProtocolError,
    Save,
    Step,
    decode,
    encode,
    tag_nonfinite,
)


def test_encode_is_one_short_line_and_round_trips():
    line = encode(Log(rank=0, step=3, loss=1.5))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"type": "log", "rank": 0, "step": 3, "loss": 1.5}  # defaults left out
    assert decode(line) == Log(rank=0, step=3, loss=1.5)


def test_nan_loss_travels_as_a_tag_in_strict_json():
    line = encode(Log(rank=0, step=1, loss=tag_nonfinite(float("nan")), grad_norm=tag_nonfinite(float("-inf"))))
    assert b"NaN" not in line and b"Infinity" not in line
    event = json.loads(line)
    assert event["loss"] == "nan" and event["grad_norm"] == "-inf"
    assert decode(line).loss == "nan"


def test_a_path_read_under_an_ascii_locale_travels_as_its_utf8_text():
    # PYTHONUTF8=0 LC_ALL=C: os.getcwd() of /tmp/wé is '/tmp/w\udcc3\udca9', which JSON cannot carry.
    cwd = b"/tmp/w\xc3\xa9".decode("ascii", "surrogateescape")
    event = Save(rank=0, step=4, path=cwd + "/checkpoint-4", removed=[cwd + "/checkpoint-2"])
    line = encode(event)
    assert decode(line) == Save(rank=0, step=4, path="/tmp/wé/checkpoint-4", removed=["/tmp/wé/checkpoint-2"])
    record = SessionStart(session=1, t_wall=1.0, code_file=cwd + "/train.py", argv=["--data", cwd])
    assert decode_record(encode_record(record)) == SessionStart(
        session=1, t_wall=1.0, code_file="/tmp/wé/train.py", argv=["--data", "/tmp/wé"]
    )


def test_kaio_log_counts_a_loop_from_0_and_on_where_its_numbering_starts_again_and_never_raises(tmp_path, monkeypatch):
    """`for step in range(n)`: step 0 was dropped as a late event; numbering started again each epoch scrambled the
    steps; a value kaio cannot take (a list, a word) crashed the training at its first step, and outside kaio too."""
    from kaio.child import patch, plain

    monkeypatch.setattr(plain, "_reporter", None)
    monkeypatch.setattr(patch, "_emitter", None)
    monkeypatch.delenv("KAIO_TELEMETRY_PIPE", raising=False)
    monkeypatch.delenv("KAIO_SPOOL_DIR", raising=False)
    plain.log(step=0, loss="n/a", learning_rate=[1e-3, 2e-3], phase="warmup", d={})  # outside kaio: nothing at all
    assert plain._reporter is None
    monkeypatch.setenv("KAIO_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setattr(stop_module(), "_state", {**stop_module()._state})  # this process's stop state, restored
    for epoch in range(2):
        for step in range(3):
            plain.log(step=step, loss=4.0 - step - epoch, learning_rate=[1e-3], phase="warmup", samples=4)
        plain.log(step=2, eval_loss=3.5 - epoch)  # the last step's evaluation
    plain.finish()
    patch._emitter.close()
    events = [
        json.loads(line) for part in sorted((tmp_path / "spool").iterdir()) for line in part.read_bytes().splitlines()
    ]
    assert [e.get("samples") for e in events if e["type"] == "step"] == [4] * 6
    steps = [(e["step"], e["loss"]) for e in events if e["type"] == "log"]
    assert steps == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 3.0), (5, 2.0), (6, 1.0)]
    assert all(
        e["learning_rate"] == 1e-3 and e.get("extra", {}) == {"phase": None} for e in events if e["type"] == "log"
    )
    assert [(e["step"], e["metrics"]) for e in events if e["type"] == "eval"] == [
        (3, {"eval_loss": 3.5}),
        (6, {"eval_loss": 2.5}),
    ]
    assert stop_module()._state["loop"]  # a stop's SIGTERM raises KeyboardInterrupt in the loop (its own save runs)


def _loop_records(tmp_path, monkeypatch, session: int, loop) -> list[dict]:
    """The journal records of one session of a kaio.log loop run here (``loop(log)``): its events as the spool
    carries them, between the session's start and end."""
    from kaio.child import patch, plain

    monkeypatch.setattr(plain, "_reporter", None)
    monkeypatch.setattr(patch, "_emitter", None)
    monkeypatch.delenv("KAIO_TELEMETRY_PIPE", raising=False)
    monkeypatch.setenv("KAIO_SPOOL_DIR", str(tmp_path / f"spool{session}"))
    monkeypatch.setenv("KAIO_SESSION", str(session))
    monkeypatch.setattr(stop_module(), "_state", {**stop_module()._state})
    loop(plain.log)
    plain.finish()
    patch._emitter.close()
    parts = sorted((tmp_path / f"spool{session}").iterdir())
    events = [{**json.loads(line), "session": session} for part in parts for line in part.read_bytes().splitlines()]
    return [{"type": "session_start", "session": session}, *events, {"type": "session_end", "session": session}]


def test_a_kaio_log_loop_is_recorded_as_it_trained_whatever_its_calls_look_like(tmp_path, monkeypatch):
    """A baseline evaluation before the first step was a step with no loss, shifting every step by one; a loop
    logging every 5th step counted the examples of its first log only; its evaluations' time was training time;
    eval_* given with the loss (wandb.log's way) was no evaluation; a step's loss logged twice was smoothed
    twice; after a restart from the loop's own checkpoint its tokens counted from 0 again."""

    def first(log):
        log(step=0, eval_loss=7.0)  # the baseline, before the loop counting from 1
        for step in range(1, 21):
            if step % 5 == 0:
                log(step=step, loss=1.0, samples=4, tokens=128)
                log(step=step, loss=5.0 - step / 10, samples=4, tokens=128)  # the step's loss, given again
            if step == 10:
                time.sleep(0.2)  # evaluating
                log(step=step, eval_loss=4.0)
            if step == 15:
                log(step=step, eval_accuracy=0.5)  # an evaluation call of the step, alone

    def restarted(log):  # started again, from its own checkpoint of step 15
        for step in range(16, 26):
            log(step=step, loss=5.0 - step / 10, samples=4, tokens=128, eval_loss=3.0 if step == 25 else None)

    first_records = _loop_records(tmp_path, monkeypatch, 1, first)
    state = replay(first_records + _loop_records(tmp_path, monkeypatch, 2, restarted))
    history = history_of(state)
    steps = {s["step"]: s for s in history["steps"]}
    assert list(steps) == [5, 10, 15, *range(16, 26)]  # 20 trained again after the restart
    assert [steps[k]["loss"] for k in (5, 10, 15)] == [4.5, 4.0, 3.5]
    # Every step the loop did not report (from its start, after the baseline) counts as the one reported after it:
    # 5 steps of 4 examples and 128 tokens each.
    assert [(steps[k]["samples_seen"], steps[k]["tokens_seen"]) for k in (5, 10, 15)] == [
        (20, 640),
        (40, 1280),
        (60, 1920),
    ]
    # The restart goes on from the checkpoint's recorded counts, each step reported.
    assert [(steps[k]["samples_seen"], steps[k]["tokens_seen"]) for k in (16, 25)] == [(64, 2048), (100, 3200)]
    # Smoothed once a step, over the losses the record keeps (4.5, 4.0, 3.5...): the 1.0 given first is replaced.
    losses = [steps[k]["loss"] for k in (5, 10, 15)]
    smoother = rules.LossSmoother()
    assert [steps[k]["loss_smoothed"] for k in (5, 10, 15)] == [smoother.add(loss)[0] for loss in losses]
    assert steps[10]["eval_s"] == pytest.approx(0.2, abs=0.15)  # the evaluation's time, not the steps'
    assert steps[5]["eval_s"] is None and "eval_loss" not in steps[25]["metrics"]
    evals = [(e["step"], e["session"], e["metrics"]) for e in history["evals"]]
    assert evals == [
        (0, 1, {"eval_loss": 7.0}),
        (10, 1, {"eval_loss": 4.0}),
        (15, 1, {"eval_accuracy": 0.5}),
        (25, 2, {"eval_loss": 3.0}),
    ]
    start = next(r for r in first_records if r["type"] == "run_start")
    assert start.get("start_step", 0) == 0 and start["world_size"] == 1  # the baseline is before step 1


SPAWNING_LOOP = """
import os, sys, torch.distributed as dist, torch.multiprocessing as mp
import kaio

def train(rank, world):
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=rank, world_size=world)
    for step in (1, 2):
        kaio.log(step=step, loss=1.0 + rank, samples=8)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(train, args=(2,), nprocs=2)
"""


def test_a_script_that_starts_its_own_processes_reports_each_with_its_process_groups_rank(tmp_path):
    """PyTorch's DDP tutorial: one launched process, mp.spawn inside it, each process given its rank by
    init_process_group, no RANK set. Both reported rank 0 of world size 1: 'two processes both said they were rank
    0 ... trained independently', and their losses alternated in the record."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "spawning.py"
    script.write_text(SPAWNING_LOOP)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "KAIO_TELEMETRY_PIPE")}
    env |= {"KAIO_SPOOL_DIR": str(tmp_path / "spool"), "KAIO_SESSION": "1"}
    subprocess.run([sys.executable, str(script), str(port)], env=env, check=True, timeout=120)
    events = [json.loads(line) for part in (tmp_path / "spool").iterdir() for line in part.read_bytes().splitlines()]
    starts = {e["rank"]: e["world_size"] for e in events if e["type"] == "run_start"}
    assert starts == {0: 2, 1: 2}
    assert sorted((e["rank"], e["step"]) for e in events if e["type"] == "step") == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert {e["loss"] for e in events if e["type"] == "log"} == {1.0}  # rank 0's alone


def stop_module():
    from kaio.child import stop

    return stop


def test_oversized_event_drops_extra_then_refuses(tmp_path, capsys):
    shrunk = decode(encode(Log(rank=0, step=1, extra={"blob": "x" * 5000})))
    assert shrunk.extra == {"kaio_truncated": True}
    with pytest.raises(ProtocolError):
        encode(Save(rank=0, step=1, path="x" * MAX_LINE_BYTES))
    # An evaluation of per-class figures for 400 labels: its loss and speed kept, the rest as many as fit, counted.
    per_class = {f"eval_label_{k}_f1": 0.5 for k in range(400)} | {"eval_loss": 1.25, "eval_runtime": 3.0}
    kept = decode(encode(Eval(rank=0, step=4, metrics=per_class)))
    assert kept.metrics["eval_loss"] == 1.25 and kept.metrics["eval_runtime"] == 3.0
    assert kept.left_out == len(per_class) - len(kept.metrics) > 0
    warnings = history_of(replay([{"type": "session_start", "session": 1}, kept]))["warnings"]
    assert warnings == [f"the evaluation at step 4 returned too many metrics for one record: {kept.left_out} left out"]
    # What still cannot be sent is said in the rank's output (child.log), once, not lost unseen.
    emitter = EventEmitter(None, str(tmp_path / "spool"), rank=0, session=1)
    emitter.emit(Save(rank=0, step=1, path="x" * MAX_LINE_BYTES))
    emitter.close()
    assert emitter.dropped == 1 and "kaio: an event was not recorded: event of type Save" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1,2]",
        b'{"type":"bogus","rank":0}',
        b'{"type":"step"}',
        b'{"type":"step","rank":0}',  # no step number: would have crashed the supervisor once
        b'{"type":"step","rank":0,"step":"three"}',
        b'{"type":"log","rank":"0","step":1}',
        b'{"type":"log","rank":0,"step":1,"loss":"a lot"}',
    ],
)
def test_decode_rejects_what_is_not_a_well_formed_event(line):
    with pytest.raises(ProtocolError):
        decode(line)


def _collect(fifo: TelemetryFifo):
    events: list = []
    reader = FifoReader(fifo.read_fd, events.append)
    reader.start()
    return events, reader


def test_reader_counts_and_skips_malformed_and_oversized_lines():
    fifo = TelemetryFifo()
    events, reader = _collect(fifo)
    fd = os.open(fifo.path, os.O_WRONLY)
    os.write(fd, encode(Step(rank=0, step=1)))
    os.write(fd, b"garbage\n")
    os.write(fd, b'{"type":"log","rank":0,"pad":"' + b"y" * 10000 + b'"}\n')
    os.write(fd, encode(Step(rank=0, step=2)))
    os.close(fd)
    fifo.close_write_end()
    reader.join(timeout=5)
    fifo.close()
    assert [e.step for e in events] == [1, 2]
    assert reader.stats.malformed == 1
    assert reader.stats.oversized == 1


def test_supervisor_write_end_keeps_reader_open_until_closed():
    """A rank that exits (closing its end) must not end the stream while others may still come."""
    fifo = TelemetryFifo()
    events, reader = _collect(fifo)
    first = EventEmitter(str(fifo.path), None, rank=0, session=1)
    first.emit(Step(rank=0, step=1))
    first.close()
    reader.join(timeout=0.5)
    assert reader.is_alive(), "EOF came before the supervisor closed its end"
    second = EventEmitter(str(fifo.path), None, rank=0, session=1)
    second.emit(Step(rank=0, step=2))
    second.close()
    fifo.close_write_end()
    reader.join(timeout=5)
    fifo.close()
    assert [e.step for e in events] == [1, 2]


WRITER = textwrap.dedent(
    """
    import sys
    from kaio.child.emitter import EventEmitter
    from kaio.telemetry.protocol import Save
    rank, count = int(sys.argv[2]), int(sys.argv[3])
    emitter = EventEmitter(sys.argv[1], None, rank=rank, session=1)
    pad = "z" * 3000  # near PIPE_BUF: a torn write would show
    for step in range(1, count + 1):
        emitter.emit(Save(rank=rank, step=step, path=pad))
    emitter.close()
    """
)


def test_lines_from_concurrent_writer_processes_never_tear():
    fifo = TelemetryFifo()
    events, reader = _collect(fifo)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(fifo.path), str(rank), "400"]) for rank in range(4)]
    for proc in writers:
        assert proc.wait(timeout=60) == 0
    fifo.close_write_end()
    reader.join(timeout=10)
    fifo.close()
    assert reader.stats.malformed == 0 and reader.stats.oversized == 0
    for rank in range(4):
        assert [e.step for e in events if e.rank == rank] == list(range(1, 401))


def test_emitter_spools_when_nobody_reads(tmp_path):
    path = str(tmp_path / "orphan.fifo")
    os.mkfifo(path)  # a FIFO without a reader: ENXIO at open
    emitter = EventEmitter(path, str(tmp_path / "spool"), rank=1, session=2)
    assert not emitter.connected
    emitter.emit(Step(rank=1, step=5))
    emitter.close()
    os.unlink(path)
    events, bad = spool.missing_events(tmp_path / "spool", spool.Received())
    assert bad == 0
    assert events == [Step(rank=1, session=2, pid=os.getpid(), seq=1, step=5)]


def test_emitter_switches_to_spool_when_reader_dies(tmp_path):
    """The supervisor killed mid-run: EPIPE, then every later event goes to the spool."""
    path = str(tmp_path / "telemetry.fifo")
    os.mkfifo(path)
    read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    emitter = EventEmitter(path, str(tmp_path), rank=0, session=1)
    emitter.emit(Step(rank=0, step=1))
    events = [json.loads(line) for line in os.read(read_fd, 65536).splitlines()]
    os.close(read_fd)  # the supervisor goes away
    emitter.emit(Step(rank=0, step=2))
    emitter.emit(Step(rank=0, step=3))
    emitter.close()
    assert [e["step"] for e in events] == [1]
    assert not emitter.connected
    # Everything is in the spool; only what the journal lacks is merged.
    everything, _ = spool.missing_events(tmp_path, spool.Received())
    assert [e.step for e in everything] == [1, 2, 3]
    journaled = replay([{"type": "session_start", "session": 1}, *events]).ledger.received  # what a supervisor tracks
    missing, _ = spool.missing_events(tmp_path, journaled)
    assert [e.step for e in missing] == [2, 3]


def test_an_event_the_pipe_lost_is_filled_from_the_spool(tmp_path):
    """Junk without a newline spoils the event after it: the gap in its process's seqs is remembered,
    and the spool merge fills exactly that event."""
    emitter = EventEmitter(None, str(tmp_path), rank=0, session=1)
    for step in range(1, 5):
        emitter.emit(Step(rank=0, step=step))
    emitter.close()
    pid = os.getpid()
    received = spool.Received()
    for seq in (1, 2, 4):  # seq 3 (step 3) never arrived whole
        received.add(pid, seq)
    assert received.has(pid, 4) and not received.has(pid, 3) and received.complete_through(pid) == 2
    missing, _ = spool.missing_events(tmp_path, received)
    assert [e.step for e in missing] == [3]
    received.add(pid, 3)
    assert received.gaps == {} and received.complete_through(pid) == 4


def test_spool_rotates_and_prunes_only_journaled_parts(tmp_path, monkeypatch):
    monkeypatch.setattr("kaio.child.emitter.SPOOL_PART_EVENTS", 3)
    spool_dir = tmp_path / "spool"
    emitter = EventEmitter(None, str(spool_dir), rank=0, session=1)
    for step in range(1, 8):
        emitter.emit(Step(rank=0, step=step))
    emitter.close()
    names = sorted(p.name for p in spool_dir.iterdir())
    assert len(names) == 3  # seq 1-3, 4-6, 7
    received = spool.Received(top={os.getpid(): 5})
    spool.prune(spool_dir, received)  # only the first part is wholly journaled
    assert len(list(spool_dir.iterdir())) == 2
    missing, _ = spool.missing_events(spool_dir, received)
    assert [e.step for e in missing] == [6, 7]
    recorded: list = []
    # The journal could not write them yet (a full disk): the spool stays, it is their only copy on disk.
    assert spool.merge_into(spool_dir, received, recorded.append, written_out=lambda: False) == (2, 0)
    assert len(list(spool_dir.iterdir())) == 2
    recorded.clear()
    assert spool.merge_into(spool_dir, received, recorded.append, written_out=lambda: True) == (2, 0)
    assert [e.step for e in recorded] == [6, 7]
    assert not spool_dir.exists()  # merged and written: nothing left to wonder about


def test_callback_reads_the_allocator_peak_once_resolved(monkeypatch):
    """No GPU here: torch.cuda is stood in for at its Python surface to check both read paths."""
    import torch

    from kaio.child import memory

    assert memory.peak_memory_functions() is None  # CPU: peak VRAM is null, never 0
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 111)
    monkeypatch.setattr(
        torch._C, "_cuda_memoryStats", lambda device: {"allocated_bytes": {"all": {"peak": 222}}}, raising=False
    )
    reset, read_peak = memory.peak_memory_functions()
    reset()
    assert calls == [("reset", 3)] and read_peak() == 222  # the raw counter
    monkeypatch.setattr(torch._C, "_cuda_memoryStats", lambda device: {}, raising=False)
    _, read_peak = memory.peak_memory_functions()
    assert read_peak() == 111  # the public call when the raw one does not answer

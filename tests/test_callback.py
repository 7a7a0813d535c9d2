"""KaioCallback and its EventEmitter, hook by hook, read back from the real FIFO and spool files."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from kaio.child import emitter as emitter_module
from kaio.child.callback import KaioCallback
from kaio.child.emitter import EventEmitter
from kaio.telemetry.fifo import TelemetryFifo


def _spooled(spool_dir) -> list[dict]:
    parts = sorted(spool_dir.iterdir()) if spool_dir.is_dir() else []
    return [json.loads(line) for path in parts for line in path.read_bytes().splitlines()]


def _fifo_lines(fifo: TelemetryFifo) -> list[dict]:
    os.set_blocking(fifo.read_fd, False)
    try:
        data = os.read(fifo.read_fd, 1 << 20)
    except BlockingIOError:
        data = b""
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture()
def hooks(tmp_path):
    emitter = EventEmitter(None, str(tmp_path / "spool"), rank=0, session=1)
    callback = KaioCallback(emitter)
    state = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True, num_input_tokens_seen=0)
    args = SimpleNamespace(output_dir="ck")

    def step(logs: dict | None = None) -> None:
        control = SimpleNamespace(should_log=logs is not None)
        callback.on_step_begin(args, state, control)
        state.global_step += 1
        callback.on_step_end(args, state, control)
        if logs is not None:
            callback.on_log(args, state, control, logs=logs)

    def events() -> list[dict]:
        emitter.close()  # writes what the spool buffered
        return _spooled(tmp_path / "spool")

    yield SimpleNamespace(step=step, events=events)
    emitter.close()


def test_a_step_event_then_its_log_with_nonfinite_values_tagged(hooks):
    hooks.step({"loss": float("nan"), "learning_rate": 0.1, "grad_norm": 2.0, "eval_loss": float("inf")})
    step, log = hooks.events()
    assert (step["type"], step["step"], log["type"], log["step"]) == ("step", 1, "log", 1)
    assert log["loss"] == "nan" and log["learning_rate"] == 0.1 and log["extra"] == {"eval_loss": "inf"}


class _GpuTensor:
    """Stands in for a CUDA tensor: reading it (``.item()``) would wait for the GPU."""

    device = SimpleNamespace(type="cuda")

    def item(self):
        raise AssertionError("read a GPU tensor: a synchronisation")


def test_a_gpu_tensor_in_the_logs_is_left_out_not_read(hooks):
    hooks.step({"loss": _GpuTensor(), "learning_rate": 0.1})
    _step, log = hooks.events()
    assert log["loss"] is None and log["learning_rate"] == 0.1
    assert log["extra"] == {"kaio_skipped_gpu_tensors": ["loss"]}


def test_the_spool_is_written_in_batches_while_the_fifo_reads_and_at_once_when_it_breaks(tmp_path, monkeypatch):
    monkeypatch.setattr(emitter_module, "SPOOL_FLUSH_S", 3600.0)
    fifo = TelemetryFifo()
    spool_dir = tmp_path / "spool"
    emitter = EventEmitter(str(fifo.path), str(spool_dir), rank=0, session=1)
    try:
        for step in range(1, 11):
            emitter.emit({"type": "step", "step": step})
        assert [e["seq"] for e in _fifo_lines(fifo)] == list(range(1, 11))  # the FIFO got each at once
        assert _spooled(spool_dir) == []  # the spool waits for a batch
        for step in range(11, emitter_module.SPOOL_FLUSH_EVENTS + 1):
            emitter.emit({"type": "step", "step": step})
        assert len(_spooled(spool_dir)) == emitter_module.SPOOL_FLUSH_EVENTS
        emitter.emit({"type": "step", "step": 65})  # in the FIFO's buffer, and the spool's
        fifo.close()  # the supervisor dies: those in the FIFO are gone
        emitter.emit({"type": "step", "step": 66})  # EPIPE: the spool's buffer is written now
        assert not emitter.connected
        assert [e["seq"] for e in _spooled(spool_dir)] == list(range(1, 67))
        emitter.emit({"type": "step", "step": 67})  # no reader: every event straight to the spool
        assert _spooled(spool_dir)[-1]["seq"] == 67
    finally:
        emitter.close()


def test_a_quiet_emitter_still_writes_its_spool_within_the_flush_interval(tmp_path, monkeypatch):
    from conftest import wait_for

    monkeypatch.setattr(emitter_module, "SPOOL_FLUSH_S", 0.05)
    fifo = TelemetryFifo()
    emitter = EventEmitter(str(fifo.path), str(tmp_path / "spool"), rank=0, session=1)
    try:
        emitter.emit({"type": "save", "step": 5})  # then nothing more (a long evaluation, say)
        wait_for(lambda: len(_spooled(tmp_path / "spool")) == 1, 5, "the flusher thread to write the spool")
    finally:
        emitter.close()
        fifo.close()

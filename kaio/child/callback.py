"""``KaioCallback``: the eyes inside the trainer.

It reports the run's shape at start, every optimizer step's true peak VRAM
from every rank, rank 0's logs, checkpoint saves and the end. It adds no GPU
synchronisation: the peak-memory calls read the caching allocator's host-side
counters, times are host clocks, and a log value that is a GPU tensor is left
out rather than copied to the host.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from transformers import TrainerCallback

from kaio.child.emitter import EventEmitter
from kaio.telemetry.protocol import LOG, RUN_START, SAVE, STEP, TRAIN_END

# Trainer log keys that have their own field in the log event.
_LOG_FIELDS = ("loss", "learning_rate", "grad_norm", "epoch")
# Training arguments a report needs, copied from TrainingArguments at start.
_ARG_FIELDS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "optim",
    "warmup_steps",
    "weight_decay",
    "bf16",
    "fp16",
    "seed",
    "max_steps",
    "num_train_epochs",
    "logging_steps",
    "save_steps",
    "output_dir",
)


def _peak_memory_functions():
    """``(reset, read_peak)`` of the caching allocator when a CUDA/ROCm device is in use, else None.

    ``max_memory_allocated`` builds and flattens the whole statistics dict (~80 us
    on an H200 host); the nested stats read the same counter in ~11 us. Both only
    read host-side counters: no GPU synchronisation.
    """
    try:
        import torch
    except ImportError:
        return None
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    device = torch.cuda.current_device()
    read_stats = getattr(torch._C, "_cuda_memoryStats", None)  # private: fall back if it ever goes
    try:
        read_stats(device)["allocated_bytes"]["all"]["peak"]
    except (TypeError, KeyError, RuntimeError):
        read_stats = None

    def read_peak() -> int:
        if read_stats is None:
            return int(torch.cuda.max_memory_allocated(device))
        return int(read_stats(device)["allocated_bytes"]["all"]["peak"])

    return (lambda: torch.cuda.reset_peak_memory_stats(device)), read_peak


class KaioCallback(TrainerCallback):
    def __init__(self, emitter: EventEmitter) -> None:
        self.emitter = emitter
        self._step_began_mono: float | None = None
        self._peak_memory = None  # (reset, read_peak) on a GPU, resolved once at train begin
        self._skipped_gpu_values: set[str] = set()

    # -- helpers -----------------------------------------------------------

    def _reset_peak(self) -> None:
        if self._peak_memory is not None:
            self._peak_memory[0]()

    def _peak_vram_bytes(self) -> int | None:
        return self._peak_memory[1]() if self._peak_memory is not None else None

    def _log_value(self, key: str, value: Any) -> Any:
        if _on_gpu(value):
            # Reading it would wait for the GPU (a sync): the Trainer logs floats; a custom one may not.
            self._skipped_gpu_values.add(key)
            return None
        return _plain(value)

    # -- Trainer hooks ----------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._peak_memory = _peak_memory_functions()
        trainable, total = _count_params(model)
        self.emitter.emit(
            {
                "type": RUN_START,
                "world_size": int(args.world_size),
                "start_step": int(state.global_step),
                "max_steps": int(state.max_steps),
                "trainable_params": trainable,
                "total_params": total,
                "architecture": _architecture(model),
                "device": str(args.device),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "t_wall": time.time(),
                "t_mono": time.monotonic(),
                "args": {name: _plain(getattr(args, name, None)) for name in _ARG_FIELDS},
            }
        )
        self._reset_peak()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_began_mono = time.monotonic()
        self._reset_peak()

    def on_step_end(self, args, state, control, **kwargs):
        now_mono = time.monotonic()
        event = {
            "type": STEP,
            "step": int(state.global_step),
            "epoch": state.epoch,
            "t_wall": time.time(),
            "t_mono": now_mono,
            "step_time_s": (now_mono - self._step_began_mono) if self._step_began_mono is not None else None,
            "peak_vram_bytes": self._peak_vram_bytes(),
        }
        tokens = getattr(state, "num_input_tokens_seen", 0)
        if tokens:
            event["tokens_seen"] = int(tokens)
        # Sent now, not with the log that follows: after another rank died, the Trainer's log
        # (an all-gather) never returns, and this step would be lost.
        self.emitter.emit(event)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        event: dict[str, Any] = {"type": LOG, "step": int(state.global_step), "t_wall": time.time()}
        extra = {}
        for key, value in logs.items():
            if key in _LOG_FIELDS:
                event[key] = self._log_value(key, value)
            else:
                extra[key] = self._log_value(key, value)
        if self._skipped_gpu_values:
            extra["kaio_skipped_gpu_tensors"] = sorted(self._skipped_gpu_values)
        if extra:
            event["extra"] = extra
        self.emitter.emit(event)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.emitter.emit({"type": SAVE, "step": int(state.global_step), "path": path, "t_wall": time.time()})

    def on_train_end(self, args, state, control, **kwargs):
        self.emitter.emit({"type": TRAIN_END, "step": int(state.global_step), "t_wall": time.time(), "t_mono": time.monotonic()})


def _count_params(model) -> tuple[int | None, int | None]:
    if model is None:
        return None, None
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def _architecture(model) -> str | None:
    if model is None:
        return None
    config = getattr(model, "config", None)
    names = getattr(config, "architectures", None)
    if names:
        return str(names[0])
    inner = getattr(getattr(model, "base_model", None), "model", None)  # a PeftModel wraps the real one
    return type(inner or model).__name__


def _on_gpu(value: Any) -> bool:
    device = getattr(value, "device", None)
    return device is not None and getattr(device, "type", "cpu") != "cpu" and hasattr(value, "item")


def _plain(value: Any) -> Any:
    """Make a TrainingArguments / log value JSON-friendly (enums, tensors, paths)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "value") and isinstance(getattr(value, "value"), (str, int)):
        return value.value  # enum
    return str(value)

"""A synthetic run's journal records, in time order, in the shapes kaio writes them.

``records(steps, hours, gpus, ranks)`` yields what the supervisor journals for
one session: ``session_start``, ``devices``, ``child_started``, each rank's
``run_start``, then per optimizer step one ``step`` event from every rank and
one ``log`` event from rank 0 (``logging_steps: 1``), interleaved with a
poller ``tick`` (``kaio.run.gpu_feed.tick_record`` of a tick of ``gpus``
devices) every 1/``hz`` s, ``save`` events every ``save_every`` steps, then
``train_end`` and ``session_end``. Every record is a fresh dict, as one
decoded from the FIFO is.
"""

from __future__ import annotations

import math
from typing import Iterator

from kaio.run.gpu_feed import device_record, tick_record
from synthetic_gpu import device_info, synthetic_tick

T_WALL0 = 1_795_000_000.0
T_MONO0 = 10_000.0
BATCH = 8


class _FixedHost:
    """A host backend with fixed facts (the synthetic run's host is not this machine)."""

    cpu_count = 96

    def sample(self, t_mono: float, t_wall: float):
        from kaio.devices.base import HostSample

        return HostSample(t_mono=t_mono, t_wall=t_wall, cpu_pct=50.0, ram_used_bytes=10**11, ram_total_bytes=2 * 10**12)


def config_snapshot(steps: int) -> dict:
    from kaio.config import config_from_dict, config_snapshot as snap

    cfg = config_from_dict(
        {
            "project_name": "synthetic",
            "training": {"max_steps": steps, "batch_size": BATCH, "logging_steps": 1, "save_steps": 5000},
            "launch": {"num_processes": 8},
            "reporting": {"use_comet_ml": False},
        }
    )
    return snap(cfg)


def records(steps: int, hours: float, gpus: int = 8, ranks: int = 8, hz: float = 2.0, save_every: int = 5000) -> Iterator[dict]:
    duration = hours * 3600.0
    t_start = 30.0  # model loading before the first step
    step_s = (duration - t_start) / steps
    tick_s = 1.0 / hz
    n_ticks = int(duration * hz)
    pids = [40_000 + r for r in range(ranks)]
    seq = [0] * ranks
    yield {"type": "session_start", "session": 1, "kind": "run", "t_wall": T_WALL0, "t_mono": T_MONO0, "resume_from": None, "poll_hz": hz, "config": config_snapshot(steps), "argv": ["accelerate", "launch"]}
    yield device_record(device_info(gpus), [], _FixedHost())
    yield {"type": "child_started", "session": 1, "pid": 39_999, "t_wall": T_WALL0 + 0.2}

    def event(rank: int, body: dict) -> dict:
        seq[rank] += 1
        return {"rank": rank, "session": 1, "pid": pids[rank], "seq": seq[rank], **body}

    for r in range(ranks):
        yield event(
            r,
            {
                "type": "run_start", "world_size": ranks, "start_step": 0, "max_steps": steps, "trainable_params": 41_943_040,
                "total_params": 8_072_204_288, "architecture": "LlamaForCausalLM", "device": f"cuda:{r}", "host": "bench",
                "t_wall": T_WALL0 + 30, "t_mono": T_MONO0 + 30,
                "args": {"per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "learning_rate": 2e-4, "lr_scheduler_type": "cosine",
                         "optim": "adamw_torch", "warmup_steps": 0.03, "weight_decay": 0.0, "bf16": True, "fp16": False, "seed": 42,
                         "max_steps": steps, "num_train_epochs": 1.0, "logging_steps": 1, "save_steps": save_every, "output_dir": "checkpoints/synthetic"},
            },
        )
    energy = [0.0] * gpus
    tick = 1
    for step in range(1, steps + 1):
        t_end = t_start + step * step_s
        while tick <= n_ticks and tick * tick_s <= t_end:
            t = tick * tick_s
            energy = [e + 600.0 * tick_s for e in energy]
            yield tick_record(synthetic_tick(T_MONO0 + t, T_WALL0 + t, gpus, energy))
            tick += 1
        loss = 2.0 + 4.0 * math.exp(-step / (steps / 10)) + 0.05 * math.sin(step)
        for r in range(ranks):
            yield event(
                r,
                {
                    "type": "step", "step": step, "epoch": step / 50_000, "t_wall": T_WALL0 + t_end, "t_mono": T_MONO0 + t_end,
                    "step_time_s": step_s, "peak_vram_bytes": 60_000_000_000 + 1000 * r + step % 977, "tokens_seen": step * BATCH * 2048,
                },
            )
        yield event(
            0,
            {
                "type": "log", "step": step, "t_wall": T_WALL0 + t_end + 0.001, "loss": loss, "learning_rate": 2e-4 * (1 - step / steps),
                "grad_norm": 0.8 + 0.1 * math.cos(step), "epoch": step / 50_000,
                "extra": {"num_input_tokens_seen": step * BATCH * 2048 * ranks, "train_runtime": t_end, "train_tokens_per_second": 190_000.0},
            },
        )
        if step % save_every == 0:
            yield event(0, {"type": "save", "step": step, "path": f"/ckpt/checkpoint-{step}", "t_wall": T_WALL0 + t_end})
    while tick <= n_ticks:  # ticks after the last step (none when the run fills the whole time)
        t = tick * tick_s
        yield tick_record(synthetic_tick(T_MONO0 + t, T_WALL0 + t, gpus, energy))
        tick += 1
    t_last = T_WALL0 + t_start + steps * step_s
    for r in range(ranks):
        yield event(r, {"type": "train_end", "step": steps, "t_wall": t_last + 1, "t_mono": T_MONO0 + t_start + steps * step_s + 1})
    yield {"type": "session_end", "session": 1, "t_wall": t_last + 5, "t_mono": T_MONO0 + t_start + steps * step_s + 5, "status": "COMPLETED",
           "exit_code": 0, "signal": None, "error": None, "counters": {"malformed_lines": 0, "oversized_lines": 0, "spooled_events": 0}, "poll_stats": {}}

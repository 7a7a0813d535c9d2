"""A synthetic run's journal records, in time order, as the typed records kaio journals.

``records(steps, hours, gpus, ranks)`` yields what the supervisor records for
one session (``kaio.record.types.Record`` Structs): ``SessionStart``,
``Devices`` (``kaio.run.gpu_feed.device_record``), ``ChildStarted``, each
rank's ``RunStart``, then per optimizer step one ``Step`` event from every
rank and one ``Log`` event from rank 0 (``logging_steps: 1``), interleaved
with a poller ``TickRecord`` (``kaio.run.gpu_feed.tick_record`` of a tick of
``gpus`` devices) every 1/``hz`` s, a ``Save`` every ``save_every`` steps,
then every rank's ``TrainEnd`` and ``SessionEnd``. Every record is a fresh
Struct, as one decoded from the FIFO is; the child's events carry the stamps
the emitter puts on them (session, pid, seq).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from synthetic_gpu import device_info, synthetic_tick

from kaio.record.types import (
    ChildStarted,
    PollStats,
    Record,
    SessionCounters,
    SessionEnd,
    SessionKind,
    SessionStart,
    Status,
)
from kaio.run.gpu_feed import device_record, tick_record
from kaio.telemetry.protocol import Environment, Log, ModelInfo, PeftInfo, RunStart, Save, Step, TrainEnd, TrainingArgs

T_WALL0 = 1_795_000_000.0
T_MONO0 = 10_000.0
BATCH = 8


class _FixedHost:
    """A host backend with fixed facts (the synthetic run's host is not this machine)."""

    cpu_count = 96

    def sample(self, t_mono: float, t_wall: float):
        from kaio.devices.base import HostSample

        return HostSample(t_mono=t_mono, t_wall=t_wall, cpu_pct=50.0, ram_used_bytes=10**11, ram_total_bytes=2 * 10**12)


def config_snapshot(steps: int, launch: dict | None = None) -> dict:
    from kaio.config import config_from_dict
    from kaio.config import config_snapshot as snap

    cfg = config_from_dict(
        {
            "project_name": "synthetic",
            "training": {"max_steps": steps, "batch_size": BATCH, "logging_steps": 1, "save_steps": 5000},
            "launch": {"num_processes": 8, **(launch or {})},
            "reporting": {"use_comet_ml": False},
        }
    )
    return snap(cfg)


def run_start(rank: int, ranks: int, steps: int, save_every: int, pid: int, seq: int) -> RunStart:
    """What ``kaio.child.describe.describe_run`` sends at train begin, for an 8B Llama under LoRA."""
    return RunStart(
        rank=rank,
        session=1,
        pid=pid,
        seq=seq,
        hostname="bench",
        t_wall=T_WALL0 + 30,
        t_mono=T_MONO0 + 30,
        world_size=ranks,
        process_index=rank,
        local_rank=rank,
        distributed_type="MULTI_GPU",
        start_step=0,
        max_steps=steps,
        device=f"cuda:{rank}",
        args=TrainingArgs(
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=1,
            learning_rate=2e-4,
            lr_scheduler_type="cosine",
            optim="adamw_torch",
            warmup_steps=0.03,
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=True,
            fp16=False,
            seed=42,
            max_steps=steps,
            num_train_epochs=1.0,
            logging_strategy="steps",
            logging_steps=1,
            save_strategy="steps",
            save_steps=save_every,
            output_dir="checkpoints/synthetic",
        ),
        model=ModelInfo(
            name_or_path="meta-llama/Llama-3.1-8B",
            model_class="PeftModelForCausalLM",
            architecture="LlamaForCausalLM",
            dtype="bfloat16",
            num_layers=32,
            hidden_size=4096,
            total_params=8_072_204_288,
            trainable_params=41_943_040,
        ),
        peft=PeftInfo(
            peft_type="LORA", r=16, alpha=32.0, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
        tokenizer="meta-llama/Llama-3.1-8B",
        train_samples=steps * BATCH * ranks,
        environment=Environment(
            python="3.11.7",
            torch="2.13.0+cu130",
            cuda="13.0",
            transformers="5.24.0",
            peft="0.21.2",
            accelerate="1.15.0",
            hostname="bench",
            gpus=["Synthetic H100 80GB HBM3"] * ranks,
        ),
    )


def records(
    steps: int,
    hours: float,
    gpus: int = 8,
    ranks: int = 8,
    hz: float = 2.0,
    save_every: int = 5000,
    launch: dict | None = None,
) -> Iterator[Record]:
    """``launch``: the config's launch keys of a node of a job of several machines (nnodes, node_rank...)."""
    duration = hours * 3600.0
    t_start = 30.0  # model loading before the first step
    step_s = (duration - t_start) / steps
    tick_s = 1.0 / hz
    n_ticks = int(duration * hz)
    pids = [40_000 + r for r in range(ranks)]
    seq = [0] * ranks
    first_rank = int((launch or {}).get("node_rank", 0)) * ranks  # a node's ranks follow the nodes before it

    def stamp(rank: int) -> dict:
        """What the child's ``EventEmitter.emit`` stamps on every event (``rank``: this node's rank)."""
        seq[rank] += 1
        return {"rank": first_rank + rank, "session": 1, "pid": pids[rank], "seq": seq[rank]}

    yield SessionStart(
        session=1,
        kind=SessionKind.RUN,
        t_wall=T_WALL0,
        t_mono=T_MONO0,
        poll_hz=hz,
        config=config_snapshot(steps, launch),
        argv=["accelerate", "launch"],
    )
    yield device_record(device_info(gpus), [], _FixedHost())
    yield ChildStarted(session=1, pid=39_999, t_wall=T_WALL0 + 0.2)
    for r in range(ranks):
        s = stamp(r)
        yield run_start(s["rank"], ranks * int((launch or {}).get("nnodes", 1)), steps, save_every, s["pid"], s["seq"])
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
            yield Step(
                **stamp(r),
                step=step,
                epoch=step / 50_000,
                t_wall=T_WALL0 + t_end,
                t_mono=T_MONO0 + t_end,
                step_time_s=step_s,
                peak_vram_bytes=60_000_000_000 + 1000 * r + step % 977,
                tokens_seen=step * BATCH * 2048,
            )
        yield Log(
            **stamp(0),
            step=step,
            t_wall=T_WALL0 + t_end + 0.001,
            loss=loss,
            learning_rate=2e-4 * (1 - step / steps),
            grad_norm=0.8 + 0.1 * math.cos(step),
            epoch=step / 50_000,
            extra={
                "num_input_tokens_seen": step * BATCH * 2048 * ranks,
                "train_runtime": t_end,
                "train_tokens_per_second": 190_000.0,
            },
        )
        if step % save_every == 0:
            yield Save(
                **stamp(0), step=step, path=f"/ckpt/checkpoint-{step}", t_wall=T_WALL0 + t_end, t_mono=T_MONO0 + t_end
            )
    while tick <= n_ticks:  # ticks after the last step (none when the run fills the whole time)
        t = tick * tick_s
        yield tick_record(synthetic_tick(T_MONO0 + t, T_WALL0 + t, gpus, energy))
        tick += 1
    t_last = t_start + steps * step_s
    for r in range(ranks):
        yield TrainEnd(**stamp(r), step=steps, t_wall=T_WALL0 + t_last + 1, t_mono=T_MONO0 + t_last + 1)
    yield SessionEnd(
        session=1,
        t_wall=T_WALL0 + t_last + 5,
        t_mono=T_MONO0 + t_last + 5,
        status=Status.COMPLETED,
        exit_code=0,
        counters=SessionCounters(),
        poll_stats=PollStats(),
    )

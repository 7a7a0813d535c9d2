"""`kaio plan CONFIG`: what a run would do and whether it fits, without starting it.

The model is built on PyTorch's meta device (shapes, no memory, no weights
read), from its config: the built-in tiny model's, a local folder's
config.json, the Hugging Face cache, kaio's table of well-known architectures
(offline, no token needed for gated models), or the Hub's config.json. The
LoRA adapters come from the same ``LoraConfig`` the recipe uses, so the
parameter counts are exact; the memory terms are :mod:`kaio.record.memory`'s.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaio.config import TINY_MODEL, RunConfig
from kaio.errors import ConfigError
from kaio.record.memory import MemoryEstimate, Verdict, estimate, needed_bytes, verdict, workload_of
from kaio.units import gib, gib_pair

# Architectures kaio knows without a download (their config.json as published on the Hub, the sizes only):
# a plan for these works offline and needs no token for gated repos.
_LLAMA3_8B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)
_LLAMA3_70B = dict(_LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
_LLAMA32_1B = dict(_LLAMA3_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True)
_LLAMA32_3B = dict(_LLAMA32_1B, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24)
_MISTRAL_7B = dict(_LLAMA3_8B, model_type="mistral", vocab_size=32768)
_QWEN25_7B = dict(
    model_type="qwen2",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
)
_QWEN25_1_5B = dict(
    _QWEN25_7B,
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)
_QWEN25_0_5B = dict(_QWEN25_1_5B, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    **{
        f"meta-llama/{name}{suffix}": _LLAMA3_8B
        for name in ("Meta-Llama-3-8B", "Llama-3.1-8B")
        for suffix in ("", "-Instruct")
    },
    **{
        f"meta-llama/{name}{suffix}": _LLAMA3_70B
        for name in ("Meta-Llama-3-70B", "Llama-3.1-70B", "Llama-3.3-70B")
        for suffix in ("", "-Instruct")
    },
    **{f"meta-llama/Llama-3.2-1B{suffix}": _LLAMA32_1B for suffix in ("", "-Instruct")},
    **{f"meta-llama/Llama-3.2-3B{suffix}": _LLAMA32_3B for suffix in ("", "-Instruct")},
    **{f"mistralai/Mistral-7B{suffix}-v0.3": _MISTRAL_7B for suffix in ("", "-Instruct")},
    **{f"Qwen/Qwen2.5-7B{suffix}": _QWEN25_7B for suffix in ("", "-Instruct")},
    **{f"Qwen/Qwen2.5-1.5B{suffix}": _QWEN25_1_5B for suffix in ("", "-Instruct")},
    **{f"Qwen/Qwen2.5-0.5B{suffix}": _QWEN25_0_5B for suffix in ("", "-Instruct")},
}


@dataclass(frozen=True)
class GpuFree:
    key: str
    name: str
    total_bytes: int | None
    free_bytes: int | None


@dataclass(frozen=True)
class ModelPlan:
    """The model as the run would build it, and its memory with and without gradient checkpointing."""

    name: str
    source: str  # where its architecture came from
    dtype: str
    total_params: int
    trainable_params: int
    adapted_modules: tuple[str, ...]  # inside the decoder layers: what the activations estimate counts
    target_modules: tuple[str, ...]  # every module LoRA adapts (the head and the embedding included)
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool  # what the config asks for
    estimates: dict[bool, MemoryEstimate]  # by gradient checkpointing


@dataclass(frozen=True)
class Plan:
    config: RunConfig
    precision: str
    argv: list[str]
    env: dict[str, str]  # what kaio sets for the child, secrets masked
    gpus: list[GpuFree]
    notes: list[str] = field(default_factory=list)
    model: ModelPlan | None = None
    unestimated: str | None = None  # why there is no model estimate
    host_available_bytes: int | None = None  # RAM a run on the CPU (no GPU here) can take
    model_unavailable: str | None = None  # why `kaio run` would refuse to start: its model is not at hand
    push_fails: str | None = None  # why the Hub push at the end of the run would fail (hub.push)


def make_plan(cfg: RunConfig, environ: Mapping[str, str] = os.environ) -> Plan:
    """Everything `kaio plan` prints; starts nothing, downloads at most a model's config.json."""
    from kaio.launch import preview_command, script_accelerate_file
    from kaio.preflight import model_unavailable, push_will_fail

    gpus, notes = _gpus_in_run(cfg, environ)
    argv, env = preview_command(cfg, environ, accelerate_file=script_accelerate_file(cfg.launch, environ))
    if cfg.launch.own_code is not None:
        why = (
            f"your script ({cfg.launch.own_code_key}) builds its own model: kaio sees it only once it runs; "
            "the report then puts the estimate of what it trained beside the measured peak"
        )
        return Plan(cfg, cfg.training.precision, argv, env, gpus, notes, unestimated=why)
    from kaio.recipes.lora import resolve_precision

    precision = resolve_precision(cfg.training.precision)  # as the recipe will, on this host
    host_ram = None
    if not gpus:
        import psutil

        host_ram = psutil.virtual_memory().available
    unavailable = model_unavailable(cfg, environ)
    model = _model_plan(cfg, precision, bool(gpus))
    return Plan(
        cfg,
        precision,
        argv,
        env,
        gpus,
        notes,
        model,
        host_available_bytes=host_ram,
        model_unavailable=unavailable,
        push_fails=push_will_fail(cfg, environ),
    )


def _gpus_in_run(cfg: RunConfig, environ: Mapping[str, str]) -> tuple[list[GpuFree], list[str]]:
    """The GPUs the run's ranks would take (the first ``num_processes`` it can see), with their free memory:
    `kaio gpus`'s inventory."""
    from kaio.devices.inventory import inventory
    from kaio.launch import run_visibility

    environ, chosen = run_visibility(cfg.launch, environ)
    found = inventory(cfg.reporting.gpu_backend, environ)
    found["notes"] += [chosen] if chosen else []
    gpus: list[GpuFree] = []
    for backend in found["backends"]:
        for device in backend["devices"]:
            if not device["in_run"]:
                continue
            sample = device["sample"] or {}
            total = device["vram_total_bytes"] or sample.get("vram_total_bytes")
            used = sample.get("vram_used_bytes")
            free = total - used if total is not None and used is not None else None
            gpus.append(GpuFree(device["key"], device["name"], total, free))
    return gpus[: cfg.launch.num_processes], list(found["notes"])


def _model_plan(cfg: RunConfig, precision: str, has_gpu: bool) -> ModelPlan:
    """The model built as the recipe builds it, on the meta device, described as the child describes a live one."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from kaio.child.describe import describe_model, describe_peft
    from kaio.recipes.lora import load_dtype, with_adapters

    config, source = _transformers_config(cfg)
    dtype = load_dtype(precision, on_gpu=has_gpu or precision == "bf16")
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        built = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        try:
            model = with_adapters(cfg, built)
        except ValueError as exc:  # PEFT's word for targets the model does not have
            raise ConfigError(
                f"lora.target_modules: {cfg.model.base_model}: {str(exc).strip().splitlines()[0]}"
            ) from None
    info, peft = describe_model(model), describe_peft(model)
    assert info is not None  # a model was given
    t = cfg.training
    estimates = {}
    for checkpointing in (False, True):
        work = workload_of(
            info,
            peft,
            tokens=t.batch_size * cfg.model.max_seq_length,
            gradient_checkpointing=checkpointing,
            optim=t.optimizer,
            half_precision=precision in ("bf16", "fp16"),
        )
        if work is None:
            raise ConfigError(f"model.base_model: {cfg.model.base_model}: not a decoder-only transformer kaio can size")
        estimates[checkpointing] = estimate(work)
    return ModelPlan(
        name=cfg.model.base_model,
        source=source,
        dtype=str(dtype).removeprefix("torch."),
        total_params=info.total_params or 0,
        trainable_params=info.trainable_params or 0,
        adapted_modules=tuple(peft.adapted_modules) if peft else (),
        target_modules=_target_modules(peft),
        micro_batch=t.batch_size,
        seq_len=cfg.model.max_seq_length,
        gradient_checkpointing=t.gradient_checkpointing,
        estimates=estimates,
    )


def _target_modules(peft: Any) -> tuple[str, ...]:
    """PEFT's target_modules as it resolved them: a list, or one name or pattern ("all-linear")."""
    targets = getattr(peft, "target_modules", None) if peft is not None else None
    if isinstance(targets, str):
        return (targets,)
    return tuple(sorted(targets or ()))


def _transformers_config(cfg: RunConfig) -> tuple[Any, str]:
    """The model's transformers config and where it came from."""
    from transformers import AutoConfig

    from kaio.preflight import hub_unreachable

    name = cfg.model.base_model
    if name == TINY_MODEL:
        from kaio.recipes.lora import build_tokenizer, tiny_model_config

        return tiny_model_config(cfg, build_tokenizer(cfg)), "built from the config's model sizes"
    remote = cfg.model.trust_remote_code
    if Path(name).is_dir():
        try:
            return AutoConfig.from_pretrained(name, trust_remote_code=remote), f"{name}/config.json"
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.base_model: {name}: {exc}") from None
    try:
        return AutoConfig.from_pretrained(
            name, local_files_only=True, trust_remote_code=remote
        ), "the Hugging Face cache"
    except (OSError, ValueError):
        pass
    known = KNOWN_ARCHITECTURES.get(name)
    if known is not None:
        sizes = dict(known)
        return AutoConfig.for_model(sizes.pop("model_type"), **sizes), "kaio's table of known architectures"
    try:
        unreachable = hub_unreachable()
        if unreachable is not None:
            raise OSError(unreachable)
        return AutoConfig.from_pretrained(name, trust_remote_code=remote), "the Hugging Face Hub (config.json)"
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"model.base_model: {name}: its config.json is not in the Hugging Face cache nor reachable ({first}); "
            f"download it once (`hf download {name} config.json`) or point base_model at a local folder"
        ) from None


def plan_json(plan: Plan) -> dict[str, Any]:
    """``kaio plan --json``: the plan as plain data (bytes in ``*_bytes``)."""
    model = None
    if plan.model is not None:
        m = plan.model
        model = {
            "name": m.name,
            "source": m.source,
            "dtype": m.dtype,
            "total_params": m.total_params,
            "trainable_params": m.trainable_params,
            "adapted_modules": list(m.adapted_modules),
            "target_modules": list(m.target_modules),
            "micro_batch": m.micro_batch,
            "seq_len": m.seq_len,
            "gradient_checkpointing": m.gradient_checkpointing,
            "estimates": {
                ("with" if checkpointing else "without") + "_gradient_checkpointing": {
                    **{f"{name.replace(' ', '_')}_bytes": value for name, value in e.terms()},
                    "total_bytes": e.total,
                    "needed_bytes": needed_bytes(e.total),
                }
                for checkpointing, e in m.estimates.items()
            },
        }
    return {
        "project": plan.config.project_name,
        "precision": plan.precision,
        "argv": plan.argv,
        "env": plan.env,
        "gpus": [
            {"key": g.key, "name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes} for g in plan.gpus
        ],
        "notes": plan.notes,
        "model": model,
        "unestimated": plan.unestimated,
        "host_available_bytes": plan.host_available_bytes,
        "model_unavailable": plan.model_unavailable,
        "push_fails": plan.push_fails,
        "verdicts": {key: said.value for key, said in plan_verdicts(plan)},
    }


# ---------------------------------------------------------------- rendering


def render_plan(plan: Plan) -> Any:
    """A Rich renderable of the plan."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    cfg = plan.config
    parts: list[Any] = [
        Text.assemble(("kaio plan ", "bold"), (cfg.project_name, "bold cyan"), f" · report in {cfg.report_dir}/")
    ]
    parts.append(Text(f"child command: {shlex.join(plan.argv)}"))
    parts.append(Text("environment kaio sets: " + ", ".join(f"{k}={v}" for k, v in sorted(plan.env.items()))))
    parts.append(_gpu_table(plan))
    if plan.model is None:
        parts.append(Text(f"VRAM estimate: none; {plan.unestimated}", style="yellow"))
        return Group(*parts)
    m = plan.model
    parts.append(
        Text(
            f"model {m.name} ({m.source}): {_count(m.total_params - m.trainable_params)} parameters in {m.dtype}, "
            f"+ {_count(m.trainable_params)} trained (LoRA r={cfg.lora.r} on {', '.join(m.target_modules) or '-'}); "
            f"{plan.precision}, micro-batch {m.micro_batch} x {m.seq_len} tokens"
        )
    )
    per = "VRAM estimate per GPU" if plan.gpus else "Memory estimate per process (its tensors in the host's RAM)"
    table = Table(title=f"{per} (allocated tensors at the step's peak)", title_justify="left")
    table.add_column("term")
    for checkpointing in (False, True):
        chosen = " (config)" if checkpointing == m.gradient_checkpointing else ""
        table.add_column(f"{'with' if checkpointing else 'without'} gradient checkpointing{chosen}", justify="right")
    without, with_ = m.estimates[False], m.estimates[True]
    for (term, a), (_, b) in zip(without.terms(), with_.terms()):
        table.add_row(term, gib(a, digits=3), gib(b, digits=3))  # three digits each: the terms add up to the total
    table.add_row(Text("total", style="bold"), gib(without.total, digits=3), gib(with_.total, digits=3))
    table.add_row(
        "needed (+10% allocator, +1 GiB context)",
        gib(needed_bytes(without.total), digits=3),
        gib(needed_bytes(with_.total), digits=3),
    )
    parts.append(table)
    parts.append(_verdict_line(plan))
    if plan.model_unavailable is not None:
        parts.append(Text(f"`kaio run` would refuse to start here: {plan.model_unavailable}", style="yellow"))
    if plan.push_fails is not None:
        parts.append(Text(f"hub.push: {plan.push_fails}: the push at the end of the run would fail", style="yellow"))
    return Group(*parts)


def _count(n: int) -> str:
    """``8.03 B``, ``41.9 M``, ``513 K``: a parameter count for people."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def _gpu_table(plan: Plan) -> Any:
    from rich.table import Table
    from rich.text import Text

    if not plan.gpus:
        from kaio.devices.detect import NO_GPU_NOTE

        note = "; ".join(n for n in plan.notes if n != NO_GPU_NOTE) or "no GPU found"  # the line says the rest
        return Text(f"GPUs: none ({note}); the run trains on the CPU", style="yellow")
    table = Table(title=f"GPUs the run's {plan.config.launch.num_processes} rank(s) take", title_justify="left")
    for column in ("GPU", "name", "free / total"):
        table.add_column(column)
    for gpu in plan.gpus:
        table.add_row(gpu.key, gpu.name, gib_pair(gpu.free_bytes, gpu.total_bytes))
    return table


VERDICT_STYLE = {Verdict.FITS: "bold green", Verdict.TIGHT: "bold yellow", Verdict.WILL_NOT_FIT: "bold red"}


HOST_RAM = "host RAM"


def plan_verdicts(plan: Plan) -> list[tuple[str, Verdict]]:
    """Each GPU's verdict for the config's choice of gradient checkpointing, by its key; on a host without a GPU,
    the host RAM's, shared by the ranks."""
    if plan.model is None:
        return []
    chosen = plan.model.estimates[plan.model.gradient_checkpointing].total
    if not plan.gpus and plan.host_available_bytes is not None:
        return [(HOST_RAM, verdict(chosen, plan.host_available_bytes // plan.config.launch.num_processes))]
    return [(gpu.key, verdict(chosen, gpu.free_bytes)) for gpu in plan.gpus if gpu.free_bytes is not None]


def _verdict_line(plan: Plan) -> Any:
    from rich.text import Text

    assert plan.model is not None
    verdicts = plan_verdicts(plan)
    if not verdicts:
        return Text("verdict: none (no GPU with a known free memory on this host)", style="yellow")
    line = Text("verdict: ")
    for i, (key, said) in enumerate(verdicts):
        line.append(("; " if i else "") + f"{key} ")
        line.append(said.value, style=VERDICT_STYLE[said])
    m = plan.model
    # The host's RAM is shared by the ranks: what they need together; a GPU holds one rank.
    processes = plan.config.launch.num_processes if plan.host_available_bytes is not None else 1
    per = f" ({processes} processes)" if processes > 1 else ""
    if plan.host_available_bytes is not None:
        need = needed_bytes(m.estimates[m.gradient_checkpointing].total) * processes
        line.append(f" ({gib(need, digits=3)} needed{per} of {gib(plan.host_available_bytes)} available)")
    other = m.estimates[not m.gradient_checkpointing].total
    if (
        not m.gradient_checkpointing
        and any(v is not Verdict.FITS for _, v in verdicts)
        and other < m.estimates[False].total
    ):
        instead = gib(needed_bytes(other) * processes, digits=3)
        line.append(f" (with training.gradient_checkpointing: true: {instead} needed{per})")
    return line

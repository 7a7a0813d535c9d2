"""What a rank trains, read from the live objects at ``on_train_begin`` (the run_start event).

Whatever the script: the ``TrainingArguments`` it built, the model the Trainer
got (with its PEFT config, if any), the tokenizer, the datasets' sizes, and
the environment: library versions, the machine, the script's git revision and
its command line (secret values masked). Every probe is guarded: a field the
objects do not have is left out, never an error in the training.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any

from kaio.child.paths import recorded_path
from kaio.secrets import redact_argv
from kaio.telemetry.protocol import ENV_NODE_RANK, Environment, ModelInfo, PeftInfo, RunStart, TrainingArgs

MAX_ARGV = 40
MAX_ARG_CHARS = 200


def describe_run(rank: int, args: Any, state: Any, model: Any, kwargs: dict[str, Any], trainer: Any = None) -> RunStart:
    return RunStart(
        rank=rank,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        node_rank=int(os.environ.get(ENV_NODE_RANK, "0")),
        t_wall=time.time(),
        t_mono=time.monotonic(),
        world_size=_int(getattr(args, "world_size", None)),
        process_index=_int(getattr(args, "process_index", None)),
        local_rank=_int(getattr(args, "local_process_index", None)),
        distributed_type=_distributed_type(args),
        trainer=type(trainer).__name__ if trainer is not None else None,
        integrations=_integrations(trainer),
        start_step=int(state.global_step),
        checkpoints_before=_checkpoints_before(args, state) if rank == 0 else [],
        start_tokens=_int(getattr(state, "num_input_tokens_seen", None)) or None,
        tokens_counted_by="trainer"
        if _tokens_mode(args) not in ("no", None) and trainer_counts_tokens(model)
        else "kaio",
        max_steps=_int(state.max_steps),
        device=str(getattr(args, "device", None)),
        mixed_precision=_mixed_precision(trainer),
        args=_training_args(args, state),
        model=describe_model(model),
        peft=describe_peft(model),
        tokenizer=_name(kwargs.get("processing_class") or kwargs.get("tokenizer")),
        train_samples=_size(
            getattr(trainer, "train_dataset", None) or getattr(kwargs.get("train_dataloader"), "dataset", None)
        ),
        eval_samples=_size(getattr(trainer, "eval_dataset", None)),
        eval_sets=_sets(getattr(trainer, "eval_dataset", None)),
        loader_batch_size=_loader_batch_size(kwargs.get("train_dataloader"), args),
        environment=environment(),
    )


def _checkpoints_before(args: Any, state: Any) -> list[int]:
    """The steps of the checkpoint folders already in the output_dir of a training that begins from step 0."""
    folder = getattr(args, "output_dir", None)
    if getattr(state, "global_step", 0) or not folder:
        return []
    try:
        names = os.listdir(folder)
    except OSError:  # not made yet: nothing there
        return []
    steps = []
    for name in names:
        number = name.removeprefix("checkpoint-")
        if name.startswith("checkpoint-") and number.isdigit() and os.path.isdir(os.path.join(folder, name)):
            steps.append(int(number))
    return sorted(steps)


def _integrations(trainer: Any) -> list[str]:
    """The Trainer's reporting callbacks (``report_to``), transformers' own: CometCallback, WandbCallback..."""
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None) or []
    return [type(c).__name__ for c in callbacks if type(c).__module__.startswith("transformers.integrations")]


def trainer_counts_tokens(model: Any) -> bool:
    """The Trainer counts its model's main input (include_num_input_tokens_seen): tokens for a language model, but a
    ViT's pixel values or an audio model's samples are no tokens (no tokens/s and no MFU from them)."""
    return getattr(model, "main_input_name", "input_ids") == "input_ids"


def _loader_batch_size(loader: Any, args: Any) -> int | None:
    """The training DataLoader's batch per device where it differs from the arguments' (None where the same, or
    not known: a batch sampler of its own, of varying sizes)."""
    size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    size, per_device = _int(size), _int(getattr(args, "per_device_train_batch_size", None))
    # TRL's GRPO and RLOO: the loader yields a generation's batch, trained over `steps_per_generation` steps.
    per_generation = _int(getattr(args, "steps_per_generation", None))
    if size and per_device and per_generation and size == per_device * per_generation:
        return None
    return size if size and size != per_device else None


def _tokens_mode(args: Any) -> str | None:
    """``include_num_input_tokens_seen`` as the Trainer reads it. A bool set after the arguments were built (their
    ``__post_init__`` turns one into "all" or "no") stays a bool, and a Trainer that compares it with "no" counts
    with False too."""
    value = getattr(args, "include_num_input_tokens_seen", None)
    if not isinstance(value, bool):
        return value if isinstance(value, str) else None
    field = getattr(type(args), "__dataclass_fields__", {}).get("include_num_input_tokens_seen")
    compares_with_no = isinstance(getattr(field, "default", None), str)
    return "all" if value or compares_with_no else "no"


def _training_args(args: Any, state: Any) -> TrainingArgs:
    """The arguments the record shows. A value of a type the record does not expect (a script's own assignment
    after the arguments were built) is left out, never an error in the script's training."""
    import msgspec

    values = {}
    for name in TrainingArgs.__struct_fields__:
        value = _plain(getattr(args, name, None))
        if value is not None:
            values[name] = value
    values["include_num_input_tokens_seen"] = _tokens_mode(args)
    for name in ("logging_steps", "eval_steps", "save_steps"):
        # A fraction of the run (0.2): the Trainer's state has the steps it stands for, as it trains with them.
        resolved = _int(getattr(state, name, None))
        if isinstance(values.get(name), float) and values[name] < 1 and resolved:
            values[name] = resolved
    if isinstance(values.get("output_dir"), str):
        values["output_dir"] = recorded_path(values["output_dir"])
    trained_batch = _int(getattr(state, "train_batch_size", None))
    if getattr(args, "auto_find_batch_size", False) and trained_batch and (_int(getattr(args, "n_gpu", 1)) or 1) <= 1:
        values["per_device_train_batch_size"] = trained_batch  # the batch this attempt trains with, not the one asked
    if "eval_strategy" not in values:  # transformers before 4.41 spelled it evaluation_strategy
        legacy = _plain(getattr(args, "evaluation_strategy", None))
        if legacy is not None:
            values["eval_strategy"] = legacy
    try:
        return msgspec.convert(values, TrainingArgs, strict=False)
    except msgspec.ValidationError:
        return msgspec.convert({k: v for k, v in values.items() if _fits(k, v)}, TrainingArgs, strict=False)


def _fits(name: str, value: Any) -> bool:
    import msgspec

    try:
        msgspec.convert({name: value}, TrainingArgs, strict=False)
    except msgspec.ValidationError:
        return False
    return True


def _mixed_precision(trainer: Any) -> str | None:
    """The precision the Trainer's accelerator trains in: "no" where it set a half precision but does not
    autocast (fp16 on the CPU: the training runs in fp32, whatever the arguments say)."""
    try:
        accelerator = getattr(trainer, "accelerator", None)
        value = _plain(accelerator.mixed_precision)  # type: ignore[union-attr]
        engine = str(_plain(getattr(accelerator, "distributed_type", None)) or "")
        autocasts = getattr(accelerator, "native_amp", True) or engine in ("DEEPSPEED", "MEGATRON_LM")
    except Exception:  # no accelerator (an older transformers), or one that cannot say
        return None
    if value in ("fp16", "bf16") and not autocasts:
        return "no"
    return value if isinstance(value, str) else None


def _distributed_type(args: Any) -> str | None:
    state = getattr(args, "distributed_state", None)
    kind = getattr(state, "distributed_type", None)
    return _plain(kind) if kind is not None else None


def describe_model(model: Any) -> ModelInfo | None:
    if model is None:
        return None
    config = getattr(model, "config", None)
    inner = _base_model(model)  # a PeftModel wraps the real one
    architectures = getattr(config, "architectures", None)
    text = getattr(config, "text_config", None) or config  # a multimodal model's language part
    trainable = total = matmul_trainable = matmul_frozen = weight_bytes = 0
    trainable_bytes: int | None = None
    try:
        no_matmul = _without_matmul(model)
        for name, param in model.named_parameters():
            count = param.numel()
            total += count
            weight_bytes += count * param.element_size()
            if param.requires_grad:
                trainable += count
                trainable_bytes = trainable_bytes or param.element_size()
            if id(param) not in no_matmul and ".original_module." not in name:  # PEFT's copy kept aside, not run
                if param.requires_grad:
                    matmul_trainable += count
                else:
                    matmul_frozen += count
    except (AttributeError, RuntimeError, TypeError):
        trainable = total = matmul_trainable = matmul_frozen = weight_bytes = None  # type: ignore[assignment]
    dtype = getattr(model, "dtype", None)
    if dtype is None:  # a plain torch module: its weights'
        try:
            dtype = next((p.dtype for p in model.parameters()), None)
        except (AttributeError, RuntimeError, TypeError):
            dtype = None
    return ModelInfo(
        name_or_path=_str(getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)),
        model_class=type(model).__name__,
        # The live class: a checkpoint saved as one class (LlamaForCausalLM) trains as another (a reward model's
        # LlamaForSequenceClassification); its config's `architectures` say only how it was saved.
        architecture=type(inner or model).__name__
        if hasattr(inner or model, "config") or not architectures
        else str(architectures[0]),
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        num_layers=_int(getattr(text, "num_hidden_layers", None)),
        hidden_size=_int(getattr(text, "hidden_size", None)),
        total_params=total,
        trainable_params=trainable,
        trainable_matmul_params=matmul_trainable,
        frozen_matmul_params=matmul_frozen,
        attention_dim=_attention_dim(text),
        intermediate_size=_int(getattr(text, "intermediate_size", None)),
        vocab_size=_int(getattr(text, "vocab_size", None)),
        num_heads=_int(getattr(text, "num_attention_heads", None)),
        kv_dim=_kv_dim(text),
        weight_bytes=weight_bytes,
        trainable_bytes_per_param=trainable_bytes,
    )


def _base_model(model: Any) -> Any:
    """The model a PeftModel wraps (None: not one): ``get_base_model()`` is it for LoRA and its kin and for the
    prompt methods alike (the latter's ``base_model`` is the model itself, its ``.model`` the bare decoder)."""
    get = getattr(model, "get_base_model", None)
    if callable(get) and hasattr(model, "peft_config"):
        try:
            return get()
        except (AttributeError, RuntimeError, TypeError):
            pass
    return getattr(getattr(model, "base_model", None), "model", None)


def _without_matmul(model: Any) -> set[int]:
    """The parameters that do no matmul: the input embedding's (a lookup), unless the output layer is tied to it
    (GPT-2, Gemma, Llama 3.2 1B: the same weight then multiplies every hidden state into the vocabulary)."""
    return _parameter_ids(model, "get_input_embeddings") - _parameter_ids(model, "get_output_embeddings")


def _parameter_ids(model: Any, getter: str) -> set[int]:
    get = getattr(model, getter, None)
    try:
        module = get() if callable(get) else None
        return {id(p) for p in module.parameters()} if module is not None else set()
    except (AttributeError, NotImplementedError, TypeError):
        return set()


def _attention_dim(config: Any) -> int | None:
    heads = _int(getattr(config, "num_attention_heads", None))
    if not heads:
        return None
    head_dim = _int(getattr(config, "head_dim", None))
    hidden = _int(getattr(config, "hidden_size", None))
    if head_dim is None and hidden:
        head_dim = hidden // heads
    return heads * head_dim if head_dim else None


def _kv_dim(config: Any) -> int | None:
    heads = _int(getattr(config, "num_attention_heads", None))
    hidden = _int(getattr(config, "hidden_size", None))
    if not heads or not hidden:
        return None
    head_dim = _int(getattr(config, "head_dim", None)) or hidden // heads
    return (_int(getattr(config, "num_key_value_heads", None)) or heads) * head_dim


def _adapted_modules(model: Any) -> list[str]:
    """The leaf names of the LoRA-adapted modules inside the decoder layers (not the head or the embedding)."""
    try:
        names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    except (AttributeError, RuntimeError, TypeError):
        return []
    return sorted(names - {"lm_head", "embed_tokens", "wte", "embed_out"})


def _modules_it_has(model: Any, names: Any) -> list[str]:
    """Those of ``names`` the model has: PEFT's task defaults name heads it may lack (``classifier`` and ``score``
    for sequence classification, whichever the model has)."""
    wanted = sorted(str(name) for name in names)
    try:
        found = [name for name, _ in model.named_modules()]
    except (AttributeError, RuntimeError, TypeError):
        return wanted
    return [w for w in wanted if any(name == w or name.endswith(f".{w}") for name in found)]


def describe_peft(model: Any) -> PeftInfo | None:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    config = configs.get(getattr(model, "active_adapter", "default")) or next(iter(configs.values()))
    return PeftInfo(
        peft_type=_plain(getattr(config, "peft_type", None)),
        r=_int(getattr(config, "r", None)),
        alpha=_float(getattr(config, "lora_alpha", getattr(config, "alpha", None))),  # LoHa and LoKr: alpha
        dropout=_float(getattr(config, "lora_dropout", None)),
        target_modules=_module_names(getattr(config, "target_modules", None)),
        adapted_modules=_adapted_modules(model),
        modules_to_save=_modules_it_has(model, getattr(config, "modules_to_save", None) or ()),
        use_dora=getattr(config, "use_dora", False) is True,
        use_rslora=getattr(config, "use_rslora", False) is True,
        num_virtual_tokens=_int(getattr(config, "num_virtual_tokens", None)),
        feedforward_modules=_module_names(getattr(config, "feedforward_modules", None)),
    )


def _module_names(modules: Any) -> list[str] | str | None:
    """A PEFT config's modules: a set or list of names, sorted; or one pattern (``all-linear``, a regex)."""
    if isinstance(modules, (set, frozenset, list, tuple)):
        return sorted(str(m) for m in modules)
    return str(modules) if modules is not None else None


def environment() -> Environment:
    return Environment(
        python=platform.python_version(),
        torch=_version("torch"),
        cuda=_torch_attr("cuda"),
        rocm=_torch_attr("hip"),
        transformers=_version("transformers"),
        peft=_version("peft"),
        accelerate=_version("accelerate"),
        trl=_version("trl") if "trl" in sys.modules else None,
        kaio=_version("kaio"),
        hostname=socket.gethostname(),
        cpu=_cpu_model(),
        gpus=_gpu_names(),
        **_git(os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] else os.getcwd()),
        argv=[arg[:MAX_ARG_CHARS] for arg in redact_argv(_command())[:MAX_ARGV]],
    )


def _command() -> list[str]:
    """How to run the script again as it ran: ``python script.py args``, or ``python -m module args`` for code
    run as a module (launch.module: its file alone would fail on its relative imports)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if name:  # run by runpy.run_module (a file run by run_path has no spec)
        module = name.removesuffix(".__main__")  # a package run by its __main__.py: the package
        return [sys.executable, "-m", module, *sys.argv[1:]]
    return [sys.executable, *sys.argv]


def _version(module: str) -> str | None:
    loaded = sys.modules.get(module)
    version = getattr(loaded, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(module)
        except Exception:
            return None
    return str(version)


def _torch_attr(name: str) -> str | None:
    torch = sys.modules.get("torch")
    value = getattr(getattr(torch, "version", None), name, None)
    return str(value) if value else None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _gpu_names() -> list[str]:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return []


def _git(directory: str) -> dict[str, Any]:
    """The commit and dirty flag of the repository the script is in (nothing when it is in none)."""
    try:
        commit = subprocess.run(
            ["git", "-C", directory, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return {}
        status = subprocess.run(
            ["git", "-C", directory, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {
            "git_commit": commit.stdout.strip(),
            "git_dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
        }
    except (OSError, subprocess.SubprocessError):
        return {}


def _size(dataset: Any) -> int | None:
    """Examples in a dataset (several evaluation datasets added up); None when it has no length."""
    if isinstance(dataset, dict):
        sizes = [_size(d) for d in dataset.values()]
        return sum(s for s in sizes if s is not None) if all(s is not None for s in sizes) else None
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an iterable dataset
        return None


def describe_script_optimizer(run: RunStart, optimizer: Any, scheduler: Any) -> None:
    """The optimizer (and scheduler) the script gave the Trainer, as they are at train begin: what trained, where
    args.optim, learning_rate and lr_scheduler_type were not used. accelerate wraps both: the inner objects."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner is not None:
        run.script_optimizer = type(inner).__name__
        groups = getattr(inner, "param_groups", None) or [{}]
        # The schedule's peak, as args.learning_rate is: OneCycleLR's max_lr, else the rate a scheduler scales.
        lr = groups[0].get("max_lr", groups[0].get("initial_lr", groups[0].get("lr")))
        run.script_learning_rate = float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None
        momentum = groups[0].get("momentum")
        run.script_momentum = isinstance(momentum, (int, float)) and momentum > 0 and "SGD" in type(inner).__name__
    if scheduler is not None:
        run.script_lr_scheduler = type(getattr(scheduler, "scheduler", scheduler)).__name__


def kept_from_checkpoint(
    args: Any, state: Any, scheduler: Any, optimizer: Any = None
) -> dict[str, tuple[float, float]]:
    """What a resumed Trainer kept from its checkpoint over its arguments (the script's edit did not reach it), as
    name -> (used, asked): the learning rate of the scheduler's restored state (every parameter group's alike, so
    not a script's own per-group rates), the logging, evaluation and save intervals of trainer_state.json, and the
    rate the restored optimizer holds for the first step where its schedule gives another (a finished schedule's
    0.0, in an extended run)."""
    if not _int(getattr(state, "global_step", None)):
        return {}  # not resumed
    kept: dict[str, tuple[float, float]] = {}
    schedule = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    base = getattr(schedule, "base_lrs", None)
    wanted = getattr(args, "learning_rate", None)
    if base and len(set(base)) == 1 and isinstance(wanted, float) and not math.isclose(base[0], wanted, rel_tol=1e-6):
        kept["learning_rate"] = (float(base[0]), wanted)
    max_steps = _int(getattr(state, "max_steps", None)) or 0
    for name in ("logging_steps", "eval_steps", "save_steps"):
        asked, held = getattr(args, name, None), _int(getattr(state, name, None))
        if isinstance(asked, (int, float)) and 0 < asked < 1:
            asked = math.ceil(max_steps * asked)  # a fraction of the run, as the Trainer resolves it
        if isinstance(asked, (int, float)) and held is not None and int(asked) != held:
            kept[name] = (held, int(asked))
    factors, groups = getattr(schedule, "lr_lambdas", None), getattr(optimizer, "param_groups", None)
    if base and factors and groups and isinstance(groups[0].get("lr"), (int, float)):
        scheduled = base[0] * factors[0](schedule.last_epoch)
        if not math.isclose(groups[0]["lr"], scheduled, rel_tol=1e-6, abs_tol=1e-12):
            kept["first_step_learning_rate"] = (float(groups[0]["lr"]), float(scheduled))
    return kept


def _sets(dataset: Any) -> int | None:
    """How many eval datasets a dict of them holds (``eval_dataset={"a": ..., "b": ...}``); None for one."""
    return len(dataset) if isinstance(dataset, dict) and len(dataset) > 1 else None


def _name(obj: Any) -> str | None:
    if obj is None:
        return None
    return _str(getattr(obj, "name_or_path", None)) or type(obj).__name__


def _plain(value: Any) -> Any:
    """A TrainingArguments value as JSON: enums by value, numbers and strings as they are."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    inner = getattr(value, "value", None)
    if isinstance(inner, (str, int)):
        return inner
    return str(value)


def _str(value: Any) -> str | None:
    return str(value) if value else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

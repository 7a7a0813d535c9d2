"""What the built-in recipe would fail on, found before anything starts.

A config can be valid YAML with keys of the right types and still name an
optimizer transformers does not have, adapters for modules the model lacks, a
data file with no text in it, or a model that is neither on disk nor
reachable. Left to the training process, each is a traceback after the
launcher, torch and the model have loaded, and a project left FAILED; here
each is one line naming the key, before the project is touched.

Nothing here imports torch or transformers (`kaio run` must start at once):
transformers' names are read from its source, the model's presence from the
Hugging Face cache's files. A user's own script (``launch.script``) reads none
of these keys, so none of this applies to it.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from kaio.config import TINY_MODEL, RunConfig
from kaio.errors import ConfigError
from kaio.recipes.data import read_jsonl

# The layers of the built-in tiny Llama that LoRA can adapt (Linear and Embedding), by their names under
# `named_modules()`; `{i}` is a layer index. tests/test_preflight.py checks them against the built model.
_TINY_ADAPTABLE = (
    "model.embed_tokens",
    *(f"model.layers.{{i}}.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(f"model.layers.{{i}}.mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")),
    "lm_head",
)
_TINY_OTHERS = (  # the rest of its modules: a target naming one of these is not something LoRA adapts
    "model",
    "model.layers",
    "model.layers.{i}",
    "model.layers.{i}.self_attn",
    "model.layers.{i}.mlp",
    "model.layers.{i}.mlp.act_fn",
    "model.layers.{i}.input_layernorm",
    "model.layers.{i}.post_attention_layernorm",
    "model.norm",
    "model.rotary_emb",
)
# A model's weights as the Hub holds them: one file, or an index of shards.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DATA_LINES_CHECKED = 1000  # the first lines' shape is checked; a bad line further on is the recipe's to name


def check_recipe_inputs(
    cfg: RunConfig, source: str, environ: Mapping[str, str] = os.environ, *, model: bool = True
) -> None:
    """Raise a one-line ``ConfigError`` (``<source>: <key>: ...``) for what the built-in recipe would fail on.
    ``model``: whether the model must be at hand too (`kaio plan` sizes a well-known one without it)."""
    if cfg.launch.own_code is not None:
        return
    try:
        _check_names(cfg)
        _check_target_modules(cfg)
        _check_data(cfg)
        why = model_unavailable(cfg, environ) if model else None
        if why is not None:
            raise ConfigError(why)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


# ---------------------------------------------------------------- transformers' names


def _check_names(cfg: RunConfig) -> None:
    t = cfg.training
    for key, value, choices in (
        ("training.optimizer", t.optimizer, transformers_choices("training_args.py", "OptimizerNames")),
        ("training.lr_scheduler_type", t.lr_scheduler_type, transformers_choices("trainer_utils.py", "SchedulerType")),
    ):
        if choices and value not in choices:
            hint = _did_you_mean(value, choices)
            raise ConfigError(f"{key}: {value!r} is not a transformers name ({hint}one of: {', '.join(choices)})")


@functools.cache
def transformers_choices(module_file: str, enum_name: str) -> tuple[str, ...]:
    """The string values of one of transformers' enums (``NAME = "value"`` lines of its class), read from the
    installed source: importing the module costs seconds (it imports torch), scanning its text milliseconds.
    Empty when they cannot be found: the recipe is then the judge."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return ()
    path = Path(next(iter(spec.submodule_search_locations))) / module_file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return ()
    start = re.search(rf"^class {enum_name}\b.*:\n", text, re.M)
    if start is None:
        return ()
    body = re.match(r"(?:(?:[ \t]+.*)?\n)*", text[start.end() :])  # the indented (or blank) lines that follow
    return tuple(re.findall(r"^[ \t]+[A-Za-z_]\w*\s*=\s*[\"']([^\"']*)[\"']", body[0] if body else "", re.M))


# ---------------------------------------------------------------- the adapters' targets


def _check_target_modules(cfg: RunConfig) -> None:
    """For the tiny model, whose modules kaio knows: each target must name layers LoRA can adapt, as PEFT
    matches a list (the whole name, or its last dotted parts). PEFT itself only fails when no target matches;
    a misspelt one among good ones would silently train fewer adapters than asked."""
    targets = cfg.lora.target_modules
    if cfg.model.base_model != TINY_MODEL or targets == ["all-linear"]:
        return
    adaptable = [name.format(i=i) for name in _TINY_ADAPTABLE for i in range(cfg.model.num_layers)]
    others = [name.format(i=i) for name in _TINY_OTHERS for i in range(cfg.model.num_layers)]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in _TINY_ADAPTABLE})
    for target in targets:
        if any(_peft_matches(name, target) for name in adaptable):
            continue
        if any(_peft_matches(name, target) for name in others):
            raise ConfigError(
                f"lora.target_modules: {target!r} is not a Linear or Embedding layer of the tiny model "
                f"(LoRA adapts: {', '.join(leaves)}, or `all-linear`)"
            )
        hint = _did_you_mean(target, leaves)
        raise ConfigError(
            f"lora.target_modules: {target!r} matches no module of the tiny model ({hint}its layers: "
            f"{', '.join(leaves)}, or `all-linear`)"
        )


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    """The likeliest intended name: one it begins (`adamw` → `adamw_torch`), else the closest spelling."""
    close = [c for c in choices if c.startswith(value)] or difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _peft_matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


# ---------------------------------------------------------------- the data


def _check_data(cfg: RunConfig) -> None:
    """The data file's first lines have the shape ``data.format`` says, and it holds at least one text."""
    d = cfg.data
    if d.path is None:
        return
    any_text = False
    try:
        for number, record in enumerate(read_jsonl(d.path, d.format, d.text_field), start=1):
            any_text = any_text or bool(record.get("messages") or record.get("text", "").strip())
            if number >= _DATA_LINES_CHECKED and any_text:
                break
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.path: {exc}") from None
    if not any_text:
        raise ConfigError(f"data.path: {d.path}: no example with text in it (the recipe would have nothing to train)")


# ---------------------------------------------------------------- the model


def model_unavailable(cfg: RunConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the recipe could not load its model (``model.base_model: ...``), or None: it must be a local folder
    that exists, or a Hub id whose config is cached or whose Hub answers (else the training process would
    retry for a minute and fail with a traceback)."""
    name = cfg.model.base_model
    if name == TINY_MODEL:
        return None
    if _looks_like_path(name):
        if Path(name).expanduser().is_dir():
            return None
        return (
            f"model.base_model: {name!r}: no such folder (relative paths start from {os.getcwd()}); "
            "a Hub model is named `owner/name`"
        )
    if Path(name).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(name, file), str) for file in _WEIGHT_FILES):
        return None  # its weights are cached (a config.json alone may be `kaio plan`'s download)
    unreachable = hub_unreachable(environ)
    if unreachable is None:
        return None
    return (
        f"model.base_model: {name}: not in the Hugging Face cache, and the Hub cannot be asked ({unreachable}); "
        f"download it where the Hub is reachable (`hf download {name}`) or point base_model at a local folder"
    )


def _looks_like_path(name: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else (`./m`, `/data/m`, `~/m`, `a/b/c`) is a folder."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def hub_unreachable(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the Hub cannot be asked, or None."""
    from huggingface_hub import constants

    from kaio.reach import unreachable

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return unreachable(constants.ENDPOINT, environ)


def push_will_fail(cfg: RunConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the Hub push at the end of the run (hub.push) cannot work, found before the training rather than after
    its hours: no token, or the Hub switched off. (Whether the Hub answers is asked at the push: it may come back.)"""
    if not cfg.hub.push or cfg.launch.own_code is not None:  # a script pushes its own (kaio push refuses it)
        return None
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE or environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if not environ.get("HF_TOKEN") and get_token() is None:
        return "no Hugging Face token (set HF_TOKEN, or `hf auth login`)"
    return None

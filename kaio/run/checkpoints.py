"""The Trainer's checkpoint folders (``checkpoint-N``) as a resume finds them: which is the newest complete
one, and what one that holds the weights only does not continue; and what else a Trainer left in its output_dir
(what ``kaio run --overwrite`` moves aside)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def checkpoint_step(name: str) -> int | None:
    """N of a ``checkpoint-N`` folder's name (or path), else None."""
    number = Path(name).name.removeprefix("checkpoint-")
    return int(number) if Path(name).name.startswith("checkpoint-") and number.isdigit() else None


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and checkpoint_step(path.name) is not None


def latest_checkpoint(
    checkpoint_dir: Path,
    notify: Callable[[str], None] = print,
    at_most: int | None = None,
    nonfinite_since: int | None = None,
) -> Path | None:
    """The newest *complete* ``checkpoint-N``: its trainer_state.json (written last) says step N. ``at_most``: the
    record's last step; a checkpoint after it was not saved by the run this record describes (another run's,
    left in a folder that ``kaio run --overwrite`` does not own: a script's output_dir). ``nonfinite_since``: the
    step from which the loss was NaN/inf to the end of the record; a checkpoint saved from there may hold NaN
    weights."""
    for step, path in reversed(_checkpoints(checkpoint_dir)):
        if not is_complete(path, step):  # (first: a save a kill cut short is past the record's last step too)
            notify(f"note: skipping {path}: incomplete (half-written or damaged)")
        elif at_most is not None and step > at_most:
            notify(f"note: skipping {path}: after step {at_most}, this project's last (another run's checkpoint?)")
        elif nonfinite_since is not None and step >= nonfinite_since:
            notify(
                f"note: skipping {path}: saved after the loss went NaN/inf (step {nonfinite_since}): its weights may be NaN"
            )
        else:
            return path
    return None


def is_complete(path: Path, step: int) -> bool:
    """Its trainer_state.json (the Trainer writes it last) says step ``step``, and weights are there."""
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return trainer_state.get("global_step") == step and holds_weights(path)


# What the Trainer's resume loads weights from (transformers' `Trainer._load_from_checkpoint`, and DeepSpeed's).
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_WEIGHT_FILES = (*_ADAPTER_FILES, "model.safetensors", "pytorch_model.bin")
_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # a model over max_shard_size


def holds_weights(path: Path) -> bool:
    """One weights file; or a sharded model's index with every shard it names; or an engine's own layout:
    FSDP's ``pytorch_model_fsdp*``, DeepSpeed's ``global_step*/``; or adapters saved in subfolders (several)."""
    if any((path / name).is_file() for name in _WEIGHT_FILES):
        return True
    for name in _SHARD_INDEXES:
        if (path / name).is_file():
            return _shards_present(path, path / name)
    entries = list(path.iterdir()) if path.is_dir() else []
    return any(
        entry.name.startswith(("pytorch_model_fsdp", "global_step"))
        or (entry.is_dir() and any((entry / name).is_file() for name in _ADAPTER_FILES))
        for entry in entries
    )


def _shards_present(path: Path, index: Path) -> bool:
    """Every shard the index maps a weight to is there (a save cut short writes the index last, or not at all)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all(isinstance(s, str) and (path / s).is_file() for s in shards)


def half_written(checkpoint_dir: Path, after_step: int) -> list[Path]:
    """The ``checkpoint-N`` folders after ``after_step`` whose save did not finish (a kill cut it short)."""
    return [path for step, path in _checkpoints(checkpoint_dir) if step > after_step and not is_complete(path, step)]


def _checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-N`` folders in ``checkpoint_dir``, by step."""
    found = checkpoint_dir.glob("checkpoint-*") if checkpoint_dir.is_dir() else []
    return sorted((step, path) for path in found if (step := checkpoint_step(path.name)) is not None and path.is_dir())


def without_optimizer(checkpoint: Path) -> str | None:
    """What a resume from a checkpoint that holds the weights only (``save_only_model=True``) does not continue:
    the Trainer loads them and its step, and starts the optimizer and the learning-rate schedule afresh. None for
    a whole checkpoint (the Trainer's optimizer.pt or .bin, FSDP's optimizer_0/, DeepSpeed's global_step*/)."""
    names = [p.name for p in checkpoint.iterdir()] if checkpoint.is_dir() else []
    if any(name.startswith(("optimizer", "global_step")) for name in names):
        return None
    return (
        f"{checkpoint.name} holds the model's weights only (no optimizer state: save_only_model=True?): the "
        "optimizer and the learning-rate schedule start afresh from it, so the steps after it do not continue the "
        "training exactly"
    )


# What a Trainer (save_model, save_state, save_metrics, its tokenizer's and processor's save, PEFT's adapter) writes
# at the top of its output_dir beside the checkpoints: the previous run's final model and results.
_TRAINER_FILES = {
    "trainer_state.json",
    "training_args.bin",
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "adapter_model.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "runs",  # the default logging_dir (TensorBoard)
}
_TRAINER_PATTERNS = (
    "model*.safetensors",
    "model*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "adapter_model*.safetensors",
    "*_results.json",  # save_metrics: all_results.json, train_results.json, eval_results.json...
    "predict_results*.txt",
)
_MODEL_CARD = "<!-- This model card has been generated automatically"


def trainer_outputs(folder: Path) -> list[Path]:
    """What the Trainer wrote in ``folder``, its output_dir: the checkpoints (and the built-in recipe's ``final``);
    and, where its own files show that a Trainer saved there (trainer_state.json or training_args.bin at the top),
    the final model, tokenizer, results and model card beside them. Nothing else: the folder may be shared."""
    entries = sorted(folder.glob("*")) if folder.is_dir() else []
    found = [p for p in entries if p.name == "final" or is_checkpoint(p)]
    if not any((folder / name).is_file() for name in ("trainer_state.json", "training_args.bin")):
        return found
    return found + [path for path in entries if path not in found and _trainers(path)]


def _trainers(path: Path) -> bool:
    """One of the names the Trainer saves under (a README.md only if it is the Trainer's model card)."""
    if path.name == "README.md":
        return _is_model_card(path)
    return path.name in _TRAINER_FILES or any(path.match(pattern) for pattern in _TRAINER_PATTERNS)


def _is_model_card(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            return _MODEL_CARD in file.read(4096)
    except OSError:
        return False

"""The built-in LoRA fine-tune, driven by kaio's config.

An ordinary training script: it builds a ``Trainer`` and calls ``train()``;
kaio's child patch gives that Trainer its callback, exactly as it does for a
user's own script. Run it under kaio: ``kaio run configs/finetuning_config.yaml``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kaio.config import TINY_MODEL, RunConfig, config_from_dict
from kaio.recipes.data import generated_sample, messages_to_text, read_jsonl


class TokenizedTexts(torch.utils.data.Dataset):
    """Texts tokenized once, truncated to ``max_len`` tokens."""

    def __init__(self, texts: list[str], tokenizer, max_len: int) -> None:
        self.examples = [
            tokenizer(text, truncation=True, max_length=max_len)["input_ids"] for text in texts if text.strip()
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.examples[index]}


class PadCollator:
    """Right-pads a batch; padding is masked out of attention and loss."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        longest = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, item in enumerate(batch):
            ids = torch.tensor(item["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def build_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer, ByT5Tokenizer

    name = cfg.model.tokenizer or (None if cfg.model.base_model == TINY_MODEL else cfg.model.base_model)
    if name is None:
        return ByT5Tokenizer()  # bytes + specials: needs no vocabulary file
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model_config(cfg: RunConfig, tokenizer):
    """The tiny Llama's config, built from the sizes in ``cfg.model`` (no download)."""
    from transformers import LlamaConfig

    m = cfg.model
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads,
        max_position_embeddings=max(m.max_seq_length, 128),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config._name_or_path = TINY_MODEL  # what the record names as the model (built here, not downloaded)
    return config


def build_model(cfg: RunConfig, tokenizer, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.model.base_model == TINY_MODEL:
        torch.manual_seed(cfg.training.seed)
        return LlamaForCausalLM(tiny_model_config(cfg, tokenizer)).to(dtype)
    return AutoModelForCausalLM.from_pretrained(
        cfg.model.base_model, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
    )


def lora_config(cfg: RunConfig):
    """The PEFT ``LoraConfig`` of ``cfg.lora``."""
    from peft import LoraConfig

    targets = cfg.lora.target_modules
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )


def with_adapters(cfg: RunConfig, model):
    """``model`` with the LoRA adapters of ``cfg.lora`` (a PEFT model)."""
    from peft import get_peft_model

    adapted = get_peft_model(model, lora_config(cfg))
    if cfg.model.base_model == TINY_MODEL:
        # Built here, not a Hub repo: PEFT would look its name up on the Hub at every save (a request to a
        # stranger's repo of that name, or a warning offline) to learn whether the vocabulary changed.
        adapted.peft_config["default"].base_model_name_or_path = ""  # "": PEFT refills None at the first save
    return adapted


def load_dtype(precision: str, on_gpu: bool) -> torch.dtype:
    """The weights' dtype: bf16 for a bf16 run on a GPU; fp32 otherwise (fp16 autocast needs fp32 master
    weights for its GradScaler)."""
    return torch.bfloat16 if precision == "bf16" and on_gpu else torch.float32


def load_texts(cfg: RunConfig, tokenizer) -> list[str]:
    if cfg.data.path is None:
        return generated_sample(cfg.data.sample_size, cfg.training.seed)
    texts = []
    for record in read_jsonl(cfg.data.path, cfg.data.format, cfg.data.text_field):
        texts.append(record["text"] if "text" in record else messages_to_text(record["messages"], tokenizer))
    if not texts:
        raise ValueError(f"{cfg.data.path}: no examples")
    return texts


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def train(cfg: RunConfig) -> None:
    import warnings

    from transformers import Trainer, TrainingArguments

    # Benign and repeated at every save: adapters on embeddings are saved with them on purpose,
    # and transformers warns about its own internal use of a renamed attribute.
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
    warnings.filterwarnings("ignore", message=".*(is_)?gradient_checkpointing.* is deprecated", category=FutureWarning)

    precision = resolve_precision(cfg.training.precision)
    on_gpu = torch.cuda.is_available()
    tokenizer = build_tokenizer(cfg)
    model = with_adapters(cfg, build_model(cfg, tokenizer, load_dtype(precision, on_gpu)))
    dataset = TokenizedTexts(load_texts(cfg, tokenizer), tokenizer, cfg.model.max_seq_length)

    t = cfg.training
    args = TrainingArguments(
        output_dir=str(cfg.checkpoint_dir),
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        optim=t.optimizer,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not on_gpu,
        gradient_checkpointing=t.gradient_checkpointing,
        report_to="none",  # kaio is the reporter; no third-party integration
        disable_tqdm=True,  # kaio shows progress
        include_num_input_tokens_seen=True,
        dataloader_num_workers=0,
        save_only_model=False,
        # In a dense model every LoRA weight takes part in every forward: DDP's search for unused ones (the
        # Trainer's default for a PEFT model) is an extra walk of the autograd graph each step, and a warning in
        # every rank. A mixture of experts may leave an expert out of a step: the search stays.
        ddp_find_unused_parameters=False if _dense(model) else None,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[edits_reach_a_resume()],
    )
    trainer.train()
    finished = trainer.state.global_step >= trainer.state.max_steps  # not after a stop (a checkpoint has it)
    if finished and trainer.is_world_process_zero():
        final_dir = Path(cfg.checkpoint_dir) / "final"
        trainer.save_model(str(final_dir))  # the adapter + tokenizer files: what the Hub push uploads


def edits_reach_a_resume():
    """A resume whose config changes the learning rate, the logging or the save interval: a resumed Trainer keeps
    its checkpoint's instead (the rate in its scheduler's and optimizer's state, the intervals in
    trainer_state.json). At train begin, after the checkpoint is loaded, the arguments' are put back, and the rate
    at the checkpoint's step is the new schedule's: a finished schedule's optimizer held 0.0, which the first step
    of an extended run trained with."""
    from transformers import TrainerCallback

    class EditsReachAResume(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            if not state.global_step:  # a fresh training: the arguments are what it has
                return
            state.compute_steps(args, state.max_steps)
            schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps both
            factors = getattr(schedule, "lr_lambdas", None)  # a LambdaLR: every schedule but reduce_lr_on_plateau
            if optimizer is None or not factors:
                return
            groups = optimizer.param_groups
            schedule.base_lrs = [args.learning_rate] * len(groups)
            for group, factor in zip(groups, factors):
                group["initial_lr"] = args.learning_rate
                group["lr"] = args.learning_rate * factor(schedule.last_epoch)
            schedule._last_lr = [group["lr"] for group in groups]

    return EditsReachAResume()


def _dense(model) -> bool:
    config = getattr(model, "config", None)
    return not any(getattr(config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kaio's built-in LoRA fine-tune")
    parser.add_argument("--config", required=True, help="resolved config (JSON or YAML)")
    ns = parser.parse_args(argv)
    path = Path(ns.config)
    if path.suffix == ".json":
        cfg = config_from_dict(json.loads(path.read_text()), source=str(path))
    else:
        from kaio.config import load_config

        cfg = load_config(path)
    train(cfg)


if __name__ == "__main__":
    main()

"""A TRL-style script: an ``SFTTrainer`` subclass of ``Trainer`` that logs metrics of its own (token
counts, token accuracy), with a PEFT LoRA config of its own (r=8, alpha=16 on q/v)."""

import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


class SFTTrainer(Trainer):
    """Adds what TRL's SFTTrainer adds to every log."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._tokens += int(inputs["input_ids"].numel())
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def log(self, logs, start_time=None):
        if "loss" in logs:
            logs = {**logs, "num_tokens": float(self._tokens), "mean_token_accuracy": 0.25}
        super().log(logs, start_time)


class Chat(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        ids = (torch.arange(12) * (i % 3 + 1)) % 29
        return {"input_ids": ids, "labels": ids}


torch.manual_seed(0)
base = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
)
model = get_peft_model(
    base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
)
args = TrainingArguments(
    output_dir=sys.argv[1],
    max_steps=int(sys.argv[2]),
    per_device_train_batch_size=2,
    gradient_accumulation_steps=3,
    learning_rate=3e-3,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    seed=0,
)
SFTTrainer(model=model, args=args, train_dataset=Chat()).train()

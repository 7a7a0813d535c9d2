"""A script that trains in two phases, each with a Trainer of its own (another batch size, another learning
rate), evaluating after each, as curriculum or SFT-then-preference scripts do. Each Trainer counts its steps
from 0. Writes what each Trainer logged to the JSON file named by its first argument, for comparison."""

import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int, offset: int) -> None:
        self.count, self.offset = count, offset

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        ids = (torch.arange(16) * ((i + self.offset) % 5 + 1)) % 31
        return {"input_ids": ids, "labels": ids}


def phase(model, out: str, steps: int, batch: int, lr: float) -> Trainer:
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        logging_steps=1,
        save_steps=steps,  # a checkpoint at the end of each phase
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(64, 0), eval_dataset=Tokens(8, 100))
    trainer.train()
    trainer.evaluate()
    return trainer


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)
    first = phase(model, sys.argv[2] + "/a", steps=6, batch=4, lr=5e-3)
    second = phase(model, sys.argv[2] + "/b", steps=4, batch=2, lr=1e-3)
    logged = [[h for h in t.state.log_history if "loss" in h or "eval_loss" in h] for t in (first, second)]
    with open(sys.argv[1], "w") as f:
        json.dump(logged, f)


if __name__ == "__main__":
    main()

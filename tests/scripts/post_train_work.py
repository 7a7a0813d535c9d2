"""Trains a few steps, then does long work of its own after `train()` (a big final evaluation, say), with a
cleanup of its own on Ctrl-C, as scripts do."""

import sys
import time

import torch
from clm_train import Tokens
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    args = TrainingArguments(output_dir="out", max_steps=4, save_steps=4, logging_steps=1, report_to="none")
    trainer = Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=Tokens(64, 0))
    trainer.train()
    try:
        for batch in range(600):
            print(f"final evaluation, batch {batch}", flush=True)
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("interrupted in the final evaluation: cleaning up", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()

"""A user's training script with a fault switch, for kaio's fault tests.

usage: faulty_train.py MAX_STEPS SAVE_STEPS [--fault raise|sigkill] [--rank R] [--at STEP] [--once MARKER]

The fault fires on rank R at step STEP; with --once it fires only while
MARKER does not exist (and creates it), so a restarted run gets through.
"""

import argparse
import os
import signal
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("max_steps", type=int)
parser.add_argument("save_steps", type=int)
parser.add_argument("--fault", choices=["raise", "sigkill"])
parser.add_argument("--rank", type=int, default=0)
parser.add_argument("--at", type=int, default=3)
parser.add_argument("--once")
ns = parser.parse_args()


class Fault(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if ns.fault is None or state.global_step != ns.at or args.process_index != ns.rank:
            return
        if ns.once:
            marker = Path(ns.once)
            if marker.exists():
                return
            marker.write_text("fired")
        if ns.fault == "raise":
            raise RuntimeError(f"injected failure at step {ns.at}")
        os.kill(os.getpid(), signal.SIGKILL)


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        ids = (torch.arange(16) * (i % 5 + 1)) % 31
        return {"input_ids": ids, "labels": ids}


torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
)
args = TrainingArguments(
    output_dir="trainer-output",  # the script's own folder, not kaio's: resume and restart find it in the record
    max_steps=ns.max_steps,
    per_device_train_batch_size=4,
    logging_steps=1,
    learning_rate=1e-2,
    save_steps=ns.save_steps,
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
)
Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Fault()]).train()

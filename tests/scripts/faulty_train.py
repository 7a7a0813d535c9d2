"""A user's training script with a fault switch, for kaio's fault tests.

usage: faulty_train.py MAX_STEPS SAVE_STEPS [--fault raise|sigkill|hang|nan] [--rank R] [--at STEP]
                       [--once MARKER] [--logging-steps N] [--nan-at STEP]
                       [--slow-data SECONDS] [--slow-forward SECONDS]
                       [--nan-value-at STEP --no-nan-filter --losses-to FILE]

The fault fires on rank R at step STEP; with --once it fires only while
MARKER does not exist (and creates it), so a restarted run gets through.
raise, sigkill and hang (a sleep that never ends) fire at the end of step
STEP; nan poisons the weights as step STEP begins, so that its loss and every
later one is NaN (the Trainer's default logging_nan_inf_filter hides them);
--nan-at does that too, beside another fault. --slow-data and --slow-forward
make rank R a straggler from the start: each example it loads, and each
forward pass it makes, takes that much longer. --nan-value-at adds a NaN to
that step's loss value only (its gradients stay finite: the weights are
untouched); --no-nan-filter turns the Trainer's logging_nan_inf_filter off;
--losses-to appends each step's loss, as the model returned it, to FILE
(its "{rank}" replaced by the rank), a line each.
"""

import argparse
import os
import signal
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("max_steps", type=int)
parser.add_argument("save_steps", type=int)
parser.add_argument("--fault", choices=["raise", "sigkill", "hang", "nan"])
parser.add_argument("--rank", type=int, default=0)
parser.add_argument("--at", type=int, default=3)
parser.add_argument("--once")
parser.add_argument("--logging-steps", type=int, default=1)
parser.add_argument("--nan-at", type=int)
parser.add_argument("--slow-data", type=float, default=0.0)
parser.add_argument("--slow-forward", type=float, default=0.0)
parser.add_argument("--nan-value-at", type=int)
parser.add_argument("--no-nan-filter", action="store_true")
parser.add_argument("--losses-to")
ns = parser.parse_args()
slow_rank = int(os.environ.get("RANK", "0")) == ns.rank


def wait_forever():
    while True:
        time.sleep(3600)


class Fault(TrainerCallback):
    def _fires(self, args, step: int) -> bool:
        if ns.fault is None or step != ns.at or args.process_index != ns.rank:
            return False
        if ns.once:
            marker = Path(ns.once)
            if marker.exists():
                return False
            marker.write_text("fired")
        return True

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        if (ns.fault == "nan" and self._fires(args, step)) or step == ns.nan_at:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.fill_(float("nan"))

    def on_step_end(self, args, state, control, **kwargs):
        if ns.fault == "nan" or not self._fires(args, state.global_step):
            return
        if ns.fault == "raise":
            raise RuntimeError(f"injected failure at step {ns.at}")
        if ns.fault == "hang":
            wait_forever()
        os.kill(os.getpid(), signal.SIGKILL)


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 256

    def __getitem__(self, i):
        if slow_rank and ns.slow_data:
            time.sleep(ns.slow_data)
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
if slow_rank and ns.slow_forward:
    model.register_forward_pre_hook(lambda module, inputs: time.sleep(ns.slow_forward))
losses: list[float] = []  # each training step's loss (one micro-batch a step), as the model returned it


def loss_value(module, inputs, output):
    if not module.training:
        return output
    losses.append(output.loss.item())
    if ns.losses_to:  # a line at each step: a stopped script does not reach its end
        with open(ns.losses_to.format(rank=os.environ.get("RANK", "0")), "a") as f:
            f.write(f"{losses[-1]!r}\n")
    if len(losses) == ns.nan_value_at:  # the value is NaN, its gradient is the loss's own
        output.loss = output.loss + torch.tensor(float("nan"))
    return output


if ns.nan_value_at or ns.losses_to:
    model.register_forward_hook(loss_value)
args = TrainingArguments(
    output_dir="trainer-output",  # the script's own folder, not kaio's: resume and restart find it in the record
    max_steps=ns.max_steps,
    per_device_train_batch_size=4,
    logging_steps=ns.logging_steps,
    learning_rate=1e-2,
    save_steps=ns.save_steps,
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
    logging_nan_inf_filter=not ns.no_nan_filter,
)
Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Fault()]).train()

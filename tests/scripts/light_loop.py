"""A training loop without torch or a Trainer, reporting through kaio.log: for the tests whose subject is
processes (signals, kills, orphans, a full disk), not training. Each rank starts in a fraction of a second,
where one that imports transformers takes about 7 s of CPU on 2 cores.

usage: light_loop.py STEPS [--step-seconds S] [--fault sigkill|raise|nan|hang] [--rank R] [--at STEP]
                     [--ignore-sigterm] [--gloo]

Every rank trains STEPS steps of S seconds each (a loss that falls as a real one would). The fault fires on
rank R at the end of step STEP (nan: the loss is NaN from that step on; hang: it sleeps
there for an hour). --ignore-sigterm: a script that will not stop when asked. --gloo: the ranks
join a gloo process group first, as a distributed training's do (and listen on its sockets).
"""

import argparse
import math
import os
import signal
import time

import kaio

parser = argparse.ArgumentParser()
parser.add_argument("steps", type=int)
parser.add_argument("--step-seconds", type=float, default=0.01)
parser.add_argument("--fault", choices=["sigkill", "raise", "nan", "hang"])
parser.add_argument("--rank", type=int, default=0)
parser.add_argument("--at", type=int, default=3)
parser.add_argument("--ignore-sigterm", action="store_true")
parser.add_argument("--gloo", action="store_true")
ns = parser.parse_args()
rank = int(os.environ.get("RANK", "0"))
if ns.ignore_sigterm:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if ns.gloo:
    import torch.distributed

    torch.distributed.init_process_group("gloo")

for step in range(1, ns.steps + 1):
    time.sleep(ns.step_seconds)
    nan = ns.fault == "nan" and step >= ns.at
    kaio.log(step=step, loss=math.nan if nan else 2.0 + math.exp(-step / 50), learning_rate=1e-3, tokens=64)
    if ns.fault in ("sigkill", "raise", "hang") and rank == ns.rank and step == ns.at:
        if ns.fault == "hang":
            time.sleep(3600)
        if ns.fault == "raise":
            raise RuntimeError(f"injected failure at step {ns.at}")
        os.kill(os.getpid(), signal.SIGKILL)
print("light loop done")

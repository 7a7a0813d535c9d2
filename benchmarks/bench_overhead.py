"""Supervision overhead: training steps/s under `kaio run` against bare `accelerate launch`.

The same config (``benchmark_config``: the built-in tiny Llama recipe made
bigger, hidden 192 / MLP 384 / 2 layers / seq 128 / batch 8, about 75 ms a
step on 2 CPU cores, LoRA on all linear layers, ``logging_steps: 1``, no
checkpoint before the end, Comet off) is trained three ways, in rotating
order, ``--rounds`` times (default 5), each in a fresh folder:

- ``bare``: ``python -m accelerate.commands.launch --num_processes 1
  --num_machines 1 --mixed_precision no --dynamo_backend no -m
  kaio.recipes.lora --config cfg.json`` (the recipe without kaio's patch: no
  callback, no FIFO, no poller, no dashboard);
- ``kaio-tty``: ``kaio run cfg.yaml`` in a pseudo-terminal (pexpect,
  160x50), i.e. with the live Rich dashboard;
- ``kaio-plain``: ``kaio run cfg.yaml --plain``.

All three are measured the same way: steps / ``train_runtime`` from the
Trainer's own final log line (printed by transformers' PrinterCallback; the
child's log under kaio). The figure is the ratio kaio/bare within a round;
median and spread over rounds. The supervisor's own CPU time (the kaio
process, children excluded) is sampled too.

The whole process is measured as well, as a user waits for it: the wall time
from spawning the command to its exit, and its CPU time with every descendant
included (``RUSAGE_CHILDREN`` around the run: each process waits for its own
children, so the launcher, the ranks and the figure's process are counted).

Goals: kaio's steps/s at least 0.98 of bare; the whole process, kaio/bare,
wall at most 1.05 and CPU at most 1.10 (medians of the pairs).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from _common import PYTHON, append_result, bench_env, fmt, summary

KAIO = str(Path(PYTHON).with_name("kaio"))
PROCESSES = 1  # --processes: ranks of the job, the same for bare and kaio
PROJECT = "overhead"

BENCH_CONFIG = """\
# kaio benchmark config: the built-in recipe, big enough for ~75 ms steps on 2 CPU cores.
project_name: overhead
model:
  base_model: kaio/tiny-llama
  max_seq_length: 128
  hidden_size: 192
  num_layers: 2
  num_heads: 4
  intermediate_size: 384
lora:
  r: 16
  alpha: 32
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
data:
  sample_size: 512
training:
  max_steps: {steps}
  batch_size: 8
  logging_steps: 1
  save_steps: 100000      # no checkpoint before the end
  save_total_limit: 1
  seed: 42
launch:
  num_processes: {processes}
reporting:
  use_comet_ml: false
{extra_reporting}"""

_RUNTIME = re.compile(r"'train_runtime': '?([0-9.eE+-]+)'?")


def train_runtime(text: str) -> float:
    """``train_runtime`` of the final summary log line (the one with ``train_steps_per_second``)."""
    lines = [line for line in text.splitlines() if "train_steps_per_second" in line and "train_runtime" in line]
    if not lines:
        raise RuntimeError("no final train_runtime line found:\n" + text[-2000:])
    return float(_RUNTIME.search(lines[-1]).group(1))


class CpuSampler(threading.Thread):
    """The supervisor's own CPU seconds (not its children's), read every 0.25 s until it exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.cpu_s = None
        self.samples: list[tuple[float, float]] = []  # (time.time(), CPU seconds so far)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                t = self.proc.cpu_times()
                self.cpu_s = t.user + t.system
                self.samples.append((time.time(), self.cpu_s))
            except Exception:
                return
            time.sleep(0.25)

    def cpu_between(self, t0: float, t1: float) -> float | None:
        """CPU seconds the supervisor used between two wall times (linear between samples)."""

        def at(t: float) -> float | None:
            pts = self.samples
            if not pts or t < pts[0][0] or t > pts[-1][0]:
                return None
            for (ta, ca), (tb, cb) in zip(pts, pts[1:]):
                if ta <= t <= tb:
                    return ca if tb == ta else ca + (cb - ca) * (t - ta) / (tb - ta)
            return pts[-1][1]

        a, b = at(t0), at(t1)
        return None if a is None or b is None else b - a


def training_window(journal: Path) -> tuple[float, float]:
    """Wall times of the first step's start and of train_end (rank 0), from kaio's journal."""
    start = end = None
    with open(journal) as f:
        for line in f:
            r = json.loads(line)
            if r.get("type") == "step" and r.get("rank") == 0 and start is None:
                start = r["t_wall"] - (r.get("step_time_s") or 0.0)
            elif r.get("type") == "train_end" and r.get("rank") == 0:
                end = r["t_wall"]
    return start, end


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(root: Path, steps: int, refresh_seconds: float | None = None, processes: int = 1) -> tuple[Path, Path]:
    from kaio.config import config_snapshot, load_config

    yaml_path = root / "cfg.yaml"
    extra = f"  refresh_seconds: {refresh_seconds}\n" if refresh_seconds is not None else ""
    yaml_path.write_text(BENCH_CONFIG.format(steps=steps, extra_reporting=extra, processes=processes))
    json_path = root / "cfg.json"
    json_path.write_text(json.dumps(config_snapshot(load_config(yaml_path))))
    return yaml_path, json_path


def run_once(mode: str, root: Path, yaml_path: Path, json_path: Path, env: dict, steps: int, index: int) -> dict:
    work = root / f"{index:02d}-{mode}"
    work.mkdir()
    shutil.copy(yaml_path, work / "cfg.yaml")
    shutil.copy(json_path, work / "cfg.json")
    load_before = Path("/proc/loadavg").read_text().split()[0]
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    supervisor_cpu = None
    dashboard_bytes = None
    window = (None, None)
    if mode == "bare":
        argv = [
            PYTHON,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(PROCESSES),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            # Several ranks need the DDP launcher, as kaio passes it: without it accelerate runs one process.
            *(["--multi_gpu", "--main_process_port", str(free_port())] if PROCESSES > 1 else []),
            "-m",
            "kaio.recipes.lora",
            "--config",
            "cfg.json",
        ]
        with open(work / "out.log", "wb") as out:
            code = subprocess.run(argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900).returncode
        log = (work / "out.log").read_text(errors="replace")
    elif mode == "kaio-plain":
        with open(work / "out.log", "wb") as out:
            proc = subprocess.Popen(
                [KAIO, "run", "cfg.yaml", "--plain"], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT
            )
            sampler = CpuSampler(proc.pid)
            sampler.start()
            code = proc.wait(timeout=900)
            sampler.stop.set()
            supervisor_cpu = sampler.cpu_s
        log = (work / "docs/reports" / PROJECT / "child.log").read_text(errors="replace")
        window = training_window(work / "docs/reports" / PROJECT / "journal.jsonl")
    elif mode == "kaio-tty":
        import pexpect

        child = pexpect.spawn(
            KAIO,
            ["run", "cfg.yaml"],
            cwd=str(work),
            env=dict(env, TERM="xterm-256color"),
            dimensions=(50, 160),
            timeout=900,
        )
        sampler = CpuSampler(child.pid)
        sampler.start()
        received = bytearray()
        while True:  # keep draining the terminal so the dashboard never blocks on a full pty
            try:
                received += child.read_nonblocking(1 << 16, timeout=900)
            except pexpect.EOF:
                break
        child.close()
        sampler.stop.set()
        supervisor_cpu = sampler.cpu_s
        code = child.exitstatus
        dashboard_bytes = len(received)
        if b"\x1b[" not in received:
            raise RuntimeError("kaio-tty: no escape sequences: the live dashboard did not run")
        log = (work / "docs/reports" / PROJECT / "child.log").read_text(errors="replace")
        window = training_window(work / "docs/reports" / PROJECT / "journal.jsonl")
    else:
        raise ValueError(mode)
    wall = time.perf_counter() - t0
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    process_cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    if code != 0:
        raise RuntimeError(f"{mode} exited {code}; see {work}")
    runtime = train_runtime(log)
    cpu_in_training = None
    if mode != "bare" and None not in window:
        used = sampler.cpu_between(*window)
        cpu_in_training = used / (window[1] - window[0]) if used is not None else None
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    return {
        "mode": mode,
        "train_runtime_s": runtime,
        "steps_per_s": steps / runtime,
        "wall_s": wall,
        "process_cpu_s": process_cpu,  # the whole command, every descendant included
        "supervisor_cpu_s": supervisor_cpu,
        "supervisor_cores_during_training": cpu_in_training,  # CPU-s of the kaio process per s of training
        "dashboard_bytes": dashboard_bytes,
        "loadavg_1min_before": float(load_before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--modes", default="bare,kaio-tty,kaio-plain")
    parser.add_argument("--processes", type=int, default=1, help="ranks of the job (launch.num_processes)")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--refresh-seconds",
        type=float,
        default=None,
        help="reporting.refresh_seconds (default: kaio's, 10 s); a diagnostic knob",
    )
    ns = parser.parse_args()
    modes = ns.modes.split(",")
    root = Path(tempfile.mkdtemp(prefix="kaio-bench-overhead-"))
    env = bench_env(root)
    global PROCESSES
    PROCESSES = ns.processes
    yaml_path, json_path = prepare(root, ns.steps, ns.refresh_seconds, ns.processes)
    t_start = time.perf_counter()
    runs = []
    index = 0
    try:
        if not ns.no_warmup:
            run_once("bare", root, yaml_path, json_path, env, ns.steps, index)  # page cache, pyc files
            index += 1
        for rnd in range(ns.rounds):
            order = modes[rnd % len(modes) :] + modes[: rnd % len(modes)]
            for mode in order:
                r = run_once(mode, root, yaml_path, json_path, env, ns.steps, index)
                index += 1
                r["round"] = rnd
                runs.append(r)
                print(
                    f"round {rnd + 1} {mode}: {r['steps_per_s']:.3f} steps/s (train_runtime {r['train_runtime_s']:.2f} s, "
                    f"wall {r['wall_s']:.1f} s, CPU {r['process_cpu_s']:.1f} s, supervisor CPU {fmt(r['supervisor_cpu_s'])} s, "
                    f"{fmt(r['supervisor_cores_during_training'])} cores during training, load {r['loadavg_1min_before']})",
                    flush=True,
                )
    finally:
        if ns.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    total_s = time.perf_counter() - t_start
    result = {
        "rounds": ns.rounds,
        "steps": ns.steps,
        "refresh_seconds": ns.refresh_seconds,
        "processes": ns.processes,
        "total_s": total_s,
        "runs": runs,
    }
    by = {m: {r["round"]: r for r in runs if r["mode"] == m} for m in modes}
    for m in modes:
        result[m] = {
            "steps_per_s": summary([r["steps_per_s"] for r in by[m].values()]),
            "step_ms": summary([1e3 / r["steps_per_s"] for r in by[m].values()]),
            "supervisor_cpu_s": summary(
                [r["supervisor_cpu_s"] for r in by[m].values() if r["supervisor_cpu_s"] is not None]
            ),
            "supervisor_cores_during_training": summary(
                [
                    r["supervisor_cores_during_training"]
                    for r in by[m].values()
                    if r["supervisor_cores_during_training"] is not None
                ]
            ),
        }
    ratios = {}
    for m in modes:
        if m != "bare" and "bare" in by:
            ratios[m] = summary(
                [by[m][k]["steps_per_s"] / by["bare"][k]["steps_per_s"] for k in by[m] if k in by["bare"]]
            )
    result["ratio_vs_bare"] = ratios
    whole = {}
    for m in modes:
        if m != "bare" and "bare" in by:
            pairs = [k for k in by[m] if k in by["bare"]]
            whole[m] = {
                "wall": summary([by[m][k]["wall_s"] / by["bare"][k]["wall_s"] for k in pairs]),
                "cpu": summary([by[m][k]["process_cpu_s"] / by["bare"][k]["process_cpu_s"] for k in pairs]),
            }
    result["whole_process_vs_bare"] = whole
    result["whole_process_met"] = bool(whole) and all(
        w["wall"]["median"] <= 1.05 and w["cpu"]["median"] <= 1.10 for w in whole.values()
    )
    met = bool(ratios) and all(s["median"] >= 0.98 for s in ratios.values())
    parts = (
        [
            f"bare {result['bare']['steps_per_s']['median']:.3f} steps/s ({result['bare']['step_ms']['median']:.0f} ms/step)"
        ]
        if "bare" in by
        else []
    )
    for m, s in ratios.items():
        c = result[m]["supervisor_cores_during_training"]
        parts.append(
            f"{m}/bare median {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}], "
            f"supervisor CPU during training {100 * c['median']:.1f}% of a core"
            if c.get("n")
            else f"{m}/bare median {s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"
        )
    for m, w in whole.items():
        parts.append(
            f"{m}/bare whole process: wall {w['wall']['median']:.3f} [{w['wall']['min']:.3f}-{w['wall']['max']:.3f}], "
            f"CPU {w['cpu']['median']:.3f} [{w['cpu']['min']:.3f}-{w['cpu']['max']:.3f}]"
        )
    if whole:
        verdict = "MET" if result["whole_process_met"] else "MISSED"
        parts.append(f"whole process goal (wall <= 1.05, CPU <= 1.10): {verdict}")
    line = f"{ns.rounds} rounds x {ns.steps} steps x {ns.processes} process(es), {total_s / 60:.1f} min; " + "; ".join(
        parts
    )
    append_result("overhead", result, "kaio steps/s >= 0.98 x bare accelerate launch (median ratio)", met, line)


if __name__ == "__main__":
    main()

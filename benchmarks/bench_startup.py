"""Start-up: `kaio --help`, and from `kaio run` to the child's start.

1. ``kaio --help`` (the installed console script) wall time, median of N runs
   after one warm-up; ``python -m kaio --help`` is measured the same way.
2. ``kaio run cfg.yaml --plain`` with a config whose ``launch.script`` is a
   trivial script: the time from just before the process is spawned to the
   journal's ``child_started`` record (``t_wall``), median of N fresh projects.
   Also reported: to ``session_start`` (the supervisor is ready), to the
   script's first line (that includes ``accelerate launch`` importing torch,
   which is not kaio's), and the whole command (including the final report).

Goals: --help under 0.3 s; run -> child_started under 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import PYTHON, append_result, bench_env, fmt, summary

KAIO = str(Path(PYTHON).with_name("kaio"))

TRIVIAL = """\
import os, time
with open(os.environ["BENCH_MARK_FILE"], "w") as f:
    f.write(repr(time.time()))
"""

CONFIG = """\
project_name: startup
launch:
  script: trivial.py
reporting:
  use_comet_ml: false
"""


def time_help(argv: list[str], runs: int, env: dict) -> list[float]:
    subprocess.run(argv, env=env, capture_output=True, check=True)  # warm the page cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return times


def one_run(env: dict) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kaio-bench-startup-"))
    try:
        (work / "trivial.py").write_text(TRIVIAL)
        (work / "cfg.yaml").write_text(CONFIG)
        mark = work / "first_line.txt"
        run_env = dict(env, BENCH_MARK_FILE=str(mark))
        t0 = time.time()
        proc = subprocess.run(
            [KAIO, "run", "cfg.yaml", "--plain"], cwd=work, env=run_env, capture_output=True, text=True, timeout=300
        )
        t_end = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"kaio run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        records = [
            json.loads(line)
            for line in (work / "docs/reports/startup/journal.jsonl").read_text().splitlines()
            if line.strip()
        ]
        first = {}
        for r in records:
            first.setdefault(r.get("type"), r)
        return {
            "to_session_start_s": first["session_start"]["t_wall"] - t0,
            "to_child_started_s": first["child_started"]["t_wall"] - t0,
            "to_script_first_line_s": float(mark.read_text()) - t0 if mark.exists() else None,
            "whole_command_s": t_end - t0,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    ns = parser.parse_args()
    env = bench_env()

    help_times = time_help([KAIO, "--help"], ns.runs, env)
    help_m_times = time_help([PYTHON, "-m", "kaio", "--help"], ns.runs, env)
    one_run(env)  # warm-up: page cache, pyc files
    runs = [one_run(env) for _ in range(ns.runs)]

    result = {
        "help_s": summary(help_times),
        "python_m_kaio_help_s": summary(help_m_times),
        **{key: summary([r[key] for r in runs if r[key] is not None]) for key in runs[0]},
    }
    help_med = result["help_s"]["median"]
    child_med = result["to_child_started_s"]["median"]
    met = help_med < 0.3 and child_med < 0.5
    line = (
        f"kaio --help median {fmt(help_med)} s (python -m kaio {fmt(result['python_m_kaio_help_s']['median'])} s); "
        f"kaio run -> child_started median {fmt(child_med)} s "
        f"[min {fmt(result['to_child_started_s']['min'])}, max {fmt(result['to_child_started_s']['max'])}]; "
        f"-> session_start {fmt(result['to_session_start_s']['median'])} s; "
        f"-> script's first line {fmt(result['to_script_first_line_s']['median'])} s; whole command {fmt(result['whole_command_s']['median'])} s"
    )
    append_result("startup", result, "kaio --help < 0.3 s (median of 10); kaio run -> child_started < 0.5 s", met, line)


if __name__ == "__main__":
    main()

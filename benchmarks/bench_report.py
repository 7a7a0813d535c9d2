"""`kaio report` on a synthetic 24 h, 8-GPU, 100k-step history.

A project folder is built in a temp dir as a supervisor leaves it: the
records it journals (``synthetic_run.records``: 8 ranks' step events and rank
0's log for each of 100k steps, 172,800 ticks of 8 GPUs at 2 Hz, checkpoints
every 5,000 steps, a completed session) go through a real ``Journal`` and a
``RunState`` with its ``steps.jsonl``, and ``state.json`` is saved as the
supervisor's refresh saves it, ``--tail-steps`` (20) steps before the end:
what a supervisor killed a few seconds after its last refresh leaves. Then
``python -m kaio report synthetic --output-dir <tmp>/reports`` runs:

- run 1 replays the journal's tail on top of state.json (the crash case),
  and saves a new state.json;
- runs 2..``--runs`` find state.json up to date (the common case: a report
  rebuilt after a finished run);
- a last, "cold" run after deleting state.json and steps.jsonl replays the
  whole journal (a project from an older kaio, or damaged files).

Each run's wall time and peak RSS (``/usr/bin/time -v``'s maximum resident
set size) are recorded, and history.json is checked to hold every step.

Goal: under 5 s and under 1 GB (the crash and common cases).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import PYTHON, append_result, bench_env, fmt, setup_process_env, summary

setup_process_env()


def build_project(report_dir: Path, steps: int, hours: float, gpus: int, ranks: int, tail_steps: int) -> dict:
    from kaio.run import derived
    from kaio.run.journal import JOURNAL_NAME, Journal
    from kaio.run.state import RunState
    from kaio.run.steplog import STEPS_NAME, StepLog
    from synthetic_run import records

    report_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(report_dir / JOURNAL_NAME)
    state = RunState(report_dir.name, StepLog(report_dir / STEPS_NAME, writable=True, valid_bytes=0))
    counts: dict[str, int] = {}
    save_at = steps - tail_steps
    t0 = time.perf_counter()
    for record in records(steps, hours, gpus, ranks):
        counts[record["type"]] = counts.get(record["type"], 0) + 1
        journal.append(record)
        state.apply(record)
        if record["type"] == "step" and record["step"] == save_at and record["rank"] == ranks - 1:
            derived.save(report_dir, state, journal)  # the last refresh before the supervisor died
    journal.close()
    state.step_log.close()
    return {"records": counts, "journal_mb": (report_dir / JOURNAL_NAME).stat().st_size / 1e6, "build_s": time.perf_counter() - t0}


def run_report(root: Path, env: dict) -> dict:
    argv = [PYTHON, "-m", "kaio", "report", "synthetic", "--output-dir", str(root / "reports")]
    timed = Path("/usr/bin/time").exists()
    if timed:
        argv = ["/usr/bin/time", "-v", *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"kaio report failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak = None
    if timed:
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak = int(match.group(1)) / 1e3 if match else None
    report_dir = root / "reports" / "synthetic"
    written = {name: (report_dir / name).stat().st_size for name in ("history.json", "report.md", "telemetry.png") if (report_dir / name).exists()}
    return {"wall_s": wall, "peak_rss_mb": peak, "written_bytes": written, "stdout": proc.stdout.strip()[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--tail-steps", type=int, default=20)
    parser.add_argument("--no-cold", action="store_true", help="skip the run without state.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp project (its path is printed)")
    ns = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kaio-bench-report-"))
    env = bench_env(root)
    report_dir = root / "reports" / "synthetic"
    cold = None
    try:
        built = build_project(report_dir, ns.steps, ns.hours, ns.gpus, ns.ranks, ns.tail_steps)
        print(f"project: journal {built['journal_mb']:.0f} MB, {sum(built['records'].values())} records, built in {built['build_s']:.0f} s", flush=True)
        runs = []
        for i in range(ns.runs):
            r = run_report(root, env)
            print(f"run {i + 1} ({'tail replay' if i == 0 else 'up to date'}): {r['wall_s']:.1f} s, peak RSS {fmt(r['peak_rss_mb'], 4)} MB", flush=True)
            runs.append(r)
            hist = json.loads((report_dir / "history.json").read_text())
            assert [s["step"] for s in hist["steps"]] == list(range(1, ns.steps + 1))
            del hist
        if not ns.no_cold:
            (report_dir / "state.json").unlink()
            (report_dir / "steps.jsonl").unlink()
            cold = run_report(root, env)
            print(f"cold (no state.json): {cold['wall_s']:.1f} s, peak RSS {fmt(cold['peak_rss_mb'], 4)} MB", flush=True)
    finally:
        if ns.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    result = {
        "steps": ns.steps, "hours": ns.hours, "gpus": ns.gpus, "ranks": ns.ranks, "tail_steps": ns.tail_steps, "project": built,
        "tail_replay": {k: runs[0][k] for k in ("wall_s", "peak_rss_mb")},
        "wall_s": summary([r["wall_s"] for r in runs[1:]]),
        "peak_rss_mb": summary([r["peak_rss_mb"] for r in runs[1:] if r["peak_rss_mb"] is not None]),
        "cold": {k: cold[k] for k in ("wall_s", "peak_rss_mb")} if cold else None,
        "written_bytes": runs[-1]["written_bytes"],
    }
    wall, peak = result["wall_s"]["median"], result["peak_rss_mb"].get("median")
    tail = result["tail_replay"]
    met = max(wall, tail["wall_s"]) < 5.0 and peak is not None and max(peak, tail["peak_rss_mb"] or 0) < 1000.0
    line = (
        f"journal {built['journal_mb']:.0f} MB ({ns.steps} steps x {ns.ranks} ranks, {built['records'].get('tick', 0)} ticks of {ns.gpus} GPUs); "
        f"kaio report with state.json up to date: median {wall:.2f} s [{result['wall_s']['min']:.2f}-{result['wall_s']['max']:.2f}], "
        f"peak RSS median {fmt(peak, 4)} MB; after a crash (tail of {ns.tail_steps} steps replayed): {tail['wall_s']:.2f} s, {fmt(tail['peak_rss_mb'], 4)} MB; "
        + (f"cold, whole journal replayed: {cold['wall_s']:.1f} s, {fmt(cold['peak_rss_mb'], 4)} MB; " if cold else "")
        + f"history.json {result['written_bytes'].get('history.json', 0) / 1e6:.0f} MB"
    )
    append_result("report", result, "kaio report < 5 s and < 1 GB peak RSS (24 h, 8 GPUs, 100k steps)", met, line)


if __name__ == "__main__":
    main()

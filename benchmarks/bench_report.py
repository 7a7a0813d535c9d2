"""`kaio report` on a synthetic 24 h, 8-GPU, 100k-step history.

A project folder is built in a temp dir with a ``journal.jsonl`` of the
records the supervisor writes (``synthetic_run.records``: 8 ranks' step
events and rank 0's log for each of 100k steps, 172,800 ticks of 8 GPUs at
2 Hz, checkpoints every 5,000 steps, a completed session). Then
``python -m kaio report synthetic --output-dir <tmp>/reports`` is run
``--runs`` times; each run's wall time and peak RSS (``/usr/bin/time -v``'s
maximum resident set size) are recorded, and the files it wrote are checked.

Goal: under 5 s and under 1 GB.
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


def build_journal(path: Path, steps: int, hours: float, gpus: int, ranks: int) -> dict:
    from kaio.run.journal import _line
    from synthetic_run import records

    path.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    with open(path, "wb", buffering=1 << 20) as f:
        for record in records(steps, hours, gpus, ranks):
            counts[record["type"]] = counts.get(record["type"], 0) + 1
            f.write(_line(record))
    return {"records": counts, "journal_mb": path.stat().st_size / 1e6, "build_s": time.perf_counter() - t0}


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
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temp project (its path is printed)")
    ns = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kaio-bench-report-"))
    env = bench_env(root)
    try:
        built = build_journal(root / "reports" / "synthetic" / "journal.jsonl", ns.steps, ns.hours, ns.gpus, ns.ranks)
        print(f"journal: {built['journal_mb']:.0f} MB, {sum(built['records'].values())} records, built in {built['build_s']:.0f} s", flush=True)
        runs = []
        for i in range(ns.runs):
            r = run_report(root, env)
            print(f"run {i + 1}: {r['wall_s']:.1f} s, peak RSS {fmt(r['peak_rss_mb'], 4)} MB", flush=True)
            runs.append(r)
        hist = json.loads((root / "reports" / "synthetic" / "history.json").read_text())
        assert len(hist["steps"]) == ns.steps, len(hist["steps"])
    finally:
        if ns.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    result = {
        "steps": ns.steps, "hours": ns.hours, "gpus": ns.gpus, "ranks": ns.ranks, "journal": built,
        "wall_s": summary([r["wall_s"] for r in runs]),
        "peak_rss_mb": summary([r["peak_rss_mb"] for r in runs if r["peak_rss_mb"] is not None]),
        "written_bytes": runs[-1]["written_bytes"],
    }
    wall, peak = result["wall_s"]["median"], result["peak_rss_mb"].get("median")
    met = wall < 5.0 and peak is not None and peak < 1000.0
    line = (
        f"journal {built['journal_mb']:.0f} MB ({ns.steps} steps x {ns.ranks} ranks, {built['records'].get('tick', 0)} ticks of {ns.gpus} GPUs); "
        f"kaio report median {wall:.1f} s [{result['wall_s']['min']:.1f}-{result['wall_s']['max']:.1f}], "
        f"peak RSS median {fmt(peak, 4)} MB [{fmt(result['peak_rss_mb'].get('min'), 4)}-{fmt(result['peak_rss_mb'].get('max'), 4)}]; "
        f"history.json {result['written_bytes'].get('history.json', 0) / 1e6:.0f} MB"
    )
    append_result("report", result, "kaio report < 5 s and < 1 GB peak RSS (24 h, 8 GPUs, 100k steps)", met, line)


if __name__ == "__main__":
    main()

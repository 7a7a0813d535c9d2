"""`kaio report` on a synthetic 24 h, 8-GPU, 100k-step history.

A project folder is built in a temp dir as a supervisor leaves it: the
records it journals (``synthetic_run.records``: 8 ranks' step events and rank
0's log for each of 100k steps, 172,800 ticks of 8 GPUs at 2 Hz, checkpoints
every 5,000 steps, a completed session) go through ``Recorder.record`` (a
real ``Journal``, then the ``RunState``, whose sealed steps go to the SQLite
``index.sqlite``), and the index is committed (``Recorder.save``) as the
supervisor's refresh commits it, ``--tail-steps`` (20) steps before the end,
after writing history.json and report.md as that refresh does: what a
supervisor killed a few seconds after its last refresh leaves (the journal
holds the rest, the index does not). Replaying that tail and writing the
reports is also what the end of a run does (a few more steps since the last
refresh): run 1 measures both. Then ``python -m kaio report
synthetic --output-dir <tmp>/reports`` runs:

- run 1 replays the journal's tail on top of the index's state (the crash
  case), and commits the index up to date;
- runs 2..``--runs`` find the index up to date (the common case: a report
  rebuilt after a finished run);
- a last, "cold" run after deleting index.sqlite replays the whole journal
  into a new index (a project from an older kaio, or a damaged index).

Each run's wall time and peak RSS (``/usr/bin/time -v``'s maximum resident
set size) are recorded, and history.json is checked to hold every step, in
order. ``--scale`` shrinks the run (steps and hours together) for a smoke
test; ``--no-record`` prints the record instead of appending it.

Goals: under 5 s and under 1 GB (the crash and common cases); cold, under
15 s (and 1 GB).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from _common import PYTHON, append_result, bench_env, fmt, setup_process_env, summary

setup_process_env()


def build_project(report_dir: Path, steps: int, hours: float, gpus: int, ranks: int, tail_steps: int) -> dict:
    from synthetic_run import records

    from kaio.record.paths import ProjectPaths
    from kaio.run import recorder as loading
    from kaio.run.finalize import write_reports
    from kaio.telemetry.protocol import Step

    paths = ProjectPaths(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    loaded = loading.load(paths, writable=True)  # a new project, as `kaio run` opens it
    recorder = loading.Recorder(paths, loaded.state)
    counts: dict[str, int] = {}
    save_at = steps - tail_steps
    saved = False
    t0 = time.perf_counter()
    for record in records(steps, hours, gpus, ranks):
        tag = type(record).__name__
        counts[tag] = counts.get(tag, 0) + 1
        recorder.record(record)  # Supervisor.record: the journal, then the state (sealed steps to the index)
        if type(record) is Step and record.step == save_at and record.rank == ranks - 1:
            write_reports(loaded.state, report_dir, draw=False)  # the last refresh before the supervisor died:
            recorder.save()  # history.json and report.md, then the index committed
            saved = True
    assert saved, "the index was never committed"
    recorder.close()  # the journal flushed; the index left as the last save committed it
    loaded.state.index.close()  # uncommitted steps are rolled back, as a killed process's are
    sizes = {p.name: p.stat().st_size / 1e6 for p in (paths.journal, paths.index)}
    conn = sqlite3.connect(f"file:{paths.index}?mode=ro", uri=True)
    try:  # what the index holds: the steps sealed by the last commit, not the journal's tail
        index_last_step = conn.execute("SELECT MAX(step) FROM steps").fetchone()[0]
    finally:
        conn.close()
    assert index_last_step < save_at, "the index should stop short of the journal"
    return {
        "records": counts,
        "journal_mb": sizes["journal.jsonl"],
        "index_mb": sizes["index.sqlite"],
        "index_last_step": index_last_step,
        "build_s": time.perf_counter() - t0,
    }


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
    written = {
        name: (report_dir / name).stat().st_size
        for name in ("history.json", "report.md", "telemetry.png", "index.sqlite")
        if (report_dir / name).exists()
    }
    return {"wall_s": wall, "peak_rss_mb": peak, "written_bytes": written, "stdout": proc.stdout.strip()[-300:]}


def history_steps(path: Path) -> list[int]:
    """The steps history.json lists, in its order (one step entry per line; read line by line, not
    parsed whole: it is GBs at full scale)."""
    import msgspec

    class _Entry(msgspec.Struct):
        step: int

    decoder = msgspec.json.Decoder(_Entry)
    steps, inside = [], False
    with open(path, "rb") as f:
        for line in f:
            if not inside:
                inside = line.rstrip().endswith(b'"steps":[')
                continue
            line = line.rstrip()
            if line.startswith(b"]"):
                break
            steps.append(decoder.decode(line.removesuffix(b",")).step)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--tail-steps", type=int, default=20)
    parser.add_argument("--no-cold", action="store_true", help="skip the run without index.sqlite")
    parser.add_argument("--keep", action="store_true", help="keep the temp project (its path is printed)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply --steps and --hours by this (a smoke test: 0.1)"
    )
    parser.add_argument(
        "--no-record", action="store_true", help="print the record; do not append it to the results file"
    )
    ns = parser.parse_args()
    ns.steps = max(100, round(ns.steps * ns.scale))
    ns.hours *= ns.scale
    root = Path(tempfile.mkdtemp(prefix="kaio-bench-report-"))
    env = bench_env(root)
    report_dir = root / "reports" / "synthetic"
    cold = None
    try:
        built = build_project(report_dir, ns.steps, ns.hours, ns.gpus, ns.ranks, ns.tail_steps)
        print(
            f"project: journal {built['journal_mb']:.0f} MB, index {built['index_mb']:.0f} MB, {sum(built['records'].values())} records, "
            f"built in {built['build_s']:.0f} s",
            flush=True,
        )
        runs = []
        for i in range(ns.runs):
            r = run_report(root, env)
            print(
                f"run {i + 1} ({'tail replay' if i == 0 else 'up to date'}): {r['wall_s']:.1f} s, peak RSS {fmt(r['peak_rss_mb'], 4)} MB",
                flush=True,
            )
            runs.append(r)
            assert history_steps(report_dir / "history.json") == list(range(1, ns.steps + 1)), (
                "history.json lacks steps"
            )
        if not ns.no_cold:
            (report_dir / "index.sqlite").unlink()
            cold = run_report(root, env)
            print(
                f"cold (no index.sqlite): {cold['wall_s']:.1f} s, peak RSS {fmt(cold['peak_rss_mb'], 4)} MB", flush=True
            )
            assert history_steps(report_dir / "history.json") == list(range(1, ns.steps + 1)), (
                "history.json lacks steps"
            )
    finally:
        if ns.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    result = {
        "steps": ns.steps,
        "scale": ns.scale,
        "hours": ns.hours,
        "gpus": ns.gpus,
        "ranks": ns.ranks,
        "tail_steps": ns.tail_steps,
        "project": built,
        "tail_replay": {k: runs[0][k] for k in ("wall_s", "peak_rss_mb")},
        "wall_s": summary([r["wall_s"] for r in runs[1:]]),
        "peak_rss_mb": summary([r["peak_rss_mb"] for r in runs[1:] if r["peak_rss_mb"] is not None]),
        "cold": {k: cold[k] for k in ("wall_s", "peak_rss_mb")} if cold else None,
        "written_bytes": runs[-1]["written_bytes"],
    }
    wall = result["wall_s"].get("median", runs[0]["wall_s"])  # --runs 1: the tail replay is the only run
    peak = result["peak_rss_mb"].get("median", runs[0]["peak_rss_mb"])
    tail = result["tail_replay"]
    met = max(wall, tail["wall_s"]) < 5.0 and peak is not None and max(peak, tail["peak_rss_mb"] or 0) < 1000.0
    result["met_cold"] = None if cold is None else cold["wall_s"] < 15.0 and (cold["peak_rss_mb"] or 0) < 1000.0
    met = met and result["met_cold"] is not False
    line = (
        f"journal {built['journal_mb']:.0f} MB ({ns.steps} steps x {ns.ranks} ranks, {built['records'].get('TickRecord', 0)} ticks of {ns.gpus} GPUs); "
        f"kaio report with the index up to date: median {wall:.2f} s [{result['wall_s'].get('min', wall):.2f}-{result['wall_s'].get('max', wall):.2f}], "
        f"peak RSS median {fmt(peak, 4)} MB; after a crash (tail of {ns.tail_steps} steps replayed): {tail['wall_s']:.2f} s, {fmt(tail['peak_rss_mb'], 4)} MB; "
        + (f"cold, whole journal replayed: {cold['wall_s']:.1f} s, {fmt(cold['peak_rss_mb'], 4)} MB; " if cold else "")
        + f"history.json {result['written_bytes'].get('history.json', 0) / 1e6:.0f} MB"
    )
    append_result(
        "report",
        result,
        "kaio report < 5 s and < 1 GB peak RSS (24 h, 8 GPUs, 100k steps); cold (no index) < 15 s",
        met,
        line,
        record=not ns.no_record,
    )


if __name__ == "__main__":
    main()

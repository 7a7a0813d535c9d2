"""Memory: supervisor RSS while a 24 h, 8-GPU, 1M-step run streams through it.

The records are those the supervisor journals (``synthetic_run.records``: per
step one ``step`` event from each of the 8 ranks and rank 0's ``log``; a
``tick`` of 8 GPUs at 2 Hz for 24 h = 172,800 ticks). Each goes through what
``Supervisor.record`` does: appended to a real ``Journal``, then applied to a
``RunState`` whose sealed steps go to a real ``steps.jsonl``. Every
``--refresh-every`` of the steps (1%: 100 refreshes), the supervisor's
refresh runs as ``kaio run`` wires it: ``LiveReports`` (report.md, and
history.json when its rule says so; telemetry.png by a ``FigureProcess``
child in the background) and ``derived.save`` (state.json). At the end, the
end-of-run ``write_reports`` (every file, history.json included, waiting for
the figure). The process first imports what a supervisor imports (CLI,
supervisor, dashboard, Rich Live), so its RSS is a supervisor's. The
drawing child's own peak RSS is reported apart (``RUSAGE_CHILDREN``).

RSS is read at every 1% of the steps (after that point's refresh); the 10%,
50% and 100% points, the growth per step from 10% to 100%, and the peak RSS
of the whole process (VmHWM, refreshes and the final write included) are the
figures. The files (~18 GB at 1M steps) go to a temp dir on the same disk as
the repo, removed afterwards.

Goal: under 200 MB, and flat (not growing with the run).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from _common import BENCH_DIR, append_result, fmt, setup_process_env

setup_process_env()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def peak_rss_mb() -> float:
    """VmHWM: this process's peak RSS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e3
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--refresh-every", type=float, default=0.01, help="fraction of the steps between two refreshes")
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR.parent / ".bench-tmp", help="where the run's files go (removed after)")
    ns = parser.parse_args()

    import kaio.cli  # noqa: F401  what a supervisor process has loaded
    import kaio.dashboard  # noqa: F401
    import kaio.run.project  # noqa: F401
    import kaio.run.supervisor  # noqa: F401
    import kaio.views  # noqa: F401
    import rich.live  # noqa: F401
    from kaio.run import derived
    from kaio.run.finalize import FigureProcess, LiveReports, write_reports
    from kaio.run.journal import JOURNAL_NAME, Journal
    from kaio.run.state import RunState
    from kaio.run.steplog import STEPS_NAME, StepLog
    from synthetic_run import records

    ns.workdir.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="kaio-bench-memory-", dir=ns.workdir)) / "synthetic"
    out.mkdir()
    try:
        journal = Journal(out / JOURNAL_NAME)
        state = RunState("synthetic", StepLog(out / STEPS_NAME, writable=True, valid_bytes=0))
        figure = FigureProcess(out)
        live_reports = LiveReports(out, figure)
        base = rss_mb()
        curve: list[tuple[float, int, float]] = []  # (fraction, steps, rss MB)
        refreshes: list[tuple[int, float]] = []  # (steps, seconds)
        every = max(1, int(ns.steps * ns.refresh_every))
        next_refresh, next_pct = every, 1
        applied = steps_done = 0
        t0 = time.perf_counter()
        refresh_total = 0.0
        for record in records(ns.steps, ns.hours, ns.gpus, ns.ranks):
            journal.append(record)  # Supervisor.record: journal first, then the state
            state.apply(record)
            applied += 1
            if record["type"] != "step" or record["rank"] != ns.ranks - 1:
                continue
            steps_done = record["step"]
            if steps_done >= next_refresh:
                r0 = time.perf_counter()
                live_reports(state)  # Supervisor._refresh, as project._supervise wires it
                derived.save(out, state, journal)
                took = time.perf_counter() - r0
                refresh_total += took
                refreshes.append((steps_done, took))
                next_refresh += every
            if steps_done * 100 >= next_pct * ns.steps:
                rss = rss_mb()
                curve.append((steps_done / ns.steps, steps_done, rss))
                print(f"{next_pct:3d}% step {steps_done} rss {rss:.0f} MB, peak {peak_rss_mb():.0f} MB "
                      f"({time.perf_counter() - t0:.0f} s, last refresh {refreshes[-1][1] if refreshes else 0:.2f} s)", flush=True)
                next_pct += 1
        stream_s = time.perf_counter() - t0
        f0 = time.perf_counter()
        write_reports(state, out, figure=figure)  # the end of the run: every file, history.json included
        figure.close()
        derived.save(out, state, journal)
        final_write_s = time.perf_counter() - f0
        journal.close()
        sizes_mb = {p.name: p.stat().st_size / 1e6 for p in out.iterdir() if p.is_file()}
        final_rss = rss_mb()
        peak = peak_rss_mb()
        state.step_log.close()
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)

    def at(pct: int) -> float | None:
        return next((rss for frac, _, rss in curve if round(frac * 100) == pct), None)

    ten = next((c for c in curve if round(c[0] * 100) == 10), curve[0])
    last = curve[-1]
    per_step_kb = (last[2] - ten[2]) * 1e3 / max(last[1] - ten[1], 1)
    result = {
        "steps_target": ns.steps,
        "steps_applied": steps_done,
        "records_applied": applied,
        "hours": ns.hours,
        "gpus": ns.gpus,
        "ranks": ns.ranks,
        "rss_base_mb": base,
        "rss_10pct_mb": at(10),
        "rss_50pct_mb": at(50),
        "rss_100pct_mb": at(100),
        "rss_after_final_write_mb": final_rss,
        "peak_rss_mb": peak,
        "figure_process_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3,
        "growth_kb_per_step": per_step_kb,
        "stream_s": stream_s,
        "us_per_step_incl_journal_and_refreshes": 1e6 * stream_s / max(steps_done, 1),
        "refreshes": len(refreshes),
        "refresh_s_total": refresh_total,
        "refresh_s_first_last": [refreshes[0][1], refreshes[-1][1]] if refreshes else None,
        "refresh_s_max": max((t for _, t in refreshes), default=None),
        "final_write_s": final_write_s,
        "files_mb": sizes_mb,
        "curve": [(round(f, 3), s, round(r, 1)) for f, s, r in curve],
    }
    flat = abs(per_step_kb) * 1e6 / 1e3 < 20  # under 20 MB of growth over 1M steps
    met = peak < 200 and flat and steps_done == ns.steps
    line = (
        f"RSS base {base:.0f} MB; 10% {fmt(at(10), 4)} MB, 50% {fmt(at(50), 4)} MB, 100% {fmt(at(100), 4)} MB; "
        f"peak (refreshes and final write included) {peak:.0f} MB; growth {per_step_kb * 1e3:.2f} B/step; "
        f"figure process peak {result['figure_process_peak_rss_mb']:.0f} MB; "
        f"{len(refreshes)} refreshes, last {refreshes[-1][1] if refreshes else 0:.2f} s, max {result['refresh_s_max'] or 0:.2f} s; "
        f"final write {final_write_s:.1f} s; history.json {sizes_mb.get('history.json', 0):.0f} MB, state.json {sizes_mb.get('state.json', 0):.1f} MB; "
        f"{1e6 * stream_s / max(steps_done, 1):.0f} us/step in all"
    )
    append_result("memory", result, "supervisor RSS < 200 MB and flat after 1M steps + 24 h of 8-GPU ticks", met, line)


if __name__ == "__main__":
    main()

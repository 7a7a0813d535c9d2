"""Memory: supervisor RSS while a 24 h, 8-GPU, 1M-step run streams through it.

The records are those the supervisor journals (``synthetic_run.records``, as
typed records: per step one ``Step`` event from each of the 8 ranks and rank
0's ``Log``; a ``TickRecord`` of 8 GPUs at 2 Hz for 24 h = 172,800 ticks).
The project is opened as ``kaio run`` opens a new one
(``kaio.run.recorder.load``, writable: a new ``index.sqlite``), and each
record goes through ``Recorder.record``, as ``Supervisor.record`` sends it:
appended to a real ``Journal``, then applied to the ``RunState``, whose
sealed steps go to the SQLite index. The journal is flushed once per step
(the supervisor flushes after each drain of its queue). Every
``--refresh-every`` of the steps (1%: 100 refreshes), the supervisor's
refresh runs as ``kaio run`` wires it (``project._supervise``):
``LiveReports`` (report.md every time; history.json and telemetry.png, the
latter by a ``FigureProcess`` child in the background, at most every 60 s of
wall time and 1% of it: the "heavy" refreshes), then ``Recorder.save`` (the
index committed with the state and the journal offset). At the end, the
end-of-run ``write_reports`` (every file, history.json included, waiting for
the figure) and ``Recorder.save``. The process first imports what a
supervisor imports (CLI, supervisor, dashboard, Rich Live), so its RSS is a
supervisor's. The drawing child's own peak RSS is reported apart
(``RUSAGE_CHILDREN``).

RSS is read at every 1% of the steps (after that point's refresh); the 10%,
50% and 100% points, the growth per step from 10% to 100% (and from 50%, past
a one-time jump), and the peak RSS of the whole process (VmHWM, refreshes and
the final write included) are the figures; so are every refresh's duration
and whether it was heavy. The files (the journal, the index and history.json,
~15 GB at 1M steps) go to a temp dir on the same disk as the repo, removed
afterwards.

``--scale`` shrinks the run (steps and hours together) for a smoke test;
``--no-record`` prints the record instead of appending it to the results.

Goal: under 200 MB, and flat (not growing with the run).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
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


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--refresh-every", type=float, default=0.01, help="fraction of the steps between two refreshes")
    parser.add_argument(
        "--workdir", type=Path, default=BENCH_DIR.parent / ".bench-tmp", help="where the run's files go (removed after)"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply --steps and --hours by this (a smoke test: 0.05)"
    )
    parser.add_argument(
        "--no-record", action="store_true", help="print the record; do not append it to the results file"
    )
    ns = parser.parse_args()
    ns.steps = max(100, round(ns.steps * ns.scale))
    ns.hours *= ns.scale

    # What a supervisor process has loaded, so that this process's RSS is a supervisor's.
    import rich.live  # noqa: F401
    from synthetic_run import records

    import kaio.cli
    import kaio.dashboard
    import kaio.run.project
    import kaio.run.supervisor
    import kaio.views  # noqa: F401
    from kaio.record.paths import ProjectPaths
    from kaio.run import recorder as loading
    from kaio.run.finalize import FigureProcess, LiveReports, write_reports
    from kaio.telemetry.protocol import Step

    ns.workdir.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="kaio-bench-memory-", dir=ns.workdir)) / "synthetic"
    out.mkdir()
    try:
        paths = ProjectPaths(out)
        loaded = loading.load(paths, writable=True)  # as project.run_new opens a new project
        state = loaded.state
        recorder = loading.Recorder(paths, state)  # as project._supervise
        figure = FigureProcess(out)
        live_reports = LiveReports(out, figure)
        base = rss_mb()
        curve: list[tuple[float, int, float]] = []  # (fraction, steps, rss MB)
        refreshes: list[tuple[int, float, bool]] = []  # (steps, seconds, history.json rewritten)
        every = max(1, int(ns.steps * ns.refresh_every))
        next_refresh, next_pct = every, 1
        applied = steps_done = 0
        t0 = time.perf_counter()
        refresh_total = 0.0
        last_rank = ns.ranks - 1
        for record in records(ns.steps, ns.hours, ns.gpus, ns.ranks):
            recorder.record(record)  # Supervisor.record: journal first, then the state
            applied += 1
            if type(record) is not Step or record.rank != last_rank:
                continue
            recorder.journal.flush()  # Supervisor._drain, after each drain
            steps_done = record.step
            if steps_done >= next_refresh:
                before = _mtime(paths.history)
                r0 = time.perf_counter()
                live_reports(state)  # Supervisor._refresh, as project._supervise wires it...
                recorder.save()  # ...then the index commit
                took = time.perf_counter() - r0
                refresh_total += took
                refreshes.append((steps_done, took, _mtime(paths.history) != before))
                next_refresh += every
            if steps_done * 100 >= next_pct * ns.steps:
                rss = rss_mb()
                curve.append((steps_done / ns.steps, steps_done, rss))
                last = refreshes[-1] if refreshes else (0, 0.0, False)
                print(
                    f"{next_pct:3d}% step {steps_done} rss {rss:.0f} MB, peak {peak_rss_mb():.0f} MB "
                    f"({time.perf_counter() - t0:.0f} s, last refresh {last[1]:.2f} s{' heavy' if last[2] else ''})",
                    flush=True,
                )
                next_pct += 1
        stream_s = time.perf_counter() - t0
        f0 = time.perf_counter()
        write_reports(state, out, figure=figure)  # the end of the run (RunOutputs.finish): every file
        recorder.save()
        figure.close()
        final_write_s = time.perf_counter() - f0
        recorder.close()
        sizes_mb = {p.name: p.stat().st_size / 1e6 for p in out.iterdir() if p.is_file()}
        final_rss = rss_mb()
        peak = peak_rss_mb()
        index_steps = state.index.last_step()
        state.index.close()
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)

    def at(pct: int) -> float | None:
        return next((rss for frac, _, rss in curve if round(frac * 100) == pct), None)

    ten = next((c for c in curve if round(c[0] * 100) == 10), curve[0])
    last = curve[-1]
    per_step_kb = (last[2] - ten[2]) * 1e3 / max(last[1] - ten[1], 1)
    half = next((c for c in curve if round(c[0] * 100) == 50), ten)
    per_step_kb_late = (last[2] - half[2]) * 1e3 / max(last[1] - half[1], 1)  # past a one-time jump (a heavy refresh's)
    heavy = [t for _, t, h in refreshes if h]
    light = [t for _, t, h in refreshes if not h]
    result = {
        "steps_target": ns.steps,
        "steps_applied": steps_done,
        "steps_in_index": index_steps,
        "scale": ns.scale,
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
        "growth_kb_per_step_50_100pct": per_step_kb_late,
        "stream_s": stream_s,
        "us_per_step_incl_journal_and_refreshes": 1e6 * stream_s / max(steps_done, 1),
        "refreshes": len(refreshes),
        "refresh_s_total": refresh_total,
        "refresh_s_first_last": [refreshes[0][1], refreshes[-1][1]] if refreshes else None,
        "refresh_s_max": max((t for _, t, _h in refreshes), default=None),
        "refresh_s_median": statistics.median(t for _, t, _h in refreshes) if refreshes else None,
        "heavy_refreshes": len(heavy),  # rewrote history.json (and asked for telemetry.png)
        "heavy_refresh_s": heavy,
        "light_refresh_s_median": statistics.median(light) if light else None,
        "light_refresh_s_max": max(light, default=None),
        "refresh_log": [(s, round(t, 3), h) for s, t, h in refreshes],
        "final_write_s": final_write_s,
        "files_mb": sizes_mb,
        "curve": [(round(f, 3), s, round(r, 1)) for f, s, r in curve],
    }
    flat = abs(per_step_kb) * 1e6 / 1e3 < 20  # under 20 MB of growth over 1M steps
    met = peak < 200 and flat and steps_done == ns.steps and index_steps == ns.steps
    line = (
        f"{ns.steps} steps; RSS base {base:.0f} MB; 10% {fmt(at(10), 4)} MB, 50% {fmt(at(50), 4)} MB, 100% {fmt(at(100), 4)} MB; "
        f"peak (refreshes and final write included) {peak:.0f} MB; growth {per_step_kb * 1e3:.2f} B/step (from 50%: {per_step_kb_late * 1e3:.2f}); "
        f"figure process peak {result['figure_process_peak_rss_mb']:.0f} MB; "
        f"{len(refreshes)} refreshes ({len(heavy)} heavy, max {max(heavy, default=0):.2f} s; the others median "
        f"{result['light_refresh_s_median'] or 0:.2f} s, max {result['light_refresh_s_max'] or 0:.2f} s; last {refreshes[-1][1] if refreshes else 0:.2f} s); "
        f"final write {final_write_s:.1f} s; journal {sizes_mb.get('journal.jsonl', 0):.0f} MB, index {sizes_mb.get('index.sqlite', 0):.0f} MB, "
        f"history.json {sizes_mb.get('history.json', 0):.0f} MB; {1e6 * stream_s / max(steps_done, 1):.0f} us/step in all"
    )
    append_result(
        "memory",
        result,
        "supervisor RSS < 200 MB and flat after 1M steps + 24 h of 8-GPU ticks",
        met,
        line,
        record=not ns.no_record,
    )


if __name__ == "__main__":
    main()

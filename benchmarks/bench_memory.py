"""Memory: supervisor RSS while a 24 h, 8-GPU, 1M-step run streams through ``RunState``.

The records are those the supervisor journals (``synthetic_run.records``: per
step one ``step`` event from each of the 8 ranks and rank 0's ``log``; a
``tick`` of 8 GPUs at 2 Hz for 24 h = 172,800 ticks), applied one by one with
``RunState.apply`` as ``Supervisor._record`` does (the journal write is left
out: it buffers at most 64 KiB). The process first imports what a supervisor
imports (CLI, supervisor, dashboard, Rich Live), so RSS is a supervisor's.

RSS is read at every 1% of the steps; the 10%, 50% and 100% points are the
figures. ``--max-rss-mb`` (default 6000) stops the stream before the machine
runs out of memory; the growth per step measured up to there is then
extrapolated to 100%, and the report says so.

Then, in a second process, the same stream is stopped at ``--refresh-at``
(10%: 100k steps) and one refresh exactly as the supervisor does every
``refresh_seconds`` on its main thread while the run goes on
(``kaio.report.write_reports(state.history(), dir)``: history.json,
telemetry.png, report.md)
is timed and its peak RSS read.

Goal: under 200 MB, and flat (not growing with the run).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import append_result, fmt, setup_process_env

setup_process_env()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def refresh_phase(ns) -> dict:
    """Stream up to ``refresh_at`` of the steps, then time one supervisor refresh."""
    from kaio.report import write_reports
    from kaio.run.state import RunState
    from synthetic_run import records

    stop = int(ns.steps * ns.refresh_at)
    state = RunState("synthetic")
    for record in records(ns.steps, ns.hours, ns.gpus, ns.ranks):
        state.apply(record)
        if record["type"] == "step" and record["rank"] == ns.ranks - 1 and record["step"] >= stop:
            break
    state._flush_pending()
    before = rss_mb()
    reset = reset_peak()
    out = Path(tempfile.mkdtemp(prefix="kaio-bench-memory-"))
    try:
        r0 = time.perf_counter()
        write_reports(state.history(), out)  # the supervisor's on_refresh: history.json, telemetry.png, report.md
        refresh_s = time.perf_counter() - r0
        history_mb = (out / "history.json").stat().st_size / 1e6
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "steps": stop,
        "refresh_s": refresh_s,
        "history_json_mb": history_mb,
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_mb(),
        "peak_reset": reset,
    }


def peak_rss_mb() -> float:
    """VmHWM: this process's peak RSS (unlike ru_maxrss, not inherited across fork+exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e3
    return float("nan")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--max-rss-mb", type=float, default=4000.0)
    parser.add_argument("--refresh-at", type=float, default=0.10, help="fraction of the steps at which one refresh is timed (0: skip)")
    parser.add_argument("--refresh-only", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.refresh_only:
        print(json.dumps(refresh_phase(ns)))
        return

    import kaio.cli  # noqa: F401  what a supervisor process has loaded
    import kaio.dashboard  # noqa: F401
    import kaio.run.project  # noqa: F401
    import kaio.run.supervisor  # noqa: F401
    import kaio.views  # noqa: F401
    import rich.live  # noqa: F401
    from kaio.run.state import RunState
    from synthetic_run import records

    state = RunState("synthetic")
    base = rss_mb()
    curve: list[tuple[float, int, float]] = []  # (fraction, steps, rss MB)
    next_pct = 1
    applied = 0
    steps_done = 0
    capped = False
    t0 = time.perf_counter()
    for record in records(ns.steps, ns.hours, ns.gpus, ns.ranks):
        state.apply(record)
        applied += 1
        if record["type"] == "step" and record["rank"] == ns.ranks - 1:
            steps_done = record["step"]
            if steps_done * 100 >= next_pct * ns.steps:
                rss = rss_mb()
                curve.append((steps_done / ns.steps, steps_done, rss))
                print(f"{next_pct:3d}% step {steps_done} rss {rss:.0f} MB ({time.perf_counter() - t0:.0f} s)", flush=True)
                next_pct += 1
                if rss > ns.max_rss_mb:
                    capped = True
                    break
    state._flush_pending()
    elapsed = time.perf_counter() - t0
    final_rss = rss_mb()

    def at(pct: int) -> float | None:
        return next((rss for frac, _, rss in curve if round(frac * 100) == pct), None)

    # growth per step from the 10% point to the last point measured
    ten = next((c for c in curve if round(c[0] * 100) == 10), curve[0])
    last = curve[-1]
    per_step_kb = (last[2] - ten[2]) * 1e3 / max(last[1] - ten[1], 1)
    projected_100 = last[2] + per_step_kb * (ns.steps - last[1]) / 1e3

    refresh = {}
    if ns.refresh_at:
        del state
        argv = [sys.executable, __file__, "--refresh-only", "--steps", str(ns.steps), "--hours", str(ns.hours),
                "--gpus", str(ns.gpus), "--ranks", str(ns.ranks), "--refresh-at", str(ns.refresh_at)]
        refresh = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    result = {
        "steps_target": ns.steps,
        "steps_applied": steps_done,
        "records_applied": applied,
        "hours": ns.hours,
        "gpus": ns.gpus,
        "ranks": ns.ranks,
        "capped_at_mb": ns.max_rss_mb if capped else None,
        "rss_base_mb": base,
        "rss_10pct_mb": at(10),
        "rss_50pct_mb": at(50),
        "rss_100pct_mb": at(100),
        "rss_final_mb": final_rss,
        "growth_kb_per_step": per_step_kb,
        "projected_rss_100pct_mb": projected_100 if capped else at(100),
        "apply_s": elapsed,
        "apply_us_per_record": 1e6 * elapsed / applied,
        "apply_us_per_step": 1e6 * elapsed / max(steps_done, 1),
        "refresh": refresh,
        "curve": [(round(f, 3), s, round(r, 1)) for f, s, r in curve],
    }
    end_rss = result["projected_rss_100pct_mb"]
    flat = per_step_kb < 0.01  # < 10 kB per 1M steps
    met = (not capped) and end_rss is not None and end_rss < 200 and flat
    line = (
        f"RSS base {base:.0f} MB; 10% {fmt(at(10), 4)} MB, 50% {fmt(at(50), 4)} MB, 100% {fmt(at(100), 4)} MB"
        + (f" (stopped at {100 * last[0]:.0f}% by the {ns.max_rss_mb:.0f} MB cap; projected 100%: {projected_100:.0f} MB)" if capped else "")
        + f"; growth {per_step_kb:.2f} kB/step; apply {1e6 * elapsed / max(steps_done, 1):.0f} us/step"
        + (f"; one supervisor refresh (write_reports) at {refresh['steps']} steps: {refresh['refresh_s']:.1f} s, "
           f"{refresh['history_json_mb']:.0f} MB of JSON, RSS {refresh['rss_before_mb']:.0f} -> peak {refresh['peak_rss_mb']:.0f} MB" if refresh else "")
    )
    append_result("memory", result, "supervisor RSS < 200 MB and flat after 1M steps + 24 h of 8-GPU ticks", met, line)


if __name__ == "__main__":
    main()

"""Where `kaio report`'s time and memory go, phase by phase (a diagnostic for bench_report.py).

Builds the same synthetic journal as ``bench_report.py`` (defaults: 24 h,
8 GPUs, 100k steps x 8 ranks) and runs the steps of ``kaio.run.rebuild``
one at a time in this process, printing wall time and RSS after each:
the journal read by ``recover_unfinished``, the second read by ``rebuild``,
``replay``, ``history()``, ``json_safe_history``, ``summarize``, writing
``history.json``, ``telemetry.png`` and ``report.md``. Appends no record.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import setup_process_env

setup_process_env()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        import resource

        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e3
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=8)
    ns = parser.parse_args()

    from bench_report import build_journal
    from kaio.report import json_safe_history
    from kaio.report.markdown import render_markdown
    from kaio.report.plot import render_telemetry_png
    from kaio.report.summary import summarize
    from kaio.fsutil import atomic_write_json, atomic_write_text
    from kaio.run.journal import read_journal
    from kaio.run.lock import ProjectLock
    from kaio.run.project import recover_unfinished
    from kaio.run.state import replay

    root = Path(tempfile.mkdtemp(prefix="kaio-profile-report-"))
    try:
        report_dir = root / "reports" / "synthetic"
        built = build_journal(report_dir / "journal.jsonl", ns.steps, ns.hours, ns.gpus, ns.ranks)
        print(f"journal {built['journal_mb']:.0f} MB; RSS {rss_mb():.0f} MB")
        rows = []

        def phase(name, fn):
            t0 = time.perf_counter()
            out = fn()
            rows.append((name, time.perf_counter() - t0, rss_mb(), peak_mb()))
            print(f"{name:<34} {rows[-1][1]:7.2f} s   RSS {rows[-1][2]:7.0f} MB   peak {rows[-1][3]:7.0f} MB", flush=True)
            return out

        def recover():
            with ProjectLock(report_dir):
                return recover_unfinished(report_dir, print)

        phase("recover_unfinished (reads journal)", recover)
        records, _bad = phase("read_journal", lambda: read_journal(report_dir / "journal.jsonl"))
        state = phase("replay", lambda: replay("synthetic", records))
        history = phase("state.history()", state.history)
        del records
        safe = phase("json_safe_history", lambda: json_safe_history(history))
        summary = phase("summarize", lambda: summarize(safe))
        phase("write history.json", lambda: atomic_write_json(report_dir / "history.json", safe, indent=None))  # as kaio.report writes it
        phase("render telemetry.png", lambda: render_telemetry_png(safe, report_dir / "telemetry.png"))
        phase("write report.md", lambda: atomic_write_text(report_dir / "report.md", render_markdown(safe, summary)))
        print(f"total {sum(r[1] for r in rows):.1f} s, peak RSS {peak_mb():.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

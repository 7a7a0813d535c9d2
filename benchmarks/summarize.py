"""Print the key figures of every record in benchmarks/results.jsonl (or the file given), one line each.

python benchmarks/summarize.py [results.jsonl] [--benchmark NAME]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import RESULTS


def _m(d: dict | None, key: str = "median", scale: float = 1.0, digits: int = 3) -> str:
    if not d or d.get(key) is None:
        return "n/a"
    return f"{d[key] * scale:.{digits}g}"


def figures(name: str, r: dict) -> str:
    if name == "overhead":
        parts = [f"bare {_m(r['bare']['step_ms'])} ms/step"]
        for mode, s in r["ratio_vs_bare"].items():
            cores = r[mode].get("supervisor_cores_during_training") or {}
            parts.append(
                f"{mode}/bare {_m(s, digits=4)} [{_m(s, 'min', digits=4)}-{_m(s, 'max', digits=4)}] sup.CPU {_m(cores, scale=100)}%"
            )
        return "; ".join(parts)
    if name == "callback":
        out = [
            f"{p} {_m(r[p]['added_us_per_step'])} us [{_m(r[p]['added_us_per_step'], 'min')}-{_m(r[p]['added_us_per_step'], 'max')}]"
            for p in ("thread", "process")
        ]
        if "cuda" in r:
            out.append(f"cuda {_m(r['cuda']['added_us_per_step_cuda'])} us no_sync={r['cuda']['no_sync']}")
        return "; ".join(out)
    if name == "poller":
        return "; ".join(
            f"{ph} {w['hz']:g}Hz err {w['mean_interval_error_pct']:+.4f}% p99 {w['lateness_p99_ms']:.2f} ms cpu {w['process_cpu_pct_of_core']:.2f}%"
            for ph in ("idle", "loaded")
            for w in r.get(ph, [])
        )
    if name == "memory":
        if "heavy_refreshes" in r:  # since the SQLite index: refreshes that rewrote history.json apart
            return (
                f"{r['steps_target']} steps: 10% {r['rss_10pct_mb']:.0f} MB, 50% {r['rss_50pct_mb']:.0f} MB, 100% {r['rss_100pct_mb']:.0f} MB, "
                f"peak {r['peak_rss_mb']:.0f} MB, {r['growth_kb_per_step'] * 1e3:.1f} B/step; figure child peak "
                f"{r.get('figure_process_peak_rss_mb') or 0:.0f} MB; refresh median {r['refresh_s_median'] or 0:.2f} s, "
                f"max {r['refresh_s_max'] or 0:.1f} s ({r['heavy_refreshes']} heavy); final write {r['final_write_s']:.1f} s"
            )
        if "peak_rss_mb" in r:  # since the bounded state (8745f1c)
            return (
                f"10% {r['rss_10pct_mb']:.0f} MB, 50% {r['rss_50pct_mb']:.0f} MB, 100% {r['rss_100pct_mb']:.0f} MB, "
                f"peak {r['peak_rss_mb']:.0f} MB, {r['growth_kb_per_step'] * 1e3:.1f} B/step; figure child peak "
                f"{r.get('figure_process_peak_rss_mb') or 0:.0f} MB; refresh max {r['refresh_s_max']:.1f} s"
            )
        ref = r.get("refresh") or {}
        return (
            f"10% {r['rss_10pct_mb']:.0f} MB, 50% {r['rss_50pct_mb'] or 0:.0f} MB, 100% {r['rss_100pct_mb'] or 0:.0f} MB, "
            f"projected {r['projected_rss_100pct_mb']:.0f} MB, {r['growth_kb_per_step']:.2f} kB/step; "
            f"refresh@{ref.get('steps')} {ref.get('refresh_s', 0):.1f} s peak {ref.get('peak_rss_mb', 0):.0f} MB"
        )
    if name == "report":
        line = f"wall {_m(r['wall_s'])} s [{_m(r['wall_s'], 'min')}-{_m(r['wall_s'], 'max')}], peak {_m(r['peak_rss_mb'], digits=4)} MB"
        if "tail_replay" in r:
            tail, cold = r["tail_replay"], r.get("cold")
            line += f"; tail replay {tail['wall_s']:.2f} s {tail['peak_rss_mb']:.0f} MB"
            line += f"; cold {cold['wall_s']:.1f} s {cold['peak_rss_mb'] or 0:.0f} MB" if cold else "; no cold run"
            if r.get("met_cold") is not None:  # a goal since the SQLite index (< 15 s)
                line += f" (cold goal {'met' if r['met_cold'] else 'MISSED'})"
        if "steps" in r and r["steps"] != 100_000:
            line = f"{r['steps']} steps: " + line
        return line
    if name == "startup":
        return (
            f"--help {_m(r['help_s'])} s [{_m(r['help_s'], 'min')}-{_m(r['help_s'], 'max')}]; "
            f"run->child {_m(r['to_child_started_s'])} s [{_m(r['to_child_started_s'], 'min')}-{_m(r['to_child_started_s'], 'max')}]"
        )
    if name == "throughput":
        return "; ".join(
            f"{mode} {_m(r[mode]['events_per_s'], digits=5)}/s [{_m(r[mode]['events_per_s'], 'min', digits=5)}-{_m(r[mode]['events_per_s'], 'max', digits=5)}]"
            + (
                f" {_m(r[mode].get('supervisor_cpu_us_per_event'))} us CPU/event"
                if r[mode].get("supervisor_cpu_us_per_event")
                else ""
            )
            for mode in ("journal", "supervisor")
            if mode in r
        )
    return json.dumps(r)[:200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=str(RESULTS))
    parser.add_argument("--benchmark")
    ns = parser.parse_args()
    for line in Path(ns.path).read_text().splitlines():
        rec = json.loads(line)
        if ns.benchmark and rec["benchmark"] != ns.benchmark:
            continue
        m = rec["machine"]
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[rec["met"]]
        print(
            f"{rec['when']} {rec['benchmark']:<10} {verdict:<6} kaio {m.get('kaio_rev')} load {m.get('loadavg_at_record')} | {figures(rec['benchmark'], rec['result'])}"
        )


if __name__ == "__main__":
    main()

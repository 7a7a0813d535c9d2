"""Poller: achieved interval, lateness and supervisor CPU at 2 Hz and 10 Hz, 8 synthetic GPUs.

Each rate runs in its own process (the rates run concurrently), for
``--seconds`` (60): kaio's ``Poller`` over ``SyntheticBackend(8)`` (every
device reading is a 1-5 ms blocking vendor call) plus the ``HostBackend``,
ticks turned into journal records by ``kaio.run.gpu_feed.tick_record`` and
consumed as the supervisor does: a main loop every 0.1 s that hands them to
``Recorder.record`` (appended to a ``Journal``, then applied to a
``RunState`` with its SQLite index, the project opened by
``kaio.run.recorder.load`` as ``kaio run`` opens it). Measured from every tick:
mean interval between tick starts, lateness (start - scheduled) p99/max,
skipped ticks; and the process CPU time (all threads) over the run, as % of
one core, with the poller thread's own share.

Phases: ``idle`` (nothing else running) and ``loaded`` (``--load`` busy
processes, default one per core, standing in for a training that saturates
the machine; kaio runs at the same priority as the training).

``--scale`` multiplies ``--seconds`` (a smoke test); ``--no-record`` prints
the record instead of appending it.

Goals: mean interval within 1% of target, p99 lateness under 20 ms,
under 2% of one core at 2 Hz with 8 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import PYTHON, append_result, fmt, percentile, setup_process_env

setup_process_env()

BURNER = "while True:\n    pass\n"


def worker(hz: float, seconds: float, devices: int, spin: bool) -> dict:
    import psutil
    from synthetic_gpu import SyntheticBackend

    from kaio.devices.host import HostBackend
    from kaio.devices.poller import Poller
    from kaio.record.paths import ProjectPaths
    from kaio.record.types import Record, SessionStart
    from kaio.run import recorder as loading
    from kaio.run.gpu_feed import device_record, tick_record

    tmp = Path(tempfile.mkdtemp(prefix="kaio-bench-poller-"))
    paths = ProjectPaths(tmp / "bench")
    loaded = loading.load(paths, writable=True)
    recorder = loading.Recorder(paths, loaded.state)
    journal = recorder.journal
    q: queue.SimpleQueue = queue.SimpleQueue()
    seen: list[tuple[float, float]] = []  # (scheduled, lateness) of every tick

    def on_tick(tick):
        seen.append((tick.t_mono, tick.lateness_s))
        q.put(tick_record(tick))

    backend = SyntheticBackend(devices, spin=spin)
    host = HostBackend()
    poller = Poller([backend], hz, on_tick=on_tick, host=host)

    def record(r: Record) -> None:  # Supervisor.record
        recorder.record(r)

    record(SessionStart(session=1, t_wall=time.time(), t_mono=time.monotonic(), poll_hz=hz))
    record(device_record(list(poller.devices), [], host))
    proc = psutil.Process()
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    poller.start()
    deadline = wall0 + seconds
    while time.monotonic() < deadline:  # the supervisor's main loop, telemetry part
        handled = 0
        while True:
            try:
                record(q.get_nowait())
                handled += 1
            except queue.Empty:
                break
        if handled:
            journal.flush()
        time.sleep(0.1)
    poller_tid = poller._thread.native_id
    poller_cpu = next((t.user_time + t.system_time for t in proc.threads() if t.id == poller_tid), None)
    poller.stop()
    wall = time.monotonic() - wall0
    cpu = time.process_time() - cpu0
    recorder.close()
    loaded.state.index.close()
    journal_bytes = paths.journal.stat().st_size
    shutil.rmtree(tmp, ignore_errors=True)
    starts = [s + late for s, late in seen]
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    lateness = [late for _, late in seen]
    target = 1.0 / hz
    mean_interval = (starts[-1] - starts[0]) / (len(starts) - 1)
    stats = poller.stats()
    return {
        "hz": hz,
        "seconds": wall,
        "devices": devices,
        "spin": spin,
        "ticks": len(seen),
        "expected_ticks": int(seconds * hz),
        "skipped_ticks": stats["skipped_ticks"],
        "target_interval_s": target,
        "mean_interval_s": mean_interval,
        "mean_interval_error_pct": 100 * (mean_interval - target) / target,
        "interval_p1_s": percentile(intervals, 1),
        "interval_p99_s": percentile(intervals, 99),
        "lateness_median_ms": 1e3 * percentile(lateness, 50),
        "lateness_p99_ms": 1e3 * percentile(lateness, 99),
        "lateness_max_ms": 1e3 * max(lateness),
        "poller_stats_p99_ms": 1e3 * stats["lateness_p99_s"],
        "vendor_call_ms_mean": 1e3 * backend.call_time_s / max(backend.calls, 1),
        "tick_duration_ms_mean": 1e3 * backend.call_time_s / max(len(seen), 1),
        "process_cpu_s": cpu,
        "process_cpu_pct_of_core": 100 * cpu / wall,
        "poller_thread_cpu_pct_of_core": 100 * poller_cpu / wall if poller_cpu is not None else None,
        "journal_bytes": journal_bytes,
    }


def phase(rates: list[float], seconds: float, devices: int, load: int, spin: bool) -> list[dict]:
    burners = [subprocess.Popen([PYTHON, "-c", BURNER]) for _ in range(load)]
    try:
        time.sleep(0.5 if load else 0)
        outs = []
        procs = []
        for hz in rates:
            out = Path(tempfile.mkdtemp(prefix="kaio-bench-poller-out-")) / f"{hz:g}hz.json"
            args = [
                PYTHON,
                __file__,
                "--worker",
                "--hz",
                str(hz),
                "--seconds",
                str(seconds),
                "--devices",
                str(devices),
                "--out",
                str(out),
            ]
            procs.append(subprocess.Popen(args + (["--spin"] if spin else [])))
            outs.append(out)
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"poller worker failed: {p.args}")
        results = [json.loads(o.read_text()) for o in outs]
        for o in outs:
            shutil.rmtree(o.parent, ignore_errors=True)
        return results
    finally:
        for b in burners:
            b.kill()
            b.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2,10", help="comma-separated Hz, each in its own process, concurrently")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument(
        "--load", type=int, default=os.cpu_count() or 2, help="busy processes in the 'loaded' phase (0: skip it)"
    )
    parser.add_argument("--spin", action="store_true", help="vendor calls burn CPU instead of blocking")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hz", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply --seconds by this (a smoke test: 0.1)")
    parser.add_argument(
        "--no-record", action="store_true", help="print the record; do not append it to the results file"
    )
    ns = parser.parse_args()
    if not ns.worker:
        ns.seconds *= ns.scale
    if ns.worker:
        Path(ns.out).write_text(json.dumps(worker(ns.hz, ns.seconds, ns.devices, ns.spin)))
        return
    rates = [float(r) for r in ns.rates.split(",")]
    result = {"idle": phase(rates, ns.seconds, ns.devices, 0, ns.spin)}
    if ns.load:
        result["loaded"] = phase(rates, ns.seconds, ns.devices, ns.load, ns.spin)
        result["load_processes"] = ns.load

    def ok(r: dict) -> bool:
        good = abs(r["mean_interval_error_pct"]) < 1.0 and r["lateness_p99_ms"] < 20.0
        if r["hz"] == 2.0:
            good = good and r["process_cpu_pct_of_core"] < 2.0
        return good

    met = all(ok(r) for r in result["idle"])
    met_loaded = all(ok(r) for r in result.get("loaded", []))
    result["met_idle"], result["met_loaded"] = met, met_loaded if ns.load else None
    parts = []
    for name in ("idle", "loaded"):
        for r in result.get(name, []):
            parts.append(
                f"{name} {r['hz']:g} Hz: interval {1e3 * r['mean_interval_s']:.3f} ms ({r['mean_interval_error_pct']:+.3f}%), "
                f"lateness p99 {fmt(r['lateness_p99_ms'])} ms max {fmt(r['lateness_max_ms'])} ms, skipped {r['skipped_ticks']}, "
                f"CPU {fmt(r['process_cpu_pct_of_core'])}% of a core (poller thread {fmt(r['poller_thread_cpu_pct_of_core'])}%)"
            )
    line = "; ".join(parts) + (f"; loaded phase meets goals: {met_loaded}" if ns.load else "")
    append_result(
        "poller",
        result,
        "mean interval within 1% of target; p99 lateness < 20 ms; < 2% of one core at 2 Hz, 8 devices",
        met,
        line,
        record=not ns.no_record,
    )


if __name__ == "__main__":
    main()

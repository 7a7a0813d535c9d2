"""Event throughput: events per second the FIFO reader and the journal sustain, nothing dropped.

The supervisor's path: a ``TelemetryFifo``, a ``FifoReader`` thread putting
each event (decoded and validated into its Struct) on a queue, and a consumer
loop (as ``Supervisor._drain``: drain the queue every 0.1 s, ``Journal.append``
each record, ``flush``). Writers: ``--writers`` processes (default 4), each an
``EventEmitter`` (with its spool, as in a run) emitting ``--events`` ``Step``
events as fast as it can, all started together. The rate is events / (time from the start signal to the last event
journaled). Checked: every event journaled once, each writer's ``seq`` 1..N
in order, no malformed line, nothing dropped by an emitter.

Modes: ``journal`` (reader + journal: the goal) and ``supervisor`` (the
project opened as ``kaio run`` opens it, ``kaio.run.recorder.load``, and each
event goes through ``Recorder.record``: the journal, then ``RunState.apply``,
whose sealed steps go to the SQLite index on disk, as the live supervisor
does). Each mode runs ``--runs`` times; the median is reported. ``--scale``
multiplies ``--events`` (a smoke test); ``--no-record`` prints the record
instead of appending it.

Goal: at least 50,000 events/s with nothing dropped.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import PYTHON, append_result, setup_process_env, summary

setup_process_env()

WRITER = """\
import sys, time
from kaio.child.emitter import EventEmitter
from kaio.telemetry.protocol import Step
pipe, spool, rank, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
emitter = EventEmitter(pipe, spool if spool != "-" else None, rank=rank, session=1)
assert emitter.connected
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
for step in range(1, n + 1):
    now = time.monotonic()
    emitter.emit(Step(rank=rank, step=step, epoch=step / 1000, t_wall=time.time(), t_mono=now,
                      step_time_s=0.0123, peak_vram_bytes=60_000_000_000 + step, tokens_seen=step * 16384))
t1 = time.perf_counter()
dropped = emitter.dropped
emitter.close()
print(f"{n / (t1 - t0):.1f} {dropped}", flush=True)
"""


def one_run(mode: str, writers: int, events: int, spool: bool) -> dict:
    from kaio.record.journal import Journal
    from kaio.record.paths import ProjectPaths
    from kaio.record.types import SessionStart
    from kaio.run import recorder as loading
    from kaio.telemetry.fifo import FifoReader, TelemetryFifo

    tmp = Path(tempfile.mkdtemp(prefix="kaio-bench-throughput-"))
    try:
        fifo = TelemetryFifo()
        q: queue.SimpleQueue = queue.SimpleQueue()
        reader = FifoReader(fifo.read_fd, lambda event: q.put(("record", event)))
        reader.start()
        paths = ProjectPaths(tmp / "bench")
        if mode == "supervisor":  # Supervisor.record: Recorder.record (journal, then RunState and its index)
            loaded = loading.load(paths, writable=True)
            recorder = loading.Recorder(paths, loaded.state)
            recorder.record(SessionStart(session=1, t_wall=time.time(), t_mono=time.monotonic()))
            journal, record = recorder.journal, recorder.record
        else:
            loaded = None
            journal = Journal(paths.journal)
            record = journal.append
        procs = [
            subprocess.Popen(
                [PYTHON, "-c", WRITER, str(fifo.path), str(tmp / "spool") if spool else "-", str(rank), str(events)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for rank in range(writers)
        ]
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        total = writers * events
        done = 0
        t_go = time.perf_counter()
        cpu_go = time.process_time()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        max_queue = 0
        while done < total:  # Supervisor._loop / _drain, telemetry part
            handled = 0
            while True:
                try:
                    _kind, item = q.get_nowait()
                except queue.Empty:
                    break
                record(item)
                handled += 1
            if handled:
                journal.flush()
                done += handled
                max_queue = max(max_queue, handled)
            if time.perf_counter() - t_go > 600:
                raise RuntimeError(f"only {done} of {total} events arrived in 600 s")
            if done < total:
                time.sleep(0.1)
        t_done = time.perf_counter()
        cpu_s = time.process_time() - cpu_go  # reader thread + consumer: the supervisor's side
        writer_rates, dropped = [], 0
        for p in procs:
            out, _ = p.communicate(timeout=60)
            rate, d = out.split()
            writer_rates.append(float(rate))
            dropped += int(d)
        journal.close()
        dropped_late = None
        if loaded is not None:
            dropped_late = loaded.state.ledger.telemetry.dropped_late_events
            loaded.state.index.close()
        fifo.close_write_end()
        reader.join(10)
        fifo.close()
        # Nothing dropped, nothing torn, per-writer order kept.
        seqs: dict[int, int] = {}
        in_order = True
        lines = 0
        with open(paths.journal, "rb") as f:
            for line in f:
                r = json.loads(line)
                if r.get("type") != "step":
                    continue  # the supervisor's own session_start
                lines += 1
                if r.get("seq") != seqs.get(r["pid"], 0) + 1:
                    in_order = False
                seqs[r["pid"]] = r["seq"]
        lossless = lines == total and all(v == events for v in seqs.values()) and len(seqs) == writers and in_order
        return {
            "mode": mode,
            "events": total,
            "events_per_s": total / (t_done - t_go),
            "supervisor_cpu_us_per_event": 1e6 * cpu_s / total,
            "events_per_supervisor_cpu_s": total / cpu_s,
            "writer_events_per_s_each": writer_rates,
            "max_events_per_drain": max_queue,
            "journal_lines": lines,
            "in_order": in_order,
            "lossless": lossless,
            "malformed": reader.stats.malformed + reader.stats.oversized,
            "emitter_dropped": dropped,
            "state_dropped_late_events": dropped_late,  # steps already sealed when a slower writer's event came
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--events", type=int, default=50_000, help="per writer")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-spool", action="store_true", help="writers do not spool (reader capacity alone)")
    parser.add_argument("--modes", default="journal,supervisor")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply --events by this (a smoke test: 0.1)")
    parser.add_argument(
        "--no-record", action="store_true", help="print the record; do not append it to the results file"
    )
    ns = parser.parse_args()
    ns.events = max(100, round(ns.events * ns.scale))
    result = {"writers": ns.writers, "events_per_writer": ns.events, "spool": not ns.no_spool}
    for mode in ns.modes.split(","):
        runs = [one_run(mode, ns.writers, ns.events, not ns.no_spool) for _ in range(ns.runs)]
        for r in runs:
            print(
                f"{mode}: {r['events_per_s']:.0f} events/s, {r['supervisor_cpu_us_per_event']:.1f} us of supervisor CPU per event, "
                f"lossless {r['lossless']}",
                flush=True,
            )
        result[mode] = {
            "events_per_s": summary([r["events_per_s"] for r in runs]),
            "supervisor_cpu_us_per_event": summary([r["supervisor_cpu_us_per_event"] for r in runs]),
            "lossless_all": all(r["lossless"] and not r["malformed"] and not r["emitter_dropped"] for r in runs),
            "runs": runs,
        }
    j = result.get("journal")
    met = bool(j) and j["events_per_s"]["median"] >= 50_000 and j["lossless_all"]
    parts = []
    for mode in ns.modes.split(","):
        s = result[mode]["events_per_s"]
        c = result[mode]["supervisor_cpu_us_per_event"]
        parts.append(
            f"{mode}: median {s['median']:.0f} events/s [{s['min']:.0f}-{s['max']:.0f}], "
            f"supervisor CPU {c['median']:.1f} us/event (= {1e6 / c['median']:.0f} events per CPU-second), lossless {result[mode]['lossless_all']}"
        )
    line = f"{ns.writers} writers x {ns.events} events (spool {'on' if not ns.no_spool else 'off'}); " + "; ".join(
        parts
    )
    append_result(
        "throughput",
        result,
        ">= 50,000 events/s through FifoReader + Journal, nothing dropped",
        met,
        line,
        record=not ns.no_record,
    )


if __name__ == "__main__":
    main()

"""The head of a 64-node job: its CPU and memory while every node streams its record to it.

64 synthetic nodes of 8 GPUs each, in a second process (``--nodes``): each
has its own folder and a real ``Journal`` into which a writer thread appends,
in real time, what a node's supervisor journals (``synthetic_run.records``:
a ``TickRecord`` of 8 GPUs at 2 Hz; per optimizer step, about one a second,
one ``Step`` event from each of its 8 ranks and rank 0's ``Log``), and a real
``JournalSender`` streams it to the head over loopback TCP, signed with the
job's secret. The head is this process: a real ``JournalReceiver`` (a thread
per node) keeps the copies, and a loop does what the supervisor's does for the
other nodes every 0.1 s (``NodeWatch.poll``, which reads what the copies
added every 2 s, and ``NodeWatch.rows`` for the dashboard).

Measured over ``--seconds`` of real time, after a warm-up: the head process's
CPU (user+sys of all its threads, in % of one core), its RSS and peak RSS
(VmHWM), and at the end, that every copy equals its node's journal byte for
byte. The nodes' process is not the head's cost and is not counted.

Goal (issue 15): head CPU < 10% of a core, memory < 300 MB. A 24 h run is not
simulated in real time: what the head holds per node does not grow with the
run (``NodeWatch`` keeps offsets and the latest figures; the copies are on
disk), which the RSS at the start and end of the window shows.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import PYTHON, append_result, fmt, setup_process_env

setup_process_env()

SECRET = b"benchmark secret, the same on every node"


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def nodes_main(root: Path, count: int, port: int, seconds: float) -> None:
    """The nodes' side: ``count`` node folders, each with a writer thread and a sender."""
    from synthetic_run import records

    from kaio.record.journal import Journal
    from kaio.record.paths import ProjectPaths
    from kaio.run.stream import JournalSender

    one_node = list(records(steps=int(seconds), hours=seconds / 3600, gpus=8, ranks=8))
    start = time.monotonic() + 1.0
    stop = threading.Event()

    def write(paths: ProjectPaths) -> None:
        journal = Journal(paths.journal)
        t0 = next(getattr(r, "t_mono", None) for r in one_node if getattr(r, "t_mono", None) is not None)
        for record in one_node:
            at = getattr(record, "t_mono", None)
            if at is not None:
                delay = start + (at - t0) - time.monotonic()
                if delay > 0:
                    journal.flush()
                    if stop.wait(delay):
                        break
            journal.append(record)
        journal.close()

    senders, writers = [], []
    for k in range(1, count + 1):
        paths = ProjectPaths(root / f"node{k}" / "bench" / "nodes" / f"{k}-bench{k:02d}")
        paths.report_dir.mkdir(parents=True)
        sender = JournalSender(paths, "127.0.0.1", port, SECRET)
        sender.start()
        senders.append(sender)
        writer = threading.Thread(target=write, args=(paths,), daemon=True)
        writer.start()
        writers.append(writer)
    for writer in writers:
        writer.join()
    closed = sum(sender.close(timeout_s=30) for sender in senders)
    print(f"nodes: {closed}/{count} sent everything", flush=True)


def head_main(args: argparse.Namespace) -> None:
    from kaio.record.paths import ProjectPaths
    from kaio.run.node_watch import NodeWatch
    from kaio.run.stream import JournalReceiver

    with tempfile.TemporaryDirectory(prefix="kaio-bench-stream-", dir=Path(__file__).parent) as tmp:
        root = Path(tmp)
        head = ProjectPaths(root / "head" / "bench")
        head.report_dir.mkdir(parents=True)
        receiver = JournalReceiver(head, SECRET, port=0, host="127.0.0.1")
        receiver.start()
        watch = NodeWatch(head)
        total_s = args.warmup + args.seconds
        nodes = subprocess.Popen(
            [PYTHON, __file__, "--nodes-side", str(root), str(args.nodes), str(receiver.port), str(total_s)],
            cwd=Path(__file__).parent,
        )
        begin = time.monotonic()
        measured_from = begin + args.warmup
        cpu0 = rss0 = None
        rows_seen = 0
        while time.monotonic() < begin + total_s + 1.0:
            if cpu0 is None and time.monotonic() >= measured_from:
                usage = resource.getrusage(resource.RUSAGE_SELF)
                cpu0, wall0, rss0 = usage.ru_utime + usage.ru_stime, time.monotonic(), _status_mb("VmRSS")
            watch.poll()
            rows_seen = max(rows_seen, len(watch.rows()))
            time.sleep(0.1)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_pct = 100 * (usage.ru_utime + usage.ru_stime - cpu0) / (time.monotonic() - wall0)
        rss1, peak = _status_mb("VmRSS"), _status_mb("VmHWM")
        nodes.wait(timeout=120)
        receiver.close()
        watch.poll(force=True)
        live = sum(1 for row in watch.rows() if row.state not in ("stale", "lost"))
        copies_equal = 0
        copied_bytes = 0
        for k in range(1, args.nodes + 1):
            folder = f"{k}-bench{k:02d}"
            own = (root / f"node{k}" / "bench" / "nodes" / folder / "journal.jsonl").read_bytes()
            copy = (head.nodes / folder / "journal.jsonl").read_bytes()
            copies_equal += own == copy
            copied_bytes += len(copy)
    result = {
        "nodes": args.nodes,
        "gpus_per_node": 8,
        "seconds_measured": args.seconds,
        "head_cpu_pct_of_one_core": round(cpu_pct, 2),
        "head_rss_mb_start": round(rss0, 1),
        "head_rss_mb_end": round(rss1, 1),
        "head_peak_rss_mb": round(peak, 1),
        "node_rows_shown": rows_seen,
        "nodes_not_stale_or_lost_at_end": live,
        "copies_equal": copies_equal,
        "copied_mb": round(copied_bytes / 1e6, 1),
        "stream_mb_per_s": round(copied_bytes / 1e6 / total_s, 2),
    }
    met = cpu_pct < 10 and peak < 300 and copies_equal == args.nodes
    line = (
        f"{args.nodes} nodes x 8 GPUs: head CPU {fmt(cpu_pct)}% of a core, RSS {fmt(rss0)}->{fmt(rss1)} MB "
        f"(peak {fmt(peak)}), {copies_equal}/{args.nodes} copies equal, {fmt(copied_bytes / 1e6)} MB streamed"
    )
    append_result(
        "stream",
        result,
        "head CPU < 10% of a core, memory < 300 MB, every copy exact",
        met,
        line,
        record=not args.no_record,
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--nodes-side":
        root, count, port, seconds = sys.argv[2:6]
        nodes_main(Path(root), int(count), int(port), float(seconds))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120.0, help="the measured window")
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--no-record", action="store_true", help="print the record instead of saving it")
    head_main(parser.parse_args())


if __name__ == "__main__":
    os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
    main()

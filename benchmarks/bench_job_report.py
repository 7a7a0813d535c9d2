"""The job's report on the head of a job of several machines whose nodes streamed their journals.

Without a shared filesystem the head holds a copy of each node's journal
(``nodes/<k>-<host>/``, written by ``kaio.run.stream``) and no index of it: the
job's report at the end of the head's run, and every ``kaio report`` after,
replayed each node's whole journal. Now the head brings each copy's index up to
date at its refreshes (``kaio.run.job.index_copies``) and whenever it loads a
copy it may write.

A head and ``--nodes`` node copies of ``--hours`` hours of 8 GPUs at 2 Hz and
``--steps`` steps are built as the supervisors leave them (``synthetic_run``
through ``Recorder.record``: the journal, the state, the index); the copies
lose their index.sqlite and get the head's ``stream-copy`` mark. Then:

- ``kaio report`` with no index for the copies (what the head's end of run
  did before: every node's journal replayed);
- ``kaio report`` again (the copies indexed by the first);
- in-process, ``index_copies`` after one more minute of every node's journal
  (the increment a head's refresh indexes; the refreshes are spaced so that
  the record costs at most 1% of the time).

history.json is checked to hold every step once.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import append_result, bench_env, fmt, setup_process_env

setup_process_env()

MAIN = {"main_addr": "10.0.0.1", "main_port": 29500}


def build_record(report_dir: Path, steps: int, hours: float, launch: dict) -> float:
    """A supervisor's record of a finished session; returns the seconds it took to build."""
    from synthetic_run import records

    from kaio.record.paths import ProjectPaths
    from kaio.run import recorder as loading

    paths = ProjectPaths(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    loaded = loading.load(paths, writable=True)
    recorder = loading.Recorder(paths, loaded.state)
    t0 = time.perf_counter()
    for record in records(steps, hours, launch=launch):
        recorder.record(record)
    recorder.save()
    recorder.close()
    loaded.state.index.close()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="nodes besides the head")
    parser.add_argument("--steps", type=int, default=25_000)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--runs", type=int, default=2, help="kaio report runs with the copies indexed")
    parser.add_argument("--no-record", action="store_true", help="print the record; do not append it")
    parser.add_argument("--keep", action="store_true", help="keep the temp project (its path is printed)")
    ns = parser.parse_args()

    import subprocess

    from _common import PYTHON
    from bench_report import history_steps

    from kaio.record.paths import ProjectPaths
    from kaio.run.job import index_copies

    root = Path(tempfile.mkdtemp(prefix="kaio-bench-job-"))
    env = bench_env(root)
    head = root / "reports" / "synthetic"
    try:
        nnodes = ns.nodes + 1
        built = build_record(head, ns.steps, ns.hours, {"nnodes": nnodes, "node_rank": 0, **MAIN})
        copies = []
        for rank in range(1, nnodes):
            folder = ProjectPaths(head).nodes / f"{rank}-node{rank:02d}"
            built += build_record(folder, ns.steps, ns.hours, {"nnodes": nnodes, "node_rank": rank, **MAIN})
            copies.append(ProjectPaths(folder))
        journal_mb = sum(p.journal.stat().st_size for p in copies) / 1e6
        # The head's copies: the journal only (and the head's mark), cut one minute of records short.
        tails = []
        for copy in copies:
            copy.index.unlink()
            copy.stream_copy.write_text("4242\n")
            whole = copy.journal.read_bytes()
            cut = len(whole)
            for _ in range(int(60 * 2 * 2)):  # ~ a minute: 2 ticks a second, and the steps between
                cut = whole.rindex(b"\n", 0, cut - 1) + 1
            copy.journal.write_bytes(whole[:cut])
            tails.append(whole[cut:])
        print(
            f"built in {built:.0f} s: head + {ns.nodes} node copies, {journal_mb:.0f} MB of node journals", flush=True
        )

        def report() -> float:
            t0 = time.perf_counter()
            argv = [PYTHON, "-m", "kaio", "report", "synthetic", "--output-dir", str(root / "reports")]
            done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
            return time.perf_counter() - t0

        cold = report()
        print(f"kaio report, the copies not indexed: {cold:.1f} s", flush=True)
        for copy, tail in zip(copies, tails):
            with open(copy.journal, "ab") as f:
                f.write(tail)
        t0 = time.perf_counter()
        index_copies(ProjectPaths(head))
        increment = time.perf_counter() - t0
        print(f"index_copies after a minute of {ns.nodes} nodes' records: {increment:.2f} s", flush=True)
        indexed = [report() for _ in range(ns.runs)]
        print(f"kaio report, the copies indexed: {', '.join(f'{t:.1f} s' for t in indexed)}", flush=True)
        steps = history_steps(head / "history.json")
        assert steps == list(range(1, ns.steps + 1)), "history.json lacks steps"
    finally:
        if ns.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    best = min(indexed)
    result = {
        "nodes": ns.nodes,
        "steps": ns.steps,
        "hours": ns.hours,
        "node_journals_mb": journal_mb,
        "report_copies_not_indexed_s": cold,
        "report_copies_indexed_s": indexed,
        "index_copies_minute_s": increment,
    }
    line = (
        f"head + {ns.nodes} streamed nodes, {ns.hours:g} h of 8 GPUs, {ns.steps} steps ({journal_mb:.0f} MB of node "
        f"journals): kaio report {cold:.1f} s with the copies not indexed, {fmt(best, 3)} s indexed; a head's "
        f"refresh indexes a minute of every node in {increment:.2f} s"
    )
    append_result(
        "job_report",
        result,
        "the job's report replays seconds of each streamed node, not its whole journal",
        best < cold,
        line,
        record=not ns.no_record,
    )


if __name__ == "__main__":
    main()

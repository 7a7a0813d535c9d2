"""Shared helpers of kaio's benchmarks: machine facts, statistics, the results file, a clean env.

Every benchmark prints one ``RESULT`` line and appends one JSON record to
``benchmarks/results.jsonl`` (or ``$KAIO_BENCH_RESULTS``; with ``--no-record``,
for a smoke test, it prints the record instead). Figures are ratios or
per-unit costs measured within one run, so records from different days
compare only through those.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = Path(os.environ.get("KAIO_BENCH_RESULTS", BENCH_DIR / "results.jsonl"))
PYTHON = sys.executable


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on (no heavy imports: versions come from package metadata)."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "kaio"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        rev, dirty = None, None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    except OSError:
        model = None
    try:
        loadavg = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        loadavg = None
    return {
        "loadavg_at_record": loadavg,  # other work on the machine (a noisy neighbour shows here)
        "nproc": os.cpu_count(),
        "sched_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": model,
        "arch": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "kaio_rev": rev,
        "kaio_dirty": dirty,
    }


def bench_env(tmp: Path | None = None) -> dict[str, str]:
    """The environment every benchmark child gets: caches in a temp dir, no Comet error reporting."""
    if tmp is None:
        tmp = Path(tempfile.mkdtemp(prefix="kaio-bench-env-"))
        atexit.register(shutil.rmtree, tmp, True)
    tmp = Path(tmp)
    env = dict(os.environ)
    env.update(
        {
            "HF_HOME": str(tmp / "hf"),
            "MPLCONFIGDIR": str(tmp / "mpl"),
            "COMET_ERROR_TRACKING_ENABLE": "false",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.pop("KAIO_DEBUG", None)
    return env


def setup_process_env() -> None:
    """The same settings for the benchmark process itself (before kaio or matplotlib is imported)."""
    if os.environ.get("KAIO_BENCH_ENV_SET"):  # a benchmark's child process: keep the parent's dirs
        return
    os.environ["KAIO_BENCH_ENV_SET"] = "1"
    for key, value in bench_env().items():
        if key in (
            "HF_HOME",
            "MPLCONFIGDIR",
            "COMET_ERROR_TRACKING_ENABLE",
            "HF_HUB_OFFLINE",
            "TOKENIZERS_PARALLELISM",
        ):
            os.environ[key] = value


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Iterable[float]) -> dict[str, Any]:
    """Median and spread (min, max, IQR, relative spread) of several runs."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0}
    med = statistics.median(vals)
    q1 = percentile(vals, 25)
    q3 = percentile(vals, 75)
    return {
        "n": len(vals),
        "median": med,
        "min": min(vals),
        "max": max(vals),
        "iqr": (q3 - q1) if q1 is not None and q3 is not None else None,
        "spread_pct": 100 * (max(vals) - min(vals)) / med if med else None,
        "values": vals,
    }


def append_result(
    name: str, result: dict[str, Any], goal: str, met: bool | None, line: str, *, record: bool = True
) -> None:
    """Print the result line and append the JSON record (``record=False``, a smoke test: print it instead)."""
    entry = {
        "benchmark": name,
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join([Path(PYTHON).name, *sys.argv]),
        "goal": goal,
        "met": met,
        "result": result,
    }
    if not record:
        print("RECORD (not saved): " + json.dumps(entry, default=str), flush=True)
    else:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
    verdict = "n/a" if met is None else ("MET" if met else "MISSED")
    print(f"RESULT {name}: {line} | goal: {goal} | {verdict}", flush=True)


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"

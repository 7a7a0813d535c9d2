"""The closing phase: from the training process's exit to kaio's exit (issue 17).

``kaio run`` on the README's config (the built-in recipe, ``--max-steps``
steps), ``--runs`` times with Comet on (its offline archive: the default
without a key) and as many with ``reporting.use_comet_ml: false``, alternating.
Each run's closing time is kaio's exit (measured here, when the process
returns) minus the journal's ``session_end`` (written by the supervisor once
the launcher has exited): the final report, history.json, the figure (drawn by
the process warmed at the start), Comet's assets and end.

Goal: at most 1.5 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import PYTHON, append_result, bench_env, fmt, summary

KAIO = str(Path(PYTHON).with_name("kaio"))
REPO = Path(__file__).resolve().parent.parent
GOAL_S = 1.5


def closing_s(root: Path, env: dict, steps: int, comet: bool, run: int) -> float:
    config = (REPO / "configs" / "finetuning_config.yaml").read_text()
    project = f"closing{run}{'c' if comet else 'n'}"
    text = config.replace("project_name: tiny-default", f"project_name: {project}")
    if not comet:
        text = text.replace("use_comet_ml: true", "use_comet_ml: false")
    assert ("use_comet_ml: false" in text) != comet, "the README config's Comet switch moved"
    cfg = root / f"{project}.yaml"
    cfg.write_text(text)
    argv = [KAIO, "run", cfg.name, "--plain", "--max-steps", str(steps)]
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    journal = root / "docs" / "reports" / project / "journal.jsonl"
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    (session_end,) = [r for r in records if r.get("type") == "session_end"]
    return ended - session_end["t_wall"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3, help="runs with Comet, and as many without")
    parser.add_argument("--no-record", action="store_true", help="print the record; do not append it")
    ns = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kaio-bench-closing-"))
    env = bench_env(root)
    env.pop("COMET_API_KEY", None)
    with_comet, without = [], []
    try:
        for run in range(ns.runs):
            with_comet.append(closing_s(root, env, ns.steps, True, run))
            without.append(closing_s(root, env, ns.steps, False, run))
            print(f"run {run + 1}: Comet {with_comet[-1]:.2f} s, no Comet {without[-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    comet_s, plain_s = summary(with_comet), summary(without)
    result = {"steps": ns.steps, "comet_offline_s": comet_s, "no_comet_s": plain_s}
    line = (
        f"{ns.steps} steps of the README config: child's exit to kaio's exit, Comet offline {fmt(comet_s['median'])} s "
        f"[{fmt(comet_s['min'])}-{fmt(comet_s['max'])}], no Comet {fmt(plain_s['median'])} s "
        f"[{fmt(plain_s['min'])}-{fmt(plain_s['max'])}]"
    )
    met = max(comet_s["median"], plain_s["median"]) <= GOAL_S
    append_result("closing", result, f"child's exit to kaio's exit <= {GOAL_S} s", met, line, record=not ns.no_record)


if __name__ == "__main__":
    main()

"""Shared fixtures: an isolated project folder and a small, fast config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Two test workers train at once on a 2-core machine: torch's default (a thread per core in each training)
# puts four OpenMP threads on two cores, spinning at their barriers. One thread each, set before any torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A LoRA fine-tune of the tiny model small enough for a test: a few seconds on 2 cores.
FAST_CONFIG = """\
project_name: {project}
model:
  hidden_size: 32
  intermediate_size: 64
  num_layers: 1
  num_heads: 2
  max_seq_length: 48
lora:
  r: 4
  alpha: 8
  dropout: 0.0
  target_modules: [q_proj, v_proj, lm_head]
data:
  sample_size: 64
training:
  max_steps: {max_steps}
  batch_size: 4
  learning_rate: 5.0e-3
  logging_steps: 1
  save_steps: {save_steps}
  save_total_limit: null
  seed: 7
launch:
  num_processes: {num_processes}
  grace_seconds: 20  # a graceful stop on a loaded machine: a save, then each process's exit
reporting:
  use_comet_ml: false
  poll_hz: 4
  refresh_seconds: 5
"""


# The modules whose tests run real trainings (10-50 s each), longest first: two workers that start them first
# finish together, where a long test collected last would run alone at the end.
REAL_RUN_MODULES = (
    "test_run_e2e.py",
    "test_faults.py",
    "test_integration.py",
    "test_resume_faults.py",
    "test_multinode.py",
    "test_health.py",
    "test_scripts.py",
    "test_dashboard_terminal.py",
    "test_code_quality.py",
)


@pytest.hookimpl(tryfirst=True)  # before xdist brings its workers up
def pytest_sessionstart(session: pytest.Session) -> None:
    """kaio's bytecode, compiled once for the whole suite. Where PYTHONDONTWRITEBYTECODE is set (it is on these
    machines), no import writes a .pyc, so each of the suite's few hundred kaio processes (supervisors, CLI
    calls, figure drawings, ranks) compiled kaio's source again: about 0.3 s of CPU each. Installed packages
    were compiled by pip; an editable kaio is compiled here (compileall writes whatever the variable says)."""
    if not hasattr(session.config, "workerinput"):  # the controller, once, before any worker imports kaio
        import compileall

        compileall.compile_dir(REPO / "kaio", quiet=1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def weight(item: pytest.Item) -> int:
        name = item.path.name
        return REAL_RUN_MODULES.index(name) if name in REAL_RUN_MODULES else len(REAL_RUN_MODULES)

    items.sort(key=weight)  # stable: a module's tests keep their order


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """huggingface_hub and matplotlib write caches under ~: keep them in a temp dir."""
    cache = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("MPLCONFIGDIR", str(cache / "mpl"))
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "false")
    monkeypatch.delenv("KAIO_DEBUG", raising=False)


@pytest.fixture
def project_dir(tmp_path, monkeypatch):
    """An empty working directory, as a user's repository would be."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(
    directory: Path,
    name: str = "cfg.yaml",
    *,
    project: str = "t",
    max_steps: int = 12,
    save_steps: int = 100,
    num_processes: int = 1,
    extra: str = "",
) -> Path:
    path = directory / name
    text = FAST_CONFIG.format(project=project, max_steps=max_steps, save_steps=save_steps, num_processes=num_processes)
    path.write_text(text + textwrap.dedent(extra))
    return path


def kaio(*args: str, cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``kaio`` command line in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kaio", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn_kaio(*args: str, cwd: Path, output: bool = True) -> subprocess.Popen:
    """Start the real ``kaio`` command line and return at once; its stdout and stderr together in a pipe
    (read them with ``communicate``), or discarded with ``output=False``."""
    sink = subprocess.PIPE if output else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "kaio", *args],
        cwd=cwd,
        stdout=sink,
        stderr=subprocess.STDOUT if output else subprocess.DEVNULL,
        text=True,
    )


def read_history(project_dir: Path, project: str = "t") -> dict:
    """The project's history.json as written."""
    return json.loads((project_dir / "docs" / "reports" / project / "history.json").read_text())


def journal_steps(project_dir: Path, project: str = "t") -> int:
    """How many step events the journal holds so far (0 before it exists)."""
    path = project_dir / "docs" / "reports" / project / "journal.jsonl"
    return path.read_text().count('"type":"step"') if path.exists() else 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def records(*dicts: dict) -> list:
    """Journal records from plain dicts, checked against their declared types as a journal line is."""
    import msgspec

    from kaio.record.types import Record

    return [msgspec.convert(d, Record) for d in dicts]


def replay(dicts, project: str = "p"):
    """A ``RunState`` (with an in-memory index) after applying ``dicts`` as journal records in order."""
    from kaio.record.index import RunIndex
    from kaio.run.state import RunState

    state = RunState(project, RunIndex.in_memory())
    for record in records(*dicts):
        state.apply(record)
    return state


def history_of(state) -> dict:
    """The history.json document a state would write now (open steps included), parsed."""
    from kaio.report.history import history_document

    with state.with_open_steps() as index:
        return json.loads(b"".join(history_document(state.header(), index)))

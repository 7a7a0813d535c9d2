"""A project's ``RunState``, loaded in seconds whatever the run's length.

The journal is the source of truth, but replaying a day-long one (hundreds of
MB, mostly GPU samples) takes minutes. So the supervisor saves, at every
report refresh and at the end, ``state.json``: the state without its sealed
steps (those are in ``steps.jsonl``), with how much of the journal and of
``steps.jsonl`` it covers. Loading it and applying only the journal records
written since is what ``kaio report``, ``kaio resume`` and ``kaio push`` do.
A missing, damaged or foreign ``state.json`` costs only time: the whole
journal is replayed and ``steps.jsonl`` rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kaio.fsutil import atomic_write_bytes
from kaio.run.journal import JOURNAL_NAME, Journal, whole_lines
from kaio.run.state import RunState, state_from_checkpoint, state_to_checkpoint
from kaio.run.steplog import STEPS_NAME, StepLog

STATE_NAME = "state.json"
STATE_FORMAT = 1
_HEAD_BYTES = 4096  # the journal's first bytes identify it (a run moved aside has another)


@dataclass
class LoadedState:
    state: RunState
    journal_offset: int  # bytes of the journal applied to ``state``
    bad_lines: int  # unreadable journal lines skipped (a torn write after a crash)
    replayed: int  # journal records applied on top of state.json (all of them without one)
    from_checkpoint: bool


def load(report_dir: Path, *, writable: bool) -> LoadedState:
    """The project's state. ``writable``: the caller holds the project lock, so ``steps.jsonl`` may be
    repaired and extended; otherwise nothing on disk is touched."""
    journal_path = report_dir / JOURNAL_NAME
    steps_path = report_dir / STEPS_NAME
    checkpoint = _read_checkpoint(report_dir / STATE_NAME, journal_path, steps_path)
    state = None
    if checkpoint is not None:
        step_log = StepLog(steps_path, writable=writable, valid_bytes=checkpoint["steps_bytes"])
        try:
            if step_log.file_bytes != checkpoint["steps_bytes"] or (
                hashlib.sha256(step_log.last_line()).hexdigest() != checkpoint.get("steps_last_line")
            ):
                raise ValueError("steps.jsonl changed since state.json was saved")
            state = state_from_checkpoint(checkpoint["state"], step_log)
        except (KeyError, TypeError, ValueError):
            step_log.close()  # another kaio version's, or steps.jsonl was cut and rewritten: replay instead
    from_checkpoint = state is not None
    if state is None:
        state = RunState(report_dir.name, StepLog(steps_path, writable=writable, valid_bytes=0))
    start = checkpoint["journal_offset"] if from_checkpoint else 0
    offset, bad, replayed = replay_journal(state, journal_path, start)
    return LoadedState(state, offset, bad, replayed, from_checkpoint)


def replay_journal(state: RunState, journal_path: Path, start: int = 0) -> tuple[int, int, int]:
    """Apply the journal's complete lines from byte ``start``; ``(offset reached, bad lines, records applied)``."""
    offset, bad, applied = start, 0, 0
    if not journal_path.is_file():
        return offset, bad, applied
    for offset, line in whole_lines(journal_path, start):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict):
            state.apply(record)
            applied += 1
        else:
            bad += 1
    return offset, bad, applied


def save(report_dir: Path, state: RunState, journal: Journal) -> None:
    """Write ``state.json`` for everything journaled so far (the caller holds the lock, and the
    state has applied every record ``journal`` was given)."""
    journal.flush(fsync=True)  # what state.json says is covered must be on disk first
    state.step_log.sync()
    offset = journal.offset
    document = {
        "format": STATE_FORMAT,
        "project": state.project,
        "journal_offset": offset,
        "journal_head": _journal_head(journal.path, offset),
        "steps_bytes": state.step_log.file_bytes,
        # A resume cuts steps.jsonl and writes it again: the file must still end where it did.
        "steps_last_line": hashlib.sha256(state.step_log.last_line()).hexdigest(),
        "state": state_to_checkpoint(state),
    }
    # NaN allowed: a cache read back by this module only (the reports are strict JSON).
    atomic_write_bytes(report_dir / STATE_NAME, json.dumps(document, separators=(",", ":"), default=str).encode())


def _read_checkpoint(path: Path, journal_path: Path, steps_path: Path) -> dict | None:
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    try:
        offset, steps_bytes = int(document["journal_offset"]), int(document["steps_bytes"])
        usable = (
            document.get("format") == STATE_FORMAT
            and journal_path.is_file()
            and journal_path.stat().st_size >= offset
            and document.get("journal_head") == _journal_head(journal_path, offset)
            and (steps_path.stat().st_size if steps_path.is_file() else 0) >= steps_bytes
            and isinstance(document.get("state"), dict)
        )
    except (KeyError, TypeError, ValueError):
        return None
    return document if usable else None


def _journal_head(journal_path: Path, offset: int) -> str:
    with open(journal_path, "rb") as f:
        return hashlib.sha256(f.read(min(offset, _HEAD_BYTES))).hexdigest()

"""A project's record, opened: the state loaded from the index and the journal's tail replayed on top;
then every new record journaled and applied (``Recorder.record``), and saved with what it covers.

The journal is the source of truth: a missing, damaged, foreign or older index
costs only time (the whole journal is replayed; msgspec decodes and checks
every line). A line that is not a valid record is counted, warned about once
and skipped: it never stops a report or a resume.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kaio.record.index import Coverage, RunIndex, head_digest
from kaio.record.journal import Journal, journal_head, read_records
from kaio.record.paths import ProjectPaths
from kaio.record.types import Note, Record, decode_record, encode_record
from kaio.run.state import RunState
from kaio.secrets import REDACTED, mask


@dataclass
class Loaded:
    state: RunState
    journal_offset: int  # bytes of the journal applied to ``state``
    invalid: int  # journal lines that were not a valid record (skipped)
    replayed: int  # records applied on top of the index's state (all of them without one)
    from_index: bool
    index_note: str | None = None  # the index could not be kept where it belongs


def load(paths: ProjectPaths, *, writable: bool) -> Loaded:
    """The project's state. ``writable``: the caller holds the project lock and the index is brought up
    to date in place; otherwise a private copy is (nothing on disk is touched)."""
    index = RunIndex.open(paths, writable=writable)
    state, start = _from_index(paths, index), 0
    if state is not None:
        coverage = index.coverage()
        start = coverage.journal_offset if coverage else 0
    else:
        index.reset()
        state = RunState(paths.project, index)
        if writable:
            for legacy in paths.legacy_caches:  # kaio before the index; the index replaces them
                legacy.unlink(missing_ok=True)
    offset, invalid, replayed = start, 0, 0
    if paths.journal.is_file():
        with index.totals_at_the_end() if start == 0 else contextlib.nullcontext():
            for end, record in read_records(paths.journal, start):
                offset = end
                if record is None:
                    invalid += 1
                    continue
                state.apply(record)
                replayed += 1
    if invalid:
        state.ledger.telemetry.invalid_records += invalid
        state.warn(f"{invalid} line(s) of {paths.journal.name} were not valid records and were skipped")
    return Loaded(state, offset, invalid, replayed, start > 0, index.note)


def commit(state: RunState, journal: Path, offset: int) -> None:
    """Commit the index with the state, as covering the journal's first ``offset`` bytes."""
    state.index.commit(state.encode(), Coverage(offset, head_digest(journal_head(journal, offset))))


def _from_index(paths: ProjectPaths, index: RunIndex) -> RunState | None:
    """The state the index saved, if it belongs to this journal and the journal still holds what it covers."""
    coverage, saved = index.coverage(), index.state()
    if coverage is None or saved is None or not paths.journal.is_file():
        return None
    if paths.journal.stat().st_size < coverage.journal_offset:
        return None
    if head_digest(journal_head(paths.journal, coverage.journal_offset)) != coverage.journal_head:
        return None
    try:
        return RunState.decode(saved, index)
    except ValueError:  # another kaio's state: replay instead
        return None


def damaged_index_note(paths: ProjectPaths, exc: Exception) -> str:
    return f"note: {paths.index} is damaged ({exc}); rebuilding it from {paths.journal}"


class Recorder:
    """The one way a record enters a run: journaled first (crash-safe), then applied to the state. ``secrets``: the
    values the secrets rule names for this run (``kaio.secrets.secret_values``): a record that holds one in its
    text (an error quoting the script's arguments) is journaled and applied with it masked."""

    def __init__(self, paths: ProjectPaths, state: RunState, secrets: Sequence[str] = ()) -> None:
        self.paths = paths
        self.state = state
        self.journal = Journal(paths.journal)
        self._index_failure_said = False
        self._reloaded: RunState | None = None
        self._secrets = [value.encode() for value in secrets]

    def record(self, record: Record) -> None:
        line = encode_record(record)
        masked = mask(line, self._secrets, REDACTED.encode())
        if masked is not line:  # a secret in its text: journaled and applied without it
            line, record = masked, decode_record(masked)
        self.journal.append_line(line)
        self.state.apply(record)
        if self.state.index.failed is not None and not self._index_failure_said:
            self._index_failure_said = True
            self.record(
                Note(
                    text=f"{self.state.index.failed}: the training goes on; the report is rebuilt from "
                    f"{self.paths.journal.name} when the run ends, and not refreshed until then",
                    t_wall=time.time(),
                )
            )

    def save(self) -> None:
        """Commit the index with the state, as covering everything journaled so far."""
        self.journal.flush(fsync=True)
        if self.journal.write_error is not None:
            return  # the journal is behind the state: nothing to cover yet
        commit(self.state, self.journal.path, self.journal.offset)

    def final_state(self) -> RunState:
        """The state to write the record from. If the index stopped taking writes during the run (a full
        disk), the steps it missed are only in the journal: once the journal is written out, the state
        is loaded again from the index's last commit and the journal after it."""
        failed = self.state.index.failed is not None
        self.journal.flush(fsync=True)
        if not failed or self.journal.write_error is not None:
            return self.state  # (still no space: the record is written as far as it goes; `kaio report` later)
        return self._reload(fresh_index=False)

    def rebuilt_state(self) -> RunState:
        """The state replayed from the whole journal into a new index (the index was found damaged)."""
        self.journal.flush(fsync=True)
        return self._reload(fresh_index=True)

    def _reload(self, *, fresh_index: bool) -> RunState:
        live = self.state
        live.index.close()
        if fresh_index:
            self.paths.index.unlink(missing_ok=True)
        self.state = self._reloaded = load(self.paths, writable=True).state
        for text in live.parts.warnings.items:  # said live but not journaled (the journal was full then)
            self.state.warn(text)
        return self.state

    def close(self) -> Path | None:
        """Returns where the journal's lines a full disk never took were saved, or None (all on disk)."""
        rescued = self.journal.close()
        if self._reloaded is not None:
            self._reloaded.index.close()
        return rescued

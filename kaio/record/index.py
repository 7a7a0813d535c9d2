"""``index.sqlite``: the journal, derived into tables the report can query.

The journal is the source of truth; replaying it to answer "what was the
median step time" each time would take minutes on a day-long run. The index
holds every final step entry (``steps``, and its history.json line in ``step_lines``), each
GPU's and rank's figures per step (``step_gpus``, ``step_ranks``), the other numbers the script
logged (``step_metrics``), the evaluations, and the run state (``meta``: ``RunState`` encoded)
together with how much of the journal all of that covers. A commit writes them in one
transaction, so the steps and the state never disagree; what the journal
holds beyond the covered offset is replayed on top.

Why SQLite, and how it is kept safe (docs/architecture.md says more):

* Exact figures in SQL (medians, time-weighted means, min/max per plot
  bucket), ``DELETE WHERE step > n`` for a resume, and one file instead of
  hand-built caches with hashes and byte offsets.
* Rollback-journal mode, never WAL: WAL needs shared memory, which network
  filesystems (NFS, Lustre) do not give. There is one writer, the holder of the
  project lock; a reader while a run goes (``kaio report``) copies the
  database with SQLite's backup API under a shared lock and works on the copy.
* It is a cache: missing, damaged, foreign or behind the journal, it is
  rebuilt from the journal. Where the filesystem refuses SQLite's locks, the
  index lives in a temp folder on local disk instead (and is rebuilt there).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sqlite3
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from kaio.record import gpu_totals
from kaio.record.paths import ProjectPaths
from kaio.record.rules import LossSmoother
from kaio.record.types import EvalEntry, StepEntry

INDEX_FORMAT = 16  # bump when the tables, or how records become their rows, change: an older index is rebuilt

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, session INTEGER, t_mono REAL, duration_s REAL, step_time_s REAL, eval_s REAL, save_s REAL,
    loss REAL, loss_nonfinite TEXT, loss_nonfinite_from REAL, loss_smoothed REAL, loss_diverged INTEGER,
    learning_rate REAL, grad_norm REAL, grad_norm_nonfinite TEXT,
    vram_peak REAL, vram_peak_min REAL, vram_used_max REAL, samples_seen REAL, tokens_seen REAL, energy_j REAL,
    host_cpu REAL, host_ram REAL, tokens_per_s_dev REAL, mfu REAL, training_start_s REAL, crc INTEGER);
-- Each step's history.json line, apart: the figures' scans never read these few KB a step.
CREATE TABLE IF NOT EXISTS step_lines (step INTEGER PRIMARY KEY, entry BLOB NOT NULL, crc INTEGER);
CREATE TABLE IF NOT EXISTS step_gpus (
    gpu TEXT, step INTEGER, duration_s REAL, power_avg REAL, power_min REAL, power_max REAL, util REAL, temp REAL,
    vram_used REAL, throttle TEXT, PRIMARY KEY (gpu, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS step_ranks (rank TEXT, step INTEGER, peak REAL, PRIMARY KEY (rank, step)) WITHOUT ROWID;
-- Every other number the script logged at a step (its entry's metrics): TRL's rewards, an auxiliary loss...
CREATE TABLE IF NOT EXISTS step_metrics (name TEXT, step INTEGER, value REAL, PRIMARY KEY (name, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS evals (step INTEGER, session INTEGER, eval_loss REAL, entry BLOB NOT NULL);
"""
_SCHEMA += gpu_totals.SCHEMA + ";\n"  # each GPU's figures over the run, kept as rows come (kaio.record.gpu_totals)
_STEP_TABLES = ("steps", "step_lines", "step_gpus", "step_ranks", "step_metrics", "evals")  # a row per step or more
_TABLES = (*_STEP_TABLES, "gpu_totals", "meta")
_ROW_TABLES = {  # what add_step inserts, in batches
    "steps": "INSERT OR REPLACE INTO steps VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
    "step_lines": "INSERT OR REPLACE INTO step_lines VALUES (?,?,?)",
    "step_gpus": "INSERT OR REPLACE INTO step_gpus VALUES (?,?,?,?,?,?,?,?,?,?)",
    "step_ranks": "INSERT OR REPLACE INTO step_ranks VALUES (?,?,?)",
    "step_metrics": "INSERT OR REPLACE INTO step_metrics VALUES (?,?,?)",
}
_BATCH_STEPS = 256
_ENCODER = msgspec.json.Encoder()


class IndexDamaged(sqlite3.DatabaseError):
    """The index's bytes disagree with themselves (a file damaged on disk): rebuild it from the journal."""


@dataclass(frozen=True)
class Coverage:
    """How much of the journal the index holds: its first bytes (which journal) and the offset reached."""

    journal_offset: int
    journal_head: str


class RunIndex:
    """One project's index. Open it with :meth:`open`; ``close`` it (a temp copy is deleted then)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, temporary: bool, note: str | None = None) -> None:
        self._conn = conn
        self._pending: dict[str, list[tuple]] = {table: [] for table in _ROW_TABLES}  # rows not inserted yet
        self.path = path
        self.temporary = temporary  # a private copy (read-only use, or a filesystem without locks)
        self.note = note  # why the index is not where it should be, for the user
        # Why a write failed (a full disk, an I/O error), or None. The index then takes no more writes and
        # stays as its last commit left it; Recorder.final_state loads it again with the journal.
        self.failed: str | None = None
        self._totals_later = False  # a replay of the whole journal: gpu_totals computed once, at its end
        conn.executescript(_SCHEMA)
        self._write(gpu_totals.kept)

    @property
    def conn(self) -> sqlite3.Connection:
        """The database, with every step added so far in it (rows are inserted in batches)."""
        self._flush()
        return self._conn

    def _flush(self) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            rows = self._pending["step_gpus"]
            keep_totals = (lambda: None) if self._totals_later else gpu_totals.inserting(conn, rows)
            for table, rows in self._pending.items():
                if rows:
                    conn.executemany(_ROW_TABLES[table], rows)
                    rows.clear()
            keep_totals()

        self._write(insert)

    def _write(self, work: Callable[[sqlite3.Connection], object]) -> None:
        """A write that may fail on a full disk: it must not stop the run (the journal has every record).
        On failure the transaction is rolled back to the last commit, which is consistent, and the index
        takes no more writes."""
        if self.failed is not None:
            return
        try:
            work(self._conn)
        except sqlite3.Error as exc:
            self.failed = f"{self.path.name} could not be written ({exc})"
            for rows in self._pending.values():
                rows.clear()
            with contextlib.suppress(sqlite3.Error):
                self._conn.rollback()

    @classmethod
    def open(cls, paths: ProjectPaths, *, writable: bool) -> RunIndex:
        """``writable``: the caller holds the project lock and the index is updated in place;
        otherwise the caller may change a private copy (nothing on disk is touched)."""
        if not writable:
            return cls._private_copy(paths.index)
        try:
            conn = _connect(paths.index)
            _check_writable(conn)
            return cls(conn, paths.index, temporary=False)
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc) or "I/O" in str(exc):  # a filesystem without working locks
                index = cls._private_copy(None)
                index.note = f"{paths.index}: SQLite cannot lock files there ({exc}); the index is kept in a temp folder and rebuilt from the journal"
                return index
            paths.index.unlink(missing_ok=True)  # damaged: a cache, rebuilt from the journal
            conn = _connect(paths.index)
            return cls(conn, paths.index, temporary=False)

    @classmethod
    def in_memory(cls) -> RunIndex:
        """An index of nothing on disk (tests, a history.json read without its journal)."""
        return cls(sqlite3.connect(":memory:"), Path(":memory:"), temporary=False)

    @classmethod
    def _private_copy(cls, source: Path | None) -> RunIndex:
        path = _copied(source)
        return cls(_connect(path), path, temporary=True)

    # ------------------------------------------------------------------ what it covers

    def coverage(self) -> Coverage | None:
        offset, head = self._meta("journal_offset"), self._meta("journal_head")
        if self._meta("format") != str(INDEX_FORMAT).encode() or offset is None or head is None:
            return None
        return Coverage(int(offset), head.decode())

    def state(self) -> bytes | None:
        """The run state saved with the last commit (``RunState`` encoded)."""
        return self._meta("state")

    def reset(self) -> None:
        """Forget everything, tables included (an older kaio's may differ): the journal is replayed from its start."""
        for pending in self._pending.values():
            pending.clear()
        for table in _TABLES:
            self._conn.execute(f"DROP TABLE IF EXISTS {table}")
        self._conn.executescript(_SCHEMA)
        self._write(gpu_totals.kept)

    def commit(self, state: bytes, coverage: Coverage) -> None:
        """Save the state with the steps added so far, as covering the journal up to ``coverage``."""
        rows = [
            ("format", str(INDEX_FORMAT).encode()),
            ("state", state),
            ("journal_offset", str(coverage.journal_offset).encode()),
            ("journal_head", coverage.journal_head.encode()),
        ]

        def save(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)
            conn.commit()

        self._flush()
        self._write(save)

    def _meta(self, key: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    # ------------------------------------------------------------------ writing

    def add_step(self, entry: StepEntry) -> None:
        if self.failed is not None:
            return
        pending = self._pending
        row = _steps_row(entry)  # sets entry.vram_peak_bytes: every rank has reported the step by now
        pending["steps"].append((*row, zlib.crc32(_ENCODER.encode(row))))
        line = _ENCODER.encode(entry)
        pending["step_lines"].append((entry.step, line, zlib.crc32(line)))
        if entry.gpus:
            pending["step_gpus"].extend(
                (
                    key,
                    entry.step,
                    entry.duration_s,  # the weight of the GPU's figures in the run's means
                    g.power_avg,
                    g.power_min,
                    g.power_max,
                    g.util_avg,
                    g.temp,
                    g.vram_used_max_bytes,
                    ",".join(g.throttle) if g.throttle else None,
                )
                for key, g in entry.gpus.items()
            )
        pending["step_ranks"].extend(
            (rank, entry.step, v) for rank, v in entry.peak_vram_bytes.items() if v is not None
        )
        pending["step_metrics"].extend((name, entry.step, _as_stored(v)) for name, v in entry.metrics.items())
        if len(pending["steps"]) >= _BATCH_STEPS:
            self._flush()

    def add_eval(self, entry: EvalEntry) -> None:
        row = (entry.step, entry.session, entry.loss, _ENCODER.encode(entry))
        self._write(lambda conn: conn.execute("INSERT INTO evals VALUES (?,?,?,?)", row))  # two at one step: two

    def mark_other_model(self, session: int, timestamps: set[str | None]) -> None:
        """The session's evaluations at ``timestamps`` were another model's (a teacher's, known only once the
        training began): listed, not the run's."""
        decoder = msgspec.json.Decoder(EvalEntry)
        rows = self.conn.execute("SELECT rowid, entry FROM evals WHERE session = ?", (session,)).fetchall()
        marked = []
        for rowid, blob in rows:
            entry = decoder.decode(blob)
            if entry.timestamp in timestamps and not entry.other_model:
                entry.other_model = True
                marked.append((_ENCODER.encode(entry), rowid))
        if marked:
            self._write(lambda conn: conn.executemany("UPDATE evals SET entry = ? WHERE rowid = ?", marked))

    def work_after(self, step: int) -> tuple[int, float]:
        """The steps after ``step`` and their time without the evaluations and saves after them."""
        self._flush()
        try:
            count, seconds = self.conn.execute(
                "SELECT COUNT(*), SUM(MAX(COALESCE(duration_s, step_time_s, 0) - COALESCE(eval_s, 0) - COALESCE(save_s, 0), 0)) "
                "FROM steps WHERE step > ?",
                (step,),
            ).fetchone()
        except sqlite3.Error:  # an index that stopped taking writes: the time is not known
            return 0, 0.0
        return count, seconds or 0.0

    def truncate_after(self, step: int) -> None:
        """A resumed session trains the steps after its checkpoint again: forget them."""

        def forget(conn: sqlite3.Connection) -> None:
            for table in _STEP_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE step > ?", (step,))
            gpu_totals.recompute(conn)

        self._flush()
        self._write(forget)

    @contextlib.contextmanager
    def totals_at_the_end(self) -> Iterator[None]:
        """Steps added by the thousand (the whole journal replayed): the GPU totals from the rows once, after."""
        self._totals_later = True
        try:
            yield
        finally:
            self._totals_later = False
            self._flush()
            self._write(gpu_totals.recompute)

    @contextlib.contextmanager
    def provisional(self) -> Iterator[None]:
        """Changes made inside are seen by queries inside, then undone (the steps still open, for a
        report written now)."""
        self._flush()  # the sealed steps stay
        if self.failed is not None:
            yield
            return
        self._conn.execute("SAVEPOINT provisional")
        try:
            yield
        finally:
            if self.failed is None:  # else the failed write rolled everything back already
                self._conn.execute("ROLLBACK TO provisional")
                self._conn.execute("RELEASE provisional")

    # ------------------------------------------------------------------ reading

    def training_began_after(self, step: int | None = None) -> int:
        """The step after which the training going on at ``step`` (the latest, without one) began: a later
        training of the script marks its first step (``training_start_s``); 0 for the script's first."""
        (began,) = self.conn.execute(
            "SELECT COALESCE(MAX(step) - 1, 0) FROM steps WHERE training_start_s IS NOT NULL AND step <= ?",
            (step if step is not None else 2**62,),
        ).fetchone()
        return began

    def seen_at(self, step: int) -> tuple[int | None, int | None]:
        """The examples and input tokens seen by the end of ``step``, as recorded (a resume counts on from there)."""
        row = self.conn.execute("SELECT samples_seen, tokens_seen FROM steps WHERE step = ?", (step,)).fetchone()
        if row is None:
            return None, None
        return tuple(int(value) if value is not None else None for value in row)  # type: ignore[return-value]

    def nonfinite_since(self) -> int | None:
        """The step from which every logged loss was NaN/inf to the end of the record (None: the last logged loss is
        finite): the weights from there on may be NaN, and so may a checkpoint saved there."""
        (since,) = self.conn.execute(
            "SELECT MIN(COALESCE(loss_nonfinite_from, step)) FROM steps WHERE loss_nonfinite IS NOT NULL "
            "AND step > (SELECT COALESCE(MAX(step), 0) FROM steps WHERE loss IS NOT NULL)"
        ).fetchone()
        return int(since) if since is not None else None

    def last_step(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(step), 0) FROM steps").fetchone()[0]

    def step_lines(self, after: int | None = None) -> Iterator[bytes]:
        """history.json's step entries, one JSON line each, in step order (those after ``after``)."""
        return (line for _, line in self.numbered_step_lines(after))

    def numbered_step_lines(self, after: int | None = None) -> Iterator[tuple[int, bytes]]:
        """``step_lines`` with each line's step. SQLite notices a broken page, not changed bytes inside one:
        each entry and each ``steps`` row carries the CRC-32 it was written with, and one that no longer
        matches raises ``IndexDamaged`` (the caller rebuilds the index from the journal instead of writing a
        damaged history)."""
        crc32, encode = zlib.crc32, _ENCODER.encode
        rows = self.conn.execute(
            "SELECT s.*, l.entry, l.crc FROM steps s LEFT JOIN step_lines l USING (step) WHERE step > ? ORDER BY step",
            (-(2**62) if after is None else after,),
        )
        for *row, row_crc, line, line_crc in rows:
            if line is None or crc32(line) != line_crc:
                raise IndexDamaged(f"the entry of step {row[0]} is damaged")
            if crc32(encode(row)) != row_crc:
                raise IndexDamaged(f"the row of step {row[0]} is damaged")
            yield row[0], bytes(line) + b"\n"

    def add_metric(self, step: int, name: str, value: float) -> None:
        """A number logged at a step with no entry: the script's own, before its first step ended (step 0)."""
        if self.failed is None:
            self._pending["step_metrics"].append((name, step, _as_stored(value)))

    def metrics_at(self, step: int) -> dict[str, float]:
        rows = self.conn.execute("SELECT name, value FROM step_metrics WHERE step = ? ORDER BY name", (step,))
        return dict(rows.fetchall())

    def evals(self) -> list[EvalEntry]:
        decoder = msgspec.json.Decoder(EvalEntry)
        return [
            decoder.decode(e) for (e,) in self.conn.execute("SELECT entry FROM evals ORDER BY step, session, rowid")
        ]

    def close(self) -> None:
        self.conn.close()
        if self.temporary and self.path.name == "index.sqlite":
            shutil.rmtree(self.path.parent, ignore_errors=True)


def smoother_at(index: RunIndex, step: int) -> LossSmoother:
    """The smoothed loss as it stood after ``step`` (a resume continues it from there), of the training going
    on there (a later training of the script smooths its own loss)."""
    since = index.training_began_after(step)
    count, low, high, lowest_loss = index.conn.execute(
        "SELECT COUNT(loss_smoothed), MIN(loss_smoothed), MAX(loss_smoothed), MIN(loss) FROM steps "
        "WHERE step > ? AND step <= ?",
        (since, step),
    ).fetchone()
    row = index.conn.execute(
        "SELECT loss_smoothed FROM steps WHERE step > ? AND step <= ? AND loss_smoothed IS NOT NULL "
        "ORDER BY step DESC LIMIT 1",
        (since, step),
    ).fetchone()
    return LossSmoother(
        smoothed=row[0] if row else None,
        count=count,
        low=low,
        high=high,
        positive=lowest_loss is None or lowest_loss > 0,
    )


def _steps_row(entry: StepEntry) -> tuple:
    """A step's row of the ``steps`` table, from its entry, with each value as SQLite gives it back
    (REAL columns as floats, NaN as NULL, booleans as integers): its CRC is checked when read. Sets the
    entry's ``vram_peak_bytes`` (the max over ranks), which its history.json line carries too."""
    ranks = [v for v in entry.peak_vram_bytes.values() if v is not None]
    entry.vram_peak_bytes = max(ranks) if ranks else None
    host = entry.host
    values = (
        entry.t_mono,
        entry.duration_s,
        entry.step_time_s,
        entry.eval_s,
        entry.save_s,
        entry.loss,
        entry.loss_nonfinite,
        entry.loss_nonfinite_from,
        entry.loss_smoothed,
        entry.loss_diverged,
        entry.learning_rate,
        entry.grad_norm,
        entry.grad_norm_nonfinite,
        entry.vram_peak_bytes,
        min(ranks) if ranks else None,
        max((u for g in entry.gpus.values() if (u := g.vram_used_max_bytes) is not None), default=None),
        entry.samples_seen,
        entry.tokens_seen,
        entry.energy_j,
        host.cpu_pct if host else None,
        host.ram_used_bytes if host else None,
        entry.tokens_per_s_per_device,
        entry.mfu,
        entry.training_start_s,
    )
    return (entry.step, entry.session, *(_as_stored(v) for v in values))


def _as_stored(value: object) -> object:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return float(value)  # every numeric column but step and session is REAL
    if isinstance(value, float) and value != value:
        return None
    return value


def head_digest(head: bytes) -> str:
    return hashlib.sha256(head).hexdigest()


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise sqlite3.DatabaseError(f"{path} is a symbolic link")
    conn = sqlite3.connect(path, timeout=10, isolation_level="DEFERRED")
    conn.execute("PRAGMA journal_mode=DELETE")  # not WAL: see the module docstring
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA cache_size=-16384")  # 16 MB: the supervisor's memory stays flat
    return conn


def _check_writable(conn: sqlite3.Connection) -> None:
    """A write lock taken and given back: a filesystem that refuses SQLite's locks says so here. (No
    integrity check: on a large index it would cost a second; damage shows as a DatabaseError when read,
    and ``kaio report`` then rebuilds the index from the journal.)"""
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB)")
    conn.commit()


def _copied(source: Path | None) -> Path:
    """A temp folder's ``index.sqlite``: a consistent copy of ``source`` (none there, or unreadable: no file)."""
    path = Path(tempfile.mkdtemp(prefix="kaio-index-")) / "index.sqlite"
    if source is not None and source.is_file():
        try:
            origin = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=10)
            target = sqlite3.connect(path)
            try:
                origin.backup(target)  # under SQLite's shared lock
            finally:
                origin.close()
                target.close()
            _check_readable(path)
        except sqlite3.DatabaseError:
            path.unlink(missing_ok=True)  # unreadable: the caller rebuilds from the journal
    return path


def _check_readable(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("index failed its integrity check")
    finally:
        conn.close()

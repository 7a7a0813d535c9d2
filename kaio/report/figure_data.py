"""What telemetry.png draws, taken from the index: every line decimated to at most ``BUCKETS`` buckets.

Each bucket keeps its lowest value (drawn at the bucket's first step) and its
highest (at its last step), so a one-step spike survives at any run length,
within a bucket's width of where it happened. With no more steps than buckets
every step is its own bucket: the lines are exact. One query per table
computes every line at once.
The result is small (bounded by the bucket count) and travels as JSON to the
process that draws it (``kaio.report.plot``).
"""

from __future__ import annotations

import sqlite3

import msgspec

from kaio.devices.base import device_order
from kaio.record import gpu_totals, rules
from kaio.record.index import RunIndex
from kaio.record.types import HistoryHeader, node_rank_of_gpu
from kaio.report.summary import time_buckets, time_spent

BUCKETS = 512  # about one per pixel of a panel (630 px wide): more cost drawing time, not detail
# Beyond this many GPUs (a job of several machines) the GPU panels draw one line per node: its GPUs' mean
# utilisation, their summed power, their peak temperature. 512 lines of 64 nodes are a blur, and slow to draw.
SEPARATE_GPU_LINES = 16


class Line(msgspec.Struct):
    x: list[float] = []
    y: list[float] = []


class Band(msgspec.Struct):
    x: list[float] = []
    low: list[float] = []
    high: list[float] = []


class GpuLines(msgspec.Struct, kw_only=True):
    key: str  # the GPU's key, or with ``FigureData.per_node`` the node's label
    util: Line
    power: Line
    power_band: Band
    temp: Line


class FigureData(msgspec.Struct, kw_only=True):
    title: str
    no_gpu: bool = False  # no GPU on the host: host panels instead
    loss: Line = msgspec.field(default_factory=Line)
    loss_smoothed: Line = msgspec.field(default_factory=Line)
    loss_marks: list[float] = []  # first NaN/inf loss step of each bucket that had one
    nonfinite_losses: int = 0
    eval_losses: dict[str, Line] = {}  # each eval dataset's ("": eval_loss), in the order first evaluated
    learning_rate: Line = msgspec.field(default_factory=Line)
    vram_true_peak: Line = msgspec.field(default_factory=Line)
    vram_ranks: Band = msgspec.field(default_factory=Band)
    ranks: int = 0
    vram_device_used: Line = msgspec.field(default_factory=Line)
    gpus: list[GpuLines] = []
    gpu_count: int = 0
    per_node: bool = False  # ``gpus`` holds one line per node (over ``SEPARATE_GPU_LINES`` GPUs)
    host_cpu: Line = msgspec.field(default_factory=Line)
    host_ram: Line = msgspec.field(default_factory=Line)
    host_ram_total_bytes: int | None = None
    session_starts: list[tuple[int, int]] = []  # (first step, session) of each session after the first
    training_starts: list[tuple[int, int]] = []  # (first step, training) of a script's later trainings
    time_spent: list[tuple[str, float]] = []  # where the wall time went (kaio.report.summary.time_buckets)
    goodput_pct: float | None = None


class _Grid:
    """The buckets of the step axis: bucket b holds the steps with ``(step - first) * BUCKETS / span == b``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        first, last = conn.execute("SELECT MIN(step), MAX(step) FROM steps").fetchone()
        self.first = first or 0
        self.span = (last - first + 1) if first is not None else 1
        self.bucket = f"((step - {self.first}) * {BUCKETS} / {self.span})"
        # Bucket b holds the steps from lo to hi: the smallest step whose bucket number is b, to the next one's minus 1.
        starts = [self.first + -(-b * self.span // BUCKETS) for b in range(BUCKETS + 1)]
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS kaio_buckets (id INTEGER PRIMARY KEY, lo INTEGER, hi INTEGER)")
        conn.execute("DELETE FROM kaio_buckets")
        conn.executemany(
            "INSERT INTO kaio_buckets VALUES (?, ?, ?)",
            [(b, starts[b], starts[b + 1] - 1) for b in range(BUCKETS) if starts[b + 1] > starts[b]],
        )

    def decimate(
        self,
        table: str,
        lines: tuple[str, ...],
        bands: tuple[tuple[str, str], ...] = (),
        only: tuple[str, str | int] | None = None,
    ) -> dict[str, Line | Band]:
        """In one pass over ``table`` (its rows whose column ``only[0]`` is ``only[1]`` when given: one GPU's,
        one node's): each line's lowest and highest value per bucket (at the bucket's first and last step),
        and each band's lowest low and highest high.

        The buckets are a small table joined by step range, so SQLite walks the steps in key order and
        groups them as it goes, instead of sorting every row by a computed bucket number.
        """
        aggregates = [f"MIN({c}), MAX({c})" for c in lines] + [f"MIN({lo}), MAX({hi})" for lo, hi in bands]
        where = f"AND s.{only[0]} = ?" if only is not None else ""
        rows = self.conn.execute(
            f"SELECT MIN(s.step), MAX(s.step), {', '.join(aggregates)} FROM kaio_buckets b "
            f"JOIN {table} s ON s.step BETWEEN b.lo AND b.hi {where} GROUP BY b.id ORDER BY b.id",
            () if only is None else (only[1],),
        )
        found: dict[str, Line | Band] = {**{c: Line() for c in lines}, **{lo: Band() for lo, _ in bands}}
        for first, last, *values in rows:
            for i, name in enumerate(lines):
                low, high = values[2 * i], values[2 * i + 1]
                line = found[name]
                if low is None or not isinstance(line, Line):
                    continue
                line.x.append(first)
                line.y.append(low)
                if last != first and high != low:
                    line.x.append(last)
                    line.y.append(high)
            for j, (name, _) in enumerate(bands):
                low, high = values[2 * (len(lines) + j)], values[2 * (len(lines) + j) + 1]
                band = found[name]
                if (low is not None or high is not None) and isinstance(band, Band):
                    band.x.append(first)
                    band.low.append(low if low is not None else high)
                    band.high.append(high if high is not None else low)
        return found


def figure_data(header: HistoryHeader, index: RunIndex) -> FigureData:
    conn = index.conn
    grid = _Grid(conn)
    last = conn.execute("SELECT COALESCE(MAX(step), 0) FROM steps").fetchone()[0]
    data = FigureData(title=f"{header.project}: {header.status.value}, {last:,} steps", no_gpu=not header.devices)
    spent = time_spent(header, index)
    data.time_spent = [(label, seconds) for _, label, seconds in time_buckets(spent)]
    data.goodput_pct = spent.goodput_pct
    names = ("loss", "loss_smoothed", "learning_rate", "vram_peak", "vram_used_max", "host_cpu", "host_ram")
    steps = grid.decimate("steps", names, bands=(("vram_peak_min", "vram_peak"),))
    (
        data.loss,
        data.loss_smoothed,
        data.learning_rate,
        data.vram_true_peak,
        data.vram_device_used,
        data.host_cpu,
        data.host_ram,
    ) = (_line(steps, name) for name in names)
    if rules.too_few_to_smooth(len(data.loss.x)):  # under BUCKETS the line holds every finite loss, each drawn
        data.loss_smoothed = Line()
    data.ranks = conn.execute("SELECT COUNT(DISTINCT rank) FROM step_ranks").fetchone()[0]
    if data.ranks > 1:
        data.vram_ranks = _band(steps, "vram_peak_min")
    marks = f"SELECT MIN(step) FROM steps WHERE loss_nonfinite IS NOT NULL GROUP BY {grid.bucket}"
    data.loss_marks = [m for (m,) in conn.execute(marks)]
    data.nonfinite_losses = conn.execute("SELECT COUNT(*) FROM steps WHERE loss_nonfinite IS NOT NULL").fetchone()[0]
    for evaluation in index.evals():
        if evaluation.loss is not None and not evaluation.other_model:
            line = data.eval_losses.setdefault(evaluation.eval_set or "", Line())
            line.x.append(evaluation.step)
            line.y.append(evaluation.loss)
    known = set(gpu_totals.read(index.conn))  # every GPU with a row, without a scan of their rows
    in_run = header.run_gpu_keys()
    keys = [k for k in in_run if k in known] + sorted(
        known - set(in_run) - {d.key for d in header.devices}, key=device_order
    )
    data.gpu_count = len(keys)
    if known - set(keys):  # GPUs sampled beside the run's (another job's): the steps' maximum counts them too
        data.vram_device_used = _run_vram_line(conn, grid, keys)
    nodes = sorted({node_rank_of_gpu(k) for k in keys})
    data.per_node = len(keys) > SEPARATE_GPU_LINES and len(nodes) > 1
    if data.per_node:
        _fold_gpus_by_node(conn, keys)
        lines = [(f"node {n}", grid.decimate("kaio_node_steps", GPU_LINES, GPU_BANDS, only=("node", n))) for n in nodes]
    else:
        lines = [(k, grid.decimate("step_gpus", GPU_LINES, GPU_BANDS, only=("gpu", k))) for k in keys]
    data.gpus = [
        GpuLines(
            key=label,
            util=_line(found, "util"),
            power=_line(found, "power_avg"),
            power_band=_band(found, "power_min"),
            temp=_line(found, "temp"),
        )
        for label, found in lines
    ]
    data.host_ram_total_bytes = header.host.ram_total_bytes if header.host else None
    data.session_starts = [
        (step, session)
        for session, step in conn.execute("SELECT session, MIN(step) FROM steps GROUP BY session ORDER BY MIN(step)")
    ][1:]
    data.training_starts = _training_starts(conn, header)
    return data


GPU_LINES = ("util", "power_avg", "temp")
GPU_BANDS = (("power_min", "power_max"),)


def _fold_gpus_by_node(conn: sqlite3.Connection, keys: list[str]) -> None:
    """``kaio_node_steps``: per node and step, its GPUs' mean utilisation, summed power (the range: the sum of
    each GPU's, a bound rather than one moment's) and peak temperature."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS kaio_gpu_nodes (gpu TEXT PRIMARY KEY, node INTEGER)")
    conn.execute("DELETE FROM kaio_gpu_nodes")
    conn.executemany("INSERT INTO kaio_gpu_nodes VALUES (?, ?)", [(k, node_rank_of_gpu(k)) for k in keys])
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS kaio_node_steps (node INTEGER, step INTEGER, util REAL, power_avg REAL, "
        "power_min REAL, power_max REAL, temp REAL, PRIMARY KEY (node, step)) WITHOUT ROWID"
    )
    conn.execute("DELETE FROM kaio_node_steps")
    conn.execute(
        "INSERT INTO kaio_node_steps SELECT n.node, g.step, AVG(g.util), SUM(g.power_avg), SUM(g.power_min), "
        "SUM(g.power_max), MAX(g.temp) FROM step_gpus g JOIN kaio_gpu_nodes n ON n.gpu = g.gpu GROUP BY n.node, g.step"
    )


def _run_vram_line(conn: sqlite3.Connection, grid: _Grid, keys: list[str]) -> Line:
    """The device VRAM used, each step's largest over ``keys`` (the run's GPUs) only."""
    conn.execute("DROP TABLE IF EXISTS temp.kaio_run_vram")
    marks = ",".join("?" * len(keys))
    conn.execute(
        "CREATE TEMP TABLE kaio_run_vram AS SELECT step, MAX(vram_used) AS vram_used_max FROM step_gpus "
        f"WHERE gpu IN ({marks}) GROUP BY step",
        keys,
    )
    return _line(grid.decimate("kaio_run_vram", ("vram_used_max",)), "vram_used_max")


def _line(found: dict[str, Line | Band], name: str) -> Line:
    line = found.get(name)
    return line if isinstance(line, Line) else Line()


def _band(found: dict[str, Line | Band], name: str) -> Band:
    band = found.get(name)
    return band if isinstance(band, Band) else Band()


def _training_starts(conn: sqlite3.Connection, header: HistoryHeader) -> list[tuple[int, int]]:
    """Where a script's later training took over from an earlier one that trained steps of the session: one mark
    per step (out-of-memory retries that trained nothing all begin where the one that trained begins)."""
    starts: dict[tuple[int, int], int] = {}
    for t in header.trainings:
        if t.training > 1:
            starts[(t.session, t.first_step)] = t.training  # the last of those beginning there: whose steps they are
    return [
        (step, training)
        for (session, step), training in starts.items()
        if conn.execute("SELECT 1 FROM steps WHERE session = ? AND step < ? LIMIT 1", (session, step)).fetchone()
    ]

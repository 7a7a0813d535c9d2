"""What telemetry.png draws, taken from the index: every line decimated to at most ``BUCKETS`` buckets.

Each bucket keeps its lowest and its highest point, with their steps, so a
one-step spike survives at any run length and points keep their order. With
no more steps than buckets every step is its own bucket: the lines are exact.
The result is small (bounded by the bucket count) and travels as JSON to the
process that draws it (``kaio.report.plot``).
"""

from __future__ import annotations

import sqlite3

import msgspec

from kaio.record.index import RunIndex
from kaio.record.types import HistoryHeader

BUCKETS = 1024


class Line(msgspec.Struct):
    x: list[float] = []
    y: list[float] = []


class Band(msgspec.Struct):
    x: list[float] = []
    low: list[float] = []
    high: list[float] = []


class GpuLines(msgspec.Struct, kw_only=True):
    key: str
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
    eval_loss: Line = msgspec.field(default_factory=Line)
    learning_rate: Line = msgspec.field(default_factory=Line)
    vram_true_peak: Line = msgspec.field(default_factory=Line)
    vram_ranks: Band = msgspec.field(default_factory=Band)
    ranks: int = 0
    vram_device_used: Line = msgspec.field(default_factory=Line)
    gpus: list[GpuLines] = []
    host_cpu: Line = msgspec.field(default_factory=Line)
    host_ram: Line = msgspec.field(default_factory=Line)
    host_ram_total_bytes: int | None = None
    session_starts: list[tuple[int, int]] = []  # (first step, session) of each session after the first


class _Grid:
    """Bucket of a step: ``(step - first) * BUCKETS / span``, as SQL."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        first, last = conn.execute("SELECT MIN(step), MAX(step) FROM steps").fetchone()
        self.first = first or 0
        self.span = (last - first + 1) if first is not None else 1
        self.bucket = f"((step - {self.first}) * {BUCKETS} / {self.span})"

    def lines(self, table: str, column: str, by_gpu: bool = False) -> dict[str, Line]:
        """The decimated line of ``column`` (per GPU when ``by_gpu``; else under the key "")."""
        group = "gpu, " if by_gpu else "'' AS gpu, "
        inner = f"SELECT {group}step, {self.bucket} AS b, {column} AS v FROM {table} WHERE {column} IS NOT NULL"
        points: dict[str, dict[float, float]] = {}
        for fn in ("MIN", "MAX"):
            for gpu, step, value in self.conn.execute(f"SELECT gpu, step, {fn}(v) FROM ({inner}) GROUP BY gpu, b"):
                points.setdefault(gpu, {})[step] = value
        return {gpu: Line(sorted(p), [p[x] for x in sorted(p)]) for gpu, p in points.items()}

    def line(self, table: str, column: str) -> Line:
        return self.lines(table, column).get("", Line())

    def bands(self, table: str, low: str, high: str, by_gpu: bool = False) -> dict[str, Band]:
        group = "gpu" if by_gpu else "''"
        rows = self.conn.execute(
            f"SELECT {group}, MIN(step), MIN({low}), MAX({high}) FROM {table} "
            f"WHERE {low} IS NOT NULL OR {high} IS NOT NULL GROUP BY {group}, {self.bucket} ORDER BY MIN(step)"
        )
        bands: dict[str, Band] = {}
        for gpu, step, lo, hi in rows:
            band = bands.setdefault(gpu, Band())
            band.x.append(step)
            band.low.append(lo if lo is not None else hi)
            band.high.append(hi if hi is not None else lo)
        return bands


def figure_data(header: HistoryHeader, index: RunIndex) -> FigureData:
    conn = index.conn
    grid = _Grid(conn)
    last = conn.execute("SELECT COALESCE(MAX(step), 0) FROM steps").fetchone()[0]
    data = FigureData(title=f"{header.project}: {header.status.value}, {last:,} steps", no_gpu=not header.devices)
    data.loss = grid.line("steps", "loss")
    data.loss_smoothed = grid.line("steps", "loss_smoothed")
    data.loss_marks = [
        m
        for (m,) in conn.execute(f"SELECT MIN(step) FROM steps WHERE loss_nonfinite IS NOT NULL GROUP BY {grid.bucket}")
    ]
    data.nonfinite_losses = conn.execute("SELECT COUNT(*) FROM steps WHERE loss_nonfinite IS NOT NULL").fetchone()[0]
    evals = conn.execute("SELECT step, eval_loss FROM evals WHERE eval_loss IS NOT NULL ORDER BY step").fetchall()
    data.eval_loss = Line([step for step, _ in evals], [loss for _, loss in evals])
    data.learning_rate = grid.line("steps", "learning_rate")
    data.vram_true_peak = grid.line("steps", "vram_peak")
    data.ranks = conn.execute("SELECT COUNT(DISTINCT rank) FROM step_ranks").fetchone()[0]
    if data.ranks > 1:
        data.vram_ranks = grid.bands("steps", "vram_peak_min", "vram_peak").get("", Band())
    data.vram_device_used = grid.line(
        "(SELECT step, MAX(vram_used) AS vram_used FROM step_gpus GROUP BY step)", "vram_used"
    )
    in_run = header.run_gpu_keys()
    known = [g for (g,) in conn.execute("SELECT DISTINCT gpu FROM step_gpus")]
    keys = [k for k in in_run if k in known] + sorted(set(known) - set(in_run) - {d.key for d in header.devices})
    util, power, temp = (grid.lines("step_gpus", c, by_gpu=True) for c in ("util", "power_avg", "temp"))
    bands = grid.bands("step_gpus", "power_min", "power_max", by_gpu=True)
    data.gpus = [
        GpuLines(
            key=k,
            util=util.get(k, Line()),
            power=power.get(k, Line()),
            power_band=bands.get(k, Band()),
            temp=temp.get(k, Line()),
        )
        for k in keys
    ]
    data.host_cpu = grid.line("steps", "host_cpu")
    data.host_ram = grid.line("steps", "host_ram")
    data.host_ram_total_bytes = header.host.ram_total_bytes if header.host else None
    data.session_starts = [
        (step, session)
        for session, step in conn.execute("SELECT session, MIN(step) FROM steps GROUP BY session ORDER BY MIN(step)")
    ][1:]
    return data

"""Each GPU's figures over the whole run, kept as its steps' rows are added (``gpu_totals``).

The report's per-GPU peaks, time-weighted means and throttling were a scan of
``step_gpus`` (one row per GPU and step: 8M rows at 1M steps of 8 GPUs) at
every refresh and at the end of the run; these sums make them a read of one row
per GPU. A time-weighted mean weighs each row by its step's ``duration_s``; a
row without one is weighed by what the reader chooses (the run's median step),
so its values are kept apart: the weighted sum and weight of the rows with a
duration, the plain sum and count of those without.

Rows replaced or deleted (a resume's steps trained again) are not subtracted:
the totals are computed again from the table then (``recompute``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass

METRICS = ("power_avg", "util", "temp")  # the time-weighted means

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS gpu_totals (gpu TEXT PRIMARY KEY, power_peak REAL, temp_peak REAL, vram_peak REAL, "
    + ", ".join(f"{m}_wsum REAL, {m}_w REAL, {m}_sum REAL, {m}_n INTEGER" for m in METRICS)
    + ", throttled INTEGER, throttle_first INTEGER, throttle_reasons TEXT)"
)

_AGGREGATES = ", ".join(
    [
        "MAX(COALESCE(power_max, power_avg))",
        "MAX(temp)",
        "MAX(vram_used)",
        *(
            f"TOTAL({m} * duration_s), TOTAL(CASE WHEN {m} IS NOT NULL THEN duration_s END), "
            f"TOTAL(CASE WHEN duration_s IS NULL THEN {m} END), COUNT(CASE WHEN duration_s IS NULL THEN {m} END)"
            for m in METRICS
        ),
        "COUNT(throttle)",
        "MIN(CASE WHEN throttle IS NOT NULL THEN step END)",
        "GROUP_CONCAT(DISTINCT throttle)",
    ]
)
_SUMMED = [f"{m}_{part}" for m in METRICS for part in ("wsum", "w", "sum", "n")] + ["throttled"]
_MERGE = ", ".join(
    [
        *(
            f"{c} = CASE WHEN {c} IS NULL OR excluded.{c} > {c} THEN excluded.{c} ELSE {c} END"
            for c in ("power_peak", "temp_peak", "vram_peak")
        ),
        *(f"{c} = {c} + excluded.{c}" for c in _SUMMED),
        "throttle_first = COALESCE(throttle_first, excluded.throttle_first)",
        # The batch's reasons added unless already there (``read`` splits and keeps each reason once).
        "throttle_reasons = CASE WHEN throttle_reasons IS NULL THEN excluded.throttle_reasons "
        "WHEN excluded.throttle_reasons IS NULL "
        "OR instr(',' || throttle_reasons || ',', ',' || excluded.throttle_reasons || ',') THEN throttle_reasons "
        "ELSE throttle_reasons || ',' || excluded.throttle_reasons END",
    ]
)
_ADD = f"INSERT INTO gpu_totals SELECT gpu, {_AGGREGATES} FROM step_gpus WHERE gpu = ? AND step BETWEEN ? AND ? GROUP BY gpu"


def kept(conn: sqlite3.Connection) -> None:
    """The totals kept from now on: an index of a kaio before them gets them from its rows, once."""
    if conn.execute("SELECT 1 FROM meta WHERE key = 'gpu_totals'").fetchone() is None:
        recompute(conn)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('gpu_totals', X'31')")


def inserting(conn: sqlite3.Connection, gpu_rows: list[tuple]) -> Callable[[], None]:
    """Call before ``gpu_rows`` (``step_gpus`` rows) are inserted; returns what keeps the totals after."""
    gpus, steps = {row[0] for row in gpu_rows}, [row[1] for row in gpu_rows]
    if not steps:
        return lambda: None
    first, last = min(steps), max(steps)
    replaced = any(  # a step's rows again (none today: sealed once, and trained again after a truncation)
        conn.execute(
            "SELECT 1 FROM step_gpus WHERE gpu = ? AND step BETWEEN ? AND ? LIMIT 1", (gpu, first, last)
        ).fetchone()
        for gpu in gpus
    )
    return (lambda: recompute(conn)) if replaced else (lambda: add_steps(conn, gpus, first, last))


def add_steps(conn: sqlite3.Connection, gpus: Iterable[str], first: int, last: int) -> None:
    """Add the rows of steps ``first``..``last`` just inserted for ``gpus`` (none of them there before)."""
    for gpu in gpus:
        conn.execute(f"{_ADD} ON CONFLICT(gpu) DO UPDATE SET {_MERGE}", (gpu, first, last))


def recompute(conn: sqlite3.Connection) -> None:
    """The totals from the whole table (rows were replaced or deleted, or the index predates the totals)."""
    conn.execute("DELETE FROM gpu_totals")
    conn.execute(f"INSERT INTO gpu_totals SELECT gpu, {_AGGREGATES} FROM step_gpus GROUP BY gpu")


@dataclass(frozen=True)
class GpuTotals:
    """One GPU's figures over the run. ``sums``: each metric's weighted sum and weight over the rows with a step
    duration, and its plain sum and count over those without, which the reader weighs (``weighted``)."""

    power_peak: float | None
    temp_peak: float | None
    vram_peak: float | None
    sums: dict[str, tuple[float, float, float, int]]
    throttled_steps: int
    throttle_first_step: int | None
    throttle_reasons: list[str]

    def weighted(self, metric: str, weight: float) -> tuple[float, float]:
        """The metric's time-weighted sum and its weight, a row without a duration counting ``weight`` seconds."""
        wsum, w, plain, n = self.sums[metric]
        return wsum + weight * plain, w + weight * n

    def mean(self, metric: str, weight: float) -> float | None:
        total, weights = self.weighted(metric, weight)
        return total / weights if weights else None


def read(conn: sqlite3.Connection) -> dict[str, GpuTotals]:
    """Every GPU's totals, by key."""
    found = {}
    for gpu, power, temp, vram, *rest in conn.execute("SELECT * FROM gpu_totals ORDER BY gpu"):
        sums, (throttled, first, reasons) = rest[: 4 * len(METRICS)], rest[4 * len(METRICS) :]
        found[gpu] = GpuTotals(
            power_peak=power,
            temp_peak=temp,
            vram_peak=vram,
            sums={metric: tuple(sums[4 * i : 4 * i + 4]) for i, metric in enumerate(METRICS)},
            throttled_steps=throttled,
            throttle_first_step=first,
            throttle_reasons=list(dict.fromkeys(r for r in (reasons or "").split(",") if r)),
        )
    return found

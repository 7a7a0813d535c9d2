"""``telemetry.png``: six panels over the optimizer step.

matplotlib and numpy are imported inside the functions (``kaio --help`` must
not pay for them). The figure is built on an explicit Agg canvas, never through
pyplot, so rendering touches no global backend state.

Every line is reduced to about ``MAX_POINTS_PER_LINE`` points with a min/max
per bucket: spikes survive, a gap (all-NaN bucket) stays a gap, and a
million-step history renders in seconds.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Sequence

from kaio.fsutil import atomic_write_bytes
from kaio.report.summary import ema, gpu_columns, nonfinite_loss_steps, smoothing_alpha

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANEL_TITLES = ("Training loss", "Learning rate", "VRAM", "GPU utilisation", "Power draw", "Temperature")
MAX_POINTS_PER_LINE = 2000
MAX_SEPARATE_BANDS = 2  # beyond this, per-GPU min/max bands overlap into a blur
NO_GPU_TEXT = "no GPU data (CPU-only run)"
NOT_REPORTED_TEXT = "{} not reported by the GPU"


def downsample_minmax(x: Sequence[float], y: Sequence[float], max_points: int = MAX_POINTS_PER_LINE):
    """At most ``max_points`` of (x, y), keeping each bucket's min and max in order.

    A bucket with no finite value keeps one NaN point so the line shows a gap.
    """
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(y) <= max_points:
        return x, y
    grid, size = _bucket_grid(y, max(1, max_points // 2))
    missing = np.isnan(grid)
    lows = np.argmin(np.where(missing, np.inf, grid), axis=1)  # all-NaN bucket: its first index
    highs = np.argmax(np.where(missing, -np.inf, grid), axis=1)
    offsets = np.arange(len(grid)) * size
    pairs = np.stack([np.minimum(lows, highs), np.maximum(lows, highs)], axis=1) + offsets[:, None]
    keep = np.ones_like(pairs, dtype=bool)
    keep[:, 1] = pairs[:, 1] != pairs[:, 0]
    index = pairs[keep]
    return x[index], y[index]


def bucket_envelope(
    x: Sequence[float], low: Sequence[float], high: Sequence[float], max_points: int = MAX_POINTS_PER_LINE
):
    """A min/max band reduced to ``max_points`` buckets: each bucket's lowest low and highest high."""
    import numpy as np

    x, low, high = (np.asarray(a, dtype=float) for a in (x, low, high))
    if len(x) <= max_points:
        return x, low, high
    low_grid, size = _bucket_grid(low, max_points)
    high_grid, _ = _bucket_grid(high, max_points)
    with np.errstate(invalid="ignore"):
        lows = np.where(np.isnan(low_grid), np.inf, low_grid).min(axis=1)
        highs = np.where(np.isnan(high_grid), -np.inf, high_grid).max(axis=1)
    lows[np.isinf(lows)] = np.nan
    highs[np.isinf(highs)] = np.nan
    return x[np.arange(len(low_grid)) * size], lows, highs


def _bucket_grid(values: "np.ndarray", buckets: int) -> tuple["np.ndarray", int]:
    """``values`` as rows of equal-size buckets, the last padded with NaN."""
    import numpy as np

    size = -(-len(values) // buckets)
    rows = -(-len(values) // size)
    padded = np.full(rows * size, np.nan)
    padded[: len(values)] = values
    return padded.reshape(rows, size), size


def build_figure(history: dict) -> "Figure":
    """The six-panel figure (titles in ``PANEL_TITLES`` order); a panel without data says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    steps = history.get("steps") or []
    x = _column(steps, "step")
    gpus = _gpu_arrays(history)
    no_gpu_text = NO_GPU_TEXT if not history.get("devices") and not gpus else None

    fig = Figure(figsize=(14, 11), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 2, sharex=True).ravel()
    for ax, title in zip(axes, PANEL_TITLES):
        ax.set_title(title, fontsize=12, fontweight="bold")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))  # 1,000,000 rather than 1e6
    for ax in axes[-2:]:
        ax.set_xlabel("step")

    _loss_panel(axes[0], x, steps)
    _learning_rate_panel(axes[1], x, steps)
    _vram_panel(axes[2], x, steps, gpus, no_gpu_text)
    _gpu_lines_panel(axes[3], x, gpus, "util_avg", "utilisation (%)", "utilisation", no_gpu_text, ylim=(-2, 110))
    _power_panel(axes[4], x, gpus, no_gpu_text)
    _gpu_lines_panel(axes[5], x, gpus, "temp", "peak, junction where reported (°C)", "temperature", no_gpu_text)
    _mark_sessions(axes, x, _column(steps, "session"))

    status = history.get("status") or "UNKNOWN"
    last_step = int(x[-1]) if len(x) else 0
    fig.suptitle(f"{history.get('project', 'unnamed')}: {status}, {last_step:,} steps", fontsize=14)
    return fig


def render_telemetry_png(history: dict, path: str | os.PathLike) -> None:
    """Render ``build_figure(history)`` and write it to ``path`` atomically."""
    buffer = io.BytesIO()
    build_figure(history).savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


# --- data -------------------------------------------------------------------


def _column(steps: Sequence[dict], name: str) -> "np.ndarray":
    import numpy as np

    return np.array([s.get(name) for s in steps], dtype=float)  # None -> NaN


def _gpu_arrays(history: dict) -> dict[str, dict[str, "np.ndarray"]]:
    """``summary.gpu_columns`` as float arrays (``None`` -> NaN)."""
    import numpy as np

    return {
        label: {field: np.array(values, dtype=float) for field, values in columns.items()}
        for label, columns in gpu_columns(history).items()
    }


def _true_peak_by_step(steps: Sequence[dict]) -> tuple["np.ndarray", "np.ndarray", int]:
    """Per step, the highest and lowest rank's allocator peak (bytes), and the number of ranks seen."""
    import numpy as np

    ranks: set[str] = set()
    highs, lows = [], []
    for step in steps:
        values = [v for v in (step.get("peak_vram_bytes") or {}).values() if v is not None]
        if not values and step.get("vram_gb") is not None:
            values = [step["vram_gb"] * 1e9]  # seed-style history: only the max over ranks
        ranks.update((step.get("peak_vram_bytes") or {}).keys())
        highs.append(max(values) if values else None)
        lows.append(min(values) if values else None)
    return np.array(highs, dtype=float), np.array(lows, dtype=float), len(ranks)


# --- panels -----------------------------------------------------------------


def _say_no_data(ax: "Axes", text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.4")
    ax.set_yticks([])


def _line(ax: "Axes", x, y, **style) -> None:
    ax.plot(*downsample_minmax(x, y), **style)


def _from_zero_with_headroom(ax: "Axes") -> None:
    """A y axis from zero (absolute quantities) with room above the data for the legend."""
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)


def _legend(ax: "Axes", entries: int) -> None:
    if entries > 1:
        ax.legend(fontsize=7, ncol=min(entries, 4), loc="best", framealpha=0.8)


def _loss_panel(ax: "Axes", x, steps: Sequence[dict]) -> None:
    import numpy as np

    loss = _column(steps, "loss")
    logged = np.isfinite(loss)
    nan_steps, inf_steps = nonfinite_loss_steps(steps)
    if not logged.any():
        _say_no_data(ax, "no finite loss logged")
    else:
        lx, ly = x[logged], loss[logged]
        smoothed = np.array(ema(ly.tolist(), smoothing_alpha(len(ly))), dtype=float)
        _line(ax, lx, ly, color="0.6", linewidth=0.8, label="raw")
        _line(ax, lx, smoothed, color="tab:orange", linewidth=2, label="smoothed (EMA)")
        ax.set_ylabel("loss")
    marks = np.unique(np.array(nan_steps + inf_steps, dtype=float))
    if len(marks):
        shown = marks[np.linspace(0, len(marks) - 1, min(len(marks), MAX_POINTS_PER_LINE)).astype(int)]
        ax.plot(shown, np.full(len(shown), 0.03), "x", color="tab:red", transform=ax.get_xaxis_transform(),
                label=f"NaN/inf loss ({len(marks):,} step{'s' if len(marks) > 1 else ''})")
    _legend(ax, len(ax.lines))


def _learning_rate_panel(ax: "Axes", x, steps: Sequence[dict]) -> None:
    import numpy as np

    lr = _column(steps, "learning_rate")
    logged = np.isfinite(lr)
    if not logged.any():
        _say_no_data(ax, "no learning rate logged")
        return
    _line(ax, x[logged], lr[logged], color="tab:blue", linewidth=1.5)
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _vram_panel(ax: "Axes", x, steps: Sequence[dict], gpus: dict, no_gpu_text: str | None) -> None:
    import numpy as np

    high, low, ranks = _true_peak_by_step(steps)
    used = [c["vram_used_max_bytes"] for c in gpus.values()]
    device = np.fmax.reduce(used) if used else np.full(len(x), np.nan)  # fmax: NaN only where all are NaN
    if np.isnan(high).all() and np.isnan(device).all():
        _say_no_data(ax, no_gpu_text or NOT_REPORTED_TEXT.format("VRAM"))
        return
    if not np.isnan(high).all():
        label = f"true peak, allocator (max of {ranks} ranks)" if ranks > 1 else "true peak, allocator"
        _line(ax, x, high / 1e9, color="tab:blue", linewidth=1.5, label=label)
        if ranks > 1:
            bx, blow, bhigh = bucket_envelope(x, low / 1e9, high / 1e9)
            ax.fill_between(bx, blow, bhigh, color="tab:blue", alpha=0.15, linewidth=0, label="spread across ranks")
    if not np.isnan(device).all():
        label = f"device used, driver (max of {len(used)} GPUs)" if len(used) > 1 else "device used, driver"
        _line(ax, x, device / 1e9, color="tab:red", linewidth=1.2, linestyle="--", label=label)
    ax.set_ylabel("GB")
    _from_zero_with_headroom(ax)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.8)


def _gpu_lines_panel(
    ax: "Axes", x, gpus: dict, column: str, ylabel: str, what: str, no_gpu_text: str | None, ylim=None
) -> None:
    import numpy as np

    drawn = 0
    for i, (label, columns) in enumerate(gpus.items()):
        if not np.isnan(columns[column]).all():
            _line(ax, x, columns[column], color=f"C{i % 10}", linewidth=1.2, label=label)
            drawn += 1
    if not drawn:
        _say_no_data(ax, no_gpu_text or NOT_REPORTED_TEXT.format(what))
        return
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    _legend(ax, drawn)


def _power_panel(ax: "Axes", x, gpus: dict, no_gpu_text: str | None) -> None:
    """One average line per GPU; min/max shaded per GPU, or as one band across GPUs when more would blur."""
    import numpy as np

    measured = {label: c for label, c in gpus.items() if not np.isnan(c["power_avg"]).all()}
    if not measured:
        _say_no_data(ax, no_gpu_text or NOT_REPORTED_TEXT.format("power"))
        return
    bands = []
    for i, (label, columns) in enumerate(gpus.items()):  # colour by position: a GPU keeps its colour in every panel
        if label not in measured:
            continue
        average = columns["power_avg"]
        low = np.where(np.isnan(columns["power_min"]), average, columns["power_min"])
        high = np.where(np.isnan(columns["power_max"]), average, columns["power_max"])
        bands.append((f"C{i % 10}", low, high))
        _line(ax, x, average, color=f"C{i % 10}", linewidth=1.2, label=label)
    if len(bands) > MAX_SEPARATE_BANDS:
        low = np.fmin.reduce([b[1] for b in bands])
        high = np.fmax.reduce([b[2] for b in bands])
        bands = [("0.5", low, high)]
    for color, low, high in bands:
        ax.fill_between(*bucket_envelope(x, low, high), color=color, alpha=0.2, linewidth=0)
    ax.set_ylabel("W (average, min-max shaded)")
    _from_zero_with_headroom(ax)
    _legend(ax, len(measured))


def _mark_sessions(axes: Sequence["Axes"], x, sessions) -> None:
    """A dashed line where a new session's first step begins, labelled with its number."""
    import numpy as np

    sessions = np.nan_to_num(sessions, nan=-1.0)  # unknown session: one group, not a boundary per step
    for index in np.flatnonzero(sessions[1:] != sessions[:-1]) + 1:
        boundary = x[index] - 0.5
        label = "session ?" if sessions[index] < 0 else f"session {int(sessions[index])}"
        for ax in axes:
            ax.axvline(boundary, color="0.3", linestyle="--", linewidth=0.9)
            ax.text(boundary, 0.97, f" {label}", transform=ax.get_xaxis_transform(), ha="left", va="top",
                    fontsize=7, color="0.3")

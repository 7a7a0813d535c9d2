"""``telemetry.png``: six panels over the optimizer step, drawn from a ``FigureData``.

matplotlib and numpy are imported inside the functions (``kaio --help`` must
not pay for them). The figure is built on an explicit Agg canvas, never through
pyplot, so rendering touches no global backend state. The lines come
decimated (kaio/report/figure_data.py), so a million-step run draws as fast as
a short one.

On a host without a GPU the VRAM and utilisation panels show what was
measured instead, the host's RAM and CPU, and the title says there was no GPU.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from kaio.fsutil import atomic_write_bytes
from kaio.report.figure_data import Band, FigureData, Line

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANEL_TITLES = ("Training loss", "Learning rate", "VRAM", "GPU utilisation", "Power draw", "Temperature")
HOST_PANEL_TITLES = ("Host RAM (no GPU)", "Host CPU utilisation (no GPU)")
MAX_SEPARATE_BANDS = 2  # beyond this, per-GPU min/max bands overlap into a blur
MAX_LEGEND_ENTRIES = 16  # beyond this a legend covers the panel (and colours repeat): the lines are counted instead
NO_GPU_TEXT = "no GPU on this host (CPU-only run)"
NOT_REPORTED_TEXT = "{} not reported by the GPU"
GIB = 1 << 30


def build_figure(data: FigureData) -> Figure:
    """The six-panel figure; a panel without data says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    fig = Figure(figsize=(14, 12.5))
    FigureCanvasAgg(fig)
    # Fixed margins, wide enough for any panel's labels, rather than a layout engine: constrained layout
    # measured every label of every panel at each drawing (a quarter of the drawing process's CPU).
    outer = fig.add_gridspec(2, 1, height_ratios=(11, 1.5), left=0.055, right=0.99, top=0.945, bottom=0.05, hspace=0.2)
    panels: Any = outer[0].subgridspec(3, 2, hspace=0.2, wspace=0.14).subplots(sharex=True)
    axes = panels.ravel()
    _time_bar(fig.add_subplot(outer[1]), data)
    titles = (*PANEL_TITLES[:2], *HOST_PANEL_TITLES, *PANEL_TITLES[4:]) if data.no_gpu else PANEL_TITLES
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=12, fontweight="bold")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))  # 1,000,000 rather than 1e6
    for ax in axes[-2:]:
        ax.set_xlabel("step")

    _loss_panel(axes[0], data)
    _line_panel(axes[1], data.learning_rate, "learning rate", "no learning rate logged", sci=True)
    if data.no_gpu:
        _host_ram_panel(axes[2], data)
        _line_panel(axes[3], data.host_cpu, "CPU, whole host (%)", "host CPU not measured", ylim=(-2, 105))
        for ax in axes[4:]:
            _say_no_data(ax, NO_GPU_TEXT)
    else:
        _vram_panel(axes[2], data)
        util, temp = ("utilisation, node's mean (%)", "node's peak (°C)") if data.per_node else GPU_AXIS_LABELS
        _gpu_lines_panel(axes[3], data, "util", util, "utilisation", ylim=(-2, 110))
        _power_panel(axes[4], data)
        _gpu_lines_panel(axes[5], data, "temp", temp, "temperature")
    _mark_starts(
        axes,
        [(step, f"session {n}") for step, n in data.session_starts]
        + [(step, f"training {n}") for step, n in data.training_starts],
    )
    fig.suptitle(data.title + (" · CPU-only run, no GPU" if data.no_gpu else ""), fontsize=14)
    return fig


def render_telemetry_png(data: FigureData, path: str | os.PathLike) -> None:
    """Render ``build_figure(data)`` and write it to ``path`` atomically."""
    buffer = io.BytesIO()
    build_figure(data).savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def render_from_stdin(png_path: str | os.PathLike) -> None:
    """Draw the ``FigureData`` that comes on stdin (``kaio.run.finalize.FigureProcess``); nothing on stdin:
    nothing to draw. matplotlib is imported first, while the supervisor is still gathering the data."""
    import sys

    os.nice(10)  # a background drawing: on busy cores it waits rather than slow the training
    import matplotlib.backends.backend_agg  # noqa: F401 - imported ahead of the data

    job = sys.stdin.buffer.read()
    if job:
        render_telemetry_png(msgspec.json.decode(job, type=FigureData), png_path)


# --- panels -----------------------------------------------------------------


def _say_no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.4")
    ax.set_yticks([])


def _xy(line: Line, scale: float = 1.0):
    import numpy as np

    return np.asarray(line.x, dtype=float), np.asarray(line.y, dtype=float) / scale


def _broken_at(xy, starts: list[int]):
    """A line with a gap where each of a script's later trainings began: its loss does not continue the last's."""
    import numpy as np

    x, y = xy
    if not starts:
        return x, y
    cut = np.searchsorted(x, [s - 0.5 for s in starts])
    return np.insert(x, cut, np.asarray(starts, dtype=float) - 0.5), np.insert(y, cut, np.nan)


def _band(band: Band, scale: float = 1.0):
    import numpy as np

    return (
        np.asarray(band.x, dtype=float),
        np.asarray(band.low, dtype=float) / scale,
        np.asarray(band.high, dtype=float) / scale,
    )


def _from_zero_with_headroom(ax: Axes) -> None:
    """A y axis from zero (absolute quantities) with room above the data for the legend."""
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)


GPU_AXIS_LABELS = ("utilisation (%)", "peak, junction where reported (°C)")


def _legend(ax: Axes, entries: int, what: str = "lines", **kwargs) -> None:
    if entries > MAX_LEGEND_ENTRIES:
        text = f"{entries} {what}, one line each"
        ax.text(0.99, 0.02, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.3")
    elif entries > 1:
        ax.legend(fontsize=7, ncol=min(entries, 4), framealpha=0.8, **{"loc": "best", **kwargs})


SPARSE_POINTS = 30  # a line of this many points or fewer shows them (one point alone is no line at all)


def _points(line: Line) -> dict:
    return {"marker": "o", "markersize": 3} if len(line.x) <= SPARSE_POINTS else {}


def _loss_panel(ax: Axes, data: FigureData) -> None:
    import numpy as np

    if not data.loss.x:
        _say_no_data(ax, "no finite loss logged" if data.nonfinite_losses else "no loss logged")
    else:
        starts = [step for step, _ in data.training_starts]
        ax.plot(*_broken_at(_xy(data.loss), starts), color="0.6", linewidth=0.8, label="raw", **_points(data.loss))
        if data.loss_smoothed.x:
            smoothed = _broken_at(_xy(data.loss_smoothed), starts)
            ax.plot(*smoothed, color="tab:orange", linewidth=2, label="smoothed (EMA)", **_points(data.loss))
        ax.set_ylabel("loss")
    markers = "os^vDP*X"
    for i, (name, line) in enumerate(data.eval_losses.items()):
        label = f"evaluation loss ({name})" if name else "evaluation loss"
        ax.plot(*_xy(line), markers[i % len(markers)], color="tab:green", markersize=4, label=label)
    if data.loss_marks:  # one per bucket that had any: bounded however many there were
        count = data.nonfinite_losses
        ax.plot(
            data.loss_marks,
            np.full(len(data.loss_marks), 0.03),
            "x",
            color="tab:red",
            transform=ax.get_xaxis_transform(),
            label=f"NaN/inf loss ({count:,} step{'s' if count > 1 else ''})",
        )
    _legend(ax, len(ax.lines))


def _line_panel(ax: Axes, line: Line, ylabel: str, missing: str, *, sci: bool = False, ylim=None) -> None:
    if not line.x:
        _say_no_data(ax, missing)
        return
    ax.plot(*_xy(line), color="tab:blue", linewidth=1.5, **_points(line))
    ax.set_ylabel(ylabel)
    if sci:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if ylim:
        ax.set_ylim(*ylim)


def _host_ram_panel(ax: Axes, data: FigureData) -> None:
    if not data.host_ram.x:
        _say_no_data(ax, "host RAM not measured")
        return
    ax.plot(*_xy(data.host_ram, GIB), color="tab:purple", linewidth=1.5, label="RAM used, whole host")
    if data.host_ram_total_bytes:
        ax.axhline(data.host_ram_total_bytes / GIB, color="0.5", linestyle=":", linewidth=1, label="RAM total")
    ax.set_ylabel("GiB")
    _from_zero_with_headroom(ax)
    _legend(ax, len(ax.lines))  # where it covers least: the used line often runs along the bottom


def _vram_panel(ax: Axes, data: FigureData) -> None:
    if not data.vram_true_peak.x and not data.vram_device_used.x:
        _say_no_data(ax, NOT_REPORTED_TEXT.format("VRAM"))
        return
    if data.vram_true_peak.x:
        ranks = data.ranks
        label = f"true peak, allocator (max of {ranks} ranks)" if ranks > 1 else "true peak, allocator"
        ax.plot(*_xy(data.vram_true_peak, GIB), color="tab:blue", linewidth=1.5, label=label)
        if ranks > 1 and data.vram_ranks.x:
            ax.fill_between(
                *_band(data.vram_ranks, GIB), color="tab:blue", alpha=0.15, linewidth=0, label="spread across ranks"
            )
    if data.vram_device_used.x:
        count = data.gpu_count
        label = f"device used, driver (max of {count} GPUs)" if count > 1 else "device used, driver"
        ax.plot(*_xy(data.vram_device_used, GIB), color="tab:red", linewidth=1.2, linestyle="--", label=label)
    ax.set_ylabel("GiB")
    _from_zero_with_headroom(ax)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.8)


def _gpu_lines_panel(ax: Axes, data: FigureData, column: str, ylabel: str, what: str, ylim=None) -> None:
    drawn = 0
    for i, gpu in enumerate(data.gpus):  # colour by position: a GPU keeps its colour in every panel
        line: Line = getattr(gpu, column)
        if line.x:
            ax.plot(*_xy(line), color=f"C{i % 10}", linewidth=1.2, label=gpu.key)
            drawn += 1
    if not drawn:
        _say_no_data(ax, NOT_REPORTED_TEXT.format(what))
        return
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    _legend(ax, drawn, "nodes" if data.per_node else "GPUs")


def _power_panel(ax: Axes, data: FigureData) -> None:
    """One average line per GPU; min/max shaded per GPU, or as one band across GPUs when more would blur."""
    drawn = [(f"C{i % 10}", gpu) for i, gpu in enumerate(data.gpus) if gpu.power.x]
    if not drawn:
        _say_no_data(ax, NOT_REPORTED_TEXT.format("power"))
        return
    for color, gpu in drawn:
        ax.plot(*_xy(gpu.power), color=color, linewidth=1.2, label=gpu.key)
    bands = [(color, gpu.power_band) for color, gpu in drawn if gpu.power_band.x]
    if len(bands) > MAX_SEPARATE_BANDS:  # one band over every GPU: the lowest low and the highest high
        merged: dict[float, tuple[float, float]] = {}
        for _, band in bands:
            for x, lo, hi in zip(band.x, band.low, band.high):
                old = merged.get(x, (lo, hi))
                merged[x] = (min(old[0], lo), max(old[1], hi))
        xs = sorted(merged)
        bands = [("0.5", Band(xs, [merged[x][0] for x in xs], [merged[x][1] for x in xs]))]
    for color, band in bands:
        ax.fill_between(*_band(band), color=color, alpha=0.2, linewidth=0)
    ax.set_ylabel("W per node (its GPUs' sum, range shaded)" if data.per_node else "W (average, min-max shaded)")
    _from_zero_with_headroom(ax)
    _legend(ax, len(drawn), "nodes" if data.per_node else "GPUs")


TIME_COLOURS = {
    "start-up": "#9e9e9e",
    "optimizer steps": "#2e7d32",
    "stalls": "#c62828",
    "trained again": "#ef6c00",
    "evaluation": "#1565c0",
    "saves": "#6a1b9a",
    "closing": "#bdbdbd",
    "other": "#e0e0e0",
}


def _time_bar(ax: Axes, data: FigureData) -> None:
    """Where the wall time went, as one bar: the optimizer steps' share is the goodput."""
    ax.set_yticks([])
    ax.set_xticks([])
    ax.set_xlim(0, 100)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    total = sum(seconds for _, seconds in data.time_spent)
    if not total:
        ax.set_title("Where the time went: no session has ended or trained a step yet", fontsize=11)
        return
    title = "Where the time went"
    if data.goodput_pct is not None:
        title += f": goodput {data.goodput_pct:.1f} % (optimizer steps)"
    ax.set_title(title, fontsize=12, fontweight="bold")
    left = 0.0
    for label, seconds in data.time_spent:
        share = 100.0 * seconds / total
        said = f"{share:.0f}%" if share >= 0.5 or share == 0 else "<1%"  # a visible sliver is not "0%"
        ax.barh(0, share, left=left, color=TIME_COLOURS.get(label, "#e0e0e0"), label=f"{label} {said}")
        left += share
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(data.time_spent), fontsize=10, frameon=False)


def _mark_starts(axes: Sequence[Axes], starts: Sequence[tuple[int, str]]) -> None:
    """A dashed line where a new session's (or a script's later training's) first step begins, labelled. Labels
    that begin close together (resumes a few steps apart) are stepped down rather than printed over each other."""
    if not starts:
        return
    low, high = axes[0].get_xlim()
    span = max(high - low, 1e-9)
    level_ends: list[float] = []  # per level of labels (top first), the x where its last label ends
    for step, label in sorted(starts):
        boundary = step - 0.5
        level = next((i for i, end in enumerate(level_ends) if boundary >= end), len(level_ends))
        if level == _LABEL_LEVELS:  # every level taken: the top one, over the nearest label
            level = 0
        if level == len(level_ends):
            level_ends.append(0.0)
        level_ends[level] = boundary + _LABEL_WIDTH * span
        y = 0.97 - 0.08 * level
        for ax in axes:
            ax.axvline(boundary, color="0.3", linestyle="--", linewidth=0.9)
            ax.text(
                boundary,
                y,
                f" {label}",
                transform=ax.get_xaxis_transform(),
                ha="left",
                va="top",
                fontsize=7,
                color="0.3",
            )


_LABEL_WIDTH = 0.09  # a label's width, as a share of a panel's width
_LABEL_LEVELS = 4


if __name__ == "__main__":  # kaio.run.finalize.FigureProcess
    import sys

    render_from_stdin(sys.argv[1])

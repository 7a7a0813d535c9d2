"""``telemetry.png``: six panels over the optimizer step.

matplotlib and numpy are imported inside the functions (``kaio --help`` must
not pay for them). The figure is built on an explicit Agg canvas, never through
pyplot, so rendering touches no global backend state.

Every line comes from a ``RunTally``'s min/max decimation (kaio/report/tally.py):
at most ~1024 buckets, each drawn as its lowest and highest point in step
order, so spikes survive, a bucket with steps but no GPU reading is a gap, and
a million-step run renders as fast as a short one. No per-step array is built.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Sequence

from kaio.fsutil import atomic_write_bytes
from kaio.report.tally import RunTally, tally_steps

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANEL_TITLES = ("Training loss", "Learning rate", "VRAM", "GPU utilisation", "Power draw", "Temperature")
MAX_SEPARATE_BANDS = 2  # beyond this, per-GPU min/max bands overlap into a blur
NO_GPU_TEXT = "no GPU data (CPU-only run)"
NOT_REPORTED_TEXT = "{} not reported by the GPU"


def build_figure(history: dict, tally: RunTally | None = None) -> "Figure":
    """The six-panel figure (titles in ``PANEL_TITLES`` order); a panel without data says so.

    The steps come from ``tally`` when given (``history`` then needs only its
    header: project, status, devices), else from ``history["steps"]``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    if tally is None:
        tally = tally_steps(history.get("steps") or [])
    device_keys = [d["key"] for d in history.get("devices") or [] if d.get("in_run", True) and d.get("key")]
    gpus = tally.gpu_labels(device_keys)
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

    _loss_panel(axes[0], tally)
    _learning_rate_panel(axes[1], tally)
    _vram_panel(axes[2], tally, gpus, no_gpu_text)
    _gpu_lines_panel(axes[3], tally, gpus, "util", "utilisation (%)", "utilisation", no_gpu_text, ylim=(-2, 110))
    _power_panel(axes[4], tally, gpus, no_gpu_text)
    _gpu_lines_panel(axes[5], tally, gpus, "temp", "peak, junction where reported (°C)", "temperature", no_gpu_text)
    _mark_sessions(axes, tally.session_starts)

    status = history.get("status") or "UNKNOWN"
    fig.suptitle(f"{history.get('project', 'unnamed')}: {status}, {tally.last_step:,} steps", fontsize=14)
    return fig


def render_telemetry_png(history: dict, path: str | os.PathLike, tally: RunTally | None = None) -> None:
    """Render ``build_figure(history, tally)`` and write it to ``path`` atomically."""
    buffer = io.BytesIO()
    build_figure(history, tally).savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def render_job(job_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Render the figure a supervisor described in ``job_path`` (``{"history": header, "tally":
    RunTally.to_dict()}``), then delete the job file. See ``kaio.run.finalize.FigureProcess``."""
    import json

    os.nice(10)  # a background drawing: on busy cores it waits rather than slow the training
    job = json.loads(open(job_path, "rb").read())
    os.unlink(job_path)
    render_telemetry_png(job["history"], png_path, RunTally.from_dict(job["tally"]))



# --- panels -----------------------------------------------------------------


def _say_no_data(ax: "Axes", text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11, color="0.4")
    ax.set_yticks([])


def _arrays(*columns):
    import numpy as np

    return [np.asarray(c, dtype=float) for c in columns]


def _has_values(y) -> bool:
    import numpy as np

    return bool(len(y)) and not np.isnan(y).all()


def _from_zero_with_headroom(ax: "Axes") -> None:
    """A y axis from zero (absolute quantities) with room above the data for the legend."""
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)


def _legend(ax: "Axes", entries: int) -> None:
    if entries > 1:
        ax.legend(fontsize=7, ncol=min(entries, 4), loc="best", framealpha=0.8)


def _loss_panel(ax: "Axes", tally: RunTally) -> None:
    import numpy as np

    if not tally.loss_count:
        _say_no_data(ax, "no finite loss logged")
    else:
        ax.plot(*_arrays(*tally.line("loss")), color="0.6", linewidth=0.8, label="raw")
        ax.plot(*_arrays(*tally.line("loss_smoothed")), color="tab:orange", linewidth=2, label="smoothed (EMA)")
        ax.set_ylabel("loss")
    marks = tally.loss_marks()  # one per bucket that had any: bounded however many there were
    if marks:
        count = tally.nonfinite_loss_count
        ax.plot(marks, np.full(len(marks), 0.03), "x", color="tab:red", transform=ax.get_xaxis_transform(),
                label=f"NaN/inf loss ({count:,} step{'s' if count > 1 else ''})")
    _legend(ax, len(ax.lines))


def _learning_rate_panel(ax: "Axes", tally: RunTally) -> None:
    x, lr = _arrays(*tally.line("learning_rate"))
    if not len(lr):
        _say_no_data(ax, "no learning rate logged")
        return
    ax.plot(x, lr, color="tab:blue", linewidth=1.5)
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))


def _vram_panel(ax: "Axes", tally: RunTally, gpus: Sequence[str], no_gpu_text: str | None) -> None:
    hx, high = _arrays(*tally.line("vram_true_peak"))
    dx, device = _arrays(*tally.line("vram_device_used"))
    if not _has_values(high) and not _has_values(device):
        _say_no_data(ax, no_gpu_text or NOT_REPORTED_TEXT.format("VRAM"))
        return
    ranks = len(tally.ranks_seen)
    if _has_values(high):
        label = f"true peak, allocator (max of {ranks} ranks)" if ranks > 1 else "true peak, allocator"
        ax.plot(hx, high / 1e9, color="tab:blue", linewidth=1.5, label=label)
        if ranks > 1:
            bx, blow, bhigh = _arrays(*tally.band("vram_ranks"))
            ax.fill_between(bx, blow / 1e9, bhigh / 1e9, color="tab:blue", alpha=0.15, linewidth=0,
                            label="spread across ranks")
    if _has_values(device):
        label = f"device used, driver (max of {len(gpus)} GPUs)" if len(gpus) > 1 else "device used, driver"
        ax.plot(dx, device / 1e9, color="tab:red", linewidth=1.2, linestyle="--", label=label)
    ax.set_ylabel("GB")
    _from_zero_with_headroom(ax)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.8)


def _gpu_lines_panel(
    ax: "Axes", tally: RunTally, gpus: Sequence[str], column: str, ylabel: str, what: str,
    no_gpu_text: str | None, ylim=None,
) -> None:
    drawn = 0
    for i, label in enumerate(gpus):  # colour by position: a GPU keeps its colour in every panel
        x, y = _arrays(*tally.line(column, gpu=label))
        if _has_values(y):
            ax.plot(x, y, color=f"C{i % 10}", linewidth=1.2, label=label)
            drawn += 1
    if not drawn:
        _say_no_data(ax, no_gpu_text or NOT_REPORTED_TEXT.format(what))
        return
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    _legend(ax, drawn)


def _power_panel(ax: "Axes", tally: RunTally, gpus: Sequence[str], no_gpu_text: str | None) -> None:
    """One average line per GPU; min/max shaded per GPU, or as one band across GPUs when more would blur."""
    import numpy as np

    bands = []
    for i, label in enumerate(gpus):
        x, average = _arrays(*tally.line("power", gpu=label))
        if not _has_values(average):
            continue
        ax.plot(x, average, color=f"C{i % 10}", linewidth=1.2, label=label)
        bands.append((f"C{i % 10}", *_arrays(*tally.band("power", gpu=label))))
    if not bands:
        _say_no_data(ax, no_gpu_text or NOT_REPORTED_TEXT.format("power"))
        return
    measured = len(bands)
    if measured > MAX_SEPARATE_BANDS:  # every GPU's band is on the same grid: combine bucket by bucket
        bx = bands[0][1]
        low = np.fmin.reduce([b[2] for b in bands])  # fmin/fmax: NaN only where every GPU has none
        high = np.fmax.reduce([b[3] for b in bands])
        bands = [("0.5", bx, low, high)]
    for color, bx, low, high in bands:
        ax.fill_between(bx, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set_ylabel("W (average, min-max shaded)")
    _from_zero_with_headroom(ax)
    _legend(ax, measured)


def _mark_sessions(axes: Sequence["Axes"], session_starts: Sequence[tuple[int, object]]) -> None:
    """A dashed line where a new session's first step begins, labelled with its number."""
    for step, session in session_starts:
        boundary = step - 0.5
        known = isinstance(session, (int, float)) and not isinstance(session, bool) and session >= 0
        label = f"session {int(session)}" if known else "session ?"
        for ax in axes:
            ax.axvline(boundary, color="0.3", linestyle="--", linewidth=0.9)
            ax.text(boundary, 0.97, f" {label}", transform=ax.get_xaxis_transform(), ha="left", va="top",
                    fontsize=7, color="0.3")


if __name__ == "__main__":  # kaio.run.finalize.FigureProcess
    import sys

    render_job(sys.argv[1], sys.argv[2])

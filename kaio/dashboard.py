"""The Rich view of a run: pure ``Snapshot -> renderable`` functions.

Nothing here mutates state, starts threads or does I/O. The supervisor drives
:func:`render` with ``rich.live.Live(get_renderable=...)``; non-terminal
output (CI, nohup, pipes, ``--plain``) uses :func:`plain_line` and
:func:`final_line`.

Layout is decided at render time from the console's current width and height
(the object :func:`render` returns measures itself on every refresh), so the
view survives terminal resizes. Every sequence taken from the snapshot is
sliced to a fixed bound before any work, so rendering cost does not grow with
the length of the run.

Colour comes only from Rich styles: a console created with ``NO_COLOR`` (or
``color_system=None``) prints plain text, and no ANSI escape is hard-coded.
Every piece of information that a colour carries is also written in words
(status text, "⚠", "ok", rank "–" for GPUs outside the run).
"""

from __future__ import annotations

import math
import re
import signal
from collections.abc import Iterable, Sequence

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from kaio import units
from kaio.run.snapshot import ANSI_RE, GpuRow, HostRow, Snapshot, as_shown

__all__ = [
    "SPARK_CHARS",
    "MAX_LOG_LINES",
    "MAX_WARNINGS",
    "render",
    "plain_line",
    "final_line",
    "status_text",
    "sparkline",
    "format_duration",
    "format_bytes",
    "format_vram",
    "format_loss",
    "format_lr",
    "format_rate",
    "format_exit_code",
]

SPARK_CHARS = "▁▂▃▄▅▆▇█"
ASCII_SPARK_CHARS = "_.-=+*#@"  # the same eight levels where the terminal's encoding has no block characters
DASH = "–"

#: Hard bounds, applied before any work, whatever the snapshot holds.
MAX_LOG_LINES = 200  # log lines shown at most (fewer when the terminal is shorter)
MAX_LOG_LINE_CHARS = 2000  # characters of one log line looked at
MAX_WARNINGS = 5  # newest warnings shown; older ones are counted
MAX_SPARK_VALUES = 4096  # newest losses the sparkline looks at
MAX_GPU_ROWS = 64

_STATUS_STYLE = {
    "STARTING": "bold cyan",
    "RUNNING": "bold green",
    "STOPPING": "bold yellow",
    "COMPLETED": "bold green",
    "FAILED": "bold red",
    "INTERRUPTED": "bold yellow",
}
_STATUS_MARK = {
    "STARTING": "◌",
    "RUNNING": "●",
    "STOPPING": "◐",
    "COMPLETED": "✔",
    "FAILED": "✖",
    "INTERRUPTED": "■",
}
_FINISHED = frozenset({"COMPLETED", "FAILED", "INTERRUPTED"})
_NO_ETA = _FINISHED | {"STOPPING"}  # a stop asked for: the training ends at the next step, not at max_steps

TEMP_WARN_C = 80.0
TEMP_HOT_C = 90.0

# Any control character except tab (expanded) and newline (split on); escape sequences go first (ANSI_RE).
_CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ERROR_LINE_RE = re.compile(r"Traceback|Error\b|\bERROR\b|Exception\b|CUDA out of memory")
_WARN_LINE_RE = re.compile(r"\bWARN(?:ING)?\b|Warning\b")
_ERROR_WARNING_RE = re.compile(r"error|fail|\bnan\b|out of memory|\boom\b|crash|killed", re.IGNORECASE)


# --------------------------------------------------------------------------
# number formatting
# --------------------------------------------------------------------------


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def format_duration(seconds: float | None) -> str:
    """``26 -> "0:26"``, ``3723 -> "1:02:03"``; ``None``/NaN -> ``"–"``."""
    if not _finite(seconds):
        return DASH
    total = int(round(max(0.0, float(seconds))))  # type: ignore[arg-type]
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_bytes(n: int | float | None) -> str:
    """Binary units, as everywhere in kaio (``12.1 GiB``); ``None`` -> ``"–"``."""
    return units.gib(n) if _finite(n) else DASH  # type: ignore[arg-type]


def format_vram(used: int | None, total: int | None, sep: str = " ") -> str:
    """``"12.1/80.0 GiB"``; a missing side is ``"–"``; both missing -> ``"–"``."""
    if not _finite(used) and not _finite(total):
        return DASH
    return units.gib_pair(used if _finite(used) else None, total if _finite(total) else None, DASH, sep)


def format_loss(x: float | None) -> str:
    """Four significant digits (``4.812``); ``nan``/``inf`` spelled out; ``None`` -> ``"–"``."""
    if x is None:
        return DASH
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.4g}"


def format_lr(x: float | None) -> str:
    """Learning rate in scientific notation: ``3.0e-04``; ``0`` -> ``"0"``."""
    if not _finite(x):
        return DASH if x is None else format_loss(x)
    if x == 0:
        return "0"
    return f"{x:.1e}"


def format_rate(x: float | None) -> str:
    """Throughput: ``0.0123``, ``1.85``, ``14.8``, ``1234``."""
    if not _finite(x):
        return DASH
    a = abs(x)  # type: ignore[arg-type]
    if a == 0:
        return "0"
    if a < 1:
        return f"{x:.3g}"
    if a < 10:
        return f"{x:.2f}"
    if a < 100:
        return f"{x:.1f}"
    return f"{x:.0f}"


def _fmt_grad(x: float | None) -> str:
    if x is None or not _finite(x):
        return format_loss(x)
    return f"{x:.3g}"


def _fmt_pct(x: float | None) -> str:
    return f"{x:.0f}%" if _finite(x) else DASH


def _fmt_power(x: float | None, sep: str = " ") -> str:
    return f"{x:.0f}{sep}W" if _finite(x) else DASH


def _fmt_temp(x: float | None) -> str:
    return f"{x:.0f}°C" if _finite(x) else DASH


def _fmt_energy(joules: float | None) -> str:
    if not _finite(joules):
        return DASH
    wh = joules / 3600.0  # type: ignore[operator]
    if wh >= 1000:
        return f"{wh / 1000:.2f} kWh"
    if wh >= 100:
        return f"{wh:.0f} Wh"
    return f"{wh:.1f} Wh"


def format_exit_code(code: int | None) -> str:
    """``1 -> "exit code 1"``, ``-9 -> "exit code -9 (SIGKILL)"`` (Popen's signal convention)."""
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"exit code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exit code {code}"


# --------------------------------------------------------------------------
# sparkline
# --------------------------------------------------------------------------


def sparkline(values: Sequence[float | None], width: int, chars: str = SPARK_CHARS) -> str:
    """A sparkline of ``values`` in ``chars`` (``▁▂▃▄▅▆▇█``), oldest first, at most ``width`` chars.

    More values than ``width`` are averaged in ``width`` equal buckets (so the
    whole window shows, smoothed); fewer are drawn one character each. ``None``,
    NaN and infinities are gaps (a space). A constant series is drawn at mid
    height. Empty input or ``width <= 0`` gives ``""``.
    """
    if width <= 0 or not values:
        return ""
    vals = list(values[-MAX_SPARK_VALUES:])
    n = len(vals)
    if n > width:
        buckets: list[float | None] = []
        for i in range(width):
            lo, hi = (i * n) // width, ((i + 1) * n) // width
            chunk = [v for v in vals[lo:hi] if _finite(v)]
            buckets.append(sum(chunk) / len(chunk) if chunk else None)  # type: ignore[arg-type]
        vals = buckets
    finite = [v for v in vals if _finite(v)]
    if not finite:
        return " " * len(vals)
    lo_v, hi_v = min(finite), max(finite)  # type: ignore[type-var]
    span = hi_v - lo_v  # type: ignore[operator]
    top = len(chars) - 1
    out = []
    for v in vals:
        if not _finite(v):
            out.append(" ")
        elif span <= 0 or not math.isfinite(span):
            out.append(chars[top // 2])
        else:
            idx = int(round((v - lo_v) / span * top))  # type: ignore[operator]
            out.append(chars[min(top, max(0, idx))])
    return "".join(out)


# --------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------


def status_text(snapshot: Snapshot) -> str:
    """The words for the status: ``"stopping… (Ctrl-C again to kill)"``, ``"FAILED (exit code 1)"``…"""
    st = snapshot.status
    if st == "STOPPING":
        asked = snapshot.stopping_because
        because = f"{asked}; " if asked and asked != "Ctrl-C" else ""  # "again" says it for a Ctrl-C
        return f"stopping… ({because}Ctrl-C again to kill)"
    if st == "STARTING":
        if snapshot.rendezvous:  # torch waits for every node there, silently, up to 15 minutes
            return f"STARTING (launching, meeting the job's {snapshot.rendezvous}, loading the model and data)"
        if snapshot.evaluated_in_session:  # a script that evaluates before training, or only evaluates
            return "STARTING (no training step yet; the script has evaluated)"
        return "STARTING (launching, loading the model and data)"
    if st == "FAILED":
        return f"FAILED ({format_exit_code(snapshot.exit_code)})" if snapshot.exit_code is not None else "FAILED"
    return st


def _progress_pct(snapshot: Snapshot) -> int | None:
    if not snapshot.max_steps or snapshot.max_steps <= 0:
        return None
    return max(0, min(100, (snapshot.step * 100) // snapshot.max_steps))


def _steps_text(snapshot: Snapshot) -> str:
    if snapshot.max_steps:
        return f"{snapshot.step}/{snapshot.max_steps}"
    return str(snapshot.step)


# --------------------------------------------------------------------------
# plain output
# --------------------------------------------------------------------------


def _clean(s: str) -> str:
    """Text safe for a plain line: no escape sequences, no control characters."""
    return _CTRL_RE.sub("", ANSI_RE.sub("", s))


def _gpu_label(row: GpuRow) -> str:
    idx = row.key.rsplit(":", 1)[-1]
    return f"gpu{idx}" if idx.isdigit() else row.key


def _run_gpus(snapshot: Snapshot) -> tuple[GpuRow, ...]:
    """The run's GPUs: none where it sees none (CUDA_VISIBLE_DEVICES="", a MIG slice kaio cannot trace), whose
    line then shows the host's, not another job's GPUs as the run's."""
    return tuple(g for g in snapshot.gpus[:MAX_GPU_ROWS] if g.in_run)


def _plain_devices(snapshot: Snapshot) -> str:
    gpus = _run_gpus(snapshot)
    if not gpus:
        h = snapshot.host
        if h is None:
            return ""
        parts = ["host"]
        if _finite(h.cpu_pct):
            parts.append(f"cpu {h.cpu_pct:.0f}%")
        if _finite(h.ram_used_bytes) or _finite(h.ram_total_bytes):
            parts.append("ram " + format_vram(h.ram_used_bytes, h.ram_total_bytes, sep=""))
        return " ".join(parts) if len(parts) > 1 else ""
    throttled = [g for g in gpus if g.throttle]
    if len(gpus) <= 2:
        chunks = []
        for g in gpus:
            parts = [_gpu_label(g)]
            if _finite(g.power_w):
                parts.append(_fmt_power(g.power_w, sep=""))
            if _finite(g.temp_c):
                parts.append(f"{g.temp_c:.0f}C")
            if _finite(g.vram_used_bytes) or _finite(g.vram_total_bytes):
                parts.append(format_vram(g.vram_used_bytes, g.vram_total_bytes, sep=""))
            if g.throttle:
                parts.append(f"THROTTLED({','.join(g.throttle)})")
            chunks.append(" ".join(parts))
        return " ".join(chunks)
    powers = [g.power_w for g in gpus if _finite(g.power_w)]
    temps = [g.temp_c for g in gpus if _finite(g.temp_c)]
    used = [g.vram_used_bytes for g in gpus if _finite(g.vram_used_bytes)]
    totals = [g.vram_total_bytes for g in gpus if _finite(g.vram_total_bytes)]
    parts = [f"{len(gpus)} gpus"]
    if powers:
        parts.append(f"{sum(powers):.0f}W")  # type: ignore[arg-type]
    if temps:
        parts.append(f"max {max(temps):.0f}C")  # type: ignore[type-var]
    if used:
        parts.append("vram max " + format_vram(max(used), max(totals) if totals else None, sep=""))  # type: ignore[type-var]
    if throttled:
        parts.append("THROTTLED " + ",".join(f"{_gpu_label(g)}({','.join(g.throttle or ())})" for g in throttled))
    return " ".join(parts)


def plain_line(snapshot: Snapshot) -> str:
    """One concise line for non-terminal output, without escape codes.

    ``[kaio] tiny-default RUNNING step 12/60 (20%) loss 4.812 | 1.85 step/s | ETA 0:26 | gpu0 250W 61C 12.1/80.0GB``
    """
    st = snapshot.status
    # Plain lines go to logs too, where the stop was a scheduler's SIGTERM: both signals kill the second time.
    because = f"{snapshot.stopping_because}; " if snapshot.stopping_because else ""
    status = f"STOPPING ({because}a second Ctrl-C or SIGTERM kills it)" if st == "STOPPING" else status_text(snapshot)
    head = f"[kaio] {snapshot.project} {status} step {_steps_text(snapshot)}"
    pct = _progress_pct(snapshot)
    if pct is not None:
        head += f" ({pct}%)"
    if snapshot.loss is not None:
        head += f" loss {format_loss(snapshot.loss)}"
    if snapshot.eval_loss is not None:
        head += f" eval loss {format_loss(snapshot.eval_loss)}" + (
            f" ({snapshot.eval_set})" if snapshot.eval_set else ""
        )
    parts = [head]
    if _finite(snapshot.steps_per_s):  # the last steps': at the end, not the run's pace (the report has that)
        parts.append(f"{format_rate(snapshot.steps_per_s)} step/s" + (" (last steps)" if st in _FINISHED else ""))
    if st not in _NO_ETA and _finite(snapshot.eta_s):
        parts.append(f"ETA {format_duration(snapshot.eta_s)}")
    dev = _plain_devices(snapshot)
    if dev:
        parts.append(dev)
    if snapshot.nodes:
        parts.append(_plain_nodes(snapshot))
    n_warn = snapshot.warning_count
    if n_warn:
        parts.append(f"{n_warn} warning{'s' if n_warn != 1 else ''}")
    return _clean(" | ".join(parts))


def final_line(snapshot: Snapshot) -> str:
    """The last line of a run: status, steps, duration, exit code.

    ``[kaio] tiny-default COMPLETED: 60/60 steps in 1:02, exit code 0, final loss 4.123``
    """
    st = snapshot.status
    if st == "FAILED" and snapshot.training_completed:
        st += " after its training completed"  # the script's code after train() failed, not the training
    steps = f"{snapshot.step}/{snapshot.max_steps}" if snapshot.max_steps else str(snapshot.step)
    line = f"[kaio] {snapshot.project} {st}: {steps} steps in {format_duration(snapshot.elapsed_s)}"
    if snapshot.ended_early_by:
        line += f" (ended early by {snapshot.ended_early_by})"
    if snapshot.session > 1:
        line += f" (session {snapshot.session})"
    line += f", {format_exit_code(snapshot.exit_code)}"
    if snapshot.loss is not None:
        line += f", final loss {format_loss(snapshot.loss)}"
    # No count of warnings: the record's line after it counts them all, the whole history's included.
    return _clean(line)


# --------------------------------------------------------------------------
# the live view
# --------------------------------------------------------------------------


def render(snapshot: Snapshot, *, log_lines: int | None = None, rows_after: int = 0) -> RenderableType:
    """The live dashboard for ``snapshot``.

    The result lays itself out when Rich renders it, from the console's width
    and height at that moment: the log panel takes the rows left over (at most
    :data:`MAX_LOG_LINES`), less ``rows_after`` kept free for lines printed
    below the frame (the last frame's: its header must stay on screen).
    ``log_lines`` forces a number of log lines instead.
    """
    return _Dashboard(snapshot, log_lines, rows_after)


class _Dashboard:
    """Renderable that measures the terminal on every refresh. Holds only the snapshot."""

    __slots__ = ("snapshot", "log_lines", "rows_after")

    def __init__(self, snapshot: Snapshot, log_lines: int | None, rows_after: int = 0) -> None:
        self.snapshot = snapshot
        self.log_lines = log_lines
        self.rows_after = rows_after

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(20, options.max_width), options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        snap = self.snapshot
        width = max(1, options.max_width)
        top = Group(*_top_parts(snap, console, options, width))
        top_lines = console.render_lines(top, options.reset_height(), pad=False)
        height = options.height or options.max_height
        over = len(top_lines) + 1 + self.rows_after - height  # 1 spare row so Live never scrolls
        if over > 0 and len(snap.gpus) > 1:  # many GPUs in a short terminal: fewer rows, and the rest counted
            rows = max(1, min(len(snap.gpus), MAX_GPU_ROWS) - over - 1)
            top = Group(*_top_parts(snap, console, options, width, gpu_rows=rows))
            top_lines = console.render_lines(top, options.reset_height(), pad=False)
        for line in top_lines:
            yield from _shown(line, options)
            yield Segment.line()

        if self.log_lines is not None:
            n_log = max(0, min(MAX_LOG_LINES, self.log_lines))
        else:
            height = options.height or options.max_height
            # 2 rows of panel border, 1 spare row so Live never scrolls.
            n_log = max(0, min(MAX_LOG_LINES, height - len(top_lines) - 3 - self.rows_after))
        if n_log > 0:
            yield from _shown(console.render(_log_panel(snap, n_log), options), options)


# A terminal without Unicode (LANG=C): each glyph of kaio's own as one ASCII character of the same width, where
# the encoder would print '?' (a progress bar of 72 of them). Rich draws the boxes in ASCII itself.
_ASCII = str.maketrans("━─·–—…⚠◌●◐✔✖■✓•°→", "=-|--.!o**vx#v* >")


def as_ascii(text: str) -> str:
    return text.translate(_ASCII)


def _shown(segments: Iterable[Segment], options: ConsoleOptions) -> Iterable[Segment]:
    if not options.ascii_only:
        yield from segments
        return
    for segment in segments:
        text, style, control = segment
        yield segment if control else Segment(as_ascii(text), style)


def _top_parts(
    snap: Snapshot, console: Console, options: ConsoleOptions, width: int, gpu_rows: int = MAX_GPU_ROWS
) -> list[RenderableType]:
    parts: list[RenderableType] = [_header(snap), _progress(snap, width)]
    if snap.status in _FINISHED and snap.report_path:  # the last frame: where the record is, on screen
        parts.append(
            Text.assemble(
                ("report ", "dim"), (_clean(snap.report_path), "bold"), ("  (and telemetry.png, history.json)", "dim")
            )
        )
    parts.append(_training_panel(snap, width, ascii_only=options.ascii_only))
    parts.append(_devices_panel(snap, console, options, width, gpu_rows))
    if snap.nodes:
        parts.append(_nodes_panel(snap))
    if snap.warnings:
        parts.append(_warnings_panel(snap))
    return parts


def _header(snap: Snapshot) -> Text:
    style = _STATUS_STYLE.get(snap.status, "bold")
    t = Text(no_wrap=False)
    t.append("kaio ", style="dim")
    t.append(snap.project, style="bold")
    t.append("  ")
    t.append(f"{_STATUS_MARK.get(snap.status, '•')} {status_text(snap)}", style=style)
    t.append("   ")
    bits = [("session ", str(snap.session)), ("elapsed ", format_duration(snap.elapsed_s))]
    if snap.status not in _NO_ETA:
        bits.append(("ETA ", format_duration(snap.eta_s)))
    for i, (label, value) in enumerate(bits):
        if i:
            t.append(" · ", style="dim")
        t.append(label, style="dim")
        t.append(value, style="bold")
    n_warn = snap.warning_count
    if n_warn:  # in the header too: on a small terminal the warnings panel may be cut off below
        t.append(" · ", style="dim")
        t.append(f"⚠ {n_warn} warning{'s' if n_warn != 1 else ''}", style="bold yellow")
    return t


def _progress(snap: Snapshot, width: int) -> Text:
    pct = _progress_pct(snap)
    left = f"step {_steps_text(snap)}" + (f" ({pct}%)" if pct is not None else "")
    right = f"epoch {snap.epoch:.2f}" if _finite(snap.epoch) else ""
    t = Text(left, style="bold")
    bar_width = width - len(left) - (len(right) + 1 if right else 0) - 1
    if pct is not None and bar_width >= 5:
        frac = max(0.0, min(1.0, snap.step / snap.max_steps))  # type: ignore[operator]
        done = int(round(frac * bar_width))
        finished = snap.status == "COMPLETED" or done >= bar_width
        t.append(" ")
        # Two glyphs, so the bar reads without colour (NO_COLOR) too.
        t.append("━" * done, style="green" if finished else "magenta")
        t.append("─" * (bar_width - done), style="dim")
    if right:
        t.append(" " + right if pct is not None and bar_width >= 5 else "  " + right, style="dim")
    t.no_wrap = False
    return t


def _peak_by_row(snap: Snapshot) -> tuple[dict[str, int | None], dict[int, int | None]]:
    """Map ``peak_vram_by_rank`` onto GPU rows: returns (row key -> peak, unmapped rank -> peak).

    A row's ``rank`` says where its peak comes from. Without ranks, and when
    the run's GPUs are exactly as many as the ranks, they are matched in order
    (rank i on the i-th GPU of the run, the launcher's default placement).
    """
    peaks = snap.peak_vram_by_rank
    if not peaks:
        return {}, {}
    rows = snap.gpus[:MAX_GPU_ROWS]
    by_key: dict[str, int | None] = {}
    used: set[int] = set()
    if any(g.rank is not None for g in rows):
        for g in rows:
            if g.rank is not None and g.rank in peaks:
                by_key[g.key] = peaks[g.rank]
                used.add(g.rank)
    else:
        in_run = [g for g in rows if g.in_run]
        if in_run and len(in_run) == len(peaks):
            for g, r in zip(in_run, sorted(peaks)):
                by_key[g.key] = peaks[r]
                used.add(r)
    rest: dict[int, int | None] = {r: v for r, v in peaks.items() if r not in used and v is not None}
    return by_key, rest


def _training_panel(snap: Snapshot, width: int, *, ascii_only: bool = False) -> Panel:
    _, unmapped = _peak_by_row(snap)
    items = {
        "loss": Text(format_loss(snap.loss), style="bold red" if _bad(snap.loss) else "bold"),
        "smoothed": Text(format_loss(snap.loss_smoothed), style="bold"),
        "lr": Text(format_lr(snap.learning_rate)),
        "grad norm": Text(_fmt_grad(snap.grad_norm), style="red" if _bad(snap.grad_norm) else ""),
        "step/s": Text(format_rate(snap.steps_per_s)),
        "samples/s": Text(format_rate(snap.samples_per_s)),
    }
    if snap.eval_loss is not None:  # the latest evaluation's
        items["eval loss"] = Text(format_loss(snap.eval_loss), style="bold red" if _bad(snap.eval_loss) else "bold")
        if snap.eval_set:  # one of several eval datasets: which
            items["eval loss"].append(f" ({snap.eval_set})", style="dim")
    if snap.tokens_per_s_per_device is not None:  # the Trainer counts tokens: per device, and MFU if a peak is known
        items["tok/s/dev"] = Text(format_rate(snap.tokens_per_s_per_device))
        items["MFU"] = Text(f"{100 * snap.mfu:.1f}%" if snap.mfu is not None else "—")
    inner = width - 4  # panel border + padding
    per_row = 3 if inner >= 72 else 2 if inner >= 44 else 1
    order = (
        ["loss", "smoothed", "lr", "step/s", "samples/s", "grad norm"]
        if per_row == 3
        else ["loss", "smoothed", "lr", "grad norm", "step/s", "samples/s"]
    ) + [name for name in ("eval loss", "tok/s/dev", "MFU") if name in items]
    grid = Table.grid(padding=(0, 1))
    for i in range(per_row):
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(no_wrap=True, min_width=9 if i < per_row - 1 else None)
    for start in range(0, len(order), per_row):
        cells: list[RenderableType] = []
        for name in order[start : start + per_row]:
            cells += [name, items[name]]
        grid.add_row(*cells)

    body: list[RenderableType] = [grid]
    losses = snap.recent_losses[-MAX_SPARK_VALUES:]
    if losses:
        finite = [v for v in losses if _finite(v)]
        arrow = "->" if ascii_only else "→"  # a terminal that cannot show them showed '?'
        rng = f" {format_loss(finite[0])} {arrow} {format_loss(finite[-1])}" if finite else ""
        spark_w = max(0, min(len(losses), inner - len("trend ") - len(rng)))
        line = Text("trend ", style="dim")
        line.append(sparkline(losses, spark_w, ASCII_SPARK_CHARS if ascii_only else SPARK_CHARS), style="cyan")
        line.append(rng, style="dim")
        line.no_wrap = True
        line.overflow = "ellipsis"
        body.append(line)
    if unmapped:
        line = Text("peak VRAM ", style="dim", no_wrap=False)
        line.append("  ".join(f"rank {r} {format_bytes(v)}" for r, v in sorted(unmapped.items())))
        body.append(line)
    return Panel(Group(*body), title="training", title_align="left", box=box.ROUNDED, padding=(0, 1))


def _bad(x: float | None) -> bool:
    return x is not None and not math.isfinite(x)


# GPU table columns, in the order they are dropped when the terminal is narrow.
_DROP_ORDER = ("energy", "rank", "peak", "util")
_GPU_COLS = ("gpu", "rank", "util", "vram", "peak", "power", "temp", "energy", "throttle")
_GPU_HEADERS = {"vram": "VRAM", "throttle": "throttle"}
_COL_GAP = 3  # SIMPLE_HEAD without edges: padding, separator, padding
_THROTTLE_MIN = 8  # "⚠ therm…"


def _devices_panel(
    snap: Snapshot, console: Console, options: ConsoleOptions, width: int, max_rows: int = MAX_GPU_ROWS
) -> Panel:
    gpus = snap.gpus[:MAX_GPU_ROWS]
    if not gpus:
        return _host_panel(snap.host)
    if len(gpus) > max_rows:  # the terminal is too short: the run's GPUs first, those in trouble before the others
        kept = sorted(gpus, key=lambda g: (not g.in_run, not (g.throttle or _hot(g)), gpus.index(g)))[:max_rows]
        return _gpu_panel(snap, [g for g in gpus if g in kept], width, hidden=len(gpus) - len(kept))
    return _gpu_panel(snap, gpus, width)


def _hot(g: GpuRow) -> bool:
    return _finite(g.temp_c) and g.temp_c >= TEMP_HOT_C  # type: ignore[operator]


def _gpu_panel(snap: Snapshot, gpus: Sequence[GpuRow], width: int, hidden: int = 0) -> Panel:
    peaks, _ = _peak_by_row(snap)
    positions = {g.key: pos for g, pos in _positions(snap.gpus[:MAX_GPU_ROWS])}  # among all, shown or not
    rows = [_gpu_cells(snap, g, positions[g.key], peaks) for g in gpus]
    widths = _fit_columns(rows, max(1, width - 4))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    key_w = max(r["key"].cell_len for r in rows)
    if widths["gpu"] < key_w + 8:  # no room for a readable piece of the name: show keys whole
        widths["gpu"] = key_w
        for cells in rows:
            cells["gpu"] = cells["key"]
    for col, w in widths.items():
        right = col not in ("gpu", "throttle")
        table.add_column(
            _GPU_HEADERS.get(col, col), width=w, no_wrap=True, overflow="ellipsis", justify="right" if right else "left"
        )
    for g, cells in zip(gpus, rows):
        table.add_row(*(cells[c] for c in widths), style=None if g.in_run else "dim")
    if hidden:
        table.caption, table.caption_justify = f"+{hidden} more GPUs (a taller terminal shows them)", "left"
    shown = snap.gpus[:MAX_GPU_ROWS]
    n_run = sum(1 for g in shown if g.in_run)
    trouble = any(g.in_run and (bool(g.throttle) or _hot(g)) for g in shown)
    title = f"GPUs ({n_run} in run)" if n_run == len(shown) else f"GPUs ({n_run} of {len(shown)} in run)"
    return Panel(
        table, title=title, title_align="left", box=box.ROUNDED, padding=(0, 1), border_style="red" if trouble else ""
    )


def _positions(gpus: Sequence[GpuRow]) -> Iterable[tuple[GpuRow, int | None]]:
    """Each row with its position among the run's GPUs (None outside the run)."""
    pos = 0
    for g in gpus:
        if g.in_run:
            yield g, pos
            pos += 1
        else:
            yield g, None


def _fit_columns(rows: list[dict[str, Text]], inner: int) -> dict[str, int]:
    """Column widths for the GPU table within ``inner`` cells, dropping columns when needed.

    Every column keeps its natural width except the throttle column (cut down
    to :data:`_THROTTLE_MIN`, the warnings panel has the details) and the name
    column, which takes what is left and never goes below the key.
    """
    natural = {c: max([cell_len(_GPU_HEADERS.get(c, c))] + [r[c].cell_len for r in rows]) for c in _GPU_COLS}
    key_w = max([3] + [cell_len(r["key"].plain) for r in rows])
    cols = list(_GPU_COLS)
    drops = list(_DROP_ORDER)
    while True:
        fixed = {c: natural[c] for c in cols if c not in ("gpu", "throttle")}
        gaps = _COL_GAP * (len(cols) - 1)
        room = inner - gaps - sum(fixed.values()) - key_w  # for the throttle and the rest of the name
        th = min(natural["throttle"], max(_THROTTLE_MIN, room))
        if room >= th or not drops:
            break
        cols.remove(drops.pop(0))
    name_w = max(key_w, min(natural["gpu"], room - th + key_w))
    widths = {"gpu": name_w, **fixed, "throttle": th}
    return {c: widths[c] for c in cols}


def _gpu_cells(snap: Snapshot, g: GpuRow, pos: int | None, peaks: dict[str, int | None]) -> dict[str, Text]:
    cells: dict[str, Text] = {}
    label = Text(g.key, style="bold" if g.in_run else "")
    cells["key"] = label.copy()
    if g.name:
        label.append(" " + g.name)
    cells["gpu"] = label
    if not g.in_run:
        rank = DASH
    elif g.rank is not None:
        rank = str(g.rank)
    elif not any(r.rank is not None for r in snap.gpus[:MAX_GPU_ROWS]) and pos is not None:
        rank = str(pos)
    else:
        rank = "✓"
    cells["rank"] = Text(rank)
    cells["util"] = Text(_fmt_pct(g.util_pct))
    cells["vram"] = Text(format_vram(g.vram_used_bytes, g.vram_total_bytes))
    cells["peak"] = Text(format_bytes(peaks.get(g.key)))
    cells["power"] = Text(_fmt_power(g.power_w))
    temp_style = ""
    if _finite(g.temp_c):
        temp_style = "bold red" if g.temp_c >= TEMP_HOT_C else "yellow" if g.temp_c >= TEMP_WARN_C else ""  # type: ignore[operator]
    cells["temp"] = Text(_fmt_temp(g.temp_c), style=temp_style)
    cells["energy"] = Text(_fmt_energy(g.energy_j))
    if g.throttle:
        cells["throttle"] = Text("⚠ " + ", ".join(g.throttle), style="bold red" if g.in_run else "yellow")
    elif g.throttle is None:  # not read: a GPU that cannot say, or that stopped answering, is not "ok"
        cells["throttle"] = Text("–")
    else:
        cells["throttle"] = Text("ok", style="green" if g.in_run else "")
    return cells


def _host_panel(host: HostRow | None) -> Panel:
    if host is None:
        body: RenderableType = Text("no device telemetry yet", style="dim")
    else:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
        table.add_column("device", no_wrap=True)
        table.add_column("CPU", justify="right", no_wrap=True)
        table.add_column("RAM used/total", justify="right", no_wrap=True)
        table.add_row(
            Text("host (no GPU)", style="bold"),
            _fmt_pct(host.cpu_pct),
            format_vram(host.ram_used_bytes, host.ram_total_bytes),
        )
        body = table
    return Panel(body, title="devices", title_align="left", box=box.ROUNDED, padding=(0, 1))


_NODE_STATE_STYLE = {"live": "green", "stale": "yellow", "lost": "bold red", "failed": "red", "completed": "green"}


MAX_NODE_ROWS = 8  # beyond this many nodes, a count per state and the nodes that are not live


def _nodes_panel(snap: Snapshot) -> Panel:
    """The job's other machines, one line each: their state, step, GPUs (the head's own are above)."""
    text = Text()
    shown = snap.nodes
    if len(snap.nodes) > MAX_NODE_ROWS:
        text.append(_node_counts(snap))
        shown = tuple(n for n in snap.nodes if n.state != "live")[:MAX_NODE_ROWS]
    for node in shown:
        if text:
            text.append("\n")
        text.append(f"node {node.node_rank} {_clean(node.host or '')}".ljust(22))
        state = node.state if node.state not in ("stale", "lost") else f"{node.state} ({node.silent_s:.0f} s)"
        text.append(state.ljust(16), style=_NODE_STATE_STYLE.get(node.state, "bold"))
        text.append(f"step {node.step if node.step is not None else '—'}".ljust(12))
        if node.gpus:
            text.append(
                f"{node.gpus} GPU{'s' if node.gpus != 1 else ''} {_fmt_pct(node.util)} {_fmt_power(node.power_w)}"
            )
        else:
            text.append("no GPU", style="dim")
    return Panel(text, title=f"other nodes ({len(snap.nodes)})", title_align="left", box=box.ROUNDED)


def _node_counts(snap: Snapshot) -> str:
    counts: dict[str, int] = {}
    for node in snap.nodes:
        counts[node.state] = counts.get(node.state, 0) + 1
    return ", ".join(f"{count} {state}" for state, count in counts.items())


def _plain_nodes(snapshot: Snapshot) -> str:
    if len(snapshot.nodes) > 4:
        odd = [f"node{n.node_rank} {n.state}" for n in snapshot.nodes if n.state != "live"][:4]
        return f"nodes: {_node_counts(snapshot)}" + (f" ({', '.join(odd)})" if odd else "")
    return " ".join(f"node{n.node_rank} {n.state}" for n in snapshot.nodes)


def _warnings_panel(snap: Snapshot) -> Panel:
    shown = snap.warnings[-MAX_WARNINGS:]
    hidden = snap.warning_count - len(shown)
    text = Text()
    severe = False
    if hidden:
        text.append(f"(+{hidden} earlier)\n", style="dim")
    for i, w in enumerate(shown):
        w = _clean(w)[:MAX_LOG_LINE_CHARS]
        is_error = bool(_ERROR_WARNING_RE.search(w))
        severe = severe or is_error
        text.append("⚠ " + w, style="red" if is_error else "yellow")
        if i < len(shown) - 1:
            text.append("\n")
    return Panel(
        text,
        title=f"warnings ({snap.warning_count})",
        title_align="left",
        box=box.ROUNDED,
        padding=(0, 1),
        border_style="red" if severe else "yellow",
    )


def _clean_log_line(line: str) -> str:
    return _clean(as_shown(line)[:MAX_LOG_LINE_CHARS].expandtabs(4)).rstrip()


def _tail(lines: Sequence[str], n: int) -> Iterable[str]:
    """The last ``n`` display lines; a stored entry holding several lines counts as several."""
    out: list[str] = []
    for entry in reversed(lines[-n:]):
        parts = entry.split("\n") if "\n" in entry.rstrip("\n") else [entry]
        for part in reversed(parts):
            out.append(part)
            if len(out) >= n:
                return reversed(out)
    return reversed(out)


def _log_panel(snap: Snapshot, n: int) -> Panel:
    text = Text(no_wrap=True, overflow="ellipsis")
    tail = [_clean_log_line(line) for line in _tail(snap.log_tail, n)]
    if not tail:  # the Trainer's metric lines are on the status line, and in child.log
        going = snap.status in ("STARTING", "RUNNING", "STOPPING")
        text.append("(no output yet)" if going else "(no other output than the Trainer's metrics)", style="dim")
    for i, line in enumerate(tail):
        style = "red" if _ERROR_LINE_RE.search(line) else "yellow" if _WARN_LINE_RE.search(line) else ""
        text.append(line, style=style)
        if i < len(tail) - 1:
            text.append("\n")
    return Panel(text, title="output", title_align="left", box=box.ROUNDED, padding=(0, 1), style="")

"""The dashboard: pure ``Snapshot -> renderable`` functions, rendered on a recording console."""

from __future__ import annotations

import dataclasses
import io
import math
import subprocess
import sys

import pytest
from rich.console import Console
from rich.live import Live

from kaio import dashboard
from kaio.dashboard import (
    MAX_LOG_LINES,
    final_line,
    format_bytes,
    format_duration,
    format_exit_code,
    format_loss,
    format_lr,
    format_rate,
    format_vram,
    plain_line,
    render,
    sparkline,
    status_text,
)
from kaio.run.snapshot import GpuRow, HostRow, Snapshot, as_shown

GB = 2**30  # kaio shows memory in binary units (GiB) everywhere


def make_gpu(i: int, **kw) -> GpuRow:
    base = dict(
        key=f"nvml:{i}",
        name="NVIDIA H100 80GB HBM3",
        in_run=True,
        util_pct=97.0,
        vram_used_bytes=int(12.1 * GB),
        vram_total_bytes=80 * GB,
        power_w=250.0,
        temp_c=61.0,
        energy_j=7200.0,  # 2.0 Wh
        throttle=(),
    )
    base.update(kw)
    return GpuRow(**base)


def make_snapshot(**kw) -> Snapshot:
    base = dict(
        project="tiny-default",
        status="RUNNING",
        session=1,
        elapsed_s=26.0,
        step=12,
        max_steps=60,
        epoch=0.4,
        loss=4.81234,
        loss_smoothed=4.9012,
        recent_losses=(5.9, 5.6, 5.3, 5.1, 4.95, 4.81234),
        learning_rate=3e-4,
        grad_norm=1.234,
        steps_per_s=1.85,
        samples_per_s=14.8,
        eta_s=26.0,
        peak_vram_by_rank={0: int(12.6 * GB)},
        gpus=(make_gpu(0),),
        log_tail=("{'loss': 4.8123, 'epoch': 0.4}", "child says hello"),
    )
    base.update(kw)
    return Snapshot(**base)


def cpu_snapshot(**kw) -> Snapshot:
    return make_snapshot(
        gpus=(),
        peak_vram_by_rank={0: None},
        host=HostRow(cpu_pct=180.0, ram_used_bytes=int(4.1 * GB), ram_total_bytes=24 * GB),
        **kw,
    )


def text_of(renderable, width: int = 100, height: int = 60) -> str:
    console = Console(record=True, width=width, height=height, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()


# ---------------------------------------------------------------- formatting


def test_format_duration():
    assert format_duration(26) == "0:26"
    assert format_duration(62) == "1:02"
    assert format_duration(3723) == "1:02:03"
    assert format_duration(0) == "0:00"
    assert format_duration(None) == "–"
    assert format_duration(float("nan")) == "–"
    assert format_duration(-5) == "0:00"


def test_format_bytes_and_vram():
    assert format_bytes(int(12.1 * GB)) == "12.1 GiB"
    assert format_bytes(0) == "0 MiB"
    assert format_bytes(None) == "–"
    assert format_vram(int(12.1 * GB), 80 * GB) == "12.1/80.0 GiB"
    assert format_vram(int(12.1 * GB), 80 * GB, sep="") == "12.1/80.0GiB"
    assert format_vram(None, 80 * GB) == "–/80.0 GiB"
    assert format_vram(None, None) == "–"


def test_number_formats():
    assert format_loss(4.81234) == "4.812"
    assert format_loss(12.3456) == "12.35"
    assert format_loss(float("nan")) == "nan"
    assert format_loss(None) == "–"
    assert format_lr(3e-4) == "3.0e-04"
    assert format_lr(0.003) == "3.0e-03"
    assert format_lr(None) == "–"
    assert format_rate(1.8512) == "1.85"
    assert format_rate(14.83) == "14.8"
    assert format_rate(1234.4) == "1234"
    assert format_rate(0.01234) == "0.0123"
    assert format_exit_code(1) == "exit code 1"
    assert format_exit_code(-9) == "exit code -9 (SIGKILL)"


# ---------------------------------------------------------------- sparkline


def test_sparkline_scales_min_to_max():
    s = sparkline([1, 2, 3, 4, 5, 6, 7, 8], 8)
    assert s == "▁▂▃▄▅▆▇█"
    assert sparkline([8, 1], 10) == "█▁"  # fewer values than width: one char each


def test_sparkline_handles_none_nan_constant_and_empty():
    assert sparkline([1.0, None, float("nan"), 3.0], 10) == "▁  █"
    assert set(sparkline([2.5] * 5, 10)) == {"▄"}  # constant: mid height, no division by zero
    assert sparkline([], 10) == ""
    assert sparkline([1, 2, 3], 0) == ""
    assert sparkline([None, float("inf")], 5) == "  "


def test_sparkline_downsamples_to_width():
    values = [float(i) for i in range(1000)]
    s = sparkline(values, 20)
    assert len(s) == 20
    assert s[0] == "▁" and s[-1] == "█"
    assert list(s) == sorted(s)  # monotone input stays monotone


# ---------------------------------------------------------------- live view


def test_render_gpu_run_shows_the_essentials():
    out = text_of(render(make_snapshot()))
    assert "tiny-default" in out
    assert "RUNNING" in out
    assert "session 1" in out
    assert "elapsed 0:26" in out and "ETA 0:26" in out
    assert "12/60 (20%)" in out
    assert "━" in out and "─" in out  # done and remaining parts of the bar differ without colour
    assert "epoch 0.40" in out
    assert "4.812" in out and "4.901" in out  # loss, smoothed
    assert "3.0e-04" in out and "1.23" in out  # lr, grad norm
    assert "1.85" in out and "14.8" in out  # steps/s, samples/s
    assert sparkline(make_snapshot().recent_losses, 6) in out
    # GPU row: key, name, util, VRAM used/total, run peak, power, temp, energy, no throttle
    row = next(line for line in out.splitlines() if "nvml:0" in line)
    for piece in ("H100", "97%", "12.1/80.0 GiB", "12.6 GiB", "250 W", "61°C", "2.0 Wh", "ok"):
        assert piece in row, (piece, row)
    assert "host (no GPU)" not in out
    assert "child says hello" in out
    assert "warnings" not in out


def test_render_cpu_only_shows_host_row():
    out = text_of(render(cpu_snapshot()))
    row = next(line for line in out.splitlines() if "host (no GPU)" in line)
    assert "180%" in row
    assert "4.1/24.0 GiB" in row
    assert "nvml" not in out and "GPUs" not in out


def test_render_without_any_device_telemetry():
    out = text_of(render(make_snapshot(gpus=(), host=None)))
    assert "no device telemetry yet" in out


def test_throttle_flag_and_idle_gpu():
    snap = make_snapshot(
        gpus=(
            make_gpu(0, rank=0),
            make_gpu(1, rank=1, throttle=("thermal", "power_cap"), temp_c=91.0, power_w=301.0),
            make_gpu(2, in_run=False, util_pct=0.0, power_w=70.0),
        ),
        peak_vram_by_rank={0: int(12.6 * GB), 1: int(11.9 * GB)},
    )
    out = text_of(render(snap), width=120)
    lines = out.splitlines()
    row1 = next(line for line in lines if "nvml:1" in line)
    assert "⚠ thermal, power_cap" in row1
    assert "91°C" in row1 and "301 W" in row1 and "11.9 GiB" in row1
    row2 = next(line for line in lines if "nvml:2" in line)
    assert "–" in row2 and "70 W" in row2  # not in the run: rank shown as "–"
    assert "GPUs (2 of 3 in run)" in out


def test_idle_gpu_rows_are_dimmed():
    snap = make_snapshot(gpus=(make_gpu(0), make_gpu(1, in_run=False)))
    console = Console(width=100, height=60, file=io.StringIO(), color_system="standard")
    lines = console.render_lines(render(snap), console.options, pad=False)

    def styles_of(key):
        line = next(segs for segs in lines if any(key in seg.text for seg in segs))
        return [seg.style for seg in line if seg.text.strip() and seg.style is not None and "│" not in seg.text]

    idle, busy = styles_of("nvml:1"), styles_of("nvml:0")
    assert idle and all(st.dim for st in idle)
    assert busy and not any(st.dim for st in busy)


def test_peaks_map_to_rows_by_position_when_ranks_unknown():
    snap = make_snapshot(
        gpus=(make_gpu(0), make_gpu(3)),
        peak_vram_by_rank={0: int(10.0 * GB), 1: int(11.0 * GB)},
    )
    out = text_of(render(snap), width=120)
    assert "10.0 GiB" in next(line for line in out.splitlines() if "nvml:0" in line)
    assert "11.0 GiB" in next(line for line in out.splitlines() if "nvml:3" in line)


def test_unmapped_peaks_are_shown_in_training_panel():
    snap = make_snapshot(gpus=(make_gpu(0), make_gpu(1)), peak_vram_by_rank={0: 5 * GB, 1: 6 * GB, 2: 7 * GB})
    out = text_of(render(snap), width=120)
    assert "peak VRAM" in out and "rank 2 7.0 GiB" in out


def test_warnings_panel_only_when_present():
    assert "warnings" not in text_of(render(make_snapshot()))
    snap = make_snapshot(warnings=("loss is NaN at step 13", "GPU nvml:0 throttling: thermal"))
    out = text_of(render(snap))
    assert "warnings (2)" in out
    assert "loss is NaN at step 13" in out
    assert "GPU nvml:0 throttling: thermal" in out


def test_warnings_are_bounded():
    snap = make_snapshot(warnings=tuple(f"warning number {i}" for i in range(50)))
    out = text_of(render(snap))
    assert "warnings (50)" in out
    assert "warning number 49" in out
    shown = [line for line in out.splitlines() if "warning number" in line]
    assert len(shown) == dashboard.MAX_WARNINGS == 5
    assert "(+45 earlier)" in out


def test_status_texts():
    assert status_text(make_snapshot(status="STOPPING")) == "stopping… (Ctrl-C again to kill)"
    asked = make_snapshot(status="STOPPING", stopping_because="SIGTERM")  # a scheduler's, in a terminal's tmux
    assert status_text(asked) == "stopping… (SIGTERM; Ctrl-C again to kill)"
    pressed = make_snapshot(status="STOPPING", stopping_because="Ctrl-C")
    assert status_text(pressed) == "stopping… (Ctrl-C again to kill)"
    assert "STOPPING (SIGTERM; a second Ctrl-C or SIGTERM kills it) step" in plain_line(asked)
    assert status_text(make_snapshot(status="FAILED", exit_code=1)) == "FAILED (exit code 1)"
    assert status_text(make_snapshot(status="COMPLETED", exit_code=0)) == "COMPLETED"
    out = text_of(render(make_snapshot(status="STOPPING", eta_s=120.0)))
    assert "stopping… (Ctrl-C again to kill)" in out and "ETA" not in out  # it ends at the next step
    assert "ETA" in text_of(render(make_snapshot(status="RUNNING", eta_s=120.0)))
    assert "ETA" not in plain_line(make_snapshot(status="STOPPING", eta_s=120.0))
    out = text_of(render(make_snapshot(status="FAILED", exit_code=3)))
    assert "FAILED (exit code 3)" in out
    assert "ETA" not in out  # no ETA once the run has ended
    out = text_of(render(make_snapshot(status="STARTING", step=0, loss=None, eta_s=None)))
    assert "STARTING" in out and "0/60 (0%)" in out and "ETA –" in out


def test_tokens_per_device_and_mfu_show_when_the_trainer_counts_tokens():
    out = text_of(render(make_snapshot(tokens_per_s_per_device=1234.0, mfu=0.417)))
    assert "tok/s/dev 1234" in out and "MFU       41.7%" in out
    assert "MFU" not in text_of(render(make_snapshot()))


def test_no_max_steps_shows_count_without_bar():
    out = text_of(render(make_snapshot(max_steps=None, step=345)))
    assert "step 345" in out
    assert "━" not in out and "%" not in out.split("training")[0]


def test_nan_loss_is_spelled_out():
    snap = make_snapshot(loss=float("nan"), recent_losses=(5.0, 4.0, float("nan")))
    out = text_of(render(snap))
    assert "nan" in out


@pytest.mark.parametrize("width", [60, 80, 160])
def test_render_at_other_widths_keeps_key_content(width):
    snap = make_snapshot(
        gpus=(make_gpu(0, rank=0, throttle=("thermal",)), make_gpu(1, in_run=False)),
        warnings=("something odd",),
    )
    out = text_of(render(snap), width=width)
    lines = out.splitlines()
    assert all(len(line) <= width for line in lines)
    assert "tiny-default" in out and "12/60" in out and "4.812" in out
    row = next(line for line in lines if "nvml:0" in line)
    assert "250 W" in row and "61°C" in row and "⚠" in row and "12.1/80.0 GiB" in row
    assert "something odd" in out
    assert "child says hello" in out


def test_render_survives_tiny_width():
    out = text_of(render(make_snapshot(warnings=("w",))), width=20, height=40)
    assert "tiny-default" in out


def test_long_log_lines_are_truncated_with_ellipsis_and_escapes_removed():
    long = "\x1b[31mred\x1b[0m " + "x" * 500
    tqdm = "  5%|▌   | 3/60\r 20%|██  | 12/60 [00:06<00:26,  1.85it/s]"
    out = text_of(render(make_snapshot(log_tail=(long, tqdm, "tab\there"))), width=80)
    line = next(line for line in out.splitlines() if "red x" in line)
    assert len(line) <= 80 and "…" in line
    assert "\x1b" not in out and "[31m" not in out
    assert "12/60 [00:06<00:26" in out and "3/60" not in out  # only what the terminal would show
    assert "tab here" in out


def test_log_tail_fits_the_terminal_height():
    snap = make_snapshot(log_tail=tuple(f"line {i}" for i in range(10_000)))
    out = text_of(render(snap), width=100, height=30)
    lines = out.rstrip("\n").splitlines()
    assert len(lines) <= 30
    assert "line 9999" in out  # newest line shown
    assert "line 9000" not in out


def test_log_tail_is_bounded_whatever_the_height():
    snap = make_snapshot(log_tail=tuple(f"line {i}" for i in range(10_000)))
    out = text_of(render(snap), width=100, height=100_000)
    shown = [line for line in out.splitlines() if "line " in line]
    assert len(shown) == MAX_LOG_LINES
    assert "line 9999" in shown[-1]
    assert f"line {10_000 - MAX_LOG_LINES} " in shown[0] + " "


def test_explicit_log_lines():
    snap = make_snapshot(log_tail=tuple(f"line {i}" for i in range(50)))
    out = text_of(render(snap, log_lines=3), height=200)
    assert [line.strip("│ ") for line in out.splitlines() if "line " in line] == ["line 47", "line 48", "line 49"]
    assert "output" not in text_of(render(snap, log_lines=0))


def test_a_terminal_without_unicode_gets_an_ascii_sparkline_not_question_marks():
    """LANG=C (an ASCII terminal): Rich draws ASCII boxes, and the trend line was '????? 5.9 ? 0.25'."""
    snap = make_snapshot(recent_losses=(5.0, 4.0, 3.0, 2.0, 1.0))
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", errors="replace")  # as kaio's cli leaves such a stream
    Console(file=out, width=100, height=60, color_system=None).print(render(snap))
    out.flush()
    trend = next(line for line in raw.getvalue().decode().splitlines() if "trend" in line)
    assert "?" not in trend and "trend @*+-_ 5 -> 1 " in trend
    unicode_trend = next(line for line in text_of(render(snap)).splitlines() if "trend" in line)
    assert "trend █▆▅▃▁ 5 → 1 " in unicode_trend
    # The rest of kaio's own glyphs too: the progress bar was 72 '?', and the status mark, separators, °C...
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", errors="replace")
    running = make_snapshot(status="RUNNING", step=30, max_steps=60, warnings=("w1",), log_tail=("hello",))
    Console(file=out, width=100, height=40, color_system=None).print(render(running))
    out.flush()
    frame = raw.getvalue().decode()
    assert "?" not in frame and "* RUNNING" in frame and "| elapsed" in frame and "! 1 warning" in frame
    assert "(50%) " + "=" * 36 + "-" * 36 + " epoch" in frame and "61 C" in frame
    # And the lines kaio says after it: the record line's separators were '?'.
    from kaio.cli import _say

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", errors="replace")
    _say(Console(file=out, width=100, color_system=None))("record: r/report.md · r/telemetry.png · r/history.json")
    out.flush()
    assert raw.getvalue().decode() == "record: r/report.md | r/telemetry.png | r/history.json\n"


def test_bounded_inputs_are_sliced_not_walked():
    """Huge sequences render with bounded output: sparkline width, warnings and logs are cut."""
    snap = make_snapshot(
        recent_losses=tuple(5.0 - i * 1e-4 for i in range(100_000)),
        warnings=tuple(f"w{i}" for i in range(10_000)),
        log_tail=tuple(f"line {i}" for i in range(10_000)),
    )
    out = text_of(render(snap), width=100, height=1000)
    assert len(out.splitlines()) < MAX_LOG_LINES + 40
    trend = next(line for line in out.splitlines() if "trend" in line)
    assert len(trend) <= 100


def test_render_is_pure():
    snap = make_snapshot(warnings=("w",))
    before = dataclasses.asdict(snap)
    r = render(snap)
    first = text_of(r)
    assert text_of(r) == first  # same renderable renders the same twice
    assert dataclasses.asdict(snap) == before


def test_render_adapts_to_resize():
    r = render(make_snapshot(gpus=(make_gpu(0), make_gpu(1, in_run=False))))
    wide, narrow = text_of(r, width=160), text_of(r, width=60)
    assert "energy" in wide and "energy" not in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 60


def test_live_drives_render():
    snap = make_snapshot()
    file = io.StringIO()
    console = Console(file=file, width=100, height=30, force_terminal=True, color_system=None)
    with Live(get_renderable=lambda: render(snap), console=console, auto_refresh=False) as live:
        live.refresh()
    assert "tiny-default" in file.getvalue()


def test_no_color_console_emits_no_colour_codes():
    file = io.StringIO()
    console = Console(file=file, width=100, height=40, force_terminal=True, no_color=True)
    console.print(render(make_snapshot(status="FAILED", exit_code=1, warnings=("loss is NaN",))))
    out = file.getvalue()
    assert "FAILED (exit code 1)" in out
    assert "\x1b[31" not in out and "\x1b[32" not in out and "\x1b[38" not in out


# ---------------------------------------------------------------- plain output


def test_plain_line_gpu():
    line = plain_line(make_snapshot())
    assert line.startswith("[kaio] tiny-default RUNNING step 12/60 (20%) loss 4.812")
    assert "1.85 step/s" in line
    assert "ETA 0:26" in line
    assert "gpu0 250W 61C 12.1/80.0GiB" in line
    assert "\x1b" not in line and "\n" not in line


def test_a_finished_runs_last_line_says_its_step_rate_is_the_last_steps():
    """A tester took the last line's 19.0 step/s for the run's pace (26.2): it is the recent steps'."""
    assert "1.85 step/s (last steps)" in plain_line(make_snapshot(status="COMPLETED"))
    assert "1.85 step/s |" in plain_line(make_snapshot())  # while it runs: the speed now


def test_plain_line_host_and_stopping():
    line = plain_line(cpu_snapshot(status="STOPPING"))
    assert "STOPPING (a second Ctrl-C or SIGTERM kills it)" in line  # a log's stop was often a scheduler's
    assert "host cpu 180% ram 4.1/24.0GiB" in line
    assert "\x1b" not in line


def test_plain_line_flags_throttle_and_warnings_and_many_gpus():
    snap = make_snapshot(gpus=(make_gpu(0), make_gpu(1, throttle=("thermal",))), warnings=("a", "b"))
    line = plain_line(snap)
    assert "gpu1" in line and "THROTTLED(thermal)" in line
    assert line.endswith("2 warnings")
    many = plain_line(make_snapshot(gpus=tuple(make_gpu(i, temp_c=60.0 + i) for i in range(8))))
    assert "8 gpus 2000W max 67C" in many


def test_plain_line_without_progress_data():
    line = plain_line(
        make_snapshot(
            status="STARTING", step=0, max_steps=None, loss=None, steps_per_s=None, eta_s=None, gpus=(), host=None
        )
    )
    assert line == "[kaio] tiny-default STARTING (launching, loading the model and data) step 0"
    starting = {
        "status": "STARTING",
        "step": 0,
        "max_steps": None,
        "loss": None,
        "eval_loss": 3.4,
        "gpus": (),
        "host": None,
    }
    evaluated = make_snapshot(**starting, evaluated_in_session=True)
    assert "STARTING (no training step yet; the script has evaluated) step 0 eval loss 3.4" in plain_line(evaluated)
    resumed = make_snapshot(**starting)  # the earlier session's evaluation: this one is loading
    assert "STARTING (launching, loading the model and data) step 0 eval loss 3.4" in plain_line(resumed)


def test_plain_line_strips_escapes_from_project():
    assert "\x1b" not in plain_line(make_snapshot(project="evil\x1b[2Jname"))


def test_a_job_of_several_machines_says_where_its_nodes_meet_while_starting():
    snap = make_snapshot(status="STARTING", rendezvous="2 nodes at gpu01:29710")
    assert (
        status_text(snap)
        == "STARTING (launching, meeting the job's 2 nodes at gpu01:29710, loading the model and data)"
    )


def test_final_line():
    line = final_line(make_snapshot(status="COMPLETED", step=60, elapsed_s=62, exit_code=0, loss=4.1234))
    assert line == "[kaio] tiny-default COMPLETED: 60/60 steps in 1:02, exit code 0, final loss 4.123"
    line = final_line(make_snapshot(status="FAILED", step=12, elapsed_s=3723, exit_code=1, session=2, loss=None))
    assert line == "[kaio] tiny-default FAILED: 12/60 steps in 1:02:03 (session 2), exit code 1"
    line = final_line(make_snapshot(status="FAILED", step=60, exit_code=1, loss=None, training_completed=True))
    assert line.startswith("[kaio] tiny-default FAILED after its training completed: 60/60 steps in")
    line = final_line(make_snapshot(status="INTERRUPTED", exit_code=-15, loss=None))
    assert "INTERRUPTED" in line and "SIGTERM" in line and "\x1b" not in line
    # Warnings are counted on the record's line that follows (the whole history's too): not here, differently.
    line = final_line(make_snapshot(status="COMPLETED", exit_code=0, loss=None, warnings=("a", "b")))
    assert line == "[kaio] tiny-default COMPLETED: 12/60 steps in 0:26, exit code 0"


def test_module_has_no_heavy_imports():
    code = "import sys, kaio.dashboard; print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sparkline_in_render_uses_recent_losses():
    losses = tuple(math.cos(i / 5) for i in range(30))
    out = text_of(render(make_snapshot(recent_losses=losses)), width=100)
    assert sparkline(losses, 30) in out


def test_an_empty_output_panel_says_whether_output_may_still_come():
    assert "(no output yet)" in text_of(render(make_snapshot(status="RUNNING", log_tail=())))
    done = text_of(render(make_snapshot(status="COMPLETED", log_tail=())))
    assert "(no other output than the Trainer's metrics)" in done and "no output yet" not in done


def test_plain_output_says_each_warning_once_and_a_live_one_once_while_it_counts():
    from kaio.views import PlainView

    out = io.StringIO()
    view = PlainView(Console(file=out, width=200), interval_s=0)
    view.start(make_snapshot(warnings=("an earlier session's warning",)))  # a resume: said then, not again
    nan = "non-finite loss (nan) at step 5"
    for seconds in (61, 62, 63):
        stall = f"stall: no step for {seconds} s (training step; the budget is 60 s)"
        view.update(make_snapshot(warnings=(nan, stall), live_warnings=(stall,)))
    view.update(make_snapshot(warnings=(nan, "stall after step 9 (training step, no step for 61 s)")))
    view.update(make_snapshot(warnings=("an earlier session's warning", nan)))
    # How the run stopped is printed after the final line (kaio.run.project): not a warning line before it too.
    stopped = "stopped without saving a checkpoint (a second Ctrl-C came); there is none yet"
    view.stop(make_snapshot(warnings=(nan, stopped, "a warning of the end")), said_after=stopped)
    said = [line for line in out.getvalue().splitlines() if line.startswith("kaio: warning: ")]
    assert said == [
        f"kaio: warning: {nan}",
        "kaio: warning: stall: no step for 61 s (training step; the budget is 60 s)",
        "kaio: warning: stall after step 9 (training step, no step for 61 s)",
        "kaio: warning: a warning of the end",
    ]


def test_plain_output_says_a_new_status_at_once_and_the_rest_every_few_seconds():
    """A Ctrl-C in a CI log: STOPPING is said when it happens, not at the next status line 5 s later."""
    from kaio.views import PlainView

    out = io.StringIO()
    view = PlainView(Console(file=out, width=200), interval_s=3600)
    view.start(make_snapshot(status="RUNNING"))
    view.update(make_snapshot(status="RUNNING", step=5))  # the same status waits for the interval...
    view.update(make_snapshot(status="STOPPING", step=6))  # ...a new status does not
    view.update(make_snapshot(status="STOPPING", step=7))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "STOPPING" in lines[0] and "step 6" in lines[0], lines


def test_plain_output_shows_a_redrawn_progress_bar_once_at_its_last_state_without_escape_codes():
    from kaio.views import PlainView

    out = io.StringIO()
    view = PlainView(Console(file=out, width=200), interval_s=0)
    for line in (
        "\rprogress 1/40 [#   ]\rprogress 2/40 [##  ]\rprogress 40/40 [####]",
        "\x1b[32mgreen\x1b[0m text",
        "",
        "   ",  # a script's own line of spaces
        "\r      \r",  # a bar cleared away
        "done",
    ):
        view.child_output(line)
    assert out.getvalue().splitlines() == ["progress 40/40 [####]", "green text", "", "   ", "done"]


def test_the_latest_evaluation_loss_is_on_screen_once_there_is_one():
    assert "eval loss" not in text_of(render(make_snapshot()))
    out = text_of(render(make_snapshot(eval_loss=2.3456)))
    assert "eval loss" in out and "2.346" in out
    assert " eval loss 2.346 " in plain_line(make_snapshot(eval_loss=2.3456))


def test_a_small_terminal_still_shows_that_there_are_warnings():
    snap = make_snapshot(warnings=("stall after step 9 (training step, no step for 61 s)",))
    top = text_of(render(snap), width=40, height=15).splitlines()[:3]
    assert any("1 warning" in line for line in top)
    assert "warning" not in text_of(render(make_snapshot(warnings=())), width=40, height=15).split("loss")[0]


def test_the_trainers_per_step_dicts_are_left_out_of_the_output_but_its_evaluations_and_the_scripts_are_not():
    """transformers 5 prints each float of its log dict as a string; a script printing its own step dict prints
    numbers: that line is the script's, and shown. Before 5, any such dict is taken for the Trainer's. An
    evaluation's dict (compute_metrics' accuracy: the status line shows the eval loss only), predict()'s and the
    closing one are shown (child.log keeps every line either way)."""
    from kaio.run.child_output import is_trainer_log_line

    trainer = "{'loss': '5.945', 'grad_norm': '0.4172', 'learning_rate': '0', 'epoch': '0.0625', 'num_input_tokens_seen': 192}"
    scripts = ["{'loss': 4.1558, 'epoch': 0.3125}", "{'learning_rate': 0.001}"]
    assert is_trainer_log_line(trainer, "5.24.0") and is_trainer_log_line(trainer, None)
    assert not any(is_trainer_log_line(line, "5.24.0") for line in scripts)
    assert all(is_trainer_log_line(line, "4.57.1") for line in scripts)  # 4.x printed its floats bare
    # Found in a CI run: the bar (stderr) and the dict (stdout) interleave in child.log on a busy machine.
    after_bar = " 75%|███████▌  | 9/12 [00:00<00:00, 77.89it/s]" + trainer
    after_blanks = " " * 47 + trainer
    assert is_trainer_log_line(after_bar, "5.24.0") and is_trainer_log_line(after_blanks, "5.24.0")
    assert not is_trainer_log_line("step 3 done: " + trainer, "5.24.0")  # the script's own words before it
    rarer = [
        "{'eval_loss': '2.612', 'eval_accuracy': '0.875', 'eval_runtime': '0.03', 'epoch': '1'}",
        "{'test_loss': '2.9', 'test_runtime': '0.02'}",
        "{'train_runtime': '0.1045', 'train_loss': '5.832', 'epoch': '0.75'}",
    ]
    assert not any(is_trainer_log_line(line, version) for line in rarer for version in ("5.24.0", "4.57.1"))
    assert not is_trainer_log_line("{'my_own': 1.0}", "5.24.0") and not is_trainer_log_line("done", None)


def test_progress_bars_in_the_output_panel_update_in_place_as_in_a_terminal(tmp_path):
    """A Trainer script's own tqdm bars (the training's, each evaluation's, left or cleared) written to a log, as
    the child's output is: each bar keeps one line at its latest state, a cleared one leaves nothing, and the
    script's other lines stay, in order."""
    import collections

    from tqdm import tqdm

    from kaio.run.snapshot import add_output_line

    log = tmp_path / "child.log"
    with open(log, "w") as out:
        train = tqdm(total=40, file=out, mininterval=0, ascii=False)
        for step in range(1, 41):
            train.update(1)
            if step % 10 == 0:
                for _ in tqdm(range(3), file=out, mininterval=0, leave=False):  # an evaluation's bar, cleared
                    pass
                tqdm.write(f"script says {step}", file=out)
        train.close()
        for _ in tqdm(range(5), desc="Map", file=out, mininterval=0):  # the script's own bar, left
            pass
    tail: collections.deque[str] = collections.deque(maxlen=200)
    raw = log.read_bytes().decode().split("\n")
    for line in raw:
        add_output_line(tail, line.rstrip("\r"))  # as the supervisor reads the log
    shown = [as_shown(line) for line in tail if as_shown(line).strip()]
    assert len(raw) > 8  # the bars' redraws, as a log holds them
    assert [line for line in shown if line.startswith("script says")] == [f"script says {k}" for k in (10, 20, 30, 40)]
    bars = [line for line in shown if "%|" in line]
    assert len(bars) == 2 and bars[0].startswith("100%|") and "40/40" in bars[0] and bars[1].startswith("Map: 100%|")
    # A warning printed on a bar's line is the warning's line: kept when the bar moves on.
    add_output_line(tail, "\r  0%|          | 0/40 [00:00<?, ?it/s]/x.py:7: UserWarning: no accelerator")
    add_output_line(tail, "\r  2%|▎         | 1/40 [00:00<00:00, 9.10it/s]")
    assert any(as_shown(line).endswith("UserWarning: no accelerator") for line in tail)


def test_a_progress_bar_redrawn_in_place_shows_as_it_stands_before_its_line_ends(tmp_path):
    """tqdm redraws the Trainer's bar with carriage returns and ends its line only when the training is done: the
    output panel showed '0%| | 0/200' for the whole run. The latest whole redraw is shown, and the line, when it
    ends, takes its place."""
    import queue
    from collections import deque
    from types import SimpleNamespace

    from kaio.run.child_output import follow_output
    from kaio.run.snapshot import add_output_line, as_shown

    log = tmp_path / "child.log"
    bar = "\r{:>3}%|{:<10}| {}/10 [00:01<00:02, 4.00it/s]"
    log.write_text("loading the model\n" + bar.format(0, "", 0) + bar.format(20, "##", 2) + "\r 30%|###")  # cut
    said_queue: queue.Queue = queue.Queue()
    running = iter([None, 0])  # the child runs, then has exited
    follow_output(SimpleNamespace(poll=lambda: next(running)), log, 0, said_queue.put)  # type: ignore[arg-type]
    said = [said_queue.get_nowait() for _ in range(said_queue.qsize())]
    assert said[:2] == [("log", "loading the model"), ("redraw", bar.format(20, "##", 2)[1:])]
    tail: deque[str] = deque(maxlen=10)
    for line in ("loading the model", bar.format(20, "##", 2)[1:]):
        add_output_line(tail, line)
    assert [as_shown(line).strip() for line in tail][-1].startswith("20%|##")
    add_output_line(tail, bar.format(0, "", 0) + bar.format(100, "#" * 10, 10))  # its line, ended at last
    assert [as_shown(line) for line in tail] == ["loading the model", bar.format(100, "#" * 10, 10)[1:]]


def test_a_line_redrawn_all_training_long_keeps_only_its_recent_redraws():
    """tqdm redraws the bar's line ten times a second until training ends: the follower kept all of it and
    copied it at every read. What it keeps is bounded, from a redraw on, and the bar is still found."""
    from kaio.run.child_output import PARTIAL_KEPT, _latest_bar, _recent_redraws

    redraw = b"\r 50%|#####     | 5/10 [00:01<00:01, 4.00it/s]"
    line = redraw * (3 * PARTIAL_KEPT // len(redraw))
    kept = _recent_redraws(line)
    assert len(kept) <= PARTIAL_KEPT and kept.startswith(b"\r") and line.endswith(kept)
    assert _latest_bar(kept) == redraw[1:].decode() and _recent_redraws(redraw) == redraw


def test_a_gpu_whose_throttling_is_not_read_is_not_called_ok():
    """A tester's fake GPU that cannot report throttling, and one lost mid-run: a green 'ok' for each."""
    from kaio.dashboard import _gpu_cells

    snap = make_snapshot(gpus=(make_gpu(0), make_gpu(1, throttle=None), make_gpu(2, throttle=("thermal",))))
    shown = [_gpu_cells(snap, g, i, {})["throttle"].plain for i, g in enumerate(snap.gpus)]
    assert shown == ["ok", "–", "⚠ thermal"]


def test_many_gpus_in_a_short_terminal_keep_the_rest_of_the_dashboard_on_screen():
    """A tester's 16 GPUs at 80x24: the table stopped at the 12th, then a bare '...' took the panel's end, the
    output and the warnings off the screen."""
    gpus = tuple(make_gpu(i, throttle=("thermal",) if i == 13 else ()) for i in range(16))
    snap = make_snapshot(gpus=gpus, warnings=("a warning to keep in sight",))
    text = text_of(render(snap), width=80, height=24)
    lines = text.rstrip("\n").split("\n")
    assert len(lines) <= 23  # one row spare: the live view never scrolls
    assert "a warning to keep in sight" in text and "GPUs (16 in run)" in text
    assert "+9 more GPUs (a taller terminal shows them)" in text and "nvml:13     13" in text
    assert "nvml:13" in text  # the throttled GPU is among those kept
    tall = text_of(render(snap), width=80, height=60)
    assert "more GPUs" not in tall and all(f"nvml:{i} " in tall for i in range(16))


def test_a_run_that_sees_no_gpu_does_not_show_the_hosts_other_gpus_as_its_own():
    """A tester's CUDA_VISIBLE_DEVICES=MIG-... (a slice kaio cannot trace): the plain lines read 'gpu0 300W ...' for
    GPUs outside the run."""
    snap = make_snapshot(gpus=(make_gpu(0, in_run=False), make_gpu(1, in_run=False)))
    line = plain_line(snap)
    assert "gpu" not in line and "250W" not in line

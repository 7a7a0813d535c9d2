"""The live dashboard in a real pseudo-terminal, read back through a terminal emulator (pyte)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import textwrap
import time

import pexpect
import psutil
import pyte
import pytest

from conftest import REPO, write_config

COLUMNS, LINES = 120, 40


SFT_STYLE = REPO / "tests" / "scripts" / "sft_style.py"


class Screen:
    def __init__(self, child: pexpect.spawn, columns: int = COLUMNS, lines: int = LINES) -> None:
        self.child = child
        self.screen = pyte.Screen(columns, lines)
        self.stream = pyte.ByteStream(self.screen)

    def pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.stream.feed(self.child.read_nonblocking(65536, timeout=0.1))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                return

    def has_colour(self) -> bool:
        return any(
            char.fg != "default" or char.bg != "default" for row in self.screen.buffer.values() for char in row.values()
        )

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def wait_for(self, predicate, seconds: float, what: str) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump(0.3)
            if predicate(self.text()):
                return self.text()
        raise AssertionError(f"never saw {what} on screen:\n{self.text()}")


def _spawn_kaio(project_dir, columns: int, lines: int, **env_extra: str) -> tuple[pexpect.spawn, Screen]:
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(lines), **env_extra}
    child = pexpect.spawn(
        sys.executable, ["-m", "kaio", "run", "cfg.yaml"], cwd=str(project_dir), env=env, dimensions=(lines, columns)
    )
    return child, Screen(child, columns, lines)


def _assert_last_frame(text: str, status: str) -> None:
    """What the user sees once kaio has exited: header, progress bar, status and where the record is."""
    rows = text.splitlines()
    header = [r for r in rows if r.startswith("kaio t ")]
    assert len(header) == 1 and status in header[0], text  # one frame, redrawn in place to the end
    assert any(r.startswith("step ") and ("━" in r or "─" in r) for r in rows), text
    assert "report docs/reports/t/report.md" in text, text
    assert f"[kaio] t {status}" in text, text


def test_dashboard_shows_progress_and_host_row_then_two_ctrl_c_stop_it_at_once_and_leave_no_process(project_dir):
    """One Ctrl-C asks the Trainer to save and stop (tests/test_resume_faults.py); a second one, right after,
    kills the training at once unless the save is done: the last frame says which, the history is kept, no
    process is left."""
    write_config(project_dir, max_steps=5000, save_steps=10000)
    child, screen = _spawn_kaio(project_dir, COLUMNS, LINES)
    try:
        # Live redraws in place: wait for a frame that holds everything at once.
        wanted = ("RUNNING", "/5000", "loss", "━", "host (no GPU)")  # status, step count, bar, the CPU-only row
        screen.wait_for(lambda t: all(w in t for w in wanted), 120, f"all of {wanted}")
        family = psutil.Process(child.pid).children(recursive=True)
        assert family
        child.sendcontrol("c")  # the terminal sends SIGINT to kaio; the child is in its own session
        time.sleep(0.3)
        child.sendcontrol("c")
        screen.pump(15)
        child.expect(pexpect.EOF, timeout=60)
    finally:
        if child.isalive():
            child.terminate(force=True)
    _assert_last_frame(screen.text(), "INTERRUPTED")
    # Which one it was depends on whether the tiny model's save finished before the second press: it is said.
    said = " ".join(screen.text().split())
    assert "stopped without saving a checkpoint (a second Ctrl-C came)" in said or (
        "with checkpoint-" in said and "saved: `kaio resume t` continues from step" in said
    ), said
    child.close()
    assert child.exitstatus not in (None, 0)
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    history = json.loads((project_dir / "docs/reports/t/history.json").read_text())
    assert history["status"] == "INTERRUPTED" and len(history["steps"]) > 0


def test_last_frame_fits_a_small_terminal_whatever_the_script_prints(project_dir):
    """A chatty script (its own prints, the Trainer's progress bars) fills the output panel; the last frame
    still leaves room for the lines printed under it, so its header stays on an 80x24 screen."""
    chatty = project_dir / "chatty.py"
    chatty.write_text(
        textwrap.dedent(f"""\
        import runpy, sys
        for shard in range(40):
            print(f"preparing shard {{shard}}")
        sys.argv = [{str(SFT_STYLE)!r}, {str(project_dir / "out")!r}, "12"]
        runpy.run_path({str(SFT_STYLE)!r}, run_name="__main__")
        """)
    )
    (project_dir / "cfg.yaml").write_text(
        f"project_name: t\nlaunch:\n  script: {chatty}\nreporting:\n  use_comet_ml: false\n  poll_hz: 4\n"
    )
    child, screen = _spawn_kaio(project_dir, 80, 24, NO_COLOR="1")
    try:
        screen.wait_for(lambda t: "preparing shard 39" in t, 120, "the script's output in the panel")
        frames_with_metric_lines = coloured_frames = 0
        deadline = time.monotonic() + 240
        while child.isalive() and time.monotonic() < deadline:
            screen.pump(0.3)
            frames_with_metric_lines += "{'loss'" in screen.text()
            coloured_frames += screen.has_colour()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        if child.isalive():
            child.terminate(force=True)
    child.close()
    assert child.exitstatus == 0, screen.text()
    _assert_last_frame(screen.text(), "COMPLETED")
    assert coloured_frames == 0 and not screen.has_colour()  # NO_COLOR: styles (bold, dim) only
    # The Trainer's metric lines, printed under its progress bars, stay out of the panel: child.log has them.
    assert frames_with_metric_lines == 0
    assert (project_dir / "docs/reports/t/child.log").read_text().count("{'loss'") == 12


@pytest.mark.parametrize("how", ["the window closes", "kill -HUP"])
def test_closing_the_terminal_stops_the_run_and_still_writes_its_record(project_dir, how):
    """The window is closed (or the ssh connection drops): kaio gets SIGHUP from the terminal it draws on. It
    stops the run as a Ctrl-C would, writes nothing more to the dead terminal, and leaves a whole record and no
    process (it used to die at once, leaving the training running unseen and the record as of that moment). A
    `kill -HUP` with the terminal still there stops it the same way, and the terminal is left as it was."""
    light = REPO / "tests" / "scripts" / "light_loop.py"
    (project_dir / "cfg.yaml").write_text(
        f"project_name: t\nlaunch:\n  script: {light}\n  script_args: ['100000', '--step-seconds', '0.02']\n"
        "  grace_seconds: 5\nreporting:\n  use_comet_ml: false\n  poll_hz: 4\n"
    )
    # COLUMNS and LINES exported from another window: the dashboard is drawn at the terminal's own size.
    child, screen = _spawn_kaio(project_dir, 100, 30, COLUMNS="160", LINES="50")
    screen.wait_for(lambda text: "RUNNING" in text and "╭─ training" in text, 60, "the run training")
    rows = screen.text().splitlines()
    assert any(r.startswith("╭─ training") and r.rstrip().endswith("╮") for r in rows), screen.text()
    family = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
    try:
        if how == "kill -HUP":
            child.kill(signal.SIGHUP)
            screen.wait_for(lambda text: "[kaio] t INTERRUPTED:" in text, 60, "the last line, on the terminal")
            child.expect(pexpect.EOF, timeout=30)
            echo = child.getecho()  # the terminal's echo, given back
            child.close()
            assert child.exitstatus == 143 and echo
            note = "SIGHUP (a kill -HUP; the terminal is still there): stopping gracefully"
        else:
            os.close(child.child_fd)  # the terminal goes away: the kernel hangs it up
            child.child_fd, child.closed = -1, True
            _, status = os.waitpid(child.pid, 0)
            assert os.waitstatus_to_exitcode(status) == 143
            note = "the terminal closed (SIGHUP): stopping gracefully"
        _gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive
    finally:
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.kill()
    history = json.loads((project_dir / "docs/reports/t/history.json").read_text())
    assert history["status"] == "INTERRUPTED" and history["sessions"][0]["status"] == "INTERRUPTED"
    assert any(n.startswith(note) for n in history["telemetry"]["notes"]), history["telemetry"]["notes"]
    assert (project_dir / "docs/reports/t/report.md").is_file()

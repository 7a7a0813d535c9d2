"""The live dashboard in a real pseudo-terminal, read back through a terminal emulator (pyte)."""

from __future__ import annotations

import json
import os
import sys
import time

import pexpect
import psutil
import pyte

from conftest import write_config

COLUMNS, LINES = 120, 40


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

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def wait_for(self, predicate, seconds: float, what: str) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump(0.3)
            if predicate(self.text()):
                return self.text()
        raise AssertionError(f"never saw {what} on screen:\n{self.text()}")


def _spawn_kaio(project_dir, columns: int, lines: int) -> tuple[pexpect.spawn, Screen]:
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(lines)}
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


def test_dashboard_shows_progress_and_host_row_then_ctrl_c_interrupts_cleanly(project_dir):
    write_config(project_dir, max_steps=5000, save_steps=10000)
    child, screen = _spawn_kaio(project_dir, COLUMNS, LINES)
    try:
        # Live redraws in place: wait for a frame that holds everything at once.
        wanted = ("RUNNING", "/5000", "loss", "━", "host (no GPU)")  # status, step count, bar, the CPU-only row
        screen.wait_for(lambda t: all(w in t for w in wanted), 120, f"all of {wanted}")
        family = psutil.Process(child.pid).children(recursive=True)
        assert family
        child.sendcontrol("c")  # the terminal sends SIGINT to kaio; the child is in its own session
        screen.pump(15)
        child.expect(pexpect.EOF, timeout=60)
    finally:
        if child.isalive():
            child.terminate(force=True)
    _assert_last_frame(screen.text(), "INTERRUPTED")
    assert "with checkpoint-" in screen.text() and "saved: `kaio resume t` continues from step" in screen.text()
    child.close()
    assert child.exitstatus not in (None, 0)
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    history = json.loads((project_dir / "docs/reports/t/history.json").read_text())
    assert history["status"] == "INTERRUPTED" and len(history["steps"]) > 0


def test_last_frame_fits_a_small_terminal(project_dir):
    write_config(project_dir, max_steps=40)
    child, screen = _spawn_kaio(project_dir, 80, 24)
    try:
        screen.pump(240)
        child.expect(pexpect.EOF, timeout=30)
    finally:
        if child.isalive():
            child.terminate(force=True)
    child.close()
    assert child.exitstatus == 0, screen.text()
    _assert_last_frame(screen.text(), "COMPLETED")


def test_not_a_terminal_prints_plain_lines_and_honours_no_color(project_dir):
    from conftest import kaio

    write_config(project_dir, max_steps=40)
    result = kaio("run", "cfg.yaml", cwd=project_dir, env={"NO_COLOR": "1"})
    assert result.returncode == 0
    status_lines = [line for line in result.stdout.splitlines() if line.startswith("[kaio] t ")]
    assert status_lines and status_lines[-1].startswith("[kaio] t COMPLETED: 40/40 steps")
    assert "\x1b" not in result.stdout

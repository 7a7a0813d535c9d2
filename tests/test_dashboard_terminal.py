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
    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child
        self.screen = pyte.Screen(COLUMNS, LINES)
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


def test_dashboard_shows_progress_and_host_row_then_ctrl_c_interrupts_cleanly(project_dir):
    write_config(project_dir, max_steps=5000, save_steps=10000)
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(LINES)}
    child = pexpect.spawn(
        sys.executable, ["-m", "kaio", "run", "cfg.yaml"], cwd=str(project_dir), env=env, dimensions=(LINES, COLUMNS)
    )
    screen = Screen(child)
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
    final = screen.text()
    assert "INTERRUPTED" in final
    child.close()
    assert child.exitstatus not in (None, 0)
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    history = json.loads((project_dir / "docs/reports/t/history.json").read_text())
    assert history["status"] == "INTERRUPTED" and len(history["steps"]) > 0


def test_not_a_terminal_prints_plain_lines_and_honours_no_color(project_dir):
    from conftest import kaio

    write_config(project_dir, max_steps=40)
    result = kaio("run", "cfg.yaml", cwd=project_dir, env={"NO_COLOR": "1"})
    assert result.returncode == 0
    status_lines = [line for line in result.stdout.splitlines() if line.startswith("[kaio] t ")]
    assert status_lines and status_lines[-1].startswith("[kaio] t COMPLETED: 40/40 steps")
    assert "\x1b" not in result.stdout

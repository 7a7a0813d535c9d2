"""What the supervisor does on a stall: every rank's stack captured, and the run stopped where the user asked.

The capture runs in a thread (asking each rank and waiting for its answer takes seconds: the dashboard goes on);
with ``reporting.on_stall: stop`` the run is stopped as by a Ctrl-C once the stacks are read, so that a rank of a
script without a Trainer, which dies of the stop's SIGTERM, has written its stack first.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from kaio import launch
from kaio.record.paths import ProjectPaths
from kaio.record.types import Record
from kaio.run.stalls import StallWatch, capture_stacks
from kaio.run.stopping import StopControl


class StallResponse:
    def __init__(
        self,
        paths: ProjectPaths,
        action: Literal["warn", "stop"],
        post: Callable[[Record], None],
        note: Callable[[str], None],
        stop: StopControl,
    ) -> None:
        self.paths = paths
        self.action = action  # reporting.on_stall
        self._post = post  # the captured stall, to the supervisor's queue
        self._note = note
        self._stop = stop
        self._capture: threading.Thread | None = None
        self._stop_after_capture: str | None = None  # what to say when stopping, once the stacks are read

    def check(
        self, proc: subprocess.Popen, watch: StallWatch, median_step_s: float | None, session: int, fifo_path: Path
    ) -> None:
        """One response per silence (``StallWatch.check`` says when a silence is a stall)."""
        if self._stop_after_capture is not None and not self.capturing:
            said, self._stop_after_capture = self._stop_after_capture, None
            if not self._stop.requested:
                self._note(said)
                self._stop.request(proc, because="reporting.on_stall is stop")
        check = watch.check(time.monotonic(), median_step_s)
        if check is None or proc.poll() is not None:
            return
        step, action, paths, post = watch.last_step, self.action, self.paths, self._post

        def capture() -> None:
            pids = {p.pid for p in launch.run_processes(fifo_path)}
            stall = capture_stacks(paths.stacks, paths.report_dir, session, pids, check, step)
            stall.action = action
            post(stall)

        self._capture = threading.Thread(target=capture, name="kaio-stall-stacks", daemon=True)
        self._capture.start()
        if action == "stop" and not self._stop.requested:  # once the stacks are read (above, at the next check)
            self._stop_after_capture = (
                f"reporting.on_stall is stop: stopping the run, stalled after step {step} ({check.phase})"
            )

    @property
    def capturing(self) -> bool:
        return self._capture is not None and self._capture.is_alive()

    def join(self, timeout: float) -> None:
        if self._capture is not None:
            self._capture.join(timeout=timeout)

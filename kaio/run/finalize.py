"""Where a run's record goes besides the journal: the report files, Comet ML, the Hub.

``RunOutputs`` decides *when* (during the run, at its end); the sinks decide
*how*. Neither a sink failure nor a slow network ever changes the run's exit
code or loses a local file: failures become lines in the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from kaio.config import RunConfig, config_snapshot
from kaio.run.state import COMPLETED, RunState

COMET_KEY_FILE = "comet.json"  # the experiment key, so a resume continues the same experiment
COMET_FEED_INTERVAL_S = 1.0
HUB_PUSH_TIMEOUT_S = 900.0  # huggingface_hub sets no timeout of its own on a stuck upload
HISTORY_REWRITE_GROWTH = 0.1  # during a run, history.json is rewritten once the steps grew by a tenth...
HISTORY_ALWAYS_REWRITTEN_BYTES = 64 << 20  # ...or while it is small


FIGURE_WAIT_S = 120.0  # the end of a run waits this long for its last telemetry.png


def write_reports(
    state: RunState, report_dir: Path, *, history_json: bool = True, figure: "FigureProcess | None" = None, wait: bool = True
) -> dict:
    """history.json (unless told not to), telemetry.png and report.md, atomically; returns the summary.

    The figure is drawn in this process, or by ``figure``'s child process when given (``wait``:
    until it is drawn, else in the background).
    """
    from kaio.report import write_reports as write

    history, tally = state.history(), state.report_tally()
    if figure is not None:
        figure.draw(history, tally, wait=wait)
    failed = [f"telemetry.png was not rendered: {figure.failure}"] if figure is not None and figure.failure else []
    chunks = state.step_chunks() if history_json else None
    return write(history, report_dir, tally=tally, step_chunks=chunks, history_json=history_json, png=figure is None, extra_warnings=failed)


class FigureProcess:
    """telemetry.png, drawn by a short-lived child process (``python -m kaio.report.plot``).

    In the supervisor, matplotlib and numpy would stay loaded for the whole run (~80 MB, most of
    its memory), and each drawing (~0.5 s) would hold up its loop: the dashboard, the queues.
    The child lowers its own priority, so on cores the training keeps busy it waits rather than
    slowing the training. A request while a drawing runs is skipped: the next refresh asks again
    with newer figures.
    """

    def __init__(self, report_dir: Path) -> None:
        self.png_path = report_dir / "telemetry.png"
        self._proc: subprocess.Popen | None = None
        self._job: str | None = None
        self._errors = None
        self.failure: str | None = None  # why the last finished drawing failed

    def draw(self, history: dict, tally, *, wait: bool = False) -> None:
        if self._proc is not None:
            if not wait and self._proc.poll() is None:
                return
            self._finish(FIGURE_WAIT_S)
        try:
            self._start(history, tally)
        except (OSError, ValueError) as exc:  # a full /tmp, no process to spare: the record goes on
            self.failure = f"could not start drawing it: {type(exc).__name__}: {exc}"
            self._cleanup()
            return
        if wait:
            self._finish(FIGURE_WAIT_S)

    def _start(self, history: dict, tally) -> None:
        from kaio.fsutil import json_safe

        fd, self._job = tempfile.mkstemp(prefix="kaio-figure-", suffix=".json")
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps({"history": json_safe(history), "tally": tally.to_dict()}, default=str).encode())
        self._errors = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "kaio.report.plot", self._job, str(self.png_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._errors,
            start_new_session=True,  # Ctrl-C is for the supervisor; it ends the drawing itself
        )

    def _cleanup(self) -> None:
        if self._job is not None and os.path.exists(self._job):  # the drawing deletes it once read
            os.unlink(self._job)
        self._job = None
        if self._errors is not None:
            self._errors.close()
            self._errors = None

    def _finish(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.failure = None
        if proc.returncode != 0:
            self._errors.seek(0)
            lines = self._errors.read().decode(errors="replace").strip().splitlines()
            self.failure = lines[-1] if lines else f"the drawing process exited with code {proc.returncode}"
        self._cleanup()

    def close(self) -> None:
        if self._proc is not None:
            self._finish(FIGURE_WAIT_S)


class LiveReports:
    """The reports rewritten at every refresh of a running session.

    report.md and the figure are small and rewritten each time. history.json holds every step
    (GBs after a day on 8 GPUs): copying it every refresh would become most of the supervisor's
    work and disk traffic, so it is rewritten once the steps have grown by a tenth, which keeps
    the bytes written over a run to about ten times its final size. ``kaio report`` writes it
    whenever asked, and the end of the run always does.
    """

    def __init__(self, report_dir: Path, figure: FigureProcess) -> None:
        self.report_dir = report_dir
        self.figure = figure
        self._history_bytes: int | None = None  # steps.jsonl's size at the last history.json

    def __call__(self, state: RunState) -> None:
        size = state.step_log.file_bytes
        due = (
            self._history_bytes is None
            or size < HISTORY_ALWAYS_REWRITTEN_BYTES
            or size >= self._history_bytes * (1 + HISTORY_REWRITE_GROWTH)
        )
        write_reports(state, self.report_dir, history_json=due, figure=self.figure, wait=False)
        if due:
            self._history_bytes = size


class RunOutputs:
    """Feeds the reports and Comet during a session, and finishes both (and the Hub push) after it."""

    def __init__(self, cfg: RunConfig, record: Callable[[dict], None], notify: Callable[[str], None], figure: FigureProcess | None = None) -> None:
        self.cfg = cfg
        self.figure = figure  # None: the figure is drawn in this process
        self.cancelled = False  # Ctrl-C while finishing: skip what goes over the network and can wait
        self.report_dir = cfg.report_dir
        self._record = record  # journal + state, so sink outcomes reach the report
        self._notify = notify
        self._comet = None
        self._comet_unsent: list[dict] = []  # sealed steps not yet sent
        self._comet_next_feed = 0.0
        self._comet_messages_shown = 0

    # -- during the run ----------------------------------------------------

    def start(self, state: RunState) -> None:
        if not self.cfg.reporting.use_comet_ml:
            return  # comet_ml is not even imported
        from kaio.sinks.comet import CometSink

        key_file = self.report_dir / COMET_KEY_FILE
        stored = json.loads(key_file.read_text()).get("experiment_key") if key_file.is_file() else None
        self._comet = CometSink.start(
            project=self.cfg.project_name, report_dir=self.report_dir, params=config_snapshot(self.cfg), experiment_key=stored
        )
        if stored is None:
            from kaio.fsutil import atomic_write_json

            atomic_write_json(key_file, {"experiment_key": self._comet.experiment_key})
        for message in self._comet.messages:
            self._notify(message)
        self._comet_messages_shown = len(self._comet.messages)
        # Each step goes to Comet once it is final (sealed). Steps of earlier sessions were sent by
        # their own kaio process; a resume's retrained steps are sealed, and sent, again.
        state.sealed_listeners.append(self._comet_unsent.append)

    def feed(self, state: RunState, *, final: bool = False) -> None:
        """Send Comet the steps sealed since the last call, at most once a second."""
        if self._comet is None:
            return
        now = time.monotonic()
        if not final and now < self._comet_next_feed:
            return
        self._comet_next_feed = now + COMET_FEED_INTERVAL_S
        unsent, self._comet_unsent[:] = list(self._comet_unsent), []
        for entry in unsent:
            self._comet.log_step(entry)

    # -- after the run -----------------------------------------------------

    def finish(self, state: RunState) -> None:
        """Final reports, Comet's assets and end, then the Hub push of a completed run.

        The reports are written before the sinks take them, and once more after,
        so that the sinks' outcomes (Comet's archive, the Hub commit) are in them.
        """
        summary = write_reports(state, self.report_dir, figure=self.figure)
        if self._comet is not None:
            self.feed(state, final=True)
            self._comet.log_assets([self.report_dir / n for n in ("report.md", "telemetry.png", "history.json")])
            self._comet.end()
            for message in self._comet.messages[self._comet_messages_shown :]:
                self._notify(message)
                self._record({"type": "note", "level": "info", "text": message})
            for warning in self._comet.warnings:
                self._record({"type": "note", "text": warning})
        if self.cfg.hub.push and state.status == COMPLETED:
            push_to_hub(self.cfg, state, summary, self._record, self._notify, cancelled=lambda: self.cancelled)
        write_reports(state, self.report_dir, figure=self.figure)


def push_to_hub(
    cfg: RunConfig,
    state: RunState,
    summary: dict,
    record: Callable[[dict], None],
    notify: Callable[[str], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> bool:
    """Upload the final adapter, a model card and the report files already written (``summary`` is
    theirs); the outcome goes into the journal."""
    from kaio.sinks.hub import push_adapter

    adapter_dir = cfg.checkpoint_dir / "final"
    card = _card_summary(state, summary)
    notify(f"pushing the adapter to the Hugging Face Hub: {cfg.hub.repo_id}")
    outcome: dict = {}

    def push() -> None:
        outcome["result"] = push_adapter(
            repo_id=cfg.hub.repo_id,
            private=cfg.hub.private,
            adapter_dir=adapter_dir,
            report_dir=cfg.report_dir,
            card_markdown=card,
            base_model=cfg.model.base_model,
            endpoint=os.environ.get("HF_ENDPOINT"),  # a private Hub mirror; None: huggingface.co
        )

    worker = threading.Thread(target=push, name="kaio-hub-push", daemon=True)
    worker.start()
    deadline = time.monotonic() + HUB_PUSH_TIMEOUT_S
    while worker.is_alive() and time.monotonic() < deadline and not cancelled():
        worker.join(0.2)
    result = outcome.get("result")
    if result is None:
        why = "interrupted (Ctrl-C); retry with `kaio push`" if cancelled() else f"no answer from the Hub within {HUB_PUSH_TIMEOUT_S:.0f} s"
        entry = {"repo_id": cfg.hub.repo_id, "commit_sha": None, "url": None, "adapter_config_url": None,
                 "error": f"push failed: {why}"}
    else:
        entry = {k: getattr(result, k) for k in ("repo_id", "commit_sha", "url", "adapter_config_url", "error")}
    record({"type": "hub", "t_wall": time.time(), **entry})
    notify(entry["error"] or f"pushed to {entry['url']} at commit {entry['commit_sha']}")
    return entry["error"] is None


def _card_summary(state: RunState, summary: dict) -> str:
    """A few lines of the report for the model card."""
    lines = [
        f"Fine-tuned under kaio as project `{state.project}`: "
        f"{state.last_step} optimizer steps, status {state.status}.",
        "",
    ]
    for label, key in (("Initial loss", "loss_initial"), ("Final loss", "loss_final"), ("Duration (h)", "duration_h")):
        value = summary.get(key)
        if value is not None:
            lines.append(f"- {label}: {value:.4g}" if isinstance(value, (int, float)) else f"- {label}: {value}")
    lines.append("")
    lines.append("The full training report is in `kaio-report/report.md`.")
    return "\n".join(lines)

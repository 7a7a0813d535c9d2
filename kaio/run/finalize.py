"""Where a run's record goes besides the journal and the index: the report files, Comet ML, the Hub.

``RunOutputs`` decides *when* (during the run, at its end); the sinks decide
*how*. Neither a sink failure nor a slow network ever changes the run's exit
code or loses a local file: failures become lines in the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

import msgspec

from kaio.config import RunConfig, config_snapshot
from kaio.record.paths import ProjectPaths
from kaio.record.types import HubOutcome, Note, Record, Status
from kaio.report.figure_data import FigureData
from kaio.report.summary import Summary
from kaio.run.state import RunState

if TYPE_CHECKING:
    from kaio.run.job import NodeRecords
    from kaio.sinks.comet import CometSink

COMET_FEED_INTERVAL_S = 1.0
HUB_PUSH_TIMEOUT_S = 900.0  # huggingface_hub sets no timeout of its own on a stuck upload
FIGURE_WAIT_S = 120.0  # the end of a run waits this long for its last telemetry.png
HEAVY_REFRESH_S = 60.0  # during a run, history.json and telemetry.png are rewritten at most this often...
HEAVY_REFRESH_SHARE = 0.01  # ...and so that their writing takes at most 1% of the time


def write_reports(
    state: RunState,
    report_dir: Path,
    *,
    history_json: bool = True,
    figure: FigureProcess | None = None,
    draw: bool = True,
    wait: bool = True,
    nodes: NodeRecords | None = None,
    uploading: HubOutcome | None = None,
) -> Summary:
    """report.md, and history.json and telemetry.png unless told not to, atomically; returns the summary.
    ``uploading``: the files are the ones a Hub push uploads (their Hub section is that push's).

    The figure is drawn in this process, or by ``figure``'s child process when given, on the other core
    while the rest is written (``wait``: the drawing is finished before this returns; else a drawing
    still going is left to finish and a new one is skipped). history.json (GBs on a long run) is not
    written again when nothing has happened since it was and the file is as it was left.
    """
    from kaio.report.figure_data import figure_data
    from kaio.report.history import write_reports as write

    history = ProjectPaths(report_dir).history
    mark = _history_mark(state, history)
    if history_json and mark is not None and state.parts.history_mark == mark and nodes is None and not uploading:
        history_json = False
    header = state.header(uploading)
    failed = [f"telemetry.png was not rendered: {figure.failure}"] if figure is not None and figure.failure else []
    with state.with_open_steps() as index:
        merged = None
        if nodes is not None:  # a job of several machines: every node's steps and GPUs in the one report
            from kaio.run.job import merge

            header, merged = merge(header, index, nodes)
        try:
            view = merged or index
            if draw and figure is not None:
                figure.draw(figure_data(header, view), replace=wait)
            summary, prefix = write(
                header,
                view,
                report_dir,
                history_json=history_json,
                png=draw and figure is None,
                extra_warnings=failed,
                final_through=0 if merged else state.parts.steps.sealed_through,
                previous=None if merged else state.parts.history_prefix,
            )
        finally:
            if merged is not None:
                merged.close()
    if history_json and uploading is None:  # the project's own history.json (not a push's staged copy)
        state.parts.history_mark = _history_mark(state, history)
        state.parts.history_prefix = prefix
    if draw and figure is not None and wait:
        figure.close()
    return summary


def _history_mark(state: RunState, path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return state.parts.records, stat.st_size, stat.st_mtime_ns


class FigureProcess:
    """telemetry.png, drawn by a child process (``python -m kaio.report.plot PNG``, the figure's data on stdin).

    In the supervisor, matplotlib and numpy would stay loaded for the whole run (~80 MB, most of
    its memory), and each drawing would hold up its loop: the dashboard, the queues. The child
    lowers its own priority, so on cores the training keeps busy it waits rather than slowing the
    training. ``warm`` starts it ahead of time: it imports matplotlib while the data is gathered, so
    the last figure of a run (or of ``kaio report``) is drawn on the other core at once. A request
    while a drawing runs is skipped: the next refresh asks again with newer figures.
    """

    def __init__(self, report_dir: Path) -> None:
        self.png_path = ProjectPaths(report_dir).figure
        self._proc: subprocess.Popen | None = None
        self._fed = False  # the child has its data: it is drawing, or has drawn
        self._errors: IO[bytes] | None = None
        self.failure: str | None = None  # why the last finished drawing failed

    def warm(self) -> None:
        """Start a drawing process now, to be given its data later."""
        if self._proc is None:
            try:
                self._start()
            except OSError as exc:  # no process to spare: draw() says so
                self.failure = f"could not start drawing it: {type(exc).__name__}: {exc}"

    def draw(self, data: FigureData, *, replace: bool = False) -> None:
        """Draw ``data`` in the background. A drawing still going is waited for (``replace``: the final
        figure must be the newest), or else it goes on and this one is skipped."""
        if self._proc is not None and self._fed:
            if not replace and self._proc.poll() is None:
                return
            self._finish(FIGURE_WAIT_S)
        try:
            if self._proc is None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(msgspec.json.encode(data))
            self._proc.stdin.close()
            self._fed = True
        except (OSError, ValueError) as exc:  # no process to spare, or it died: the record goes on
            self.failure = f"could not start drawing it: {type(exc).__name__}: {exc}"
            self._finish(FIGURE_WAIT_S)

    def rewarm(self) -> None:
        """Once a drawing has ended, start the next process, so that the next drawing finds it warm."""
        if self._proc is not None and self._fed and self._proc.poll() is not None:
            self._finish(0)
            self.warm()

    def _start(self) -> None:
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115 - the drawing's stderr, read when it ends
        self._fed = False
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "kaio.report.plot", str(self.png_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._errors,
            start_new_session=True,  # Ctrl-C is for the supervisor; it ends the drawing itself
        )

    def _finish(self, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if not self._fed and proc.stdin is not None:
            proc.stdin.close()  # a warm process never given data: it ends without drawing
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._fed:
            self.failure = None
            if proc.returncode != 0 and self._errors is not None:
                self._errors.seek(0)
                lines = self._errors.read().decode(errors="replace").strip().splitlines()
                self.failure = lines[-1] if lines else f"the drawing process exited with code {proc.returncode}"
        if self._errors is not None:
            self._errors.close()
            self._errors = None

    def close(self) -> None:
        """Wait for the drawing going on, if any (``failure`` then says whether it worked)."""
        self._finish(FIGURE_WAIT_S)


class LiveReports:
    """The reports rewritten while a session runs.

    report.md is small and rewritten at every refresh. history.json holds every
    step (GBs after a day on 8 GPUs) and telemetry.png costs a drawing process:
    both are rewritten at most every ``HEAVY_REFRESH_S``, and less often when
    writing them would take more than ``HEAVY_REFRESH_SHARE`` of the time. The
    end of the run and ``kaio report`` always write all three.
    """

    def __init__(self, report_dir: Path, figure: FigureProcess) -> None:
        self.report_dir = report_dir
        self.figure = figure
        # The first a minute in: a shorter run gets its figure only at the end, from the warm process.
        self._next_heavy = time.monotonic() + HEAVY_REFRESH_S

    def __call__(self, state: RunState) -> None:
        if state.index.failed is not None:
            return  # it misses steps until the end of the run rebuilds it: no report from it until then
        started = time.monotonic()
        heavy = started >= self._next_heavy
        if not heavy:
            self.figure.rewarm()
        write_reports(state, self.report_dir, history_json=heavy, figure=self.figure, draw=heavy, wait=False)
        if heavy:
            took = time.monotonic() - started
            self._next_heavy = time.monotonic() + max(HEAVY_REFRESH_S, took / HEAVY_REFRESH_SHARE)


class RunOutputs:
    """Feeds Comet during a session, and finishes the reports, Comet and the Hub push after it."""

    def __init__(
        self,
        cfg: RunConfig,
        record: Callable[[Record], None],
        notify: Callable[[str], None],
        figure: FigureProcess | None = None,
        stream_gone: Callable[[str], float | None] | None = None,
    ) -> None:
        self.cfg = cfg
        self._stream_gone = stream_gone  # the head's stream: how long a node's kaio has been gone (kaio.run.stream)
        self.paths = ProjectPaths(cfg.report_dir)
        self.figure = figure  # None: the figure is drawn in this process
        self.cancelled = False  # Ctrl-C while finishing: skip what goes over the network and can wait
        self._record = record  # journal + state, so sink outcomes reach the report
        self._notify = notify
        self._comet: CometSink | None = None
        self._comet_unsent: list = []  # sealed steps and evaluations not yet sent
        self._comet_next_feed = 0.0
        self._comet_messages_shown = 0

    # -- during the run ----------------------------------------------------

    def start(self, state: RunState) -> None:
        if not self.cfg.reporting.use_comet_ml:
            return  # comet_ml is not even imported
        from kaio.fsutil import atomic_write_json
        from kaio.sinks.comet import CometSink

        key_file = self.paths.comet_key
        stored = json.loads(key_file.read_text()).get("experiment_key") if key_file.is_file() else None
        params = config_snapshot(self.cfg)
        if self.cfg.launch.own_code is not None:  # the built-in recipe's sections: not what a script trains with
            params = {key: value for key, value in params.items() if key not in _RECIPE_SECTIONS}
        self._comet = CometSink.start(
            project=self.cfg.project_name, report_dir=self.paths.report_dir, params=params, experiment_key=stored
        )
        if stored is None:
            atomic_write_json(key_file, {"experiment_key": self._comet.experiment_key})
        for message in self._comet.messages:
            self._notify(message)
        self._comet_messages_shown = len(self._comet.messages)
        # Each step goes to Comet once it is final (sealed). Steps of earlier sessions were sent by
        # their own kaio process; a resume's retrained steps are sealed, and sent, again.
        state.sealed_listeners.append(self._comet_unsent.append)
        state.eval_listeners.append(self._comet_unsent.append)

    def feed(self, state: RunState, *, final: bool = False) -> None:
        """Send Comet the steps and evaluations final since the last call, at most once a second."""
        if self._comet is None:
            return
        now = time.monotonic()
        if not final and now < self._comet_next_feed:
            return
        self._comet_next_feed = now + COMET_FEED_INTERVAL_S
        unsent, self._comet_unsent[:] = list(self._comet_unsent), []
        for entry in unsent:
            if hasattr(entry, "loss_smoothed"):
                self._comet.log_step(entry)
            else:
                self._comet.log_eval(entry)

    # -- after the run -----------------------------------------------------

    def finish(self, state: RunState) -> Summary:
        """Final reports, Comet's assets and end, then the Hub push of a completed run.

        The reports are written before the sinks take them, and once more after,
        so that the sinks' outcomes (Comet's archive, the Hub commit) are in them.
        """
        nodes = self._job_nodes(state)
        summary = write_reports(state, self.paths.report_dir, figure=self.figure, nodes=nodes)
        records_before_sinks = state.parts.records
        if self._comet is not None:
            self.feed(state, final=True)
            trained = _what_was_trained(state)
            if trained:
                self._comet.log_params({"trained": trained})
            if summary.nodes:
                self._comet.log_nodes(summary.nodes)
            self._comet.log_assets(list(self.paths.report_files))
            self._comet.end()
            for warning in self._comet.warnings:
                self._notify(f"warning: {warning}")
                self._record(Note(text=warning, t_wall=time.time()))
            for message in self._comet.messages[self._comet_messages_shown :]:
                self._notify(message)
                self._record(Note(text=message, level="info", t_wall=time.time()))
        if self.cfg.hub.push and state.status == Status.COMPLETED:
            push_to_hub(
                self.cfg, state, summary, self._record, self._notify, cancelled=lambda: self.cancelled, nodes=nodes
            )
        if state.parts.records == records_before_sinks:
            return summary
        # The sinks' outcomes go into report.md and history.json; the figure does not show them.
        return write_reports(state, self.paths.report_dir, figure=self.figure, draw=False, nodes=nodes)

    def _job_nodes(self, state: RunState) -> NodeRecords | None:
        """On the head of a job of several machines: the other nodes' records, once they have closed (bounded).
        Whatever goes wrong there costs the job's merge, never the head's own report."""
        launch = self.cfg.launch
        if launch.nnodes < 2 or launch.node_rank != 0:
            return None
        from kaio.run.job import load_nodes, node_folders, wait_for_nodes

        try:
            wait_for_nodes(self.paths, self._notify, stream_gone=self._stream_gone)
            nodes = load_nodes(node_folders(self.paths), state.ledger.config, notify=self._notify)
        except Exception as exc:  # an unreadable nodes/ folder: the head's record stands alone
            said = f"the other nodes' records were not merged: {type(exc).__name__}: {exc}"
            self._notify(f"warning: {said}")
            self._record(Note(text=said, t_wall=time.time()))
            return None
        return nodes  # its problems are the job's warnings: said with the others at the end (kaio.run.project)


_RECIPE_SECTIONS = ("model", "lora", "data", "training")


def _what_was_trained(state: RunState) -> dict:
    """The training's own arguments and model, as its process described them (the config's are kaio's)."""
    run = state.ledger.run
    if run is None:
        return {}
    trained: dict = {"trainer": run.trainer, "world_size": run.world_size, **msgspec.to_builtins(run.args)}
    if run.model is not None:
        trained["model"] = msgspec.to_builtins(run.model)
    return {key: value for key, value in trained.items() if value is not None}


def push_to_hub(
    cfg: RunConfig,
    state: RunState,
    summary: Summary,
    record: Callable[[Record], None],
    notify: Callable[[str], None],
    cancelled: Callable[[], bool] = lambda: False,
    nodes: NodeRecords | None = None,
) -> bool:
    """Upload the final adapter, a model card and the report files (``summary`` is theirs; ``nodes``: a job's
    other nodes, merged into them); the outcome goes into the journal."""
    from kaio.sinks.hub import push_adapter

    adapter_dir = cfg.checkpoint_dir / "final"
    card = _card_summary(state, summary)
    model = state.ledger.run.model if state.ledger.run else None
    base_model = (model.name_or_path if model else None) or cfg.model.base_model
    notify(f"pushing the adapter to the Hugging Face Hub: {cfg.hub.repo_id}")
    staged = _staged_reports(cfg, state, nodes)
    pushed: dict = {}

    def push() -> None:
        pushed["result"] = push_adapter(
            repo_id=cfg.hub.repo_id or "",  # set: the config requires it when pushing
            private=cfg.hub.private,
            adapter_dir=adapter_dir,
            report_dir=staged,
            card_markdown=card,
            base_model=base_model,
            endpoint=os.environ.get("HF_ENDPOINT"),  # a private Hub mirror; None: huggingface.co
        )

    worker = threading.Thread(target=push, name="kaio-hub-push", daemon=True)
    worker.start()
    deadline = time.monotonic() + HUB_PUSH_TIMEOUT_S
    while worker.is_alive() and time.monotonic() < deadline and not cancelled():
        worker.join(0.2)
    if not worker.is_alive():  # else an upload still reads them (past its time, or cut short): left to the OS
        shutil.rmtree(staged, ignore_errors=True)
    result = pushed.get("result")
    if result is None:
        why = (
            "interrupted (Ctrl-C); retry with `kaio push`"
            if cancelled()
            else f"no answer from the Hub within {HUB_PUSH_TIMEOUT_S:.0f} s"
        )
        outcome = HubOutcome(repo_id=cfg.hub.repo_id, error=f"push failed: {why}", t_wall=time.time())
    else:
        outcome = HubOutcome(
            repo_id=result.repo_id,
            commit_sha=result.commit_sha,
            url=result.url,
            adapter_config_url=result.adapter_config_url,
            error=result.error,
            t_wall=time.time(),
        )
    record(outcome)
    notify(outcome.error or f"pushed to {outcome.url} at commit {outcome.commit_sha}")
    return outcome.error is None


def _staged_reports(cfg: RunConfig, state: RunState, nodes: NodeRecords | None) -> Path:
    """The report files a push uploads, in a temp folder: of this push (their Hub section says 'the commit that
    uploaded this report'), not of the record's latest outcome (an earlier commit, or the failure it retries). The
    project's own files stay as they are: a push cut short leaves them true."""
    from kaio.sinks.hub import repo_url

    repo_id = cfg.hub.repo_id or ""
    uploading = HubOutcome(repo_id=repo_id, url=repo_url(repo_id), uploading=True)
    staged = Path(tempfile.mkdtemp(prefix="kaio-push-"))
    write_reports(state, staged, draw=False, nodes=nodes, uploading=uploading)
    figure = ProjectPaths(cfg.report_dir).figure
    if figure.is_file():
        shutil.copyfile(figure, ProjectPaths(staged).figure)
    return staged


def _card_summary(state: RunState, summary: Summary) -> str:
    """A few lines of the report for the model card."""
    lines = [
        f"Fine-tuned under kaio as project `{state.project}`: "
        f"{state.last_step} optimizer steps, status {state.status.value}.",
        "",
    ]
    hours = None if summary.training_time_s is None else summary.training_time_s / 3600
    for label, value in (
        ("Initial loss", summary.loss_initial),
        ("Final loss", summary.loss_final),
        ("Duration (h)", hours),
    ):
        if value is not None:
            lines.append(f"- {label}: {value:.4g}")
    lines.append("")
    lines.append("The full training report is in `kaio-report/report.md`.")
    return "\n".join(lines)

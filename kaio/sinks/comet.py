"""Comet ML: the run's parameters, per-step metrics and final report files, fed by the supervisor.

With ``COMET_API_KEY`` the data goes to an online experiment; without it, to Comet's offline
archive under ``<report_dir>/comet/``, to upload later with ``comet upload <zip>``. A resumed
run passes the stored ``experiment_key`` and continues the same experiment.

Comet must never cost the training anything. One background thread owns the experiment and
makes every comet_ml call, so an unreachable server (creating an online experiment retries
for about 30 s) never blocks the supervisor; each call is wrapped, the first failure becomes
a line in ``warnings`` and switches the sink off, and ``end()`` waits a bounded time.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kaio.record.types import EvalEntry, NodeSummary, StepEntry
from kaio.secrets import redact

# Step entry fields sent as Comet metrics, under their history.json names (units are in the names).
STEP_METRICS = (
    "loss",
    "loss_smoothed",
    "learning_rate",
    "grad_norm",
    "vram_peak_bytes",
    "power_avg",
    "util",
    "temp",
    "energy_j",
    "epoch",
)
DEFAULT_END_TIMEOUT_S = 30.0
ASSET_MAX_BYTES = 64_000_000  # history.json of a run of ~20k steps on 8 GPUs; the larger ones are not attached

# comet_ml reads these only while it is being imported; kaio's defaults unless the user set them.
_IMPORT_TIME_DEFAULTS = {
    # Comet's own crash reporting opens network connections of its own.
    "COMET_ERROR_TRACKING_ENABLE": "false",
    # Import hooks that patch torch, keras... for auto-logging; the supervisor trains nothing.
    "COMET_DISABLE_AUTO_LOGGING": "1",
    # Comet's INFO lines would tear through the live dashboard; kaio reports what matters itself.
    "COMET_LOGGING_CONSOLE": "ERROR",
}
# Nothing collected behind kaio's back: code, git, argv, environment and host details can hold
# secrets, and system-metric threads cost time.
_QUIET = dict(
    log_code=False,
    log_graph=False,
    auto_param_logging=False,
    auto_metric_logging=False,
    parse_args=False,
    auto_output_logging=False,
    log_env_details=False,
    log_env_gpu=False,
    log_env_cpu=False,
    log_env_host=False,
    log_env_disk=False,
    log_git_metadata=False,
    log_git_patch=False,
    display_summary_level=0,
)
_QUIET_ONLINE = dict(_QUIET, log_env_network=False, auto_log_co2=False)  # options only online classes take
_MAX_PENDING_CALLS = 10_000  # ~ that many steps queued behind a stuck call: give up rather than grow
_MAX_DETAIL_CHARS = 200
_STOP = object()


def _never_raises(what: str) -> Callable:
    """Turn any exception of a public sink method into a warning that switches the sink off."""

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def guarded(self: CometSink, *args: Any, **kwargs: Any) -> None:
            try:
                method(self, *args, **kwargs)
            except Exception as exc:
                self._fail(what, _describe(exc))

        return guarded

    return decorate


class CometSink:
    """One Comet experiment, fed from the supervisor's thread. Create it with :meth:`start`.

    ``messages`` (what the user should know, e.g. where the offline archive is) and ``warnings``
    (what went wrong) may grow while the sink works: read them after :meth:`end`.
    """

    def __init__(self, *, experiment_key: str, offline: bool, api_key: str | None) -> None:
        self.experiment_key = experiment_key
        self.offline = offline
        self.messages: list[str] = []
        self.warnings: list[str] = []
        self._api_key = api_key
        self._calls: queue.Queue = queue.Queue(maxsize=_MAX_PENDING_CALLS)
        self._disabled = False
        self._ended = False
        self._worker: threading.Thread | None = None
        self._start_errors = _ErrorLines()  # what comet_ml logged while the experiment started (its worker's)

    @classmethod
    def start(
        cls,
        *,
        project: str,
        report_dir: Path,
        params: dict,
        experiment_key: str | None,
        env: Mapping[str, str] = os.environ,
    ) -> CometSink:
        """Start (or, given ``experiment_key``, continue) the run's experiment; never raises.

        Returns at once: the experiment is created on the sink's thread. A sink that could not
        start says why in ``warnings`` and ignores further calls.
        """
        api_key = env.get("COMET_API_KEY") or None
        sink = cls(experiment_key=experiment_key or uuid.uuid4().hex, offline=api_key is None, api_key=api_key)
        try:
            comet_ml = _import_comet_ml(env)
            settings = dict(
                project_name=env.get("COMET_PROJECT_NAME") or project,
                workspace=env.get("COMET_WORKSPACE") or None,
                experiment_key=sink.experiment_key,
            )
            archive_dir = Path(report_dir) / "comet"
            offline_class = comet_ml.ExistingOfflineExperiment if experiment_key else comet_ml.OfflineExperiment
            create_offline = functools.partial(offline_class, offline_directory=str(archive_dir), **settings, **_QUIET)
            if sink.offline:
                archive_dir.mkdir(parents=True, exist_ok=True)
                create: Callable[[], Any] = create_offline
                sink.messages.append(
                    f"Comet ML: no COMET_API_KEY, logging offline to {archive_dir} "
                    "(upload later with `comet upload <zip>`)"
                )
            else:
                experiment_class = comet_ml.ExistingExperiment if experiment_key else comet_ml.Experiment
                online = functools.partial(experiment_class, api_key=api_key, **settings, **_QUIET_ONLINE)
                server = _server_url(sink._api_key or "", env)
                create = functools.partial(sink._online_or_offline, online, create_offline, server, archive_dir, env)
        except Exception as exc:
            sink._fail("setting up comet_ml", _describe(exc))
            return sink
        sink._worker = threading.Thread(target=sink._work, args=(create, project), name="kaio-comet", daemon=True)
        sink._worker.start()
        sink.log_params(params)
        return sink

    @_never_raises("logging parameters")
    def log_params(self, params: dict) -> None:
        """Log ``params`` (nested dicts allowed) with values of secret-looking keys redacted."""
        clean = redact(params)  # copied now: the caller may change params later
        self._submit("logging parameters", lambda experiment: experiment.log_parameters(clean))

    @_never_raises("tagging the nodes")
    def log_nodes(self, nodes: list[NodeSummary]) -> None:
        """A job of several machines, one experiment: tagged ``nodes:N`` and ``node<k>:<host>``, and each
        node's figures as "other" values (``node1|status``, ``node1|energy_kwh``...)."""
        tags = [f"nodes:{len(nodes)}"] + [f"node{n.node_rank}:{n.host or 'unknown'}" for n in nodes]
        others: dict[str, Any] = {}
        for n in nodes:
            figures = {
                "host": n.host,
                "status": n.status,
                "gpus": len(n.gpus),
                "energy_kwh": n.energy_j / 3.6e6 if n.energy_j is not None else None,
                "power_avg_w": n.power_avg_w,
                "vram_peak_bytes": n.vram_peak_bytes,
                "clock_offset_ms": n.clock_offset_s * 1000 if n.clock_offset_s is not None else None,
            }
            others.update({f"node{n.node_rank}|{k}": v for k, v in figures.items() if v is not None})

        def log(experiment: Any) -> None:
            experiment.add_tags(tags)
            experiment.log_others(others)

        self._submit("tagging the nodes", log)

    @_never_raises("logging a step")
    def log_step(self, entry: StepEntry) -> None:
        """Log a step entry's metrics (and every other number the Trainer logged) at its step; missing values are skipped."""
        step = entry.step
        metrics = {name: float(value) for name in STEP_METRICS if _is_finite_number(value := getattr(entry, name))}
        metrics.update((name, value) for name, value in entry.metrics.items() if name not in metrics)
        if metrics:
            self._submit(f"logging step {step}", lambda experiment: experiment.log_metrics(metrics, step=step))

    @_never_raises("logging an evaluation")
    def log_eval(self, entry: EvalEntry) -> None:
        """Log an evaluation's metrics (``eval_loss``...) at its step. One after the training ended (the script's
        evaluate(), of the best checkpoint's weights after load_best_model_at_end) is named apart
        (``after_training/eval_loss``): at the last step's number, its chart read as the training's going back up."""
        prefix = "after_training/" if entry.after_training else ""
        metrics = {f"{prefix}{name}": value for name, value in entry.metrics.items() if value is not None}
        if metrics:
            self._submit(
                f"logging the evaluation at step {entry.step}",
                lambda experiment: experiment.log_metrics(metrics, step=entry.step),
            )

    @_never_raises("logging the report files")
    def log_assets(self, paths: list[Path], max_bytes: int = ASSET_MAX_BYTES) -> None:
        """Attach files (report.md, telemetry.png, history.json); a later session's copy replaces an earlier one.
        A file over ``max_bytes`` (history.json after a long run) is not: uploading, or zipping it offline, would
        hold the end of the run for minutes, and its steps are in the experiment already as metrics."""
        for path in map(Path, paths):
            if self._accepting and not path.is_file():
                self.warnings.append(f"Comet ML: {path} not found, not attached to the experiment")
            elif self._accepting and path.stat().st_size > max_bytes:
                self.messages.append(
                    f"Comet ML: {path.name} ({path.stat().st_size / 1e6:,.0f} MB) not attached: over "
                    f"{max_bytes / 1e6:,.0f} MB; its steps are in the experiment as metrics, the file is {path}"
                )
            else:
                self._submit(f"attaching {path.name}", functools.partial(_log_asset, path=path))

    @_never_raises("ending the experiment")
    def end(self, timeout_s: float = DEFAULT_END_TIMEOUT_S) -> None:
        """Flush and close the experiment, waiting at most ``timeout_s``; offline, report the archive."""
        if self._ended:
            return
        self._submit("ending the experiment", self._end_experiment)
        self._ended = True
        if self._worker is None:
            return
        deadline = time.monotonic() + timeout_s
        try:
            self._calls.put(_STOP, timeout=timeout_s)
        except queue.Full:
            pass  # the worker is stuck in a call: the join below times out and says so
        self._worker.join(max(0.0, deadline - time.monotonic()))
        if self._worker.is_alive():
            self.warnings.append(
                f"Comet ML: still busy after {timeout_s:g} s at the end of the run; stopped waiting, "
                "so Comet may miss the last data"
            )

    # --- the sink's thread --------------------------------------------------------------

    def _work(self, create: Callable[[], Any], name: str) -> None:
        # comet_ml reports what goes wrong (a bad key, no network, a refused upload) by logging an error, on this
        # thread or its own: its console is kept quiet (_import_comet_ml), and the errors become warnings here.
        errors = self._start_errors = _ErrorLines()
        comet_logger = logging.getLogger("comet_ml")
        comet_logger.addHandler(errors)
        try:
            try:
                experiment = self._create(create, name, errors)
            except Exception as exc:
                self._fail("starting the experiment", _describe(exc))
                experiment = None
            while (call := self._calls.get()) is not _STOP:
                what, function = call
                if self._disabled:
                    continue  # drain, so that end() still finds _STOP
                try:
                    function(experiment)
                except Exception as exc:
                    self._fail(what, _describe(exc))
        finally:
            comet_logger.removeHandler(errors)
        if errors.lines and not self._disabled:
            more = f" (and {len(errors.lines) - 1} more errors)" if len(errors.lines) > 1 else ""
            self.warnings.append(f"Comet ML: {self._scrubbed(errors.lines[0])}{more}")

    def _online_or_offline(
        self, online: Callable[[], Any], offline: Callable[[], Any], server: str, archive_dir: Path, env: Mapping
    ) -> Any:
        """The online experiment, or, when Comet's server cannot be reached, the offline archive: comet_ml would
        retry for half a minute and then drop everything. Behind a proxy (no direct way to test) or with a key the
        server refuses, the online start is tried, and failing it the archive keeps the run."""
        from kaio.reach import unreachable

        why = unreachable(server, env)
        if why is None:
            try:
                experiment = online()
            except Exception as exc:  # comet_ml raising instead of logging: the archive all the same
                experiment, why = None, f"the online experiment did not start ({_describe(exc)})"
            if experiment is not None and experiment.alive:
                return experiment
            said = self._start_errors.lines.pop(0) if self._start_errors.lines else "no reason given"
            why = why or f"the online experiment did not start ({self._scrubbed(said)})"
        self.offline = True
        archive_dir.mkdir(parents=True, exist_ok=True)
        self.warnings.append(
            f"Comet ML: {why}; logging offline to {archive_dir} instead (upload it later with `comet upload <zip>`)"
        )
        return offline()

    def _create(self, create: Callable[[], Any], name: str, errors: _ErrorLines) -> Any:
        # A failed start (bad key, no network) is a logged error and a dead experiment, not an exception.
        experiment = create()
        if not experiment.alive:
            raise RuntimeError(errors.lines.pop(0) if errors.lines else "comet_ml did not start the experiment")
        experiment.set_name(name)
        experiment.add_tag("kaio")
        if not self.offline:
            self.messages.append(f"Comet ML: logging to {experiment.url}")
        return experiment

    def _end_experiment(self, experiment: Any) -> None:
        streamer: Any = getattr(experiment, "streamer", None)
        if self.offline and isinstance(getattr(streamer, "queue_timeout", None), (int, float)):
            # comet_ml's offline writer waits on its queue a second at a time, and its end waits out that wait:
            # a second added to every run's end. Polling every 50 ms from here, it ends once it has written
            # (1.0 s -> 0.06 s, measured). A comet_ml without the attribute ends as it would.
            streamer.queue_timeout = 0.05
        experiment.end()
        if self.offline:
            # The archive's name is Comet's: <key>.zip, or <key>-<suffix>.zip for a continued experiment.
            archive = Path(experiment.offline_directory) / experiment._get_offline_archive_file_name()
            after = " (after the archives of the earlier sessions)" if archive.stem != self.experiment_key else ""
            self.messages.append(
                f"Comet ML: offline archive {archive}; upload it with `comet upload {shlex.quote(str(archive))}`{after}"
            )

    # --- shared ---------------------------------------------------------------------------

    @property
    def _accepting(self) -> bool:
        return not (self._disabled or self._ended or self._worker is None)

    def _submit(self, what: str, function: Callable[[Any], Any]) -> None:
        if not self._accepting:
            return
        try:
            self._calls.put_nowait((what, function))
        except queue.Full:
            self._fail(what, f"Comet fell {_MAX_PENDING_CALLS} calls behind")

    def _fail(self, what: str, reason: str) -> None:
        if self._disabled:
            return
        self._disabled = True
        reason = self._scrubbed(reason) or "no details"
        self.warnings.append(f"Comet ML: {what} failed ({reason}); nothing more is sent to Comet for this run")

    def _scrubbed(self, text: str) -> str:
        """The first line of ``text``, without the API key (scrubbed before shortening: no prefix of it survives)."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return _first_line(text)


class _ErrorLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _import_comet_ml(env: Mapping[str, str]) -> Any:
    """Import comet_ml under kaio's defaults, without leaving them in os.environ for the child."""
    added = {name: env.get(name, default) for name, default in _IMPORT_TIME_DEFAULTS.items() if name not in os.environ}
    os.environ.update(added)
    try:
        import comet_ml
    finally:
        for name in added:
            os.environ.pop(name, None)
    if "COMET_LOGGING_CONSOLE" in added:  # its errors become kaio's warnings (CometSink._work), not tracebacks
        for handler in logging.getLogger("comet_ml").handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.CRITICAL + 1)
    return comet_ml


def _server_url(api_key: str, env: Mapping[str, str]) -> str:
    """Where comet_ml will send the experiment: its configured address, which a key of a self-hosted Comet
    carries in itself."""
    try:
        from comet_ml.config import get_api_key, get_backend_address, get_config

        config = get_config()
        get_api_key(api_key, config)
        return str(get_backend_address(config))
    except Exception:  # an internal API of comet_ml: its default, where it is not there
        return env.get("COMET_URL_OVERRIDE") or "https://www.comet.com/clientlib/"


def _log_asset(experiment: Any, *, path: Path) -> None:
    experiment.log_asset(str(path), file_name=path.name, overwrite=True)


def _is_finite_number(value: Any) -> bool:
    # null means "not measured"; NaN/inf (a diverged loss) is in history.json, Comet cannot chart it.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _describe(exc: Exception) -> str:
    return str(exc).strip() or type(exc).__name__


def _first_line(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line if len(line) <= _MAX_DETAIL_CHARS else line[: _MAX_DETAIL_CHARS - 1] + "…"

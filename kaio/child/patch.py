"""Give every ``transformers.Trainer`` a ``KaioCallback``, subclasses included.

Patching ``Trainer.__init__`` once reaches every subclass that calls
``super().__init__`` (TRL's ``SFTTrainer`` and any user's own), so a script
gets telemetry without changing a line. ``Trainer.train`` is patched so that
``kaio resume`` reaches a user's script too: when the script passes no
``resume_from_checkpoint``, the one kaio chose is used.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Mapping
from typing import Any

from kaio.telemetry.protocol import ENV_RESUME_FROM

_emitter = None
_TRAINER_MODULE = "transformers.trainer"
_INTEGRATIONS_MODULE = "transformers.integrations.integration_utils"  # imports comet_ml, to see if it is configured
# Where comet_ml finds an API key or a mode (comet_ml.config): the environment, .env and .comet.config files.
_COMET_CONFIG_FILES = (".env", ".comet.config", "~/.comet.config", "/content/drive/MyDrive/.comet.config")
_COMET_VARIABLES_KAIO_SETS = ("COMET_ERROR_TRACKING_ENABLE",)


def rank_from_env() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def process_rank() -> int:
    """This process's rank: its process group's, once one is set up (a script that starts its own processes, as
    PyTorch's DDP tutorial's ``mp.spawn`` does, passes each its rank there and sets no RANK), else the launcher's."""
    group = _process_group()
    return group.get_rank() if group is not None else rank_from_env()


def world_size() -> int:
    """The processes training together: the process group's, else the launcher's WORLD_SIZE."""
    group = _process_group()
    return group.get_world_size() if group is not None else int(os.environ.get("WORLD_SIZE", "1"))


def _process_group() -> Any:
    """``torch.distributed`` with its default group set up, or None (torch not imported here: not looked for)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def shared_emitter():
    """One emitter (one FIFO descriptor) per process, opened on first use."""
    global _emitter
    if _emitter is None:
        from kaio.child.emitter import EventEmitter

        _emitter = EventEmitter.from_env(rank=process_rank())
    return _emitter


def install() -> None:
    """Patch ``Trainer`` as soon as its module is imported (now, if it already is): a script that never uses
    transformers does not pay for importing it."""
    from kaio.child import stop

    stop.install()
    _hide_warnings_about_kaios_comet_ml()
    module = sys.modules.get(_TRAINER_MODULE)
    if module is not None:
        _patch(module.Trainer)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


_COMET_KEY_WARNING = "comet_ml is installed but the Comet API Key is not configured"


def _hide_warnings_about_kaios_comet_ml() -> None:
    """kaio installs comet_ml (its Comet sink runs in the supervisor, not here): transformers and TRL, finding it,
    would warn at each Trainer and each save that its API key is not set, a warning about kaio's dependency
    rather than the user's setup. The logger is transformers' own; a filter on it costs nothing until it logs."""
    import logging

    logging.getLogger("transformers.integrations.integration_utils").addFilter(
        lambda record: not str(record.msg).startswith(_COMET_KEY_WARNING)
    )


def comet_is_set_up(environ: Mapping[str, str] = os.environ) -> bool:
    """Comet is configured for this process (a ``COMET_*`` variable, or a file comet_ml reads its settings from):
    transformers may log to it, as it would without kaio."""
    if any(name.startswith("COMET_") and name not in _COMET_VARIABLES_KAIO_SETS for name in environ):
        return True
    return any(os.path.exists(os.path.expanduser(path)) for path in _COMET_CONFIG_FILES)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.trainer`` as Python would, and patches its ``Trainer`` right after the module runs,
    before any script can subclass it.

    It also keeps comet_ml from transformers' integrations when Comet is not configured for the script: kaio
    installs comet_ml for its own Comet sink (in the supervisor), and transformers imports it in every rank only to
    find it has no API key and not use it, a second or more of each rank's start-up. Only that import statement
    is refused (transformers takes it as comet_ml not installed); the script's own, and any library's check
    for it, are not touched."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "comet_ml" and _importer() == _INTEGRATIONS_MODULE and not comet_is_set_up():
            raise ModuleNotFoundError(
                "comet_ml is not configured here (kaio keeps it from transformers)", name=fullname
            )
        if fullname != _TRAINER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            run_module(module)
            _patch(module.Trainer)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def comet_kept_out(exc: RuntimeError) -> RuntimeError:
    """transformers' "CometCallback requires comet-ml ... Run `pip install comet-ml`" (report_to names comet_ml)
    where comet_ml is installed and kaio kept it from transformers: the advice would be wrong, so the cause is
    given (Comet was not configured; without kaio the callback would have failed for want of an API key)."""
    if "CometCallback requires comet-ml" not in str(exc) or importlib.util.find_spec("comet_ml") is None:
        return exc
    return RuntimeError(
        "report_to includes comet_ml, but Comet was not configured when transformers was imported (no "
        "COMET_API_KEY or other COMET_* variable, no .comet.config), so kaio kept comet_ml from transformers' "
        "integrations (without an API key its callback cannot log): set COMET_API_KEY in the environment of "
        "`kaio run`, or leave comet_ml out of report_to (kaio logs the run to Comet with reporting.use_comet_ml)"
    )


def _importer() -> str | None:
    """The module whose code is importing (the first frame outside the import machinery, ``importlib._bootstrap``
    and ``_bootstrap_external``), by name; ``importlib.util.find_spec`` is a caller of its own."""
    frame: types.FrameType | None = sys._getframe(2)  # 0: here, 1: find_spec, 2: who called it
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
        frame = frame.f_back
    return frame.f_globals.get("__name__") if frame is not None else None


def _patch(trainer_cls: Any) -> None:
    from kaio.child import stop
    from kaio.child.callback import KaioCallback, send_the_step_an_error_ended
    from kaio.child.timing import time_data_and_forward

    if getattr(trainer_cls.__init__, "_kaio_patched", False):
        return
    stop.spare_loader_workers()
    original_init = trainer_cls.__init__
    original_train = trainer_cls.train

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        try:
            original_init(self, *args, **kwargs)
        except RuntimeError as exc:
            explained = comet_kept_out(exc)
            if explained is exc:
                raise
            raise explained from exc
        if not any(isinstance(cb, KaioCallback) for cb in self.callback_handler.callbacks):
            callback = KaioCallback(shared_emitter(), trainer=self)
            # Given to the Trainer by the script (else the Trainer makes them from args.optim and learning_rate).
            # ... or a subclass's create_optimizer / create_scheduler builds them (a script's, a library's).
            callback.script_optimizer = (
                self.optimizer is not None
                or getattr(self, "optimizer_cls_and_kwargs", None) is not None
                or _overrides(self, "create_optimizer")
            )
            callback.script_lr_scheduler = self.lr_scheduler is not None or _overrides(self, "create_scheduler")
            # Last in the list: a recipe's or script's callback that edits the arguments at train begin (the built-in
            # recipe's edits_reach_a_resume) runs first, and this one describes what the training then uses.
            self.add_callback(callback)
            _watch_losses(self, callback)
            _watch_eval_losses(self, callback)
            _announce_evaluations(self, callback)
            time_data_and_forward(self, callback.timing)

    began = [False]  # a training of this process has begun

    @functools.wraps(original_train)
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # `kaio resume`'s checkpoint is the first training's: a later one (a script's second phase) is its own.
        if resume_from_checkpoint is None and os.environ.get(ENV_RESUME_FROM) and not began[0]:
            resume_from_checkpoint = os.environ[ENV_RESUME_FROM]
        began[0] = True
        try:
            result = original_train(self, resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            send_the_step_an_error_ended(self)
            raise
        stop.fail_if_stopped_for_nonfinite()  # before the script saves or pushes the non-finite weights
        stop.raise_if_stopped(self.state.global_step, self.state.max_steps)  # nor half-trained ones
        return result

    __init__._kaio_patched = True  # type: ignore[attr-defined]
    trainer_cls.__init__ = __init__
    trainer_cls.train = train


def _overrides(trainer: Any, method: str) -> bool:
    """A class between transformers' Trainer and this one's defines ``method`` anew."""
    from transformers import Trainer

    return getattr(type(trainer), method, None) is not getattr(Trainer, method, None)


def _announce_evaluations(trainer: Any, callback: Any) -> None:
    """Each ``evaluate()`` of the training (an epoch's, a later callback's, the script's own from a callback) is
    announced as it begins: the supervisor gives it an evaluation's budget, not a step's. A subclass's evaluate()
    of its own that never calls the callbacks' on_evaluate is recorded from what it returns. The instance
    attribute wraps whatever method the class has."""
    evaluate = trainer.evaluate

    @functools.wraps(evaluate)
    def announced(*args, **kwargs):
        callback.evaluation_begins(trainer.state)
        seen = callback.evaluations_seen
        metrics = evaluate(*args, **kwargs)
        if callback.evaluations_seen == seen and isinstance(metrics, dict):
            model = getattr(trainer, "model", None)
            callback.on_evaluate(
                trainer.args, trainer.state, getattr(trainer, "control", None), metrics=metrics, model=model
            )
        return metrics

    trainer.evaluate = announced


def _watch_losses(trainer: Any, callback: Any) -> None:
    """Every micro-batch's loss, as ``training_step`` returns it (a subclass's own included), to the callback's
    ``LossWatch``: the instance attribute wraps whatever method the class has."""
    step_fn = trainer.training_step
    watch = callback.losses

    @functools.wraps(step_fn)
    def training_step(*args, **kwargs):
        callback.micro_batch_logs.within = True  # a log() from here is a compute_loss's own, once per micro-batch
        try:
            loss = step_fn(*args, **kwargs)
        finally:
            callback.micro_batch_logs.within = False
        watch.observe(loss, trainer.state.global_step + 1)
        inputs = args[1] if len(args) > 1 else kwargs.get("inputs")
        callback.count_batch(_examples(inputs), _input_ids(inputs))
        return loss

    trainer.training_step = training_step


def _watch_eval_losses(trainer: Any, callback: Any) -> None:
    """Every evaluation batch's loss, as ``prediction_step`` returns it, to the callback's ``eval_losses``."""
    step_fn = trainer.prediction_step
    watch = callback.eval_losses

    @functools.wraps(step_fn)
    def prediction_step(*args, **kwargs):
        result = step_fn(*args, **kwargs)
        if isinstance(result, tuple) and result:
            watch.observe(result[0], 0)  # (no step: an evaluation's batches)
        return result

    trainer.prediction_step = prediction_step


def _examples(inputs: Any) -> int | None:
    """How many examples a micro-batch holds: its tensors' first dimension (``input_ids``' if it has them). None
    for a padding-free batch (every example packed into one row, told apart by ``position_ids``, no attention
    mask): its first dimension is 1 whatever it holds, and counting the restarts would read the tensor."""
    if isinstance(inputs, Mapping):  # a dict, or the tokenizer's BatchEncoding
        values = [inputs["input_ids"]] if "input_ids" in inputs else list(inputs.values())
        if "position_ids" in inputs and "attention_mask" not in inputs and _first_dimension(values) == 1:
            return None
    elif isinstance(inputs, (list, tuple)):
        values = list(inputs)
    else:
        values = [inputs]
    return _first_dimension(values)


def _input_ids(inputs: Any) -> int | None:
    """How many input ids a micro-batch holds, padding included (the Trainer's count under
    ``include_num_input_tokens_seen="all"``): the tensor's size, which needs no device sync. None without them (an
    image's pixels are not tokens; a preference pair's ids have other names)."""
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    numel = getattr(ids, "numel", None)
    return int(numel()) if callable(numel) else None


def _first_dimension(values: list[Any]) -> int | None:
    for value in values:
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) >= 1:
            return int(shape[0])
    return None

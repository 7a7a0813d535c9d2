"""Give every ``transformers.Trainer`` a ``KaioCallback``, subclasses included.

Patching ``Trainer.__init__`` once reaches every subclass that calls
``super().__init__`` (TRL's ``SFTTrainer`` and any user's own), so a script
gets telemetry without changing a line. ``Trainer.train`` is patched so that
``kaio resume`` reaches a user's script too: when the script passes no
``resume_from_checkpoint``, the one kaio chose is used.
"""

from __future__ import annotations

import functools
import os

from kaio.telemetry.protocol import ENV_RESUME_FROM

_emitter = None


def rank_from_env() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def shared_emitter():
    """One emitter (one FIFO descriptor) per process, opened on first use."""
    global _emitter
    if _emitter is None:
        from kaio.child.emitter import EventEmitter

        _emitter = EventEmitter.from_env(rank=rank_from_env())
    return _emitter


def install() -> None:
    import transformers

    from kaio.child import stop
    from kaio.child.callback import KaioCallback

    stop.install()
    trainer_cls = transformers.Trainer
    if getattr(trainer_cls.__init__, "_kaio_patched", False):
        return
    original_init = trainer_cls.__init__
    original_train = trainer_cls.train

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if not any(isinstance(cb, KaioCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(KaioCallback(shared_emitter(), trainer=self))

    @functools.wraps(original_train)
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is None and os.environ.get(ENV_RESUME_FROM):
            resume_from_checkpoint = os.environ[ENV_RESUME_FROM]
        return original_train(self, resume_from_checkpoint, *args, **kwargs)

    __init__._kaio_patched = True  # type: ignore[attr-defined]
    trainer_cls.__init__ = __init__
    trainer_cls.train = train

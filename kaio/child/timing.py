"""Each rank's own work in a step, before its first collective: what tells a straggler from the ranks waiting for it.

Under DDP every rank leaves a step together (the gradients' all-reduce waits
for the last one), so step times are alike on every rank and cannot say which
rank is slow. Two parts of a step involve no collective and can: the time the
rank spends fetching its micro-batches (the Trainer's ``get_batch_samples``,
before ``on_step_begin``) and its forward passes (``compute_loss`` inside
``training_step``). The forward is timed with CUDA events on a GPU (queued on
the stream, read once complete, never waited for: no synchronisation) and with
the host clock on a CPU.
"""

from __future__ import annotations

import time
from typing import Any


class StepTiming:
    """Data-loading and forward time of this rank since the previous :meth:`take`."""

    def __init__(self) -> None:
        self._data_s: float | None = None
        self._forward_s: float | None = None
        self._forward_began: float | None = None
        self._pending: list[tuple[Any, Any]] = []  # CUDA (start, end) events not yet read
        self._cuda: Any = None  # torch.cuda once a forward ran on a GPU

    # -- data -------------------------------------------------------------

    def data_fetched(self, seconds: float) -> None:
        self._data_s = (self._data_s or 0.0) + seconds

    # -- forward ----------------------------------------------------------

    def forward_begins(self, on_gpu: bool) -> Any:
        if on_gpu:
            import torch

            self._cuda = torch.cuda
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        self._forward_began = time.perf_counter()
        return None

    def forward_ends(self, start: Any) -> None:
        if start is not None:
            end = self._cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((start, end))
        elif self._forward_began is not None:
            self._forward_s = (self._forward_s or 0.0) + time.perf_counter() - self._forward_began
            self._forward_began = None

    def _read_completed(self) -> None:
        """The GPU forwards that have finished (``query`` does not wait); the others stay for later."""
        waiting = []
        for start, end in self._pending:
            if end.query():
                self._forward_s = (self._forward_s or 0.0) + start.elapsed_time(end) / 1000.0
            else:
                waiting.append((start, end))
        self._pending = waiting[-64:]  # a GPU far behind: the oldest are dropped, never waited for

    # -- the step's report ------------------------------------------------

    def take(self) -> tuple[float | None, float | None]:
        """(data_s, forward_s) since the previous call; on a GPU, the forwards completed since then."""
        if self._pending:
            self._read_completed()
        taken = self._data_s, self._forward_s
        self._data_s = self._forward_s = None
        return taken


class _TimedIterator:
    """An iterator whose ``next`` calls are timed as data loading."""

    def __init__(self, inner: Any, timing: StepTiming) -> None:
        self._inner = inner
        self._timing = timing

    def __iter__(self) -> _TimedIterator:
        return self

    def __next__(self) -> Any:
        began = time.perf_counter()
        try:
            return next(self._inner)
        finally:
            self._timing.data_fetched(time.perf_counter() - began)

    def __getattr__(self, name: str) -> Any:  # anything else the Trainer asks of its epoch iterator
        return getattr(self._inner, name)


def time_data_and_forward(trainer: Any, timing: StepTiming) -> None:
    """Time this rank's data loading (the epoch iterator inside ``get_batch_samples``) and its forward passes
    inside ``training_step`` (evaluation's are not), where no collective is.

    The forward is timed by hooks on the model inside the DDP wrapper, once DDP has synchronised its buffers
    (a broadcast from rank 0: a fast rank would wait there for a slow one). Under FSDP or DeepSpeed the forward
    gathers parameters from every rank: it is not timed. With batches dispatched from rank 0 (accelerate's
    default for an iterable dataset), fetching one is a collective too: loading is not timed.
    """
    if _fetch_is_local(trainer):
        fetch = getattr(trainer, "get_batch_samples", None)
        if callable(fetch):

            def get_batch_samples(epoch_iterator: Any, *args: Any, **kwargs: Any) -> Any:
                # The iterator's own ``next`` calls only: get_batch_samples then gathers the token counts of every
                # rank (a collective, where a fast rank waits for a slow one).
                return fetch(_TimedIterator(epoch_iterator, timing), *args, **kwargs)

            trainer.get_batch_samples = get_batch_samples
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        return
    step_fn = trainer.training_step
    training = [False]
    hooked: set[int] = set()

    def training_step(*args: Any, **kwargs: Any) -> Any:
        model = args[0] if args else kwargs.get("model")
        inner = getattr(model, "module", model)  # inside DDP's wrapper: after its buffer broadcast
        if inner is not None and id(inner) not in hooked and hasattr(inner, "register_forward_pre_hook"):
            _hook_forward(inner, timing, training, _on_gpu(trainer))
            hooked.add(id(inner))
        training[0] = True
        try:
            return step_fn(*args, **kwargs)
        finally:
            training[0] = False

    trainer.training_step = training_step


def _hook_forward(module: Any, timing: StepTiming, training: list[bool], on_gpu: bool) -> None:
    """Time each outermost forward of ``module`` inside a training step (first of its pre-hooks, so that a
    script's own hooks count as its forward)."""
    started: list[Any] = []
    depth = [0]

    def before(*_: Any) -> None:
        depth[0] += 1
        if training[0] and depth[0] == 1:
            started.append(timing.forward_begins(on_gpu=on_gpu))

    def after(*_: Any) -> None:
        depth[0] -= 1
        if started and depth[0] == 0:
            timing.forward_ends(started.pop())

    module.register_forward_pre_hook(before, prepend=True)
    module.register_forward_hook(after, always_call=True)


def _on_gpu(trainer: Any) -> bool:
    device = getattr(getattr(trainer, "args", None), "device", None)
    return getattr(device, "type", "cpu") == "cuda"  # CUDA and ROCm alike


def _fetch_is_local(trainer: Any) -> bool:
    """False when each batch is dispatched from rank 0 (fetching it waits for rank 0)."""
    try:
        import torch

        iterable = isinstance(getattr(trainer, "train_dataset", None), torch.utils.data.IterableDataset)
    except ImportError:
        return True
    config = getattr(getattr(trainer, "accelerator", None), "dataloader_config", None)
    dispatch = getattr(config, "dispatch_batches", None)
    return not (dispatch or (dispatch is None and iterable))

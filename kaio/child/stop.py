"""A graceful stop that keeps the work: the first SIGTERM asks the Trainer to save a checkpoint at the end of
a step and stop.

The supervisor turns a first Ctrl-C into SIGTERM (a batch scheduler's preemption sends one too; its warning
before a time limit, SIGUSR1 under SLURM's ``--signal=USR1@T``, asks for the same stop and never ends a rank). While a
Trainer trains, the signal only raises a flag: ``KaioCallback.on_step_end`` then sets the Trainer's own
``should_save`` and ``should_training_stop``, the Trainer writes checkpoint-N and returns, the patched
``train()`` raises ``Stopped`` (the script's code after it does not run on the half-trained model), and
``kaio resume`` continues from step N+1. After a training ended, in the script's own work that follows it, the
first SIGTERM raises ``Stopped`` there (a KeyboardInterrupt, as a Ctrl-C without kaio). Once the script has
returned, SIGTERM is ignored (``kaio.child.__main__``: only the exit is left). Before any training (loading, a
script without a Trainer) and at a second SIGTERM the signal does what it always does: end the process.

With several ranks every rank gets the signal at about the same moment, but not necessarily on the same side
of a step's end: a rank that stopped alone would leave the others waiting in the next step's collectives.
So the ranks agree on the step through torch.distributed's store (the rendezvous's key-value store, which
every rank of every node reaches): the first rank to reach a step end after the signal proposes a step a
second of steps ahead, at least the step after next (no signalled rank can be further than one step ahead: each
step's gradient all-reduce holds them together), and every rank stops at the end of the step the store holds.
In a job of several machines, a rank no signal reached (the stop was asked of one node's kaio alone: a Ctrl-C
on the head) looks for a proposal in the store every half second: within that second. A rank that still
misses it goes past that step and waits in the next one's collectives: the supervisor's grace period ends it.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
import time

from kaio.child import process_group
from kaio.telemetry.protocol import ENV_SESSION, ENV_SPOOL_DIR, stop_marker_name

# terminated: a first SIGTERM came; trained: a training of this process ended (the script's own work may follow)
# loop: a loop without a Trainer reports its steps (kaio.log): a stop ends it as a Ctrl-C without kaio would
_state = {"training": False, "requested": False, "terminated": False, "trained": False, "loop": False}
_terminated_at: list[float] = []  # when the first SIGTERM of the stop came (time.monotonic)
# A scheduler signals every process of the job, and torch elastic's agent passes its own SIGTERM on to each rank:
# a rank gets the one stop twice within moments. Such a second SIGTERM is the same stop, not an order to die.
SAME_STOP_S = 10.0
# The step whose non-finite loss stopped the training (reporting.on_nonfinite), and the log's step that found it.
_nonfinite_step: list[int] = []


def install() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A batch scheduler's warning that the job's time is nearly up (SLURM: --signal=USR1@90): the same graceful
    # stop while training; ignored otherwise (a warning, not an order to end).
    signal.signal(signal.SIGUSR1, _on_warning)


def stop_asked_before_start() -> None:
    """A stop asked for before this process had its handler (``install``): the SIGTERM came first, or came to the
    launcher before it started this process (a launcher ignores SIGTERM, and its processes inherit that), and the
    training would have run to its end. The supervisor's marker says so: the process ends as that SIGTERM would have
    ended it, nothing being trained yet."""
    spool = os.environ.get(ENV_SPOOL_DIR)
    if spool and os.path.exists(os.path.join(spool, stop_marker_name(int(os.environ.get(ENV_SESSION, "1"))))):
        _on_sigterm(signal.SIGTERM, None)


def loop_reports() -> None:
    """A loop without a Trainer reports its steps (``kaio.log``): a stop's SIGTERM raises ``Stopped`` in it, so that
    its own ``except KeyboardInterrupt:`` (a checkpoint of its own) runs, as it would at a Ctrl-C without kaio."""
    _state["loop"] = True


def training(active: bool) -> None:
    """The Trainer's loop started (``on_train_begin``) or ended (``on_train_end``)."""
    _state["training"] = active
    if not active:
        _state["trained"] = True


STORE_KEY = "kaio/graceful_stop_step"
# A rank no signal reached (another node's: the stop was asked of one node's kaio alone) looks for a proposal in
# the store this often, and a proposal leaves it the time to: steps enough for two looks, at least two. Short: the
# signalled ranks train on until then, inside launch.grace_seconds.
POLL_EVERY_S = 0.5
_agreed: list[int] = []  # the step every rank stops at, once read from the store
_next_poll = [0.0]  # when a rank of a job of several machines next looks for another node's proposal


def stops_after(step: int, max_steps: int | None = None, step_s: float | None = None) -> bool:
    """At the end of optimizer step ``step`` (which took ``step_s``): whether the Trainer saves and stops here
    (the proposal is never past ``max_steps``, where the training ends anyway: the stop's save is made there)."""
    if not _state["requested"] and _spans_machines():
        now = time.monotonic()
        if now >= _next_poll[0]:
            _next_poll[0] = now + POLL_EVERY_S
            _state["requested"] = _proposed_elsewhere()
    if not _state["requested"]:
        return False
    if not _agreed:
        store = process_group.store()
        if store is None:
            return True  # one process: here
        try:
            ahead = max(2, math.ceil(2 * POLL_EVERY_S / step_s) + 1) if step_s else 2
            proposed = min(step + ahead, max_steps) if max_steps and max_steps > 0 else step + ahead
            _agreed.append(int(store.compare_set(STORE_KEY, "", str(proposed))))
        except Exception:  # a store gone (the job is ending anyway): this rank stops here, as before
            return True
    return step >= _agreed[0]


@functools.cache
def _spans_machines() -> bool:
    """Ranks on other machines (torch's WORLD_SIZE over this node's LOCAL_WORLD_SIZE), whose kaio may not be the
    one asked to stop; on one machine the launcher passes the signal to every rank, and nothing is polled."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        return False


def _proposed_elsewhere() -> bool:
    """Another rank proposed the stop (its node's kaio was asked; this one was not): one store look."""
    store = process_group.store()
    if store is None:
        return False
    try:
        return bool(store.check([STORE_KEY]))
    except Exception:
        return False


def requested() -> bool:
    """A graceful stop was asked for while this rank trained (here, or on another node)."""
    return _state["requested"]


def reached() -> bool:
    """A stop's SIGTERM reached this process (while it trained, or in the script's work after its training)."""
    return _state["terminated"]


def nonfinite(step: int, found_at: int) -> None:
    """The training stops after a non-finite loss at ``step``, found at the log of step ``found_at``
    (``reporting.on_nonfinite: stop``)."""
    _nonfinite_step[:] = [step, found_at]


class Stopped(KeyboardInterrupt):
    """Raised by ``Trainer.train`` after a graceful stop cut the training short (its checkpoint is saved), so that
    the script's code after ``train()`` (saving a "final" model, pushing it, evaluating it) does not run on a
    half-trained model: what a Ctrl-C does to a script without kaio. A KeyboardInterrupt, so that a script's own
    ``except KeyboardInterrupt:`` still runs; ``kaio.child`` ends the rank quietly on it."""


def raise_if_stopped(global_step: int, max_steps: int) -> None:
    """After ``Trainer.train``: the graceful stop ended it before ``max_steps`` (a stop that landed on the last
    step leaves a finished training, whose code after ``train()`` runs)."""
    if _state["requested"] and (max_steps <= 0 or global_step < max_steps):
        raise Stopped(f"stopped after step {global_step} (a graceful stop: its checkpoint is saved)")


def fail_if_stopped_for_nonfinite() -> None:
    """After ``Trainer.train``: a training that stopped on a non-finite loss failed, and what it trained is not
    worth saving; the ``SystemExit`` is the rank's root cause (its error file)."""
    if _nonfinite_step:
        step, found_at = _nonfinite_step
        where = "there" if found_at == step else f"at step {found_at}, the log that found it"
        raise SystemExit(
            f"the training loss was not finite from step {step} on; stopped {where} (reporting.on_nonfinite: stop)"
        )


def spare_loader_workers() -> None:
    """Keep the Trainer's DataLoader workers alive through the stop's SIGTERM, so the rank can save its checkpoint.

    The signal reaches every process of the rank's group (kaio stops the launcher's group; torch elastic's agent
    passes it on to each rank's group; a scheduler signals every process of the job), and torch's handler in a
    worker dies of a SIGTERM from anyone but its parent: the rank's next batch, or its save, then fails with
    "DataLoader worker ... is killed by signal: Terminated". Here a worker leaves such a SIGTERM to its rank, which
    saves, ends and shuts its loader down; one from its parent (the loader, or the interpreter's exit, ending it;
    kaio, once it has adopted a worker whose rank is gone) still ends it. Workers forked from the rank (Linux's
    default until Python 3.14) only: a loader of the spawn or forkserver kind starts its workers without it."""
    if not hasattr(signal, "sigwaitinfo"):  # not Linux
        return
    try:
        from torch.utils.data._utils import signal_handling
    except ImportError:
        return
    original = getattr(signal_handling, "_set_worker_signal_handlers", None)
    if original is None or getattr(original, "_kaio_patched", False):  # a torch that moved it: as before
        return

    @functools.wraps(original)
    def set_worker_signal_handlers(*args, **kwargs):
        original(*args, **kwargs)  # torch's handlers for a crash (SIGSEGV, SIGBUS...) stay
        _leave_sigterm_to_the_rank()

    set_worker_signal_handlers._kaio_patched = True  # type: ignore[attr-defined]
    signal_handling._set_worker_signal_handlers = set_worker_signal_handlers


def _leave_sigterm_to_the_rank() -> None:
    """In a loader worker: SIGTERM blocked, and taken by one thread that ends the worker when its parent sent it
    (a Python handler cannot tell who sent a signal; ``sigwaitinfo`` can). A process the worker forks gets the
    signal back (a program it executes keeps the block: SIGKILL still ends it)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    os.register_at_fork(after_in_child=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM}))

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
                os._exit(0)  # as torch's own handler ends a worker its parent terminates

    threading.Thread(target=wait, name="kaio-worker-sigterm", daemon=True).start()


def _on_sigterm(signum: int, frame: object) -> None:
    if _state["training"] and not _state["terminated"]:  # a scheduler's warning before does not count
        _state["requested"] = _state["terminated"] = True
        _terminated_at.append(time.monotonic())
        return
    if _state["training"] and _terminated_at and time.monotonic() - _terminated_at[0] < SAME_STOP_S:
        return  # the same stop again (the scheduler's and the agent's): the checkpoint is being saved
    if _state["trained"] and not _state["terminated"]:
        # The script's work after its training (an evaluation, a save, a push): stopped as a Ctrl-C without kaio
        # would stop it, so that its own `except KeyboardInterrupt:` runs; the training's record is whole.
        _state["terminated"] = True
        raise Stopped("stopped in the script's work after its training had ended")
    if _state["loop"] and not _state["terminated"]:
        _state["terminated"] = True
        raise Stopped("stopped in the training loop (kaio.log)")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _on_warning(signum: int, frame: object) -> None:
    if _state["training"]:
        _state["requested"] = True

"""The child kaio starts: ``accelerate launch`` itself, with its failure written down as data.

``python -m kaio.child.launcher ARGS`` is exactly ``accelerate launch ARGS``.
When a rank fails, torch elastic knows which one failed first and how (its
exception, or the signal that killed it, which the rank itself cannot report):
that is written to ``<error dir>/launch-s<session>.json`` as a
``LaunchFailure`` for the supervisor to name the root cause, then the failure
propagates as it would without kaio.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from typing import Any

import msgspec

from kaio.child.output import guard_output
from kaio.telemetry.protocol import ENV_ERROR_DIR, ENV_SESSION, LaunchFailure

_LISTENERS: list = []  # the rendezvous store's sockets, open for the launcher's life


def _rendezvous_on_loopback() -> None:
    """A one-node job's rendezvous store listens on 127.0.0.1 only, not on every interface.

    torch's TCPStore server binds every interface whatever host it is given (pytorch#173909), and
    nothing outside this machine needs a one-node job's store. Its server can take a socket already
    listening (``master_listen_fd``): the static rendezvous, which the launcher uses for one node, is
    given one bound to loopback. If torch moves that code, the store is torch's default again.
    """
    import socket

    try:
        from torch.distributed.elastic.rendezvous import static_tcp_rendezvous as rendezvous
    except ImportError:
        return
    tcp_store = getattr(rendezvous, "TCPStore", None)
    if tcp_store is None:
        return

    def loopback_store(host_name, port, world_size=None, is_master=False, *args, **kwargs):
        if is_master and host_name in ("127.0.0.1", "localhost") and "master_listen_fd" not in kwargs:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(128)
            _LISTENERS.append(listener)
            kwargs["master_listen_fd"] = listener.fileno()
        return tcp_store(host_name, port, world_size, is_master, *args, **kwargs)

    rendezvous.TCPStore = loopback_store


def _one_shutdown_per_stop() -> None:
    """torch elastic's agent raises SignalException at every SIGTERM. A second one during its shutdown (a scheduler
    signals every process of the job, and kaio, told too, signals the launcher: moments apart) broke the shutdown's
    wait for the ranks, and its cleanup sent them another SIGTERM and killed them before their checkpoint was
    saved. The first signal starts the shutdown; later ones are left to it (it kills the ranks itself at its
    timeout, and kaio kills the group at the end of its grace)."""
    from torch.distributed.elastic.multiprocessing import api

    original = getattr(api, "_terminate_process_handler", None)  # private: a torch without it keeps its own way
    if original is None or getattr(original, "_kaio_once", False):
        return
    raised: list[int] = []

    def once(signum: int, frame: Any) -> None:
        if not raised:
            raised.append(signum)
            original(signum, frame)

    once._kaio_once = True  # type: ignore[attr-defined]
    api._terminate_process_handler = once  # looked up when the agent installs its handlers (PContext.start)


def _leaving_agents_arrive_at_the_exit_barrier() -> None:
    """Once its ranks have ended well, each node's torch elastic agent waits at an exit barrier (5 minutes) for
    every other node's agent. One that stops on a signal, or whose ranks failed, shuts down without arriving, and
    the others waited the whole 5 minutes (the head of a job whose node 1 was stopped by a Ctrl-C said RUNNING for
    5 minutes, then printed torch's traceback). An agent that shuts down arrives first: nobody waits for one that
    will not come."""
    from torch.distributed.elastic.agent.server import api
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.utils import store as store_util

    # Private names of torch elastic: a torch without one of them keeps its own way.
    barrier: Any = getattr(api.SimpleElasticAgent, "_exit_barrier", None)
    shutdown: Any = getattr(LocalElasticAgent, "_shutdown", None)
    sync_id: Any = getattr(api, "_TERMINAL_STATE_SYNC_ID", None)
    arrive: Any = getattr(store_util, "_barrier_nonblocking", None)
    if None in (barrier, shutdown, sync_id, arrive) or getattr(shutdown, "_kaio_arrives", False):
        return

    def exit_barrier(self: Any) -> None:
        self._kaio_arrived = True
        barrier(self)

    def arriving_shutdown(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            shutdown(self, *args, **kwargs)
        finally:
            store, group = getattr(self, "_store", None), getattr(self, "_worker_group", None)
            if store is not None and group is not None and not getattr(self, "_kaio_arrived", False):
                self._kaio_arrived = True
                with contextlib.suppress(Exception), store_util.store_timeout(store, 5):
                    arrive(store, group.group_world_size, sync_id)

    arriving_shutdown._kaio_arrives = True  # type: ignore[attr-defined]
    api.SimpleElasticAgent._exit_barrier = exit_barrier
    LocalElasticAgent._shutdown = arriving_shutdown


EXIT_BARRIER_ENDED = (
    "the exit barrier ended early: the job's other nodes were done and gone first (harmless: this node's ranks "
    "had ended well)"
)


def quiet_exit_barrier(record: logging.LogRecord) -> bool:
    """torch logs "Error waiting on exit barrier" with a C++ traceback of 30 frames when the head's store closed
    while this node waited there: its ranks had already ended well (the barrier is entered only then), so it is
    one line, not a traceback after a job that completed."""
    if record.getMessage().startswith("Error waiting on exit barrier"):
        record.msg, record.args, record.exc_info, record.exc_text = EXIT_BARRIER_ENDED, (), None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def main() -> None:
    # A scheduler's warning before the end (SLURM's --signal=USR1@90) may reach every process of the job step:
    # its default action would end this launcher (set first: importing torch takes seconds). The ranks answer
    # it themselves (kaio.child.stop).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    guard_output()  # (its output, a rank's traceback passed on, goes to child.log too)
    import torch
    from accelerate.commands.launch import main as accelerate_main
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # Without it, transformers builds no gloo group on a host without GPUs, and N processes of an unchanged
    # script are N independent, duplicate trainings (the built-in recipe sets use_cpu itself). A "false" left in
    # the shell (from a GPU machine's setup) would do the same.
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
    if not torch.cuda.is_available() and not use_cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    # One process: accelerate runs the trainer as our child and waits for it; a SIGTERM is the trainer's to
    # answer (it saves a checkpoint, kaio.child.stop), so this process waits for it rather than dying first.
    # Several: torch elastic installs its own handlers, which pass the signal on to every rank.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _sigterm_stays_ignored()
    _rendezvous_on_loopback()  # a store on 127.0.0.1 stays on loopback
    _one_shutdown_per_stop()
    _leaving_agents_arrive_at_the_exit_barrier()
    logging.getLogger("torch.distributed.elastic.agent.server.api").addFilter(quiet_exit_barrier)
    session = int(os.environ.get(ENV_SESSION, "1"))
    try:
        accelerate_main()
    except ChildFailedError as exc:  # several processes: torch elastic's record of every failure
        rank, failure = exc.get_first_failure()
        killed = failure.exitcode < 0
        _write(
            LaunchFailure(
                session=session,
                rank=rank,
                pid=failure.pid,
                exit_code=failure.exitcode,
                signal=failure.signal_name() if killed else None,
                message=str(failure.message)[:2000],
                t_wall=float(failure.timestamp) if failure.timestamp else None,
            )
        )
        raise SystemExit(_exit_code(failure.exitcode)) from None
    except subprocess.CalledProcessError as exc:  # one process: accelerate ran it with subprocess
        killed = exc.returncode < 0
        _write(
            LaunchFailure(
                session=session,
                rank=0,
                exit_code=exc.returncode,
                signal=_signal_name(-exc.returncode) if killed else None,
            )
        )
        raise SystemExit(_exit_code(exc.returncode)) from None
    except SignalException as exc:
        # Several processes: torch elastic's agent passed a SIGTERM on to its ranks and waited for them (a
        # graceful stop saves a checkpoint first). The stop that was asked for, not a traceback to print.
        raise SystemExit(128 + int(exc.sigval)) from None
    except Exception as exc:  # the launcher itself, before its ranks ran: a rendezvous that timed out
        message = f"{type(exc).__name__}: {exc}"[:2000]
        _write(LaunchFailure(session=session, rank=None, message=message, t_wall=time.time()))
        raise


def _sigterm_stays_ignored() -> None:
    """accelerate 1.16's launcher of one process ends itself on SIGTERM and kills its process 5 s later
    (``_run_subprocess``): a graceful stop's checkpoint, which a real model takes longer to write, was cut short
    (a 12 s save: no checkpoint, 'the training process ended without saving one'). kaio's SIGTERM is the
    process's to answer: this launcher goes on ignoring it and waits, as with earlier accelerate."""
    import accelerate.commands.launch as accelerate_launch

    if getattr(accelerate_launch, "signal", None) is not signal:
        return  # accelerate 1.15 and before: its launcher of one process handles no signal

    class KeepsSigtermIgnored:
        def __getattr__(self, name: str) -> object:
            return getattr(signal, name)

        @staticmethod
        def signal(signum: int, handler: Any) -> Any:
            if signum == signal.SIGTERM:
                return signal.getsignal(signum)  # (its own handler is not installed, nor its "previous" restored)
            return signal.signal(signum, handler)

    accelerate_launch.signal = KeepsSigtermIgnored()


def _exit_code(code: int) -> int:
    """The training's own exit code, as a shell gives it (128+N for a rank killed by signal N), for kaio to
    exit with; the failure is written above, and the rank printed its own traceback: none of the launcher's."""
    return 128 - code if code < 0 else code or 1


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _write(failure: LaunchFailure) -> None:
    error_dir = os.environ.get(ENV_ERROR_DIR)
    if not error_dir:
        return
    try:
        os.makedirs(error_dir, exist_ok=True)
        with open(os.path.join(error_dir, f"launch-s{failure.session}.json"), "wb") as f:
            f.write(msgspec.json.encode(failure))
    except OSError:
        pass  # the failure still propagates; only its naming is lost


if __name__ == "__main__":
    main()
    from kaio.child.quick_exit import exit_without_teardown

    exit_without_teardown()  # the training has ended; skip the teardown of torch's modules (0.5 s)

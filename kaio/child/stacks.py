"""Every rank's Python stack, written when kaio asks: where a hung training waits.

``faulthandler`` is registered on ``STACK_SIGNAL``: it writes every thread's
stack from C, without the GIL, so a rank stuck in a collective or a C call
answers too. Each process writes to its own file,
``<stacks dir>/s<session>-r<rank>-<pid>.txt``; the file's name tells the
supervisor which rank and process it is (``kaio.run.stalls``).
"""

from __future__ import annotations

import faulthandler
import os
from typing import IO

from kaio.telemetry.protocol import ENV_SESSION, ENV_STACKS_DIR, STACK_SIGNAL, stack_file_name

_open: list[IO[bytes]] = []  # the file faulthandler writes to, open for the process's life


def install(rank: int) -> None:
    """Registers the stack dump, unless kaio did not say where (the child started by hand)."""
    folder = os.environ.get(ENV_STACKS_DIR)
    if not folder:
        return
    session = int(os.environ.get(ENV_SESSION, "1"))
    try:
        os.makedirs(folder, exist_ok=True)
        out = open(os.path.join(folder, stack_file_name(session, rank, os.getpid())), "ab", buffering=0)  # noqa: SIM115
    except OSError:
        return  # no stacks on a stall; the training is not concerned
    _open.append(out)
    faulthandler.register(STACK_SIGNAL, file=out, all_threads=True, chain=False)

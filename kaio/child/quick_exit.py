"""Ending a child process without the interpreter's teardown."""

from __future__ import annotations

import os
import sys


def exit_without_teardown(code: int = 0) -> None:
    """End the process now, skipping the interpreter's teardown.

    With transformers imported, Python frees its objects one by one at exit for 1-1.5 s on a
    small CPU: time the user waits for the report. Only for code whose files are all written
    and that registered nothing that must run at exit (the built-in recipe, the launcher).
    """
    import logging

    logging.shutdown()
    _flush_std_streams()
    os._exit(code)


def exit_after_script(code: int = 0) -> None:
    """End a rank whose user script returned: everything a normal exit does that a script can
    observe, then the process ends before the interpreter's finalization and C++'s static destructors.

    There, a gloo process group still referenced (DDP keeps it, whatever destroy_process_group
    dropped) has its worker threads reach back into a dying interpreter and the rank aborts
    ("terminate called without an active exception", SIGABRT) after a run that succeeded; torch
    elastic then ends the job as failed. So, in the order Python's own exit takes: wait for the
    script's non-daemon threads, run its atexit handlers, collect garbage (an unclosed file in a
    reference cycle is closed), flush every file still open, then end.
    """
    import atexit
    import gc
    import io
    import logging
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    gc.collect()
    for obj in gc.get_objects():
        if isinstance(obj, io.IOBase):
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except (OSError, ValueError):
                pass  # a pipe whose reader left, a file closed under us: nothing more can be kept
    _flush_std_streams()
    os._exit(code)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass

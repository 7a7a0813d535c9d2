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


FLUSH_BUDGET_S = 10.0  # how long the files still open at exit may take to flush


def exit_after_script(code: int = 0) -> None:
    """End a rank whose user script returned, after a gloo process group: everything a normal exit does that
    a script is likely to observe, then the process ends before the interpreter's finalization and C++'s
    static destructors.

    There, a gloo group still referenced (DDP keeps it, whatever destroy_process_group dropped) has its
    worker threads reach back into a dying interpreter and the rank aborts ("terminate called without an
    active exception", SIGABRT) after a run that succeeded; torch elastic then ends the job as failed. So, in
    the order Python's own exit takes: its thread shutdown (the exit hooks of thread pools, then every
    non-daemon thread joined), the atexit handlers, garbage collected (an unclosed file in a reference cycle
    is closed), every file still open flushed, then the end. Skipped: the finalizers of objects still alive
    at exit (a gzip or zip file a module left open is flushed, not closed). NCCL jobs never come here.
    """
    import _io
    import atexit
    import gc
    import logging
    import threading

    threading._shutdown()  # type: ignore[attr-defined]  # what Python's exit runs first; no public name
    atexit._run_exitfuncs()
    logging.shutdown()
    # A file's flush waits for its lock, which a daemon thread blocked in a write may hold for ever (Python's
    # own exit refuses such a lock instead; CI saw a rank hang here for 5 minutes after a finished run). The
    # rank ends anyway once the flushing has had its time.
    watchdog = threading.Timer(FLUSH_BUDGET_S, os._exit, (code,))
    watchdog.daemon = True
    watchdog.start()
    gc.collect()
    for obj in gc.get_objects():
        # io.IOBase's C base: 5x faster to test over a million objects. By the type, not isinstance: that reads
        # each object's __class__, which some modules' deprecated objects answer with a warning (torch's reduce_op).
        if issubclass(type(obj), _io._IOBase):
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except Exception:
                pass  # a pipe whose reader left, a file closed under us, an odd wrapper: nothing more to keep
    _flush_std_streams()
    os._exit(code)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass

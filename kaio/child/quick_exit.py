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
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)

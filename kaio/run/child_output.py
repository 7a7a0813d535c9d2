"""The child's output as the supervisor shows it: ``tail -f`` of child.log into the loop's queue, a progress bar
redrawn in place read as it stands, and the Trainer's own metric lines told apart from the script's prints."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from kaio.run.snapshot import as_shown, progress_bar

# The dict the Trainer prints at every logging step ({'loss': '4.55', 'grad_norm': ...}): child.log keeps it; the
# dashboard and plain output sum it up on the status line, and show the rest of the output in full: warnings,
# errors, the script's own prints, and the Trainer's rarer dicts, whose numbers the status line does not carry
# (an evaluation's {'eval_loss': ..., 'eval_accuracy': ...}, predict()'s, the closing {'train_runtime': ...}).
_TRAINER_LOG_DICT = re.compile(
    r"\{'(?:loss|grad_norm|learning_rate|epoch)': [^{}]*\}\s*$"
)  # ends what a terminal shows
# transformers 5 prints each float of its dict as a string ('loss': '4.55'): a dict with a bare float (a script
# printing trainer.evaluate()'s metrics) is the script's own line.
_BARE_FLOAT = re.compile(r"': -?(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][-+]?\d+)?[,}]")


def is_trainer_log_line(shown: str, transformers_version: str | None) -> bool:
    """Whether a line of the child's output is the dict the Trainer prints at each log (not the script's). The
    progress bar (stderr) and the dict (stdout) reach child.log through two descriptors and interleave on a busy
    machine: the dict may follow the bar's last redraw, or the blanks that cleared it, on the same line."""
    found = _TRAINER_LOG_DICT.search(shown)
    if found is None:
        return False
    before = shown[: found.start()]
    if before.strip() and progress_bar(before) is None:
        return False
    major = (transformers_version or "").split(".")[0]
    return not (major.isdigit() and int(major) >= 5 and _BARE_FLOAT.search(shown[found.start() :]))


def follow_output(proc: subprocess.Popen, log_path: Path, offset: int, put: Callable[[tuple[str, str]], None]) -> None:
    """``tail -f`` of the child's log, from this session's start, until the child has exited."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        partial = b""
        while True:
            exited = proc.poll() is not None
            chunk = log.read(1 << 16)
            if chunk:
                *lines, partial = (partial + chunk).split(b"\n")
                for raw in lines:
                    put(("log", raw.decode("utf-8", errors="replace").rstrip("\r")))
                partial = _recent_redraws(partial)
                redrawn = _latest_bar(partial)  # a bar redrawn in place: its line ends only when it is done
                if redrawn is not None:
                    put(("redraw", redrawn))
            elif exited:
                break
            else:
                time.sleep(0.05)
        if partial:
            put(("log", partial.decode("utf-8", errors="replace")))


PARTIAL_KEPT = 1 << 16  # of a line not ended yet that keeps being redrawn: its latest redraws


def _recent_redraws(partial: bytes) -> bytes:
    """A line not ended yet, its older redraws dropped once it is long: tqdm's bar redraws its line ten times a
    second all training long (tens of MB in a day), and each read appended to all of it. What a terminal shows
    of the line is its last redraw; child.log keeps every byte."""
    if len(partial) <= 2 * PARTIAL_KEPT:
        return partial
    cut = partial.find(b"\r", len(partial) - PARTIAL_KEPT)
    return partial[cut:] if cut >= 0 else partial


def _latest_bar(partial: bytes) -> str | None:
    """The newest whole state of a progress bar on a line not ended yet: its last redraw, or the one before (the
    last may be cut mid-write). Read from the end: a bar's line grows with every redraw, all training long."""
    end = len(partial)
    for _ in range(2):
        start = partial.rfind(b"\r", 0, end)
        if start < 0:
            return None
        redrawn = partial[start + 1 : end].decode("utf-8", errors="replace")
        if progress_bar(as_shown(redrawn)) is not None:
            return redrawn
        end = start
    return None

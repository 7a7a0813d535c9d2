"""Naming why a session failed: the rank's own error file first, then torch elastic's summary.

A rank killed by a signal cannot write an error file; torch elastic's
launcher then prints a "Root Cause (first observed failure)" block in the
child's log, which names the rank and the signal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):(?P<block>.*?)(?:={10,}|\Z)", re.S)
_FIELD = re.compile(r"^\s*(?P<name>rank|exitcode|traceback)\s*:\s*(?P<value>.*)$", re.M)
_SIGNAL_IN_EXITCODE = re.compile(r"\((SIG[A-Z]+)\)")


def root_cause(report_dir: Path, session: int, log_text: str) -> tuple[str | None, str | None]:
    """``(root-cause line, signal name)`` of a failed session.

    torch elastic names the first rank that failed; that rank's own error file
    has its exception. A rank killed by a signal has no file: elastic's line
    names the signal. Without an elastic summary (one process), the earliest
    error file.
    """
    errors = _error_files(report_dir, session)
    elastic_line, elastic_rank, signal_name = from_elastic_log(log_text)
    if elastic_line is not None:
        own = [e for e in errors if str(e.get("rank")) == elastic_rank]
        return (_line(own[0]) if own else elastic_line), signal_name
    if errors:
        return _line(min(errors, key=lambda e: e.get("t_wall", 0))), None
    return None, None


def _line(error: dict) -> str:
    return f"rank {error.get('rank')}: {error.get('root_cause')}"


def _error_files(report_dir: Path, session: int) -> list[dict]:
    error_dir = report_dir / "errors"
    if not error_dir.is_dir():
        return []
    errors = []
    for path in error_dir.glob("error-*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("session", session) == session:
            errors.append(record)
    return errors


def from_elastic_log(log_text: str) -> tuple[str | None, str | None, str | None]:
    """``(root-cause line, rank, signal name)`` from torch elastic's failure summary, if the log has one."""
    match = None
    for match in _ROOT_CAUSE.finditer(log_text):
        pass  # the last summary is this session's
    if match is None:
        return None, None, None
    fields = {m.group("name"): m.group("value").strip() for m in _FIELD.finditer(match.group("block"))}
    rank = fields.get("rank", "?").split()[0]
    signal_match = _SIGNAL_IN_EXITCODE.search(fields.get("exitcode", ""))
    signal_name = signal_match.group(1) if signal_match else None
    detail = fields.get("traceback") or fields.get("exitcode") or "failed"
    if detail.startswith("To enable traceback"):
        detail = f"exit code {fields.get('exitcode', '?')}"
    return f"rank {rank}: {detail}", rank, signal_name

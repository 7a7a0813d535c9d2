"""Naming why a session failed, from the error files the child writes (never from its log's text).

A failing rank writes its own exception (``RankError``); the launcher writes
torch elastic's record of the first rank that failed (``LaunchFailure``), which
also names a rank killed by a signal. The first failing rank's own exception
wins; else the signal or exit code that ended it.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from kaio.telemetry.protocol import LaunchFailure, RankError


def root_cause(error_dir: Path, session: int) -> tuple[str | None, str | None]:
    """``(root-cause line, signal name)`` of a failed session, as far as the error files tell."""
    errors = [e for e in _read_all(error_dir, "error-*.json", RankError) if e.session == session]
    launch = next(iter(_read_all(error_dir, f"launch-s{session}.json", LaunchFailure)), None)
    if launch is not None:
        own = [e for e in errors if e.rank == launch.rank]
        if own:
            return f"rank {launch.rank}: {own[0].root_cause}", launch.signal
        how = f"killed by {launch.signal}" if launch.signal else f"exit code {launch.exit_code}"
        return f"rank {launch.rank}: {how}", launch.signal
    if errors:
        first = min(errors, key=lambda e: e.t_wall or 0)
        return f"rank {first.rank}: {first.root_cause}", None
    return None, None


def _read_all(error_dir: Path, pattern: str, kind: type) -> list:
    found: list = []
    for path in sorted(error_dir.glob(pattern)) if error_dir.is_dir() else ():
        try:
            found.append(msgspec.json.decode(path.read_bytes(), type=kind))
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue  # a file half-written by a dying process
    return found

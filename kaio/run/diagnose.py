"""Naming why a session failed, from the error files the child writes (never from its log's text).

A failing rank writes its own exception (``RankError``); the launcher writes
torch elastic's record of the first rank that failed (``LaunchFailure``), which
also names a rank killed by a signal. The first failing rank's own exception
wins; else the signal or exit code that ended it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec

from kaio.telemetry.protocol import LAUNCHER_FAILED, LaunchFailure, RankError


@dataclass(frozen=True)
class RootCause:
    """Why a session failed: ``rank R: <its error>``, the signal that ended it, and when (wall time, the
    failing node's clock)."""

    text: str | None = None
    signal: str | None = None
    t_wall: float | None = None


def root_cause(error_dir: Path, session: int) -> RootCause:
    """The root cause of a failed session, as far as the error files tell."""
    errors = [e for e in _read_all(error_dir, "error-*.json", RankError) if e.session == session]
    launch = next(iter(_read_all(error_dir, f"launch-s{session}.json", LaunchFailure)), None)
    if launch is not None and launch.rank is None:  # the launcher's own exception: a rank's, if any, came first
        if not errors:
            return RootCause(f"{LAUNCHER_FAILED}{launch.message}", None, launch.t_wall)
        launch = None
    if launch is not None:
        own = [e for e in errors if e.rank == launch.rank]
        if own:
            return RootCause(f"rank {launch.rank}: {own[0].root_cause}", launch.signal, own[0].t_wall or launch.t_wall)
        how = f"killed by {launch.signal}" if launch.signal else f"exit code {launch.exit_code}"
        return RootCause(f"rank {launch.rank}: {how}", launch.signal, launch.t_wall)
    if errors:
        first = min(errors, key=lambda e: e.t_wall or 0)
        return RootCause(f"rank {first.rank}: {first.root_cause}", None, first.t_wall)
    return RootCause()


def _read_all(error_dir: Path, pattern: str, kind: type) -> list:
    found: list = []
    for path in sorted(error_dir.glob(pattern)) if error_dir.is_dir() else ():
        try:
            found.append(msgspec.json.decode(path.read_bytes(), type=kind))
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue  # a file half-written by a dying process
    return found

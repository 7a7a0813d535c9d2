"""The permanent record of a run: ``history.json``, ``report.md``, ``telemetry.png``.

Light to import: matplotlib and numpy load only when a PNG is rendered.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from kaio.errors import ReportError
from kaio.fsutil import atomic_write_json, atomic_write_text
from kaio.report.markdown import redact, render_markdown
from kaio.report.plot import render_telemetry_png
from kaio.report.summary import summarize

__all__ = ["SCHEMA_VERSION", "load_history", "render_markdown", "render_telemetry_png", "summarize", "write_reports"]

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "project", "status", "sessions", "steps")
REBUILD_HINT = "rebuild it from the run's journal.jsonl with `kaio report <project>`"


def write_reports(history: dict, report_dir: Path, *, png: bool = True) -> dict:
    """Write history.json, telemetry.png (when ``png``) and report.md into ``report_dir``; return the summary."""
    report_dir = Path(report_dir)
    safe = json_safe_history(history)
    summary = summarize(safe)
    # Compact: an indented dump takes Python's slow pure-Python encoder (17 s for 400 MB).
    atomic_write_json(report_dir / "history.json", safe, indent=None)
    if png:
        # The figure is a view; a plotting failure must not cost the run its written record.
        try:
            render_telemetry_png(safe, report_dir / "telemetry.png")
        except Exception as exc:  # noqa: BLE001
            summary["warnings"].append(f"telemetry.png was not rendered: {type(exc).__name__}: {exc}")
    atomic_write_text(report_dir / "report.md", render_markdown(safe, summary))
    return summary


def json_safe_history(history: dict) -> dict:
    """A copy fit for the permanent record: non-finite floats as null (a step's NaN/inf loss keeps its
    marker), and the config's secret-named values redacted again in case a caller forgot."""
    safe = _json_safe(history)
    if "config" in safe:
        safe["config"] = redact(safe["config"])
    for original, step in zip(history.get("steps") or [], safe.get("steps") or []):
        loss = original.get("loss")
        if isinstance(loss, float) and not math.isfinite(loss) and not step.get("loss_nonfinite"):
            step["loss_nonfinite"] = "nan" if math.isnan(loss) else "inf"
    return safe


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def load_history(path: str | os.PathLike) -> dict:
    """Read and check a history.json; a ``ReportError`` names the file and what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file; {REBUILD_HINT}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: corrupt (not UTF-8 text); {REBUILD_HINT}") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    try:
        history = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"{path}: truncated or corrupt JSON at line {exc.lineno} ({exc.msg}); {REBUILD_HINT}"
        ) from None
    _check_history(path, history)
    return history


def _check_history(path: Path, history: Any) -> None:
    if not isinstance(history, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(history).__name__}; {REBUILD_HINT}")
    missing = [key for key in REQUIRED_KEYS if key not in history]
    if missing:
        raise ReportError(f"{path}: missing key(s) {', '.join(missing)}; not a kaio history.json, {REBUILD_HINT}")
    version = history["schema_version"]
    if version != SCHEMA_VERSION:
        raise ReportError(
            f"{path}: schema_version {version!r} is not supported (this kaio reads {SCHEMA_VERSION}); "
            f"use the kaio that wrote it, or {REBUILD_HINT}"
        )
    for key in ("sessions", "steps"):
        if not isinstance(history[key], list):
            raise ReportError(f"{path}: '{key}' must be a list, found {type(history[key]).__name__}; {REBUILD_HINT}")
    for index, step in enumerate(history["steps"]):
        if not isinstance(step, dict) or not isinstance(step.get("step"), int):
            raise ReportError(f"{path}: steps[{index}] has no integer 'step'; {REBUILD_HINT}")

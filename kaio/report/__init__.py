"""The permanent record of a run: ``history.json``, ``report.md``, ``telemetry.png``.

Light to import: matplotlib and numpy load only when a PNG is rendered.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from kaio.errors import ReportError
from kaio.fsutil import atomic_write_chunks, atomic_write_text, json_safe
from kaio.report.markdown import redact, render_markdown
from kaio.report.plot import render_telemetry_png
from kaio.report.summary import summarize

if TYPE_CHECKING:
    from kaio.report.tally import RunTally

__all__ = ["SCHEMA_VERSION", "load_history", "render_markdown", "render_telemetry_png", "summarize", "write_reports"]

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "project", "status", "sessions", "steps")
REBUILD_HINT = "rebuild it from the run's journal.jsonl with `kaio report <project>`"


def write_reports(
    history: dict,
    report_dir: Path,
    *,
    tally: "RunTally | None" = None,
    step_chunks: Iterable[bytes] | None = None,
    png: bool = True,
    history_json: bool = True,
    extra_warnings: Iterable[str] = (),
) -> dict:
    """Write history.json (when ``history_json``), telemetry.png (when ``png``) and report.md into
    ``report_dir``; return the summary.

    ``history`` is the document; a live run passes it without its steps, and gives them as
    ``step_chunks`` (history.json's step lines, streamed from steps.jsonl) with their running
    figures in ``tally``, so that nothing per step is held in memory. Without those, they come
    from ``history["steps"]`` (a hand-made or reloaded history).
    """
    from kaio.report.tally import tally_steps

    report_dir = Path(report_dir)
    header = json_safe({k: v for k, v in history.items() if k != "steps"})
    if "config" in header:
        header["config"] = redact(header["config"])  # again, in case a caller forgot
    if tally is None:
        steps = [_marked_nonfinite(step) for step in history.get("steps") or []]
        tally = tally_steps(steps)
        step_chunks = (json.dumps(step, separators=(",", ":"), allow_nan=False, default=str).encode() + b"\n" for step in steps)
    elif history_json and step_chunks is None:
        raise ValueError("history.json needs the step_chunks that go with the tally")
    summary = summarize(header, tally)
    summary["warnings"].extend(extra_warnings)
    if history_json:
        atomic_write_chunks(report_dir / "history.json", _history_document(header, step_chunks))
    if png:
        # The figure is a view; a plotting failure must not cost the run its written record.
        try:
            render_telemetry_png(header, report_dir / "telemetry.png", tally)
        except Exception as exc:  # noqa: BLE001
            summary["warnings"].append(f"telemetry.png was not rendered: {type(exc).__name__}: {exc}")
    atomic_write_text(report_dir / "report.md", render_markdown(header, summary))
    return summary


def _marked_nonfinite(step: dict) -> dict:
    """A step fit for strict JSON: non-finite numbers as null, a NaN/inf loss keeping its marker."""
    safe = json_safe(step)
    loss = step.get("loss")
    if isinstance(loss, float) and not math.isfinite(loss) and not safe.get("loss_nonfinite"):
        safe["loss_nonfinite"] = "nan" if math.isnan(loss) else "inf"
    return safe


def _history_document(header: dict, step_chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The history.json bytes: the header's keys, then ``"steps"``, one entry per line.

    ``step_chunks`` is steps.jsonl's bytes (one entry per line) in blocks of any size.
    """
    opening = json.dumps(header, separators=(",", ":"), allow_nan=False, default=str)
    yield opening[:-1].encode() + (b',"steps":[\n' if header else b'"steps":[\n')
    held = b""  # the output's last two bytes: the final line's ",\n" must not be written
    for chunk in step_chunks:
        if chunk:
            out = held + chunk.replace(b"\n", b",\n")
            yield out[:-2]
            held = out[-2:]
    if held != b",\n":
        yield held
    yield b"\n]}\n"


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

"""history.json, and the three report files written together.

All three are written from a ``HistoryHeader`` (the run's sessions, devices,
what was trained) and the ``RunIndex`` (the steps and evaluations). Light to
import: matplotlib and numpy load only when a PNG is rendered.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from kaio.errors import ReportError
from kaio.fsutil import atomic_file, atomic_write_text, copy_range, write_all
from kaio.record.index import RunIndex
from kaio.record.paths import ProjectPaths
from kaio.record.rules import LossSmoother
from kaio.record.types import (
    SCHEMA_VERSION,
    CheckpointSaved,
    DeviceSummary,
    EvalEntry,
    HistoryHeader,
    HistoryPrefix,
    HostInfo,
    HubOutcome,
    RunDescription,
    Session,
    Status,
    StepEntry,
    Telemetry,
    nonfinite_tag,
)
from kaio.report.figure_data import figure_data
from kaio.report.markdown import render_markdown
from kaio.report.summary import Summary, summarize

__all__ = ["history_document", "history_from_file", "write_history", "write_reports"]

REBUILD_HINT = "rebuild it from the run's journal.jsonl with `kaio report <project>`"
_ENCODER = msgspec.json.Encoder()


def write_reports(
    header: HistoryHeader,
    index: RunIndex,
    report_dir: Path,
    *,
    history_json: bool = True,
    png: bool = True,
    extra_warnings: Iterable[str] = (),
    final_through: int = 0,
    previous: HistoryPrefix | None = None,
) -> tuple[Summary, HistoryPrefix | None]:
    """Write history.json (when ``history_json``), telemetry.png (when ``png``, in this process) and
    report.md; returns the summary, and where history.json's final steps lie (``write_history``)."""
    paths = ProjectPaths(report_dir)
    summary = summarize(header, index)
    summary.warnings.extend(extra_warnings)
    prefix = None
    if history_json:  # every warning report.md lists: the run's own, then what only the whole history shows
        whole = msgspec.structs.replace(header, warnings=list(summary.warnings))
        prefix = write_history(paths.history, whole, index, final_through=final_through, previous=previous)
    if png:
        from kaio.report.plot import render_telemetry_png

        try:  # the figure is a view: a plotting failure must not cost the run its written record
            render_telemetry_png(figure_data(header, index), paths.figure)
        except Exception as exc:
            summary.warnings.append(f"telemetry.png was not rendered: {type(exc).__name__}: {exc}")
    atomic_write_text(paths.report, render_markdown(header, summary, index.evals()))
    return summary, prefix


def history_document(header: HistoryHeader, index: RunIndex) -> Iterator[bytes]:
    """The history.json bytes: the header's keys, the evaluations, then ``"steps"``, one entry per line
    (so that ``grep`` and ``tail`` work on it)."""
    yield _opening(header, index)
    separator = b""
    for line in index.step_lines():
        yield separator + line[:-1]
        separator = b",\n"
    yield _CLOSING if not separator else b"\n" + _CLOSING


_STEPS_KEY = b',"steps":[\n'
_CLOSING = b"]}\n"
_BATCH_BYTES = 1 << 20


def write_history(
    path: Path, header: HistoryHeader, index: RunIndex, *, final_through: int = 0, previous: HistoryPrefix | None = None
) -> HistoryPrefix | None:
    """history.json (``history_document``'s bytes), written atomically. The lines of the steps up to
    ``final_through`` will not change again: where ``previous`` says that the file on disk holds them as they
    were written, they are copied from it (a long run's history.json is GBs) and only the later steps are read
    from the index. Returns where the final steps' lines lie in the new file (None: no final step in it)."""
    opening = _opening(header, index)
    old = _reusable(path, previous, index, final_through)
    try:
        return _written(path, opening, index, final_through, old, previous)
    except (OSError, EOFError):
        if old is None:
            raise
        return _written(path, opening, index, final_through, None, None)  # the copy failed: the whole file
    finally:
        if old is not None:
            os.close(old)


def _written(
    path: Path, opening: bytes, index: RunIndex, final_through: int, old: int | None, previous: HistoryPrefix | None
) -> HistoryPrefix | None:
    through = end = None
    with atomic_file(path) as f:
        fd = f.fileno()
        write_all(fd, opening)
        at = len(opening)
        separator, after = b"", None
        if old is not None and previous is not None:
            copy_range(old, fd, previous.start, previous.end)
            at += previous.end - previous.start
            separator, after, through, end = b",\n", previous.through, previous.through, at
        batch: list[bytes] = []
        size = 0
        for step, line in index.numbered_step_lines(after):
            piece = separator + line[:-1]
            batch.append(piece)
            size += len(piece)
            at += len(piece)
            separator = b",\n"
            if step <= final_through:
                through, end = step, at
            if size >= _BATCH_BYTES:
                write_all(fd, b"".join(batch))
                batch, size = [], 0
        batch.append(_CLOSING if not separator else b"\n" + _CLOSING)
        write_all(fd, b"".join(batch))
    if through is None or end is None:
        return None
    count, crc = _steps_through(index, through)
    if crc is None:
        return None
    stat = path.stat()
    return HistoryPrefix(
        inode=stat.st_ino,
        size=stat.st_size,
        ctime_ns=stat.st_ctime_ns,
        start=len(opening),
        end=end,
        through=through,
        count=count,
        crc=crc,
    )


def _opening(header: HistoryHeader, index: RunIndex) -> bytes:
    opening = _ENCODER.encode(header)[:-1]
    before = index.metrics_at(0)  # what the script logged before its first step ended: no step's entry
    if before:
        opening += b',"metrics_at_step_0":' + _ENCODER.encode(before)
    return opening + b',"evals":' + _ENCODER.encode(index.evals()) + _STEPS_KEY


def _steps_through(index: RunIndex, step: int) -> tuple[int, int | None]:
    """How many steps the index holds up to ``step``, and the CRC of ``step``'s row (None: no such row)."""
    (count,) = index.conn.execute("SELECT COUNT(*) FROM steps WHERE step <= ?", (step,)).fetchone()
    row = index.conn.execute("SELECT crc FROM steps WHERE step = ?", (step,)).fetchone()
    return count, None if row is None else row[0]


def _reusable(path: Path, previous: HistoryPrefix | None, index: RunIndex, final_through: int) -> int | None:
    """The history.json written last, opened, where its final steps' lines can be copied: the same file as
    written (not replaced, not touched), and the index's steps up to ``previous.through`` the same."""
    if previous is None or previous.through > final_through:
        return None
    if _steps_through(index, previous.through) != (previous.count, previous.crc):
        return None  # a resume trained those steps again
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.fstat(fd)
        same = (stat.st_ino, stat.st_size, stat.st_ctime_ns) == (previous.inode, previous.size, previous.ctime_ns)
        if (
            same
            and os.pread(fd, len(_STEPS_KEY), previous.start - len(_STEPS_KEY)) == _STEPS_KEY
            and os.pread(fd, 1, previous.end - 1) == b"}"
        ):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def history_from_file(path: Path) -> tuple[HistoryHeader, RunIndex]:
    """A history.json read back (a project whose journal is gone): its header, and its steps and
    evaluations in an in-memory index. Reads schema 1 (kaio before the index) and 2."""
    document = _read_json(path)
    version = document.get("schema_version")
    if version not in (1, SCHEMA_VERSION):
        raise ReportError(
            f"{path}: schema_version {version!r} is not supported (this kaio reads 1 and "
            f"{SCHEMA_VERSION}); use the kaio that wrote it, or {REBUILD_HINT}"
        )
    for key in ("project", "sessions", "steps"):
        if key not in document:
            raise ReportError(f"{path}: missing key {key!r}; not a kaio history.json, {REBUILD_HINT}")
    try:
        header = _header(document) if version == SCHEMA_VERSION else _header_v1(document)
        steps = sorted(msgspec.convert(document["steps"], list[StepEntry], strict=False), key=lambda e: e.step)
        evals = msgspec.convert(document.get("evals") or [], list[EvalEntry], strict=False)
    except msgspec.ValidationError as exc:
        raise ReportError(f"{path}: {exc}; {REBUILD_HINT}") from None
    _mark_nonfinite(steps)
    if version == 1:
        _derive_v1(steps)
    index = RunIndex.in_memory()
    for entry in steps:
        index.add_step(entry)
    for evaluation in evals:
        index.add_eval(evaluation)
    for name, value in (document.get("metrics_at_step_0") or {}).items():
        if isinstance(value, (int, float)):
            index.add_metric(0, name, value)
    return header, index


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file; {REBUILD_HINT}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: corrupt (not UTF-8 text); {REBUILD_HINT}") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"{path}: truncated or corrupt JSON at line {exc.lineno} ({exc.msg}); {REBUILD_HINT}"
        ) from None
    if not isinstance(document, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(document).__name__}; {REBUILD_HINT}")
    return document


def _header(document: dict[str, Any]) -> HistoryHeader:
    fields = {k: v for k, v in document.items() if k not in ("steps", "evals")}
    return msgspec.convert(fields, HistoryHeader, strict=False)


def _mark_nonfinite(steps: list[StepEntry]) -> None:
    """A hand-made file's raw NaN/Infinity loss or gradient norm: null and tagged, as the journal's replay gives it."""
    for entry in steps:
        if (tag := nonfinite_tag(entry.loss)) is not None:
            entry.loss, entry.loss_nonfinite = None, tag
        if (tag := nonfinite_tag(entry.grad_norm)) is not None:
            entry.grad_norm, entry.grad_norm_nonfinite = None, tag


def _derive_v1(steps: list[StepEntry]) -> None:
    """Schema 1 kept neither the steps' durations nor the smoothed loss: derived as the journal's replay
    derives them (kaio.run.assembly), over the steps in step order."""
    smoother = LossSmoother()
    last_end: dict[int, float] = {}  # by session
    for entry in steps:
        if entry.duration_s is None and entry.t_mono is not None:
            previous = last_end.get(entry.session)
            gap = entry.t_mono - previous if previous is not None else None
            entry.duration_s = gap if gap is not None and gap > 0 else entry.step_time_s
        if entry.t_mono is not None:
            last_end[entry.session] = entry.t_mono
        if entry.loss is not None and entry.loss_smoothed is None:
            entry.loss_smoothed, entry.loss_diverged = smoother.add(entry.loss)


def _run_v1(run: Any) -> RunDescription | None:
    """Schema 1's flat ``run`` as a ``RunDescription`` (its ``lora`` was kaio's LoRA config)."""
    if not isinstance(run, dict) or not run:
        return None
    lora = run.get("lora") if isinstance(run.get("lora"), dict) else None
    fields = {
        "world_size": run.get("world_size"),
        "device": run.get("device"),
        "max_steps": run.get("max_steps"),
        "precision": run.get("precision"),
        "effective_batch_size": run.get("effective_batch_size"),
        "model": {
            "name_or_path": run.get("base_model"),
            "architecture": run.get("architecture"),
            "total_params": run.get("total_params"),
            "trainable_params": run.get("trainable_params"),
        },
        "peft": None
        if lora is None
        else {
            "peft_type": "LORA",
            "r": lora.get("r"),
            "alpha": lora.get("alpha"),
            "dropout": lora.get("dropout"),
            "target_modules": lora.get("target_modules"),
        },
        "args": {
            "per_device_train_batch_size": run.get("per_device_batch_size"),
            "gradient_accumulation_steps": run.get("gradient_accumulation_steps"),
            "learning_rate": run.get("learning_rate"),
            "lr_scheduler_type": run.get("lr_scheduler_type"),
            "optim": run.get("optimizer"),
        },
    }
    return msgspec.convert(fields, RunDescription, strict=False)


def _header_v1(document: dict[str, Any]) -> HistoryHeader:
    """Schema 1 kept the run and the devices flat; only what the report shows is carried over."""
    from kaio.devices.base import DeviceInfo

    telemetry = document.get("telemetry") or {}
    devices = [
        DeviceSummary(
            key=d["key"],
            info=msgspec.convert(d, DeviceInfo, strict=False),
            energy_j=d.get("energy_j"),
            energy_method=d.get("energy_method"),
        )
        for d in document.get("devices") or []
        if d.get("key")
    ]
    for step in document["steps"]:  # schema 1's GB of the max over ranks is vram_peak_bytes now
        if isinstance(step, dict) and step.get("vram_gb") is not None and "vram_peak_bytes" not in step:
            step["vram_peak_bytes"] = int(step["vram_gb"] * 1e9)
    return HistoryHeader(
        project=str(document.get("project")),
        status=msgspec.convert(document.get("status") or "RUNNING", Status),
        config=document.get("config"),
        run=_run_v1(document.get("run")),
        sessions=msgspec.convert(document.get("sessions") or [], list[Session], strict=False),
        devices=devices,
        host=msgspec.convert(document.get("host") or {}, HostInfo, strict=False),
        telemetry=msgspec.convert(
            {k: v for k, v in telemetry.items() if not isinstance(v, dict)}, Telemetry, strict=False
        ),
        warnings=[str(w) for w in document.get("warnings") or []],
        hub=msgspec.convert(document.get("hub"), HubOutcome | None, strict=False),
        checkpoints=msgspec.convert(document.get("checkpoints") or [], list[CheckpointSaved], strict=False),
    )

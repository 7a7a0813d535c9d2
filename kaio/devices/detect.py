"""Finding the GPU backends present on this host.

A missing library, a missing driver or zero devices is a note in the result,
never an exception: kaio then records the host only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from kaio.devices.base import DetectResult
from kaio.devices.vendor import RunPids

PREFERENCES = ("auto", "nvml", "amdsmi", "none")
NO_GPU_NOTE = "No GPU found: kaio records the host's CPU and RAM only"


def detect(
    preference: str = "auto",
    environ: Mapping[str, str] = os.environ,
    run_pids: RunPids | None = None,
) -> DetectResult:
    """Every GPU backend that works here, restricted by ``preference``.

    ``"auto"`` tries NVML and AMD SMI (a host may have both), ``"nvml"`` or
    ``"amdsmi"`` only that vendor, ``"none"`` no GPU telemetry. ``environ``
    decides which GPUs are marked as the run's (``CUDA_VISIBLE_DEVICES``, ...).
    ``run_pids`` returns the run's process ids, for per-process VRAM.
    """
    if preference not in PREFERENCES:
        raise ValueError(f"GPU backend preference must be one of {', '.join(PREFERENCES)}, not {preference!r}")
    result = DetectResult()
    if preference == "none":
        result.notes.append("GPU telemetry is turned off (backend preference 'none')")
        return result
    absent: list[str] = []  # why a vendor found nothing
    if preference in ("auto", "nvml"):
        from kaio.devices.nvml import open_nvml

        _add(result, absent, *open_nvml(environ, run_pids))
    if preference in ("auto", "amdsmi"):
        from kaio.devices.amd import open_amdsmi

        _add(result, absent, *open_amdsmi(environ, run_pids))
    # With "auto", a vendor that is simply not on this host is not worth a note once another one is.
    if preference != "auto" or not result.backends:
        result.notes.extend(absent)
    if not result.backends:
        result.notes.append(NO_GPU_NOTE)
    return result


def _add(result: DetectResult, absent: list[str], backend, notes: list[str]) -> None:
    if backend is None:
        absent.extend(notes)
    else:
        result.backends.append(backend)
        result.notes.extend(notes)

"""Reading vendor libraries safely: the one call wrapper and value clean-up.

Every vendor call goes through :class:`MetricGuard`: an exception becomes
``None`` for that metric only, so one failing reading never hides the others.
Metrics whose call answered "not supported" are remembered and never called
again: on some drivers an unsupported query is slow, and it will not start
working mid-run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kaio.devices.base import GpuSample

RunPids = Callable[[], "set[int]"]  # the run's process ids, for per-process VRAM

# Vendors mark "no value" with the all-ones integer of the field's width (AMD SMI
# before it turned them into "N/A" strings).
_ALL_ONES = {0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF}


class MetricGuard:
    """Calls vendor functions for one device, turning any exception into ``None``."""

    def __init__(self, is_not_supported: Callable[[BaseException], bool]) -> None:
        self._is_not_supported = is_not_supported
        self._unsupported: set[str] = set()
        self.last_errors: dict[str, str] = {}  # metric -> last exception text, for `kaio gpus`

    @property
    def unsupported(self) -> frozenset[str]:
        return frozenset(self._unsupported)

    def read(self, metric: str, call: Callable[..., Any], *args: Any) -> Any:
        if metric in self._unsupported:
            return None
        try:
            return call(*args)
        except Exception as exc:  # any vendor error means "not available", never a crash
            if self._is_not_supported(exc):
                self._unsupported.add(metric)
            self.last_errors[metric] = " ".join(f"{type(exc).__name__}: {exc}".split())
            return None


def number_or_none(value: Any, *, all_ones_is_missing: bool = True) -> float | None:
    """A vendor value as a float, or ``None`` for "N/A", sentinels, NaN and non-numbers."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:  # "N/A", "" and friends
            return None
    if not isinstance(value, (int, float)):
        return None
    if all_ones_is_missing and isinstance(value, int) and value in _ALL_ONES:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def int_or_none(value: Any) -> int | None:
    number = number_or_none(value, all_ones_is_missing=False)
    return int(number) if number is not None else None


def text_or_none(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if value and value != "N/A" else None


def answered_metrics(sample: GpuSample) -> tuple[str, ...]:
    """Names of the metrics that had a value in ``sample`` (a device's "supported" list)."""
    metrics = {
        "util": sample.util_pct,
        "vram": sample.vram_used_bytes,
        "power": sample.power_w,
        "temp": sample.temp_c,
        "temp_junction": sample.temp_junction_c,
        "energy_counter": sample.energy_counter_j,
        "sm_clock": sample.sm_clock_mhz,
        "mem_clock": sample.mem_clock_mhz,
        "throttle": sample.throttle,
        "run_vram": sample.run_vram_bytes,
    }
    return tuple(name for name, value in metrics.items() if value is not None)


def package_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None

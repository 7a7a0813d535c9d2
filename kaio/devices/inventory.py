"""What `kaio gpus` shows: backends, devices, versions, supported metrics, one sample.

:func:`inventory` returns plain JSON-serialisable data (``kaio gpus --json``);
:func:`render_inventory` turns it into a Rich renderable for people.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from kaio.devices.base import DeviceInfo, GpuSample, HostSample
from kaio.devices.detect import NO_GPU_NOTE, detect
from kaio.devices.host import HostBackend

HOST_LABEL = "host (CPU and RAM, not a GPU)"
# psutil measures CPU use between two calls; shorter windows are mostly noise.
_MIN_CPU_WINDOW_S = 0.1


def inventory(preference: str = "auto", environ: Mapping[str, str] = os.environ) -> dict:
    """Everything kaio can see on this host, with one sample per device."""
    host = HostBackend()
    host_started = time.monotonic()
    found = detect(preference, environ)
    backends = []
    try:
        for backend in found.backends:
            samples = {s.key: s for s in backend.sample(time.monotonic(), time.time())}
            errors = backend.metric_errors() if hasattr(backend, "metric_errors") else {}
            backends.append(
                {
                    "name": backend.name,
                    "versions": dict(getattr(backend, "versions", {})),
                    "devices": [
                        {
                            **_device_dict(device),
                            "sample": _sample_dict(samples.get(device.key)),
                            "errors": errors.get(device.key, {}),
                        }
                        for device in backend.devices()
                    ],
                }
            )
    finally:
        for backend in found.backends:
            backend.close()
    time.sleep(max(0.0, _MIN_CPU_WINDOW_S - (time.monotonic() - host_started)))
    host_sample = host.sample(time.monotonic(), time.time())
    return {
        "gpu_found": any(b["devices"] for b in backends),
        "backends": backends,
        "host": {"label": HOST_LABEL, "cpu_count": host.cpu_count, "sample": _host_dict(host_sample)},
        "notes": list(found.notes),
    }


def render_inventory(inv: dict):
    """A Rich renderable of :func:`inventory`'s result."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    if not inv["gpu_found"]:
        parts.append(Text(NO_GPU_NOTE, style="bold yellow"))
    for backend in inv["backends"]:
        versions = ", ".join(f"{k} {v}" for k, v in backend["versions"].items())
        table = Table(title=f"{backend['name']}" + (f" ({versions})" if versions else ""), title_justify="left")
        for column in (
            "GPU",
            "name",
            "in run",
            "util",
            "VRAM used / total",
            "power",
            "temp edge / junction",
            "metrics",
        ):
            table.add_column(column)
        for device in backend["devices"]:
            sample = device["sample"] or {}
            power = _fmt(sample.get("power_w"), "{:.0f} W")
            if device["power_kind"] and sample.get("power_w") is not None:
                power += f" ({device['power_kind']})"
            table.add_row(
                device["key"],
                device["name"],
                "yes" if device["in_run"] else "no",
                _fmt(sample.get("util_pct"), "{:.0f} %"),
                f"{_gib(sample.get('vram_used_bytes'))} / {_gib(sample.get('vram_total_bytes'))}",
                power,
                f"{_fmt(sample.get('temp_c'), '{:.0f} C')} / {_fmt(sample.get('temp_junction_c'), '{:.0f} C')}",
                ", ".join(device["supported"]) or "none",
            )
        parts.append(table)
    host = inv["host"]
    host_table = Table(title=host["label"], title_justify="left")
    for column in ("CPUs", "CPU use", "RAM used / total"):
        host_table.add_column(column)
    sample = host["sample"]
    host_table.add_row(
        str(host["cpu_count"] or "?"),
        _fmt(sample.get("cpu_pct"), "{:.0f} %"),
        f"{_gib(sample.get('ram_used_bytes'))} / {_gib(sample.get('ram_total_bytes'))}",
    )
    parts.append(host_table)
    notes = [f"{d['key']}: {n}" for b in inv["backends"] for d in b["devices"] for n in d["notes"]]
    notes += [n for n in inv["notes"] if n != NO_GPU_NOTE]  # already the headline
    if notes:
        parts.append(Text("Notes", style="bold"))
        parts.extend(Text(f"- {note}") for note in notes)
    return Group(*parts)


def _device_dict(device: DeviceInfo) -> dict:
    data = msgspec.structs.asdict(device)
    data["key"] = device.key
    data["supported"] = list(device.supported)
    data["notes"] = list(device.notes)
    return data


def _sample_dict(sample: GpuSample | None) -> dict | None:
    if sample is None:
        return None
    data = msgspec.structs.asdict(sample)
    # One reading has no "since": energy since start and its method belong to the poller.
    for key in ("key", "t_mono", "t_wall", "energy_j", "energy_method"):
        data.pop(key)
    if data["throttle"] is not None:
        data["throttle"] = list(data["throttle"])
    return data


def _host_dict(sample: HostSample) -> dict:
    data = msgspec.structs.asdict(sample)
    for key in ("t_mono", "t_wall"):
        data.pop(key)
    return data


def _fmt(value: float | None, pattern: str) -> str:
    return pattern.format(value) if value is not None else "n/a"


def _gib(value: int | None) -> str:
    from kaio.units import gib

    return gib(value) if value is not None else "n/a"

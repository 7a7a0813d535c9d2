"""Connects the GPU poller to the supervisor: detection, then ticks as journal records."""

from __future__ import annotations

import time
from collections.abc import Callable

from kaio.config import RunConfig
from kaio.devices.base import DeviceInfo, Tick
from kaio.devices.host import HostBackend
from kaio.record.types import Devices, HostInfo, Record, TickRecord


def device_record(devices: list[DeviceInfo], notes: list[str], host: HostBackend) -> Devices:
    first = host.sample(time.monotonic(), time.time())  # also starts the CPU-use baseline
    return Devices(
        devices=list(devices),
        notes=list(notes),
        t_wall=time.time(),
        host=HostInfo(cpu_count=host.cpu_count, ram_total_bytes=first.ram_total_bytes),
    )


def tick_record(tick: Tick) -> TickRecord:
    """A poller tick as a journal record (metrics that were not measured are left out of its line)."""
    return TickRecord(t_mono=tick.t_mono, lateness_s=round(tick.lateness_s, 6), gpus=list(tick.gpus), host=tick.host)


def _run_pids() -> set[int]:
    """The run's processes are the supervisor's descendants (launcher and every rank)."""
    import psutil

    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def poller_factory(cfg: RunConfig) -> Callable[[Callable[[Record], None]], object]:
    """``make(on_record)`` detects the backends, announces the devices, returns an unstarted poller."""

    def make(on_record: Callable[[Record], None]):
        import os

        from kaio.devices.detect import detect
        from kaio.devices.poller import Poller
        from kaio.launch import run_visibility

        environ, chosen = run_visibility(cfg.launch, os.environ)
        found = detect(cfg.reporting.gpu_backend, environ, run_pids=_run_pids)
        host = HostBackend()
        poller = Poller(
            found.backends, cfg.reporting.poll_hz, on_tick=lambda tick: on_record(tick_record(tick)), host=host
        )
        on_record(device_record(list(poller.devices), [*found.notes, *([chosen] if chosen else [])], host))
        return poller

    return make

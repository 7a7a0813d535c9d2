"""What every GPU backend returns: device descriptions and per-tick samples.

Units live in the names. Every metric is independently ``None`` when the
device (or the driver) cannot give it; ``None`` never means zero.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec


class DeviceInfo(msgspec.Struct, frozen=True):
    """A physical GPU as a backend found it (also the journal's ``devices`` record)."""

    backend: str  # "nvml" | "amdsmi"
    index: int  # the backend's own device index (physical, not CUDA_VISIBLE_DEVICES-relative)
    name: str
    uuid: str | None = None
    in_run: bool = True  # one of the devices the run's processes can see
    power_kind: str | None = None  # "instant" | "average" (vendor's windowed average)
    vram_total_bytes: int | None = None
    supported: tuple[str, ...] = ()  # metric names that answered at detection time
    notes: tuple[str, ...] = ()  # e.g. "partition 2 of 4 of the same card"
    # Its place among the GPUs the run's processes see (cuda:N; CUDA_VISIBLE_DEVICES=3,1 makes GPU 3 cuda:0, and
    # local rank N trains on cuda:N); None where not in the run, or recorded by a kaio before it.
    visible_index: int | None = None
    # Its card's power and energy are read on another device (an MI300X partition, an MI250 GCD): none of its own.
    power_counted_elsewhere: bool = False

    @property
    def key(self) -> str:
        """Stable id used in histories: ``"<backend>:<index>"``."""
        return f"{self.backend}:{self.index}"


class GpuSample(msgspec.Struct, frozen=True, omit_defaults=True):
    """One device at one tick of the poller (also the journal's ``tick`` record, unmeasured metrics left out)."""

    key: str  # DeviceInfo.key
    t_mono: float  # time.monotonic() when the reading was taken (system-wide clock)
    t_wall: float  # time.time()
    util_pct: float | None = None
    vram_used_bytes: int | None = None
    vram_total_bytes: int | None = None
    run_vram_bytes: int | None = None  # VRAM used by the run's own processes, where exposed
    power_w: float | None = None
    temp_c: float | None = None  # edge / GPU temperature
    temp_junction_c: float | None = None  # junction / hotspot
    energy_j: float | None = None  # energy since the poller started, best method (see energy_method)
    energy_method: str | None = None  # "counter" | "integrated"
    # Raw hardware energy counter as the vendor reported it, in J from an arbitrary origin
    # (driver load); backends fill it, the poller turns it into ``energy_j``.
    energy_counter_j: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    throttle: tuple[str, ...] | None = None  # active throttle reasons, () when none


class HostSample(msgspec.Struct, frozen=True, omit_defaults=True):
    """The host: shown when there is no GPU, labelled as host, never as a GPU."""

    t_mono: float
    t_wall: float
    cpu_pct: float | None = None
    ram_used_bytes: int | None = None
    ram_total_bytes: int | None = None


class Tick(msgspec.Struct, frozen=True):
    """Everything one poller tick produced."""

    t_mono: float  # the scheduled time of the tick
    lateness_s: float  # how late the tick started against its schedule
    gpus: tuple[GpuSample, ...] = ()
    host: HostSample | None = None


class GpuBackend(Protocol):
    """One vendor library. Implementations never raise out of ``sample``."""

    name: str

    def devices(self) -> Sequence[DeviceInfo]: ...

    def sample(self, t_mono: float, t_wall: float) -> Sequence[GpuSample]: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class DetectResult:
    backends: list = field(default_factory=list)  # list[GpuBackend]
    notes: list[str] = field(default_factory=list)  # why a vendor is absent, in a user's words


@functools.cache  # a handful of keys, sorted at every tick
def device_order(key: str) -> tuple[str, int, str]:
    """A GPU key's place in a list: by backend (and node), then by number (nvml:2 before nvml:10)."""
    prefix, _, number = key.rpartition(":")
    return (prefix, int(number), "") if number.isdigit() else (prefix, -1, number)


def visible_order(key: str, info: DeviceInfo) -> tuple:
    """A run's GPU's place in a list: as the run's processes see them (``visible_index``), then by key."""
    return (info.visible_index is None, info.visible_index or 0, device_order(key))

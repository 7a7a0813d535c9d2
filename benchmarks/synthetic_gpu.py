"""Synthetic GPUs for the benchmarks: a ``GpuBackend`` with N devices, and synthetic records.

``SyntheticBackend`` behaves like NVML on an 8-GPU host: every device's
reading costs a vendor call of 1 to 5 ms (uniform). By default the call
*blocks* (``time.sleep``: the driver's ioctl waits, the process uses no CPU);
``spin=True`` burns CPU for that time instead (a worst case that charges the
vendor library's own work to kaio's process).

``synthetic_tick`` / ``device_info`` give the ``Tick`` and ``DeviceInfo``
Structs the poller hands on (the supervisor journals them through
``kaio.run.gpu_feed.tick_record`` / ``device_record``), without sleeping.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import msgspec

from kaio.devices.base import DeviceInfo, GpuSample, HostSample, Tick

VRAM_TOTAL = 80 * 1024**3


def device_info(n: int) -> list[DeviceInfo]:
    return [
        DeviceInfo(
            backend="nvml",
            index=i,
            name="Synthetic H100 80GB HBM3",
            uuid=f"GPU-00000000-0000-0000-0000-{i:012d}",
            in_run=True,
            power_kind="instant",
            vram_total_bytes=VRAM_TOTAL,
            supported=(
                "util_pct",
                "vram_used_bytes",
                "power_w",
                "temp_c",
                "energy_counter_j",
                "sm_clock_mhz",
                "mem_clock_mhz",
                "throttle",
            ),
        )
        for i in range(n)
    ]


def gpu_sample(i: int, t_mono: float, t_wall: float, energy_counter_j: float) -> GpuSample:
    """A plausible reading of device ``i`` at ``t_mono`` (deterministic, busy training)."""
    phase = math.sin(t_mono * 0.7 + i)
    return GpuSample(
        key=f"nvml:{i}",
        t_mono=t_mono,
        t_wall=t_wall,
        util_pct=float(95 + 4 * phase),
        vram_used_bytes=int(61_000_000_000 + 1_000_000 * i),
        vram_total_bytes=VRAM_TOTAL,
        run_vram_bytes=int(60_500_000_000 + 1_000_000 * i),
        power_w=round(600 + 80 * phase, 3),
        temp_c=float(70 + 5 * phase),
        energy_counter_j=round(energy_counter_j, 3),
        sm_clock_mhz=1980.0,
        mem_clock_mhz=2619.0,
        throttle=("power_cap",) if phase > 0.9 else (),
    )


class SyntheticBackend:
    """``GpuBackend`` of ``n`` devices whose every reading takes 1-5 ms."""

    name = "nvml"

    def __init__(
        self, n: int = 8, *, min_ms: float = 1.0, max_ms: float = 5.0, spin: bool = False, seed: int = 0
    ) -> None:
        self._devices = device_info(n)
        self._min_s, self._max_s = min_ms / 1e3, max_ms / 1e3
        self._spin = spin
        self._rng = random.Random(seed)
        self._energy = [1.0e6 * (i + 1) for i in range(n)]  # counters count from driver load
        self._last_t: float | None = None
        self.calls = 0
        self.call_time_s = 0.0

    def devices(self) -> Sequence[DeviceInfo]:
        return list(self._devices)

    def _vendor_call(self) -> None:
        cost = self._rng.uniform(self._min_s, self._max_s)
        t0 = time.perf_counter()
        if self._spin:
            while time.perf_counter() - t0 < cost:
                pass
        else:
            time.sleep(cost)
        self.calls += 1
        self.call_time_s += time.perf_counter() - t0

    def sample(self, t_mono: float, t_wall: float) -> Sequence[GpuSample]:
        dt = 0.0 if self._last_t is None else t_mono - self._last_t
        self._last_t = t_mono
        out = []
        for i in range(len(self._devices)):
            self._vendor_call()
            self._energy[i] += 600.0 * dt
            out.append(gpu_sample(i, time.monotonic(), time.time(), self._energy[i]))
        return out

    def close(self) -> None:
        pass


def synthetic_tick(t_mono: float, t_wall: float, n: int, energy_j: Sequence[float], lateness_s: float = 0.0004) -> Tick:
    """A poller tick as the poller hands it on (``energy_j`` already resolved, as ``Poller._with_energy`` does)."""
    gpus = []
    for i in range(n):
        s = gpu_sample(i, t_mono, t_wall, 1.0e6 + energy_j[i])
        gpus.append(_with(s, energy_j=round(energy_j[i], 6), energy_method="counter"))
    host = HostSample(
        t_mono=t_mono, t_wall=t_wall, cpu_pct=37.5, ram_used_bytes=120_000_000_000, ram_total_bytes=2_000_000_000_000
    )
    return Tick(t_mono=t_mono, lateness_s=lateness_s, gpus=tuple(gpus), host=host)


def _with(sample: GpuSample, **changes) -> GpuSample:
    return msgspec.structs.replace(sample, **changes)

"""NVIDIA GPUs through NVML (the ``pynvml`` module of nvidia-ml-py).

Units as NVML gives them: power mW, energy mJ, memory bytes, clocks MHz.
NVML has no public junction (hotspot) temperature, so ``temp_junction_c``
stays ``None`` on NVIDIA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from kaio.devices.base import DeviceInfo, GpuSample
from kaio.devices.vendor import (
    MetricGuard,
    RunPids,
    answered_metrics,
    int_or_none,
    number_or_none,
    package_version,
    text_or_none,
)
from kaio.devices.visible import mark_visible

# Clock event reason bits (nvml.h, nvmlClocksEventReason*) that mean "slowed down".
# Idle, application-clock and display-clock reasons are settings, not throttling.
_THROTTLE_REASON_BITS = {
    "power_cap": 0x4,  # SwPowerCap
    "hw_slowdown": 0x8,  # HwSlowdown
    "sync_boost": 0x10,  # SyncBoost
    "thermal": 0x20,  # SwThermalSlowdown
    "hw_thermal": 0x40,  # HwThermalSlowdown
    "power_brake": 0x80,  # HwPowerBrakeSlowdown
}
# GA100 parts, whose nvmlDeviceGetPowerUsage is instantaneous although they are Ampere.
_GA100_NAMES = ("A100", "A30", "A800")


class NvmlBackend:
    """All NVIDIA GPUs of the host. Build it with :func:`open_nvml`."""

    name = "nvml"

    def __init__(self, nvml: Any, handles: Sequence[Any], environ: Mapping[str, str], run_pids: RunPids | None) -> None:
        self._nvml = nvml
        self._handles = list(handles)
        self._run_pids = run_pids
        self._guards = [MetricGuard(self._is_not_supported) for _ in self._handles]
        self._instant_power = [self._instant_power_mw(h) is not None for h in self._handles]
        found = [self._describe(i, h) for i, h in enumerate(self._handles)]
        self._devices, self.notes = mark_visible(found, environ)
        self.versions = self._versions()

    # -- GpuBackend -----------------------------------------------------------------

    def devices(self) -> Sequence[DeviceInfo]:
        return list(self._devices)

    def sample(self, t_mono: float, t_wall: float) -> Sequence[GpuSample]:
        return [self._sample_one(i, t_mono, t_wall) for i in range(len(self._handles))]

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # the driver may already be gone at exit; nothing left to release
            pass

    def metric_errors(self) -> dict[str, dict[str, str]]:
        """Last vendor error per metric, per device key (for `kaio gpus`)."""
        return {d.key: dict(g.last_errors) for d, g in zip(self._devices, self._guards)}

    # -- detection --------------------------------------------------------------------

    def _is_not_supported(self, exc: BaseException) -> bool:
        not_supported = getattr(self._nvml, "NVMLError_NotSupported", None)
        return not_supported is not None and isinstance(exc, not_supported)

    def _instant_power_mw(self, handle: Any) -> float | None:
        nvml = self._nvml
        field_id = getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", None)
        if field_id is None:
            return None
        try:
            value = nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0]
        except Exception:  # old drivers lack the field API or the field
            return None
        if value.nvmlReturn != nvml.NVML_SUCCESS:
            return None
        return number_or_none(_field_value(nvml, value))

    def _power_kind(self, index: int, handle: Any, name: str) -> str:
        if self._instant_power[index]:
            return "instant"
        # nvmlDeviceGetPowerUsage: averaged over 1 s on Ampere (except GA100) and newer,
        # instantaneous on GA100 and older architectures.
        arch = self._guards[index].read("architecture", self._nvml.nvmlDeviceGetArchitecture, handle)
        ampere = getattr(self._nvml, "NVML_DEVICE_ARCH_AMPERE", 7)
        if isinstance(arch, int) and (arch < ampere or (arch == ampere and any(m in name for m in _GA100_NAMES))):
            return "instant"
        return "average"

    def _describe(self, index: int, handle: Any) -> DeviceInfo:
        guard = self._guards[index]
        name = text_or_none(guard.read("name", self._nvml.nvmlDeviceGetName, handle)) or "NVIDIA GPU"
        uuid = text_or_none(guard.read("uuid", self._nvml.nvmlDeviceGetUUID, handle))
        probe = self._sample_one(index, 0.0, 0.0)
        notes = []
        if self._run_pids is not None and probe.run_vram_bytes is None and "run_vram" not in guard.unsupported:
            notes.append("per-process VRAM not attributable (process list unavailable or in another PID namespace)")
        return DeviceInfo(
            backend=self.name,
            index=index,
            name=name,
            uuid=uuid,
            power_kind=self._power_kind(index, handle, name) if probe.power_w is not None else None,
            vram_total_bytes=probe.vram_total_bytes,
            supported=answered_metrics(probe),
            notes=tuple(notes),
        )

    def _versions(self) -> dict[str, str]:
        nvml = self._nvml
        guard = MetricGuard(self._is_not_supported)
        versions = {
            "driver": text_or_none(guard.read("driver", nvml.nvmlSystemGetDriverVersion)),
            "nvml": text_or_none(guard.read("nvml", nvml.nvmlSystemGetNVMLVersion)),
            "cuda_driver": _cuda_version(guard.read("cuda", nvml.nvmlSystemGetCudaDriverVersion)),
            "nvidia-ml-py": package_version("nvidia-ml-py"),
        }
        return {k: v for k, v in versions.items() if v}

    # -- sampling ---------------------------------------------------------------------

    def _sample_one(self, index: int, t_mono: float, t_wall: float) -> GpuSample:
        nvml, handle, read = self._nvml, self._handles[index], self._guards[index].read
        util = read("util", nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = read("vram", nvml.nvmlDeviceGetMemoryInfo, handle)
        if self._instant_power[index]:
            power_mw = read("power", self._instant_power_mw, handle)
        else:
            power_mw = read("power", nvml.nvmlDeviceGetPowerUsage, handle)
        energy_mj = read("energy", nvml.nvmlDeviceGetTotalEnergyConsumption, handle)
        temp = read("temp", nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        sm_clock = read("sm_clock", nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
        mem_clock = read("mem_clock", nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM)
        reasons = read("throttle", self._clock_event_reasons, handle)
        run_vram = read("run_vram", self._run_vram_bytes, handle) if self._run_pids is not None else None
        power_w = number_or_none(power_mw)
        energy_j = number_or_none(energy_mj, all_ones_is_missing=False)
        return GpuSample(
            key=f"{self.name}:{index}",
            t_mono=t_mono,
            t_wall=t_wall,
            util_pct=number_or_none(getattr(util, "gpu", None)),
            vram_used_bytes=int_or_none(getattr(memory, "used", None)),
            vram_total_bytes=int_or_none(getattr(memory, "total", None)),
            run_vram_bytes=run_vram,
            power_w=power_w / 1000.0 if power_w is not None else None,
            temp_c=number_or_none(temp),
            energy_counter_j=energy_j / 1000.0 if energy_j is not None else None,
            sm_clock_mhz=number_or_none(sm_clock),
            mem_clock_mhz=number_or_none(mem_clock),
            throttle=_throttle_names(reasons) if isinstance(reasons, int) else None,
        )

    def _clock_event_reasons(self, handle: Any) -> int:
        nvml = self._nvml
        current = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if current is not None:
            try:
                return current(handle)
            except nvml.NVMLError_FunctionNotFound:  # driver older than the "event reasons" name
                pass
        return nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)

    def _run_vram_bytes(self, handle: Any) -> int | None:
        assert self._run_pids is not None
        pids = self._run_pids()
        processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        ours = [p.usedGpuMemory for p in processes if p.pid in pids]
        if not ours and any(not os.path.exists(f"/proc/{p.pid}") for p in processes):
            # NVML reports host PIDs; inside a container they do not match ours.
            return None
        known = [m for m in ours if m is not None]
        if ours and not known:
            return None  # the driver hides per-process memory (e.g. Windows WDDM)
        return sum(known)


def open_nvml(
    environ: Mapping[str, str] = os.environ, run_pids: RunPids | None = None
) -> tuple[NvmlBackend | None, list[str]]:
    """The NVML backend, or ``None`` and a note saying why NVIDIA telemetry is absent."""
    try:
        import pynvml
    except ImportError:
        return None, ["NVIDIA: the nvidia-ml-py package (module pynvml) is not installed"]
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError: library not found, driver not loaded, ...
        return None, [f"NVIDIA: no usable driver (NVML could not start: {exc})"]
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    except Exception as exc:
        _shutdown(pynvml)
        return None, [f"NVIDIA: NVML started but could not list GPUs ({exc})"]
    if not handles:
        _shutdown(pynvml)
        return None, ["NVIDIA: the driver is loaded but reports no GPU"]
    try:
        backend = NvmlBackend(pynvml, handles, environ, run_pids)
    except Exception as exc:  # a binding that lacks names this backend relies on
        _shutdown(pynvml)
        return None, [f"NVIDIA: the pynvml binding is not compatible ({type(exc).__name__}: {exc})"]
    return backend, list(backend.notes)


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # nothing to release if shutdown itself fails
        pass


def _field_value(nvml: Any, field: Any) -> Any:
    """The number inside an ``nvmlFieldValue_t`` union, by its declared type."""
    by_type = {
        nvml.NVML_VALUE_TYPE_DOUBLE: "dVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        nvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
    }
    attribute = by_type.get(field.valueType)
    return getattr(field.value, attribute) if attribute else None


def _throttle_names(mask: int) -> tuple[str, ...]:
    return tuple(name for name, bit in _THROTTLE_REASON_BITS.items() if mask & bit)


def _cuda_version(value: Any) -> str | None:
    return f"{value // 1000}.{value % 1000 // 10}" if isinstance(value, int) and value > 0 else None

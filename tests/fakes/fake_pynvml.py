"""A stand-in for the ``pynvml`` module of nvidia-ml-py, faked at the binding.

Names, signatures, return shapes and units follow the real module
(nvidia-ml-py 13.x): power in mW, energy in mJ, memory in bytes, clocks in
MHz, errors as ``NVMLError`` subclasses chosen by error code. Install with
``monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([...]).module())``.
"""

from __future__ import annotations

import time
import types
from collections import Counter
from dataclasses import dataclass, field

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
_ERROR_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}

ARCH_VOLTA, ARCH_AMPERE, ARCH_HOPPER = 5, 7, 9


class NVMLError(Exception):
    """Like pynvml: ``NVMLError(code)`` builds the subclass registered for ``code``."""

    _by_code: dict[int, type] = {}

    def __new__(cls, value=None):
        if cls is NVMLError:
            cls = NVMLError._by_code.get(value, NVMLError)
        obj = Exception.__new__(cls)
        obj.value = value if value is not None else cls._code
        return obj

    def __init__(self, value=None):
        super().__init__(self.value)

    def __str__(self):
        return _ERROR_STRINGS.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other):
        return self.value == other.value

    __hash__ = Exception.__hash__


def _error_class(name: str, code: int) -> type:
    cls = type(name, (NVMLError,), {"_code": code})
    NVMLError._by_code[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class("NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)


@dataclass
class FakeNvidiaGpu:
    """One GPU's state; tests change fields between samples."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
    architecture: int = ARCH_HOPPER
    util_pct: int = 97
    memory_total: int = 80 * 2**30
    memory_used: int = 20 * 2**30
    power_mw: int = 350_000
    instant_power_field: bool = True  # NVML_FI_DEV_POWER_INSTANT answers
    temp_c: int = 61
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    clock_event_reasons: int = 0
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, usedGpuMemory bytes)
    # "live": the counter integrates power_mw over real time; "stuck": never moves;
    # "wrap": live, then drops back by 2**32 mJ after `wrap_after_reads` reads.
    energy_counter: str = "live"
    wrap_after_reads: int = 10
    energy_origin_mj: int = 5_000_000_000
    not_supported: set[str] = field(default_factory=set)  # function names answering NOT_SUPPORTED
    failing: set[str] = field(default_factory=set)  # function names raising GPU_IS_LOST
    _energy_mj: float | None = None
    _energy_t: float | None = None
    _energy_reads: int = 0

    def energy_mj(self) -> int:
        now = time.monotonic()
        if self._energy_mj is None:
            self._energy_mj, self._energy_t = float(self.energy_origin_mj), now
        if self.energy_counter != "stuck":
            self._energy_mj += self.power_mw * (now - self._energy_t)  # mW * s = mJ
        self._energy_t = now
        self._energy_reads += 1
        if self.energy_counter == "wrap" and self._energy_reads == self.wrap_after_reads:
            self._energy_mj -= 2**32
        return int(self._energy_mj)


class _Handle:
    """Opaque like ``c_nvmlDevice_t``."""

    def __init__(self, index: int) -> None:
        self.index = index


class _Struct:
    def __init__(self, **fields) -> None:
        self.__dict__.update(fields)


class FakeNvml:
    """The fake library's state; :meth:`module` is what goes into ``sys.modules``."""

    def __init__(
        self,
        gpus: list[FakeNvidiaGpu],
        *,
        init_error: int | None = None,
        has_event_reasons: bool = True,
        driver: str = "550.54.15",
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.has_event_reasons = has_event_reasons  # False: driver older than nvmlDeviceGetCurrentClocksEventReasons
        self.driver = driver
        self.calls: Counter[tuple[str, int]] = Counter()  # (function name, device index) -> calls
        self.initialized = False

    def _gpu(self, function: str, handle: _Handle) -> FakeNvidiaGpu:
        if not self.initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if not isinstance(handle, _Handle):
            raise TypeError("expected an nvmlDevice_t handle")
        self.calls[(function, handle.index)] += 1
        gpu = self.gpus[handle.index]
        if function in gpu.not_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if function in gpu.failing:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return gpu

    def module(self) -> types.ModuleType:
        fake = self
        m = types.ModuleType("pynvml")
        m.__dict__.update({name: value for name, value in globals().items() if name.startswith(("NVML_", "NVMLError"))})
        m.NVML_TEMPERATURE_GPU = 0
        m.NVML_CLOCK_GRAPHICS, m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM = 0, 1, 2
        m.NVML_FI_DEV_POWER_AVERAGE, m.NVML_FI_DEV_POWER_INSTANT = 185, 186
        m.NVML_VALUE_TYPE_DOUBLE, m.NVML_VALUE_TYPE_UNSIGNED_INT = 0, 1
        m.NVML_VALUE_TYPE_UNSIGNED_LONG, m.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 2, 3
        m.NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4
        m.NVML_DEVICE_ARCH_VOLTA, m.NVML_DEVICE_ARCH_AMPERE, m.NVML_DEVICE_ARCH_HOPPER = (
            ARCH_VOLTA,
            ARCH_AMPERE,
            ARCH_HOPPER,
        )
        m.nvmlClocksEventReasonGpuIdle = 0x1
        m.nvmlClocksEventReasonApplicationsClocksSetting = 0x2
        m.nvmlClocksEventReasonSwPowerCap = 0x4
        m.nvmlClocksEventReasonHwSlowdown = 0x8
        m.nvmlClocksEventReasonSyncBoost = 0x10
        m.nvmlClocksEventReasonSwThermalSlowdown = 0x20
        m.nvmlClocksEventReasonHwThermalSlowdown = 0x40
        m.nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80

        def nvmlInit():
            if fake.init_error is not None:
                raise NVMLError(fake.init_error)
            fake.initialized = True

        def nvmlShutdown():
            if not fake.initialized:
                raise NVMLError(NVML_ERROR_UNINITIALIZED)
            fake.initialized = False

        def nvmlDeviceGetCount():
            if not fake.initialized:
                raise NVMLError(NVML_ERROR_UNINITIALIZED)
            return len(fake.gpus)

        def nvmlDeviceGetHandleByIndex(index):
            if not 0 <= index < len(fake.gpus):
                raise NVMLError(2)  # NVML_ERROR_INVALID_ARGUMENT
            return _Handle(index)

        def nvmlDeviceGetName(handle):
            return fake._gpu("nvmlDeviceGetName", handle).name

        def nvmlDeviceGetUUID(handle):
            return fake._gpu("nvmlDeviceGetUUID", handle).uuid

        def nvmlDeviceGetArchitecture(device):
            return fake._gpu("nvmlDeviceGetArchitecture", device).architecture

        def nvmlDeviceGetUtilizationRates(handle):
            gpu = fake._gpu("nvmlDeviceGetUtilizationRates", handle)
            return _Struct(gpu=gpu.util_pct, memory=40)

        def nvmlDeviceGetMemoryInfo(handle, version=None):
            gpu = fake._gpu("nvmlDeviceGetMemoryInfo", handle)
            return _Struct(total=gpu.memory_total, free=gpu.memory_total - gpu.memory_used, used=gpu.memory_used)

        def nvmlDeviceGetPowerUsage(handle):
            return fake._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

        def nvmlDeviceGetFieldValues(handle, fieldIds):
            gpu = fake._gpu("nvmlDeviceGetFieldValues", handle)
            values = []
            for field_id in fieldIds:
                answers = field_id == m.NVML_FI_DEV_POWER_INSTANT and gpu.instant_power_field
                values.append(
                    _Struct(
                        fieldId=field_id,
                        scopeId=0,
                        timestamp=int(time.time() * 1e6),
                        latencyUsec=0,
                        valueType=m.NVML_VALUE_TYPE_UNSIGNED_INT,
                        nvmlReturn=NVML_SUCCESS if answers else NVML_ERROR_NOT_SUPPORTED,
                        value=_Struct(uiVal=gpu.power_mw if answers else 0, dVal=0.0, ulVal=0, ullVal=0, sllVal=0),
                    )
                )
            return values

        def nvmlDeviceGetTotalEnergyConsumption(handle):
            return fake._gpu("nvmlDeviceGetTotalEnergyConsumption", handle).energy_mj()

        def nvmlDeviceGetTemperature(handle, sensor):
            return fake._gpu("nvmlDeviceGetTemperature", handle).temp_c

        def nvmlDeviceGetClockInfo(handle, type):
            gpu = fake._gpu("nvmlDeviceGetClockInfo", handle)
            return {m.NVML_CLOCK_SM: gpu.sm_clock_mhz, m.NVML_CLOCK_MEM: gpu.mem_clock_mhz}[type]

        def nvmlDeviceGetCurrentClocksEventReasons(handle):
            if not fake.has_event_reasons:
                raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
            return fake._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle).clock_event_reasons

        def nvmlDeviceGetCurrentClocksThrottleReasons(handle):
            return fake._gpu("nvmlDeviceGetCurrentClocksThrottleReasons", handle).clock_event_reasons

        def nvmlDeviceGetComputeRunningProcesses(handle):
            gpu = fake._gpu("nvmlDeviceGetComputeRunningProcesses", handle)
            return [
                _Struct(pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
                for pid, used in gpu.processes
            ]

        def nvmlSystemGetDriverVersion():
            return fake.driver

        def nvmlSystemGetNVMLVersion():
            return "12.550.54.15"

        def nvmlSystemGetCudaDriverVersion():
            return 12040

        for function in list(locals().values()):
            if callable(function) and getattr(function, "__name__", "").startswith("nvml"):
                setattr(m, function.__name__, function)
        return m

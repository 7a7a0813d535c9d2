"""A stand-in for the ``amdsmi`` Python package of ROCm, faked at the binding.

Names, signatures, return shapes and units follow ``amdsmi_interface.py``
(ROCm 6.2+; ``rocm="6.1"`` gives the older energy key): power in W, VRAM in
MiB ("MB"), clocks in MHz, temperatures in degrees C, energy as an
accumulator of ``counter_resolution`` microjoule ticks, "N/A" strings for
unsupported values, ``AmdSmiLibraryException(err_code)`` for errors, and the
same type checks on handles and enums (``AmdSmiParameterException``).
Install with ``monkeypatch.setitem(sys.modules, "amdsmi", FakeAmdSmi([...]).module())``.
"""

from __future__ import annotations

import time
import types
from collections import Counter
from dataclasses import dataclass, field
from enum import IntEnum

AMDSMI_STATUS_SUCCESS = 0
AMDSMI_STATUS_INVAL = 1
AMDSMI_STATUS_NOT_SUPPORTED = 2
AMDSMI_STATUS_NOT_INIT = 32
AMDSMI_STATUS_DRIVER_NOT_LOADED = 34
NA = "N/A"


class AmdSmiException(Exception):
    """Base amdsmi exception class."""


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, err_code):
        err_code = abs(err_code)
        super().__init__(err_code)
        self.err_code = err_code
        self.err_info = {
            AMDSMI_STATUS_NOT_SUPPORTED: "AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported",
            AMDSMI_STATUS_NOT_INIT: "AMDSMI_STATUS_NOT_INIT - Device not initialized",
            AMDSMI_STATUS_DRIVER_NOT_LOADED: "AMDSMI_STATUS_DRIVER_NOT_LOADED - Driver not loaded",
        }.get(err_code, "AMDSMI_STATUS_UNKNOWN_ERROR - An unknown error occurred")

    def __str__(self):
        return f"Error code:\n\t{self.err_code} | {self.err_info}"

    def get_error_info(self):
        return self.err_info

    def get_error_code(self):
        return self.err_code


class AmdSmiParameterException(AmdSmiException):
    def __init__(self, receivedValue, expectedType):
        super().__init__(f"Invalid parameter: {receivedValue!r}, expected {expectedType}")


class AmdSmiTemperatureType(IntEnum):
    EDGE = 0
    HOTSPOT = 1
    JUNCTION = 1  # the pre-6.x name of HOTSPOT
    VRAM = 2
    HBM_0 = 3


class AmdSmiTemperatureMetric(IntEnum):
    CURRENT = 0
    MAX = 1


class AmdSmiClkType(IntEnum):
    SYS = 0
    GFX = 0  # amdsmi.h: AMDSMI_CLK_TYPE_GFX = AMDSMI_CLK_TYPE_SYS
    DF = 1
    DCEF = 2
    SOC = 3
    MEM = 4


class amdsmi_processor_handle:
    def __init__(self, index: int) -> None:
        self.index = index


@dataclass
class FakeAmdGpu:
    """One device (a card, a GCD or a compute partition); tests change fields between samples."""

    market_name: str = "AMD Instinct MI300X"
    uuid: str = "2eff74a1-0000-1000-8037-3b0a1b2c3d4e"
    bdf: str = "0000:05:00.0"
    asic_serial: str = "0x8F3B0A1B2C3D4E5F"
    compute_partition: str | None = "SPX"  # None: the card cannot be partitioned (NOT_SUPPORTED)
    partition_id: int = 0
    gfx_activity: int | str = 95
    vram_total_mib: int = 196_592
    vram_used_mib: int = 65_536
    power: dict = field(
        default_factory=lambda: {"current_socket_power": 600, "average_socket_power": NA, "power_limit": 750}
    )
    temperatures: dict = field(default_factory=lambda: {"EDGE": None, "HOTSPOT": 72})  # None: NOT_SUPPORTED
    clocks_mhz: dict = field(default_factory=lambda: {"GFX": 2100, "MEM": 1300})
    violation: dict | None = None  # amdsmi_get_violation_status flags; None: NOT_SUPPORTED
    processes: list[tuple[int, int]] = field(default_factory=list)  # (pid, vram_mem bytes)
    # "live": accumulates `counter_power_w` over real time; "stuck": never moves;
    # "wrap": live, then jumps back by 2**32 ticks after `wrap_after_reads` reads.
    energy_counter: str = "live"
    counter_power_w: float | None = None  # what the counter accumulates; None: the power reading
    counter_resolution_uj: float = 15.259
    wrap_after_reads: int = 10
    not_supported: set[str] = field(default_factory=set)  # function names answering NOT_SUPPORTED
    failing: set[str] = field(default_factory=set)  # function names raising an unknown error
    _ticks: float = 123_456_789.0
    _t: float | None = None
    _reads: int = 0

    def energy_ticks(self) -> int:
        now = time.monotonic()
        if self._t is not None and self.energy_counter != "stuck":
            watts = self.counter_power_w
            if watts is None:
                watts = next((v for v in self.power.values() if isinstance(v, (int, float))), 0)
            self._ticks += watts * (now - self._t) * 1e6 / self.counter_resolution_uj
        self._t = now
        self._reads += 1
        if self.energy_counter == "wrap" and self._reads == self.wrap_after_reads:
            self._ticks -= 2**32
        return int(self._ticks)


def mi300x_node(count: int = 8) -> list[FakeAmdGpu]:
    """An 8-GPU MI300X node in SPX mode: instant power only, no edge temperature."""
    return [
        FakeAmdGpu(
            uuid=f"2eff74a1-0000-1000-80{i:02x}-3b0a1b2c3d4e",
            bdf=f"0000:{0x05 + 0x10 * i:02x}:00.0",
            asic_serial=f"0x8F3B0A1B2C3D4E{i:02X}",
            power={"current_socket_power": 600 + i, "average_socket_power": NA, "power_limit": 750},
            violation={"active_ppt_pwr": False, "active_socket_thrm": False, "active_prochot_thrm": NA},
        )
        for i in range(count)
    ]


def mi300x_cpx_card(partitions: int = 8) -> list[FakeAmdGpu]:
    """One MI300X in CPX mode: one device per partition, all reporting the same card power."""
    return [
        FakeAmdGpu(
            uuid=f"2eff74a1-0000-1000-80{k:02x}-aaaaaaaaaaaa",
            bdf=f"0000:05:00.{k}",
            compute_partition="CPX",
            partition_id=k,
            vram_total_mib=196_592 // partitions,
            vram_used_mib=4_096,
            power={"current_socket_power": 640, "average_socket_power": NA, "power_limit": 750},
        )
        for k in range(partitions)
    ]


def mi250_card() -> list[FakeAmdGpu]:
    """One MI250X: two GCDs; the second reports no power (the first reports the card's)."""
    common = dict(market_name="AMD Instinct MI250X", compute_partition=None, vram_total_mib=65_520)
    return [
        FakeAmdGpu(
            uuid="aa0074a1-0000-1000-8000-000000000001",
            bdf="0000:32:00.0",
            asic_serial="0x1111000000000001",
            power={"current_socket_power": NA, "average_socket_power": 420, "power_limit": 560},
            temperatures={"EDGE": 48, "HOTSPOT": 63},
            **common,
        ),
        FakeAmdGpu(
            uuid="aa0074a1-0000-1000-8000-000000000002",
            bdf="0000:35:00.0",
            asic_serial="0x1111000000000002",
            power={"current_socket_power": NA, "average_socket_power": 0, "power_limit": 0},
            temperatures={"EDGE": 47, "HOTSPOT": 60},
            **common,
        ),
    ]


class FakeAmdSmi:
    """The fake library's state; :meth:`module` is what goes into ``sys.modules``."""

    def __init__(self, gpus: list[FakeAmdGpu], *, init_error: int | None = None, rocm: str = "6.2") -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.rocm = rocm  # before 6.2 the energy accumulator was returned under the key "power"
        self.calls: Counter[tuple[str, int]] = Counter()  # (function name, device index) -> calls
        self.initialized = False

    def _gpu(self, function: str, handle) -> FakeAmdGpu:
        if not isinstance(handle, amdsmi_processor_handle):
            raise AmdSmiParameterException(handle, amdsmi_processor_handle)
        if not self.initialized:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_INIT)
        self.calls[(function, handle.index)] += 1
        gpu = self.gpus[handle.index]
        if function in gpu.not_supported:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
        if function in gpu.failing:
            raise AmdSmiLibraryException(0xFFFFFFFF)
        return gpu

    def module(self) -> types.ModuleType:
        fake = self
        m = types.ModuleType("amdsmi")
        wrapper = types.ModuleType("amdsmi.amdsmi_wrapper")
        wrapper.AMDSMI_STATUS_SUCCESS = AMDSMI_STATUS_SUCCESS
        wrapper.AMDSMI_STATUS_NOT_SUPPORTED = AMDSMI_STATUS_NOT_SUPPORTED
        wrapper.AMDSMI_STATUS_NOT_INIT = AMDSMI_STATUS_NOT_INIT
        wrapper.amdsmi_processor_handle = amdsmi_processor_handle
        m.amdsmi_wrapper = wrapper
        m.AmdSmiException = AmdSmiException
        m.AmdSmiLibraryException = AmdSmiLibraryException
        m.AmdSmiParameterException = AmdSmiParameterException
        m.AmdSmiTemperatureType = AmdSmiTemperatureType
        m.AmdSmiTemperatureMetric = AmdSmiTemperatureMetric
        m.AmdSmiClkType = AmdSmiClkType

        def amdsmi_init(flag=None):
            if fake.init_error is not None:
                raise AmdSmiLibraryException(fake.init_error)
            fake.initialized = True

        def amdsmi_shut_down():
            fake.initialized = False

        def amdsmi_get_processor_handles():
            if not fake.initialized:
                raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_INIT)
            return [amdsmi_processor_handle(i) for i in range(len(fake.gpus))]

        def amdsmi_get_lib_version():
            major, minor = fake.rocm.split(".")[:2]
            return {"major": int(major), "minor": int(minor), "release": 0, "build": "fake"}

        def amdsmi_get_gpu_driver_info(processor_handle):
            fake._gpu("amdsmi_get_gpu_driver_info", processor_handle)
            return {"driver_name": "amdgpu", "driver_version": "6.8.5", "driver_date": "2015/01/01 00:00"}

        def amdsmi_get_gpu_asic_info(processor_handle):
            gpu = fake._gpu("amdsmi_get_gpu_asic_info", processor_handle)
            return {
                "market_name": gpu.market_name,
                "vendor_id": "0x1002",
                "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]",
                "subvendor_id": "0x1002",
                "device_id": "0x74a1",
                "rev_id": "0x00",
                "asic_serial": gpu.asic_serial,
                "oam_id": processor_handle.index,
                "num_compute_units": 304,
                "target_graphics_version": "gfx942",
            }

        def amdsmi_get_gpu_device_uuid(processor_handle):
            return fake._gpu("amdsmi_get_gpu_device_uuid", processor_handle).uuid

        def amdsmi_get_gpu_device_bdf(processor_handle):
            return fake._gpu("amdsmi_get_gpu_device_bdf", processor_handle).bdf

        def amdsmi_get_gpu_compute_partition(processor_handle):
            gpu = fake._gpu("amdsmi_get_gpu_compute_partition", processor_handle)
            if gpu.compute_partition is None:
                raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
            return gpu.compute_partition

        def amdsmi_get_gpu_kfd_info(processor_handle):
            gpu = fake._gpu("amdsmi_get_gpu_kfd_info", processor_handle)
            return {
                "kfd_id": 1000 + processor_handle.index,
                "node_id": 2 + processor_handle.index,
                "current_partition_id": gpu.partition_id,
            }

        def amdsmi_get_gpu_activity(processor_handle):
            gpu = fake._gpu("amdsmi_get_gpu_activity", processor_handle)
            return {"gfx_activity": gpu.gfx_activity, "umc_activity": 40, "mm_activity": NA}

        def amdsmi_get_gpu_vram_usage(processor_handle):
            gpu = fake._gpu("amdsmi_get_gpu_vram_usage", processor_handle)
            return {"vram_total": gpu.vram_total_mib, "vram_used": gpu.vram_used_mib}

        def amdsmi_get_power_info(processor_handle, sensor_ind=0):
            gpu = fake._gpu("amdsmi_get_power_info", processor_handle)
            info = {
                "current_socket_power": NA,
                "average_socket_power": NA,
                "gfx_voltage": NA,
                "soc_voltage": NA,
                "mem_voltage": NA,
                "power_limit": NA,
            }
            info.update(gpu.power)
            return info

        def amdsmi_get_temp_metric(processor_handle, sensor_type, metric):
            if not isinstance(sensor_type, AmdSmiTemperatureType):
                raise AmdSmiParameterException(sensor_type, AmdSmiTemperatureType)
            if not isinstance(metric, AmdSmiTemperatureMetric):
                raise AmdSmiParameterException(metric, AmdSmiTemperatureMetric)
            gpu = fake._gpu("amdsmi_get_temp_metric", processor_handle)
            value = gpu.temperatures.get(AmdSmiTemperatureType(sensor_type).name)
            if value is None:
                raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
            return value

        def amdsmi_get_energy_count(processor_handle):
            gpu = fake._gpu("amdsmi_get_energy_count", processor_handle)
            key = "energy_accumulator" if tuple(map(int, fake.rocm.split(".")[:2])) >= (6, 2) else "power"
            return {
                key: gpu.energy_ticks(),
                "counter_resolution": gpu.counter_resolution_uj,
                "timestamp": time.monotonic_ns(),
            }

        def amdsmi_get_clock_info(processor_handle, clock_type):
            if not isinstance(clock_type, AmdSmiClkType):
                raise AmdSmiParameterException(clock_type, AmdSmiClkType)
            gpu = fake._gpu("amdsmi_get_clock_info", processor_handle)
            name = "GFX" if clock_type == AmdSmiClkType.GFX else AmdSmiClkType(clock_type).name  # GFX aliases SYS
            mhz = gpu.clocks_mhz[name]
            return {"clk": mhz, "min_clk": 500, "max_clk": mhz, "clk_locked": False, "clk_deep_sleep": NA}

        def amdsmi_get_violation_status(processor_handle):
            gpu = fake._gpu("amdsmi_get_violation_status", processor_handle)
            if gpu.violation is None:
                raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)
            flags = dict.fromkeys(
                ["active_prochot_thrm", "active_ppt_pwr", "active_socket_thrm", "active_vr_thrm", "active_hbm_thrm"], NA
            )
            flags.update(gpu.violation)
            return {"reference_timestamp": time.time_ns(), "acc_counter": 12, **flags}

        def amdsmi_get_gpu_process_list(processor_handle):
            gpu = fake._gpu("amdsmi_get_gpu_process_list", processor_handle)
            return [
                {
                    "name": "python3",
                    "pid": pid,
                    "mem": vram,
                    "engine_usage": {"gfx": 0, "enc": 0},
                    "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": vram},
                    "cu_occupancy": NA,
                }
                for pid, vram in gpu.processes
            ]

        for function in list(locals().values()):
            if callable(function) and getattr(function, "__name__", "").startswith("amdsmi_"):
                setattr(m, function.__name__, function)
        return m

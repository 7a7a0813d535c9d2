"""AMD GPUs through the AMD SMI Python library (``amdsmi``, shipped with ROCm).

Never by parsing ``rocm-smi`` output. The library's units: power W, VRAM MiB
(its "MB"), clocks MHz, temperatures degrees C, energy in ticks of
``counter_resolution`` microjoules. Unsupported readings come back as the
string "N/A" (or, on older releases, as all-ones integers) and become ``None``.

Cards that show up as several devices are counted once for power and energy:

- MI300X compute partitions (CPX, DPX, ...): every partition is a device but
  the card has one power and energy reading; it is kept on partition 0 only.
- MI250/MI250X: each GCD (die) is a device; a GCD that reports no power has
  its power and energy left ``None`` (its sibling's reading covers the card).

See docs/rocm.md.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

_MIB = 1024 * 1024
_AMDSMI_STATUS_NOT_SUPPORTED = 2  # amdsmi_status_t, used when the binding does not export it
# Power keys of amdsmi_get_power_info in order of preference, with what the reading is.
_POWER_KEYS = (
    ("current_socket_power", "instant"),  # MI300 and newer
    ("average_socket_power", "average"),  # MI200 and earlier, Navi
    ("socket_power", "instant"),  # ROCm 7: "current power usage"
)
# amdsmi_get_violation_status flags (MI300, ROCm 6.4+) -> throttle reason names.
_VIOLATION_FLAGS = {
    "active_ppt_pwr": "power_cap",
    "active_socket_thrm": "thermal",
    "active_prochot_thrm": "prochot",
    "active_hbm_thrm": "hbm_thermal",
    "active_vr_thrm": "vr_thermal",
}


@dataclass(frozen=True)
class _Identity:
    name: str
    uuid: str | None
    card: str | None  # the physical card: ASIC serial, else PCI bus address without function
    partition_mode: str | None  # "SPX", "CPX", ... where the card is partitionable
    partition_id: int | None


class AmdSmiBackend:
    """All AMD GPUs of the host. Build it with :func:`open_amdsmi`."""

    name = "amdsmi"

    def __init__(
        self, amdsmi: Any, handles: Sequence[Any], environ: Mapping[str, str], run_pids: RunPids | None
    ) -> None:
        self._smi = amdsmi
        self._handles = list(handles)
        self._run_pids = run_pids
        wrapper = getattr(amdsmi, "amdsmi_wrapper", None)
        self._not_supported_code = getattr(wrapper, "AMDSMI_STATUS_NOT_SUPPORTED", _AMDSMI_STATUS_NOT_SUPPORTED)
        self._guards = [MetricGuard(self._is_not_supported) for _ in self._handles]
        temperature = amdsmi.AmdSmiTemperatureType
        self._edge = temperature.EDGE
        self._junction = getattr(temperature, "HOTSPOT", None) or temperature.JUNCTION  # renamed in ROCm 6.x
        self._current = amdsmi.AmdSmiTemperatureMetric.CURRENT
        self._gfx_clock, self._mem_clock = amdsmi.AmdSmiClkType.GFX, amdsmi.AmdSmiClkType.MEM
        identities = [self._identity(i, h) for i, h in enumerate(self._handles)]
        self._power_keys: list[tuple[str, str] | None] = [self._power_key(i, h) for i, h in enumerate(self._handles)]
        # Where False, another device carries this card's power and energy.
        self._reports_card_power = [True] * len(self._handles)
        notes_by_index: dict[int, list[str]] = {i: [] for i in range(len(self._handles))}
        self._attribute_partitions(identities, notes_by_index)
        self._attribute_dual_die(identities, notes_by_index)
        found = [self._describe(i, identities[i], notes_by_index[i]) for i in range(len(self._handles))]
        self._devices, self.notes = mark_visible(found, environ)
        self.versions = self._versions()

    # -- GpuBackend -----------------------------------------------------------------

    def devices(self) -> Sequence[DeviceInfo]:
        return list(self._devices)

    def sample(self, t_mono: float, t_wall: float) -> Sequence[GpuSample]:
        return [self._sample_one(i, t_mono, t_wall) for i in range(len(self._handles))]

    def close(self) -> None:
        try:
            self._smi.amdsmi_shut_down()
        except Exception:  # the library may already be shut down at exit; nothing left to release
            pass

    def metric_errors(self) -> dict[str, dict[str, str]]:
        """Last vendor error per metric, per device key (for `kaio gpus`)."""
        return {d.key: dict(g.last_errors) for d, g in zip(self._devices, self._guards)}

    # -- detection --------------------------------------------------------------------

    def _is_not_supported(self, exc: BaseException) -> bool:
        library_error = getattr(self._smi, "AmdSmiLibraryException", None)
        if library_error is None or not isinstance(exc, library_error):
            return False
        return getattr(exc, "err_code", None) == self._not_supported_code

    def _identity(self, index: int, handle: Any) -> _Identity:
        smi, read = self._smi, self._guards[index].read
        asic = read("asic_info", smi.amdsmi_get_gpu_asic_info, handle) or {}
        serial = text_or_none(asic.get("asic_serial"))
        if serial and _is_hex(serial) and int(serial, 16) == 0:
            serial = None  # an all-zero serial identifies nothing
        bdf = text_or_none(read("bdf", smi.amdsmi_get_gpu_device_bdf, handle))
        kfd = read("kfd_info", smi.amdsmi_get_gpu_kfd_info, handle) or {}
        return _Identity(
            name=text_or_none(asic.get("market_name")) or "AMD GPU",
            uuid=text_or_none(read("uuid", smi.amdsmi_get_gpu_device_uuid, handle)),
            card=serial or (bdf.rsplit(".", 1)[0] if bdf else None),
            partition_mode=text_or_none(read("partition", smi.amdsmi_get_gpu_compute_partition, handle)),
            partition_id=int_or_none(kfd.get("current_partition_id")),
        )

    def _power_key(self, index: int, handle: Any) -> tuple[str, str] | None:
        """The power reading this device gives ("take what is there"), and its kind."""
        info = self._guards[index].read("power", self._smi.amdsmi_get_power_info, handle) or {}
        for key, kind in _POWER_KEYS:
            if number_or_none(info.get(key)) is not None:
                return key, kind
        return None

    def _attribute_partitions(self, identities: list[_Identity], notes: dict[int, list[str]]) -> None:
        partitioned = [i for i, ident in enumerate(identities) if ident.partition_mode not in (None, "SPX")]
        cards: dict[str | None, list[int]] = {}
        for i in partitioned:
            cards.setdefault(identities[i].card, []).append(i)
        for i in partitioned:
            ident = identities[i]
            members = cards[ident.card] if ident.card is not None else [i]
            primary = _partition_primary(members, identities)
            where = f"card {ident.card}" if ident.card else "its card"
            if i == primary:
                notes[i].append(
                    f"{ident.partition_mode} compute partition {ident.partition_id or 0} of {where}: "
                    f"power and energy cover the whole card ({len(members)} partitions seen)"
                )
            else:
                self._reports_card_power[i] = False
                on = f" (amdsmi:{primary})" if primary is not None else ""
                notes[i].append(
                    f"{ident.partition_mode} compute partition {ident.partition_id} of {where}: the card's power "
                    f"and energy are counted once, on its partition 0{on}"
                )

    def _attribute_dual_die(self, identities: list[_Identity], notes: dict[int, list[str]]) -> None:
        # Most ROCm releases report an MI250's power on one GCD only; the other reads 0 W or "N/A".
        silent = [
            "MI250" in ident.name and (self._power_keys[i] is None or self._power_w(i) == 0)
            for i, ident in enumerate(identities)
        ]
        for i, ident in enumerate(identities):
            if silent[i]:
                self._reports_card_power[i] = False
                notes[i].append("MI250 GCD without its own power reading: the other GCD of the card reports both")
            elif "MI250" in ident.name and i + 1 < len(silent) and silent[i + 1]:
                notes[i].append(
                    f"MI250 GCD: power and energy cover both GCDs of the card (this one and amdsmi:{i + 1})"
                )

    def _describe(self, index: int, ident: _Identity, notes: list[str]) -> DeviceInfo:
        probe = self._sample_one(index, 0.0, 0.0)
        power_key = self._power_keys[index]
        return DeviceInfo(
            backend=self.name,
            index=index,
            name=ident.name,
            uuid=ident.uuid,
            power_kind=power_key[1] if power_key and probe.power_w is not None else None,
            vram_total_bytes=probe.vram_total_bytes,
            supported=answered_metrics(probe),
            notes=tuple(notes),
            power_counted_elsewhere=not self._reports_card_power[index],
        )

    def _versions(self) -> dict[str, str]:
        smi = self._smi
        guard = MetricGuard(self._is_not_supported)
        library = guard.read("library", smi.amdsmi_get_lib_version) or {}
        parts = [library.get(k) for k in ("major", "minor", "release")]
        driver = guard.read("driver", smi.amdsmi_get_gpu_driver_info, self._handles[0]) or {}
        versions = {
            "driver": text_or_none(driver.get("driver_version")),
            "amd_smi_library": ".".join(str(p) for p in parts) if all(p is not None for p in parts) else None,
            "amdsmi": package_version("amdsmi"),
        }
        return {k: v for k, v in versions.items() if v}

    # -- sampling ---------------------------------------------------------------------

    def _sample_one(self, index: int, t_mono: float, t_wall: float) -> GpuSample:
        smi, handle, read = self._smi, self._handles[index], self._guards[index].read
        activity = read("util", smi.amdsmi_get_gpu_activity, handle) or {}
        vram = read("vram", smi.amdsmi_get_gpu_vram_usage, handle) or {}
        power_w = energy_j = None
        if self._reports_card_power[index]:
            power_w = self._power_w(index)
            energy_j = read("energy", self._energy_j, handle)
        gfx_clock = read("sm_clock", smi.amdsmi_get_clock_info, handle, self._gfx_clock) or {}
        mem_clock = read("mem_clock", smi.amdsmi_get_clock_info, handle, self._mem_clock) or {}
        return GpuSample(
            key=f"{self.name}:{index}",
            t_mono=t_mono,
            t_wall=t_wall,
            util_pct=number_or_none(activity.get("gfx_activity")),
            vram_used_bytes=_mib_to_bytes(vram.get("vram_used")),
            vram_total_bytes=_mib_to_bytes(vram.get("vram_total")),
            run_vram_bytes=read("run_vram", self._run_vram_bytes, handle) if self._run_pids is not None else None,
            power_w=power_w,
            temp_c=number_or_none(read("temp", smi.amdsmi_get_temp_metric, handle, self._edge, self._current)),
            temp_junction_c=number_or_none(
                read("temp_junction", smi.amdsmi_get_temp_metric, handle, self._junction, self._current)
            ),
            energy_counter_j=energy_j,
            sm_clock_mhz=number_or_none(gfx_clock.get("clk")),
            mem_clock_mhz=number_or_none(mem_clock.get("clk")),
            throttle=read("throttle", self._throttle, handle),
        )

    def _power_w(self, index: int) -> float | None:
        key = self._power_keys[index]
        if key is None:
            return None
        info = self._guards[index].read("power", self._smi.amdsmi_get_power_info, self._handles[index]) or {}
        return number_or_none(info.get(key[0]))

    def _energy_j(self, handle: Any) -> float | None:
        reading = self._smi.amdsmi_get_energy_count(handle)
        # The accumulator is "energy_accumulator" since amdsmi 6.2.1, "power" before.
        ticks = reading.get("energy_accumulator", reading.get("power"))
        ticks = number_or_none(ticks, all_ones_is_missing=False)
        resolution_uj = number_or_none(reading.get("counter_resolution"))
        if ticks is None or resolution_uj is None or resolution_uj <= 0:
            return None
        return ticks * resolution_uj / 1e6

    def _throttle(self, handle: Any) -> tuple[str, ...] | None:
        status = self._smi.amdsmi_get_violation_status(handle)
        flags = {name: status.get(flag) for flag, name in _VIOLATION_FLAGS.items()}
        known = {name: value for name, value in flags.items() if isinstance(value, bool)}
        if not known:
            return None  # every flag "N/A": this card does not expose throttling
        return tuple(name for name, active in known.items() if active)

    def _run_vram_bytes(self, handle: Any) -> int | None:
        assert self._run_pids is not None
        pids = self._run_pids()
        processes = [self._process_info(handle, p) for p in self._smi.amdsmi_get_gpu_process_list(handle)]
        ours = [p for p in processes if p.get("pid") in pids]
        if not ours and any(not os.path.exists(f"/proc/{p.get('pid')}") for p in processes):
            return None  # PIDs from another PID namespace (container): nothing attributable
        return sum(int_or_none((p.get("memory_usage") or {}).get("vram_mem")) or 0 for p in ours)

    def _process_info(self, handle: Any, process: Any) -> dict:
        # amdsmi 6.2+ lists dicts; earlier releases list handles to look up one by one.
        if isinstance(process, dict):
            return process
        return self._smi.amdsmi_get_gpu_process_info(handle, process)


def open_amdsmi(
    environ: Mapping[str, str] = os.environ, run_pids: RunPids | None = None
) -> tuple[AmdSmiBackend | None, list[str]]:
    """The AMD SMI backend, or ``None`` and a note saying why AMD telemetry is absent."""
    try:
        # amdsmi prints to stdout when it cannot find libamd_smi.so; keep the terminal clean.
        with contextlib.redirect_stdout(io.StringIO()):
            import amdsmi
    except ImportError:
        return None, [
            "AMD: the amdsmi Python library is not installed "
            "(install it from your ROCm: pip install /opt/rocm/share/amd_smi)"
        ]
    except Exception as exc:  # OSError (no libamd_smi.so), version mismatch between binding and library
        return None, [f"AMD: the amdsmi library could not load ({type(exc).__name__}: {exc})"]
    try:
        amdsmi.amdsmi_init()
    except Exception as exc:
        return None, [f"AMD: no usable driver (amdsmi_init failed: {exc})"]
    try:
        handles = list(amdsmi.amdsmi_get_processor_handles())
    except Exception as exc:
        _shut_down(amdsmi)
        return None, [f"AMD: AMD SMI started but could not list GPUs ({exc})"]
    if not handles:
        _shut_down(amdsmi)
        return None, ["AMD: the driver is loaded but reports no GPU"]
    try:
        backend = AmdSmiBackend(amdsmi, handles, environ, run_pids)
    except Exception as exc:  # a binding that lacks names this backend relies on
        _shut_down(amdsmi)
        return None, [f"AMD: the amdsmi binding is not compatible ({type(exc).__name__}: {exc})"]
    return backend, list(backend.notes)


def _shut_down(amdsmi: Any) -> None:
    try:
        amdsmi.amdsmi_shut_down()
    except Exception:  # nothing to release if shutdown itself fails
        pass


def _partition_primary(members: list[int], identities: list[_Identity]) -> int | None:
    """The member that carries the card's power: partition 0, else the first one found."""
    with_ids = [i for i in members if identities[i].partition_id is not None]
    if with_ids:
        zeros = [i for i in with_ids if identities[i].partition_id == 0]
        return zeros[0] if zeros else None
    return members[0]


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def _mib_to_bytes(value: Any) -> int | None:
    mib = int_or_none(value)
    return mib * _MIB if mib is not None else None

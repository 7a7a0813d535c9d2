"""Which of the host's GPUs the run can see, from the vendor's visibility variables.

Every physical GPU is sampled; ``DeviceInfo.in_run`` marks the ones the
run's processes can use, so reports count the run's GPUs only.

- NVIDIA: ``CUDA_VISIBLE_DEVICES``.
- AMD: ``ROCR_VISIBLE_DEVICES`` selects among the physical GPUs, then
  ``HIP_VISIBLE_DEVICES`` (or ``CUDA_VISIBLE_DEVICES``, which HIP honours
  when ``HIP_VISIBLE_DEVICES`` is unset) selects among those, by position.

Entries are indices or UUIDs; UUIDs may carry the ``GPU-`` prefix and may be
abbreviated to any unambiguous prefix, as CUDA accepts. Unset means every
GPU, an empty string means none. Like CUDA, an entry that matches no GPU
ends the list: the GPUs after it are not visible to the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from kaio.devices.base import DeviceInfo


def mark_visible(devices: Sequence[DeviceInfo], environ: Mapping[str, str]) -> tuple[list[DeviceInfo], list[str]]:
    """``devices`` with ``in_run`` set from ``environ``, and notes about entries that matched nothing."""
    notes: list[str] = []
    in_run: dict[str, int] = {}  # key -> its place among the run's GPUs of its backend (cuda:N)
    for backend in dict.fromkeys(d.backend for d in devices):
        own = sorted((d for d in devices if d.backend == backend), key=lambda d: d.index)
        if backend == "nvml":
            visible = _select(own, environ.get("CUDA_VISIBLE_DEVICES"), "CUDA_VISIBLE_DEVICES", notes)
            notes.extend(_cuda_order_note(own, environ))
        elif backend == "amdsmi":
            visible = _select(own, environ.get("ROCR_VISIBLE_DEVICES"), "ROCR_VISIBLE_DEVICES", notes)
            hip_var = "HIP_VISIBLE_DEVICES" if "HIP_VISIBLE_DEVICES" in environ else "CUDA_VISIBLE_DEVICES"
            visible = _select(visible, environ.get(hip_var), hip_var, notes)
        else:
            visible = own
        in_run.update((d.key, position) for position, d in enumerate(visible))
    return [msgspec.structs.replace(d, in_run=d.key in in_run, visible_index=in_run.get(d.key)) for d in devices], notes


def _select(candidates: list[DeviceInfo], spec: str | None, variable: str, notes: list[str]) -> list[DeviceInfo]:
    """The candidates ``spec`` names, in the order it names them."""
    if spec is None:
        return list(candidates)
    chosen: list[DeviceInfo] = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        if entry.upper().startswith("MIG-"):
            notes.append(
                f"{variable}: MIG instance {entry} cannot be traced to its GPU; it is not marked as in the run"
            )
            continue
        device = _resolve(candidates, entry)
        if device is None:
            notes.append(f"{variable}: entry {entry!r} matches no GPU; like CUDA, the entries after it are ignored")
            break
        if device not in chosen:
            chosen.append(device)
    return chosen


def _resolve(candidates: list[DeviceInfo], entry: str) -> DeviceInfo | None:
    if entry.lstrip("-").isdigit():
        position = int(entry)
        return candidates[position] if 0 <= position < len(candidates) else None
    wanted = _normalise_uuid(entry)
    if not wanted:
        return None
    matches = [d for d in candidates if d.uuid and _normalise_uuid(d.uuid).startswith(wanted)]
    return matches[0] if len(matches) == 1 else None


def _normalise_uuid(text: str) -> str:
    text = text.strip().lower()
    if text.startswith("gpu-"):
        text = text[len("gpu-") :]
    return text.replace("-", "")


def _cuda_order_note(devices: list[DeviceInfo], environ: Mapping[str, str]) -> list[str]:
    """CUDA numbers GPUs fastest first unless told otherwise; NVML numbers them by PCI bus."""
    spec = environ.get("CUDA_VISIBLE_DEVICES")
    mixed = len({d.name for d in devices}) > 1
    by_index = spec is not None and any(p.strip().isdigit() for p in spec.split(","))
    if mixed and by_index and environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        return [
            "CUDA_VISIBLE_DEVICES uses indices on a host with different GPU models: CUDA may number them "
            "differently from NVML; set CUDA_DEVICE_ORDER=PCI_BUS_ID so the marked GPUs are the used ones"
        ]
    return []

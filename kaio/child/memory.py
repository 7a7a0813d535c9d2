"""The true peak VRAM of a step: the caching allocator's own peak counter, reset at each step's start."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def peak_memory_functions() -> tuple[Callable[[], None], Callable[[], int]] | None:
    """``(reset, read_peak)`` of the caching allocator when a CUDA/ROCm device is in use, else None.

    ``max_memory_allocated`` builds and flattens the whole statistics dict (~80 us
    on an H200 host); the nested stats read the same counter in ~11 us. Both only
    read host-side counters: no GPU synchronisation.
    """
    torch: Any = sys.modules.get("torch")  # a script that never imported torch uses no GPU through it
    if torch is None or not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    device = torch.cuda.current_device()
    read_stats: Any = getattr(torch._C, "_cuda_memoryStats", None)  # private: fall back if it ever goes
    try:
        read_stats(device)["allocated_bytes"]["all"]["peak"]
    except (TypeError, KeyError, RuntimeError):
        read_stats = None

    def read_peak() -> int:
        if read_stats is None:
            return int(torch.cuda.max_memory_allocated(device))
        return int(read_stats(device)["allocated_bytes"]["all"]["peak"])

    return (lambda: torch.cuda.reset_peak_memory_stats(device)), read_peak

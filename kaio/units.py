"""Memory sizes for people, one convention everywhere: binary units (GiB, MiB), as nvidia-smi,
amd-smi and torch print them. Data keeps bytes (``*_bytes``); only display converts."""

from __future__ import annotations

GIB = 1 << 30
MIB = 1 << 20


def gib(n: float, *, digits: int | None = None) -> str:
    """``12.1 GiB``; below 1 GiB in MiB (``512 MiB``), below 1 MiB with three significant digits. ``digits``:
    that many significant digits whatever the size (an estimate's terms beside its total: they add up)."""
    if digits is not None:
        return f"{n / GIB:.{digits}g} GiB" if n >= GIB else f"{n / MIB:.{digits}g} MiB"
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    if n >= MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / MIB:.3g} MiB"


def gib_pair(used: float | None, total: float | None, missing: str = "–", sep: str = " ") -> str:
    """``12.1/80.0 GiB``; a missing side is ``missing``."""
    u = f"{used / GIB:.1f}" if used is not None else missing
    t = f"{total / GIB:.1f}" if total is not None else missing
    return f"{u}/{t}{sep}GiB"

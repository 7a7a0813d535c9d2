"""The host's CPU and RAM: what kaio records when there is no GPU, and alongside GPUs.

Always labelled as the host, never presented as a GPU.
"""

from __future__ import annotations

import os

from kaio.devices.base import HostSample


class HostBackend:
    """Whole-host CPU utilisation (0..100 %) and RAM, through psutil."""

    name = "host"

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.cpu_count = os.cpu_count()
        # cpu_percent(None) measures since its previous call; the first call only sets the origin.
        self._cpu_percent()

    def sample(self, t_mono: float, t_wall: float) -> HostSample:
        memory = self._virtual_memory()
        return HostSample(
            t_mono=t_mono,
            t_wall=t_wall,
            cpu_pct=self._cpu_percent(),
            # "Used" as the kernel sees pressure: what is not available to new processes.
            ram_used_bytes=memory.total - memory.available if memory else None,
            ram_total_bytes=memory.total if memory else None,
        )

    def close(self) -> None:
        """Nothing to release; present so the poller can treat every source alike."""

    def _cpu_percent(self) -> float | None:
        try:
            return float(self._psutil.cpu_percent(interval=None))
        except Exception:  # /proc unreadable (sandboxes): not available, never a crash
            return None

    def _virtual_memory(self):
        try:
            return self._psutil.virtual_memory()
        except Exception:  # /proc unreadable (sandboxes): not available, never a crash
            return None

"""The sampling thread: every GPU (and the host) on a fixed, drift-free grid.

Tick ``n`` is scheduled at ``start + n * interval``; the next tick is the
previous *scheduled* time plus the interval, so time spent sampling never
shifts the grid. A slow vendor call makes one tick late; if a tick is more
than one interval late, the missed grid points are skipped (counted, not
sampled in a burst) and sampling resumes on the grid.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence

import msgspec

from kaio.devices.base import DeviceInfo, GpuBackend, GpuSample, Tick
from kaio.devices.energy import EnergyTracker
from kaio.devices.host import HostBackend

# Lateness values kept for the p99: a uniform reservoir sample, so memory stays
# bounded however many days the run lasts.
_LATENESS_RESERVOIR = 4096


class Poller:
    """Samples ``backends`` (and ``host``) ``hz`` times a second and hands each :class:`Tick` to ``on_tick``.

    ``on_tick`` runs on the poller thread: keep it short (e.g. put the tick on a
    queue). Once started, the poller owns the backends: :meth:`stop` closes them.
    Each GPU sample carries ``energy_j``, the device's energy since the first
    tick, from its hardware counter when that proves trustworthy, else from
    integrated power (see :mod:`kaio.devices.energy`).
    """

    def __init__(
        self,
        backends: Sequence[GpuBackend],
        hz: float,
        on_tick: Callable[[Tick], None],
        host: HostBackend | None = None,
        *,
        energy_check_window_s: float = 2.0,
    ) -> None:
        if hz <= 0:
            raise ValueError(f"poll rate must be positive, not {hz} Hz")
        self._backends = list(backends)
        self._interval = 1.0 / hz
        self._on_tick = on_tick
        self._host = host
        self._energy_check_window_s = energy_check_window_s
        self._energy: dict[str, EnergyTracker] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats = _TickStats()
        self.devices: list[DeviceInfo] = [d for b in self._backends for d in b.devices()]

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the poller was already started")
        self._thread = threading.Thread(target=self._run, name="kaio-poller", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0, *, closing_tick: bool = False) -> None:
        """Stop promptly (no sleep to wait out) and release the vendor libraries.

        ``closing_tick`` takes one last tick now, off the grid, before the libraries close: the steps
        that ended after the last scheduled tick then lie inside a sampled span (their energy is
        measured, not cut to zero at the end of the known counter).
        """
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            return  # stuck inside a vendor call: closing the library under it could crash the process
        if closing_tick:
            try:
                self._on_tick(self._take_tick(time.monotonic(), lateness_s=0.0))
            except Exception as exc:  # as on the thread: a consumer bug costs this tick only
                self._stats.callback_errors += 1
                self._stats.last_callback_error = f"{type(exc).__name__}: {exc}"
        sources: list = [*self._backends, *([self._host] if self._host else [])]
        for source in sources:
            try:
                source.close()
            except Exception:  # a library that fails to shut down has nothing left to release
                pass

    def stats(self) -> dict:
        """Cadence achieved so far and how energy is measured per device; JSON-serialisable."""
        with self._lock:
            report = self._stats.report(self._interval)
            report["energy_fallbacks"] = {
                key: tracker.fallback_reason for key, tracker in self._energy.items() if tracker.fallback_reason
            }
            # Counters trusted without a power reading to check them against.
            report["energy_unverified"] = sorted(k for k, t in self._energy.items() if t.counter_unverified)
        return report

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        interval = self._interval
        scheduled = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < scheduled:
                if self._stop.wait(scheduled - now):
                    break
                now = time.monotonic()
            missed = int((now - scheduled) // interval)
            if missed > 0:  # more than one interval late: skip to the latest grid point
                scheduled += missed * interval
            tick = self._take_tick(scheduled, lateness_s=now - scheduled)
            with self._lock:
                self._stats.record(now, now - scheduled, missed)
            try:
                self._on_tick(tick)
            except Exception as exc:  # a consumer bug must not end telemetry for the whole run
                with self._lock:
                    self._stats.callback_errors += 1
                    self._stats.last_callback_error = f"{type(exc).__name__}: {exc}"
            scheduled += interval

    def _take_tick(self, scheduled: float, lateness_s: float) -> Tick:
        gpus: list[GpuSample] = []
        for backend in self._backends:
            try:
                samples = backend.sample(time.monotonic(), time.time())
            except Exception as exc:  # backends must not raise; if one does, the others still report
                with self._lock:
                    self._stats.backend_errors += 1
                    self._stats.last_backend_error = f"{backend.name}: {type(exc).__name__}: {exc}"
                continue
            gpus.extend(self._with_energy(s) for s in samples)
        host = self._host.sample(time.monotonic(), time.time()) if self._host else None
        return Tick(t_mono=scheduled, lateness_s=lateness_s, gpus=tuple(gpus), host=host)

    def _with_energy(self, sample: GpuSample) -> GpuSample:
        tracker = self._energy.get(sample.key)
        if tracker is None:
            with self._lock:
                tracker = self._energy.setdefault(sample.key, EnergyTracker(self._energy_check_window_s))
        energy_j, method = tracker.update(sample.t_mono, sample.power_w, sample.energy_counter_j)
        return msgspec.structs.replace(sample, energy_j=energy_j, energy_method=method)


class _TickStats:
    """Achieved interval and lateness, in constant memory."""

    def __init__(self) -> None:
        self.ticks = 0
        self.skipped_ticks = 0
        self.callback_errors = 0
        self.last_callback_error: str | None = None
        self.backend_errors = 0
        self.last_backend_error: str | None = None
        self._first_start: float | None = None
        self._last_start: float | None = None
        self._lateness_sum = 0.0
        self._lateness_max = 0.0
        self._reservoir: list[float] = []
        self._random = random.Random(0)  # reproducible, and independent of the program's random state

    def record(self, started: float, lateness_s: float, missed: int) -> None:
        self.ticks += 1
        self.skipped_ticks += missed
        if self._first_start is None:
            self._first_start = started
        self._last_start = started
        self._lateness_sum += lateness_s
        self._lateness_max = max(self._lateness_max, lateness_s)
        if len(self._reservoir) < _LATENESS_RESERVOIR:
            self._reservoir.append(lateness_s)
        else:  # Algorithm R: every tick has the same chance to be in the sample
            slot = self._random.randrange(self.ticks)
            if slot < _LATENESS_RESERVOIR:
                self._reservoir[slot] = lateness_s

    def report(self, interval_s: float) -> dict:
        span = (self._last_start or 0.0) - (self._first_start or 0.0)
        ordered = sorted(self._reservoir)
        return {
            "hz": 1.0 / interval_s,
            "ticks": self.ticks,
            "skipped_ticks": self.skipped_ticks,
            "mean_interval_s": span / (self.ticks - 1) if self.ticks > 1 else None,
            "lateness_mean_s": self._lateness_sum / self.ticks if self.ticks else None,
            "lateness_p99_s": ordered[math.ceil(0.99 * len(ordered)) - 1] if ordered else None,  # nearest rank
            "lateness_max_s": self._lateness_max if self.ticks else None,
            "callback_errors": self.callback_errors,
            "last_callback_error": self.last_callback_error,
            "backend_errors": self.backend_errors,
            "last_backend_error": self.last_backend_error,
        }

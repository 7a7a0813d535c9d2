"""The poller: drift-free cadence, prompt stop, bounded stats, energy through the sample stream."""

import threading
import time

import pytest
from fakes import install_nvml, uninstall
from fakes.fake_pynvml import FakeNvidiaGpu

from kaio.devices.base import DeviceInfo, GpuSample
from kaio.devices.detect import detect
from kaio.devices.host import HostBackend
from kaio.devices.poller import Poller, _TickStats


class SyntheticBackend:
    """A GPU backend with scripted delays: sleeps ``slow[n]`` seconds inside its n-th sample."""

    name = "synthetic"

    def __init__(self, power_w=100.0, slow=None, fail=False):
        self.power_w = power_w
        self.slow = slow or {}
        self.fail = fail
        self.calls = 0
        self.closed = False

    def devices(self):
        return [DeviceInfo("synthetic", 0, "test GPU")]

    def sample(self, t_mono, t_wall):
        self.calls += 1
        if self.fail:
            raise RuntimeError("vendor library exploded")
        time.sleep(self.slow.get(self.calls, 0.0))
        return [GpuSample("synthetic:0", t_mono, t_wall, power_w=self.power_w)]

    def close(self):
        self.closed = True


def _run(poller, seconds):
    poller.start()
    time.sleep(seconds)
    poller.stop()


def test_schedule_stays_on_grid_when_one_sample_is_slow():
    ticks = []
    backend = SyntheticBackend(slow={5: 0.030})
    poller = Poller([backend], hz=10, on_tick=ticks.append)
    _run(poller, 1.5)

    assert 12 <= len(ticks) <= 17
    scheduled = [t.t_mono for t in ticks]
    gaps = [b - a for a, b in zip(scheduled, scheduled[1:])]
    assert gaps == pytest.approx([0.1] * len(gaps), abs=1e-9)  # the grid never shifts
    # The slow vendor call delays only its own tick's data, not the ones after it.
    assert ticks[5].lateness_s < 0.06
    assert sorted(t.lateness_s for t in ticks)[len(ticks) // 2] < 0.03
    sample_delays = [t.gpus[0].t_mono - t.t_mono for t in ticks]
    assert sample_delays[-1] < 0.06  # no accumulated drift after 1.5 s
    stats = poller.stats()
    assert stats["ticks"] == len(ticks) and stats["skipped_ticks"] == 0
    assert stats["mean_interval_s"] == pytest.approx(0.1, abs=0.01)
    assert 0 <= stats["lateness_p99_s"] <= stats["lateness_max_s"] < 0.1


def test_ticks_more_than_an_interval_late_are_skipped_but_the_grid_is_kept():
    ticks = []
    poller = Poller([SyntheticBackend(slow={3: 0.35})], hz=10, on_tick=ticks.append)
    _run(poller, 1.0)

    origin = ticks[0].t_mono
    positions = [(t.t_mono - origin) / 0.1 for t in ticks]
    assert positions == pytest.approx([round(p) for p in positions], abs=1e-6)  # all on the grid
    steps = [round(b - a) for a, b in zip(positions, positions[1:])]
    assert max(steps) >= 3  # grid points skipped rather than sampled in a burst
    assert all(t.lateness_s < 0.1 for t in ticks)
    assert poller.stats()["skipped_ticks"] == sum(s - 1 for s in steps)


def test_stop_is_prompt_and_releases_the_backends():
    backend = SyntheticBackend()
    poller = Poller([backend], hz=0.2, on_tick=lambda tick: None)  # one tick every 5 s
    poller.start()
    time.sleep(0.1)
    started = time.monotonic()
    poller.stop()
    assert time.monotonic() - started < 0.5
    assert backend.closed and backend.calls == 1


def test_a_closing_tick_covers_the_time_after_the_last_scheduled_one():
    """The supervisor stops the poller when the child has exited: the steps that ended after the last
    scheduled tick must still lie inside a sampled span (else their energy reads as zero)."""
    ticks = []
    backend = SyntheticBackend(power_w=100.0)
    poller = Poller([backend], hz=0.5, on_tick=ticks.append)  # one scheduled tick every 2 s
    poller.start()
    time.sleep(0.3)
    before_stop = time.monotonic()
    poller.stop(closing_tick=True)
    assert len(ticks) == 2 and backend.closed  # the scheduled tick at start, then the closing one
    scheduled, closing = ticks
    assert closing.t_mono >= before_stop > scheduled.t_mono
    assert closing.gpus[0].energy_j == pytest.approx(100.0 * (closing.t_mono - scheduled.t_mono), rel=0.05)


def test_energy_and_host_travel_with_each_tick():
    ticks = []
    poller = Poller([SyntheticBackend(power_w=100.0)], hz=20, on_tick=ticks.append, host=HostBackend())
    _run(poller, 0.5)

    first, last = ticks[0].gpus[0], ticks[-1].gpus[0]
    assert first.energy_j == 0.0
    assert last.energy_j == pytest.approx(100.0 * (last.t_mono - first.t_mono))  # constant power: exact
    assert last.energy_method == "integrated"
    assert ticks[-1].host.ram_total_bytes > 0 and 0.0 <= ticks[-1].host.cpu_pct <= 100.0
    assert poller.devices == [DeviceInfo("synthetic", 0, "test GPU")]


def test_a_failing_consumer_or_backend_does_not_stop_telemetry():
    seen = []

    def flaky_consumer(tick):
        seen.append(tick)
        if len(seen) == 1:
            raise ValueError("consumer bug")

    poller = Poller([SyntheticBackend(fail=True), SyntheticBackend()], hz=20, on_tick=flaky_consumer)
    _run(poller, 0.3)
    stats = poller.stats()
    assert len(seen) >= 3
    assert all(len(t.gpus) == 1 for t in seen)  # the healthy backend still reports
    assert stats["callback_errors"] == 1 and "consumer bug" in stats["last_callback_error"]
    assert stats["backend_errors"] == len(seen) and "exploded" in stats["last_backend_error"]


def test_lateness_memory_is_bounded_and_p99_is_representative():
    stats = _TickStats()
    for i in range(20_000):
        stats.record(started=i * 0.5, lateness_s=(i % 1000) / 1000, missed=0)
    report = stats.report(0.5)
    assert len(stats._reservoir) == 4096
    assert report["ticks"] == 20_000 and report["mean_interval_s"] == pytest.approx(0.5)
    assert report["lateness_p99_s"] == pytest.approx(0.99, abs=0.02)
    assert report["lateness_max_s"] == pytest.approx(0.999)


@pytest.fixture
def nvml_only(monkeypatch):
    uninstall(monkeypatch, "amdsmi")

    def install(gpu):
        install_nvml(monkeypatch, [gpu])
        return detect("nvml", environ={}).backends

    return install


def _final_energy(backends, seconds):
    ticks, lock = [], threading.Lock()

    def keep(tick):
        with lock:
            ticks.append(tick)

    poller = Poller(backends, hz=20, on_tick=keep, energy_check_window_s=0.3)
    _run(poller, seconds)
    return [t.gpus[0] for t in ticks], poller.stats()


def test_trustworthy_counter_is_used_end_to_end(nvml_only):
    samples, stats = _final_energy(nvml_only(FakeNvidiaGpu(power_mw=250_000)), 0.7)
    last = samples[-1]
    assert last.energy_method == "counter"
    assert last.energy_j == pytest.approx(250.0 * (last.t_mono - samples[0].t_mono), rel=0.05)
    assert stats["energy_fallbacks"] == {} and stats["energy_unverified"] == []


def test_stuck_counter_falls_back_end_to_end(nvml_only):
    samples, stats = _final_energy(nvml_only(FakeNvidiaGpu(energy_counter="stuck")), 0.6)
    assert samples[-1].energy_method == "integrated"
    assert samples[-1].energy_j == pytest.approx(350.0 * (samples[-1].t_mono - samples[0].t_mono))
    assert "nvml:0" in stats["energy_fallbacks"]


def test_counter_wrapping_mid_run_keeps_energy_monotonic(nvml_only):
    samples, stats = _final_energy(nvml_only(FakeNvidiaGpu(energy_counter="wrap", wrap_after_reads=12)), 0.9)
    methods = [s.energy_method for s in samples]
    assert "counter" in methods and methods[-1] == "integrated"
    energies = [s.energy_j for s in samples]
    assert energies == sorted(energies)  # no drop at the switch
    assert energies[-1] == pytest.approx(350.0 * (samples[-1].t_mono - samples[0].t_mono), rel=0.05)
    assert "backwards" in stats["energy_fallbacks"]["nvml:0"]

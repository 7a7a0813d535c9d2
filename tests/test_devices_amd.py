"""The AMD SMI backend against a fake ``amdsmi`` package (faked at the binding, real names and units)."""

import os
import time

import pytest
from fakes import install_amdsmi, uninstall
from fakes.fake_amdsmi import (
    AMDSMI_STATUS_DRIVER_NOT_LOADED,
    NA,
    FakeAmdGpu,
    mi250_card,
    mi300x_cpx_card,
    mi300x_node,
)

from kaio.devices.detect import detect
from kaio.devices.poller import Poller

MIB = 2**20


def _amd_backend(monkeypatch, gpus, environ=None, **options):
    install_amdsmi(monkeypatch, gpus, **options)
    uninstall(monkeypatch, "pynvml")
    result = detect("amdsmi", environ=environ or {})
    (backend,) = result.backends
    return backend


def test_mi300x_node_reads_every_gpu_in_the_libraries_units(monkeypatch):
    gpus = mi300x_node(8)
    for gpu in gpus:
        gpu.energy_counter = "stuck"  # an exact reading to check the unit conversion against
    backend = _amd_backend(monkeypatch, gpus)
    devices = backend.devices()
    assert [d.key for d in devices] == [f"amdsmi:{i}" for i in range(8)]
    assert {d.name for d in devices} == {"AMD Instinct MI300X"}
    assert all(d.power_kind == "instant" for d in devices)  # current_socket_power; average is "N/A"
    assert all(d.notes == () for d in devices)  # SPX: one device per card, nothing shared

    s = backend.sample(5.0, 1700.0)[7]
    assert s.power_w == 607.0
    assert (s.vram_used_bytes, s.vram_total_bytes) == (65_536 * MIB, 196_592 * MIB)  # MiB -> bytes
    assert s.temp_c is None  # MI300X has no edge sensor
    assert s.temp_junction_c == 72.0
    assert (s.util_pct, s.sm_clock_mhz, s.mem_clock_mhz) == (95.0, 2100.0, 1300.0)
    assert s.throttle == ()
    # energy_accumulator ticks * counter_resolution uJ -> J
    assert s.energy_counter_j == pytest.approx(123_456_789 * 15.259 / 1e6)
    assert "temp" not in devices[0].supported and "temp_junction" in devices[0].supported


def test_older_rocm_energy_key_is_read_too(monkeypatch):
    backend = _amd_backend(monkeypatch, [FakeAmdGpu(energy_counter="stuck")], rocm="6.1")
    assert backend.sample(1.0, 0.0)[0].energy_counter_j == pytest.approx(123_456_789 * 15.259 / 1e6)


def test_power_that_reads_na_is_none_and_average_only_cards_are_labelled(monkeypatch):
    na_everywhere = FakeAmdGpu(power={"current_socket_power": NA, "average_socket_power": NA})
    average_only = FakeAmdGpu(power={"current_socket_power": NA, "average_socket_power": 280})
    rocm7 = FakeAmdGpu(power={"socket_power": 590})
    backend = _amd_backend(monkeypatch, [na_everywhere, average_only, rocm7])
    assert [d.power_kind for d in backend.devices()] == [None, "average", "instant"]
    assert [s.power_w for s in backend.sample(1.0, 0.0)] == [None, 280.0, 590.0]


def test_cpx_partitions_count_the_cards_power_and_energy_once(monkeypatch):
    backend = _amd_backend(monkeypatch, mi300x_cpx_card(8))
    devices = backend.devices()
    samples = backend.sample(1.0, 0.0)

    assert len(devices) == 8
    assert samples[0].power_w == 640.0 and samples[0].energy_counter_j is not None
    assert all(s.power_w is None and s.energy_counter_j is None for s in samples[1:])
    assert all(s.util_pct == 95.0 and s.vram_total_bytes == 196_592 // 8 * MIB for s in samples)
    assert "power and energy cover the whole card (8 partitions seen)" in devices[0].notes[0]
    assert "counted once, on its partition 0 (amdsmi:0)" in devices[5].notes[0]
    assert devices[5].power_kind is None
    # The report's energy counts partition 0's, and leaves the others out without a warning.
    assert not devices[0].power_counted_elsewhere and all(d.power_counted_elsewhere for d in devices[1:])


def test_mi300x_node_in_cpx_mode_attributes_each_card_to_its_own_partition_0(monkeypatch):
    cards = []
    for card in range(2):
        for gpu in mi300x_cpx_card(4):
            gpu.asic_serial = f"0x00000000000000C{card}"
            gpu.bdf = gpu.bdf.replace("0000:05", f"0000:{0x05 + 0x10 * card:02x}")
            cards.append(gpu)
    backend = _amd_backend(monkeypatch, cards)
    powered = [s.key for s in backend.sample(1.0, 0.0) if s.power_w is not None]
    assert powered == ["amdsmi:0", "amdsmi:4"]


def test_mi250_gcd_without_power_is_not_given_one(monkeypatch):
    backend = _amd_backend(monkeypatch, mi250_card())
    first, second = backend.devices()
    samples = backend.sample(1.0, 0.0)
    assert first.power_kind == "average" and samples[0].power_w == 420.0
    assert samples[1].power_w is None and samples[1].energy_counter_j is None
    assert samples[1].temp_c == 47.0  # the die's own sensors still report
    assert "cover both GCDs" in first.notes[0] and "without its own power reading" in second.notes[0]


def test_violation_status_becomes_throttle_reasons(monkeypatch):
    gpu = FakeAmdGpu(violation={"active_ppt_pwr": True, "active_socket_thrm": True, "active_hbm_thrm": False})
    backend = _amd_backend(monkeypatch, [gpu, FakeAmdGpu(violation={})])
    throttled, unknown = backend.sample(1.0, 0.0)
    assert set(throttled.throttle) == {"power_cap", "thermal"}
    assert unknown.throttle is None  # every flag "N/A": not exposed, which is not "no throttling"


def test_unsupported_and_failing_calls(monkeypatch):
    gpu = FakeAmdGpu(not_supported={"amdsmi_get_clock_info"}, failing={"amdsmi_get_gpu_activity"})
    fake = install_amdsmi(monkeypatch, [gpu])
    uninstall(monkeypatch, "pynvml")
    (backend,) = detect("amdsmi", environ={}).backends
    samples = [backend.sample(float(i), 0.0)[0] for i in range(3)]
    assert all(s.sm_clock_mhz is None and s.util_pct is None for s in samples)
    assert all(s.power_w == 600.0 for s in samples)
    assert fake.calls[("amdsmi_get_clock_info", 0)] == 2  # GFX and MEM at detection, then never again
    assert fake.calls[("amdsmi_get_gpu_activity", 0)] == 4  # an unknown error is retried every tick


def test_run_vram_from_the_process_list(monkeypatch):
    gpu = FakeAmdGpu(processes=[(os.getpid(), 5 * 2**30), (os.getppid(), 2**30)])
    install_amdsmi(monkeypatch, [gpu])
    uninstall(monkeypatch, "pynvml")
    (backend,) = detect("amdsmi", environ={}, run_pids=lambda: {os.getpid()}).backends
    assert backend.sample(1.0, 0.0)[0].run_vram_bytes == 5 * 2**30


def test_rocr_and_hip_visibility(monkeypatch):
    backend = _amd_backend(
        monkeypatch, mi300x_node(4), environ={"ROCR_VISIBLE_DEVICES": "1,2,3", "HIP_VISIBLE_DEVICES": "2"}
    )
    assert [d.in_run for d in backend.devices()] == [False, False, False, True]


def test_missing_library_missing_driver_and_no_gpu_are_notes(monkeypatch):
    uninstall(monkeypatch, "amdsmi")
    missing = detect("amdsmi", environ={})
    assert missing.backends == [] and any("/opt/rocm/share/amd_smi" in n for n in missing.notes)

    install_amdsmi(monkeypatch, mi300x_node(1), init_error=AMDSMI_STATUS_DRIVER_NOT_LOADED)
    no_driver = detect("amdsmi", environ={})
    assert no_driver.backends == [] and any("amdsmi_init failed" in n for n in no_driver.notes)

    install_amdsmi(monkeypatch, [])
    empty = detect("amdsmi", environ={})
    assert empty.backends == [] and any("reports no GPU" in n for n in empty.notes)


@pytest.mark.parametrize(
    ("counter", "reason"),
    [
        (dict(energy_counter="live"), None),
        (dict(energy_counter="live", counter_power_w=30_000.0), "disagreed"),  # ROCm/amdsmi issue 38
        (dict(energy_counter="stuck"), "disagreed"),
        (dict(energy_counter="wrap", wrap_after_reads=10), "backwards"),
    ],
)
def test_energy_counter_is_checked_through_the_poller(monkeypatch, counter, reason):
    backend = _amd_backend(monkeypatch, [FakeAmdGpu(**counter)])
    ticks = []
    poller = Poller([backend], hz=20, on_tick=ticks.append, energy_check_window_s=0.25)
    poller.start()
    time.sleep(0.8)
    poller.stop()

    first, last = ticks[0].gpus[0], ticks[-1].gpus[0]
    expected_j = 600.0 * (last.t_mono - first.t_mono)
    assert last.energy_method == ("counter" if reason is None else "integrated")
    assert last.energy_j == pytest.approx(expected_j, rel=0.05)
    fallbacks = poller.stats()["energy_fallbacks"]
    assert (reason is None and fallbacks == {}) or reason in fallbacks["amdsmi:0"]

"""The NVML backend against a fake ``pynvml`` module (faked at the binding, real names and units)."""

import os
import subprocess
import sys

import pytest
from fakes import install_nvml, uninstall
from fakes.fake_pynvml import ARCH_AMPERE, ARCH_VOLTA, NVML_ERROR_DRIVER_NOT_LOADED, FakeNvidiaGpu

from kaio.devices.detect import detect


def _nvml_backend(result):
    (backend,) = [b for b in result.backends if b.name == "nvml"]
    return backend


@pytest.mark.parametrize("count", [1, 8])
def test_detect_finds_every_gpu_with_units_converted(monkeypatch, count):
    gpus = [FakeNvidiaGpu(uuid=f"GPU-{i:08x}-0000-0000-0000-000000000000", power_mw=300_000 + i) for i in range(count)]
    install_nvml(monkeypatch, gpus)
    backend = _nvml_backend(detect("nvml", environ={}))

    devices = backend.devices()
    assert [d.key for d in devices] == [f"nvml:{i}" for i in range(count)]
    assert devices[-1].uuid == gpus[-1].uuid
    assert all(d.in_run and d.power_kind == "instant" for d in devices)
    assert devices[0].vram_total_bytes == 80 * 2**30

    samples = backend.sample(12.0, 1700.0)
    last = samples[-1]
    assert (last.key, last.t_mono, last.t_wall) == (f"nvml:{count - 1}", 12.0, 1700.0)
    assert last.power_w == pytest.approx((300_000 + count - 1) / 1000)  # mW -> W
    assert last.energy_counter_j == pytest.approx(5_000_000, rel=1e-3)  # mJ -> J
    assert (last.util_pct, last.temp_c, last.sm_clock_mhz, last.mem_clock_mhz) == (97, 61, 1980, 2619)
    assert (last.vram_used_bytes, last.vram_total_bytes) == (20 * 2**30, 80 * 2**30)
    assert last.temp_junction_c is None  # NVML has no public hotspot reading
    assert last.energy_j is None  # energy since start is the poller's job
    backend.close()


def test_unsupported_metric_is_none_and_never_asked_again(monkeypatch):
    fake = install_nvml(monkeypatch, [FakeNvidiaGpu(not_supported={"nvmlDeviceGetTemperature"})])
    backend = _nvml_backend(detect("nvml", environ={}))
    samples = [backend.sample(float(i), 0.0)[0] for i in range(3)]

    assert all(s.temp_c is None for s in samples)
    assert all(s.power_w == 350.0 and s.util_pct == 97 for s in samples)  # the others still answer
    assert fake.calls[("nvmlDeviceGetTemperature", 0)] == 1  # at detection only
    assert "temp" not in backend.devices()[0].supported


def test_a_raising_call_hides_only_its_metric_and_is_retried(monkeypatch):
    gpu = FakeNvidiaGpu()
    fake = install_nvml(monkeypatch, [gpu])
    backend = _nvml_backend(detect("nvml", environ={}))
    gpu.failing = {"nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo"}

    lost = backend.sample(1.0, 0.0)[0]
    assert (lost.util_pct, lost.vram_used_bytes) == (None, None)
    assert (lost.power_w, lost.temp_c) == (350.0, 61)
    assert "GPU is lost" in backend.metric_errors()["nvml:0"]["util"]

    gpu.failing = set()
    assert backend.sample(2.0, 0.0)[0].util_pct == 97  # a transient failure is not "unsupported"
    assert fake.calls[("nvmlDeviceGetUtilizationRates", 0)] == 3


def test_power_kind_follows_the_reading_used(monkeypatch):
    gpus = [
        FakeNvidiaGpu(instant_power_field=True),
        FakeNvidiaGpu(instant_power_field=False, architecture=9),  # Hopper: 1 s average
        FakeNvidiaGpu(instant_power_field=False, architecture=ARCH_VOLTA),  # pre-Ampere: instantaneous
        FakeNvidiaGpu(name="NVIDIA A100-SXM4-80GB", instant_power_field=False, architecture=ARCH_AMPERE),  # GA100
        FakeNvidiaGpu(name="NVIDIA A10", instant_power_field=False, architecture=ARCH_AMPERE),
        FakeNvidiaGpu(instant_power_field=False, not_supported={"nvmlDeviceGetPowerUsage"}),
    ]
    fake = install_nvml(monkeypatch, gpus)
    backend = _nvml_backend(detect("nvml", environ={}))

    kinds = [d.power_kind for d in backend.devices()]
    assert kinds == ["instant", "average", "instant", "instant", "average", None]
    powers = [s.power_w for s in backend.sample(1.0, 0.0)]
    assert powers == [350.0] * 5 + [None]
    assert fake.calls[("nvmlDeviceGetPowerUsage", 0)] == 0  # the instant field was used instead


def test_throttle_reasons_are_named_and_settings_are_not_throttling(monkeypatch):
    gpu = FakeNvidiaGpu(clock_event_reasons=0x4 | 0x20 | 0x8 | 0x1)  # power cap, thermal, HW slowdown, idle
    install_nvml(monkeypatch, [gpu])
    backend = _nvml_backend(detect("nvml", environ={}))
    assert set(backend.sample(1.0, 0.0)[0].throttle) == {"power_cap", "thermal", "hw_slowdown"}
    gpu.clock_event_reasons = 0x1  # idle only
    assert backend.sample(2.0, 0.0)[0].throttle == ()


def test_old_driver_without_event_reasons_uses_throttle_reasons(monkeypatch):
    fake = install_nvml(monkeypatch, [FakeNvidiaGpu(clock_event_reasons=0x40)], has_event_reasons=False)
    backend = _nvml_backend(detect("nvml", environ={}))
    assert backend.sample(1.0, 0.0)[0].throttle == ("hw_thermal",)
    assert fake.calls[("nvmlDeviceGetCurrentClocksThrottleReasons", 0)] >= 1


def test_run_vram_counts_only_the_runs_processes(monkeypatch):
    me, parent = os.getpid(), os.getppid()
    gpu = FakeNvidiaGpu(processes=[(me, 3 * 2**30), (parent, 2**30)])
    install_nvml(monkeypatch, [gpu])
    backend = _nvml_backend(detect("nvml", environ={}, run_pids=lambda: {me}))
    assert backend.sample(1.0, 0.0)[0].run_vram_bytes == 3 * 2**30
    assert "run_vram" in backend.devices()[0].supported

    gpu.processes = [(2**22 + 12345, 2**30)]  # a PID that does not exist here: another PID namespace
    assert backend.sample(2.0, 0.0)[0].run_vram_bytes is None


def test_visibility_marks_the_runs_gpus(monkeypatch):
    gpus = [FakeNvidiaGpu(uuid=f"GPU-{c * 8}-1111-2222-3333-444444444444") for c in "abcd"]
    install_nvml(monkeypatch, gpus)
    result = detect("nvml", environ={"CUDA_VISIBLE_DEVICES": "GPU-cccc,1"})
    assert [d.in_run for d in _nvml_backend(result).devices()] == [False, True, True, False]


def test_no_driver_is_a_note_not_a_crash(monkeypatch):
    install_nvml(monkeypatch, [FakeNvidiaGpu()], init_error=NVML_ERROR_DRIVER_NOT_LOADED)
    result = detect("nvml", environ={})
    assert result.backends == []
    assert any("Driver Not Loaded" in n for n in result.notes)
    assert any("No GPU found" in n for n in result.notes)


def test_missing_library_and_zero_devices_are_notes(monkeypatch):
    uninstall(monkeypatch, "pynvml")
    missing = detect("nvml", environ={})
    assert missing.backends == [] and any("nvidia-ml-py" in n for n in missing.notes)

    install_nvml(monkeypatch, [])
    empty = detect("nvml", environ={})
    assert empty.backends == [] and any("reports no GPU" in n for n in empty.notes)


def test_auto_keeps_absent_vendor_notes_quiet_when_another_vendor_works(monkeypatch):
    install_nvml(monkeypatch, [FakeNvidiaGpu(architecture=ARCH_AMPERE)])
    uninstall(monkeypatch, "amdsmi")
    result = detect("auto", environ={})
    assert [b.name for b in result.backends] == ["nvml"]
    assert result.notes == []
    assert detect("none", environ={}).backends == []
    with pytest.raises(ValueError, match="auto, nvml, amdsmi, none"):
        detect("cuda")


def test_importing_the_package_loads_no_vendor_library():
    code = (
        "import sys, kaio.devices, kaio.devices.detect, kaio.devices.poller, kaio.devices.inventory;"
        "print(sorted(m for m in ('pynvml', 'amdsmi', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

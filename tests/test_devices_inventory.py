"""`kaio gpus` data and rendering, with fake vendor bindings and on a host without GPU."""

import json

from fakes import install_amdsmi, install_nvml, uninstall
from fakes.fake_amdsmi import mi300x_cpx_card
from fakes.fake_pynvml import FakeNvidiaGpu
from rich.console import Console

from kaio.devices.inventory import HOST_LABEL, inventory, render_inventory


def _render(inv):
    console = Console(record=True, width=220, color_system=None)
    console.print(render_inventory(inv))
    return console.export_text()


def test_inventory_lists_backends_devices_versions_and_one_sample(monkeypatch):
    install_nvml(
        monkeypatch, [FakeNvidiaGpu(), FakeNvidiaGpu(uuid="GPU-2", not_supported={"nvmlDeviceGetTemperature"})]
    )
    install_amdsmi(monkeypatch, mi300x_cpx_card(2))
    inv = inventory(environ={"CUDA_VISIBLE_DEVICES": "1"})

    assert json.loads(json.dumps(inv)) == inv  # plain JSON
    assert inv["gpu_found"] is True
    nvml, amd = inv["backends"]
    assert nvml["versions"]["driver"] == "550.54.15" and nvml["versions"]["cuda_driver"] == "12.4"
    first, second = nvml["devices"]
    assert (first["key"], first["in_run"], second["in_run"]) == ("nvml:0", False, True)
    assert first["sample"]["power_w"] == 350.0 and "energy_j" not in first["sample"]
    assert "temp" in first["supported"] and "temp" not in second["supported"]
    assert "Not Supported" in second["errors"]["temp"]
    assert "partition 1" in amd["devices"][1]["notes"][0]
    assert inv["host"]["label"] == HOST_LABEL and inv["host"]["sample"]["ram_total_bytes"] > 0

    text = _render(inv)
    assert "NVIDIA H100 80GB HBM3" in text and "350 W (instant)" in text
    assert "amdsmi:1: CPX compute partition 1" in text
    assert HOST_LABEL in text and "No GPU found" not in text


def test_without_any_gpu_it_says_so_and_shows_the_host(monkeypatch):
    uninstall(monkeypatch, "pynvml")
    uninstall(monkeypatch, "amdsmi")
    inv = inventory()

    assert inv["gpu_found"] is False and inv["backends"] == []
    assert any("nvidia-ml-py" in n for n in inv["notes"]) and any("amd_smi" in n for n in inv["notes"])
    text = _render(inv)
    assert text.startswith("No GPU found: kaio records the host's CPU and RAM only")
    assert text.count("No GPU found") == 1
    assert HOST_LABEL in text and "GiB" in text


def test_gpu_telemetry_turned_off(monkeypatch):
    install_nvml(monkeypatch, [FakeNvidiaGpu()])
    inv = inventory(preference="none")
    assert inv["backends"] == [] and "turned off" in inv["notes"][0]

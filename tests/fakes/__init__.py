"""Fake vendor bindings (``pynvml``, ``amdsmi``) for the device tests, faked at the module level."""

from __future__ import annotations

import sys

from fakes.fake_amdsmi import FakeAmdGpu, FakeAmdSmi
from fakes.fake_pynvml import FakeNvidiaGpu, FakeNvml


def install_nvml(monkeypatch, gpus: list[FakeNvidiaGpu], **options) -> FakeNvml:
    fake = FakeNvml(gpus, **options)
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


def install_amdsmi(monkeypatch, gpus: list[FakeAmdGpu], **options) -> FakeAmdSmi:
    fake = FakeAmdSmi(gpus, **options)
    monkeypatch.setitem(sys.modules, "amdsmi", fake.module())
    return fake


def uninstall(monkeypatch, module_name: str) -> None:
    """Make ``import module_name`` raise ImportError, as on a host without the package."""
    monkeypatch.setitem(sys.modules, module_name, None)

"""Which GPUs the run sees, from CUDA/HIP/ROCR visibility variables."""

import pytest

from kaio.devices.base import DeviceInfo
from kaio.devices.visible import mark_visible

NVIDIA_UUIDS = [
    "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6",
    "GPU-8932f999-0000-1111-2222-333333333333",
    "GPU-11111111-2222-3333-4444-555555555555",
]


def _nvidia(names=None):
    names = names or ["NVIDIA H100"] * len(NVIDIA_UUIDS)
    return [DeviceInfo("nvml", i, names[i], uuid=u) for i, u in enumerate(NVIDIA_UUIDS)]


def _in_run(devices, environ):
    marked, notes = mark_visible(devices, environ)
    return [d.index for d in marked if d.in_run], notes


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, [0, 1, 2]),  # unset: every GPU
        ("", []),  # empty: none
        ("2,0", [0, 2]),
        (" 1 , 1 ", [1]),
        ("GPU-11111111-2222-3333-4444-555555555555", [2]),  # full UUID
        ("GPU-8932f937", [0]),  # unambiguous prefix, as CUDA accepts
        ("8932f999-0000", [1]),  # without the GPU- prefix
        ("0,7,1", [0]),  # an index that matches nothing ends the list, like CUDA
        ("GPU-8932f9,2", []),  # ambiguous prefix matches nothing: the list ends there
        ("-1", []),
    ],
)
def test_cuda_visible_devices(spec, expected):
    environ = {} if spec is None else {"CUDA_VISIBLE_DEVICES": spec}
    indices, _ = _in_run(_nvidia(), environ)
    assert indices == expected


def test_unmatched_entry_is_explained():
    _, notes = _in_run(_nvidia(), {"CUDA_VISIBLE_DEVICES": "0,7,1"})
    assert notes == ["CUDA_VISIBLE_DEVICES: entry '7' matches no GPU; like CUDA, the entries after it are ignored"]


def test_mig_instances_are_noted_not_guessed():
    indices, notes = _in_run(_nvidia(), {"CUDA_VISIBLE_DEVICES": "MIG-aaaaaaaa-bbbb,1"})
    assert indices == [1]
    assert "MIG instance" in notes[0]


def test_mixed_models_with_indices_warn_about_cuda_device_order():
    devices = _nvidia(["NVIDIA H100", "NVIDIA A100", "NVIDIA H100"])
    _, notes = _in_run(devices, {"CUDA_VISIBLE_DEVICES": "1"})
    assert any("CUDA_DEVICE_ORDER=PCI_BUS_ID" in n for n in notes)
    _, ordered = _in_run(devices, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert ordered == []


def _amd(count=4):
    return [
        DeviceInfo("amdsmi", i, "AMD Instinct MI300X", uuid=f"{i:08x}-0000-1000-8000-00000000000{i}")
        for i in range(count)
    ]


def test_hip_indices_are_relative_to_rocr_selection():
    assert _in_run(_amd(), {"ROCR_VISIBLE_DEVICES": "3,1", "HIP_VISIBLE_DEVICES": "0"})[0] == [3]
    assert _in_run(_amd(), {"ROCR_VISIBLE_DEVICES": "2,3"})[0] == [2, 3]
    assert _in_run(_amd(), {"HIP_VISIBLE_DEVICES": ""})[0] == []


def test_hip_honours_cuda_visible_devices_when_hip_variable_is_unset():
    assert _in_run(_amd(), {"CUDA_VISIBLE_DEVICES": "1"})[0] == [1]
    assert _in_run(_amd(), {"CUDA_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "2"})[0] == [2]
    assert _in_run(_amd(), {"ROCR_VISIBLE_DEVICES": "00000003-0000"})[0] == [3]  # by UUID prefix


def test_each_vendor_reads_its_own_variables_and_other_backends_are_untouched():
    devices = _nvidia() + _amd(2) + [DeviceInfo("synthetic", 0, "test device")]
    marked, _ = mark_visible(
        devices, {"CUDA_VISIBLE_DEVICES": "0", "ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "0"}
    )
    assert [d.key for d in marked if d.in_run] == ["nvml:0", "amdsmi:1", "synthetic:0"]


def test_the_run_and_its_report_order_the_gpus_as_the_ranks_see_them():
    """A tester's fake GPUs: with CUDA_VISIBLE_DEVICES=3,1 the dashboard put rank 0 on nvml:1 (rank 0 trains on GPU 3,
    cuda:0); with 16 GPUs nvml:10 came third and was called rank 2; a run of one process called 16 GPUs ranks 0-15."""
    import msgspec

    from conftest import replay
    from kaio.devices.base import DeviceInfo

    def ranks_shown(gpus: int, environ: dict, world_size: int) -> dict[str, int | None]:
        marked, _ = mark_visible([DeviceInfo("nvml", i, "NVIDIA H100") for i in range(gpus)], environ)
        devices = {"type": "devices", "devices": [msgspec.to_builtins(d) for d in marked]}
        state = replay(
            [
                {"type": "session_start", "session": 1, "t_wall": 1e9, "t_mono": 0.0, "kind": "run"},
                devices,
                {"type": "run_start", "rank": 0, "session": 1, "world_size": world_size, "max_steps": 10},
            ]
        )
        return {row.key: row.rank for row in state.snapshot().gpus}

    reordered = ranks_shown(8, {"CUDA_VISIBLE_DEVICES": "3,1"}, world_size=2)
    assert reordered["nvml:3"] == 0 and reordered["nvml:1"] == 1 and reordered["nvml:0"] is None
    sixteen = ranks_shown(16, {}, world_size=16)
    assert list(sixteen) == [f"nvml:{i}" for i in range(16)] and list(sixteen.values()) == list(range(16))
    one_process = ranks_shown(16, {}, world_size=1)
    assert one_process["nvml:0"] == 0 and all(rank is None for key, rank in one_process.items() if key != "nvml:0")

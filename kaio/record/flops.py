"""Model FLOPs utilisation (MFU): the one definition kaio uses, and the GPUs' peak FLOPs.

FLOPs per token, the PaLM convention (Chowdhery et al. 2022, appendix B) as
torchtitan computes it: ``6 N + 12 L H Q T``, where N counts the weights that
do matrix multiplications (every parameter but the input embedding, unless the output layer is tied to it), L the
layers, H x Q the attention width (heads x head size) and T the sequence
length. LoRA-aware: a frozen weight still costs its forward (2 N) and the
gradient with respect to its input (2 N) but no weight gradient, so
``6 N_trainable + 4 N_frozen``. MFU = achieved FLOPs / (devices x peak).
"""

from __future__ import annotations

from dataclasses import dataclass

from kaio.record.types import ModelInfo

# Dense (no sparsity) peak TFLOPS per device for 16-bit matmuls (bf16/fp16), from the vendors' datasheets:
# NVIDIA H100 SXM / H200 (H100 and H200 datasheets: 989.5 BF16 dense; PCIe 756; NVL 835), B200 (DGX B200
# datasheet: 72 PFLOPS FP8 sparse for 8 GPUs: 2.25 PFLOPS BF16 dense each), A100 (A100 datasheet: 312), L40S
# (L40S datasheet: 362); AMD MI300X and MI325X (AMD Instinct datasheets: 1307.4 FP16/BF16 dense), MI250X
# (383 for the package's two GCDs; each GCD is one device: 191.5).
# The first matching substring of the device's name wins: more specific names first.
PEAK_TFLOPS_16BIT: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.5),
    ("H200", 989.5),
    ("GH200", 989.5),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("MI300X", 1307.4),
    ("MI325X", 1307.4),
    ("MI250X", 191.5),
)


def peak_tflops(device_names: list[str], half_precision: bool) -> float | None:
    """The slowest device's peak for a half-precision run; None when a device is not in the table or the run
    is not in 16 bits (fp32 peaks depend on TF32 settings: set ``reporting.peak_tflops``)."""
    if not device_names or not half_precision:
        return None
    peaks = []
    for name in device_names:
        peak = next((tflops for key, tflops in PEAK_TFLOPS_16BIT if key.lower() in name.lower()), None)
        if peak is None:
            return None
        peaks.append(peak)
    return min(peaks)


def flops_per_token(model: ModelInfo, seq_len: float) -> float | None:
    """Training FLOPs per token (forward and backward) of ``model`` at sequence length ``seq_len``."""
    if model.trainable_matmul_params is None or model.frozen_matmul_params is None:
        return None
    attention = 0.0
    if model.num_layers and model.attention_dim:
        attention = 12.0 * model.num_layers * model.attention_dim * seq_len
    return 6.0 * model.trainable_matmul_params + 4.0 * model.frozen_matmul_params + attention


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak_tflops_per_device: float) -> float:
    """The share of the peak the training achieved, 0..1."""
    return tokens_per_s_per_device * flops_per_token / (peak_tflops_per_device * 1e12)


@dataclass(frozen=True)
class Throughput:
    """What a step's tokens/s per device and MFU are computed from: the run as its rank 0 described it."""

    world_size: int
    samples_per_step: int | None  # examples in one optimizer step, all ranks
    model: ModelInfo | None
    peak_tflops: float | None  # one device's

    def of_step(self, tokens: int, seconds: float) -> tuple[float | None, float | None]:
        """(tokens/s per device, MFU) of a step that took ``seconds`` for ``tokens`` (all ranks)."""
        if tokens <= 0 or seconds <= 0:
            return None, None
        per_device = tokens / seconds / self.world_size
        if self.peak_tflops is None or self.model is None or not self.samples_per_step:
            return per_device, None
        per_token = flops_per_token(self.model, tokens / self.samples_per_step)
        return per_device, (mfu(per_device, per_token, self.peak_tflops) if per_token is not None else None)

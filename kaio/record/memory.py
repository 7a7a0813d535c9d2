"""The VRAM estimate of a fine-tune: the one definition `kaio plan` prints and the report puts beside the measured peak.

What one GPU holds at the peak of a training step (the backward, once the
optimizer's states exist), each term in bytes:

- **weights**: every parameter as stored (frozen and trained, at its own dtype);
- **gradients**: one per trained parameter, at the trained parameters' dtype;
- **optimizer**: its states per trained parameter (AdamW: two moments at the
  parameters' dtype; 8-bit Adam: 2 bytes; SGD without momentum: none);
- **activations**: what autograd saves for the backward, per token of a
  micro-batch and per decoder layer of a Llama-style block with SDPA/flash
  attention (no seq x seq term). With ``H`` the hidden size, ``Q`` the query
  width (heads x head size), ``K`` the key/value width, ``I`` the MLP width and
  ``a`` the activation width (2 bytes under bf16/fp16, 4 in fp32):
  the fp32 inputs of the two RMS norms and their scales ``2 (4 H + 4)``; the
  rotated query and key, the value and the attention output ``a (2 Q + 2 K)``
  and the attention's log-sum-exp (4 bytes per head); the MLP's gate, up and
  activation ``3 a I``. The inputs the trained matmuls need on top: with LoRA
  adapters in fp32 over a 16-bit base (PEFT's default), each adapted module
  keeps its own fp32 copy of its input (4 bytes per input feature) and its
  rank-r down-projection; at one width, the inputs are the tensors already
  there (the normed input of attention and of the MLP, the MLP's product);
  a full fine-tune also keeps the norms' normalised inputs (``2 a H``).
  LoRA dropout above 0 adds a dropped copy and its mask per adapted module
  (adapter width + 1 bytes per input feature). With gradient checkpointing
  each layer keeps only its input (``a H``) and one layer is recomputed at a
  time. Checked against what autograd saves (``saved_tensors_hooks``) on Llama
  blocks in bf16 and fp32: the per-layer count matches exactly without
  dropout, within 10% with it (tests/test_plan.py);
- **logits**: per token, the logits at the activation width, the fp32
  log-softmax the loss saves and its fp32 gradient in the backward:
  ``V (a + 8)`` bytes, ``V`` the vocabulary; none for a head that does not
  predict tokens (a classifier's few logits an example).

The measured peak it is compared to is the caching allocator's peak of
allocated bytes (kaio's per-step true peak); the CUDA context and the
allocator's reserve come on top, which the verdict allows for. Sharded
training (FSDP, DeepSpeed ZeRO) divides weights and states among GPUs: not
modelled (each GPU is counted as holding the whole model, as under DDP).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kaio.telemetry.protocol import ModelInfo, PeftInfo
from kaio.units import GIB

# The modules of a Llama-style decoder layer (Llama, Mistral, Qwen2, Gemma...) by what they read.
ATTENTION_INPUT_MODULES = ("q_proj", "k_proj", "v_proj")
MLP_INPUT_MODULES = ("gate_proj", "up_proj")
LAYER_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    """The sizes of a decoder-only transformer that its activations depend on."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    query_width: int  # heads x head size
    kv_width: int  # key/value heads x head size
    vocab_size: int

    def input_features(self, module: str) -> int:
        """Input width of a decoder layer's linear module by its name (the hidden size when unknown)."""
        return {"o_proj": self.query_width, "down_proj": self.intermediate_size}.get(module, self.hidden_size)


@dataclass(frozen=True)
class Adapters:
    """LoRA adapters in each decoder layer; ``None`` in a :class:`Workload` is a full fine-tune."""

    modules: tuple[str, ...]  # the adapted linear modules of one layer, by leaf name (q_proj, ...)
    rank: int
    dropout: bool
    bytes_per_value: int = 4  # PEFT keeps adapters in fp32 under a 16-bit base


@dataclass(frozen=True)
class Workload:
    """What one GPU trains: the model as stored, what is trained, and one micro-batch."""

    architecture: Architecture
    weight_bytes: int  # every parameter, frozen and trained, at its own dtype
    trainable_params: int
    trainable_bytes_per_param: int
    optimizer_bytes_per_param: float
    activation_bytes: int  # 2 under bf16/fp16, 4 in fp32
    tokens: int  # in one micro-batch: its examples x their (padded) length
    gradient_checkpointing: bool
    adapters: Adapters | None


# Heads that score every token of the vocabulary (a language model's); a classifier's logits are a few numbers.
TOKEN_PREDICTING_HEADS = (
    "ForCausalLM",
    "LMHeadModel",
    "WithLMHead",
    "ForConditionalGeneration",
    "ForMaskedLM",
    "MTModel",
)


def predicts_tokens(model: ModelInfo) -> bool:
    """The model's head gives logits over the vocabulary at every token (an unknown head is taken to). The class
    loaded says which head ran; a checkpoint's ``architectures`` names the head it was saved with (a classifier
    fine-tuned from bert-base says BertForMaskedLM); a PeftModel without a task names none."""
    name = next((n for n in (model.model_class, model.architecture) if n and n != "PeftModel"), None)
    return name is None or name.endswith(TOKEN_PREDICTING_HEADS)


def unsized(model: ModelInfo) -> list[str]:
    """What the estimate needs that ``model``'s description lacks (its config names it otherwise: GPT-2's n_inner,
    T5's d_ff; or a module of the script's own, with no config)."""
    sizes = {
        "num_hidden_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "num_attention_heads": model.num_heads,
        "vocab_size": model.vocab_size,
    }
    widths = {"the attention's width": model.attention_dim, "the key/value width": model.kv_dim}
    counts = {"the weights' bytes": model.weight_bytes, "the trained parameters": model.trainable_params}
    return [name for name, v in sizes.items() if not v] + [
        name for name, v in {**widths, **counts}.items() if v is None
    ]


def workload_of(
    model: ModelInfo,
    peft: PeftInfo | None,
    *,
    tokens: int,
    gradient_checkpointing: bool,
    optim: str | None,
    half_precision: bool,
) -> Workload | None:
    """The workload of a model as the child (or `kaio plan`, on the meta device) described it; None when a
    size it needs is missing (a model that is not a decoder-only transformer kaio can size)."""
    if unsized(model):
        return None
    architecture = Architecture(
        num_layers=model.num_layers or 0,
        hidden_size=model.hidden_size or 0,
        intermediate_size=model.intermediate_size or 0,
        num_heads=model.num_heads or 0,
        query_width=model.attention_dim or 0,
        kv_width=model.kv_dim or 0,
        vocab_size=(model.vocab_size or 0) if predicts_tokens(model) else 0,
    )
    trained_width = model.trainable_bytes_per_param or 4
    adapters = None
    if peft is not None and peft.adapted_modules:
        adapters = Adapters(
            modules=tuple(peft.adapted_modules),
            rank=peft.r or 0,
            dropout=bool(peft.dropout),
            bytes_per_value=trained_width,
        )
    weight_width = 2 if model.dtype in ("bfloat16", "float16") else 4
    return Workload(
        architecture=architecture,
        weight_bytes=model.weight_bytes or 0,
        trainable_params=model.trainable_params or 0,
        trainable_bytes_per_param=trained_width,
        optimizer_bytes_per_param=optimizer_bytes_per_param(optim, trained_width),
        activation_bytes=2 if half_precision or weight_width == 2 else 4,
        tokens=tokens,
        gradient_checkpointing=gradient_checkpointing,
        adapters=adapters,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def terms(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("logits", self.logits),
        ]


def optimizer_bytes_per_param(optim: str | None, param_bytes: int) -> float:
    """Bytes of optimizer state per trained parameter for a ``transformers`` optimizer name: its moments (Adam
    and its kin 2; Lion and Adafactor 1, Adafactor's factored: an upper bound; plain SGD none) at their width
    (8-bit: 1 byte, 4-bit: half a byte, else the parameters' dtype)."""
    name = (optim or "adamw_torch").lower()
    if name.startswith("sgd"):  # a momentum buffer ("sgd_momentum") or none (the Trainer's SGD, by default)
        return float(param_bytes) if "momentum" in name else 0.0
    moments = 1 if ("adafactor" in name or "lion" in name) else 2
    width = 1.0 if "8bit" in name else 0.5 if "4bit" in name else float(param_bytes)
    return moments * width


def layer_activation_bytes_per_token(arch: Architecture, activation_bytes: int, adapters: Adapters | None) -> float:
    """What autograd saves per token in one decoder layer (see the module's docstring)."""
    a, h = activation_bytes, arch.hidden_size
    saved = 2 * (4 * h + 4)  # the two RMS norms' fp32 inputs and scales
    saved += a * (2 * arch.query_width + 2 * arch.kv_width) + 4 * arch.num_heads  # attention (flash/SDPA)
    saved += 3 * a * arch.intermediate_size  # gate, up, activation
    modules = adapters.modules if adapters is not None else LAYER_LINEAR_MODULES
    if adapters is not None and adapters.bytes_per_value != a:
        saved += adapters.bytes_per_value * sum(arch.input_features(m) for m in modules)  # one cast copy each
    else:  # the inputs already there: the normed input of attention and of the MLP, the MLP's product
        saved += a * h * any(m in ATTENTION_INPUT_MODULES for m in modules)
        saved += a * h * any(m in MLP_INPUT_MODULES for m in modules)
        saved += a * arch.intermediate_size * ("down_proj" in modules)
        saved += a * h * sum(m not in LAYER_LINEAR_MODULES for m in modules)  # unknown names: one input each
    if adapters is None:
        saved += 2 * a * h  # the norms' weights train too: their normalised inputs
    if adapters is not None:
        saved += adapters.bytes_per_value * adapters.rank * len(modules)
        if adapters.dropout:
            saved += (adapters.bytes_per_value + 1) * sum(arch.input_features(m) for m in modules)
    return saved


def estimate(work: Workload) -> MemoryEstimate:
    arch, a = work.architecture, work.activation_bytes
    tokens = work.tokens
    per_layer = layer_activation_bytes_per_token(arch, a, work.adapters)
    if work.gradient_checkpointing:  # each layer's input stays; one layer is whole while it is recomputed
        per_token = arch.num_layers * a * arch.hidden_size + per_layer
    else:
        per_token = arch.num_layers * per_layer
    return MemoryEstimate(
        weights=work.weight_bytes,
        gradients=work.trainable_params * work.trainable_bytes_per_param,
        optimizer=round(work.trainable_params * work.optimizer_bytes_per_param),
        activations=round(tokens * per_token),
        logits=tokens * arch.vocab_size * (a + 8),
    )


class Verdict(str, Enum):
    FITS = "fits"
    TIGHT = "tight"
    WILL_NOT_FIT = "will not fit"


# What the estimate leaves out and a GPU still needs: the CUDA/ROCm context and the caching allocator's slack.
CONTEXT_BYTES = 1 * GIB
ALLOCATOR_SLACK = 0.10


def needed_bytes(estimated: int) -> int:
    """The estimate plus what the process needs beyond allocated tensors."""
    return round(estimated * (1 + ALLOCATOR_SLACK)) + CONTEXT_BYTES


def verdict(estimated: int, available_bytes: int) -> Verdict:
    """Fits below 85% of what the GPU has free, tight up to 100%, else will not fit."""
    need = needed_bytes(estimated)
    if need <= 0.85 * available_bytes:
        return Verdict.FITS
    if need <= available_bytes:
        return Verdict.TIGHT
    return Verdict.WILL_NOT_FIT

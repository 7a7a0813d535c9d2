"""`kaio plan` and the VRAM estimate: its activation terms against what autograd really saves, the 8B example's
exact parameter counts and verdicts on (fake-NVML) 80 GiB GPUs, and the one-line answers when it cannot size."""

from __future__ import annotations

import dataclasses
import os

import pytest

from conftest import REPO, kaio, write_config
from kaio.record.memory import Adapters, Architecture, layer_activation_bytes_per_token

LAYER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZES = dict(hidden=256, intermediate=688, heads=8, kv_heads=2, vocab=1000)


def _saved_bytes_per_token(dtype, layers: int, targets, dropout: float, tokens=(2, 128)) -> float:
    """What autograd saves for the backward of a Llama forward (LoRA on ``targets``; None: every weight trains),
    parameters left out, each storage once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=SIZES["vocab"],
        hidden_size=SIZES["hidden"],
        intermediate_size=SIZES["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=SIZES["heads"],
        num_key_value_heads=SIZES["kv_heads"],
        max_position_embeddings=tokens[1],
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(dtype)
    if targets is not None:
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=list(targets))
        )
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, SIZES["vocab"], tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(saved.values()) / (tokens[0] * tokens[1])


@pytest.mark.xdist_group(
    "transformers"
)  # in-process transformers and peft: loaded by one worker (tests/test_callback.py)
@pytest.mark.parametrize(
    ("dtype_name", "targets", "dropout", "tolerance"),
    [
        ("bfloat16", LAYER_MODULES, 0.0, 0.0),  # a 16-bit base: each adapter keeps an fp32 copy of its input
        ("float32", LAYER_MODULES, 0.0, 0.0),  # one width: the adapters read the tensors already saved
        ("bfloat16", ("q_proj", "v_proj"), 0.0, 0.0),
        ("bfloat16", LAYER_MODULES, 0.1, 0.10),  # dropout: a dropped copy and a mask per adapted module
        ("float32", ("q_proj", "v_proj"), 0.1, 0.10),
        ("bfloat16", None, 0.0, 0.0),  # a full fine-tune
    ],
)
def test_the_activation_terms_are_what_autograd_saves_per_layer(dtype_name, targets, dropout, tolerance):
    import torch

    dtype = getattr(torch, dtype_name)
    # One layer's share: the difference between 4 and 2 layers (the embedding and the loss cancel out).
    measured = (
        _saved_bytes_per_token(dtype, 4, targets, dropout) - _saved_bytes_per_token(dtype, 2, targets, dropout)
    ) / 2
    head_dim = SIZES["hidden"] // SIZES["heads"]
    architecture = Architecture(
        num_layers=4,
        hidden_size=SIZES["hidden"],
        intermediate_size=SIZES["intermediate"],
        num_heads=SIZES["heads"],
        query_width=SIZES["hidden"],
        kv_width=SIZES["kv_heads"] * head_dim,
        vocab_size=SIZES["vocab"],
    )
    adapters = Adapters(modules=targets, rank=8, dropout=dropout > 0) if targets else None
    estimated = layer_activation_bytes_per_token(architecture, dtype.itemsize, adapters)
    assert estimated == pytest.approx(measured, rel=tolerance, abs=0.5)


def _render(plan) -> str:
    from rich.console import Console

    from kaio.plan import render_plan

    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the console
    console.print(render_plan(plan), soft_wrap=True)
    return console.export_text()


def test_the_8b_example_is_sized_exactly_offline_and_fits_with_gradient_checkpointing(monkeypatch):
    """Llama 3.1 8B from kaio's table (no download, no token), on four fake 80 GiB GPUs with 20 GiB in use."""
    from fakes import install_nvml
    from fakes.fake_pynvml import FakeNvidiaGpu

    from kaio.config import load_config
    from kaio.plan import make_plan, plan_json

    install_nvml(
        monkeypatch,
        [FakeNvidiaGpu(uuid=f"GPU-0000000{i}-d72c-4106-c12f-20bd9faed9f6", memory_used=20 * 2**30) for i in range(4)],
    )
    from huggingface_hub import constants

    # Read once, when huggingface_hub is imported: the constant, not the variable (set, it would outlive this
    # test in a process that imports huggingface_hub now).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    example = REPO / "configs" / "examples" / "llama3-8b-lora-bf16.yaml"
    made = make_plan(load_config(example), environ={"PATH": os.environ["PATH"]})
    plan = plan_json(made)
    model = plan["model"]
    # Sized offline, and said plainly that a run here could not load it.
    assert plan["model_unavailable"].startswith(
        "model.base_model: meta-llama/Llama-3.1-8B-Instruct: not in the Hugging Face cache"
    )
    assert "`kaio run` would refuse to start here: model.base_model: meta-llama/Llama-3.1-8B-Instruct:" in _render(made)
    assert model["source"] == "kaio's table of known architectures" and model["dtype"] == "bfloat16"
    # Llama 3.1 8B: 8,030,261,248 parameters; LoRA r=16 on the 7 projections of 32 layers: 41,943,040.
    assert model["trainable_params"] == 41_943_040
    assert model["total_params"] - model["trainable_params"] == 8_030_261_248
    with_gc = model["estimates"]["with_gradient_checkpointing"]
    without_gc = model["estimates"]["without_gradient_checkpointing"]
    assert with_gc["weights_bytes"] == 2 * 8_030_261_248 + 4 * 41_943_040  # bf16 base, fp32 adapters
    assert with_gc["gradients_bytes"] == 4 * 41_943_040 and with_gc["optimizer_states_bytes"] == 8 * 41_943_040
    # 4 x 2048 tokens, vocabulary 128,256: bf16 logits + fp32 log-softmax + its fp32 gradient.
    assert with_gc["logits_bytes"] == 4 * 2048 * 128_256 * (2 + 8)
    assert 25 * 2**30 < with_gc["total_bytes"] < 40 * 2**30  # what LoRA on an 8B model with checkpointing takes
    assert without_gc["total_bytes"] > 80 * 2**30  # and without: more than an 80 GB GPU
    assert [g["free_bytes"] for g in plan["gpus"]] == [60 * 2**30] * 4  # the 4 GPUs its 4 ranks take
    assert plan["verdicts"] == {f"nvml:{i}": "fits" for i in range(4)}
    assert "--num_processes 4" in " ".join(plan["argv"]) and plan["env"]["KAIO_TELEMETRY_PIPE"] == "<fifo>"
    assert "verdict: nvml:0 fits; nvml:1 fits; nvml:2 fits; nvml:3 fits" in _render(made)

    # The same without gradient checkpointing: it will not fit, and the plan says what would.
    unchecked = dataclasses.replace(made, model=dataclasses.replace(made.model, gradient_checkpointing=False))
    text = _render(unchecked)
    assert "verdict: nvml:0 will not fit; nvml:1 will not fit" in text
    assert "(with training.gradient_checkpointing: true: 35.2 GiB needed)" in text


def test_a_classifiers_estimate_has_no_vocabulary_sized_logits():
    """A 2-label BERT classifier (vocabulary 30,522) was estimated at 1.4 GiB of logits: its logits are 2 numbers
    an example."""
    from kaio.record.memory import estimate, workload_of
    from kaio.telemetry.protocol import ModelInfo

    shape = {"num_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "vocab_size": 30522}
    sizes = {"attention_dim": 32, "kv_dim": 32, "weight_bytes": 4_000_000, "trainable_params": 1_000_000}

    def logits(architecture: str) -> int:
        model = ModelInfo(architecture=architecture, **shape, **sizes)
        work = workload_of(model, None, tokens=4096, gradient_checkpointing=False, optim=None, half_precision=False)
        assert work is not None
        return estimate(work).logits

    assert logits("BertForSequenceClassification") == logits("BertForTokenClassification") == 0
    assert logits("LlamaForCausalLM") == logits("BertForMaskedLM") == logits("MarianMTModel") == 4096 * 30522 * 12
    # Fine-tuned from bert-base: its config still names the head it was saved with; the class loaded is the one.
    model = ModelInfo(architecture="BertForMaskedLM", model_class="BertForSequenceClassification", **shape, **sizes)
    work = workload_of(model, None, tokens=4096, gradient_checkpointing=False, optim=None, half_precision=False)
    assert work is not None and estimate(work).logits == 0


def test_a_script_is_not_sized(project_dir):
    """Through the command line: what a user sees."""
    script = project_dir / "train.py"
    script.write_text("print('hello')\n")
    (project_dir / "s.yaml").write_text("project_name: s\nlaunch:\n  script: train.py\n")
    result = kaio("plan", "s.yaml", cwd=project_dir, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "VRAM estimate: none; your script (launch.script) builds its own model" in result.stdout
    assert f"--kaio-script {script}" in result.stdout


def test_a_model_kaio_cannot_find_offline_is_named_with_what_to_do(project_dir, monkeypatch):
    from huggingface_hub import constants

    from kaio.config import load_config
    from kaio.errors import ConfigError
    from kaio.plan import make_plan

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once, when huggingface_hub is imported
    (project_dir / "u.yaml").write_text("project_name: u\nmodel:\n  base_model: nobody-here/no-such-model\n")
    with pytest.raises(ConfigError) as raised:
        make_plan(load_config(project_dir / "u.yaml"))
    said = str(raised.value)
    assert said.startswith("model.base_model: nobody-here/no-such-model: its config.json is not in the Hugging Face")
    assert "(HF_HUB_OFFLINE is set)" in said
    assert "hf download nobody-here/no-such-model config.json" in said and "\n" not in said
    # On the command line, the config file is named first, as `kaio run` names it.
    from typer.testing import CliRunner

    from kaio.cli import app

    for extra in ([], ["--json"]):
        result = CliRunner().invoke(app, ["plan", "u.yaml", *extra])
        assert result.exit_code == 2
        assert result.output.startswith("kaio: error: u.yaml: model.base_model: nobody-here/no-such-model: its")


def test_plan_help_says_what_it_prints():
    result = kaio("plan", "--help", cwd=REPO, env={"COLUMNS": "120"})
    assert result.returncode == 0 and "fits, tight or will not fit" in result.stdout


@pytest.mark.xdist_group("transformers")
def test_a_host_without_gpu_is_judged_by_its_ram_shared_by_the_ranks():
    import psutil

    from kaio.config import load_config, with_max_steps
    from kaio.plan import make_plan, plan_json

    cfg = with_max_steps(load_config(REPO / "configs" / "finetuning_config.yaml"), 10)
    cfg = cfg.model_copy(update={"reporting": cfg.reporting.model_copy(update={"gpu_backend": "none"})})  # any host
    made = make_plan(cfg, environ={"PATH": os.environ["PATH"]})
    plan = plan_json(made)
    assert plan["gpus"] == [] and 0 < plan["host_available_bytes"] <= psutil.virtual_memory().total
    assert plan["verdicts"] == {"host RAM": "fits"}  # about 1 GiB for the tiny model
    assert "verdict: host RAM fits (1.01 GiB needed of " in _render(made)  # as the table says it: 3 digits
    assert "Memory estimate per process (its tensors in the host's RAM)" in _render(made)
    # Every module the adapters are on, the head and the embedding included (their parameters are counted).
    targets = "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    assert f"trained (LoRA r=16 on {targets})" in _render(made)
    two = dataclasses.replace(
        made, config=cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"num_processes": 2})})
    )
    small = dataclasses.replace(two, host_available_bytes=int(2.2 * 2**30))  # 1.1 GiB each: 1.0 is over 85%
    assert plan_json(small)["verdicts"] == {"host RAM": "tight"}
    # Both figures for the two processes together, each as the table gives it (three digits).
    assert (
        "verdict: host RAM tight (2.03 GiB needed (2 processes) of 2.2 GiB available) "
        "(with training.gradient_checkpointing: true: 2.02 GiB needed (2 processes))"
    ) in _render(small)


@pytest.mark.xdist_group("transformers")
def test_a_hub_push_that_would_fail_is_said_by_the_plan(project_dir, monkeypatch):
    """As `kaio run` and --dry-run say it: before the training's hours rather than after them."""
    import json

    monkeypatch.delenv("HF_TOKEN", raising=False)  # HF_HOME is a fresh folder: no stored token either
    write_config(project_dir, extra="hub:\n  push: true\n  repo_id: someone/tiny\n")
    said = (
        "hub.push: no Hugging Face token (set HF_TOKEN, or `hf auth login`): the push at the end of the run would fail"
    )
    from typer.testing import CliRunner

    from kaio.cli import app

    monkeypatch.setenv("COLUMNS", "250")
    result = CliRunner().invoke(app, ["plan", "cfg.yaml"])
    assert result.exit_code == 0, result.output
    assert said in result.output
    from kaio.config import load_config
    from kaio.plan import make_plan, plan_json

    cfg = load_config(project_dir / "cfg.yaml")
    without = json.loads(json.dumps(plan_json(make_plan(cfg, environ={"PATH": os.environ["PATH"]}))))
    assert without["push_fails"] == "no Hugging Face token (set HF_TOKEN, or `hf auth login`)"
    with_token = plan_json(make_plan(cfg, environ={"PATH": os.environ["PATH"], "HF_TOKEN": "hf_" + "x" * 30}))
    assert with_token["push_fails"] is None

"""What the built-in recipe would fail on is one line before launch: no project, no traceback, no waiting."""

from __future__ import annotations

import pytest

from conftest import kaio
from kaio.config import RunConfig
from kaio.errors import ConfigError
from kaio.preflight import _TINY_ADAPTABLE, _TINY_OTHERS, check_recipe_inputs, transformers_choices


def _refusal(tmp_path, monkeypatch, **sections) -> str:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        check_recipe_inputs(RunConfig(project_name="p", **sections), "c.yaml", environ={})
    assert "\n" not in str(info.value)
    return str(info.value)


def test_transformers_names_misspelt_are_refused_with_the_likely_one(tmp_path, monkeypatch):
    said = _refusal(tmp_path, monkeypatch, training={"optimizer": "adamw"})
    assert said.startswith(
        "c.yaml: training.optimizer: 'adamw' is not a transformers name (did you mean 'adamw_torch'?"
    )
    said = _refusal(tmp_path, monkeypatch, training={"lr_scheduler_type": "cosin"})
    assert "training.lr_scheduler_type: 'cosin' is not a transformers name (did you mean 'cosine'?" in said
    check_recipe_inputs(RunConfig(project_name="p", training={"optimizer": "adafactor"}), "c.yaml", environ={})


@pytest.mark.xdist_group("transformers")
def test_the_names_read_from_transformers_source_are_its_enums():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert transformers_choices("training_args.py", "OptimizerNames") == tuple(o.value for o in OptimizerNames)
    assert transformers_choices("trainer_utils.py", "SchedulerType") == tuple(s.value for s in SchedulerType)


@pytest.mark.xdist_group("transformers")
def test_the_tiny_models_known_modules_are_the_built_ones():
    import torch
    from transformers import ByT5Tokenizer, LlamaForCausalLM

    from kaio.recipes.lora import tiny_model_config

    cfg = RunConfig(project_name="p", model={"num_layers": 2})
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_model_config(cfg, ByT5Tokenizer()))
    adaptable = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)}
    others = {n for n, _ in model.named_modules() if n} - adaptable
    layers = range(cfg.model.num_layers)
    assert adaptable == {name.format(i=i) for name in _TINY_ADAPTABLE for i in layers}
    assert others == {name.format(i=i) for name in _TINY_OTHERS for i in layers}


def test_adapter_targets_the_tiny_model_lacks_are_refused(tmp_path, monkeypatch):
    said = _refusal(tmp_path, monkeypatch, lora={"target_modules": ["q_proj", "v_prj"]})
    assert "lora.target_modules: 'v_prj' matches no module of the tiny model (did you mean 'v_proj'?" in said
    said = _refusal(tmp_path, monkeypatch, lora={"target_modules": ["input_layernorm"]})
    assert "'input_layernorm' is not a Linear or Embedding layer of the tiny model" in said
    for fine in (["all-linear"], ["self_attn.q_proj", "mlp.down_proj"], ["lm_head", "embed_tokens"]):
        check_recipe_inputs(RunConfig(project_name="p", lora={"target_modules": fine}), "c.yaml", environ={})


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "data.path: d.jsonl: no example with text in it"),
        ('{"text": "  "}\n\n', "data.path: d.jsonl: no example with text in it"),
        ('{"text": "fine"}\n{"txt": "a"}\n', "data.path: d.jsonl:2: expected a string field 'text'"),
        ('{"text": "a"\n', "data.path: d.jsonl:1: not valid JSON"),
        ('{"messages": ["hi"]}\n', "data.path: d.jsonl:1: expected a 'messages' list of"),
    ],
)
def test_a_data_file_without_training_text_is_refused(tmp_path, monkeypatch, content, expected):
    (tmp_path / "d.jsonl").write_text(content)
    assert expected in _refusal(tmp_path, monkeypatch, data={"path": "d.jsonl"})


def test_a_model_neither_on_disk_nor_reachable_is_refused_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    said = _refusal(tmp_path, monkeypatch, model={"base_model": "./models/mine"})
    assert "model.base_model: './models/mine': no such folder" in said
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once, when huggingface_hub is imported
    said = _refusal(tmp_path, monkeypatch, model={"base_model": "meta-llama/Llama-3.2-1B"})
    assert "not in the Hugging Face cache, and the Hub cannot be asked (HF_HUB_OFFLINE is set)" in said
    cached = tmp_path / "hf" / "hub" / "models--meta-llama--Llama-3.2-1B"
    (cached / "snapshots" / "abc").mkdir(parents=True)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("abc")
    (cached / "snapshots" / "abc" / "config.json").write_text("{}")  # what `kaio plan` downloads: not the model
    said = _refusal(tmp_path, monkeypatch, model={"base_model": "meta-llama/Llama-3.2-1B"})
    assert "not in the Hugging Face cache" in said
    (cached / "snapshots" / "abc" / "model.safetensors.index.json").write_text("{}")
    check_recipe_inputs(RunConfig(project_name="p", model={"base_model": "meta-llama/Llama-3.2-1B"}), "c", environ={})


def test_cli_refuses_before_creating_anything(project_dir):
    (project_dir / "c.yaml").write_text("project_name: p\ntraining: {optimizer: adamw_torch_fusd}\n")
    for command in (["run", "c.yaml"], ["run", "c.yaml", "--dry-run"], ["plan", "c.yaml"]):
        result = kaio(*command, cwd=project_dir, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(
            "kaio: error: c.yaml: training.optimizer: 'adamw_torch_fusd' is not a transformers name "
            "(did you mean 'adamw_torch_fused'?"
        )
        assert "Traceback" not in result.stderr + result.stdout
    assert not (project_dir / "docs").exists() and not (project_dir / "checkpoints").exists()
    # A model not at hand: the real run refuses; a dry run (often prepared on a login node) says so and prints.
    (project_dir / "c.yaml").write_text("project_name: p\nmodel: {base_model: meta-llama/Llama-3.2-1B}\n")
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(project_dir / "hf")}
    refused = kaio("run", "c.yaml", cwd=project_dir, env=offline, timeout=60)
    assert refused.returncode == 2 and "not in the Hugging Face cache" in refused.stderr
    dry = kaio("run", "c.yaml", "--dry-run", cwd=project_dir, env=offline, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "note: `kaio run` would refuse it: c.yaml: model.base_model: meta-llama/Llama-3.2-1B: not in" in dry.stdout
    assert "command: " in dry.stdout


@pytest.mark.xdist_group("transformers")
def test_saving_the_tiny_models_adapter_does_not_look_its_name_up_on_the_hub(tmp_path, monkeypatch):
    """PEFT asks the Hub for the base model's config.json at every save (is the vocabulary resized?): for the
    tiny model, built here, that is a request to a stranger's repo, and two warnings per save offline."""
    import warnings

    import torch
    from huggingface_hub import constants
    from transformers import ByT5Tokenizer, LlamaForCausalLM

    from kaio.recipes.lora import tiny_model_config, with_adapters

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # PEFT's lookup then warns instead of asking
    cfg = RunConfig(project_name="p", model={"num_layers": 1}, lora={"target_modules": ["q_proj", "v_proj"]})
    model = with_adapters(cfg, LlamaForCausalLM(tiny_model_config(cfg, ByT5Tokenizer())).to(torch.float32))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for save in ("checkpoint-1", "checkpoint-2"):
            model.save_pretrained(tmp_path / save)
    assert not [str(w.message) for w in seen if "tiny-llama" in str(w.message)]
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_a_push_that_cannot_work_is_said_before_the_training_not_after(tmp_path, monkeypatch):
    """hub.push with no token, or with HF_HUB_OFFLINE set, failed only at the push, after the training's hours."""
    from kaio.preflight import push_will_fail

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no token saved by `hf auth login`
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    pushing = RunConfig(project_name="p", hub={"push": True, "repo_id": "me/x"})
    assert push_will_fail(pushing, {}) == "no Hugging Face token (set HF_TOKEN, or `hf auth login`)"
    assert push_will_fail(pushing, {"HF_TOKEN": "hf_x"}) is None
    assert push_will_fail(pushing, {"HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"}) == "HF_HUB_OFFLINE is set"
    assert push_will_fail(RunConfig(project_name="p"), {}) is None  # no push asked

"""Bad config gets one clear line naming the file and the key, exit code 2, nothing started or created."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, kaio, write_config
from kaio.config import RunConfig, config_snapshot, load_config
from kaio.errors import ConfigError


def test_default_and_example_configs_validate(project_dir):
    default = load_config(REPO / "configs" / "finetuning_config.yaml")
    assert default.project_name == "tiny-default"
    assert default.model.base_model == "kaio/tiny-llama"
    examples = sorted((REPO / "configs" / "examples").glob("*.yaml"))
    assert examples, "configs/examples/ must hold at least one realistic GPU config"
    for path in examples:
        cfg = load_config(path)
        assert cfg.training.precision == "bf16"
        assert cfg.model.base_model != "kaio/tiny-llama"


def test_defaults_fill_the_documented_paths():
    cfg = RunConfig(project_name="p")
    assert cfg.report_dir == Path("docs/reports/p")
    assert cfg.checkpoint_dir == Path("checkpoints/p")
    assert cfg.reporting.use_comet_ml is True and cfg.reporting.poll_hz == 2
    assert cfg.hub.push is False and cfg.hub.private is True


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        (
            "project_name: p\ntraining:\n  learning_rat: 0.1\n",
            "training.learning_rat: unknown key (did you mean 'learning_rate'?)",
        ),
        ("project_name: p\ntrainin:\n  max_steps: 3\n", "trainin: unknown key (did you mean 'training'?)"),
        ("project_name: p\ntraining:\n  batch_size: many\n", "training.batch_size: Input should be a valid integer"),
        (
            "project_name: p\ntraining:\n  batch_size: 0\n",
            "training.batch_size: Input should be greater than or equal to 1",
        ),
        ("project_name: p\nlora:\n  dropout: 1.5\n", "lora.dropout: Input should be less than 1"),
        (
            "project_name: p\ntraining:\n  precision: fp8\n",
            "training.precision: Input should be 'auto', 'bf16', 'fp16' or 'fp32' (got 'fp8')",
        ),
        ("project_name: p\ndata:\n  path: missing.jsonl\n", "data.path: data file 'missing.jsonl' not found"),
        ("project_name: p\nlaunch:\n  script: nope.py\n", "launch.script: script 'nope.py' not found"),
        ("project_name: p\nlaunch:\n  script: .\n", "launch.script: script '.' is a directory, not a script"),
        (
            "project_name: p\nlaunch:\n  accelerate_args: [--mixed_precision, no]\n",
            "launch.accelerate_args.1: YAML read this as False: quote it ('no', 'yes') to give the word",
        ),
        (
            "project_name: p\nlaunch:\n  script: nope.py\n  module: pkg.train\n",
            "launch.script and launch.module both set: give one",
        ),
        ("project_name: ../evil\n", "project_name: '../evil' is not a safe folder name"),
        ("project_name: a/b\n", "project_name: 'a/b' is not a safe folder name"),
        ("model:\n  max_seq_length: 64\n", "project_name: required key is missing"),
        ("project_name: p\nhub:\n  push: true\n", "hub.repo_id: required when hub.push is true"),
        # The Hub's own rule, found before the training, not by the push after it (HFValidationError).
        ("project_name: p\nhub:\n  repo_id: me/bad..name\n", "hub.repo_id: 'me/bad..name' is not a Hub repo id"),
        ("project_name: p\nhub:\n  repo_id: me/x-\n", "hub.repo_id: 'me/x-' is not a Hub repo id"),
        ("project_name: p\ntraining: [1, 2\n", "line 3, column 1: YAML syntax error"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        # What a trainer cannot take is refused here, not deep inside the run.
        ("project_name: p\ntraining:\n  batch_size: true\n", "training.batch_size: Input should be a valid integer"),
        (
            "project_name: p\ntraining:\n  weight_decay: .inf\n",
            "training.weight_decay: Input should be a finite number",
        ),
        (
            "project_name: p\nreporting:\n  refresh_seconds: .nan\n",
            "reporting.refresh_seconds: Input should be a finite number",
        ),
        (
            "project_name: p\ntraining:\n  max_steps: 99999999999999\n",
            "training.max_steps: Input should be less than or equal to 2147483647",
        ),
        ("project_name: p\nhub:\n  push: 1\n", "hub.push: Input should be a valid boolean"),
        # The job's shape is kaio's to pass: accelerate would take the later of two flags.
        (
            "project_name: p\nlaunch: {accelerate_args: [--num-processes=4]}\n",
            "launch.accelerate_args: --num-processes is set by kaio: use launch.num_processes",
        ),
        (
            "project_name: p\nlaunch: {accelerate_args: [--main_process_port, '1234']}\n",
            "launch.accelerate_args: --main_process_port is set by kaio: use launch.main_port",
        ),
        (
            "project_name: p\nlaunch: {accelerate_args: [--rdzv-backend, c10d]}\n",
            "launch.accelerate_args: --rdzv-backend is set by kaio: use launch.nnodes",
        ),
        # A key written twice would silently drop the first section.
        (
            "project_name: p\ntraining:\n  max_steps: 3\nlora: {r: 4}\ntraining:\n  batch_size: 2\n",
            "line 5, column 1: YAML syntax error: duplicate key 'training' (first at line 2)",
        ),
        ("project_name: p\ntraining: {max_steps: 3, max_steps: 4}\n", "duplicate key 'max_steps' (first at line 2)"),
        # The tiny Llama splits its hidden size across the heads, into an even head size (RoPE).
        ("project_name: p\nmodel: {hidden_size: 64, num_heads: 3}\n", "model.hidden_size: 64 / num_heads 3 must be"),
        ("project_name: p\nmodel: {hidden_size: 60, num_heads: 4}\n", "(e.g. hidden_size 64)"),
        # A field's own bounds hold, within the 32-bit bound every whole number has.
        (
            "project_name: p\nlaunch: {main_port: 70000}\n",
            "launch.main_port: Input should be less than or equal to 65535",
        ),
        ("project_name: p\nlora: {r: 5000}\n", "lora.r: Input should be less than or equal to 1024"),
        ("project_name: p\ntraining: 5\n", "training: a section of keys (key: value lines under it), not 5"),
        ("project_name: 123\n", "project_name: YAML read this as the number 123: quote it ('123')"),
        ("project_name: p\ndata: {path: .}\n", "data.path: '.' is a folder: give the JSONL file itself"),
        # A few hundred bytes of YAML aliases can expand to gigabytes: refused before anything is expanded.
        (
            "project_name: p\na: &a [1, 1]\nb: [*a, *a]\n",
            "line 3, column 5: YAML syntax error: aliases (*name) are not supported",
        ),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(project_dir, yaml_text, expected):
    path = project_dir / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert expected in message
    assert "\n" not in message


def test_every_problem_is_said_at_once_one_line_each_and_an_emptied_section_is_its_defaults(project_dir):
    path = project_dir / "bad.yaml"
    path.write_text("project_name: p\nlora: {rr: 3}\ntraining:\n  batch_size: 0\nlaunch:\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).splitlines() == [
        f"{path}: lora.rr: unknown key (did you mean 'r'?)",
        f"{path}: training.batch_size: Input should be greater than or equal to 1",
    ]
    path.write_text("project_name: p\ntraining:\n# max_steps: 3\nlaunch:\n")  # every key commented out
    assert load_config(path).training == RunConfig(project_name="p").training


def test_cli_bad_config_exits_2_without_traceback_or_side_effects(project_dir):
    (project_dir / "bad.yaml").write_text("project_name: p\ntraining:\n  max_step: 3\n")
    result = kaio("run", "bad.yaml", cwd=project_dir, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["kaio: error: bad.yaml: training.max_step: unknown key (did you mean 'max_steps'?)"]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (project_dir / "docs").exists()
    assert not (project_dir / "checkpoints").exists()
    # Refused once the project's lock is taken (the checkpoint folder's name is a file): nothing left either.
    (project_dir / "taken").write_text("")
    (project_dir / "c.yaml").write_text("project_name: p\ntraining: {output_dir: taken}\n")
    refused = kaio("run", "c.yaml", cwd=project_dir, timeout=60)
    assert refused.returncode == 2
    assert (
        refused.stderr
        == "kaio: error: taken: cannot create the checkpoint folder (a file of that name is there); choose another training.output_dir\n"
    )
    assert not (project_dir / "docs" / "reports" / "p").exists()


def test_cli_missing_config_file(project_dir):
    result = kaio("run", "nowhere.yaml", cwd=project_dir, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "kaio: error: nowhere.yaml: config file not found"


def test_snapshot_redacts_secret_looking_values():
    cfg = RunConfig(project_name="p", launch={"script_args": ["--x"]})
    snap = config_snapshot(cfg)
    assert snap["project_name"] == "p"
    from kaio.config import redact

    assert redact({"hub": {"token": "hf_abc", "repo_id": "a/b"}, "api_key": "k"}) == {
        "hub": {"token": "***", "repo_id": "a/b"},
        "api_key": "***",
    }


def test_a_script_runs_snapshot_keeps_no_recipe_key_but_the_checkpoint_folder(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    cfg = RunConfig(project_name="p", launch={"script": str(script)}, training={"output_dir": "out"})
    snap = config_snapshot(cfg)
    assert "model" not in snap and "lora" not in snap and "data" not in snap  # none of it ran
    assert snap["training"] == {"output_dir": "out"} and snap["launch"]["script"] == str(script)
    assert "lora" in config_snapshot(RunConfig(project_name="p"))  # the built-in recipe's run keeps them


def test_overrides_apply_before_validation(project_dir):
    path = write_config(project_dir, max_steps=12)
    assert load_config(path, {"training.max_steps": 40}).training.max_steps == 40
    with pytest.raises(ConfigError, match="training.max_steps"):
        load_config(path, {"training.max_steps": 0})


def test_redaction_hides_secret_words_but_keeps_tokenizer_and_token_counts():
    from kaio.config import redact

    cfg = RunConfig(project_name="p", model={"tokenizer": "meta-llama/Llama-3.1-8B"})
    assert config_snapshot(cfg)["model"]["tokenizer"] == "meta-llama/Llama-3.1-8B"  # resume reads it back
    assert redact(
        {"hf_token": "x", "COMET_API_KEY": "y", "client-secret": "z", "tokens_seen": 5, "tokenizer": "t"}
    ) == {
        "hf_token": "***",
        "COMET_API_KEY": "***",
        "client-secret": "***",
        "tokens_seen": 5,
        "tokenizer": "t",
    }


def test_a_directory_given_as_the_config_names_the_configs_in_it(project_dir):
    (project_dir / "configs").mkdir()
    (project_dir / "configs" / "mine.yaml").write_text("project_name: p\n")
    with pytest.raises(ConfigError) as info:
        load_config(project_dir / "configs")
    assert str(info.value).endswith(
        "a directory, not a config file: give the YAML file itself; the configs in it: mine.yaml"
    )


def test_a_learning_rate_written_1e_4_still_reads_as_a_number(project_dir):
    path = project_dir / "ok.yaml"
    path.write_text("project_name: p\ntraining:\n  learning_rate: 1e-4\n  weight_decay: 0\n")
    assert load_config(path).training.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string; pydantic parses it


def test_yaml_merge_keys_are_not_duplicates(project_dir):
    """`<<:` merges a mapping's keys, which the mapping's own may override: YAML's rule, not a duplicate key."""
    path = project_dir / "m.yaml"
    path.write_text("project_name: p\ntraining: {<<: {max_steps: 3, batch_size: 2}, max_steps: 5}\n")
    cfg = load_config(path)
    assert (cfg.training.max_steps, cfg.training.batch_size) == (5, 2)

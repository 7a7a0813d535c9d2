"""The one rule for secrets, in free text too: an error that quotes the script's arguments, the script's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import kaio
from kaio.secrets import mask, secret_values

TOKEN = "hf_" + "Fak3T0kenThatMustN0tLeakAnywhere"


def test_the_values_a_secret_flag_or_variable_holds_are_the_ones_masked():
    argv = ["train.py", "--hf-token", TOKEN, "--api_key=sk-0123456789abcdef", "--tokenizer", "gpt2", "--lr", "1e-4"]
    environ = {"COMET_API_KEY": "cmtKEY0123456789", "TOKENIZERS_PARALLELISM": "false", "MY_KEY": "1", "HOME": "/root"}
    assert secret_values(argv, environ) == [TOKEN, "sk-0123456789abcdef", "cmtKEY0123456789"]  # longest first
    said = f"error: unrecognized arguments: --hf-token {TOKEN} (with cmtKEY0123456789)"
    assert mask(said, secret_values(argv, environ), "***") == "error: unrecognized arguments: --hf-token *** (with ***)"


def test_a_ranks_output_and_error_file_mask_the_secrets_of_its_arguments(tmp_path):
    """argparse quotes the arguments it does not know, the token among them, in the rank's stderr (child.log) and
    in the error file kaio names the root cause from; the output's binary buffer (accelerate's launcher copies its
    rank's stderr through it) too."""
    script = tmp_path / "strict.py"
    script.write_text(
        "import argparse, sys\n"
        f"sys.stderr.buffer.write(b'raw bytes: {TOKEN}\\n')\n"
        "argparse.ArgumentParser().parse_args()\n"
    )
    errors = tmp_path / "errors"
    ended = subprocess.run(
        [sys.executable, "-m", "kaio.child", "--kaio-script", str(script), "--hf-token", TOKEN],
        env={**os.environ, "KAIO_ERROR_DIR": str(errors)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ended.returncode == 2 and "unrecognized arguments: --hf-token ***" in ended.stderr
    assert "raw bytes: ***" in ended.stderr and TOKEN not in ended.stderr + ended.stdout
    (error_file,) = errors.iterdir()
    assert TOKEN not in error_file.read_text() and "--hf-token ***" in json.loads(error_file.read_text())["root_cause"]


def test_a_run_whose_script_quotes_its_secret_argument_keeps_it_out_of_every_file(project_dir):
    """A token in launch.script_args was masked in config.json and report.md, and kept in history.json (the
    session's error), the journal, the index, the error file, child.log and Comet's copy of history.json."""
    (project_dir / "strict.py").write_text("import argparse\nargparse.ArgumentParser().parse_args()\n")
    (project_dir / "cfg.yaml").write_text(
        f"project_name: t\nlaunch:\n  script: strict.py\n  script_args: [--hf-token, {TOKEN}]\n"
        "reporting:\n  use_comet_ml: false\n"
    )
    ran = kaio("run", "cfg.yaml", "--plain", cwd=project_dir, timeout=120)
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert TOKEN not in ran.stdout + ran.stderr
    history = json.loads((project_dir / "docs" / "reports" / "t" / "history.json").read_text())
    assert "--hf-token ***" in history["sessions"][0]["error"]
    leaked = [p for p in (project_dir / "docs").rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []

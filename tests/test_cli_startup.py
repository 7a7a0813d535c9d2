"""`kaio --help` answers without importing the heavy stack."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ["torch", "transformers", "matplotlib", "comet_ml", "huggingface_hub", "pynvml", "amdsmi", "peft", "accelerate"]

PROBE = """
import sys
from typer.testing import CliRunner
from kaio.cli import app
result = CliRunner().invoke(app, {args!r})
assert result.exit_code == 0, result.output
print("OUTPUT<<" + result.output + ">>")
print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def _probe(args):
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args, heavy=HEAVY)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_help_imports_nothing_heavy():
    out = _probe(["--help"])
    assert "HEAVY=\n" in out
    for command in ("run", "resume", "report", "gpus", "push"):
        assert command in out


def test_run_help_explains_the_command_without_heavy_imports():
    out = _probe(["run", "--help"])
    assert "HEAVY=\n" in out
    assert "--plain" in out and "--overwrite" in out


def test_python_dash_m_kaio_works():
    out = subprocess.run([sys.executable, "-m", "kaio", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "Usage" in out.stdout and "run" in out.stdout

"""Dockerfile.rocm, checked by parsing (no Docker engine runs on the development machines)."""

import io
import json
import re
import shlex
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dockerfile():
    return DockerfileParser(fileobj=io.BytesIO((ROOT / "Dockerfile.rocm").read_bytes()))


def _instructions(parser, name):
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def _commands(run_line):
    """One RUN line as shell commands (word lists), split at &&, ||, ; and |."""
    lexer = shlex.shlex(run_line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [*commands, current]


def _pip_installs(run_line):
    """The argument lists of every `pip install` in one RUN line."""
    return [
        words[words.index("install") + 1 :] for words in _commands(run_line) if "pip" in words and "install" in words
    ]


def test_base_image_is_pinned_rocm_pytorch_6_2_or_newer(dockerfile):
    image, _, tag = dockerfile.baseimage.partition(":")
    assert image == "rocm/pytorch"
    assert tag and tag != "latest" and "@" not in image
    rocm = re.match(r"rocm(\d+)\.(\d+)", tag)
    assert rocm, f"tag {tag!r} does not name its ROCm version"
    assert (int(rocm[1]), int(rocm[2])) >= (6, 2)
    assert "pytorch_release_" in tag  # the image brings its own ROCm build of torch


def test_torch_is_never_installed_only_pinned(dockerfile):
    runs = _instructions(dockerfile, "RUN")
    installs = [args for run in runs for args in _pip_installs(run)]
    assert installs, "no pip install found"
    for args in installs:
        packages = [a for a in args if not a.startswith("-")]
        assert not any(re.match(r"^(torch|torchvision|torchaudio)\b", p) for p in packages), args
    constraint_file = "/tmp/constraints.txt"
    assert any("grep '^torch=='" in run and f"> {constraint_file}" in run for run in runs)
    assert ["-c", constraint_file, "."] in installs  # kaio itself, under the torch pin


def test_amd_smi_bindings_come_from_the_images_rocm(dockerfile):
    installs = [args for run in _instructions(dockerfile, "RUN") for args in _pip_installs(run)]
    assert ["/opt/rocm/share/amd_smi"] in installs
    assert not any("amdsmi" in args for args in installs)  # never the PyPI package


def test_entry_point_volumes_and_hf_cache(dockerfile):
    assert [json.loads(v) for v in _instructions(dockerfile, "ENTRYPOINT")] == [["kaio"]]
    (volumes,) = [json.loads(v) for v in _instructions(dockerfile, "VOLUME")]
    hf_home = dockerfile.envs["HF_HOME"]
    assert set(volumes) == {"/workspace/configs", "/workspace/docs/reports", "/workspace/checkpoints", hf_home}
    assert _instructions(dockerfile, "WORKDIR")[-1] == "/workspace"  # reports land in the volume


def test_dockerignore_keeps_bulk_and_secrets_out_of_the_context():
    entries = set((ROOT / ".dockerignore").read_text().split())
    for needed in (".git", ".venv", "venv", "checkpoints", "docs/reports", ".pytest_cache", "**/__pycache__", ".env"):
        assert needed in entries, needed

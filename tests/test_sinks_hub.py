"""kaio.sinks.hub against a real loopback HTTP server that speaks the Hub's upload protocol."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import time

import pytest
import yaml
from hub_server import USERNAME, HubServer

from kaio.sinks.hub import push_adapter, write_model_card

TOKEN = "hf_" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp"
REPO = "kaio-tester/tiny-lora"
ADAPTER_CONFIG = json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]})


@pytest.fixture(autouse=True)
def hub_client_env(tmp_path, monkeypatch):
    """A private HF_HOME, no ambient token, and the plain LFS protocol instead of Xet."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads these once, at import: point the already-imported constants too.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    return hf_home


def safetensors_bytes() -> bytes:
    """A genuine safetensors file: one float32 tensor of shape (2, 3)."""
    header = json.dumps({"lora_A.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + struct.pack("<6f", 0.5, -1.0, 2.0, 0.25, 3.0, -0.75)


@pytest.fixture
def artifacts(tmp_path):
    """A finished run's adapter and report folders, plus files that must not be pushed."""
    adapter_dir = tmp_path / "checkpoints" / "final"
    report_dir = tmp_path / "docs" / "reports" / "tiny"
    adapter_dir.mkdir(parents=True)
    report_dir.mkdir(parents=True)
    expected = {
        "adapter_config.json": ADAPTER_CONFIG.encode(),
        "adapter_model.safetensors": safetensors_bytes(),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
        "tokenizer_config.json": b'{"model_max_length": 128}',
    }
    for name, data in expected.items():
        (adapter_dir / name).write_bytes(data)
    (adapter_dir / "training_args.bin").write_bytes(b"pickled trainer args")
    (adapter_dir / "README.md").write_text("PEFT's generic card, replaced by kaio's")
    report_files = {
        "report.md": b"# tiny\n\nfinal loss 1.23\n",
        "telemetry.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
        "history.json": b'{"schema_version": 1, "steps": []}\n',
    }
    for name, data in report_files.items():
        (report_dir / name).write_bytes(data)
    expected.update({f"kaio-report/{name}": data for name, data in report_files.items()})
    return adapter_dir, report_dir, expected


def snapshot(*folders):
    return {
        path: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for folder in folders
        for path in sorted(folder.iterdir())
    }


def push(artifacts, **overrides):
    adapter_dir, report_dir, _ = artifacts
    arguments = dict(
        repo_id=REPO,
        private=True,
        adapter_dir=adapter_dir,
        report_dir=report_dir,
        card_markdown="Final loss **1.23** after 60 steps on 1 GPU.",
        base_model="kaio/tiny-llama",
        token=TOKEN,
    )
    arguments.update(overrides)
    return push_adapter(**arguments)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_push_commits_adapter_tokenizer_card_and_report_in_one_commit(artifacts):
    adapter_dir, report_dir, expected = artifacts
    before = snapshot(adapter_dir, report_dir)
    with HubServer(token=TOKEN) as hub:
        result = push(artifacts, endpoint=hub.url)

    assert result.error is None
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert hub.repos[REPO].private is True
    assert commit.repo_id == REPO and commit.revision == "main"

    readme = commit.files.pop("README.md")
    assert commit.files == expected  # names and bytes; nothing else (no training_args.bin)
    # The weights and the image travel through LFS: batch, PUT of the exact bytes, verify, commit pointer.
    assert sorted(commit.lfs_paths) == ["adapter_model.safetensors", "kaio-report/telemetry.png"]
    for path in commit.lfs_paths:
        oid = hashlib.sha256(expected[path]).hexdigest()
        assert hub.lfs_objects[oid] == expected[path]
        assert oid in hub.lfs_verified
        assert ("PUT", f"/lfs-upload/{oid}") in hub.requests

    _, front_matter, body = readme.decode().split("---\n", 2)
    metadata = yaml.safe_load(front_matter)
    assert metadata["base_model"] == "kaio/tiny-llama"
    assert metadata["library_name"] == "peft"
    assert {"kaio", "lora"} <= set(metadata["tags"])
    assert "Final loss **1.23** after 60 steps on 1 GPU." in body
    assert f'from_pretrained("{REPO}")' in body

    assert result.commit_sha == commit.sha
    assert result.repo_id == REPO
    assert result.url == f"{hub.url}/{REPO}"
    assert result.adapter_config_url == f"{hub.url}/{REPO}/blob/{commit.sha}/adapter_config.json"
    assert sorted(result.files) == sorted([*expected, "README.md"])
    assert snapshot(adapter_dir, report_dir) == before  # local artifacts only read


@pytest.mark.parametrize("token_source", ["HF_TOKEN", "saved login"])
def test_push_finds_the_token_and_commits_again_to_an_existing_repo(
    artifacts, hub_client_env, monkeypatch, token_source
):
    if token_source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    else:
        hub_client_env.mkdir(parents=True, exist_ok=True)
        (hub_client_env / "token").write_text(TOKEN)
    with HubServer(token=TOKEN) as hub:
        first = push(artifacts, token=None, endpoint=hub.url)
        (artifacts[1] / "report.md").write_text("# tiny\n\nresumed, final loss 0.98\n")
        second = push(artifacts, token=None, endpoint=hub.url)

    assert first.error is None and second.error is None
    assert [c.sha for c in hub.repos[REPO].commits] == [first.commit_sha, second.commit_sha]
    assert first.commit_sha != second.commit_sha
    assert hub.commits[1].files["kaio-report/report.md"] == b"# tiny\n\nresumed, final loss 0.98\n"
    assert hub.unauthorized == []


def test_repo_without_namespace_lands_in_the_token_owners_namespace(artifacts):
    with HubServer(token=TOKEN) as hub:
        result = push(artifacts, repo_id="bare-name", endpoint=hub.url)

    owned = f"{USERNAME}/bare-name"
    assert result.error is None
    assert result.repo_id == owned
    assert [c.repo_id for c in hub.commits] == [owned]
    assert result.adapter_config_url == f"{hub.url}/{owned}/blob/{result.commit_sha}/adapter_config.json"
    assert f'from_pretrained("{owned}")' in hub.commits[0].files["README.md"].decode()


def test_no_token_fails_before_any_request(artifacts):
    with HubServer(token=TOKEN) as hub:
        result = push(artifacts, token=None, endpoint=hub.url)

    assert result.error == "push failed: no Hugging Face token (set HF_TOKEN or run `hf auth login`)"
    assert result.commit_sha is None and result.adapter_config_url is None and result.files == []
    assert hub.requests == []


def test_rejected_token_is_reported_without_the_token(artifacts):
    wrong = "hf_" + "Wr0ngWr0ngWr0ngWr0ngWr0ngWr0ng00"
    with HubServer(token=TOKEN) as hub:
        result = push(artifacts, token=wrong, endpoint=hub.url)

    assert result.error == (
        "push failed: the Hub rejected the token (HTTP 401: Invalid credentials in Authorization header)"
    )
    assert wrong not in result.error
    assert result.commit_sha is None and result.files == []
    assert hub.commits == [] and hub.lfs_objects == {}
    assert ("POST", "/api/repos/create") in hub.unauthorized


def test_unreachable_hub_is_an_error_not_an_exception(artifacts):
    url = closed_port_url()
    started = time.monotonic()
    result = push(artifacts, endpoint=url)

    assert time.monotonic() - started < 10
    assert result.error.startswith(f"push failed: cannot reach {url} (")
    assert "refused" in result.error.lower()
    assert TOKEN not in result.error
    assert result.commit_sha is None


def test_token_is_scrubbed_from_client_error_text(artifacts):
    # huggingface_hub quotes an invalid repo id back in its error: here the id contains the token.
    with HubServer(token=TOKEN) as hub:
        result = push(artifacts, repo_id=f"someone/{TOKEN} copy", endpoint=hub.url)

    assert result.error.startswith("push failed: HFValidationError: ")
    assert "***" in result.error
    assert TOKEN not in result.error
    assert hub.requests == []


def test_missing_adapter_weights_fail_locally(artifacts):
    adapter_dir = artifacts[0]
    (adapter_dir / "adapter_model.safetensors").unlink()
    with HubServer(token=TOKEN) as hub:
        result = push(artifacts, endpoint=hub.url)

    assert result.error == f"push failed: adapter_model.safetensors not found in {adapter_dir}"
    assert hub.requests == []


def test_model_card_keeps_local_base_model_paths_out_of_the_metadata():
    hub_card = write_model_card(repo_id=REPO, base_model="meta-llama/Llama-3.2-1B", card_markdown="ok")
    local_card = write_model_card(repo_id=REPO, base_model="/models/llama-3.2-1b", card_markdown="ok")

    hub_metadata = yaml.safe_load(hub_card.split("---\n")[1])
    local_metadata = yaml.safe_load(local_card.split("---\n")[1])
    assert hub_metadata["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "base_model:adapter:meta-llama/Llama-3.2-1B" in hub_metadata["tags"]
    assert "base_model" not in local_metadata
    assert local_metadata == {"library_name": "peft", "tags": ["kaio", "lora", "peft"]}
    assert "A LoRA adapter for `/models/llama-3.2-1b`" in local_card

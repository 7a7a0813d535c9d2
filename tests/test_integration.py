"""Whole runs with the record leaving the machine and GPUs faked at their binding.

- one run with everything on: GPU samples in every step of history.json (a fake ``pynvml`` module in the
  supervisor), the run's metrics at the right steps in Comet's real offline archive, the adapter on a loopback
  Hub with the commit in report.md;
- a failed push keeps the exit code, and ``kaio push`` retries; ``kaio report`` then rebuilds, refuses, and
  survives a corrupt history (one run for both).
"""

from __future__ import annotations

import json
import textwrap
import zipfile
from pathlib import Path

import pytest
from hub_server import HubServer

from conftest import REPO, kaio, read_history, write_config

TOKEN = "hf_" + "IntegrationT0kenThatMustNeverBeWritten"


def _fake_nvml_site(directory: Path, gpus: int) -> Path:
    """A folder whose ``pynvml`` is the test fake: put on PYTHONPATH of the kaio process."""
    site = directory / "fake_site"
    site.mkdir()
    (site / "pynvml.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(REPO / "tests")!r})
            from fakes.fake_pynvml import FakeNvidiaGpu, FakeNvml
            gpus = [FakeNvidiaGpu(uuid=f"GPU-0000000{{i}}-d72c-4106-c12f-20bd9faed9f6", power_mw=300_000 + 10_000 * i)
                    for i in range({gpus})]
            sys.modules[__name__] = FakeNvml(gpus).module()
            """
        )
    )
    return site


def _archive_metrics(archive_path: Path) -> dict:
    with zipfile.ZipFile(archive_path) as archive:
        messages = [json.loads(line) for line in archive.read("messages.json").splitlines() if line.strip()]
    return {
        (m["payload"]["metric"]["metricName"], m["payload"]["metric"]["step"]): m["payload"]["metric"]["metricValue"]
        for m in messages
        if m["type"] == "metric_msg"
    }


def test_one_run_with_everything_on_then_a_failed_push_retried_and_the_record_rebuilt(project_dir):
    """One whole run with everything on: two fake GPUs (one in the run), Comet's offline archive, a loopback Hub;
    then a resume that continues the same Comet experiment with only the steps it trains, while the Hub is down:
    `kaio push` retries its push, and `kaio report` rebuilds the record, refuses and survives corruption."""
    unknown = kaio("report", "t", cwd=project_dir, timeout=60)
    assert unknown.returncode == 2 and "unknown project 't'" in unknown.stderr

    site = _fake_nvml_site(project_dir, gpus=2)
    write_config(project_dir, max_steps=12, extra="hub:\n  push: true\n  repo_id: kaio-tester/tiny\n")
    cfg = project_dir / "cfg.yaml"
    cfg.write_text(cfg.read_text().replace("use_comet_ml: false", "use_comet_ml: true\n  peak_tflops: 0.05"))
    report_dir = project_dir / "docs/reports/t"
    down = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"}
    with HubServer(token=TOKEN) as hub:
        env = {
            "PYTHONPATH": str(site),
            "CUDA_VISIBLE_DEVICES": "1",
            "COMET_API_KEY": "",
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": TOKEN,
            "HF_HUB_DISABLE_XET": "1",
        }
        result = kaio("run", "cfg.yaml", cwd=project_dir, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        (commit,) = hub.commits
        again = kaio("run", "cfg.yaml", cwd=project_dir, timeout=60)  # finished: only a longer run continues it
        assert again.returncode == 2 and "train it further with `kaio resume t --max-steps N` (N > 12)" in again.stderr
        resumed = kaio("resume", "t", "--max-steps", "15", cwd=project_dir, env={**env, **down})
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr  # the training succeeded: the push is said
        assert "push failed:" in (report_dir / "report.md").read_text() and hub.commits == [commit]
        said = resumed.stdout + resumed.stderr  # its last line names the commit as the earlier push's, not as pushed
        assert " · pushed: " not in said and f"the Hub's adapter is an earlier push's: {hub.url}" in said
        retry = kaio("push", "t", cwd=project_dir, env=env)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        latest = hub.commits[-1]  # the resumed run's adapter
        pushed = (report_dir / "report.md").read_text()
        assert latest.sha != commit.sha and "push failed:" not in pushed
        # The links are the Hub's it was pushed to (HF_ENDPOINT), not huggingface.co's.
        assert f"- **Repo:** [kaio-tester/tiny]({hub.url}/kaio-tester/tiny)" in pushed
        # The report each push uploaded is of that push: not the failure or the commit the record had before it.
        uploaded = "- **Commit:** the one that uploaded this report with the adapter (the repo's history names it)"
        for each in (commit, latest):
            on_hub = each.files["kaio-report/report.md"].decode()
            assert uploaded in on_hub and "push failed" not in on_hub and commit.sha not in on_hub
            assert f"- **Repo:** [kaio-tester/tiny]({hub.url}/kaio-tester/tiny)" in on_hub
            assert json.loads(each.files["kaio-report/history.json"])["hub"]["uploading"] is True
        assert uploaded not in pushed and f"- **Commit:** `{latest.sha}`" in pushed
    # A push killed while it uploads leaves the project's report as it was: its commit, not the upload's words.
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as silent:  # a Hub that takes the connection and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(120)
        hung = {**down, "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        pushing = subprocess.Popen(
            [sys.executable, "-m", "kaio", "push", "t"],
            cwd=project_dir,
            env={**os.environ, **hung},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        connection, _ = silent.accept()  # the upload has begun
        pushing.send_signal(signal.SIGKILL)
        pushing.wait(timeout=30)
        connection.close()
    kept = (report_dir / "report.md").read_text()
    assert uploaded not in kept and f"- **Commit:** `{latest.sha}`" in kept
    failed_again = kaio("push", "t", cwd=project_dir, env=down)
    assert failed_again.returncode == 1 and TOKEN not in failed_again.stdout + failed_again.stderr

    history = read_history(project_dir)
    # The resume of a finished run continued from its final checkpoint (checkpoint-12): each step once.
    assert history["sessions"][1]["start_step"] == 12 and [s["step"] for s in history["steps"]] == list(range(1, 16))
    # The finished cosine schedule had left the optimizer's rate at 0.0, which step 13 trained with: the extended
    # schedule's rate from its first step on.
    assert all(s["learning_rate"] > 0 for s in history["steps"][12:14])

    # GPU samples in every step; only the run's GPU counts in the flat keys.
    devices = {d["key"]: d for d in history["devices"]}
    assert set(devices) == {"nvml:0", "nvml:1"}
    assert devices["nvml:1"]["info"]["in_run"] and not devices["nvml:0"]["info"]["in_run"]  # CUDA_VISIBLE_DEVICES=1
    assert devices["nvml:1"]["energy_method"] in ("counter", "integrated") and devices["nvml:1"]["energy_j"] > 0
    aggregated = [s for s in history["steps"] if s["gpus"]]
    assert len(aggregated) >= len(history["steps"]) - 2  # a session's last step may end after its last tick
    for step in aggregated:
        assert set(step["gpus"]) == {"nvml:0", "nvml:1"}
        assert step["gpus"]["nvml:1"]["power_avg"] == pytest.approx(310.0)
        assert step["power_avg"] == pytest.approx(310.0)
        assert step["util"] == 97 and step["temp"] == 61
    assert sum(s["energy_j"] or 0 for s in history["steps"]) > 0
    report = (project_dir / "docs/reports/t/report.md").read_text()
    assert "310" in report and " Wh, hardware counter" in report  # small energies in Wh

    # MFU by hand: the tiny Llama of tests/conftest.py (hidden 32, MLP 64, 1 layer, attention 2 x 16), LoRA r=4 on
    # q_proj, v_proj and lm_head; V (the vocabulary) from the total. FLOPs per token 6 N_trained + 4 N_frozen +
    # 12 L A T (the input embedding does no matmul), T the step's tokens per sample (batch 4, one rank).
    hidden, mlp, layers = 32, 64, 1
    layer = 4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden
    vocab = (history["run"]["model"]["total_params"] - layer - hidden - 2 * 4 * hidden * 2 - 4 * hidden) // (
        2 * hidden + 4
    )
    trained = 2 * (4 * hidden + hidden * 4) + (4 * hidden + vocab * 4)
    frozen = layer + hidden + vocab * hidden
    measured = [s for s in history["steps"] if s["mfu"] is not None]
    assert len(measured) >= len(history["steps"]) - 2  # each session's first step has no previous count
    for entry, before in zip(history["steps"][1:], history["steps"]):
        if entry["mfu"] is None:
            continue
        tokens = entry["tokens_seen"] - before["tokens_seen"]
        per_token = 6 * trained + 4 * frozen + 12 * layers * hidden * (tokens / 4)
        assert entry["tokens_per_s_per_device"] == pytest.approx(tokens / entry["step_time_s"])
        assert entry["mfu"] == pytest.approx(entry["tokens_per_s_per_device"] * per_token / 0.05e12)
    assert "% MFU" in report

    # Comet: the run's metrics at the right steps; the resume continued the same experiment with its steps only.
    assert "comet upload" in result.stdout
    archives = sorted((report_dir / "comet").glob("*.zip"), key=lambda p: p.stat().st_mtime)
    first, second = archives
    metrics = _archive_metrics(first)
    for entry in history["steps"][:12]:
        assert float(metrics[("loss", entry["step"])]) == pytest.approx(entry["loss"])
        assert float(metrics[("learning_rate", entry["step"])]) == pytest.approx(entry["learning_rate"])
    key = json.loads((report_dir / "comet.json").read_text())["experiment_key"]
    with zipfile.ZipFile(second) as archive:
        assert json.loads(archive.read("experiment.json"))["offline_id"] == key
    assert sorted({step for (name, step) in _archive_metrics(second) if name == "loss"}) == [13, 14, 15]
    # Its parameters: kaio's config, and what the training process trained with (its arguments, its model).
    with zipfile.ZipFile(first) as archive:
        messages = [json.loads(line) for line in archive.read("messages.json").decode().splitlines()]
    params = {
        m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"]
        for m in messages
        if m["type"] == "parameter_msg" and "param" in m["payload"]  # (a list's is "params")
    }
    assert float(params["trained|learning_rate"]) == pytest.approx(history["run"]["args"]["learning_rate"])
    assert params["trained|trainer"] == "Trainer" and "trained|model|architecture" in params

    # The Hub: the adapter, a card and the report in one commit, recorded in the report; the token nowhere. The
    # resumed run's adapter came with `kaio push`.
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "kaio-report/report.md",
        "kaio-report/history.json",
        "kaio-report/telemetry.png",
    } <= set(commit.files)
    local = project_dir / "checkpoints/t/final/adapter_model.safetensors"
    assert latest.files["adapter_model.safetensors"] == local.read_bytes()
    assert f"kaio-tester/tiny/blob/{latest.sha}/adapter_config.json" in report
    assert history["hub"]["commit_sha"] == latest.sha and history["hub"]["repo_id"] == "kaio-tester/tiny"
    for path in (project_dir / "docs").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in result.stdout + result.stderr + resumed.stdout + resumed.stderr + retry.stdout + retry.stderr

    # kaio report rebuilds what was removed, from the journal.
    original = json.loads((report_dir / "history.json").read_text())
    for name in ("report.md", "telemetry.png", "history.json"):
        (report_dir / name).unlink()
    rebuilt = kaio("report", "t", "--json", cwd=project_dir, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    summary = json.loads(rebuilt.stdout)
    assert summary["status"] == "COMPLETED" and summary["optimizer_steps"] == 15
    history = json.loads((report_dir / "history.json").read_text())
    assert [s["loss"] for s in history["steps"]] == [s["loss"] for s in original["steps"]]
    assert history["hub"]["commit_sha"] == latest.sha  # the retried push is part of the record
    assert (report_dir / "report.md").is_file() and (report_dir / "telemetry.png").is_file()

    (report_dir / "history.json").write_text('{"schema_version": 1, "steps": [')
    again = kaio("report", "t", cwd=project_dir, timeout=120)
    assert again.returncode == 0
    assert "history.json: truncated or corrupt JSON" in again.stdout and "rebuilding it from" in again.stdout
    assert json.loads((report_dir / "history.json").read_text())["steps"]

    (report_dir / "journal.jsonl").unlink()
    (report_dir / "history.json").write_text("{not json")
    broken = kaio("report", "t", cwd=project_dir, timeout=60)
    assert broken.returncode == 2
    assert "history.json: truncated or corrupt JSON at line 1" in broken.stderr


def test_kaio_gpus_on_a_machine_without_gpu(project_dir):
    result = kaio("gpus", "--json", cwd=project_dir, timeout=60)
    assert result.returncode == 0
    inventory = json.loads(result.stdout)
    assert inventory["host"]["label"].startswith("host")
    human = kaio("gpus", cwd=project_dir, timeout=60)
    assert human.returncode == 0 and "No GPU found" in human.stdout

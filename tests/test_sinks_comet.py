"""kaio.sinks.comet: Comet's real offline archive, and an online path that cannot reach Comet."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kaio.record.types import EvalEntry, GpuStepStats, HostStepStats, StepEntry
from kaio.sinks.comet import CometSink

API_KEY = "cmt" + "K3yV4lu3Th4tMustN3v3rL34k0000"
HF_SECRET = "hf_" + "S3cr3tT0k3nV4lu3Th4tMustN0tL34k"
PARAMS = {
    "project_name": "tiny-default",
    "training": {"learning_rate": 0.003, "max_steps": 3},
    "lora": {"r": 16, "alpha": 32},
    "hub": {"repo_id": "me/tiny-lora", "token": HF_SECRET},
    "comet_api_key": API_KEY,
}
# Step entries (history.json's, docs/history-schema.md), with what Comet gets from each.
STEPS = [
    StepEntry(
        step=1,
        epoch=0.25,
        session=1,
        loss=5.91,
        loss_smoothed=5.91,
        learning_rate=0.003,
        grad_norm=1.2,
        peak_vram_bytes={"0": 123_456_789},
        vram_peak_bytes=123_456_789,
        power_avg=250.0,
        power_min=240.0,
        power_max=260.0,
        temp=61.0,
        util=97.0,
        energy_j=52.5,
        metrics={"num_tokens": 512.0},
        gpus={"nvml:0": GpuStepStats(power_avg=250.0, samples=1)},
        host=HostStepStats(cpu_pct=180.0),
    ),
    StepEntry(
        step=2,
        epoch=0.5,
        session=1,
        loss=4.5,
        learning_rate=0.0025,
        vram_peak_bytes=130_000_000,
        power_avg=255.5,
        temp=62.0,
        util=98.5,
        energy_j=50.0,
    ),
    StepEntry(step=3, epoch=0.75, session=1, loss=None, loss_nonfinite="nan", learning_rate=0.002, grad_norm=0.9),
]
EXPECTED_METRICS = {
    ("loss", 1): 5.91,
    ("loss_smoothed", 1): 5.91,
    ("learning_rate", 1): 0.003,
    ("grad_norm", 1): 1.2,
    ("vram_peak_bytes", 1): 123_456_789,
    ("power_avg", 1): 250.0,
    ("temp", 1): 61.0,
    ("util", 1): 97.0,
    ("energy_j", 1): 52.5,
    ("epoch", 1): 0.25,
    ("num_tokens", 1): 512.0,
    ("loss", 2): 4.5,
    ("learning_rate", 2): 0.0025,
    ("vram_peak_bytes", 2): 130_000_000,
    ("power_avg", 2): 255.5,
    ("temp", 2): 62.0,
    ("util", 2): 98.5,
    ("energy_j", 2): 50.0,
    ("epoch", 2): 0.5,
    ("learning_rate", 3): 0.002,
    ("grad_norm", 3): 0.9,
    ("epoch", 3): 0.75,
}
FAIL_FAST = {"COMET_HTTP_SESSION_RETRY_TOTAL": "0", "COMET_GET_OR_ADD_EXPERIMENT_RETRY_TOTAL": "0"}


@pytest.fixture(autouse=True)
def comet_env(tmp_path, monkeypatch):
    """No ambient Comet configuration: no key, no ~/.comet.config, no URL override."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in [name for name in os.environ if name.startswith("COMET_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def report_dir(tmp_path):
    folder = tmp_path / "docs" / "reports" / "tiny-default"
    folder.mkdir(parents=True)
    (folder / "report.md").write_text("# tiny-default\n\nfinal loss 4.5\n")
    (folder / "history.json").write_text('{"schema_version": 1}\n')
    return folder


def read_archive(path):
    """experiment.json, the messages (JSON lines) and every member's bytes of an offline archive."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    experiment = json.loads(members["experiment.json"])
    messages = [json.loads(line) for line in members["messages.json"].splitlines() if line.strip()]
    return experiment, messages, members


def metrics_in(messages):
    metrics = (m["payload"]["metric"] for m in messages if m["type"] == "metric_msg")
    return {(m["metricName"], m["step"]): m["metricValue"] for m in metrics if m["metricName"] != "process duration"}


def manual_params_in(messages):
    params = (m["payload"]["param"] for m in messages if m["type"] == "parameter_msg")
    return {p["paramName"]: p["paramValue"] for p in params if p["source"] == "manual"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_archive_holds_params_steps_and_report_without_secrets(report_dir):
    sink = CometSink.start(project="tiny-default", report_dir=report_dir, params=PARAMS, experiment_key=None, env={})
    for entry in STEPS:
        sink.log_step(entry)
    sink.log_assets([report_dir / "report.md", report_dir / "history.json"])
    sink.end()

    assert sink.warnings == []
    assert sink.offline
    archive = report_dir / "comet" / f"{sink.experiment_key}.zip"
    assert sorted((report_dir / "comet").iterdir()) == [archive]
    assert sink.messages == [
        f"Comet ML: no COMET_API_KEY, logging offline to {report_dir / 'comet'} "
        "(upload later with `comet upload <zip>`)",
        f"Comet ML: offline archive {archive}; upload it with `comet upload {archive}`",
    ]

    experiment, messages, members = read_archive(archive)
    assert experiment["offline_id"] == sink.experiment_key
    assert experiment["project_name"] == "tiny-default"
    assert experiment["tags"] == ["kaio"]
    assert metrics_in(messages) == EXPECTED_METRICS
    assert manual_params_in(messages) == {
        "project_name": "tiny-default",
        "training|learning_rate": 0.003,
        "training|max_steps": 3,
        "lora|r": 16,
        "lora|alpha": 32,
        "hub|repo_id": "me/tiny-lora",
        "hub|token": "***",
        "comet_api_key": "***",
    }
    uploads = {
        m["payload"]["additional_params"]["fileName"]: members[m["payload"]["file_path"]]
        for m in messages
        if m["type"] == "file_upload"
    }
    assert uploads == {
        "report.md": (report_dir / "report.md").read_bytes(),
        "history.json": (report_dir / "history.json").read_bytes(),
    }
    for content in members.values():
        assert HF_SECRET.encode() not in content and API_KEY.encode() not in content
    # Nothing Comet would have collected on its own: no code, git, environment or system details.
    assert {m["type"] for m in messages} <= {"metric_msg", "parameter_msg", "log_other", "file_upload"}

    # A long run's history.json (GBs) is not attached: said, and its steps are in the experiment as metrics.
    big = report_dir / "history.json"
    big.write_text('{"steps": [' + ",".join(["{}"] * 100) + "]}")
    again = CometSink.start(project="tiny-default", report_dir=report_dir, params=PARAMS, experiment_key=None, env={})
    again.log_assets([report_dir / "report.md", big], max_bytes=(report_dir / "report.md").stat().st_size)
    again.end()
    assert big.stat().st_size > (report_dir / "report.md").stat().st_size
    assert again.warnings == [] and any(m.startswith("Comet ML: history.json (") for m in again.messages)
    _, sent, _ = read_archive(report_dir / "comet" / f"{again.experiment_key}.zip")
    assert [m["payload"]["additional_params"]["fileName"] for m in sent if m["type"] == "file_upload"] == ["report.md"]


def test_resumed_run_continues_the_same_offline_experiment(report_dir):
    env = {"COMET_PROJECT_NAME": "team-project"}
    first = CometSink.start(project="tiny-default", report_dir=report_dir, params=PARAMS, experiment_key=None, env=env)
    first.log_step(STEPS[0])
    first.end()
    second = CometSink.start(
        project="tiny-default", report_dir=report_dir, params=PARAMS, experiment_key=first.experiment_key, env=env
    )
    second.log_step(StepEntry(step=2, session=2, loss=4.4))
    second.end()

    assert first.warnings == [] and second.warnings == []
    assert second.experiment_key == first.experiment_key
    first_archive = report_dir / "comet" / f"{first.experiment_key}.zip"
    (second_archive,) = set((report_dir / "comet").iterdir()) - {first_archive}
    assert second_archive.name.startswith(f"{first.experiment_key}-")
    assert second.messages[-1] == (
        f"Comet ML: offline archive {second_archive}; upload it with `comet upload {second_archive}` "
        "(after the archives of the earlier sessions)"
    )

    first_experiment, first_messages, _ = read_archive(first_archive)
    second_experiment, second_messages, _ = read_archive(second_archive)
    assert first_experiment["offline_id"] == second_experiment["offline_id"] == first.experiment_key
    assert first_experiment["project_name"] == second_experiment["project_name"] == "team-project"
    assert second_experiment["resume_strategy"] == "get"  # `comet upload` appends to the experiment
    assert metrics_in(first_messages)[("loss", 1)] == 5.91
    assert metrics_in(second_messages) == {("loss", 2): 4.4}


def test_unreachable_comet_logs_to_the_offline_archive_with_one_warning_without_the_key(report_dir, monkeypatch, capfd):
    """With a key and no way to the server, the run is not lost: comet_ml would retry for half a minute, print
    a traceback of 80 lines and drop it."""
    monkeypatch.setenv("COMET_URL_OVERRIDE", f"http://127.0.0.1:{closed_port()}/clientlib/")
    for name, value in FAIL_FAST.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    sink = CometSink.start(
        project="tiny-default",
        report_dir=report_dir,
        params=PARAMS,
        experiment_key=None,
        env={"COMET_API_KEY": API_KEY},
    )
    for entry in STEPS:
        sink.log_step(entry)
    sink.log_assets([report_dir / "report.md"])
    sink.end(timeout_s=10)

    assert time.monotonic() - started < 10
    assert sink.offline
    assert len(sink.experiment_key) == 32 and sink.experiment_key.isalnum()
    assert sink.warnings == [
        f"Comet ML: 127.0.0.1 cannot be reached: Connection refused; logging offline to {report_dir / 'comet'} "
        "instead (upload it later with `comet upload <zip>`)"
    ]
    assert API_KEY not in " ".join(sink.warnings + sink.messages)
    (archive,) = (report_dir / "comet").glob("*.zip")
    experiment, messages, members = read_archive(archive)
    assert archive.stem == experiment["offline_id"] == sink.experiment_key
    assert metrics_in(messages) == EXPECTED_METRICS
    assert not any(API_KEY.encode() in content for content in members.values())
    printed = capfd.readouterr()
    assert "COMET" not in printed.err + printed.out and "Traceback" not in printed.err


def test_behind_a_proxy_that_leads_nowhere_the_run_still_goes_to_the_offline_archive(tmp_path, monkeypatch):
    """A proxy that is down, or that answers but cannot reach Comet (a 502 for every request): the online start
    hung or failed, and sent the run nowhere ("nothing more is sent to Comet")."""

    class BadGateway(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = do_CONNECT = _answer

        def log_message(self, format, *args):
            pass

    gateway = ThreadingHTTPServer(("127.0.0.1", 0), BadGateway)
    threading.Thread(target=gateway.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setenv("COMET_URL_OVERRIDE", f"http://127.0.0.1:{closed_port()}/clientlib/")
    for name, value in FAIL_FAST.items():
        monkeypatch.setenv(name, value)
    silent, answering = f"http://127.0.0.1:{closed_port()}", f"http://127.0.0.1:{gateway.server_address[1]}"
    said = []
    try:
        for proxy in (silent, answering):
            monkeypatch.setenv("HTTP_PROXY", proxy)  # comet_ml's own requests go through it
            report_dir = tmp_path / proxy.rsplit(":", 1)[1]
            sink = CometSink.start(
                project="tiny-default",
                report_dir=report_dir,
                params=PARAMS,
                experiment_key=None,
                env={"COMET_API_KEY": API_KEY, "HTTP_PROXY": proxy},
            )
            for entry in STEPS:
                sink.log_step(entry)
            sink.end(timeout_s=30)
            assert sink.offline and API_KEY not in " ".join(sink.warnings + sink.messages)
            (archive,) = (report_dir / "comet").glob("*.zip")
            assert metrics_in(read_archive(archive)[1]) == EXPECTED_METRICS
            said.append(sink.warnings[0])
    finally:
        gateway.shutdown()
        gateway.server_close()
    assert said[0].startswith(f"Comet ML: the proxy 127.0.0.1:{silent.rsplit(':', 1)[1]} leads nowhere: ")
    assert said[1].startswith(
        f"Comet ML: the proxy 127.0.0.1:{gateway.server_address[1]} cannot reach 127.0.0.1 (HTTP 502)"
    )


class _GatedCometServer:
    """Holds every request until released, then answers like Comet does to a bad API key."""

    def __init__(self) -> None:
        self.release = threading.Event()
        gate = self.release

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                gate.wait(timeout=30)
                body = json.dumps({"msg": "Invalid API key", "code": 401, "sdk_error_code": 90212}).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/clientlib/"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_hanging_server_never_blocks_the_caller_and_a_bad_key_is_reported(report_dir, monkeypatch, capfd):
    server = _GatedCometServer()
    monkeypatch.setenv("COMET_URL_OVERRIDE", server.url)
    for name, value in FAIL_FAST.items():
        monkeypatch.setenv(name, value)
    try:
        started = time.monotonic()
        sink = CometSink.start(
            project="tiny-default",
            report_dir=report_dir,
            params=PARAMS,
            experiment_key=None,
            env={"COMET_API_KEY": API_KEY},
        )
        for entry in STEPS:
            sink.log_step(entry)
        sink.log_assets([report_dir / "report.md"])
        sink.end(timeout_s=0.5)
        assert time.monotonic() - started < 3
        assert sink.warnings == [
            "Comet ML: still busy after 0.5 s at the end of the run; stopped waiting, so Comet may miss the last data"
        ]

        server.release.set()  # Comet now answers: 401, bad key
        deadline = time.monotonic() + 15
        while len(sink.warnings) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.close()

    assert len(sink.warnings) == 2  # a key the server refuses: the run goes to the offline archive, said why
    assert sink.warnings[1].startswith("Comet ML: the online experiment did not start (")
    assert "Invalid API key" in sink.warnings[1] and "logging offline to" in sink.warnings[1]
    assert sink.offline
    assert API_KEY not in " ".join(sink.warnings + sink.messages)
    printed = capfd.readouterr()  # comet_ml's own error lines are the warning above, not a console traceback
    assert "COMET" not in printed.err + printed.out and "Traceback" not in printed.err


def test_an_unusable_report_dir_disables_the_sink_without_raising(tmp_path):
    not_a_folder = tmp_path / "report.md"
    not_a_folder.write_text("a file where the report folder should be")
    sink = CometSink.start(project="tiny", report_dir=not_a_folder, params=PARAMS, experiment_key=None, env={})
    sink.log_step(STEPS[0])
    sink.log_assets([not_a_folder])
    sink.end()

    assert len(sink.warnings) == 1
    assert sink.warnings[0].startswith("Comet ML: setting up comet_ml failed (")
    assert "nothing more is sent to Comet" in sink.warnings[0]


def test_importing_the_sinks_loads_neither_vendor_library():
    code = (
        "import sys, kaio.sinks, kaio.sinks.comet, kaio.sinks.hub; "
        "print(sorted(m for m in ('comet_ml', 'huggingface_hub') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_evaluations_reach_the_offline_archive_at_their_step(tmp_path):
    report_dir = tmp_path / "docs" / "reports" / "tiny-default"
    sink = CometSink.start(project="tiny-default", report_dir=report_dir, params=PARAMS, experiment_key=None, env={})
    sink.log_step(STEPS[0])
    sink.log_eval(EvalEntry(step=1, session=1, metrics={"eval_loss": 2.25, "eval_accuracy": 0.5, "eval_bad": None}))
    # The script's evaluate() after the training (of the best checkpoint's weights): at the last step, named apart.
    sink.log_eval(EvalEntry(step=1, session=1, metrics={"eval_loss": 2.75}, after_training=True))
    sink.end()
    assert sink.warnings == []
    _experiment, messages, _members = read_archive(report_dir / "comet" / f"{sink.experiment_key}.zip")
    metrics = metrics_in(messages)
    assert metrics[("eval_loss", 1)] == 2.25 and metrics[("eval_accuracy", 1)] == 0.5
    assert ("eval_bad", 1) not in metrics
    assert metrics[("after_training/eval_loss", 1)] == 2.75


def test_a_job_of_several_machines_is_one_experiment_with_its_nodes_tagged(report_dir):
    from kaio.record.types import NodeSummary

    sink = CometSink.start(project="job", report_dir=report_dir, params=PARAMS, experiment_key=None, env={})
    sink.log_nodes(
        [
            NodeSummary(node_rank=0, host="gpu07", status="COMPLETED", gpus=["nvml:0"], energy_j=3.6e6),
            NodeSummary(node_rank=1, host="gpu08", status="LOST", gpus=["n1/nvml:0"], clock_offset_s=-0.0042),
        ]
    )
    sink.end()
    assert sink.warnings == []
    experiment, messages, _ = read_archive(report_dir / "comet" / f"{sink.experiment_key}.zip")
    assert sorted(experiment["tags"]) == ["kaio", "node0:gpu07", "node1:gpu08", "nodes:2"]
    others = {m["payload"]["key"]: m["payload"]["value"] for m in messages if m["type"] == "log_other"}
    assert others["node0|energy_kwh"] == 1.0 and others["node1|status"] == "LOST"
    assert others["node1|clock_offset_ms"] == pytest.approx(-4.2) and "node0|clock_offset_ms" not in others

"""A job of several machines: two "nodes" on 127.0.0.1 (two `kaio run`, one CPU rank each on gloo), one report;
the same report from copied node folders with `kaio report --merge`; SLURM's variables read into the right commands."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from conftest import REPO, journal_steps, kaio, read_history, wait_for, write_config
from kaio.record.paths import ProjectPaths


def _fake_gpu_site(directory, watts: int):
    """A folder whose ``pynvml`` is the test fake with one GPU drawing ``watts``: on the PYTHONPATH of a node."""
    site = directory / f"site-{watts}"
    site.mkdir()
    (site / "pynvml.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from fakes.fake_pynvml import FakeNvidiaGpu, FakeNvml\n"
        f"gpus = [FakeNvidiaGpu(uuid='GPU-{watts}0000-d72c-4106-c12f-20bd9faed9f6', power_mw={watts * 1000})]\n"
        "sys.modules[__name__] = FakeNvml(gpus).module()\n"
    )
    return str(site)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str], head_dir: Path, node_dir: Path, node_env: dict, head_env: dict):
    """One command of a two-node job on this machine: node 1's kaio started first (in ``node_dir``), then the
    head's, to its end; both succeed. Returns the head's result and node 1's output."""
    node1 = subprocess.Popen(
        [sys.executable, "-m", "kaio", *args, "--node-rank", "1"],
        cwd=node_dir,
        env=node_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        head = kaio(*args, "--node-rank", "0", cwd=head_dir, timeout=240, env=head_env)
        node1_out, _ = node1.communicate(timeout=120)
    finally:
        if node1.poll() is None:
            node1.kill()
    assert head.returncode == 0, head.stdout + head.stderr
    assert node1.returncode == 0, node1_out
    return head, node1_out


def test_two_nodes_make_one_job_and_one_report_and_copied_node_folders_merge_the_same(project_dir):
    """Two machines without a shared filesystem: node 1 writes its record in its own folder and streams it to
    the head over TCP (signed with the job's secret); the head's report has both, as it goes and at the end."""
    port, stream_port = _free_port(), _free_port()
    machine_b = project_dir / "machine-b"  # node 1's working directory: nothing shared with the head's
    machine_b.mkdir()
    shared_checkpoints = project_dir / "shared-storage" / "checkpoints"  # every node loads them when resuming
    for where in (project_dir, machine_b):
        cfg = write_config(where, max_steps=10)
        text = cfg.read_text().replace("launch:\n", f"launch:\n  stream_port: {stream_port}\n")
        cfg.write_text(text.replace("training:\n", f"training:\n  output_dir: {shared_checkpoints}\n"))
    job = ["--nnodes", "2", "--main-addr", "127.0.0.1", "--main-port", str(port), "--plain"]
    secret = {"KAIO_JOB_SECRET": "b7f0c2d4e6a8b0c2d4e6f8a0b2c4d6e8"}
    env = {**os.environ, **secret, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _fake_gpu_site(project_dir, 350)}
    head_gpu = _fake_gpu_site(project_dir, 300)
    head, node1_out = _two_nodes(
        ["run", "cfg.yaml", *job], project_dir, machine_b, env, {**secret, "PYTHONPATH": head_gpu}
    )
    host = socket.gethostname().split(".")[0]
    node_folder = machine_b / "docs" / "reports" / "t" / "nodes" / f"1-{host}"  # on node 1's own disk
    assert f"record: docs/reports/t/nodes/1-{host}/report.md" in node1_out
    assert "| node1 live" in head.stdout  # the head followed node 1 while the job ran, over the stream
    copy = project_dir / "docs" / "reports" / "t" / "nodes" / f"1-{host}"
    assert (copy / "journal.jsonl").read_bytes() == (node_folder / "journal.jsonl").read_bytes()
    from kaio.run import recorder as loading

    indexed = loading.load(ProjectPaths(copy), writable=False)  # the head indexed its copy: nothing to replay
    indexed.state.index.close()
    assert indexed.from_index and indexed.replayed == 0 and indexed.state.last_step == 10
    assert "b7f0c2d4e6a8" not in "".join(
        p.read_text(errors="replace")
        for p in [*project_dir.rglob("*"), *machine_b.rglob("*")]
        if p.is_file() and p.suffix in (".md", ".json", ".jsonl", ".log", ".yaml")
    )

    history = read_history(project_dir)
    run = history["run"]
    assert run["world_size"] == 2
    assert [(n["node_rank"], n["status"], n["folder"]) for n in run["nodes"]] == [
        (0, "COMPLETED", None),
        (1, "COMPLETED", f"1-{host}"),
    ]
    assert [s["step"] for s in history["steps"]] == list(range(1, 11))  # every step once
    assert all(set(s["peak_vram_bytes"]) == {"0", "1"} for s in history["steps"])  # both nodes' ranks
    assert all(s["loss"] is not None for s in history["steps"])
    assert not [w for w in history["warnings"] if "world size" in w]  # 1 process x 2 nodes, as launched
    # Each node's GPU under its own key; the step's flat figures cover both; each node's energy is its own.
    assert [d["key"] for d in history["devices"]] == ["nvml:0", "n1/nvml:0"]
    sampled = [s for s in history["steps"] if set(s["gpus"]) == {"nvml:0", "n1/nvml:0"}]
    assert len(sampled) >= 8 and all(s["power_avg"] == pytest.approx(650.0) for s in sampled)
    head_node, other_node = run["nodes"]
    assert head_node["gpus"] == ["nvml:0"] and other_node["gpus"] == ["n1/nvml:0"]
    assert (head_node["power_avg_w"], other_node["power_avg_w"]) == (pytest.approx(300.0), pytest.approx(350.0))
    assert head_node["energy_j"] == history["devices"][0]["energy_j"] != other_node["energy_j"]
    assert head_node["clock_offset_s"] is None  # the reference
    assert 0 < other_node["clock_rtt_s"] < 1 and abs(other_node["clock_offset_s"]) <= other_node["clock_rtt_s"]
    node_history = json.loads((node_folder / "history.json").read_text())
    assert node_history["project"] == "t" and [s["step"] for s in node_history["steps"]] == list(range(1, 11))
    assert all(s["t_mono"] is not None for s in node_history["steps"])  # timed by its own first rank (rank 1)
    report = (project_dir / "docs/reports/t/report.md").read_text()
    assert "## Nodes" in report and "2 machines, one job (world size 2)" in report
    assert f"| 1 | {host} | 1 × NVIDIA H100 80GB HBM3 |" in report and " ms (± " in report

    unplaced = kaio("resume", "t", cwd=project_dir)
    assert unplaced.returncode == 2 and "the job ran on 2 machines: run `kaio resume` on each" in unplaced.stderr
    regrown = kaio("resume", "t", "--nnodes", "3", "--node-rank", "0", cwd=project_dir)
    assert regrown.returncode == 2 and "the job ran on 2 machine(s), not 3" in regrown.stderr

    # A node folder of another job (its launch differs from the head's) or moved aside is not merged.
    from kaio.run.job import load_nodes, node_folders

    shutil.copytree(copy, copy.with_name(f"{copy.name}.replaced-20261130-120000"))
    head_config = json.loads((project_dir / "docs/reports/t/config.json").read_text())
    folders = node_folders(ProjectPaths(project_dir / "docs/reports/t"))
    assert folders == [copy]
    other_job = {**head_config, "launch": {**head_config["launch"], "main_port": 1}}
    found = load_nodes(folders, other_job)
    assert found.nodes == [] and found.problems[0] == (
        f"node folder {copy.name}: not merged (not a node of the job as the head last ran it: its launch.main_port is {int(port)}, the head's 1)"
    )
    assert found.problems[1:] == [  # the job's node 1 is then not in the record: said, with the way to add it
        f"node 1 of 2: not in the job's record: its folder {copy.name} was not merged (the warning before this one "
        "says why)"
    ]
    shutil.rmtree(copy.with_name(f"{copy.name}.replaced-20261130-120000"))
    # The head's address spelt another way on the head (localhost for 127.0.0.1): one job still.
    spelt = {**head_config, "launch": {**head_config["launch"], "main_addr": "localhost"}}
    assert [n.node_rank for n in load_nodes(folders, spelt).nodes] == [1]

    # Without a stream: the node's folder copied from its machine, merged by `kaio report --merge`. The same
    # history, but for the clock, which only a stream measures.
    copied = project_dir / "from-node-1" / node_folder.name
    shutil.copytree(node_folder, copied)
    both = load_nodes([copy, copied], head_config, explicit=[copied])  # the streamed copy, and the node's own
    assert [n.folder for n in both.nodes] == [copied]
    assert f"node 1: {copied} is merged in place of {copy} (the same node's record; the one given is taken)" in (
        both.problems
    )
    shutil.rmtree(copy.parent)
    merged = kaio("report", "t", "--merge", str(copied), cwd=project_dir)
    assert merged.returncode == 0, merged.stderr
    remerged = read_history(project_dir)
    assert remerged["run"]["nodes"][1]["clock_offset_s"] is None
    assert remerged["run"]["nodes"][1]["folder"] == str(copied.resolve())  # where the merged record is
    for nodes in (remerged["run"]["nodes"], history["run"]["nodes"]):
        nodes[1].update(clock_offset_s=None, clock_rtt_s=None, folder=None)
    assert {**remerged, "generated_at": None} == {**history, "generated_at": None}
    assert f"remembered {copied.resolve()} in merged-nodes.json" in merged.stdout + merged.stderr
    assert f"| {copied.resolve()} |" in (project_dir / "docs/reports/t/report.md").read_text()  # where it is
    again = kaio("report", "t", "--json", cwd=project_dir)  # a later report merges it again, untold
    assert again.returncode == 0 and [n["node_rank"] for n in json.loads(again.stdout)["nodes"]] == [0, 1]

    # The job resumes (--max-steps 14) with node 1 on "another machine": its record, renamed for the host it ran
    # on before (gpu08), is taken over and continued; the head still holds its old copy under that name, which
    # the job's report leaves out for the continued record. Every step once, both ranks in each.
    before = machine_b / "docs/reports/t/nodes/1-gpu08"
    node_folder.rename(before)
    shutil.copytree(copied, project_dir / "docs/reports/t/nodes/1-gpu08")
    resume = ["resume", "t", "--max-steps", "14", *job[2:]]
    head, node1_out = _two_nodes(resume, project_dir, machine_b, env, {**secret, "PYTHONPATH": head_gpu})
    assert f"node 1's record moved from nodes/1-gpu08 to nodes/{node_folder.name}" in node1_out
    assert not before.exists() and (node_folder / "journal.jsonl").is_file()
    history = read_history(project_dir)
    assert [s["step"] for s in history["steps"]] == list(range(1, 15))
    assert all(set(s["peak_vram_bytes"]) == {"0", "1"} for s in history["steps"])
    assert [(n["node_rank"], n["status"], n["folder"]) for n in history["run"]["nodes"]] == [
        (0, "COMPLETED", None),
        (1, "COMPLETED", f"1-{host}"),
    ]
    assert (
        f"node folder 1-gpu08: not merged (an earlier record of node 1; 1-{host} is its latest)" in history["warnings"]
    )
    assert [s["kind"] for s in history["sessions"]] == ["run", "resume"]
    node_history = json.loads((node_folder / "history.json").read_text())
    assert [s["kind"] for s in node_history["sessions"]] == ["run", "resume"]
    assert [s["step"] for s in node_history["steps"]] == list(range(1, 15))
    assert any("record moved from nodes/1-gpu08" in note for note in node_history["telemetry"]["notes"])
    assert (copy / "journal.jsonl").read_bytes() == (node_folder / "journal.jsonl").read_bytes()  # streamed again


def test_slurm_variables_give_every_nodes_command_and_a_loopback_head_is_refused(project_dir):
    write_config(project_dir)
    slurm = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "0",  # inside `srun`
        "SLURM_NNODES": "4",  # the allocation; the step runs on 3 of its nodes
        "SLURM_STEP_NUM_NODES": "3",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
        "SLURM_STEP_NODELIST": "gpu[07-08],gpu10",
    }
    result = kaio("run", "cfg.yaml", "--dry-run", cwd=project_dir, env={**slurm, "KAIO_JOB_SECRET": "s3cr3t-of-77"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "records: streamed to the head on port 29501 (KAIO_JOB_SECRET set, masked)"
    assert "s3cr3t-of-77" not in result.stdout
    assert lines[0].startswith("kaio run --dry-run: project t, 3 node(s) x 1 process(es), from SLURM")
    assert [line for line in lines if line.startswith("node ")] == [
        "node 0 on gpu07:",
        "node 1 on gpu08:",
        "node 2 on gpu10 (this node):",
    ]
    commands = [line for line in lines if line.startswith("  command: ")]
    for rank, command in enumerate(commands):
        assert (
            f"--num_machines 3 --machine_rank {rank} --num_processes 3 --main_process_ip gpu07 --main_process_port 29500 "
            "--rdzv_backend static"
        ) in command
    environments = [line for line in lines if line.startswith("  environment: ")]
    assert "KAIO_NODE_RANK=2 " in environments[2] and "/docs/reports/t/nodes/2-gpu10/errors" in environments[2]
    assert "KAIO_ERROR_DIR=" + str(project_dir / "docs/reports/t/errors") in environments[0]
    assert not (project_dir / "docs").exists()  # nothing was started or written

    # The batch script itself (not an `srun` step) is one machine's run; a node rank given is the user's.
    batch = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}
    alone = kaio("run", "cfg.yaml", "--dry-run", cwd=project_dir, env=batch)
    assert alone.returncode == 0 and "1 node(s) x 1 process(es), from the config" in alone.stdout
    assert "note: SLURM_NNODES=4, but this is not inside `srun` (no SLURM_STEP_ID)" in alone.stdout  # said, not silent

    refused = kaio("run", "cfg.yaml", "--dry-run", "--main-addr", "127.0.0.1", cwd=project_dir, env=slurm)
    assert refused.returncode != 0 and refused.stderr.strip().count("\n") == 0
    assert "127.0.0.1 is this machine only, but the job's nodes include gpu07, gpu08, gpu10" in refused.stderr


def test_a_resumed_job_takes_this_nodes_place_from_srun_or_the_command_line_and_keeps_its_node_count():
    """The saved config is the head's (node rank 0): which node this is comes from SLURM or --node-rank; the
    head's address and port from SLURM's new allocation, the command line, or as saved."""
    from kaio.config import LaunchConfig
    from kaio.errors import ConfigError
    from kaio.nodes import resume_placement

    saved = LaunchConfig(nnodes=2, node_rank=0, main_addr="gpu01", main_port=29500)
    srun = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[11-12]"}
    where = resume_placement(saved, {}, srun)  # another allocation: other machines
    assert (where.nnodes, where.node_rank, where.main_addr, where.main_port, where.source) == (
        2,
        1,
        "gpu11",
        29500,
        "SLURM",
    )
    by_hand = resume_placement(saved, {"node_rank": 1, "main_port": 29600}, {})
    assert (by_hand.nnodes, by_hand.node_rank, by_hand.main_addr, by_hand.main_port) == (2, 1, "gpu01", 29600)
    for unplaced in ({}, {"nnodes": 2}):  # without saying which node this is, not the head by default
        with pytest.raises(ConfigError, match="the job ran on 2 machines: run `kaio resume` on each"):
            resume_placement(saved, unplaced, {})
    with pytest.raises(ConfigError, match=r"the job ran on 2 machine\(s\), not 3 \(the command line\)"):
        resume_placement(saved, {"nnodes": 3, "node_rank": 0}, {})
    with pytest.raises(ConfigError, match=r"the job ran on 2 machine\(s\), not 3 \(SLURM\)"):
        resume_placement(saved, {}, {**srun, "SLURM_STEP_NUM_NODES": "3", "SLURM_STEP_NODELIST": "gpu[11-13]"})
    alone = resume_placement(LaunchConfig(), {}, {})  # a job of one machine resumes as before
    assert (alone.nnodes, alone.node_rank) == (1, 0)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a1,b[9-11]x,c", ["a1", "b9x", "b10x", "b11x", "c"]),
        ("node[008-010]", ["node008", "node009", "node010"]),
        ("a[1-2]-b[3-4],c", ["a1-b3", "a1-b4", "a2-b3", "a2-b4", "c"]),  # several brackets: the first outermost
    ],
)
def test_slurm_node_lists_are_expanded_in_python(nodelist, hosts):
    from kaio.nodes import expand_nodelist

    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[01-", "gpu]1[", "gpu[a-b]", "gpu[1-2]x[3"])
def test_a_slurm_node_list_kaio_cannot_read_is_one_line(nodelist):
    from kaio.errors import ConfigError
    from kaio.nodes import expand_nodelist

    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST: cannot read"):
        expand_nodelist(nodelist)


def test_a_node_rank_outside_the_job_and_a_job_without_a_head_address_are_one_line(project_dir):
    write_config(project_dir)
    outside = kaio("run", "cfg.yaml", "--nnodes", "2", "--node-rank", "2", "--main-addr", "h", cwd=project_dir)
    assert outside.returncode != 0
    assert outside.stderr.strip() == (
        "kaio: error: launch.node_rank (the command line): 2 is not one of the job's nodes 0..1"
    )
    headless = kaio("run", "cfg.yaml", "--nnodes", "2", "--dry-run", cwd=project_dir)
    assert headless.returncode != 0 and "needs the head node's address (--main-addr HOST" in headless.stderr


def test_starting_the_head_over_moves_the_old_node_records_aside_but_not_a_live_nodes(tmp_path):
    """`kaio run --overwrite` on the head moves its old record aside; a node of the new job that has already
    opened (and locked) its folder under nodes/ keeps it."""
    from kaio.config import config_from_dict
    from kaio.record.lock import ProjectLock
    from kaio.run.project import move_aside

    cfg = config_from_dict(
        {
            "project_name": "t",
            "reporting": {"output_dir": str(tmp_path)},
            "training": {"output_dir": str(tmp_path / "ck")},
        }
    )
    project = tmp_path / "t"
    for folder in (project, project / "nodes" / "1-live", project / "nodes" / "2-old"):
        folder.mkdir(parents=True)
        (folder / "journal.jsonl").write_text("")
    with ProjectLock(project / "nodes" / "1-live"):
        ((what, moved),) = move_aside(cfg, [cfg.checkpoint_dir])
    assert what == "record"
    assert (project / "nodes" / "1-live" / "journal.jsonl").is_file()  # the live node's, left in place
    assert not (project / "journal.jsonl").exists() and not (project / "nodes" / "2-old").exists()
    assert (moved / "journal.jsonl").is_file() and (moved / "nodes" / "2-old" / "journal.jsonl").is_file()


def test_the_head_follows_the_other_nodes_journals_and_says_when_one_is_lost(tmp_path):
    """A node is heard when its journal grows, on the head's clock: stale after 10 s of silence, lost after 60
    (said once), live again when it writes; its session's end says how it ended. The dashboard shows them."""
    from test_dashboard import make_snapshot, text_of

    from kaio.dashboard import plain_line, render
    from kaio.devices.base import DeviceInfo, GpuSample
    from kaio.record.types import Devices, SessionEnd, SessionStart, Status, Step, TickRecord, encode_record
    from kaio.run.node_watch import NodeWatch

    clock = [1000.0]
    project = tmp_path / "t"
    journal = project / "nodes" / "1-gpu08" / "journal.jsonl"
    journal.parent.mkdir(parents=True)

    def append(*records):
        with open(journal, "ab") as f:
            f.write(b"".join(encode_record(r) for r in records))

    append(
        SessionStart(session=1),
        Devices(devices=[DeviceInfo("nvml", 0, "H100"), DeviceInfo("nvml", 1, "H100")]),
        TickRecord(
            gpus=[
                GpuSample("nvml:0", 1.0, 1.0, power_w=300.0, util_pct=90.0),
                GpuSample("nvml:1", 1.0, 1.0, power_w=310.0, util_pct=80.0),
            ]
        ),
        Step(rank=8, step=41),
    )
    watch = NodeWatch(ProjectPaths(project), now=lambda: clock[0])
    assert watch.poll(force=True) == []
    (row,) = watch.rows()
    assert (row.node_rank, row.host, row.state, row.step, row.gpus) == (1, "gpu08", "live", 41, 2)
    assert row.util == pytest.approx(85.0) and row.power_w == pytest.approx(610.0)

    clock[0] += 11
    assert watch.poll(force=True) == [] and watch.rows()[0].state == "stale"
    clock[0] += 50
    assert watch.poll(force=True) == ["node 1 (gpu08) lost: nothing from it for 61 s (last at step 41)"]
    assert watch.poll(force=True) == []  # said once
    lost = watch.rows()
    snapshot = make_snapshot(nodes=lost)
    assert "node1 lost" in plain_line(snapshot)
    assert "lost (61 s)" in text_of(render(snapshot)) and "2 GPUs" in text_of(render(snapshot))

    append(Step(rank=8, step=42))  # heard again
    clock[0] += 1
    watch.poll(force=True)
    assert (watch.rows()[0].state, watch.rows()[0].step) == ("live", 42)
    append(SessionEnd(session=1, status=Status.COMPLETED))
    clock[0] += 100
    assert watch.poll(force=True) == [] and watch.rows()[0].state == "completed"  # ended: never lost

    # The node started over (--overwrite): a new journal file, read from its start, whatever its size.
    journal.rename(journal.with_name("old.jsonl"))
    append(SessionStart(session=1), *[Step(rank=8, step=n) for n in range(1, 400)])
    clock[0] += 1
    watch.poll(force=True)
    assert (watch.rows()[0].state, watch.rows()[0].step) == ("live", 399)

    # A node started with another --nnodes than the head's: both wait in torch's rendezvous for 15 minutes, the
    # head showing the node live all along. Said once, at the node's session start.
    launch = {"nnodes": 2, "main_addr": "127.0.0.1", "main_port": 29610}
    shaped = NodeWatch(ProjectPaths(project), now=lambda: clock[0], head_config={"launch": {**launch, "nnodes": 3}})
    append(SessionStart(session=2, config={"launch": launch}))
    said = shaped.poll(force=True)
    assert said == [
        "node 1 (gpu08) was started for another job shape: its launch.nnodes is 2, the head's 3. The nodes wait "
        "for each other in torch's rendezvous (up to 15 minutes): stop every node and start them again with the "
        "same --nnodes, --main-addr and --main-port"
    ]
    assert shaped.poll(force=True) == []
    same = NodeWatch(
        ProjectPaths(project), now=lambda: clock[0], head_config={"launch": {**launch, "main_addr": "localhost"}}
    )
    assert same.poll(force=True) == []  # one machine's address spelt another way: one job
    # Another learning rate on node 1: said as its session starts, not only in the job's report at the end.
    append(SessionStart(session=3, config={"launch": {**launch, "script_args": ["--learning_rate", "5e-3"]}}))
    head = {"launch": {**launch, "script_args": ["--learning_rate", "1e-3"]}}
    assert NodeWatch(ProjectPaths(project), now=lambda: clock[0], head_config=head).poll(force=True) == [
        "node 1 trained with another config than the head's: launch.script_args: ['--learning_rate', '1e-3'] -> "
        "['--learning_rate', '5e-3']"
    ]
    # A resume whose head starts first: node 1's last session start is its earlier session's (another max_steps,
    # as that session ran), not a config of this session's: nothing to say until node 1 starts its own.
    import time

    append(SessionStart(session=4, t_wall=time.time() - 3600, config={"launch": launch, "training": {"max_steps": 6}}))
    resumed = {"launch": launch, "training": {"max_steps": 9}}
    resumed_head = NodeWatch(ProjectPaths(project), now=lambda: clock[0], head_config=resumed)
    assert resumed_head.poll(force=True) == []
    append(SessionStart(session=5, t_wall=time.time(), config=resumed))
    clock[0] += 3
    assert resumed_head.poll(force=True) == []
    # An earlier session that started less than 2 minutes before (a short run, resumed at once): it ended.
    earlier = {"launch": launch, "training": {"max_steps": 4}}
    append(
        SessionStart(session=6, t_wall=time.time() - 50, config=earlier), SessionEnd(session=6, status=Status.COMPLETED)
    )
    assert NodeWatch(ProjectPaths(project), now=lambda: clock[0], head_config=resumed).poll(force=True) == []


def test_a_node_that_failed_or_trained_another_config_than_the_head_is_a_warning_of_the_job():
    """Node 1 ran --max_steps 34 --learning_rate 5e-3 where the head ran 30 and 1e-3 (DDP averaged gradients
    applied at two rates), and failed after the head had completed: the job's report said COMPLETED, no warning."""
    from kaio.record.index import RunIndex
    from kaio.record.types import HistoryHeader, Session, Status, StepEntry
    from kaio.run.job import NodeRecord, NodeRecords, merge

    args = ["--output_dir", "out", "--max_steps", "30", "--learning_rate", "1e-3", "--report_to", "none"]
    config = {"launch": {"node_rank": 0, "main_addr": "gpu07", "script_args": args}, "reporting": {"poll_hz": 2}}
    head = HistoryHeader(
        project="t", status=Status.COMPLETED, sessions=[Session(session=1, exit_code=0)], config=config
    )
    theirs = [*args[:3], "34", args[4], "5e-3", *args[6:]]
    other = {"launch": {"node_rank": 1, "main_addr": "10.0.0.7", "script_args": theirs}, "reporting": {"poll_hz": 4}}
    failed = Session(session=1, status=Status.FAILED, exit_code=1, error="rank 1: RuntimeError: Connection closed")
    node = HistoryHeader(project="t", status=Status.FAILED, sessions=[failed], config=other)
    index = RunIndex.in_memory()
    index.add_step(StepEntry(step=1, session=1))
    job, _ = merge(
        head, index, NodeRecords([NodeRecord(1, Path("1-gpu08"), node, {1: StepEntry(step=1, session=1)})], [])
    )
    assert job.warnings == [
        "node 1 FAILED (exit code 1): rank 1: RuntimeError: Connection closed",
        "node 1 trained with another config than the head's: launch.script_args: --max_steps 30 -> --max_steps 34; "
        "--learning_rate 1e-3 -> --learning_rate 5e-3",
    ]
    alike, _ = merge(
        head, index, NodeRecords([NodeRecord(1, Path("1-gpu08"), head, {1: StepEntry(step=1, session=1)})], [])
    )
    assert alike.warnings == []  # the node's own address, rank and sinks are its own


def test_a_node_whose_record_never_ended_is_lost_in_the_job_report_once_the_head_has_ended():
    from kaio.record.index import RunIndex
    from kaio.record.types import HistoryHeader, RunDescription, Session, Status, StepEntry
    from kaio.run.job import NodeRecord, NodeRecords, merge

    head = HistoryHeader(project="t", status=Status.COMPLETED, sessions=[Session(session=1, exit_code=0)])
    node = HistoryHeader(project="t", status=Status.RUNNING, sessions=[Session(session=1)])
    head_index = RunIndex.in_memory()
    for step in (1, 2, 3):
        head_index.add_step(StepEntry(step=step, session=1, peak_vram_bytes={"0": 10}))
    node_steps = {1: StepEntry(step=1, session=1, peak_vram_bytes={"1": 20})}
    head = msgspec.structs.replace(head, run=RunDescription(world_size=2))
    merged_header, merged = merge(head, head_index, NodeRecords([NodeRecord(1, Path("1-gpu08"), node, node_steps)], []))
    assert [(n.node_rank, n.status) for n in merged_header.run.nodes] == [(0, "COMPLETED"), (1, "LOST")]
    assert "node 1: 2 of the head's steps not in its record, and 0 of its steps not in the head's (not merged)" in (
        merged_header.warnings
    )
    entries = [json.loads(line) for line in merged.step_lines()]
    assert [e["peak_vram_bytes"] for e in entries] == [{"0": 10, "1": 20}, {"0": 10}, {"0": 10}]
    assert (merged_header.run.nodes[1].last_step, merged_header.run.nodes[1].last_step_at) == (1, None)


def _light_job(project_dir: Path, steps: tuple[int, int], step_s: float, poll_hz: float = 2):
    """A two-node job of the torch-free light loop (for tests about processes), node 1 in ``machine-b``, started
    first; ``steps``: the head's and node 1's. Returns the head's and node 1's processes, and node 1's folder."""
    port, stream_port = _free_port(), _free_port()
    machine_b = project_dir / "machine-b"
    machine_b.mkdir()
    script = REPO / "tests" / "scripts" / "light_loop.py"
    for where, n in zip((project_dir, machine_b), steps):
        (where / "cfg.yaml").write_text(
            f"project_name: t\nlaunch:\n  script: {script}\n"
            f"  script_args: ['{n}', '--step-seconds', '{step_s}']\n  stream_port: {stream_port}\n"
            f"reporting:\n  use_comet_ml: false\n  poll_hz: {poll_hz}\n"
        )
    head, node1 = _start_job(project_dir, machine_b, port, secret="c0ffee" * 6)
    return head, node1, machine_b


def _start_job(head_dir: Path, node_dir: Path, port: int, secret: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    """`kaio run cfg.yaml` of a two-node job on this machine, node 1 (in ``node_dir``) started first; their
    output in pipes. Returns the head's and node 1's processes."""
    job = ["run", "cfg.yaml", "--nnodes", "2", "--main-addr", "127.0.0.1", "--main-port", str(port), "--plain"]
    env = {**os.environ, "KAIO_JOB_SECRET": secret, "PYTHONUNBUFFERED": "1"}
    spawn = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node1 = subprocess.Popen([sys.executable, "-m", "kaio", *job, "--node-rank", "1"], cwd=node_dir, **spawn)
    head = subprocess.Popen([sys.executable, "-m", "kaio", *job, "--node-rank", "0"], cwd=head_dir, **spawn)
    return head, node1


def _kill_left(*processes: subprocess.Popen) -> None:
    """Whatever of a job a failed assertion left running."""
    for proc in processes:
        if proc.poll() is None:
            proc.kill()


def test_a_node_whose_kaio_is_killed_is_lost_on_the_head_which_does_not_wait_for_it(project_dir):
    """Node 1's kaio killed (SIGKILL) mid-run: its rank trains on (the engine's decision, and kaio's promise
    that a killed supervisor loses no training), its stream to the head ends without its end, and the head,
    once done, does not wait out the silence: node 1 is LOST in the job's report, with the step it was last
    heard of. What the rank spooled meanwhile is not lost: `kaio report` of the node's folder on its machine
    merges it (as a node's record, not a job's), and the head merges that folder. (On a shared folder the head
    merges a killed node's spool itself: test_the_head_merges_a_killed_nodes_spool_...)"""
    import psutil

    head, node1, machine_b = _light_job(project_dir, (100, 100), step_s=0.04, poll_hz=4)
    orphans: list = []
    host = socket.gethostname().split(".")[0]
    try:
        copy = project_dir / "docs/reports/t/nodes" / f"1-{host}" / "journal.jsonl"
        deadline = time.monotonic() + 150
        while not (copy.is_file() and copy.read_bytes().count(b'"type":"step"') >= 3):
            assert time.monotonic() < deadline and head.poll() is None, "node 1's steps never reached the head"
            time.sleep(0.1)
        orphans = psutil.Process(node1.pid).children(recursive=True)
        node1.kill()
        node1.communicate(timeout=30)
        out, _ = head.communicate(timeout=200)
        psutil.wait_procs(orphans, timeout=60)  # node 1's rank trains to its end, spooling
    finally:
        for process in [node1, head, *orphans]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                process.kill()
    assert head.returncode == 0, out
    assert "did not record their end" in out
    history = read_history(project_dir)
    assert history["status"] == "COMPLETED" and max(s["step"] for s in history["steps"]) == 100
    lost = history["run"]["nodes"][1]
    assert lost["status"] == "LOST" and 3 <= lost["last_step"] < 100 and lost["last_step_at"]
    report = (project_dir / "docs/reports/t/report.md").read_text()
    assert f"| LOST (last heard of at step {lost['last_step']}, {lost['last_step_at'][:10]}" in report

    # On node 1's machine: its own record brought up to date (its spool merged), then merged on the head.
    own = machine_b / "docs/reports/t/nodes" / f"1-{host}"
    alone = kaio("report", own.name, "--output-dir", str(own.parent), cwd=machine_b)
    assert alone.returncode == 0 and "merged" in alone.stdout, alone.stdout + alone.stderr
    assert "no record of it here" not in alone.stdout + alone.stderr  # a node's record: not a job's
    assert "## Nodes" not in (own / "report.md").read_text()
    again = kaio("report", "t", "--merge", str(own), cwd=project_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    node = read_history(project_dir)["run"]["nodes"][1]
    assert (node["status"], node["last_step"]) == ("COMPLETED", 100)
    # The clock the head measured over the stream stays: the folder merged by hand holds no probe of it.
    assert lost["clock_offset_s"] is not None and node["clock_offset_s"] == lost["clock_offset_s"]


def test_a_node_stopped_alone_does_not_hold_the_head_at_torchs_exit_barrier(project_dir):
    """A Ctrl-C on node 1 only: its agent shut down without arriving at torch elastic's exit barrier, and the
    head's agent, its rank done, waited there 5 minutes, the head saying RUNNING. Ranks without a process group
    (the light loop): the head's trains to its end, as a rank whose collective did not fail would."""
    import signal

    head, node1, _ = _light_job(project_dir, (60, 2000), step_s=0.05)
    try:
        wait_for(lambda: journal_steps(project_dir) >= 60, 150, "the head's rank to train its 60 steps")
        time.sleep(2)  # its agent at the exit barrier, node 1 training on
        node1.send_signal(signal.SIGINT)
        node1_out, _ = node1.communicate(timeout=90)
        out, _ = head.communicate(timeout=120)  # its rank's 60 steps are 3 s: not 300 s of barrier
    finally:
        _kill_left(head, node1)
    assert node1.returncode == 143, node1_out
    assert head.returncode == 0, out
    assert "exit barrier" not in out
    history = read_history(project_dir)
    assert history["status"] == "COMPLETED" and [n["status"] for n in history["run"]["nodes"]] == [
        "COMPLETED",
        "INTERRUPTED",
    ]


def test_the_head_does_not_wait_for_a_node_whose_stream_ended_without_its_end(tmp_path):
    """At the head's end: a node whose record has not ended is waited for (its last lines may be on their
    way), unless its stream ended without its end 5 s ago or more (its kaio is gone: no reconnection)."""
    from kaio.record.types import SessionStart, encode_record
    from kaio.run.job import wait_for_nodes

    paths = ProjectPaths(tmp_path / "t")
    journal = paths.nodes / "1-gpu08" / "journal.jsonl"
    journal.parent.mkdir(parents=True)
    journal.write_bytes(encode_record(SessionStart(session=1)))
    said: list[str] = []
    assert wait_for_nodes(paths, said.append, timeout_s=30, stream_gone=lambda folder: 6.0) == ["1-gpu08"]
    assert len(said) == 1 and said[0].startswith("note: node(s) 1-gpu08 did not record their end")
    said.clear()
    assert wait_for_nodes(paths, said.append, timeout_s=0.6, stream_gone=lambda folder: 1.0) == ["1-gpu08"]
    assert said[0] == "waiting for node(s) 1-gpu08 to close their records (at most 1 s)"  # dropped just now


def test_node_flags_given_inside_srun_are_told_to_leave_the_shape_to_slurm(project_dir):
    from kaio.config import LaunchConfig
    from kaio.errors import ConfigError
    from kaio.nodes import placement

    srun = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[11-12]"}
    with pytest.raises(ConfigError, match="inside `srun`, leave out --nnodes and --node-rank: SLURM says them"):
        placement(LaunchConfig(), {"nnodes": 3}, srun)
    assert placement(LaunchConfig(), {}, srun).main_addr == "gpu11"  # as SLURM says
    from kaio.errors import ProjectError
    from kaio.record.paths import ProjectPaths
    from kaio.run.job import node_folders

    with pytest.raises(ProjectError, match=r"--merge copied/1-gpu12: no such folder \(give the node folders copied"):
        node_folders(ProjectPaths(project_dir / "p"), [Path("copied/1-gpu12")])


def test_a_ctrl_c_on_the_head_alone_stops_every_node_at_one_step_with_a_whole_checkpoint(project_dir):
    """A Ctrl-C reaches the head's kaio only (no scheduler signals every node): node 1's rank finds the head's
    proposal in the job's store and stops at the same step; the checkpoint holds both ranks' state, and both
    records say INTERRUPTED with it saved (node 1: stopped with the job)."""
    import signal

    port, stream_port = _free_port(), _free_port()
    machine_b = project_dir / "machine-b"
    machine_b.mkdir()
    shared_checkpoints = project_dir / "shared-storage" / "checkpoints"
    for where in (project_dir, machine_b):
        cfg = write_config(where, max_steps=5000, save_steps=10000)
        text = cfg.read_text().replace("launch:\n", f"launch:\n  stream_port: {stream_port}\n")
        cfg.write_text(text.replace("training:\n", f"training:\n  output_dir: {shared_checkpoints}\n"))
    head, node1 = _start_job(project_dir, machine_b, port, secret="0f1e2d3c4b5a69788796a5b4c3d2e1f0")
    try:
        wait_for(lambda: journal_steps(project_dir) >= 8, 180, "both nodes to train a few steps")
        head.send_signal(signal.SIGINT)
        head_out, _ = head.communicate(timeout=90)
        node1_out, _ = node1.communicate(timeout=90)
    finally:
        _kill_left(head, node1)
    assert head.returncode == 143, head_out
    assert node1.returncode == 143, node1_out
    history = read_history(project_dir)
    step = max(s["step"] for s in history["steps"])
    checkpoint = shared_checkpoints / f"checkpoint-{step}"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert (
        f"stopped after step {step} with checkpoint-{step} saved: `kaio resume t --node-rank R` on each node R"
        in head_out
    )
    assert f"stopped after step {step} with checkpoint-{step} saved" in node1_out
    assert "the job was stopped from another node" in node1_out or "stopped from another node" in " ".join(
        json.loads(next(machine_b.glob("docs/reports/t/nodes/*/history.json")).read_text())["telemetry"]["notes"]
    )
    assert history["status"] == "INTERRUPTED" and [n["status"] for n in history["run"]["nodes"]] == [
        "INTERRUPTED",
        "INTERRUPTED",
    ]
    # On node 1's machine the project folder holds only its node's record: said, with the command that works.
    host = socket.gethostname().split(".")[0]
    here = kaio("report", "t", cwd=machine_b)
    assert here.returncode == 2
    said = f"this machine holds node 1-{host}'s record of project 't', not the head's: `kaio report 1-{host} --output-dir docs/reports/t/nodes`"
    assert said in here.stderr
    alone = kaio("report", f"1-{host}", "--output-dir", "docs/reports/t/nodes", cwd=machine_b)
    assert alone.returncode == 0, alone.stderr
    # A node without the checkpoint (not on a shared filesystem) is told to copy the head's, not to start over.
    shared_checkpoints.rename(shared_checkpoints.with_name("elsewhere"))
    missing = kaio("resume", "t", "--node-rank", "1", cwd=machine_b, env={"KAIO_JOB_SECRET": "0f1e2d3c4b5a6978"})
    assert missing.returncode == 2
    assert "on this machine (node 1): every node loads the checkpoint the job resumes from; copy the head's" in (
        missing.stderr
    )
    assert "--overwrite" not in missing.stderr and "save_on_each_node" not in missing.stderr  # not the recipe's


def test_two_machines_started_as_one_node_keep_the_one_that_trained(monkeypatch, tmp_path):
    """gpu08 trained as node 1; gpu09 was started as node 1 too (a wrong --node-rank) and never trained: the
    job's report merges gpu08's record and says what happened, instead of calling node 1 lost."""
    from kaio.record.types import HistoryHeader, Session, StepEntry
    from kaio.run import job

    def record(host: str, steps: int, started: str) -> job.NodeRecord:
        header = HistoryHeader(project="t", sessions=[Session(session=1, started_at=started)])
        entries = {k: StepEntry(step=k, session=1) for k in range(1, steps + 1)}
        return job.NodeRecord(1, tmp_path / "nodes" / f"1-{host}", header, entries)

    made = {
        "1-gpu08": record("gpu08", 300, "2026-12-01T10:00:00"),
        "1-gpu09": record("gpu09", 0, "2026-12-01T10:00:09"),
    }
    monkeypatch.setattr(job, "_load_node", lambda folder, config, notify: made[folder.name])
    for name in made:  # the folders as node_folders finds them: each holds its journal
        (tmp_path / "nodes" / name).mkdir(parents=True)
        (tmp_path / "nodes" / name / "journal.jsonl").write_text("")
    found = job.load_nodes([tmp_path / "nodes" / "1-gpu08", tmp_path / "nodes" / "1-gpu09"], None)
    assert [n.folder.name for n in found.nodes] == ["1-gpu08"]
    assert found.problems == [
        "two machines started as node 1 (1-gpu08 and 1-gpu09; one had the wrong --node-rank?): 1-gpu08, which "
        "trained, is merged; 1-gpu09 is not"
    ]


def test_a_head_whose_other_node_never_joins_names_the_rendezvous_that_timed_out(project_dir):
    """Node 1 never started: torch's rendezvous gives up (15 minutes by default; 2 s here) in the launcher,
    before any rank runs and writes an error of its own. The launcher's failure is the session's error."""
    script = REPO / "tests" / "scripts" / "light_loop.py"
    (project_dir / "cfg.yaml").write_text(
        f"project_name: t\nlaunch:\n  script: {script}\n  script_args: ['10']\n"
        "  accelerate_args: ['--rdzv_conf', 'timeout=2']\nreporting:\n  use_comet_ml: false\n"
    )
    job = ["--nnodes", "2", "--node-rank", "0", "--main-addr", "127.0.0.1", "--main-port", str(_free_port())]
    result = kaio("run", "cfg.yaml", *job, "--plain", cwd=project_dir, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    error = read_history(project_dir)["sessions"][0]["error"]
    assert error.startswith("the launcher: DistStoreError: Timed out after") and "1/2 clients joined" in error
    report = (project_dir / "docs/reports/t/report.md").read_text()
    assert "Nothing: the launcher failed before the script ran" in report
    assert "kaio.log" not in report  # no advice for a loop that never ran


def test_a_node_folder_of_another_project_is_named_as_such(tmp_path):
    from conftest import replay
    from kaio.errors import ProjectError
    from kaio.run.job import _node_record

    launch = {"nnodes": 2, "node_rank": 1, "main_addr": "10.0.0.1", "main_port": 29700}
    other = {"project_name": "other", "launch": launch}
    state = replay([{"type": "session_start", "session": 1, "config": other}])
    head = {"project_name": "t", "launch": {**launch, "node_rank": 0, "main_port": 29620}}
    with pytest.raises(ProjectError, match="a node of project 'other'"):
        _node_record(tmp_path / "1-gpu08", state, head)


def test_a_node_folder_merged_earlier_and_gone_since_is_named_not_called_never_seen(tmp_path):
    """`kaio report --merge` remembered a folder that was moved away later: the job's report said node 1 "never
    streamed to the head, and no folder of it is under nodes/", as if nothing had ever been merged."""
    from kaio.run.job import load_nodes, node_folders

    paths = ProjectPaths(tmp_path / "docs" / "reports" / "t")
    paths.report_dir.mkdir(parents=True)
    gone = tmp_path / "from-node-1" / "1-gpu08"
    paths.merged_nodes.write_text(json.dumps([str(gone)]))
    found = load_nodes(node_folders(paths), {"project_name": "t", "launch": {"nnodes": 2}})
    assert found.nodes == []
    assert found.problems == [
        f"node folder {gone}: merged by an earlier `kaio report --merge`, but it is gone",
        f"node 1 of 2: not in the job's record: its folder {gone} was not merged (the warning before this one says "
        "why)",
    ]


def test_the_head_merges_a_killed_nodes_spool_and_closes_its_session_only_where_it_can_see_its_processes(tmp_path):
    """Node 1's kaio was killed on another machine (gpu08) and its rank trains on, spooling: the head merges what
    was spooled (under the folder's lock) but cannot see that machine's processes, so the session stays open
    (a FAILED written there was permanent while the rank trained to its end). A folder of another job is never
    written to."""
    import time

    from kaio.child.emitter import EventEmitter
    from kaio.nodes import node_folder_name
    from kaio.record.types import ChildStarted, SessionStart, Status, encode_record
    from kaio.run import job
    from kaio.telemetry.protocol import RunStart, Step, TrainEnd

    launch = {"nnodes": 2, "main_addr": "10.0.0.1", "main_port": 29500}
    head = {"project_name": "t", "launch": {**launch, "node_rank": 0}}

    def node_folder(name: str, project: str, pid: int = os.getpid()) -> Path:  # the launcher's pid: alive
        folder = tmp_path / "t" / "nodes" / name
        folder.mkdir(parents=True)
        config = {"project_name": project, "launch": {**launch, "node_rank": 1}}
        (folder / "config.json").write_text(json.dumps(config))
        with open(folder / "journal.jsonl", "wb") as f:
            f.write(encode_record(SessionStart(session=1, config=config)))
            f.write(encode_record(ChildStarted(pid=pid, session=1)))
        return folder

    def spool(folder: Path, steps: range, *, end: bool = False) -> None:
        emitter = EventEmitter(None, str(folder / "spool"), rank=1, session=1, node_rank=1)
        if steps.start == 1:
            emitter.emit(RunStart(rank=1, start_step=0, max_steps=60, world_size=2))
        for k in steps:
            emitter.emit(Step(rank=1, step=k, t_wall=time.time(), t_mono=time.monotonic()))
        if end:
            emitter.emit(TrainEnd(rank=1, step=steps.stop - 1))
        emitter.close()

    elsewhere = node_folder("1-gpu08", "t")
    spool(elsewhere, range(1, 30))
    said: list[str] = []
    (node,) = job.load_nodes([elsewhere], head, notify=said.append).nodes
    assert node.header.status == Status.RUNNING and max(node.entries) == 29
    assert any(s.startswith("node folder 1-gpu08: merged 30 event") for s in said), said
    spool(elsewhere, range(30, 61), end=True)
    (node,) = job.load_nodes([elsewhere], head).nodes
    assert node.header.status == Status.RUNNING and max(node.entries) == 60  # open: only gpu08 can close it

    # On the machine the node ran on (its folder named for this host), its processes can be looked up: gone, the
    # session is closed as the spool says it ended (its Trainer reached its end).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = node_folder(node_folder_name(1), "t", pid=gone.pid)
    spool(here, range(1, 61), end=True)
    (node,) = job.load_nodes([here], head).nodes
    assert node.header.status == Status.COMPLETED and max(node.entries) == 60

    stray = node_folder("1-gpu09", "another project")
    spool(stray, range(1, 5))
    before = (stray / "journal.jsonl").read_bytes()
    found = job.load_nodes([stray], head)
    assert found.nodes == [] and "a node of project 'another project'" in found.problems[0]
    assert (stray / "journal.jsonl").read_bytes() == before


def test_a_second_kaio_of_a_node_is_refused_naming_the_node_and_its_project(tmp_path):
    """It said "project '1-hostB' is running right now": the node's folder, as if it were a project."""
    import subprocess
    import sys

    from kaio.record.lock import ProjectLock

    folder = tmp_path / "mn1" / "nodes" / "1-hostB"
    with ProjectLock(folder):
        second = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from kaio.record.lock import ProjectLock; ProjectLock(__import__('pathlib').Path({str(folder)!r})).acquire()",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert f"node 1 of project 'mn1' ({folder}) is running right now" in second.stderr

"""Nothing kills the training but the user, and no process of a run outlives kaio: faults injected into real runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, journal_steps, kaio, read_history, spawn_kaio, wait_for, write_config
from kaio.record.lock import check_report_folder

LIGHT = REPO / "tests" / "scripts" / "light_loop.py"  # no torch, no Trainer: these tests are about processes


def _script_config(
    project_dir: Path, script: Path, args: list[str], *, num_processes: int = 1, grace: float = 5
) -> None:
    (project_dir / "cfg.yaml").write_text(
        f"project_name: t\nlaunch:\n  num_processes: {num_processes}\n  script: {script}\n"
        f"  script_args: {json.dumps(args)}\n  grace_seconds: {grace}\n"
        "reporting:\n  use_comet_ml: false\n  poll_hz: 4\n  refresh_seconds: 5\n"
    )


def _family(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # gone, or a zombie not reaped yet
        return ""


def test_ranks_orphaned_by_a_killed_launcher_are_stopped(project_dir):
    """SIGKILL of the launcher (an OOM killer, a scheduler): its two ranks would train on as orphans.
    kaio adopts them (child subreaper), stops them and says so."""
    _script_config(project_dir, LIGHT, ["5000", "--step-seconds", "0.02", "--gloo"], num_processes=2)
    proc = spawn_kaio("run", "cfg.yaml", "--plain", cwd=project_dir)
    wait_for(lambda: journal_steps(project_dir) >= 2 * 12, 180, "both ranks to train")
    family = _family(proc.pid)
    launcher = next(p for p in family if "kaio.child.launcher" in _command(p))
    ranks = [p for p in family if p.pid != launcher.pid and "kaio.child" in _command(p)]
    assert len(ranks) >= 2, [_command(p) for p in family]
    # A one-node job listens on loopback only: its rendezvous store (the launcher's) and the ranks' sockets.
    listening = [(p.pid, c.laddr) for p in family for c in p.net_connections(kind="inet") if c.status == "LISTEN"]
    assert any(pid == launcher.pid for pid, _ in listening), listening
    assert all(address.ip == "127.0.0.1" for _, address in listening), listening
    launcher.kill()
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"ranks left running: {[p.pid for p in alive]}"
    history = read_history(project_dir)
    assert history["status"] == "FAILED"
    assert any("outlived the launcher" in w for w in history["warnings"]), history["warnings"]
    assert [s["step"] for s in history["steps"]] == list(range(1, len(history["steps"]) + 1))


def test_ranks_that_ignore_sigterm_are_killed_after_the_grace_period(project_dir):
    # A script that will not stop when asked.
    _script_config(
        project_dir, LIGHT, ["100000", "--step-seconds", "0.02", "--ignore-sigterm"], num_processes=2, grace=2
    )
    proc = spawn_kaio("run", "cfg.yaml", "--plain", cwd=project_dir)
    wait_for(lambda: journal_steps(project_dir) >= 2 * 5, 180, "both ranks to train")
    family = _family(proc.pid)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    output, _ = proc.communicate(timeout=90)
    assert time.monotonic() - started < 45
    assert proc.returncode in (137, 143), output
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    history = read_history(project_dir)
    assert history["status"] == "INTERRUPTED"
    assert "stopped the loop after step" in output and "`kaio resume t` starts it again" in output


SLOW_TO_START = """\
import os, sys, time
# A rank slow to start (a big interpreter, a loaded machine): it sits here, before kaio.child sets its SIGTERM
# handler, with the SIGTERM it inherits from the launcher ignored. The marker file says where it waits.
argv = getattr(sys, "orig_argv", [])
if argv[1:3] == ["-m", "kaio.child"]:
    open(os.environ["RANK_WAITS_MARKER"], "w").close()
    time.sleep(2)
"""


def test_a_stop_asked_for_while_a_rank_starts_is_not_lost_on_it(project_dir, tmp_path):
    """A Ctrl-C as the rank started reached it before it had a handler, with SIGTERM ignored (the launcher ignores
    it, and its processes inherit that): the training ran to its end under a STOPPING dashboard and the run read
    COMPLETED, or was killed at the end of the grace period. The stop's marker makes the rank stop as it starts."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_TO_START)
    waits = tmp_path / "rank-waits"
    _script_config(project_dir, LIGHT, ["3000", "--step-seconds", "0.01"], grace=20)
    env = {**os.environ, "PYTHONPATH": str(hooks), "RANK_WAITS_MARKER": str(waits)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kaio", "run", "cfg.yaml", "--plain"],
        cwd=project_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for(waits.exists, 120, "the rank to start")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output  # stopped as asked: not COMPLETED (0), nor killed by the grace (137)
    history = read_history(project_dir)
    assert history["status"] == "INTERRUPTED" and history["steps"] == []


FULL_DISK_LAYER = """\
import errno, os, resource, runpy, sys, threading, time
# A fault-injecting layer over kaio's process: while the marker exists, its writes fail as on a full disk.
# Python's writes into the report folder raise ENOSPC; every other write of the process, SQLite's C code
# included, fails with EFBIG (RLIMIT_FSIZE at 0; Python ignores SIGXFSZ). Processes kaio starts before
# the disk fills (the training) write as before.
marker, report_dir = sys.argv.pop(1), os.path.realpath(sys.argv.pop(1))
real_write, real_fsync = os.write, os.fsync

def full(fd):
    if not os.path.exists(marker):
        return False
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(report_dir + os.sep)
    except OSError:
        return False

def write(fd, data):
    if full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(fd, data)

def fsync(fd):
    if full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)

def watch():
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    while True:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0 if os.path.exists(marker) else hard, hard))
        time.sleep(0.02)

os.write, os.fsync = write, fsync
threading.Thread(target=watch, daemon=True).start()
sys.argv[0] = "kaio"
runpy.run_module("kaio", run_name="__main__")
"""


def _spooled_steps(report_dir: Path) -> int:
    return sum(
        f.read_text(errors="replace").count('"type":"step"') for f in (report_dir / "spool").glob("**/*") if f.is_file()
    )


def test_a_stop_before_any_rank_started_kills_after_a_few_seconds_not_the_grace_a_checkpoint_needs():
    """A launcher waiting in torch's rendezvous for a node that never comes holds off its signal handlers: a Ctrl-C
    waited out launch.grace_seconds (30 s) with nothing to save. A real process group stands for the launcher."""
    from conftest import replay
    from kaio.run.stopping import STARTING_GRACE_S, StopControl

    for started in ("no", "a rank said so", "the launcher has a process"):
        events = [{"type": "session_start", "session": 1, "t_wall": 1e9}]
        if started == "a rank said so":  # its checkpoint gets the whole grace
            events.append({"type": "run_start", "rank": 0, "session": 1, "start_step": 0, "max_steps": 9})
        notes: list[str] = []
        control = StopControl(
            replay(events),
            30.0,
            post=lambda r: None,
            note=notes.append,
            phase=lambda: "start-up",
            fifo_path=lambda: None,
        )
        # A script that tells kaio nothing (no Trainer, no kaio.log) may be saving its own state: its grace, too.
        command = ["bash", "-c", "sleep 60 & wait"] if started == "the launcher has a process" else ["sleep", "60"]
        launcher = subprocess.Popen(command, start_new_session=True)
        if started == "the launcher has a process":
            pid = launcher.pid
            wait_for(lambda pid=pid: psutil.Process(pid).children(), 10, "the launcher's process")
        try:
            control.asked.requests, control.asked.first_at = 1, time.monotonic() - STARTING_GRACE_S - 1
            control.check(launcher)
            if started != "no":
                assert not control.asked.killed and launcher.poll() is None and notes == []
            else:
                assert launcher.wait(timeout=10) == -signal.SIGKILL and control.asked.killed
                assert notes == [
                    "no process of the training had started (in torch's rendezvous?): the launcher was ended after "
                    f"{STARTING_GRACE_S:g} s"
                ]
                # One Ctrl-C with nothing to save: the stop asked for (143), not a kill after a second (137).
                from kaio.config import RunConfig
                from kaio.run.outcome import SessionEndings

                cfg = RunConfig.model_validate({"project_name": "p"})
                ended = SessionEndings(cfg, control.state, control.asked, lambda text, level: None, None)
                assert ended.outcome(137, 1).exit_code == 143
        finally:
            launcher.kill()
            launcher.wait()


def test_torch_elastics_agent_starts_one_shutdown_per_stop_however_many_sigterms_come(monkeypatch):
    """A scheduler's SIGTERM to every process and kaio's own reach the agent moments apart: each raised
    SignalException, the second broke the shutdown's wait for the ranks and its cleanup signalled them again."""
    from torch.distributed.elastic.multiprocessing import SignalException, api

    from kaio.child.launcher import _one_shutdown_per_stop

    monkeypatch.setattr(api, "_terminate_process_handler", api._terminate_process_handler)  # restored after
    _one_shutdown_per_stop()
    _one_shutdown_per_stop()  # once is enough: not wrapped twice
    with pytest.raises(SignalException):
        api._terminate_process_handler(signal.SIGTERM, None)
    assert api._terminate_process_handler(signal.SIGTERM, None) is None  # the shutdown under way goes on
    assert api._terminate_process_handler(signal.SIGINT, None) is None


def test_an_exit_barrier_that_ended_early_after_the_ranks_ended_well_is_one_line_not_a_traceback():
    """Node 1 of a job that completed printed torch's "Error waiting on exit barrier" with 30 C++ frames."""
    import logging

    from kaio.child.launcher import EXIT_BARRIER_ENDED, quiet_exit_barrier

    try:
        raise RuntimeError("DistNetworkError: Failed to recv, got 0 bytes\nException raised from recvBytes ...")
    except RuntimeError:
        failed = logging.LogRecord(
            "torch",
            logging.ERROR,
            "api.py",
            1,
            "Error waiting on exit barrier. Elapsed: %s seconds",
            (0.01,),
            sys.exc_info(),
        )
    assert quiet_exit_barrier(failed) and failed.getMessage() == EXIT_BARRIER_ENDED and failed.exc_info is None
    assert failed.levelno == logging.INFO
    other = logging.LogRecord("torch", logging.WARNING, "api.py", 1, "Received %s death signal", ("SIGTERM",), None)
    assert quiet_exit_barrier(other) and other.getMessage() == "Received SIGTERM death signal"


@pytest.mark.parametrize("space_returns", ["during the run", "after the run"])
def test_a_full_report_disk_and_a_closed_stdout_do_not_stop_the_training(project_dir, space_returns):
    """While the disk is full and nobody reads stdout, the training goes on. Once space returns, the
    record is written whole: by kaio at the end of the run, or by `kaio report` if the disk was still
    full then."""
    # During: 100 trained on a full disk (2 s), then more after space returns.
    steps = 300 if space_returns == "during the run" else 100
    _script_config(project_dir, LIGHT, [str(steps), "--step-seconds", "0.02"])
    report_dir = project_dir / "docs" / "reports" / "t"
    layer, marker = project_dir / "full_disk.py", project_dir / "disk-is-full"
    layer.write_text(FULL_DISK_LAYER)
    shell = subprocess.Popen(
        # During the run nobody reads stdout after two lines (closed); after it, the last lines are read.
        f"{sys.executable} {layer} {marker} {report_dir} run cfg.yaml --plain | "
        + ("head -2" if space_returns == "during the run" else "tail -3"),
        shell=True,
        cwd=project_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: journal_steps(project_dir) >= 5, 120, "training")
    marker.touch()  # the disk fills up
    journaled = journal_steps(project_dir)
    if space_returns == "during the run":
        wait_for(lambda: _spooled_steps(report_dir) >= journaled + 100, 120, "100 steps trained on a full disk")
        assert journal_steps(project_dir) <= journaled + 30, "the journal was written while the disk was full"
        marker.unlink()
    output, _ = shell.communicate(timeout=240)
    assert "Traceback" not in output, output
    if space_returns == "after the run":
        assert journal_steps(project_dir) <= journaled + 30, "the journal was written while the disk was full"
        assert "the record could not be written" in output and "`kaio report t` writes it" in output, output
        marker.unlink()
        report = kaio("report", "t", cwd=project_dir)
        assert report.returncode == 0, report.stdout + report.stderr
        assert "merged" in report.stdout  # the spool kept what the journal could not write
    else:
        assert len(output.splitlines()) == 2, output
    history = read_history(project_dir)
    assert history["status"] == "COMPLETED" and [s["step"] for s in history["steps"]] == list(range(1, steps + 1))
    assert history["sessions"][0]["status"] == "COMPLETED"
    said = " ".join(history["warnings"] + history["telemetry"]["notes"])
    if space_returns == "during the run":
        assert "No space left on device" in said and "in memory" in said, said
    assert kaio("report", "t", cwd=project_dir).returncode == 0
    assert [s["step"] for s in read_history(project_dir)["steps"]] == list(range(1, steps + 1))


def test_a_training_process_that_cannot_be_started_is_a_failed_session_that_says_why(project_dir):
    """The interpreter kaio starts the launcher with is gone (a venv moved or deleted under a running shell):
    one line, a shell's exit code (127), and a FAILED record naming the cause (it was left RUNNING, with a
    traceback and exit code 1); no automatic restart tries the same again."""
    _script_config(project_dir, LIGHT, ["5"])
    cfg = project_dir / "cfg.yaml"
    cfg.write_text(cfg.read_text().replace("launch:\n", "launch:\n  max_restarts: 2\n"))
    start = (
        "import sys; sys.executable = '/nonexistent/venv/bin/python3'; from kaio.cli import app; "
        "sys.argv = ['kaio', 'run', 'cfg.yaml', '--plain']; app()"
    )
    result = subprocess.run([sys.executable, "-c", start], cwd=project_dir, capture_output=True, text=True)
    assert result.returncode == 127, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    said = "the training process could not be started: No such file or directory: /nonexistent/venv/bin/python3"
    assert said in result.stdout + result.stderr
    history = read_history(project_dir)
    assert history["status"] == "FAILED" and [s["error"] for s in history["sessions"]] == [said]
    assert said in (project_dir / "docs/reports/t/report.md").read_text()


def test_a_plain_loop_whose_loss_turns_nan_is_stopped_there_with_on_nonfinite_stop(project_dir):
    """kaio.log's loop, as a Trainer's: `reporting.on_nonfinite: stop` fails the run at the NaN (it ran on to
    the end, COMPLETED, with a warning). Its output goes to a file that cannot encode kaio's symbols (·, ✔, box
    lines: they raised and exited 1, then were '?'; now ASCII) under FORCE_COLOR (a CI log's colours: a file is
    no terminal, and no live dashboard is written into it)."""
    _script_config(project_dir, LIGHT, ["30", "--fault", "nan", "--at", "5"])
    cfg = project_dir / "cfg.yaml"
    cfg.write_text(cfg.read_text().replace("reporting:\n", "reporting:\n  on_nonfinite: stop\n"))
    result = kaio("run", "cfg.yaml", cwd=project_dir, env={"PYTHONIOENCODING": "ascii", "FORCE_COLOR": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "\x1b[?25l" not in result.stdout  # plain lines, not the live dashboard (it hides the cursor)
    assert re.search(
        r"record: docs/reports/t/report\.md \([1-9] warnings?\) \| docs/reports/t/telemetry\.png", result.stdout
    )
    assert "Traceback" not in result.stderr
    history = read_history(project_dir)
    assert history["status"] == "FAILED" and max(s["step"] for s in history["steps"]) == 5
    said = "the training loss was not finite (nan) at step 5; stopped there (reporting.on_nonfinite: stop)"
    assert said in history["sessions"][0]["error"]


def test_a_plain_loop_that_hangs_has_its_stack_read_before_on_stall_stop_ends_it(project_dir):
    """A script without a Trainer dies of the stop's SIGTERM: the stop waits until its stack is read (it said
    "no rank's stack could be read"). kaio's stdout is closed."""
    _script_config(project_dir, LIGHT, ["30", "--step-seconds", "0.05", "--fault", "hang", "--at", "6"])
    cfg = project_dir / "cfg.yaml"
    cfg.write_text(cfg.read_text().replace("reporting:\n", "reporting:\n  stall_seconds: 3\n  on_stall: stop\n"))
    # Its stdout closed before kaio starts (`>&-`: it crashed on it): /dev/null.
    result = subprocess.run(
        f"{sys.executable} -m kaio run cfg.yaml --plain >&-", shell=True, cwd=project_dir, capture_output=True
    )
    assert result.returncode == 143 and b"Traceback" not in result.stderr, result.stderr
    history = read_history(project_dir)
    (stall,) = history["stalls"]
    (rank,) = stall["ranks"]
    assert rank["rank"] == 0 and rank["where"].startswith("<module> at light_loop.py:"), rank
    assert "time.sleep(3600)" in rank["where"] and history["status"] == "INTERRUPTED"


def test_planted_symlinks_in_the_report_folder_are_not_followed(project_dir):
    write_config(project_dir, max_steps=3)
    report_dir = project_dir / "docs" / "reports" / "t"
    report_dir.mkdir(parents=True)
    victims = {
        name: project_dir / f"victim-{name.strip('.')}"
        for name in (".lock", "child.log", "journal.jsonl", "history.json")
    }
    for name, victim in victims.items():
        victim.write_text("someone else's file\n")
        (report_dir / name).symlink_to(victim)
    result = kaio("run", "cfg.yaml", cwd=project_dir)
    for victim in victims.values():
        assert victim.read_text() == "someone else's file\n"
    assert result.returncode == 2, result.stdout + result.stderr
    assert "symbolic link" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_report_folder_open_to_other_users_is_refused(project_dir):
    write_config(project_dir, max_steps=3)
    shared = project_dir / "docs" / "reports"
    shared.mkdir(parents=True)
    os.chmod(shared, 0o777)  # world-writable, no sticky bit: anyone could plant files in it
    result = kaio("run", "cfg.yaml", cwd=project_dir)
    assert result.returncode == 2 and "writable by other users" in result.stderr
    assert not (project_dir / "checkpoints").exists() and not (shared / "t" / "journal.jsonl").exists()
    os.chmod(shared, 0o1777)  # /tmp-like: the sticky bit keeps others' hands off our files
    (shared / "t").mkdir(exist_ok=True)
    check_report_folder(shared / "t")  # accepted


def test_project_arguments_are_checked_like_project_names(project_dir):
    for command in (["report", "../elsewhere"], ["resume", "../../x"], ["push", "a/b"]):
        result = kaio(*command, cwd=project_dir)
        assert result.returncode == 2, command
        assert "is not a project name" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    pushed = kaio("push", "t", "--repo-id", "https://huggingface.co/me/x", cwd=project_dir)
    assert pushed.returncode == 2
    assert (
        pushed.stderr
        == "kaio: error: --repo-id 'https://huggingface.co/me/x': not a Hub repo id of the form `user/name`\n"
    )
    missing = kaio("report", "t", "--output-dir", "nowhere", cwd=project_dir)
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"kaio: error: unknown project 't': nowhere/ does not exist here ({project_dir})")


def test_a_report_folder_that_cannot_be_created_is_one_line_and_nothing_starts(project_dir):
    (project_dir / "afile").write_text("not a folder")
    write_config(project_dir, max_steps=3, extra="")
    cfg = project_dir / "cfg.yaml"
    cfg.write_text(cfg.read_text().replace("reporting:\n", "reporting:\n  output_dir: afile/reports\n"))
    result = kaio("run", "cfg.yaml", cwd=project_dir)
    assert result.returncode == 2
    assert result.stderr.startswith("kaio: error: afile/reports/t: cannot create the report folder")
    assert len(result.stderr.strip().splitlines()) == 1 and not (project_dir / "checkpoints").exists()


def test_a_checkpoint_folder_that_cannot_be_created_is_one_line_and_nothing_starts(project_dir):
    (project_dir / "afile").write_text("not a folder")
    cfg = write_config(project_dir, max_steps=3)
    cfg.write_text(cfg.read_text().replace("training:\n", "training:\n  output_dir: afile/ck\n"))
    result = kaio("run", "cfg.yaml", cwd=project_dir)
    assert result.returncode == 2
    assert result.stderr == (
        "kaio: error: afile/ck: cannot create the checkpoint folder (Not a directory); choose another "
        "training.output_dir\n"
    )
    assert not (project_dir / "docs/reports/t/journal.jsonl").exists()  # fixed, `kaio run` starts it as new


def test_the_launchers_own_failure_is_the_cause_only_when_no_rank_failed_first(tmp_path):
    """A rendezvous that timed out before any rank ran: the launcher's exception. An agent's error after its ranks
    ran (its store gone with the head): the rank's own error is the cause."""
    import msgspec

    from kaio.run.diagnose import root_cause
    from kaio.telemetry.protocol import LaunchFailure, RankError

    launcher = LaunchFailure(session=1, rank=None, message="DistStoreError: Timed out", t_wall=5.0)
    (tmp_path / "launch-s1.json").write_bytes(msgspec.json.encode(launcher))
    assert root_cause(tmp_path, 1).text == "the launcher: DistStoreError: Timed out"
    ranks = RankError(rank=1, session=1, t_wall=3.0, root_cause="RuntimeError: boom")
    (tmp_path / "error-r1-77.json").write_bytes(msgspec.json.encode(ranks))
    assert root_cause(tmp_path, 1).text == "rank 1: RuntimeError: boom"


def test_a_rank_whose_output_file_is_full_trains_on(tmp_path):
    """A rank's stdout and stderr are child.log, on the report's disk: when it filled up, the Trainer's print of
    its log raised OSError (ENOSPC) and ended the training, though the record goes by the spool and the FIFO.
    /dev/full fails every write with ENOSPC, as a full disk does."""
    script = tmp_path / "prints.py"
    done = tmp_path / "done"
    script.write_text(
        "import sys\n"
        "for i in range(2000):\n"
        "    print({'loss': i, 'pad': 'x' * 100})\n"
        "    print('progress', i, file=sys.stderr)\n"
        "    sys.stderr.buffer.write(b'a rank line the launcher copied\\n')\n"
        f"open({str(done)!r}, 'w').write('trained on')\n"
    )
    with open("/dev/full", "w") as full:
        ended = subprocess.run(
            [sys.executable, "-m", "kaio.child", "--kaio-script", str(script)], stdout=full, stderr=full, timeout=60
        )
    assert ended.returncode == 0 and done.read_text() == "trained on"


LOOP_WITH_ITS_OWN_CHECKPOINT = """\
import json, math, os, time
import kaio
start = json.load(open("ckpt.json"))["step"] if os.path.exists("ckpt.json") else 0
for step in range(start + 1, 121):
    time.sleep(0.02)
    kaio.log(step=step, loss=2.0 + math.exp(-step / 50), learning_rate=1e-3)
    if step % 20 == 0:
        json.dump({"step": step}, open("ckpt.json", "w"))
"""


def test_a_kaio_log_loop_stopped_is_resumed_in_the_same_record_from_its_own_checkpoint(project_dir):
    """`kaio resume` of a plain loop was refused ('no Trainer of the script started, so none was saved'), and the
    stop's message sent the user to --overwrite, which moves the record aside: kaio now starts the loop again, the
    loop continues from its own checkpoint, and the steps it trains again replace the earlier session's."""
    (project_dir / "loop.py").write_text(LOOP_WITH_ITS_OWN_CHECKPOINT)
    (project_dir / "cfg.yaml").write_text(
        "project_name: t\nlaunch:\n  script: loop.py\nreporting:\n  use_comet_ml: false\n  refresh_seconds: 5\n"
    )
    proc = spawn_kaio("run", "cfg.yaml", cwd=project_dir)
    wait_for(lambda: journal_steps(project_dir) >= 50, 120, "50 steps")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode in (130, 143), output
    assert "`kaio resume t` starts it again, to continue from its checkpoint in this record" in output
    stopped_at = [s["step"] for s in read_history(project_dir)["steps"]][-1]
    resumed = kaio("resume", "t", "--plain", cwd=project_dir, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    history = read_history(project_dir)
    assert [s["step"] for s in history["steps"]] == list(range(1, 121))
    assert [(s["kind"], s["status"]) for s in history["sessions"]] == [("run", "INTERRUPTED"), ("resume", "COMPLETED")]
    assert history["sessions"][0]["signal"] == "SIGINT"  # a Ctrl-C's
    own_checkpoint = stopped_at - stopped_at % 20
    assert history["sessions"][1]["start_step"] == own_checkpoint  # where the loop itself went on from
    again = kaio("resume", "t", cwd=project_dir, timeout=60)  # a loop that ran to its end: nothing to resume
    assert again.returncode == 2 and "its loop ran to its end" in again.stderr


SLOW_TO_SAVE = """\
import json, math, time
import kaio
try:
    for step in range(1, 100000):
        time.sleep(0.02)
        kaio.log(step=step, loss=2.0 + math.exp(-step / 50))
except KeyboardInterrupt:  # a graceful stop: the loop saves what it saves, slowly (a real model's checkpoint)
    time.sleep(6.5)  # longer than the launcher's 5 s
    json.dump({"step": step}, open("saved.json", "w"))
"""


def test_a_graceful_stop_waits_for_a_save_longer_than_the_launchers_own_patience(project_dir):
    """accelerate 1.16's launcher of one process ends itself on SIGTERM and kills its process 5 s later: a stop's
    checkpoint that took longer (12 s for a real Trainer's save) was cut short, and the record blamed the training.
    kaio's grace period (30 s here) is the only deadline."""
    (project_dir / "loop.py").write_text(SLOW_TO_SAVE)
    (project_dir / "cfg.yaml").write_text(
        "project_name: t\nlaunch:\n  script: loop.py\nreporting:\n  use_comet_ml: false\n"
    )
    proc = spawn_kaio("run", "cfg.yaml", "--plain", cwd=project_dir)
    wait_for(lambda: journal_steps(project_dir) >= 20, 120, "20 steps")
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert (project_dir / "saved.json").is_file(), output  # the loop's 6.5 s save ran to its end
    assert proc.returncode == 143 and "killed" not in output, output


SLOW_TO_SAVE_ON_EVERY_RANK = """\
import json, math, os, time
import kaio
rank = int(os.environ.get("RANK", "0"))
try:
    for step in range(1, 100000):
        time.sleep(0.02)
        kaio.log(step=step, loss=2.0 + math.exp(-step / 50))
except KeyboardInterrupt:
    time.sleep(8.5)  # longer than torch elastic's shutdown timeout: the grace period (2 s) + 5
    json.dump({"step": step}, open(f"saved-{rank}.json", "w"))
"""


def test_a_schedulers_warning_sets_no_deadline_for_the_save_of_a_job_of_several_processes(project_dir):
    """SIGUSR1 (SLURM's --signal=USR1@T): kaio signalled the launcher's group, and torch elastic's agent killed the
    ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT later (the grace period + 5 s), where the docs promise no deadline of
    kaio's before the scheduler's own SIGTERM. The ranks are signalled themselves."""
    script = project_dir / "loop.py"
    script.write_text(SLOW_TO_SAVE_ON_EVERY_RANK)
    _script_config(project_dir, script, [], num_processes=2, grace=2)
    proc = spawn_kaio("run", "cfg.yaml", "--plain", cwd=project_dir)
    wait_for(lambda: journal_steps(project_dir) >= 2 * 20, 180, "both ranks to train")
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=90)
    assert sorted(p.name for p in project_dir.glob("saved-*.json")) == ["saved-0.json", "saved-1.json"], output
    history = read_history(project_dir)
    # The signal that stopped it is the scheduler's, not the SIGTERM kaio sent the ranks.
    assert history["status"] == "INTERRUPTED" and history["sessions"][-1]["signal"] == "SIGUSR1"


def test_the_launcher_keeps_sigterm_ignored_whatever_accelerate_installs(monkeypatch):
    """accelerate 1.16's launcher installs a SIGTERM handler of its own (which ends it and kills its process 5 s
    later): kaio's keeps it from being installed; accelerate 1.15 and before install none, and nothing is done."""
    import accelerate.commands.launch as accelerate_launch

    from kaio.child import launcher

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        monkeypatch.setattr(accelerate_launch, "signal", signal, raising=False)  # as accelerate 1.16 imports it
        launcher._sigterm_stays_ignored()
        assert accelerate_launch.signal.signal(signal.SIGTERM, lambda *args: None) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        monkeypatch.delattr(accelerate_launch, "signal")  # accelerate 1.15: no signal module there
        launcher._sigterm_stays_ignored()
    finally:
        signal.signal(signal.SIGTERM, previous)

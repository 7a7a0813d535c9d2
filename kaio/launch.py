"""Building the ``accelerate launch`` command, spawning it, signalling its group.

``build_command`` is pure (same inputs, same argv and env) so it is tested
without spawning anything; the user's accelerate config file comes in the plan, read by the caller.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kaio.config import LaunchConfig, RunConfig, flag_at, flag_name, flag_value
from kaio.nodes import ENV_JOB_SECRET
from kaio.record.paths import ProjectPaths
from kaio.secrets import redact_argv
from kaio.telemetry.protocol import (
    ENV_ERROR_DIR,
    ENV_NODE_RANK,
    ENV_ON_NONFINITE,
    ENV_PIPE,
    ENV_RESUME_FROM,
    ENV_SAFE_PATH_SET,
    ENV_SESSION,
    ENV_SPOOL_DIR,
    ENV_STACKS_DIR,
)

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


@dataclass(frozen=True)
class LaunchPlan:
    """Where this session's side channels live; chosen by the supervisor."""

    fifo_path: Path
    report_dir: Path
    config_path: Path  # the resolved config the recipe reads
    session: int
    main_process_port: int
    resume_from: Path | None = None
    python: str = sys.executable
    # The user's accelerate config file a script's launch takes settings from (``script_accelerate_file``, read by
    # the caller: the command is built from its inputs alone).
    accelerate_file: AccelerateFile | None = None


def build_command(cfg: RunConfig, plan: LaunchPlan, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The child's argv and environment: ``accelerate launch … -m kaio.child …`` (through
    ``kaio.child.launcher``, which is accelerate's launcher that also writes down which rank failed)."""
    argv = _launcher_argv(cfg, plan, environ.get("HOME")) + ["-m", "kaio.child"]
    if cfg.launch.script:
        argv += ["--kaio-script", str(Path(cfg.launch.script).resolve()), *cfg.launch.script_args]
    elif cfg.launch.module:
        argv += ["--kaio-module", cfg.launch.module, *cfg.launch.script_args]
    else:
        argv += ["--config", str(plan.config_path)]

    paths = ProjectPaths(plan.report_dir)
    env = {k: v for k, v in environ.items() if k not in OTHER_LAUNCHERS_VARIABLES}
    env.pop(ENV_JOB_SECRET, None)  # kaio's, not the training's: a script dumping its environment cannot show it
    env.update(
        {
            ENV_PIPE: str(plan.fifo_path),
            ENV_SPOOL_DIR: str(paths.spool),
            ENV_ERROR_DIR: str(paths.errors),
            ENV_SESSION: str(plan.session),
            "PYTHONUNBUFFERED": "1",  # the log shows lines as they happen
            "COMET_ERROR_TRACKING_ENABLE": environ.get("COMET_ERROR_TRACKING_ENABLE", "false"),
        }
    )
    if not env.get("PYTHONSAFEPATH"):
        # `python -m kaio.child` would put the folder kaio runs in first on the import path, where `accelerate
        # launch script.py` puts the script's folder only: a clone named kaio/ there (its parent folder, with the
        # README's editable install) became the `kaio` a script imports, without kaio.log.
        env["PYTHONSAFEPATH"], env[ENV_SAFE_PATH_SET] = "1", "1"
    # torch elastic's agent SIGKILLs its ranks 30 s after it passes a stop on, whatever launch.grace_seconds says:
    # a checkpoint that took longer (a slow disk, DataLoader workers on a busy machine) was cut short. kaio's grace
    # rules: the agent waits a little longer, so that kaio's kill and its message come first.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(math.ceil(cfg.launch.grace_seconds) + 5))
    env[ENV_ON_NONFINITE] = cfg.reporting.on_nonfinite
    env[ENV_NODE_RANK] = str(cfg.launch.node_rank)
    env[ENV_STACKS_DIR] = str(paths.stacks)
    _flight_recorder(env, paths)
    if plan.resume_from is not None:
        env[ENV_RESUME_FROM] = str(plan.resume_from)
    else:
        env.pop(ENV_RESUME_FROM, None)
    return argv, env


# What torchrun (or another launcher) sets for the processes it starts. Left over in the shell kaio starts from (a
# Kubeflow pod, an earlier torch.distributed session), WORLD_SIZE=2 made a one-process run wait for a rank 1 that
# never came, silently, for half an hour: kaio's launch sets its own.
OTHER_LAUNCHERS_VARIABLES = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
)

# The built-in recipe's accelerate config: its setup is kaio's alone (one process, no FSDP or DeepSpeed from the
# user's `accelerate config` default file, which accelerate reads when no flag says how to distribute).
RECIPE_ACCELERATE_CONFIG = Path(__file__).parent / "recipes" / "accelerate_config.json"


def other_launchers_note(environ: Mapping[str, str]) -> str | None:
    """The leftover launcher variables kaio keeps out of the training's environment, said."""
    found = [name for name in OTHER_LAUNCHERS_VARIABLES if name in environ]
    if not found:
        return None
    values = ", ".join(f"{name}={environ[name]}" for name in found)
    return f"left out of the training's environment, as another launcher's (kaio's launch sets its own): {values}"


def _launcher_argv(cfg: RunConfig, plan: LaunchPlan, home: str | None = None) -> list[str]:
    """``accelerate launch`` and its flags: the job's shape is kaio's; what the user's accelerate config file
    sets and kaio does not, the file's."""
    launch = cfg.launch
    n = launch.num_processes
    if launch.nnodes > 1:
        # accelerate counts processes over the whole job; a static rendezvous keeps each machine's rank (under
        # c10d the machine rank is ignored and rank 0 may land on another node).
        argv = [plan.python, "-m", "kaio.child.launcher", "--num_machines", str(launch.nnodes)]
        argv += ["--machine_rank", str(launch.node_rank), "--num_processes", str(n * launch.nnodes)]
        argv += ["--main_process_ip", str(launch.main_addr), "--main_process_port", str(launch.main_port)]
        argv += ["--rdzv_backend", "static"]
    else:
        argv = [plan.python, "-m", "kaio.child.launcher", "--num_machines", "1", "--num_processes", str(n)]
    asked = launch.accelerate_args
    # The recipe is kaio's own: DDP, training.precision, no compilation, whatever the user's accelerate config
    # file says. A script's setup is its own, or where neither its command nor kaio's says, the file's: FSDP,
    # DeepSpeed or Megatron-LM there (`--multi_gpu` would win over the file's distributed_type: plain DDP), its
    # mixed precision and dynamo backend.
    user_file = plan.accelerate_file
    engine = (user_file is not None and user_file.engine) or any(_has_flag(asked, f) for f in _ENGINE_FLAGS)
    if not engine and (n > 1 or launch.nnodes > 1):  # `--cpu` would silently run one process
        argv += ["--multi_gpu"]
    if n > 1 and launch.nnodes == 1:
        argv += ["--main_process_port", str(plan.main_process_port)]
    # One process: no device flag, so the trainer takes the GPU when there is one and the CPU otherwise.
    if not _has_flag(asked, "--mixed_precision") and not (user_file and user_file.mixed_precision):
        argv += ["--mixed_precision", "no"]
    if not _has_flag(asked, "--dynamo_backend") and not (user_file and user_file.dynamo_backend):
        argv += ["--dynamo_backend", "no"]
    if launch.own_code is None and not _has_flag(asked, "--config_file"):
        argv += ["--config_file", str(RECIPE_ACCELERATE_CONFIG)]
    return argv + _home_expanded(asked, home)


def _home_expanded(args: list[str], home: str | None) -> list[str]:
    """``--config_file ~/x.yaml``: no shell stands between the config's list and accelerate, so kaio expands
    ``~`` (as it does reading the file for its notes)."""
    out = list(args)
    at = flag_at(out, "--config_file")
    if at is not None:
        i, before = at
        out[i] = before + str(_expanded(out[i].removeprefix(before), home))
    return out


# PyTorch's NCCL Flight Recorder: the last collectives of every rank, dumped when a collective times out.
# Two names for each setting: newer torch reads TORCH_FR_*, older versions the TORCH_NCCL_* ones.
_FLIGHT_RECORDER_BUFFERS = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
_FLIGHT_RECORDER_FILES = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


def _flight_recorder(env: dict[str, str], paths: ProjectPaths) -> None:
    """On unless the user set any of its variables (then theirs stand as they are): a hung NCCL job leaves
    its ranks' last collectives in ``<report dir>/stalls/nccl-trace-rank-<R>`` (gloo ignores these)."""
    if any(name in env for name in (*_FLIGHT_RECORDER_BUFFERS, *_FLIGHT_RECORDER_FILES, "TORCH_NCCL_DUMP_ON_TIMEOUT")):
        return
    names = _flight_recorder_names()  # the old name on a newer torch prints a deprecation warning in every rank
    for name in _FLIGHT_RECORDER_BUFFERS[names]:
        env[name] = "2000"
    for name in _FLIGHT_RECORDER_FILES[names]:
        env[name] = str(paths.stalls / "nccl-trace-rank-")
    env["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "1"


def _flight_recorder_names() -> slice:
    """Which of the two names torch reads, from its installed version (torch is not imported here): the new
    ones alone from 2.10 (the old ones print a deprecation warning there; when each was renamed between 2.6 and
    2.9 is not certain), both before, or when the version cannot be read."""
    from importlib import metadata

    try:
        major, minor = (int(part) for part in metadata.version("torch").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return slice(0, 2)
    return slice(0, 1) if (major, minor) >= (2, 10) else slice(0, 2)


def preview_command(
    cfg: RunConfig,
    environ: Mapping[str, str],
    report_dir: Path | None = None,
    *,
    accelerate_file: AccelerateFile | None,
) -> tuple[list[str], dict[str, str]]:
    """The child command and the environment kaio would set (secrets masked), for `kaio plan` and
    `kaio run --dry-run`: the FIFO is named ``<fifo>``; nothing is created. ``accelerate_file``: the caller's
    ``script_accelerate_file`` (read once for every node of a dry run)."""
    from kaio.secrets import redact

    folder = (report_dir or cfg.report_dir).resolve()
    plan = LaunchPlan(
        fifo_path=Path("<fifo>"),
        report_dir=folder,
        config_path=folder / "config.json",
        session=1,
        main_process_port=cfg.launch.main_port,
        accelerate_file=accelerate_file,
    )
    argv, env = build_command(cfg, plan, environ)
    return masked(argv), redact({k: v for k, v in env.items() if environ.get(k) != v})


def masked(argv: list[str]) -> list[str]:
    """``argv`` as it may be written down: the values of secret-looking flags masked."""
    return redact_argv(argv)


def _has_flag(args: list[str], flag: str) -> bool:
    """``--flag``, ``--flag=value``, and the same with hyphens (accelerate takes `--use-fsdp` as `--use_fsdp`)."""
    return any(flag_name(a) == flag_name(flag) for a in args if a.startswith("--"))


_ENGINE_FLAGS = ("--use_fsdp", "--use_deepspeed", "--use_megatron_lm")
_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # an accelerate config file's distributed_type


@dataclass(frozen=True)
class AccelerateFile:
    """The accelerate config file `accelerate launch` reads (`accelerate config` writes it): it sets what the
    command line does not."""

    path: Path
    mixed_precision: str | None = None
    dynamo_backend: str | None = None
    engine: str | None = None  # FSDP, DEEPSPEED or MEGATRON_LM: not DDP
    gpu_ids: str | None = None  # the GPUs the launch gives the ranks (accelerate sets CUDA_VISIBLE_DEVICES to them)

    def note(self, accelerate_args: list[str]) -> str:
        """What a script's launch took from the file, less what ``accelerate_args`` sets over it (the recipe's setup
        is kaio's: it takes none of these)."""
        engine_asked = any(_has_flag(accelerate_args, flag) for flag in _ENGINE_FLAGS)
        taken = [
            f"{name} {value}"
            for name, value, overridden in (
                ("distributed_type", self.engine, engine_asked),
                ("mixed_precision", self.mixed_precision, _has_flag(accelerate_args, "--mixed_precision")),
                ("dynamo_backend", self.dynamo_backend, _has_flag(accelerate_args, "--dynamo_backend")),
            )
            if value and value.lower() != "no" and not overridden
        ]
        return (
            f"accelerate launch reads {self.path} (accelerate's config file) for what kaio's command does not set"
            + (f": {', '.join(taken)}" if taken else "")
            + "; processes and machines are kaio's (launch.num_processes, launch.nnodes)"
        )


def script_accelerate_file(launch: LaunchConfig, environ: Mapping[str, str]) -> AccelerateFile | None:
    """The accelerate config file a script's launch takes settings from; None for the built-in recipe, whose
    setup is kaio's config's alone."""
    return accelerate_file(launch.accelerate_args, environ) if launch.own_code is not None else None


def run_visibility(launch: LaunchConfig, environ: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """The environment the ranks see their GPUs in, and what changed it: accelerate sets CUDA_VISIBLE_DEVICES to
    the launch's ``gpu_ids`` (``--gpu_ids``, else a script's accelerate config file's), which kaio's own
    environment does not show; the run's GPUs (the report's power, energy, utilisation) are those."""
    asked = flag_value(launch.accelerate_args, "--gpu_ids")
    named = flag_value(launch.accelerate_args, "--config_file") is not None  # the recipe's too, when named
    found = (
        accelerate_file(launch.accelerate_args, environ)
        if asked is None and (named or launch.own_code is not None)
        else None
    )
    ids = asked or (found.gpu_ids if found is not None else None)
    if not ids or ids.lower() == "all":
        return dict(environ), None
    where = "launch.accelerate_args" if asked else str(found.path if found is not None else "")
    return {
        **environ,
        "CUDA_VISIBLE_DEVICES": ids,
    }, f"the run's GPUs are gpu_ids {ids} ({where}): accelerate gives the ranks those"


def accelerate_file_note(launch: LaunchConfig, environ: Mapping[str, str]) -> str | None:
    """What the session's notes and `--dry-run` say of that file: its path, and what the launch took from it."""
    found = script_accelerate_file(launch, environ)
    return found.note(launch.accelerate_args) if found is not None else None


def accelerate_file(accelerate_args: list[str], environ: Mapping[str, str]) -> AccelerateFile | None:
    """The file `accelerate launch` will read, as it finds it: `--config_file`, else (without `--cpu`) the default
    under HF_HOME (``<HF_HOME>/accelerate/default_config.yaml``). None without one; an unreadable one is
    accelerate's to report."""
    import yaml

    named = flag_value(accelerate_args, "--config_file")
    home = environ.get("HOME")  # the launcher's environment's, not this process's: same inputs, same command
    if named is not None:
        path = _expanded(named, home)
    elif _has_flag(accelerate_args, "--cpu"):
        return None
    else:
        cache = environ.get("XDG_CACHE_HOME") or (os.path.join(home, ".cache") if home else None)
        hf_home = environ.get("HF_HOME") or (os.path.join(cache, "huggingface") if cache else None)
        if hf_home is None:
            return None
        path = _expanded(hf_home, home) / "accelerate" / "default_config.yaml"
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.name.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(values, dict):
        return None
    dynamo = values.get("dynamo_config")
    dynamo = dynamo if isinstance(dynamo, dict) else {}
    engine = str(values.get("distributed_type") or "").upper()
    return AccelerateFile(
        path=path,
        mixed_precision=_text(values.get("mixed_precision")),
        dynamo_backend=_text(dynamo.get("dynamo_backend") or values.get("dynamo_backend")),  # the older key too
        engine=engine if engine in _ENGINES else None,
        gpu_ids=_text(values.get("gpu_ids")),
    )


def _expanded(path: str, home: str | None) -> Path:
    return Path(home + path[1:]) if home and (path == "~" or path.startswith("~/")) else Path(path)


def _text(value: object) -> str | None:
    """A file's setting as accelerate reads it: YAML's unquoted `no` is False."""
    if value is False:
        return "no"
    return str(value) if value not in (None, "") else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(argv: list[str], env: dict[str, str], log_file, cwd: str | None = None) -> subprocess.Popen:
    """Start the child in its own session, its output straight into ``log_file``.

    Its own session: its process group is ours to signal, and a Ctrl-C in the
    terminal reaches only the supervisor, which decides. Output to a file, not
    a pipe: if the supervisor dies, the child's prints cannot fail with EPIPE.
    """
    return subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the child's whole process group (nothing to do if it is gone)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the launcher's group."""
    signal_group(proc, signal.SIGKILL)


def adopt_orphans() -> None:
    """Become the child subreaper (Linux): a rank whose launcher died is re-parented to kaio, not to init, so
    kaio still knows it and can stop it. torch elastic starts each rank in a session of its own, where a kill
    of the launcher's group never reaches it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the group kill is all there is
        pass


def run_processes(fifo_path: Path) -> list:
    """This session's processes still alive: kaio's descendants (adopted orphans included) whose environment
    carries the session's FIFO path. Nothing else of kaio's (the figure's drawing) has it."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.environ().get(ENV_PIPE) == str(fifo_path) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def end_run(fifo_path: Path, grace_s: float) -> list[int]:
    """Stop every process of the session that is still alive (SIGTERM, then SIGKILL after ``grace_s``) and reap
    them; returns their pids (none when the launcher and its ranks ended by themselves)."""
    import psutil

    left = run_processes(fifo_path)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(left, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    return [proc.pid for proc in left]


def kill_run(fifo_path: Path) -> None:
    """SIGKILL every process of the session (a second Ctrl-C, or a stop that outlived the grace period)."""
    import psutil

    for proc in run_processes(fifo_path):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def describe_exit(returncode: int) -> tuple[int, str | None]:
    """``(exit_code, signal_name)``; a child killed by a signal exits 128+N like a shell."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return 128 - returncode, name
    if returncode > 128:
        try:
            return returncode, signal.Signals(returncode - 128).name
        except ValueError:
            pass
    return returncode, None

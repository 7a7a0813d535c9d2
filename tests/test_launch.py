"""``build_command`` is pure: checked without spawning anything."""

from __future__ import annotations

import signal
from pathlib import Path

from kaio.config import RunConfig
from kaio.launch import LaunchPlan, build_command, describe_exit
from kaio.telemetry.protocol import ENV_ERROR_DIR, ENV_PIPE, ENV_RESUME_FROM, ENV_SESSION, ENV_SPOOL_DIR


def _plan(**kw) -> LaunchPlan:
    base = dict(
        fifo_path=Path("/tmp/x/telemetry.fifo"),
        report_dir=Path("/r/docs/reports/p"),
        config_path=Path("/r/docs/reports/p/config.json"),
        session=3,
        main_process_port=29555,
        python="/venv/bin/python",
    )
    base.update(kw)
    return LaunchPlan(**base)


def test_single_process_runs_the_builtin_recipe_through_kaio_child():
    cfg = RunConfig(project_name="p")
    argv, env = build_command(cfg, _plan(), {"PATH": "/bin", "HF_TOKEN": "secret"})
    assert argv[:3] == [
        "/venv/bin/python",
        "-m",
        "kaio.child.launcher",
    ]  # accelerate launch, writing down which rank failed
    assert argv[argv.index("--num_processes") + 1] == "1"
    assert "--multi_gpu" not in argv and "--cpu" not in argv
    assert argv[-4:] == ["-m", "kaio.child", "--config", "/r/docs/reports/p/config.json"]
    assert env[ENV_PIPE] == "/tmp/x/telemetry.fifo"
    assert env[ENV_SPOOL_DIR] == "/r/docs/reports/p/spool"
    assert env[ENV_ERROR_DIR] == "/r/docs/reports/p/errors"
    assert env[ENV_SESSION] == "3"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["COMET_ERROR_TRACKING_ENABLE"] == "false"
    assert env["PATH"] == "/bin" and env["HF_TOKEN"] == "secret"  # the child needs the user's environment
    assert ENV_RESUME_FROM not in env


def test_the_recipes_launch_is_kaios_alone_whatever_the_shell_and_the_users_accelerate_files_say(tmp_path):
    """Left over from another launcher (a Kubeflow pod), WORLD_SIZE=2 made a one-process run wait half an hour for
    a rank 1; the user's default accelerate config (DeepSpeed) was the recipe's distribution; `~` in a config
    file's path reached accelerate unexpanded (no shell in between)."""
    from kaio.launch import RECIPE_ACCELERATE_CONFIG, other_launchers_note

    leftover = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29599", "PATH": "/bin"}
    argv, env = build_command(RunConfig(project_name="p"), _plan(), leftover)
    assert not {"WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"} & set(env) and env["PATH"] == "/bin"
    assert other_launchers_note(leftover) == (
        "left out of the training's environment, as another launcher's (kaio's launch sets its own): "
        "WORLD_SIZE=2, RANK=0, MASTER_ADDR=10.0.0.9, MASTER_PORT=29599"
    )
    assert other_launchers_note({"PATH": "/bin"}) is None
    assert argv[argv.index("--config_file") + 1] == str(RECIPE_ACCELERATE_CONFIG)
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(RECIPE_ACCELERATE_CONFIG)).distributed_type == "NO"  # a file accelerate reads
    script = tmp_path / "train.py"
    script.write_text("")
    own = RunConfig(
        project_name="p", launch={"script": str(script), "accelerate_args": ["--config_file", "~/acc.yaml"]}
    )
    argv, _ = build_command(own, _plan(), {"HOME": "/home/u"})
    assert argv.count("--config_file") == 1 and argv[argv.index("--config_file") + 1] == "/home/u/acc.yaml"
    spelt = own.model_copy(update={"launch": own.launch.model_copy(update={"accelerate_args": ["--config-file=~/a"]})})
    assert "--config-file=/home/u/a" in build_command(spelt, _plan(), {"HOME": "/home/u"})[0]


def test_the_runs_gpus_are_the_gpu_ids_accelerate_gives_the_ranks(tmp_path):
    """accelerate sets CUDA_VISIBLE_DEVICES to its gpu_ids (a script's accelerate config file, or --gpu_ids):
    the report summed all 8 GPUs' power for a run on GPUs 4-7."""
    from kaio.launch import run_visibility

    home = tmp_path / "home"
    (home / ".cache/huggingface/accelerate").mkdir(parents=True)
    (home / ".cache/huggingface/accelerate/default_config.yaml").write_text(
        "distributed_type: MULTI_GPU\ngpu_ids: 4,5,6,7\n"
    )
    script = tmp_path / "train.py"
    script.write_text("")
    own = RunConfig(project_name="p", launch={"script": str(script)})
    environ, said = run_visibility(own.launch, {"HOME": str(home), "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    assert environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and environ["HOME"] == str(home)
    assert (
        said
        == f"the run's GPUs are gpu_ids 4,5,6,7 ({home}/.cache/huggingface/accelerate/default_config.yaml): accelerate gives the ranks those"
    )
    recipe = RunConfig(project_name="p")  # its own accelerate config: the user's file is not read
    assert run_visibility(recipe.launch, {"HOME": str(home)}) == ({"HOME": str(home)}, None)
    asked = RunConfig(project_name="p", launch={"accelerate_args": ["--gpu_ids", "1"]})
    environ, said = run_visibility(asked.launch, {"HOME": str(home)})
    assert environ["CUDA_VISIBLE_DEVICES"] == "1" and said is not None and "(launch.accelerate_args)" in said
    named = RunConfig(
        project_name="p",
        launch={"accelerate_args": ["--config_file", "~/.cache/huggingface/accelerate/default_config.yaml"]},
    )
    assert (
        run_visibility(named.launch, {"HOME": str(home)})[0]["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    )  # the recipe's, named
    every = RunConfig(project_name="p", launch={"accelerate_args": ["--gpu_ids", "all"]})
    assert run_visibility(every.launch, {})[1] is None


def test_several_processes_use_multi_gpu_ddp_with_the_chosen_port():
    cfg = RunConfig(project_name="p", launch={"num_processes": 2})
    argv, _ = build_command(cfg, _plan(), {})
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert "--multi_gpu" in argv and "--cpu" not in argv
    assert argv[argv.index("--main_process_port") + 1] == "29555"


def test_torch_elastics_agent_waits_for_the_ranks_a_little_longer_than_kaios_grace():
    """The agent SIGKILLed its ranks 30 s after passing a stop on, whatever launch.grace_seconds said."""
    cfg = RunConfig(project_name="p", launch={"num_processes": 2, "grace_seconds": 120})
    assert build_command(cfg, _plan(), {})[1]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "125"
    ours = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}  # the user's own setting stands
    assert build_command(cfg, _plan(), ours)[1]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "600"


def test_user_script_and_its_args_and_accelerate_args(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")
    cfg = RunConfig(
        project_name="p",
        launch={
            "script": "train.py",
            "script_args": ["--epochs", "2"],
            "accelerate_args": ["--mixed_precision", "bf16"],
        },
    )
    argv, _ = build_command(cfg, _plan(), {})
    assert argv[argv.index("-m", 3) :] == [
        "-m",
        "kaio.child",
        "--kaio-script",
        str(tmp_path / "train.py"),
        "--epochs",
        "2",
    ]
    assert argv.count("--mixed_precision") == 1  # the user's flag replaces kaio's default
    assert argv[argv.index("--mixed_precision") + 1] == "bf16"


def test_a_users_accelerate_config_file_sets_what_kaio_does_not_and_fsdp_there_is_not_turned_into_ddp(
    tmp_path, monkeypatch
):
    """`accelerate config` writes <HF_HOME>/accelerate/default_config.yaml, which `accelerate launch` reads. kaio's
    `--mixed_precision no` overrode its bf16 in a script's run (trained in fp32, silently), and `--multi_gpu` its
    FSDP (plain DDP ran). The built-in recipe's setup stays kaio's config's."""
    from kaio.launch import accelerate_file, script_accelerate_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")
    home = tmp_path / "home"
    default = home / ".cache" / "huggingface" / "accelerate" / "default_config.yaml"
    default.parent.mkdir(parents=True)
    default.write_text(
        "distributed_type: MULTI_GPU\nmixed_precision: bf16\ndynamo_config:\n  dynamo_backend: INDUCTOR\n"
    )
    environ = {"HOME": str(home)}  # found from the launcher's environment, not this process's

    def launched(launch: dict, env: dict = environ) -> list[str]:
        cfg = RunConfig(project_name="p", launch=launch)  # the caller reads the file, as the supervisor does
        return build_command(cfg, _plan(accelerate_file=script_accelerate_file(cfg.launch, env)), env)[0]

    def flag(argv: list[str], name: str) -> str | None:
        return argv[argv.index(name) + 1] if name in argv else None

    script = launched({"script": "train.py", "num_processes": 2})
    assert flag(script, "--mixed_precision") is None and flag(script, "--dynamo_backend") is None  # the file's
    assert "--multi_gpu" in script  # its DDP, on kaio's two processes
    recipe = launched({"num_processes": 2})  # kaio's own training: DDP, training.precision, no compilation
    assert flag(recipe, "--mixed_precision") == "no" and flag(recipe, "--dynamo_backend") == "no"
    assert "--multi_gpu" in recipe
    assert accelerate_file([], environ).note([]) == (
        f"accelerate launch reads {default} (accelerate's config file) for what kaio's command does not set: "
        "mixed_precision bf16, dynamo_backend INDUCTOR; processes and machines are kaio's "
        "(launch.num_processes, launch.nnodes)"
    )
    assert accelerate_file([], {"HF_HOME": str(home / ".cache/huggingface")}).path == default  # HF_HOME wins
    overridden = accelerate_file([], environ).note(["--mixed-precision", "fp16"])  # not what the file set, then
    assert overridden.endswith(
        "does not set: dynamo_backend INDUCTOR; processes and machines are kaio's (launch.num_processes, launch.nnodes)"
    )

    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\nmixed_precision: no\n")
    for asked in (["--config_file", str(fsdp)], [f"--config-file={fsdp}"], ["--use_fsdp"], ["--use-fsdp"]):
        argv = launched({"script": "train.py", "num_processes": 2, "accelerate_args": asked})
        assert "--multi_gpu" not in argv, asked  # accelerate takes hyphens as underscores
    two_nodes = {
        "script": "train.py",
        "nnodes": 2,
        "main_addr": "10.0.0.1",
        "accelerate_args": [f"--config_file={fsdp}"],
    }
    assert "--multi_gpu" not in launched(two_nodes)
    assert (
        accelerate_file([f"--config_file={fsdp}"], {})
        .note([])
        .endswith(
            "for what kaio's command does not set: distributed_type FSDP; processes and machines are kaio's "
            "(launch.num_processes, launch.nnodes)"
        )
    )  # YAML's unquoted `no` (False) is accelerate's "no", not "False"
    old_style = tmp_path / "old.yaml"
    old_style.write_text("dynamo_backend: INDUCTOR\n")  # the key before dynamo_config
    assert accelerate_file(["--config_file", str(old_style)], {}).dynamo_backend == "INDUCTOR"

    # No file, no home to find one in, or `--cpu` (with which accelerate reads none): kaio's flags, as always.
    for env in ({"HOME": str(tmp_path / "elsewhere")}, {}):
        bare = launched({"script": "train.py", "num_processes": 2}, env)
        assert flag(bare, "--mixed_precision") == "no" and flag(bare, "--dynamo_backend") == "no"
    assert accelerate_file(["--cpu"], environ) is None


def test_the_ranks_do_not_import_from_the_folder_kaio_runs_in_and_give_the_setting_back_to_the_script():
    """`python -m kaio.child` puts the folder kaio runs in first on the import path; `accelerate launch script.py`
    does not. PYTHONSAFEPATH keeps it off, for kaio's interpreters only: each rank takes it back out."""
    cfg = RunConfig(project_name="p")
    _, env = build_command(cfg, _plan(), {"PATH": "/bin"})
    assert env["PYTHONSAFEPATH"] == "1" and env["KAIO_SET_PYTHONSAFEPATH"] == "1"
    _, theirs = build_command(cfg, _plan(), {"PATH": "/bin", "PYTHONSAFEPATH": "x"})  # the user's own: left alone
    assert theirs["PYTHONSAFEPATH"] == "x" and "KAIO_SET_PYTHONSAFEPATH" not in theirs


def test_resume_travels_in_the_environment():
    cfg = RunConfig(project_name="p")
    _, env = build_command(cfg, _plan(resume_from=Path("/c/checkpoint-20")), {ENV_RESUME_FROM: "stale"})
    assert env[ENV_RESUME_FROM] == "/c/checkpoint-20"
    _, env = build_command(cfg, _plan(), {ENV_RESUME_FROM: "stale"})
    assert ENV_RESUME_FROM not in env


def test_build_command_is_pure():
    cfg = RunConfig(project_name="p", launch={"num_processes": 2})
    assert build_command(cfg, _plan(), {"A": "1"}) == build_command(cfg, _plan(), {"A": "1"})


def test_exit_codes_name_the_signal():
    assert describe_exit(0) == (0, None)
    assert describe_exit(1) == (1, None)
    assert describe_exit(-signal.SIGKILL) == (137, "SIGKILL")
    assert describe_exit(-signal.SIGTERM) == (143, "SIGTERM")


def test_the_flight_recorder_is_set_under_the_names_the_installed_torch_reads_unless_the_user_set_it():
    """Newer torch renamed TORCH_NCCL_TRACE_BUFFER_SIZE and TORCH_NCCL_DEBUG_INFO_TEMP_FILE to TORCH_FR_*; the
    old names still work there but print a deprecation warning in every rank."""
    from importlib import metadata

    cfg = RunConfig(project_name="p", launch={"num_processes": 2})
    _, env = build_command(cfg, _plan(), {})
    major, minor = (int(p) for p in metadata.version("torch").split(".")[:2])
    new, old = (
        ("TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE"),
        (
            "TORCH_NCCL_TRACE_BUFFER_SIZE",
            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
        ),
    )
    used, unused = (new, old) if (major, minor) >= (2, 10) else (new + old, ())
    for name in used:
        assert env[name] == ("2000" if "SIZE" in name else "/r/docs/reports/p/stalls/nccl-trace-rank-")
    assert not set(unused) & set(env) and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    _, theirs = build_command(cfg, _plan(), {"TORCH_NCCL_TRACE_BUFFER_SIZE": "64"})
    assert theirs["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "64" and not {*new, "TORCH_NCCL_DUMP_ON_TIMEOUT"} & set(theirs)

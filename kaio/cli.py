"""kaio's command line: wiring only. Logic lives in the modules each command calls.

Exit codes: the child's own exit code for ``run``/``resume`` (0 on success,
128+N when killed by signal N, 143 after a Ctrl-C); 2 for a user error (bad
config, unknown project, project already running), printed as one line.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from kaio.record.paths import DEFAULT_OUTPUT_DIR

if TYPE_CHECKING:  # kaio --help imports nothing more
    from kaio.config import RunConfig
    from kaio.nodes import Placement

app = typer.Typer(
    name="kaio",
    help="Launch, watch and record a LoRA fine-tune: live GPU telemetry, honest reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback(invoke_without_command=True)
def _main(
    version: bool = typer.Option(False, "--version", help="Print kaio's version and exit.", metavar="", is_eager=True),
) -> None:
    """Launch, watch and record a LoRA fine-tune: live GPU telemetry, honest reports."""
    _make_output_streams_usable()
    _writable_matplotlib_config()
    if version:
        from kaio import __version__

        typer.echo(f"kaio {__version__}")
        raise typer.Exit()


def _make_output_streams_usable() -> None:
    """Output that cannot fail a run: a closed stdout or stderr writes to /dev/null (its descriptor taken too, so
    no file kaio opens later lands on it), and one whose encoding lacks kaio's symbols (PYTHONIOENCODING=ascii, a
    Latin-1 terminal) prints '?' for them instead of raising."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        if stream is None:
            try:
                os.fstat(fd)
            except OSError:
                null = os.open(os.devnull, os.O_WRONLY)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
            setattr(sys, name, open(fd, "w", closefd=False))  # noqa: SIM115 - the process's stream, never closed
        elif not (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "").startswith("utf"):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(errors="replace")


def _writable_matplotlib_config() -> None:
    """A HOME matplotlib cannot write its config or cache to (read-only, another user's) makes it print a warning
    about MPLCONFIGDIR into kaio's output (comet_ml imports it; telemetry.png is drawn with it): a private temp
    folder instead, as matplotlib itself falls back to, without the warning. Checked as matplotlib checks them
    (Linux's XDG folders, made if missing)."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    home = os.path.expanduser("~")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    if all(_could_write(os.path.join(base, "matplotlib")) for base in (config, cache)):
        return
    import atexit
    import shutil
    import tempfile

    os.environ["MPLCONFIGDIR"] = private = tempfile.mkdtemp(prefix="kaio-matplotlib-")
    atexit.register(shutil.rmtree, private, ignore_errors=True)


def _could_write(folder: str) -> bool:
    """What matplotlib checks: ``folder`` made if missing (as matplotlib would make it), then writable."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return False
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


OUTPUT_DIR_OPTION = typer.Option(
    DEFAULT_OUTPUT_DIR, "--output-dir", help="The reports directory (reporting.output_dir)."
)


# Where this machine sits in a job of several (kaio.nodes): `kaio run` and `kaio resume` alike.
NNODES_OPTION = typer.Option(
    None, "--nnodes", help="Machines in the job, one kaio on each (launch.nnodes; SLURM_NNODES)."
)
NODE_RANK_OPTION = typer.Option(
    None, "--node-rank", help="This machine's rank in the job, 0 for the head (launch.node_rank; SLURM_NODEID)."
)
MAIN_ADDR_OPTION = typer.Option(
    None, "--main-addr", help="The head node's address for the rendezvous (launch.main_addr)."
)
MAIN_PORT_OPTION = typer.Option(None, "--main-port", help="The rendezvous port (launch.main_port).")


def _user_errors(func):
    """Known errors become one line on stderr and exit code 2; KAIO_DEBUG=1 shows the traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from kaio.errors import KaioError

        try:
            return func(*args, **kwargs)
        except KaioError as exc:
            if os.environ.get("KAIO_DEBUG"):
                raise
            typer.echo(f"kaio: error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:  # before the training started (once it runs, the supervisor handles Ctrl-C)
            if os.environ.get("KAIO_DEBUG"):
                raise
            typer.echo("kaio: interrupted before the training started: nothing was trained or recorded", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _console():
    """The terminal, or whatever stdout is. A closed pipe (`kaio run cfg --plain | head`) must not stop the
    training: once the reader is gone, output goes nowhere (the record is on disk)."""
    from rich.console import Console

    from kaio.views import PipeSafe

    # On a terminal its own size, followed as it is resized: an exported COLUMNS or LINES (stale after a resize, or
    # copied from another window) made Rich draw every frame at that width, wrapped and stacked.
    on_terminal = sys.stdout.isatty()
    environ = {k: v for k, v in os.environ.items() if not (on_terminal and k in ("COLUMNS", "LINES"))}
    return Console(file=PipeSafe(sys.stdout), _environ=environ)  # type: ignore[arg-type]  # a TextIOBase


def _say(console):
    """Messages for the user: whole lines, never re-wrapped, never parsed as markup; on a stream without Unicode,
    kaio's own glyphs in ASCII (the record line's separators were '?')."""
    unicode = console.encoding.lower().replace("-", "").startswith("utf")

    def say(text: str) -> None:
        if not unicode:
            from kaio.dashboard import as_ascii

            text = as_ascii(text)
        console.print(text, soft_wrap=True, markup=False, highlight=False)

    return say


@app.command()
@_user_errors
def run(
    config: Path = typer.Argument(
        ..., help="The YAML config, e.g. configs/finetuning_config.yaml.", show_default=False, metavar="CONFIG"
    ),
    plain: bool = typer.Option(
        False,
        "--plain",
        help="Plain status lines instead of the live dashboard (automatic when not in a terminal).",
        metavar="",
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Start the project over; its old record, and the checkpoints, final model and results its Trainer wrote, are moved aside, not deleted.",
        metavar="",
    ),
    max_steps: int | None = typer.Option(
        None,
        "--max-steps",
        help="Override training.max_steps (the built-in recipe; your own script takes its length in launch.script_args).",
    ),
    nnodes: int | None = NNODES_OPTION,
    node_rank: int | None = NODE_RANK_OPTION,
    main_addr: str | None = MAIN_ADDR_OPTION,
    main_port: int | None = MAIN_PORT_OPTION,
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print each node's child command and the environment kaio sets (secrets masked); start nothing.",
        metavar="",
    ),
) -> None:
    """Validate CONFIG, launch the fine-tune under `accelerate launch`, watch it, write the report.

    Reports go to <reporting.output_dir>/<project_name>/ (report.md, telemetry.png, history.json, journal.jsonl, child.log). Exits with the training's exit code.
    """
    from kaio.config import load_config, with_max_steps
    from kaio.errors import ConfigError
    from kaio.nodes import placed, placement
    from kaio.preflight import check_recipe_inputs
    from kaio.run.gpu_feed import poller_factory
    from kaio.run.project import run_new
    from kaio.views import choose_view

    cfg = load_config(config)
    if max_steps is not None:
        cfg = with_max_steps(cfg, max_steps)
    flags = {"nnodes": nnodes, "node_rank": node_rank, "main_addr": main_addr, "main_port": main_port}
    try:
        where = placement(cfg.launch, flags, os.environ)
        cfg = placed(cfg, where)
    except ConfigError as exc:  # the file named where every value came from it (no flag, not inside srun)
        from_the_file = all(value is None for value in flags.values()) and "SLURM_STEP_ID" not in os.environ
        raise ConfigError(f"{config}: {exc}" if from_the_file else str(exc)) from None
    check_recipe_inputs(cfg, str(config), model=not dry_run)  # a dry run is often prepared where the model is not
    if dry_run:
        _print_dry_run(cfg, where, config, overwrite=overwrite)
        return
    _ignore_scheduler_warning()
    console = _console()
    code = run_new(
        cfg,
        choose_view(console, plain),
        overwrite=overwrite,
        poller_factory_for=poller_factory,
        notify=_say(console),
        config_path=config,
    )
    raise typer.Exit(code)


def _print_dry_run(cfg: RunConfig, where: Placement, config: Path, *, overwrite: bool) -> None:
    """Each node's child command and environment, with what `kaio run` would refuse (a model not at hand is
    said, not refused: a dry run is often prepared where the model is not)."""
    from kaio.nodes import dry_run_lines
    from kaio.preflight import model_unavailable, push_will_fail
    from kaio.run.project import run_refusal

    refusal = None if overwrite else run_refusal(cfg, config)
    if refusal is None and cfg.launch.own_code is None:
        unavailable = model_unavailable(cfg, os.environ)
        refusal = None if unavailable is None else f"{config}: {unavailable}"
    for line in dry_run_lines(cfg, where, os.environ, refusal):
        typer.echo(line)
    cannot_push = push_will_fail(cfg, os.environ)
    if cannot_push is not None:
        typer.echo(f"note: hub.push: {cannot_push}: the push at the end of the run would fail")


@app.command()
@_user_errors
def plan(
    config: Path = typer.Argument(
        ..., help="The YAML config, e.g. configs/finetuning_config.yaml.", show_default=False, metavar="CONFIG"
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output.", metavar=""),
) -> None:
    """Say what `kaio run CONFIG` would do, and whether it fits, without starting it.

    Prints the resolved config's child command and environment, the GPUs the ranks would take with their free memory, and a VRAM estimate per GPU (weights, gradients, optimizer states, activations, logits; with and without gradient checkpointing) with a verdict: fits, tight or will not fit. The model is sized on PyTorch's meta device: no weights are read; at most its config.json is downloaded.
    """
    from kaio.config import load_config
    from kaio.errors import ConfigError
    from kaio.plan import make_plan, plan_json, render_plan
    from kaio.preflight import check_recipe_inputs

    cfg = load_config(config)
    check_recipe_inputs(cfg, str(config), model=False)  # a model not at hand is said in the plan
    console = _console()
    try:
        if as_json:
            import json

            typer.echo(json.dumps(plan_json(make_plan(cfg)), indent=2))
            return
        with console.status("sizing the model…"):
            made = make_plan(cfg)
    except ConfigError as exc:  # what the plan cannot size (a model's config not found): with the file's name
        raise ConfigError(f"{config}: {exc}") from None
    console.print(render_plan(made), soft_wrap=True)  # the command stays one line to copy


@app.command()
@_user_errors
def resume(
    project: str = typer.Argument(
        ..., help="Project name (see `ls docs/reports`).", show_default=False, metavar="PROJECT"
    ),
    max_steps: int | None = typer.Option(None, "--max-steps", help="New training.max_steps: extends a finished run."),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="An edited config to continue with (learning rate, max steps, logging may change; model and LoRA shape may not).",
    ),
    output_dir: Path | None = typer.Option(
        None,
        "--output-dir",
        help=f"The reports directory (reporting.output_dir); default: --config's, else {DEFAULT_OUTPUT_DIR}.",
        show_default=False,
    ),
    plain: bool = typer.Option(False, "--plain", help="Plain status lines instead of the live dashboard.", metavar=""),
    nnodes: int | None = NNODES_OPTION,
    node_rank: int | None = NODE_RANK_OPTION,
    main_addr: str | None = MAIN_ADDR_OPTION,
    main_port: int | None = MAIN_PORT_OPTION,
) -> None:
    """Continue PROJECT from its latest complete checkpoint, as a new session of the same history.

    A job of several machines resumes with `kaio resume PROJECT` on each node (`srun kaio resume PROJECT` under SLURM; by hand, `--node-rank R`, and `--main-addr HOST` if the head moved): each node continues its own record, on the same machines or others with the same node count."""
    from kaio.run.gpu_feed import poller_factory
    from kaio.run.project import resume as resume_project
    from kaio.views import choose_view

    if output_dir is None:  # the project is where the config given says its reports go
        from kaio.config import load_config

        output_dir = Path(load_config(config).reporting.output_dir) if config is not None else DEFAULT_OUTPUT_DIR
    _ignore_scheduler_warning()
    console = _console()
    code = resume_project(
        project,
        output_dir,
        choose_view(console, plain),
        config_path=config,
        max_steps=max_steps,
        placement_flags={"nnodes": nnodes, "node_rank": node_rank, "main_addr": main_addr, "main_port": main_port},
        poller_factory_for=poller_factory,
        notify=_say(console),
    )
    raise typer.Exit(code)


@app.command()
@_user_errors
def report(
    project: str = typer.Argument(
        ..., help="Project name (a folder under the reports directory).", show_default=False, metavar="PROJECT"
    ),
    output_dir: Path = OUTPUT_DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON for scripts.", metavar=""),
    merge: list[Path] = typer.Option(
        [],
        "--merge",
        help="A node's record folder (nodes/<rank>-<host>/) copied from another machine of the job, to merge into the report; repeat for each (--merge A --merge B). The folders under the project's nodes/ are always merged.",
        metavar="DIR",
    ),
) -> None:
    """Rebuild report.md, telemetry.png and history.json from the project's journal, offline.

    Safe while the run is still going (read-only with respect to the run). For a job of several machines, the report is the job's: every node's steps and GPUs merged by global step.
    """
    import contextlib

    from rich.console import Console

    from kaio.run.rebuild import rebuild
    from kaio.views import is_terminal

    status = Console(stderr=True)  # progress on stderr: stdout stays the JSON or the one line
    with status.status("reading the record…") if is_terminal(status) else contextlib.nullcontext() as spinner:
        phase = spinner.update if spinner is not None else (lambda text: None)
        say = (lambda text: typer.echo(text, err=True)) if as_json else typer.echo  # the JSON alone on stdout
        summary, report_dir = rebuild(project, output_dir, notify=say, merge=merge, phase=phase)
    if as_json:
        import json

        import msgspec

        typer.echo(json.dumps(msgspec.to_builtins(summary), indent=2))
    else:
        typer.echo(f"report written: {report_dir / 'report.md'}")


@app.command()
@_user_errors
def push(
    project: str = typer.Argument(..., help="Project name.", show_default=False, metavar="PROJECT"),
    repo_id: str | None = typer.Option(
        None, "--repo-id", help="`user/name` of the model repo (default: hub.repo_id of the run's config)."
    ),
    output_dir: Path = OUTPUT_DIR_OPTION,
) -> None:
    """Push PROJECT's final LoRA adapter, a model card and the report to the Hugging Face Hub (or retry a failed push).

    The token comes from HF_TOKEN or your `hf auth login`; it is never printed or written. Exits 0 when pushed, 1 when the push failed (the reason is in report.md).
    """
    from kaio.run.project import push as push_project

    console = _console()
    if not push_project(project, output_dir, repo_id=repo_id, notify=_say(console)):
        raise typer.Exit(1)


@app.command()
@_user_errors
def gpus(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.", metavar="")) -> None:
    """List the GPU backends and devices kaio can read, with one sample of each."""
    from kaio.devices.inventory import inventory, render_inventory

    inv = inventory()
    if as_json:
        import json

        typer.echo(json.dumps(inv, indent=2, default=str))
    else:
        _console().print(render_inventory(inv))


def _ignore_scheduler_warning() -> None:
    """SLURM's time-limit warning (SIGUSR1) ends a process by default: while a session runs kaio answers it with
    a graceful stop; before and after one (loading, the final report, the Hub push) it must not end kaio."""
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def main() -> None:  # pragma: no cover - python -m kaio
    app(prog_name="kaio")


if __name__ == "__main__":  # pragma: no cover
    main()

"""Entry point of every rank: ``accelerate launch -m kaio.child [--kaio-script S | --kaio-module M] ARGS...``.

Installs the Trainer patch, then runs the target (the built-in recipe or the
user's script) exactly as ``python script.py args`` would. A failure writes
the traceback to an error file (as torch elastic's ``@record`` does) so the
supervisor can name the root cause, then propagates.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING, Literal

import msgspec

from kaio.telemetry.protocol import ENV_ERROR_DIR, ENV_SAFE_PATH_SET, ENV_SESSION, RankError, ScriptEnd

if TYPE_CHECKING:
    from kaio.child.emitter import EventEmitter

BUILTIN_RECIPE = "kaio.recipes.lora"
Ending = Literal["recipe", "script", "script after gloo"]


SCRIPT_FLAG = "--kaio-script"
MODULE_FLAG = "--kaio-module"


def main(argv: list[str] | None = None) -> Ending:
    """Run the target; how the process may end once it succeeded."""
    # The launcher ignores SIGTERM so that this process answers it; an ignored signal is inherited, so give
    # it back its default until the Trainer patch installs the graceful stop (kaio.child.stop).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from kaio.child.output import guard_output

    guard_output()
    if os.environ.pop(ENV_SAFE_PATH_SET, None):  # kaio's, for this interpreter only (kaio.launch)
        os.environ.pop("PYTHONSAFEPATH", None)
    # Parsed by hand: every other argument belongs to the target, `--help` included.
    args = list(sys.argv[1:] if argv is None else argv)
    script = module = None
    if args[:1] == [SCRIPT_FLAG]:
        if len(args) < 2:
            sys.exit(f"kaio.child: {SCRIPT_FLAG} needs a path")
        script, args = args[1], args[2:]
    elif args[:1] == [MODULE_FLAG]:
        if len(args) < 2:
            sys.exit(f"kaio.child: {MODULE_FLAG} needs a module")
        module, args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]

    from kaio.child import paths, stacks, stop
    from kaio.child.patch import install, rank_from_env, shared_emitter

    paths.note_kaio_folder()  # before the script can move to another folder

    stacks.install(rank_from_env())  # from now: a stall in loading the model is explained too
    install()
    stop.stop_asked_before_start()
    _remember_argument_errors()
    try:
        try:
            _run_target(script, module, args)
        except SystemExit as exc:
            if exc.code not in (None, 0):
                raise
            # sys.exit(0) at the end of a script: a success like returning
        except stop.Stopped:
            pass  # the graceful stop's end: the checkpoint is saved, the rest of the script skipped, no failure
        # Only the exit is left (the group's teardown first): a stop from now on would cut nothing short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _destroy_process_group()
        _script_ended(shared_emitter())
    except BaseException as exc:
        _write_error_file(rank_from_env(), exc)
        raise
    finally:
        from kaio.child import plain

        plain.finish()
        shared_emitter().close()
    if script is None and module is None:
        return "recipe"
    from kaio.child import process_group

    return "script after gloo" if process_group.gloo_was_used() else "script"


def _run_target(script: str | None, module: str | None, args: list[str]) -> None:
    """The script as ``python script.py args`` runs it, the module as ``python -m module args``, else the recipe."""
    if script:
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")
    elif module:
        # As `python -m`: the folder it runs in first on the path (kaio's own modules are imported by now, so a
        # folder named kaio there cannot stand in for them), argv[0] the module's file.
        sys.argv = [module, *args]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [BUILTIN_RECIPE, *args]
        runpy.run_module(BUILTIN_RECIPE, run_name="__main__", alter_sys=True)


_ARGUMENT_ERRORS: list[str] = []  # what the script's argparse parser said before it exited with code 2


def _remember_argument_errors() -> None:
    """argparse prints its error and exits 2: the record's root cause would read only "SystemExit: 2". Its parser
    (HfArgumentParser's too) keeps the message here as well, still printing it and exiting as before."""
    import argparse

    original = argparse.ArgumentParser.error

    def error(self, message):  # argparse's own signature
        _ARGUMENT_ERRORS.append(f"{self.prog}: error: {message}")
        original(self, message)

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]


def _script_ended(emitter: EventEmitter) -> None:
    """The target returned: only the interpreter's exit is left (1-2 s with transformers loaded). A stop asked
    for now would cut nothing short, but its SIGTERM would end the rank as killed, and a finished run would be
    recorded as interrupted: the rank ignores it (set by the caller), and the supervisor is told, unless a stop
    reached the script first (a signal, or another node's proposal)."""
    from kaio.child import stop
    from kaio.child.patch import rank_from_env

    if not (stop.reached() or stop.requested()):
        emitter.emit(ScriptEnd(rank=rank_from_env(), t_wall=time.time(), t_mono=time.monotonic()))


def _destroy_process_group() -> None:
    """After a script that finished, close torch.distributed's process group if it left one open.

    A gloo group still alive at interpreter exit can abort the process ("terminate called without
    an active exception", SIGABRT) after training succeeded, and the run would be reported failed.
    Only after success: after a rank failed, destroying the group can hang on the ranks that did not.
    A gloo group is remembered first (see ``quick_exit.exit_after_script``).
    """
    from kaio.child import process_group

    distributed = process_group.initialized()
    if distributed is not None:
        process_group.note_backend()
        distributed.destroy_process_group()


def _where_in_the_script(exc: BaseException) -> str:
    """`` (at run_glue.py:420, in preprocess_function)``: the innermost frame of the user's own code (not a library's,
    the standard library's or kaio's), where "KeyError: None" alone said nothing of where; "" when none is."""
    import sysconfig

    libraries = tuple(
        os.path.realpath(p) + os.sep
        for p in {sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")}
        if p
    ) + (os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep,)
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = os.path.realpath(frame.filename)
        if not frame.filename.startswith("<") and not path.startswith(libraries):
            return f" (at {os.path.basename(path)}:{frame.lineno}, in {frame.name})"
    return ""


def _write_error_file(rank: int, exc: BaseException) -> None:
    error_dir = os.environ.get(ENV_ERROR_DIR)
    if not error_dir:
        return
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    cause = lines[-1].strip() if lines else repr(exc)  # the traceback's last line: "ValueError: ..."
    if isinstance(exc, SystemExit) and exc.code == 2 and _ARGUMENT_ERRORS:
        cause = f"the script's arguments: {_ARGUMENT_ERRORS[-1]}"
    elif not isinstance(exc, SystemExit):
        cause += _where_in_the_script(exc)
    from kaio.child.output import the_process_secrets
    from kaio.secrets import REDACTED, mask

    secrets = the_process_secrets()  # an error quoting the script's arguments quotes its token too
    record = RankError(
        rank=rank,
        session=int(os.environ.get(ENV_SESSION, "1")),
        pid=os.getpid(),
        t_wall=time.time(),
        exc_type=type(exc).__name__,
        message=mask(str(exc), secrets, REDACTED)[:2000],
        root_cause=mask(cause, secrets, REDACTED),
        traceback=mask("".join(lines), secrets, REDACTED)[-20000:],
    )
    try:
        os.makedirs(error_dir, exist_ok=True)
        with open(os.path.join(error_dir, f"error-r{rank}-{os.getpid()}.json"), "wb") as f:
            f.write(msgspec.json.encode(record))
    except OSError:
        pass


if __name__ == "__main__":
    from kaio.child.quick_exit import exit_after_script, exit_without_teardown

    ending = main()
    if ending == "recipe":
        exit_without_teardown()  # nothing of it runs at exit
    elif ending == "script after gloo":
        exit_after_script()  # before gloo's threads can abort it; the script's threads, exit handlers, files kept
    # else: a user's script ends as Python ends it

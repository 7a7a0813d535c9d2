"""The YAML config: its pydantic schema, loading, and one-line error messages.

Every error names the file and the key (``configs/x.yaml: training.batch_size:
...``) so the user can fix it without reading a traceback. Nothing here
imports torch.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kaio.errors import ConfigError, ProjectError
from kaio.record.paths import DEFAULT_OUTPUT_DIR
from kaio.secrets import REDACTED, is_secret_key, redact, redact_argv  # noqa: F401 - the config's secrets follow the one rule

# The built-in tiny model: a Llama-style network built from a config, no download.
TINY_MODEL = "kaio/tiny-llama"

_PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# `user/name`, as the Hub takes it (huggingface_hub's validate_repo_id): each part letters, digits, '_', '-', '.',
# beginning and ending with a letter or digit, no '--' or '..', the name at most 96 characters, not ending '.git'.
HUB_REPO_ID = re.compile(r"(?!.*(?:--|\.\.))(?!.*\.git$)\w(?:[\w.-]*\w)?/\w(?:[\w.-]{0,94}\w)?")
PROJECT_NAME_RULE = "at most 100 characters, letters, digits, '.', '_', '-', beginning with a letter or digit"


def is_project_name(value: str) -> bool:
    """A project name is one folder under the reports directory, never a path out of it."""
    return ".." not in value and bool(_PROJECT_NAME.match(value))


def check_project_name(value: str) -> str:
    """A project named on the command line, checked like ``project_name``."""
    if not is_project_name(value):
        raise ProjectError(f"{value!r} is not a project name: {PROJECT_NAME_RULE}")
    return value


# Whole numbers and switches must be written as such (`batch_size: true` is not 1), within what a trainer
# can take; numbers must be finite (`.inf` is no learning rate).
def _within_int32(value: int) -> int:
    # A validator, not Field(le=...): a field's own bounds (le=65535 for a port) would be overridden by this one.
    if value > 2**31 - 1:
        raise ValueError(f"Input should be less than or equal to {2**31 - 1}")
    return value


Int = Annotated[int, Strict(), AfterValidator(_within_int32)]
Bool = Annotated[bool, Strict()]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelConfig(_Section):
    base_model: str = Field(
        TINY_MODEL,
        description="Hub id or local path of the base model; `kaio/tiny-llama` builds a tiny Llama from a config (no download).",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer id or path; default: the base model's, or ByT5's byte tokenizer (no files) for the tiny model.",
    )
    max_seq_length: Int = Field(128, ge=8, le=131072, description="Each example is truncated to this many tokens.")
    trust_remote_code: Bool = Field(False, description="Passed to `from_pretrained`; only for models you trust.")
    hidden_size: Int = Field(64, ge=8, description="Tiny model only: hidden size.")
    num_layers: Int = Field(2, ge=1, description="Tiny model only: decoder layers.")
    num_heads: Int = Field(4, ge=1, description="Tiny model only: attention heads.")
    intermediate_size: Int = Field(256, ge=8, description="Tiny model only: MLP width.")

    @model_validator(mode="after")
    def _tiny_heads_fit(self) -> ModelConfig:
        """Llama's attention splits the hidden size across the heads, and its rotary embedding needs an even
        head size: a mismatch is a traceback in the training process, once everything has loaded."""
        if self.base_model == TINY_MODEL:
            head_size, rest = divmod(self.hidden_size, self.num_heads)
            if rest or head_size % 2:
                raise ValueError(
                    f"hidden_size: {self.hidden_size} / num_heads {self.num_heads} must be a whole, even head size "
                    f"(e.g. hidden_size {self.num_heads * max(2, head_size + head_size % 2)})"
                )
        return self


class LoraConfig(_Section):
    r: Int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (`lora_alpha`).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Module names that get adapters, or `[all-linear]`.",
    )


class DataConfig(_Section):
    path: str | None = Field(
        None, description="JSONL file with a `text` field or chat `messages` per line; unset: the generated sample."
    )
    format: Literal["auto", "text", "messages"] = Field(
        "auto", description="How to read each JSONL line; `auto` looks at the first line."
    )
    text_field: str = Field("text", description="Key of the text in `text` format.")
    sample_size: Int = Field(
        512, ge=1, description="Generated sample only: number of examples (deterministic, seeded by `training.seed`)."
    )

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: str | None) -> str | None:
        if value is not None and Path(value).is_dir():
            raise ValueError(f"{value!r} is a folder: give the JSONL file itself")
        if value is not None and not Path(value).is_file():
            raise ValueError(f"data file {value!r} not found (relative paths start from {os.getcwd()})")
        return value


class TrainingConfig(_Section):
    max_steps: Int = Field(-1, ge=-1, description="Optimizer steps to run; -1: run `num_epochs` epochs.")
    num_epochs: float = Field(1.0, gt=0, description="Epochs when `max_steps` is -1.")
    batch_size: Int = Field(8, ge=1, description="Per-device batch size.")
    gradient_accumulation_steps: Int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    optimizer: str = Field(
        "adamw_torch",
        description="A `transformers` optimizer name (`optim`), e.g. adamw_torch, adamw_torch_fused, adafactor.",
    )
    lr_scheduler_type: str = Field(
        "cosine", description="A `transformers` scheduler name: linear, cosine, constant, constant_with_warmup, ..."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables.")
    logging_steps: Int = Field(1, ge=1, description="Log loss / learning rate every N optimizer steps.")
    save_steps: Int = Field(50, ge=1, description="Save a checkpoint every N optimizer steps.")
    save_total_limit: Int | None = Field(
        3, ge=1, description="Checkpoints kept; older ones are deleted. null keeps all."
    )
    seed: Int = Field(42, description="Seed for data generation, shuffling and initialisation.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the GPU supports it, fp16 on other GPUs, fp32 on CPU."
    )
    gradient_checkpointing: Bool = Field(False, description="Trade compute for activation memory.")
    output_dir: str | None = Field(None, description="Where checkpoints go; default `checkpoints/<project_name>`.")

    @model_validator(mode="after")
    def _some_length(self) -> TrainingConfig:
        if self.max_steps == 0:
            raise ValueError("max_steps: 0 trains nothing; use -1 to train `num_epochs` epochs")
        return self


def flag_name(arg: str) -> str:
    """An `accelerate launch` argument's flag as accelerate reads it: `--use-fsdp=x` is `--use_fsdp`."""
    return "--" + arg.split("=", 1)[0].lstrip("-").replace("-", "_")


def flag_at(args: list[str], flag: str) -> tuple[int, str] | None:
    """Where a command line gives ``flag`` its value (dashes or underscores): the value's place, and what comes
    before the value there (``--flag=`` for ``--flag=v``; "" for ``--flag v``, the value's own argument)."""
    for i, arg in enumerate(args):
        if arg.startswith("--") and flag_name(arg) == flag_name(flag):
            if "=" in arg:
                return i, arg.split("=", 1)[0] + "="
            return (i + 1, "") if i + 1 < len(args) else None
    return None


def flag_value(args: list[str], flag: str) -> str | None:
    """The value a command line gives ``flag`` (``--flag v`` or ``--flag=v``), or None."""
    at = flag_at(args, flag)
    return None if at is None else args[at[0]].removeprefix(at[1])


# `accelerate launch` flags kaio passes itself, from these keys.
_KAIO_LAUNCH_FLAGS = {
    "--num_processes": "num_processes",
    "--num_machines": "nnodes",
    "--machine_rank": "node_rank",
    "--main_process_ip": "main_addr",
    "--main_process_port": "main_port",
    "--rdzv_backend": "nnodes (kaio rendezvouses a job of several machines statically: each keeps its rank)",
}


class LaunchConfig(_Section):
    num_processes: Int = Field(
        1,
        ge=1,
        le=64,
        description="Processes (ranks) `accelerate launch` starts; on a CPU-only host several ranks use gloo DDP.",
    )
    script: str | None = Field(
        None,
        description="Your own training script (it builds a `Trainer`; kaio injects its callback). Default: the built-in LoRA recipe.",
    )
    module: str | None = Field(
        None,
        description="Your own training code as a module, run as `python -m` runs it (`mypkg.train`, `axolotl.cli.train`), from the folder kaio runs in; instead of `script`.",
    )
    script_args: list[str] = Field(default_factory=list, description="Arguments passed to `script` (or `module`).")
    accelerate_args: list[str] = Field(
        default_factory=list,
        description="Extra `accelerate launch` flags, e.g. `[--mixed_precision, bf16]`, `[--config_file, fsdp.yaml]`. A script's launch also takes what your accelerate config file sets and kaio does not (FSDP, DeepSpeed, mixed precision, dynamo): the one named here, else `accelerate config`'s default, and its `gpu_ids` are the run's GPUs; the built-in recipe's setup is kaio's alone (its own accelerate config file). Variables another launcher left in the shell (WORLD_SIZE, RANK, MASTER_ADDR...) are kept out of the training's environment.",
    )
    max_restarts: Int = Field(
        0, ge=0, le=100, description="On a failure, resume from the latest checkpoint by itself up to N times."
    )
    nnodes: Int = Field(
        1,
        ge=1,
        le=4096,
        description="Machines in the job, one `kaio run` on each (`--nnodes`; under SLURM: SLURM_NNODES). `num_processes` is per node.",
    )
    node_rank: Int = Field(
        0, ge=0, description="This machine's rank in the job, 0 for the head (`--node-rank`; SLURM_NODEID)."
    )
    main_addr: str | None = Field(
        None,
        description="Address of the head node (rank 0) the others reach for the rendezvous (`--main-addr`; under SLURM: the first host of SLURM_JOB_NODELIST).",
    )
    main_port: Int = Field(29500, ge=1, le=65535, description="The rendezvous port on the head node (`--main-port`).")
    stream_port: Int | None = Field(
        None,
        ge=1,
        le=65535,
        description="The head's port for the other nodes' records (with `KAIO_JOB_SECRET` set on every node). Default: `main_port` + 1.",
    )
    grace_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="After a Ctrl-C (or SIGTERM), seconds the training has to save a checkpoint and stop before it is killed.",
    )

    @field_validator("accelerate_args")
    @classmethod
    def _no_flag_kaio_sets(cls, value: list[str]) -> list[str]:
        """The job's shape is kaio's to pass (and to record): the same flag twice, accelerate takes the last."""
        for arg in value:
            flag = flag_name(arg)
            if arg.startswith("--") and flag in _KAIO_LAUNCH_FLAGS:
                raise ValueError(f"{arg.split('=', 1)[0]} is set by kaio: use launch.{_KAIO_LAUNCH_FLAGS[flag]}")
        return value

    # The user's code is looked for where it will run. Not in a saved config (config.json): `kaio report` rebuilds a
    # record anywhere, the code left behind; `kaio resume` looks for it itself (``code_not_found``).
    @field_validator("script")
    @classmethod
    def _script_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        problem = _script_not_found(value) if value is not None and not (info.context or {}).get("saved") else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("module")
    @classmethod
    def _module_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not all(part.isidentifier() for part in value.split(".")):
            raise ValueError(f"module {value!r} is not a dotted module name (a file goes in launch.script)")
        problem = find_module(value)[1] if not (info.context or {}).get("saved") else None
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _script_or_module(cls, data: Any) -> Any:
        """Before either is looked for: with both set, that one of them is not found is beside the point."""
        if isinstance(data, dict) and data.get("script") is not None and data.get("module") is not None:
            raise ValueError("launch.script and launch.module both set: give one (a file, or a module to run as -m)")
        return data

    @property
    def own_code(self) -> str | None:
        """The user's training code (``script``, or ``-m module``); None: the built-in recipe."""
        return self.script if self.script is not None else f"-m {self.module}" if self.module is not None else None

    @property
    def own_code_key(self) -> str:
        """The key that names the user's code, for messages."""
        return "launch.module" if self.module is not None else "launch.script"

    @property
    def head_stream_port(self) -> int:
        """Where the head takes the other nodes' records: ``stream_port``, else the port after the rendezvous's."""
        if self.stream_port is not None:
            return self.stream_port
        return self.main_port + 1 if self.main_port < 65535 else self.main_port - 1


class ReportingConfig(_Section):
    output_dir: str = Field(str(DEFAULT_OUTPUT_DIR), description="Reports go to `<output_dir>/<project_name>/`.")
    use_comet_ml: Bool = Field(
        True, description="Log to Comet ML (online with COMET_API_KEY, else an offline archive)."
    )
    poll_hz: float = Field(2.0, gt=0, le=50, description="GPU samples per second.")
    refresh_seconds: float = Field(
        10.0,
        gt=0,
        description="How often report.md and the index are rewritten during the run (history.json and telemetry.png: at most once a minute); stretched so that rewriting takes at most 1% of the time.",
    )
    gpu_backend: Literal["auto", "nvml", "amdsmi", "none"] = Field(
        "auto", description="Which GPU library to read: auto detects all present."
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Peak TFLOPS of one device, for MFU. Default: from kaio's table of GPUs (H100, H200, B200, A100, L40S, MI300X, MI325X, MI250X) for bf16/fp16 runs; none on a CPU (MFU not measured).",
    )
    stall_seconds: float | None = Field(
        None,
        gt=0,
        le=86400,
        description="Seconds without a step that make a stall (every rank's Python stack is then written to `<report dir>/stalls/`). Default: 10x the median step time, at least 60 s; loading, evaluations and checkpoint saves get longer budgets.",
    )
    on_stall: Literal["warn", "stop"] = Field(
        "warn", description="On a stall: `warn` (and keep waiting), or `stop` (the graceful stop, as a Ctrl-C)."
    )
    on_nonfinite: Literal["warn", "stop"] = Field(
        "warn",
        description="On a NaN/inf training loss (also the ones the Trainer's logging_nan_inf_filter hides): `warn`, or `stop` the training at that log step without saving.",
    )


class HubConfig(_Section):
    push: Bool = Field(False, description="Push the final LoRA adapter and the report to the Hugging Face Hub.")
    repo_id: str | None = Field(None, description="`user/name` of the model repo.")
    private: Bool = Field(True, description="Create the repo as private.")

    @model_validator(mode="after")
    def _repo_when_pushing(self) -> HubConfig:
        if self.push and not self.repo_id:
            raise ValueError("repo_id: required when hub.push is true (e.g. `your-name/my-adapter`)")
        if self.repo_id is not None and not HUB_REPO_ID.fullmatch(self.repo_id):
            raise ValueError(
                f"repo_id: {self.repo_id!r} is not a Hub repo id: `user/name`, each of letters, digits, '_', '-' "
                "and '.', beginning and ending with a letter or digit, without '--' or '..'"
            )
        return self


# The sections only the built-in recipe reads, and the keys of them kaio itself reads for any script.
SCRIPT_IGNORED_SECTIONS = ("model", "lora", "data", "training")
SCRIPT_PUSHES_ITS_OWN = (
    "kaio pushes the built-in recipe's final adapter, which your own code does not write; push your model from it "
    "(the Trainer's push_to_hub=True and hub_model_id, or trainer.push_to_hub())"
)
SCRIPT_READ_KEYS = {"training": {"output_dir"}}  # where kaio looks for checkpoints to resume from


class RunConfig(_Section):
    project_name: str = Field(
        description="Names the report folder and checkpoints; up to 100 ASCII letters, digits, `.`, `_`, `-`, beginning with a letter or digit (quote a name that is a number)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    reporting: ReportingConfig = Field(default_factory=ReportingConfig)
    hub: HubConfig = Field(default_factory=HubConfig)

    @model_validator(mode="before")
    @classmethod
    def _empty_section_is_defaults(cls, raw: Any) -> Any:
        """``training:`` with every key commented out is YAML's null: the section's defaults, not an error."""
        if isinstance(raw, dict):
            sections = [name for name in cls.model_fields if name != "project_name"]
            return {k: {} if v is None and k in sections else v for k, v in raw.items()}
        return raw

    @model_validator(mode="after")
    def _script_sees_no_recipe_keys(self, info: ValidationInfo) -> RunConfig:
        """With ``launch.script`` the built-in recipe does not run, so its keys would be silently ignored.
        (A saved config, config.json, holds every key with its default: not the user's doing.)"""
        if self.launch.own_code is None or (info.context or {}).get("saved"):
            return self
        if self.hub.push:
            raise ValueError(f"hub.push: {SCRIPT_PUSHES_ITS_OWN}")
        for section in SCRIPT_IGNORED_SECTIONS:
            for key in sorted(getattr(self, section).model_fields_set - SCRIPT_READ_KEYS.get(section, set())):
                raise ValueError(
                    f"{section}.{key}: your script ({self.launch.own_code_key}) never sees this key; set it in the script or pass "
                    f"it in launch.script_args instead (e.g. [--{key}, ...])"
                )
        return self

    @field_validator("project_name")
    @classmethod
    def _safe_project_name(cls, value: str) -> str:
        if not is_project_name(value):
            raise ValueError(f"{value!r} is not a safe folder name: {PROJECT_NAME_RULE}")
        return value

    @property
    def project_dir(self) -> Path:
        """The project's report folder (the head node's record, and the job's report)."""
        return Path(self.reporting.output_dir) / self.project_name

    @property
    def report_dir(self) -> Path:
        """This node's record: the project's folder on the head (and on one machine), else
        ``<project folder>/nodes/<node rank>-<host>/``."""
        if self.launch.node_rank == 0:
            return self.project_dir
        from kaio.nodes import node_folder_name
        from kaio.record.paths import ProjectPaths

        return ProjectPaths(self.project_dir).nodes / node_folder_name(self.launch.node_rank)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.training.output_dir or f"checkpoints/{self.project_name}")


# ---------------------------------------------------------------- loading


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a YAML config; every problem becomes one ``ConfigError`` line."""
    import yaml

    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml")) + sorted(p.name for p in path.glob("*.yml"))
        hint = f"; the configs in it: {', '.join(inside)}" if inside else ""
        raise ConfigError(f"{path}: a directory, not a config file: give the YAML file itself{hint}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_config_loader())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_error(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (UTF-8 expected)") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (project_name:, model:, ...)")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return config_from_dict(raw, source=str(path))


def with_max_steps(cfg: RunConfig, max_steps: int, option: str = "--max-steps") -> RunConfig:
    """``cfg`` with ``training.max_steps`` from the command line; a bad value names the option."""
    if cfg.launch.own_code is not None:
        raise ConfigError(
            f"{option}: your script ({cfg.launch.own_code_key}) decides its own length; pass it in "
            f"launch.script_args instead (e.g. [--max_steps, {max_steps}])"
        )
    raw = cfg.model_dump(exclude_unset=True)
    raw.setdefault("training", {})["max_steps"] = max_steps
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{option} {max_steps}: {_describe(exc.errors()[0]).split(': ', 1)[-1]}") from None


def _yaml_error(exc: Exception) -> str:
    """Where the YAML went wrong: where the broken construct began, as well as where the parser gave up."""
    mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    if context is not None and mark is not None and context.line != mark.line:
        started = f" (in the {getattr(exc, 'context', '') or 'construct'} that starts at line {context.line + 1})"
        started = started.replace("while parsing a ", "")
        return f"{where}YAML syntax error: {problem}{started}"
    return f"{where}YAML syntax error: {problem}"


def _config_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """A SafeLoader without anchors and aliases: a few hundred bytes of aliases can expand to gigabytes."""

        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.MarkedYAMLError(
                    problem="aliases (*name) are not supported in kaio configs", problem_mark=mark
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            """A key written twice would silently drop its first section (a whole `training:` block)."""
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` merges keys that the mapping's own may override
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str | int | float | bool) and key in first_line:
                    raise yaml.MarkedYAMLError(
                        problem=f"duplicate key {key!r} (first at line {first_line[key]}); merge the two into one",
                        problem_mark=key_node.start_mark,
                    )
                if isinstance(key, str | int | float | bool):
                    first_line[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return Loader


def config_from_dict(raw: dict[str, Any], *, source: str = "<config>", saved: bool = False) -> RunConfig:
    """``saved``: a config kaio wrote itself (config.json), every default spelled out."""
    try:
        return RunConfig.model_validate(raw, context={"saved": saved})
    except ValidationError as exc:  # every problem at once, one line each: not one round of edits per typo
        raise ConfigError("\n".join(f"{source}: {_describe(error)}" for error in exc.errors())) from None


def saved_own_code(config: dict[str, Any] | None) -> bool:
    """A saved config (config.json, a record's) ran the user's own code, not the built-in recipe."""
    launch = (config or {}).get("launch") or {}
    return bool(launch.get("script") or launch.get("module"))


def _script_not_found(script: str) -> str | None:
    if Path(script).is_dir():
        return f"script {script!r} is a directory, not a script (a package runs with launch.module)"
    return None if Path(script).is_file() else f"script {script!r} not found (relative paths start from {os.getcwd()})"


def code_not_found(launch: LaunchConfig) -> str | None:
    """Why the user's code (``launch.script`` or ``launch.module``) would not be found from here; None: it would,
    or the built-in recipe runs."""
    if launch.script is not None:
        return _script_not_found(launch.script)
    return find_module(launch.module)[1] if launch.module is not None else None


def find_module(name: str) -> tuple[str | None, str | None]:
    """The file ``python -m name`` would run, from the folder kaio runs in (first, as `python -m` puts it) and the
    installed packages, or why it would not find one. Each part of the name is looked up where its package is,
    without running any of them (an import would run the packages' code, torch's import and all)."""
    import importlib.machinery
    import importlib.util

    parts = name.split(".")
    locations: list[str] | None = [os.getcwd()]  # the folder kaio runs in first, as `python -m` puts it
    for i, part in enumerate(parts):
        spec = importlib.machinery.PathFinder.find_spec(part, locations) if locations is not None else None
        if spec is None and i == 0:  # installed: by every finder there is (an editable install's own included)
            spec = importlib.util.find_spec(part)  # a top-level name: found, not imported
        if spec is None:
            where = f"in {os.getcwd()} or installed" if i == 0 else f"in package {'.'.join(parts[:i])!r}"
            said = f"module {name!r} not found: no {part!r} {where}"
            if part == "py" and i == len(parts) - 1:
                said += f" (a module is named without .py: {'.'.join(parts[:-1])!r})"
            return None, said
        locations = list(spec.submodule_search_locations or []) or None
        origin = spec.origin
    if locations is not None:  # a package: python -m runs its __main__
        main = importlib.machinery.PathFinder.find_spec("__main__", locations)
        if main is None:
            return None, f"package {name!r} has no __main__.py to run (python -m runs a package's __main__)"
        origin = main.origin
    return origin, None


def code_file(launch: LaunchConfig) -> str | None:
    """The file the user's code runs from, resolved from the folder kaio runs in (None: the built-in recipe)."""
    if launch.script is not None:
        return str(Path(launch.script).resolve())
    return find_module(launch.module)[0] if launch.module is not None else None


def code_digest(path: str | None) -> str | None:
    """The SHA-256 of the user's code file (one file: a package's other modules are not in it)."""
    if path is None:
        return None
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _describe(error: Any) -> str:
    """Turn the first pydantic error into ``key: what is wrong``."""
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key{_did_you_mean(loc)}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = error["msg"]
    # pydantic prefixes custom messages; the user needs only ours.
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    if (not loc and re.match(r"^\w+\.\w+: ", message)) or (loc and message.startswith(f"{key}.")):
        return message  # a check across sections or keys names its keys itself
    # A section-level check names its key first ("repo_id: ..."): fold it into the path.
    named = re.match(r"^(\w+): (.*)$", message)
    if named and named.group(1) in _section_fields(loc):
        return f"{key + '.' if loc else ''}{named.group(1)}: {named.group(2)}"
    if kind == "model_type" and len(loc) == 1:
        return f"{key}: a section of keys (key: value lines under it), not {error.get('input')!r}"
    if kind == "string_type" and isinstance(error.get("input"), (int, float)) and loc == ["project_name"]:
        return f"{key}: YAML read this as the number {error['input']!r}: quote it ('{error['input']}') to give the name"
    if kind == "string_type" and isinstance(error.get("input"), bool):  # YAML's unquoted no, yes, off, on
        return f"{key}: YAML read this as {error['input']!r}: quote it ('no', 'yes') to give the word"
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in ("literal_error", "enum"):
        return f"{key}: {message} (got {error.get('input')!r})"
    return f"{key}: {message}"


def _section_fields(loc: list[str]) -> list[str]:
    """The field names of the config section at ``loc`` ([] if ``loc`` is not a section)."""
    section: type[BaseModel] = RunConfig
    for part in loc:
        field = section.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        section = annotation
    return list(section.model_fields)


def _did_you_mean(loc: list[str]) -> str:
    close = difflib.get_close_matches(loc[-1], _section_fields(loc[:-1]), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------- secrets


def config_snapshot(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as saved beside the report: defaults filled in, secrets redacted (the values of
    secret-named keys, and of secret-looking flags in the script's and accelerate's arguments). With a script
    of the user's, the recipe's sections are left out but for the keys kaio reads: none of them ran."""
    snapshot = redact(cfg.model_dump(mode="json"))
    if cfg.launch.own_code is not None:
        for section in SCRIPT_IGNORED_SECTIONS:
            kept = {k: v for k, v in snapshot.pop(section).items() if k in SCRIPT_READ_KEYS.get(section, set())}
            if kept:
                snapshot[section] = kept
    launch = snapshot["launch"]
    launch["script_args"], launch["accelerate_args"] = (
        redact_argv(launch["script_args"]),
        redact_argv(launch["accelerate_args"]),
    )
    return snapshot


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, str]:
    """``{dotted key: "old -> new"}`` for the keys two config snapshots both have and set apart (a key on one side
    only is a recipe key of a script run), in key order."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return {
        key: _change(flat_old[key], flat_new[key])
        for key in sorted(set(flat_old) & set(flat_new))
        if flat_old[key] != flat_new[key]
    }


def _change(before: object, after: object) -> str:
    """``old -> new``; for a long argument list, only the items that changed, each after the one before it (its
    flag): a script's 28 arguments printed twice hid the one that changed."""
    if not (isinstance(before, list) and isinstance(after, list)):
        return f"{before!r} -> {after!r}"
    old, new = [str(v) for v in before], [str(v) for v in after]
    if old != before or new != after or max(len(old), len(new)) <= 4:  # not an argument list, or a short one
        return f"{before!r} -> {after!r}"
    import shlex

    changes = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if tag != "equal":
            flag = old[i1 - 1 : i1]
            changes.append(f"{shlex.join(flag + old[i1:i2])} -> {shlex.join(flag + new[j1:j2])}")
    return "; ".join(changes)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

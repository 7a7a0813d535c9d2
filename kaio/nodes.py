"""Where this kaio sits in a job of several nodes: from the command line, the config, or SLURM.

One ``kaio run`` per node, each supervising its own ranks and GPUs; the engine
(``accelerate launch`` with a static rendezvous at the main address) makes them
one job. Under SLURM (``srun kaio run CONFIG``, one task per node) the node
count, this node's rank and the main address come from ``SLURM_NNODES``,
``SLURM_NODEID`` and the first host of ``SLURM_JOB_NODELIST``, expanded here in
Python (``scontrol`` is often missing inside containers). Nothing here imports
torch.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace

from kaio.config import LaunchConfig, RunConfig, config_differences
from kaio.errors import ConfigError
from kaio.record.paths import start_over_command

DEFAULT_MAIN_PORT = 29500
# The job's secret, the same on every node: it signs each node's stream to the head (kaio.run.stream).
ENV_JOB_SECRET = "KAIO_JOB_SECRET"


def job_secret(environ: Mapping[str, str]) -> bytes | None:
    value = environ.get(ENV_JOB_SECRET, "")
    return value.encode() if value else None


@dataclass(frozen=True)
class Placement:
    """This node in its job."""

    nnodes: int
    node_rank: int
    main_addr: str | None
    main_port: int
    source: str  # "the config", "the command line" or "SLURM"
    hosts: tuple[str, ...] = ()  # every node's host, where known (SLURM's node list)

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    @property
    def is_head(self) -> bool:
        return self.node_rank == 0


def first_rank(node_rank: int, processes_per_node: int) -> int:
    """A node's first global rank under a static rendezvous (its ranks are contiguous): the rank whose steps
    time that node's record."""
    return node_rank * processes_per_node


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (``gpu[01-03,07],login1``, ``rack[1-2]-gpu[3-4]``) as host names, in order."""
    return [host for item in _split_top_level(nodelist) for host in _expand_item(item, item)]


def _expand_item(text: str, item: str) -> list[str]:
    """One host pattern's names: its first bracket's numbers, each followed by the rest expanded."""
    match = re.match(r"([^\[\]]*)\[([^\[\]]+)\](.*)", text)
    if match is None:
        if "[" in text or "]" in text:
            raise ConfigError(f"SLURM_JOB_NODELIST: cannot read {item!r}")
        return [text]
    prefix, ranges, rest = match.groups()
    tails = _expand_item(rest, item)
    hosts = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ConfigError(f"SLURM_JOB_NODELIST: cannot read the range {part!r} in {item!r}")
        width = len(low)  # zero padding is kept: gpu[01-03] is gpu01, gpu02, gpu03
        hosts += [f"{prefix}{n:0{width}d}{tail}" for n in range(int(low), int(high or low) + 1) for tail in tails]
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if current:
        items.append(current)
    return [item.strip() for item in items if item.strip()]


def placement(launch: LaunchConfig, flags: Mapping[str, object], environ: Mapping[str, str]) -> Placement:
    """The command line's values over the config's; SLURM's inside an ``srun`` step of several nodes when
    neither the config nor the command line says how many nodes or which one this is."""
    given = {key: value for key, value in flags.items() if value is not None}
    main_port = int(given.get("main_port", launch.main_port))  # type: ignore[call-overload]
    nodes_named = "nnodes" in given or "node_rank" in given or launch.nnodes > 1
    step_nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
    if not nodes_named and "SLURM_STEP_ID" in environ and step_nodes > 1:
        main_addr = given.get("main_addr")
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
        try:
            hosts = tuple(expand_nodelist(nodelist))
        except ConfigError:
            if main_addr is None:
                raise
            hosts = ()  # only the loopback check needs them
        main_addr = main_addr or (hosts[0] if hosts else None)
        if not main_addr:
            raise ConfigError("SLURM_STEP_NODELIST is empty: give --main-addr")
        node_rank = int(environ.get("SLURM_NODEID", "0"))
        result = Placement(step_nodes, node_rank, str(main_addr), main_port, "SLURM", hosts)
    else:
        result = Placement(
            nnodes=int(given.get("nnodes", launch.nnodes)),  # type: ignore[call-overload]
            node_rank=int(given.get("node_rank", launch.node_rank)),  # type: ignore[call-overload]
            main_addr=given.get("main_addr", launch.main_addr),  # type: ignore[arg-type]
            main_port=main_port,
            source="the command line" if given else "the config",
        )
    try:
        check(result)
    except ConfigError as exc:
        if nodes_named and "SLURM_STEP_ID" in environ and step_nodes > 1 and not result.main_addr:
            raise ConfigError(f"{exc}; inside `srun`, leave out --nnodes and --node-rank: SLURM says them") from None
        raise
    return result


def resume_placement(saved: LaunchConfig, flags: Mapping[str, object], environ: Mapping[str, str]) -> Placement:
    """Where this kaio sits in the job it resumes. A project's saved config names the head's node rank, which
    says nothing of this machine: the command line (``--node-rank``) or SLURM says which node this is; the
    head's address and port default to the saved ones (the job may resume on other machines, or another port).
    The node count is the saved one: another one would change the world size the checkpoint was trained with."""
    given = {key: value for key, value in flags.items() if value is not None}
    one_machine = saved.model_copy(update={"nnodes": 1, "node_rank": 0})
    if "node_rank" in given:
        where = placement(one_machine, {"nnodes": saved.nnodes, "main_addr": saved.main_addr, **given}, environ)
    else:
        where = placement(one_machine, {k: v for k, v in given.items() if k != "nnodes"}, environ)
        if where.source != "SLURM" and max(saved.nnodes, int(given.get("nnodes", 1))) > 1:  # type: ignore[call-overload]
            raise ConfigError(
                f"the job ran on {saved.nnodes} machines: run `kaio resume` on each, saying which it is "
                f"(--node-rank R, 0 for the head; --main-addr HOST if the head moved), or under `srun`"
            )
        if "nnodes" in given:
            where = replace(where, nnodes=int(given["nnodes"]))  # type: ignore[call-overload]  # checked below
    if where.nnodes != saved.nnodes:
        raise ConfigError(
            f"the job ran on {saved.nnodes} machine(s), not {where.nnodes} ({where.source}): the checkpoint was "
            "trained with its world size (batch size, data order); resume it on as many, or start over with "
            f"`{start_over_command(None)}`"
        )
    return where


def check(p: Placement) -> None:
    """One line for what cannot make a job."""
    where = "" if p.source == "the config" else f" ({p.source})"
    if p.nnodes < 1:
        raise ConfigError(f"launch.nnodes{where}: {p.nnodes} nodes make no job")
    if not 0 <= p.node_rank < p.nnodes:
        raise ConfigError(f"launch.node_rank{where}: {p.node_rank} is not one of the job's nodes 0..{p.nnodes - 1}")
    if not 0 < p.main_port < 65536:
        raise ConfigError(f"launch.main_port{where}: {p.main_port} is not a TCP port")
    if not p.multi_node:
        return
    if not p.main_addr:
        raise ConfigError(
            f"launch.main_addr{where}: a job of {p.nnodes} nodes needs the head node's address "
            "(--main-addr HOST, the host of node rank 0)"
        )
    remote = [h for h in p.hosts if not _is_this_host(h)]
    if _is_loopback(p.main_addr) and remote:
        raise ConfigError(
            f"launch.main_addr{where}: {p.main_addr} is this machine only, but the job's nodes include "
            f"{', '.join(remote[:3])}: give the head node's address that the others can reach"
        )


def same_address(a: str | None, b: str | None) -> bool:
    """Whether two spellings of the head's address name one machine: equal, both this machine's loopback, or
    resolving to a common address (a host's name on one node, its IP on another)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    if _is_loopback(a) and _is_loopback(b):
        return True
    try:
        resolved = [{info[4][0] for info in socket.getaddrinfo(x, None)} for x in (a, b)]
    except (OSError, UnicodeError):
        return False
    return bool(resolved[0] & resolved[1])


def shape_mismatch(launch: Mapping[str, object], head_launch: Mapping[str, object]) -> str | None:
    """How a node's launch config differs from its head's in the job's shape (node count, where the nodes meet),
    as ``"its launch.nnodes is 2, the head's 3"``; None where the two are of one job."""
    for key in ("nnodes", "main_addr", "main_port"):
        mine, heads = launch.get(key), head_launch.get(key)
        if key == "main_addr":
            same = same_address(None if mine is None else str(mine), None if heads is None else str(heads))
        else:
            same = mine == heads
        if not same:
            return f"its launch.{key} is {mine!r}, the head's {heads!r}"
    return None


# Keys that differ between the nodes of one job by design: where each node is, what it writes where, its sinks (the
# job's shape is compared by shape_mismatch).
_PER_NODE_KEYS = ("launch.node_rank", "launch.main_addr", "launch.nnodes", "launch.main_port", "training.output_dir")
_PER_NODE_SECTIONS = ("reporting.", "hub.")


def config_mismatch(rank: int, head_config: dict, node_config: dict) -> str | None:
    """The warning for a node that trains with another config than the head's (``--learning_rate`` in one node's
    script_args: DDP applies the averaged gradients at each rank's own rate, and the copies drift apart unseen)."""
    differs = [
        f"{key}: {change}"
        for key, change in config_differences(head_config, node_config).items()
        if key not in _PER_NODE_KEYS and not key.startswith(_PER_NODE_SECTIONS)
    ]
    return f"node {rank} trained with another config than the head's: {'; '.join(differs)}" if differs else None


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _is_this_host(host: str) -> bool:
    names = {socket.gethostname(), socket.gethostname().split(".")[0], "localhost"}
    return host in names or host.split(".")[0] in names


def node_folder_name(node_rank: int, hostname: str | None = None) -> str:
    """A node's folder under ``<report dir>/nodes/``: ``<rank>-<short host name>``."""
    host = (hostname or socket.gethostname()).split(".")[0]
    return f"{node_rank}-{re.sub(r'[^A-Za-z0-9._<>-]', '_', host) or 'host'}"


def placed(cfg: RunConfig, where: Placement) -> RunConfig:
    """``cfg`` for this node: the job's shape in ``launch``; on a node other than the head, no Hub push and
    no Comet experiment (the head makes the job's)."""
    launch = cfg.launch.model_copy(
        update={
            "nnodes": where.nnodes,
            "node_rank": where.node_rank,
            "main_addr": where.main_addr,
            "main_port": where.main_port,
        }
    )
    if where.multi_node and cfg.launch.max_restarts:
        raise ConfigError(
            "launch.max_restarts: not for a job of several machines (each node would restart on its own, from "
            "checkpoints the others may not see); set it to 0"
        )
    update: dict[str, object] = {"launch": launch}
    if not where.is_head:
        update["hub"] = cfg.hub.model_copy(update={"push": False})
        update["reporting"] = cfg.reporting.model_copy(update={"use_comet_ml": False})
    return cfg.model_copy(update=update)


def dry_run_lines(
    cfg: RunConfig, where: Placement, environ: Mapping[str, str], refusal: str | None = None
) -> list[str]:
    """`kaio run --dry-run`: each node's child command and the environment kaio sets for it (secrets masked)."""
    import shlex

    from kaio.launch import other_launchers_note, preview_command, script_accelerate_file
    from kaio.record.paths import ProjectPaths

    lines = [
        f"kaio run --dry-run: project {cfg.project_name}, {where.nnodes} node(s) x "
        f"{cfg.launch.num_processes} process(es), from {where.source}; nothing is started"
    ]
    if refusal is not None:  # `kaio run`'s own words for the project as it is now
        lines.append(f"note: `kaio run` would refuse it: {refusal}")
    slurm_nodes = environ.get("SLURM_NNODES", "")
    if where.nnodes == 1 and slurm_nodes.isdigit() and int(slurm_nodes) > 1 and "SLURM_STEP_ID" not in environ:
        lines.append(
            f"note: SLURM_NNODES={slurm_nodes}, but this is not inside `srun` (no SLURM_STEP_ID): one machine's "
            "job; start kaio on every node with `srun kaio run CONFIG` (docs/multi-node.md)"
        )
    user_file = script_accelerate_file(cfg.launch, environ)  # read once, for every node's command
    if user_file is not None:  # each machine's own: this one's
        lines.append(f"note: on this machine, {user_file.note(cfg.launch.accelerate_args)}")
    leftover = other_launchers_note(environ)
    if leftover is not None:
        lines.append(f"note: on this machine, {leftover}")
    for rank in range(where.nnodes):
        node = replace(where, node_rank=rank)
        node_cfg = placed(cfg, node)
        host = where.hosts[rank] if rank < len(where.hosts) else None
        folder = node_cfg.project_dir
        if rank > 0:
            folder = ProjectPaths(folder).nodes / node_folder_name(
                rank, host or ("<host>" if rank != where.node_rank else None)
            )
        argv, env = preview_command(node_cfg, environ, report_dir=folder, accelerate_file=user_file)
        this = " (this node)" if rank == where.node_rank else ""
        lines.append(f"node {rank}{f' on {host}' if host else ''}{this}:")
        lines.append(f"  command: {shlex.join(argv)}")
        lines.append("  environment: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())))
    if where.nnodes > 1:
        port = cfg.launch.head_stream_port
        if job_secret(environ) is None:
            lines.append(
                f"records: not streamed to the head ({ENV_JOB_SECRET} not set; a shared filesystem, or --merge)"
            )
        else:
            lines.append(f"records: streamed to the head on port {port} ({ENV_JOB_SECRET} set, masked)")
    return lines

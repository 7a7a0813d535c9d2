"""What the dashboard shows of a run right now: recent windows, latest readings, and the snapshot.

Everything here is bounded (recent windows), so building a snapshot costs the
same at any run length. The smoothed loss is the step entries' own
(``kaio.record.rules.LossSmoother``): the dashboard and the report agree.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable

import msgspec

from kaio.devices.base import GpuSample, HostSample, device_order
from kaio.record import rules
from kaio.record.types import Log, Pause, Status, Step, StepEntry, finite
from kaio.run.ledger import RunLedger
from kaio.run.snapshot import GpuRow, HostRow, Snapshot

RECENT_LOSSES = 120  # sparkline window
RECENT_STEPS = 30  # step-rate window for speed and ETA
SILENT_GPU_S = 10.0  # a run GPU that answered before and reads nothing for this long is said to have stopped


class LiveStats(msgspec.Struct, kw_only=True):
    recent_losses: list[float] = []
    loss: float | None = None
    loss_smoothed: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    epoch: float | None = None
    eval_loss: float | None = None  # the latest evaluation's (of the first eval dataset, when there are several)
    eval_set: str | None = None
    evaluated_in_session: bool = False  # this session has evaluated (before any step of its own: said while starting)
    # (seconds, steps) between rank 0's step ends, without the ones holding an evaluation or a checkpoint save
    # (a step announces them): the speed and the ETA are the training's. Kept across a resume, so that its
    # first steps have an ETA (the previous session's speed) until their own replace it.
    recent_gaps: list[tuple[float, int]] = []
    last_end: tuple[float, int, bool] | None = None  # rank 0's latest step end: (t_mono, step, a pause follows)
    # The evaluation and save pauses seen, and over how many steps: what the ETA adds to the steps' own time.
    paused_s: float = 0.0
    paused_over: int = 0
    lead_rank: int = 0  # rank 0, or this node's first rank (RunLedger.lead_rank)
    latest_gpu: dict[str, GpuSample] = {}
    latest_host: HostSample | None = None
    latest_peak_by_rank: dict[int, int | None] = {}
    last_step_t_mono: float | None = None
    tokens_per_s_per_device: float | None = None  # rank 0's latest step
    mfu: float | None = None
    # (step, samples seen) of rank 0's recent steps: the samples a step takes, as the report counts them (an
    # epoch's short last batch, a collator's own rows), not the nominal batch.
    recent_samples: list[tuple[int, int]] = []
    answered: set[str] = set()  # the run's GPUs that gave a reading, this session
    silent_since: dict[str, float] = {}  # those that then read nothing, since when (t_mono)

    def on_gpus(self, gpus: list[GpuSample], run_keys: set[str]) -> list[str]:
        """A tick's GPU samples: each GPU's latest; returns the run's GPUs that stopped answering (``silenced``)."""
        for g in gpus:
            self.latest_gpu[g.key] = g
        return self.silenced(gpus, run_keys)

    def silenced(self, gpus: Iterable[GpuSample], run_keys: set[str]) -> list[str]:
        """The run's GPUs that gave readings, then none for ``SILENT_GPU_S`` from this tick on (each once a silence):
        a GPU fallen off the bus, or a hung driver. Its row's dashes would say no more."""
        found = []
        for g in gpus:
            if g.key not in run_keys:
                continue
            if (  # written out, not any(): this runs for every GPU of every tick, replays of a day's included
                g.util_pct is not None
                or g.vram_used_bytes is not None
                or g.power_w is not None
                or g.temp_c is not None
                or g.temp_junction_c is not None
            ):
                self.answered.add(g.key)
                self.silent_since.pop(g.key, None)
            elif g.key in self.answered:
                since = self.silent_since.setdefault(g.key, g.t_mono)
                if g.t_mono - since >= SILENT_GPU_S:
                    found.append(g.key)
                    self.answered.discard(g.key)  # said: again only after it answers once more
        return found

    def start_session(self) -> None:
        self.answered.clear()
        self.silent_since.clear()
        self.evaluated_in_session = False
        self.recent_samples = []
        self.last_end = None
        self.latest_gpu.clear()
        self.last_step_t_mono = None

    def on_step(self, event: Step) -> None:
        self.latest_peak_by_rank[event.rank] = event.peak_vram_bytes
        if event.rank == self.lead_rank and event.t_mono is not None:
            last = self.last_end
            if last is not None and event.t_mono > last[0] and event.step > last[1]:
                gap = (event.t_mono - last[0], event.step - last[1])
                if not last[2]:
                    self.recent_gaps = self.recent_gaps[-(RECENT_STEPS - 1) :] + [gap]
                elif (step_time := self.median_step_time()) is not None:  # an evaluation or a save after the step
                    self.paused_s += max(gap[0] - gap[1] * step_time, 0.0)  # its time beyond the steps' own
                self.paused_over += gap[1]
            self.last_end = (event.t_mono, event.step, event.evaluates or event.saves)
            self.last_step_t_mono = event.t_mono

    def on_pause(self, event: Pause) -> None:
        """An evaluation or save announced after the step's event (an epoch strategy's): the gap before the next
        step is a pause too, not a slow step."""
        if event.rank == self.lead_rank and self.last_end is not None and event.step == self.last_end[1]:
            self.last_end = (*self.last_end[:2], True)

    def on_log(self, event: Log, entry: StepEntry | None, smoothed_over: int) -> None:
        """``smoothed_over``: the finite losses the smoothed loss is of; too few, and it is no level to show (the
        report withholds it too)."""
        # Merged, not replaced: the Trainer's closing log (train_runtime) carries no loss or learning
        # rate, and the dashboard's last frame must still show them.
        for name in ("learning_rate", "grad_norm"):
            value = finite(getattr(event, name))
            if value is not None:
                setattr(self, name, value)
        if event.epoch is not None:
            self.epoch = event.epoch
        if event.loss is not None:
            self.loss = finite(event.loss)
            if self.loss is not None:
                self.recent_losses = self.recent_losses[-(RECENT_LOSSES - 1) :] + [self.loss]
            if entry is not None and entry.loss_smoothed is not None:
                self.loss_smoothed = None if rules.too_few_to_smooth(smoothed_over) else entry.loss_smoothed

    def on_samples_seen(self, step: int, samples_seen: int) -> None:
        if not self.recent_samples or step > self.recent_samples[-1][0]:
            self.recent_samples = self.recent_samples[-RECENT_STEPS:] + [(step, samples_seen)]

    def samples_per_step(self) -> float | None:
        """The recent steps' samples each, as counted; None before two counted steps."""
        if len(self.recent_samples) < 2:
            return None
        (first_step, first), (last_step, last) = self.recent_samples[0], self.recent_samples[-1]
        return (last - first) / (last_step - first_step) if last > first else None

    def steps_per_s(self) -> float | None:
        seconds = sum(s for s, _ in self.recent_gaps)
        return sum(n for _, n in self.recent_gaps) / seconds if seconds > 0 else None

    def eta_s(self, steps_left: int) -> float | None:
        """The steps left at the recent speed, and the evaluations and saves among them at the pace seen so far
        (an evaluation every 20 steps that takes 5 s adds 0.25 s a step)."""
        rate = self.steps_per_s()
        if not rate or steps_left <= 0:
            return None
        per_step = 1 / rate + (self.paused_s / self.paused_over if self.paused_over else 0.0)
        return steps_left * per_step

    def median_step_time(self) -> float | None:
        return statistics.median(s / n for s, n in self.recent_gaps) if self.recent_gaps else None


def build_snapshot(
    ledger: RunLedger,
    live: LiveStats,
    step: int,
    warnings: tuple[str, ...],
    *,
    warnings_before: int = 0,
    live_warnings: tuple[str, ...] = (),
    status: str | None = None,
    log_tail: tuple[str, ...] = (),
    report_path: str | None = None,
) -> Snapshot:
    session = ledger.current
    progress = ledger.progress.get(session.session) if session else None
    if session is not None and session.status == Status.RUNNING and progress is not None and progress.t_wall:
        elapsed = time.time() - progress.t_wall
    else:
        elapsed = (session.duration_s if session else None) or 0.0
    started = progress is not None and progress.last_step is not None  # this session has trained a step
    rate = live.steps_per_s() if started else None  # not the earlier session's speed while this one starts
    max_steps = (
        ledger.run.max_steps if ledger.run and (started or session is None or session.start_step is not None) else None
    )
    if status is None and session is not None and session.status == Status.RUNNING and not started:
        status = "STARTING"  # launching, importing, loading the model and data: not a frozen step 0
    eta = live.eta_s(max_steps - step) if rate and max_steps else None
    per_step = live.samples_per_step() or ledger.samples_per_step()
    host = None
    if live.latest_host is not None:
        h = live.latest_host
        host = HostRow(cpu_pct=h.cpu_pct, ram_used_bytes=h.ram_used_bytes, ram_total_bytes=h.ram_total_bytes)
    return Snapshot(
        project=ledger.project,
        status=status or ledger.status.value,
        session=ledger.session,
        elapsed_s=elapsed,
        step=step,
        max_steps=max_steps,
        epoch=live.epoch,
        loss=live.loss,
        loss_smoothed=live.loss_smoothed,
        recent_losses=tuple(live.recent_losses),
        learning_rate=live.learning_rate,
        grad_norm=live.grad_norm,
        eval_loss=live.eval_loss,
        evaluated_in_session=live.evaluated_in_session,
        eval_set=live.eval_set,
        training_completed=rules.training_completed(progress is not None and progress.trained_to_end, step, max_steps),
        ended_early_by=ledger.ended_early_by(session.session if session else None),
        steps_per_s=rate,
        samples_per_s=rate * per_step if rate and per_step else None,
        tokens_per_s_per_device=live.tokens_per_s_per_device,
        mfu=live.mfu,
        eta_s=eta,
        peak_vram_by_rank=dict(sorted(live.latest_peak_by_rank.items())),
        gpus=_gpu_rows(ledger, live),
        host=host,
        log_tail=log_tail,
        warnings=warnings,
        warnings_before=warnings_before,
        live_warnings=live_warnings,
        exit_code=session.exit_code if session else None,
        report_path=report_path,
    )


def _gpu_rows(ledger: RunLedger, live: LiveStats) -> tuple[GpuRow, ...]:
    # This node's rank lead + i trains on the i-th GPU it can see (accelerate's cuda:LOCAL_RANK); the GPUs it sees
    # beyond its processes train nothing.
    run_keys = ledger.run_gpu_keys()[: _local_processes(ledger) or None]
    return tuple(
        _gpu_row(
            key,
            dev.info.name,
            dev.info.in_run,
            dev.info.vram_total_bytes,
            dev.energy_j,
            live.latest_gpu.get(key),
            ledger.lead_rank + run_keys.index(key) if key in run_keys else None,
        )
        for key, dev in sorted(ledger.devices.items(), key=lambda item: device_order(item[0]))
    )


def silenced_warning(key: str, step: int) -> str:
    return (
        f"GPU {key} stopped answering after step {step}: nothing read from it for {SILENT_GPU_S:.0f} s (lost, or its "
        "driver hung); its figures from then on are missing"
    )


def _local_processes(ledger: RunLedger) -> int | None:
    """This node's training processes (the world size over the nodes); None before the run is described."""
    if ledger.run is None or not ledger.run.world_size:
        return None
    nodes = int(((ledger.config or {}).get("launch") or {}).get("nnodes") or 1)
    return max(ledger.run.world_size // max(nodes, 1), 1)


def _gpu_row(
    key: str,
    name: str,
    in_run: bool,
    vram_total: int | None,
    energy_j: float | None,
    latest: GpuSample | None,
    rank: int | None,
) -> GpuRow:
    if latest is None:
        return GpuRow(key=key, name=name, in_run=in_run, rank=rank, vram_total_bytes=vram_total, energy_j=energy_j)
    return GpuRow(
        key=key,
        name=name,
        in_run=in_run,
        rank=rank,
        util_pct=latest.util_pct,
        vram_used_bytes=latest.vram_used_bytes,
        vram_total_bytes=latest.vram_total_bytes or vram_total,
        power_w=latest.power_w,
        temp_c=latest.temp_junction_c if latest.temp_junction_c is not None else latest.temp_c,
        energy_j=energy_j,
        throttle=tuple(latest.throttle) if latest.throttle is not None else None,
    )

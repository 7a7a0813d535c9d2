"""The run ledger: the sessions and how each ended, what was trained, the devices, checkpoints, Hub.

Everything about the run that is not a step. Built from the journal's records
in order, like the rest of the state.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from kaio.devices.base import DeviceInfo, GpuSample, visible_order
from kaio.nodes import first_rank
from kaio.record import flops
from kaio.record.flops import Throughput
from kaio.record.types import (
    HALF_PRECISIONS,
    CheckpointSaved,
    ChildStarted,
    Devices,
    HostInfo,
    HostUse,
    HubOutcome,
    RunStart,
    Save,
    ScriptEnd,
    Session,
    SessionEnd,
    SessionStart,
    Stall,
    Status,
    Telemetry,
    TrainEnd,
    Training,
    training_precision,
)
from kaio.run.assembly import iso
from kaio.run.checkpoints import checkpoint_step
from kaio.telemetry.spool import Received

CHECKPOINTS_KEPT = 20
TRAININGS_KEPT = 1000  # a search of many trials: its first thousand
STALLS_KEPT = 50


class SessionProgress(msgspec.Struct, kw_only=True):
    """What the ledger needs of a session beyond what history.json shows of it."""

    t_wall: float | None = None
    pids: list[int] = []  # accelerate launch's pid
    last_step: int | None = None  # rank 0's newest step
    last_step_t_wall: float | None = None
    trained_to_end: bool = False  # rank 0 reached on_train_end
    scripts_ended: list[int] = []  # the ranks whose script returned before any stop reached it (ScriptEnd)
    resumed_at: int | None = None  # the step of the checkpoint kaio handed the script's Trainer (a resume)


class RankSeen(msgspec.Struct, kw_only=True):
    """One rank's own account of itself at train begin (to catch N duplicate trainings)."""

    world_size: int | None = None
    hostname: str | None = None
    pid: int | None = None


class DeviceState(msgspec.Struct, kw_only=True):
    info: DeviceInfo
    energy_by_session: dict[str, float] = {}
    energy_method: str | None = None

    @property
    def energy_j(self) -> float | None:
        return round(sum(self.energy_by_session.values()), 3) if self.energy_by_session else None


class RunLedger(msgspec.Struct, kw_only=True):
    project: str
    config: dict | None = None  # kaio's config of the latest session (secrets redacted)
    sessions: list[Session] = []
    progress: dict[int, SessionProgress] = {}
    run: RunStart | None = None  # rank 0's account of the latest session
    ranks: dict[int, RankSeen] = {}  # every rank's account, latest session
    devices: dict[str, DeviceState] = {}
    run_keys: set[str] = set()  # the devices the run's processes can see
    host: HostInfo | None = None
    checkpoints: list[CheckpointSaved] = []
    stalls: list[Stall] = []  # the first STALLS_KEPT
    hub: HubOutcome | None = None
    hub_later_failure: str | None = None  # a push that failed after ``hub``'s commit; cleared by one that succeeds
    last_train_end: TrainEnd | None = None  # rank 0's, of the latest training
    host_use: HostUse = msgspec.field(default_factory=HostUse)
    telemetry: Telemetry = msgspec.field(default_factory=Telemetry)  # what arrived, what was lost
    received: Received = msgspec.field(default_factory=Received)  # which child events are journaled (spool merge)
    last_t_wall: float | None = None
    code_file: str | None = None  # the user's code the latest session ran (SessionStart.code_file)
    code_sha256: str | None = None  # and its content's digest
    trainings: list[Training] = []  # each train() of the scripts' processes, in order

    # ------------------------------------------------------------------ reading

    @property
    def session(self) -> int:
        return self.sessions[-1].session if self.sessions else 0

    @property
    def current(self) -> Session | None:
        return self.sessions[-1] if self.sessions else None

    @property
    def status(self) -> Status:
        return self.sessions[-1].status if self.sessions else Status.RUNNING

    def session_record(self, number: int | None) -> Session | None:
        for s in reversed(self.sessions):
            if s.session == number:
                return s
        return self.sessions[-1] if self.sessions and number is None else None

    def checkpoint_folder(self) -> str | None:
        """Where the run's Trainer wrote its checkpoints, as it reported it (a script chooses its own
        ``output_dir``): the folder of the latest one saved, else the ``output_dir`` it trained with. Like
        every path of a project, relative to the folder kaio runs in (the reports name no home folder)."""
        saved = [c.path for c in self.checkpoints if c.path]
        if saved:
            return os.path.dirname(saved[-1])
        return self.run.args.output_dir if self.run is not None else None

    def later_training_of(self, checkpoint: Path) -> int | None:
        """The script's later training (2: another Trainer, or train() again) that saved ``checkpoint``, if it
        was not its first: kaio hands a checkpoint to the script's first train() only, which would load it into
        the wrong training."""
        kept = next((c for c in self.checkpoints if c.path and Path(c.path).resolve() == checkpoint.resolve()), None)
        return kept.later_training if kept is not None else None

    def _training_of(self, session: int) -> int:
        """The script's training going on in ``session`` now (its latest RunStart's)."""
        run = self.run
        return run.training if run is not None and run.session == session else 1

    def trained_to_end(self, session: int) -> bool:
        """The session's latest training reached its Trainer's end (what follows is the script's own)."""
        progress = self.progress.get(session)
        return progress is not None and progress.trained_to_end

    def as_of_now(self, session: Session) -> Session:
        """A session as the record shows it: one still running has trained to its latest step so far."""
        progress = self.progress.get(session.session)
        if session.status is not Status.RUNNING or session.end_step is not None or progress is None:
            return session
        return msgspec.structs.replace(session, end_step=progress.last_step)

    def on_script_end(self, r: ScriptEnd) -> None:
        progress = self.progress.get(r.session)
        if progress is not None and r.rank not in progress.scripts_ended:
            progress.scripts_ended.append(r.rank)

    def script_ended(self, session: int) -> bool:
        """The session's script returned (on its lead rank) before any stop reached it: a stop after that cut
        nothing short."""
        progress = self.progress.get(session)
        return progress is not None and self.lead_rank in progress.scripts_ended

    def every_script_ended(self, session: int) -> bool:
        """Every rank that started in the session (RunStart) has returned from its script: only their exits are
        left, which a stop would not shorten."""
        progress = self.progress.get(session)
        started = set(self.ranks) if self.run is not None and self.run.session == session else set()
        return progress is not None and bool(started) and started <= set(progress.scripts_ended)

    def ended_by_stop(self, session: int) -> bool:
        """The session's latest training ended at a graceful stop (asked of this node's kaio, or another's)."""
        end = self.last_train_end
        return self.trained_to_end(session) and end is not None and end.session == session and end.stopped

    def ended_early_by(self, session: int | None) -> str | None:
        """What ended the session's latest training before its max_steps, where known (an early-stopping callback)."""
        end = self.last_train_end
        return end.ended_early_by if end is not None and end.session == session else None

    def run_gpu_keys(self) -> list[str]:
        """The run's GPUs as its processes see them: local rank N trains on the N-th (cuda:N)."""
        return sorted(self.run_keys, key=lambda key: visible_order(key, self.devices[key].info))

    def samples_per_step(self) -> int | None:
        """Examples in one optimizer step: per device x accumulation x world size (None if unknown)."""
        return self.run.samples_per_step if self.run is not None else None

    def throughput(self) -> Throughput | None:
        """What tokens/s per device and MFU are computed from; None before rank 0 described the run."""
        if self.run is None:
            return None
        reporting = (self.config or {}).get("reporting") or {}
        peak = reporting.get("peak_tflops")
        if not isinstance(peak, (int, float)):
            model = self.run.model
            half = training_precision(self.run) in HALF_PRECISIONS or (
                model is not None and model.dtype in ("bfloat16", "float16")
            )
            names = [d.info.name or "" for key, d in self.devices.items() if key in self.run_keys]
            peak = flops.peak_tflops(names, half)
        return Throughput(
            world_size=self.run.world_size or 1,
            samples_per_step=self.samples_per_step(),
            model=self.run.model,
            peak_tflops=float(peak) if peak is not None else None,
        )

    # ------------------------------------------------------------------ records

    def on_session_start(self, r: SessionStart) -> None:
        self.sessions.append(Session(session=r.session, kind=r.kind, started_at=iso(r.t_wall)))
        self.progress[r.session] = SessionProgress(t_wall=r.t_wall, resumed_at=checkpoint_step(r.resume_from or ""))
        self.ranks = {}
        if r.config is not None:
            self.config = r.config
        if r.poll_hz is not None:
            self.telemetry.poll_hz = r.poll_hz
        self.code_file, self.code_sha256 = r.code_file, r.code_sha256

    def on_child_started(self, r: ChildStarted) -> None:
        session = self.session_record(r.session)
        if session is not None:
            self.progress[session.session].pids.append(r.pid)

    def on_session_end(self, r: SessionEnd) -> None:
        s = self.session_record(r.session)
        if s is None:
            return
        progress = self.progress[s.session]
        s.status, s.exit_code, s.signal, s.error = r.status, r.exit_code, r.signal, r.error
        s.ended_at = iso(r.t_wall)
        s.failed_at = iso(r.error_at)
        if progress.t_wall is not None and r.t_wall is not None:
            s.duration_s = round(r.t_wall - progress.t_wall, 3)
        s.end_step = progress.last_step if progress.last_step is not None else s.start_step
        trainer = s.start_step is not None and self.run is not None and self.run.reporter == "trainer"
        s.training_ended = progress.trained_to_end if trainer else None  # a Trainer started in this session
        s.ended_early_by = self.ended_early_by(s.session)
        if progress.last_step_t_wall is not None and r.t_wall is not None:
            s.closing_s = round(r.t_wall - progress.last_step_t_wall, 3)
        elif s.startup_s is None:
            s.startup_s = s.duration_s  # it never reached a first step: all of it was starting (and failing to)
        t = self.telemetry
        t.malformed_lines += r.counters.malformed_lines
        t.oversized_lines += r.counters.oversized_lines
        t.spooled_events += r.counters.spooled_events
        if r.poll_stats is not None:
            t.poll = r.poll_stats

    def on_devices(self, r: Devices) -> None:
        for info in r.devices:
            state = self.devices.get(info.key)
            if state is None:
                self.devices[info.key] = DeviceState(info=info)
            else:
                state.info = info
        self.run_keys = {key for key, dev in self.devices.items() if dev.info.in_run}
        if r.host is not None:
            self.host = r.host
        for note in r.notes:
            self.add_note(note)

    @property
    def lead_rank(self) -> int:
        """This node's first rank, whose steps time the record: 0 on the head (and on one machine); on node
        k of a static rendezvous, k x the processes per node."""
        launch = (self.config or {}).get("launch") or {}
        return first_rank(int(launch.get("node_rank") or 0), int(launch.get("num_processes") or 1))

    def on_run_start(self, r: RunStart) -> str | None:
        """Returns what is wrong with the job's shape, if the ranks' accounts disagree with what was launched, or
        with the checkpoint kaio resumed from."""
        earlier = self.ranks.get(r.rank)
        self.ranks[r.rank] = RankSeen(world_size=r.world_size, hostname=r.hostname, pid=r.pid)
        if r.rank == self.lead_rank:
            self.run = r
            if r.session in self.progress:  # a later training of the session: its end is still to come
                self.progress[r.session].trained_to_end = False
            s = self.session_record(r.session)
            if s is not None and r.training == 1:  # a later training of the session continues it
                s.start_step = r.start_step
            if len(self.trainings) < TRAININGS_KEPT:
                self.trainings.append(
                    Training(
                        session=r.session,
                        training=r.training,
                        first_step=r.start_step + 1,
                        trainer=r.trainer,
                        learning_rate=r.script_learning_rate or r.args.learning_rate,
                        max_steps=r.max_steps,
                        retry_batch=r.per_device_batch_size if r.retry else None,
                    )
                )
        launch = (self.config or {}).get("launch") or {}
        launched = launch.get("num_processes")
        if launched:
            launched *= launch.get("nnodes") or 1
        if earlier is not None and earlier.pid != r.pid:
            return (
                f"two processes both said they were rank {r.rank} (pids {earlier.pid} and {r.pid}): the {launched or 'launched'} "
                "processes trained independently, each its own copy of the run, not as one data-parallel job"
            )
        if r.rank == self.lead_rank and launched and r.world_size is not None and r.world_size != launched:
            return _world_size_not_launched(launched, r)
        return (
            resumed_elsewhere(r, self.progress.get(r.session)) if r.rank == self.lead_rank and r.training == 1 else None
        )

    def on_step(self, session: int, step: int, t_wall: float | None) -> bool:
        """This node's lead rank ended ``step`` in ``session``; True for the session's first."""
        s = self.session_record(session)
        if s is None:
            return False
        progress = self.progress[s.session]
        first = progress.last_step is None
        progress.last_step = max(progress.last_step or 0, step)
        if t_wall is not None:
            if s.startup_s is None and progress.t_wall is not None:
                s.startup_s = round(t_wall - progress.t_wall, 3)
            progress.last_step_t_wall = t_wall
        return first

    def on_save(self, r: Save) -> None:
        # A later training of the script saving into the same folder overwrites its earlier checkpoint-N.
        self._forget([*r.removed, *([r.path] if r.path else [])])
        self.checkpoints = self.checkpoints[-(CHECKPOINTS_KEPT - 1) :] + [
            CheckpointSaved(step=r.step, path=r.path, session=r.session, training=self._training_of(r.session))
        ]

    def on_stall(self, r: Stall) -> None:
        if len(self.stalls) < STALLS_KEPT:
            self.stalls.append(r)

    def on_train_end(self, r: TrainEnd) -> None:
        s = self.session_record(r.session)
        if s is not None and r.rank == self.lead_rank:
            self.progress[s.session].trained_to_end = True
        self._forget(r.checkpoints_removed)
        if r.rank == self.lead_rank:
            self.last_train_end = r  # the latest training's: its best checkpoint is the one to tell of

    def trained_again_after(self, step: int) -> None:
        """This session trains the steps after ``step`` again: an earlier session's checkpoints of them are gone."""
        self.checkpoints = [c for c in self.checkpoints if c.step <= step or (c.session or 0) >= self.session]

    def _forget(self, removed: list[str]) -> None:
        """Checkpoints the Trainer removed: the latest checkpoint named is one still on disk."""
        if removed:
            gone = set(removed)
            self.checkpoints = [c for c in self.checkpoints if c.path not in gone]

    def derived_notes(self) -> list[str]:
        """Notes of state that a later event replaces (said as it stands, not once per session): a push that
        failed after a pushed one (the latest training's best checkpoint is ``HistoryHeader.final_model``)."""
        return [self.hub_later_failure] if self.hub_later_failure else []

    def on_hub(self, r: HubOutcome) -> None:
        if r.error and self.hub is not None and self.hub.commit_sha:
            # A later push that failed does not undo the commit the Hub's adapter is at.
            self.hub_later_failure = (
                f"a later push to {r.repo_id} failed ({r.error}); the adapter stays at {self.hub.commit_sha}"
            )
            return
        self.hub, self.hub_later_failure = r, None

    def note_energy(self, latest: dict[str, GpuSample]) -> None:
        """The poller's energy counters (since the session's start) as they stand in the latest samples."""
        for key, sample in latest.items():
            device = self.devices.get(key)
            if device is not None and sample.energy_j is not None:
                device.energy_by_session[str(self.session)] = sample.energy_j
                device.energy_method = sample.energy_method

    def add_host_sample(self, cpu_pct: float | None, ram_used_bytes: int | None) -> None:
        use = self.host_use
        if cpu_pct is not None:
            use.samples += 1
            use.cpu_pct_sum += cpu_pct
        if ram_used_bytes is not None and (use.ram_peak_bytes is None or ram_used_bytes > use.ram_peak_bytes):
            use.ram_peak_bytes = ram_used_bytes

    def add_note(self, text: str) -> None:
        notes = self.telemetry.notes
        if text not in notes and len(notes) < 200:
            notes.append(text)


def resumed_elsewhere(r: RunStart, progress: SessionProgress | None) -> str | None:
    """The script's Trainer began at another step than the checkpoint kaio resumed it from: the script passed
    its own resume_from_checkpoint (kaio hands its checkpoint only to a train() given none)."""
    handed = progress.resumed_at if progress is not None else None
    if progress is None or handed is None or r.start_step == handed:
        return None
    progress.resumed_at = None  # said once
    again = (
        f"steps {r.start_step + 1}-{handed} are trained again"
        if r.start_step < handed
        else f"steps {handed + 1}-{r.start_step} are not in this record"
    )
    return (
        f"session {r.session}: kaio resumed the script from checkpoint-{handed}, but its Trainer began at step "
        f"{r.start_step} (the script passed its own resume_from_checkpoint, which kaio does not override): {again}"
    )


def _world_size_not_launched(launched: int, r: RunStart) -> str:
    reporter = "the loop" if r.reporter == "kaio.log" else "the trainer"
    # A script that starts processes of its own (torch.multiprocessing.spawn) makes more than were launched.
    own = " (the script starts processes of its own?)" if r.world_size is not None and r.world_size > launched else ""
    processes = "1 process was" if launched == 1 else f"{launched} processes were"
    return f"{processes} launched, but {reporter} reports world size {r.world_size}{own}"

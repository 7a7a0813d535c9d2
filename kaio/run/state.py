"""``RunState``: the one owner of what is known about a project's run.

It is built by applying journal records in order, live by the supervisor (on
its main thread) and offline by ``kaio report`` replaying the journal, so both
paths produce the same history. Record types: the child's events (see
``kaio.telemetry.protocol``) and the supervisor's ``session_start``,
``session_end``, ``devices``, ``tick``, ``note`` and ``hub``.

GPU samples are folded into the step whose time window they fell in: a step
is aggregated once a tick later than its end has arrived, so the samples that
bracket it are known. Only the ticks still needed are kept.

Memory does not grow with the run: a step is *sealed* once it is final (its
GPU samples folded in, and rank 0 two steps further, by which time every
rank has reported it: each optimizer step all-reduces across ranks). A sealed
step is added to the ``RunTally`` (the summary's and the figure's running
figures) and written to the ``StepLog`` (``steps.jsonl``), then forgotten.
A resumed session trains the steps after its checkpoint again: they are cut
from the step log, and the tally goes back to its copy taken at that
checkpoint (or is recounted from the step log).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

from kaio.report.tally import RunTally, tally_steps
from kaio.run.snapshot import GpuRow, HostRow, Snapshot
from kaio.run.steplog import StepLog, encode_entry

SCHEMA_VERSION = 1
RECENT_LOSSES = 120  # sparkline window
RECENT_STEPS = 30  # step-rate window for speed and ETA
TICKS_BEFORE_FIRST_STEP = 1200  # 10 minutes at 2 Hz
SEAL_LAG_STEPS = 2  # a step is final once rank 0 has ended the step two after it
MAX_UNAGGREGATED_STEPS = 1000  # steps faster than the poller: fold in what is there rather than wait
TALLY_COPIES_KEPT = 3  # tallies kept at the latest checkpoints, for a resume from one of them
MAX_MESSAGES = 200  # warnings and notes kept; the rest are counted
EMA_ALPHA = 0.1  # loss smoothing on the dashboard and in reports
EXPLODING_FACTOR = 3.0  # loss above 3x its running minimum (after a few steps) is "exploding"

RUNNING, COMPLETED, FAILED, INTERRUPTED = "RUNNING", "COMPLETED", "FAILED", "INTERRUPTED"


def iso(t_wall: float | None) -> str | None:
    if t_wall is None:
        return None
    return datetime.fromtimestamp(t_wall, tz=timezone.utc).isoformat(timespec="milliseconds")


def _number(value: Any) -> float | None:
    """A finite float, or None (events carry NaN/inf as "nan"/"inf" tags)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    return None


def _nonfinite_tag(value: Any) -> str | None:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return None


class RunState:
    def __init__(self, project: str, step_log: StepLog | None = None) -> None:
        self.project = project
        self.config: dict | None = None
        self.sessions: list[dict] = []
        self.run_info: dict = {}
        self.open_steps: dict[int, dict] = {}  # steps not final yet; sealed ones are in step_log and tally
        self.step_log = step_log if step_log is not None else StepLog()
        self.tally = RunTally()
        self.sealed_listeners: list[Callable[[dict], None]] = []  # each sealed step entry, once (Comet)
        self.max_seq_by_pid: dict[int, int] = {}  # the highest event seq applied per child process (spool merge)
        self.devices: dict[str, dict] = {}  # key -> DeviceInfo fields + energy
        self.host_info: dict = {}
        self.checkpoints: list[dict] = []
        self.hub: dict | None = None
        self.warnings: list[str] = []  # something went wrong or looks wrong
        self.notes: list[str] = []  # facts about how telemetry was gathered (no GPU, a vendor absent)
        self.messages_dropped = 0  # warnings beyond MAX_MESSAGES
        self.last_t_wall: float | None = None  # the latest wall time any record carried
        self.counters = {"events": 0, "malformed_lines": 0, "oversized_lines": 0, "spooled_events": 0, "samples": 0,
                         "dropped_late_events": 0}
        self.poll_stats: dict = {}
        self.poll_hz: float | None = None
        # live view
        self.recent_losses: deque[float] = deque(maxlen=RECENT_LOSSES)
        self.loss_ema: float | None = None
        self.last_log: dict = {}
        self.recent_step_ends: deque[tuple[float, int]] = deque(maxlen=RECENT_STEPS)  # (t_mono, step) of rank 0
        self.latest_gpu: dict[str, dict] = {}
        self.latest_host: dict | None = None
        self.latest_peak_by_rank: dict[int, int | None] = {}
        self.last_step_t_mono: float | None = None
        self._loss_min: float | None = None
        # aggregation of ticks into steps (current session only)
        self._ticks: deque[dict] = deque()
        self._pending: deque[int] = deque()  # steps waiting for a tick after their end
        self._prev_end_mono: float | None = None
        # sealing
        self._saved_steps: deque[int] = deque(maxlen=8)  # recent checkpoint steps
        self._tally_at_checkpoint: dict[int, RunTally] = {}

    # ------------------------------------------------------------ applying

    @property
    def session(self) -> int:
        return self.sessions[-1]["session"] if self.sessions else 0

    @property
    def current_session(self) -> dict | None:
        return self.sessions[-1] if self.sessions else None

    def apply(self, record: dict) -> None:
        handler = getattr(self, f"_on_{record.get('type')}", None)
        if handler is not None:
            handler(record)
        t_wall = record.get("t_wall")
        if isinstance(t_wall, (int, float)) and (self.last_t_wall is None or t_wall > self.last_t_wall):
            self.last_t_wall = t_wall
        pid, seq = record.get("pid"), record.get("seq")
        if isinstance(seq, int) and isinstance(pid, int) and seq > self.max_seq_by_pid.get(pid, 0):
            self.max_seq_by_pid[pid] = seq

    def _on_session_start(self, r: dict) -> None:
        self._seal_all()
        self.sessions.append(
            {
                "session": r["session"],
                "kind": r.get("kind", "run"),
                "started_at": iso(r.get("t_wall")),
                "ended_at": None,
                "duration_s": None,
                "status": RUNNING,
                "exit_code": None,
                "signal": None,
                "start_step": None,
                "end_step": None,
                "error": None,
                "_t_wall": r.get("t_wall"),
                "_pids": [],  # the child's (accelerate launch's) pid
                "_last_step": None,  # rank 0's newest ended step: steps two before it are final
                "_trained_to_end": False,  # rank 0 reached on_train_end
            }
        )
        if r.get("config") is not None:
            self.config = r["config"]
        self.poll_hz = r.get("poll_hz", self.poll_hz)
        self._ticks.clear()
        self._pending.clear()
        self._prev_end_mono = None
        self.recent_step_ends.clear()
        self.latest_gpu.clear()
        self.last_step_t_mono = None

    def _on_child_started(self, r: dict) -> None:
        s = self._session_record(r.get("session"))
        if s is not None and isinstance(r.get("pid"), int):
            s["_pids"].append(r["pid"])

    def _on_session_end(self, r: dict) -> None:
        self._seal_all()
        s = self._session_record(r.get("session"))
        if s is None:
            return
        s.update(status=r.get("status", FAILED), exit_code=r.get("exit_code"), signal=r.get("signal"), error=r.get("error"))
        s["ended_at"] = iso(r.get("t_wall"))
        if s.get("_t_wall") is not None and r.get("t_wall") is not None:
            s["duration_s"] = round(r["t_wall"] - s["_t_wall"], 3)
        s["end_step"] = s["_last_step"] if s.get("_last_step") is not None else s.get("start_step")
        for key, value in (r.get("counters") or {}).items():
            if key in self.counters:
                self.counters[key] += value
        if r.get("poll_stats"):
            stats = r["poll_stats"]
            self.poll_stats = {
                "poll_ticks": stats.get("ticks"),
                "poll_skipped_ticks": stats.get("skipped_ticks"),
                "poll_interval_mean_s": stats.get("mean_interval_s"),
                "poll_lateness_p99_s": stats.get("lateness_p99_s"),
                "poll_lateness_max_s": stats.get("lateness_max_s"),
                "energy_fallbacks": stats.get("energy_fallbacks") or {},
            }

    def _on_devices(self, r: dict) -> None:
        for info in r.get("devices", []):
            entry = self.devices.setdefault(info["key"], {"energy_j": None, "energy_method": None, "_session_energy": {}})
            entry.update({k: v for k, v in info.items() if k != "energy_j"})
        if r.get("host"):
            self.host_info = r["host"]
        for note in r.get("notes", []):
            if note not in self.notes:
                self.notes.append(note)

    def _on_note(self, r: dict) -> None:
        if r.get("level") == "info":
            if r["text"] not in self.notes and len(self.notes) < MAX_MESSAGES:
                self.notes.append(r["text"])
        else:
            self.warn(r["text"])

    def _on_hub(self, r: dict) -> None:
        self.hub = {k: r.get(k) for k in ("repo_id", "commit_sha", "url", "adapter_config_url", "error")}

    def _on_run_start(self, r: dict) -> None:
        if r.get("rank") != 0:
            return
        self.run_info = {k: v for k, v in r.items() if k not in ("type", "rank", "session")}
        s = self._session_record(r.get("session"))
        start = int(r.get("start_step") or 0)
        if s is not None:
            s["start_step"] = start
        # A resumed session trains again the steps after its checkpoint: those of
        # earlier sessions are superseded (the journal keeps them).
        self._supersede_after(start, r.get("session", self.session))

    def _entry(self, step: int, session: int) -> dict | None:
        """The open entry of ``step``, new if need be; None for a step already sealed (a late event)."""
        entry = self.open_steps.get(step)
        if entry is None and self.tally.entries and step <= self.tally.last_step:
            self.counters["dropped_late_events"] += 1
            return None
        if entry is None or entry["session"] < session:
            entry = {
                "step": step,
                "epoch": None,
                "session": session,
                "timestamp": None,
                "t_mono": None,
                "step_time_s": None,
                "loss": None,
                "learning_rate": None,
                "grad_norm": None,
                "samples_seen": None,
                "tokens_seen": None,
                "peak_vram_bytes": {},
                "vram_gb": None,
                "power_avg": None,
                "power_min": None,
                "power_max": None,
                "temp": None,
                "util": None,
                "energy_j": None,
                "gpus": {},
                "host": None,
            }
            self.open_steps[step] = entry
        return entry

    def _on_step(self, r: dict) -> None:
        self.counters["events"] += 1
        step, session, rank = int(r["step"]), int(r.get("session", self.session)), r["rank"]
        peak = r.get("peak_vram_bytes")
        self.latest_peak_by_rank[rank] = peak
        entry = self._entry(step, session)
        if entry is None:
            return
        entry["peak_vram_bytes"][str(rank)] = peak
        peaks = [v for v in entry["peak_vram_bytes"].values() if isinstance(v, (int, float))]
        entry["vram_gb"] = round(max(peaks) / 1e9, 6) if peaks else None
        if rank != 0:
            return
        entry["epoch"] = r.get("epoch")
        entry["timestamp"] = iso(r.get("t_wall"))
        entry["t_mono"] = r.get("t_mono")
        entry["step_time_s"] = r.get("step_time_s")
        if r.get("tokens_seen") is not None:
            entry["tokens_seen"] = r["tokens_seen"]
        per_step = self._samples_per_step()
        if per_step is not None:
            entry["samples_seen"] = step * per_step
        if r.get("t_mono") is not None:
            self.recent_step_ends.append((r["t_mono"], step))
            self.last_step_t_mono = r["t_mono"]
            if session == self.session and self._ticks:  # no poller, no samples to wait for
                self._pending.append(step)
                if len(self._pending) > MAX_UNAGGREGATED_STEPS:
                    oldest = self.open_steps.get(self._pending.popleft())
                    if oldest is not None:
                        self._aggregate(oldest)
        s = self.current_session
        if session == self.session and s is not None:
            s["_last_step"] = max(s["_last_step"] or 0, step)
            self._seal_ready()

    def _on_log(self, r: dict) -> None:
        self.counters["events"] += 1
        if r.get("step") is None:
            return
        entry = self._entry(int(r["step"]), int(r.get("session", self.session)))
        if entry is None:
            return
        for key in ("learning_rate", "grad_norm"):
            if key in r:
                entry[key] = _number(r[key])
        if r.get("epoch") is not None:
            entry["epoch"] = r["epoch"]
        if "loss" in r:
            self._record_loss(entry, r["loss"])
        # Merged, not replaced: the Trainer's closing log (train_runtime) carries no loss or
        # learning rate, and the dashboard's last frame must still show them.
        self.last_log.update({k: r[k] for k in ("loss", "learning_rate", "grad_norm", "epoch") if k in r})

    def _record_loss(self, entry: dict, raw: Any) -> None:
        loss = _number(raw)
        tag = _nonfinite_tag(raw)
        entry["loss"] = loss
        if tag is not None:
            entry["loss_nonfinite"] = tag
            self.warn(f"non-finite loss ({tag}) at step {entry['step']}")
            return
        if loss is None:
            return
        self.recent_losses.append(loss)
        self.loss_ema = loss if self.loss_ema is None else EMA_ALPHA * loss + (1 - EMA_ALPHA) * self.loss_ema
        if self._loss_min is not None and len(self.recent_losses) > 10 and loss > EXPLODING_FACTOR * self._loss_min:
            self.warn(f"exploding loss: {loss:.4g} at step {entry['step']} (minimum so far {self._loss_min:.4g})")
        self._loss_min = loss if self._loss_min is None else min(self._loss_min, loss)

    def _on_save(self, r: dict) -> None:
        self.counters["events"] += 1
        self.checkpoints = self.checkpoints[-99:] + [{"step": r.get("step"), "path": r.get("path"), "session": r.get("session")}]
        if isinstance(r.get("step"), int):
            self._saved_steps.append(r["step"])
            if self.tally.entries and r["step"] == self.tally.last_step:
                self._keep_tally_at(r["step"])

    def _on_train_end(self, r: dict) -> None:
        self.counters["events"] += 1
        s = self._session_record(r.get("session"))
        if s is not None and r.get("rank") == 0:
            s["_trained_to_end"] = True

    def _on_tick(self, r: dict) -> None:
        self.counters["samples"] += 1
        run_keys = self._run_gpu_keys()
        total_power = [g["power_w"] for g in r.get("gpus", ()) if g["key"] in run_keys and g.get("power_w") is not None]
        utils = [g["util_pct"] for g in r.get("gpus", ()) if g["key"] in run_keys and g.get("util_pct") is not None]
        temps = [
            g.get("temp_junction_c") if g.get("temp_junction_c") is not None else g.get("temp_c")
            for g in r.get("gpus", ())
            if g["key"] in run_keys
        ]
        temps = [t for t in temps if t is not None]
        tick = {
            "t_mono": r["t_mono"],
            "gpus": {g["key"]: g for g in r.get("gpus", ())},
            "host": r.get("host"),
            "power": sum(total_power) if total_power else None,
            "util": sum(utils) / len(utils) if utils else None,
            "temp": max(temps) if temps else None,
        }
        for g in r.get("gpus", ()):
            self.latest_gpu[g["key"]] = g
            if g.get("energy_j") is not None and g["key"] in self.devices:
                dev = self.devices[g["key"]]
                dev["_session_energy"][str(self.session)] = g["energy_j"]
                dev["energy_j"] = round(sum(dev["_session_energy"].values()), 3)
                dev["energy_method"] = g.get("energy_method")
        if r.get("host"):
            self.latest_host = r["host"]
        self._ticks.append(tick)
        self._aggregate_ready(r["t_mono"])
        self._seal_ready()

    # ------------------------------------------------------------ tick -> step aggregation

    def _run_gpu_keys(self) -> set[str]:
        keys = {k for k, d in self.devices.items() if d.get("in_run", True)}
        return keys

    def _aggregate_ready(self, now_mono: float) -> None:
        while self._pending:
            step = self._pending[0]
            entry = self.open_steps.get(step)
            end = entry.get("t_mono") if entry else None
            if end is None:
                self._pending.popleft()
                continue
            if end > now_mono:
                break
            self._pending.popleft()
            self._aggregate(entry)
        self._trim_ticks()

    def _flush_pending(self) -> None:
        while self._pending:
            entry = self.open_steps.get(self._pending.popleft())
            if entry and entry.get("t_mono") is not None:
                self._aggregate(entry)

    def _trim_ticks(self) -> None:
        """Drop ticks no pending step can need; keep one before the window for energy interpolation."""
        if self._pending:
            first = self.open_steps.get(self._pending[0]) or {}
            horizon = (first.get("t_mono") or 0) - (first.get("step_time_s") or 0)
            horizon = min(horizon, self._prev_end_mono or horizon)
        else:
            horizon = self._prev_end_mono
        if horizon is None:
            # No step has ended yet (a big model still loading): keep a bounded recent window,
            # enough for the first step's samples.
            while len(self._ticks) > TICKS_BEFORE_FIRST_STEP:
                self._ticks.popleft()
            return
        while len(self._ticks) > 2 and self._ticks[1]["t_mono"] <= horizon:
            self._ticks.popleft()

    def _aggregate(self, entry: dict) -> None:
        end = entry["t_mono"]
        start = self._prev_end_mono
        if start is None or start >= end:
            start = end - (entry.get("step_time_s") or 0.0)
        self._prev_end_mono = end
        inside = [t for t in self._ticks if start < t["t_mono"] <= end]
        carried = False
        if not inside:
            before = [t for t in self._ticks if t["t_mono"] <= end]
            if not before:
                return
            inside = [before[-1]]
            carried = True
        entry["gpus_carried"] = carried
        entry["power_avg"], entry["power_min"], entry["power_max"] = _avg_min_max([t["power"] for t in inside])
        entry["util"] = _avg_min_max([t["util"] for t in inside])[0]
        temps = [t["temp"] for t in inside if t["temp"] is not None]
        entry["temp"] = max(temps) if temps else None
        run_keys = self._run_gpu_keys()
        energy_total = 0.0
        energy_known = False
        for key in sorted({k for t in inside for k in t["gpus"]}):
            samples = [t["gpus"][key] for t in inside if key in t["gpus"]]
            power = _avg_min_max([s.get("power_w") for s in samples])
            util = _avg_min_max([s.get("util_pct") for s in samples])
            energy = self._energy_between(key, start, end)
            if energy is not None and key in run_keys:
                energy_total += energy
                energy_known = True
            entry["gpus"][key] = {
                "power_avg": power[0],
                "power_min": power[1],
                "power_max": power[2],
                "util_avg": util[0],
                "util_min": util[1],
                "util_max": util[2],
                "temp_max": _max([s.get("temp_c") for s in samples]),
                "temp_junction_max": _max([s.get("temp_junction_c") for s in samples]),
                "energy_j": energy,
                "vram_used_max_bytes": _max([s.get("vram_used_bytes") for s in samples]),
                "run_vram_max_bytes": _max([s.get("run_vram_bytes") for s in samples]),
                "throttle": sorted({r for s in samples for r in (s.get("throttle") or ())}) or None,
                "samples": 0 if carried else len(samples),
            }
        entry["energy_j"] = round(energy_total, 6) if energy_known else None
        hosts = [t["host"] for t in inside if t.get("host")]
        if hosts:
            entry["host"] = {
                "cpu_pct": _avg_min_max([h.get("cpu_pct") for h in hosts])[0],
                "ram_used_bytes": _max([h.get("ram_used_bytes") for h in hosts]),
            }

    def _energy_between(self, key: str, start: float, end: float) -> float | None:
        """Energy counter interpolated linearly at both ends of the step."""
        points = [(t["t_mono"], t["gpus"][key].get("energy_j")) for t in self._ticks if key in t["gpus"]]
        points = [(t, e) for t, e in points if e is not None]
        if len(points) < 2:
            return None
        e_start, e_end = _interpolate(points, start), _interpolate(points, end)
        if e_start is None or e_end is None:
            return None
        return round(max(e_end - e_start, 0.0), 6)

    # ------------------------------------------------------------ sealing

    def _seal_ready(self) -> None:
        """Seal, in step order, the open steps that are final."""
        horizon = ((self.current_session or {}).get("_last_step") or 0) - SEAL_LAG_STEPS
        while self.open_steps:
            step = min(self.open_steps)
            if step > horizon or (self._pending and step >= self._pending[0]):
                return
            self._seal(step)

    def _seal_all(self) -> None:
        """A session ends: what it did not report now never will be."""
        self._flush_pending()
        while self.open_steps:
            self._seal(min(self.open_steps))

    def _seal(self, step: int) -> None:
        entry = self.open_steps.pop(step)
        self.tally.add(entry)
        self.step_log.append(step, encode_entry(entry))
        if step in self._saved_steps:
            self._keep_tally_at(step)
        for listener in self.sealed_listeners:
            listener(entry)

    def _keep_tally_at(self, step: int) -> None:
        self._tally_at_checkpoint[step] = self.tally.copy()
        for old in sorted(self._tally_at_checkpoint)[:-TALLY_COPIES_KEPT]:
            del self._tally_at_checkpoint[old]

    def _supersede_after(self, start: int, session: int) -> None:
        for step in [k for k, e in self.open_steps.items() if k > start and e["session"] < session]:
            del self.open_steps[step]
        if self.tally.last_step <= start:
            return
        self.step_log.truncate_after(start)
        kept = self._tally_at_checkpoint.get(start)
        # Without a copy at that checkpoint (an older one), recount from the step log: slow but exact.
        self.tally = kept.copy() if kept is not None else tally_steps(self.step_log.entries())
        self._tally_at_checkpoint = {k: t for k, t in self._tally_at_checkpoint.items() if k <= start}

    # ------------------------------------------------------------ helpers

    def _session_record(self, number: Any) -> dict | None:
        for s in reversed(self.sessions):
            if s["session"] == number:
                return s
        return self.sessions[-1] if self.sessions and number is None else None

    def _samples_per_step(self) -> int | None:
        args = self.run_info.get("args") or {}
        bs, accum, world = args.get("per_device_train_batch_size"), args.get("gradient_accumulation_steps"), self.run_info.get("world_size")
        if isinstance(bs, int) and isinstance(accum, int) and isinstance(world, int):
            return bs * accum * world
        return None

    def warn(self, text: str) -> None:
        if text in self.warnings:
            return
        if len(self.warnings) >= MAX_MESSAGES:
            self.messages_dropped += 1  # e.g. a NaN loss at every step: the summary counts those
            return
        self.warnings.append(text)

    @property
    def status(self) -> str:
        return self.sessions[-1]["status"] if self.sessions else RUNNING

    @property
    def last_step(self) -> int:
        return max(self.tally.last_step, max(self.open_steps, default=0))

    # ------------------------------------------------------------ views

    def history(self) -> dict:
        """The ``history.json`` document without its steps (see docs/history-schema.md); the steps
        come from ``step_chunks`` and their figures from ``report_tally``."""
        sessions = [{k: v for k, v in s.items() if not k.startswith("_")} for s in self.sessions]
        devices = [
            {k: v for k, v in d.items() if not k.startswith("_")} for _, d in sorted(self.devices.items())
        ]
        return {
            "schema_version": SCHEMA_VERSION,
            "project": self.project,
            "generated_at": iso(time.time()),
            "status": self.status,
            "config": self.config,
            "run": self._run_summary(),
            "sessions": sessions,
            "devices": devices,
            "host": self.host_info,
            "telemetry": {**self.counters, "poll_hz": self.poll_hz, **self.poll_stats, "notes": list(self.notes)},
            "warnings": list(self.warnings)
            + ([f"{self.messages_dropped} more warnings not kept (the first {MAX_MESSAGES} are listed)"] if self.messages_dropped else []),
            "hub": self.hub,
            "checkpoints": self.checkpoints[-20:],
        }

    def _unsealed(self) -> list[dict]:
        return [self.open_steps[k] for k in sorted(self.open_steps) if k > self.tally.last_step]

    def report_tally(self) -> RunTally:
        """The tally of every step so far, open ones included, for a report now (the state is unchanged)."""
        unsealed = self._unsealed()
        if not unsealed:
            return self.tally
        tally = self.tally.copy()
        for entry in unsealed:
            tally.add(entry)
        return tally

    def step_chunks(self) -> Iterator[bytes]:
        """history.json's step entries, one line each, in blocks: the sealed ones, then the open ones."""
        yield from self.step_log.chunks()
        for entry in self._unsealed():
            yield encode_entry(entry)

    def history_with_steps(self) -> dict:
        """The whole history.json document in memory (tests, small runs)."""
        return {**self.history(), "steps": list(self.step_log.entries()) + [json.loads(encode_entry(e)) for e in self._unsealed()]}

    def _run_summary(self) -> dict:
        info = self.run_info
        args = info.get("args") or {}
        cfg = self.config or {}
        lora = cfg.get("lora") or {}
        per_device = args.get("per_device_train_batch_size")
        accum = args.get("gradient_accumulation_steps")
        world = info.get("world_size")
        effective = per_device * accum * world if all(isinstance(v, int) for v in (per_device, accum, world)) else None
        precision = "bf16" if args.get("bf16") else "fp16" if args.get("fp16") else ("fp32" if args else None)
        return {
            "world_size": world,
            "max_steps": info.get("max_steps"),
            "trainable_params": info.get("trainable_params"),
            "total_params": info.get("total_params"),
            "architecture": info.get("architecture"),
            "base_model": (cfg.get("model") or {}).get("base_model"),
            "device": info.get("device"),
            "precision": precision,
            "per_device_batch_size": per_device,
            "gradient_accumulation_steps": accum,
            "effective_batch_size": effective,
            "learning_rate": args.get("learning_rate"),
            "lr_scheduler_type": args.get("lr_scheduler_type"),
            "optimizer": args.get("optim"),
            "lora": {"r": lora.get("r"), "alpha": lora.get("alpha"), "target_modules": lora.get("target_modules")} if lora else None,
            "seq_length": (cfg.get("model") or {}).get("max_seq_length"),
        }

    def snapshot(self, *, status: str | None = None, now_mono: float | None = None, log_tail: tuple[str, ...] = (), extra_warnings: tuple[str, ...] = ()) -> Snapshot:
        now_mono = time.monotonic() if now_mono is None else now_mono
        session = self.current_session
        started = session.get("_t_wall") if session else None
        elapsed = time.time() - started if started and session and session["status"] == RUNNING else (session or {}).get("duration_s") or 0.0
        rate = self.steps_per_s()
        max_steps = self.run_info.get("max_steps")
        step = self.last_step
        eta = (max_steps - step) / rate if rate and max_steps and max_steps > step else None
        per_step = self._samples_per_step()
        # Rank r trains on the r-th GPU it can see (accelerate's cuda:LOCAL_RANK, one node).
        run_keys = [key for key, dev in sorted(self.devices.items()) if dev.get("in_run", True)]
        gpus = tuple(
            self._gpu_row(key, dev, run_keys.index(key) if key in run_keys else None)
            for key, dev in sorted(self.devices.items())
        )
        host = None
        if self.latest_host:
            host = HostRow(
                cpu_pct=self.latest_host.get("cpu_pct"),
                ram_used_bytes=self.latest_host.get("ram_used_bytes"),
                ram_total_bytes=self.latest_host.get("ram_total_bytes"),
            )
        return Snapshot(
            project=self.project,
            status=status or self.status,
            session=self.session,
            elapsed_s=elapsed,
            step=step,
            max_steps=max_steps,
            epoch=self.last_log.get("epoch"),
            loss=_number(self.last_log.get("loss")),
            loss_smoothed=self.loss_ema,
            recent_losses=tuple(self.recent_losses),
            learning_rate=_number(self.last_log.get("learning_rate")),
            grad_norm=_number(self.last_log.get("grad_norm")),
            steps_per_s=rate,
            samples_per_s=rate * per_step if rate and per_step else None,
            eta_s=eta,
            peak_vram_by_rank=dict(sorted(self.latest_peak_by_rank.items())),
            gpus=gpus,
            host=host,
            log_tail=log_tail,
            warnings=tuple(self.warnings[-5:]) + extra_warnings,
            exit_code=(session or {}).get("exit_code"),
        )

    def _gpu_row(self, key: str, dev: dict, rank: int | None) -> GpuRow:
        latest = self.latest_gpu.get(key) or {}
        return GpuRow(
            key=key,
            name=dev.get("name", key),
            in_run=dev.get("in_run", True),
            rank=rank,
            util_pct=latest.get("util_pct"),
            vram_used_bytes=latest.get("vram_used_bytes"),
            vram_total_bytes=latest.get("vram_total_bytes") or dev.get("vram_total_bytes"),
            power_w=latest.get("power_w"),
            temp_c=_first_not_none(latest.get("temp_junction_c"), latest.get("temp_c")),
            energy_j=dev.get("energy_j"),
            throttle=tuple(latest.get("throttle") or ()),
        )

    def steps_per_s(self) -> float | None:
        if len(self.recent_step_ends) < 2:
            return None
        (t0, s0), (t1, s1) = self.recent_step_ends[0], self.recent_step_ends[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def median_step_time(self) -> float | None:
        ends = list(self.recent_step_ends)
        gaps = [b[0] - a[0] for a, b in zip(ends, ends[1:]) if b[0] > a[0]]
        return statistics.median(gaps) if gaps else None


# What a checkpoint of the state (state.json) holds as-is; the rest is converted in to/from_checkpoint.
_PLAIN_FIELDS = (
    "config", "sessions", "run_info", "devices", "host_info", "checkpoints", "hub", "warnings", "notes",
    "messages_dropped", "counters", "poll_stats", "poll_hz", "loss_ema", "last_log", "latest_gpu", "latest_host",
    "last_step_t_mono", "last_t_wall", "_loss_min", "_prev_end_mono",
)


def state_to_checkpoint(state: RunState) -> dict:
    """Everything a ``RunState`` knows but the sealed steps (those are in its step log), as JSON-able data."""
    data = {name: getattr(state, name) for name in _PLAIN_FIELDS}
    data.update(
        project=state.project,
        open_steps=list(state.open_steps.values()),
        recent_losses=list(state.recent_losses),
        recent_step_ends=list(state.recent_step_ends),
        latest_peak_by_rank=list(state.latest_peak_by_rank.items()),
        max_seq_by_pid=list(state.max_seq_by_pid.items()),
        ticks=list(state._ticks),
        pending=list(state._pending),
        saved_steps=list(state._saved_steps),
        tally=state.tally.to_dict(),
        tally_at_checkpoint=[[step, tally.to_dict()] for step, tally in state._tally_at_checkpoint.items()],
    )
    return data


def state_from_checkpoint(data: dict, step_log: StepLog) -> RunState:
    state = RunState(data["project"], step_log)
    for name in _PLAIN_FIELDS:
        setattr(state, name, data[name])
    state.counters = {**RunState(state.project).counters, **state.counters}
    state.open_steps = {entry["step"]: entry for entry in data["open_steps"]}
    state.recent_losses.extend(data["recent_losses"])
    state.recent_step_ends.extend(tuple(pair) for pair in data["recent_step_ends"])
    state.latest_peak_by_rank = {int(rank): peak for rank, peak in data["latest_peak_by_rank"]}
    state.max_seq_by_pid = {int(pid): seq for pid, seq in data["max_seq_by_pid"]}
    state._ticks.extend(data["ticks"])
    state._pending.extend(data["pending"])
    state._saved_steps.extend(data["saved_steps"])
    state.tally = RunTally.from_dict(data["tally"])
    state._tally_at_checkpoint = {int(step): RunTally.from_dict(t) for step, t in data["tally_at_checkpoint"]}
    return state


def _avg_min_max(values: list) -> tuple[float | None, float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None, None
    return round(sum(present) / len(present), 3), min(present), max(present)


def _max(values: list) -> Any:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _first_not_none(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _interpolate(points: list[tuple[float, float]], t: float) -> float | None:
    """Linear interpolation of a cumulative counter at time ``t`` (clamped inside the known span)."""
    if t <= points[0][0]:
        return points[0][1]
    for (t0, e0), (t1, e1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return e0 if t1 == t0 else e0 + (e1 - e0) * (t - t0) / (t1 - t0)
    return points[-1][1]


def replay(project: str, records: Iterable[dict], step_log: StepLog | None = None) -> RunState:
    """A state from journal records (tests; ``kaio.run.derived`` loads a project's)."""
    state = RunState(project, step_log)
    for record in records:
        state.apply(record)
    return state

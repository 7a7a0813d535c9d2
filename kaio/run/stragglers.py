"""Stragglers: the rank whose own work in a step is the longest, step after step.

Under DDP all ranks end a step together (the all-reduce waits for the last
one), so their step times cannot tell who is slow. Each rank reports the work
it does before its first collective (``Step.data_s`` fetching its micro-batches,
``Step.forward_s`` its forward passes; kaio.child.timing): in each step every
rank reported, the rank with the most is the slowest, and its lag is how much
more than the other ranks' median. A rank is flagged when it is the slowest in
at least 75% of the last 20 such steps, and in more of them than chance gives
one of N ranks once in 10,000 windows (19 of 20 for two ranks, where a coin
reaches 15 every 50 windows), by at least 10% of the median step time (and
5 ms): a straggler, not noise; said once per rank and session.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

import msgspec

from kaio.record.types import RankTiming, RunStart, Step

WINDOW = 20
CONSISTENT_SHARE = 0.75
MIN_LAG_SHARE = 0.10  # of the median step time
MIN_LAG_S = 0.005
OPEN_STEPS = 64  # steps waiting for their other ranks; older ones are given up
CHANCE = 1e-4  # how rarely a rank that is no slower than the others may be flagged, in one window


@functools.cache
def consistent_count(ranks: int) -> int:
    """The slowest-step count in a window that flags a rank: 75% of it, and beyond what chance gives one of
    ``ranks`` equal ranks (each the slowest with probability 1/ranks) more often than ``CHANCE``."""
    p = 1.0 / ranks

    def tail(k: int) -> float:
        return sum(math.comb(WINDOW, i) * p**i * (1 - p) ** (WINDOW - i) for i in range(k, WINDOW + 1))

    by_chance = next((k for k in range(1, WINDOW + 1) if tail(k) < CHANCE), WINDOW)
    return max(math.ceil(CONSISTENT_SHARE * WINDOW), by_chance)


@dataclass(frozen=True)
class StepRanks:
    """One step's finding: its slowest rank, the lag, and the warning when that rank is newly flagged."""

    step: int
    slowest_rank: int
    lag_s: float
    warning: str | None


class _Work(msgspec.Struct, array_like=True):
    data_s: float
    forward_s: float

    @property
    def total(self) -> float:
        return self.data_s + self.forward_s


class _Finding(msgspec.Struct, array_like=True):
    slowest_rank: int
    lag_s: float
    data_lag_s: float
    forward_lag_s: float
    step_time_s: float | None


class StragglerWatch(msgspec.Struct, kw_only=True):
    open: dict[int, dict[int, _Work]] = {}  # step -> rank -> its own work
    step_times: dict[int, float] = {}  # step -> rank 0's step time
    ranks: dict[int, RankTiming] = {}  # every rank of every session
    started: set[int] = set()  # the ranks that said they started in this session
    warned: set[int] = set()  # flagged this session: said once, however often it crosses the line again
    window: list[_Finding] = []
    flagged: int | None = None
    lead_rank: int = 0  # whose step time sets the lag's floor

    def start_session(self) -> None:
        self.open, self.step_times, self.window, self.flagged = {}, {}, [], None
        self.started = set()
        self.warned = set()

    def on_run_start(self, r: RunStart) -> None:
        self.started.add(r.rank)
        timing = self._rank(r.rank)
        timing.host, timing.device = r.hostname, r.device

    def on_step(self, r: Step) -> StepRanks | None:
        # The ranks this supervisor hears from (its node's, on a job of several machines: one clock) that said
        # they started; a step is complete when each of them timed it.
        expected = len(self.started)
        if expected < 2 or (r.data_s is None and r.forward_s is None):
            return None
        work = self.open.setdefault(r.step, {})
        work[r.rank] = _Work(r.data_s or 0.0, r.forward_s or 0.0)
        if r.rank == self.lead_rank and r.step_time_s is not None:
            self.step_times[r.step] = r.step_time_s
        if len(work) < expected:
            if len(self.open) > OPEN_STEPS:  # a rank that stopped reporting: give up on its oldest steps
                for step in sorted(self.open)[: len(self.open) - OPEN_STEPS]:
                    del self.open[step]
                    self.step_times.pop(step, None)
            return None
        del self.open[r.step]
        return self._complete(r.step, work, self.step_times.pop(r.step, None))

    def _complete(self, step: int, work: dict[int, _Work], step_time_s: float | None) -> StepRanks:
        slowest = max(work, key=lambda rank: (work[rank].total, -rank))
        others = [w for rank, w in work.items() if rank != slowest]
        mine = work[slowest]
        finding = _Finding(
            slowest_rank=slowest,
            lag_s=mine.total - statistics.median(w.total for w in others),
            data_lag_s=mine.data_s - statistics.median(w.data_s for w in others),
            forward_lag_s=mine.forward_s - statistics.median(w.forward_s for w in others),
            step_time_s=step_time_s,
        )
        for rank, w in work.items():
            timing = self._rank(rank)
            timing.steps += 1
            timing.data_s += w.data_s
            timing.forward_s += w.forward_s
        timing = self._rank(slowest)
        timing.slowest += 1
        timing.lag_s += finding.lag_s
        self.window = [*self.window[-(WINDOW - 1) :], finding]
        return StepRanks(step, slowest, round(finding.lag_s, 6), self._flag())

    def _flag(self) -> str | None:
        """The warning when a rank becomes a consistent straggler; None otherwise."""
        if len(self.window) < WINDOW:
            return None
        counts: dict[int, int] = {}
        for f in self.window:
            counts[f.slowest_rank] = counts.get(f.slowest_rank, 0) + 1
        rank, count = max(counts.items(), key=lambda item: item[1])
        mine = [f for f in self.window if f.slowest_rank == rank]
        lag = statistics.median(f.lag_s for f in mine)
        times = [f.step_time_s for f in self.window if f.step_time_s is not None]
        floor = max(MIN_LAG_S, MIN_LAG_SHARE * statistics.median(times)) if times else MIN_LAG_S
        ranks = len(self.started) or len(counts)
        if count < consistent_count(max(ranks, 2)) or lag < floor:
            self.flagged = None
            return None
        if self.flagged == rank:
            return None
        self.flagged = rank
        if rank in self.warned:
            return None
        self.warned.add(rank)
        timing = self.ranks.get(rank)
        where = ", ".join(x for x in (timing and timing.host, timing and timing.device) if x)
        data = statistics.median(f.data_lag_s for f in mine)
        forward = statistics.median(f.forward_lag_s for f in mine)
        return (
            f"straggler: rank {rank}{f' ({where})' if where else ''} was the slowest in {count} of the last "
            f"{WINDOW} steps, {lag:.3g} s a step behind the other ranks (data loading {data:+.3g} s, "
            f"forward {forward:+.3g} s)"
        )

    def _rank(self, rank: int) -> RankTiming:
        timing = self.ranks.get(rank)
        if timing is None:
            timing = self.ranks[rank] = RankTiming(rank=rank)
        return timing

    def summary(self) -> list[RankTiming]:
        """Each rank's totals, when several ranks timed their steps."""
        if len(self.ranks) < 2 or not any(t.steps for t in self.ranks.values()):
            return []
        return [self.ranks[rank] for rank in sorted(self.ranks)]

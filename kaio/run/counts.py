"""What the steps have seen: the examples and input tokens by the end of each of rank 0's steps, all ranks together.

Samples are what rank 0's micro-batches held (an epoch's last batch may be short) times the world size, at most the
batch; where the child could not count them, the batch of every step. Tokens are the Trainer's count where it
counts them (include_num_input_tokens_seen), else kaio's count of rank 0's input ids times the world size. Both go
on from where the record, a resume or a later training of the script began.
"""

from __future__ import annotations

import msgspec

from kaio.record.flops import Throughput
from kaio.record.types import Step


class SeenCounts(msgspec.Struct, kw_only=True):
    # Samples seen are the step times the samples a step takes, counted from this (step, samples): a script's
    # later training (another Trainer, another batch size) counts on from where the earlier one ended, and a
    # record that begins at a later step counts from there.
    samples_from: tuple[int, int] = (0, 0)
    last_samples_seen: int = 0
    counted_through: tuple[int, int] | None = None  # (step, samples seen) of the latest step whose ranks counted
    # The Trainer's count where the record began (its tokens are the record's from there); minus the recorded count a
    # kaio.log loop resumed from (its process counts from 0).
    tokens_from: int = 0
    tokens_through: tuple[int, int] | None = None  # (step, tokens seen) of kaio's own count; None: its base unknown
    last_tokens_seen: int | None = None  # the Trainer's count at rank 0's latest step, this session

    def start_session(self) -> None:
        self.samples_from, self.last_samples_seen, self.counted_through = (0, 0), 0, None
        self.tokens_from, self.tokens_through, self.last_tokens_seen = 0, None, None

    def continue_at(self, start: int) -> None:
        """A later training of the session starts after step ``start``: its samples count on from there."""
        self.samples_from, self.counted_through = (start, self.last_samples_seen), None

    def begin_at(self, start: int, tokens: int | None) -> None:
        """The record begins after step ``start`` (the script resumed its Trainer from its own checkpoint, whose
        counts were ``tokens`` input tokens): samples and tokens count what this record trains."""
        self.samples_from, self.tokens_from, self.counted_through = (start, 0), tokens or 0, None
        self.tokens_through = (start, 0)

    def resume_at(self, start: int, samples: int | None, tokens: int | None, *, counts_from_zero: bool = False) -> None:
        """Rank 0 starts from checkpoint ``start``, whose recorded counts were these: the steps count on.
        ``counts_from_zero``: the process's own count of tokens starts at 0 (a kaio.log loop's), where a Trainer's
        goes on from its checkpoint's."""
        if counts_from_zero and start and tokens is not None:  # (unrecorded there: the record begins there)
            self.tokens_from = -tokens
        if samples is not None:
            self.samples_from, self.last_samples_seen, self.counted_through = (
                (start, samples),
                samples,
                (start, samples),
            )
        if self.tokens_through is None or self.tokens_through[0] != start:  # kaio's own count goes on from there
            self.tokens_through = (0, 0) if not start else (start, tokens) if tokens is not None else None

    def samples_seen(self, event: Step, throughput: Throughput | None) -> int | None:
        """The examples seen by the end of rank 0's step: its micro-batches' examples as it counted them times the
        world size (the ranks' batches are even), at most the batch; else the per-device batch x accumulation x
        world size of every step."""
        seen = self._samples_seen(event, throughput)
        if seen is not None:
            self.last_samples_seen = seen
        return seen

    def _samples_seen(self, event: Step, throughput: Throughput | None) -> int | None:
        step, samples = self.samples_from
        per_step = throughput.samples_per_step if throughput is not None else None
        if event.samples is not None and throughput is not None:
            counted = event.samples * throughput.world_size
            # Never more than the batch: a collator that stacks each example's rows (a preference pair's
            # chosen and rejected) hands the model more rows than examples.
            counted = min(counted, per_step) if per_step is not None else counted
            if self.counted_through is not None and event.step > self.counted_through[0]:
                step, samples = self.counted_through
            # The steps between, not counted (a kaio.log loop that reports every k steps): each the batch, or
            # where the batch is not known, as this one.
            between = event.step - 1 - step
            base = samples + between * (per_step if per_step is not None else counted) if between >= 0 else None
            if base is not None:
                self.counted_through = (event.step, base + counted)
                return self.counted_through[1]
        self.counted_through = None
        return samples + (event.step - step) * per_step if per_step is not None else None

    def tokens_seen(self, event: Step, throughput: Throughput | None) -> int | None:
        """The input tokens seen by the end of rank 0's step: the Trainer's count where it counts; else kaio's, on
        from the count at the step the session began (None where that is not known: a resume from a step without
        one)."""
        if event.tokens_seen is not None:
            return event.tokens_seen - self.tokens_from
        through = self.tokens_through
        if event.tokens is None or throughput is None or through is None or event.step <= through[0]:
            self.tokens_through = None
            return None
        # Steps missing from the record in between (a late event): counted as this one, as samples are.
        counted = (event.step - through[0]) * event.tokens * throughput.world_size
        self.tokens_through = (event.step, through[1] + counted)
        return self.tokens_through[1]

    def step_tokens(self, event: Step, world_size: int) -> int | None:
        """This step's tokens, all ranks: the difference of the Trainer's counts, or kaio's count of rank 0's
        times the world size (as if every rank's were the same)."""
        previous, self.last_tokens_seen = self.last_tokens_seen, event.tokens_seen
        if previous is None and event.step == 1:  # the run's first step: the Trainer counted from 0
            previous = 0
        if event.tokens_seen is not None:
            return event.tokens_seen - previous if previous is not None else None
        return event.tokens * world_size if event.tokens is not None else None

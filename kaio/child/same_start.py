"""Every rank of a job starts from the same step, or none trains.

Each node's kaio resumes from the latest complete checkpoint it sees. On a filesystem every node shares that
is one checkpoint; a node that sees another folder (checkpoints saved on each node, one of them cut short;
a folder copied by hand) would resume from another step, and its ranks would train out of step with the
others: a hang in the collectives at best, silently wrong gradients at worst (and so would a node started
afresh with `kaio run` beside nodes that resume). So at every multi-rank train begin the ranks
compare the step the Trainer starts at, through torch.distributed's store (the rendezvous's, which every rank
of every node reaches): the first rank's step is written, each rank compares its own with it, and after all
have compared (a barrier on the store) every rank knows whether any differed, and then they all end with the
same one-line reason instead of training.
"""

from __future__ import annotations

from kaio.child import process_group

FIRST_KEY = "kaio/resumed_step"  # "<step> <rank>" of the first rank to compare
MISMATCH_KEY = "kaio/resumed_step_mismatch"  # set by a rank whose step differed: the reason
COUNT_KEY = "kaio/resumed_step_compared"
DONE_KEY = "kaio/resumed_step_done"
_checked: list[bool] = []


def check(step: int, rank: int, checkpoint: str | None) -> None:
    """At the Trainer's train begin (once per process; nothing with one rank): raise ``SystemExit`` on every
    rank when any rank starts at another step than the first one to compare. ``checkpoint``: the one kaio
    resumed this rank from, if any."""
    if _checked:
        return
    _checked.append(True)
    store = process_group.store()
    distributed = process_group.initialized()
    if store is not None and distributed is not None:
        compare(store, step, rank, distributed.get_world_size(), checkpoint)


def compare(store, step: int, rank: int, world_size: int, checkpoint: str | None) -> None:
    """The comparison itself, on torch.distributed's store (a ``TCPStore``)."""
    first_step, first_rank = store.compare_set(FIRST_KEY, "", f"{step} {rank}").decode().split()
    if int(first_step) != step:
        store.set(
            MISMATCH_KEY,
            f"rank {rank} starts at step {step} but rank {first_rank} at step {first_step}: the ranks do not resume "
            f"from the same checkpoint (rank {rank}'s: {checkpoint or 'none'}); give every node the same one (a "
            "folder they all see) and resume on every node, then start again",
        )
    if store.add(COUNT_KEY, 1) >= world_size:
        store.set(DONE_KEY, "1")
    store.wait([DONE_KEY])
    if store.check([MISMATCH_KEY]):
        raise SystemExit(store.get(MISMATCH_KEY).decode())

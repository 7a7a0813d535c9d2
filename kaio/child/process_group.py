"""torch.distributed's process group as the child sees it, without importing torch (a script may never)."""

from __future__ import annotations

import sys
from typing import Any

_gloo_seen: list[bool] = []


def initialized() -> Any | None:
    """``torch.distributed`` when this process is in an initialized process group, else None."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return None
    return distributed


def store() -> Any | None:
    """The job's key-value store (the rendezvous's, which every rank of every node reaches) when several ranks
    train, else None."""
    distributed = initialized()
    if distributed is None or distributed.get_world_size() < 2:
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None


def note_backend() -> None:
    """Remember a gloo group (at train begin, and before kaio destroys the group): the script may destroy it
    itself, which leaves DDP's reference to it, and its risk at exit (``quick_exit.exit_after_script``)."""
    distributed = initialized()
    if distributed is not None and distributed.get_backend() == "gloo":
        _gloo_seen[:] = [True]


def gloo_was_used() -> bool:
    return bool(_gloo_seen)

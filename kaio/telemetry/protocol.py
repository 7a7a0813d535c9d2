"""The wire protocol between the child's callback and the supervisor.

One event is one JSON object on one line, shorter than ``PIPE_BUF`` (4096
bytes) so that a single ``os.write`` to the FIFO is atomic: lines from several
ranks interleave but never tear. This module is imported inside the trainer:
standard library only.
"""

from __future__ import annotations

import json
import math
from typing import Any

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 4096  # PIPE_BUF on Linux: the atomic-write limit

# Environment variables the supervisor sets for the child.
ENV_PIPE = "KAIO_TELEMETRY_PIPE"  # path of the FIFO
ENV_SPOOL_DIR = "KAIO_SPOOL_DIR"  # where events go when the FIFO has no reader
ENV_ERROR_DIR = "KAIO_ERROR_DIR"  # where a failing rank writes its traceback
ENV_SESSION = "KAIO_SESSION"  # session number, stamped on every event
ENV_RESUME_FROM = "KAIO_RESUME_FROM"  # checkpoint a resumed session starts from

RUN_START = "run_start"  # once per rank at on_train_begin
STEP = "step"  # every optimizer step, every rank
LOG = "log"  # rank 0's Trainer logs (loss, learning rate, grad norm, epoch)
SAVE = "save"  # a checkpoint was written (rank 0)
TRAIN_END = "train_end"  # on_train_end (every rank)
EVENT_TYPES = frozenset({RUN_START, STEP, LOG, SAVE, TRAIN_END})


class ProtocolError(ValueError):
    """A line that is not a valid event."""


def encode(event: dict[str, Any]) -> bytes:
    """One event as one line of bytes, guaranteed shorter than ``MAX_LINE_BYTES``.

    Non-finite floats (a NaN loss) travel as strings "nan"/"inf"/"-inf" so the
    line stays strict JSON. An event too large is shrunk by dropping its
    optional ``extra`` mapping; if still too large, ``ProtocolError``.
    """
    line = json_line(event)
    if len(line) >= MAX_LINE_BYTES and "extra" in event:
        line = json_line({**{k: v for k, v in event.items() if k != "extra"}, "truncated": True})
    if len(line) >= MAX_LINE_BYTES:
        raise ProtocolError(f"event of type {event.get('type')!r} is {len(line)} bytes, over {MAX_LINE_BYTES}")
    return line


def decode(line: bytes | str) -> dict[str, Any]:
    """Parse one line; raise ``ProtocolError`` for anything that is not a known event."""
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise ProtocolError("not a JSON object")
    if event.get("type") not in EVENT_TYPES:
        raise ProtocolError(f"unknown event type {event.get('type')!r}")
    if not isinstance(event.get("rank"), int):
        raise ProtocolError("missing integer 'rank'")
    return event


def finite_or_tag(value: Any) -> Any:
    """A float as-is if finite, else its tag ("nan", "inf", "-inf"); inside dicts and lists too."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite_or_tag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_tag(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> bytes:
    """A record as one compact line of strict JSON (non-finite floats tagged); also the journal's format."""
    try:  # the common case, with nothing to tag, without a copy
        text = json.dumps(record, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        text = json.dumps(finite_or_tag(record), separators=(",", ":"), allow_nan=False, default=str)
    return (text + "\n").encode("utf-8")

"""The one rule for secrets: what looks like one never reaches a report, a log, the journal or a snapshot.

A key or flag is secret when a whole word of its name is ``token``, ``key``,
``secret`` or ``password`` (``hf_token``, ``API_KEY``, ``--hub-token``), so that
``tokenizer`` or ``tokens_seen`` keep their values. Standard library only: the
child imports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_SECRET_WORD = re.compile(r"(?:^|[_\-.])(?:token|key|apikey|secret|password|passwd)(?:$|[_\-.])", re.IGNORECASE)
REDACTED = "***"


def is_secret_key(name: str) -> bool:
    return bool(_SECRET_WORD.search(name))


def redact(value: Any, marker: str = REDACTED) -> Any:
    """A copy of a nested dict/list with the values of secret-looking keys replaced by ``marker``."""
    if isinstance(value, dict):
        return {
            k: (marker if is_secret_key(str(k)) and v not in (None, "") else redact(v, marker))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, marker) for v in value]
    return value


def redact_argv(argv: list[str], marker: str = REDACTED) -> list[str]:
    """``argv`` with the value of every secret-looking flag masked (``--hub_token X``, ``--api-key=X``)."""
    masked: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            masked.append(marker)
            hide_next = False
            continue
        flag, eq, _value = arg.partition("=")
        if arg.startswith("-") and is_secret_key(flag.lstrip("-")):
            masked.append(f"{flag}={marker}" if eq else arg)
            hide_next = not eq
            continue
        masked.append(arg)
    return masked


MIN_SECRET_CHARS = 8  # a shorter value ("1", "true") is no key, and masking it would mangle every text it is in


def secret_values(argv: Iterable[str], environ: Mapping[str, str]) -> list[str]:
    """The values the rule calls secret, to mask in free text (an error message, a traceback, the script's output):
    a secret-looking flag's in ``argv`` and a secret-looking environment variable's (HF_TOKEN, COMET_API_KEY),
    the longest first (one that holds another is masked whole)."""
    values: set[str] = set()
    hide_next = False
    for arg in argv:
        if hide_next:
            values.add(arg)
            hide_next = False
            continue
        flag, eq, value = arg.partition("=")
        if arg.startswith("-") and is_secret_key(flag.lstrip("-")):
            if eq:
                values.add(value)
            else:
                hide_next = True
    values.update(value for name, value in environ.items() if is_secret_key(name))
    return sorted((v for v in values if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)


def mask(text: str, values: Sequence[str], marker: str = REDACTED) -> str:
    for value in values:
        if value in text:
            text = text.replace(value, marker)
    return text

"""The one rule for secrets: what looks like one never reaches a report, a log, the journal or a snapshot.

A key or flag is secret when a whole word of its name is ``token``, ``key``,
``secret`` or ``password`` (``hf_token``, ``API_KEY``, ``--hub-token``), so that
``tokenizer`` or ``tokens_seen`` keep their values. Standard library only: the
child imports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, AnyStr

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


def _secret_arguments(argv: Sequence[str]) -> dict[int, tuple[str, str]]:
    """Where ``argv`` holds a secret-looking flag's value: its place, and (what stays of the argument, the value):
    ``--api-key=X`` at its own place (``--api-key=``, X), ``--hub_token X``'s X at the next one ("", X)."""
    found: dict[int, tuple[str, str]] = {}
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if i in found or not arg.startswith("-") or not is_secret_key(flag.lstrip("-")):
            continue
        if eq:
            found[i] = (f"{flag}=", value)
        elif i + 1 < len(argv):
            found[i + 1] = ("", argv[i + 1])
    return found


def redact_argv(argv: list[str], marker: str = REDACTED) -> list[str]:
    """``argv`` with the value of every secret-looking flag masked (``--hub_token X``, ``--api-key=X``)."""
    secret = _secret_arguments(argv)
    return [secret[i][0] + marker if i in secret else arg for i, arg in enumerate(argv)]


MIN_SECRET_CHARS = 8  # a shorter value ("1", "true") is no key, and masking it would mangle every text it is in


def secret_values(argv: Iterable[str], environ: Mapping[str, str]) -> list[str]:
    """The values the rule calls secret, to mask in free text (an error message, a traceback, the script's output):
    a secret-looking flag's in ``argv`` and a secret-looking environment variable's (HF_TOKEN, COMET_API_KEY),
    the longest first (one that holds another is masked whole)."""
    values = {value for _, value in _secret_arguments(list(argv)).values()}
    values.update(value for name, value in environ.items() if is_secret_key(name))
    return sorted((v for v in values if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True)


def mask(text: AnyStr, values: Sequence[AnyStr], marker: AnyStr) -> AnyStr:
    """``text`` with each of ``values`` replaced by ``marker`` (text, or bytes: a journal line, a binary stream);
    the same object where none is in it."""
    for value in values:
        if value in text:
            text = text.replace(value, marker)
    return text

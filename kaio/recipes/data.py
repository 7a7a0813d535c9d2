"""Training data for the built-in recipe: a JSONL file, or a generated sample.

The generated sample is deterministic (seeded) and structured enough that a
tiny model's loss falls clearly within a minute of CPU training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

_SUBJECTS = ["the cat", "a dog", "my robot", "the GPU", "our model", "the kernel", "a bird", "the team"]
_VERBS = ["trains", "watches", "reports", "measures", "sleeps", "computes", "learns", "writes"]
_OBJECTS = ["the loss", "every step", "its power", "the report", "a new adapter", "the memory", "all night", "fast"]
_ENDINGS = [".", "!", ", then rests.", " again."]


def generated_sample(size: int, seed: int) -> list[str]:
    """``size`` short English-like sentences built from a small grammar."""
    rng = random.Random(seed)
    texts = []
    for _ in range(size):
        sentences = [
            f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
            for _ in range(rng.randint(2, 4))
        ]
        texts.append(" ".join(sentences))
    return texts


def read_jsonl(path: str | Path, fmt: str, text_field: str) -> Iterator[dict]:
    """Yield ``{"text": ...}`` or ``{"messages": [...]}`` records; errors name the line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
            kind = fmt
            if kind == "auto":
                kind = "messages" if isinstance(record, dict) and "messages" in record else "text"
            if kind == "messages":
                messages = record.get("messages") if isinstance(record, dict) else None
                if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                    raise ValueError(f"{path}:{number}: expected a 'messages' list of {{'role': ..., 'content': ...}}")
                yield {"messages": messages}
            else:
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{number}: expected a string field {text_field!r}")
                yield {"text": text}


def messages_to_text(messages: list[dict], tokenizer) -> str:
    """Render a chat with the tokenizer's template when it has one, else as ``role: content`` lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)

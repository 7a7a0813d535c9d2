"""Push the final LoRA adapter, its model card and the run's report to the Hugging Face Hub.

Everything goes in one commit, so the SHA written into the report pins exactly the adapter
that the report describes. A push never raises: whatever goes wrong becomes a short
``PushResult.error`` with the token scrubbed out, and local files are only ever read.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kaio.record.paths import ProjectPaths

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What tokenizer.save_pretrained() writes, across tokenizer families; pushed when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
REPORT_FOLDER_IN_REPO = "kaio-report"
CARD_TAGS = ("kaio", "lora", "peft")
COMMIT_MESSAGE = "kaio: LoRA adapter and run report"

# A Hub model id ("name" or "namespace/name"); a local path here would fail the Hub's metadata check.
_HUB_MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_MAX_DETAIL_CHARS = 160


@dataclass
class PushResult:
    repo_id: str
    commit_sha: str | None = None
    url: str | None = None  # the repository page
    adapter_config_url: str | None = None  # adapter_config.json pinned at commit_sha
    error: str | None = None  # "push failed: <reason>", never containing the token
    files: list[str] = field(default_factory=list)  # paths in the repo, as committed


def repo_url(repo_id: str, endpoint: str | None = None) -> str:
    """The repository's page on the Hub that ``endpoint`` (else ``HF_ENDPOINT``, else huggingface.co) names."""
    base = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return f"{base.rstrip('/')}/{repo_id}"


def write_model_card(*, repo_id: str, base_model: str, card_markdown: str) -> str:
    """The repo's README.md: Hub metadata (base model, PEFT, tags) and the run summary."""
    metadata: dict[str, object] = {}
    tags = list(CARD_TAGS)
    if _HUB_MODEL_ID.match(base_model):
        metadata["base_model"] = base_model
        tags.append(f"base_model:adapter:{base_model}")
    metadata["library_name"] = "peft"
    metadata["tags"] = tags
    front_matter = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    usage = (
        "```python\n"
        "from peft import AutoPeftModelForCausalLM\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")\n'
        "```"
    )
    return (
        f"---\n{front_matter}---\n\n"
        f"# {repo_id.split('/')[-1]}\n\n"
        f"A LoRA adapter for `{base_model}`, trained and recorded with kaio.\n\n"
        f"{card_markdown.strip()}\n\n"
        f"## Usage\n\n{usage}\n\n"
        f"The run's report, telemetry plot and per-step history are in "
        f"[`{REPORT_FOLDER_IN_REPO}/`]({REPORT_FOLDER_IN_REPO}/report.md).\n"
    )


def push_adapter(
    *,
    repo_id: str,
    private: bool,
    adapter_dir: Path,
    report_dir: Path,
    card_markdown: str,
    base_model: str,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Create ``repo_id`` if needed and commit adapter, tokenizer, model card and report at once.

    The token is ``token``, else ``HF_TOKEN``, else the saved ``hf auth login``. ``endpoint``
    defaults to ``HF_ENDPOINT`` / huggingface.co.
    """
    adapter_dir, report_dir = Path(adapter_dir), Path(report_dir)
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        return PushResult(repo_id, error=f"push failed: {', '.join(missing)} not found in {adapter_dir}")

    secret: str | None = token
    try:
        from huggingface_hub import CommitOperationAdd, HfApi, get_token
        from huggingface_hub.utils import disable_progress_bars

        if not sys.stderr.isatty():  # its bars' cursor moves are no use in a log (CI, nohup, a pipe)
            disable_progress_bars()
        secret = token or get_token()  # get_token() reads HF_TOKEN, then the saved login
        if not secret:
            return PushResult(
                repo_id,
                error="push failed: no Hugging Face token (set HF_TOKEN or run `hf auth login`)",
            )
        api = HfApi(endpoint=endpoint, token=secret)
        # Without a namespace the Hub picks the token owner's: commit to the id it returns.
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        card = write_model_card(repo_id=repo_id, base_model=base_model, card_markdown=card_markdown)
        operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]
        operations += [
            CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(local_path))
            for path_in_repo, local_path in _files_to_push(adapter_dir, report_dir)
        ]
        commit = api.create_commit(repo_id, operations=operations, commit_message=COMMIT_MESSAGE)
    except Exception as exc:  # a failed push must never take the finished run down with it
        return PushResult(repo_id, error=f"push failed: {_describe_failure(exc, endpoint, secret)}")

    url = repo_url(repo_id, api.endpoint)
    return PushResult(
        repo_id=repo_id,
        commit_sha=commit.oid,
        url=url,
        adapter_config_url=f"{url}/blob/{commit.oid}/adapter_config.json",
        files=[op.path_in_repo for op in operations],
    )


def _files_to_push(adapter_dir: Path, report_dir: Path) -> list[tuple[str, Path]]:
    """(path in repo, local file) for the adapter, the tokenizer files and the report files present."""
    in_adapter_dir = [
        (name, adapter_dir / name) for name in ADAPTER_FILES + TOKENIZER_FILES if (adapter_dir / name).is_file()
    ]
    in_report_dir = [
        (f"{REPORT_FOLDER_IN_REPO}/{path.name}", path)
        for path in ProjectPaths(report_dir).report_files
        if path.is_file()
    ]
    return in_adapter_dir + in_report_dir


def _describe_failure(exc: Exception, endpoint: str | None, secret: str | None) -> str:
    """One human line for what went wrong, with ``secret`` scrubbed from anything quoted.

    huggingface_hub is already imported when this runs.
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        reason = {
            401: "the Hub rejected the token",
            403: "the token may not write to this repository",
            404: "repository not found",
        }.get(status, "the Hub refused the request")
        detail = _quote(exc.server_message or "", secret)
        return f"{reason} (HTTP {status}: {detail})" if detail else f"{reason} (HTTP {status})"
    if isinstance(exc, httpx2.TransportError):  # refused, DNS, TLS, timeouts
        where = (endpoint or constants.ENDPOINT).rstrip("/")
        return f"cannot reach {where} ({_quote(str(exc), secret) or type(exc).__name__})"
    detail = _quote(str(exc), secret)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _quote(text: str, secret: str | None) -> str:
    """The first non-empty line of ``text``, token scrubbed (before shortening, so no prefix survives)."""
    if secret:
        text = text.replace(secret, "***")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[0]
    return line if len(line) <= _MAX_DETAIL_CHARS else line[: _MAX_DETAIL_CHARS - 1] + "…"

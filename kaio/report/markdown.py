"""``report.md``: a permanent, readable record of one run (all its sessions).

Pure: ``render_markdown(history, summary) -> str``. Numbers carry their units;
what was not measured says so instead of showing a zero. Secrets never reach
the text: config keys named like a token, key or secret are redacted, and
anything shaped like a Hugging Face token is scrubbed from the whole page.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kaio.config import redact as redact_config

REDACTED = "‹redacted›"
HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")

STATUS_BADGES = {"COMPLETED": "✅", "RUNNING": "🔄", "FAILED": "❌", "INTERRUPTED": "⏹️"}


def redact(value: Any) -> Any:
    """The config's own redaction (one rule for secret-named keys), with the report's marker."""
    return redact_config(value, marker=REDACTED)


def render_markdown(history: dict, summary: dict) -> str:
    sections = [
        f"# Training report: {history.get('project', 'unnamed')}",
        _executive_summary(summary, history.get("checkpoints") or []),
        _key_metrics(summary),
        "## Telemetry\n\n![telemetry](telemetry.png)",
        _configuration(history),
        _hub(history.get("hub")),
        _sessions(history.get("sessions") or []),
        _warnings(summary["warnings"]),
        _notes((history.get("telemetry") or {}).get("notes") or []),
        _footer(history),
    ]
    text = "\n\n".join(s for s in sections if s) + "\n"
    return HF_TOKEN.sub(REDACTED, text)


# --- sections ---------------------------------------------------------------


def _executive_summary(s: dict, checkpoints: list[dict]) -> str:
    steps = f"{s['optimizer_steps']:,}"
    if s.get("max_steps"):
        steps += f" of {s['max_steps']:,} planned"
    if s["step_entries"] != s["optimizer_steps"]:
        steps += f" ({s['step_entries']:,} recorded)"
    sessions = f" over {s['sessions']} sessions" if s["sessions"] > 1 else ""
    lines = [
        f"- **Status:** {_status(s)}",
        f"- **Duration:** {_hours(s['training_time_s'])}{sessions}",
        f"- **Optimizer steps:** {steps}",
        f"- **Trainable params:** {_params(s)}",
    ]
    if checkpoints:
        latest = checkpoints[-1]
        where = f" (`{_inline(latest['path'])}`)" if latest.get("path") else ""
        lines.append(f"- **Latest checkpoint:** step {latest.get('step')}{where}")
    return "## Executive summary\n\n" + "\n".join(lines)


def _status(s: dict) -> str:
    status = s.get("status") or "UNKNOWN"
    text = f"{STATUS_BADGES.get(status, '❔')} {status}"
    if status == "FAILED":
        text += f" (exit code {s['exit_code']})" if s.get("exit_code") is not None else ""
        if s.get("error"):
            text += f": `{_inline(s['error'])}`"
    elif status == "INTERRUPTED" and s.get("signal") is not None:
        text += f" (signal {s['signal']})"
    elif status == "RUNNING":
        text += " (report written while the run goes on)"
    return text


def _params(s: dict) -> str:
    trainable, total = s.get("trainable_params"), s.get("total_params")
    if trainable is None:
        return "not reported"
    text = f"{trainable:,}"
    if total:
        text += f" of {total:,} ({s['trainable_pct']:.3g} %)"
    return text


def _key_metrics(s: dict) -> str:
    missing = "not measured (no GPU)" if s["cpu_only"] else "not measured"
    rows = [
        ("Loss (initial → final)", _loss_line(s)),
        ("Loss, minimum", _loss_min(s)),
        ("Loss, final smoothed (EMA)", _num(s["loss_final_smoothed"], ".4g") or "not logged"),
        ("True peak VRAM (allocator, max over ranks)", _true_peak(s) or missing),
        ("True peak VRAM, average over steps", _gb(s["vram_true_peak_step_avg_bytes"]) or missing),
        ("Device VRAM used, peak (driver)", _device_vram(s) or missing),
        ("Power per GPU (average / peak)", _pair(s["power_avg_w"], s["power_peak_w"], "W", ".0f") or missing),
    ]
    if s["gpu_count"] > 1:
        total = _unit(s["power_total_avg_w"], "W", ".0f") or missing
        rows.append((f"Power, all {s['gpu_count']} GPUs (average)", total))
    rows += [
        ("Energy", _energy(s) or missing),
        ("Energy per 1k samples", _unit(s["energy_per_1k_samples_wh"], "Wh", ".3g") or missing),
        ("Samples processed", f"{s['samples']:,}" if s["samples"] is not None else "not reported"),
        ("Throughput", _throughput(s)),
        ("GPU utilisation (average)", _unit(s["gpu_util_avg_pct"], "%", ".0f") or missing),
        ("Temperature (average / peak)", _pair(s["temp_avg_c"], s["temp_peak_c"], "°C", ".0f") or missing),
    ]
    if s["host_cpu_avg_pct"] is not None or s["host_ram_peak_bytes"] is not None:
        cpu = _unit(s["host_cpu_avg_pct"], "%", ".0f") or "not measured"
        ram = _gb(s["host_ram_peak_bytes"]) or "not measured"
        rows.append(("Host CPU (average) / RAM used (peak)", f"{cpu} / {ram}"))
    table = "\n".join(f"| {name} | {_cell(value)} |" for name, value in rows)
    return "## Key metrics\n\n| Metric | Value |\n|---|---|\n" + table


def _loss_line(s: dict) -> str:
    if s["loss_initial"] is None:
        return "no finite loss logged"
    return f"{s['loss_initial']:.4g} → {s['loss_final']:.4g}"


def _loss_min(s: dict) -> str:
    if s["loss_min"] is None:
        return "no finite loss logged"
    return f"{s['loss_min']:.4g} at step {s['loss_min_step']:,}"


def _true_peak(s: dict) -> str | None:
    peak = _gb(s["vram_true_peak_bytes"])
    by_rank = s["vram_true_peak_by_rank_bytes"]
    if peak is None or len(by_rank) < 2:
        return peak
    return f"{peak} ({', '.join(f'rank {r}: {_gb(v)}' for r, v in by_rank.items())})"


def _device_vram(s: dict) -> str | None:
    peak = _gb(s["vram_device_used_peak_bytes"])
    if peak is None:
        return None
    gap = s["vram_gap_bytes"]
    if gap is not None and gap > 0:
        peak += f" ({_gb(gap)} above the true peak: CUDA context, allocator cache, other processes)"
    return peak


def _energy(s: dict) -> str | None:
    kwh = s["energy_kwh"]
    if kwh is None:
        return None
    text = f"{kwh:.3f} kWh" if kwh >= 0.1 else f"{kwh:.4f} kWh ({kwh * 1000:.3g} Wh)"
    return f"{text}, {s['energy_method']}"


def _throughput(s: dict) -> str:
    if s["samples_per_s"] is None:
        return "not measured"
    text = f"{s['samples_per_s']:.3g} samples/s"
    if s["tokens_per_s"] is not None:
        text += f" · {s['tokens_per_s']:,.0f} tokens/s"
    return text


def _configuration(history: dict) -> str:
    run = history.get("run") or {}
    lora = run.get("lora") or {}
    modules = lora.get("target_modules")
    rows = [
        ("Base model", run.get("base_model")),
        ("Architecture", run.get("architecture")),
        ("Precision", run.get("precision")),
        ("Per-device batch size", run.get("per_device_batch_size")),
        ("Gradient accumulation steps", run.get("gradient_accumulation_steps")),
        ("World size (processes)", run.get("world_size")),
        ("Effective batch size", run.get("effective_batch_size")),
        ("Sequence length", run.get("seq_length")),
        ("Max steps", run.get("max_steps")),
        ("Learning rate", _num(run.get("learning_rate"), "g")),
        ("LR scheduler", run.get("lr_scheduler_type")),
        ("Optimizer", run.get("optimizer")),
        ("LoRA r / alpha", f"{lora.get('r')} / {lora.get('alpha')}" if lora else None),
        ("LoRA target modules", ", ".join(map(str, modules)) if isinstance(modules, list) else modules),
    ]
    table = "\n".join(f"| {name} | {_cell('not reported' if v is None else v)} |" for name, v in rows)
    text = "## Configuration snapshot\n\n| Setting | Value |\n|---|---|\n" + table
    config = history.get("config")
    if config:
        dump = json.dumps(redact(config), indent=2, sort_keys=True, default=str, ensure_ascii=False)
        text += f"\n\n<details><summary>Full configuration</summary>\n\n```json\n{dump}\n```\n\n</details>"
    return text


def _hub(hub: dict | None) -> str | None:
    if not hub:
        return None
    repo, sha = hub.get("repo_id"), hub.get("commit_sha")
    if sha and repo:
        url = f"https://huggingface.co/{repo}"
        lines = [
            f"- **Repo:** [{repo}]({url})",
            f"- **Commit:** `{sha}`",
            f"- **Adapter config:** [adapter_config.json]({url}/blob/{sha}/adapter_config.json)",
        ]
    elif hub.get("error"):
        lines = [f"- push failed: {_inline(hub['error'])}"]
    else:
        return None
    return "## Hugging Face deployment\n\n" + "\n".join(lines)


def _sessions(sessions: list[dict]) -> str | None:
    if len(sessions) <= 1 and all(s.get("status") == "COMPLETED" for s in sessions):
        return None
    header = "| # | Kind | Started | Duration | Steps | Status | Exit | Error |\n|---|---|---|---|---|---|---|---|"
    rows = []
    for s in sessions:
        exit_text = s.get("exit_code") if s.get("signal") is None else f"signal {s['signal']}"
        cells = [
            s.get("session"),
            s.get("kind"),
            s.get("started_at"),
            _duration(s.get("duration_s")),
            f"{s.get('start_step')} → {s.get('end_step')}",
            s.get("status"),
            exit_text,
            s.get("error") or "",
        ]
        rows.append("| " + " | ".join(_cell("—" if c is None else c) for c in cells) + " |")
    return "## Sessions\n\n" + header + "\n" + "\n".join(rows)


def _warnings(warnings: list[str]) -> str | None:
    if not warnings:
        return None
    return "## Warnings\n\n" + "\n".join(f"- ⚠️ {_inline(w)}" for w in warnings)


def _notes(notes: list[str]) -> str | None:
    """How the run was observed (no GPU found, a vendor library absent, a resumed checkpoint)."""
    if not notes:
        return None
    return "## Notes\n\n" + "\n".join(f"- {_inline(n)}" for n in notes)


def _footer(history: dict) -> str:
    t = history.get("telemetry") or {}
    parts = [
        f"Generated {history.get('generated_at', 'at an unknown time')}",
        f"history schema {history.get('schema_version')}",
    ]
    if t.get("samples") is not None:
        rate = f" at {t['poll_hz']:g} Hz" if t.get("poll_hz") else ""
        parts.append(f"{t['samples']:,} telemetry samples{rate}")
    if t.get("events") is not None:
        parts.append(f"{t['events']:,} training events")
    return "---\n\n<sub>" + " · ".join(parts) + "</sub>"


# --- formatting -------------------------------------------------------------


def _num(value: float | None, fmt: str) -> str | None:
    return None if value is None else format(value, fmt)


def _unit(value: float | None, unit: str, fmt: str) -> str | None:
    return None if value is None else f"{value:{fmt}} {unit}"


def _pair(first: float | None, second: float | None, unit: str, fmt: str) -> str | None:
    if first is None and second is None:
        return None
    return " / ".join("not measured" if v is None else f"{v:{fmt}}" for v in (first, second)) + f" {unit}"


def _gb(value: int | None) -> str | None:
    """Bytes as decimal GB (the unit of ``vram_gb``); tiny values keep three significant digits."""
    if value is None:
        return None
    gb = value / 1e9
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb:.3g} GB"


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    return f"{seconds / 3600:.2f} h ({_duration(seconds)})"


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _inline(text: Any) -> str:
    """One line of free text (an error, a warning) that cannot break the Markdown around it."""
    return " ".join(str(text).split()).replace("`", "'")


def _cell(value: Any) -> str:
    return _inline(value).replace("|", "\\|")

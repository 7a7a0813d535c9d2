"""``report.md``: a permanent, readable record of one run (all its sessions).

Pure: ``render_markdown(header, summary, evals) -> str``. Numbers carry their
units; what was not measured says so instead of showing a zero. What was
trained comes from the child's own account (``RunDescription``); kaio's config
is shown only for what kaio controlled. Secrets never reach the text: config
keys named like a token, key or secret are redacted, and anything shaped like
a Hugging Face token is scrubbed from the whole page.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from datetime import datetime, timedelta
from typing import Any

import msgspec

from kaio.config import redact as redact_config
from kaio.config import saved_own_code
from kaio.record import rules
from kaio.record.types import (
    CheckpointSaved,
    EvalEntry,
    FinalModel,
    HistoryHeader,
    HubOutcome,
    NodeSummary,
    RunDescription,
    Session,
    Stall,
    StalledRank,
    Status,
    TrainingArgs,
    node_rank_of_gpu,
)
from kaio.report.summary import EvalSetLoss, Summary, count_of, evaluation_rows, time_buckets
from kaio.telemetry.protocol import LAUNCHER_FAILED
from kaio.units import gib

REDACTED = "‹redacted›"
HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")
STATUS_BADGES = {"COMPLETED": "✅", "RUNNING": "🔄", "FAILED": "❌", "INTERRUPTED": "⏹️"}
EVAL_ROWS = 20  # the latest evaluations listed (the best one is always named)
BUILTIN_RECIPE_SECTIONS = ("model", "lora", "data", "training")  # what kaio's own recipe reads


def redact(value: Any) -> Any:
    """The config's own redaction (one rule for secret-named keys), with the report's marker."""
    return redact_config(value, marker=REDACTED)


def render_markdown(header: HistoryHeader, summary: Summary, evals: list[EvalEntry]) -> str:
    sections = [
        f"# Training report: {header.project}",
        _executive_summary(summary, header),
        _key_metrics(summary),
        _evaluations(summary, evals),
        _trainings(summary, header.sessions),
        _logged_metrics(summary),
        _time_spent(summary),
        "## Telemetry\n\n![telemetry](telemetry.png)",
        _what_was_trained(
            header.run,
            evaluated=summary.eval_count > 0,
            launch_failed=(summary.error or "").startswith(LAUNCHER_FAILED),
            failed=summary.status == "FAILED",
        ),
        _environment(header.run),
        _kaio_config(header.config, header.run),
        _hub(header.hub),
        _sessions(header.sessions),
        _nodes(header.run),
        _stalls(header.stalls),
        _ranks(header),
        _list("Warnings", summary.warnings, "⚠️ "),
        _list("Notes", header.telemetry.notes),
        _footer(header),
    ]
    text = "\n\n".join(s for s in sections if s) + "\n"
    return HF_TOKEN.sub(REDACTED, text)


# --- sections ---------------------------------------------------------------


def _executive_summary(s: Summary, header: HistoryHeader) -> str:
    if not s.step_entries:
        if header.run is None:
            why = (
                "a Trainer evaluated, but never trained"
                if s.eval_count
                else "no Trainer began training before the script failed"
                if s.status == "FAILED"
                else "no transformers Trainer started"
            )
            steps = f"none recorded ({why}: see What was trained)"
        else:
            steps = "none recorded"
        return "## Executive summary\n\n" + "\n".join(
            [
                f"- **Status:** {_status(s)}",
                f"- **Duration:** {_duration(s.training_time_s) or 'not recorded'}",
                f"- **Optimizer steps:** {steps}",
            ]
        )
    steps = f"{s.optimizer_steps:,}"
    if s.max_steps:
        steps += f" of {s.max_steps:,} planned"
        if s.status == Status.COMPLETED.value and s.optimizer_steps < s.max_steps and s.training_ended is not None:
            if s.ended_early_by:
                steps += f" (ended early by {s.ended_early_by})"
            elif s.training_ended:
                steps += " (the Trainer ended the training early: a callback, or the data ran out)"
            else:
                steps += " (the training process exited with code 0 before its Trainer ended the training)"
    if s.step_entries != s.optimizer_steps:
        steps += f" ({s.step_entries:,} recorded)"
    if s.epochs and (header.run is None or header.run.training == 1):  # a later training counts its own epochs
        steps += f", {round(s.epochs, 3):,g} epoch{'s' if s.epochs != 1 else ''}"
    sessions = f" over {s.sessions} sessions" if s.sessions > 1 else ""
    lines = [
        f"- **Status:** {_status(s)}",
        f"- **Duration:** {_duration(s.training_time_s) or 'not recorded'}{sessions}",
        f"- **Optimizer steps:** {steps}",
        f"- **Trainable params:** {_params(s)}",
    ]
    if header.checkpoints:
        lines.append(_latest_checkpoint(header.checkpoints, s.nonfinite_since))
    if header.final_model is not None:
        loaded = next((c.step for c in header.checkpoints if c.path == header.final_model.loaded), None)
        lines.append(_final_model(header.final_model, last_steps=loaded is not None and loaded == s.optimizer_steps))
    return "## Executive summary\n\n" + "\n".join(lines)


def _latest_checkpoint(checkpoints: list[CheckpointSaved], nonfinite_since: int | None) -> str:
    """The latest checkpoint; one saved after the loss went NaN/inf for good is said to be so, with the latest
    before it (the one `kaio resume` continues from)."""

    def named(c: CheckpointSaved) -> str:
        return f"step {c.step}" + (f" (`{_inline(c.path)}`)" if c.path else "")

    latest = checkpoints[-1]
    if nonfinite_since is None or latest.step < nonfinite_since:
        return f"- **Latest checkpoint:** {named(latest)}"
    before = [c for c in checkpoints if c.step < nonfinite_since]
    clean = f"the latest before it: {named(before[-1])}" if before else "none was saved before it"
    return (
        f"- **Latest checkpoint:** {named(latest)}, saved after the loss went non-finite (from step "
        f"{nonfinite_since} on): its weights may be NaN; {clean}"
    )


def _final_model(final: FinalModel, *, last_steps: bool) -> str:
    """The latest training's best checkpoint (metric_for_best_model), and the weights the model ended with
    (``last_steps``: the best checkpoint is the last step's)."""
    weights = "which are the last step's" if last_steps else "not the last step's"
    if final.best_checkpoint and final.metric:
        higher = final.greater_is_better
        better = "" if higher is None else ", higher is better" if higher else ", lower is better"
        best = final.value
        value = f" {best:.4g}" if isinstance(best, float) else f" {best}" if best is not None else ""
        by = f"`{_inline(final.best_checkpoint)}`, by {final.metric}{value}{better}"
        if final.loaded:
            return f"- **Final model:** the best checkpoint's weights (load_best_model_at_end), {weights}: {by}"
        return f"- **Best checkpoint:** {by}"
    return (
        f"- **Final model:** `{_inline(final.loaded or '')}`'s weights, loaded at the end (load_best_model_at_end), "
        f"{weights}"
    )


def _status(s: Summary) -> str:
    text = f"{STATUS_BADGES.get(s.status, '❔')} {s.status}"
    if s.status == "FAILED":
        text += f" (exit code {s.exit_code})" if s.exit_code is not None else ""
        if rules.training_completed(s.training_ended, s.optimizer_steps, s.max_steps):
            # The script's code after train() failed (a push, an evaluation): the training itself is whole.
            text += f" after its training completed ({s.optimizer_steps} of {s.max_steps} steps): the script failed afterwards"
        first = _first_to_fail(s.nodes)
        if first is not None and first.node_rank != 0:  # the head's own error followed another node's
            text += f": node {first.node_rank} first: `{_inline(first.error or '')}`"
        elif s.error:
            text += f": `{_inline(s.error)}`"
    elif s.status == "INTERRUPTED" and s.signal is not None:
        text += f" (signal {s.signal})"
    elif s.status == "RUNNING":
        text += " (report written while the run goes on)"
    return text


def _params(s: Summary) -> str:
    if s.trainable_params is None:
        return "not reported"
    text = f"{s.trainable_params:,}"
    if s.total_params:
        text += f" of {s.total_params:,} ({s.trainable_pct:.3g} %)"
    return text


def _final_smoothed(s: Summary) -> str:
    if s.loss_final_smoothed is not None and rules.too_few_to_smooth(s.loss_smoothed_over):
        return f"too few losses logged to smooth ({s.loss_smoothed_over}): see the final loss"
    return _num(s.loss_final_smoothed, ".4g") or _no_loss(s)


def _across_trainings(s: Summary) -> str:
    trained = [t for t in s.trainings if t.steps]  # out-of-memory retries before the one that trained: none
    if len(trained) == 1 and len(s.trainings) > 1:
        return f" (all of training {trained[0].training.training}: see Trainings)"
    return f" (across {len(trained)} trainings: see Trainings)" if len(trained) > 1 else ""


def _key_metrics(s: Summary) -> str:
    missing = "not measured (no GPU)" if s.cpu_only else "not measured"
    rows = [
        (
            "Loss (initial → final)",
            f"{s.loss_initial:.4g} → {s.loss_final:.4g}{_after_final(s) or _loss_steps(s)}{_across_trainings(s)}"
            if s.loss_initial is not None and s.loss_final is not None
            else _no_loss(s, why=True),
        ),
        (
            "Loss, minimum",
            f"{s.loss_min:.4g} at step {s.loss_min_step:,}{_across_trainings(s)}"
            if s.loss_min is not None
            else _no_loss(s),
        ),
        ("Loss, final smoothed (EMA)", _final_smoothed(s)),
    ]
    nonfinite_norms = (
        f"NaN/inf at {s.grad_norm_nonfinite_count:,} logged step{'s' if s.grad_norm_nonfinite_count > 1 else ''} "
        f"(first at step {s.grad_norm_nonfinite_first_step:,})"
        if s.grad_norm_nonfinite_count and s.grad_norm_nonfinite_first_step is not None
        else None
    )
    if s.grad_norm_median is not None and s.grad_norm_max is not None:
        largest = f"{s.grad_norm_max:.3g} at step {s.grad_norm_max_step:,}"
        norms = f"{s.grad_norm_median:.3g} · {largest}" + (f"; {nonfinite_norms}" if nonfinite_norms else "")
        rows.append(("Gradient norm (median · largest)", norms))
    elif nonfinite_norms:
        rows.append(("Gradient norm (median · largest)", f"no finite norm logged: {nonfinite_norms}"))
    if s.eval_loss_best is not None:
        rows.append(("Evaluation loss, best", _best_eval_loss(s) + _across_trainings(s)))
    rows += [
        ("True peak VRAM (allocator, max over ranks)", _true_peak(s) or missing),
        ("True peak VRAM, average over steps", _bytes(s.vram_true_peak_step_avg_bytes) or missing),
    ]
    per = "Memory estimate per process (RAM: no GPU; " if s.cpu_only else "VRAM estimate per GPU ("
    if s.vram_estimate_bytes is not None:
        rows.append((f"{per}kaio plan's, for what ran)", _vram_estimate(s)))
    elif s.vram_estimate_missing is not None:  # GPT-2, T5, a module of the script's own: said, not left out
        rows.append((f"{per}kaio plan's, for what ran)", f"none: {s.vram_estimate_missing}"))
    rows += [
        ("Device VRAM used, peak (driver)", _device_vram(s) or missing),
        ("Power per GPU (average / peak)", _pair(s.power_avg_w, s.power_peak_w, "W", ".0f") or missing),
    ]
    if s.gpu_count > 1:
        which = (
            f"all {s.gpu_count} GPUs"
            if s.power_total_gpus in (0, s.gpu_count)
            else f"the {s.power_total_gpus} of {s.gpu_count} GPUs that read it"  # a GPU without power: not in it
        )
        rows.append((f"Power, {which} (average)", _unit(s.power_total_avg_w, "W", ".0f") or missing))
    rows += [
        ("Energy", _energy(s) or missing),
        ("Energy per 1k samples", _unit(s.energy_per_1k_samples_wh, "Wh", ".3g") or missing),
        ("Samples processed", f"{s.samples:,}" if s.samples is not None else "not reported"),
        ("Throughput (optimizer steps after each session's first)", _throughput(s)),
        ("GPU utilisation (average)", _unit(s.gpu_util_avg_pct, "%", ".0f") or missing),
        ("Temperature (average / peak)", _pair(s.temp_avg_c, s.temp_peak_c, "°C", ".0f") or missing),
    ]
    if s.tokens_per_s_per_device is not None:  # tokens were counted
        rows.append(("Tokens/s per device · MFU (over the steps' own time)", _mfu(s, s.tokens_per_s_per_device)))
    if s.host_cpu_avg_pct is not None or s.host_ram_peak_bytes is not None:
        cpu = _unit(s.host_cpu_avg_pct, "%", ".0f") or "not measured"
        rows.append(
            (
                "Host CPU (average) / RAM used (peak), whole host",
                f"{cpu} / {_bytes(s.host_ram_peak_bytes) or 'not measured'}",
            )
        )
    return "## Key metrics\n\n" + _table(("Metric", "Value"), rows)


def _loss_steps(s: Summary) -> str:
    """Where the first and last loss were logged, when not at the first and last step (logging_steps over 1)."""
    first, last = s.loss_initial_step, s.loss_final_step
    if first is None or last is None or (first <= 1 and last == s.optimizer_steps):
        return ""
    return f" (logged at steps {first:,} and {last:,} of {s.optimizer_steps:,})"


def _after_final(s: Summary) -> str:
    """The final finite loss is not the run's last word when NaN/inf losses were logged after it."""
    if not s.loss_nonfinite_after_final or s.loss_final_step is None:
        return ""
    n = s.loss_nonfinite_after_final
    later = "the loss logged after it was" if n == 1 else f"the {n} losses logged after it were"
    return f" (at step {s.loss_final_step:,}: {later} NaN/inf)"


def _no_loss(s: Summary, *, why: bool = False) -> str:
    if s.loss_nan_count or s.loss_inf_count:
        return "no finite loss logged (see the warnings)"
    if not s.step_entries:
        return "no training step recorded"
    text = "not logged"
    if why and s.loss_logging_steps_unreached is not None:
        text += (
            f": logging_steps ({s.loss_logging_steps_unreached:,}) is more than the {s.optimizer_steps:,} steps trained"
        )
    if why and s.trainer_mean_loss is not None:
        text += f"; the Trainer's mean training loss (train_loss): {s.trainer_mean_loss:.4g}"
    return text


def _time_spent(s: Summary) -> str | None:
    total = s.training_time_s
    if not total:
        return None
    rows = [(name, _seconds(seconds), f"{100 * seconds / total:.1f} %") for name, _, seconds in time_buckets(s)]
    rows.append(("**Wall time**", _seconds(total), "100 %"))
    goodput = (
        f"**Goodput: {s.goodput_pct:.1f} %** of the wall time went into productive optimizer steps.\n\n"
        if s.goodput_pct is not None
        else ""
    )
    return "## Where the time went\n\n" + goodput + _table(("Phase", "Time", "Share"), rows)


def _seconds(value: float) -> str:
    if 0 < value < 0.1:  # a phase that took a share of the time: not "0.0 s"
        return f"{value:.2g} s"
    return f"{value:.1f} s" if value < 60 else (_duration(value) or "")


def _best_eval_loss(s: Summary, *, bold: bool = False) -> str:
    """The best evaluation loss and its step; with several eval datasets, each one's."""
    mark = "**" if bold else ""
    sets = s.eval_sets or [EvalSetLoss(name=None, best=s.eval_loss_best, best_step=s.eval_loss_best_step)]
    return "; ".join(
        f"{mark}{e.best:.4g}{mark}{f' ({e.name})' if e.name else ''} at step {e.best_step:,}"
        for e in sets
        if e.best is not None and e.best_step is not None
    )


def _evaluations(s: Summary, evals: list[EvalEntry]) -> str | None:
    if not evals:
        return None
    names = list(dict.fromkeys(k for e in evals for k in e.metrics if k not in ("epoch",)))
    every = evaluation_rows(evals)
    shown = every[-EVAL_ROWS:]
    # After load_best_model_at_end, the evaluations after training are of the best checkpoint's weights (run_glue's
    # after-training row sat beside a better row of the last step with no word of it): each says whose.
    rows = [(_evaluation_step(e, trained=bool(s.optimizer_steps)), *(_metric(e, n) for n in names)) for e in shown]
    text = "## Evaluation\n\n"
    if s.eval_loss_best is not None:  # of the evaluations: predict()'s test-set metrics are no evaluation
        predictions = sum(1 for e in every if e.prediction and not e.other_model)
        count = count_of(s.eval_count - predictions, "evaluation")
        text += f"Best evaluation loss {_best_eval_loss(s, bold=True)} ({count}).\n\n"
    if len(every) > len(shown):
        text += f"The latest {len(shown)} of {len(every)} evaluations (all are in history.json):\n\n"
    return text + _table(("Step", *names), rows)


def _evaluation_step(e: EvalEntry, *, trained: bool) -> str:
    after = f"after training, {e.weights}'s weights" if e.weights else "after training"
    said = [after] if e.after_training else ["before training"] if e.before_training else []
    if not trained:  # a script that only evaluated: there is no training to be before
        said = ["no training"]
    said += ["predict()"] if e.prediction else []
    said += ["another model's: not the run's"] if e.other_model else []
    return f"{e.step} ({', '.join(said)})" if said else str(e.step)


def _metric(entry: EvalEntry, name: str) -> str:
    if name in entry.nonfinite:
        return entry.nonfinite[name]
    return _logged(entry.metrics.get(name))


def _logged(value: float | None, step: int | None = None) -> str:
    """A number as a script logged it; a large whole one is a count (num_input_tokens_seen): 12,288, not 1.229e+04."""
    if value is None:
        return "—"
    text = f"{value:,.0f}" if value.is_integer() and abs(value) >= 1e3 else format(value, ".4g")
    return text if step is None else f"{text} (step {step})"


def _logged_metrics(s: Summary) -> str | None:
    if not s.logged_metrics:
        return None
    rows = [
        (
            m.name,
            m.logged,
            _logged(m.first),
            _logged(m.last, m.last_step),
            _logged(m.min, m.min_step),
            _logged(m.max, m.max_step),
        )
        for m in s.logged_metrics
    ]
    more = (
        f" The first {len(rows)} by name; {s.logged_metrics_not_listed} more are in history.json."
        if s.logged_metrics_not_listed
        else ""
    )
    step_0 = (
        "; step 0 is what was logged before the first step ended, history.json's `metrics_at_step_0`"
        if s.logged_at_step_0
        else ""
    )
    return (
        "## Other logged metrics\n\nWhat the training logged at its steps besides the loss, learning rate and gradient "
        f"norm (each step's are its `metrics` in history.json{step_0}).{more}\n\n"
        + _table(("Metric", "Logged at steps", "First", "Last", "Min", "Max"), rows)
    )


def _what_was_trained(
    run: RunDescription | None, *, evaluated: bool = False, launch_failed: bool = False, failed: bool = False
) -> str:
    if run is None and evaluated:  # evaluate() (or predict()) without train()
        return (
            "## What was trained\n\nNothing: a transformers `Trainer` evaluated (see Evaluation) but never "
            "trained (no `train()`), so there are no training steps."
        )
    if run is None and launch_failed:
        return (
            "## What was trained\n\nNothing: the launcher failed before the script ran (its error is above; its "
            "output is in child.log)."
        )
    if run is None and failed:
        return (
            "## What was trained\n\nNothing: no transformers `Trainer` began training before the script failed (its "
            "error is above; its output is in child.log). A plain training loop, without a `Trainer`, can report "
            "its steps with `kaio.log(step=..., loss=...)` (see the README)."
        )
    if run is None:
        return (
            "## What was trained\n\nNo transformers `Trainer` started, so kaio recorded the device and host "
            "telemetry and the script's output (child.log) but no per-step training events. A plain training loop "
            "can report its steps with `kaio.log(step=..., loss=...)` (see the README)."
        )
    if run.reporter == "kaio.log":
        return (
            "## What was trained\n\nA training loop without a transformers `Trainer`, reporting its steps through "
            f"`kaio.log`; world size {run.world_size}. kaio knows what the loop told it, not the model or its settings."
        )
    model, peft, args = run.model, run.peft, run.args
    rows: list[tuple[str, Any]] = [
        ("Model", (model.name_or_path or "no name or path: built by the script, not loaded") if model else None),
        ("Architecture", (model.architecture or model.model_class) if model else None),
        ("Weights dtype", model.dtype if model else None),
        ("Precision (training)", run.precision),
        ("PEFT", _peft(peft) if peft else (_no_peft(model) if model and model.model_class else None)),
        ("Tokenizer", run.tokenizer or ("none given to the Trainer" if model else None)),
        ("Training / evaluation examples", _examples(run)),
        ("Per-device batch size", _per_device_batch(run)),
        ("Gradient accumulation steps", args.gradient_accumulation_steps),
        ("World size (processes)", run.world_size),
        ("Distributed", run.distributed_type),
        ("Effective batch size", run.effective_batch_size),
        ("Max steps", run.max_steps),
        # A run measured in epochs (max_steps unset): the Trainer worked its steps out from them.
        *([("Epochs", _num(args.num_train_epochs, "g"))] if args.max_steps is None or args.max_steps < 0 else []),
        *_optimizer_rows(run, args),
        *([("Gradient checkpointing", "on")] if args.gradient_checkpointing else []),
        *([("torch.compile", "on")] if args.torch_compile else []),
        *([("Label smoothing", _num(args.label_smoothing_factor, "g"))] if args.label_smoothing_factor else []),
        *([("NEFTune noise alpha", _num(args.neftune_noise_alpha, "g"))] if args.neftune_noise_alpha else []),
        ("Seed", args.seed),
        ("Logging / evaluation / saving", _strategies(run)),
        *([("Evaluation generates", _generation(args))] if args.predict_with_generate else []),
    ]
    return "## What was trained\n\nAs the training process reported it.\n\n" + _table(
        ("Setting", "Value"), [(name, "not reported" if value is None else value) for name, value in rows]
    )


def _generation(args: Any) -> str:
    """Seq2SeqTrainingArguments' predict_with_generate: the evaluation's metrics are of generated text."""
    length = (
        f"up to {args.generation_max_length} tokens" if args.generation_max_length else "the model's default length"
    )
    beams = f"{args.generation_num_beams} beams" if args.generation_num_beams else "the model's default search"
    return f"yes (predict_with_generate): {length}, {beams}"


def _per_device_batch(run: RunDescription) -> int | str | None:
    configured = run.args.per_device_train_batch_size
    if run.loader_batch_size is None or run.loader_batch_size == configured:
        return configured
    return f"{run.loader_batch_size} (the training DataLoader's; TrainingArguments say {configured})"


def _no_peft(model: Any) -> str:
    """No PEFT adapter: every parameter trained, or a script's own freezing (a frozen backbone under its head)."""
    trainable, total = model.trainable_params, model.total_params
    if trainable is not None and total and trainable < total:
        return f"none: {trainable:,} of {total:,} parameters trained, the rest frozen by the script"
    return "none: every parameter trained"


def _peft(peft: Any) -> str:
    targets = _targets(peft.target_modules)
    kind = "DoRA (LORA, use_dora)" if peft.use_dora else peft.peft_type or "adapter"
    text = kind
    if peft.r is not None:  # LoRA and its kin; IA3 and the prompt methods have no rank
        text += f" r={peft.r} alpha={_num(peft.alpha, 'g')}"
        text += " (rsLoRA: scaled by alpha/sqrt(r))" if peft.use_rslora else ""
    if peft.num_virtual_tokens is not None:
        text += f", {peft.num_virtual_tokens} virtual tokens"
    if peft.dropout is not None:
        text += f" dropout={peft.dropout:g}"
    text += f" on {targets}" if targets else ""
    feedforward = _targets(peft.feedforward_modules)
    text += f" (feed-forward: {feedforward})" if feedforward else ""
    if peft.modules_to_save:
        text += f"; trained whole beside them: {', '.join(peft.modules_to_save)}"
    return text


def _targets(modules: list[str] | str | None) -> str | None:
    """The adapters' targets: their names, or, when PEFT resolved them to every layer's module (`all-linear`:
    `model.layers.0.mlp.down_proj`, ... 224 of them in a 32-layer model), the names once and the count."""
    if not isinstance(modules, list):
        return modules
    if not modules or not all("." in name for name in modules):
        return ", ".join(modules)  # as the user named them
    leaves = sorted({name.rsplit(".", 1)[-1] for name in modules})
    return ", ".join(modules) if len(leaves) == len(modules) else f"{', '.join(leaves)} ({len(modules)} modules)"


def _strategies(run: RunDescription) -> str | None:
    args = run.args
    parts = []
    for name, strategy, steps in (
        ("log", args.logging_strategy, args.logging_steps),
        ("eval", args.eval_strategy, args.eval_steps),
        ("save", args.save_strategy, args.save_steps),
    ):
        if strategy is None:
            continue
        kept = run.kept_from_checkpoint.get(f"{'logging' if name == 'log' else name}_steps")
        if kept is not None and strategy == "steps":  # what the resumed Trainer did, not what its arguments said
            parts.append(f"{name}: steps every {kept[0]:g} (the checkpoint's; the arguments': {kept[1]:g})")
            continue
        parts.append(f"{name}: {strategy}" + (f" every {steps:g}" if strategy == "steps" and steps is not None else ""))
    return " · ".join(parts) or None


def _environment(run: RunDescription | None) -> str | None:
    env = run.environment if run else None
    if env is None:
        return None
    fields = msgspec.structs.asdict(env)
    argv = fields.pop("argv")
    gpus = fields.pop("gpus")
    rows = [(k, v) for k, v in fields.items() if v is not None]
    if gpus:
        rows.append(("gpus", ", ".join(gpus)))
    if argv:
        rows.append(("command", shlex.join(argv)))
    return "## Environment\n\n" + _table(("", ""), rows)


def _kaio_config(config: dict | None, run: RunDescription | None) -> str | None:
    """kaio's own settings; the built-in recipe's keys only when that recipe ran (a script never sees them)."""
    if not config:
        return None
    keep = ("launch", "reporting", "hub") + (BUILTIN_RECIPE_SECTIONS if not saved_own_code(config) else ())
    shown = {k: v for k, v in config.items() if k in keep or k == "project_name"}
    dump = json.dumps(redact(shown), indent=2, sort_keys=True, default=str, ensure_ascii=False)
    return f"## kaio configuration\n\n<details><summary>The config kaio ran with</summary>\n\n```json\n{dump}\n```\n\n</details>"


def _hub(hub: HubOutcome | None) -> str | None:
    if hub is None:
        return None
    if hub.repo_id and (hub.commit_sha or hub.uploading):  # a push's commit, or the push uploading this report
        url = hub.url or f"https://huggingface.co/{hub.repo_id}"  # the push's own (HF_ENDPOINT: a private Hub)
        lines = [f"- **Repo:** [{hub.repo_id}]({url})"]
        if hub.commit_sha:
            config_url = hub.adapter_config_url or f"{url}/blob/{hub.commit_sha}/adapter_config.json"
            lines += [f"- **Commit:** `{hub.commit_sha}`", f"- **Adapter config:** [adapter_config.json]({config_url})"]
        else:
            lines.append(
                "- **Commit:** the one that uploaded this report with the adapter (the repo's history names it)"
            )
    elif hub.error:
        error = hub.error.removeprefix("push failed: ")
        lines = [f"- push failed: {_inline(error)}"]
    else:
        return None
    return "## Hugging Face deployment\n\n" + "\n".join(lines)


def _trainings(s: Summary, sessions: list[Session]) -> str | None:
    """A script that trained more than once: each training's own steps and losses (another objective, or a
    search's trial from scratch: one curve across them compares unlike things)."""
    if not s.trainings:
        return None
    several_sessions = len(sessions) > 1
    # An attempt that ran out of memory: the Trainer began again with a smaller batch (auto_find_batch_size).
    out_of_memory = {(t.training.session, t.training.training - 1) for t in s.trainings if t.training.retry_batch}
    rows = []
    for row in s.trainings:
        t = row.training
        name = f"{t.training} (session {t.session})" if several_sessions else str(t.training)
        planned = t.max_steps - t.first_step + 1 if t.max_steps is not None and t.max_steps >= t.first_step else None
        of = f" of {planned:,}" if planned is not None and planned != row.steps else ""  # a pruned trial, a stop
        if (t.session, t.training) in out_of_memory:
            of += "; out of memory"
        steps = f"{t.first_step:,}–{row.last_step:,} ({row.steps:,}{of})" if row.steps and row.last_step else "none"
        trainer = (t.trainer or "—") + (f", again at batch {t.retry_batch}" if t.retry_batch else "")
        loss = (
            f"{row.loss_first:.4g} → {row.loss_last:.4g} ({row.loss_min:.4g})"
            if row.loss_first is not None and row.loss_last is not None and row.loss_min is not None
            else "—"
        )
        rows.append((name, trainer, steps, _num(t.learning_rate, ".3g"), loss, _num(row.eval_loss_best, ".4g")))
    again = ", and again in each resumed session" if several_sessions else ""
    intro = (
        f"`train()` ran {len(s.trainings)} times (a second Trainer, train() again, a search's trials{again}): each "
        "training's own steps (and, where it ended early, of how many planned) and losses. The loss figures above run "
        "across them; the figure marks where each began."
    )
    if out_of_memory:
        intro += (
            f" {len(out_of_memory)} of them ran out of memory and the Trainer began again with a smaller batch "
            "(auto_find_batch_size): the steps an attempt trained before that changed the model the next one "
            "trains, and are recorded."
        )
    head = ("Training", "Trainer", "Steps", "Learning rate", "Loss first → last (min)", "Eval loss, best")
    return "## Trainings\n\n" + intro + "\n\n" + _table(head, rows)


def _sessions(sessions: list[Session]) -> str | None:
    if len(sessions) <= 1 and all(s.status.value == "COMPLETED" for s in sessions):
        return None
    rows = []
    for s in sessions:
        exit_text = s.exit_code if s.signal is None else f"signal {s.signal}"
        rows.append(
            (
                s.session,
                s.kind.value,
                s.started_at,
                _duration(s.duration_s),
                "—" if s.start_step is None and s.end_step is None else f"{s.start_step or 0} → {s.end_step}",
                s.status.value,
                exit_text,
                s.error or "",
            )
        )
    return "## Sessions\n\n" + _table(("#", "Kind", "Started", "Duration", "Steps", "Status", "Exit", "Error"), rows)


def _stalls(stalls: list[Stall]) -> str | None:
    """Where every rank waited when the run stopped making steps; each rank's whole stack is linked."""
    if not stalls:
        return None
    rows = []
    for stall in stalls:
        when = stall.t_wall and time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stall.t_wall))
        for rank in stall.ranks or [StalledRank(rank=-1)]:
            stack = f"[stack]({rank.stack_file})" if rank.stack_file else ""
            rows.append(
                (
                    when,
                    f"after {stall.step}",
                    stall.phase,
                    f"{stall.idle_s:.0f} s",
                    rank.rank if rank.rank >= 0 else "",
                    rank.where or "did not answer",
                    stack,
                )
            )
    return (
        "## Stalls\n\nNo step for longer than the phase's budget; where each rank's Python stack was then.\n\n"
        + _table(("When", "Step", "Phase", "Silent for", "Rank", "Waiting in", "Stack"), rows)
    )


def _nodes(run: RunDescription | None) -> str | None:
    """A job of several machines: each node, merged into this report by global step (kaio.run.job)."""
    if run is None or not run.nodes:
        return None
    rows = []
    for node in run.nodes:
        energy = _kwh(node.energy_j / 3.6e6) if node.energy_j is not None else None
        names = ", ".join(dict.fromkeys(node.gpu_names))
        gpus = f"{len(node.gpus)} × {names}" if node.gpus else "none (CPU)"
        state = node.status or ""
        if node.exit_code not in (None, 0):
            state += f" (exit {node.exit_code})"
        if node.status == "LOST" and node.last_step is not None:
            when = _utc_seconds(node.last_step_at) if node.last_step_at else ""
            state += f" (last heard of at step {node.last_step}{f', {when} UTC' if when else ''})"
        rows.append(
            (
                node.node_rank,
                node.host or "",
                gpus,
                energy or "not measured",
                _unit(node.power_avg_w, "W", ".0f") or "not measured",
                _bytes(node.vram_peak_bytes) or "not measured",
                state,
                _clock(node),
                (node.folder if "/" in node.folder else f"nodes/{node.folder}") if node.folder else "this folder",
            )
        )
    return (
        f"## Nodes\n\n{len(run.nodes)} machine{'s' if len(run.nodes) != 1 else ''}, one job (world size {run.world_size}); each node's steps merged "
        "by global step (no clock is compared). Clock: the node's clock minus the head's, measured over the "
        "stream of its record, within half the round trip.\n\n"
        + _table(("Node", "Host", "GPUs", "Energy", "Power (average)", "Peak VRAM", "State", "Clock", "Record"), rows)
        + _node_failures(run.nodes)
    )


def _node_failures(nodes: list[NodeSummary]) -> str:
    """Each node's first failing rank, and which failed first in the job: the nodes' times put on the head's
    clock where the offset was measured (a rank's failure on one node brings down the others' soon after)."""
    failed = [n for n in nodes if n.error]
    if not failed:
        return ""
    lines = []
    for failure in failed:
        when = _head_time(failure)
        clock = (
            ""
            if failure.node_rank == 0
            else " (head's clock)"
            if failure.clock_offset_s is not None
            else " (its clock)"
        )
        at = f" at {_utc_seconds(when.isoformat())} UTC{clock}" if when else ""
        lines.append(f"- node {failure.node_rank}{f' ({failure.host})' if failure.host else ''}{at}: {failure.error}")
    node = _first_to_fail(nodes)
    first = (
        f"\n\nFirst to fail: node {node.node_rank}{f' ({node.host})' if node.host else ''}: {node.error}"
        if node
        else ""
    )
    return "\n\nFailures, each node's first failing rank (its own error files):\n\n" + "\n".join(lines) + first


def _first_to_fail(nodes: list[NodeSummary]) -> NodeSummary | None:
    """The node whose rank failed first in the job, when more than one failed at a known time: the cause; the
    others' errors (a peer's connection closed) are what followed."""
    timed = [(when, n) for n in nodes if n.error and (when := _head_time(n)) is not None]
    return min(timed, key=lambda pair: pair[0])[1] if len(timed) > 1 else None


def _head_time(node: NodeSummary) -> datetime | None:
    """When the node's first rank failed, on the head's clock if its offset was measured."""
    if node.failed_at is None:
        return None
    when = datetime.fromisoformat(node.failed_at)
    return when - timedelta(seconds=node.clock_offset_s) if node.clock_offset_s is not None else when


def _utc_seconds(iso: str) -> str:
    """An ISO 8601 time as report.md shows it: ``2026-11-27 12:00:02`` (to the second; UTC said beside it)."""
    return iso[:19].replace("T", " ")


def _clock(node: NodeSummary) -> str:
    if node.node_rank == 0:
        return "the reference"
    if node.clock_offset_s is None or node.clock_rtt_s is None:
        return "not measured"
    offset = round(node.clock_offset_s * 1000, 1) + 0.0  # + 0.0: no "-0.0"
    return f"{offset:+.1f} ms (± {node.clock_rtt_s * 500:.1f} ms)"


def _ranks(header: HistoryHeader) -> str | None:
    """Each rank's own work a step (data loading, forward: before its first collective) and how often it was
    the slowest: a straggler stands out here."""
    if not header.ranks:
        return None
    gpus = header.run_gpu_keys()
    node_of_host = {n.host: n.node_rank for n in (header.run.nodes if header.run else [])}
    rows = []
    for t in header.ranks:
        data, forward = t.mean(t.data_s), t.mean(t.forward_s)
        node = node_of_host.get(t.host, 0)  # its cuda:N is the N-th GPU of its own node
        rows.append(
            (
                t.rank,
                t.host or "",
                _rank_device(t.device, [g for g in gpus if node_rank_of_gpu(g) == node]),
                "" if data is None else f"{1000 * data:.1f} ms",
                "" if forward is None else f"{1000 * forward:.1f} ms",
                f"{t.slowest:,} of {t.steps:,}",
                f"{1000 * t.lag_s / t.slowest:.1f} ms" if t.slowest else "",
            )
        )
    return (
        "## Ranks\n\nEach rank's own work a step, before its first collective (under DDP every rank ends a step "
        "together, so step times cannot tell a straggler): fetching its micro-batches and its forward passes.\n\n"
        + _table(
            ("Rank", "Host", "Device", "Data loading / step", "Forward / step", "Slowest in", "Lag when slowest"),
            rows,
        )
    )


def _rank_device(device: str | None, run_gpus: list[str]) -> str:
    """``cuda:1`` with the GPU kaio sampled for it (the run's GPUs in their visible order), when known."""
    if not device:
        return ""
    kind, _, index = device.partition(":")
    if kind == "cuda" and index.isdigit() and int(index) < len(run_gpus):
        return f"{device} ({run_gpus[int(index)]})"
    return device


def _list(title: str, items: list[str], mark: str = "") -> str | None:
    if not items:
        return None
    return f"## {title}\n\n" + "\n".join(f"- {mark}{_inline(item)}" for item in items)


def _footer(header: HistoryHeader) -> str:
    t = header.telemetry
    parts = [f"Generated {header.generated_at or 'at an unknown time'}", f"history schema {header.schema_version}"]
    if t.samples:
        parts.append(f"{t.samples:,} telemetry samples" + (f" at {t.poll_hz:g} Hz" if t.poll_hz else ""))
    parts.append(f"{t.events:,} training events")
    return "---\n\n<sub>" + " · ".join(parts) + "</sub>"


# --- formatting -------------------------------------------------------------


def _table(head: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell("—" if c is None else c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str | None:
    return None if value is None else format(value, fmt)


def _unit(value: float | None, unit: str, fmt: str) -> str | None:
    return None if value is None else f"{value:{fmt}} {unit}"


def _pair(first: float | None, second: float | None, unit: str, fmt: str) -> str | None:
    if first is None and second is None:
        return None
    return " / ".join("not measured" if v is None else f"{v:{fmt}}" for v in (first, second)) + f" {unit}"


def _optimizer_rows(run: RunDescription, args: TrainingArgs) -> list[tuple[str, object]]:
    """What made the updates: TrainingArguments' optimizer, or the one the script gave the Trainer (whose
    learning rate and scheduler are then its own too, unless the script left the scheduler to the Trainer)."""
    if run.script_optimizer is None:
        kept = run.kept_from_checkpoint.get("learning_rate")
        return [
            (
                "Learning rate",
                f"{kept[0]:g} (the checkpoint's, kept by the resumed Trainer; the arguments': {kept[1]:g})"
                if kept
                else _num(args.learning_rate, "g"),
            ),
            ("LR scheduler", args.lr_scheduler_type),
            ("Optimizer", args.optim),
        ]
    unused = "TrainingArguments' {} unused"
    lr = run.script_learning_rate
    return [
        (
            "Learning rate",
            f"{lr:g} (the script's optimizer's; {unused.format(_num(args.learning_rate, 'g'))})"
            if lr is not None
            else None,
        ),
        (
            "LR scheduler",
            f"{run.script_lr_scheduler} (the script's own; {unused.format(args.lr_scheduler_type)})"
            if run.script_lr_scheduler
            else args.lr_scheduler_type,
        ),
        ("Optimizer", f"{run.script_optimizer} (the script's own; {unused.format(args.optim)})"),
    ]


def _examples(run: RunDescription) -> str | None:
    pair = _pair_int(run.train_samples, run.eval_samples)
    return f"{pair} ({run.eval_sets} eval datasets)" if pair and run.eval_sets else pair


def _pair_int(first: int | None, second: int | None) -> str | None:
    if first is None and second is None:
        return None
    return " / ".join("—" if v is None else f"{v:,}" for v in (first, second))


def _bytes(value: int | None) -> str | None:
    return None if value is None else gib(value)


def _true_peak(s: Summary) -> str | None:
    peak = _bytes(s.vram_true_peak_bytes)
    by_rank = s.vram_true_peak_by_rank_bytes
    if peak is None or len(by_rank) < 2:
        return peak
    return f"{peak} ({', '.join(f'rank {r}: {gib(v)}' for r, v in by_rank.items())})"


def _vram_estimate(s: Summary) -> str:
    """The estimate, its terms, and how far it is from the measured true peak."""
    assert s.vram_estimate_bytes is not None
    terms = ", ".join(f"{name} {gib(value, digits=3)}" for name, value in s.vram_estimate_terms.items() if value)
    text = f"{gib(s.vram_estimate_bytes, digits=3)} ({terms}; {s.vram_estimate_tokens:,} tokens a micro-batch)"
    if s.vram_true_peak_bytes:
        error = 100.0 * (s.vram_estimate_bytes - s.vram_true_peak_bytes) / s.vram_true_peak_bytes
        text += f": {error:+.0f} % from the measured true peak"
    else:
        text += ": no measured peak to compare (no GPU)"
    return text


def _device_vram(s: Summary) -> str | None:
    peak = _bytes(s.vram_device_used_peak_bytes)
    if peak is not None and s.vram_gap_bytes is not None and s.vram_gap_bytes > 0:
        peak += f" ({gib(s.vram_gap_bytes)} above the true peak: CUDA context, allocator cache, other processes)"
    return peak


def _energy(s: Summary) -> str | None:
    if s.energy_kwh is None:
        return None
    return f"{_kwh(s.energy_kwh)}, {s.energy_method}"


def _kwh(kwh: float) -> str:
    """Energy for people: kWh, or Wh under 0.1 kWh."""
    return f"{kwh:.3f} kWh" if kwh >= 0.1 else f"{kwh * 1000:.3g} Wh"


def _throughput(s: Summary) -> str:
    if s.samples_per_s is None:
        return "not measured"
    rate = s.samples_per_s
    text = f"{rate:,.0f} samples/s" if rate >= 100 else f"{rate:.3g} samples/s"  # 7,580, not 7.58e+03
    if s.tokens_per_s is not None:
        text += f" · {s.tokens_per_s:,.0f} tokens/s"
        if s.tokens_counted_by == "kaio" and (s.world_size or 1) > 1:  # rank 0's, as every rank's
            text += f" (kaio's count of rank 0's input ids × {s.world_size} ranks, padding included)"
        elif s.tokens_counted_by == "kaio":  # the Trainer did not count them (include_num_input_tokens_seen)
            text += " (kaio's count of the input ids, padding included)"
        elif s.tokens_counted_by == "trainer":
            text += f" (the Trainer's count, padding {'excluded' if s.tokens_without_padding else 'included'})"
    return text


def _mfu(s: Summary, tokens_per_s_per_device: float) -> str:
    """MFU needs a peak: kaio's table has GPUs for bf16/fp16 runs; on a CPU, ``reporting.peak_tflops``."""
    per_device = f"{tokens_per_s_per_device:,.0f} tokens/s"
    mfu = (
        f"{100 * s.mfu:.1f}% MFU"
        if s.mfu is not None
        else "MFU not measured (no peak FLOPs known: reporting.peak_tflops)"
    )
    return f"{per_device} · {mfu}"


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

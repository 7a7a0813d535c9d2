"""KaioCallback and its EventEmitter, hook by hook, read back from the real FIFO and spool files."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

from conftest import history_of, replay
from kaio.child import emitter as emitter_module
from kaio.child.emitter import EventEmitter
from kaio.telemetry.fifo import TelemetryFifo
from kaio.telemetry.protocol import Save, Step

# transformers and torch (10 s of imports) are loaded by the tests that use them, on one worker: at collection
# every worker would load them.
pytestmark = pytest.mark.xdist_group("transformers")


@pytest.fixture(scope="module")
def torch():
    import torch as module

    return module


def _spooled(spool_dir) -> list[dict]:
    parts = sorted(spool_dir.iterdir()) if spool_dir.is_dir() else []
    return [json.loads(line) for path in parts for line in path.read_bytes().splitlines()]


def _fifo_lines(fifo: TelemetryFifo) -> list[dict]:
    os.set_blocking(fifo.read_fd, False)
    try:
        data = os.read(fifo.read_fd, 1 << 20)
    except BlockingIOError:
        data = b""
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture()
def hooks(tmp_path):
    from transformers import TrainerControl

    from kaio.child.callback import KaioCallback

    emitter = EventEmitter(None, str(tmp_path / "spool"), rank=0, session=1)
    callback = KaioCallback(emitter)
    state = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True, num_input_tokens_seen=0)
    args = SimpleNamespace(output_dir="ck")

    def evaluate(metrics: dict) -> None:
        callback.on_evaluate(args, state, SimpleNamespace(), metrics=metrics)

    def step(logs: dict | None = None) -> None:
        control = TrainerControl(should_log=logs is not None)
        callback.on_step_begin(args, state, control)
        state.global_step += 1
        callback.on_step_end(args, state, control)
        if logs is not None:
            callback.on_log(args, state, control, logs=logs)

    def events() -> list[dict]:
        emitter.close()  # writes what the spool buffered
        return _spooled(tmp_path / "spool")

    yield SimpleNamespace(step=step, evaluate=evaluate, events=events, callback=callback, state=state)
    emitter.close()


def test_a_nan_loss_the_trainers_filter_logged_as_a_number_is_logged_as_nan_from_its_step(hooks, torch):
    """``training_step``'s losses (two micro-batches a step) are read at the log: the NaN of step 2 makes the
    window logged at step 3 NaN, whatever number the Trainer's logging_nan_inf_filter put there."""
    losses = hooks.callback.losses
    losses.observe(torch.tensor(1.5), 1)
    losses.observe(torch.tensor(1.4), 1)
    hooks.step({"loss": 1.45})
    losses.observe(torch.tensor(2.0), 2)
    losses.observe(torch.tensor(float("nan")), 2)
    hooks.step()
    losses.observe(torch.tensor(1.0), 3)
    losses.observe(torch.tensor(1.0), 3)
    hooks.step({"loss": 0.0})
    logs = [e for e in hooks.events() if e["type"] == "log"]
    assert logs[0]["loss"] == 1.45 and "nonfinite_from" not in logs[0]
    assert logs[1]["loss"] == "nan" and logs[1]["nonfinite_from"] == 2
    assert logs[1]["extra"]["trainer_logged_loss"] == 0.0
    assert losses.take().nonfinite is None  # read once
    losses.observe(torch.tensor(float("inf")), 4)
    losses.observe(torch.tensor(float("-inf")), 4)
    window = losses.take(average=True)  # their sum is NaN (math.fsum raised): no average, and no exception
    assert window.nonfinite is not None and (window.nonfinite.tag, window.mean) == ("inf", None)


def test_a_training_loss_logged_under_a_trainers_own_name_is_the_loss_and_its_nan_is_found(hooks, torch):
    """SetFit logs ``embedding_loss`` (and ``eval_embedding_loss``), no ``loss``: it is the training loss, and a NaN
    its Trainer's filter logged as 0 is found as a plain Trainer's is."""
    losses = hooks.callback.losses
    losses.observe(torch.tensor(0.5), 1)
    hooks.step({"embedding_loss": 0.5, "grad_norm": 1.0, "learning_rate": 0.1})
    losses.observe(torch.tensor(float("nan")), 2)
    hooks.step({"embedding_loss": 0.0, "grad_norm": float("nan"), "learning_rate": 0.1})
    hooks.step({"eval_embedding_loss": 0.3, "epoch": 1.0})  # an evaluation's: not the training loss
    logs = [e for e in hooks.events() if e["type"] == "log"]
    assert (logs[0]["loss"], logs[0]["extra"]) == (0.5, {"kaio_loss_logged_as": "embedding_loss"})
    assert (logs[1]["loss"], logs[1]["nonfinite_from"]) == ("nan", 2)
    assert "loss" not in logs[2] and logs[2]["extra"] == {"eval_embedding_loss": 0.3}
    from kaio.child.callback import training_loss_key

    assert training_loss_key({"learning_rate": 0.1, "aux_loss": 2.0}) is None  # a script's own log: no grad norm
    # A log() override renaming it as trackers name it (train/loss): still the training loss, its NaN found.
    renamed = {"train/loss": 0.0, "grad_norm": 1.0, "learning_rate": 0.1}
    assert training_loss_key(renamed) == "train/loss" and training_loss_key({**renamed, "eval/loss": 1.0}) == (
        "train/loss"
    )
    # Every key renamed so (W&B's style): the loss, learning rate and gradient norm are still the step's own.
    losses.observe(torch.tensor(0.25), 3)
    hooks.step({"train/loss": 0.25, "train/grad_norm": 2.0, "train/learning_rate": 0.05, "train/epoch": 1.0})
    last = [e for e in hooks.events() if e["type"] == "log"][-1]
    assert (last["loss"], last["grad_norm"], last["learning_rate"]) == (0.25, 2.0, 0.05)
    assert last["extra"] == {"kaio_loss_logged_as": "train/loss", "train/epoch": 1.0}
    records = [{"type": "session_start", "session": 1}, *hooks.events()]
    header = replay(records).header()
    assert (
        "the training loss is what the Trainer logged as embedding_loss (it logs no `loss`)" in header.telemetry.notes
    )


def test_what_a_callback_before_kaios_logs_or_evaluates_at_a_steps_end_follows_that_steps_event(hooks):
    """Trainer(callbacks=[...]) runs before kaio's callback: its trainer.log() and trainer.evaluate() in on_step_end
    came before the step's own event, and the record, which puts them in the entry that event opens, lost them."""
    from transformers import TrainerControl

    callback, state, args = hooks.callback, hooks.state, SimpleNamespace(output_dir="ck")
    callback._training = True  # as on_train_begin leaves it (which these stand-ins cannot describe)
    hooks.step({"loss": 2.0, "learning_rate": 0.1, "grad_norm": 1.0})
    control = TrainerControl()
    callback.on_step_begin(args, state, control)
    state.global_step += 1  # the Trainer's step 2 ended; the earlier callback's on_step_end:
    callback.on_log(args, state, control, logs={"my_counter": 2.0})
    hooks.evaluate({"eval_loss": 1.5, "eval_runtime": 0.2})
    callback.on_step_end(args, state, control)  # then kaio's
    callback.on_log(args, state, control, logs={"loss": 1.8, "learning_rate": 0.1, "grad_norm": 1.0})
    kinds = [(e["type"], e["step"]) for e in hooks.events() if e["type"] in ("step", "log", "eval")]
    assert kinds == [("step", 1), ("log", 1), ("step", 2), ("log", 2), ("eval", 2), ("log", 2)]
    ended = {"type": "session_end", "session": 1, "status": "COMPLETED", "exit_code": 0}
    history = history_of(replay([{"type": "session_start", "session": 1}, *hooks.events(), ended]))
    assert history["steps"][1]["metrics"] == {"my_counter": 2.0} and history["evals"][0]["step"] == 2


def test_an_evaluation_or_save_the_steps_event_could_not_announce_is_announced_when_it_comes(hooks):
    """An epoch strategy's evaluation and save are set at the epoch's end, after the step's event; a later callback's
    or the script's own evaluate() is set nowhere kaio reads. Each is announced as a pause, so that the supervisor
    gives it an evaluation's budget: a 67 s epoch evaluation was a stall of a training step, stopped with
    on_stall: stop."""
    from transformers import TrainerControl

    from kaio.child.patch import _announce_evaluations

    callback, state, args = hooks.callback, hooks.state, SimpleNamespace(output_dir="ck")

    def evaluate(**kwargs):  # as the Trainer's does: its metrics to the callbacks' on_evaluate
        callback.on_evaluate(args, state, TrainerControl(), metrics={"eval_loss": 1.0})
        return {"eval_loss": 1.0}

    trainer = SimpleNamespace(state=state, evaluate=evaluate)
    _announce_evaluations(trainer, callback)
    assert trainer.evaluate() == {"eval_loss": 1.0}  # before the training: no pause of it
    callback._training = True  # as on_train_begin leaves it (which these stand-ins cannot describe)
    hooks.step()
    callback.on_epoch_end(args, state, TrainerControl(should_evaluate=True, should_save=True))
    callback.on_epoch_end(args, state, TrainerControl())  # nothing to announce
    trainer.evaluate(metric_key_prefix="holdout")
    # A subclass's evaluate() of its own, which logs its metrics but calls no on_evaluate: recorded from its return.
    own = SimpleNamespace(state=state, args=args, control=TrainerControl(), model=None)
    own.evaluate = lambda **kwargs: {"eval_accuracy": 0.75}
    _announce_evaluations(own, callback)
    assert own.evaluate() == {"eval_accuracy": 0.75}
    events = hooks.events()
    pauses = [(e["step"], e.get("evaluates", False), e.get("saves", False)) for e in events if e["type"] == "pause"]
    assert pauses == [(1, True, True), (1, True, False), (1, True, False)]
    assert [e["metrics"] for e in events if e["type"] == "eval"] == [
        {"eval_loss": 1.0},
        {"eval_loss": 1.0},
        {"eval_accuracy": 0.75},
    ]


def test_the_trainers_count_of_a_vision_models_pixel_values_is_no_token_count(hooks):
    """include_num_input_tokens_seen counts the model's main input: a ViT's 768 pixel values an image were taken
    for tokens (tokens/s 45x too high, MFU 620%)."""
    from kaio.child.describe import trainer_counts_tokens

    assert trainer_counts_tokens(SimpleNamespace(main_input_name="input_ids"))
    assert trainer_counts_tokens(object())  # no main input named: the Trainer's default, input_ids
    vit = SimpleNamespace(main_input_name="pixel_values")
    assert not trainer_counts_tokens(vit)
    hooks.callback._trainer_counts_tokens = trainer_counts_tokens(vit)  # as on_train_begin sets it
    hooks.state.num_input_tokens_seen = 768 * 4
    hooks.step()
    (step,) = [e for e in hooks.events() if e["type"] == "step"]
    assert "tokens_seen" not in step


def test_a_step_event_then_its_log_with_nonfinite_values_tagged(hooks):
    hooks.step({"loss": float("nan"), "learning_rate": 0.1, "grad_norm": 2.0, "eval_loss": float("inf")})
    step, log = hooks.events()
    assert (step["type"], step["step"], log["type"], log["step"]) == ("step", 1, "log", 1)
    assert log["loss"] == "nan" and log["learning_rate"] == 0.1 and log["extra"] == {"eval_loss": "inf"}


class _GpuTensor:
    """Stands in for a CUDA tensor: reading it (``.item()``) would wait for the GPU."""

    device = SimpleNamespace(type="cuda")

    def item(self):
        raise AssertionError("read a GPU tensor: a synchronisation")


def test_a_gpu_tensor_in_the_logs_is_left_out_not_read(hooks):
    hooks.step({"loss": _GpuTensor(), "learning_rate": 0.1})
    _step, log = hooks.events()
    assert "loss" not in log and log["learning_rate"] == 0.1  # null: left out of the line
    assert log["extra"] == {"kaio_skipped_gpu_tensors": ["loss"]}


def test_the_spool_is_written_in_batches_while_the_fifo_reads_and_at_once_when_it_breaks(tmp_path, monkeypatch):
    monkeypatch.setattr(emitter_module, "SPOOL_FLUSH_S", 3600.0)
    fifo = TelemetryFifo()
    spool_dir = tmp_path / "spool"
    emitter = EventEmitter(str(fifo.path), str(spool_dir), rank=0, session=1)
    try:
        for step in range(1, 11):
            emitter.emit(Step(rank=0, step=step))
        assert [e["seq"] for e in _fifo_lines(fifo)] == list(range(1, 11))  # the FIFO got each at once
        assert _spooled(spool_dir) == []  # the spool waits for a batch
        for step in range(11, emitter_module.SPOOL_FLUSH_EVENTS + 1):
            emitter.emit(Step(rank=0, step=step))
        assert len(_spooled(spool_dir)) == emitter_module.SPOOL_FLUSH_EVENTS
        emitter.emit(Step(rank=0, step=65))  # in the FIFO's buffer, and the spool's
        fifo.close()  # the supervisor dies: those in the FIFO are gone
        emitter.emit(Step(rank=0, step=66))  # EPIPE: the spool's buffer is written now
        assert not emitter.connected
        assert [e["seq"] for e in _spooled(spool_dir)] == list(range(1, 67))
        emitter.emit(Step(rank=0, step=67))  # no reader: every event straight to the spool
        assert _spooled(spool_dir)[-1]["seq"] == 67
    finally:
        emitter.close()


def test_a_quiet_emitter_still_writes_its_spool_within_the_flush_interval(tmp_path, monkeypatch):
    from conftest import wait_for

    monkeypatch.setattr(emitter_module, "SPOOL_FLUSH_S", 0.05)
    fifo = TelemetryFifo()
    emitter = EventEmitter(str(fifo.path), str(tmp_path / "spool"), rank=0, session=1)
    try:
        emitter.emit(Save(rank=0, step=5))  # then nothing more (a long evaluation, say)
        wait_for(lambda: len(_spooled(tmp_path / "spool")) == 1, 5, "the flusher thread to write the spool")
    finally:
        emitter.close()
        fifo.close()


def test_an_evaluation_is_its_own_event_with_every_metric(hooks):
    hooks.step({"loss": 2.0})
    hooks.evaluate(
        {"eval_loss": 1.5, "eval_accuracy": 0.25, "eval_runtime": 0.5, "eval_nan": float("nan"), "epoch": 1.0}
    )
    hooks.evaluate({"eval_loss": 1.4, "eval_tag": "x", "eval_list": [1, 2], "eval_none": None})
    _step, _log, evaluation, odd = hooks.events()
    assert evaluation["type"] == "eval" and evaluation["step"] == 1
    assert evaluation["metrics"] == {"eval_loss": 1.5, "eval_accuracy": 0.25, "eval_runtime": 0.5, "eval_nan": "nan"}
    # Not numbers are named and left out, not recorded as missing numbers; a None logged stays null.
    assert odd["metrics"] == {"eval_loss": 1.4, "eval_none": None} and odd["not_numbers"] == ["eval_tag", "eval_list"]
    # evaluate() logs the metrics before on_evaluate gives them: one note of each, not one of each event.
    step = {"type": "step", "rank": 0, "session": 1, "step": 1, "t_mono": 1.0}
    logged = {"type": "log", "rank": 0, "session": 1, "step": 1, "extra": {"eval_tag": "x", "eval_list": "[1, 2]"}}
    notes = replay([{"type": "session_start", "session": 1}, step, logged, odd]).header().telemetry.notes
    assert [n for n in notes if "eval_tag" in n] == [
        "metric eval_tag is not a number: not in the record (child.log has it)"
    ]


def test_peft_methods_other_than_lora_are_described_as_what_they_are(torch):
    """Prefix tuning read "PREFIX_TUNING r=None alpha=None", IA3 had a rank, and DoRA read as plain LoRA."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from kaio.child.describe import describe_peft
    from kaio.report.markdown import _peft

    def described(config) -> str:
        shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
        base = LlamaForCausalLM(LlamaConfig(vocab_size=32, num_key_value_heads=2, **shape))
        return _peft(describe_peft(get_peft_model(base, config)))

    assert (
        described(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)) == "PREFIX_TUNING, 5 virtual tokens"
    )
    ia3 = IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert described(ia3) == "IA3 on down_proj, k_proj (feed-forward: down_proj)"
    dora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], use_dora=True)
    assert described(dora) == "DoRA (LORA, use_dora) r=4 alpha=8 dropout=0 on q_proj"
    # A sequence classifier's task type saves PEFT's default heads, `classifier` and `score`: the one it has.
    from transformers import LlamaForSequenceClassification

    shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    classifier = LlamaForSequenceClassification(LlamaConfig(vocab_size=32, num_labels=2, pad_token_id=0, **shape))
    seq_cls = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"])
    assert describe_peft(get_peft_model(classifier, seq_cls)).modules_to_save == ["score"]


def test_a_scripts_own_training_dataloader_batch_is_the_batch_counted(torch):
    """A Trainer subclass's get_train_dataloader with batch 6 where the arguments say 4: 96 samples were recorded for
    140, and the batch size said was 4."""
    from kaio.child.describe import _loader_batch_size
    from kaio.report.markdown import _per_device_batch

    data = torch.utils.data.TensorDataset(torch.zeros(70, 2))
    args = SimpleNamespace(per_device_train_batch_size=4)
    assert _loader_batch_size(torch.utils.data.DataLoader(data, batch_size=6), args) == 6
    assert _loader_batch_size(torch.utils.data.DataLoader(data, batch_size=4), args) is None  # the arguments' own
    varying = torch.utils.data.DataLoader(data, batch_sampler=[[0, 1, 2], [3, 4]])  # a sampler of its own sizes
    assert _loader_batch_size(varying, args) is None and _loader_batch_size(None, args) is None
    # TRL's GRPO: the loader's batch is a generation's, trained over steps_per_generation optimizer steps.
    grpo = SimpleNamespace(per_device_train_batch_size=4, steps_per_generation=2)
    assert _loader_batch_size(torch.utils.data.DataLoader(data, batch_size=8), grpo) is None

    run = {"type": "run_start", "rank": 0, "session": 1, "world_size": 1, "loader_batch_size": 6}
    run["args"] = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    state = replay([{"type": "session_start", "session": 1}, run])
    assert state.ledger.samples_per_step() == 12
    described = state.header().run
    assert described is not None and described.effective_batch_size == 12
    assert _per_device_batch(described) == "6 (the training DataLoader's; TrainingArguments say 4)"


def test_train_begin_describes_the_run_from_the_live_objects(tmp_path, torch):
    """A real (tiny) model with a real PEFT config and real TrainingArguments: what the report will say."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from kaio.child.callback import KaioCallback

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
    )
    model = get_peft_model(base, lora)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=3,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        max_steps=7,
        eval_strategy="steps",
        eval_steps=5,
        use_cpu=True,
        report_to="none",
        label_smoothing_factor=0.1,  # changes the loss it logs: said beside it
    )
    emitter = EventEmitter(None, str(tmp_path / "spool"), rank=0, session=1)

    # bf16 set by `accelerate launch --mixed_precision bf16` (the README's example), not by the arguments
    class Trainer:  # what the callback reads of its Trainer (held by a weak reference)
        accelerator = SimpleNamespace(mixed_precision="bf16")

    trainer = Trainer()
    callback = KaioCallback(emitter, trainer)
    state = SimpleNamespace(global_step=0, max_steps=7)
    data = SimpleNamespace(dataset=list(range(11)))  # the train dataloader, when no Trainer is known
    callback.on_train_begin(args, state, SimpleNamespace(), model=model, train_dataloader=data, processing_class=None)
    emitter.close()
    (start,) = _spooled(tmp_path / "spool")
    assert start["type"] == "run_start" and start["world_size"] == 1 and start["max_steps"] == 7
    assert start["args"]["per_device_train_batch_size"] == 3 and start["args"]["gradient_accumulation_steps"] == 2
    assert start["args"]["eval_strategy"] == "steps" and start["args"]["eval_steps"] == 5
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert start["model"]["trainable_params"] == trainable and start["model"]["total_params"] > trainable
    assert start["model"]["architecture"] == "LlamaForCausalLM" and start["model"]["dtype"] == "float32"
    assert start["peft"] == {
        "peft_type": "LORA",
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "adapted_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["lm_head"],
    }
    assert start["train_samples"] == 11
    env = start["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] and env["python"]
    assert "script_optimizer" not in start  # the Trainer made it from args.optim
    assert start["tokens_counted_by"] == "kaio"  # the Trainer counts no tokens (include_num_input_tokens_seen "no")
    import msgspec

    from kaio.record.types import RunDescription, RunStart

    assert start["args"]["bf16"] is False and start["mixed_precision"] == "bf16"
    described = RunDescription.from_run_start(msgspec.convert(start, RunStart))
    assert described.precision == "bf16"
    from kaio.report.markdown import _what_was_trained

    table = _what_was_trained(described)
    assert "| PEFT | LORA r=8 alpha=16 dropout=0.1 on q_proj, v_proj; trained whole beside them: lm_head |" in table
    assert "| Label smoothing | 0.1 |" in table and "| Precision (training) | bf16 |" in table

    # The script's own optimizer and scheduler (Trainer(optimizers=(...))), inside accelerate's wrappers (their
    # .optimizer and .scheduler, as AcceleratedOptimizer and AcceleratedScheduler hold them): what trained.
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(sgd, step_size=10, gamma=0.5)
    emitter = EventEmitter(None, str(tmp_path / "spool2"), rank=0, session=1)
    callback = KaioCallback(emitter)
    callback.script_optimizer = callback.script_lr_scheduler = True  # what kaio.child.patch saw at the Trainer's init
    wrapped = SimpleNamespace(optimizer=sgd), SimpleNamespace(scheduler=scheduler)
    callback.on_train_begin(args, state, SimpleNamespace(), model=model, optimizer=wrapped[0], lr_scheduler=wrapped[1])
    emitter.close()
    (start,) = _spooled(tmp_path / "spool2")
    assert (start["script_optimizer"], start["script_learning_rate"], start["script_lr_scheduler"]) == (
        "SGD",
        0.1,
        "StepLR",
    )
    from kaio.report.markdown import _optimizer_rows

    run = RunDescription.from_run_start(msgspec.convert(start, RunStart))
    assert _optimizer_rows(run, run.args) == [
        ("Learning rate", "0.1 (the script's optimizer's; TrainingArguments' 0.001 unused)"),
        ("LR scheduler", "StepLR (the script's own; TrainingArguments' linear unused)"),
        ("Optimizer", "SGD (the script's own; TrainingArguments' adamw_torch_fused unused)"),
    ]
    # OneCycleLR's rate rises to its max_lr: the peak is the run's learning rate, as args.learning_rate would be.
    from kaio.child.describe import describe_script_optimizer

    one_cycle = torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=0.2, total_steps=20)
    described = RunStart(rank=0)
    describe_script_optimizer(described, sgd, one_cycle)
    assert (described.script_learning_rate, described.script_lr_scheduler) == (0.2, "OneCycleLR")
    # A subclass whose create_optimizer builds its own (a script's Adagrad): the script's optimizer, described as
    # it is; its scheduler is still the Trainer's, from the arguments.
    from transformers import Trainer

    from kaio.child.patch import _overrides

    class AdagradTrainer(Trainer):
        def create_optimizer(self, model=None):
            return self.optimizer

    own = object.__new__(AdagradTrainer)
    assert _overrides(own, "create_optimizer") and not _overrides(own, "create_scheduler")
    assert not _overrides(object.__new__(Trainer), "create_optimizer")

    # A trainer that hands its callbacks a wrapper, not a torch module (SetFit passes its SetFitModel): the
    # Trainer's own model is the one described (parameters, dtype), not "not reported".
    emitter = EventEmitter(None, str(tmp_path / "spool3"), rank=0, session=1)
    trainer.model = model  # type: ignore[attr-defined]
    callback = KaioCallback(emitter, trainer)
    callback.on_train_begin(args, state, SimpleNamespace(), model=SimpleNamespace(model_body=model))
    emitter.close()
    (start,) = _spooled(tmp_path / "spool3")
    assert start["model"]["trainable_params"] == trainable and start["model"]["architecture"] == "LlamaForCausalLM"


def test_the_architecture_is_the_class_that_trains_not_the_one_the_checkpoint_was_saved_as(torch):
    """TRL's reward script loads a causal LM's checkpoint as LlamaForSequenceClassification: the report named the
    checkpoint's LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from kaio.child.describe import describe_model

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        architectures=["LlamaForCausalLM"],  # as the checkpoint was saved
    )
    described = describe_model(LlamaForSequenceClassification(config))
    assert described is not None and described.architecture == "LlamaForSequenceClassification"


def test_the_weights_that_do_matmuls_count_a_tied_output_layer_and_not_peft_copies_kept_aside(torch):
    """MFU's N (a tester's round of models): a tied lm_head (GPT-2, Gemma, Llama 3.2 1B) was left out with the input
    embedding, 15% fewer FLOPs a token for the same matmuls; PEFT's original of a module it trains whole
    (modules_to_save), never run, was counted; prompt tuning named the bare decoder as the architecture; rsLoRA and
    LoHa's alpha were not said; a frozen backbone under a trained head read "every parameter trained"."""
    from peft import LoHaConfig, LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from kaio.child.describe import describe_model, describe_peft
    from kaio.report.markdown import _no_peft, _peft

    def llama(tied: bool) -> LlamaForCausalLM:
        shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, num_key_value_heads=2, tie_word_embeddings=tied, **shape))

    untied, tied = describe_model(llama(False)), describe_model(llama(True))
    assert untied is not None and tied is not None
    assert tied.total_params == untied.total_params - 64 * 16  # one matrix fewer...
    assert tied.trainable_matmul_params == untied.trainable_matmul_params  # ...doing the same matmuls
    assert untied.trainable_matmul_params == untied.total_params - 64 * 16  # all but the input embedding

    model = llama(False)
    kept = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    described = describe_model(kept)
    assert described is not None and described.architecture == "LlamaForCausalLM"
    lora_and_copy = 2 * 2 * 16 + 64 * 16  # q_proj's A and B, the trained copy of lm_head
    assert described.trainable_matmul_params == lora_and_copy
    assert described.frozen_matmul_params == untied.trainable_matmul_params - 64 * 16  # the original lm_head left out

    prompt = get_peft_model(llama(False), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert describe_model(prompt).architecture == "LlamaForCausalLM"  # type: ignore[union-attr]
    rslora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"], use_rslora=True)
    said = _peft(describe_peft(get_peft_model(llama(False), rslora)))
    assert said == "LORA r=4 alpha=8 (rsLoRA: scaled by alpha/sqrt(r)) dropout=0 on q_proj"
    loha = describe_peft(get_peft_model(llama(False), LoHaConfig(r=4, alpha=16, target_modules=["q_proj"])))
    assert loha is not None and loha.alpha == 16.0

    frozen = llama(False)
    for name, param in frozen.named_parameters():
        param.requires_grad = name.startswith("lm_head")
    assert _no_peft(describe_model(frozen)) == (
        f"none: {64 * 16:,} of {untied.total_params:,} parameters trained, the rest frozen by the script"
    )
    assert _no_peft(untied) == "none: every parameter trained"


def test_half_precision_the_accelerator_does_not_autocast_is_recorded_as_fp32_and_warned_about():
    """fp16 asked on a host without a GPU: accelerate sets mixed_precision fp16 but does not autocast, and the
    losses were fp32's to the bit; the report said fp16. bf16 on the CPU autocasts, and DeepSpeed casts itself."""
    from kaio.child.describe import _mixed_precision

    def trainer(precision: str, autocasts: bool, engine: str = "NO") -> SimpleNamespace:
        return SimpleNamespace(
            accelerator=SimpleNamespace(mixed_precision=precision, native_amp=autocasts, distributed_type=engine)
        )

    assert _mixed_precision(trainer("fp16", False)) == "no"
    assert _mixed_precision(trainer("bf16", True)) == "bf16"
    assert _mixed_precision(trainer("fp16", False, "DEEPSPEED")) == "fp16"
    assert _mixed_precision(SimpleNamespace()) is None  # no accelerator to ask: the arguments say

    run = {"type": "run_start", "rank": 0, "session": 1, "device": "cpu", "mixed_precision": "no"}
    state = replay([{"type": "session_start", "session": 1}, {**run, "args": {"fp16": True, "bf16": False}}])
    header = state.header()
    assert header.run is not None and header.run.precision == "fp32"
    assert header.warnings == [
        "session 1: the training arguments ask for fp16, but the training ran in fp32: accelerate does not "
        "autocast fp16 on this device (cpu); fp16 needs a GPU"
    ]
    # Asked on accelerate's command line instead (launch.accelerate_args): said too.
    config = {
        "type": "session_start",
        "session": 1,
        "config": {"launch": {"accelerate_args": ["--mixed_precision", "fp16"]}},
    }
    state = replay([config, {**run, "args": {"fp16": False, "bf16": False}}])
    assert state.header().warnings == [
        "session 1: launch.accelerate_args asks for fp16 (--mixed_precision), but the training ran in fp32: "
        "accelerate does not autocast fp16 on this device (cpu); fp16 needs a GPU"
    ]


def test_a_seq2seq_evaluation_that_generates_is_said_with_its_length_and_beams(tmp_path, torch):
    """Seq2SeqTrainingArguments(predict_with_generate=True): the evaluation's metrics are of generated text."""
    import msgspec
    from transformers import Seq2SeqTrainingArguments

    from kaio.child.describe import _training_args
    from kaio.record.types import RunDescription, RunStart
    from kaio.report.markdown import _what_was_trained

    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), predict_with_generate=True, generation_max_length=64, generation_num_beams=4
    )
    trained = _training_args(args, SimpleNamespace())
    assert (trained.predict_with_generate, trained.generation_max_length, trained.generation_num_beams) == (True, 64, 4)
    start = RunStart(rank=0, session=1, args=trained, world_size=1)
    table = _what_was_trained(RunDescription.from_run_start(msgspec.convert(msgspec.to_builtins(start), RunStart)))
    assert "| Evaluation generates | yes (predict_with_generate): up to 64 tokens, 4 beams |" in table
    from transformers import TrainingArguments

    plain = _training_args(TrainingArguments(output_dir=str(tmp_path)), SimpleNamespace())
    assert plain.predict_with_generate is None  # a plain Trainer's arguments have none


def test_paths_are_recorded_relative_to_kaios_folder_when_the_script_moves_to_another(tmp_path, monkeypatch):
    """A script that changes its working directory (Hydra's runs do) and saves to a relative output_dir: the
    record names its checkpoints from the folder kaio runs in, where `kaio resume` looks for them."""
    from kaio.child import paths
    from kaio.child.describe import _training_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "_kaio_folder", None)
    paths.note_kaio_folder()
    assert paths.recorded_path("out/checkpoint-3") == "out/checkpoint-3"
    (tmp_path / "outputs" / "run1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "outputs" / "run1")
    assert paths.recorded_path("out/checkpoint-3") == "outputs/run1/out/checkpoint-3"
    assert paths.recorded_path("/scratch/out") == "/scratch/out"
    # A fraction of the run (logging_steps=0.2 of 15 steps) is recorded as the steps the Trainer used.
    args = SimpleNamespace(output_dir="out", logging_steps=0.2, eval_steps=0.5, save_steps=500, max_steps=15)
    state = SimpleNamespace(logging_steps=3, eval_steps=8, save_steps=500)
    recorded = _training_args(args, state)
    assert (recorded.logging_steps, recorded.eval_steps, recorded.save_steps) == (3, 8, 500)
    assert recorded.output_dir == "outputs/run1/out"


def test_the_end_of_training_says_which_checkpoints_are_gone_and_which_weights_the_model_ends_with(
    hooks, tmp_path, monkeypatch
):
    """load_best_model_at_end with save_total_limit=1: the Trainer removes the last checkpoint at its end and
    the model ends with the best one's weights; the record must not name the removed one as the latest."""
    monkeypatch.chdir(tmp_path)
    callback = hooks.callback
    args = SimpleNamespace(output_dir="out", load_best_model_at_end=True)
    state = SimpleNamespace(global_step=8, is_world_process_zero=True, best_model_checkpoint="out/checkpoint-8")
    for step in (4, 8, 20):
        (tmp_path / "out" / f"checkpoint-{step}").mkdir(parents=True)
        if step == 20:
            (tmp_path / "out" / "checkpoint-4").rmdir()  # the Trainer's rotation, as it saves checkpoint-20
        state.global_step = step
        callback.on_save(args, state, SimpleNamespace())
    (tmp_path / "out" / "checkpoint-20").rmdir()  # what the Trainer does before on_train_end
    callback.on_train_end(args, state, SimpleNamespace())
    events = hooks.events()
    # Each removal said once, as it is seen: with the save after it, then at the end (hundreds of checkpoints
    # removed in a long run made the end's event too large to send, and it was lost).
    assert [e.get("removed", []) for e in events if e["type"] == "save"] == [[], [], ["out/checkpoint-4"]]
    saves = [e for e in events if e["type"] == "save"]
    assert [c.step for c in replay([{"type": "session_start", "session": 1}, *saves]).header().checkpoints] == [8, 20]
    (end,) = [e for e in events if e["type"] == "train_end"]
    assert end["checkpoints_removed"] == ["out/checkpoint-20"] and end["best_loaded"] == "out/checkpoint-8"
    from kaio.telemetry.protocol import MAX_LINE_BYTES, TrainEnd, decode, encode

    removed = [f"/scratch/me/runs/a-long-experiment-name/checkpoint-{k}" for k in range(2, 262, 2)]
    many = TrainEnd(rank=0, step=260, checkpoints_removed=removed)
    line = encode(many)
    assert len(line) < MAX_LINE_BYTES and decode(line).checkpoints_removed == many.checkpoints_removed[-8:]

    records = [
        {"type": "session_start", "session": 1},
        {"type": "save", "rank": 0, "step": 8, "path": "out/checkpoint-8"},
        {"type": "save", "rank": 0, "step": 20, "path": "out/checkpoint-20"},
        {"type": "train_end", "rank": 0, "step": 20, **{k: end[k] for k in ("checkpoints_removed", "best_loaded")}},
    ]
    header = replay(records).header()
    assert [(c.step, c.path) for c in header.checkpoints] == [(8, "out/checkpoint-8")]
    assert header.final_model is not None and header.final_model.loaded == "out/checkpoint-8"
    said = "- **Final model:** `out/checkpoint-8`'s weights, loaded at the end (load_best_model_at_end), not the last step's"
    assert said in _executive_summary_of(header)

    # metric_for_best_model: the Trainer's best by its own metric is named, and a resumed training's best
    # replaces the earlier session's (one note, as it stands, never two that contradict each other).
    args = SimpleNamespace(
        output_dir="out", load_best_model_at_end=True, metric_for_best_model="accuracy", greater_is_better=True
    )
    state.best_metric = 1.0
    callback.on_train_end(args, state, SimpleNamespace())
    end = [e for e in hooks.events() if e["type"] == "train_end"][-1]
    assert (end["best_checkpoint"], end["best_metric"], end["best_metric_name"], end["greater_is_better"]) == (
        "out/checkpoint-8",
        1.0,
        "eval_accuracy",
        True,
    )
    later = {**end, "session": 2, "best_checkpoint": "out/checkpoint-40", "best_loaded": "out/checkpoint-40"}
    records += [{**end, "session": 1}, {"type": "session_start", "session": 2}, later]
    header = replay(records).header()
    summary = _executive_summary_of(header)
    assert [line for line in summary.splitlines() if "best" in line] == [
        "- **Final model:** the best checkpoint's weights (load_best_model_at_end), not the last step's: "
        "`out/checkpoint-40`, by eval_accuracy 1, higher is better"
    ]
    assert not any("best" in note for note in header.telemetry.notes)  # said once, at the top
    # The best checkpoint is the last step's (saved at step 40, the run's last): said so, not "not the last step's".
    saved = {"type": "save", "rank": 0, "session": 2, "step": 40, "path": "out/checkpoint-40"}
    summary = _executive_summary_of(replay([*records[:-1], saved, later]).header(), last_step=40)
    assert "- **Final model:** the best checkpoint's weights (load_best_model_at_end), which are the last step's: " in (
        summary
    )
    # A later session whose training did not reach its end (a crash): the earlier training's best is no fact of it.
    crashed = [*records, {"type": "session_start", "session": 3}, {"type": "run_start", "rank": 0, "session": 3}]
    assert replay(crashed).header().final_model is None
    # A stopped training (Ctrl-C): the Trainer loaded its best weights, but the script's save after train() did
    # not run: no final model, its best checkpoint only.
    stopped = [*records[:-1], {**later, "stopped": True}]
    summary = _executive_summary_of(replay(stopped).header())
    assert [line for line in summary.splitlines() if "checkpoint-40" in line] == [
        "- **Best checkpoint:** `out/checkpoint-40`, by eval_accuracy 1, higher is better"
    ]


def _executive_summary_of(header, last_step: int = 1) -> str:
    from kaio.report.markdown import _executive_summary
    from kaio.report.summary import Summary

    summary = Summary(project="p", status="COMPLETED", step_entries=1, optimizer_steps=last_step)
    return _executive_summary(summary, header)


def test_a_micro_batchs_examples_are_its_tensors_first_dimension(torch):
    from transformers import BatchEncoding

    from kaio.child.patch import _examples

    ids = torch.zeros(3, 16, dtype=torch.long)
    assert _examples(BatchEncoding({"input_ids": ids, "attention_mask": ids})) == 3  # the tokenizer's own mapping
    assert _examples({"pixel_values": torch.zeros(5, 3, 8, 8), "labels": torch.zeros(5)}) == 5
    assert _examples((torch.zeros(2, 4), torch.zeros(2))) == 2 and _examples(ids) == 3
    assert _examples({"text": ["a", "b"]}) is None and _examples(None) is None  # nothing kaio can count
    # Padding-free (DataCollatorWithFlattening, TRL's packing): every example in one row, told apart by where
    # position_ids restart; the row is not the example count, and reading the restarts would sync the GPU.
    packed = torch.zeros(1, 223, dtype=torch.long)
    assert _examples({"input_ids": packed, "position_ids": packed, "labels": packed}) is None
    assert _examples({"input_ids": ids, "position_ids": ids}) == 3  # unpadded rows of their own


def test_a_micro_batchs_tokens_are_its_input_ids_padding_included(torch):
    """What the Trainer's include_num_input_tokens_seen="all" counts, read from the tensor's size (no sync with
    the device); no input ids, no tokens: pixels are not tokens, a preference pair's ids have other names."""
    from transformers import BatchEncoding

    from kaio.child.patch import _input_ids

    ids = torch.zeros(3, 7, dtype=torch.long)
    assert _input_ids({"input_ids": ids, "attention_mask": ids}) == 21
    assert _input_ids(BatchEncoding({"input_ids": ids})) == 21
    assert _input_ids({"input_ids": torch.zeros(1, 40, dtype=torch.long), "position_ids": ids}) == 40  # packed
    assert _input_ids({"pixel_values": torch.zeros(5, 3, 8, 8)}) is None
    assert _input_ids({"chosen_input_ids": ids}) is None and _input_ids((ids, ids)) is None
    assert _input_ids({"input_ids": [[1, 2]]}) is None  # not a tensor: not counted


def test_an_evaluation_of_another_model_than_the_one_trained_is_listed_but_not_the_runs(tmp_path, monkeypatch, torch):
    """A teacher's Trainer evaluates after the student trained: its eval loss is not the run's (the final line
    showed the teacher's), and its row sits where the run was, not at its own Trainer's step 0. Another Trainer
    given a model with the trained weights (the student wrapped, its LoRA merged) is the run's."""
    from kaio.child import callback as module
    from kaio.child.callback import KaioCallback

    monkeypatch.setattr(module, "_TRAININGS", module._Trainings())  # this process's trainings: none yet

    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wrapped = torch.nn.Sequential(student)  # other module objects, the student's weights
    emitter = EventEmitter(None, str(tmp_path / "spool"), rank=0, session=1)
    from transformers import TrainerControl

    args, control = SimpleNamespace(output_dir="ck"), TrainerControl()
    trained = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True, max_steps=3)
    own = SimpleNamespace(global_step=0, epoch=None, is_world_process_zero=True)
    trainer = KaioCallback(emitter)
    trainer.on_train_begin(args, trained, control, model=student)
    trainer.on_step_begin(args, trained, control)
    trained.global_step = 3
    trainer.on_step_end(args, trained, control)
    # The teacher's evaluate() logs its metrics at its own Trainer's step 0, then its callbacks' on_evaluate.
    teachers = KaioCallback(emitter)
    baseline = {"baseline_loss": 4.8, "baseline_runtime": 0.1, "baseline_samples_per_second": 640.0}
    teachers.on_log(args, own, control, logs=baseline)
    teachers.on_evaluate(args, own, control, metrics=baseline, model=teacher)
    KaioCallback(emitter).on_evaluate(args, own, control, metrics={"eval_loss": 2.1}, model=wrapped)
    emitter.close()
    events = _spooled(tmp_path / "spool")
    evals = [(e["step"], e.get("other_model", False)) for e in events if e["type"] == "eval"]
    assert evals == [(3, True), (3, False)]

    from kaio.report.markdown import render_markdown
    from kaio.report.summary import summarize

    ended = {"type": "session_end", "session": 1, "status": "COMPLETED", "exit_code": 0}
    state = replay([{"type": "session_start", "session": 1}, *events, ended])
    with state.with_open_steps() as index:
        header, evals = state.header(), index.evals()
        summary = summarize(header, index)
        report = render_markdown(header, summary, evals)
    assert (summary.eval_count, summary.eval_loss_final) == (1, 2.1) and state.parts.live.eval_loss == 2.1
    assert "| 3 (another model's: not the run's) | 4.8 |" in report
    # Its log at its own step 0 is its evaluation, not numbers the run logged before its first step.
    assert "metrics_at_step_0" not in history_of(state) and "step 0 is what was logged" not in report


def test_a_teachers_evaluation_before_the_training_is_known_as_another_models_once_the_training_begins(
    tmp_path, monkeypatch, torch
):
    """Before anything trained, whose model an evaluation is cannot be told: a teacher's evaluate() then was the
    run's best evaluation loss. The training's start says which earlier evaluations were of other models; the
    student's own baseline stays the run's."""
    from transformers import TrainerControl

    from kaio.child import callback as module
    from kaio.child.callback import KaioCallback

    monkeypatch.setattr(module, "_TRAININGS", module._Trainings())
    student, teacher = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    emitter = EventEmitter(None, str(tmp_path / "spool"), rank=0, session=1)
    args, control = SimpleNamespace(output_dir="ck"), TrainerControl()
    own = SimpleNamespace(global_step=0, epoch=None, is_world_process_zero=True)
    KaioCallback(emitter).on_evaluate(args, own, control, metrics={"eval_loss": 1.1}, model=teacher)
    time.sleep(0.002)  # evaluations are told apart by their millisecond (a real one takes longer than that)
    students = KaioCallback(emitter)
    students.on_evaluate(args, own, control, metrics={"eval_loss": 6.0}, model=student)  # its baseline
    trained = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True, max_steps=2)
    students.on_train_begin(args, trained, control, model=student)
    for loss in (4.0, 3.8):
        students.on_step_begin(args, trained, control)
        trained.global_step += 1
        students.on_step_end(args, trained, control)
        students.on_log(args, trained, control, logs={"loss": loss, "learning_rate": 1e-3})
    students.on_evaluate(args, trained, control, metrics={"eval_loss": 3.9}, model=student)
    emitter.close()
    events = _spooled(tmp_path / "spool")
    run_start = next(e for e in events if e["type"] == "run_start")
    teachers_eval = next(e for e in events if e["type"] == "eval")
    assert run_start["other_model_evals"] == [teachers_eval["t_wall"]]

    from kaio.report.summary import summarize

    ended = {"type": "session_end", "session": 1, "status": "COMPLETED", "exit_code": 0}
    state = replay([{"type": "session_start", "session": 1}, *events, ended])
    with state.with_open_steps() as index:
        evals = index.evals()
        summary = summarize(state.header(), index)
    assert [(e.loss, e.other_model) for e in evals] == [(1.1, True), (6.0, False), (3.9, False)]
    assert (summary.eval_loss_best, summary.eval_loss_best_step) == (3.9, 2)


def test_a_later_trainings_steps_follow_an_earlier_one_resumed_at_its_end_that_trained_none(
    tmp_path, monkeypatch, torch
):
    """A two-phase script resumed by `kaio resume` at phase 1's last checkpoint: phase 1 trains no step, phase 2
    trains from 0. Its steps are recorded after phase 1's 24, not over them (which erased phase 1's record)."""
    from transformers import TrainerControl

    from kaio.child import callback as module
    from kaio.child.callback import KaioCallback

    monkeypatch.setattr(module, "_TRAININGS", module._Trainings())
    emitter = EventEmitter(None, str(tmp_path / "spool"), rank=0, session=2)
    args, control = SimpleNamespace(output_dir="ck"), TrainerControl()
    phase1 = SimpleNamespace(global_step=24, epoch=3.0, is_world_process_zero=True, max_steps=24)
    first = KaioCallback(emitter)
    first.on_train_begin(args, phase1, control, model=torch.nn.Linear(2, 2))
    first.on_train_end(args, phase1, control)
    phase2 = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True, max_steps=2)
    second = KaioCallback(emitter)
    second.on_train_begin(args, phase2, control, model=torch.nn.Linear(2, 2))
    for _ in range(2):
        second.on_step_begin(args, phase2, control)
        phase2.global_step += 1
        second.on_step_end(args, phase2, control)
    emitter.close()
    events = _spooled(tmp_path / "spool")
    starts = [(e.get("training", 1), e.get("start_step", 0)) for e in events if e["type"] == "run_start"]
    assert starts == [(1, 24), (2, 24)]
    assert [e["step"] for e in events if e["type"] == "step"] == [25, 26]


def test_the_scripts_own_log_after_training_is_its_numbers_not_the_last_steps_loss(tmp_path, torch):
    from transformers import TrainerControl

    from kaio.child.callback import KaioCallback

    emitter = EventEmitter(None, str(tmp_path / "spool"), rank=0, session=1)
    args, control = SimpleNamespace(output_dir="ck"), TrainerControl()
    state = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True, max_steps=2)
    callback = KaioCallback(emitter)
    callback.on_train_begin(args, state, control, model=torch.nn.Linear(2, 2))
    for loss in (4.0, 3.8):
        callback.on_step_begin(args, state, control)
        state.global_step += 1
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs={"loss": loss, "learning_rate": 1e-3})
    callback.on_train_end(args, state, control)
    callback.on_log(args, state, control, logs={"final_ppl": 42.0, "loss": 0.123})  # `trainer.log(...)` after train()
    emitter.close()
    ended = {"type": "session_end", "session": 1, "status": "COMPLETED", "exit_code": 0}
    steps = history_of(replay([{"type": "session_start", "session": 1}, *_spooled(tmp_path / "spool"), ended]))["steps"]
    assert [s["loss"] for s in steps] == [4.0, 3.8]
    assert steps[-1]["metrics"] == {"final_ppl": 42.0, "loss": 0.123}


def test_an_early_stopping_callback_out_of_patience_is_named_at_the_training_end(tmp_path, torch):
    """A run that EarlyStoppingCallback ended at step 40 of 400 was "COMPLETED 40/400" with no word of why."""
    from transformers import EarlyStoppingCallback, TrainingArguments

    from kaio.child.callback import KaioCallback

    early = EarlyStoppingCallback(early_stopping_patience=3)
    early.early_stopping_patience_counter = 3  # its patience ran out at the latest evaluation

    class Trainer:  # what the callback reads of its Trainer
        callback_handler = SimpleNamespace(callbacks=[early])

    trainer = Trainer()
    emitter = EventEmitter(None, str(tmp_path / "spool"), rank=0, session=1)
    callback = KaioCallback(emitter, trainer)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), metric_for_best_model="loss", report_to="none")
    state = SimpleNamespace(global_step=40, max_steps=400, is_world_process_zero=True, best_model_checkpoint=None)
    callback.on_train_end(args, state, SimpleNamespace())
    early.early_stopping_patience_counter = 1  # patience left: the training ended for another reason
    callback.on_train_end(args, state, SimpleNamespace())
    # A threshold: a gain below it still made the best checkpoint, so "did not improve" alone contradicted it.
    early.early_stopping_threshold, early.early_stopping_patience_counter = 0.15, 3
    callback.on_train_end(args, state, SimpleNamespace())
    emitter.close()
    ended, other, below_threshold = _spooled(tmp_path / "spool")
    assert ended["ended_early_by"] == "EarlyStoppingCallback: eval_loss did not improve for 3 evaluations"
    assert "ended_early_by" not in other
    said = "EarlyStoppingCallback: eval_loss did not improve by more than 0.15 for 3 evaluations"
    assert below_threshold["ended_early_by"] == said


def test_telling_a_trained_model_apart_compares_no_tensors(torch, monkeypatch):
    """The trained models' parameters were a WeakSet: a lookup compared tensors with ==, an element-wise kernel
    and a bool tensor the size of the embedding at every evaluation (on the GPU), whose error was what answered."""
    from kaio.child.callback import _Trainings

    trainings = _Trainings()
    model = torch.nn.Sequential(torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 2))
    trainings.trained(model)
    compared = []
    equal = torch.Tensor.__eq__
    monkeypatch.setattr(torch.Tensor, "__eq__", lambda a, b: compared.append(1) or equal(a, b))
    assert not trainings.of_another_model(model) and trainings.of_another_model(torch.nn.Linear(3, 3))
    trainings.trained(model)  # train() again: every parameter is still known
    assert compared == [] and len(trainings.weights) == 3


def test_a_script_asking_for_comet_ml_that_kaio_kept_out_is_told_why_not_to_install_it():
    """report_to=comet_ml without a key: transformers said "requires comet-ml ... Run `pip install comet-ml`", which
    is installed; kaio had kept it out (without kaio: "Comet.ml requires an API key")."""
    from kaio.child.patch import comet_kept_out

    said = RuntimeError("CometCallback requires comet-ml>=3.43.2 to be installed. Run `pip install comet-ml`.")
    explained = comet_kept_out(said)
    assert "Comet was not configured" in str(explained) and "set COMET_API_KEY" in str(explained)
    other = RuntimeError("something else")
    assert comet_kept_out(other) is other


def test_transformers_is_kept_from_importing_comet_ml_only_where_comet_is_not_configured(tmp_path, monkeypatch):
    """kaio installs comet_ml for its own sink; transformers imported it in every rank to find no API key."""
    from kaio.child.patch import _PatchOnImport

    finder = _PatchOnImport()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.comet.config
    for name in [n for n in os.environ if n.startswith("COMET_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "false")  # kaio's own, in every rank's environment

    def find_from(module: str):
        namespace = {"__name__": module, "finder": finder}
        exec("found = finder.find_spec('comet_ml', None)", namespace)  # the frame of that module's import
        return namespace["found"]

    with pytest.raises(ModuleNotFoundError):  # transformers' `import comet_ml`: as if not installed
        find_from("transformers.integrations.integration_utils")
    # Through the import machinery itself: the statement is refused, importlib.util.find_spec still answers.
    import sys

    saved = sys.modules.pop("comet_ml", None)
    sys.meta_path.insert(0, finder)
    try:
        module = {"__name__": "transformers.integrations.integration_utils"}
        with pytest.raises(ModuleNotFoundError):
            exec("import comet_ml", module)
        exec("import importlib.util\nspec = importlib.util.find_spec('comet_ml')", module)
        assert module["spec"] is not None and "comet_ml" not in sys.modules
    finally:
        sys.meta_path.remove(finder)
        if saved is not None:
            sys.modules["comet_ml"] = saved
    assert find_from("train") is None  # the script's own import: found as always
    assert find_from("accelerate.utils.imports") is None  # a library's check for it, too
    (tmp_path / ".comet.config").write_text("[comet]\napi_key=abc\n")
    assert find_from("transformers.integrations.integration_utils") is None  # configured: transformers may log
    (tmp_path / ".comet.config").unlink()
    monkeypatch.setenv("COMET_MODE", "offline")
    assert find_from("transformers.integrations.integration_utils") is None


def test_a_resumed_trainer_that_keeps_its_checkpoints_rate_and_intervals_is_named_and_the_recipe_applies_its_edits(
    tmp_path, torch
):
    """A real Trainer resumed with an edited learning rate and logging interval keeps the checkpoint's (its
    scheduler's state, trainer_state.json): the run_start names them. The recipe's callback puts the edits back
    before kaio's callback reads them (kaio's is added after the Trainer's own list), and the first resumed step
    trains at the edited schedule's rate."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from kaio.child.callback import KaioCallback
    from kaio.recipes.lora import edits_reach_a_resume

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    data = [{"input_ids": torch.arange(8) % 32, "labels": torch.arange(8) % 32} for _ in range(16)]

    def trained(lr: float, logging_steps: int, max_steps: int, spool: str, recipe: bool = False, resume=None):
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=2,
            learning_rate=lr,
            max_steps=max_steps,
            logging_steps=logging_steps,
            save_steps=4,
            lr_scheduler_type="linear",
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data, callbacks=[edits_reach_a_resume()] if recipe else None
        )
        emitter = EventEmitter(None, str(tmp_path / spool), rank=0, session=1)
        trainer.add_callback(KaioCallback(emitter, trainer))  # as kaio's patch adds it: after the Trainer's own
        trainer.train(resume_from_checkpoint=resume)
        emitter.close()
        events = _spooled(tmp_path / spool)
        return next(e for e in events if e["type"] == "run_start"), trainer

    first, _ = trained(1e-2, 1, 4, "s1")
    assert first.get("kept_from_checkpoint", {}) == {}  # a fresh training keeps nothing
    checkpoint = str(tmp_path / "out" / "checkpoint-4")
    script, _ = trained(1e-3, 2, 8, "s2", resume=checkpoint)
    # The first run's linear schedule ended at 0.0, which the optimizer holds; the extended schedule (on the kept
    # rate) gives 0.01 x 4/8 at step 4.
    assert script["kept_from_checkpoint"] == {
        "learning_rate": [0.01, 0.001],
        "logging_steps": [1, 2],
        "first_step_learning_rate": [0.0, pytest.approx(0.005)],
    }
    recipe, trainer = trained(1e-3, 2, 8, "s3", recipe=True, resume=checkpoint)
    assert recipe.get("kept_from_checkpoint", {}) == {}
    logged = {
        e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e and e["step"] > 4
    }
    assert sorted(logged) == [6, 8]  # every 2 steps, as edited
    assert logged[6] == pytest.approx(1e-3 * (8 - 5) / 8)  # step 6 trains at the linear schedule after 5 steps


@pytest.mark.parametrize(
    ("saving", "stop_at"),
    [
        # Evaluated at every step, saved only at a new best: the stop's step evaluates to no new best, and the
        # Trainer sets should_save to that.
        ({"eval_steps": 1, "save_strategy": "best"}, 4),
        # The limit of 1 with load_best_model_at_end: the Trainer's end deletes every checkpoint but the best.
        ({"eval_steps": 2, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 1}, 5),
        # Epoch strategies: the Trainer's epoch end after the stop evaluated the cut epoch and saved again.
        ({"eval_strategy": "epoch", "save_strategy": "epoch"}, 3),
    ],
    ids=["save_strategy best", "save_total_limit 1", "epoch strategies"],
)
def test_a_graceful_stop_keeps_its_checkpoint_whatever_the_scripts_save_settings(
    tmp_path, monkeypatch, torch, saving, stop_at
):
    """A real Trainer keeping its best checkpoint by a metric that stops improving after step 2: a stop at a
    later step still leaves that step's checkpoint, which `kaio resume` continues from."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from kaio.child import callback as module
    from kaio.child import stop
    from kaio.child.callback import KaioCallback

    monkeypatch.setattr(module, "_TRAININGS", module._Trainings())  # this process's trainings: none yet
    monkeypatch.setattr(stop, "_state", {**stop._state, "requested": False})
    monkeypatch.setattr(stop, "_agreed", [])
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    data = [{"input_ids": torch.arange(8) % 32, "labels": torch.arange(8) % 32} for _ in range(8)]
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])  # the best at the second evaluation

    class StopAsked(TrainerCallback):  # the SIGTERM's flag, raised during the step
        def on_step_begin(self, args, state, control, **kwargs):
            stop._state["requested"] = state.global_step + 1 == stop_at

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=10,
        metric_for_best_model="score",
        load_best_model_at_end=saving["save_strategy"] != "best",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        **{"eval_strategy": "steps", **saving},
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data[:2],
        compute_metrics=lambda prediction: {"score": next(scores)},
        callbacks=[StopAsked()],
    )
    emitter = EventEmitter(None, str(tmp_path / "spool"), rank=0, session=1)
    trainer.add_callback(KaioCallback(emitter, trainer))  # as kaio's patch adds it: after the script's own
    trainer.train()
    emitter.close()
    assert trainer.state.global_step == stop_at
    saved = json.loads((tmp_path / "out" / f"checkpoint-{stop_at}" / "trainer_state.json").read_text())
    assert saved["global_step"] == stop_at
    best = trainer.state.best_model_checkpoint
    assert best is None or os.path.isdir(best)  # the best, kept as the script asked
    events = _spooled(tmp_path / "spool")
    (end,) = [e for e in events if e["type"] == "train_end"]
    assert end["stopped"] and not [p for p in end.get("checkpoints_removed", []) if p.endswith(f"-{stop_at}")]
    # Saved once, and nothing evaluated after it: the stop ends the training at its step.
    at_stop = [e["type"] for e in events if e["type"] in ("save", "eval") and e["step"] == stop_at]
    assert at_stop.count("save") == 1 and "eval" not in at_stop[at_stop.index("save") :]


@pytest.fixture
def fresh_trainings(monkeypatch):
    """This process's trainings: none yet (as in a new rank)."""
    from kaio.child import callback as module

    monkeypatch.setattr(module, "_TRAININGS", module._Trainings())


def _tiny_llama(torch):
    """A one-layer Llama over 32 tokens, seeded: a real Trainer trains it in a fraction of a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )


def _counting(torch, count: int) -> list[dict]:
    return [{"input_ids": torch.arange(8) % 32, "labels": torch.arange(8) % 32} for _ in range(count)]


def _cpu_args(output_dir, **arguments):
    from transformers import TrainingArguments

    defaults = {"per_device_train_batch_size": 2, "use_cpu": True, "report_to": "none", "disable_tqdm": True}
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **arguments})


def _train_recorded(trainer, spool, *wrappers, session: int = 1, **train_kwargs) -> list[dict]:
    """``trainer.train()`` with kaio's callback added last, as the patch adds it (and the patch's ``wrappers`` of
    the trainer's methods), and the events it spooled, after their session's start."""
    from kaio.child.callback import KaioCallback

    emitter = EventEmitter(None, str(spool), rank=0, session=session)
    callback = KaioCallback(emitter, trainer)
    trainer.add_callback(callback)
    for wrap in wrappers:
        wrap(trainer, callback)
    try:
        trainer.train(**train_kwargs)
    finally:
        emitter.close()
    return [{"type": "session_start", "session": session}, *_spooled(spool)]


def test_load_best_model_at_end_that_found_no_saved_best_is_warned_about(tmp_path, fresh_trainings, torch):
    """A real Trainer evaluating every step and saving every 4th: its best evaluation (step 1) saved no checkpoint,
    so load_best_model_at_end loads nothing and the model ends with the last step's weights. The record says so."""
    from transformers import Trainer

    data, scores = _counting(torch, 8), iter([0.9, 0.5, 0.4, 0.3, 0.2])
    args = _cpu_args(
        tmp_path / "out", max_steps=4, eval_strategy="steps", eval_steps=1, save_steps=4,
        load_best_model_at_end=True, metric_for_best_model="score",
    )  # fmt: skip
    trainer = Trainer(
        model=_tiny_llama(torch),
        args=args,
        train_dataset=data,
        eval_dataset=data[:2],
        compute_metrics=lambda prediction: {"score": next(scores)},
    )
    events = _train_recorded(trainer, tmp_path / "spool")
    assert trainer.state.best_model_checkpoint is None and trainer.state.best_metric == 0.9  # what a user missed
    # disable_tqdm's PrinterCallback pops the closing log's total_flos before kaio's callback sees the log.
    closing = [e for e in events if e["type"] == "log" and "train_runtime" in e.get("extra", {})]
    assert closing and closing[-1]["extra"]["total_flos"] == trainer.state.total_flos > 0
    (end,) = [e for e in events if e["type"] == "train_end"]
    assert (end["best_unsaved"], end["best_unsaved_step"], end["best_metric_name"]) == (True, 1, "eval_score")
    header = replay([{"type": "session_start", "session": 1}, end]).header()
    assert header.final_model is None
    assert header.warnings == [
        "load_best_model_at_end loaded no checkpoint: the best evaluation (eval_score 0.9 at step 1) was at a step "
        "that saved none (save_steps coarser than eval_steps), so the final model has the last step's weights "
        "(step 4), not the best's"
    ]


def test_numbers_a_compute_loss_logs_for_each_micro_batch_are_kept_as_each_steps_mean_not_as_its_loss(
    tmp_path, fresh_trainings, torch
):
    """A Trainer subclass whose compute_loss logs its own `loss` (scaled) and an auxiliary number at every
    micro-batch, with 2 micro-batches a step: the record's loss is the Trainer's own at every step, and the
    auxiliary number is each step's mean of the values the Trainer's log history gives that step."""
    from transformers import Trainer

    from kaio.child.patch import _watch_losses

    model = _tiny_llama(torch)
    data = [{"input_ids": torch.randint(0, 32, (8,)), "labels": torch.randint(0, 32, (8,))} for _ in range(16)]

    class LogsItsParts(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss = super().compute_loss(model, inputs, return_outputs, **kwargs)
            self.log({"loss": loss.item() * 100, "aux": loss.item() * 2})
            return loss

    args = _cpu_args(
        tmp_path / "out",
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=1,
        include_num_input_tokens_seen=True,  # (the Trainer's log() adds its count to the script's logs too)
        save_strategy="no",
    )
    trainer = LogsItsParts(model=model, args=args, train_dataset=data)
    events = _train_recorded(trainer, tmp_path / "spool", _watch_losses)
    logged = trainer.state.log_history
    trainers_losses = {e["step"]: e["loss"] for e in logged if "grad_norm" in e}
    aux: dict[int, list[float]] = {}
    for e in logged:
        if "aux" in e:
            aux.setdefault(e["step"], []).append(e["aux"])
    assert sorted(trainers_losses) == [1, 2, 3, 4] and all(len(v) == 2 for k, v in aux.items() if k > 0)
    state = replay(events)
    steps = {s["step"]: s for s in history_of(state)["steps"]}
    assert {k: s["loss"] for k, s in steps.items()} == pytest.approx(trainers_losses, rel=1e-6)
    tokens = {e["step"]: e["num_input_tokens_seen"] for e in logged if "grad_norm" in e}
    assert {k: s["metrics"]["num_input_tokens_seen"] for k, s in steps.items()} == tokens  # the Trainer's own
    assert {k: s["metrics"]["aux"] for k, s in steps.items() if k in aux} == pytest.approx(
        {k: sum(v) / len(v) for k, v in aux.items() if k > 0}, rel=1e-6
    )
    notes = " ".join(state.header().telemetry.notes)
    assert "the script logged `loss` from inside training_step" in notes
    assert "logged metric aux was logged from inside training_step more than once a step" in notes


def test_arguments_a_script_sets_after_building_them_are_recorded_as_the_trainer_reads_them_never_an_error(tmp_path):
    """`args.include_num_input_tokens_seen = True` after TrainingArguments(...) (whose __post_init__ would have made
    it "all") stays a bool: describing it failed kaio's type check, and that error ended the script's training. The
    Trainer compares it with "no", so True and False both count (as "all"); a value of a type the record does not
    take is left out of it."""
    from transformers import TrainingArguments

    from kaio.child.describe import _training_args

    for set_after, read_as in ((True, "all"), (False, "all"), ("non_padding", "non_padding")):
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
        args.include_num_input_tokens_seen = set_after
        assert _training_args(args, SimpleNamespace()).include_num_input_tokens_seen == read_as
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", learning_rate=1e-3)
    args.max_steps = "12"  # a type the record does not take: left out, the rest kept
    args.num_train_epochs = object()
    recorded = _training_args(args, SimpleNamespace())
    assert (recorded.max_steps, recorded.num_train_epochs, recorded.learning_rate) == (12, None, 1e-3)


def test_an_earlier_sessions_checkpoints_a_resumed_training_removes_leave_the_record(tmp_path, monkeypatch, torch):
    """Session 1 saves checkpoint-2 and checkpoint-4; session 2 resumes from checkpoint-4 with save_total_limit=1,
    and the Trainer's rotation deletes both. The record listed them still ("Latest checkpoint" named a folder gone)."""
    from transformers import Trainer

    from kaio.child import callback as module

    monkeypatch.chdir(tmp_path)

    def session(number: int, max_steps: int, **saving) -> list[dict]:
        monkeypatch.setattr(module, "_TRAININGS", module._Trainings())  # a new process
        args = _cpu_args("out", max_steps=max_steps, save_steps=2, **saving)
        trainer = Trainer(model=_tiny_llama(torch), args=args, train_dataset=_counting(torch, 8))
        resume = "out/checkpoint-4" if number > 1 else None
        return _train_recorded(trainer, tmp_path / f"spool{number}", session=number, resume_from_checkpoint=resume)

    records = session(1, 4)
    assert [c.path for c in replay(records).header().checkpoints] == ["out/checkpoint-2", "out/checkpoint-4"]
    records += session(2, 8, save_total_limit=1)
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-8"]
    assert [c.path for c in replay(records).header().checkpoints] == ["out/checkpoint-8"]


def test_a_step_whose_end_a_callback_before_kaios_raised_in_is_still_recorded(tmp_path, fresh_trainings, torch):
    """A script's callback raises in on_step_end at step 3: the Trainer had trained step 3 (its state says 3), but
    kaio's callback, the last, never heard of its end and the record stopped at step 2."""
    from transformers import Trainer, TrainerCallback

    from kaio.child.callback import send_the_step_an_error_ended

    class Breaks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("the script's own bug")

    args = _cpu_args(tmp_path / "out", max_steps=6, save_strategy="no")
    trainer = Trainer(model=_tiny_llama(torch), args=args, train_dataset=_counting(torch, 8), callbacks=[Breaks()])

    original_train = trainer.train

    def train(**kwargs):  # as kaio's patched train() does
        try:
            return original_train(**kwargs)
        except BaseException:
            send_the_step_an_error_ended(trainer)
            send_the_step_an_error_ended(trainer)  # twice (nested trainers): still one event for the step
            raise

    trainer.train = train
    with pytest.raises(RuntimeError, match="own bug"):
        _train_recorded(trainer, tmp_path / "spool")
    assert [e["step"] for e in _spooled(tmp_path / "spool") if e["type"] == "step"] == [1, 2, 3]


def test_an_evaluation_loss_the_trainers_filter_took_of_part_of_the_data_is_warned_about(
    tmp_path, fresh_trainings, torch
):
    """Every third evaluation batch's loss is NaN: the Trainer's eval_loss (logging_nan_inf_filter, the default)
    is the mean of the others, a finite number of part of the data, which the record showed as the evaluation's."""
    from transformers import Trainer

    from kaio.child.patch import _watch_eval_losses

    data = _counting(torch, 18)
    batches = iter(range(1000))

    class SomeBatchesNaN(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            result = super().compute_loss(model, inputs, return_outputs, **kwargs)
            if model.training or next(batches) % 3:
                return result
            return (result[0] * float("nan"), *result[1:]) if return_outputs else result * float("nan")

    args = _cpu_args(
        tmp_path / "out", per_device_eval_batch_size=2, max_steps=2, eval_strategy="steps", eval_steps=1,
        save_strategy="no",
    )  # fmt: skip
    trainer = SomeBatchesNaN(model=_tiny_llama(torch), args=args, train_dataset=data, eval_dataset=data)
    events = _train_recorded(trainer, tmp_path / "spool", _watch_eval_losses)
    evals = [e for e in events if e["type"] == "eval"]
    assert [(e["loss_batches_nonfinite"], e["loss_batches"]) for e in evals] == [(3, 9), (3, 9)]
    assert all(isinstance(e["metrics"]["eval_loss"], float) for e in evals)  # finite: the filter's
    header = replay(events).header()
    (said,) = [w for w in header.warnings if "part of the data" in w]
    assert said.startswith("an evaluation loss of part of the data: at step 1, eval_loss ")
    assert "leaves out 3 of rank 0's 9 batches, whose loss was NaN/inf" in said


def test_a_nan_loss_on_a_rank_but_the_first_is_told_by_that_ranks_next_step_event(tmp_path, torch):
    """Rank 1's loss went NaN at step 5; rank 0's stayed finite, and the Trainer's logged loss (the ranks' mean,
    its logging_nan_inf_filter keeping it finite) hid it: no warning, COMPLETED. Rank 1 tells its own finding with
    its next step's event, once, with no collective."""
    from transformers import TrainerControl

    from kaio.child.callback import KaioCallback

    events = [{"type": "session_start", "session": 1}]
    for rank in (0, 1):
        emitter = EventEmitter(None, str(tmp_path / f"spool{rank}"), rank=rank, session=1)
        callback = KaioCallback(emitter)
        state = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=rank == 0, num_input_tokens_seen=0)
        args = SimpleNamespace(output_dir="ck")
        for step in range(1, 11):
            callback.on_step_begin(args, state, TrainerControl())
            callback.losses.observe(torch.tensor(float("nan") if rank == 1 and step >= 5 else 2.0), step)
            state.global_step = step
            callback.on_step_end(args, state, TrainerControl())
            if step % 4 == 0:  # logging_steps=4: the Trainer's loss, 2.0 on both ranks' logs
                callback.on_log(args, state, TrainerControl(), logs={"loss": 2.0, "learning_rate": 0.1})
        emitter.close()
        events += _spooled(tmp_path / f"spool{rank}")
    told = [(e["step"], e.get("loss_nonfinite_from")) for e in events if e.get("rank") == 1 and e["type"] == "step"]
    assert [t for t in told if t[1] is not None] == [(9, 5)]  # after the log at step 8 found it, once
    header = replay(sorted(events, key=lambda e: (e.get("step", 0), e.get("rank", 0)))).header()
    assert header.warnings == [
        "non-finite loss (nan) on rank 1 from step 5, in its own losses: the Trainer's logged loss, the ranks' mean, "
        "leaves it out (its logging_nan_inf_filter)"
    ]


def test_a_scripts_own_sgd_says_whether_it_keeps_momentum(torch):
    """The memory estimate counted no optimizer state for SGD(momentum=0.9), which keeps a buffer per parameter."""
    from kaio.child.describe import describe_script_optimizer
    from kaio.telemetry.protocol import RunStart

    weights = [torch.nn.Parameter(torch.zeros(4))]
    for optimizer, keeps in (
        (torch.optim.SGD(weights, lr=0.1, momentum=0.9), True),
        (torch.optim.SGD(weights, lr=0.1), False),
        (torch.optim.AdamW(weights, lr=0.1), False),
    ):
        run = RunStart(rank=0)
        describe_script_optimizer(run, optimizer, None)
        assert run.script_momentum is keeps, type(optimizer).__name__

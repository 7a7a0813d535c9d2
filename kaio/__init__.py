"""kaio: launch, watch and record a fine-tune. ``kaio.log`` reports the steps of a loop without a Trainer."""

__version__ = "0.1.0"


def log(step: int, loss: float | None = None, **metrics: float) -> None:
    """Report one optimizer step of a training loop that has no transformers ``Trainer``.

    ``kaio.log(step=i, loss=loss.item(), learning_rate=lr, grad_norm=norm, any_other=value)``,
    after each optimizer step, on every rank. Under ``kaio run`` it goes into the record like a
    Trainer's steps; outside kaio it does nothing.
    """
    from kaio.child.plain import log as report

    report(step, loss, **metrics)

"""The supervisor draws telemetry.png in a child process: warmed ahead, fed its data, waited for, its failures reported."""

from __future__ import annotations

import subprocess

import msgspec

from kaio.report.figure_data import FigureData, Line
from kaio.run.finalize import FigureProcess

PNG = b"\x89PNG\r\n\x1a\n"


def _data(n: int) -> FigureData:
    steps = [float(i) for i in range(1, n + 1)]
    return FigureData(
        title="p: RUNNING",
        no_gpu=True,
        loss=Line(steps, [5.0 / i for i in steps]),
        learning_rate=Line(steps, [1e-3] * n),
    )


class _Unreadable(msgspec.Struct):
    """Data the drawing process cannot read as a FigureData."""

    title: int = 3


def test_the_figure_is_drawn_by_a_child_and_a_request_during_a_drawing_is_skipped(tmp_path):
    figure = FigureProcess(tmp_path)
    figure.draw(_data(50))  # in the background
    figure.draw(_data(60))  # still drawing: skipped
    figure.close()
    assert (tmp_path / "telemetry.png").read_bytes()[:8] == PNG
    assert figure.failure is None


def test_a_warm_process_draws_what_it_is_given_later_and_nothing_if_given_nothing(tmp_path):
    figure = FigureProcess(tmp_path)
    figure.warm()  # matplotlib loads while the data is gathered
    figure.close()  # never fed: ends without drawing, and that is no failure
    assert not (tmp_path / "telemetry.png").exists() and figure.failure is None
    figure.warm()
    figure.draw(_data(20), replace=True)
    figure.close()
    assert (tmp_path / "telemetry.png").read_bytes()[:8] == PNG and figure.failure is None


def test_a_drawing_that_fails_says_why(tmp_path):
    figure = FigureProcess(tmp_path)
    figure.draw(_Unreadable(), replace=True)  # type: ignore[arg-type]
    figure.close()
    assert figure.failure and "Error" in figure.failure
    assert not (tmp_path / "telemetry.png").exists()


def test_a_drawing_that_cannot_start_is_reported_not_raised(tmp_path, monkeypatch):
    def no_process(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    figure = FigureProcess(tmp_path)
    figure.draw(_data(3), replace=True)
    assert figure.failure and "Resource temporarily unavailable" in figure.failure
    figure.close()

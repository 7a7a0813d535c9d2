"""The supervisor draws telemetry.png in a child process: drawn, waited for, and its failures reported."""

from __future__ import annotations

import glob
import tempfile

import msgspec

from kaio.report.figure_data import FigureData, Line
from kaio.run.finalize import FigureProcess


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


def _jobs_left() -> set[str]:
    return set(glob.glob(f"{tempfile.gettempdir()}/kaio-figure-*.json"))


def test_the_figure_is_drawn_by_a_child_and_a_request_during_a_drawing_is_skipped(tmp_path):
    before = _jobs_left()
    figure = FigureProcess(tmp_path)
    figure.draw(_data(50))  # in the background
    figure.draw(_data(60))  # still drawing: skipped
    figure.close()
    assert (tmp_path / "telemetry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.failure is None and _jobs_left() == before


def test_a_drawing_that_fails_says_why_and_leaves_no_job_file(tmp_path):
    before = _jobs_left()
    figure = FigureProcess(tmp_path)
    figure.draw(_Unreadable(), wait=True)
    assert figure.failure and "Error" in figure.failure
    assert not (tmp_path / "telemetry.png").exists() and _jobs_left() == before


def test_a_drawing_that_cannot_start_is_reported_not_raised(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    figure = FigureProcess(tmp_path)
    figure.draw(_data(3), wait=True)
    assert "No space left on device" in figure.failure
    figure.close()

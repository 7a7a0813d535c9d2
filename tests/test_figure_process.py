"""The supervisor draws telemetry.png in a child process: drawn, waited for, and its failures reported."""

from __future__ import annotations

import glob
import tempfile

from kaio.report.tally import tally_steps
from kaio.run.finalize import FigureProcess


def _steps(n: int) -> list[dict]:
    return [{"step": i, "session": 1, "t_mono": float(i), "loss": 5.0 / i, "learning_rate": 1e-3} for i in range(1, n + 1)]


class _Unreadable:
    """A tally whose saved form the drawing process cannot read."""

    def to_dict(self) -> dict:
        return {"format": "not a tally"}


def _jobs_left() -> set[str]:
    return set(glob.glob(f"{tempfile.gettempdir()}/kaio-figure-*.json"))


def test_the_figure_is_drawn_by_a_child_and_a_request_during_a_drawing_is_skipped(tmp_path):
    before = _jobs_left()
    figure = FigureProcess(tmp_path)
    header = {"project": "p", "status": "RUNNING", "devices": []}
    figure.draw(header, tally_steps(_steps(50)))  # in the background
    figure.draw(header, tally_steps(_steps(60)))  # still drawing: skipped
    figure.close()
    assert (tmp_path / "telemetry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.failure is None and _jobs_left() == before


def test_a_drawing_that_fails_says_why_and_leaves_no_job_file(tmp_path):
    before = _jobs_left()
    figure = FigureProcess(tmp_path)
    figure.draw({"project": "p"}, _Unreadable(), wait=True)
    assert figure.failure and "Error" in figure.failure
    assert not (tmp_path / "telemetry.png").exists() and _jobs_left() == before


def test_a_drawing_that_cannot_start_is_reported_not_raised(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", no_space)
    figure = FigureProcess(tmp_path)
    figure.draw({"project": "p"}, tally_steps(_steps(3)), wait=True)
    assert "No space left on device" in figure.failure
    figure.close()

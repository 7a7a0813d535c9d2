"""The README documents every config key and gives the commands CI runs."""

from __future__ import annotations

import re

from conftest import REPO
from kaio.config import RunConfig
from kaio.config_reference import _rows, reference_block


def test_readme_config_table_is_the_current_schema():
    readme = (REPO / "README.md").read_text()
    assert reference_block() in readme, "regenerate with: python -m kaio.config_reference --write README.md"
    for key, _default, meaning in _rows(RunConfig):
        assert f"| `{key}` |" in readme
        assert meaning, f"{key} has no description in the schema"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in ci
    run_command = next(c for c in commands if "kaio run configs/finetuning_config.yaml" in c)
    assert "pip install" in run_command


def test_readme_example_report_is_committed():
    readme = (REPO / "README.md").read_text()
    for path in ("docs/example-report/telemetry.png", "docs/example-report/report.md"):
        assert path in readme
        assert (REPO / path).is_file()

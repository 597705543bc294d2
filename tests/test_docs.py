"""The README must keep telling the truth about the settings, the two commands and the endpoints."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings, tuning_knobs
from app.tasks import TASKS

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_in_its_table() -> None:
    """What an operator sets in the Settings table, the tuning knobs in theirs, and nothing twice."""
    settings = README.split("## Settings", 1)[1].split("### Tuning knobs", 1)
    knobs = settings[1].split("\n## ", 1)[0]
    tuning = tuning_knobs(Settings)
    assert tuning, "no setting is marked as a tuning knob"
    for name in Settings.model_fields:
        row = f"| `PERCEIVER_{name.upper()}` |"
        assert README.count(row) == 1, name
        assert row in (knobs if name in tuning else settings[0]), name


def test_every_endpoint_has_a_curl_example() -> None:
    for task in TASKS.values():
        assert f"localhost:8000{task.path}" in README, task.path
    for path in ("/healthz", "/readyz", "/v1/models", "/metrics"):
        assert f"localhost:8000{path}" in README


def test_the_two_commands_exist_and_ci_runs_the_test_one() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "make serve" in README and "make test" in README
    assert "\nserve:" in makefile and "\ntest:" in makefile
    assert "torch==2.13.0" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()

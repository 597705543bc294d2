"""What the package declares: a config file needs PyYAML at run time; uvicorn stays within what CI ran."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    found = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name.lower() == name]
    assert found, f"{name} is not a runtime dependency"
    return found[0]


def test_pyyaml_is_a_runtime_dependency() -> None:
    requirement("pyyaml")  # `perceiver-serve --config serve.yaml` imports yaml


def test_uvicorn_is_bounded_to_the_versions_ci_runs() -> None:
    """app/cli.py overrides uvicorn.Server's non-public capture_signals and on_tick: an unbounded range would
    let a release that renames them break draining silently."""
    spec = requirement("uvicorn").specifier
    assert any(s.operator == "<" for s in spec), "uvicorn needs an upper bound"
    assert version("uvicorn") in spec

"""What the package declares: a config file needs PyYAML at run time; uvicorn stays within what CI ran; the
playground's files ship in the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


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


def test_the_playground_files_are_package_data() -> None:
    """The page at / is read from app/static/playground/ at run time; the image installs a wheel (pip install .),
    which holds only the package data declared here: without it, / would answer 500."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["app"]
    assets = sorted((ROOT / "app" / "static" / "playground").iterdir())
    assert {a.name for a in assets} >= {"index.html", "playground.css", "playground.js"}
    for asset in assets:
        inside = asset.relative_to(ROOT / "app").as_posix()
        assert any(fnmatch(inside, pattern) for pattern in patterns), inside


def test_the_license_is_an_spdx_expression_that_builds_without_warnings(tmp_path: Path) -> None:
    """setuptools 77 reads `license = "Apache-2.0"` as an SPDX expression (the TOML-table form is deprecated and
    warns on every build): the build backend writes it as License-Expression, with warnings as errors."""
    (backend,) = (Requirement(r) for r in PYPROJECT["build-system"]["requires"])
    assert backend.name == "setuptools" and "76.9" not in backend.specifier and "77.0" in backend.specifier
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path)
    out = tmp_path / "metadata"
    out.mkdir()
    build = "import sys, setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", build, str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    dist_info = result.stdout.strip().splitlines()[-1]
    metadata = (out / dist_info / "METADATA").read_text().splitlines()
    assert "License-Expression: Apache-2.0" in metadata
    assert not any(line.startswith("License:") for line in metadata)

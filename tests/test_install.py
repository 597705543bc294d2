"""`make install`: which torch build it takes, and the lock every install goes through.

The Makefile is exercised as a dry run (`make -n`) for a virtualenv that does not exist, with a PATH that holds
nothing but a fake nvidia-smi where a GPU host is played, and the CPU wheel index played by a server on loopback:
no network, no install.
"""

from __future__ import annotations

import http.server
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import tomllib
from collections.abc import Iterator
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]
LOCK = ROOT / "requirements" / "constraints.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


class _Index(http.server.BaseHTTPRequestHandler):
    """Answers every GET with 200, as a wheel index's project page would, and counts the requests."""

    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def cpu_index() -> Iterator[str]:
    _Index.hits = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/whl/cpu"  # nothing listens there once the socket is closed


def dry_install(tmp_path: Path, *variables: str, gpu: bool = False) -> tuple[str, str, str]:
    """The torch and project install commands `make install` would run, and what make printed on stderr."""
    path = tmp_path / "bin"
    path.mkdir(parents=True)
    if gpu:
        (path / "nvidia-smi").write_text("#!/bin/sh\n")
        (path / "nvidia-smi").chmod(0o755)
    make = shutil.which("make")
    assert make, "make is not installed"
    result = subprocess.run(
        [make, "-n", "install", f"VENV={tmp_path / 'venv'}", f"PYTHON={sys.executable}", *variables],
        cwd=ROOT,
        env={"PATH": str(path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # The project's two installs; KServe's SDK goes into an environment of its own (kserve-sdk), not counted.
    pip = [line for line in result.stdout.splitlines() if "/bin/pip install" in line and "kserve-sdk" not in line]
    assert len(pip) == 2, result.stdout
    return " ".join(pip[0].split()), " ".join(pip[1].split()), result.stderr


def test_without_a_gpu_torch_comes_from_the_cpu_wheel_index(tmp_path: Path, cpu_index: str) -> None:
    torch, project, _ = dry_install(tmp_path, f"TORCH_CPU_INDEX={cpu_index}")
    assert torch.endswith(f"install --quiet --no-deps -c requirements/constraints.txt torch --index-url {cpu_index}")
    assert _Index.hits == 1  # the probe
    assert project.endswith('install --quiet -c requirements/constraints.txt -e ".[dev]"')


def test_the_cpu_wheel_index_is_pytorchs() -> None:
    make = shutil.which("make")
    assert make, "make is not installed"
    shown = subprocess.run(
        [make, "-s", "--eval", "show: ; @echo $(TORCH_CPU_INDEX)", "show"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.strip() == "https://download.pytorch.org/whl/cpu"


def test_an_unreachable_cpu_index_falls_back_to_the_configured_one(tmp_path: Path) -> None:
    torch, _, stderr = dry_install(tmp_path, f"TORCH_CPU_INDEX={closed_port_url()}")
    assert torch.endswith("install --quiet --no-deps -c requirements/constraints.txt torch")
    assert "cannot be reached; torch comes from pip's configured index" in stderr


def test_a_named_index_wins_and_nothing_is_probed(tmp_path: Path, cpu_index: str) -> None:
    torch, _, _ = dry_install(tmp_path, "TORCH_INDEX=https://mirror.example/torch-cpu", f"TORCH_CPU_INDEX={cpu_index}")
    assert torch.endswith("torch --index-url https://mirror.example/torch-cpu")
    assert _Index.hits == 0


def test_a_gpu_host_takes_the_configured_index_with_torchvision(tmp_path: Path, cpu_index: str) -> None:
    torch, project, _ = dry_install(tmp_path, f"TORCH_CPU_INDEX={cpu_index}", gpu=True)
    assert torch.endswith("install --quiet --no-deps -c requirements/constraints.txt torch torchvision")
    assert project.endswith('-c requirements/constraints.txt -e ".[dev,gpu]"')
    assert _Index.hits == 0
    torch, _, _ = dry_install(tmp_path / "cu126", "TORCH_INDEX=https://download.pytorch.org/whl/cu126", gpu=True)
    assert torch.endswith("torch torchvision --index-url https://download.pytorch.org/whl/cu126")


def test_the_install_stamp_follows_pyproject_and_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^\$\(VENV\)/\.installed: (.*)\|", makefile, re.M)
    assert rule and set(rule.group(1).split()) == {"pyproject.toml", "$(LOCK)"}
    assert "LOCK := requirements/constraints.txt" in makefile


# The lock.


def locked() -> dict[str, list[Requirement]]:
    """Every pin in the lock by package name; a universal lock may pin a package once per Python version."""
    pins: dict[str, list[Requirement]] = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            pin = Requirement(line)
            pins.setdefault(canonicalize_name(pin.name), []).append(pin)
    return pins


def declared() -> list[Requirement]:
    extras = PYPROJECT["project"]["optional-dependencies"]
    return [Requirement(r) for r in [*PYPROJECT["project"]["dependencies"], *(r for e in extras.values() for r in e)]]


def cuda_only() -> set[str]:
    """requirements/cuda-only.txt: the names the lock leaves to the torch build."""
    lines = (ROOT / "requirements" / "cuda-only.txt").read_text().splitlines()
    return {canonicalize_name(line) for line in lines if line and not line.startswith("#")}


def test_the_lock_pins_every_declared_dependency_within_its_range() -> None:
    """Fails when pyproject.toml gains or changes a dependency and the lock was not refreshed: run `make lock`."""
    pins = locked()
    for requirement in declared():
        if canonicalize_name(requirement.name) in cuda_only():
            continue  # the torch build a host installs pins these exactly
        found = pins.get(canonicalize_name(requirement.name))
        assert found, f"{requirement.name} is declared in pyproject.toml but not locked: run `make lock`"
        for pin in found:
            (version,) = (s.version for s in pin.specifier)
            assert requirement.specifier.contains(version, prereleases=True), (
                f"the lock pins {pin.name}=={version}, outside pyproject.toml's {requirement}: run `make lock`"
            )


def test_every_lock_entry_is_an_exact_pin_with_no_build_choice() -> None:
    for name, found in locked().items():
        for pin in found:
            (spec,) = pin.specifier
            assert spec.operator == "==", pin
            assert "+" not in spec.version, f"{pin}: a local version (+cpu, +cu126) forces one build of the package"
        assert not re.match(r"(nvidia-|cuda-|triton$)", name), (
            f"{name}: CUDA runtime wheels follow the torch build a host installs; add it to requirements/cuda-only.txt"
        )


def test_the_lock_holds_the_torch_pair_the_makefile_names() -> None:
    pins = re.search(r"^TORCH_PINS := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert pins
    locked_pins = locked()
    for wanted in map(Requirement, pins.group(1).split()):
        assert [str(p.specifier) for p in locked_pins[wanted.name]] == [str(wanted.specifier)], "run `make lock`"


def test_the_installed_packages_are_the_locked_ones() -> None:
    """What `make install` put in this environment came through the lock (pip's -c), torch's CPU build included.
    Read from the environment's site-packages: once something imports setuptools (torch.compile does), its
    vendored copies (setuptools/_vendor: packaging among them, not the installed version) are on sys.path too."""
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions(path=site)}
    for name, found in locked().items():
        for pin in found:
            if name in installed and (pin.marker is None or pin.marker.evaluate()):
                assert pin.specifier.contains(installed[name], prereleases=True), (
                    f"{name} {installed[name]} is installed, the lock pins {pin.specifier}: run `make install`"
                )


def test_the_image_installs_through_the_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"^RUN pip install (.*)$", dockerfile, re.M)
    assert len(installs) == 2, installs
    for install in installs:
        assert "-c requirements/constraints.txt" in install, install
    assert "COPY requirements/constraints.txt" in dockerfile
    assert not {"requirements", "requirements/", "*.txt"} & set((ROOT / ".dockerignore").read_text().split())
    assert not re.search(r"TORCH(VISION)?_VERSION=", dockerfile), "the lock pins torch and torchvision"

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from reference import CONFIGS, Reference, build_reference


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reference]:
    """One saved tiny transformers head per architecture, built once per test session."""
    return {arch: build_reference(arch, tmp_path_factory.mktemp(arch)) for arch in CONFIGS}

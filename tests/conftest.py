from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The servers tests start, in this process or as subprocesses, leave gRPC off unless the test gives a free port:
# each would otherwise listen on 8001, and two at once cannot.
os.environ.setdefault("PERCEIVER_GRPC_PORT", "0")

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/perceiver_core/test_wide_attention.py). The
# variable must be set before triton is first imported (transformers' Perceiver imports it), since Triton's own
# library functions are defined for the interpreter or for a GPU at that moment.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reference import CONFIGS, Reference, build_reference


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reference]:
    """One saved tiny transformers head per architecture, built once per test session."""
    return {arch: build_reference(arch, tmp_path_factory.mktemp(arch)) for arch in CONFIGS}

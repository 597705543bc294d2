"""Fixtures for the Triton kernels' tests (test_wide_attention.py, test_layer_norm.py)."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from perceiver_core import attention


@pytest.fixture(scope="module")
def kernel(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The test module's kernel (its ``KERNEL`` names the module, ``KERNEL_SWITCH`` attention's switch for it,
    reset before and after), compiled for the GPU or, without one, in Triton's interpreter (tests/conftest.py sets
    TRITON_INTERPRET=1 before triton is first imported)."""
    module = importlib.import_module(request.module.KERNEL)
    if not (module.interpreting() or torch.cuda.is_available()):
        pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 was set")
    switch = getattr(attention, request.module.KERNEL_SWITCH)
    switch.reset()
    yield module
    switch.reset()


@pytest.fixture(scope="module")
def device(kernel: ModuleType) -> torch.device:
    return torch.device("cpu" if kernel.interpreting() else "cuda")

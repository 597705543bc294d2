"""A Triton kernel that stands in for a PyTorch path where an environment variable asks for it: attention.py's
wide-head attention (PERCEIVER_WIDE_ATTENTION) and odd-width LayerNorm (PERCEIVER_LAYER_NORM).

The variable is read on every call (benchmarks switch it between timed runs). The kernel's module is imported on
first use only: it imports triton, which CPU builds of torch may lack. A kernel that cannot be loaded, or fails to
run (Triton builds a small C launcher on first use, and an image without a C compiler cannot), is said once in
the log, and the process keeps the PyTorch path from then on."""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger("perceiver_core.attention")

_UNLOADED = object()


class KernelSwitch:
    """``variable`` chooses ``plain`` (the PyTorch path, named ``fallback`` in the log) or ``kernel`` (the module
    ``perceiver_core.<module>``); with ``default="auto"`` it also takes ``auto``, its default: the kernel on CUDA,
    the PyTorch path elsewhere (where a CPU test emulates CUDA's path too)."""

    def __init__(
        self, variable: str, plain: str, kernel: str, module: str, fallback: str, default: str | None = None
    ) -> None:
        self.variable, self.plain, self.kernel = variable, plain, kernel
        self.default = default or plain
        self.module_name, self.fallback = module, fallback
        self.failed: str | None = None  # why the kernel failed in this process, if it did
        self._module: object = _UNLOADED

    def choices(self) -> tuple[str, ...]:
        return (self.plain, self.kernel, *(("auto",) if self.default == "auto" else ()))

    def choice(self) -> str:
        choice = os.environ.get(self.variable, self.default).strip().lower() or self.default
        if choice not in self.choices():
            raise ValueError(f"{self.variable}={choice!r}: use one of {', '.join(self.choices())}")
        return choice

    def module(self, cuda: bool = True) -> ModuleType | None:
        """The kernel's module where the variable asks for it (``auto``: for a call on CUDA) and it has neither
        failed to load nor to run."""
        choice = self.choice()
        if choice == "auto":
            choice = self.kernel if cuda else self.plain
        if choice != self.kernel or self.failed is not None:
            return None
        if self._module is _UNLOADED:
            try:
                self._module = importlib.import_module(f"{__package__}.{self.module_name}")
            except ImportError as exc:  # no triton (it comes with CUDA builds of torch)
                self._say("the Triton kernel cannot be loaded (%s); using %s", exc)
                self._module = None
        return self._module  # type: ignore[return-value]

    def _say(self, what: str, exc: object) -> None:
        """A warning where the variable asked for the kernel; where ``auto`` picked it, an info line (an image
        without a C compiler cannot build Triton's launcher, and PyTorch's path is the documented outcome)."""
        choice = self.choice()
        level = logging.INFO if choice == "auto" else logging.WARNING
        log.log(level, "%s=%s, but " + what, self.variable, choice, exc, self.fallback)

    def give_up(self, exc: Exception) -> None:
        """The kernel failed to run: the PyTorch path from now on in this process, said once in the log."""
        self.failed = f"{type(exc).__name__}: {str(exc)[:300]}"
        self._say("the Triton kernel failed (%s); using %s", self.failed)

    def reset(self) -> None:
        """Forget a failure and the loaded module (tests)."""
        self.failed, self._module = None, _UNLOADED

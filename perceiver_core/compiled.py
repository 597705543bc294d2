"""``torch.compile`` for the latent transformer, the part of every head that runs most often.

A head's latent block is one ``PerceiverLayer`` structure repeated (26 layers in the MLM, 8 blocks of 6 in the
image heads, the same weights again in every block). Compiling the whole unrolled loop costs one compile per
layer; here one layer's forward is compiled once and called for every layer, its weights passed as inputs
(Dynamo inlines ``nn.Module`` calls and lifts their parameters, so a second layer of the same shapes is a cache
hit, not a recompile). Inductor fuses each layer's LayerNorm, GELU and residual passes into the kernels around
its GEMMs.

Shapes: the batch dimension is marked dynamic, so one graph serves every batch size above 1 (Dynamo
specialises batch 1 on its own): two graphs per layer shape and dtype, made by ``warm_compiled``. Dynamo also
guards on torch's thread count (Inductor builds CPU kernels for one), so on a CPU each thread count a pass may
run with is two more.

Compile cache: Inductor keeps compiled kernels in ``$TORCHINDUCTOR_CACHE_DIR`` (a directory in /tmp by default).
``use_cache_dir`` points it at a directory that outlives the process, so the next start reads the kernels
instead of generating and compiling them again (the cold and warm start times are in docs/performance.md).
The cache holds code that the process runs: it must be writable by the server only, as the weights are.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .encoder import PerceiverEncoder

log = logging.getLogger("perceiver_core.compiled")

CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
# Each layer shape adds two entries (batch 1 and every other batch) per dtype, and on a CPU per thread count, to
# the one compiled function's cache; Dynamo's default limit of 8 would send the fifth back to eager, silently.
# A call checks the entry it used last first, so a long list costs the hot path nothing.
RECOMPILE_LIMIT = 512
# From torch 2.12 on, an assignment to torch._dynamo.config holds in the assigning thread only (pytorch/pytorch
# #186537), and the forward passes run on the batcher's threads, which would see the default of 8. Those torch
# versions take the limit as an argument of torch.compile, where it holds in every thread; older ones have only the
# process-wide setting.
LIMIT_PER_FUNCTION = "recompile_limit" in inspect.signature(torch.compile).parameters


def _run_layer(layer: nn.Module, z: Tensor) -> Tensor:
    return layer(z)


_compiled_layer: Callable[[nn.Module, Tensor], Tensor] | None = None


def compiled_layer() -> Callable[[nn.Module, Tensor], Tensor]:
    """The process's one compiled ``layer(z)``: its cache holds an entry per layer shape, dtype and batch class."""
    global _compiled_layer
    if _compiled_layer is None:
        options: dict[str, Any] = {}
        if LIMIT_PER_FUNCTION:  # its cap over all compiled functions (256 by default) is far above what we make
            options["recompile_limit"] = RECOMPILE_LIMIT
        else:
            config = torch._dynamo.config
            per_function = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # < 2.7
            for name in (per_function, "accumulated_recompile_limit"):
                setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        with warnings.catch_warnings():  # torch's own imports (torch.utils.mkldnn) use torch.jit.script_method
            warnings.filterwarnings("ignore", "`torch.jit.script_method` is deprecated", DeprecationWarning)
            _compiled_layer = torch.compile(_run_layer, **options)
    return _compiled_layer


def use_cache_dir(path: str | os.PathLike[str]) -> Path:
    """Keep Inductor's compiled kernels (and Triton's, which go under it) in ``path`` from now on."""
    directory = Path(path).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_DIR_ENV] = str(directory)
    return directory


def _encoder(model: nn.Module) -> PerceiverEncoder:
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, PerceiverEncoder):
        raise TypeError(f"{type(model).__name__} has no Perceiver encoder to compile")
    return encoder


# Heads whose compiled latent block was seen to crash the process, per device type: a segfault ends a server with
# every request it holds, so compile_latent_block refuses them there until a run on a card shows otherwise
# (benchmarks/compile_crash.py narrows the cause in one gpu.sh call).
KNOWN_CRASHES = {
    ("PerceiverForMaskedLM", "cuda"): "on an H200 with torch 2.11 the first forward pass after compiling it "
    "segfaulted in the decoder's attention (docs/performance.md, run 11)",
}


class CompileRefused(RuntimeError):
    """compile_latent_block refused a head known to crash compiled on this device (KNOWN_CRASHES)."""


def known_crash(model: nn.Module, device: torch.device) -> str | None:
    """Why ``model`` is not compiled on ``device``'s type, or None."""
    return KNOWN_CRASHES.get((type(model).__name__, device.type))


def compile_latent_block(model: nn.Module, force: bool = False) -> None:
    """Run ``model``'s latent transformer through the compiled layer from its next call on. Refuses
    (CompileRefused) a head known to crash compiled on its device, unless ``force`` (benchmarks/compile_crash.py).

    Numerics: the compiled layer computes the same functions in the same dtype; Inductor reorders reductions,
    so outputs differ from eager by rounding (tests/perceiver_core/test_compiled.py holds them to 1e-5 in fp32
    and to transformers' outputs as the eager path is).
    """
    encoder = _encoder(model)
    reason = known_crash(model, encoder.latents.device)
    if reason is not None and not force:
        raise CompileRefused(f"{type(model).__name__} is not compiled on {encoder.latents.device.type}: {reason}")
    encoder.layer_call = compiled_layer()


def uncompile(model: nn.Module) -> None:
    """Run ``model``'s latent block eagerly again."""
    _encoder(model).layer_call = None


def compiled(model: nn.Module) -> bool:
    encoder = getattr(model, "encoder", None)
    return isinstance(encoder, PerceiverEncoder) and encoder.layer_call is not None


def warm_compiled(model: nn.Module, sizes: Sequence[int] = (1, 2)) -> float:
    """Compile now rather than in a request: one latent layer on zeros at batch 1 and 2 (the two graphs Dynamo
    makes for a dynamic batch; 1 alone for a model that never batches), as the forward pass calls it: in
    inference mode, on the model's device and dtype. A layer is enough (every layer runs the same graph), and
    the rest of the model need not run. Returns the seconds it took, nearly all of them compiling."""
    encoder = _encoder(model)
    call = encoder.layer_call
    if call is None:
        raise ValueError("compile_latent_block(model) first")
    latents = encoder.latents
    # the latent layers' input: the cross-attention's output, in its residual stream's dtype where that is wider
    stream = torch.promote_types(latents.dtype, encoder.cross.residual_dtype or latents.dtype)
    started = time.perf_counter()
    # Past the recompile limit Dynamo would log a warning and run the layer eagerly from then on; here it raises,
    # so that a caller knows the model is not compiled.
    with torch.inference_mode(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for size in sizes:
            z = torch.zeros(size, *latents.shape, dtype=stream, device=latents.device)
            torch._dynamo.maybe_mark_dynamic(z, 0)
            call(encoder.layers[0], z)
    if latents.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started

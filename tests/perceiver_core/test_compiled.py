"""The compiled latent block (perceiver_core/compiled.py): the same answers as transformers and as eager, one
graph for every batch size above 1, and a compile cache that a second process reads instead of compiling."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from reference import Reference, make_inputs, reference_logits, relative_error
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import perceiver_core
from perceiver_core import attention, compiled

# Two heads whose latent layers have the same shapes (tests/reference.py's _BASE): one compile serves both.
ARCHS = ["PerceiverForMaskedLM", "PerceiverForImageClassificationLearned"]
ROOT = Path(__file__).resolve().parents[2]


def _logits(model: perceiver_core.PerceiverHead, inputs: dict[str, object]) -> torch.Tensor:
    with torch.inference_mode():  # as the server runs them
        logits = model(**inputs).logits
    assert isinstance(logits, torch.Tensor)
    return logits


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_latent_block_matches_transformers_and_eager(arch: str, references: dict[str, Reference]) -> None:
    ref = references[arch]
    theirs = reference_logits(ref)
    eager = perceiver_core.from_pretrained(ref.path)
    model = perceiver_core.from_pretrained(ref.path)
    compiled.compile_latent_block(model)
    assert compiled.compiled(model) and not compiled.compiled(eager)
    ours = _logits(model, ref.inputs)
    if arch == "PerceiverForMaskedLM":  # transformers always decodes max_position_embeddings positions
        theirs = theirs[:, : ours.shape[1]]
    assert relative_error(ours, theirs) <= 1e-4
    assert relative_error(ours, _logits(eager, ref.inputs)) <= 1e-5


def test_one_graph_serves_every_batch_size_above_one(
    references: dict[str, Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After warm_compiled (batch 1 and 2), batches of 3 and 5 run without compiling again, and give eager's
    answers. Eager attention computes its score matrices in query chunks when they would be large, the count
    from the batch size: with the bound lowered so that the latent self-attention chunks from batch 3 on (the
    published flow head's latents do from 5), the compiled layer still makes no graph of its own per batch."""
    arch = "PerceiverForImageClassificationLearned"
    config = references[arch].model.config
    per_batch = config.num_self_attention_heads * config.num_latents * config.num_latents
    monkeypatch.setattr(attention, "_MAX_SCORE_ELEMENTS", 2 * per_batch)  # chunks from batch 3 on
    ref = references[arch]
    eager = perceiver_core.from_pretrained(ref.path)
    model = perceiver_core.from_pretrained(ref.path)
    compiled.compile_latent_block(model)
    batches = {n: make_inputs(arch, model.config, batch=n, seed=n) for n in (1, 2, 3, 5)}
    seconds = compiled.warm_compiled(model)
    assert seconds > 0
    graphs = len(_debug_get_cache_entry_list(compiled._run_layer.__code__))
    assert graphs >= 2  # batch 1, and every other batch (more where other tests compiled other shapes)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (3, 5, 2, 1):
            ours = _logits(model, batches[n])
            assert ours.shape[0] == n
            assert relative_error(ours, _logits(eager, batches[n])) <= 1e-5
    assert len(_debug_get_cache_entry_list(compiled._run_layer.__code__)) == graphs


def test_compile_cache_dir_is_read_by_the_next_process(tmp_path: Path) -> None:
    """The first process compiles and writes its kernels under the cache directory; a second one with the same
    directory finds every graph there (Inductor's FX graph cache: hits, no misses) and computes the same logits."""
    cache = tmp_path / "compile-cache"
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from perceiver_core import attention, compiled
        compiled.use_cache_dir({str(cache)!r})
        from reference import _BASE, CONFIGS, make_inputs
        from transformers import PerceiverConfig
        import perceiver_core
        from perceiver_core.checkpoint import config_from_dict
        arch = "PerceiverForSequenceClassification"
        raw = {{**_BASE, **CONFIGS[arch]}}
        torch.manual_seed(0)
        model = perceiver_core.build_model(config_from_dict({{**raw, "architectures": [arch]}})).eval()
        compiled.compile_latent_block(model)
        inputs = make_inputs(arch, PerceiverConfig(**raw), batch=2)
        with torch.inference_mode():
            logits = model(**inputs).logits
        stats = torch._dynamo.utils.counters["inductor"]
        print(json.dumps({{"hit": stats["fxgraph_cache_hit"], "miss": stats["fxgraph_cache_miss"],
                           "logits": logits.flatten().tolist()}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != compiled.CACHE_DIR_ENV}

    def run() -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    first = run()
    assert first["miss"] >= 1 and first["hit"] == 0
    assert any((cache / "fxgraph").rglob("*")), "nothing was written to the cache directory"
    second = run()
    assert second["hit"] == first["miss"] and second["miss"] == 0
    assert second["logits"] == first["logits"]


def test_warm_up_raises_where_dynamo_would_quietly_run_eagerly(
    references: dict[str, Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At its recompile limit Dynamo runs a function eagerly from then on and only logs it; warm_compiled raises
    instead, so that the server knows the model is not compiled (and says so) rather than reporting it is."""
    ref = references["PerceiverForImageClassificationLearned"]
    first = perceiver_core.from_pretrained(ref.path)
    compiled.compile_latent_block(first)
    compiled.warm_compiled(first)
    entries = len(_debug_get_cache_entry_list(compiled._run_layer.__code__))
    limit: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if compiled.LIMIT_PER_FUNCTION:  # the compiled function carries its limit: a new one, at the entries there are
        monkeypatch.setattr(compiled, "RECOMPILE_LIMIT", entries)
        monkeypatch.setattr(compiled, "_compiled_layer", None)
    else:
        limit = torch._dynamo.config.patch(recompile_limit=entries)
    other = perceiver_core.from_pretrained(ref.path, dtype=torch.float64)  # a dtype no graph has yet
    compiled.compile_latent_block(other)
    with limit, pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        compiled.warm_compiled(other)


def test_a_wide_residual_stream_compiled_on_the_threads_that_serve(references: dict[str, Reference]) -> None:
    """A bf16 model whose residual sums are fp32 (the flow head's default) hands fp32 latents to its latent layers:
    warm_compiled compiles that graph, so the first requests compile nothing, and the compiled layers give eager's
    answers within bf16's rounding. All of it on another thread than the one that made the compiled function, as the
    server's batcher threads are, with that thread's own Dynamo limit at 1: from torch 2.12 on Dynamo's settings
    hold per thread, and a thread the server did not set up has the default limit (8, fewer than the entries a
    server makes), which must not apply to the compiled layer."""
    ref = references["PerceiverForOpticalFlow"]
    compiled.compiled_layer()  # made here, on the test's thread
    eager = perceiver_core.from_pretrained(ref.path, dtype=torch.bfloat16)
    model = perceiver_core.from_pretrained(ref.path, dtype=torch.bfloat16)
    assert model.residual_dtype == torch.float32
    batches = {n: make_inputs("PerceiverForOpticalFlow", model.config, batch=n, seed=n) for n in (1, 3)}
    answers: dict[int, torch.Tensor] = {}

    def serve() -> None:
        with torch._dynamo.config.patch(recompile_limit=1):
            compiled.compile_latent_block(model)
            compiled.warm_compiled(model)
            with torch._dynamo.config.patch(error_on_recompile=True):
                answers.update({n: _logits(model, inputs) for n, inputs in batches.items()})

    with ThreadPoolExecutor(1) as thread:
        thread.submit(serve).result()
    for n, ours in answers.items():
        assert ours.dtype == torch.bfloat16 and ours.shape[0] == n
        assert relative_error(ours.float(), _logits(eager, batches[n]).float()) <= 2e-2


def test_a_head_known_to_crash_compiled_on_a_device_is_refused_there_only(
    references: dict[str, Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    """KNOWN_CRASHES: the MLM is refused on CUDA (run 11's segfault) and compiled on a CPU; an entry for the CPU
    makes compile_latent_block refuse it here, leaving it eager, unless forced (benchmarks/compile_crash.py)."""
    model = perceiver_core.from_pretrained(references["PerceiverForMaskedLM"].path)
    assert "segfaulted" in (compiled.known_crash(model, torch.device("cuda")) or "")
    assert compiled.known_crash(model, torch.device("cpu")) is None
    monkeypatch.setitem(compiled.KNOWN_CRASHES, ("PerceiverForMaskedLM", "cpu"), "seen here")
    with pytest.raises(compiled.CompileRefused, match="PerceiverForMaskedLM is not compiled on cpu: seen here"):
        compiled.compile_latent_block(model)
    assert not compiled.compiled(model)
    compiled.compile_latent_block(model, force=True)
    assert compiled.compiled(model)

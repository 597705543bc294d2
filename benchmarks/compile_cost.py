"""What compiling the latent block costs at start-up and gains per forward pass (perceiver_core/compiled.py).

    python benchmarks/compile_cost.py --suite cpu                                # mid-size heads, fp32, CPU
    python benchmarks/compile_cost.py --suite gpu --device cuda --dtype bfloat16  # published heads
    python benchmarks/compile_cost.py --server                                   # the demo server's start-up

For each head, two fresh processes share one new compile cache directory: the first compiles from nothing
(cold), the second reads the cache (cached). Each builds the head, runs its eager forward pass, compiles and
runs the two graphs on one latent layer (batch 1 and 2; the seconds this takes are the compile's cost at
start-up), then times eager and compiled passes in alternation at the case's batch size (models.py's
``time_calls``), with CUDA graphs too on a GPU (the image and flow heads serve through them). It prints one
table: compile seconds cold and cached, milliseconds a pass, the ratio, and how far the compiled output is from
eager's (relative L2, same dtype).

``--server`` starts ``python -m app.cli`` (demo profile) with compile off, then on with an empty cache, then on
again with that cache, and gives the seconds from spawn to /readyz and each model's warmup_s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.models import CPU_CASES, GPU_CASES, Case, _rel, _sync, cuda_graph, smoke, time_calls  # noqa: E402


def _cases(suite: str, names: list[str] | None, small: bool) -> list[Case]:
    cases = [c for c in (CPU_CASES if suite == "cpu" else GPU_CASES) if c.positions is None]
    cases = [smoke(c) for c in cases] if small else cases
    return [c for c in cases if any(n in c.name for n in names)] if names else cases


def child(args: argparse.Namespace) -> None:
    """One process: build, time eager, compile (timed), time both in alternation. Prints one JSON line."""
    from perceiver_core import build_model, compiled
    from perceiver_core.checkpoint import config_from_dict

    compiled.use_cache_dir(args.cache)
    case = next(c for c in _cases(args.suite, None, args.smoke) if c.name == args.child)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = config_from_dict({**case.config, "architectures": [case.arch]})
    torch.manual_seed(0)
    model = build_model(config).to(device=device, dtype=dtype).eval().requires_grad_(False)

    def cast(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: cast(v) for k, v in x.items()}
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def forward(x: dict[str, Any]) -> Any:
        if case.chunks:  # the multimodal head: the whole video, as the server decodes it
            return model.autoencode(x["inputs"], num_chunks=8)
        return model(**x).logits

    full = cast(case.make_inputs(case.batch, device))
    with torch.inference_mode():
        for _ in range(2):
            eager_out = forward(full)
        _sync(device)
        compiled.compile_latent_block(model)
        compile_s = compiled.warm_compiled(model, (1, 2) if case.batch > 1 else (1,))
        compiled_out = forward(full)
        _sync(device)
        calls = {"eager": None, "compiled": compiled.compiled_layer()}

        def run(layer_call: Any) -> Any:
            model.encoder.layer_call = layer_call
            return forward(full)

        timed = {name: (lambda c=call: run(c)) for name, call in calls.items()}
        if device.type == "cuda" and not case.chunks:
            for name, call in calls.items():
                model.encoder.layer_call = call
                timed[name + "+cudagraph"] = cuda_graph(lambda: forward(full))
                timed[name + "+cudagraph"]()  # captured with this layer_call
        medians = time_calls(timed, device, args)
    if missing := sorted(set(timed) - set(medians)):
        raise RuntimeError(f"failed to run: {', '.join(missing)}")  # the table shows this process's error
    print(
        json.dumps(
            {
                "case": case.name,
                "batch": case.batch,
                "compile_s": round(compile_s, 2),
                "ms": {name: round(ms, 2) for name, ms in medians.items()},
                "rel_compiled_vs_eager": _rel(compiled_out, eager_out),
            }
        ),
        flush=True,
    )


def run_child(args: argparse.Namespace, name: str, cache: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", name, "--cache", str(cache), "--suite", args.suite]
    command += ["--device", args.device, "--dtype", args.dtype, "--reps", str(args.reps), "--budget", str(args.budget)]
    command += ["--warmup", str(args.warmup)] + (["--smoke"] if args.smoke else [])
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return {"case": name, "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr else "failed"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def models_table(args: argparse.Namespace) -> None:
    rows = []
    for case in _cases(args.suite, args.cases, args.smoke):
        with tempfile.TemporaryDirectory(prefix="compile-cache-") as cache:
            cold = run_child(args, case.name, Path(cache))
            cached = run_child(args, case.name, Path(cache))
        print(json.dumps({"cold": cold, "cached": cached}), flush=True)
        rows.append((case, cold, cached))
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"\n{device}, {args.dtype}, torch {torch.__version__}\n")
    print(
        "| head | batch | compile cold s | compile cached s | eager ms | compiled ms | eager ÷ compiled | "
        "rel. diff | with CUDA graphs: eager ÷ compiled |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case, cold, cached in rows:
        if "error" in cold or "error" in cached:
            print(f"| {case.name} | {case.batch} | {cold.get('error') or cached.get('error')} |||||||")
            continue
        ratios = [run["ms"]["eager"] / run["ms"]["compiled"] for run in (cold, cached)]
        rel = max(cold["rel_compiled_vs_eager"], cached["rel_compiled_vs_eager"])
        graphs = [
            f"{run['ms']['eager+cudagraph'] / run['ms']['compiled+cudagraph']:.2f}"
            for run in (cold, cached)
            if "eager+cudagraph" in run["ms"]
        ]
        print(
            f"| {case.name} | {case.batch} | {cold['compile_s']} | {cached['compile_s']} "
            f"| {cold['ms']['eager']}, {cached['ms']['eager']} | {cold['ms']['compiled']}, {cached['ms']['compiled']} "
            f"| {ratios[0]:.2f}, {ratios[1]:.2f} | {rel:.1e} "
            f"| {', '.join(graphs) or 'n/a'} |"
        )


def server_table(args: argparse.Namespace) -> None:
    import httpx

    from benchmarks.serve_load import spawn

    with tempfile.TemporaryDirectory(prefix="compile-cache-") as cache:
        runs = [
            ("off", {"PERCEIVER_COMPILE": "off"}),
            ("latent, empty cache", {"PERCEIVER_COMPILE": "latent", "PERCEIVER_COMPILE_CACHE": cache}),
            ("latent, cached", {"PERCEIVER_COMPILE": "latent", "PERCEIVER_COMPILE_CACHE": cache}),
        ]
        print("| compile | spawn to ready s | warmup_s per model |\n|---|---|---|")
        for label, env in runs:
            started = time.perf_counter()
            proc, url = spawn({**env, "PERCEIVER_API_PROCESSES": "0"})
            ready = time.perf_counter() - started
            try:
                models = httpx.get(url + "/v1/models", timeout=10).json()["models"]
            finally:
                proc.terminate()
                proc.wait(60)
            warm = ", ".join(f"{m['name']} {m['warmup_s']:.1f}" for m in models)
            print(f"| {label} | {ready:.1f} | {warm} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cases", nargs="*", help="substrings of the case names to run (default: all)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of each variant before timing")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed passes per process")
    parser.add_argument("--smoke", action="store_true", help="tiny latent stacks: checks the script, not figures")
    parser.add_argument("--server", action="store_true", help="the demo server's start-up with and without")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    elif args.server:
        server_table(args)
    else:
        models_table(args)


if __name__ == "__main__":
    main()

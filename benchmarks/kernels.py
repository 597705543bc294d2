"""What the Triton kernel benchmarks share (benchmarks/wide_attention.py, benchmarks/layer_norm.py): the choice
switched by its environment variable, alternating timings, an ahead-of-time compile that reads the cubin's
resources, and the command line with its report.

Each benchmark has two parts: every published call the kernel is for, at full size, against the path it would
replace (``measure_calls``), and each head that makes such calls, its whole forward with either choice
(``measure_heads``). Both come back as rows of dicts, and each call row says whether its error is acceptable."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perceiver_core  # noqa: E402
from benchmarks.latency_memory import cast_floats, forward  # noqa: E402
from benchmarks.models import GPU_CASES  # noqa: E402
from perceiver_core.checkpoint import config_from_dict  # noqa: E402

Rows = list[dict[str, Any]]


@contextlib.contextmanager
def env_choice(variable: str, choice: str) -> Iterator[None]:
    """``variable`` set to ``choice`` for the block (perceiver_core reads its choices on every call)."""
    previous = os.environ.get(variable)
    os.environ[variable] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ[variable]
        else:
            os.environ[variable] = previous


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], Any]], device: torch.device, reps: int, budget_s: float) -> dict[str, float]:
    """Median ms of each function, timed in alternation after a warm-up call each (which autotunes the kernel)."""
    for fn in fns.values():
        fn()
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() - start > budget_s:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def heads_either_way(
    args: argparse.Namespace, device: torch.device, cases: set[str], variable: str, choices: tuple[str, str]
) -> Rows:
    """Each published head named in ``cases``, its whole forward in bf16 at benchmarks/models.py's batch, with
    ``variable`` set to either of ``choices``, timed in alternation: samples a second each way and the speed-up
    of the second choice."""
    out = []
    for case in GPU_CASES:
        if case.name not in cases or (args.only and not any(part in case.name for part in args.only.split(","))):
            continue
        config = config_from_dict({**case.config, "architectures": [case.arch]})
        torch.manual_seed(0)
        model = perceiver_core.build_model(config).to(device=device, dtype=torch.bfloat16).eval()
        inputs = cast_floats(case.make_inputs(case.batch, device), torch.bfloat16)
        call = forward(case, model, inputs)  # as benchmarks/models.py times ours (the whole video for multimodal)

        def timed_forward(choice: str, call: Callable[[], Any] = call) -> Any:
            with env_choice(variable, choice), torch.no_grad():
                return call()

        ms = timed({c: (lambda c=c: timed_forward(c)) for c in choices}, device, args.reps, args.budget)
        first, second = choices
        out.append(
            {
                "case": case.name,
                "batch": case.batch,
                f"{first}_per_s": case.batch * 1000 / ms[first],
                f"{second}_per_s": case.batch * 1000 / ms[second],
                "speedup": ms[first] / ms[second],
            }
        )
        print(json.dumps(out[-1]), flush=True)
        del model, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def compiled_resources(
    kernel: Any, types: dict[str, str], constants: dict[str, Any], arch: int, options: dict[str, int]
) -> dict[str, int]:
    """Compile ``kernel`` ahead of time for ``sm_<arch>`` with this machine's Triton and its bundled ptxas (no GPU
    needed), its arguments typed by ``types`` (name → Triton type; those in ``constants`` are constexprs), and
    read the cubin's registers, stack (spilled registers) and local memory with Triton's bundled cuobjdump, and
    its shared memory. Needs TRITON_INTERPRET unset: the interpreter's kernels do not compile."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    signature = {name: "constexpr" if name in constants else types[name] for name in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    resources = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return dict(
        registers=int(resources["REG"]),
        stack_bytes=int(resources["STACK"]),
        local_bytes=int(resources["LOCAL"]),
        shared_bytes=int(compiled.metadata.shared),
    )


def run(
    doc: str,
    measure_calls: Callable[[argparse.Namespace, torch.device], Rows],
    measure_heads: Callable[[argparse.Namespace, torch.device], Rows],
    markdown: Callable[[str, Rows, Rows], str],
    compile_check: Callable[[int], Rows],
    against: str,
) -> None:
    """The command line every kernel benchmark takes, and its report; exits non-zero where a call's error is too
    high (``against`` names the path the kernel is compared with)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="cut-down shapes on the CPU, in Triton's interpreter")
    parser.add_argument("--only", default=None, help="substring filter on case names, e.g. flow,multimodal")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget", type=float, default=3.0, help="max seconds of timed reps per row")
    parser.add_argument("--no-heads", action="store_true", help="only the calls (part 1)")
    parser.add_argument("--compile-check", type=int, metavar="ARCH", help="compile for sm_ARCH and print resources")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.compile_check:
        print(json.dumps(compile_check(args.compile_check)))
        return
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel's module imports triton
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("needs a CUDA device (or --smoke, which runs the kernel in Triton's interpreter)")
    calls = measure_calls(args, device)
    heads = [] if args.smoke or args.no_heads else measure_heads(args, device)
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton's interpreter, cut-down shapes)"
    )
    table = markdown(name, calls, heads)
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps({"device": name, "torch": torch.__version__, "calls": calls, "heads": heads}, indent=1)
        )
    if args.markdown:
        args.markdown.write_text(table + "\n")
    wrong = [f"{r['case']} {r['shape']}" for r in calls if not r["error_ok"]]
    if wrong:
        sys.exit(f"the kernel's output is further from fp32 than {against} by more than 2^-8: {wrong}")

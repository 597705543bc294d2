"""Model-level benchmark: perceiver_core against transformers, same weights, same inputs, one run.

    python benchmarks/models.py --suite cpu                # mid-size configs, fp32, CPU
    python benchmarks/models.py --suite gpu --device cuda  # published full-size configs, fp32 and bf16

Prints a markdown table of throughput and ratios (ours / transformers) and optionally writes JSON.
The multimodal reference re-runs its encoder for each of 128 decoder chunks (as transformers' docs
do); its per-video time is the median chunk time × 128.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import perceiver_core
from perceiver_core.checkpoint import config_from_dict, load_state

BF16_PEAK_TFLOPS = 790.0  # measured dense bf16 matmul rate of one H200 (see docs/performance.md)


@dataclass
class Case:
    name: str
    arch: str
    config: dict[str, Any]
    batch: int
    make_inputs: Callable[[int, torch.device], dict[str, Any]]
    unit: str = "samples"
    chunks: int = 0  # multimodal: decoder chunks per video
    positions: torch.Tensor | None = None  # MLM: decode only these positions (fill-mask)


@dataclass
class Result:
    case: str
    impl: str
    dtype: str
    batch: int
    ms: float | None = None
    per_s: float | None = None
    gflop_per_sample: float | None = None
    tflops: float | None = None
    rel_err_vs_ref_fp32: float | None = None
    # ours in fp32 arithmetic on this dtype's rounded parameters and inputs, against the same reference: what storing
    # the weights in this dtype costs before any arithmetic (docs/performance.md, "bf16 fidelity")
    storage_floor: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _text(length: int) -> Callable[[int, torch.device], dict[str, Any]]:
    def make(batch: int, device: torch.device) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(6, 262, (batch, length), generator=g)
        return {"inputs": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    return make


def _image(size: int) -> Callable[[int, torch.device], dict[str, Any]]:
    def make(batch: int, device: torch.device) -> dict[str, Any]:
        return {"inputs": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)}

    return make


def _flow(h: int, w: int) -> Callable[[int, torch.device], dict[str, Any]]:
    def make(batch: int, device: torch.device) -> dict[str, Any]:
        return {"inputs": torch.randn(batch, 2, 27, h, w, generator=torch.Generator().manual_seed(0)).to(device)}

    return make


def _video(frames: int, size: int, samples: int, labels: int) -> Callable[[int, torch.device], dict[str, Any]]:
    def make(batch: int, device: torch.device) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        return {
            "inputs": {
                "image": torch.rand(batch, frames, 3, size, size, generator=g).to(device),
                "audio": (torch.rand(batch, samples, 1, generator=g) * 2 - 1).to(device),
                "label": torch.zeros(batch, labels).to(device),
            }
        }

    return make


PUBLISHED = {
    "image-learned": dict(
        num_latents=512,
        d_latents=1024,
        d_model=512,
        num_blocks=8,
        num_self_attends_per_block=6,
        num_self_attention_heads=8,
        num_cross_attention_heads=1,
        image_size=224,
        num_labels=1000,
    ),
    "image-fourier": dict(
        num_latents=512,
        d_latents=1024,
        d_model=261,
        num_blocks=8,
        num_self_attends_per_block=6,
        num_self_attention_heads=8,
        num_cross_attention_heads=1,
        num_labels=1000,
    ),
    "image-conv": dict(
        num_latents=512,
        d_latents=1024,
        d_model=322,
        num_blocks=8,
        num_self_attends_per_block=6,
        num_self_attention_heads=8,
        num_cross_attention_heads=1,
        num_labels=1000,
    ),
    "mlm": dict(
        num_latents=256,
        d_latents=1280,
        d_model=768,
        num_blocks=1,
        num_self_attends_per_block=26,
        num_self_attention_heads=8,
        num_cross_attention_heads=8,
        qk_channels=256,
        v_channels=1280,
    ),
    "flow": dict(
        num_latents=2048,
        d_latents=512,
        d_model=322,
        num_blocks=1,
        num_self_attends_per_block=24,
        num_self_attention_heads=16,
        num_cross_attention_heads=1,
        train_size=[368, 496],
    ),
    "multimodal": dict(
        num_latents=784,
        d_latents=512,
        d_model=704,
        num_blocks=1,
        num_self_attends_per_block=8,
        num_self_attention_heads=8,
        num_cross_attention_heads=1,
        num_labels=700,
        num_frames=16,
        audio_samples_per_frame=1920,
        samples_per_patch=16,
        image_size=56,
        output_shape=[1, 16, 224, 224],
        output_num_channels=512,
    ),
}

GPU_CASES = [
    Case("image-learned 224²", "PerceiverForImageClassificationLearned", PUBLISHED["image-learned"], 64, _image(224)),
    Case("image-fourier 224²", "PerceiverForImageClassificationFourier", PUBLISHED["image-fourier"], 64, _image(224)),
    Case("image-conv 224²", "PerceiverForImageClassificationConvProcessing", PUBLISHED["image-conv"], 64, _image(224)),
    Case("mlm 2048 bytes", "PerceiverForMaskedLM", PUBLISHED["mlm"], 64, _text(2048)),
    Case("optical flow 368×496", "PerceiverForOpticalFlow", PUBLISHED["flow"], 8, _flow(368, 496)),
    Case(
        "multimodal full video",
        "PerceiverForMultimodalAutoencoding",
        PUBLISHED["multimodal"],
        1,
        _video(16, 224, 30720, 700),
        unit="videos",
        chunks=128,
    ),
]

MLM_MID = dict(
    num_latents=128,
    d_latents=512,
    d_model=384,
    num_blocks=1,
    num_self_attends_per_block=8,
    num_self_attention_heads=8,
    num_cross_attention_heads=8,
    qk_channels=128,
    v_channels=512,
    max_position_embeddings=2048,
)

# Mid-size configs that finish in a few minutes on 2 CPU cores; real input sizes, smaller latent stacks.
CPU_CASES = [
    Case(
        "image-learned 224² (mid)",
        "PerceiverForImageClassificationLearned",
        dict(
            num_latents=256,
            d_latents=512,
            d_model=512,
            num_blocks=2,
            num_self_attends_per_block=4,
            num_self_attention_heads=8,
            num_cross_attention_heads=1,
            image_size=224,
            num_labels=1000,
        ),
        2,
        _image(224),
    ),
    Case(
        "mlm 2048 bytes (mid)",
        "PerceiverForMaskedLM",
        MLM_MID,
        4,
        _text(2048),
    ),
    Case(
        "mlm 2048 bytes, fill-mask 15% (mid)",
        "PerceiverForMaskedLM",
        MLM_MID,
        4,
        _text(2048),
        positions=torch.arange(0, 2048, 7)[:307],
    ),
    Case(
        "mlm 512 bytes (mid)",
        "PerceiverForMaskedLM",
        MLM_MID,
        4,
        _text(512),
    ),
]


def smoke(case: Case) -> Case:
    """The same case with a tiny latent stack and batch 1 (inputs keep their real sizes)."""
    small = dict(num_latents=32, d_latents=64, num_blocks=1, num_self_attends_per_block=1)
    if "qk_channels" in case.config:
        small.update(qk_channels=32, v_channels=64)
    config = {**case.config, **small}
    if case.chunks:
        config.update(output_shape=[1, 16, 56, 56])
    return Case(case.name + " (smoke)", case.arch, config, 1, case.make_inputs, case.unit, case.chunks, case.positions)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(calls: dict[str, Callable[[], Any]], device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    """Median wall time (ms) of each call, timed in alternation so drift affects all of them alike.

    A call that raises is dropped from the result (and reported by the caller)."""
    live = dict(calls)
    for name, fn in list(live.items()):
        try:
            for _ in range(args.warmup):
                fn()
            _sync(device)
        except Exception:
            del live[name]
    times: dict[str, list[float]] = {name: [] for name in live}
    start_all = time.perf_counter()
    for _ in range(args.reps):
        for name, fn in list(live.items()):
            t0 = time.perf_counter()
            try:
                fn()
                _sync(device)
            except Exception:  # with --warmup 0 the first failure is here
                del live[name], times[name]
                continue
            times[name].append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() - start_all > args.budget:
            break
    return {name: statistics.median(t) for name, t in times.items() if t}


def count_gflop(fn: Callable[[], Any]) -> float | None:
    """FLOPs of one call. SDPA is forced onto its math path, whose matmuls the counter sees on every device.
    None where the counter fails (torch 2.11's cannot count ``bmm(..., out_dtype=...)``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
    except TypeError:
        return None
    return counter.get_total_flops() / 1e9


def _rel(ours: Any, ref: Any) -> float:
    if isinstance(ref, dict):
        return max(_rel(ours[k], ref[k]) for k in ref)
    a, b = ours.double(), ref.double()
    return float((a - b).norm() / b.norm())


def _comparable(case: Case, ours: Any, ref: Any) -> tuple[Any, Any]:
    """The parts of our output and the reference output that describe the same points."""
    if case.chunks:  # the reference decoded chunk 0 only
        n_img, n_aud = ref["image"].shape[1], ref["audio"].shape[1]
        first = {
            "audio": ours["audio"][:, :n_aud],
            "image": ours["image"].reshape(case.batch, -1, 3)[:, :n_img],
            "label": ours["label"],
        }
        return first, ref
    if case.positions is not None:
        return ours, ref[:, case.positions.to(ref.device)]
    if case.arch == "PerceiverForMaskedLM":  # the reference always decodes max_position_embeddings rows
        return ours, ref[:, : ours.shape[1]]
    return ours, ref


OUR_CHUNKS = 8  # our full-video decode: 8 large query chunks (the result does not depend on the count)


def _calls(
    case: Case, hf: Any, ours: Any, x: dict[str, Any], device: torch.device, graphs: bool
) -> dict[str, Callable[[], Any]]:
    """The reference call and ours, on the same inputs (ours also replayed from a CUDA graph on GPUs)."""
    if case.chunks:  # reference: one decoder chunk (encoder included); ours: the whole video
        c = case.config
        n_img = c["output_shape"][1] * c["output_shape"][2] * c["output_shape"][3] // case.chunks
        n_aud = c["num_frames"] * c["audio_samples_per_frame"] // c["samples_per_patch"] // case.chunks
        points = {"audio": torch.arange(n_aud, device=device), "image": torch.arange(n_img, device=device)}
        calls = {
            "transformers": lambda: hf(**x, subsampled_output_points={**points, "label": None}).logits,
            "perceiver_core": lambda: ours.autoencode(x["inputs"], num_chunks=OUR_CHUNKS),
        }
    else:
        kwargs = {} if case.positions is None else {"positions": case.positions.to(device)}
        # Ours gets the attention mask where a tokenizer leaves it, on the host: an all-valid batch is then
        # recognised without a device sync (transformers syncs on the device to find out the same thing).
        mine = {k: v.cpu() if k == "attention_mask" else v for k, v in x.items()}
        calls = {"transformers": lambda: hf(**x).logits, "perceiver_core": lambda: ours(**mine, **kwargs).logits}
    if graphs and device.type == "cuda":
        calls["perceiver_core+cudagraph"] = cuda_graph(calls["perceiver_core"])
    return calls


def other_residual(ours: Any) -> tuple[str, Any]:
    """A copy of ``ours`` (bf16 or fp16) with the other residual stream than its head's default
    (PerceiverLayer.residual_dtype: fp32 sums for flow, the weights' dtype for the rest), and its name."""
    other = copy.deepcopy(ours)
    other.residual_dtype = None if ours.residual_dtype == torch.float32 else torch.float32
    sums = "fp32" if other.residual_dtype == torch.float32 else str(ours.dtype).removeprefix("torch.")
    return f"+{sums}-residual", other


def storage_floor(case: Case, ours: Any, inputs: dict[str, Any], ref_out: Any, device: torch.device) -> float:
    """The error against transformers fp32 of ``ours`` (a bf16 or fp16 model) computed in fp32 on its own rounded
    parameters and buffers, from ``inputs`` already rounded to that dtype: what storing the weights in the dtype
    costs before any arithmetic (whose own error adds to it, or by chance partly cancels it). A random-weight head
    whose output is small against its activations (flow) can sit near 1e-2 on this alone."""
    exact = copy.deepcopy(ours).float()
    try:
        with torch.inference_mode():
            out = _calls(case, None, exact, inputs, device, False)["perceiver_core"]()
        return _rel(*_comparable(case, out, ref_out))
    finally:
        del exact
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cuda_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Capture ``fn`` (fixed inputs) once; replays skip all launch overhead. Captured lazily on first call."""
    state: dict[str, Any] = {}

    def replay() -> Any:
        if "graph" not in state:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # fill caches and pick kernels outside the capture
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                state["out"] = fn()
            state["graph"] = graph
        state["graph"].replay()
        return state["out"]

    return replay


def run_case(case: Case, device: torch.device, dtypes: list[torch.dtype], args: argparse.Namespace) -> list[Result]:
    import transformers

    hf_config = transformers.PerceiverConfig(**case.config, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)  # initialised on the CPU: the same weights on every device (CUDA's generator differs)
    hf_fp32 = getattr(transformers, case.arch)(hf_config).to(device).eval().requires_grad_(False)
    config = config_from_dict({**hf_config.to_dict(), "architectures": [case.arch]})
    with torch.device("meta"):
        ours_meta = perceiver_core.build_model(config)
    load_state(ours_meta, {k: v for k, v in hf_fp32.state_dict().items()})
    ours_fp32 = ours_meta.to(device).eval().requires_grad_(False)
    inputs = case.make_inputs(case.batch, device)

    def cast(x: Any, dtype: torch.dtype) -> Any:
        if isinstance(x, dict):
            return {k: cast(v, dtype) for k, v in x.items()}
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    results: list[Result] = []
    ref_out: Any = None
    if torch.float32 not in dtypes:  # bf16 error is still measured against transformers in fp32
        try:
            with torch.inference_mode():
                ref_out = _calls(case, hf_fp32, ours_fp32, inputs, device, False)["transformers"]()
        except Exception as exc:
            print(f"{case.name}: no fp32 reference ({type(exc).__name__}: {exc})", flush=True)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        hf = hf_fp32
        if dtype != torch.float32:
            hf = getattr(transformers, case.arch)(hf_config).to(device, dtype).eval().requires_grad_(False)
            hf.load_state_dict(hf_fp32.state_dict())
        # a copy: Module.to converts in place, and a later dtype must start from the fp32 weights, not these
        ours = ours_fp32 if dtype == torch.float32 else copy.deepcopy(ours_fp32).to(dtype)
        floor = None
        if dtype != torch.float32 and ref_out is not None:
            floor = storage_floor(case, ours, cast(cast(inputs, dtype), torch.float32), ref_out, device)
        calls = _calls(case, hf, ours, cast(inputs, dtype), device, args.graphs and dtype != torch.float32)
        if args.residual_ab and dtype != torch.float32:
            suffix, other = other_residual(ours)
            calls["perceiver_core" + suffix] = _calls(case, hf, other, cast(inputs, dtype), device, False)[
                "perceiver_core"
            ]
        with torch.inference_mode():
            medians = time_calls(calls, device, args)
        for impl, call in calls.items():
            res = Result(case.name, impl, name, case.batch)
            try:
                if impl not in medians:
                    with torch.inference_mode():
                        call()  # re-raise the failure for the record
                ms = medians[impl]
                with torch.inference_mode():
                    out = call()
                with torch.no_grad():  # FlopCounterMode does not work under inference_mode
                    plain = calls["perceiver_core"] if impl.endswith("cudagraph") else call
                    counted = count_gflop(plain)
                gflop = None if counted is None else counted / case.batch
                if impl == "transformers" and case.chunks:
                    ms = ms * case.chunks  # encoder re-run for every chunk
                    gflop = None if gflop is None else gflop * case.chunks
                if impl == "transformers" and dtype == torch.float32:
                    ref_out = out
                elif impl.startswith("perceiver_core") and ref_out is not None:
                    res.rel_err_vs_ref_fp32 = _rel(*_comparable(case, out, ref_out))
                    res.storage_floor = floor
                res.ms = ms
                res.per_s = case.batch * 1000 / ms
                res.gflop_per_sample = gflop
                res.tflops = None if gflop is None else gflop * res.per_s / 1000
            except Exception as exc:  # record and carry on: the table shows which variant failed
                res.error = f"{type(exc).__name__}: {str(exc)[:120]}"
            results.append(res)
            print(json.dumps(asdict(res)), flush=True)
        del hf, ours, calls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def markdown(results: list[Result], device_name: str) -> str:
    lines = [
        f"Device: {device_name}; torch {torch.__version__}",
        "",
        "| case | dtype | ours | batch | transformers /s | ours /s | ours ÷ transformers | ours GFLOP/sample "
        "| ours TFLOP/s | % of bf16 peak (ref FLOPs) | rel. err vs ref fp32 (storage floor) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    refs = {(r.case, r.dtype): r for r in results if r.impl == "transformers"}

    def rate(r: Result | None) -> str:
        if r is None:
            return "—"
        return f"{r.per_s:,.1f}" if r.per_s else f"fails ({r.error})"

    for ours in (r for r in results if r.impl != "transformers"):
        ref = refs.get((ours.case, ours.dtype))
        ratio = f"{ours.per_s / ref.per_s:.2f}×" if ref and ours.per_s and ref.per_s else "—"
        frac = "—"
        if ours.per_s and ref and ref.gflop_per_sample and not device_name.startswith("CPU"):
            frac = f"{100 * ref.gflop_per_sample * ours.per_s / 1000 / BF16_PEAK_TFLOPS:.0f}%"
        err = f"{ours.rel_err_vs_ref_fp32:.1e}" if ours.rel_err_vs_ref_fp32 is not None else "—"
        if ours.storage_floor is not None:
            err += f" ({ours.storage_floor:.1e})"
        gf = f"{ours.gflop_per_sample:,.0f}" if ours.gflop_per_sample else "—"
        tf = f"{ours.tflops:,.1f}" if ours.tflops else "—"
        variant = ours.impl.removeprefix("perceiver_core").lstrip("+") or "eager"
        lines.append(
            f"| {ours.case} | {ours.dtype} | {variant} | {ours.batch} | {rate(ref)} | {rate(ours)} | {ratio} "
            f"| {gf} | {tf} | {frac} | {err} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16")
    parser.add_argument("--only", default=None, help="substring filter on case names")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="max seconds of timed reps per variant")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--graphs", action="store_true", help="also time ours replayed from a CUDA graph")
    parser.add_argument("--smoke", action="store_true", help="shrink every config (checks the script, not speed)")
    parser.add_argument(
        "--residual-ab", action="store_true", help="in bf16/fp16, also time ours with the other residual stream"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = CPU_CASES if args.suite == "cpu" else GPU_CASES
    if args.only:
        cases = [c for c in cases if any(part in c.name for part in args.only.split(","))]
    if args.smoke:
        cases = [smoke(c) for c in cases]
    default = "float32" if args.suite == "cpu" else "float32,bfloat16"
    dtypes = [getattr(torch, d) for d in (args.dtypes or default).split(",")]
    results: list[Result] = []
    for case in cases:
        results += run_case(case, device, dtypes, args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    table = markdown(results, name)
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps({"device": name, "torch": torch.__version__, "results": [asdict(r) for r in results]}, indent=1)
        )
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()

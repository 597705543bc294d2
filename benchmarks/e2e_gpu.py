"""End to end over HTTP on a GPU: /v1/classify with JPEG uploads against the published image-learned
config (random weights), next to the model-level throughput of the same checkpoint in the same run.

    python benchmarks/e2e_gpu.py --out benchmarks/results/gpu --images small,hd,phone,phone-raw

Reports, for each upload size (451x300, 1920x1080 and 4032x3024 JPEGs made from the sample photos, see
benchmarks/photos.py) and each server config: model-level img/s at the serving batch size, HTTP
throughput at saturation (closed loop), and p50/p99 at half that rate (open-loop Poisson), against the
targets: HTTP >= 85% of model level (>= 50% for 4032x3024); p99 at half load <= 3x the batch forward.
A size may carry flags: ``-raw`` sends the JPEG as the whole request body instead of a multipart form,
``-graphs`` runs the server with PERCEIVER_CUDA_GRAPHS=true, ``-eager`` with it false, ``-serial`` with
PERCEIVER_PREPARE_AHEAD=false (each batch's JPEGs decoded in turn with the forward passes, not while the batch
before runs), ``-cpujpeg`` with
BENCH_CPU_JPEG_MIN_PIXELS=8000000 (benchmarks/knobs.py: 12 MP photos decoded at reduced scale on the CPU, not
by nvJPEG), and ``-hybridK`` with that and BENCH_CPU_JPEG_SLOTS=K (at most K such photos a process decoded on
the CPU at once, the others by nvJPEG). The knobs reach the front-end and model processes too.
Under saturation it also polls /v1/models every 0.25 s: the queue depth and admission's per-unit estimates by
batch size class (admission-N.json, and their medians in e2e.md), which say why a setting's batches were small,
and how busy the host's cores and the model process's threads were over that time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perceiver_core  # noqa: E402
from benchmarks.models import PUBLISHED  # noqa: E402
from benchmarks.photos import parse_size  # noqa: E402
from benchmarks.serve_load import spawn  # noqa: E402
from perceiver_core.checkpoint import config_from_dict  # noqa: E402

BATCH = 64


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_level(path: Path, device: str, dtype: torch.dtype) -> float:
    """img/s of the checkpoint at batch BATCH (median of timed forwards)."""
    model = perceiver_core.from_pretrained(path, device=device, dtype=dtype)
    x = torch.randn(BATCH, 3, 224, 224, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        for i in range(13):
            _sync()
            t0 = time.perf_counter()
            model(inputs=x)
            _sync()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    times.sort()
    return BATCH / times[len(times) // 2]


def load(url: str, extra: list[str], out: Path) -> list[dict]:  # type: ignore[type-arg]
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "serve_load.py"),
        "--url",
        url,
        "--task",
        "classify",
        "--processes",
        "6",
        "--json",
        str(out),
        *extra,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    # serve_load writes one row per load level
    return json.loads(out.read_text())


class Admission(threading.Thread):
    """What admission decided from while the load ran: the model's queue depth, batches running and per-unit
    estimates by size class (/v1/models, its ``batching``), every ``every`` seconds, until stopped; and the CPU
    the host and the model process used over that time (``CpuSnapshot``, at the start and at the end)."""

    def __init__(self, url: str, model_pid: int | None = None, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url, self.every, self.model_pid = url, every, model_pid
        self.samples: list[dict[str, Any]] = []
        self.done = threading.Event()
        self.cpu: list[CpuSnapshot] = []  # at the start and at the end

    def run(self) -> None:
        self.cpu.append(CpuSnapshot.take(self.model_pid))
        try:
            self._poll()
        finally:
            self.cpu.append(CpuSnapshot.take(self.model_pid))

    def _poll(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self.done.wait(self.every):
                try:
                    batching = client.get("/v1/models").json()["models"][0]["batching"]
                except (httpx.HTTPError, ValueError, LookupError):
                    continue
                self.samples.append(
                    {
                        "t": time.monotonic(),
                        "queue_depth": batching["queue_depth"],
                        "running": batching["running"],
                        "per_unit_ms": batching.get("admission_per_item_ms", {}),
                    }
                )

    def summary(self) -> dict[str, object]:
        """Medians over the samples: queue depth, and each size class's per-unit estimate."""
        cpu = self.cpu[0].between(self.cpu[1]) if len(self.cpu) == 2 else {}
        if not self.samples:
            return {"samples": 0, **cpu}
        classes = sorted({k for s in self.samples for k in s["per_unit_ms"]}, key=int)
        return {
            "samples": len(self.samples),
            "queue_depth_p50": statistics.median(s["queue_depth"] for s in self.samples),
            "queue_depth_max": max(s["queue_depth"] for s in self.samples),
            "per_unit_ms_p50": {
                k: round(statistics.median(s["per_unit_ms"][k] for s in self.samples if k in s["per_unit_ms"]), 3)
                for k in classes
            },
            **cpu,
        }


@dataclass
class CpuSnapshot:
    """The host's CPU time (/proc/stat) and each thread's of the model process (/proc/PID/task), at one moment:
    two of them say whether the host's cores were all busy under the load, and whether one of the model
    process's threads (event loop, prepare stage, forward pass) used a whole core. A thread that ended between
    the two is not counted. Linux; empty elsewhere."""

    at: float
    busy: float  # the host's jiffies: all but idle and iowait
    total: float
    threads: dict[int, float]  # the model process's threads: tid → user + system jiffies

    @classmethod
    def take(cls, pid: int | None) -> CpuSnapshot:
        busy = total = 0.0
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            total, busy = sum(fields), sum(fields) - fields[3] - fields[4]
        threads: dict[int, float] = {}
        for stat in Path(f"/proc/{pid}/task").glob("*/stat") if pid else ():
            with contextlib.suppress(OSError, ValueError, IndexError):
                after = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, ..., utime (12th), stime
                threads[int(stat.parent.name)] = float(after[11]) + float(after[12])
        return cls(time.monotonic(), busy, total, threads)

    def between(self, later: CpuSnapshot) -> dict[str, object]:
        """The host's busy share and the model process's cores used (its three busiest threads too)."""
        wall, hz = later.at - self.at, os.sysconf("SC_CLK_TCK")
        if wall <= 0 or later.total <= self.total:
            return {}
        used = sorted(((later.threads[t] - self.threads.get(t, 0.0)) / hz / wall for t in later.threads), reverse=True)
        return {
            "host_busy": round((later.busy - self.busy) / (later.total - self.total), 3),
            "model_process_cores": round(sum(used), 2),
            "model_busiest_threads_cores": [round(u, 2) for u in used[:3]],
        }


def serve(
    path: Path, workers: int, decoders: int, log: Path, device: str, extra: dict[str, str], fronts: int = 0
) -> tuple[subprocess.Popen[bytes], str]:
    return spawn(
        {
            **extra,
            "PERCEIVER_API_PROCESSES": str(fronts),  # 0 unless asked: auto would pick front ends on a GPU host
            **({"PERCEIVER_LOG_LEVEL": "INFO"} if fronts else {}),  # the model process logs its pid
            "PERCEIVER_DEVICE": device,
            "PERCEIVER_MODELS": json.dumps([{"task": "classify", "variant": "learned", "source": str(path)}]),
            "PERCEIVER_MAX_BATCH_SIZE": str(BATCH),
            "PERCEIVER_MAX_DELAY_MS": "5",
            "PERCEIVER_MAX_QUEUE_SIZE": "4096",
            "PERCEIVER_DECODE_WORKERS": str(max(2, 12 // workers)),
            "PERCEIVER_WORKERS": str(workers),
            "PERCEIVER_DECODE_PROCESSES": str(decoders),
        },
        log,
    )


def front_end_pid(server: int, model: int) -> int | None:
    """One front-end process of the server ``server`` (PERCEIVER_API_PROCESSES >= 1): a child it started with
    multiprocessing's spawn that is not the model process. A direct child, so not a decode-pool worker (those are
    the children of a front end or of the model process). Reads /proc (Linux)."""
    for stat in sorted(Path("/proc").glob("[0-9]*/stat"), key=lambda p: int(p.parent.name)):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid, ...
            pid = int(stat.parent.name)
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == server and pid != model and b"spawn_main" in cmdline:
            return pid
    return None


def summarize_pyspy(raw: Path, out: Path) -> None:
    """Samples per thread, and the hottest functions (inclusive) of the event-loop thread."""
    import collections

    if not raw.exists():
        out.write_text("no py-spy samples\n")
        return
    threads: collections.Counter[str] = collections.Counter()
    main: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total_main = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        thread = frames[0].split(":")[-1].strip()
        threads[thread.rstrip("_0123456789")] += n
        leaves[frames[-1].split(" (")[0]] += n
        if "MainThread" in frames[0]:
            total_main += n
            for name in {f.split(" (")[0] for f in frames[1:]}:
                main[name] += n
    lines = ["samples per thread group:", *(f"  {k}: {v}" for k, v in threads.most_common())]
    lines += ["hottest leaf frames (all threads):", *(f"  {v:6d} {k}" for k, v in leaves.most_common(20))]
    lines += [f"event-loop thread, inclusive ({total_main} samples):"]
    lines += [f"  {100 * v / max(1, total_main):5.1f}% {k}" for k, v in main.most_common(40)]
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--clients", type=int, default=384)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script only")
    parser.add_argument(
        "--configs",
        type=lambda s: [(*(int(v) for v in c.split("x")), 0)[:3] for c in s.split(",")],
        default=[(1, 0, 0), (1, 8, 0)],
        help="server configs as WORKERSxDECODE_PROCESSES[xFRONT_ENDS], e.g. 1x0,1x8,1x0x4 (FRONT_ENDS: "
        "PERCEIVER_API_PROCESSES; py-spy then samples the model process and one front end)",
    )
    parser.add_argument(
        "--pyspy",
        type=float,
        default=0,
        help="seconds of py-spy sampling of each server --pyspy-on names (its model process and a front end)",
    )
    parser.add_argument(
        "--pyspy-on",
        default="",
        help="the upload sizes whose servers are sampled, comma-separated (default: the first)",
    )
    parser.add_argument("--pyspy-gil", action="store_true", help="sample only threads holding the GIL (py-spy --gil)")
    parser.add_argument("--images", default="small,hd,phone", help="upload sizes: small, hd, phone or WxH")
    args = parser.parse_args()
    global BATCH
    device, dtype, published = "cuda", torch.bfloat16, dict(PUBLISHED["image-learned"])
    if args.smoke:
        BATCH, device, dtype = 4, "cpu", torch.float32
        published.update(num_latents=16, d_latents=64, num_blocks=1, num_self_attends_per_block=1)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(tempfile.mkdtemp()) / "vision-perceiver-learned-random"
    config = config_from_dict({**published, "architectures": ["PerceiverForImageClassificationLearned"]})
    torch.manual_seed(0)
    perceiver_core.save_pretrained(perceiver_core.build_model(config), ckpt)
    rows = []
    model_rate = model_level(ckpt, device, dtype)
    runs = [(image, cfg) for image in args.images.split(",") for cfg in args.configs]
    for n, (spec, (workers, decoders, fronts)) in enumerate(runs):
        image, *flags = spec.split("-")
        raw, graphs, eager, cpujpeg = ("raw" in flags, "graphs" in flags, "eager" in flags, "cpujpeg" in flags)
        serial = "serial" in flags
        hybrid = next((int(f[len("hybrid") :]) for f in flags if f.startswith("hybrid")), 0)
        label = f"{workers} process" + ("es" if workers > 1 else "")
        label += f", decode in {decoders} processes" if decoders else ", decode in threads"
        label += f", {fronts} front-end processes" if fronts else ""
        label += ", CUDA graphs" if graphs else ", eager" if eager else ""
        label += ", 12 MP JPEGs decoded on the CPU" if cpujpeg else ""
        label += f", 12 MP JPEGs on the CPU in up to {hybrid} threads a process, the rest by nvJPEG" if hybrid else ""
        label += ", decoded in turn with the forward" if serial else ", prepared ahead"
        extra = {"PERCEIVER_CUDA_GRAPHS": "true"} if graphs else {"PERCEIVER_CUDA_GRAPHS": "false"} if eager else {}
        if serial:
            extra["PERCEIVER_PREPARE_AHEAD"] = "false"
        if cpujpeg or hybrid:
            extra["BENCH_CPU_JPEG_MIN_PIXELS"] = "8000000"
        if hybrid:
            extra["BENCH_CPU_JPEG_SLOTS"] = str(hybrid)
        log = args.out / f"server-{n}.log"
        proc, url = serve(ckpt, workers, decoders, log, device, extra, fronts)
        target = proc.pid
        if fronts:
            found = re.search(r"model process (\d+) ready", log.read_text())
            target = int(found[1]) if found else proc.pid
        try:
            spies: list[tuple[subprocess.Popen[bytes], str, str]] = []  # (py-spy, file tag, what it samples)
            if args.pyspy and (spec in args.pyspy_on.split(",") or (not args.pyspy_on and n == 0)):
                sampled = [(target, f"{n}", "the model process" if fronts else "the server")]
                front = front_end_pid(proc.pid, target) if fronts else None
                if front is not None:  # one front end too: what holds the uploads back before the model process
                    sampled.append((front, f"{n}-front", "one front-end process"))
                for pid, tag, what in sampled:
                    spy = subprocess.Popen(
                        [
                            "py-spy",
                            "record",
                            "-p",
                            str(pid),
                            "-d",
                            str(int(args.pyspy)),
                            "-f",
                            "raw",
                            "--threads",
                            "--nonblocking",
                            *(["--gil"] if args.pyspy_gil else []),
                            "-o",
                            str(args.out / f"pyspy-{tag}.txt"),
                        ],
                        stdout=(args.out / f"pyspy-{tag}.log").open("wb"),
                        stderr=subprocess.STDOUT,
                    )
                    spies.append((spy, tag, what))
            common = ["--duration", str(args.duration), "--warmup", "3", "--image", image, *(["--raw"] if raw else [])]
            # why a setting's batches were small (run 12: 4 front ends, prepared ahead)
            watch = Admission(url, target)
            watch.start()
            try:
                sat = load(url, ["--concurrency", str(args.clients), *common], args.out / f"sat-{n}.json")[0]
            finally:
                watch.done.set()
                watch.join(timeout=10)
            (args.out / f"admission-{n}.json").write_text(json.dumps(watch.samples))
            for spy, tag, what in spies:
                spy.wait(timeout=60)
                summary = args.out / f"pyspy-summary-{tag}.txt"
                summarize_pyspy(args.out / f"pyspy-{tag}.txt", summary)
                summary.write_text(f"{label}, {spec}: {what}\n" + summary.read_text())
            half = load(url, ["--rate", f"{sat['throughput'] / 2:.0f}", *common], args.out / f"half-{n}.json")[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        forward_ms = BATCH / model_rate * 1000
        width, height = parse_size(image)
        row = {
            "upload": f"{width}x{height}" + (", raw body" if raw else ""),
            "serving": label,
            "model_img_s": model_rate,
            "http_img_s": sat["throughput"],
            "http_vs_model": sat["throughput"] / model_rate,
            "sat_p99_ms": sat["p99_ms"],
            "sat_mean_batch": sat["mean_batch"],
            "errors": sat["errors"] + half["errors"],
            "rejected_429": sat["rejected_429"] + half["rejected_429"],
            "error_statuses": [sat["error_statuses"], half["error_statuses"]],
            "half_rate": half["rate"],
            "half_p50_ms": half["p50_ms"],
            "half_p99_ms": half["p99_ms"],
            "batch_forward_ms": forward_ms,
            "p99_vs_forward": half["p99_ms"] / forward_ms,
            "admission": watch.summary(),  # under saturation: queue depth and per-unit estimates (medians)
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [
        f"Device: {name}; torch {torch.__version__}; image-learned (published config, "
        f"random weights), bf16, batch {BATCH}, JPEG uploads made from the sample photos",
        "",
        "| upload | serving | model img/s | HTTP img/s (saturated) | HTTP ÷ model | mean batch | half-load rate "
        "| p50 ms | p99 ms | batch forward ms | p99 ÷ forward | errors | 429s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['upload']} | {r['serving']} | {r['model_img_s']:,.0f} | {r['http_img_s']:,.0f} "
            f"| {100 * r['http_vs_model']:.0f}% "
            f"| {r['sat_mean_batch']:.1f} | {r['half_rate']:,.0f}/s | {r['half_p50_ms']:.1f} | {r['half_p99_ms']:.1f} "
            f"| {r['batch_forward_ms']:.1f} | {r['p99_vs_forward']:.2f}× | {r['errors']} | {r['rejected_429']} |"
        )
    lines += ["", "Under saturation, what admission decided from (/v1/models every 0.25 s, medians):", ""]
    for r in rows:
        a = r["admission"]
        if a.get("samples"):
            per_unit = ", ".join(f"{k}: {v} ms" for k, v in a["per_unit_ms_p50"].items())
            lines.append(
                f"- {r['upload']}, {r['serving']}: queue depth {a['queue_depth_p50']:g} (max {a['queue_depth_max']}), "
                f"per-unit estimate by batch size class {per_unit} ({a['samples']} samples)"
            )
        if "host_busy" in a:
            lines.append(
                ("  - CPU: " if a.get("samples") else f"- {r['upload']}, {r['serving']}: CPU: ")
                + f"the host's cores {100 * a['host_busy']:.0f}% busy; the model process used "
                f"{a['model_process_cores']} cores, its busiest threads {a['model_busiest_threads_cores']}"
            )
    table = "\n".join(lines)
    print(table)
    (args.out / "e2e.md").write_text(table + "\n")
    (args.out / "e2e.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

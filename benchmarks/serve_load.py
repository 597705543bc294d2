"""Closed-loop load test against a live server: throughput, latency percentiles, batch sizes, errors.

    # start servers itself and compare batching with PERCEIVER_MAX_BATCH_SIZE=1 (the CPU figure):
    python benchmarks/serve_load.py --spawn --compare-batching --task classify-text --concurrency 1,8,32
    # or load a server that is already running:
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --task classify --concurrency 64

Each of N clients sends a request, waits for the answer, and sends the next, for --duration seconds per
concurrency level (after a short warm-up). Only loopback addresses are used when --spawn is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
CAT = (ROOT / "tests" / "media" / "cat.jpg").read_bytes()
TEXT = "Perceiver IO reads raw UTF-8 bytes, so this sentence is about ninety bytes long in total."


@dataclass
class Level:
    label: str
    concurrency: int
    requests: int
    seconds: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float
    errors: int
    rejected_429: int


def request_args(task: str) -> dict[str, Any]:
    if task == "classify":
        return {"url": "/v1/classify", "files": {"image": ("cat.jpg", CAT, "image/jpeg")}}
    if task == "fill-mask":
        return {"url": "/v1/fill-mask", "json": {"text": TEXT[:40] + "[MASK]" * 4 + TEXT[44:], "top_k": 3}}
    return {"url": "/v1/classify-text", "json": {"text": TEXT, "top_k": 2}}


async def run_level(base: str, task: str, concurrency: int, duration: float, warmup: float, label: str) -> Level:
    latencies: list[float] = []
    batches: list[int] = []
    errors = rejected = 0
    args = request_args(task)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        start = time.monotonic()
        measure_from = start + warmup
        stop = measure_from + duration

        async def worker() -> None:
            nonlocal errors, rejected
            while time.monotonic() < stop:
                t0 = time.monotonic()
                try:
                    r = await client.post(**args)
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                t1 = time.monotonic()
                if t0 < measure_from:
                    continue
                if status == 200:
                    latencies.append(t1 - t0)
                    batches.append(int(r.headers.get("x-batch-size", "1")))
                elif status == 429:
                    rejected += 1
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [0.0] * 99
    return Level(
        label,
        concurrency,
        len(latencies),
        duration,
        len(latencies) / duration,
        q[49] * 1000,
        q[89] * 1000,
        q[98] * 1000,
        statistics.fmean(batches) if batches else 0.0,
        errors,
        rejected,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(task: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    full = {
        **os.environ,
        "PERCEIVER_HOST": "127.0.0.1",
        "PERCEIVER_PORT": str(port),
        "PERCEIVER_DEMO_TASKS": json.dumps([task]),
        "PERCEIVER_LOG_LEVEL": "WARNING",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.main"], cwd=ROOT, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("server not ready")


def sweep(url: str, args: argparse.Namespace, label: str) -> list[Level]:
    levels = []
    for c in args.concurrency:
        level = asyncio.run(run_level(url, args.task, c, args.duration, args.warmup, label))
        print(json.dumps(asdict(level)), flush=True)
        levels.append(level)
    return levels


def table(levels: list[Level]) -> str:
    rows = [
        "| config | clients | req/s | p50 ms | p90 ms | p99 ms | mean batch | errors | 429s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        rows.append(
            f"| {lv.label} | {lv.concurrency} | {lv.throughput:.1f} | {lv.p50_ms:.1f} | {lv.p90_ms:.1f} "
            f"| {lv.p99_ms:.1f} | {lv.mean_batch:.1f} | {lv.errors} | {lv.rejected_429} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--spawn", action="store_true", help="start demo servers on loopback")
    parser.add_argument("--compare-batching", action="store_true", help="also run with PERCEIVER_MAX_BATCH_SIZE=1")
    parser.add_argument("--task", default="classify-text", choices=["classify-text", "classify", "fill-mask"])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--max-batch-size", default="32")
    parser.add_argument("--max-delay-ms", default="5")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    levels: list[Level] = []
    if args.spawn:
        configs = [
            ("batched", {"PERCEIVER_MAX_BATCH_SIZE": args.max_batch_size, "PERCEIVER_MAX_DELAY_MS": args.max_delay_ms})
        ]
        if args.compare_batching:
            configs.append(("max_batch_size=1", {"PERCEIVER_MAX_BATCH_SIZE": "1", "PERCEIVER_MAX_DELAY_MS": "0"}))
        for label, env in configs:
            proc, url = spawn(args.task, {**env, "PERCEIVER_MAX_QUEUE_SIZE": "1024"})
            try:
                levels += sweep(url, args, label)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
    elif args.url:
        levels = sweep(args.url, args, "server")
    else:
        parser.error("give --url or --spawn")
    out = table(levels)
    by = {(lv.label, lv.concurrency): lv for lv in levels}
    top = max(args.concurrency)
    if ("batched", top) in by and ("max_batch_size=1", top) in by:
        ratio = by[("batched", top)].throughput / max(by[("max_batch_size=1", top)].throughput, 1e-9)
        out += f"\n\nThroughput at {top} clients, batched vs max_batch_size=1: {ratio:.2f}x"
    print(out)
    if args.json:
        args.json.write_text(json.dumps([asdict(lv) for lv in levels], indent=1))
    if args.markdown:
        args.markdown.write_text(out + "\n")


if __name__ == "__main__":
    main()

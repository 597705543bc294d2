"""Closed-loop load test against a live server: throughput, latency percentiles, batch sizes, errors.

    # start servers itself and compare batching with PERCEIVER_MAX_BATCH_SIZE=1 (the CPU figure):
    python benchmarks/serve_load.py --spawn --compare-batching --task classify-text --concurrency 1,8,32
    # 12 MP phone photos to the demo conv classifier, scaled decoding against the reference, one run:
    python benchmarks/serve_load.py --spawn --task classify --classify-model conv --image phone \
        --variant auto:PERCEIVER_IMAGE_DECODER=auto --variant exact:PERCEIVER_IMAGE_DECODER=exact --concurrency 8
    # or load a server that is already running:
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --task classify --concurrency 64

Each of N clients sends a request, waits for the answer, and sends the next, for --duration seconds per
concurrency level (after a short warm-up). Only loopback addresses are used when --spawn is given.
``--variant LABEL:KEY=VALUE,...`` (repeatable) spawns one server per variant with those settings, and
``--repeat N`` runs the whole set of variants N times, interleaved, so drift affects them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.photos import parse_size, photo_jpeg  # noqa: E402

CAT = (ROOT / "tests" / "media" / "cat.jpg").read_bytes()
TEXT = "Perceiver IO reads raw UTF-8 bytes, so this sentence is about ninety bytes long in total."


@dataclass
class Level:
    label: str
    concurrency: int
    rate: float
    requests: int
    seconds: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float
    mean_inference_ms: float
    errors: int
    rejected_429: int
    error_statuses: dict[int, int]


def request_bytes(task: str, host: str, image: str = "", classify_model: str = "", raw: bool = False) -> bytes:
    """One complete HTTP/1.1 request (keep-alive), built once and sent many times. ``raw``: the JPEG is
    the whole body (content-type image/jpeg) instead of a multipart form."""
    if task == "classify" and raw:
        body = photo_jpeg(*parse_size(image)) if image else CAT
        query = f"?model={classify_model}" if classify_model else ""
        path, ctype = f"/v1/classify{query}", "image/jpeg"
    elif task == "classify":
        boundary = "perceiverbench"
        photo = photo_jpeg(*parse_size(image)) if image else CAT
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + photo
            + f"\r\n--{boundary}--\r\n".encode()
        )
        query = f"?model={classify_model}" if classify_model else ""
        path, ctype = f"/v1/classify{query}", f"multipart/form-data; boundary={boundary}"
    else:
        text = TEXT[:40] + "[MASK]" * 4 + TEXT[44:] if task == "fill-mask" else TEXT
        body = json.dumps({"text": text, "top_k": 2}).encode()
        path, ctype = f"/v1/{task}", "application/json"
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class Connection:
    """A minimal keep-alive HTTP/1.1 client: far lighter than a general client library, so the load
    generator does not become the bottleneck on small machines (like wrk, but scriptable here)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> tuple[int, dict[str, str]]:
        reused = self.writer is not None
        status, headers = await self._send_once(request)
        if status == 0 and reused:  # the server closed an idle keep-alive connection: retry on a fresh one
            status, headers = await self._send_once(request)
        return status, headers

    async def _send_once(self, request: bytes) -> tuple[int, dict[str, str]]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(request)
            await self.writer.drain()
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            await self.reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection", "").lower() == "close":
                self.close()
            return status, headers
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            return 0, {}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Samples:
    latencies: list[float]
    batches: list[int]
    inference_ms: list[float]
    errors: int = 0
    rejected: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


async def _load(
    base: str,
    task: str,
    concurrency: int,
    rate: float,
    duration: float,
    warmup: float,
    image: str,
    variant: str,
    raw: bool = False,
) -> Samples:
    """Closed loop (``concurrency`` clients back to back) or, with ``rate`` > 0, open-loop Poisson arrivals."""
    out = Samples([], [], [])
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = request_bytes(task, host, image, variant, raw)
    idle: list[Connection] = []
    start = time.monotonic()
    measure_from, stop = start + warmup, start + warmup + duration

    async def one() -> None:
        conn = idle.pop() if idle else Connection(host, port)
        t0 = time.monotonic()
        status, headers = await conn.send(request)
        idle.append(conn)
        if t0 < measure_from or t0 >= stop:
            return
        if status == 200:
            out.latencies.append(time.monotonic() - t0)
            out.batches.append(int(headers.get("x-batch-size", "1")))
            out.inference_ms.append(float(headers.get("x-inference-time-ms", "0")))
        elif status == 429:
            out.rejected += 1
        else:
            out.errors += 1
            out.statuses[status] = out.statuses.get(status, 0) + 1  # 0: connection error

    if rate > 0:
        rng = random.Random(os.getpid())
        pending: set[asyncio.Task[None]] = set()
        next_at = time.monotonic()
        while next_at < stop:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            job = asyncio.create_task(one())
            pending.add(job)
            job.add_done_callback(pending.discard)
            next_at += rng.expovariate(rate)
        if pending:
            await asyncio.gather(*pending)
    else:

        async def worker() -> None:
            while time.monotonic() < stop:
                await one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    for conn in idle:
        conn.close()
    return out


def _load_process(job: tuple[str, str, int, float, float, float, str, str, bool]) -> Samples:
    return asyncio.run(_load(*job))


def run_level(base: str, args: argparse.Namespace, concurrency: int, rate: float, label: str) -> Level:
    """One load level, spread over ``args.processes`` client processes (one Python process tops out early)."""
    procs = max(1, args.processes)
    share = max(1, concurrency // procs)
    jobs = [
        (base, args.task, share, rate / procs, args.duration, args.warmup, args.image, args.classify_model, args.raw)
    ] * procs
    if procs == 1:
        parts = [_load_process(jobs[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            parts = pool.map(_load_process, jobs)
    lat = [x for p in parts for x in p.latencies]
    batches = [x for p in parts for x in p.batches]
    inference = [x for p in parts for x in p.inference_ms]
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [0.0] * 99
    return Level(
        label,
        concurrency if rate <= 0 else 0,
        rate,
        len(lat),
        args.duration,
        len(lat) / args.duration,
        q[49] * 1000,
        q[89] * 1000,
        q[98] * 1000,
        statistics.fmean(batches) if batches else 0.0,
        statistics.fmean(inference) if inference else 0.0,
        sum(p.errors for p in parts),
        sum(p.rejected for p in parts),
        {s: sum(p.statuses.get(s, 0) for p in parts) for s in {s for p in parts for s in p.statuses}},
    )


_HANDED_OUT: set[int] = set()  # ports free_port returned in this process: never twice, even before they are bound


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port the kernel picked for ``bind(0)`` can be handed
    to any client socket's connect before the server binds it (a busy-CI run lost a gRPC bind so), while nothing
    takes a port below that range unless asked for it by number."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; elsewhere the range may differ, and bind() below still checks
    start = max(1024, low - 12000)
    for _ in range(200 if start < low else 0):
        port = random.randrange(start, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # no room below the range: the kernel's pick, with the race above
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _HANDED_OUT.add(port)
    return port


def spawn(env: dict[str, str], log: Path | None = None, root: Path = ROOT) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m app.cli`` of the tree at ``root`` (default: this one) on a free loopback port with ``env``
    (``python -m benchmarks.knobs`` where ``env`` sets one of its measuring knobs); returns once /readyz
    answers 200."""
    port = free_port()
    full = {
        **os.environ,
        "PERCEIVER_HOST": "127.0.0.1",
        "PERCEIVER_PORT": str(port),
        "PERCEIVER_LOG_LEVEL": "WARNING",
        "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}",
        **env,
    }
    with open(log or os.devnull, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.knobs" if any(k.startswith("BENCH_") for k in env) else "app.cli"],
            cwd=root,
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
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
            raise RuntimeError(f"server exited during start-up{': ' + log.read_text()[-3000:] if log else ''}")
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("server not ready")


def sweep(url: str, args: argparse.Namespace, label: str) -> list[Level]:
    levels = []
    loads = [(0, r) for r in args.rate] if args.rate else [(c, 0.0) for c in args.concurrency]
    for concurrency, rate in loads:
        level = run_level(url, args, concurrency, rate, label)
        print(json.dumps(asdict(level)), flush=True)
        levels.append(level)
    return levels


def table(levels: list[Level]) -> str:
    rows = [
        "| config | load | req/s | p50 ms | p90 ms | p99 ms | mean batch | batch forward ms | errors | 429s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        load = f"{lv.concurrency} clients" if lv.concurrency else f"Poisson {lv.rate:.0f}/s"
        rows.append(
            f"| {lv.label} | {load} | {lv.throughput:.1f} | {lv.p50_ms:.1f} | {lv.p90_ms:.1f} | {lv.p99_ms:.1f} "
            f"| {lv.mean_batch:.1f} | {lv.mean_inference_ms:.1f} | {lv.errors} | {lv.rejected_429} |"
        )
    return "\n".join(rows)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    label, _, pairs = text.partition(":")
    env = dict(pair.split("=", 1) for pair in pairs.split(",") if pair)
    return label, env


def ratios(levels: list[Level], args: argparse.Namespace) -> str:
    """Throughput of each variant over the last one's, per repeat, at the highest load."""
    top = max(args.concurrency) if not args.rate else 0
    at_top = [lv for lv in levels if lv.concurrency == top]
    labels = list(dict.fromkeys(lv.label for lv in at_top))
    if len(labels) < 2:
        return ""
    base = labels[-1]
    lines = ["", ""]
    for label in labels[:-1]:
        mine = [lv.throughput for lv in at_top if lv.label == label]
        theirs = [lv.throughput for lv in at_top if lv.label == base]
        each = ", ".join(f"{a / max(b, 1e-9):.2f}x" for a, b in zip(mine, theirs, strict=False))
        lines.append(f"Throughput at {top} clients, {label} vs {base}: {each}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--spawn", action="store_true", help="start demo servers on loopback")
    parser.add_argument("--compare-batching", action="store_true", help="also run with PERCEIVER_MAX_BATCH_SIZE=1")
    parser.add_argument("--task", default="classify-text", choices=["classify-text", "classify", "fill-mask"])
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument(
        "--rate",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="open-loop Poisson arrival rates (req/s) instead of closed-loop clients",
    )
    parser.add_argument("--processes", type=int, default=1, help="client processes generating the load")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--max-batch-size", default="32")
    parser.add_argument("--max-delay-ms", default="5")
    parser.add_argument("--image", default="", help="classify: upload a photo mosaic of this size (phone, hd, WxH)")
    parser.add_argument("--raw", action="store_true", help="classify: send the JPEG as the whole body, not a form")
    parser.add_argument("--classify-model", default="", help="classify: the variant to ask for (learned, conv, ...)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="LABEL:KEY=VALUE,... spawn a server per variant with these settings (repeatable); ROOT=DIR serves "
        "the tree at DIR (another commit, checked out with git worktree) instead of this one",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run every variant this many times, interleaved")
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
        if args.variant:
            configs = [parse_variant(v) for v in args.variant]
        for label, env in [c for _ in range(args.repeat) for c in configs]:
            demo = {"PERCEIVER_DEMO_TASKS": json.dumps([args.task]), "PERCEIVER_MAX_QUEUE_SIZE": "1024"}
            env = dict(env)
            root = Path(env.pop("ROOT", str(ROOT))).resolve()  # ROOT=DIR: the server of another tree (old main)
            proc, url = spawn({**env, **demo}, root=root)
            try:
                levels += sweep(url, args, label)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
    elif args.url:
        levels = sweep(args.url, args, "server")
    else:
        parser.error("give --url or --spawn")
    out = table(levels) + ratios(levels, args)
    print(out)
    if args.json:
        args.json.write_text(json.dumps([asdict(lv) for lv in levels], indent=1))
    if args.markdown:
        args.markdown.write_text(out + "\n")


if __name__ == "__main__":
    main()

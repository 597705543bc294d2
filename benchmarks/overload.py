"""Goodput under overload: open-loop arrivals at 3x and 30x the server's measured capacity.

    python benchmarks/overload.py --duration 120 --markdown docs/overload.md   # the long run

Spawns a demo classify server on loopback (PERCEIVER_REQUEST_TIMEOUT_S=10, 320x240 JPEG uploads, the
learned head), measures its capacity with closed-loop clients, then sends Poisson arrivals at each
overload factor. Reports goodput (200s answered within the deadline, per second, as a share of
capacity), how the excess was refused (429 latency and Retry-After), 504s, other errors, and the
server's RSS over the run (the supervisor's alone with front ends). Every request gets an answer or counts
as lost.

    # clients with deadlines of their own: 1 s each (a 504 is a request admitted and not finished in time),
    # on a machine that is busy now and then: two busy loops, 3 s on and 3 s off, over the whole run
    python benchmarks/overload.py --deadline-ms 1000 --factors 30 --duration 20 --busy 2:3:3

    # front ends' decodes at the door (docs/front-ends.md): the example clip, 2 front ends, against a commit
    python benchmarks/overload.py --task autoencode --env PERCEIVER_API_PROCESSES=2 --factors 1,30 \
        --duration 15 --root /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import Connection, spawn  # noqa: E402

TIMEOUT_S = 10.0


DEADLINE_MS: int | None = None  # --deadline-ms: each request's own x-request-timeout-ms (the server's is TIMEOUT_S)
TASK = "classify"  # --task: classify (320x240 JPEG) or autoencode (examples/clip.mp4)


def upload_request(host: str) -> bytes:
    """POST /v1/TASK with its upload (the cat photo at 320x240, JPEG; or the example clip), as one keep-alive
    HTTP/1.1 request."""
    from PIL import Image

    if TASK == "autoencode":
        field, name, kind, data = "video", "c.mp4", "video/mp4", (ROOT / "examples" / "clip.mp4").read_bytes()
    else:
        buffer = io.BytesIO()
        Image.open(ROOT / "tests" / "media" / "cat.jpg").convert("RGB").resize((320, 240)).save(buffer, "JPEG")
        field, name, kind, data = "image", "c.jpg", "image/jpeg", buffer.getvalue()
    boundary = "overload"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: {kind}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    deadline = f"x-request-timeout-ms: {DEADLINE_MS}\r\n" if DEADLINE_MS is not None else ""
    head = (
        f"POST /v1/{TASK} HTTP/1.1\r\nHost: {host}\r\n{deadline}"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Outcome:
    label: str
    offered_rps: float
    seconds: float
    sent: int = 0
    ok_in_deadline: int = 0  # 200s answered within the deadline
    ok_in_window: int = 0  # those of them that finished while arrivals were still coming (goodput counts these)
    ok_late: int = 0
    refused_429: int = 0
    deadline_504: int = 0
    other: dict[str, int] = field(default_factory=dict)  # status (0: no answer) → count
    max_429_s: float = 0.0
    retry_after: dict[int, int] = field(default_factory=dict)  # Retry-After seconds → how many 429s said so
    p50_ok_s: float = 0.0
    p99_ok_s: float = 0.0
    # the 200s' own figures (x-queue-time-ms, x-inference-time-ms, x-batch-size): where their time went
    queue_ms: list[float] = field(default_factory=list)
    inference_ms: list[float] = field(default_factory=list)
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def goodput(self) -> float:
        """200s within their deadline that finished during the arrival window, per second of it.

        Answers that finish after arrivals stop are left out: that tail (up to a deadline's worth of queued
        work, served with no new load) would otherwise add a deadline's worth of capacity to every run.
        """
        return self.ok_in_window / self.seconds


async def closed_loop(url: str, clients: int, seconds: float, warmup: float = 2.0) -> float:
    """Capacity: 200s per second with ``clients`` back-to-back clients."""
    parts = urlsplit(url)
    request = upload_request(parts.hostname or "127.0.0.1")
    done = 0
    start = time.monotonic()
    measure_from, stop = start + warmup, start + warmup + seconds

    async def client() -> None:
        nonlocal done
        conn = Connection(parts.hostname or "127.0.0.1", parts.port or 80)
        while time.monotonic() < stop:
            t0 = time.monotonic()
            status, _ = await conn.send(request)
            if status == 200 and t0 >= measure_from:
                done += 1
        conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return done / seconds


async def open_loop(url: str, rate: float, seconds: float, label: str) -> Outcome:
    """Poisson arrivals at ``rate`` for ``seconds``; waits for every answer (bounded by the deadline + 5 s)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = upload_request(host)
    out = Outcome(label, rate, seconds)
    deadline_s = TIMEOUT_S if DEADLINE_MS is None else DEADLINE_MS / 1000
    ok_latencies: list[float] = []
    idle: list[Connection] = []
    rng = random.Random(1)

    async def one() -> None:
        conn = idle.pop() if idle else Connection(host, port)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT_S + 5):  # a hang counts as lost, not as a stuck benchmark
                status, headers = await conn.send(request)
        except TimeoutError:
            conn.close()
            status, headers = 0, {}
        elapsed = time.monotonic() - t0
        if status:
            idle.append(conn)
        if status == 200:
            out.queue_ms.append(float(headers.get("x-queue-time-ms", "nan")))
            out.inference_ms.append(float(headers.get("x-inference-time-ms", "nan")))
            size = int(headers.get("x-batch-size", "0"))
            out.batch_sizes[size] = out.batch_sizes.get(size, 0) + 1
            if elapsed <= deadline_s:
                out.ok_in_deadline += 1
                out.ok_in_window += t0 + elapsed <= window_end
                ok_latencies.append(elapsed)
            else:
                out.ok_late += 1
        elif status == 429:
            out.refused_429 += 1
            out.max_429_s = max(out.max_429_s, elapsed)
            retry_after = int(headers.get("retry-after", "-1"))
            out.retry_after[retry_after] = out.retry_after.get(retry_after, 0) + 1
        elif status == 504:
            out.deadline_504 += 1
        else:
            out.other[str(status)] = out.other.get(str(status), 0) + 1

    pending: set[asyncio.Task[None]] = set()
    next_at = start = time.monotonic()
    window_end = start + seconds
    while next_at < start + seconds:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        job = asyncio.create_task(one())
        out.sent += 1
        pending.add(job)
        job.add_done_callback(pending.discard)
        next_at += rng.expovariate(rate)
    if pending:
        await asyncio.gather(*pending)
    for conn in idle:
        conn.close()
    if ok_latencies:
        q = statistics.quantiles(ok_latencies, n=100) if len(ok_latencies) > 1 else ok_latencies * 99
        out.p50_ok_s, out.p99_ok_s = q[49], q[98]
    return out


@dataclass
class Retrying:
    """Closed-loop clients that retry every refusal: after its Retry-After, or at once (a retry storm)."""

    label: str
    clients: int
    seconds: float
    honour_retry_after: bool
    ok: int = 0
    refused_429: int = 0
    deadline_504: int = 0
    other: dict[str, int] = field(default_factory=dict)
    p50_ok_s: float = 0.0
    p99_ok_s: float = 0.0
    client_cpu_s: float = 0.0  # CPU time of this process (the load generator) over the run

    @property
    def goodput(self) -> float:
        return self.ok / self.seconds


async def retrying(url: str, clients: int, seconds: float, honour_retry_after: bool, warmup: float = 2.0) -> Retrying:
    """``clients`` users, each sending the next request when it has its answer; a 429 is retried after its
    Retry-After (``honour_retry_after``) or at once. Counts what finished within ``seconds`` after ``warmup``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = upload_request(host)
    label = f"{clients} clients, " + ("honouring Retry-After" if honour_retry_after else "ignoring Retry-After")
    out = Retrying(label, clients, seconds, honour_retry_after)
    latencies: list[float] = []
    start = time.monotonic()
    measure_from, stop = start + warmup, start + warmup + seconds

    async def client() -> None:
        conn = Connection(host, port)
        while time.monotonic() < stop:
            t0 = time.monotonic()
            status, headers = await conn.send(request)
            if t0 < measure_from:
                continue
            if status == 200:
                out.ok += time.monotonic() <= stop
                latencies.append(time.monotonic() - t0)
            elif status == 429:
                out.refused_429 += 1
                if honour_retry_after:
                    await asyncio.sleep(min(float(headers.get("retry-after", "1")), max(0.0, stop - time.monotonic())))
            elif status == 504:
                out.deadline_504 += 1
            else:
                out.other[str(status)] = out.other.get(str(status), 0) + 1
        conn.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    out.client_cpu_s = time.process_time() - cpu0
    if latencies:
        q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
        out.p50_ok_s, out.p99_ok_s = q[49], q[98]
    return out


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def sample_rss(pid: int, samples: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(rss_bytes(pid))
        await asyncio.sleep(1.0)


async def measure(
    url: str, pid: int, factors: list[float], duration: float, capacity_s: float, retry_clients: list[tuple[int, bool]]
) -> dict[str, object]:
    capacity = await closed_loop(url, clients=8, seconds=capacity_s)
    rss: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, rss, stop))
    outcomes = [await open_loop(url, capacity * f, duration, f"{f:g}x") for f in factors]
    retries = [await retrying(url, n, duration, honour) for n, honour in retry_clients]
    stop.set()
    await sampler
    return {"capacity_rps": capacity, "outcomes": outcomes, "retrying": retries, "rss": rss}


BUSY_LOOP = """
import sys, time
on, off = float(sys.argv[1]), float(sys.argv[2])
while True:
    end = time.monotonic() + on
    while time.monotonic() < end:
        pass
    time.sleep(off)
"""


def start_busy(spec: str) -> list[subprocess.Popen[bytes]]:
    """``LOOPS:ON:OFF``: that many busy loops, each ON seconds spinning and OFF seconds asleep (another process on
    the machine that takes a core now and then)."""
    loops, on, off = spec.split(":")
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, on, off]) for _ in range(int(loops))]


def start_server(extra: dict[str, str] | None = None, root: Path = ROOT) -> tuple[object, str]:
    env = {
        "PERCEIVER_DEMO_TASKS": f'["{TASK}"]',
        "PERCEIVER_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "PERCEIVER_MAX_QUEUE_SIZE": "1024",
        **(extra or {}),
    }
    return spawn(env, root=root)


def report(result: dict[str, object]) -> str:
    capacity = float(result["capacity_rps"])  # type: ignore[arg-type]
    rows = [
        f"Capacity (closed loop, 8 clients): {capacity:.2f} req/s",
        "",
        "| offered | sent | goodput req/s | goodput / capacity | 429 | max 429 latency s | Retry-After (min–max) "
        "| 504 | 200 late | other | p50 / p99 of 200s s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in result["outcomes"]:  # type: ignore[attr-defined]
        ra = f"{min(o.retry_after)}–{max(o.retry_after)}" if o.retry_after else "-"
        rows.append(
            f"| {o.label} ({o.offered_rps:.1f}/s) | {o.sent} | {o.goodput:.2f} | {o.goodput / capacity:.0%} "
            f"| {o.refused_429} | {o.max_429_s:.2f} | {ra} | {o.deadline_504} | {o.ok_late} | {o.other or 0} "
            f"| {o.p50_ok_s:.2f} / {o.p99_ok_s:.2f} |"
        )
    for o in result["outcomes"]:  # type: ignore[attr-defined]
        if len(o.queue_ms) > 1:
            queue, infer = statistics.quantiles(o.queue_ms, n=100), statistics.quantiles(o.inference_ms, n=100)
            sizes = ", ".join(f"{k}: {v}" for k, v in sorted(o.batch_sizes.items()))
            rows.append(
                f"\n{o.label}: the 200s' queue time p50 / p99 {queue[49]:.0f} / {queue[98]:.0f} ms, forward pass "
                f"{infer[49]:.0f} / {infer[98]:.0f} ms; batch sizes {sizes}"
            )
    retries: list[Retrying] = result.get("retrying", [])  # type: ignore[assignment]
    if retries:
        rows += [
            "",
            "| closed loop | 200s req/s | 200s / capacity | 429 | 504 | other | p50 / p99 of 200s s "
            "| load generator CPU (of the run) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in retries:
            rows.append(
                f"| {r.label} | {r.goodput:.2f} | {r.goodput / capacity:.0%} | {r.refused_429} | {r.deadline_504} "
                f"| {r.other or 0} | {r.p50_ok_s:.2f} / {r.p99_ok_s:.2f} | {r.client_cpu_s / r.seconds:.0%} of a core |"
            )
    rss: list[int] = result["rss"]  # type: ignore[assignment]
    growth = rss_growth(rss)
    if growth is not None:
        warm, rest = max(rss[:RSS_WARMUP_SAMPLES]), max(rss[RSS_WARMUP_SAMPLES:])
        rows += [
            "",
            f"Server RSS, sampled each second (each forward pass allocates and frees its activations, so it "
            f"swings by ~200 MiB within a batch): peak {warm / 2**20:.0f} MiB in the first {RSS_WARMUP_SAMPLES} s "
            f"of overload, peak {rest / 2**20:.0f} MiB after that ({growth:+.1%}), {rss[-1] / 2**20:.0f} MiB at "
            "the end",
        ]
    return "\n".join(rows)


RSS_WARMUP_SAMPLES = 15


def rss_growth(rss: list[int]) -> float | None:
    """Peak RSS after the first RSS_WARMUP_SAMPLES seconds over the peak within them, minus one."""
    if len(rss) <= RSS_WARMUP_SAMPLES:
        return None
    return max(rss[RSS_WARMUP_SAMPLES:]) / max(rss[:RSS_WARMUP_SAMPLES]) - 1


def main() -> None:
    global TASK, DEADLINE_MS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=lambda s: [float(x) for x in s.split(",")], default=[3.0, 30.0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per overload factor")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    parser.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="niceness of this process, the load generator, once the server is up: on a 2-core machine its CPU "
        "comes out of the server's; clients on other machines would take none",
    )
    parser.add_argument(
        "--retrying",
        action="append",
        default=[],
        metavar="N:honour|ignore",
        help="after the open-loop factors, N closed-loop clients that retry every 429 after Retry-After (honour) "
        "or at once (ignore), for --duration seconds (repeatable), e.g. 200:honour 32:ignore",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="serve the tree at this path (another commit)")
    parser.add_argument("--task", choices=["classify", "autoencode"], default=TASK, help="the demo task loaded")
    parser.add_argument(
        "--deadline-ms",
        type=int,
        help="each request's own deadline (x-request-timeout-ms); a 200 later than it is counted late",
    )
    parser.add_argument(
        "--busy", metavar="LOOPS:ON:OFF", help="busy loops over the whole run, e.g. 2:3:3 (two, 3 s on, 3 s off)"
    )
    args = parser.parse_args()
    TASK, DEADLINE_MS = args.task, args.deadline_ms
    retry_clients = [(int(n), mode == "honour") for n, _, mode in (r.partition(":") for r in args.retrying)]
    proc, url = start_server(dict(pair.split("=", 1) for pair in args.env), args.root.resolve())
    busy = start_busy(args.busy) if args.busy else []  # before the niceness: other work is not this process's
    os.nice(args.client_nice)
    try:
        result = asyncio.run(
            measure(url, proc.pid, args.factors, args.duration, args.capacity_seconds, retry_clients)  # type: ignore[attr-defined]
        )
    finally:
        for loop in busy:
            loop.kill()
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        proc.wait(timeout=60)  # type: ignore[attr-defined]
    text = report(result)
    print(text)
    if args.json:
        outcomes = [asdict(o) | {"goodput": o.goodput} for o in result["outcomes"]]  # type: ignore[attr-defined]
        retries = [asdict(r) | {"goodput": r.goodput} for r in result["retrying"]]  # type: ignore[attr-defined]
        args.json.write_text(json.dumps({**result, "outcomes": outcomes, "retrying": retries}, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

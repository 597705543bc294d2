"""The batcher alone under saturation, prepared ahead against in turn: the two stages are sleeps, so any machine
runs it and the figures are the batcher's logic, not the model's speed.

    python benchmarks/batcher_sim.py --clients 384 --seconds 6

Closed-loop clients submit one item each straight to a ``Batcher`` (admission by time at its door, the
default queue-delay target, a 10 s deadline) and submit again on their answer, or 50 ms after a 429. The
forward pass sleeps ``--forward-ms`` plus ``--forward-per-item-ms`` an item; the prepare stage (a batch's
JPEGs decoded) sleeps ``--prepare-ms`` plus ``--prepare-per-item-ms`` an item, ahead on a thread of its own,
or in turn before the forward pass. Reports throughput, mean batch, 429s, the 200s' p50 and admission's
per-unit estimates at the end.

It answers one question from H200 run 12 (docs/performance.md): does preparing ahead make batches smaller
by itself? With the defaults (run 12's 100 ms forward at 64, a decode about 0.8 ms an item) it does not.
``--one-gpu`` makes the two stages take turns, as a decode's kernels queue behind a forward pass on one card:
the per-unit estimates it prints show what admission learns then (a small batch's preparation that waited
for a whole forward pass used to count as that batch's time). ``--warm-every-class`` starts admission from
every power of two, as the server's warm-up does; ``--seed 8=12,16=12`` from a state learned earlier (both
timings recover from inflated small classes: the queue passes 64 and the batches of those sizes are timed
again); ``--ramp-s`` brings the clients in one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.batching import Batch, Batcher, QueueFull, ServiceTime


async def run(args: argparse.Namespace, ahead: bool) -> dict[str, float]:
    forward_s = (args.forward_ms / 1e3, args.forward_per_item_ms / 1e3)
    prepare_s = (args.prepare_ms / 1e3, args.prepare_per_item_ms / 1e3)
    sizes: list[int] = []
    gpu = threading.Lock() if args.one_gpu else contextlib.nullcontext()

    def stage(payloads: Sequence[int], *stages: tuple[float, float]) -> list[int]:
        with gpu:  # --one-gpu: a stage's work waits for the other stage's to end
            time.sleep(sum(fixed + per * len(payloads) for fixed, per in stages))
        return list(payloads)

    def forward(payloads: Sequence[int], batch: Batch) -> list[int]:
        sizes.append(len(payloads))
        return stage(payloads, forward_s) if ahead else stage(payloads, prepare_s, forward_s)

    full = args.max_batch_size
    forward_full, prepare_full = (fixed + per * full for fixed, per in (forward_s, prepare_s))
    overlap = ahead and not args.one_gpu
    per_batch = max(forward_full, prepare_full) if overlap else forward_full + prepare_full  # the pipeline's pace
    warm = {full: per_batch / full}
    if args.warm_every_class:  # as the server's warm-up does: each power of two, its stages in turn
        size = 1
        while size < full:
            warm[size] = sum(fixed + per * size for fixed, per in (forward_s, prepare_s)) / size
            size *= 2
    warm.update(args.seed)
    batcher: Batcher[int, int] = Batcher(
        forward,
        ThreadPoolExecutor(1),
        max_batch_size=full,
        max_delay_s=args.max_delay_ms / 1e3,
        max_queue=4096,
        max_queue_delay_s=args.max_queue_delay_ms / 1e3,
        service_time=ServiceTime(warm),  # as warm-up would have measured
        prepare=(lambda payloads: stage(payloads, prepare_s)) if ahead else None,
        prepare_executor=ThreadPoolExecutor(1) if ahead else None,
    )
    batcher.start()
    served = refused = 0
    latencies: list[float] = []
    end = time.monotonic() + args.seconds

    async def client(delay: float) -> None:
        nonlocal served, refused
        await asyncio.sleep(delay)
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                ticket = batcher.submit(1, deadline=started + 10.0)
            except QueueFull:
                refused += 1
                await asyncio.sleep(0.05)
                continue
            await ticket.future
            if time.monotonic() <= end:  # answers after the end would count the queue left then
                served += 1
                latencies.append(time.monotonic() - started)

    await asyncio.gather(*(client(args.ramp_s * i / args.clients) for i in range(args.clients)))
    await batcher.stop()
    return {
        "items_s": served / args.seconds,
        "mean_batch": statistics.mean(sizes),
        "refused": refused,
        "p50_ms": statistics.median(latencies) * 1e3,
        "ceiling_items_s": full / per_batch,
        **{f"per_unit_ms_{k}": v for k, v in batcher.service_time.summary().items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--max-queue-delay-ms", type=float, default=500.0)
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--forward-per-item-ms", type=float, default=1.25)
    parser.add_argument("--prepare-ms", type=float, default=2.0)
    parser.add_argument("--prepare-per-item-ms", type=float, default=0.8)
    parser.add_argument(
        "--one-gpu",
        action="store_true",
        help="the two stages share one device: a preparation started during a forward pass waits for it to end "
        "(decode kernels queued behind the forward's), as on one GPU at saturation",
    )
    parser.add_argument(
        "--seed",
        type=lambda s: {int(k): float(v) / 1e3 for k, v in (pair.split("=") for pair in s.split(","))},
        default={},
        help="SIZE=MS,...: admission starts from these per-unit times, over the others (a state learned earlier)",
    )
    parser.add_argument(
        "--ramp-s",
        type=float,
        default=0.0,
        help="clients start one by one over this long (inside --seconds: throughput counts the ramp too)",
    )
    parser.add_argument(
        "--warm-every-class", action="store_true", help="admission starts from every power of two, as after warm-up"
    )
    args = parser.parse_args()
    for ahead in (False, True):
        figures = asyncio.run(run(args, ahead))
        name = "prepared ahead" if ahead else "in turn"
        print(f"{name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()

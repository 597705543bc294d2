"""Phone photos decoded in threads while another thread keeps the GIL busy, as the event loop does under load.

    python benchmarks/decode_contention.py                  # this checkout
    python benchmarks/decode_contention.py --root /tmp/old  # another checkout of the project, for an A/B

The server decodes uploads in its decode threads (``PERCEIVER_DECODE_WORKERS``) with the classify task's
CPU path: ``decode_image`` at reduced scale, then the crop and resize. Pillow releases the GIL while it
decodes, and a thread that wants it back from a thread running Python waits up to the interpreter's switch
interval (5 ms). This counts photos per second in --threads decode threads, alone and next to --busy
threads that run Python without pause, on a 4032x3024 JPEG made from a sample photo.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path


def rate(decode: object, data: bytes, threads: int, busy: int, seconds: float) -> float:
    stop = threading.Event()
    done = [0] * threads

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    def work(slot: int) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            decode(data)  # type: ignore[operator]
            done[slot] += 1

    spinners = [threading.Thread(target=spin) for _ in range(busy)]
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in spinners:
        t.start()
    start = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - start
    stop.set()
    for t in spinners:
        t.join()
    return sum(done) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="project checkout")
    parser.add_argument("--threads", type=int, default=1, help="decode threads")
    parser.add_argument("--busy", type=int, default=1, help="threads running Python next to them")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--size", default="4032x3024")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root.resolve()))
    os.chdir(args.root)
    from app.tasks.classify import decode_on_cpu
    from benchmarks.photos import parse_size, photo_jpeg

    data = photo_jpeg(*parse_size(args.size))
    max_pixels = 10**9

    def decode(blob: bytes) -> None:
        decode_on_cpu(blob, max_pixels, True)

    decode(data)
    alone = rate(decode, data, args.threads, 0, args.seconds)
    contended = rate(decode, data, args.threads, args.busy, args.seconds)
    print(
        f"{args.root}: {args.size} JPEG ({len(data) / 1e6:.1f} MB), {args.threads} decode thread(s): "
        f"{alone:.1f}/s alone, {contended:.1f}/s next to {args.busy} busy thread(s) ({contended / alone:.0%})"
    )


if __name__ == "__main__":
    main()

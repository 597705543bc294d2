"""What a payload costs the model process's event loop when it comes through the slab, and when the slab is full
and it comes through the socket (app/channel.py, docs/front-ends.md).

    python benchmarks/channel_overflow.py [--requests 400] [--sizes 231000,1822018]

A sender thread writes submit frames made by ``channel.pack`` (one upload each: the JPEG sizes of
benchmarks/photos.py's hd and phone photos) into a Unix socket pair, as a front end does; the event loop reads
them with ``channel.read_frame`` and decodes them with ``channel.unpack``, on uvloop, as the model process does. Reports
the event-loop thread's CPU time per request (``time.thread_time``), which holds the GIL that the model
process's forward-pass and decode threads also need.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import socket
import sys
import threading
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app import channel


async def model_side(sock: socket.socket, slab: mmap.mmap | None, requests: int, payload: bytes) -> float:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    started = time.thread_time()
    for _ in range(requests):
        message, tail = await channel.read_frame(reader)
        values = channel.unpack(message, tail, slab)
        assert len(values[0]) == len(payload)
    spent = time.thread_time() - started
    writer.close()
    return spent / requests


def measure(size: int, requests: int, through_slab: bool) -> float:
    payload = os.urandom(size)
    slab = channel.Slab(size + 4096 if through_slab else 4096)  # 4 KiB: no room for any payload here
    frame, blocks = channel.pack({"k": "s", "i": 0, "m": 0, "d": 0.0}, [payload], slab=slab)
    assert bool(blocks) == through_slab and (slab.overflow_bytes == 0) == through_slab
    front, model = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front.setblocking(True)
    sender = threading.Thread(target=lambda: [front.sendall(frame) for _ in range(requests)], daemon=True)
    sender.start()
    view = mmap.mmap(slab.fd, slab.size, prot=mmap.PROT_READ)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the model process's loop
            return runner.run(model_side(model, view, requests, payload))
    finally:
        sender.join()
        front.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--sizes", default="231000,1822018", help="upload sizes in bytes (hd and phone JPEGs)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; event-loop CPU ms per request, {args.repeat} runs")
    print("| upload bytes | through the slab | through the socket (slab full) | ratio |")
    print("|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        slab = [measure(size, args.requests, True) * 1e3 for _ in range(args.repeat)]
        inline = [measure(size, args.requests, False) * 1e3 for _ in range(args.repeat)]
        print(
            f"| {size:,} | {min(slab):.3f}–{max(slab):.3f} | {min(inline):.3f}–{max(inline):.3f} "
            f"| {min(inline) / min(slab):.1f}× |",
            flush=True,
        )


if __name__ == "__main__":
    main()

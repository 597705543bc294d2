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


async def model_side(sock: socket.socket, slab: mmap.mmap | None, requests: int, size: int) -> float:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    started = time.thread_time()
    for _ in range(requests):
        message, tail = await channel.read_frame(reader)
        values = channel.unpack(message, tail, slab)
        assert len(values[0]) == size
    spent = time.thread_time() - started
    writer.close()
    return spent / requests


def measure(size: int, requests: int, through_slab: bool) -> float:
    """Event-loop CPU seconds per request. Through the slab, the requests cycle over 64 MiB or more of distinct
    uploads in their own blocks, so the model side reads memory the front end wrote, not its own cache."""
    uploads = [os.urandom(size) for _ in range(max(1, -(-64 * 2**20 // size)) if through_slab else 1)]
    # through the socket: a 4 KiB slab, no room for any upload here
    slab = channel.Slab(len(uploads) * (size + channel.SLAB_ALIGN) if through_slab else 4096)
    frames = []
    for upload in uploads:
        frame, blocks = channel.pack({"k": "s", "i": 0, "m": 0, "d": 0.0}, [upload], slab=slab)
        assert bool(blocks) == through_slab and (slab.overflow_bytes == 0) == through_slab
        frames.append(frame)
    front, model = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front.setblocking(True)
    sender = threading.Thread(target=lambda: [front.sendall(frames[i % len(frames)]) for i in range(requests)])
    sender.start()
    view = mmap.mmap(slab.fd, slab.size, prot=mmap.PROT_READ)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # the model process's loop
            return runner.run(model_side(model, view, requests, size))
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

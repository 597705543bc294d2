"""What the front-end/model channel of docs/front-ends.md would cost per request, before it is built.

    python benchmarks/channel_cost.py [--requests 20000] [--in-flight 32] [--payload 150528]
    python benchmarks/channel_cost.py --rate 700 --requests 7000    # open loop: a wake-up per request

Two processes, as the design has them: a "front end" writes each request's payload into a shared-memory slot
and sends a small submit message (binary header + JSON body) over a Unix socket; the "model" reads the
payload from the slot (one copy, as building a batch would) and answers with a small result message. Both run
asyncio on uvloop, as the server does. Reports the CPU time each side spends per request (process time over
the run, divided by requests) and the round-trip latency, with ``--in-flight`` requests outstanding (closed
loop, where the event loops batch their reads and writes) or at ``--rate`` (open loop). The
default payload is one 224x224x3 uint8 image (what a CPU decode hands the model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from multiprocessing import shared_memory

HEADER = struct.Struct("<IIII")  # body length, request id, slot, payload bytes


async def _model_side(path: str, shm_name: str, slot_bytes: int, ready: multiprocessing.synchronize.Event) -> None:
    shm = shared_memory.SharedMemory(name=shm_name)
    scratch = bytearray(slot_bytes)
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = time.process_time()
        count = 0
        try:
            while True:
                head = await reader.readexactly(HEADER.size)
                length, request_id, slot, size = HEADER.unpack(head)
                body = json.loads(await reader.readexactly(length))
                offset = slot * slot_bytes
                scratch[:size] = shm.buf[offset : offset + size]  # the copy into the batch
                result = json.dumps({"id": body["id"], "status": 200, "top": [[0.9, "tabby"]]}).encode()
                writer.write(HEADER.pack(len(result), request_id, slot, 0) + result)
                count += 1
        except asyncio.IncompleteReadError:
            pass
        cpu = time.process_time() - start
        writer.write(json.dumps({"model_cpu_s": cpu, "count": count}).encode())
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_unix_server(serve, path=path)
    ready.set()
    await done.wait()
    server.close()
    shm.close()


def _model_process(path: str, shm_name: str, slot_bytes: int, ready: multiprocessing.synchronize.Event) -> None:
    import uvloop

    uvloop.run(_model_side(path, shm_name, slot_bytes, ready))


async def _front_end(path: str, shm: shared_memory.SharedMemory, args: argparse.Namespace) -> dict[str, float]:
    reader, writer = await asyncio.open_unix_connection(path)
    payload = os.urandom(args.payload)
    pending: dict[int, asyncio.Future[float]] = {}
    latencies: list[float] = []

    async def receive() -> None:
        for _ in range(args.requests):
            length, request_id, _slot, _ = HEADER.unpack(await reader.readexactly(HEADER.size))
            json.loads(await reader.readexactly(length))
            pending.pop(request_id).set_result(time.perf_counter())

    async def one(request_id: int, slot: int) -> None:
        t0 = time.perf_counter()
        offset = slot * args.payload
        shm.buf[offset : offset + args.payload] = payload  # the decoded image into its slot
        body = json.dumps({"id": request_id, "model": "classify", "deadline": t0 + 10, "units": 1}).encode()
        future = asyncio.get_running_loop().create_future()
        pending[request_id] = future
        writer.write(HEADER.pack(len(body), request_id, slot, args.payload) + body)
        latencies.append(await future - t0)

    async def client(slot: int) -> None:
        for request_id in range(slot, args.requests, args.in_flight):
            await one(request_id, slot)

    async def paced() -> None:  # open loop: one request every 1/rate s, each its own wake-up on both sides
        tasks = []
        for request_id in range(args.requests):
            await asyncio.sleep(max(0.0, start + request_id / args.rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(request_id, request_id % args.in_flight)))
        await asyncio.gather(*tasks)

    receiver = asyncio.create_task(receive())
    start_cpu, start = time.process_time(), time.perf_counter()
    if args.rate:
        await paced()
    else:
        await asyncio.gather(*(client(s) for s in range(args.in_flight)))
    front_cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    await receiver
    writer.write_eof()
    stats = json.loads(await reader.read())
    writer.close()
    q = statistics.quantiles(latencies, n=100)
    n = args.requests
    return {
        "requests": n,
        "requests_per_s": n / wall,
        "front_end_cpu_us_per_request": front_cpu / n * 1e6,
        "model_cpu_us_per_request": stats["model_cpu_s"] / stats["count"] * 1e6,
        "p50_round_trip_us": q[49] * 1e6,
        "p99_round_trip_us": q[98] * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--in-flight", type=int, default=32, help="closed loop: requests outstanding (and slots)")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop at this many requests a second instead")
    parser.add_argument("--payload", type=int, default=224 * 224 * 3, help="bytes per request through shared memory")
    args = parser.parse_args()
    import uvloop

    directory = tempfile.mkdtemp(prefix="perceiver-channel-")
    path = os.path.join(directory, "model.sock")
    shm = shared_memory.SharedMemory(create=True, size=max(1, args.payload) * args.in_flight)
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    model = context.Process(target=_model_process, args=(path, shm.name, max(1, args.payload), ready))
    model.start()
    try:
        if not ready.wait(30):
            sys.exit("the model side did not start")
        result = uvloop.run(_front_end(path, shm, args))
    finally:
        model.join(30)
        shm.close()
        shm.unlink()
        shutil.rmtree(directory, ignore_errors=True)
    result.update(in_flight=args.in_flight, rate=args.rate, payload_bytes=args.payload, cpus=os.cpu_count() or 0)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Event-loop CPU per refused request, through the whole ASGI app, in-process (no sockets, no uvicorn).

    python benchmarks/refusal_cost.py                    # this checkout
    python benchmarks/refusal_cost.py --root /tmp/old    # another checkout of the project, for an A/B
    python benchmarks/refusal_cost.py --live             # through uvicorn and loopback sockets

At 30x overload nearly every request is refused, and while the event loop runs Python it holds the GIL
the inference thread needs between operators. This times the overload benchmark's request (a 320x240 JPEG
posted to /v1/classify with no ``model`` field, so the body is read to be sure it names no other variant)
on the demo classify profile with its default variant made busy (its batcher estimates 100 s a batch).
Process CPU time per request, best of --rounds. With --live, the app runs under uvicorn in this process
and 8 closed-loop clients in another send for 10 s: the CPU time of uvicorn's event-loop thread per 429
(uvicorn, the app and the kernel's socket work), and the 429s per second it sustained.

--log-level INFO (the server's default) includes the per-request log line; those lines go to /dev/null,
where a server writing them to a pipe or file would still format and write each one. The default,
WARNING, leaves them out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any


def refuse_everything(batcher: Any) -> None:
    """Make the model refuse every request by time: busy with a batch it estimates at 100 s (idle models admit
    whatever their estimates say), and no pause before a refusal (this measures a refusal's CPU, not its pace)."""
    if hasattr(batcher, "_batch_s"):  # a tree from before admission's ServiceTime (--root OLD)
        batcher._batch_s = 100.0
        return
    import app.admission
    from app.batching import ServiceTime

    batcher.service_time = ServiceTime({1: 100.0})
    batcher._running[-1] = (time.monotonic(), 100.0)
    app.admission.REFUSAL_PACE_PER_S = 10**9


def scope_for(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/classify",
        "raw_path": b"/v1/classify",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def logs_to_devnull(level: str) -> None:
    """The server's logging (as app.cli sets it up) at ``level``, its lines written to /dev/null: formatted
    and written as a server writes them to a pipe or file, but not shown."""
    import logging

    try:
        from app.jsonlog import configure
    except ImportError:  # a tree from before the rename (--root OLD)
        from app.logging import configure  # type: ignore[no-redef]

    configure(level)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - for the rest of the run


async def measure(requests: int, rounds: int, log_level: str) -> tuple[float, dict[int, int]]:
    from app.main import create_app
    from app.settings import Settings
    from benchmarks.overload import upload_request

    head, body = upload_request("127.0.0.1").split(b"\r\n\r\n", 1)
    headers = [(k.strip().lower(), v.strip()) for k, v in (line.split(b":", 1) for line in head.split(b"\r\n")[1:])]
    app = create_app(Settings(demo_tasks=["classify"], warmup=False, log_level=log_level))
    logs_to_devnull(log_level)
    statuses: dict[int, int] = {}

    async def one() -> None:
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)  # a client that stays: only a finished response ends the call
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[message["status"]] = statuses.get(message["status"], 0) + 1

        await app(scope_for(headers), receive, send)

    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        while not runtime.ready:
            await asyncio.sleep(0.1)
        refuse_everything(runtime.engine_for("classify").batcher)
        for _ in range(requests // 5):
            await one()
        statuses.clear()
        best = float("inf")
        for _ in range(rounds):
            started = time.process_time()
            for _ in range(requests):
                await one()
            best = min(best, (time.process_time() - started) / requests)
    return best, statuses


LIVE_CLIENTS = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
from benchmarks.overload import upload_request
from benchmarks.serve_load import Connection

async def main(port: int) -> None:
    request, refused, stop = upload_request("127.0.0.1"), 0, time.monotonic() + 10

    async def client() -> None:
        nonlocal refused
        conn = Connection("127.0.0.1", port)
        while time.monotonic() < stop:
            status, _ = await conn.send(request)
            refused += status == 429
        conn.close()

    await asyncio.gather(*(client() for _ in range(8)))
    print(refused)

asyncio.run(main(int(sys.argv[2])))
"""


def live(root: Path, log_level: str) -> tuple[float, float]:
    """(event-loop CPU seconds per 429, 429s per second) with uvicorn serving the app in this process."""
    import subprocess
    import threading

    import httpx
    import uvicorn

    from app.main import create_app
    from app.settings import Settings
    from benchmarks.serve_load import free_port

    port = free_port()
    app = create_app(Settings(demo_tasks=["classify"], warmup=False, log_level=log_level, port=port))
    logs_to_devnull(log_level)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    refuse_everything(app.state.runtime.engine_for("classify").batcher)

    def loop_cpu() -> float:
        stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = loop_cpu()
    clients = subprocess.run(
        [sys.executable, "-c", LIVE_CLIENTS, str(root), str(port)], capture_output=True, text=True, check=True
    )
    cpu, refused = loop_cpu() - before, int(clients.stdout.strip())
    server.should_exit = True
    thread.join(30)
    return cpu / max(refused, 1), refused / 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="project checkout")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--live", action="store_true", help="through uvicorn and sockets (Linux: reads /proc)")
    parser.add_argument("--log-level", default="WARNING", help="the server's; INFO logs every request")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root.resolve()))
    os.chdir(args.root)
    if args.live:
        per_refusal, rate = live(args.root.resolve(), args.log_level)
        print(
            f"{args.root} ({args.log_level}): {per_refusal * 1e6:.0f} µs of event-loop CPU per 429, "
            f"{rate:.0f} 429s/s (8 clients, 10 s)"
        )
        return
    seconds, statuses = asyncio.run(measure(args.requests, args.rounds, args.log_level))
    print(
        f"{args.root} ({args.log_level}): {seconds * 1e6:.1f} µs of CPU per request (best of {args.rounds}); "
        f"statuses {statuses}"
    )


if __name__ == "__main__":
    main()

"""Event-loop CPU per refused request, through the whole ASGI app, in-process (no sockets, no uvicorn).

    python benchmarks/refusal_cost.py                    # this checkout
    python benchmarks/refusal_cost.py --root /tmp/old    # another checkout of the project, for an A/B

At 30x overload nearly every request is refused, and while the event loop runs Python it holds the GIL
the inference thread needs between operators. This times the overload benchmark's request (a 320x240 JPEG
posted to /v1/classify with no ``model`` field, so the body is read to be sure it names no other variant)
on the demo classify profile with its default variant made busy (its batcher estimates 100 s a batch).
Process CPU time per request, best of --rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any


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


async def measure(requests: int, rounds: int) -> tuple[float, dict[int, int]]:
    from app.main import create_app
    from app.settings import Settings
    from benchmarks.overload import upload_request

    head, body = upload_request("127.0.0.1").split(b"\r\n\r\n", 1)
    headers = [(k.strip().lower(), v.strip()) for k, v in (line.split(b":", 1) for line in head.split(b"\r\n")[1:])]
    app = create_app(Settings(demo_tasks=["classify"], warmup=False, log_level="WARNING"))
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
        runtime.model_for("classify").batcher._batch_s = 100.0
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="project checkout")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(args.root.resolve()))
    os.chdir(args.root)
    seconds, statuses = asyncio.run(measure(args.requests, args.rounds))
    print(f"{args.root}: {seconds * 1e6:.1f} µs of CPU per request (best of {args.rounds}); statuses {statuses}")


if __name__ == "__main__":
    main()

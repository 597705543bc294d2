"""The hostile corpora of the test suite against one spawned server, as a client would see them, with the
server watched from outside: the longest /healthz answer during the corpus, its RSS, and readiness after.

    python benchmarks/hostile_corpus.py [--json out.json]

The corpora: tests/app/test_bad_input.py, tests/app/test_hostile_media.py (generated media) and the JSON,
protocol and header cases below (as tests/app/test_hostile_requests.py sends them). Every answer must be a
JSON 4xx or a legitimate 200 within 5 s; a probe asks /healthz every 50 ms on its own connection.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.memory import IDLE_TRIM_S  # noqa: E402
from benchmarks.serve_load import spawn  # noqa: E402

TEXT_V2 = "/v2/models/classify-text/infer"
IMAGE_V2 = "/v2/models/classify.learned/infer"


def image_tensor(side: int) -> dict[str, Any]:
    """A v2 JSON body of one side x side RGB image: side * side * 3 values."""
    data = [7] * (side * side * 3)
    return {"inputs": [{"name": "IMAGE", "shape": [1, side, side, 3], "datatype": "UINT8", "data": data}]}


def json_cases() -> list[tuple[str, str, str, dict[str, Any], set[int]]]:
    """(id, method, path, httpx kwargs, acceptable statuses)."""
    js = {"content-type": "application/json"}
    text = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
    deep = "[" * 100_000 + "]" * 100_000
    million = "{" + ",".join(f'"k{i}":0' for i in range(1_000_000)) + ',"text":"hi"}'
    cases: list[tuple[str, str, str, dict[str, Any], set[int]]] = [
        ("json-deep-text", "post", "/v1/classify-text", {"content": '{"text": ' + deep + "}", "headers": js}, {422}),
        ("json-deep-image", "post", "/v1/classify", {"content": '{"image": ' + deep + "}", "headers": js}, {422}),
        (
            "json-5000-digit-top-k",
            "post",
            "/v1/classify-text",
            {"content": '{"text":"a","top_k":' + "7" * 5000 + "}", "headers": js},
            {422},
        ),
        ("json-million-keys", "post", "/v1/classify-text", {"content": million, "headers": js}, {413, 422}),
        (
            "json-duplicate-key",
            "post",
            "/v1/classify-text",
            {"content": '{"text":"a","text":"b"}', "headers": js},
            {422},
        ),
        ("json-8mb-key", "post", "/v1/classify-text", {"json": {"text": "a", "n" * (8 << 20): 1}}, {413, 422}),
        ("v2-million-keys", "post", TEXT_V2, {"content": '{"inputs": [], ' + million[1:], "headers": js}, {400, 413}),
        ("v2-8mb-parameter", "post", TEXT_V2, {"json": {**text, "parameters": {"n" * (8 << 20): 1}}}, {400, 413}),
        # 4.19M and 4.32M values (8.4 and 8.6 MB): 413 under this server's 4 MiB body limit, before any parse;
        # with the default 32 MiB, 200 and 400 (tests/app/test_hostile_requests.py, MAX_VALUES)
        ("v2-json-tensor-4m-values", "post", IMAGE_V2, {"json": image_tensor(1182)}, {413}),
        ("v2-json-tensor-over-4m-values", "post", IMAGE_V2, {"json": image_tensor(1200)}, {413}),
        ("v2-100k-outputs", "post", TEXT_V2, {"json": {**text, "outputs": [{"name": "LABELS"}] * 100_000}}, {400}),
        ("v2-deep", "post", TEXT_V2, {"content": json.dumps(text).replace('["hello"]', deep), "headers": js}, {400}),
        (
            "v2-shape-5000-digits",
            "post",
            TEXT_V2,
            {"content": json.dumps(text).replace("[1]", "[" + "9" * 5000 + "]"), "headers": js},
            {400},
        ),
        (
            "v2-timeout-1e400",
            "post",
            TEXT_V2,
            {
                "content": json.dumps(text).replace(
                    '"inputs"', '"parameters": {"timeout": 1' + "0" * 400 + '}, "inputs"'
                ),
                "headers": js,
            },
            {200},
        ),
        (
            "v2-header-length-superscript",
            "post",
            TEXT_V2,
            {"content": json.dumps(text).encode(), "headers": {"inference-header-content-length": "²".encode()}},
            {400},
        ),
        (
            "v2-empty-image",
            "post",
            "/v2/models/classify.learned/infer",
            {"json": {"inputs": [{"name": "IMAGE", "shape": [1, 0, 4, 3], "datatype": "UINT8", "data": []}]}},
            {400},
        ),
    ]
    for value in ("nan", "abc", "-5", "inf"):
        cases.append(
            (
                f"timeout-header-{value}",
                "post",
                "/v1/classify-text",
                {"json": {"text": "a"}, "headers": {"x-request-timeout-ms": value}},
                {400},
            )
        )
    return cases


def raw_cases() -> list[tuple[str, bytes, set[int]]]:
    line = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    return [
        ("100k-headers", line + b"".join(b"X-%d: v\r\n" % i for i in range(100_000)) + b"\r\n", {431}),
        ("1mb-header", line + b"X-Big: " + b"v" * (1 << 20) + b"\r\n\r\n", {431}),
        ("30mb-unfinished-header", line + b"X-Endless: " + b"v" * (30 << 20), {431}),
        ("64kb-query", b"GET /v1/models?q=" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {414}),
        ("not-http", b"NOT HTTP AT ALL\r\n\r\n", {400}),
    ]


def raw_send(port: int, data: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        with contextlib.suppress(OSError):  # the server answered and closed before the rest was sent
            sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else 0), body


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="run the corpus this many times, reading RSS after each once the server has been idle long enough "
        "to give kept memory back (app/memory.py): a leak grows from round to round, kept memory does not",
    )
    args = parser.parse_args()
    from tests.app.test_bad_input import CORPUS as BAD_INPUT
    from tests.app.test_hostile_media import CORPUS as MEDIA

    cases = [(c[0], c[1], c[2], c[3], c[4]) for c in BAD_INPUT]
    cases += [(name, "post", path, kwargs, statuses) for name, path, kwargs, statuses in MEDIA]
    cases += json_cases()
    # the body limit tests/app/conftest.py gives the corpus server (its oversize case is 5 MiB)
    proc, url = spawn({"PERCEIVER_LOG_LEVEL": "ERROR", "PERCEIVER_MAX_BODY_BYTES": str(4 * 1024 * 1024)})
    port = int(url.rsplit(":", 1)[1])
    stop = threading.Event()
    probe = {"max_s": 0.0, "failed": 0}
    memory = {"start": rss(proc.pid), "peak": 0}

    def watch() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    client.get("/healthz")
                except httpx.HTTPError:
                    probe["failed"] += 1
                probe["max_s"] = max(probe["max_s"], time.monotonic() - started)
                memory["peak"] = max(memory["peak"], rss(proc.pid))
                time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results: list[dict[str, Any]] = []
    after_rounds: list[int] = []  # RSS after each round and IDLE_TRIM_S + 5 s of idleness
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(args.rounds):
                for name, method, path, kwargs, statuses in cases:
                    started = time.monotonic()
                    try:
                        r = getattr(client, method)(path, **kwargs)
                        status, is_json = (
                            r.status_code,
                            r.headers.get("content-type", "").startswith("application/json"),
                        )
                        size = len(r.content)
                    except httpx.HTTPError as exc:
                        status, is_json, size = 0, False, 0
                        print(f"{name}: {type(exc).__name__}", flush=True)
                    elapsed = time.monotonic() - started
                    results.append(
                        {
                            "case": name,
                            "status": status,
                            "expected": sorted(statuses),
                            "json": is_json or status == 200,
                            "seconds": round(elapsed, 3),
                            "bytes": size,
                        }
                    )
                for name, data, statuses in raw_cases():
                    started = time.monotonic()
                    status, body = raw_send(port, data)
                    elapsed = time.monotonic() - started
                    is_json = body.startswith(b"{")
                    results.append(
                        {
                            "case": name,
                            "status": status,
                            "expected": sorted(statuses),
                            "json": is_json,
                            "seconds": round(elapsed, 3),
                            "bytes": len(body),
                        }
                    )
                time.sleep(IDLE_TRIM_S + 5)
                after_rounds.append(rss(proc.pid))
            ready = client.get("/readyz").status_code
        final = rss(proc.pid)
    finally:
        stop.set()
        watcher.join()
        proc.terminate()
        proc.wait()
    fivexx = [r for r in results if r["status"] >= 500 or r["status"] == 0]
    unexpected = [r for r in results if r["status"] not in r["expected"]]
    slow = [r for r in results if r["seconds"] > 5]
    not_json = [r for r in results if not r["json"]]
    summary = {
        "cases": len(results),
        "5xx_or_no_answer": len(fivexx),
        "unexpected_status": unexpected,
        "over_5_s": slow,
        "not_json": not_json,
        "largest_error_body": max(r["bytes"] for r in results if r["status"] != 200),
        "slowest_s": max(r["seconds"] for r in results),
        "healthz_longest_s": round(probe["max_s"], 3),
        "healthz_failed": probe["failed"],
        "rss_start_mib": memory["start"] >> 20,
        "rss_peak_growth_mib": (memory["peak"] - memory["start"]) >> 20,
        "rss_after_mib": final >> 20,
        "rss_after_each_round_mib": [r >> 20 for r in after_rounds],
        "ready_after": ready == 200,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "results": results}, indent=1))


if __name__ == "__main__":
    main()

"""Slow uploads (slowloris): they hold only their own connections, never a decode thread or the model,
and are cut off with 408 at the request timeout."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from .conftest import MEDIA, LiveServer, until

pytestmark = pytest.mark.timeout(120)
TIMEOUT_S = 8.0  # the server cuts a request off after this; the slow clients trickle for longer


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    server = LiveServer(demo_tasks=["classify"], request_timeout_s=TIMEOUT_S).start()
    yield server
    server.stop()


def slow_upload(port: int, seconds: float, out: list[bytes]) -> None:
    """Declare a 100 kB body and send a byte every 0.5 s; keep the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds + 10) as sock:
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
        )
        ended = time.monotonic() + seconds
        try:
            while time.monotonic() < ended:
                sock.sendall(b"\xff")
                if select.select([sock], [], [], 0.5)[0]:  # the answer came (and the server then closes)
                    break
            out.append(sock.recv(4096))
        except OSError:
            out.append(b"")


def test_slow_uploads_do_not_hold_up_other_requests_and_are_cut_off(server: LiveServer) -> None:
    answers: list[bytes] = []
    threads = [
        threading.Thread(target=slow_upload, args=(server.settings.port, TIMEOUT_S + 2, answers)) for _ in range(24)
    ]
    for thread in threads:
        thread.start()
    until(lambda: server.runtime.inflight == 24, "the slow clients connected and trickling")
    photo = (MEDIA / "cat.jpg").read_bytes()
    with server.client() as client:
        for _ in range(6):  # more than the 4 decode threads: none of them is held by a slow client
            r = client.post("/v1/classify", files={"image": ("cat.jpg", photo)})
            assert r.status_code == 200
    assert answers == [] and server.runtime.inflight == 24  # served while every slow client was still sending
    for thread in threads:
        thread.join()
    assert len(answers) == 24
    assert all(a.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in a for a in answers), answers[:2]
    # and the connection closes: kept alive, the rest of the body is read and dropped, each byte restarting the
    # keep-alive timer, so a client that trickles on would hold it for ever
    assert all(b"connection: close" in a.lower() for a in answers), answers[:1]
    assert server.metric("perceiver_rejections_total", task="classify", model="", reason="slow_upload") == 24


def test_the_requests_own_deadline_bounds_its_upload_too(server: LiveServer) -> None:
    """x-request-timeout-ms shortens every stage of the request, the upload included: a body still arriving at
    the request's deadline is answered then, a 504 as at any stage past it, not a 408 at the server's timeout
    (8 s here; 30 s by default)."""
    with socket.create_connection(("127.0.0.1", server.settings.port), timeout=TIMEOUT_S + 10) as sock:
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n"
            b"x-request-timeout-ms: 1500\r\n\r\n\xff"  # and no more
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 504") and b"connection: close" in answer.lower(), answer[:300]
    assert b"the request body did not arrive before the request's deadline (1500 ms, x-request-timeout-ms)" in answer

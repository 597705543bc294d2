"""Hostile requests, round two: the protocol, JSON and header cases that used to end in a 500, a huge error
body or a silent choice. Every input is generated here. Each answer is a JSON 4xx (or a legitimate 200) with
the request id, its error body under 4 KB, and the connection stays usable."""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from fractions import Fraction

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from app import httpserver

from .conftest import LiveServer, until

MAX_ERROR_BODY = 4096
TEXT_V2 = "/v2/models/classify-text/infer"
IMAGE_V2 = "/v2/models/classify.learned/infer"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(demo_tasks=["classify", "classify-text", "fill-mask", "autoencode"])

    async def boom() -> None:
        raise RuntimeError("a bug of ours, not the client's")

    live.app.add_api_route("/v1/boom", boom, methods=["GET"])  # stands for any bug the handlers miss
    live.start()
    live.runtime.access.clock = itertools.count(0.0, 10.0).__next__  # the log's clock: no line here is throttled
    yield live
    live.stop()


def assert_json_error(r: httpx.Response, statuses: set[int]) -> dict[str, object]:
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    assert len(r.content) <= MAX_ERROR_BODY, len(r.content)
    assert r.headers.get("x-request-id")
    body: dict[str, object] = r.json()
    assert "error" in body
    return body


def v2_text(text: str = "hello", **extra: object) -> dict[str, object]:
    return {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": [text]}], **extra}


# ---------------------------------------------------------------------------------------------- 500s no more


def test_an_unexpected_error_is_a_json_500_with_the_request_id_and_the_connection_stays_open(
    server: LiveServer,
) -> None:
    host, port = "127.0.0.1", server.settings.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /v1/boom HTTP/1.1\r\nHost: x\r\nx-request-id: boom-1\r\n\r\n")
        first = _read_response(sock)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        second = _read_response(sock)
    status, headers, body = first
    assert status == 500 and headers["x-request-id"] == "boom-1"
    with socket.create_connection((host, port), timeout=10) as sock:  # an id in UTF-8 comes back byte for byte
        sock.sendall("GET /healthz HTTP/1.1\r\nHost: x\r\nx-request-id: café-☕\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
    assert "x-request-id: café-☕\r\n".encode() in data, data
    assert json.loads(body)["error"]["message"] == "internal error; request id boom-1"
    assert "Traceback" not in body.decode() and "a bug of ours" not in body.decode()
    assert second[0] == 200  # the same keep-alive connection answered the next request


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("length", ["²", "1¹", "99999999999999999999999", "-1", "1e3"])
def test_a_header_length_that_is_not_ascii_digits_is_a_400(server: LiveServer, length: str) -> None:
    body = json.dumps(v2_text()).encode()
    with server.client() as c:
        r = c.post(TEXT_V2, content=body, headers={"inference-header-content-length": length.encode()})  # type: ignore[dict-item]
    assert "Inference-Header-Content-Length" in str(assert_json_error(r, {400})["error"])


@pytest.mark.parametrize(
    ("shape", "data", "binary"),
    [([1, 0, 4, 3], [], False), ([0, 4, 3], [], False), ([0, 0, 3], b"", True), ([2, 4, 0, 3], [], False)],
)
def test_an_image_tensor_without_pixels_is_a_400(
    server: LiveServer, shape: list[int], data: object, binary: bool
) -> None:
    tensor: dict[str, object] = {"name": "IMAGE", "shape": shape, "datatype": "UINT8"}
    if binary:
        tensor["parameters"] = {"binary_data_size": 0}
        header = json.dumps({"inputs": [tensor]}).encode()
        with server.client() as c:
            r = c.post(IMAGE_V2, content=header, headers={"inference-header-content-length": str(len(header))})
    else:
        with server.client() as c:
            r = c.post(IMAGE_V2, json={"inputs": [{**tensor, "data": data}]})
    assert_json_error(r, {400})


def test_a_shape_of_thousands_of_digits_is_a_400(server: LiveServer) -> None:
    huge = "9" * 5000
    body = '{"inputs": [{"name": "TEXT", "shape": [' + huge + '], "datatype": "BYTES", "data": ["a"]}]}'
    with server.client() as c:
        r = c.post(TEXT_V2, content=body.encode(), headers={"content-type": "application/json"})
    assert_json_error(r, {400})
    body = '{"inputs": [{"name": "TEXT", "shape": [4294967296], "datatype": "BYTES", "data": ["a"]}]}'
    with server.client() as c:
        r = c.post(TEXT_V2, content=body.encode(), headers={"content-type": "application/json"})
    assert_json_error(r, {400})


def test_a_timeout_parameter_beyond_every_limit_or_of_0_shortens_nothing_and_a_negative_one_is_a_400(
    server: LiveServer,
) -> None:
    big = "1" + "0" * 400  # 1e400, written as an integer
    with server.client() as c:
        # 0 is Triton's "no timeout" (its default): it was a 504 at once
        r = c.post(TEXT_V2, json=v2_text(parameters={"timeout": 0}))
        assert r.status_code == 200, r.text
        body = json.dumps(v2_text()).replace('"inputs"', f'"parameters": {{"timeout": {big}}}, "inputs"')
        r = c.post(TEXT_V2, content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        body = body.replace(big, "-" + big)
        r = c.post(TEXT_V2, content=body.encode(), headers={"content-type": "application/json"})
    assert "timeout" in str(assert_json_error(r, {400})["error"])


def test_a_fill_mask_answer_is_bounded_before_anything_is_decoded(server: LiveServer) -> None:
    """Candidates are [MASK]s x top_k: a 64 KB text of 10,922 [MASK]s at top_k 256 answered 114 MB of JSON,
    built and encoded on the event loop. The bound (65,536 a request) counts a list's texts together, and the
    Open Inference Protocol's [texts, most masks, top_k] tensors with every row padded; at the bound, served.
    (The bound's cost at 65,536: ~3 MB of JSON, ~60 ms to encode on 2 cores.)"""
    v2 = "/v2/models/fill-mask/infer"
    with server.client() as c:
        r = c.post("/v1/fill-mask", json={"text": "[MASK]" * 10_922, "top_k": 256})
        message = str(assert_json_error(r, {413})["error"])
        assert "2,796,032 candidates" in message and "lower top_k" in message
        r = c.post("/v1/fill-mask", json={"text": ["[MASK]" * 128] * 3, "top_k": 256})  # 98,304 together
        assert "98,304 candidates" in str(assert_json_error(r, {413})["error"])
        r = c.post("/v1/fill-mask", json={"text": ["a[MASK]" * 128, "[MASK]b" * 128], "top_k": 256})
        assert r.status_code == 200, r.text[:300]
        results = r.json()["results"]
        assert [len(x["masks"]) for x in results] == [128, 128]
        assert {len(m["candidates"]) for x in results for m in x["masks"]} == {256}
        # v2: 64 rows padded to the one with 128 [MASK]s, at top_k 8: 65,536 values, served
        rows = ["[MASK]" * 128] + ["x[MASK]"] * 63
        tensor = {"name": "TEXT", "shape": [64], "datatype": "BYTES", "data": rows}
        r = c.post(v2, json={"inputs": [tensor], "parameters": {"top_k": 8}, "outputs": [{"name": "BYTE_OFFSETS"}]})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["outputs"][0]["shape"] == [64, 128]
        # 256 and 1 [MASK]s at top_k 200 are 51,400 candidates, but two padded rows of 256: 102,400
        tensor = {**tensor, "shape": [2], "data": ["[MASK]" * 256, "x[MASK]"]}
        r = c.post(v2, json={"inputs": [tensor], "parameters": {"top_k": 200}})
        assert "102,400 candidates (texts x the most [MASK]s in one text" in str(assert_json_error(r, {413})["error"])
        r = c.post("/v1/fill-mask", json={"text": tensor["data"], "top_k": 200})  # REST answers them unpadded
        assert r.status_code == 200, r.text[:300]
    with server.client() as c:
        assert c.get("/readyz").status_code == 200


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(("path", "field"), [("/v1/classify-text", "text"), ("/v1/classify", "image")])
def test_json_nested_a_hundred_thousand_deep_is_a_422(server: LiveServer, path: str, field: str) -> None:
    body = '{"' + field + '": ' + nested(100_000) + "}"
    with server.client() as c:
        r = c.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert "nested too deeply" in json.dumps(assert_json_error(r, {422}))


def test_nesting_in_a_v2_body_is_a_400(server: LiveServer) -> None:
    body = json.dumps(v2_text()).replace('"data": ["hello"]', '"data": ' + nested(100_000))
    with server.client() as c:
        r = c.post(TEXT_V2, content=body.encode(), headers={"content-type": "application/json"})
    assert_json_error(r, {400})


def test_a_number_of_five_thousand_digits_is_a_422(server: LiveServer) -> None:
    body = '{"text": "hello", "top_k": ' + "7" * 5000 + "}"
    with server.client() as c:
        r = c.post("/v1/classify-text", content=body.encode(), headers={"content-type": "application/json"})
    assert "too long" in json.dumps(assert_json_error(r, {422}))


# ---------------------------------------------------------------------------------------------- JSON bodies


def test_a_million_keys_is_refused_with_a_short_error(server: LiveServer) -> None:
    body = "{" + ",".join(f'"k{i}":0' for i in range(1_000_000)) + ',"text":"hi"}'
    with server.client() as c:
        r = c.post("/v1/classify-text", content=body.encode(), headers={"content-type": "application/json"})
        assert "keys" in json.dumps(assert_json_error(r, {422}))
        v2 = '{"inputs": [], ' + ",".join(f'"k{i}":0' for i in range(1_000_000)) + "}"
        r = c.post(TEXT_V2, content=v2.encode(), headers={"content-type": "application/json"})
        assert_json_error(r, {400})
        params = json.dumps(v2_text()).replace(
            '"inputs"', '"parameters": {' + ",".join(f'"p{i}":0' for i in range(1_000_000)) + '}, "inputs"'
        )
        r = c.post(TEXT_V2, content=params.encode(), headers={"content-type": "application/json"})
        assert_json_error(r, {400})
        assert c.get("/readyz").status_code == 200


def test_a_json_tensor_over_the_value_limit_is_a_400_that_points_to_binary_data(server: LiveServer) -> None:
    """json.loads holds the GIL for the whole parse, so a JSON tensor's values are bounded (MAX_VALUES); the
    same pixels as binary data are served."""
    side = 1200  # 1200 x 1200 x 3 = 4.32M values, over 4,194,304
    pixels = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    tensor = {"name": "IMAGE", "shape": list(pixels.shape), "datatype": "UINT8"}
    with server.client() as c:
        r = c.post(IMAGE_V2, content=json.dumps({"inputs": [{**tensor, "data": pixels.ravel().tolist()}]}))
        assert "binary" in json.dumps(assert_json_error(r, {400}))
        header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": pixels.size}}]}).encode()
        r = c.post(
            IMAGE_V2, content=header + pixels.tobytes(), headers={"inference-header-content-length": str(len(header))}
        )
        assert r.status_code == 200, r.text[:300]


def test_an_error_never_echoes_more_than_4_kb_of_the_input(server: LiveServer) -> None:
    name = "n" * (8 << 20)
    with server.client() as c:
        r = c.post(TEXT_V2, json=v2_text(outputs=[{"name": name}]))
        assert_json_error(r, {400})
        r = c.post(TEXT_V2, json=v2_text(parameters={name: 1}))  # a parameter the protocol allows: ignored
        assert r.status_code == 200 and len(r.content) < 4096, r.text[:300]
        r = c.post("/v1/classify-text", json={"text": "hi", name: 1})
        assert_json_error(r, {422})
        r = c.post("/v1/classify-text", json={"text": "hi", **{f"extra{i}": 1 for i in range(200)}})
        assert "more problems" in json.dumps(assert_json_error(r, {422}))


def test_outputs_named_twice_are_a_400(server: LiveServer) -> None:
    with server.client() as c:
        r = c.post(TEXT_V2, json=v2_text(outputs=[{"name": "LABELS"}] * 2))
        assert "more than once" in json.dumps(assert_json_error(r, {400}))
        r = c.post(TEXT_V2, json=v2_text(outputs=[{"name": "LABELS"}] * 100_000))  # was an 8 MB answer
        assert_json_error(r, {400})


def test_a_key_given_twice_is_refused_everywhere(server: LiveServer) -> None:
    """One rule: an option given twice is an error, in the query and the body, or twice in one JSON object."""
    with server.client() as c:
        r = c.post(
            "/v1/classify-text",
            content=b'{"text": "good", "text": "bad"}',
            headers={"content-type": "application/json"},
        )
        assert "more than once" in json.dumps(assert_json_error(r, {422}))
        r = c.post("/v1/classify-text?top_k=2", json={"text": "good", "top_k": 3})
        assert "more than once" in json.dumps(assert_json_error(r, {422}))
        twice = json.dumps(v2_text()).replace('"name": "TEXT"', '"name": "TEXT", "name": "TEXT"')
        r = c.post(TEXT_V2, content=twice.encode(), headers={"content-type": "application/json"})
        assert "more than once" in json.dumps(assert_json_error(r, {400}))


# ---------------------------------------------------------------------------------------------- headers


@pytest.mark.parametrize("value", ["nan", "abc", "-5", "inf", "1e999"])
def test_an_invalid_request_timeout_is_a_400_that_names_the_header(server: LiveServer, value: str) -> None:
    with server.client() as c:
        for r in (
            c.post("/v1/classify-text", json={"text": "hi"}, headers={"x-request-timeout-ms": value}),
            c.post(TEXT_V2, json=v2_text(), headers={"x-request-timeout-ms": value}),
        ):
            assert "x-request-timeout-ms" in json.dumps(assert_json_error(r, {400}))
        ok = c.post("/v1/classify-text", json={"text": "hi"}, headers={"x-request-timeout-ms": "5000"})
        assert ok.status_code == 200


# ---------------------------------------------------------------------------------------------- media


def mjpeg_mkv_that_grows(small: int, large: tuple[int, int]) -> bytes:
    """A Motion-JPEG MKV whose header (and first frames) say 64x64, and whose later frames are ``large``."""

    def jpeg(size: tuple[int, int]) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", size, (90, 140, 200)).save(buffer, "JPEG", quality=50)
        return buffer.getvalue()

    out = io.BytesIO()
    with av.open(out, "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuvj420p"
        stream.time_base = Fraction(1, 25)
        frames = [jpeg((64, 64))] * small + [jpeg(large)] * 4
        for index, data in enumerate(frames):
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, index, index, stream.time_base
            packet.duration = 1
            container.mux(packet)
    return out.getvalue()


def test_every_video_frame_is_checked_against_the_pixel_limit_not_only_the_header(server: LiveServer) -> None:
    video = mjpeg_mkv_that_grows(3, (7000, 6000))
    assert struct.unpack(">I", video[:4])[0] == 0x1A45DFA3  # an EBML (Matroska) file
    with server.client() as c:
        r = c.post("/v1/autoencode", files={"video": ("v.mkv", video)}, data={"clips": "uniform"})
        assert "pixels" in json.dumps(assert_json_error(r, {413}))
        ok = c.post("/v1/autoencode", files={"video": ("v.mkv", mjpeg_mkv_that_grows(40, (64, 64)))})
    assert ok.status_code == 200, ok.text
    assert np.isfinite([p["score"] for p in ok.json()["predictions"]]).all()


# ---------------------------------------------------------------------------------------------- HTTP layer


def raw_exchange(server: LiveServer, request: bytes, *, dribble: Sequence[bytes] = (), every_s: float = 0.0) -> bytes:
    """Send ``request`` (then each of ``dribble``, ``every_s`` apart) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", server.settings.port), timeout=20) as sock:
        try:
            sock.sendall(request)
            for part in dribble:
                time.sleep(every_s)
                sock.sendall(part)
        except OSError:  # the server answered and closed before the rest was sent
            pass
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def status_and_json(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    assert len(body) <= MAX_ERROR_BODY
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(100_000)) + b"\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * (1 << 20) + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"v" * (4 << 20), 431),  # never finished
        (b"GET /v1/models?q=" + b"a" * (64 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /v2/models?q=" + b"a" * (64 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        # a request line the parser refuses (a raw non-ASCII byte in the path): v2's shape on /v2 too (audit)
        ("GET /v2/models/clässify-text HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
    ],
    ids=[
        "100k-headers",
        "1mb-header",
        "unfinished-4mb-header",
        "64kb-query",
        "64kb-query-v2",
        "garbage",
        "v2-bad-path",
    ],
)
def test_headers_and_urls_are_bounded_with_a_json_answer(server: LiveServer, request_bytes: bytes, status: int) -> None:
    got, body = status_and_json(raw_exchange(server, request_bytes))
    assert got == status, body
    error = body["error"]
    assert isinstance(error, str if b" /v2/" in request_bytes[:8] else dict), error


def test_what_the_parser_refuses_is_counted_and_logged_as_the_apps_own_refusals(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A URL or headers too large, bytes that are not HTTP, a transfer coding we do not read: answered before there
    is a request for the app, they were in neither /metrics nor the log, and thousands of 431s left no trace
    (audit). Each is a request of its status and a rejection of its reason, with its log line."""
    cases = [
        (
            b"GET /v1/models?q=" + b"a" * (64 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "uri_too_long",
            "/v1/models",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * (1 << 20) + b"\r\n\r\n",
            431,
            "headers_too_large",
            "/healthz",
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request", ""),
        (
            b"POST /v1/classify-text HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nxxxxx\r\n",
            501,
            "not_implemented",
            "/v1/classify-text",
        ),
    ]
    with caplog.at_level(logging.INFO, logger="perceiver.server"):
        for request, status, reason, path in cases:
            task = "classify-text" if path == "/v1/classify-text" else "none"
            labels = {"task": task, "model": ""}
            before = (
                server.metric("perceiver_requests_total", **labels, status=str(status)),
                server.metric("perceiver_rejections_total", **labels, reason=reason),
            )
            caplog.clear()
            assert status_and_json(raw_exchange(server, request))[0] == status
            until(lambda: any(r.getMessage() == "request" for r in caplog.records), "the refusal's log line")
            after = (
                server.metric("perceiver_requests_total", **labels, status=str(status)),
                server.metric("perceiver_rejections_total", **labels, reason=reason),
            )
            assert after == (before[0] + 1, before[1] + 1), (status, before, after)
            (line,) = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
            assert (line["status"], line["reason"], line["path"]) == (status, reason, path), line


def test_a_refusal_after_pipelined_requests_waits_for_their_answers(server: LiveServer) -> None:
    """HTTP/1.1 pipelining: two requests, then bytes that are not HTTP, in one write. Each request gets its answer,
    in order, then the 400 and the close (the 400 used to go first, and its end of the stream lost the answers)."""
    ask = b"POST /v1/classify-text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
    received = raw_exchange(server, ask + b'{"text":"hi"}' + ask + b'{"text":"yo"}' + b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
    heads = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
    assert heads == [b"200", b"200", b"400"], received[:600]
    last = received[received.rindex(b"HTTP/1.1 400") :]
    status, body = status_and_json(last)
    assert status == 400 and "not a valid HTTP/1.1 request" in json.dumps(body)


@pytest.mark.parametrize(
    ("tail", "status", "reason"),
    [
        (b"GARBAGE\x01 / HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * (1 << 20) + b"\r\n\r\n", 431, "headers_too_large"),
    ],
    ids=["garbage", "431"],
)
def test_a_refusal_behind_a_pipelined_request_is_counted_and_logged(
    server: LiveServer, caplog: pytest.LogCaptureFixture, tail: bytes, status: int, reason: str
) -> None:
    """The answer before it completed, and took the refused request's start with it: its 400 or 431 was in
    neither /metrics nor the log (review). It is written once the answer before it is, so it has been counted
    by the time the client reads it."""
    ask = b"POST /v1/classify-text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
    labels = {"task": "none", "model": ""}

    def counts() -> tuple[float, float]:
        return (
            server.metric("perceiver_requests_total", **labels, status=str(status)),
            server.metric("perceiver_rejections_total", **labels, reason=reason),
        )

    before = counts()
    with caplog.at_level(logging.INFO, logger="perceiver.server"):
        caplog.clear()
        received = raw_exchange(server, ask + b'{"text":"hi"}' + tail)
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"200", str(status).encode()], received[:300]
        assert counts() == (before[0] + 1, before[1] + 1)
        lines = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
        assert (status, reason) in [(line["status"], line.get("reason")) for line in lines], lines


@pytest.mark.parametrize(
    "head",
    [b"GET /healthz HTTP/1.1\r\n", b"POST /v1/nowhere HTTP/1.1\r\n", b"POST /v2/models/nope/infer HTTP/1.1\r\n"],
    ids=["probe", "no-route", "v2-unknown-model"],
)
def test_a_body_refused_on_a_route_that_reads_none_is_counted_as_the_400_the_client_got(
    server: LiveServer, caplog: pytest.LogCaptureFixture, head: bytes
) -> None:
    """A broken chunk: the parser answers 400 and closes. A route that reads no body (a probe, a 404) answered
    after that, on a closed connection: the request was counted and logged as its 200 or 404, a 404's rejection
    counted as well as the 400's, and the write after the end logged as an unhandled error with its traceback
    (reviews)."""
    path = head.split()[1].decode()
    labels = {"task": "none", "model": ""}

    def counts() -> list[float]:
        statuses = [server.metric("perceiver_requests_total", **labels, status=s) for s in ("400", "200", "404")]
        reasons = ("bad_request", "not_found", "model_not_found")
        return statuses + [server.metric("perceiver_rejections_total", **labels, reason=r) for r in reasons]

    before = counts()
    with caplog.at_level(logging.DEBUG, logger="perceiver.server"):
        caplog.clear()
        received = raw_exchange(server, head + b'Host: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"t\r\nZZ\r\n')
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"400"], received[:300]

        def line() -> dict[str, object] | None:  # the app's own record of the request, once its route has answered
            found = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
            return next((f for f in found if f["path"] == path), None)

        until(lambda: line() is not None, "the route's answer")
    assert (line() or {}).get("status") == 400 and (line() or {}).get("reason") == "bad_request", line()
    assert counts() == [before[0] + 1, *before[1:3], before[3] + 1, *before[4:]]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


@pytest.mark.parametrize(
    ("before", "path", "after", "v2"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "/v2/models/clässify-text", b"", True),
        (b"\r\n", "/v2/models/clässify-text", b"", True),
        (b"", "/v1/clässify-text", b"GET /v2/models HTTP/1.1\r\nHost: x\r\n\r\n", False),
    ],
    ids=["v2-behind-a-pipelined-request", "v2-behind-an-empty-line", "v1-before-a-pipelined-v2"],
)
def test_a_request_line_refused_beside_other_bytes_gets_its_own_paths_shape(
    server: LiveServer, before: bytes, path: str, after: bytes, v2: bool
) -> None:
    """The shape was read from the read's first line: behind a pipelined request or an empty line (which HTTP
    allows before a request), a refused /v2 request line got v1's error body; read from its last, a refused /v1
    line got v2's when a /v2 request was pipelined after it (reviews)."""
    refused = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    received = raw_exchange(server, before + refused + after)
    status, body = status_and_json(received[received.rindex(b"HTTP/1.1 400") :])
    assert status == 400 and isinstance(body["error"], str if v2 else dict), body


def test_a_body_that_breaks_its_own_chunking_is_refused_at_once_with_one_answer(server: LiveServer) -> None:
    """Bytes that break the request being read (a chunk size that is not hex) are that request's: its 400 goes out
    at once, alone (deferring it as if it followed a pipelined request left the handler waiting for the rest of the
    body until its timeout, and then answered twice)."""
    head = b"POST /v1/classify-text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    labels = {"task": "classify-text", "model": ""}
    counts = ("400", "bad_request"), ("499", "cancelled")

    def counted() -> list[float]:
        return [
            server.metric("perceiver_requests_total", **labels, status=status)
            + server.metric("perceiver_rejections_total", **labels, reason=reason)
            for status, reason in counts
        ]

    before = counted()
    received = raw_exchange(server, head + b'Transfer-Encoding: chunked\r\n\r\n3\r\n{"t\r\nZZ\r\n')
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"400"], received[:600]
    # Counted once, as the 400 it was: the parser counted its 400, and the app, which had the request, a 499 and a
    # cancelled rejection when the connection ended (review).
    until(lambda: counted() != before and server.runtime.inflight == 0, "the app's request ended")
    assert counted() == [before[0] + 2, before[1]]


def test_a_request_with_many_ordinary_headers_is_served(server: LiveServer) -> None:
    with server.client() as c:
        r = c.get("/healthz", headers={f"x-h{i}": "v" * 100 for i in range(60)})
    assert r.status_code == 200


def test_headers_that_never_end_get_a_408(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header line every 0.1 s, for longer than the header timeout (shortened here to 0.5 s)."""
    monkeypatch.setattr(httpserver, "HEADER_TIMEOUT_S", 0.5)
    raw = raw_exchange(server, b"GET /healthz HTTP/1.1\r\n", dribble=[b"X-Slow: 1\r\n"] * 100, every_s=0.1)
    got, body = status_and_json(raw)
    assert got == 408 and "headers" in json.dumps(body)
    with server.client() as c:  # a connection that sends nothing at all is closed the same way
        assert c.get("/healthz").status_code == 200
    idle = {"task": "none", "model": "", "status": "408"}
    before = server.metric("perceiver_requests_total", **idle)
    assert status_and_json(raw_exchange(server, b""))[0] == 408
    assert server.metric("perceiver_requests_total", **idle) == before  # no request: nothing counted (review)


def test_a_trailer_section_is_bounded_and_never_taken_as_headers(server: LiveServer) -> None:
    """A chunked body's trailer fields are read and dropped: an x-request-id or a zero request timeout sent as a
    trailer changed the request (RFC 9110 6.5.1 forbids merging them). A trailer section over the header bound is
    a 431 at once: one that never ended stalled the event loop (httptools grows an unfinished value by
    concatenation) until the body timeout, 30 s on."""
    head = b"POST /v1/classify-text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n"
    body = b'\r\nd\r\n{"text":"hi"}\r\n0\r\n'
    trailers = b"X-Request-Id: FROM-TRAILER\r\nx-request-timeout-ms: 0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.settings.port), timeout=20) as sock:
        sock.sendall(head + body + trailers)
        status, headers, answer = _read_response(sock)
    assert status == 200 and headers["x-request-id"] != "FROM-TRAILER", (status, answer[:200])
    endless = [b"X-Endless: "] + [b"a" * 32768] * 8  # never finished, 256 KB
    got, error = status_and_json(raw_exchange(server, head + body, dribble=endless))
    assert got == 431 and "trailer fields exceed" in json.dumps(error)


def test_a_get_whose_body_never_ends_is_answered_and_its_connection_closed(server: LiveServer) -> None:
    """A route that reads no body answers at once; the connection then closes (lingering): the rest of the body is
    dropped, never parsed. It was read for as long as the client sent: a trailer line without end held the
    connection and stalled the event loop."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: "
    raw = raw_exchange(server, request, dribble=[b"a" * 1024] * 40, every_s=0.1)  # ends when the server closes
    head, _, answer = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower(), raw[:300]
    assert json.loads(answer) == {"status": "ok"}


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v1/no-such-task", "Content-Length: 100000\r\nContent-Type: application/json\r\n", 404),
        ("/v1/classify-text", "Content-Length: 999999999999\r\nContent-Type: application/json\r\n", 413),
        ("/v1/classify-text", "Content-Length: 100000\r\nContent-Encoding: gzip\r\n", 415),
    ],
    ids=["404", "413", "415"],
)
def test_an_answer_sent_before_the_body_was_read_closes_the_connection(
    server: LiveServer, path: str, headers: str, status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every 0.2 s after the early answer: the server closes once its linger's whole time is up (shortened
    to 1 s here; it kept such connections, and their file descriptors, for as long as the client trickled)."""
    monkeypatch.setattr(httpserver, "LINGER_MAX_S", 1.0)
    request = f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
    started = time.monotonic()
    raw = raw_exchange(server, request, dribble=[b"{"] * 100, every_s=0.2)  # 20 s of trickle, were it kept open
    got, _ = status_and_json(raw)
    assert got == status and b"connection: close" in raw.partition(b"\r\n\r\n")[0].lower()
    assert time.monotonic() - started < 15  # closed by the server, long before the trickle would have ended


def test_a_slow_upload_answered_early_may_send_on_past_the_keep_alive_timeout(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 404 before the body: the client goes on sending, a chunk every 0.5 s for 7 s, then reads. The lingering
    close reads and drops all of it (quiet for LINGER_IDLE_S, lengthened to 5 s here, closes it), so every send
    succeeds and the client reads its answer; uvicorn's keep-alive timer closed it at 5 s, and the client's next
    bytes got a reset."""
    monkeypatch.setattr(httpserver, "LINGER_IDLE_S", 5.0)
    head = b"POST /v1/no-such-task HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.settings.port), timeout=30) as sock:
        sock.sendall(head)
        for _ in range(14):
            time.sleep(0.5)
            sock.sendall(b"x" * 100)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status, body = status_and_json(received)
    assert status == 404, body


def test_a_client_that_reads_none_of_its_answers_is_cut_off(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipelined requests whose answers are never read fill the send buffer; past the write timeout (shortened to
    0.5 s here) the connection is closed, silently in the log (uvicorn had no write timeout: it stayed open)."""
    monkeypatch.setattr(httpserver, "WRITE_TIMEOUT_S", 0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.settings.port))
    try:
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        protocols = server.server.server_state.connections
        until(
            lambda: not any(p.transport.get_extra_info("peername") == sock.getsockname() for p in protocols), "closed"
        )
    finally:
        sock.close()


@pytest.mark.parametrize(
    "target",
    [b"CONNECT example.com:443", b"GET http://", b"GET http://a:99999/healthz", b"GET http://[::1"],
)
def test_a_target_the_url_parser_refuses_is_a_json_400_after_the_answers_before_it(
    server: LiveServer, target: bytes
) -> None:
    """These passed the request-line parser and failed httptools' URL parser: no answer, an ERROR with a traceback
    in the log, and a pipelined request before it lost its answer."""
    ask = b"POST /v1/classify-text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
    received = raw_exchange(server, ask + b'{"text":"hi"}' + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"200", b"400"], received[:600]
    _, body = status_and_json(received[received.rindex(b"HTTP/1.1 400") :])
    assert "not a valid URL path" in json.dumps(body)


def test_the_header_bound_counts_headers_not_reads(server: LiveServer) -> None:
    """3,000 pipelined requests in one write (102 KB) are all served: the bound counted every read that ended in a
    request's headers whole, pipelined requests included (a false 431 after 4,726 of 20,000). A 100 KB header
    that arrives in one read is a 431: it was served, as the reads' count only began with the next read."""
    ping = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.settings.port), timeout=60) as sock:
        sock.sendall(ping * 2999 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(1 << 20):
            received += chunk
    assert received.count(b"HTTP/1.1 200 ") == 3000 and b"HTTP/1.1 431" not in received
    one_read = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 100_000 + b"\r\n\r\n"
    assert status_and_json(raw_exchange(server, one_read))[0] == 431


def test_a_transfer_coding_other_than_chunked_is_a_501(server: LiveServer) -> None:
    """llhttp reads only the last coding: a gzip transfer-coded body was parsed as if it had none (a misleading
    422 about its JSON)."""
    request = b"POST /v1/classify-text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    got, body = status_and_json(
        raw_exchange(server, request + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nxxxxx\r\n")
    )
    assert got == 501 and "Transfer-Encoding 'gzip' is not supported" in body["error"]["message"]  # type: ignore[index]


def test_an_upgrade_request_is_an_ordinary_one(server: LiveServer) -> None:
    """No WebSocket route: an Upgrade: websocket request is answered as HTTP (it was a bare 403 with an empty
    text/plain body, logged nowhere)."""
    upgrade = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
    with server.client() as c:
        assert c.get("/healthz", headers={**upgrade, "sec-websocket-version": "13"}).json() == {"status": "ok"}
        assert_json_error(c.get("/ws", headers={**upgrade, "sec-websocket-version": "13"}), {404})


def test_the_rows_a_binary_bytes_tensor_declares_are_counted_before_it_is_decoded(server: LiveServer) -> None:
    """A million empty BYTES elements as binary data: its rows are refused from the shape. They were counted once
    every element was decoded, a Python loop of seconds in a decode thread (8 million: 4-10 s each, and four at
    once held every decode thread)."""
    n = 1_000_000
    header = json.dumps(
        {"inputs": [{"name": "TEXT", "shape": [n], "datatype": "BYTES", "parameters": {"binary_data_size": 4 * n}}]}
    ).encode()
    with server.client() as c:
        r = c.post(
            TEXT_V2, content=header + b"\0" * (4 * n), headers={"inference-header-content-length": str(len(header))}
        )
    assert r.status_code == 400 and "TEXT: shape [1000000]" in r.json()["error"], r.text[:300]


def test_an_upgrade_request_ends_its_connection_and_its_body_is_never_a_request(server: LiveServer) -> None:
    """llhttp skips an upgrading request's body and stops parsing: read on as HTTP, that body was parsed as a
    request of its own and answered (a request smuggled past a proxy's rules). Now the upgrade request is answered,
    its connection closes, and what followed it is dropped."""
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    upgrade = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    head = upgrade + b"Content-Length: %d\r\n\r\n" % len(smuggled)
    received = raw_exchange(server, head, dribble=[smuggled], every_s=0.3)  # the body in a read of its own
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"200"], received[:600]
    assert b'{"status":"ok"}' in received and b"models" not in received


class StuckTransport:
    """A transport whose client reads nothing: every byte written stays in the send buffer. The real thing (a
    socket whose peer never reads) needs more than the kernel's buffers, which loopback's autotuning sizes."""

    def __init__(self) -> None:
        self.buffered, self.closing, self.aborted, self.eof = 0, False, False, False

    def write(self, data: bytes) -> None:
        assert not self.eof, "a write after write_eof()"
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closing = True  # asyncio's and uvloop's close wait for the buffer to drain: for ever, here

    def abort(self) -> None:
        self.aborted = self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 5), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def stuck_connection(app: object) -> tuple[httpserver.BoundedHttpToolsProtocol, StuckTransport]:
    """The server's protocol for ``app`` (uvicorn's settings as perceiver-serve's), on a StuckTransport."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    config = Config(app=app, ws="none", log_config=None, lifespan="off")  # type: ignore[arg-type]
    config.load()
    protocol = httpserver.BoundedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
    transport = StuckTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


def test_a_connection_closed_with_its_answer_unread_is_cut_after_the_write_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Connection: close``, an answer the client never reads: uvicorn closes, and a close waits for the send
    buffer to drain. The write watch now cuts it (it looked only while writing was paused, and gave up on a
    connection already closing: the file descriptor was held for as long as the client kept its window shut)."""
    import asyncio

    monkeypatch.setattr(httpserver, "WRITE_TIMEOUT_S", 0.05)

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        body = b"x" * 1000
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    async def run() -> StuckTransport:
        protocol, transport = stuck_connection(app)
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(30):  # guards against a hang; bounds nothing asserted
            while not transport.aborted:
                await asyncio.sleep(0.01)
        protocol.connection_lost(None)
        return transport

    transport = asyncio.run(run())
    assert transport.aborted and transport.buffered > 1000


def test_a_request_pipelined_behind_an_early_answer_is_dropped_not_answered_after_the_end() -> None:
    """The answer to a request whose body is unread starts; the rest of that body and another request arrive
    before it ends. Once it ends the connection's write side is closed (lingering): the request behind it is
    dropped. It was started, and its answer was written after write_eof (a RuntimeError and a traceback)."""
    import asyncio

    gate = asyncio.Event()
    seen: list[str] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(str(scope["path"]))
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"2")]})  # type: ignore[operator]
        await gate.wait()
        await send({"type": "http.response.body", "body": b"no"})  # type: ignore[operator]

    async def run() -> StuckTransport:
        protocol, transport = stuck_connection(app)
        protocol.data_received(b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        for _ in range(20):
            await asyncio.sleep(0)
        protocol.data_received(b"cd" + b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        gate.set()
        for _ in range(50):
            await asyncio.sleep(0)
        for task in protocol.tasks:
            assert not task.done() or task.exception() is None
        protocol.connection_lost(None)
        return transport

    transport = asyncio.run(run())
    assert seen == ["/first"] and transport.eof


def test_what_the_parser_refuses_is_logged_a_line_a_second_and_the_rest_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One line each: a client opening connections to send garbage wrote the log as fast as it connected (review).
    Every refusal is counted; the log writes one a second, as for 429s, and what it left out at the next line or
    at shutdown. The log's clock stands still here: every refusal after the first is left out."""
    live = LiveServer(demo_tasks=["classify-text"]).start()
    labels = {"task": "none", "model": "", "status": "400"}
    with caplog.at_level(logging.INFO, logger="perceiver.server"):
        try:
            live.runtime.access.clock = lambda: 100.0
            for _ in range(5):
                assert status_and_json(raw_exchange(live, b"NOT HTTP AT ALL\r\n\r\n"))[0] == 400
            assert live.metric("perceiver_requests_total", **labels) == 5
        finally:
            live.stop()
    fields = [r.fields for r in caplog.records if r.name == "perceiver.server" and hasattr(r, "fields")]
    written = [(f.get("status"), f.get("refusals_not_logged", 0)) for f in fields if f.get("status", 400) == 400]
    assert written == [(400, 0), (None, 4)], fields  # the first, then the four left out, at shutdown

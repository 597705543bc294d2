"""The Open Inference Protocol (KServe v2) spoken to NVIDIA's own client, tritonclient[http] from PyPI, against a
live demo server: health, the repository index, metadata, inference on every task with JSON tensors and with
binary tensors (the client's default), protocol errors, and the same answer as the REST API for the same input."""

from __future__ import annotations

import base64
import gzip
import io
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from app.errors import BadRequest
from app.middleware import answer_coding
from app.routes.requests import INFLATE_SLICE, MAX_MEMBERS, inflate

from .conftest import MEDIA, LiveServer, until

GZIP = {"content-type": "application/json", "content-encoding": "gzip"}

ROOT = MEDIA.parents[1]
CAT = (MEDIA / "cat.jpg").read_bytes()
COFFEE = (MEDIA / "coffee.jpg").read_bytes()


@pytest.fixture
def client(demo_server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(demo_server.url.removeprefix("http://"), network_timeout=120)
    yield c
    c.close()


def strings(*values: bytes) -> np.ndarray:
    return np.array(list(values), dtype=np.object_)


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool) -> triton.InferInput:
    t = triton.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def rest(demo_server: LiveServer, path: str, **kwargs: object) -> httpx.Response:
    with demo_server.client() as c:
        r = c.post(path, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    return r


def served_names(demo_server: LiveServer) -> list[str]:
    return [m.name.replace("/", ".") for m in demo_server.runtime.engines()]


# ---------------------------------------------------------------------------------------------- server and models


def test_liveness_readiness_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "perceiver-serve" and "binary_tensor_data" in meta["extensions"]


def test_repository_index_lists_every_served_model(
    client: triton.InferenceServerClient, demo_server: LiveServer
) -> None:
    index = client.get_model_repository_index()
    assert sorted(m["name"] for m in index) == sorted(served_names(demo_server))
    assert {"classify.learned", "classify.fourier", "classify.conv", "fill-mask", "optical-flow"} <= {
        m["name"] for m in index
    }
    assert all(m["state"] == "READY" and m["version"] == "1" for m in index)


@pytest.mark.parametrize(
    ("name", "inputs", "outputs"),
    [
        ("classify.learned", {"IMAGE": "BYTES"}, {"LABELS": "BYTES", "SCORES": "FP32", "INDICES": "INT64"}),
        ("classify-text", {"TEXT": "BYTES"}, {"LABELS": "BYTES", "SCORES": "FP32", "INDICES": "INT64"}),
        ("fill-mask", {"TEXT": "BYTES"}, {"TEXT": "BYTES", "CANDIDATE_BYTES": "INT64", "CANDIDATE_SCORES": "FP32"}),
        ("optical-flow", {"FRAME1": "BYTES", "FRAME2": "BYTES"}, {"FLOW": "FP32"}),
        ("autoencode", {"VIDEO": "BYTES", "AUDIO": "BYTES"}, {"LABELS": "BYTES", "AUDIO_SOURCE": "BYTES"}),
    ],
)
def test_metadata_names_inputs_outputs_and_the_checkpoint(
    client: triton.InferenceServerClient, name: str, inputs: dict[str, str], outputs: dict[str, str]
) -> None:
    meta = client.get_model_metadata(name)
    assert meta["name"] == name and meta["versions"] == ["1"]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == inputs
    assert outputs.items() <= {o["name"]: o["datatype"] for o in meta["outputs"]}.items()
    assert all(o["shape"][0] == -1 for o in meta["outputs"])  # the batch
    assert meta["parameters"]["source"] == "demo" and meta["parameters"]["weights"] == "random-init"
    assert meta["parameters"]["served_name"] == name.replace(".", "/")
    assert client.get_model_metadata(name, model_version="1") == meta
    assert client.is_model_ready(name) and client.is_model_ready(name, model_version="1")


def test_an_unknown_model_or_version_is_a_404_in_the_protocols_error_body(demo_server: LiveServer) -> None:
    with demo_server.client() as c:
        for path in ("/v2/models/classify.nope", "/v2/models/classify.learned/versions/2", "/v2/models/x/ready"):
            r = c.get(path)
            assert r.status_code == 404 and isinstance(r.json()["error"], str), (path, r.text)
        assert "classify.learned" in c.get("/v2/models/classify.nope").json()["error"]  # names what is served
        r = c.post("/v2/models/classify/learned/infer", json={})  # a slash in the name: not a route
        assert r.status_code == 404 and "did you mean /v2/models/classify.learned/infer?" in r.json()["error"], r.text
        r = c.get("/v2/models/classify/conv/versions/1/ready")
        assert r.status_code == 404 and "/v2/models/classify.conv/versions/1/ready?" in r.json()["error"], r.text
        r = c.get("/v2/models/classify/nope")  # not a served name either way: no guess
        assert r.status_code == 404 and "did you mean" not in r.json()["error"], r.text


# ---------------------------------------------------------------------------------------------- inference


def infer(
    client: triton.InferenceServerClient, name: str, inputs: list[triton.InferInput], binary: bool, **parameters: object
) -> triton.InferResult:
    meta = client.get_model_metadata(name)
    outputs = [triton.InferRequestedOutput(o["name"], binary_data=binary) for o in meta["outputs"]]
    return client.infer(name, inputs, outputs=outputs, parameters=parameters or None)


def text(element: bytes | str) -> str:
    """A BYTES element as tritonclient gives it: bytes from binary data, str from JSON."""
    return element.decode() if isinstance(element, bytes) else element


def predictions(result: triton.InferResult) -> list[list[tuple[str, int, np.float32]]]:
    labels, indices, scores = (result.as_numpy(n) for n in ("LABELS", "INDICES", "SCORES"))
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    return [
        [(text(lab), int(i), s) for lab, i, s in zip(*row, strict=True)]
        for row in zip(labels, indices, scores, strict=True)
    ]


def as_rest(body: dict[str, object]) -> list[tuple[str, int, np.float32]]:
    return [(p["label"], p["index"], np.float32(p["score"])) for p in body["predictions"]]  # type: ignore[attr-defined, index]


@pytest.mark.parametrize("variant", ["learned", "fourier", "conv"])
@pytest.mark.parametrize("binary", [True, False])
def test_classify_gives_the_rest_answer(
    client: triton.InferenceServerClient, demo_server: LiveServer, variant: str, binary: bool
) -> None:
    """Binary tensors carry the JPEG files; JSON tensors carry the decoded pixels as UINT8 [N, H, W, 3]. One
    model, one answer: the same scores as /v1/classify for the same image (the JSON path's pixels are those of
    the same photo as a PNG, which REST is given too)."""
    name = f"classify.{variant}"
    if binary:
        images, files = [CAT, COFFEE], [CAT, COFFEE]
        inputs = [tensor("IMAGE", strings(*images), "BYTES", True)]
    else:
        arrays = np.stack([pixels(CAT)[:300, :400], pixels(COFFEE)[:300, :400]])
        files = [_png(a) for a in arrays]
        inputs = [tensor("IMAGE", arrays, "UINT8", False)]
    result = infer(client, name, inputs, binary, top_k=3)
    uploads = [("image", data) for data in files]  # both in one request, as both rows are: the same batches
    body = rest(demo_server, "/v1/classify", files=uploads, data={"top_k": "3", "model": variant}).json()
    assert predictions(result) == [as_rest(row) for row in body["results"]]
    assert result.as_numpy("SCORES").shape == (2, 3)
    assert result.get_response()["model_name"] == name


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("binary", [True, False])
def test_classify_text_gives_the_rest_answer(
    client: triton.InferenceServerClient, demo_server: LiveServer, binary: bool
) -> None:
    """Each text alone gives exactly the REST answer; a batch of texts gives each row that answer too, to float
    precision (a forward pass of two rows need not round like one of one)."""
    texts = ["What a wonderful day!", "Ünïcödé works too ✓"]
    batch = infer(
        client, "classify-text", [tensor("TEXT", strings(*(t.encode() for t in texts)), "BYTES", binary)], binary
    )
    for sentence, row in zip(texts, predictions(batch), strict=True):
        alone = infer(client, "classify-text", [tensor("TEXT", strings(sentence.encode()), "BYTES", binary)], binary)
        expected = as_rest(rest(demo_server, "/v1/classify-text", json={"text": sentence, "top_k": 5}).json())
        assert predictions(alone) == [expected]
        assert [p[:2] for p in row] == [p[:2] for p in expected] and len(row) == 2  # two demo classes: top_k 5 gives 2
        assert np.allclose([p[2] for p in row], [p[2] for p in expected], atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_fill_mask_gives_the_rest_answer(
    client: triton.InferenceServerClient, demo_server: LiveServer, binary: bool
) -> None:
    """Rows with fewer masks are padded (offset -1, byte -1, score 0). Each text alone gives exactly the REST
    answer; in a batch, to float precision."""
    texts = ["The sky is [MASK][MASK][MASK][MASK].", "A[MASK]c"]
    inputs = [tensor("TEXT", strings(*(t.encode() for t in texts)).reshape(2, 1), "BYTES", binary)]  # [N, 1] too
    batch = infer(client, "fill-mask", inputs, binary, top_k=2)
    names = ("BYTE_OFFSETS", "CANDIDATE_BYTES", "CANDIDATE_SCORES")
    assert batch.as_numpy(names[0]).shape == (2, 4) and batch.as_numpy(names[1]).shape == (2, 4, 2)
    for i, sentence in enumerate(texts):
        body = rest(demo_server, "/v1/fill-mask", json={"text": sentence, "top_k": 2}).json()
        alone = infer(
            client, "fill-mask", [tensor("TEXT", strings(sentence.encode()), "BYTES", binary)], binary, top_k=2
        )
        masks = body["masks"]
        offsets, candidates, scores = (alone.as_numpy(n)[0] for n in names)
        assert text(alone.as_numpy("TEXT")[0]) == body["text"]
        assert list(offsets) == [m["byte_offset"] for m in masks]
        assert [list(c) for c in candidates] == [[c["byte"] for c in m["candidates"]] for m in masks]
        assert [list(s) for s in scores] == [[np.float32(c["score"]) for c in m["candidates"]] for m in masks]
        rows = [batch.as_numpy(n)[i] for n in names]
        assert list(rows[0][: len(masks)]) == list(offsets) and all(rows[0][len(masks) :] == -1)
        assert all(rows[1][len(masks) :].ravel() == -1) and all(rows[2][len(masks) :].ravel() == 0)
        assert np.allclose(rows[2][: len(masks)], scores, atol=1e-5)


@pytest.mark.slow
def test_optical_flow_gives_the_rest_answer_from_files_or_arrays(
    client: triton.InferenceServerClient, demo_server: LiveServer
) -> None:
    frame1, frame2 = (ROOT / "examples" / "frame1.png").read_bytes(), (ROOT / "examples" / "frame2.png").read_bytes()
    npy = rest(
        demo_server, "/v1/optical-flow", files={"frame1": frame1, "frame2": frame2}, data={"format": "npy"}
    ).content
    expected = np.load(io.BytesIO(npy))
    files = [tensor("FRAME1", strings(frame1), "BYTES", True), tensor("FRAME2", strings(frame2), "BYTES", True)]
    flow = infer(client, "optical-flow", files, True).as_numpy("FLOW")
    assert flow.dtype == np.float32 and flow.shape == (1, *expected.shape)
    assert np.array_equal(flow[0], expected)  # float32 as computed, not rounded as the JSON format is
    arrays = [tensor(n, pixels(f), "UINT8", False) for n, f in (("FRAME1", frame1), ("FRAME2", frame2))]
    flow = infer(client, "optical-flow", arrays, False).as_numpy("FLOW")  # [H, W, 3] arrays, JSON tensors
    assert flow.shape == (1, *expected.shape) and np.abs(flow[0] - expected).max() < 1e-6


@pytest.mark.parametrize("binary", [True, False])
def test_autoencode_gives_the_rest_answer(
    client: triton.InferenceServerClient, demo_server: LiveServer, binary: bool
) -> None:
    """Binary tensors carry the MP4 as it is; JSON tensors carry it as base64 (content_type: base64)."""
    video = (ROOT / "examples" / "clip.mp4").read_bytes()
    if binary:
        inputs = [tensor("VIDEO", strings(video), "BYTES", True)]
    else:
        inputs = [tensor("VIDEO", strings(base64.b64encode(video)), "BYTES", False)]
        inputs[0]._parameters["content_type"] = "base64"  # tritonclient has no setter; the request carries it
    result = infer(client, "autoencode", inputs, binary, top_k=3)
    body = rest(demo_server, "/v1/autoencode", files={"video": video}, data={"top_k": "3"}).json()
    assert predictions(result) == [as_rest(body)]
    assert text(result.as_numpy("AUDIO_SOURCE")[0]) == body["audio_source"]


def test_a_plain_json_client_needs_no_tritonclient(demo_server: LiveServer) -> None:
    request = {
        "id": "42",
        "inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["What a wonderful day!"]}],
        "parameters": {"top_k": 1},
    }
    with demo_server.client() as c:
        r = c.post("/v2/models/classify-text/infer", json=request)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    body = r.json()
    assert body["id"] == "42" and body["model_name"] == "classify-text" and body["model_version"] == "1"
    assert {o["name"]: o["shape"] for o in body["outputs"]} == {"LABELS": [1, 1], "SCORES": [1, 1], "INDICES": [1, 1]}
    assert int(r.headers["x-batch-size"]) >= 1  # the batcher's timing headers, as on /v1


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ([("TEXT", np.array([1.0], dtype=np.float32), "FP32")], "TEXT: datatype FP32; expected BYTES"),
        ([("TEXT", strings(b"a", b"b", b"c", b"d").reshape(2, 2), "BYTES")], "TEXT: shape [2, 2] for BYTES"),
        ([("IMAGE", strings(b"x"), "BYTES")], "IMAGE: no such input"),
    ],
)
def test_a_wrong_datatype_shape_or_name_is_a_400_that_says_so(
    client: triton.InferenceServerClient, inputs: list[tuple[str, np.ndarray, str]], needle: str
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("classify-text", [tensor(n, a, d, True) for n, a, d in inputs])
    assert caught.value.status() == "400" and needle in caught.value.message()


def test_malformed_requests_are_400s_with_the_protocols_error_body(demo_server: LiveServer) -> None:
    url = "/v2/models/classify.learned/infer"
    image = {"name": "IMAGE", "shape": [1, 2, 2, 3], "datatype": "UINT8"}
    binary = {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}
    cases: list[tuple[bytes, dict[str, str]]] = [
        (b"{not json", {}),
        (json.dumps({"inputs": []}).encode(), {}),
        (json.dumps({"inputs": [image | {"data": [1, 2, 3]}]}).encode(), {}),  # too few values
        (json.dumps({"inputs": [image | {"data": [300] * 12}]}).encode(), {}),  # not UINT8
        (json.dumps({"inputs": [image | {"data": [0.5] * 12}]}).encode(), {}),  # not integers
        (json.dumps({"inputs": [image | {"data": [0] * 12}], "parameters": {"topk": 2}}).encode(), {}),  # unknown
        (json.dumps({"inputs": [binary]}).encode(), {}),  # 9 binary bytes announced, none sent
        (json.dumps({"inputs": [image]}).encode(), {"inference-header-content-length": "999"}),  # past the body
    ]
    with demo_server.client() as c:
        for body, headers in cases:
            r = c.post(url, content=body, headers=headers)
            assert r.status_code == 400, (body[:80], r.text)
            assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str), r.text
        # The protocol has one status for a request it cannot take: 400, with the reason in the message.
        r = c.post(url, content=b"{}", headers={"content-encoding": "br"})
        assert r.status_code == 400 and "gzip, deflate or uncompressed" in r.json()["error"], r.text
        # Integers past int64 were read by numpy as floats or objects: "numbers with fractions" (audit).
        for data in ([-1, 2**64 - 1, 1], [2**64, 1, 1]):
            r = c.post(url, json={"inputs": [{"name": "IMAGE", "shape": [1, 1, 3], "datatype": "UINT8", "data": data}]})
            assert r.status_code == 400 and f"values from {min(data)} to {max(data)} do not fit UINT8" in r.text
        undecodable = {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["not an image"]}]}
        r = c.post(url, json=undecodable)
        assert r.status_code == 400 and set(r.json()) == {"error"}, r.text  # the task's own verdict, v2's body
        assert "image" in r.json()["error"].lower(), r.text


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_request_gives_the_answer_of_the_uncompressed_one(
    client: triton.InferenceServerClient, algorithm: str
) -> None:
    """tritonclient's request_compression_algorithm, which Triton reads: it was a 400 asking for the request
    uncompressed. Binary tensors too (the header length counts the inflated JSON, as Triton reads it)."""
    image = tensor("IMAGE", strings(CAT), "BYTES", binary=True)
    text = tensor("TEXT", strings(b"What a wonderful day!"), "BYTES", binary=False)
    for name, inputs in (("classify.learned", [image]), ("classify-text", [text])):
        meta = client.get_model_metadata(name)
        outputs = [triton.InferRequestedOutput(o["name"], binary_data=True) for o in meta["outputs"]]
        plain = client.infer(name, inputs, outputs=outputs)
        packed = client.infer(name, inputs, outputs=outputs, request_compression_algorithm=algorithm)
        assert predictions(packed) == predictions(plain)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_an_answer_is_compressed_when_the_client_asks_for_it(
    client: triton.InferenceServerClient, demo_server: LiveServer, algorithm: str
) -> None:
    """tritonclient's response_compression_algorithm (its Accept-Encoding), which Triton honours: answers went
    uncompressed. The same tensors, binary or JSON; on the wire, the coding asked for (deflate is the zlib format,
    as tritonclient reads it), with Vary: Accept-Encoding, which an answer that could be compressed says either
    way. Not asked for, refused (q=0), a coding we do not write, an answer under 1 KiB, any other /v2 answer (as
    Triton), an error, or a docs asset (its ETag names its bytes; a range of it too): as it is."""
    masks = [tensor("TEXT", strings(b"[MASK]" * 40), "BYTES", binary) for binary in (True, False)]
    names = ("BYTE_OFFSETS", "CANDIDATE_BYTES", "CANDIDATE_SCORES")
    for binary, inputs in zip((True, False), masks, strict=True):
        outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in names]
        plain = client.infer("fill-mask", [inputs], outputs=outputs, parameters={"top_k": 8})
        packed = client.infer(
            "fill-mask", [inputs], outputs=outputs, parameters={"top_k": 8}, response_compression_algorithm=algorithm
        )
        for name in names:
            assert np.allclose(packed.as_numpy(name), plain.as_numpy(name), atol=1e-5), name
    inflate_it = gzip.decompress if algorithm == "gzip" else __import__("zlib").decompress
    infer_body = {
        "inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["[MASK]" * 40]}],
        "parameters": {"top_k": 8},
    }
    with demo_server.client() as c:
        for method, url, body in (
            ("GET", "/openapi.json", None),
            ("GET", "/metrics", None),
            ("POST", "/v2/models/fill-mask/infer", infer_body),
        ):
            with c.stream(method, url, json=body, headers={"accept-encoding": algorithm}) as r:
                raw = b"".join(r.iter_raw())
            assert r.status_code == 200 and r.headers["content-encoding"] == algorithm, (url, r.headers)
            assert "Accept-Encoding" in r.headers["vary"] and int(r.headers["content-length"]) == len(raw)
            whole = inflate_it(raw)
            assert len(raw) < len(whole) / 2, (url, len(raw), len(whole))
            if url == "/openapi.json":
                assert whole == c.get(url, headers={"accept-encoding": "identity"}).content
            else:
                assert whole.startswith(b"{" if url.startswith("/v2") else b"#")
        for accept in ("identity", f"{algorithm};q=0", "br", ""):
            r = c.get("/openapi.json", headers={"accept-encoding": accept})
            assert "content-encoding" not in r.headers and r.json()["openapi"], accept
            assert "Accept-Encoding" in r.headers["vary"], accept
        ask = {"accept-encoding": algorithm}
        r = c.get("/readyz", headers=ask)
        assert len(r.content) < 1024 and "content-encoding" not in r.headers
        for url in ("/v2/models/stats", "/static/docs/swagger-ui.css"):
            r = c.get(url, headers=ask)
            assert r.status_code == 200 and len(r.content) > 1024 and "content-encoding" not in r.headers, url
        r = c.get("/static/docs/swagger-ui.css", headers={**ask, "range": "bytes=0-4999"})
        assert r.status_code == 206 and len(r.content) == 5000 and "content-encoding" not in r.headers
        wrong = c.post("/v1/fill-mask", json={"text": "[MASK]", "top_k": 8, "x" * 2000: 1}, headers=ask)
        assert wrong.status_code == 422 and len(wrong.content) > 1024 and "content-encoding" not in wrong.headers


def test_tritonclients_asyncio_client_reads_every_answer(demo_server: LiveServer) -> None:
    """tritonclient.http.aio turns aiohttp's decompression off, and aiohttp still asks for gzip: it parsed the
    compressed statistics answer (3.2 KB) as JSON and failed (review). Triton compresses infer answers only, and
    so do we; the client inflates those itself. An error of more than 1 KiB reaches it as the server's message."""
    import asyncio

    import tritonclient.http.aio as aio

    async def check() -> None:
        c = aio.InferenceServerClient(demo_server.url.removeprefix("http://"))
        try:
            stats = await c.get_inference_statistics()
            assert "fill-mask" in {m["name"] for m in stats["model_stats"]}
            assert "fill-mask" in {m["name"] for m in await c.get_model_repository_index()}
            assert (await c.get_model_config("fill-mask"))["name"] == "fill-mask"
            text = aio.InferInput("TEXT", [1], "BYTES")
            text.set_data_from_numpy(strings(b"[MASK]" * 40))
            got = []
            for algorithm in (None, "gzip", "deflate"):
                result = await c.infer(
                    "fill-mask", [text], parameters={"top_k": 8}, response_compression_algorithm=algorithm
                )
                got.append(result.as_numpy("CANDIDATE_BYTES"))
            assert got[0].shape == (1, 40, 8) and all((g == got[0]).all() for g in got)
            with pytest.raises(InferenceServerException, match=r"is not served; models: classify\.learned"):
                await c.infer("x" * 1500, [text])
        finally:
            await c.close()

    asyncio.run(check())


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        ("gzip, deflate, br, zstd", "gzip"),  # httpx's, a browser's
        ("deflate", "deflate"),
        ("deflate;q=1, gzip;q=0.5", "deflate"),
        ("X-GZIP", "gzip"),
        ("*", "gzip"),
        ("br;q=1, *;q=0.1", "gzip"),
        ("gzip;q=0, *", "deflate"),  # * stands for what it does not name
        ("gzip;q=0", None),
        ("gzip;q=nonsense", None),
        ("identity", None),
        ("br", None),
    ],
)
def test_the_answers_coding_follows_accept_encoding(accept: str, coding: str | None) -> None:
    assert answer_coding(accept) == coding


def test_answers_in_a_compressed_format_or_streamed_go_as_they_are() -> None:
    """A flow's png or an mp4 is compressed already: zlib would spend its time for nothing. A streamed answer
    (several body parts) goes as it is, and so does one with a coding of its own."""
    import asyncio

    from app.middleware import CompressAnswers

    text = b'{"x": "' + b"a" * 4000 + b'"}'

    def answer(content_type: bytes, parts: list[bytes], coding: bytes | None = None) -> tuple[dict, bytes]:
        async def app(scope: dict, receive: object, send: Any) -> None:
            headers = [(b"content-type", content_type), (b"content-length", str(sum(map(len, parts))).encode())]
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": headers + ([(b"content-encoding", coding)] if coding else []),
                }
            )
            for i, part in enumerate(parts):
                await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "headers": [(b"accept-encoding", b"gzip")]}
        asyncio.run(CompressAnswers(app)(scope, None, send))  # type: ignore[arg-type]
        return dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    headers, body = answer(b"application/json", [text])
    assert headers[b"content-encoding"] == b"gzip" and gzip.decompress(body) == text
    assert headers[b"content-length"] == str(len(body)).encode()
    for content_type, parts, coding in (
        (b"image/png", [text], None),
        (b"video/mp4", [text], None),
        (b"application/x-npz", [text], None),
        (b"application/json", [text[:2000], text[2000:]], None),
        (b"application/json", [gzip.compress(text)], b"gzip"),
    ):
        headers, body = answer(content_type, parts, coding)
        assert headers.get(b"content-encoding") == coding and body == b"".join(parts), content_type


def test_a_compressed_body_is_bounded_as_it_inflates_and_checked(demo_server: LiveServer) -> None:
    """A gzip bomb (twice max_body_bytes of spaces in a few KB) is a 413 once it passes max_body_bytes, not after
    inflating it all; a body that is not what its coding says, or ends early, is a 400 that says so."""
    import zlib

    url = "/v2/models/classify-text/infer"
    v2 = json.dumps({"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}).encode()
    limit = demo_server.runtime.settings.max_body_bytes
    bomb = gzip.compress(v2 + b" " * (2 * limit))
    assert len(bomb) < limit // 100
    with demo_server.client() as c:
        r = c.post(url, content=bomb, headers={"content-encoding": "gzip"})
        assert r.status_code == 413 and f"inflates to more than {limit} bytes" in r.json()["error"], r.text
        for body, coding, says in (
            (v2, "gzip", "not the gzip data"),
            (gzip.compress(v2)[:-12], "gzip", "ends before its compressed stream does"),
            (zlib.compress(v2) + b"more", "deflate", "bytes after its compressed stream"),
        ):
            r = c.post(url, content=body, headers={"content-encoding": coding})
            assert r.status_code == 400 and says in r.json()["error"], (coding, r.text)
        raw = zlib.compressobj(wbits=-15)  # "deflate" as a raw stream, which some clients send
        r = c.post(url, content=raw.compress(v2) + raw.flush(), headers={"content-encoding": "deflate"})
        # Codings over several lines are one list: gzip twice was inflated once, then read as JSON (audit).
        twice = [("content-encoding", "gzip"), ("content-encoding", "gzip")]
        nested = c.post(url, content=gzip.compress(gzip.compress(v2)), headers=twice)
        assert nested.status_code == 400 and "'gzip, gzip' is not supported" in nested.json()["error"], nested.text
        two = gzip.compress(v2[:10]) + gzip.compress(v2[10:])  # two gzip members: one body
        assert (
            r.status_code == 200 and c.post(url, content=two, headers={"content-encoding": "gzip"}).status_code == 200
        )


def test_a_body_of_many_gzip_members_is_refused_and_read_in_one_pass() -> None:
    """Every gzip member's end left zlib a copy of the rest of the body: 20-byte empty members made the work grow
    with the square of the body (6.4 MB: 50 s of a decode thread). Input now goes in bounded slices, and a body of
    more than MAX_MEMBERS members is a 400; up to that it is read, zero padding after it too."""
    empty = gzip.compress(b"", mtime=0)
    with pytest.raises(BadRequest, match=f"more than {MAX_MEMBERS} members"):
        inflate(empty * 20_000, "gzip", 32 << 20)
    member = gzip.compress(b"ab", mtime=0)
    assert inflate(member * MAX_MEMBERS + bytes(INFLATE_SLICE + 7), "gzip", 1 << 20) == b"ab" * MAX_MEMBERS
    # A member across the slices' edges, and one within the last slice.
    big = bytes(range(256)) * 600
    assert inflate(gzip.compress(big, 0) + gzip.compress(b"end"), "gzip", 1 << 20) == big + b"end"


def test_keys_guard_inference_but_not_the_health_probes() -> None:
    server = LiveServer(demo_tasks=["classify-text"], api_keys="sesame").start()
    try:
        with server.client() as c:
            assert c.get("/v2/health/live").status_code == 200 and c.get("/v2/health/ready").status_code == 200
            r = c.get("/v2/models/classify-text")
            assert r.status_code == 401 and isinstance(r.json()["error"], str)
            assert c.get("/v2/models/classify-text", headers={"authorization": "Bearer sesame"}).status_code == 200
        keyed = triton.InferenceServerClient(server.url.removeprefix("http://"))
        text = tensor("TEXT", strings(b"hello"), "BYTES", True)
        with pytest.raises(InferenceServerException) as caught:
            keyed.infer("classify-text", [text])
        assert caught.value.status() == "401"
        assert keyed.infer("classify-text", [text], headers={"x-api-key": "sesame"}).as_numpy("SCORES").shape == (1, 2)
        keyed.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- shared capacity


def test_v2_and_rest_share_the_batcher_its_backpressure_and_metrics() -> None:
    """A queue filled by REST requests refuses v2 ones (429, Retry-After, the v2 error body), and v2 requests
    count in the task's metrics and share forward passes with REST ones. The forward pass is held while the
    queue fills, so it stays full while the v2 request arrives, and the mixed four queue together."""
    server = LiveServer(  # refused by count only: the queue-delay target off, so a busy machine's estimates do not
        demo_tasks=["classify-text"], max_batch_size=8, max_delay_ms=1000, max_queue_size=4, max_queue_delay_ms=None
    ).start()
    labels = {"task": "classify-text", "model": "classify-text"}
    v2 = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["v2"]}]}
    batcher = server.runtime.engine_for("classify-text").batcher

    def behind_a_held_pass(pool: ThreadPoolExecutor, c: httpx.Client) -> tuple[threading.Event, Future[httpx.Response]]:
        """The forward pass held, and a batch of one REST request waiting for it: what arrives now queues."""
        gate = server.hold_inference()
        first = pool.submit(c.post, "/v1/classify-text", json={"text": "first"})
        until(lambda: batcher.running == 1, "a batch waiting for the pass")
        return gate, first

    try:
        with server.client() as c, ThreadPoolExecutor(8) as pool:
            gate, first = behind_a_held_pass(pool, c)
            try:
                queued = [pool.submit(c.post, "/v1/classify-text", json={"text": f"rest {i}"}) for i in range(4)]
                until(lambda: batcher.depth == 4, "the queue full")
                refused = c.post("/v2/models/classify-text/infer", json=v2)
            finally:
                gate.set()
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert set(refused.json()) == {"error"} and "overloaded" in refused.json()["error"]
            assert all(f.result().status_code == 200 for f in [first, *queued])
            assert server.metric("perceiver_rejections_total", **labels, reason="queue_full") == 1
            gate, first = behind_a_held_pass(pool, c)
            try:
                before = server.metric("perceiver_batches_total", **labels)
                mixed = [pool.submit(c.post, "/v1/classify-text", json={"text": "rest"}) for _ in range(2)]
                mixed += [pool.submit(c.post, "/v2/models/classify-text/infer", json=v2) for _ in range(2)]
                until(lambda: batcher.depth == 4, "the four queued together")
            finally:
                gate.set()
            assert all(f.result().status_code == 200 for f in [first, *mixed])
            # the held batch, then one forward pass for all four
            assert server.metric("perceiver_batches_total", **labels) - before == 2
            assert {int(f.result().headers["x-batch-size"]) for f in mixed} == {4}
        assert server.metric("perceiver_requests_total", **labels, status="200") == 10  # v2 ones counted too
    finally:
        server.stop()


def test_draining_turns_v2_readiness_off_and_refuses_inference_in_the_protocols_body() -> None:
    server = LiveServer(demo_tasks=["classify-text"]).start()
    v2 = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["late"]}]}
    try:
        with server.client() as c:
            server.runtime.begin_drain()
            assert c.get("/v2/health/ready").json() == {"ready": False}
            assert c.get("/v2/health/ready").status_code == 503 and c.get("/v2/health/live").status_code == 200
            assert c.get("/v2/models/classify-text/ready").status_code == 503
            (entry,) = c.post("/v2/repository/index").json()
            assert (entry["state"], entry["reason"]) == ("UNAVAILABLE", "draining")
            assert c.post("/v2/repository/index", json={"ready": True}).json() == []
            # Its body's coding is read as infer's is: gzip was read as JSON ("Invalid JSON"), br passed (audit).
            packed = c.post("/v2/repository/index", content=gzip.compress(b'{"ready": true}'), headers=GZIP)
            assert packed.status_code == 200 and packed.json() == [], packed.text
            assert c.post("/v2/repository/index", content=b"", headers=GZIP).status_code == 200  # no body, no coding
            r = c.post("/v2/repository/index", content=b"{}", headers={"content-encoding": "br"})
            assert r.status_code == 400 and "'br' is not supported" in r.json()["error"], r.text
            r = c.post("/v2/models/classify-text/infer", json=v2)
            assert r.status_code == 503 and set(r.json()) == {"error"}, r.text
        labels = {"task": "classify-text", "model": "", "reason": "draining"}
        assert server.metric("perceiver_rejections_total", **labels) == 1  # counted under the v2 call's task
    finally:
        server.stop()


def test_a_configured_checkpoint_shows_its_source_and_revision(tmp_path: Path) -> None:
    from reference import save_small_image_classifier  # tests/reference.py: a tiny transformers checkpoint

    checkpoint = tmp_path / "fourier"
    save_small_image_classifier(checkpoint, ["tabby cat", "espresso", "daisy"])
    spec = {"task": "classify", "variant": "fourier", "source": str(checkpoint), "revision": "v1"}
    server = LiveServer(models=[spec]).start()
    try:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        assert [m["name"] for m in client.get_model_repository_index()] == ["classify.fourier"]
        meta = client.get_model_metadata("classify.fourier")
        parameters = meta["parameters"]
        assert (parameters["source"], parameters["revision"]) == (str(checkpoint), "v1")
        assert parameters["weights"] == "pretrained" and parameters["served_name"] == "classify/fourier"
        image = tensor("IMAGE", strings(CAT), "BYTES", True)
        labels = client.infer("classify.fourier", [image], parameters={"top_k": 3}).as_numpy("LABELS")
        assert {text(label) for label in labels[0]} == {"tabby cat", "espresso", "daisy"}
        client.close()
    finally:
        server.stop()


# ------------------------------------------------------------------------------------ what the protocol allows


def test_protocol_legal_extras_are_taken_and_every_response_has_an_id(demo_server: LiveServer) -> None:
    """KServe's SDK puts model_name in the body; Triton's clients add parameters of their own, objects included.
    Both are protocol-legal: taken (model_name checked against the path) or ignored, never a 400."""
    text = {"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hello"], "parameters": {"x": {"a": 1}}}
    request = {
        "model_name": "classify-text",
        "inputs": [text],
        "outputs": [{"name": "SCORES", "parameters": {"tag": {"nested": [1, 2]}}}],
        "parameters": {"headers": {"x-trace": "1"}, "sequence_id": 0, "top_k": 1},
    }
    with demo_server.client() as c:
        r = c.post("/v2/models/classify-text/infer", json=request, headers={"x-request-id": "abc-123"})
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "abc-123"  # none in the body: the server's id for the request, as in its log
        assert [o["name"] for o in r.json()["outputs"]] == ["SCORES"]
        r = c.post("/v2/models/classify-text/infer", json=request | {"model_name": "fill-mask"})
        assert r.status_code == 400 and "fill-mask" in r.json()["error"], r.text
        r = c.post("/v2/models/classify-text/infer", json={"inputs": [text], "parameters": {"top_kk": 1}})
        assert r.status_code == 400 and "did you mean top_k" in r.json()["error"], r.text  # a typo is not an extra


def test_the_specs_paths_and_methods(demo_server: LiveServer) -> None:
    with demo_server.client() as c:
        assert c.get("/v2/").json() == c.get("/v2").json()  # the specification writes /v2/
        for method, path in (("DELETE", "/v2/"), ("PUT", "/v2/models/classify-text/infer"), ("POST", "/v2/models")):
            r = c.request(method, path)
            assert r.status_code == 405 and isinstance(r.json()["error"], str), (method, path, r.text)
        models = c.get("/v2/models").json()["models"]
        assert models == served_names(demo_server)


def test_triton_config_statistics_and_classification_over_http(
    client: triton.InferenceServerClient, demo_server: LiveServer
) -> None:
    """What perf_analyzer and Triton's clients read before they send anything, in Triton's JSON form."""
    config = client.get_model_config("classify.learned")
    assert config["name"] == "classify.learned" and config["max_batch_size"] >= 1
    assert config["input"] == [{"name": "IMAGE", "data_type": "TYPE_STRING", "dims": [1], "optional": False}]
    assert {o["name"]: o["data_type"] for o in config["output"]} == {
        "LABELS": "TYPE_STRING",
        "SCORES": "TYPE_FP32",
        "INDICES": "TYPE_INT64",
    }
    engine = demo_server.runtime.engine_for("classify", "learned")
    assert config["dynamic_batching"]["preferred_batch_size"] == [engine.policy.max_batch_size]
    before = client.get_inference_statistics("classify.learned")["model_stats"][0]
    image = tensor("IMAGE", strings(CAT, COFFEE).reshape(2, 1), "BYTES", True)  # [N, 1]: the config's dims
    outputs = [triton.InferRequestedOutput("SCORES", class_count=2), triton.InferRequestedOutput("INDICES")]
    result = client.infer("classify.learned", [image], outputs=outputs)
    after = client.get_inference_statistics("classify.learned")["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert after["inference_count"] == before["inference_count"] + 2
    assert after["execution_count"] > before["execution_count"]
    classes = result.as_numpy("SCORES")
    assert classes.shape == (2, 2)
    for row, indices in zip(classes, result.as_numpy("INDICES"), strict=True):
        score, index, label = row[0].decode().split(":")
        assert int(index) == indices[0] and 0 < float(score) <= 1 and label
    assert {"model_configuration", "statistics", "classification"} <= set(client.get_server_metadata()["extensions"])


def test_a_classification_asks_for_its_k_classes_and_applies_to_scores_alone(
    client: triton.InferenceServerClient, demo_server: LiveServer
) -> None:
    """Triton's class_count is the number of classes the caller gets: 8 of the model's 10 (it was capped at the
    request's top_k, 5 by default), while the plain outputs keep top_k's width; on LABELS or INDICES, which are
    classes already, it is a 400 (it relabelled their column with scores)."""
    image = tensor("IMAGE", strings(CAT), "BYTES", True)
    outputs = [triton.InferRequestedOutput("SCORES", class_count=8), triton.InferRequestedOutput("LABELS")]
    result = client.infer("classify.learned", [image], outputs=outputs)
    every = client.infer("classify.learned", [image], parameters={"top_k": 8})  # the same 8 classes, plainly
    classes = [c.decode().split(":") for c in result.as_numpy("SCORES")[0]]
    assert len(classes) == 8 and result.as_numpy("LABELS").shape == (1, 5)
    assert [(int(i), label) for _, i, label in classes] == list(
        zip(every.as_numpy("INDICES")[0].tolist(), (b.decode() for b in every.as_numpy("LABELS")[0]), strict=True)
    )
    assert [row.decode() for row in result.as_numpy("LABELS")[0]] == [label for _, _, label in classes[:5]]
    asked = client.infer("classify.learned", [image], outputs=outputs, parameters={"top_k": "3"})  # as validated
    assert len(asked.as_numpy("SCORES")[0]) == 8 and asked.as_numpy("LABELS").shape == (1, 3)
    body = {"inputs": [{"name": "VIDEO", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    body["outputs"] = [{"name": "SCORES", "parameters": {"classification": 701}}]  # autoencode's top_k: 700 at most
    with demo_server.client() as c:
        r = c.post("/v2/models/autoencode/infer", json=body)
    assert r.status_code == 400 and "a number of classes from 1 to 700, got 701" in r.json()["error"], r.text
    for name in ("LABELS", "INDICES"):
        body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
        body["outputs"] = [{"name": name, "parameters": {"classification": 3}}]
        with demo_server.client() as c:
            r = c.post("/v2/models/classify-text/infer", json=body)
        assert r.status_code == 400 and "it applies to SCORES" in r.json()["error"], r.text


def test_an_empty_outputs_list_asks_for_every_output_as_grpc_does(demo_server: LiveServer) -> None:
    """The spec: "if not specified all outputs produced by the model will be returned"; gRPC cannot tell an
    empty list from none, and over REST [] answered no outputs at all."""
    body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hi"]}], "outputs": []}
    r = rest(demo_server, "/v2/models/classify-text/infer", json=body)
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["LABELS", "SCORES", "INDICES"]


@pytest.mark.parametrize(
    ("model", "parameter", "said"),
    [
        ("autoencode", {"reconstruction": "npz"}, "reconstructions are REST only: POST /v1/autoencode"),
        ("classify.learned", {"model": "fourier"}, "the model is the one the path names"),
        ("fill-mask", {"text": "a [MASK]"}, "the text is the TEXT input's"),
    ],
)
def test_a_v1_field_that_v2_answers_another_way_is_a_400_that_says_how(
    demo_server: LiveServer, model: str, parameter: dict[str, str], said: str
) -> None:
    """A reconstruction asked for was a 200 without one: the parameter was dropped without a word."""
    name = {"autoencode": "VIDEO", "classify.learned": "IMAGE", "fill-mask": "TEXT"}[model]
    body = {"inputs": [{"name": name, "shape": [1], "datatype": "BYTES", "data": ["x"]}], "parameters": parameter}
    with demo_server.client() as c:
        r = c.post(f"/v2/models/{model}/infer", json=body)
    (key,) = parameter
    assert r.status_code == 400 and r.json()["error"].startswith(f"parameters {key}: not a parameter of /v2"), r.text
    assert said in r.json()["error"]

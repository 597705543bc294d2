"""The Open Inference Protocol over gRPC, spoken to by NVIDIA's own client (tritonclient.grpc from PyPI) and by
gRPC's standard health client, against a live demo server: every task with binary (raw) tensors gives the same
numbers as /v2 over HTTP for the same request; Triton's configuration, statistics and classification
extensions; errors as status codes, overload as RESOURCE_EXHAUSTED with its retry delay, the gRPC deadline,
and API keys from the authorization metadata."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from app.batching import ServiceTime
from app.oip.protos import open_inference_grpc_pb2 as pb
from app.routes.v2 import served_models, v2_name

from .conftest import MEDIA, LiveServer, free_port, occupy, release, until

ROOT = MEDIA.parents[1]
CAT = (MEDIA / "cat.jpg").read_bytes()
COFFEE = (MEDIA / "coffee.jpg").read_bytes()


@pytest.fixture
def client(demo_server: LiveServer) -> Iterator[tg.InferenceServerClient]:
    c = tg.InferenceServerClient(demo_server.grpc_target)
    yield c
    c.close()


@pytest.fixture
def http(demo_server: LiveServer) -> Iterator[th.InferenceServerClient]:
    c = th.InferenceServerClient(demo_server.url.removeprefix("http://"), network_timeout=120)
    yield c
    c.close()


def strings(*values: bytes) -> np.ndarray:
    return np.array(list(values), dtype=np.object_)


def _inputs(module: type, given: dict[str, tuple[np.ndarray, str]]) -> list:  # type: ignore[type-arg]
    inputs = []
    for name, (array, datatype) in given.items():
        tensor = module.InferInput(name, list(array.shape), datatype)  # type: ignore[attr-defined]
        tensor.set_data_from_numpy(array)  # grpc: raw_input_contents; http: binary data
        inputs.append(tensor)
    return inputs


TASKS = {
    "classify.learned": ({"IMAGE": (strings(CAT, COFFEE), "BYTES")}, {"top_k": 3}),
    "classify.conv": ({"IMAGE": (strings(COFFEE), "BYTES")}, {}),
    "classify-text": ({"TEXT": (strings(b"What a wonderful day!", "Ünïcödé ✓".encode()), "BYTES")}, {}),
    "fill-mask": ({"TEXT": (strings(b"The sky is [MASK][MASK][MASK][MASK].", b"A[MASK]c"), "BYTES")}, {"top_k": 2}),
    "optical-flow": (
        {
            "FRAME1": (strings((ROOT / "examples" / "frame1.png").read_bytes()), "BYTES"),
            "FRAME2": (strings((ROOT / "examples" / "frame2.png").read_bytes()), "BYTES"),
        },
        {},
    ),
    "autoencode": ({"VIDEO": (strings((ROOT / "examples" / "clip.mp4").read_bytes()), "BYTES")}, {"top_k": 3}),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_gives_the_http_answer_over_grpc(
    client: tg.InferenceServerClient, http: th.InferenceServerClient, name: str
) -> None:
    """The same request over gRPC (raw tensors) and over HTTP (binary tensors): every output equal; floats to 1e-5
    relative, since a forward pass's GEMM shapes can move their last bits (a row alone against the same row among three
    others: 1.5e-7 on the demo conv head), while anything a protocol's conversion loses would fail (fp16 on the
    way: 1e-3)."""
    given, parameters = TASKS[name]
    outputs = [o.name for o in client.get_model_metadata(name).outputs]
    over_grpc = client.infer(
        name,
        _inputs(tg, given),
        outputs=[tg.InferRequestedOutput(o) for o in outputs],
        parameters=parameters or None,
        client_timeout=120,
    )
    over_http = http.infer(
        name,
        _inputs(th, given),
        outputs=[th.InferRequestedOutput(o, binary_data=True) for o in outputs],
        parameters=parameters or None,
    )
    rows = len(next(iter(given.values()))[0])
    for output in outputs:
        got, expected = over_grpc.as_numpy(output), over_http.as_numpy(output)
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.shape[0] == rows, output
        if got.dtype.kind == "f":
            assert np.allclose(got, expected, rtol=1e-5, atol=1e-6), output
        else:
            assert np.array_equal(got, expected), output
    response = over_grpc.get_response()
    assert response.model_name == name and response.model_version == "1" and response.id  # an id on every response


def test_server_and_model_metadata_readiness_and_health(
    client: tg.InferenceServerClient, demo_server: LiveServer
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "perceiver-serve" and {"model_configuration", "statistics"} <= set(meta.extensions)
    model = client.get_model_metadata("classify-text")
    assert model.name == "classify-text" and list(model.versions) == ["1"]
    assert [(i.name, i.datatype, list(i.shape)) for i in model.inputs] == [("TEXT", "BYTES", [-1, 1])]  # Triton's
    assert client.is_model_ready("classify-text") and client.is_model_ready("classify-text", "1")
    with grpc.insecure_channel(demo_server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # "" and the protocol's service name are the server; a model's v2 name is that model
        for service in ("", "inference.GRPCInferenceService", "classify-text", "classify.learned"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_config_statistics_and_classification(client: tg.InferenceServerClient) -> None:
    config = client.get_model_config("classify-text").config
    assert config.name == "classify-text" and config.max_batch_size >= 1
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("TEXT", 13, [1])]  # TYPE_STRING
    assert config.dynamic_batching.preferred_batch_size[0] >= 1
    before = client.get_inference_statistics("classify-text").model_stats[0]
    text = tg.InferInput("TEXT", [2, 1], "BYTES")  # [N, 1], as the config's dims [1] make perf_analyzer send it
    text.set_data_from_numpy(strings(b"What a wonderful day!", b"awful").reshape(2, 1))
    outputs = [tg.InferRequestedOutput(n) for n in ("LABELS", "INDICES")]
    result = client.infer("classify-text", [text], outputs=[*outputs, tg.InferRequestedOutput("SCORES", class_count=2)])
    plain = client.infer("classify-text", [text], outputs=[tg.InferRequestedOutput("SCORES")])
    for algorithm in ("gzip", "deflate"):  # tritonclient's compression (gRPC's own message compression)
        packed = client.infer(
            "classify-text", [text], outputs=[tg.InferRequestedOutput("SCORES")], compression_algorithm=algorithm
        )
        assert np.array_equal(packed.as_numpy("SCORES"), plain.as_numpy("SCORES"))
    after = client.get_inference_statistics("classify-text").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 4
    assert after.inference_count == before.inference_count + 8  # rows
    assert after.inference_stats.queue.ns > before.inference_stats.queue.ns
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    classes = result.as_numpy("SCORES")  # Triton's "score:index:label", best first
    for row, (labels, indices, scores) in enumerate(
        zip(result.as_numpy("LABELS"), result.as_numpy("INDICES"), plain.as_numpy("SCORES"), strict=True)
    ):
        expected = [f"{s:f}:{i}:{lab.decode()}" for s, i, lab in zip(scores, indices, labels, strict=True)]
        assert [c.decode() for c in classes[row]] == expected


def _infer_raw(target: str, request: pb.ModelInferRequest, **kwargs: object) -> pb.ModelInferResponse:
    """ModelInfer with the protocol's own messages, so a test can read a failure's status and trailers."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        return call(request, **kwargs)


def _text_request(model: str = "classify-text") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hello")
    return request


def test_typed_contents_work_and_errors_are_status_codes(demo_server: LiveServer) -> None:
    target = demo_server.grpc_target
    reply = _infer_raw(target, _text_request(), timeout=60)  # bytes_contents, not raw: the protocol allows both
    assert [o.name for o in reply.outputs] == ["LABELS", "SCORES", "INDICES"] and len(reply.raw_output_contents) == 3
    cases = {
        grpc.StatusCode.NOT_FOUND: _text_request("nope"),
        grpc.StatusCode.INVALID_ARGUMENT: pb.ModelInferRequest(model_name="classify-text"),  # no inputs
    }
    wrong = _text_request()
    wrong.inputs[0].datatype = "FP32"
    misplaced = pb.ModelInferRequest(model_name="classify.learned")  # UINT8 values where INT8 ones go
    misplaced.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 2, 2, 3]).contents.int_contents.extend([7] * 12)
    both = _text_request()
    both.raw_input_contents.append(b"\x05\x00\x00\x00hello")
    cases_wrong = [
        (grpc.StatusCode.INVALID_ARGUMENT, wrong, "datatype"),
        (grpc.StatusCode.INVALID_ARGUMENT, misplaced, "UINT8 values go in contents.uint_contents; got int_contents"),
        (grpc.StatusCode.INVALID_ARGUMENT, both, "in raw_input_contents and in contents"),
    ]
    for code, request in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            _infer_raw(target, request, timeout=60)
        assert caught.value.code() == code, caught.value.details()
        assert "Traceback" not in (caught.value.details() or "")
    for code, request, needle in cases_wrong:
        with pytest.raises(grpc.RpcError) as caught:
            _infer_raw(target, request, timeout=60)
        assert caught.value.code() == code and needle in (caught.value.details() or "")
    # bytes that are no protobuf message: INVALID_ARGUMENT in words, not UNKNOWN naming protobuf's DecodeError
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff\xff\x0f", timeout=60)
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "not a inference.ModelInferRequest message" in details and "Error" not in details


def test_a_large_tensor_is_read_off_the_event_loop(demo_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MB UINT8 image tensor is checked, copied and encoded in a worker thread, as HTTP's large bodies are (a
    27 MB one held the event loop, and with it every other call, for a second); a small request stays on the loop,
    where a thread hop would cost more than it saves."""
    from app.oip import grpc as oip_grpc

    threads: list[bool] = []
    real = oip_grpc.prepare

    def watched(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread() is demo_server.thread)  # the server's event loop runs there
        return real(*args, **kwargs)

    monkeypatch.setattr(oip_grpc, "prepare", watched)
    image = pb.ModelInferRequest(model_name="classify.learned")
    image.inputs.add(name="IMAGE", datatype="UINT8", shape=[1, 600, 600, 3])
    image.raw_input_contents.append(np.random.default_rng(0).integers(0, 256, 600 * 600 * 3, np.uint8).tobytes())
    assert len(_infer_raw(demo_server.grpc_target, image, timeout=60).raw_output_contents) == 3
    assert _infer_raw(demo_server.grpc_target, _text_request(), timeout=60).outputs
    assert threads == [False, True]


def test_overload_is_resource_exhausted_with_the_retry_delay_and_the_grpc_deadline_counts(
    demo_server: LiveServer,
) -> None:
    """A busy model whose estimates put a request's own pass at 10 s: a call with an 8 s gRPC deadline (ample for
    a round trip on a busy machine) cannot finish in time and is refused at once, where the server's own 30 s
    would have admitted it (RESOURCE_EXHAUSTED, retry-after in the trailers, counted as
    would_miss_deadline, not as a full queue); the idle model admits it again once the batch is over."""
    engine = demo_server.runtime.engine_for("classify-text")
    labels = {"task": "classify-text", "model": "classify-text", "reason": "would_miss_deadline"}
    refused = demo_server.metric("perceiver_rejections_total", **labels)
    estimates = engine.batcher.service_time
    occupy(engine, 0.1)  # busy: the wait is short, under the queue-delay target
    engine.batcher.service_time = ServiceTime({1: 10.0})  # 12 s with the margin: past 8 s, within 30 s
    try:
        with pytest.raises(grpc.RpcError) as caught:
            _infer_raw(demo_server.grpc_target, _text_request(), timeout=8)
    finally:
        release(engine)
        engine.batcher.service_time = estimates
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    trailers = dict(error.trailing_metadata() or ())
    assert int(trailers["retry-after"]) >= 1 and "overloaded" in (error.details() or "")
    assert demo_server.metric("perceiver_rejections_total", **labels) == refused + 1
    assert _infer_raw(demo_server.grpc_target, _text_request(), timeout=60).outputs


def test_api_keys_come_from_the_authorization_metadata_and_health_needs_none() -> None:
    server = LiveServer(demo_tasks=["classify-text"], api_keys="sesame", grpc_port=free_port()).start()
    try:
        client = tg.InferenceServerClient(server.grpc_target)
        text = tg.InferInput("TEXT", [1], "BYTES")
        text.set_data_from_numpy(strings(b"hello"))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("classify-text", [text])
        assert "UNAUTHENTICATED" in str(caught.value.status())
        with pytest.raises(InferenceServerException):
            client.infer("classify-text", [text], headers={"authorization": "Bearer wrong"})
        result = client.infer("classify-text", [text], headers={"authorization": "Bearer sesame"})
        assert result.as_numpy("SCORES").shape == (1, 2)
        client.close()
        with grpc.insecure_channel(server.grpc_target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


def test_draining_is_unavailable_and_health_says_not_serving(demo_server: LiveServer) -> None:
    """From SIGTERM on, a new call is UNAVAILABLE (retry on another replica) and health is NOT_SERVING, so the
    kubelet's gRPC readiness probe takes the pod out of the Service, as /readyz's 503 does."""
    runtime = demo_server.runtime
    runtime.draining = True
    try:
        with pytest.raises(grpc.RpcError) as caught:
            _infer_raw(demo_server.grpc_target, _text_request(), timeout=60)
        with grpc.insecure_channel(demo_server.grpc_target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        runtime.draining = False
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "another replica" in (caught.value.details() or "")
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_health_watch_ends_once_draining_has_been_said(demo_server: LiveServer) -> None:
    """A Watch stream (as some gRPC load balancers hold) says SERVING, then NOT_SERVING once the drain begins, and
    ends: it ran for ever, and held an idle server's exit for the whole drain timeout (audit: 15.2 s of 15)."""
    runtime = demo_server.runtime
    with grpc.insecure_channel(demo_server.grpc_target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        runtime.draining = True
        try:
            said = [reply.status for reply in stream]  # to the stream's end: a timeout guards against a hang
        finally:
            runtime.draining = False
        assert stream.code() == grpc.StatusCode.OK
    assert said == [health_pb2.HealthCheckResponse.NOT_SERVING]


def test_a_health_watch_says_not_serving_before_it_ends_however_the_drain_falls(demo_server: LiveServer) -> None:
    """The drain began as the stream had yielded SERVING, before it ran on: it ended without NOT_SERVING (review).
    The servicer's stream, stepped by hand so that the drain falls exactly there."""
    import asyncio

    from app.oip.grpc import Health

    async def steps() -> list[int]:
        stream = Health(demo_server.runtime).Watch(health_pb2.HealthCheckRequest(), None)
        said = [(await anext(stream)).status]
        demo_server.runtime.draining = True
        try:
            said += [reply.status async for reply in stream]
        finally:
            demo_server.runtime.draining = False
        return said

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert asyncio.run(steps()) == [serving, not_serving]


def test_the_readmes_grpc_example_runs_as_written_and_prints_what_it_says(demo_server: LiveServer) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Over gRPC\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    run = subprocess.run(
        [sys.executable, "-c", code.replace("localhost:8001", demo_server.grpc_target)],
        cwd=ROOT,  # it reads tests/media/cat.jpg
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    said = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
    assert run.stdout.splitlines() == said


def test_a_call_in_flight_counts_as_http_requests_do(demo_server: LiveServer) -> None:
    """perceiver_inflight_requests (what the drain waits for and the HPA scales on) counts gRPC calls too."""
    gate = demo_server.hold_inference()  # the call waits for the forward pass's thread: in flight until the gate opens
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(_infer_raw, demo_server.grpc_target, _text_request(), timeout=60)
        try:
            deadline = time.monotonic() + 30
            while demo_server.metric("perceiver_inflight_requests") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            in_flight = demo_server.metric("perceiver_inflight_requests")
        finally:
            gate.set()
        assert call.result().outputs
    assert in_flight == 1 and demo_server.metric("perceiver_inflight_requests") == 0


def test_grpc_calls_are_counted_under_the_labels_http_gives_the_model(demo_server: LiveServer) -> None:
    """classify.learned over gRPC counts as task classify, model classify/learned, as /v1 and /v2 count it."""
    labels = {"task": "classify", "model": "classify/learned", "status": "200"}
    before = demo_server.metric("perceiver_requests_total", **labels)
    request = pb.ModelInferRequest(model_name="classify.learned")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.append(CAT)
    assert _infer_raw(demo_server.grpc_target, request, timeout=60).outputs
    assert demo_server.metric("perceiver_requests_total", **labels) == before + 1


def test_model_ready_while_the_models_load_says_not_ready_as_rest_does() -> None:
    """The proto's ModelReadyResponse: "True if the model is ready, false if not ready". While loading it was an
    UNAVAILABLE error, so tritonclient's and KServe's is_model_ready raised instead of answering False."""
    loading = threading.Event()
    gate = threading.Event()

    def slow(model: object) -> object:
        loading.set()
        gate.wait(60)
        return model

    server = LiveServer({"classify-text": slow}, demo_tasks=["classify-text"], grpc_port=free_port())
    server.thread.start()
    try:
        assert loading.wait(60)
        client = tg.InferenceServerClient(server.grpc_target)
        assert client.is_model_ready("classify-text") is False
        assert client.is_server_ready() is False and client.is_server_live()
        with httpx.Client(base_url=server.url) as rest:
            assert rest.get("/v2/models/classify-text/ready").json() == {"name": "classify-text", "ready": False}
            # the repository index names what is loading, as Triton's does (it listed nothing)
            loading = {"name": "classify-text", "version": "1", "state": "LOADING", "reason": "loading"}
            assert rest.post("/v2/repository/index").json() == [loading]
            assert rest.post("/v2/repository/index", json={"ready": True}).json() == []
            assert rest.get("/v2/models").json() == {"models": ["classify-text"]}  # as KServe lists them (was [])
        gate.set()
        until(lambda: client.is_server_ready(), "ready")
        assert client.is_model_ready("classify-text") is True
        client.close()
    finally:
        gate.set()
        server.stop()


def test_the_index_lists_every_configured_model_while_the_last_ones_load(demo_server: LiveServer) -> None:
    """Models are loaded, then started (warmed) one by one: between the first started and readiness, /v2/models
    and the repository index listed only those started so far, as UNAVAILABLE (audit: 2 of 5). Every configured
    model is listed, LOADING, until the server is ready."""
    runtime = demo_server.runtime
    names = [v2_name(e) for e in served_models(runtime)]
    runtime.ready = False  # as while the last engines warm
    try:
        with httpx.Client(base_url=demo_server.url) as rest:
            listed = rest.get("/v2/models").json()["models"]
            index = rest.post("/v2/repository/index").json()
    finally:
        runtime.ready = True
    assert sorted(listed) == sorted(names) and len(names) >= 5
    assert sorted(m["name"] for m in index) == sorted(names)
    assert {(m["state"], m["reason"]) for m in index} == {("LOADING", "loading")}
    # the models started, then the model process gone (or a load failed): unavailable, and why
    runtime.ready, runtime.load_error = False, "the model process has exited"
    try:
        with httpx.Client(base_url=demo_server.url) as rest:
            index = rest.post("/v2/repository/index").json()
    finally:
        runtime.ready, runtime.load_error = True, None
    assert sorted(m["name"] for m in index) == sorted(names)
    assert {(m["state"], m["reason"]) for m in index} == {("UNAVAILABLE", "the model process has exited")}


def test_typed_contents_are_counted_against_the_shape_before_a_value_is_copied() -> None:
    """27 million packed zeros in uint_contents for an image of shape [1, 1, 3] became a list and an int64 array
    before the count was compared: 700-800 MB of a front end per 27 MB message (audit). The count comes first,
    and contents take at most as many values as JSON (MAX_VALUES): larger tensors go in raw_input_contents."""
    import tracemalloc

    from app.errors import BadRequest
    from app.jsonbody import MAX_VALUES
    from app.oip.grpc import _typed
    from app.oip.tensors import RequestInput

    contents = pb.InferTensorContents()
    contents.uint_contents.extend(np.zeros(2_000_000, dtype=np.uint32).tolist())
    image = RequestInput(name="IMAGE", shape=[1, 1, 3], datatype="UINT8")
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest, match=r"shape \[1, 1, 3\] holds 3 elements; contents has 2000000"):
            _typed(image, contents)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # the list and the array were 32 MB of it
    del contents.uint_contents[MAX_VALUES // 2 :]
    contents.uint_contents.extend([0] * (MAX_VALUES + 3 - len(contents.uint_contents)))
    big = RequestInput(name="IMAGE", shape=[1, 1, MAX_VALUES + 3], datatype="UINT8")
    with pytest.raises(BadRequest, match="send larger tensors in raw_input_contents"):
        _typed(big, contents)


def test_binary_bytes_holding_more_elements_than_the_shape_are_refused_at_the_first_one_too_many() -> None:
    """A BYTES tensor declared [1] whose raw data held 8 million empty elements was split whole, in Python, before
    its count was compared: 2.4-4.9 s of CPU for a 400 (audit). It stops at the element past the shape's count."""
    from app.errors import BadRequest
    from app.oip.tensors import RequestInput, from_binary

    text = RequestInput(name="TEXT", shape=[1], datatype="BYTES")
    assert from_binary(text, b"\x02\x00\x00\x00hi").tolist() == [b"hi"]
    two_million_empty = bytes(4 * 2_000_000)
    with pytest.raises(BadRequest, match=r"shape \[1\] holds 1 elements; the data has more \(8000000 bytes after"):
        from_binary(text, b"\x02\x00\x00\x00hi" + two_million_empty)


def test_every_grpc_call_has_its_log_line_and_a_cancelled_one_is_a_cancelled_rejection(
    demo_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No gRPC call wrote the access log's line that every HTTP request writes, and a call its client cancelled
    counted as a 499 but not as a `cancelled` rejection, as an HTTP client's leaving does (audit)."""
    import logging

    def lines() -> list[dict[str, object]]:
        return [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]

    labels = {"task": "classify-text", "model": "classify-text"}
    cancelled = demo_server.metric("perceiver_rejections_total", **labels, reason="cancelled")
    engine = demo_server.runtime.engine_for("classify-text")
    path = "/inference.GRPCInferenceService/ModelInfer"
    with caplog.at_level(logging.INFO, logger="perceiver.server"):
        assert _infer_raw(demo_server.grpc_target, _text_request(), timeout=60).outputs
        until(lambda: any(line["path"] == path for line in lines()), "the call's log line")
        (line,) = [line for line in lines() if line["path"] == path]
        assert (line["method"], line["status"], line["model"]) == ("gRPC", 200, "classify-text"), line
        caplog.clear()
        occupy(engine, 0.1)  # admitted, then queued behind a batch that does not end until released
        try:
            with grpc.insecure_channel(demo_server.grpc_target) as channel:
                infer = channel.unary_unary(
                    path,
                    request_serializer=pb.ModelInferRequest.SerializeToString,
                    response_deserializer=pb.ModelInferResponse.FromString,
                )
                call = infer.future(_text_request(), timeout=60)
                until(lambda: engine.batcher.depth == 1, "the call queued")
                call.cancel()
                until(lambda: any(line["path"] == path for line in lines()), "the cancelled call's log line")
        finally:
            release(engine)
    (line,) = [line for line in lines() if line["path"] == path]
    assert (line["status"], line["reason"]) == (499, "cancelled"), line
    assert demo_server.metric("perceiver_rejections_total", **labels, reason="cancelled") == cancelled + 1


@pytest.mark.parametrize(("remaining", "status", "reason"), [(0.0, "504", "deadline"), (5.0, "499", "cancelled")])
def test_a_call_cancelled_as_its_deadline_passes_is_a_504_and_one_its_client_cancelled_a_499(
    remaining: float, status: str, reason: str
) -> None:
    """gRPC cancels a call whose deadline has passed; the server's own deadline, the same instant, may not have
    fired first, and the call was counted as the client's cancel, a 499 (1 of 26 in the audit). A cancel with its
    deadline past is a 504, as the HTTP twin of the call is; one with time left is the client's, a 499."""
    import asyncio
    from types import SimpleNamespace

    from app.metrics import Metrics
    from app.oip.grpc import _guarded
    from app.runtime import Runtime
    from app.settings import Settings

    runtime = Runtime(Settings(demo_tasks=["classify-text"]), Metrics())
    context = SimpleNamespace(invocation_metadata=lambda: (), time_remaining=lambda: remaining)

    async def cancelled(request: object, context: object) -> None:
        raise asyncio.CancelledError

    call = _guarded(SimpleNamespace(runtime=runtime, digests=[]), "ModelInfer", pb.ModelInferRequest, cancelled)  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call(pb.ModelInferRequest(model_name="nope").SerializeToString(), context))  # type: ignore[arg-type]
    labels = {"task": "none", "model": ""}
    assert runtime.metrics.registry.get_sample_value("perceiver_requests_total", {**labels, "status": status}) == 1
    assert runtime.metrics.registry.get_sample_value("perceiver_rejections_total", {**labels, "reason": reason}) == 1
    runtime.shutdown_executors()

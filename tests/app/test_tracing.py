"""OpenTelemetry tracing against a live server, with the SDK's in-memory span exporter: a request span (FastAPI's
native one) that continues the caller's trace (traceparent), with decode, queue, inference and encode spans
under it, on the REST and the v2 routes; and, when tracing is off, no OpenTelemetry SDK imported (FastAPI
imports the API itself; without an SDK its calls are no-ops)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from app.settings import Settings
from app.tracing import exporters, wanted

from .conftest import MEDIA, LiveServer, free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[LiveServer, InMemorySpanExporter]]:
    os.environ["OTEL_TRACES_EXPORTER"] = "none"  # no exporter from the environment: the test adds its own
    try:
        server = LiveServer(demo_tasks=["classify", "classify-text"], tracing=True)
    finally:
        del os.environ["OTEL_TRACES_EXPORTER"]
    exporter = InMemorySpanExporter()
    server.app.state.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    server.start()
    yield server, exporter
    server.stop()


def spans_of_trace(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [
        s for s in exporter.get_finished_spans() if s.context is not None and f"{s.context.trace_id:032x}" == TRACE_ID
    ]


def ended_requests(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The first ``count`` request (SERVER) spans, once that many have ended. A request's span ends after the last
    byte of its answer is sent, so the client can hold the answer a moment before the span is exported."""
    deadline = time.monotonic() + 30  # a guard against a hang, not a bound on anything
    while len(requests := [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(requests)} of {count} request spans ended")
        time.sleep(0.01)
    return requests


@pytest.mark.parametrize(
    ("path", "body", "route"),
    [
        ("/v1/classify-text", {"json": {"text": "traced", "top_k": 1}}, "POST /v1/classify-text"),
        ("/v1/classify", {"files": {"image": (MEDIA / "cat.jpg").read_bytes()}}, "POST /v1/classify"),
        (
            "/v2/models/classify-text/infer",
            {"json": {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["traced"]}]}},
            "POST /v2/models/{model_name}/infer",
        ),
    ],
)
def test_a_request_continues_the_callers_trace_with_a_span_per_stage(
    traced: tuple[LiveServer, InMemorySpanExporter], path: str, body: dict[str, object], route: str
) -> None:
    server, exporter = traced
    exporter.clear()
    with server.client() as client:
        r = client.post(path, headers={"traceparent": TRACEPARENT}, **body)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    ended_requests(exporter, 1)
    spans = spans_of_trace(exporter)
    (request,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert request.name == route and request.attributes is not None
    assert request.attributes["http.route"] == route.split(" ")[1]
    assert request.attributes["http.response.status_code"] == 200
    assert request.parent is not None and f"{request.parent.span_id:016x}" == PARENT_ID and request.parent.is_remote
    stages = sorted((s for s in spans if s is not request), key=lambda s: s.start_time or 0)
    assert [s.name for s in stages] == ["decode", "queue", "inference", "encode"]
    for stage in stages:
        assert stage.parent is not None and stage.parent.span_id == request.context.span_id
        assert request.start_time <= stage.start_time <= stage.end_time <= request.end_time  # type: ignore[operator]
    queue, inference = stages[1], stages[2]
    assert queue.end_time == inference.start_time  # the wait ends when the forward pass starts
    assert inference.attributes is not None and inference.attributes["perceiver.batch_size"] >= 1


def test_without_traceparent_a_request_starts_its_own_trace(traced: tuple[LiveServer, InMemorySpanExporter]) -> None:
    server, exporter = traced
    exporter.clear()
    with server.client() as client:
        assert client.post("/v1/classify-text", json={"text": "untraced caller"}).status_code == 200
        assert client.post("/v1/classify-text", json={"text": ""}).status_code == 422
    requests = ended_requests(exporter, 2)
    assert len(requests) == 2 and all(s.parent is None for s in requests)
    assert requests[1].attributes is not None and requests[1].attributes["http.response.status_code"] == 422


def test_tracing_follows_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert not wanted(Settings())
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert wanted(Settings())
    assert not wanted(Settings(tracing=False))
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not wanted(Settings(tracing=True))
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not wanted(Settings())


def test_a_missing_exporter_is_named_as_the_variables_asked_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the endpoint set: the error says OTLP is the default, not that OTEL_TRACES_EXPORTER (unset) names it."""
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")  # no extra brings OTLP over gRPC
    with pytest.raises(RuntimeError) as caught:
        exporters()
    assert str(caught.value).startswith(
        "traces go to OTLP by default over grpc, whose exporter (otlp_proto_grpc) no installed package provides"
    )
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,zipkin")
    with pytest.raises(RuntimeError) as caught:
        exporters()
    assert str(caught.value).startswith("OTEL_TRACES_EXPORTER names 'zipkin', whose exporter (zipkin) no installed")


@pytest.mark.parametrize(
    ("processes", "variables", "says"),
    [
        ("0", {"OTEL_TRACES_EXPORTER": "bogus"}, "OTEL_TRACES_EXPORTER names 'bogus'"),
        ("2", {"OTEL_TRACES_EXPORTER": "bogus"}, "OTEL_TRACES_EXPORTER names 'bogus'"),
        (  # the batch processor's own variables (review)
            "2",
            {
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_BSP_MAX_QUEUE_SIZE": "10",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "99",
            },
            "",
        ),
    ],
)
def test_tracing_that_cannot_be_set_up_stops_the_start_with_one_line_and_exit_2(
    processes: str, variables: dict[str, str], says: str
) -> None:
    """As every other bad setting: it was a 20-line traceback and exit 1, one from each front end (audit). The
    port is one no test uses: the server must stop before it binds any."""
    env = {
        **os.environ,
        **variables,
        "PERCEIVER_API_PROCESSES": processes,
        "PERCEIVER_PORT": str(free_port()),
        "PERCEIVER_GRPC_PORT": "0",
    }
    done = subprocess.run([sys.executable, "-m", "app.cli"], env=env, capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["level"] == "ERROR" and line["msg"].startswith(f"invalid settings: {says}"), line


def test_off_by_default_with_no_opentelemetry_sdk_import() -> None:
    """Serving a request with tracing off imports nothing of OpenTelemetry's SDK (a fresh interpreter: this one
    has it loaded for the tests above)."""
    code = (
        "import sys, httpx\n"
        "from tests.app.conftest import LiveServer\n"
        "server = LiveServer(demo_tasks=['classify-text']).start()\n"
        "headers = {'traceparent': sys.argv[1]}\n"
        "r = httpx.post(server.url + '/v1/classify-text', json={'text': 'hi'}, headers=headers, timeout=120)\n"
        "server.stop()\n"
        "assert r.status_code == 200, r.text\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter')))\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PERCEIVER_"))}
    result = subprocess.run(
        [sys.executable, "-c", code, TRACEPARENT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_clock_offset_is_read_where_no_preemption_split_the_readings() -> None:
    """The queue and inference spans convert the batcher's monotonic times to wall time. A thread preempted
    between the two clock readings (milliseconds on a busy machine) made the offset that much wrong, and a
    text request's queue span started before its decode span."""
    from app.tracing import wall_minus_monotonic_ns

    true_offset = 1_700_000_000_000_000_000
    mono = iter([100, 5_000_100, 6_000_000, 6_000_200, 7_000_000, 7_000_300])  # first try: 5 ms preempted
    now = {"mono": 0}

    def monotonic_ns() -> int:
        now["mono"] = next(mono)
        return now["mono"]

    def wall_ns() -> int:
        return true_offset + now["mono"] + 50  # read 50 ns after the first monotonic reading

    offset = wall_minus_monotonic_ns(3, monotonic_ns, wall_ns)
    assert abs(offset - true_offset) <= 100  # from the second try's 200 ns window, not the first's 5 ms


def test_a_librarys_warnings_about_client_input_are_written_once_a_minute() -> None:
    """A tracestate of 40 entries makes OpenTelemetry warn on every request; through the server's log handler the
    first is written, the next 19 within the minute are left out, and the first after it says how many."""
    import io
    import json as json_module
    import logging

    from opentelemetry.trace.span import TraceState

    from app.jsonlog import JsonFormatter, LibraryWarnings

    out = io.StringIO()
    clock = [1000.0]
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(LibraryWarnings(clock=lambda: clock[0]))
    logger = logging.getLogger("opentelemetry.trace.span")
    logger.addHandler(handler)
    try:
        for second in range(20):
            clock[0] = 1000.0 + second
            TraceState.from_header([",".join(f"k{i}=v" for i in range(40))])
        clock[0] = 1061.0
        TraceState.from_header([",".join(f"k{i}=v" for i in range(40))])
    finally:
        logger.removeHandler(handler)
    lines = [json_module.loads(line) for line in out.getvalue().splitlines()]
    assert [line.get("left_out") for line in lines] == [None, 19], lines

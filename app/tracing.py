"""Optional OpenTelemetry tracing, configured by the standard OTEL_* variables.

Off by default, and then nothing of OpenTelemetry's SDK is imported (FastAPI itself imports the API, whose
calls are no-ops without an SDK). On with ``PERCEIVER_TRACING=true``, or, when that is unset, as soon as the
environment names a trace exporter: ``OTEL_TRACES_EXPORTER`` (other than ``none``),
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``. ``OTEL_SDK_DISABLED=true`` keeps it
off. The SDK reads the rest: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``, the sampler
(``OTEL_TRACES_SAMPLER``), the batch processor's limits (``OTEL_BSP_*``) and the exporter's endpoint, headers
and timeout. Exporters are the SDK's entry points: ``otlp`` (the default; HTTP/protobuf unless
``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``), ``console``, or any installed one.

The request span is FastAPI's own (its native telemetry, given this provider): a SERVER span named after
the route, continuing the caller's trace (``traceparent``, or what ``OTEL_PROPAGATORS`` names). Under it,
a span per stage: ``decode``, then ``queue`` and ``inference`` per item (recorded from the batcher's own
timings: the wait and the forward pass happen in the batcher, across requests), then ``encode``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from .settings import Settings

if TYPE_CHECKING:
    from fastapi.telemetry import TelemetryConfig
    from opentelemetry.sdk.trace import TracerProvider

    from .batching import Ticket

log = logging.getLogger("perceiver.tracing")
ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def wanted(settings: Settings) -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if settings.tracing is not None:
        return settings.tracing
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return exporters not in ("", "none") or any(os.environ.get(name) for name in ENDPOINTS)


def configure(settings: Settings) -> Tracing | None:
    """The server's tracing, or None when it is off (nothing imported)."""
    provider = _provider(settings)
    return None if provider is None else Tracing(provider)


def check(settings: Settings) -> None:
    """Raise what ``configure`` would raise (the SDK asked for by name and missing, an exporter no package
    provides, or one its variables break, the batch processor's variables too), before any process starts: one
    line and exit 2, not a traceback from each process (audit, review). The provider is built and shut down: no
    exporter connects before its first export."""
    provider = _provider(settings, trial=True)
    if provider is not None:
        with contextlib.suppress(Exception):
            provider.shutdown()


def _provider(settings: Settings, trial: bool = False) -> Any:
    """The tracer provider the settings and OTEL_* variables ask for, or None when tracing is off. ``trial``:
    ``check``'s, shut down at once (no exit hook, and the missing SDK's warning left to ``configure``)."""
    if not wanted(settings):
        return None
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        message = "tracing needs OpenTelemetry's SDK: pip install 'perceiver-serve[tracing]'"
        if settings.tracing:  # asked for by name: refuse to start without it
            raise RuntimeError(message) from None
        if not trial:
            log.warning("OTEL_* variables ask for traces, but %s; tracing stays off", message)
        return None
    # resource (OTEL_SERVICE_NAME, ...) and sampler from the environment
    provider = TracerProvider(shutdown_on_exit=not trial)
    for exporter in exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def exporters() -> list[Any]:
    """The span exporters OTEL_TRACES_EXPORTER names (default otlp), from the SDK's entry points."""
    named = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    names = [n.strip() for n in (named or "otlp").lower().split(",") if n.strip()]
    found = []
    for name in names:
        if name == "none":
            continue
        asked = f"OTEL_TRACES_EXPORTER names {name!r}" if named else "traces go to OTLP by default"
        if name == "otlp":
            protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
            asked += f" over {protocol}"
        points = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not points:
            raise RuntimeError(
                f"{asked}, whose exporter ({name}) no installed package provides "
                "(perceiver-serve[tracing] brings otlp over http/protobuf, and console)"
            )
        found.append(next(iter(points)).load()())
    return found


def wall_minus_monotonic_ns(
    tries: int = 3, monotonic_ns: Callable[[], int] = time.monotonic_ns, wall_ns: Callable[[], int] = time.time_ns
) -> int:
    """The wall clock less the monotonic clock, read between two monotonic readings, from the try whose
    readings lie closest together. One plain pair of readings is off by however long the thread was preempted
    between them: on a busy machine, milliseconds, more than a short decode span lasts (a queue span then
    started before the decode span it follows)."""
    best_gap, best = None, 0
    for _ in range(tries):
        before = monotonic_ns()
        wall = wall_ns()
        after = monotonic_ns()
        if best_gap is None or after - before < best_gap:
            best_gap, best = after - before, wall - (before + after) // 2
    return best


class Tracing:
    """The provider FastAPI's request spans use, and the stage spans under them."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace

        self.provider = provider
        self.tracer = provider.get_tracer("perceiver-serve")
        self._trace = trace

    def fastapi_telemetry(self) -> TelemetryConfig:
        """FastAPI's native request spans on this provider; its metrics and logs stay off (Prometheus and the
        JSON log have them), and so do its operation spans, so that the stages are the request span's children."""
        return {"tracer_provider": self.provider, "metrics": False, "logs": False, "operation_spans": False}

    def annotate(self, **attributes: Any) -> None:
        """Attributes on the current span (the request's, where the route calls it)."""
        self._trace.get_current_span().set_attributes(attributes)

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        with self.tracer.start_as_current_span(name, attributes=attributes):
            yield

    def record_batching(self, tickets: Sequence[Ticket[Any, Any]]) -> None:
        """A queue and an inference span per item, children of the current span, from the batcher's timings.

        Those are monotonic and spans take wall-clock time; the two clocks are related now, when the spans are
        made, not once at start-up: the wall clock is slewed and stepped while the server runs, and a
        stale offset put a queue span before the decode span that it follows."""
        wall_offset_ns = wall_minus_monotonic_ns()
        for item, ticket in enumerate(tickets):
            queued = int(ticket.enqueued_at * 1e9) + wall_offset_ns
            started = queued + int(ticket.queue_s * 1e9)
            ended = started + int(ticket.inference_s * 1e9)
            attributes = {"perceiver.item": item, "perceiver.batch_size": ticket.batch_size}
            for name, start, end in (("queue", queued, started), ("inference", started, ended)):
                self.tracer.start_span(name, start_time=start, attributes=attributes).end(end_time=end)

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes what the batch processors still hold

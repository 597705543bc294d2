"""Every Prometheus metric, labelled by task and model. One registry per app instance."""

from __future__ import annotations

import collections
import gc
import os
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# With several server processes (settings.workers > 1) every process writes its samples to files in
# PROMETHEUS_MULTIPROC_DIR and /metrics aggregates them; gauges then sum the live processes.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Costs run from 1 (a flow window, a clip) to millions (image pixels x batch): every power of 4 between
_COST_BUCKETS = tuple(float(4**i) for i in range(16))
_UNITS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_GC_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)


class Metrics:
    def __init__(self) -> None:
        self._gc_pauses: collections.deque[tuple[str, float]] = collections.deque(maxlen=100_000)
        self.registry = CollectorRegistry()
        labels = ("task", "model")
        r = self.registry
        self.request_duration = Histogram(
            "perceiver_request_duration_seconds",
            "Whole request, any path.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "perceiver_request_queue_duration_seconds",
            "Time queued before the forward pass, per request (of several items: the longest).",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "perceiver_request_inference_duration_seconds",
            "Forward pass that served the request (of several items: the longest).",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "perceiver_batch_size", "Requests per forward pass.", labels, buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_cost = Histogram(
            "perceiver_batch_cost",
            "A forward pass's cost as its task counts it: input elements (images, texts), flow windows or video clips.",
            labels,
            buckets=_COST_BUCKETS,
            registry=r,
        )
        self.batches = Counter("perceiver_batches", "Forward passes run.", labels, registry=r)
        self.units_per_request = Histogram(
            "perceiver_units_per_request",
            "Forward-pass items one answered request brought: images, video clips, flow windows (pairs x windows "
            "per pair), text windows.",
            labels,
            buckets=_UNITS_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "perceiver_queue_depth",
            "Requests waiting for a forward pass.",
            labels,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.requests = Counter("perceiver_requests", "Requests by final status.", (*labels, "status"), registry=r)
        self.rejections = Counter(
            "perceiver_rejections", "Requests refused or dropped, by reason.", (*labels, "reason"), registry=r
        )
        self.inflight = Gauge(
            "perceiver_inflight_requests", "Task requests being handled.", registry=r, multiprocess_mode="livesum"
        )
        self.channel_overflow = Counter(
            "perceiver_channel_overflow_bytes",
            "Payload bytes a front-end process sent the model process through the socket because they found no "
            "room in its shared memory (PERCEIVER_API_SLAB_MB).",
            registry=r,
        )
        self.gpu_memory = Gauge(
            "perceiver_gpu_memory_bytes", "Allocated CUDA memory.", ("kind",), registry=r, multiprocess_mode="livesum"
        )

        self.gc_pause = Histogram(
            "perceiver_gc_pause_seconds",
            "Garbage-collector pauses (every request waits while one runs), by generation.",
            ("generation",),
            buckets=_GC_BUCKETS,
            registry=r,
        )

    def watch_gc(self) -> Callable[[], None]:
        """Time every collection into ``gc_pause``; returns the function that stops watching.

        The callback only queues the pause; ``exposition`` records the queue. A collection can start while
        prometheus_client holds its lock (in multiprocess mode, creating a labelled child serialises its key
        with json.dumps), and observing from inside the collector then waited for that lock forever: a worker
        of PERCEIVER_WORKERS=2 hung so (py-spy, 2026-12-03)."""
        started = 0.0
        pending = self._gc_pauses

        def callback(phase: str, info: dict[str, Any]) -> None:
            nonlocal started
            if phase == "start":
                started = time.perf_counter()
            else:
                pending.append((str(info["generation"]), time.perf_counter() - started))

        gc.callbacks.append(callback)
        return lambda: gc.callbacks.remove(callback)

    def record_gc_pauses(self) -> None:
        """Move the queued collector pauses into ``gc_pause`` (outside the collector, so no lock is held)."""
        while self._gc_pauses:
            generation, seconds = self._gc_pauses.popleft()
            self.gc_pause.labels(generation=generation).observe(seconds)

    def exposition(self) -> bytes:
        """The text format for /metrics: this registry, or every worker process's samples combined."""
        self.record_gc_pauses()
        if MULTIPROCESS:
            combined = CollectorRegistry()
            MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(combined))
        return bytes(generate_latest(self.registry))

    def update_gpu_memory(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            self.gpu_memory.labels(kind="allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory.labels(kind="reserved").set(torch.cuda.memory_reserved())

"""One access-log line and the request metrics for every request, whichever way it came in: the app's routes
(``ObservabilityMiddleware``), what the HTTP parser refuses before there is a request for the app
(app/httpserver.py: a URL or headers too large, bytes that are not HTTP, headers that never end) and gRPC calls
(app/oip/grpc.py). The last two were counted nowhere, or logged nowhere: an attacker's thousands of 431s left no
trace, and no gRPC call had a log line (audit)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("perceiver.server")

QUIET_PATHS = ("/healthz", "/readyz", "/v2/health/", "/metrics")  # prefixes logged at DEBUG


class LogThrottle:
    """At most one log line per ``interval_s``; each line that is written says how many were left out.

    For refusals (429): under overload they come by the hundred a second, and a line for each would flood
    the log and take the CPU the model needs. /metrics counts every one."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.next_at = 0.0
        self.skipped = 0

    def admit(self, now: float) -> int | None:
        """None: leave this line out; else write it, with the number left out since the last one."""
        if now < self.next_at:
            self.skipped += 1
            return None
        skipped, self.skipped, self.next_at = self.skipped, 0, now + self.interval_s
        return skipped


class AccessLog:
    """The process's request metrics and its log line per request (per second for refusals: ``LogThrottle``)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.metrics, self.clock = metrics, clock
        self.refusals = LogThrottle()
        # What the HTTP parser refuses (bytes that are not HTTP, headers too large): a line a second as well, on a
        # throttle of its own: one line each, a client opening connections to send garbage wrote the log as fast
        # as it connected (review).
        self.malformed = LogThrottle()

    def refused(self, task: str, model: str, reason: str | None) -> None:
        """A rejection, under its reason (none for an internal error)."""
        if reason is not None:
            self.metrics.rejections.labels(task=task, model=model, reason=reason).inc()

    def record(
        self,
        method: str,
        path: str,
        status: int,
        elapsed_s: float,
        *,
        task: str = "none",
        model: str = "",
        reason: str | None = None,
        counted: bool = True,
        quiet: bool = False,
        malformed: bool = False,
    ) -> None:
        """The request's duration and status in the metrics (unless not ``counted``) and its log line: DEBUG for a
        probe or scrape that succeeded (``quiet``, or a path in QUIET_PATHS), INFO otherwise; a 429, or a request
        the HTTP parser refused (``malformed``), at most one line a second, which says how many it left out."""
        if counted:
            self.metrics.request_duration.labels(task=task, model=model).observe(elapsed_s)
            self.metrics.requests.labels(task=task, model=model, status=str(status)).inc()
        throttle = self.refusals if status == 429 else self.malformed if malformed else None
        skipped = throttle.admit(self.clock()) if throttle is not None else 0
        if skipped is None:
            return
        fields: dict[str, Any] = {"method": method, "path": path, "status": status, "ms": round(elapsed_s * 1000, 2)}
        if model:
            fields["model"] = model
        if reason:
            fields["reason"] = reason
        if skipped:
            fields["refusals_not_logged"] = skipped
        # Probes and scrapes come every few seconds from every kubelet and Prometheus: DEBUG, not INFO.
        level = logging.DEBUG if (quiet or path.startswith(QUIET_PATHS)) and status < 400 else logging.INFO
        log.log(level, "request", extra={"fields": fields})

    def flush(self) -> None:
        """At shutdown: the refusals left out since the last line written (they were lost: 26 of 27 after a burst
        that ended the run; audit)."""
        kinds: list[tuple[LogThrottle, dict[str, Any]]] = [
            (self.refusals, {"status": 429}),
            (self.malformed, {"malformed": True}),
        ]
        for throttle, fields in kinds:
            if throttle.skipped:
                skipped, throttle.skipped = throttle.skipped, 0
                log.info("refusals not logged", extra={"fields": {**fields, "refusals_not_logged": skipped}})

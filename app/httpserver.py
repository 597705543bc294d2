"""HTTP/1.1 as uvicorn's httptools protocol speaks it, with the bounds it lacks: how long a request's headers
may take to arrive, how large they and the URL may be, and a JSON error body for what the parser refuses.

Without them a client sending a header line every half second held its connection forever, 30 MB of header
lines that never ended grew the process by 615 MiB (httptools buffers an unfinished header whole), 100,000
headers were served, and a 64 KB query string got a plain-text 400. httptools stays (h11, which has a size
bound, parses in Python: every request would pay for it); the bounds are checked where httptools hands over.

The same bounds hold for a chunked body's trailer section, whose fields are read and dropped (never taken as
headers): a trailer line that never ended stalled the event loop (httptools grows an unfinished value by
concatenation, quadratic) and was never timed out on a route that does not read its body. An answer sent
before its request's body was read whole closes the connection (lingering), and a client that reads none of
its answers for ``WRITE_TIMEOUT_S`` is cut off: either held its connection, and a file descriptor, for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import errors
from .errors import (
    BadRequest,
    HeadersTooLarge,
    RequestTimeout,
    ServiceError,
    TransferCodingNotImplemented,
    UriTooLong,
)

log = logging.getLogger("perceiver.server")

HEADER_TIMEOUT_S = 10.0  # from the connection (or the request's first byte) to the end of its headers
MAX_URL_BYTES = 8 * 1024  # nginx's and most proxies' limit for a request line
MAX_HEADER_BYTES = 64 * 1024  # the request line and every header, together
MAX_HEADERS = 100
# After an answer that leaves the request's body unread (a refusal, an early 4xx), the rest is read and dropped
# before closing (a lingering close, as nginx's): until the client has sent nothing for LINGER_IDLE_S, and at most
# LINGER_MAX_S in all (a client trickling a byte at a time held the connection for ever).
LINGER_IDLE_S = 2.0
LINGER_MAX_S = 30.0
MAX_LOGGED_PATH = 256  # a refused URL's path in the log line: a 414's was the whole 64 KB
WRITE_TIMEOUT_S = 30.0  # how long the send buffer may make no progress, unread by the client, before a cut


class _Refused(Exception):
    pass


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request that breaks a bound gets its JSON 4xx and the connection closes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True
        self._header_bytes = self._header_count = 0  # of the request line and headers parsed whole
        self._unfinished_bytes = 0  # of reads that were wholly inside the request's headers
        self._begun = False  # a request began in the read being parsed
        self._last_chunk = False  # a chunk's size line parsed and none of its data yet: the trailer section
        self._trailer_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._message_began: float | None = None  # when the request being read began (for a refusal's log line)
        self._unanswered = 0  # requests begun and not yet answered: the last begun is the one being read
        self._begun_in_read = 0  # requests begun in the bytes being parsed now
        self._v2_line = False  # a request line the parser refused was for /v2 (its error in v2's shape)
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_sent = 0  # bytes sent at the write watch's last look
        self._linger_started: float | None = None  # when the lingering close began (our side ended)
        self._last_received = 0.0
        self._refusal: ServiceError | None = None
        self._discarding = False  # refused: what the client still sends is dropped until the connection closes
        self._deferred: ServiceError | None = None  # a refusal waiting for the answers of the requests before it
        self._cycles: list[Any] = []  # every request not yet answered, the pipelined ones too

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Watched(transport, self._watch_writes))  # type: ignore[arg-type]
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self._stop_write_timer()
        for cycle in self._cycles:  # uvicorn marks only the last request parsed: the one being answered wrote on
            if not cycle.response_complete:  # a closed transport (an ERROR and a traceback each)
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()

    def _watch_writes(self) -> None:
        """The send buffer is full, or the connection closes with answers still in it: from now on, every
        WRITE_TIMEOUT_S, the buffer must have shrunk or the connection is cut (uvicorn has no write timeout, and a
        close waits for the buffer to drain: clients that never read held their connections for ever)."""
        if self._write_timer is None:
            self._write_sent = self._sent()
            self._write_timer = self.loop.call_later(WRITE_TIMEOUT_S, self._check_writes)

    def _sent(self) -> int:
        """Bytes the kernel has taken from this connection's send buffer so far."""
        return int(getattr(self.transport, "written", 0)) - int(self.transport.get_write_buffer_size())

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _check_writes(self) -> None:
        self._write_timer = None
        if not self.transport.get_write_buffer_size():
            return  # all sent: watched again when it fills, or at the next close
        if self._sent() <= self._write_sent:
            log.info("a client read none of its answer for %g s; its connection is cut", WRITE_TIMEOUT_S)
            self.transport.abort()
            return
        self._watch_writes()  # it reads, slowly: look again

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            self._refuse(RequestTimeout(f"the request's headers did not arrive within {HEADER_TIMEOUT_S:g} s"))

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._last_received = self.loop.time()
            return
        self._unset_keepalive_if_required()
        self._begun = False
        self._begun_in_read = 0
        in_trailers = self._last_chunk
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if self._refusal is None:
                raise
            self._refuse(self._refusal)
            return
        except httptools.HttpParserUpgrade:
            # No WebSocket here (ws="none"): the request is answered as HTTP, and the connection ends with it. llhttp
            # skips an upgrading request's body and stops parsing: what follows (that body, or the new protocol's
            # bytes) is dropped, never parsed as another request (read as one, a body smuggled a request past a
            # proxy's rules).
            self._discarding = True
            cycle = getattr(self, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                cycle.keep_alive = False
                cycle.transport = _Lingering(cycle.transport, self._linger)
            else:
                self._linger()
            return
        except httptools.HttpParserError as exc:
            if not getattr(self, "url", b""):  # the request line itself: the path it was to read says the shape
                self._v2_line = _refused_line_is_v2(data, self._begun_in_read)
            self._refuse(BadRequest(f"not a valid HTTP/1.1 request ({exc}); check the request line and headers"))
            return
        if self._in_headers and not self._begun:  # every byte of this read was the request line or headers
            self._unfinished_bytes += len(data)
            if self._unfinished_bytes > MAX_HEADER_BYTES:
                self._refuse(HeadersTooLarge(f"the request's headers exceed {MAX_HEADER_BYTES} bytes"))
        elif in_trailers and self._last_chunk:  # every byte of this read was the trailer section
            self._trailer_bytes += len(data)
            if self._trailer_bytes > MAX_HEADER_BYTES:
                self._refuse(HeadersTooLarge(f"the request's trailer fields exceed {MAX_HEADER_BYTES} bytes"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_began = self.loop.time()
        self._unanswered += 1
        self._begun_in_read += 1
        self._in_headers, self._begun, self._last_chunk = True, True, False
        self._header_bytes = self._header_count = self._unfinished_bytes = self._trailer_bytes = 0
        self._start_header_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._header_bytes += len(url)
        if len(self.url) > MAX_URL_BYTES:
            self._refusal = UriTooLong(f"the URL exceeds {MAX_URL_BYTES} bytes; send long inputs in the body")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_headers:  # a trailer field: read, bounded with the section, and dropped (RFC 9110 6.5.1)
            return
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if self._header_count > MAX_HEADERS:
            self._refusal = HeadersTooLarge(f"the request has more than {MAX_HEADERS} headers")
            raise _Refused
        if self._header_bytes > MAX_HEADER_BYTES:  # whole in one read: the reads' count never saw them
            self._refusal = HeadersTooLarge(f"the request's headers exceed {MAX_HEADER_BYTES} bytes")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._stop_header_timer()
        codings = [c.strip().lower() for n, v in self.headers if n == b"transfer-encoding" for c in v.split(b",")]
        unknown = [c for c in codings if c != b"chunked"]
        if unknown:  # llhttp reads only the last coding: the body would be taken as if it had none
            coding = unknown[0].decode("latin-1")
            self._refusal = TransferCodingNotImplemented(
                f"Transfer-Encoding {errors.shown(coding)} is not supported; send the body uncompressed (chunked or "
                "with a Content-Length)"
            )
            raise _Refused
        previous = getattr(self, "cycle", None)
        try:
            super().on_headers_complete()
        except httptools.HttpParserInvalidURLError:  # a target httptools' own URL parser refuses (CONNECT a:443)
            self._refusal = BadRequest("the request target is not a valid URL path; send an origin-form path")
            raise _Refused from None
        cycle = getattr(self, "cycle", None)
        if cycle is not None and cycle is not previous:
            self._cycles = [c for c in self._cycles if not c.response_complete] + [cycle]
            self._close_if_answered_early(cycle)

    def on_chunk_header(self) -> None:
        self._last_chunk = True  # until its data comes: a chunk of size 0, the last, has none

    def on_chunk_complete(self) -> None:
        self._last_chunk = False

    def on_body(self, body: bytes) -> None:
        self._last_chunk = False
        super().on_body(body)

    def _close_if_answered_early(self, cycle: Any) -> None:
        """An answer that starts before its request's body was read whole (a refusal from the headers: 401, 404,
        413, 415; a GET route that reads no body) says ``connection: close``, and the connection closes once it
        is sent, lingering: the rest of the body is dropped, not parsed as the next request. Kept open, it was
        read for as long as the client sent (a trailer without end, a byte every 2 s)."""
        send = cycle.send

        async def close_if_unread(message: Any) -> None:
            if message["type"] == "http.response.start" and cycle.more_body and not cycle.response_started:
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"connection" and b"close" in v.lower() for k, v in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
                cycle.transport = _Lingering(cycle.transport, self._linger)
            await send(message)

        cycle.send = close_if_unread

    def _refuse(self, error: ServiceError) -> None:
        """The error as JSON (the protocol's own shape on /v2), then close: the rest of the request is not parsed.
        Answers go out in the order of their requests: a refusal that follows pipelined requests still being
        answered waits for them (written at once, it came first and its end of the stream cut their answers)."""
        self._stop_header_timer()
        self._discarding = True
        if self._answering():
            self._deferred = error
            return
        self._send_refusal(error)

    def _answering(self) -> bool:
        """Whether a request before the refused bytes still waits for its answer: one whose body was read whole
        (bytes that break the body of the request being read are that request's, refused at once)."""
        cycle = getattr(self, "cycle", None)
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete and not cycle.more_body)

    def on_response_complete(self) -> None:
        self._unanswered = max(0, self._unanswered - 1)
        if not self._unanswered:  # until the next request's first byte; not if it came already (pipelined, and
            self._message_began = None  # refused: it was counted and logged nowhere; review)
        lingering = self._linger_started is not None
        if lingering:  # our side has ended: nothing more is answered on this connection
            self._drop_pipeline()
        super().on_response_complete()  # starts the next pipelined request, if any
        if lingering:  # the linger closes it, not uvicorn's keep-alive timer (5 s, however much is still coming)
            self._unset_keepalive_if_required()
        if self._deferred is not None and not self._answering() and not self.transport.is_closing():
            error, self._deferred = self._deferred, None
            self._send_refusal(error)

    def _send_refusal(self, error: ServiceError) -> None:
        url = getattr(self, "url", None)
        v2 = url.startswith(b"/v2/") if isinstance(url, bytes) and url else self._v2_line
        self._record(error, url if isinstance(url, bytes) else b"")
        body = json.dumps({"error": error.message} if v2 else errors.body(error)).encode()
        reason = {
            408: b"Request Timeout",
            414: b"URI Too Long",
            431: b"Request Header Fields Too Large",
            501: b"Not Implemented",
        }
        head = [b"HTTP/1.1 %d %s\r\n" % (error.status, reason.get(error.status, b"Bad Request"))]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        self._linger()

    def _record(self, error: ServiceError, url: bytes) -> None:
        """The refusal in the metrics and the access log, as the app counts and logs its own (app/accesslog.py):
        written here, before there was a request for the app, they were counted and logged nowhere (audit).

        A request the app already has (refused in its body: a broken chunk, a trailer too large) is the app's to
        count, once, as this refusal: its handler sees the connection end and would call it the client's leaving.
        A connection on which no request began (idle past the header timeout) is no request."""
        runtime = getattr(getattr(getattr(self.config, "app", None), "state", None), "runtime", None)
        cycle = getattr(self, "cycle", None)
        if not self._in_headers and cycle is not None and cycle.more_body and not cycle.response_complete:
            cycle.scope.setdefault("state", {})["refused"] = error
            # Answered: the app's own answer, to a route that reads no body (a probe, a 404), is dropped, not
            # written after the end of our side (an ERROR with a traceback, two per request, at a client's will).
            cycle.disconnected = True
            return
        if runtime is None or self._message_began is None:
            return
        from .middleware import task_of

        path = url.split(b"?", 1)[0].decode("latin-1")
        method = self.parser.get_method().decode("latin-1") if url else ""  # else the last request's, or none
        task = task_of(path) or "none"
        shown = path if len(path) <= MAX_LOGGED_PATH else path[:MAX_LOGGED_PATH] + "..."
        runtime.access.refused(task, "", error.reason)
        elapsed = self.loop.time() - self._message_began
        runtime.access.record(method, shown, error.status, elapsed, task=task, reason=error.reason, malformed=True)

    def _linger(self) -> None:
        """A lingering close: had it closed with the client still sending, the kernel would answer its bytes with
        a reset, and the client could lose the answer before reading it. So: end our side, read and drop what
        still comes, and close once the client has sent nothing for LINGER_IDLE_S (or closes), LINGER_MAX_S at
        most. Nothing more is answered: requests pipelined behind are dropped (a write after the end raised)."""
        self._discarding = True
        self._drop_pipeline()
        if self.transport.is_closing() or self._linger_started is not None:
            return
        self._linger_started = self._last_received = self.loop.time()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_IDLE_S, self._linger_ends)

    def _linger_ends(self) -> None:
        now = self.loop.time()
        assert self._linger_started is not None
        quiet, whole = now - self._last_received, now - self._linger_started
        if quiet >= LINGER_IDLE_S or whole >= LINGER_MAX_S:
            self.transport.close()
            return
        self.loop.call_later(min(LINGER_IDLE_S - quiet, LINGER_MAX_S - whole), self._linger_ends)

    def _drop_pipeline(self) -> None:
        self._deferred = None
        while self.pipeline:
            cycle, _ = self.pipeline.pop()
            cycle.disconnected = True
            cycle.message_event.set()


class _Watched:
    """The connection's transport as uvicorn uses it: a close with answers still in the send buffer (the keep-alive
    timeout, ``connection: close``) starts the write watch, as a full buffer does."""

    def __init__(self, transport: Any, watch: Any) -> None:
        self._transport, self._watch = transport, watch
        self.written = 0  # bytes handed to the transport, sent or still buffered

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self._transport.write(data)

    def close(self) -> None:
        self._transport.close()
        if self._transport.get_write_buffer_size():
            self._watch()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_REQUEST_LINE = re.compile(rb"^[A-Za-z]+ (\S*)", re.MULTILINE)


def _refused_line_is_v2(data: bytes, begun: int) -> bool:
    """Whether the request line the parser refused in ``data`` was for /v2: the ``begun``-th line of the read that
    starts as a request line (the parser began ``begun`` requests in it, the refused one last), not the read's
    first (a request pipelined before it, or an empty line, came first, and its refusal had v1's shape) nor its
    last (one pipelined after it is never read; review)."""
    lines = _REQUEST_LINE.findall(data)
    return 0 < begun <= len(lines) and lines[begun - 1].startswith(b"/v2/")


class _Lingering:
    """The transport as a cycle that answered before its request's body was read sees it: its ``close`` is the
    protocol's lingering close."""

    def __init__(self, transport: Any, linger: Any) -> None:
        self._transport, self._linger = transport, linger

    def close(self) -> None:
        self._linger()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

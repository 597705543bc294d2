"""HTTP/1.1 as uvicorn's httptools protocol speaks it, with the bounds it lacks: how long a request's headers
may take to arrive, how large they and the URL may be, and a JSON error body for what the parser refuses.

Without them a client sending a header line every half second held its connection forever, 30 MB of header
lines that never ended grew the process by 615 MiB (httptools buffers an unfinished header whole), 100,000
headers were served, and a 64 KB query string got a plain-text 400. httptools stays (h11, which has a size
bound, parses in Python: every request would pay for it); the bounds are checked where httptools hands over.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import errors
from .errors import BadRequest, HeadersTooLarge, RequestTimeout, ServiceError, UriTooLong

HEADER_TIMEOUT_S = 10.0  # from the connection (or the request's first byte) to the end of its headers
MAX_URL_BYTES = 8 * 1024  # nginx's and most proxies' limit for a request line
MAX_HEADER_BYTES = 64 * 1024  # the request line and every header, together
MAX_HEADERS = 100
LINGER_S = 2.0  # after a refusal, how long the rest of the request is read and dropped before closing


class _Refused(Exception):
    pass


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a request that breaks a bound gets its JSON 4xx and the connection closes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True
        self._header_bytes = self._header_count = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._refusal: ServiceError | None = None
        self._discarding = False  # refused: what the client still sends is dropped until the connection closes
        self._deferred: ServiceError | None = None  # a refusal waiting for the answers of the requests before it

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

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
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            if self._refusal is None:
                raise
            self._refuse(self._refusal)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            self._refuse(BadRequest(f"not a valid HTTP/1.1 request ({exc}); check the request line and headers"))
            return
        if self._in_headers:  # every byte of this chunk was the request line or headers
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse(HeadersTooLarge(f"the request's headers exceed {MAX_HEADER_BYTES} bytes"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = self._header_count = 0
        self._start_header_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_URL_BYTES:
            self._refusal = UriTooLong(f"the URL exceeds {MAX_URL_BYTES} bytes; send long inputs in the body")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self._refusal = HeadersTooLarge(f"the request has more than {MAX_HEADERS} headers")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._stop_header_timer()
        super().on_headers_complete()

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
        super().on_response_complete()  # starts the next pipelined request, if any
        if self._deferred is not None and not self._answering() and not self.transport.is_closing():
            error, self._deferred = self._deferred, None
            self._send_refusal(error)

    def _send_refusal(self, error: ServiceError) -> None:
        v2 = self.url.startswith(b"/v2/") if isinstance(getattr(self, "url", None), bytes) else False
        body = json.dumps({"error": error.message} if v2 else errors.body(error)).encode()
        reason = {408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}
        head = [b"HTTP/1.1 %d %s\r\n" % (error.status, reason.get(error.status, b"Bad Request"))]
        for name, value in self.server_state.default_headers:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        # A lingering close: had it closed with the client still sending, the kernel would answer its bytes with
        # a reset, and the client could lose the answer before reading it. So: end our side, read and drop
        # what still comes, and close after LINGER_S (or when the client closes).
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

"""Who may call: optional API keys (compared as SHA-256 digests, in constant time) and CORS for browsers.

CORS is Starlette's CORSMiddleware, outermost, so that a browser's preflight is answered before any key
is asked for (preflights carry no credentials). Probes stay open: /healthz, /readyz, /v2/health/*; so does
/metrics unless ``metrics_auth``, and the pages a browser loads before it can be asked for a key: the
playground (/), the API documentation (/docs, /redoc, /openapi.json) and their assets (/static/*). The API
calls they make need a key like any other client's.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Unauthorized
from .middleware import reject
from .runtime import Runtime
from .settings import Settings

OPEN_PATHS = ("/healthz", "/readyz", "/v2/health/", "/static/")  # prefixes
OPEN_PAGES = ("/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")  # exact: every path starts with /


def key_digests(settings: Settings) -> list[bytes]:
    """SHA-256 digests of every configured key (empty: keys are off). A keys setting that is set but holds no key
    (empty, only commas, a file of comments) is an error, not keys off: it served everyone without a word."""
    digests = [hashlib.sha256(k.strip().encode()).digest() for k in (settings.api_keys or "").split(",") if k.strip()]
    if settings.api_keys_file is not None:
        for number, line in enumerate(Path(settings.api_keys_file).read_text().splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            text = fields[0]  # what sha256sum writes after the digest ("  -", or "  file") is not part of it
            try:
                digest = bytes.fromhex(text)
            except ValueError:
                digest = b""
            if len(digest) != hashlib.sha256().digest_size:
                raise ValueError(f"{settings.api_keys_file}:{number}: expected a SHA-256 hex digest (64 hex digits)")
            digests.append(digest)
    if not digests and (settings.api_keys is not None or settings.api_keys_file is not None):
        where = "PERCEIVER_API_KEYS" if settings.api_keys is not None else "PERCEIVER_API_KEYS_FILE"
        raise ValueError(
            f"{where} is set but holds no key, which would leave every endpoint open: give at least one key, "
            "or unset it to serve without keys"
        )
    return digests


def cors_origins(settings: Settings) -> list[str]:
    return [o.strip() for o in (settings.cors_origins or "").split(",") if o.strip()]


class ApiKeyMiddleware:
    """401 unless the request carries a configured key (or is a probe)."""

    def __init__(self, app: ASGIApp, runtime: Runtime, digests: list[bytes]) -> None:
        self.app = app
        self.runtime = runtime
        self.digests = digests
        self.metrics_open = not runtime.settings.metrics_auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope["path"]) or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        error = Unauthorized(
            "this server needs an API key: send Authorization: Bearer <key> or X-API-Key: <key>",
            {"WWW-Authenticate": "Bearer"},
        )
        scope.setdefault("state", {})["reason"] = error.reason  # the request's log line says why, as a 429's does
        await reject(self.runtime, error, scope["path"], "")(scope, receive, send)

    def _open(self, path: str) -> bool:
        return path.startswith(OPEN_PATHS) or path in OPEN_PAGES or (path == "/metrics" and self.metrics_open)

    def _allowed(self, scope: Scope) -> bool:
        presented = b""
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                presented = value
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:]
        return key_allowed(self.digests, presented)


def key_allowed(digests: list[bytes], presented: bytes) -> bool:
    """Whether ``presented`` is one of the keys (HTTP's headers, gRPC's metadata)."""
    digest = hashlib.sha256(presented.strip()).digest()
    matched = False
    for known in digests:  # every digest compared, each in constant time: no early exit to time
        matched |= hmac.compare_digest(digest, known)
    return matched and bool(presented.strip())

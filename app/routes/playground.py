"""The playground: a static page at / that calls this server's API from the browser.

Its three files (app/static/playground/) ship in the package: no build step, no CDN, so the page works
offline and in air-gapped clusters. The Content-Security-Policy lets the page load and send nothing to any
other host. The page and its assets need no API key (app/access.py); the API calls it makes do. Left out of
the OpenAPI document: the page is not part of the API.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from ..errors import NotFound

ASSETS = Path(__file__).parents[1] / "static" / "playground"
ASSETS_PATH = "/static/playground/"
MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' blob: data:",  # previews and results are object URLs; data: only for the empty favicon
        "media-src 'self' blob:",
        "base-uri 'none'",
        "form-action 'none'",  # every form is sent by the script, with fetch
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # revalidate: a new release's page never runs with the old script
}

router = APIRouter(include_in_schema=False)


@functools.cache
def read_asset(name: str) -> bytes:
    return (ASSETS / name).read_bytes()


def asset_response(name: str) -> Response:
    return Response(read_asset(name), media_type=MEDIA_TYPES[name], headers=HEADERS)


@router.get("/")
async def page() -> Response:
    return asset_response("index.html")


@router.get(ASSETS_PATH + "{name}")
async def asset(name: str) -> Response:
    # A fixed list of names: nothing a client sends is ever turned into a path.
    if name not in MEDIA_TYPES:
        raise NotFound(f"no playground asset {name!r}")
    return asset_response(name)

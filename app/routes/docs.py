"""The API documentation pages, /docs (Swagger UI) and /redoc (ReDoc), from this server's own assets.

The pages are FastAPI's; their scripts and styles are fastapi-offline's package data, served at DOCS_ASSETS
(FastAPI's own pages load them from a CDN, so /docs was blank offline and in air-gapped clusters). Each page
carries a Content-Security-Policy, as the playground does: everything from this server, nothing from any other
host, and of the inline code only the page's own set-up script, allowed by its hash.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

DOCS_ASSETS = "/static/docs"  # Swagger UI's and ReDoc's scripts and styles (app/main.py mounts them)
SWAGGER_UI = "/docs"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
REDOC = "/redoc"
INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.S)  # an element with a src or href is not inline

router = APIRouter(include_in_schema=False)


def content_security_policy(html: str, *, redoc: bool = False) -> str:
    """The policy for one page: its own inline scripts and styles by their hash, the rest from this server."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, code in INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
        hashes[tag].append(f"'sha256-{digest}'")
    # ReDoc's styled-components add <style> elements while it runs, which no hash can name. A hash in the
    # directive would make browsers ignore 'unsafe-inline', so ReDoc's styles get 'unsafe-inline' alone.
    styles = ["'unsafe-inline'"] if redoc else hashes["style"]
    return "; ".join(
        (
            "default-src 'none'",
            " ".join(["script-src 'self'", *hashes["script"]]),
            " ".join(["style-src 'self'", *styles]),
            "img-src 'self' data:",  # Swagger UI's icons are data: URLs in its stylesheet
            "connect-src 'self'",  # the OpenAPI document, and Swagger UI's "Try it out"
            *(["worker-src blob:"] if redoc else []),  # ReDoc's search index runs in a worker it makes from a blob
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def with_policy(page: HTMLResponse, *, redoc: bool = False) -> HTMLResponse:
    policy = content_security_policy(bytes(page.body).decode(), redoc=redoc)
    page.headers["content-security-policy"] = policy
    page.headers["x-content-type-options"] = "nosniff"
    page.headers["referrer-policy"] = "no-referrer"
    return page


def asset(request: Request, name: str) -> str:
    return f"{request.scope.get('root_path', '')}{DOCS_ASSETS}/{name}"


@router.get(SWAGGER_UI)
async def swagger_ui(request: Request) -> HTMLResponse:
    app = request.app
    page = get_swagger_ui_html(
        openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=OAUTH2_REDIRECT,
        swagger_js_url=asset(request, "swagger-ui-bundle.js"),
        swagger_css_url=asset(request, "swagger-ui.css"),
        swagger_favicon_url=asset(request, "favicon.png"),
        swagger_ui_parameters=app.swagger_ui_parameters,
    )
    return with_policy(page)


@router.get(OAUTH2_REDIRECT)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return with_policy(get_swagger_ui_oauth2_redirect_html())


@router.get(REDOC)
async def redoc(request: Request) -> HTMLResponse:
    page = get_redoc_html(
        openapi_url=f"{request.scope.get('root_path', '')}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=asset(request, "redoc.standalone.js"),
        redoc_favicon_url=asset(request, "favicon.png"),
        with_google_fonts=False,
    )
    return with_policy(page, redoc=True)

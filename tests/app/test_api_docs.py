"""/docs and /redoc (app/routes/docs.py): a Content-Security-Policy that allows the page's own scripts and styles
and nothing from another host, checked on the headers, then in Debian's chromium (Playwright never downloads a
browser here; that part is skipped without /usr/bin/chromium)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from .conftest import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
PAGES = ("/docs", "/redoc", "/docs/oauth2-redirect")
TIMEOUT_MS = 30_000  # a busy 2-core machine
OWN_SOURCES = re.compile(r"'self'|'none'|'unsafe-inline'|'sha256-[A-Za-z0-9+/=]+'|data:|blob:")


def policy(response: httpx.Response) -> dict[str, list[str]]:
    directives = (d.split() for d in response.headers["content-security-policy"].split(";"))
    return {name: sources for name, *sources in directives}


def sha256(code: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()}'"


@pytest.mark.parametrize("path", PAGES)
def test_each_page_has_a_policy_that_names_no_other_host(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    found = policy(r)
    assert found["default-src"] == ["'none'"]
    assert {"script-src", "style-src", "connect-src", "frame-ancestors"} <= set(found)
    for name, sources in found.items():
        assert all(OWN_SOURCES.fullmatch(s) for s in sources), (name, sources)


@pytest.mark.parametrize("path", PAGES)
def test_the_policy_allows_the_pages_own_scripts_and_styles(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    found = policy(r)
    for code in re.findall(r"<script>(.*?)</script>", r.text, re.S):
        assert sha256(code) in found["script-src"]
    for code in re.findall(r"<style>(.*?)</style>", r.text, re.S):
        assert sha256(code) in found["style-src"] or "'unsafe-inline'" in found["style-src"]
    for url in re.findall(r'(?:src|href)="([^"]+)"', r.text):  # files: allowed as 'self' when they are ours
        assert url.startswith("/") and not url.startswith("//"), url
        assert client.get(url).status_code == 200, url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian's chromium package; .ci/run installs it)")
    with sync_playwright() as playwright:
        # Chromium refuses to run as root with its sandbox on; CI containers run as root.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


REPORT_VIOLATIONS = """
window.violations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.violations.push([e.violatedDirective, e.blockedURI]);
});
"""


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_page_works_in_a_browser_with_no_violation_but_other_hosts(
    browser: Browser, demo_server: LiveServer, path: str
) -> None:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.add_init_script(REPORT_VIOLATIONS)
    page.goto(demo_server.url + path)
    if path == "/docs":  # the spec rendered, and "Try it out" reaches the API
        page.locator(".opblock-summary", has_text="/healthz").click()
        page.get_by_role("button", name="Try it out").click()
        page.get_by_role("button", name="Execute").click()
        answer = page.locator(".live-responses-table tbody .response-col_description")
        expect(answer).to_contain_text('"status": "ok"', timeout=TIMEOUT_MS)
    else:  # the spec rendered, and the search (a worker made from a blob) answers
        expect(page.locator("[data-section-id]").first).to_be_attached(timeout=TIMEOUT_MS)
        page.get_by_placeholder("Search...").fill("classify")
        expect(page.locator("[role=search] li").first).to_be_visible(timeout=TIMEOUT_MS)
    violations = page.evaluate("window.violations")
    page.close()
    # ReDoc's sidebar asks cdn.redoc.ly for a logo: refused, as every other host is, and the page does without.
    ours = [v for v in violations if not v[1].startswith(("http://", "https://")) or v[1].startswith(demo_server.url)]
    assert not ours and not errors, (violations, errors)

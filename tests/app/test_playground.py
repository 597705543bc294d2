"""The playground page at /, driven in a real browser (Debian's chromium through Playwright) against a live
demo server: every panel's happy path that CI can afford, a readable error, the API-key prompt, and no
request to any host but the server.

Screenshots (desktop and 390 px phone width) go to $PLAYGROUND_SCREENSHOTS, else to the test's tmp_path;
the test prints the folder.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import MEDIA, LiveServer, make_mp4

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (Debian's chromium package; .ci/run installs it)", allow_module_level=True)

from playwright.sync_api import Browser, FilePayload, Page, Request, expect, sync_playwright  # noqa: E402

TIMEOUT_MS = 60_000  # one optical-flow window takes about 2 s on 2 busy cores; leave room
expect.set_options(timeout=TIMEOUT_MS)
PERCENT = re.compile(r"^\d{1,3}\.\d%$")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # Chromium refuses to run as root with its sandbox on; CI containers run as root.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PLAYGROUND_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"playground screenshots: {folder}")
    return folder


def open_page(browser: Browser, server: LiveServer, requests: list[Request]) -> Page:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.on("request", lambda request: requests.append(request))
    page.goto(server.url + "/")
    return page


def assert_only_the_server(requests: list[Request], server: LiveServer) -> None:
    # blob: and data: URLs are this page's own memory (previews, results), not hosts.
    urls = [r.url for r in requests]
    elsewhere = [url for url in urls if not url.startswith((server.url + "/", "blob:", "data:"))]
    assert not elsewhere, elsewhere
    assert any(url.startswith(server.url + "/v1/") for url in urls)


def shifted_frames() -> tuple[bytes, bytes]:
    """Two 240×320 crops of the cat photo, the second moved 4 px right and 2 px down: one flow window."""
    photo = Image.open(MEDIA / "cat.jpg").convert("RGB")
    out = []
    for dx, dy in ((0, 0), (4, 2)):
        buffer = io.BytesIO()
        photo.crop((20 - dx, 20 - dy, 340 - dx, 260 - dy)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out[0], out[1]


def file(name: str, mime: str, data: bytes) -> FilePayload:
    return {"name": name, "mimeType": mime, "buffer": data}


def test_every_panel_in_a_browser(browser: Browser, demo_server: LiveServer, screenshots: Path) -> None:
    requests: list[Request] = []
    page = open_page(browser, demo_server, requests)
    problems: list[str] = []  # a CSP violation, or a script error, is logged to the console
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    expect(page.locator("#server .badge")).to_have_text("random weights")  # demo profile: said loudly

    classify = page.locator("#classify")
    expect(classify.locator(".source")).to_contain_text("classify/learned: weights from demo")
    expect(classify.locator("select[name=model] option")).to_have_count(3)  # learned, fourier, conv
    classify.get_by_label(re.compile("Drop an image")).set_input_files(MEDIA / "cat.jpg")  # the drop zone labels it
    expect(classify.locator("img.preview")).to_be_visible()
    classify.get_by_role("button", name="Classify").click()
    expect(classify.locator(".bars li")).to_have_count(5)
    first = classify.locator(".bars li").first
    expect(first.locator(".score")).to_have_text(PERCENT)
    expect(classify.locator(".latency")).to_contain_text("classify/learned answered in")
    expect(classify.locator(".latency")).to_contain_text("inference")

    fill = page.locator("#fill-mask")
    fill.get_by_label("Text").fill("Hello w[MASK]rld and caf[MASK][MASK]!")
    fill.get_by_role("button", name="Fill").click()
    filled = fill.locator(".filled")
    expect(filled.locator("mark")).to_have_count(2)  # "o" and the two bytes of "é": two runs
    text = filled.inner_text()
    assert text.startswith("Hello w") and text.endswith("!") and "[MASK]" not in text

    flow = page.locator("#optical-flow")
    first_frame, second_frame = shifted_frames()
    flow.locator("input[name=frame1]").set_input_files(files=[file("frame1.png", "image/png", first_frame)])
    flow.locator("input[name=frame2]").set_input_files(files=[file("frame2.png", "image/png", second_frame)])
    flow.get_by_role("button", name="Compute flow").click()
    image = flow.locator("img.flow")
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [320, 240]

    video = page.locator("#autoencode")
    clip = make_mp4(seconds=0.8, size=(160, 120))
    video.locator("input[name=video]").set_input_files(files=[file("clip.mp4", "video/mp4", clip)])
    video.get_by_role("button", name="Classify and reconstruct").click()
    expect(video.locator(".bars li")).to_have_count(5)  # from x-predictions
    rebuilt = video.get_by_label("Reconstructed frames")
    page.wait_for_function("v => v.readyState >= 1 && v.videoWidth > 0", arg=rebuilt.element_handle())

    page.screenshot(path=screenshots / "desktop.png", full_page=True)

    # A corrupt upload: the API's 4xx body, in plain words, where the labels were.
    classify.locator("input[name=image]").set_input_files(files=[file("broken.jpg", "image/jpeg", b"\xff\xd8 junk")])
    classify.get_by_role("button", name="Classify").click()
    error = classify.get_by_role("alert")
    expect(error).to_contain_text("image")
    message = error.inner_text()
    assert message.startswith(("This file type is not supported", "The server could not use this input"))
    assert "{" not in message, message

    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than a phone
    page.screenshot(path=screenshots / "phone.png", full_page=True)
    assert not [p for p in problems if "status of 4" not in p], problems  # the 4xx above is logged; nothing else
    assert_only_the_server(requests, demo_server)
    page.close()


def test_the_page_is_open_and_its_api_calls_ask_for_a_key(browser: Browser) -> None:
    server = LiveServer(demo_tasks=["classify-text"], api_keys="sesame").start()
    try:
        with server.client() as client:
            index = client.get("/")
            assert index.status_code == 200 and "default-src 'none'" in index.headers["content-security-policy"]
            for asset in ("playground.js", "playground.css"):
                assert client.get(f"/static/playground/{asset}").status_code == 200
            assert client.get("/v1/models").status_code == 401
            assert "/" not in client.get("/openapi.json", headers={"x-api-key": "sesame"}).json()["paths"]

        requests: list[Request] = []
        page = open_page(browser, server, requests)
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text("needs an API key")  # /v1/models answered 401
        dialog.get_by_label("API key").fill("wrong")
        dialog.get_by_role("button", name="Use key").click()
        expect(dialog).to_contain_text("not accepted")
        dialog.get_by_label("API key").fill("sesame")
        dialog.get_by_role("button", name="Use key").click()
        expect(dialog).to_be_hidden()
        expect(page.locator("#classify .source")).to_have_text("This server does not serve this task.")

        panel = page.locator("#classify-text")
        panel.get_by_role("button", name="Classify text").click()
        expect(panel.locator(".bars li")).to_have_count(2)
        keys = [r.headers.get("authorization") for r in requests if "/v1/" in r.url]
        assert keys == [None, "Bearer wrong", "Bearer sesame", "Bearer sesame"]
        assert_only_the_server(requests, server)
        page.close()
    finally:
        server.stop()


def test_assets_are_small_and_local() -> None:
    """No framework and no other host: the three files stay small and name no URL but the server's own."""
    folder = Path(__file__).parents[2] / "app" / "static" / "playground"
    total = 0
    for path in folder.iterdir():
        text = path.read_text()
        total += len(text)
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path.name
    assert total < 40_000


def test_unknown_assets_are_404(demo_server: LiveServer) -> None:
    r = httpx.get(demo_server.url + "/static/playground/secret.py")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"

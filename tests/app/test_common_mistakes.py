"""What a newcomer trips over: each common mistake gets an answer that says what to do, /docs works with
no network, probes stay out of the INFO log, and /v1/models shows no field that means nothing."""

from __future__ import annotations

import logging
import re
import time

import httpx
import pytest

from .conftest import MEDIA, LiveServer


def message(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json", response.headers
    return str(response.json()["error"]["message"])


def test_curl_d_json_without_its_content_type_is_told_to_send_application_json(client: httpx.Client) -> None:
    # curl -d '{"text": ...}' sends application/x-www-form-urlencoded
    r = client.post(
        "/v1/fill-mask",
        content=b'{"text": "a [MASK] b"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 422
    assert "content-type: application/json" in message(r)


def test_json_or_a_raw_body_sent_to_a_multipart_endpoint_says_what_it_takes(client: httpx.Client) -> None:
    for kwargs in (
        {"json": {"frame1": "a.png"}},
        {"content": b"not a form", "headers": {"content-type": "text/plain"}},
    ):
        r = client.post("/v1/optical-flow", **kwargs)  # type: ignore[arg-type]
        assert r.status_code == 422
        assert "multipart/form-data with the file field(s) frame1, frame2" in message(r)


def test_invalid_json_gives_its_position_in_plain_words(client: httpx.Client) -> None:
    r = client.post("/v1/fill-mask", content=b'{"text": "a [MASK] b"', headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert re.search(r"not valid JSON: .+ at line 1, column \d+", message(r)), message(r)


def test_an_empty_json_body_is_called_empty(client: httpx.Client) -> None:
    for body in (b"", b"  \n"):  # curl -X POST with no -d, or a file that turned out empty
        r = client.post("/v1/classify-text", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert message(r) == "the body is empty; send a JSON object"


def test_get_on_a_task_endpoint_says_to_post_and_what_to_send(client: httpx.Client) -> None:
    r = client.get("/v1/classify")  # a browser's address bar, or curl without -F or -d
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["type"] == "method_not_allowed"
    assert message(r).startswith("GET is not allowed on /v1/classify; use POST: /v1/classify takes multipart/form-data")
    r = client.post("/v1/models")
    assert r.status_code == 405 and message(r) == "POST is not allowed on /v1/models; use GET"


@pytest.mark.parametrize("bad", ["frame1", "frame2"])
def test_a_text_file_as_one_flow_frame_names_that_frame(client: httpx.Client, bad: str) -> None:
    photo = (MEDIA / "cat.jpg").read_bytes()
    files = {"frame1": ("a.jpg", photo), "frame2": ("b.jpg", photo)}
    files[bad] = ("notes.txt", b"these are notes, not a frame\n")
    r = client.post("/v1/optical-flow", files=files)
    assert r.status_code == 415
    assert message(r).startswith(f"{bad}: "), message(r)


def test_a_text_file_as_the_video_names_the_video(client: httpx.Client) -> None:
    r = client.post("/v1/autoencode", files={"video": ("clip.mp4", b"not a video at all\n" * 10)})
    assert r.status_code in (415, 422)
    assert message(r).startswith("video: "), message(r)


def form(*parts: tuple[str, str | None, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart body as a browser's form writes it: (name, filename or None for a text field, content)."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        kind = b"" if filename is None else b"Content-Type: application/octet-stream\r\n"
        body += f"--B\r\nContent-Disposition: {disposition}\r\n".encode() + kind + b"\r\n" + content + b"\r\n"
    return body + b"--B--\r\n", {"content-type": "multipart/form-data; boundary=B"}


def test_a_file_input_left_empty_is_no_file(client: httpx.Client) -> None:
    """A browser's form sends a file input left empty as a part with filename="" and no bytes; other clients an
    empty field. Either is an upload not sent: an optional one is absent (it was "the audio upload is empty"), a
    required one is asked for."""
    clip = (MEDIA.parent.parent / "examples" / "clip.mp4").read_bytes()
    for empty in (("audio", "", b""), ("audio", None, b"")):
        content, headers = form(("video", "clip.mp4", clip), empty, ("top_k", None, b"1"))
        r = client.post("/v1/autoencode", content=content, headers=headers)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1, r.text
    content, headers = form(("image", "", b""), ("top_k", None, b"1"))
    r = client.post("/v1/classify", content=content, headers=headers)
    assert r.status_code == 422 and message(r).startswith("image: file required"), r.text
    content, headers = form(("image", None, b"a caption"))  # a text field with something in it is still a mistake
    r = client.post("/v1/classify", content=content, headers=headers)
    assert r.status_code == 422 and "expected a file upload" in message(r), r.text


def test_of_several_inputs_the_error_names_the_one_it_is_about(client: httpx.Client) -> None:
    cat = (MEDIA / "cat.jpg").read_bytes()
    images = [("image", ("a.jpg", cat)), ("image", ("b.jpg", cat[: len(cat) // 2])), ("image", ("c.jpg", cat))]
    r = client.post("/v1/classify", files=images)
    assert r.status_code == 422 and message(r).startswith("input 2 of 3: the image is corrupt or truncated"), r.text
    r = client.post("/v1/fill-mask", json={"text": ["a [MASK] b", "no mask here"]})
    assert r.status_code == 422 and message(r).startswith("input 2 of 2: the text has no [MASK]"), r.text
    r = client.post("/v1/fill-mask", json={"text": "no mask here"})  # one input: nothing to tell apart
    assert r.status_code == 422 and message(r).startswith("the text has no [MASK]"), r.text
    # v2's items are a tensor's rows: "row", as the protocol says it (an "input" there is a tensor)
    texts = {"name": "TEXT", "shape": [3], "datatype": "BYTES", "data": ["a [MASK] b", "", "no mask"]}
    r = client.post("/v2/models/fill-mask/infer", json={"inputs": [texts]})
    assert r.status_code == 400 and r.json()["error"].startswith("row 2 of 3: TEXT: String should have"), r.text
    texts["data"] = ["a [MASK] b", "x [MASK]", "no mask"]
    r = client.post("/v2/models/fill-mask/infer", json={"inputs": [texts]})
    assert r.status_code == 400 and r.json()["error"].startswith("row 3 of 3: the text has no [MASK]"), r.text


def test_an_invalid_text_gets_one_problem_at_the_place_it_was_sent(client: httpx.Client) -> None:
    """``text`` is a string or a list of them: an error names the branch the value took, where the client put it
    (it listed both: "text.constrained-str: ...; text.list[constrained-str]: Input should be a valid list"), and
    over /v2 it names the TEXT input, not a parameter the client never sent."""
    cases = [
        ({"text": ""}, "text: String should have at least 1 character"),
        ({"text": ["a [MASK]", ""]}, "text.1: String should have at least 1 character"),
        ({"text": 5}, "text: Input should be a valid string"),
        ({"text": []}, "text: List should have at least 1 item after validation, not 0"),
        ({"text": "a [MASK]", "top_k": True}, "top_k: expected a number, got a boolean"),  # was read as 1
    ]
    for body, expected in cases:
        r = client.post("/v1/fill-mask", json=body)
        assert r.status_code == 422 and message(r) == expected, r.text
    r = client.post("/v1/fill-mask?=3", json={"text": "a [MASK]"})  # was "body: unknown field"
    assert r.status_code == 422 and message(r).startswith("the query string has a parameter without a name"), r.text
    row = {"name": "TEXT", "shape": [2], "datatype": "BYTES", "data": ["a [MASK]", ""]}
    r = client.post("/v2/models/fill-mask/infer", json={"inputs": [row]})
    said = r.json()["error"]
    assert r.status_code == 400 and said == "row 2 of 2: TEXT: String should have at least 1 character", r.text


def test_a_trailing_slash_is_a_404_that_names_the_right_path(client: httpx.Client) -> None:
    r = client.post("/v1/classify/", files={"image": ("cat.jpg", (MEDIA / "cat.jpg").read_bytes())})
    assert r.status_code == 404  # not a bare 307 with an empty body
    assert "did you mean /v1/classify (without the trailing slash)" in message(r)
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and "/docs" in message(r)


@pytest.mark.parametrize(
    "path",
    [
        "/healthz",
        "/readyz",
        "/v2/health/ready",
        "/v2/models/fill-mask/ready",
        "/v2/models/fill-mask/versions/1/ready",
        "/",
        "/docs",
        "/metrics",
        "/v1/models",
        "/v2",
        "/v2/models",
        "/v2/models/fill-mask",
        "/v2/models/fill-mask/config",
        "/v2/models/fill-mask/stats",
        "/static/playground/playground.js",
    ],
)
def test_head_answers_as_get_without_a_body_on_every_get_route(client: httpx.Client, path: str) -> None:
    """RFC 9110 9.1: HEAD wherever GET is. FastAPI takes HEAD only where a route names it: the pages, /metrics,
    /v1/models and most of /v2 were a 405."""
    got = client.get(path)
    r = client.head(path)
    assert r.status_code == got.status_code == 200 and r.content == b"", (path, r.status_code)
    assert r.headers["content-type"] == got.headers["content-type"]


def test_head_on_a_post_route_is_a_405_that_names_post(client: httpx.Client) -> None:
    r = client.head("/v1/classify-text")
    assert r.status_code == 405 and "POST" in r.headers["allow"]


def test_docs_load_every_asset_from_this_server(client: httpx.Client) -> None:
    """Swagger UI and ReDoc come from the package (fastapi-offline), not from a CDN."""
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and not re.search(r"https?://", html), html
        for asset in assets:
            r = client.get(asset)
            assert r.status_code == 200 and len(r.content) > 1000, asset
    bundle = client.get("/static/docs/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in bundle


def test_fill_mask_and_flow_report_no_num_labels(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert "num_labels" not in models["fill-mask"] and "num_labels" not in models["optical-flow"]
    assert models["classify/conv"]["num_labels"] == 10 and models["autoencode"]["num_labels"] == 700


def test_probes_are_logged_at_debug_and_requests_at_info(
    demo_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    paths = ("/healthz", "/readyz", "/metrics", "/v1/models")

    def request_levels() -> dict[str, int]:
        return {
            r.fields["path"]: r.levelno  # type: ignore[attr-defined]
            for r in caplog.records
            if r.name == "perceiver.server" and r.getMessage() == "request" and r.fields["path"] in paths  # type: ignore[attr-defined]
        }

    with caplog.at_level(logging.DEBUG, logger="perceiver.server"), demo_server.client() as client:
        for path in paths:
            assert client.get(path).status_code == 200
        deadline = time.monotonic() + 60  # the server logs a request just after its response has gone out
        while len(request_levels()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        levels = request_levels()
    assert levels == {
        "/healthz": logging.DEBUG,
        "/readyz": logging.DEBUG,
        "/metrics": logging.DEBUG,
        "/v1/models": logging.INFO,
    }


def test_start_up_reports_each_models_load_and_warm_up_time(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="perceiver.server"):
        server = LiveServer(demo_tasks=["classify-text", "fill-mask"], warmup=True).start()
        try:
            with server.client() as client:
                models = client.get("/v1/models").json()["models"]
        finally:
            server.stop()
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready ")]
    assert len(ready) == 1, ready
    for model in models:
        assert model["load_s"] >= 0 and model["warmup_s"] > 0, model
        assert re.search(rf"{model['name']} \d+\.\d\+\d+\.\ds", ready[0]), ready[0]


def test_a_task_no_model_serves_is_a_404_before_its_body_is_read() -> None:
    """It asked for a valid body first: JSON to /v1/autoencode was a 422 "video: file required", and the 404 came
    only once a whole valid upload had been read (audit)."""
    server = LiveServer(demo_tasks=["classify-text"]).start()
    try:
        with server.client() as client:
            for path in ("/v1/autoencode", "/v1/optical-flow?model=x"):
                r = client.post(path, json={"text": "hi"})
                assert r.status_code == 404, r.text
                assert "no model is configured for task" in message(r), r.text
    finally:
        server.stop()

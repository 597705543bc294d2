"""The REST API's other ways in: a JSON list of texts (as text-embeddings-inference takes), files as base64
in a JSON body (as a browser holding a data: URL sends them), and ``model`` on every task."""

from __future__ import annotations

import base64

import httpx
import pytest

from .conftest import MEDIA

CAT = (MEDIA / "cat.jpg").read_bytes()
COFFEE = (MEDIA / "coffee.jpg").read_bytes()


def scores(body: dict[str, object]) -> dict[str, float]:
    return {p["label"]: p["score"] for p in body["predictions"]}  # type: ignore[attr-defined,index]


def test_a_list_of_texts_is_answered_in_order_like_each_text_alone(client: httpx.Client) -> None:
    texts = ["What a wonderful day!", "This is the worst film I have seen.", "ok"]
    batch = client.post("/v1/classify-text", json={"text": texts, "top_k": 2})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert len(results) == 3 and batch.json()["model"] == "classify-text"
    for text, result in zip(texts, results, strict=True):
        alone = client.post("/v1/classify-text", json={"text": text, "top_k": 2}).json()
        assert scores(result) == pytest.approx(scores(alone), abs=1e-5)


def test_a_list_of_masked_texts_fills_each_one(client: httpx.Client) -> None:
    texts = ["The sky is [MASK][MASK][MASK][MASK].", "a [MASK] b"]
    batch = client.post("/v1/fill-mask", json={"text": texts, "top_k": 3})
    assert batch.status_code == 200, batch.text
    for text, result in zip(texts, batch.json()["results"], strict=True):
        alone = client.post("/v1/fill-mask", json={"text": text, "top_k": 3}).json()
        assert [m["byte_offset"] for m in result["masks"]] == [m["byte_offset"] for m in alone["masks"]]
        for got, want in zip(result["masks"], alone["masks"], strict=True):
            assert [c["score"] for c in got["candidates"]] == pytest.approx(
                [c["score"] for c in want["candidates"]], abs=1e-5
            )


def test_a_list_of_one_text_still_answers_results(client: httpx.Client) -> None:
    body = client.post("/v1/classify-text", json={"text": ["hello"]}).json()
    assert len(body["results"]) == 1 and "predictions" not in body


@pytest.mark.parametrize(("text", "says"), [([], "at least 1"), (["a", ""], "at least 1"), (["a"] * 65, "at most 64")])
def test_bad_text_lists_are_422s_that_say_why(client: httpx.Client, text: list[str], says: str) -> None:
    r = client.post("/v1/classify-text", json={"text": text})
    assert r.status_code == 422 and says in r.json()["error"]["message"], r.text


def test_an_image_as_base64_in_json_answers_like_the_upload(client: httpx.Client) -> None:
    upload = client.post("/v1/classify", files={"image": ("cat.jpg", CAT)}, data={"top_k": "3"}).json()
    as_json = client.post("/v1/classify", json={"image": base64.b64encode(CAT).decode(), "top_k": 3})
    assert as_json.status_code == 200, as_json.text
    assert as_json.json() == upload
    data_url = "data:image/jpeg;base64," + base64.b64encode(CAT).decode()
    assert client.post("/v1/classify", json={"image": data_url, "top_k": 3}).json() == upload


def test_several_base64_images_answer_in_order(client: httpx.Client) -> None:
    images = [base64.b64encode(x).decode() for x in (CAT, COFFEE)]
    body = client.post("/v1/classify", json={"image": images, "top_k": 1}).json()
    for data, result in zip((CAT, COFFEE), body["results"], strict=True):
        alone = client.post("/v1/classify", files={"image": ("x.jpg", data)}, data={"top_k": "1"}).json()
        assert result["predictions"] == alone["predictions"]


@pytest.mark.parametrize("bad", ["not base64!", 12, {"bytes": "abc"}])
def test_a_file_that_is_not_base64_is_a_422_naming_it(client: httpx.Client, bad: object) -> None:
    r = client.post("/v1/classify", json={"image": bad})
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("image: expected the file as base64"), r.text


def test_base64_text_that_is_not_an_image_is_a_415(client: httpx.Client) -> None:
    r = client.post("/v1/classify", json={"image": base64.b64encode(b"plain text, not an image").decode()})
    assert r.status_code == 415


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        ("/v1/fill-mask", {"json": {"text": "a [MASK]"}}),
        ("/v1/classify-text", {"json": {"text": "a"}}),
        ("/v1/classify", {"files": {"image": ("cat.jpg", CAT)}}),
    ],
)
def test_every_task_takes_model_and_refuses_an_unknown_one(
    client: httpx.Client, path: str, kwargs: dict[str, object]
) -> None:
    task = path.removeprefix("/v1/")
    r = client.post(path, params={"model": "nope"}, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found", r.text
    variant = "conv" if task == "classify" else "default"
    by_variant = client.post(path, params={"model": variant}, **kwargs)  # type: ignore[arg-type]
    served_name = f"{task}/{variant}" if task == "classify" else task
    by_name = client.post(path, params={"model": served_name}, **kwargs)  # type: ignore[arg-type]
    assert by_variant.status_code == by_name.status_code == 200
    assert by_variant.json() == by_name.json() and by_name.json()["model"] == served_name


def test_autoencode_and_flow_take_model_too(client: httpx.Client) -> None:
    for path in ("/v1/autoencode", "/v1/optical-flow"):
        r = client.post(path, data={"model": "nope"}, files={"video": ("v.mp4", b"x")})
        assert r.status_code == 404 and "has no model 'nope'" in r.json()["error"]["message"], r.text

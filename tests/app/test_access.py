"""Who may call: API keys (plain or as SHA-256 digests in a file) and CORS, against a live server."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import LiveServer, occupy, release

ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.sha256"
    digest = hashlib.sha256(b"from-the-file").hexdigest()
    keys_file.write_text(f"# issued 2026-11-26\n{digest}  # ci\n")
    server = LiveServer(
        demo_tasks=["classify-text"], api_keys="alpha, beta", api_keys_file=keys_file, cors_origins=ORIGIN
    ).start()
    yield server
    server.stop()


def post(server: LiveServer, **headers: str) -> httpx.Response:
    with server.client() as client:
        return client.post("/v1/classify-text", json={"text": "who am I"}, headers=headers)


def test_requests_without_a_valid_key_get_a_json_401(locked: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="perceiver")
    for headers in ({}, {"authorization": "Bearer gamma"}, {"x-api-key": "alph"}, {"authorization": "Basic alpha"}):
        r = post(locked, **headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] == "unauthorized" and "X-API-Key" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"] == "Bearer"
    lines = [getattr(r, "fields", {}) for r in caplog.records if getattr(r, "fields", {}).get("status") == 401]
    assert len(lines) == 4 and {line.get("reason") for line in lines} == {"unauthorized"}, lines
    with locked.client() as client:
        assert client.get("/v1/models").status_code == 401


def test_any_configured_key_opens_the_api(locked: LiveServer) -> None:
    assert post(locked, authorization="Bearer alpha").status_code == 200
    assert post(locked, authorization="bearer beta").status_code == 200
    assert post(locked, **{"x-api-key": "beta"}).status_code == 200
    assert post(locked, **{"x-api-key": "from-the-file"}).status_code == 200  # stored only as its digest


def test_a_caller_without_a_key_learns_nothing_of_the_load(locked: LiveServer) -> None:
    """The key is checked before admission: an overloaded model refuses key holders with 429, and everyone
    else still gets 401."""
    served = locked.runtime.engine_for("classify-text")
    occupy(served, 100.0)  # busy with a batch that ends past every request's deadline
    try:
        assert post(locked).status_code == 401
        refused = post(locked, authorization="Bearer alpha")
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "overloaded"
    finally:
        release(served)
    assert post(locked, authorization="Bearer alpha").status_code == 200


def test_probes_and_metrics_stay_open(locked: LiveServer) -> None:
    with locked.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'reason="unauthorized"' in metrics.text  # the refusals above were counted


def test_the_pages_a_browser_loads_before_it_can_send_a_key_stay_open(locked: LiveServer) -> None:
    with locked.client() as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/static/docs/swagger-ui.css", "/"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/models").status_code == 401  # what the pages call still needs a key
        assert client.get("/docsx").status_code == 401  # exact pages, not prefixes


def test_metrics_can_require_a_key_too() -> None:
    server = LiveServer(demo_tasks=["classify-text"], api_keys="alpha", metrics_auth=True).start()
    try:
        with server.client() as client:
            assert client.get("/metrics").status_code == 401
            assert client.get("/metrics", headers={"x-api-key": "alpha"}).status_code == 200
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()


def test_a_browser_on_an_allowed_origin_may_call_and_others_may_not(locked: LiveServer) -> None:
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "x-api-key,content-type"}
    with locked.client() as client:
        allowed = client.options("/v1/classify-text", headers={"origin": ORIGIN, **preflight})
        refused = client.options("/v1/classify-text", headers={"origin": "https://evil.example", **preflight})
        call = client.post("/v1/classify-text", json={"text": "hi"}, headers={"origin": ORIGIN, "x-api-key": "alpha"})
    assert allowed.status_code == 200  # answered without a key: preflights carry none
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    message = refused.json()["error"]["message"]  # JSON, as every error (it was plain text)
    assert "CORS preflight refused: its origin not allowed" in message and "PERCEIVER_CORS_ORIGINS" in message
    assert call.status_code == 200 and call.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in call.headers["access-control-expose-headers"].lower()


def test_without_configuration_everything_is_open_and_no_origin_is_allowed(tmp_path: Path) -> None:
    server = LiveServer(demo_tasks=["classify-text"]).start()
    try:
        with server.client() as client:
            assert client.post("/v1/classify-text", json={"text": "open"}).status_code == 200
            r = client.options("/v1/classify-text", headers={"origin": ORIGIN, "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in r.headers and r.status_code == 405
        assert r.json()["error"]["type"] == "method_not_allowed"
    finally:
        server.stop()


def test_a_keys_file_made_as_the_readme_says_is_read(tmp_path: Path) -> None:
    """README's recipe, `printf %s "$KEY" | sha256sum`, writes the digest and then "  -": the server refused the
    file at start (audit). What follows the digest on its line is not part of it."""
    import subprocess

    from app.access import key_digests
    from app.settings import Settings

    made = subprocess.run(["sha256sum"], input=b"sk-test-123", capture_output=True, check=True).stdout
    assert made.endswith(b"  -\n")
    keys = tmp_path / "keys"
    keys.write_bytes(made + hashlib.sha256(b"second").hexdigest().encode() + b"  keyfile\n")
    expected = [hashlib.sha256(b"sk-test-123").digest(), hashlib.sha256(b"second").digest()]
    assert key_digests(Settings(api_keys_file=keys)) == expected


def test_a_malformed_keys_file_fails_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "keys"
    bad.write_text("not-a-digest\n")
    with pytest.raises(ValueError, match="expected a SHA-256 hex digest"):
        LiveServer(demo_tasks=["classify-text"], api_keys_file=bad)

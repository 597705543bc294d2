"""Before the models are loaded, a task request is told to come back (503 not_ready), whatever it asks for."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

from .conftest import MEDIA


def test_task_requests_before_readiness_get_503_not_ready_not_404() -> None:
    app = create_app(Settings(warmup=False))
    client = TestClient(app)  # not entered: the lifespan, and so model loading, never starts
    r = client.post(
        "/v1/classify", files={"image": ("cat.jpg", (MEDIA / "cat.jpg").read_bytes())}, data={"model": "conv"}
    )
    assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
    assert r.headers["retry-after"] == "1"
    r = client.post("/v1/classify-text", json={"text": "too early"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
    assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200

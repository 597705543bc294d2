"""The error table: statuses, types and rejection reasons; the one JSON shape; each rejection counted once."""

from __future__ import annotations

import inspect

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import errors
from app.errors import (
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMedia,
    body,
    for_status,
)

KINDS: list[type[ServiceError]] = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, ServiceError) and cls is not ServiceError
]


def test_the_table_is_not_empty() -> None:
    assert len(KINDS) >= 10


@pytest.mark.parametrize("kind", KINDS, ids=lambda cls: cls.__name__)
def test_each_kind_has_an_http_error_status_a_type_and_a_reason_unless_it_is_our_fault(
    kind: type[ServiceError],
) -> None:
    assert 400 <= kind.status <= 599
    assert isinstance(kind.type, str) and kind.type.strip() == kind.type and kind.type
    if kind.reason is None:
        assert kind.status >= 500, f"{kind.__name__} is a client error without a rejection reason"
    else:
        assert isinstance(kind.reason, str) and kind.reason


def test_types_are_unique() -> None:
    types = [kind.type for kind in KINDS]
    assert len(set(types)) == len(types), sorted(types)


def test_only_server_faults_lack_a_reason() -> None:
    faults = {kind.__name__ for kind in KINDS if kind.reason is None}
    assert faults == {"InternalError", "InferenceFailed"}
    # A 503 or 504 is a refusal the client acts on (retry elsewhere, later), so it is counted.
    assert all(kind.reason for kind in KINDS if kind.status in (503, 504))


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, BadRequest),
        (404, NotFound),
        (405, MethodNotAllowed),
        (413, PayloadTooLarge),
        (415, UnsupportedMedia),
        (401, BadRequest),
        (409, BadRequest),
        (418, BadRequest),
        (500, InternalError),
        (502, InternalError),
        (503, InternalError),
    ],
)
def test_for_status_maps_framework_errors(status: int, kind: type[ServiceError]) -> None:
    error = for_status(status, "something went wrong")
    assert type(error) is kind
    assert error.message == str(error) == "something went wrong"


def test_for_status_keeps_headers() -> None:
    error = for_status(405, "Method Not Allowed", {"allow": "POST"})
    assert error.headers == {"allow": "POST"}
    assert for_status(404, "Not Found").headers == {}


def test_headers_are_kept_on_any_error() -> None:
    error = errors.Overloaded("queue is full", {"retry-after": "2"})
    assert error.headers == {"retry-after": "2"} and error.status == 429


@pytest.mark.parametrize("kind", KINDS, ids=lambda cls: cls.__name__)
def test_body_is_exactly_type_and_message(kind: type[ServiceError]) -> None:
    error = kind("the image is 9000x9000", {"x-extra": "1"})
    assert body(error) == {"error": {"type": kind.type, "message": "the image is 9000x9000"}}


def rejections(client: httpx.Client, reason: str) -> float:
    """perceiver_rejections_total for the classify model and ``reason``, read from /metrics."""
    response = client.get("/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        if family.name != "perceiver_rejections":
            continue
        for sample in family.samples:
            if sample.name == "perceiver_rejections_total" and sample.labels == {
                "model": "classify/learned",
                "reason": reason,
                "task": "classify",
            }:
                return float(sample.value)
    return 0.0


def test_a_415_is_counted_once_under_its_reason(client: httpx.Client) -> None:
    before = rejections(client, "unsupported_media_type")
    others = rejections(client, "invalid_input")
    response = client.post("/v1/classify", files={"image": ("c.jpg", b"just some text\n" * 20)})
    assert response.status_code == 415
    error = response.json()["error"]
    assert set(error) == {"type", "message"} and error["type"] == "unsupported_media_type" and error["message"]
    assert rejections(client, "unsupported_media_type") == before + 1
    assert rejections(client, "invalid_input") == others  # counted under its own reason only

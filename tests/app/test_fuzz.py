"""Fuzzing: schemathesis generates requests for every operation of our own /openapi.json (examples,
coverage and fuzzing phases, up to 50 cases per operation: the REST routes and the Open Inference Protocol's
/v2 routes) and sends them to a live server on loopback. Every check runs, the response-conformance ones
included: no response may be a 5xx, have a status the operation does not document, break the documented
schema or content type, or hang; and the server stays up.

One check is left out, with reason: ``positive_data_acceptance`` expects every schema-valid request to be
accepted, but a schema cannot say that an uploaded file must be an MP4 (``format: binary`` allows a PNG,
which gets a correct 415), nor that an option may come in the query or the body but not twice with two
values (which gets a correct 422 instead of one value silently winning).
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from .conftest import LiveServer, schemathesis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_every_operation_survives_generated_requests(tmp_path: Path) -> None:
    server = LiveServer().start()  # the demo profile: every task
    try:
        run, summary = schemathesis(
            f"{server.url}/openapi.json",
            tmp_path,
            *("--max-examples", "50", "--seed", "20261126", "--checks", "all"),
            *("--exclude-checks", "positive_data_acceptance"),
        )
        assert run.returncode == 0, run.stdout[-6000:]
        assert re.search(r"Tested: (\d+)", summary) and re.search(r"Selected: (\d+)/\1", summary), summary
        tested = int(re.search(r"Tested: (\d+)", summary).group(1))  # type: ignore[union-attr]
        cases = int(re.search(r"(\d+) generated", summary).group(1))  # type: ignore[union-attr]
        paths = server.app.openapi()["paths"]
        assert tested == len(paths) and cases >= 50 * 5, summary
        assert {"/v2/models/{model_name}/infer", "/v2/health/ready", "/v2/repository/index"} <= set(paths)
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
    finally:
        server.stop()

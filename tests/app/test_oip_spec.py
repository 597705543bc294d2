"""The protocol's own specification as the judge: schemathesis generates requests from the published OpenAPI
file of the Open Inference Protocol (tests/app/specs/, verbatim) and checks every answer of a live demo server
against it: no 5xx, only the statuses the specification documents, its content types and its response schemas.

The file's model paths are templated ``${MODEL_NAME}`` (OpenAPI wants ``{MODEL_NAME}``), and a generated name
would only ever meet a 404, which the specification does not document for them. So its three model operations
(metadata, readiness, inference) are written out once per served model, version 1: every model is checked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .conftest import LiveServer, schemathesis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SPEC = Path(__file__).parent / "specs" / "open_inference_rest.yaml"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def for_models(spec: dict[str, Any], models: list[str]) -> dict[str, Any]:
    """The specification with each templated model path written out for every model (and version 1)."""
    paths: dict[str, Any] = {}
    for path, item in spec["paths"].items():
        if "${MODEL_NAME}" not in path:
            paths[path] = item
            continue
        for model in models:
            concrete = path.replace("${MODEL_NAME}", model).replace("${MODEL_VERSION}", "1")
            operations = {k: dict(v) for k, v in item.items() if k != "parameters"}
            for operation in operations.values():
                operation["operationId"] = f"{operation['operationId']}-{model}"
            paths[concrete] = operations
    return {**spec, "paths": paths}


def test_every_model_conforms_to_the_published_rest_specification(demo_server: LiveServer, tmp_path: Path) -> None:
    models = [engine.name.replace("/", ".") for engine in demo_server.runtime.engines()]
    spec = for_models(yaml.safe_load(SPEC.read_text()), models)
    written = tmp_path / "open_inference_rest.yaml"
    written.write_text(yaml.safe_dump(spec, sort_keys=False))
    run, summary = schemathesis(
        str(written),
        tmp_path,
        *("--url", demo_server.url, "--max-examples", "25", "--seed", "20261203", "--checks", CHECKS),
    )
    assert run.returncode == 0, run.stdout[-6000:]
    tested = re.search(r"Tested: (\d+)", summary)
    assert tested and int(tested.group(1)) == 3 + 3 * len(models), summary  # every operation, every model
    assert {"classify.learned", "classify-text", "fill-mask", "optical-flow", "autoencode"} <= set(models)
    assert httpx.get(demo_server.url + "/v2/health/ready", timeout=5).status_code == 200

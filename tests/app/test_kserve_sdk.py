"""KServe's Python SDK (0.21, from PyPI) against a live demo server: ``InferenceRESTClient`` with ``InferRequest``
as the SDK builds it (model_name and id in the body) over /v2, and ``InferenceGRPCClient`` over gRPC. Both give
the numbers tritonclient gets over HTTP for the same texts, and echo the request's id.

The SDK runs in its own environment (.venv/kserve-sdk, made by ``make install``), in a subprocess: its
requirements conflict with the project's lock, and it registers the protocol's protobuf names, as tritonclient
does, so the two cannot share a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as th

from .conftest import LiveServer

SDK = Path(sys.executable).parents[1] / "kserve-sdk" / "bin" / "python"
SCRIPT = Path(__file__).parent / "clients" / "kserve_sdk.py"
TEXTS = ["What a wonderful day!", "Ünïcödé works too ✓"]


def test_kserve_rest_and_grpc_clients_get_tritonclients_answer(demo_server: LiveServer) -> None:
    if not SDK.exists():
        pytest.fail(f"KServe's SDK is not installed at {SDK}: run `make install`")
    run = subprocess.run(
        [str(SDK), str(SCRIPT), demo_server.url, demo_server.grpc_target, *TEXTS],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["rest_ready"] and got["rest_model_ready"] and got["grpc_ready"] and got["grpc_model_ready"]

    client = th.InferenceServerClient(demo_server.url.removeprefix("http://"), network_timeout=120)
    text = th.InferInput("TEXT", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    expected = client.infer("classify-text", [text])
    client.close()
    for transport, request_id in (("rest", "rest-1"), ("grpc", "grpc-1")):
        answer = got[transport]
        assert answer["id"] == request_id and answer["model_name"] == "classify-text", transport
        assert answer["INDICES"] == expected.as_numpy("INDICES").tolist(), transport
        assert answer["LABELS"] == [[v.decode() for v in row] for row in expected.as_numpy("LABELS")], transport
        assert np.array_equal(np.float32(answer["SCORES"]), expected.as_numpy("SCORES")), transport

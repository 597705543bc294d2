"""KServe's Python SDK against a live server, run in the SDK's own environment (make install puts it in
.venv/kserve-sdk: its requirements conflict with the project's, and it registers the protocol's protobuf names
as tritonclient does). Prints one JSON line: what each client got.

    .venv/kserve-sdk/bin/python tests/app/clients/kserve_sdk.py http://127.0.0.1:8000 127.0.0.1:8001 TEXT...
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def request(texts: list[str], request_id: str) -> InferRequest:
    """The request as the SDK builds it: model_name in the body too, and an id."""
    text = InferInput("TEXT", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=False)
    return InferRequest(model_name="classify-text", infer_inputs=[text], request_id=request_id)


def outputs(response: object) -> dict[str, object]:
    found = {o.name: o.as_numpy().tolist() for o in response.outputs}  # type: ignore[attr-defined]
    return {
        "id": response.id,  # type: ignore[attr-defined]
        "model_name": response.model_name,  # type: ignore[attr-defined]
        "LABELS": [[v.decode() if isinstance(v, bytes) else v for v in row] for row in found["LABELS"]],
        "SCORES": found["SCORES"],
        "INDICES": found["INDICES"],
    }


async def main(base_url: str, target: str, texts: list[str]) -> dict[str, object]:
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    grpc = InferenceGRPCClient(target, timeout=60)
    try:
        return {
            "rest_ready": await rest.is_server_ready(base_url),
            "rest_model_ready": await rest.is_model_ready(base_url, "classify-text"),
            "rest": outputs(await rest.infer(base_url, request(texts, "rest-1"), model_name="classify-text")),
            "grpc_ready": await grpc.is_server_ready(),
            "grpc_model_ready": await grpc.is_model_ready("classify-text"),
            "grpc": outputs(await grpc.infer(request(texts, "grpc-1"))),
        }
    finally:
        await rest.close()
        await grpc.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))))

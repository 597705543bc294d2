"""The Open Inference Protocol (KServe v2) over HTTP/REST, as Triton and KServe speak it, with the binary tensor
extension: tritonclient, KServe's InferenceService probes and other v2 clients work unchanged.

Every served model is a v2 model named after its served name with "." for "/" (``classify/learned`` is
``classify.learned``), version "1". Inference runs through the task routes' own pipeline
(``run_items``): the same admission, deadlines, batcher, metrics and backpressure as /v1. Errors are the
protocol's ``{"error": "..."}`` (``reject`` in app/middleware.py writes them for every /v2 path).
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from .. import jsonlog
from ..admission import admit
from ..engine import Engine, served_name
from ..errors import BadRequest, ClientClosedRequest, ModelNotFound, NotReady, join_problems, shown
from ..jsonbody import LARGE_BODY
from ..loading import demo_tasks
from ..oip import triton
from ..oip.adapters import ADAPTERS, Adapter
from ..oip.tensors import (
    BINARY_MEDIA_TYPE,
    HEADER_LENGTH,
    AnyParameter,
    InferenceRequest,
    InferenceResponse,
    Output,
    Parameter,
    V2Error,
    decode_inputs,
    element_count,
    encode_response,
    parse_infer_request,
)
from ..runtime import Runtime
from ..tasks.base import TaskRequest, error_location
from .requests import content_coding, inflate
from .tasks import AnyTask, caller_of, run_items, runtime_of, which

VERSION = "1"  # one version per served model
SERVER_NAME = "perceiver-serve"
EXTENSIONS = ["binary_tensor_data", "parameters", "classification", "model_configuration", "statistics"]
MAX_TIMEOUT_US = 10**12  # 11.6 days
TOP_K_OUTPUTS = ("LABELS", "SCORES", "INDICES")
BINARY = {"type": "string", "format": "binary"}

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])


# ---------------------------------------------------------------------------------------------- messages


class ServerMetadata(BaseModel):
    name: str = Field(examples=[SERVER_NAME])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size; the first dimension is the batch")


class ModelMetadata(BaseModel):
    name: str = Field(examples=["classify.learned"])
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Parameter] = Field(
        description="task, served_name, architecture, source and revision of the checkpoint, weights (pretrained "
        "or random-init), dtype, device"
    )


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # as documented: {"ready": 0} is not a boolean
    ready: bool = Field(False, description="Only the models that are ready.")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE", "LOADING"]
    reason: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Not a valid inference request: the message names the tensor or parameter and what was wrong (a file "
        "that does not decode, or an unsupported encoding, too: the protocol has one status for these)",
        401: "Missing or wrong API key (when PERCEIVER_API_KEYS is set)",
        404: "No such model or version",
        408: "The body did not arrive within the request timeout",
        413: "Body or decoded input too large",
        429: "Overloaded: retry after Retry-After seconds",
        500: "The forward pass failed (only this batch's requests; the server stays ready)",
        503: "Not ready, or draining",
        504: "Deadline exceeded",
    }
    return {status: {"model": V2Error, "description": text[status]} for status in statuses}


# ---------------------------------------------------------------------------------------------- models


READY_PROBE = "/v2/health/ready"


def v2_name(engine: Engine) -> str:
    return engine.name.replace("/", ".")


def served_models(runtime: Runtime) -> list[Engine]:
    return [e for e in runtime.engines() if e.task.name in ADAPTERS]


def _loading(runtime: Runtime, engines: list[Engine]) -> bool:
    """Whether the index lists the configured models by name: while none is loaded (or they failed to), and while
    the rest load, not only those loaded so far (audit: 2 of 5, as UNAVAILABLE)."""
    return not runtime.ready and (not engines or (runtime.load_error is None and not runtime.draining))


def configured_names(runtime: Runtime) -> list[str]:
    """The v2 names of the models the settings ask for, known before any is loaded."""
    settings = runtime.settings
    if settings.demo:
        pairs = [(t.name, variant) for t in demo_tasks(settings) for variant in t.demo_configs]
    else:
        pairs = [(m.task, m.variant) for m in settings.models]
    return [served_name(task, variant).replace("/", ".") for task, variant in pairs if task in ADAPTERS]


def resolve(runtime: Runtime, name: str, version: str | None) -> Engine:
    found = next((e for e in served_models(runtime) if v2_name(e) == name), None)
    if found is None:
        runtime.check_ready(READY_PROBE)  # loading: not served yet, rather than not at all
        names = ", ".join(v2_name(e) for e in served_models(runtime))
        raise ModelNotFound(f"model {name!r} is not served; models: {names}")
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {name!r} has version {VERSION} only, not {version!r}")
    return found


def metadata(runtime: Runtime, engine: Engine) -> ModelMetadata:
    adapter = ADAPTERS[engine.task.name]
    key = (engine.task.name, engine.variant)
    spec = next((s for s in runtime.settings.models if (s.task, s.variant) == key), None)
    parameters: dict[str, Parameter] = {
        "task": engine.task.name,
        "served_name": engine.name,
        "architecture": engine.model.config.architecture,
        "source": engine.source,
        "weights": engine.weights,
        "dtype": engine.dtype,
        "device": engine.device,
    }
    if spec is not None:
        parameters["revision"] = spec.revision
    return ModelMetadata(
        name=v2_name(engine),
        versions=[VERSION],
        platform="pytorch",
        inputs=[TensorMetadata(**s.metadata(as_input=True)) for s in adapter.inputs],
        outputs=[TensorMetadata(**s.metadata()) for s in adapter.outputs],
        parameters=parameters,
    )


def model_ready(runtime: Runtime) -> bool:
    """A served model is ready when the server is: every engine is built before readiness."""
    return runtime.ready and not runtime.draining and runtime.unresponsive() is None


# ---------------------------------------------------------------------------------------------- server


@router.get("", response_model=ServerMetadata, summary="Server metadata", responses=_errors(401))
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


# The protocol's specification writes it /v2/ (KServe redirects one to the other); both answer.
router.add_api_route("/", server_metadata, methods=["GET"], response_model=ServerMetadata, include_in_schema=False)


class ModelList(BaseModel):
    models: list[str] = Field(examples=[["classify.learned", "classify-text"]])


@router.get("/models", response_model=ModelList, summary="The served models' names", responses=_errors(401))
async def list_models(request: Request) -> ModelList:
    """As KServe's model server lists them (while loading, the configured ones, by name); /v2/repository/index
    gives their state too."""
    runtime = runtime_of(request)
    engines = served_models(runtime)
    if _loading(runtime, engines):
        return ModelList(models=configured_names(runtime))
    return ModelList(models=[v2_name(e) for e in engines])


@router.get(
    "/models/stats",
    summary="Every model's statistics (Triton's statistics extension)",
    responses=_errors(401, 503),
)
async def all_statistics(request: Request) -> dict[str, Any]:
    runtime = runtime_of(request)
    runtime.check_ready(READY_PROBE)
    return {"model_stats": [await triton.model_statistics(e, v2_name(e)) for e in served_models(runtime)]}


@router.get(
    "/health/live",
    response_model=Live,
    summary="Liveness: the process serves HTTP (and, with front-end processes, the model process runs)",
    responses={503: {"model": Live, "description": "The model process has stopped running: restart the pod"}},
)
async def live(request: Request) -> JSONResponse:
    ok = runtime_of(request).unresponsive() is None
    return JSONResponse({"live": ok}, status_code=200 if ok else 503)


@router.get(
    "/health/ready",
    response_model=Ready,
    summary="Readiness: every model loaded and warmed, not draining",
    responses={503: {"model": Ready, "description": "Loading, draining, or loading failed"}},
)
async def ready(request: Request) -> JSONResponse:
    runtime = runtime_of(request)
    ok = model_ready(runtime) and runtime.load_error is None
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.post(
    "/repository/index",
    response_model=list[RepositoryModel],
    summary="Every served model and its state",
    responses=_errors(400, 401, 413),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": RepositoryIndexRequest.model_json_schema()}},
        }
    },
)
async def repository_index(request: Request) -> list[RepositoryModel]:
    runtime = runtime_of(request)
    coding = content_coding(request)  # as infer's: a gzip body was read as JSON, and "br" passed unread (audit)
    body = await _read_body(request)
    if coding is not None and body:  # no body is none, however it says it is coded
        body = await runtime.offload(math.inf, inflate, body, coding, runtime.settings.max_body_bytes)
    try:
        options = RepositoryIndexRequest.model_validate_json(body) if body.strip() else RepositoryIndexRequest()
    except ValidationError as exc:
        raise BadRequest(f"not a repository index request: {_problems(exc)}") from None
    index = []
    ok = model_ready(runtime)
    engines = served_models(runtime)
    # why not ready: the drain, the model process gone or a failed load (it said "loading": review), or loading
    why = "draining" if runtime.draining else runtime.load_error or "loading"
    if _loading(runtime, engines) and not options.ready:  # loading: as Triton lists them, by name
        return [
            RepositoryModel(name=n, version=VERSION, state="LOADING", reason=why) for n in configured_names(runtime)
        ]
    for engine in engines:
        if ok or not options.ready:
            reason = "" if ok else why
            index.append(RepositoryModel(name=v2_name(engine), version=VERSION, state=_state(ok), reason=reason))
    return index


def _state(ok: bool) -> Literal["READY", "UNAVAILABLE"]:
    return "READY" if ok else "UNAVAILABLE"


# ---------------------------------------------------------------------------------------------- model


ModelName = Annotated[
    str,
    Path(
        description='A served model\'s name with "." for "/" (classify.learned); /v2/repository/index lists them.',
        examples=["classify-text"],
    ),
]


ModelVersion = Annotated[str, Path(description=f"The model's version: {VERSION}, its only one.", examples=[VERSION])]
Endpoint = Callable[[Request, str, str | None], Awaitable[Any]]


def _route(endpoint: Endpoint, versioned: bool) -> Callable[..., Awaitable[Any]]:
    """The route function for /models/{model_name}[/versions/{model_version}]: the version, or None."""
    if versioned:

        async def with_version(request: Request, model_name: ModelName, model_version: ModelVersion) -> Any:
            return await endpoint(request, model_name, model_version)

        with_version.__name__ = f"{endpoint.__name__}_version"
        return with_version

    async def without_version(request: Request, model_name: ModelName) -> Any:
        return await endpoint(request, model_name, None)

    without_version.__name__ = endpoint.__name__
    return without_version


async def get_metadata(request: Request, model_name: str, model_version: str | None) -> ModelMetadata:
    runtime = runtime_of(request)
    return metadata(runtime, resolve(runtime, model_name, model_version))


async def get_config(request: Request, model_name: str, model_version: str | None) -> dict[str, Any]:
    runtime = runtime_of(request)
    engine = resolve(runtime, model_name, model_version)
    return triton.model_config(engine, model_name, runtime.settings.max_files_per_request)


async def get_statistics(request: Request, model_name: str, model_version: str | None) -> dict[str, Any]:
    runtime = runtime_of(request)
    return {"model_stats": [await triton.model_statistics(resolve(runtime, model_name, model_version), model_name)]}


async def get_ready(request: Request, model_name: str, model_version: str | None) -> JSONResponse:
    runtime = runtime_of(request)
    try:
        resolve(runtime, model_name, model_version)
        ok = model_ready(runtime)
    except NotReady:  # still loading: not ready, in this route's own answer
        ok = False
    return JSONResponse({"name": model_name, "ready": ok}, status_code=200 if ok else 503)


async def infer(request: Request, model_name: str, model_version: str | None) -> Response:
    runtime = runtime_of(request)
    # Before reading the body: refusing must stay cheap.
    engine, deadline = admit(request.scope, runtime, READY_PROBE, lambda: resolve(runtime, model_name, model_version))
    task, adapter = engine.task, ADAPTERS[engine.task.name]
    coding = content_coding(request)
    body = await _read_body(request)
    if coding is not None:  # off the event loop: 32 KB can inflate to 32 MB (zlib lets go of the GIL meanwhile);
        # Inference-Header-Content-Length counts the inflated body's JSON, as Triton reads it
        body = await runtime.offload(deadline, inflate, body, coding, runtime.settings.max_body_bytes)
    header_length = request.headers.get(HEADER_LENGTH)
    max_rows = runtime.settings.max_files_per_request
    if len(body) > LARGE_BODY:
        call = await runtime.offload(deadline, _parse_and_prepare, body, header_length, engine, max_rows)
    else:
        call = _parse_and_prepare(body, header_length, engine, max_rows)
    if call.timeout_s is not None:
        deadline = min(deadline, time.monotonic() + call.timeout_s)
    encoded = await run_items(replace(caller_of(request), item="row"), runtime, engine, call.items, deadline)
    head = response_head(engine, model_name, call.id)
    if task.encode_offloaded:
        content, headers, media = await runtime.offload(deadline, _finish, adapter, encoded, head, call)
    else:
        content, headers, media = _finish(adapter, encoded, head, call)
    return Response(content, media_type=media, headers=headers)


def response_head(engine: Engine, model_name: str, request_id: str | None) -> dict[str, Any]:
    """What every inference response starts with: every response has an id (the request's, or the id the server
    gave the request: its x-request-id, in its log line too)."""
    return {
        "model_name": model_name,
        "model_version": VERSION,
        "id": request_id if request_id is not None else jsonlog.request_id.get(),
        "parameters": {"weights": engine.weights},  # random-init in the demo profile, as on /v1
    }


@dataclass(frozen=True)
class Call:
    """One inference request, checked and decoded: the task's items, and which outputs to send how."""

    id: str | None
    items: list[tuple[TaskRequest, dict[str, bytes]]]
    outputs: list[str]
    binary: set[str]  # outputs sent as binary data after the JSON
    timeout_s: float | None  # the request's timeout parameter
    classification: dict[str, int] = field(default_factory=dict)  # output → k: Triton's top-k strings
    columns: int | None = None  # the top_k asked for, when a classification's k made the items ask for more


PROTOCOL_PARAMETERS = ("binary_data_output", "timeout")


def _parse_and_prepare(body: bytes, header_length: str | None, engine: Engine, max_rows: int) -> Call:
    request, binary = parse_infer_request(body, header_length)
    check_declared(request, engine, max_rows)
    return prepare(request, decode_inputs(request, binary), engine, max_rows)


def check_declared(request: InferenceRequest, engine: Engine, max_rows: int) -> None:
    """Names, datatypes, shapes and the rows the shapes declare, before any data is decoded: a binary BYTES tensor
    of 8 million empty elements (32 MB) took a decode thread 4-10 s before its rows were counted."""
    ADAPTERS[engine.task.name].check(request.inputs)
    for tensor in request.inputs:
        shape = tensor.shape
        if tensor.datatype == "BYTES":  # as _rows counts them once decoded
            rows = element_count(shape)
        else:
            rows = 1 if len(shape) == 3 else shape[0] if shape else 1
        if rows > max_rows:
            raise BadRequest(
                f"the batch has {rows} rows ({tensor.name}: shape {shape}); at most {max_rows} per request "
                "(max_files_per_request)"
            )


def prepare(request: InferenceRequest, tensors: dict[str, Any], engine: Engine, max_rows: int) -> Call:
    """The request's items and outputs, for either transport (HTTP/JSON or gRPC), its inputs checked against the
    adapter and decoded (``tensors``): 400 for what is malformed.

    Parameters the protocol allows but no one here reads are ignored (Triton and KServe clients add their own),
    except a name one letter or two from one this model takes (``topk``): that is a typo, and a 400 says so; and a
    field of the task's /v1 request that /v2 answers another way (``reconstruction``): a 400 says how."""
    task, adapter = engine.task, ADAPTERS[engine.task.name]
    if request.model_name is not None and request.model_name != v2_name(engine):
        raise BadRequest(f"model_name is {shown(request.model_name)} in the body but {v2_name(engine)!r} in the path")
    parameters = dict(request.parameters)
    binary_all = _flag(parameters.pop("binary_data_output", False), "binary_data_output")
    timeout_s = _timeout(parameters.pop("timeout", None))
    answered_otherwise = sorted(set(parameters) & set(adapter.excluded))  # /v1 fields that /v2 answers another way
    if answered_otherwise:
        name = answered_otherwise[0]
        raise BadRequest(f"parameters {name}: not a parameter of /v2 {adapter.task}; {adapter.excluded[name]}")
    accepted = [f for f in task.request_model.model_fields if f not in adapter.excluded]
    known = [*accepted, *PROTOCOL_PARAMETERS]
    for name in sorted(set(parameters) - set(accepted)):
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.8) if len(name) <= 64 else []
        if near:
            raise BadRequest(
                f"parameters {name}: unknown; did you mean {near[0]}? {adapter.task} takes {', '.join(known)}"
            )
        del parameters[name]
    declared = [o.name for o in adapter.outputs]
    wanted, as_binary, classification = [], set(), {}
    for output in request.outputs or ():  # none, or an empty list (all gRPC can say): every output
        if output.name not in declared:
            raise BadRequest(f"{output.name}: no such output; {adapter.task} has {', '.join(declared)}")
        if output.name in wanted:
            raise BadRequest(f"{output.name}: requested more than once; name each output once")
        if _flag(output.parameters.get("binary_data", binary_all), f"{output.name}.binary_data"):
            as_binary.add(output.name)
        k = output.parameters.get("classification")
        if k is not None:
            if not adapter.classifies:
                raise BadRequest(f"{output.name}.classification: {adapter.task} gives no class scores")
            if output.name != "SCORES":
                raise BadRequest(f"{output.name}.classification: it applies to SCORES, the class scores; ask it there")
            most = _most_classes(task)
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= most:
                raise BadRequest(
                    f"{output.name}.classification must be a number of classes from 1 to {most}, got {shown(k)}"
                )
            classification[output.name] = k
        wanted.append(output.name)
    if not wanted:
        wanted, as_binary = declared, set(declared) if binary_all else set()
    rows = max(_rows(tensors[name]) for name in tensors)
    if rows > max_rows:
        raise BadRequest(f"the batch has {rows} rows; at most {max_rows} per request (max_files_per_request)")
    items = _items(task, adapter, tensors, parameters)
    columns = None
    asked = getattr(items[0][0], "top_k", None) if classification else None  # as validated: "3" and 3.0 are 3
    if asked is not None and asked < max(classification.values()):
        parameters["top_k"], columns = max(classification.values()), asked  # the k classes, computed once
        items = _items(task, adapter, tensors, parameters)
    adapter.check_rows([options for options, _ in items])
    return Call(request.id, items, wanted, as_binary, timeout_s, classification, columns)


def _items(
    task: AnyTask, adapter: Adapter, tensors: dict[str, Any], parameters: dict[str, Any]
) -> list[tuple[TaskRequest, dict[str, bytes]]]:
    rows = adapter.items(tensors, parameters)
    items = []
    for i, (fields, files) in enumerate(rows):
        with which(i, len(rows), "row"):
            items.append((_validate(task, fields), files))
    return items


def _most_classes(task: AnyTask) -> int:
    """The most classes a classification may ask for: the task's own bound on top_k (1,000; autoencode's 700)."""
    field = task.request_model.model_fields["top_k"]
    return min(int(m.le) for m in field.metadata if getattr(m, "le", None) is not None)


def _rows(tensor: Any) -> int:
    if tensor.dtype == object:
        return int(tensor.size)
    return 1 if tensor.ndim == 3 else int(tensor.shape[0])


def _flag(value: AnyParameter, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {shown(value)}")
    return value


def _timeout(value: AnyParameter) -> float | None:
    """Triton's timeout parameter, in microseconds: it shortens the request's deadline. 0 is Triton's default,
    no timeout of the request's own (TRITONSERVER_InferenceRequestSetTimeoutMicroseconds): the server's."""
    if value is None or (type(value) is int and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"timeout is microseconds (an integer >= 0), got {shown(value)}")
    return min(value, MAX_TIMEOUT_US) / 1e6  # longer than any server timeout: it shortens nothing


def _validate(task: AnyTask, fields: dict[str, Any]) -> TaskRequest:
    try:
        return task.request_model.model_validate(fields)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = error_location(error.get("loc", ()))
            text = where == "text" or where.startswith("text.")  # the TEXT input's rows, not a parameter
            where = f"TEXT{where[4:]}" if text else f"parameters.{where}"
            problems.append(f"{where}: {str(error['msg']).removeprefix('Value error, ')}")
        raise BadRequest(join_problems(problems)) from None


def outputs_of(adapter: Adapter, encoded: list[Any], call: Call) -> list[Output]:
    """The outputs the call asked for, in its order; Triton's classification strings where it asked for them."""
    outputs: dict[str, Output] = {o.name: o for o in adapter.results(encoded)}
    chosen = []
    for name in call.outputs:
        output = outputs[name]
        if name in call.classification:
            output = classified(outputs, name, call.classification[name])
        elif call.columns is not None and name in TOP_K_OUTPUTS:  # top_k's width, though a classification asked more
            output = Output(name, output.datatype, output.array[:, : call.columns])
        chosen.append(output)
    return chosen


def classified(outputs: dict[str, Output], name: str, k: int) -> Output:
    """Triton's classification extension: per row, the best ``k`` classes as "score:index:label" strings, best
    first (the items asked for k classes at least: ``prepare``)."""
    scores, indices, labels = (outputs[n].array[:, :k] for n in ("SCORES", "INDICES", "LABELS"))
    array = np.empty(scores.shape, dtype=object)
    for row in np.ndindex(scores.shape):
        array[row] = f"{float(scores[row]):f}:{int(indices[row])}:{bytes(labels[row]).decode()}".encode()
    return Output(name, "BYTES", array)


def _finish(
    adapter: Adapter, encoded: list[Any], head: dict[str, Any], call: Call
) -> tuple[bytes, dict[str, str], str]:
    return encode_response(head, outputs_of(adapter, encoded, call), call.binary)


def _problems(exc: ValidationError) -> str:
    return join_problems(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e['msg']}" for e in exc.errors())


async def _read_body(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect as exc:
        raise ClientClosedRequest("the client went away while sending the request") from exc


# ---------------------------------------------------------------------------------------------- OpenAPI


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic schema with its $defs inlined (a $ref to #/$defs/... would point into the OpenAPI document)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return dict(walk(schema))


INFER_EXAMPLE = {
    "inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["What a wonderful day!"]}],
    "parameters": {"top_k": 2},
}
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline(InferenceRequest.model_json_schema()), "example": INFER_EXAMPLE},
            BINARY_MEDIA_TYPE: {
                "schema": BINARY,
                "description": "Binary tensor extension: the JSON header (Inference-Header-Content-Length bytes), "
                "then each binary input's data in order.",
            },
        },
    },
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferenceResponse,
        "description": "The outputs; with binary outputs, the JSON header (Inference-Header-Content-Length bytes) "
        "and then their data",
        "content": {BINARY_MEDIA_TYPE: {"schema": BINARY}},
    },
    **_errors(400, 401, 404, 408, 413, 429, 500, 503, 504),
}


def _model_routes() -> None:
    for prefix in ("/models/{model_name}", "/models/{model_name}/versions/{model_version}"):
        versioned = "versions" in prefix
        suffix = " (a version)" if versioned else ""
        router.add_api_route(
            prefix,
            _route(get_metadata, versioned),
            methods=["GET"],
            response_model=ModelMetadata,
            summary=f"Model metadata: inputs, outputs, checkpoint{suffix}",
            responses=_errors(400, 401, 404, 503),
        )
        router.add_api_route(
            prefix + "/ready",
            _route(get_ready, versioned),
            methods=["GET"],
            response_model=ModelReady,
            summary=f"Model readiness{suffix}",
            responses={
                503: {"model": ModelReady, "description": "Not ready (loading or draining)"},
                **_errors(400, 401, 404),
            },
        )
        for path, endpoint, summary in (
            ("/config", get_config, "Model configuration, in Triton's form (its model_configuration extension)"),
            ("/stats", get_statistics, "Model statistics since start-up (Triton's statistics extension)"),
        ):
            router.add_api_route(
                prefix + path,
                _route(endpoint, versioned),
                methods=["GET"],
                summary=summary + suffix,
                responses=_errors(400, 401, 404, 503),
            )
        router.add_api_route(
            prefix + "/infer",
            _route(infer, versioned),
            methods=["POST"],
            response_model=None,
            summary=f"Inference{suffix}",
            responses=INFER_RESPONSES,
            openapi_extra=INFER_BODY,
        )


_model_routes()

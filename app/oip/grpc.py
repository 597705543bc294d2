"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``, Triton's and KServe's port 8001),
with Triton's ModelConfig and ModelStatistics, and the standard ``grpc.health.v1`` service for Kubernetes' probes.

It runs on the event loop of the HTTP server, in the same process, and translates only: every call takes the
same prologue as HTTP (deadline, readiness, the model, admission) and the same pipeline (``run_items``: the
engine, its batcher, metrics and statistics), so a model answers gRPC, /v2 and /v1 with the same numbers and
shares one capacity between them. Tensors arrive as ``raw_input_contents`` (what tritonclient and KServe send:
the binary extension's layout) or typed ``contents``; outputs always go back as ``raw_output_contents``, as
Triton sends them.

Errors are gRPC status codes: INVALID_ARGUMENT (every 4xx the HTTP side would give for the request itself),
NOT_FOUND, RESOURCE_EXHAUSTED when overloaded (``retry-after`` in the trailing metadata, in seconds, as the
HTTP header), UNAVAILABLE while loading or draining, DEADLINE_EXCEEDED, UNAUTHENTICATED, INTERNAL. API keys
come in the ``authorization`` metadata (``Bearer <key>``) or ``x-api-key``; the health service needs none.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from .. import jsonlog
from ..access import key_allowed
from ..admission import Prologue, admit, timeout_s
from ..errors import BadRequest, Draining, InternalError, ModelNotFound, NotReady, ServiceError, Unauthorized
from ..jsonbody import LARGE_BODY, MAX_VALUES
from ..routes.tasks import Caller, run_items
from ..routes.v2 import (
    READY_PROBE,
    SERVER_NAME,
    VERSION,
    Call,
    check_declared,
    metadata,
    outputs_of,
    prepare,
    resolve,
    served_models,
    v2_name,
)
from ..runtime import release
from . import triton
from .adapters import ADAPTERS
from .protos import open_inference_grpc_pb2 as pb
from .protos import triton_extensions_pb2 as tx
from .tensors import InferenceRequest, RequestInput, binary_data, element_count, from_binary, from_json

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("perceiver.grpc")

SERVICE = "inference.GRPCInferenceService"
# The size of the call's request message as it came off the wire (set by ``_guarded``, which parses it).
MESSAGE_BYTES: contextvars.ContextVar[int] = contextvars.ContextVar("grpc_message_bytes", default=0)
EXTENSIONS = ["classification", "model_configuration", "statistics"]

# HTTP status of a ServiceError -> the gRPC code a client of the protocol expects.
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Typed contents: which field of InferTensorContents holds each datatype (FP16 has none: raw only).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameter(value: pb.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def _parameters(entries: Any) -> dict[str, Any]:
    return {key: _parameter(value) for key, value in entries.items()}


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def infer_request(message: pb.ModelInferRequest) -> InferenceRequest:
    """The gRPC request as the HTTP side's InferenceRequest (its tensors' data not decoded yet)."""
    if not message.inputs:
        raise BadRequest("inputs: give at least one input")
    inputs = [
        {"name": t.name, "shape": list(t.shape), "datatype": t.datatype, "parameters": _parameters(t.parameters)}
        for t in message.inputs
    ]
    outputs = [{"name": o.name, "parameters": _parameters(o.parameters)} for o in message.outputs]
    try:
        request = InferenceRequest.model_validate(
            {
                "id": message.id or None,
                "parameters": _parameters(message.parameters),
                "inputs": inputs,
                "outputs": outputs or None,
            }
        )
    except ValidationError as exc:
        raise BadRequest(f"not an inference request: {_problems(exc)}") from None
    names = [i.name for i in request.inputs]
    if len(set(names)) != len(names):
        raise BadRequest(f"inputs are named more than once: {', '.join(names)}")
    return request


def tensors_of(message: pb.ModelInferRequest, request: InferenceRequest) -> dict[str, np.ndarray]:
    """Every input's data: raw_input_contents (one entry per input, the binary extension's layout), or typed."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; give one each")
    if raw and any(tensor.contents.ListFields() for tensor in message.inputs):
        raise BadRequest("inputs have data in raw_input_contents and in contents; give all of it one way or the other")
    tensors = {}
    for i, (spec, tensor) in enumerate(zip(request.inputs, message.inputs, strict=True)):
        tensors[spec.name] = from_binary(spec, raw[i]) if raw else _typed(spec, tensor.contents)
    return tensors


def _typed(spec: RequestInput, contents: Any) -> np.ndarray:
    field = CONTENTS.get(spec.datatype)
    if field is None:
        raise BadRequest(f"{spec.name}: {spec.datatype} travels in raw_input_contents only")
    given = [f.name for f, _ in contents.ListFields()]
    if given and field not in given:
        raise BadRequest(f"{spec.name}: {spec.datatype} values go in contents.{field}; got {', '.join(given)}")
    # Counted before a value is copied (the field's length is known): 27 million packed zeros for a shape of 3
    # became a list and an int64 array first, 700-800 MB of a front end's memory per 27 MB message (audit).
    repeated = getattr(contents, field)
    count = element_count(spec.shape)
    if len(repeated) != count:
        raise BadRequest(f"{spec.name}: shape {spec.shape} holds {count} elements; contents has {len(repeated)}")
    if count > MAX_VALUES:
        raise BadRequest(
            f"{spec.name}: {count} values; at most {MAX_VALUES} are accepted in contents "
            "(send larger tensors in raw_input_contents)"
        )
    values = list(repeated)
    if spec.datatype != "BYTES":
        return from_json(spec.model_copy(update={"data": values}))
    array = np.empty(count, dtype=object)
    array[:] = values
    return array.reshape(spec.shape)


class InferenceService:
    """The protocol's RPCs, one coroutine each, on the runtime the HTTP app serves."""

    def __init__(self, runtime: Runtime, version: str, digests: list[bytes]) -> None:
        self.runtime = runtime
        self.version = version
        self.digests = digests

    # ------------------------------------------------------------------------------------------ server

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.runtime.unresponsive() is None)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=serving(self.runtime))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    # ------------------------------------------------------------------------------------------ models

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            resolve(self.runtime, request.name, request.version or None)
        except NotReady:  # still loading: not ready, an answer as REST's (the proto's "false if not ready")
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=serving(self.runtime))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        found = metadata(self.runtime, resolve(self.runtime, request.name, request.version or None))
        response = pb.ModelMetadataResponse(name=found.name, versions=found.versions, platform=found.platform)
        for tensors, target in ((found.inputs, response.inputs), (found.outputs, response.outputs)):
            for tensor in tensors:
                target.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for key, value in found.parameters.items():
            response.properties[key] = str(value)
        return response

    async def ModelConfig(self, request: tx.ModelConfigRequest, context: aio.ServicerContext) -> tx.ModelConfigResponse:
        engine = resolve(self.runtime, request.name, request.version or None)
        config = triton.model_config(engine, request.name, self.runtime.settings.max_files_per_request)
        return json_format.ParseDict({"config": config}, tx.ModelConfigResponse())

    async def ModelStatistics(
        self, request: tx.ModelStatisticsRequest, context: aio.ServicerContext
    ) -> tx.ModelStatisticsResponse:
        runtime = self.runtime
        named = request.name
        engines = [resolve(runtime, named, request.version or None)] if named else served_models(runtime)
        stats = [await triton.model_statistics(e, v2_name(e)) for e in engines]
        for entry in stats:
            del entry["memory_usage"]  # not in the messages this server sends
        return json_format.ParseDict({"model_stats": stats}, tx.ModelStatisticsResponse())

    # ------------------------------------------------------------------------------------------ inference

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        runtime = self.runtime
        now = time.monotonic()
        header = _metadata(context).get("x-request-timeout-ms")
        budget = timeout_s(header, runtime.settings.request_timeout_s)
        remaining = context.time_remaining()  # the call's gRPC deadline, None without one
        deadline = now + (budget if remaining is None else min(budget, remaining))
        if runtime.draining:
            raise Draining("the server is shutting down; retry on another replica")
        scope: dict[str, Any] = {"headers": [], "state": {"prologue": Prologue(deadline, now)}}
        engine, deadline = admit(scope, runtime, READY_PROBE, lambda: resolve(runtime, request.model_name, None))
        if request.model_version and request.model_version != VERSION:
            release(scope["state"])
            raise ModelNotFound(
                f"model {request.model_name!r} has version {VERSION} only, not {request.model_version!r}"
            )

        def parse_and_prepare() -> Call:
            parsed = infer_request(request)
            check_declared(parsed, engine, runtime.settings.max_files_per_request)  # before any data is decoded
            return prepare(parsed, tensors_of(request, parsed), engine, runtime.settings.max_files_per_request)

        runtime.inflight += 1  # counted as HTTP's task requests are: the drain waits for them, the HPA scales on them
        runtime.taken += 1
        runtime.metrics.inflight.set(runtime.inflight)
        try:
            # A large message's tensors are read off the event loop, as HTTP's bodies over LARGE_BODY are: a 27 MB
            # image tensor (copied, checked, encoded as PNG) held the loop for a second, and every call with it.
            if MESSAGE_BYTES.get() > LARGE_BODY:
                call = await runtime.offload(deadline, parse_and_prepare)
            else:
                call = parse_and_prepare()
            if call.timeout_s is not None:
                deadline = min(deadline, time.monotonic() + call.timeout_s)
            done = asyncio.Event()
            context.add_done_callback(lambda _: done.set())

            async def disconnected() -> None:
                await done.wait()

            caller = Caller(None, disconnected, scope["state"], now, item="row")
            encoded = await run_items(caller, runtime, engine, call.items, deadline)
        finally:
            release(scope["state"])  # ended before it was queued: no longer work ahead of others
            runtime.inflight -= 1
            runtime.metrics.inflight.set(runtime.inflight)
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=VERSION, id=call.id or jsonlog.request_id.get()
        )
        response.parameters["weights"].string_param = engine.weights
        for output in outputs_of(ADAPTERS[engine.task.name], encoded, call):
            response.outputs.add(name=output.name, datatype=output.datatype, shape=list(output.array.shape))
            response.raw_output_contents.append(binary_data(output))
        return response


def serving(runtime: Runtime) -> bool:
    return runtime.ready and not runtime.draining and runtime.load_error is None and runtime.unresponsive() is None


def _metadata(context: aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


_ID_COUNTER = iter(range(1, 2**63))


PROBES = ("ServerLive", "ServerReady", "ModelReady")  # asked every few seconds by load balancers and scripts


def _guarded(
    service: InferenceService,
    name: str,
    message: Any,
    method: Callable[[Any, aio.ServicerContext], Awaitable[Any]],
) -> Callable[[bytes, aio.ServicerContext], Awaitable[Any]]:
    """The RPC with the key check, the request message parsed (bytes that are not one are INVALID_ARGUMENT, not
    grpc's UNKNOWN naming a protobuf exception), a request id, metrics, and errors as status codes (never a
    traceback)."""
    runtime = service.runtime

    async def call(raw: bytes, context: aio.ServicerContext) -> Any:
        started = time.monotonic()
        given = _metadata(context)
        jsonlog.request_id.set(given.get("x-request-id", "")[:64] or f"grpc-{next(_ID_COUNTER):012x}")
        task, model = "none", ""
        status, reason = 200, None
        try:
            if service.digests and not key_allowed(service.digests, _presented(given)):
                raise Unauthorized("this server needs an API key: send the authorization metadata, Bearer <key>")
            try:
                request = message.FromString(raw)
            except DecodeError:
                raise BadRequest(
                    f"the request is not a {message.DESCRIPTOR.full_name} message ({len(raw)} bytes that do not "
                    f"parse as one): send {SERVICE}/{name} what its .proto declares"
                ) from None
            task, model = _labels(runtime, getattr(request, "model_name", "") or getattr(request, "name", ""))
            MESSAGE_BYTES.set(len(raw))
            return await method(request, context)
        except ServiceError as exc:
            status, reason = exc.status, exc.reason
            runtime.access.refused(task, model, reason)
            trailers = tuple((k.lower(), v) for k, v in (exc.headers or {}).items() if k.lower() == "retry-after")
            if trailers:
                context.set_trailing_metadata(trailers)
            await context.abort(CODES.get(exc.status, grpc.StatusCode.UNKNOWN), exc.message)
        except asyncio.CancelledError:  # the client cancelled the call: a rejection, as an HTTP client's leaving;
            # or its deadline passed as the server's own was about to (gRPC cancels the call then): a 504 (audit)
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            status, reason = (504, "deadline") if expired else (499, "cancelled")
            runtime.access.refused(task, model, reason)
            raise
        except Exception:
            status = 500
            log.exception("unhandled error in %s", name)
            rid = jsonlog.request_id.get()
            await context.abort(grpc.StatusCode.INTERNAL, InternalError(f"internal error; request id {rid}").message)
        finally:  # counted for inference (as HTTP's task routes); a log line for every call, as HTTP's
            path, elapsed = f"/{SERVICE}/{name}", time.monotonic() - started
            counted, quiet = name == "ModelInfer", name in PROBES  # probes at DEBUG, as HTTP's
            runtime.access.record(
                "gRPC", path, status, elapsed, task=task, model=model, reason=reason, counted=counted, quiet=quiet
            )

    return call


def _labels(runtime: Runtime, v2: str) -> tuple[str, str]:
    """The task and model labels HTTP gives the same model's metrics (classify, classify/learned), so one
    dashboard counts both front ends; ("none", "") for a name no model has, as HTTP labels an unknown path."""
    engine = next((e for e in served_models(runtime) if v2_name(e) == v2), None)
    return ("none", "") if engine is None else (engine.task.name, engine.name)


def _presented(metadata: dict[str, str]) -> bytes:
    value = metadata.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].encode()
    return metadata.get("x-api-key", "").encode()


def _handlers(service: InferenceService) -> grpc.GenericRpcHandler:
    messages: dict[str, tuple[Any, Any]] = {
        "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
        "ModelConfig": (tx.ModelConfigRequest, tx.ModelConfigResponse),
        "ModelStatistics": (tx.ModelStatisticsRequest, tx.ModelStatisticsResponse),
    }
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                _guarded(service, name, request, getattr(service, name)),  # it parses the bytes itself
                response_serializer=response.SerializeToString,
            )
            for name, (request, response) in messages.items()
        },
    )


INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1: "" and the protocol's service name are the server (SERVING once every model is loaded and
    warmed, and not draining: HTTP /readyz's meaning), a model's v2 name is that model; Watch sends each change,
    polled once a second."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _status(self, service: str) -> int:
        runtime = self.runtime
        if service == INFERENCE_SERVICE:  # the protocol's service is the server, as ""
            service = ""
        if service and runtime.ready and service not in {v2_name(e) for e in served_models(runtime)}:
            return -1  # while loading, a model's name is not known yet: NOT_SERVING
        return (
            health_pb2.HealthCheckResponse.SERVING if serving(runtime) else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def Check(self, request: Any, context: aio.ServicerContext) -> Any:
        status = self._status(request.service)
        if status < 0:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        last = None
        while True:
            status = self._status(request.service)
            status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status < 0 else status
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            if self.runtime.draining and last != health_pb2.HealthCheckResponse.SERVING:
                return  # NOT_SERVING said: the stream ends (held open, it kept an idle server from exiting: audit)
            await asyncio.sleep(1.0)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(runtime: Runtime, version: str, digests: list[bytes]) -> aio.Server | None:
    """The gRPC server on ``grpc_port`` (None when it is 0), started; its port is shared between workers."""
    settings = runtime.settings
    if not settings.grpc_port:
        return None
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            # Several workers share the port as they share HTTP's; one alone must find it free, or fail.
            ("grpc.so_reuseport", 1 if settings.workers > 1 or settings.front_end_processes() > 1 else 0),
        ]
    )
    server.add_generic_rpc_handlers((_handlers(InferenceService(runtime, version, digests)),))
    health_pb2_grpc.add_HealthServicer_to_server(Health(runtime), server)
    where = address(settings.host, settings.grpc_port)
    try:
        server.add_insecure_port(where)
    except RuntimeError as exc:
        raise RuntimeError(f"gRPC cannot listen on {where} ({exc}); set PERCEIVER_GRPC_PORT, 0 turns gRPC off") from exc
    await server.start()
    log.info("gRPC (Open Inference Protocol, grpc.health.v1) on %s", where)
    return server

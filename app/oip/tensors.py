"""Open Inference Protocol messages and tensors: JSON tensors, and the binary tensor extension.

A request is JSON, or (binary extension) a JSON header of ``Inference-Header-Content-Length`` bytes followed
by the raw data of every input whose parameters give a ``binary_data_size``, in input order. Raw data is
little-endian and row-major; a BYTES tensor is each element's 4-byte little-endian length, then its bytes.
In JSON, a BYTES element is a UTF-8 string, or base64 when the input's ``content_type`` parameter says so
(MLServer's convention: files that are not text can travel in plain JSON too).

Every problem with a message is a 400 whose message names the tensor and what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import BadRequest, join_problems, shown
from ..jsonbody import JsonBodyError, parse_json

HEADER_LENGTH = "inference-header-content-length"
BINARY_MEDIA_TYPE = "application/octet-stream"

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]
NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# JSON values each datatype takes, as numpy kinds of np.asarray(data): no float silently truncated to an int.
JSON_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"} | {
    d: "iu" for d in NUMPY if d.startswith(("INT", "UINT"))
}

Parameter = str | int | float | bool
# What the protocol lets a parameter be (any JSON value: Triton's own parameters include objects). The ones this
# server reads are checked where they are read; the rest are taken and ignored.
AnyParameter = Parameter | dict[str, Any] | list[Any] | None
MAX_DIMENSION = 2**31 - 1  # Triton's too; no tensor of ours comes near it
Dimension = Annotated[int, Field(ge=0, le=MAX_DIMENSION, strict=True)]


class _Message(BaseModel):
    # No coercion: what the schema documents is what passes. Fields the protocol allows but this server does not
    # read (model_name in the body, as KServe's SDK sends it; Triton's own additions) are taken and ignored.
    model_config = ConfigDict(extra="ignore", strict=True)


class RequestInput(_Message):
    name: str = Field(examples=["TEXT"])
    shape: list[Dimension] = Field(examples=[[1]])
    datatype: Datatype = Field(examples=["BYTES"])
    parameters: dict[str, AnyParameter] = Field(
        default_factory=dict,
        description="binary_data_size: the input's bytes after the JSON header (binary extension); "
        "content_type: base64 for BYTES elements sent as base64 strings in JSON.",
    )
    data: list[Any] | None = Field(
        None, description="The elements, flat or nested, row-major; absent when the data is binary.", examples=[["hi"]]
    )


class RequestOutput(_Message):
    name: str
    parameters: dict[str, AnyParameter] = Field(
        default_factory=dict,
        description="binary_data: true for this output's data in binary after the JSON. classification: k, "
        "for the top-k outputs (SCORES) as Triton's 'score:index:label' strings.",
    )


class InferenceRequest(_Message):
    id: str | None = None
    model_name: str | None = Field(None, description="Optional (KServe's SDK sends it): the model in the path.")
    parameters: dict[str, AnyParameter] = Field(
        default_factory=dict,
        description="The task's options (top_k, ...), binary_data_output (every output in binary) and timeout "
        "(microseconds; shortens the request's deadline).",
    )
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(None, description="The outputs to return (default: all).")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, AnyParameter] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str = Field(description="The request's id, or one the server made when it had none.")
    parameters: dict[str, AnyParameter] | None = None
    outputs: list[ResponseOutput]


class V2Error(BaseModel):
    """The protocol's error body."""

    error: str = Field(examples=["model 'classify.nope' is not served; models: classify.learned, fill-mask"])


def _problems(exc: ValidationError) -> str:
    return join_problems(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e['msg']}" for e in exc.errors())


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON header, validated, and the binary data after it (empty without the binary extension)."""
    binary = b""
    if header_length is not None:
        digits = header_length.strip()
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 18) or int(digits) > len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length is {shown(header_length)}; it must be the JSON header's size in "
                f"bytes, at most the body's {len(body)}"
            )
        size = int(digits)
        body, binary = body[:size], body[size:]
    try:  # one JSON parser with the REST bodies': the same bounds, and a key given twice is refused
        request = InferenceRequest.model_validate(parse_json(body))
    except JsonBodyError as exc:
        raise BadRequest(f"not an inference request: {exc}") from None
    except ValidationError as exc:
        raise BadRequest(f"not an inference request: {_problems(exc)}") from None
    names = [i.name for i in request.inputs]
    if len(set(names)) != len(names):
        raise BadRequest(f"inputs are named more than once: {', '.join(names)}")
    return request, binary


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def decode_inputs(request: InferenceRequest, binary: bytes) -> dict[str, np.ndarray]:
    """Every input's data as an array of its shape: numbers as their numpy type, BYTES as an object array of bytes."""
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in request.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            if tensor.data is None:
                raise BadRequest(f"{tensor.name}: no data (give data, or binary_data_size with the binary extension)")
            tensors[tensor.name] = from_json(tensor)
            continue
        if tensor.data is not None:
            raise BadRequest(f"{tensor.name}: both data and binary_data_size; send the data one way")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"{tensor.name}: binary_data_size must be a byte count, got {shown(size)}")
        chunk = binary[offset : offset + size]
        if len(chunk) < size:
            raise BadRequest(f"{tensor.name}: binary_data_size is {size}, but only {len(chunk)} bytes follow")
        offset += size
        tensors[tensor.name] = from_binary(tensor, chunk)
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes follow the last binary input; binary_data_size must match")
    return tensors


def from_json(tensor: RequestInput) -> np.ndarray:
    count = element_count(tensor.shape)
    if tensor.datatype == "BYTES":
        encoding = tensor.parameters.get("content_type", "str")
        if encoding not in ("str", "base64"):
            raise BadRequest(f"{tensor.name}: content_type {shown(encoding)}; BYTES in JSON are str (UTF-8) or base64")
        values = [_element(tensor.name, v, encoding == "base64") for v in _leaves(tensor.name, tensor.data or [])]
        _check_count(tensor, len(values), count)
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(tensor.shape)
    try:
        array = np.asarray(tensor.data)
    except (ValueError, OverflowError):
        raise BadRequest(f"{tensor.name}: data is not a rectangular array of {tensor.datatype} values") from None
    _check_count(tensor, array.size, count)
    dtype = NUMPY[tensor.datatype]
    if array.size and array.dtype.kind not in JSON_KINDS[tensor.datatype]:
        if dtype.kind in "iu" and array.dtype.kind in "fO":  # integers past int64 or mixed in sign: numpy made them
            given = list(_leaves(tensor.name, tensor.data or []))  # floats or objects, "numbers with fractions"
            if all(isinstance(v, int) and not isinstance(v, bool) for v in given):
                low, high = min(given), max(given)
                raise BadRequest(f"{tensor.name}: values from {low} to {high} do not fit {tensor.datatype}")
        raise BadRequest(f"{tensor.name}: data holds {_kind_name(array)}, not {tensor.datatype} values")
    if array.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise BadRequest(f"{tensor.name}: values from {low} to {high} do not fit {tensor.datatype}")
    return array.astype(dtype).reshape(tensor.shape)


def _kind_name(array: np.ndarray) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers with fractions", "U": "strings"}.get(
        array.dtype.kind, "values of mixed or unknown types"
    )


def _leaves(name: str, data: Iterable[Any]) -> Iterable[Any]:
    for value in data:
        if isinstance(value, list):
            yield from _leaves(name, value)
        else:
            yield value


def _element(name: str, value: Any, is_base64: bool) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{name}: BYTES elements in JSON are strings, got {type(value).__name__}")
    if not is_base64:
        return value.encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{name}: an element is not valid base64") from None


def _check_count(tensor: RequestInput, got: int, expected: int) -> None:
    if got != expected:
        raise BadRequest(f"{tensor.name}: shape {tensor.shape} holds {expected} elements; data has {got}")


def from_binary(tensor: RequestInput, chunk: bytes) -> np.ndarray:
    count = element_count(tensor.shape)
    if tensor.datatype != "BYTES":
        dtype = NUMPY[tensor.datatype]
        if len(chunk) != count * dtype.itemsize:
            raise BadRequest(
                f"{tensor.name}: shape {tensor.shape} of {tensor.datatype} is {count * dtype.itemsize} bytes; "
                f"binary_data_size is {len(chunk)}"
            )
        return np.frombuffer(chunk, dtype=dtype).reshape(tensor.shape)
    values: list[bytes] = []
    offset = 0
    while offset < len(chunk):
        if len(values) == count:  # more elements than the shape holds: said now, not after splitting 8M of them
            raise BadRequest(
                f"{tensor.name}: shape {tensor.shape} holds {count} elements; the data has more "
                f"({len(chunk) - offset} bytes after element {count})"
            )
        if offset + 4 > len(chunk):
            raise BadRequest(f"{tensor.name}: BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise BadRequest(f"{tensor.name}: a BYTES element of {length} bytes runs past binary_data_size")
        values.append(chunk[offset : offset + length])
        offset += length
    _check_count(tensor, len(values), count)
    array = np.empty(count, dtype=object)
    array[:] = values
    return array.reshape(tensor.shape)


# ---------------------------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    array: np.ndarray  # BYTES: an object array of bytes


def _json_data(output: Output) -> list[Any]:
    flat = output.array.reshape(-1)
    if output.datatype == "BYTES":
        return [bytes(v).decode("utf-8", "replace") for v in flat]
    if output.datatype in ("FP16", "FP32"):
        # The shortest decimal that reads back as the same float (0.137016, not 0.13701599836349487).
        return [float(v) for v in flat.astype(NUMPY[output.datatype]).astype(str)]
    return list(flat.astype(NUMPY[output.datatype]).tolist())


def binary_data(output: Output) -> bytes:
    if output.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + bytes(v) for v in output.array.reshape(-1))
    return np.ascontiguousarray(output.array, dtype=NUMPY[output.datatype]).tobytes()


def encode_response(
    head: dict[str, Any], outputs: Sequence[Output], binary: set[str]
) -> tuple[bytes, dict[str, str], str]:
    """(body, headers, media type): JSON, or the JSON header and then the data of the outputs in ``binary``."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.array.shape)}
        if output.name in binary:
            blob = binary_data(output)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(output)
        described.append(entry)
    header = json.dumps({**head, "outputs": described}, separators=(",", ":")).encode()
    if not blobs:
        return header, {}, "application/json"
    return b"".join([header, *blobs]), {"Inference-Header-Content-Length": str(len(header))}, BINARY_MEDIA_TYPE

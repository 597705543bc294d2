"""One adapter per task between the protocol's named tensors and the task's verbs.

An adapter checks the inputs against its declaration (names, datatypes, shapes: 400 otherwise), turns them
into one item per batch row, each the request fields and uploads the task's ``decode`` takes, and turns the
task's ``encode`` output for every row back into output tensors whose first dimension is the batch. The
tasks are not touched: what a REST client uploads as a file is a BYTES element here, and a UINT8 image array
is losslessly encoded as PNG on the way in, so both interfaces decode through the same code and a model
gives the same answer to both.
"""

from __future__ import annotations

import contextlib
import io
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ..errors import BadRequest
from ..tasks.base import Reply
from ..tasks.fill_mask import check_answer_size
from .tensors import Output, RequestInput

Item = tuple[dict[str, Any], dict[str, bytes]]  # request fields, uploads: what one row gives the task
Encoded = dict[str, Any] | Reply


@dataclass(frozen=True)
class Form:
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. Metadata shows the first form; an input accepts any of them."""

    name: str
    forms: tuple[Form, ...]
    description: str
    optional: bool = False

    @property
    def datatype(self) -> str:
        return self.forms[0].datatype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.forms[0].shape

    def metadata(self, as_input: bool = False) -> dict[str, Any]:
        """The first form. An input of one element per row shows as [-1, 1], Triton's shape for its config's dims
        [1] (perf_analyzer refuses [N, 1] data for a model whose metadata says [-1]); [N] is taken as well."""
        shape = list(self.shape)
        if as_input and len(shape) == 1:
            shape = [*shape, 1]
        return {"name": self.name, "datatype": self.datatype, "shape": shape}


def _fits(shape: Sequence[int], form: Form) -> bool:
    if len(form.shape) == 1 and len(shape) == 2 and shape[1] == 1:
        shape = shape[:1]  # [N, 1]: one element per row, as Triton's configs (dims [1]) make clients send it
    return len(shape) == len(form.shape) and all(w in (-1, s) for s, w in zip(shape, form.shape, strict=True))


def _describe(spec: TensorSpec) -> str:
    return " or ".join(f"{f.datatype} {list(f.shape)}" for f in spec.forms)


ENCODED_IMAGE = Form("BYTES", (-1,))  # one encoded image (JPEG, PNG, ...) per row
IMAGE_ARRAYS = Form("UINT8", (-1, -1, -1, 3))  # N x H x W x RGB
IMAGE_ARRAY = Form("UINT8", (-1, -1, 3))  # one H x W x RGB image
STRINGS = Form("BYTES", (-1,))
STRING_COLUMN = Form("BYTES", (-1, 1))  # what Triton clients often send for one string per row
MODEL_IN_PATH = "the model is the one the path names: /v2/models/{name}/infer"
TOP_K = (
    TensorSpec("LABELS", (Form("BYTES", (-1, -1)),), "The top_k labels per row, best first."),
    TensorSpec("SCORES", (Form("FP32", (-1, -1)),), "Their probabilities."),
    TensorSpec("INDICES", (Form("INT64", (-1, -1)),), "Their class indices."),
)


def image_bytes(array: np.ndarray) -> bytes:
    """A UINT8 [H, W, 3] array as PNG: lossless, so the task decodes exactly these pixels."""
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise BadRequest(f"an image of {array.shape[0]} x {array.shape[1]} pixels has none; send at least 1 x 1")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the image's header (None where it cannot be read: decoding will say why)."""
    with contextlib.suppress(Exception), Image.open(io.BytesIO(data)) as image:
        return image.size
    return None


def _rows(spec: TensorSpec, tensor: np.ndarray) -> list[bytes]:
    """One file per row: BYTES elements as they are, image arrays as PNG."""
    if tensor.dtype == object:
        return [bytes(v) for v in tensor.reshape(-1)]
    if tensor.ndim == 3:
        return [image_bytes(tensor)]
    return [image_bytes(image) for image in tensor]


class Adapter(ABC):
    task: ClassVar[str]
    inputs: ClassVar[tuple[TensorSpec, ...]]
    outputs: ClassVar[tuple[TensorSpec, ...]]
    # The task's request fields that a request's parameters may not set, each with what to do instead (a 400 says
    # it): the adapter sets them, or they ask for outputs it does not declare. Every other field (top_k, ...) is a
    # parameter.
    excluded: ClassVar[Mapping[str, str]] = {"model": MODEL_IN_PATH}
    classifies: ClassVar[bool] = False  # top-k outputs (LABELS, SCORES, INDICES): Triton's classification applies

    def check(self, inputs: Sequence[RequestInput]) -> None:
        """Names, datatypes and shapes, before any data is decoded."""
        known = {s.name: s for s in self.inputs}
        given = {i.name for i in inputs}
        for tensor in inputs:
            spec = known.get(tensor.name)
            if spec is None:
                raise BadRequest(f"{tensor.name}: no such input; {self.task} takes {self.signature()}")
            if not any(f.datatype == tensor.datatype for f in spec.forms):
                raise BadRequest(f"{tensor.name}: datatype {tensor.datatype}; expected {_describe(spec)}")
            if not any(f.datatype == tensor.datatype and _fits(tensor.shape, f) for f in spec.forms):
                raise BadRequest(
                    f"{tensor.name}: shape {tensor.shape} for {tensor.datatype}; expected {_describe(spec)}"
                )
        for spec in self.inputs:
            if not spec.optional and spec.name not in given:
                raise BadRequest(f"{spec.name}: input missing; {self.task} takes {self.signature()}")

    def signature(self) -> str:
        return "; ".join(f"{s.name}{' (optional)' if s.optional else ''}: {_describe(s)}" for s in self.inputs)

    def items(self, tensors: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> list[Item]:
        """One item per batch row; every input must have the same number of rows."""
        columns = {s.name: _rows(s, tensors[s.name]) for s in self.inputs if s.name in tensors}
        counts = {name: len(rows) for name, rows in columns.items()}
        if len(set(counts.values())) > 1:
            raise BadRequest(f"inputs differ in batch size: {counts}")
        size = next(iter(counts.values()))
        if size == 0:
            raise BadRequest("the batch is empty")
        return [self.item({name: rows[i] for name, rows in columns.items()}, options) for i in range(size)]

    def item(self, row: dict[str, bytes], options: Mapping[str, Any]) -> Item:
        return dict(options), {name.lower(): data for name, data in row.items()}

    def check_rows(self, requests: Sequence[Any]) -> None:
        """The rows' validated requests, before any is decoded: refuse what the output tensors could not hold."""
        return None  # most tasks' outputs grow with the rows alone, which max_files_per_request bounds

    @abstractmethod
    def results(self, encoded: Sequence[Encoded]) -> list[Output]:
        """Every row's encoded result → the output tensors, rows first."""


def _fields(encoded: Encoded) -> dict[str, Any]:
    if isinstance(encoded, dict):
        return encoded
    if isinstance(encoded.content, dict):
        return encoded.content
    raise TypeError(f"expected JSON fields from the task, got {encoded.media_type}")


def _texts(values: Sequence[str]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = [v.encode() for v in values]
    return array


def _predictions(encoded: Sequence[Encoded]) -> list[Output]:
    rows = [_fields(e)["predictions"] for e in encoded]
    labels = np.empty((len(rows), len(rows[0])), dtype=object)
    for i, row in enumerate(rows):
        labels[i, :] = [p["label"].encode() for p in row]
    return [
        Output("LABELS", "BYTES", labels),
        Output("SCORES", "FP32", np.array([[p["score"] for p in row] for row in rows], dtype=np.float32)),
        Output("INDICES", "INT64", np.array([[p["index"] for p in row] for row in rows], dtype=np.int64)),
    ]


class ClassifyAdapter(Adapter):
    task = "classify"
    classifies = True
    inputs = (
        TensorSpec(
            "IMAGE",
            (ENCODED_IMAGE, IMAGE_ARRAYS, IMAGE_ARRAY),
            "Encoded images (JPEG, PNG, WebP, ...), one per row; or UINT8 RGB arrays [N, H, W, 3] or [H, W, 3].",
        ),
    )
    outputs = TOP_K

    def results(self, encoded: Sequence[Encoded]) -> list[Output]:
        return _predictions(encoded)


class TextAdapter(Adapter):
    """A UTF-8 string per row, given to the task as its ``text`` field."""

    inputs = (TensorSpec("TEXT", (STRINGS, STRING_COLUMN), "UTF-8 text, one per row."),)
    excluded: ClassVar[Mapping[str, str]] = {"model": MODEL_IN_PATH, "text": "the text is the TEXT input's, a row each"}

    def item(self, row: dict[str, bytes], options: Mapping[str, Any]) -> Item:
        try:
            text = row["TEXT"].decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("TEXT: an element is not UTF-8") from None
        return {**options, "text": text}, {}


class ClassifyTextAdapter(TextAdapter):
    task = "classify-text"
    classifies = True
    outputs = TOP_K

    def results(self, encoded: Sequence[Encoded]) -> list[Output]:
        return _predictions(encoded)


class FillMaskAdapter(TextAdapter):
    """Rows may hold different numbers of [MASK]: M is the most in the batch, and shorter rows are padded
    with byte offset -1, candidate byte -1 and score 0."""

    task = "fill-mask"

    def check_rows(self, requests: Sequence[Any]) -> None:
        if requests:  # every row is padded to the most [MASK]s in one
            check_answer_size([r.text.count("[MASK]") for r in requests], requests[0].top_k, padded=True)

    outputs = (
        TensorSpec("TEXT", (Form("BYTES", (-1,)),), "The text with every [MASK] replaced by its best byte."),
        TensorSpec("BYTE_OFFSETS", (Form("INT64", (-1, -1)),), "[N, M]: each mask's offset in the filled text."),
        TensorSpec("CANDIDATE_BYTES", (Form("INT64", (-1, -1, -1)),), "[N, M, top_k]: byte values, best first."),
        TensorSpec("CANDIDATE_SCORES", (Form("FP32", (-1, -1, -1)),), "[N, M, top_k]: their probabilities."),
    )

    def results(self, encoded: Sequence[Encoded]) -> list[Output]:
        rows = [_fields(e) for e in encoded]
        masks = max(len(r["masks"]) for r in rows)
        k = max((len(m["candidates"]) for r in rows for m in r["masks"]), default=0)
        offsets = np.full((len(rows), masks), -1, dtype=np.int64)
        candidates = np.full((len(rows), masks, k), -1, dtype=np.int64)
        scores = np.zeros((len(rows), masks, k), dtype=np.float32)
        for i, row in enumerate(rows):
            for j, mask in enumerate(row["masks"]):
                offsets[i, j] = mask["byte_offset"]
                for c, candidate in enumerate(mask["candidates"]):
                    candidates[i, j, c] = candidate["byte"]
                    scores[i, j, c] = candidate["score"]
        return [
            Output("TEXT", "BYTES", _texts([r["text"] for r in rows])),
            Output("BYTE_OFFSETS", "INT64", offsets),
            Output("CANDIDATE_BYTES", "INT64", candidates),
            Output("CANDIDATE_SCORES", "FP32", scores),
        ]


class OpticalFlowAdapter(Adapter):
    task = "optical-flow"
    inputs = (
        TensorSpec("FRAME1", (ENCODED_IMAGE, IMAGE_ARRAYS, IMAGE_ARRAY), "First frames: encoded, or UINT8 RGB."),
        TensorSpec("FRAME2", (ENCODED_IMAGE, IMAGE_ARRAYS, IMAGE_ARRAY), "Second frames, each the size of its first."),
    )
    outputs = (TensorSpec("FLOW", (Form("FP32", (-1, -1, -1, 2)),), "[N, H, W, 2]: (dx, dy) in pixels."),)
    excluded: ClassVar[Mapping[str, str]] = {
        "model": MODEL_IN_PATH,
        "format": "FLOW is always FP32 [N, H, W, 2] (POST /v1/optical-flow has other formats)",
    }

    def items(self, tensors: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> list[Item]:
        items = super().items(tensors, options)
        sizes = {size for _, files in items if (size := _image_size(files["frame1"])) is not None}
        if len(sizes) > 1:  # refused before the model runs: one FLOW tensor holds one size
            raise BadRequest(
                f"the pairs differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))}); "
                "one FLOW tensor holds one size: send them in separate requests"
            )
        return items

    def item(self, row: dict[str, bytes], options: Mapping[str, Any]) -> Item:
        return {**options, "format": "npy"}, {"frame1": row["FRAME1"], "frame2": row["FRAME2"]}  # float32, exact

    def results(self, encoded: Sequence[Encoded]) -> list[Output]:
        flows = []
        for e in encoded:
            if not isinstance(e, Reply) or not isinstance(e.content, bytes):
                raise TypeError("optical-flow encodes npy as bytes")
            flows.append(np.load(io.BytesIO(e.content), allow_pickle=False))
        if len({f.shape for f in flows}) > 1:  # sizes that only EXIF orientation made differ
            raise BadRequest("the pairs differ in size once oriented; send them in separate requests")
        return [Output("FLOW", "FP32", np.stack(flows))]


class AutoencodeAdapter(Adapter):
    task = "autoencode"
    classifies = True
    inputs = (
        TensorSpec("VIDEO", (Form("BYTES", (-1,)),), "Video files (MP4, MOV, MKV, WebM), one per row."),
        TensorSpec(
            "AUDIO", (Form("BYTES", (-1,)),), "Audio files, one per row (default: each video's own).", optional=True
        ),
    )
    outputs = (*TOP_K, TensorSpec("AUDIO_SOURCE", (Form("BYTES", (-1,)),), "video, upload or silence."))
    excluded: ClassVar[Mapping[str, str]] = {
        "model": MODEL_IN_PATH,
        "reconstruction": "reconstructions are REST only: POST /v1/autoencode",
        "per_clip": "per-clip answers are REST only: POST /v1/autoencode",
    }

    def results(self, encoded: Sequence[Encoded]) -> list[Output]:
        sources = _texts([_fields(e)["audio_source"] for e in encoded])
        return [*_predictions(encoded), Output("AUDIO_SOURCE", "BYTES", sources)]


ADAPTERS: dict[str, Adapter] = {
    a.task: a
    for a in (ClassifyAdapter(), FillMaskAdapter(), ClassifyTextAdapter(), OpticalFlowAdapter(), AutoencodeAdapter())
}

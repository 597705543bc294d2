"""What a task declares, and the helpers tasks share. No HTTP and no server state here.

A task's lifecycle, in LitServe's verbs: ``decode`` (request fields and uploads → one typed payload, in
the decode pool) → ``predict`` (a batch of payloads → one result each, on the inference thread) →
``encode`` (one result → the response body). ``app/routes/tasks.py`` generates the HTTP route from the
declaration: it reads the form, the query or the JSON body into ``request_model``, hands uploads to
``decode``, queues payloads on the model's batcher, and sends what ``encode`` returns.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing import tokenizer

from ..batching import EVERY, Batch
from ..errors import InvalidInput, PayloadTooLarge, ServiceError

RequestT = TypeVar("RequestT", bound=BaseModel)
PayloadT = TypeVar("PayloadT")
ResultT = TypeVar("ResultT")

TEXT_BUCKETS = (64, 128, 256, 512, 1024, 2048)

# Demo-profile latent stacks: small enough that every task warms up in seconds on a laptop CPU.
DEMO_LATENTS: dict[str, Any] = dict(
    num_latents=64,
    d_latents=128,
    num_blocks=1,
    num_self_attends_per_block=2,
    num_self_attention_heads=4,
    num_cross_attention_heads=1,
)
DEMO_TEXT: dict[str, Any] = dict(
    num_latents=32,
    d_latents=128,
    d_model=64,
    num_blocks=1,
    num_self_attends_per_block=4,
    num_self_attention_heads=4,
    num_cross_attention_heads=4,
)


class TaskRequest(BaseModel):
    """Base of every task's request fields. Unknown fields are refused (422 naming them), never ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Which of the task's models (a variant listed by /v1/models); default: the first configured."
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """true is not a number here (pydantic's lax mode read top_k: true as 1); "3" from a form still is."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation in (int, float, int | None, float | None):
                raise ValueError("expected a number, got a boolean")
        return value


@dataclass(frozen=True)
class Upload:
    """A file field of a multipart request."""

    name: str
    description: str
    required: bool = True
    repeatable: bool = False  # several files under this name: one payload (and one result) each
    raw_types: tuple[str, ...] = ()  # content types also accepted as the whole request body
    instead_of: tuple[str, ...] = ()  # uploads this one replaces (a video instead of two frames); never both


@dataclass(frozen=True)
class Limits:
    """What decoding may accept; from the server's settings, picklable for decode processes."""

    max_image_pixels: int
    max_video_seconds: float
    max_video_frames: int
    max_text_bytes: int
    max_flow_tiles: int
    max_video_clips: int = 8
    max_flow_frames: int = 32
    image_decoder: str = "auto"  # auto: scaled JPEG decoding where it stays in tolerance; exact: reference
    cpu_jpeg_min_pixels: int = 0  # CUDA, auto: JPEGs this large decoded on the CPU (0: never; benchmarks/knobs.py)
    cpu_jpeg_slots: int = 0  # with cpu_jpeg_min_pixels: at most this many at once a process, the rest to the device


@dataclass(frozen=True)
class DecodeContext:
    config: PerceiverConfig  # of the model that will run the payload
    limits: Limits
    device: str = "cpu"  # where that model runs: decoding may be left to the device (nvJPEG on CUDA)


@dataclass(frozen=True)
class Reply:
    """A response other than the task's JSON: raw bytes of some media type, or JSON with extra headers."""

    content: bytes | dict[str, Any]
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class Task(ABC, Generic[RequestT, PayloadT, ResultT]):
    """One task: its request, its verbs, and how its batches are formed. Subclass, then add to TASKS."""

    name: ClassVar[str]
    path: ClassVar[str]
    summary: ClassVar[str]
    tag: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    demo_configs: ClassVar[dict[str, PerceiverConfig]]  # variant → small random-init config
    request_model: ClassVar[type[TaskRequest]]  # options (form, query or JSON body) and JSON body fields
    response_model: ClassVar[type[BaseModel]]  # the JSON body of one result, as documented
    uploads: ClassVar[tuple[Upload, ...]] = ()  # none: the request is a JSON body
    media_types: ClassVar[tuple[str, ...]] = ()  # other response content types ``encode`` may produce
    labelled: ClassVar[bool] = True  # predicts one of config.num_labels classes (/v1/models shows num_labels)
    # Capabilities.
    decode_offloaded: ClassVar[bool] = True  # False: decode is cheap enough for the event loop
    encode_offloaded: ClassVar[bool] = False  # True: encode is heavy (blending, video encoding)
    json_results: ClassVar[bool] = False  # True: ``predict``'s results are plain JSON (the channel skips walking them)
    cuda_graphs: ClassVar[bool] = False  # fixed input shapes: CUDA-graph replay may serve it
    prepares: ClassVar[bool] = False  # has a ``prepare`` stage worth running ahead of the forward pass (on CUDA)
    max_batch_size_cap: ClassVar[int | None] = None  # one request is already a large forward pass

    def variant(self, request: RequestT) -> str | None:
        """The model variant asked for (None: the first configured one)."""
        return getattr(request, "model", None)

    def expand(self, request: RequestT) -> list[RequestT] | None:
        """A request that carries several inputs in one field (a JSON list of texts): one request per input,
        answered as ``results`` in order. None: a single input."""
        return None

    def check(self, items: Sequence[tuple[RequestT, Mapping[str, bytes]]]) -> None:
        """Refuse a request as a whole (a ServiceError: its 4xx) before any of its items is decoded: what no
        single item shows, such as the size of the answer all of them would make together."""

    @abstractmethod
    def decode(self, request: RequestT, files: Mapping[str, bytes], ctx: DecodeContext) -> PayloadT:
        """Request fields and uploads (one file per upload name) → the payload of one forward-pass item."""

    def prepare(self, model: PerceiverHead, payloads: Sequence[PayloadT]) -> list[PayloadT]:
        """A batch's payloads made ready for ``predict`` on the model's device (uploads decoded there), on a
        thread and CUDA stream of their own while the batch before runs. Only where ``prepares`` is set;
        ``predict`` must also take payloads that were not prepared."""
        return list(payloads)

    def bucket(self, payload: PayloadT) -> Hashable:
        """Shape class: only payloads of one bucket share a forward pass."""
        return None

    def cost(self, payload: PayloadT) -> int:
        """Input elements, for ``max_batch_cost``."""
        return 1

    def units(self, payload: PayloadT) -> int:
        """Forward-pass items the payload brings (an image, a video's clips, a text's windows, flow windows),
        for the units-per-request metric."""
        return 1

    def default_max_batch_cost(self, max_batch_size: int) -> int | None:
        """``max_batch_cost`` unless a model spec sets one (None: batches are bounded by size alone)."""
        return None

    @abstractmethod
    def predict(self, model: PerceiverHead, payloads: Sequence[PayloadT], batch: Batch = EVERY) -> list[ResultT]:
        """One batched forward pass (inference thread, inference mode): a result per payload, in order.
        Work made of several passes asks ``batch`` which requests have ended (``batch.passes``) and skips theirs."""

    @abstractmethod
    def encode(self, result: ResultT, request: RequestT) -> dict[str, Any] | Reply:
        """One result → the task's JSON fields (the route adds model and weights), or a Reply."""

    @abstractmethod
    def warmup_payloads(self, config: PerceiverConfig) -> list[PayloadT]:
        """One payload per shape bucket the model can see."""


# ---------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def naming(field: str) -> Iterator[None]:
    """Errors raised while decoding one upload start with its field name: which of two frames was not an
    image, the video or the separate audio; of several inputs in one request, "input 2 of 3". Only what is
    wrong with the input itself (4xx of INPUT_STATUSES), not a deadline or an overload."""
    try:
        yield
    except ServiceError as exc:
        if exc.status in INPUT_STATUSES:
            exc.message = f"{field}: {exc.message}"
            exc.args = (exc.message,)
        raise


INPUT_STATUSES = (400, 413, 415, 422)  # what is wrong with an input itself


MAX_TEXTS = 64  # texts in one batched JSON request
# ``text``: one text, or a list of them answered as ``results`` in order (text-embeddings-inference's inputs).
# Tagged by the value's type, so an error is the one branch's (a plain union reported both: "constrained-str:
# String should have at least 1 character; list[constrained-str]: Input should be a valid list").
TEXT_TAGS = ("one", "list")
Texts = Annotated[
    Annotated[Annotated[str, Field(min_length=1)], Tag("one")]
    | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_TEXTS), Tag("list")],
    Discriminator(lambda value: "list" if isinstance(value, list) else "one"),
]


def error_location(loc: Sequence[int | str]) -> str:
    """A validation error's location as the client wrote it ("text.1"), without the Texts branch's tag."""
    parts = [p for i, p in enumerate(loc) if not (i == 1 and loc[0] == "text" and p in TEXT_TAGS)]
    return ".".join(str(p) for p in parts)


def expand_texts(request: RequestT) -> list[RequestT] | None:
    """``text`` given as a list: one request per text (the rest of the fields shared)."""
    texts = getattr(request, "text", None)
    if not isinstance(texts, list):
        return None
    return [request.model_copy(update={"text": t}) for t in texts]


def one_text(text: str | list[str]) -> str:
    if isinstance(text, list):  # expand() has split lists before decode
        raise TypeError("decode takes one text; a list is expanded into one request per text first")
    return text


def text_ids(text: str, max_bytes: int) -> list[int]:
    """Byte ids of a text, without [CLS]/[SEP] (each ``[MASK]`` is one id). Text over ``max_bytes`` UTF-8
    bytes is refused (413) before it is tokenized: the work a request brings stays bounded."""
    if len(text) > max_bytes:  # each character is at least one byte: no need to encode to know
        raise PayloadTooLarge(f"text is over {max_bytes} UTF-8 bytes (the server's limit); send a shorter text")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. "\ud800" in JSON
        raise InvalidInput(f"text is not valid Unicode at character {exc.start}: {exc.reason}") from None
    if size > max_bytes:
        raise PayloadTooLarge(f"text is {size} UTF-8 bytes; the server's limit is {max_bytes}; send a shorter text")
    return tokenizer.encode(text, truncate=False, max_length=size + 2)[1:-1]


def text_window(ctx: DecodeContext) -> int:
    """Bytes the model reads at once: its positions, less [CLS] and [SEP] (2,046 for 2,048 positions)."""
    return ctx.config.max_position_embeddings - 2


def with_specials(ids: Sequence[int]) -> list[int]:
    return [tokenizer.CLS, *ids, tokenizer.SEP]


def warmup_ids(config: PerceiverConfig) -> list[list[int]]:
    """Ids that really fill each length bucket the model supports (one [MASK], so fill-mask decodes one)."""
    limit = config.max_position_embeddings
    return [
        [tokenizer.CLS, *[tokenizer.BYTE_OFFSET] * (bucket - 3), tokenizer.MASK, tokenizer.SEP]
        for bucket in TEXT_BUCKETS
        if bucket <= limit
    ]


def text_bucket(length: int) -> int:
    """Smallest padded length that holds ``length`` ids."""
    return next(b for b in TEXT_BUCKETS if b >= length)


def to_device(batch: torch.Tensor, model: PerceiverHead) -> torch.Tensor:
    """Host → device; pinned and asynchronous on CUDA so the copy overlaps the previous kernels."""
    if model.device.type == "cuda":
        batch = batch.pin_memory().to(model.device, non_blocking=True)
    else:
        batch = batch.to(model.device)
    return batch.to(model.dtype) if batch.is_floating_point() else batch


def top_predictions(probs: torch.Tensor, k: int, config: PerceiverConfig) -> list[dict[str, Any]]:
    """[K] probabilities → the k best as {"label", "index", "score"}."""
    scores, indices = probs.float().topk(min(k, probs.shape[-1]))
    return [
        {"label": config.label(int(i)), "index": int(i), "score": round(float(s), 6)}
        for s, i in zip(scores, indices, strict=True)
    ]


def pad_ids(rows: Sequence[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[PAD]-pad id lists to ``length``: ids [B, length] and the 1/0 attention mask."""
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask

"""What the server answers, as dataclasses. Fields the server adds later are ignored, never an error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Prediction:
        return cls(str(data["label"]), int(data["index"]), float(data["score"]))


def _predictions(body: dict[str, Any]) -> list[Prediction]:
    return [Prediction.parse(p) for p in body["predictions"]]


@dataclass(frozen=True)
class Classification:
    """/v1/classify and /v1/classify-text: the model's top-k classes, best first."""

    model: str
    weights: str  # pretrained, or random-init in the demo profile
    predictions: list[Prediction]

    @classmethod
    def parse(cls, body: dict[str, Any], meta: dict[str, Any] | None = None) -> Classification:
        meta = meta or body
        return cls(meta["model"], meta["weights"], _predictions(body))


@dataclass(frozen=True)
class Candidate:
    byte: int
    char: str | None  # the byte as a character when it is one on its own (ASCII)
    score: float


@dataclass(frozen=True)
class MaskPrediction:
    byte_offset: int  # in the UTF-8 bytes of the filled text
    candidates: list[Candidate]


@dataclass(frozen=True)
class FilledText:
    """/v1/fill-mask: the text with every [MASK] replaced by its best byte, and each mask's candidates."""

    model: str
    weights: str
    text: str
    masks: list[MaskPrediction]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> FilledText:
        masks = [
            MaskPrediction(
                int(m["byte_offset"]),
                [Candidate(int(c["byte"]), c.get("char"), float(c["score"])) for c in m["candidates"]],
            )
            for m in body["masks"]
        ]
        return cls(body["model"], body["weights"], body["text"], masks)


@dataclass(frozen=True)
class Flow:
    """/v1/optical-flow: [height][width][2] displacements (dx, dy) in pixels."""

    model: str
    weights: str
    height: int
    width: int
    flow: list[list[list[float]]]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Flow:
        return cls(body["model"], body["weights"], int(body["height"]), int(body["width"]), body["flow"])


@dataclass(frozen=True)
class VideoClassification:
    """/v1/autoencode without a reconstruction: Kinetics-700 classes, and where the audio came from."""

    model: str
    weights: str
    audio_source: str  # video, upload or silence
    predictions: list[Prediction]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> VideoClassification:
        return cls(body["model"], body["weights"], body["audio_source"], _predictions(body))


@dataclass(frozen=True)
class ModelInfo:
    """One entry of /v1/models; ``details`` holds the whole entry (batching, timings, ...)."""

    name: str
    task: str
    variant: str
    architecture: str
    source: str
    weights: str
    device: str
    details: dict[str, Any]

    @classmethod
    def parse(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(
            name=data["name"],
            task=data["task"],
            variant=data["variant"],
            architecture=data["architecture"],
            source=data["source"],
            weights=data["weights"],
            device=data["device"],
            details=data,
        )

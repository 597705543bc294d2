"""PERCEIVER_IMAGE_DECODER: scaled JPEG decoding (auto) against the reference preprocessing (exact).

Tolerance (issue: mean abs diff <= 3 of 255 for scaled CPU decoding), on real photos at every size the
service sees: the sample photos, and mosaics of them at 1920x1080 and 4032x3024 (portrait too).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

import perceiver_core
from app.errors import InvalidInput
from app.media import decode_image, device_decodable, open_image
from app.tasks.classify import SCALED_MIN_SHORT_SIDE, TASK, ImagePayload, crops_on_device
from benchmarks.photos import photo_jpeg
from perceiver_core.processing import jpeg
from perceiver_core.processing.image import normalize_pixels, resize_image
from tests.helpers import mean_abs_diff

from .conftest import MEDIA

SIZES = [(451, 300), (1920, 1080), (4032, 3024), (3024, 4032)]


def crops(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    exact = resize_image(decode_image(data, 10**9))
    auto = resize_image(decode_image(data, 10**9, SCALED_MIN_SHORT_SIDE))
    return exact, auto


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_scaled_decoding_stays_within_three_of_255(size: tuple[int, int]) -> None:
    exact, auto = crops(photo_jpeg(*size))
    assert exact.shape == auto.shape == (224, 224, 3)
    assert mean_abs_diff(exact, auto) <= 3.0


def test_small_uploads_are_decoded_exactly() -> None:
    """Below twice the minimum short side nothing is scaled: the sample photos come out bit for bit."""
    for name in ("cat.jpg", "coffee.jpg"):
        exact, auto = crops((MEDIA / name).read_bytes())
        assert np.array_equal(exact, auto)


def test_scaled_decoding_never_goes_below_twice_the_crop() -> None:
    for width, height in SIZES:
        image = decode_image(photo_jpeg(width, height), 10**9, SCALED_MIN_SHORT_SIDE)
        if min(width, height) < 2 * SCALED_MIN_SHORT_SIDE:
            assert image.size == (width, height)
            continue
        assert image.size[0] < width  # it really was scaled,
        assert min(image.size) >= SCALED_MIN_SHORT_SIDE  # but not below twice the crop
        assert int(224 / 256 * min(image.size)) >= 2 * 224


def _reencode(data: bytes, **save: object) -> bytes:
    buffer = io.BytesIO()
    image = Image.open(io.BytesIO(data))
    mode = save.pop("mode", None)
    (image.convert(str(mode)) if mode else image).save(buffer, format=str(save.pop("format", "JPEG")), **save)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize(
    "variant",
    ["png", "cmyk-jpeg", "progressive-jpeg", "exif-rotated-jpeg", "grayscale-jpeg"],
)
def test_other_formats_and_jpeg_kinds_fall_back_or_stay_in_tolerance(variant: str) -> None:
    phone = photo_jpeg(4032, 3024)
    if variant == "png":
        data = _reencode(photo_jpeg(1920, 1080), format="PNG")
    elif variant == "cmyk-jpeg":
        data = _reencode(phone, mode="CMYK", quality=92)
    elif variant == "progressive-jpeg":
        data = _reencode(phone, progressive=True, quality=90)
    elif variant == "grayscale-jpeg":
        data = _reencode(phone, mode="L", quality=90)
    else:
        sideways = Image.open(io.BytesIO(phone)).transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90° clockwise to display": undoes the counter-clockwise turn above
        buffer = io.BytesIO()
        sideways.save(buffer, format="JPEG", quality=90, exif=exif)
        data = buffer.getvalue()
        upright_exact, _ = crops(phone)
        exact, auto = crops(data)
        assert mean_abs_diff(exact, upright_exact) <= 3.0  # the rotation was applied on both paths
        assert mean_abs_diff(auto, upright_exact) <= 3.0
    exact, auto = crops(data)
    if variant == "png":
        assert np.array_equal(exact, auto)  # not a JPEG: the exact path
    else:
        assert mean_abs_diff(exact, auto) <= 3.0


def test_logit_difference_on_the_demo_classifiers_is_small() -> None:
    """The same 12 MP photo through both paths into each demo classifier: logits barely move."""
    exact, auto = crops(photo_jpeg(4032, 3024))
    pixels = normalize_pixels(torch.from_numpy(np.stack([exact, auto])))
    for config in TASK.demo_configs.values():
        torch.manual_seed(0)
        model = perceiver_core.build_model(config).eval()
        with torch.inference_mode():
            logits = model(inputs=pixels).logits
        scale = logits[0].abs().max()
        assert float((logits[0] - logits[1]).abs().max() / scale) < 0.05


# ---------------------------------------------------------------------------------------------- device decoding

needs_torchvision = pytest.mark.skipif(not jpeg.available(), reason="torchvision is not installed")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@needs_torchvision
@pytest.mark.parametrize("device", DEVICES)
def test_jpegs_decoded_in_the_batch_match_the_reference_and_a_bad_one_fails_alone(device: str) -> None:
    """The path CUDA hosts take (nvJPEG there; libjpeg-turbo through the same calls on the CPU)."""
    torch.manual_seed(0)
    model = perceiver_core.build_model(TASK.demo_configs["conv"]).to(device).eval()
    photos = [photo_jpeg(*size) for size in SIZES]
    corrupt = photos[0][:200] + bytes(64) + photos[0][264:]  # the scan data overwritten: undecodable
    payloads = [ImagePayload(None, 3, data, 10**9) for data in [*photos, b"\xff\xd8" + bytes(500)]]
    payloads.insert(2, ImagePayload(None, 3, corrupt, 10**9))
    decoded = crops_on_device(payloads, model)
    for data, crop in zip(photos, [c for i, c in enumerate(decoded) if i not in (2, len(decoded) - 1)], strict=True):
        assert crop is not None and crop.device.type == device
        assert mean_abs_diff(crop.cpu().numpy(), crops(data)[0]) <= 1.0
    assert decoded[-1] is None  # not a JPEG any decoder reads: that request alone gets a 422
    results = TASK.predict(model, payloads)
    assert isinstance(results[-1], InvalidInput)
    assert all(isinstance(r, list) and len(r) == 3 for r in results[:2])


def test_only_plain_upright_jpegs_are_left_to_the_device() -> None:
    phone = photo_jpeg(4032, 3024)
    assert device_decodable(open_image(phone, 10**9))
    assert not device_decodable(open_image(_reencode(phone, mode="CMYK"), 10**9))
    assert not device_decodable(open_image(_reencode(phone, progressive=True), 10**9))
    assert not device_decodable(open_image(_reencode(photo_jpeg(451, 300), format="PNG"), 10**9))
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(io.BytesIO(phone)).save(rotated, format="JPEG", exif=exif)
    assert not device_decodable(open_image(rotated.getvalue(), 10**9))


def test_cpu_jpeg_min_pixels_keeps_large_photos_off_the_device_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA host, which JPEGs Classify.decode leaves to nvJPEG (the payload keeps the bytes) and which it
    decodes on the CPU (the payload has pixels). The decision reads the header only: no torchvision needed."""
    from app.settings import Settings
    from app.tasks import classify
    from app.tasks.base import DecodeContext

    monkeypatch.setattr(classify, "DEVICE_JPEG", True)
    phone, small = photo_jpeg(4032, 3024), photo_jpeg(451, 300)
    progressive = _reencode(small, progressive=True)
    config, request = TASK.demo_configs["conv"], classify.ClassifyRequest()
    default = DecodeContext(config, Settings().limits(), "cuda")
    hybrid = DecodeContext(config, dataclasses.replace(Settings().limits(), cpu_jpeg_min_pixels=8_000_000), "cuda")

    def to_device(data: bytes, ctx: DecodeContext) -> bool:
        payload = TASK.decode(request, {"image": data}, ctx)
        assert (payload.jpeg is None) == (payload.pixels is not None)  # one or the other
        return payload.jpeg == data

    assert to_device(phone, default) and to_device(small, default)
    assert not to_device(phone, hybrid) and to_device(small, hybrid)
    assert not to_device(progressive, default)  # nvJPEG cannot take it: the CPU decodes it


def test_with_cpu_jpeg_slots_large_photos_go_to_the_cpu_while_a_slot_is_free_and_to_nvjpeg_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """benchmarks/knobs.py's hybrid: a CUDA host's decode threads take 12 MP photos at reduced scale while fewer
    than cpu_jpeg_slots are at it, and leave the rest to nvJPEG. What the decision reads of the upload is its
    header, so this runs without torchvision (the device decode itself is tested on a GPU above)."""
    from app.settings import Settings
    from app.tasks import classify
    from app.tasks.base import DecodeContext

    monkeypatch.setattr(classify, "DEVICE_JPEG", True)
    limits = dataclasses.replace(Settings().limits(), cpu_jpeg_min_pixels=8_000_000, cpu_jpeg_slots=1)
    ctx = DecodeContext(TASK.demo_configs["conv"], limits, "cuda")
    phone, small = photo_jpeg(4032, 3024), photo_jpeg(451, 300)
    request = classify.ClassifyRequest()

    on_cpu = TASK.decode(request, {"image": phone}, ctx)
    assert on_cpu.jpeg is None and on_cpu.pixels is not None and on_cpu.pixels.shape == (224, 224, 3)
    assert mean_abs_diff(on_cpu.pixels, crops(phone)[1]) == 0  # the reduced-scale CPU path, as on a CPU host
    with classify.CPU_SLOTS.hold(1) as taken:  # another decode thread holds the one slot
        assert taken
        assert TASK.decode(request, {"image": phone}, ctx).jpeg == phone  # nvJPEG's, in the batch
    assert classify.CPU_SLOTS.busy == 0
    assert TASK.decode(request, {"image": phone}, ctx).pixels is not None  # the slot is free again
    assert TASK.decode(request, {"image": small}, ctx).jpeg == small  # below the size: nvJPEG's as always
    no_bound = DecodeContext(ctx.config, dataclasses.replace(limits, cpu_jpeg_slots=0), "cuda")
    with classify.CPU_SLOTS.hold(1):
        assert TASK.decode(request, {"image": phone}, no_bound).pixels is not None  # 0: every large one on the CPU


def test_cpu_slots_are_given_back_when_a_decode_fails() -> None:
    from app.tasks.classify import CpuSlots

    slots = CpuSlots()
    with pytest.raises(ValueError), slots.hold(2) as first:
        assert first and slots.busy == 1
        raise ValueError("a corrupt upload")
    with slots.hold(2) as a, slots.hold(2) as b, slots.hold(2) as c:
        assert (a, b, c) == (True, True, False) and slots.busy == 2
    assert slots.busy == 0


# ---------------------------------------------------------------------------------------------- prepared ahead


def _prepare_and_predict(model: torch.nn.Module, payloads: list[ImagePayload]) -> list[object]:
    """What the batcher does with prepare_ahead on: the engine's prepare stage on a thread of its own (and, on
    CUDA, a stream of its own), then the forward pass on another thread."""
    from concurrent.futures import ThreadPoolExecutor

    from app.engine import make_prepare

    with ThreadPoolExecutor(1) as preparer, ThreadPoolExecutor(1) as runner:
        prepared = preparer.submit(make_prepare(TASK, model), payloads).result()  # type: ignore[arg-type]
        assert all(p.pixels is None and p.jpeg is None for p in prepared)

        def run() -> list[object]:
            with torch.inference_mode():
                return list(TASK.predict(model, prepared))  # type: ignore[arg-type]

        return runner.submit(run).result()


def test_a_batch_prepared_ahead_gets_the_answers_of_one_that_is_not() -> None:
    """CPU-decoded uploads (every host): the prepare stage copies the pixels over, the answers stay the same."""
    torch.manual_seed(0)
    model = perceiver_core.build_model(TASK.demo_configs["conv"]).eval()
    payloads = [ImagePayload(crops(photo_jpeg(*size))[0], 4) for size in SIZES]
    with torch.inference_mode():
        direct = TASK.predict(model, payloads)
    assert _prepare_and_predict(model, payloads) == direct


@needs_torchvision
@pytest.mark.parametrize("device", DEVICES)
def test_jpegs_decoded_ahead_get_the_answers_of_the_batch_and_a_bad_one_fails_alone(device: str) -> None:
    """On CUDA, nvJPEG decodes on the prepare stage's stream while the previous batch runs on the default one."""
    torch.manual_seed(0)
    model = perceiver_core.build_model(TASK.demo_configs["conv"]).to(device).eval()
    payloads = [ImagePayload(None, 3, photo_jpeg(*size), 10**9) for size in SIZES]
    payloads.append(ImagePayload(None, 3, b"\xff\xd8" + bytes(500), 10**9))
    payloads.append(ImagePayload(crops(photo_jpeg(451, 300))[0], 3))  # decoded on the CPU, copied over
    with torch.inference_mode():
        direct = TASK.predict(model, payloads)
    ahead = _prepare_and_predict(model, payloads)
    assert isinstance(direct[-2], InvalidInput) and isinstance(ahead[-2], InvalidInput)
    assert ahead[:-2] == direct[:-2] and ahead[-1] == direct[-1]

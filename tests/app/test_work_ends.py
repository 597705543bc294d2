"""Work ends with its request at every stage: decode, every forward pass, and building the answer."""

from __future__ import annotations

import gc
import logging
import time

import pytest
import torch

import perceiver_core
from app.batching import Batch
from app.errors import DeadlineExceeded
from app.metrics import Metrics
from app.runtime import Runtime
from app.settings import Settings
from app.tasks.base import DecodeContext
from app.tasks.fill_mask import TASK as FILL_MASK
from app.tasks.fill_mask import FillMaskRequest

from .asyncutil import async_test
from .conftest import LiveServer, until


class EndsAfter(Batch):
    """A batch whose one request ends after ``checks`` questions (as a deadline passing mid-batch would)."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.checks, self.asked = checks, 0

    def ended(self, index: int) -> bool:
        self.asked += 1
        return self.asked > self.checks


class CountingPasses(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.passes = model, 0

    def forward(self, *args: object, **kwargs: object) -> object:
        self.passes += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def test_a_heavy_fill_mask_answer_stops_being_built_once_its_request_has_ended() -> None:
    """10,000 masks with top_k=256 are seconds of answer to build: a request that ended during its last pass
    gets no answer built (its 504 has gone), and one that ended earlier costs no pass at all."""
    torch.manual_seed(0)
    model = perceiver_core.build_model(FILL_MASK.demo_configs["default"]).eval()
    request = FillMaskRequest(text="[MASK]" * 3000, top_k=256)
    ctx = DecodeContext(model.config, Settings().limits())
    payload = FILL_MASK.decode(request, {}, ctx)
    assert len(payload.starts) == 2  # two windows, one pass
    counted = CountingPasses(model)
    with torch.inference_mode():
        whole = FILL_MASK.predict(counted, [payload])  # type: ignore[arg-type]
        assert len(whole[0]["masks"]) == 3000 and counted.passes == 1
        # Asked once before the pass (alive), then ended: the pass runs, the answer is not built.
        cut = FILL_MASK.predict(counted, [payload], EndsAfter(checks=1))  # type: ignore[arg-type]
        assert counted.passes == 2 and cut[0]["masks"] == []
        # Ended in the middle of building the answer: it stops within ANSWER_CHECK_EVERY masks.
        from app.tasks.fill_mask import ANSWER_CHECK_EVERY

        partway = FILL_MASK.predict(counted, [payload], EndsAfter(checks=2))  # type: ignore[arg-type]
        assert 0 < len(partway[0]["masks"]) <= ANSWER_CHECK_EVERY
        # Ended before its pass: nothing runs.
        FILL_MASK.predict(counted, [payload], EndsAfter(checks=0))  # type: ignore[arg-type]
        assert counted.passes == 3


def _decode() -> str:
    return "decoded"


@async_test
async def test_a_decode_or_encode_that_gets_its_worker_after_the_deadline_does_not_start() -> None:
    runtime = Runtime(Settings(decode_workers=1), Metrics())
    try:
        with pytest.raises(DeadlineExceeded):
            await runtime.decode(time.monotonic() - 1, _decode)
        with pytest.raises(DeadlineExceeded):
            await runtime.offload(time.monotonic() - 1, _decode)
        assert await runtime.decode(time.monotonic() + 30, _decode) == "decoded"
        assert runtime.decode_busy_s < 1
    finally:
        runtime.shutdown_executors()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_request_that_ends_before_its_tickets_leaves_asyncio_nothing_to_log() -> None:
    """A deadline that passes while the request's tickets are queued: a 504, and the tickets are dropped. The
    gather of their futures fails once they are, after the request stopped waiting for it; it used to be left for
    asyncio to log as an ERROR ("_GatheringFuture exception was never retrieved"), one per 504, on /v1 and /v2."""
    records = Records()
    logging.getLogger("asyncio").addHandler(records)  # here, not the root: the server configures the root's
    server = LiveServer(demo_tasks=["classify-text"]).start()
    gate = server.hold_inference()  # the requests reach the queue, and wait there past their deadlines
    try:
        with server.client() as client:
            late = {"x-request-timeout-ms": "300"}
            for _ in range(2):
                r = client.post("/v1/classify-text", json={"text": "hi"}, headers=late)
                assert r.status_code == 504 and "did not finish before its deadline" in r.text, r.text
            v2 = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
            r = client.post("/v2/models/classify-text/infer", json=v2, headers=late)
            assert r.status_code == 504 and "did not finish before its deadline" in r.text, r.text
            gate.set()
            until(lambda: server.runtime.engine_for("classify-text").idle, "the dropped items gone")
            gc.collect()  # a future reports what was never retrieved when it is collected
            assert client.post("/v1/classify-text", json={"text": "hi"}).status_code == 200
    finally:
        gate.set()
        server.stop()
        logging.getLogger("asyncio").removeHandler(records)
    assert [m for m in records.messages if "never retrieved" in m] == []

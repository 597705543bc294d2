"""The channel between front-end processes and the model process: values, slab, admission table."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import mmap
import os
import socket
import threading
import time
from typing import Any, cast

import numpy as np
import pytest
import torch

import perceiver_core
from app import channel, model_process, remote
from app.batching import EVERY, OVERRUN_SHARE, AdmissionState, Batcher, Lanes, QueueFull, ServiceTime
from app.engine import Duration, Statistics
from app.errors import DeadlineExceeded, Overloaded
from app.metrics import Metrics
from app.runtime import Runtime
from app.settings import Settings
from app.tasks import TASKS

from .conftest import metric


def roundtrip(values: object, slab: channel.Slab | None = None, known: list[object] | None = None) -> object:
    ids = {id(v): i for i, v in enumerate(known or [])}
    frame, blocks = channel.pack({"k": "x"}, values, slab=slab, known=ids)
    size, tail = channel.HEADER.unpack(frame[: channel.HEADER.size])
    body = frame[channel.HEADER.size : channel.HEADER.size + size]
    assert len(frame) == channel.HEADER.size + size + tail
    back = channel.unpack(json.loads(body), frame[channel.HEADER.size + size :], slab.map if slab else None, known)
    if slab is not None:
        for offset, length in blocks:
            slab.give(offset, length)
    return back


@pytest.mark.parametrize("task", list(TASKS.values()), ids=lambda t: t.name)
def test_every_tasks_payloads_and_answers_cross_unchanged(task: object) -> None:
    """Each task's warm-up payloads (every shape bucket) go through the slab, and the forward pass of what
    arrives gives the same answers as of the originals; the answers come back equal, naming the payload."""
    slab = channel.Slab(1 << 25)
    for config in task.demo_configs.values():  # type: ignore[attr-defined]
        torch.manual_seed(0)
        model = perceiver_core.build_model(config).eval()
        payloads = task.warmup_payloads(config)[:2]  # type: ignore[attr-defined]
        arrived = roundtrip(payloads, slab)
        with torch.inference_mode():
            here = task.predict(model, payloads, EVERY)  # type: ignore[attr-defined]
            there = task.predict(model, arrived, EVERY)  # type: ignore[attr-defined]
        wired = model_process.wire_results(task, there)  # type: ignore[arg-type]
        back = roundtrip({"r": wired}, known=list(arrived))  # type: ignore[arg-type]
        assert repr(back["r"]) == repr(here)  # type: ignore[index]
        for result in back["r"]:  # type: ignore[index]
            if hasattr(result, "payload"):  # optical flow's answer holds its payload: the front end's own
                assert any(result.payload is p for p in arrived)  # type: ignore[union-attr]
    assert slab.free == [(0, slab.size)]


def test_values_keep_their_types() -> None:
    values = {
        "tuple": (1, 2.5, "x"),
        "ints as keys": {1: "a", 2: "b"},
        "$dollar": 1,
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5),
        "array": np.arange(12, dtype=np.int16).reshape(3, 4)[:, ::2],  # not contiguous
        "bytes": b"\x00\xff" * 70_000,  # over the inline limit
        "nan": float("nan"),
        "stats": Statistics(success=Duration(2, 5), batches={4: Duration(1, 9)}),
    }
    back = roundtrip(values, channel.Slab(1 << 20))
    assert isinstance(back, dict)
    assert back["tuple"] == (1, 2.5, "x") and back["ints as keys"] == {1: "a", 2: "b"} and back["$dollar"] == 1
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], values["bf16"])
    assert back["empty"].shape == (0, 4) and back["scalar"].item() == 3.5
    assert np.array_equal(back["array"], values["array"]) and back["bytes"] == values["bytes"]
    assert np.isnan(back["nan"]) and back["stats"] == values["stats"]


def test_a_plain_json_value_crosses_whole_and_uninterpreted() -> None:
    """Handed to json whole: a key the walk would read as a tensor or a payload reference is only a key."""
    value = {"masks": [{"$T": 0, "d": "float32", "s": [2]}, {"$P": 0}], "score": 0.5, "char": None}
    back = roundtrip([channel.PlainJson(value), torch.ones(2)])
    assert isinstance(back, list) and back[0] == value and torch.equal(back[1], torch.ones(2))


def test_error_kinds_cross_with_their_status_headers_and_reason() -> None:
    refused = Overloaded("busy", {"Retry-After": "3"}, reason="would_miss_deadline")
    back = roundtrip([refused, DeadlineExceeded("late")])
    assert isinstance(back, list)
    assert type(back[0]) is Overloaded and back[0].status == 429 and back[0].headers == {"Retry-After": "3"}
    assert back[0].reason == "would_miss_deadline" and str(back[0]) == "busy"
    assert type(back[1]) is DeadlineExceeded and back[1].status == 504


def test_nothing_outside_the_project_is_rebuilt() -> None:
    """A message naming a class outside app/perceiver_core, or an error that is not an error kind, is refused:
    the channel never becomes a way to call arbitrary constructors."""
    for forged in (
        {"$D": "subprocess:Popen", "f": {"args": ["true"]}},
        {"$D": "os:system", "f": {}},
        {"$D": "app.runtime:Runtime", "f": {}},  # ours, but nothing a message carries
        {"$D": "app.tasks.classify:np.lib.NumpyVersion", "f": {}},  # reached through a module attribute
        {"$D": "app.channel:torch.export.graph_signature.TensorArgument", "f": {"name": "x"}},
        {"$D": "perceiver_core.config:PerceiverConfig.__init__", "f": {}},
        {"$E": "Exception", "m": "x", "h": {}, "r": None},
        {"$N": 0, "d": "O", "s": [1]},
    ):
        with pytest.raises(channel.Unsupported):
            channel.Decoder([memoryview(b"12345678")]).value(forged)
    with pytest.raises(channel.Unsupported):
        channel.Encoder().value(object())


def test_slab_blocks_are_reused_and_coalesced() -> None:
    slab = channel.Slab(1024)
    a, b, c = slab.take(100), slab.take(200), slab.take(300)
    assert (a, b, c) == (0, 128, 384)  # 64-byte aligned
    assert slab.take(1024) is None  # no room: that payload travels inline
    slab.give(b, 200)
    slab.give(a, 100)
    assert slab.free[0] == (0, 384)  # neighbours merged
    slab.give(c, 300)
    assert slab.free == [(0, 1024)] and slab.free_bytes == 1024


def test_a_payload_that_does_not_fit_the_slab_travels_inline() -> None:
    slab = channel.Slab(64 * 1024 * 2)
    big = np.ones(300_000, dtype=np.uint8)
    frame, blocks = channel.pack({"k": "s"}, [big], slab=slab)
    assert blocks == [] and len(frame) > 300_000
    assert slab.overflow_bytes == 300_000  # counted: the front end reports it (perceiver_channel_overflow_bytes)
    assert np.array_equal(roundtrip([big], slab)[0], big)  # type: ignore[index]
    assert slab.overflow_bytes == 600_000
    channel.pack({"k": "s"}, [np.ones(1000, dtype=np.uint8)], slab=slab)  # small: inline by design, not counted
    channel.pack({"k": "s"}, [np.ones(100_000, dtype=np.uint8)], slab=slab)  # fits: through the slab
    assert slab.overflow_bytes == 600_000


def test_an_idle_slab_gives_its_pages_back_and_the_model_side_reads_new_payloads() -> None:
    """A memfd keeps a page once written, block freed or not: 10 MB of uploads would stay in the pod's memory.
    Wholly free again, the slab gives them back; in use, or unused since, it does nothing; the model process's
    read-only mapping then reads the next payloads as written."""
    slab = channel.Slab(32 * 2**20)
    model_side = mmap.mmap(slab.fd, slab.size, prot=mmap.PROT_READ)
    assert slab.resident_bytes == 0 and slab.release_pages() == 0
    upload = os.urandom(10_000_000)
    frame, blocks = channel.pack({"k": "s"}, [upload], slab=slab)
    assert slab.resident_bytes >= 10_000_000
    assert slab.release_pages() == 0  # a block is in use: nothing is touched
    for offset, length in blocks:
        slab.give(offset, length)
    assert slab.resident_bytes >= 10_000_000  # freed, still held
    assert slab.release_pages() >= 10_000_000
    assert slab.resident_bytes == 0 and slab.release_pages() == 0
    again = os.urandom(200_000)
    frame, blocks = channel.pack({"k": "s"}, [again], slab=slab)
    size, _ = channel.HEADER.unpack(frame[: channel.HEADER.size])
    assert channel.unpack(json.loads(frame[channel.HEADER.size : channel.HEADER.size + size]), b"", model_side) == [
        again
    ]


def test_a_front_end_releases_its_slab_only_after_an_idle_interval() -> None:
    """``release_idle_slab``: pages go back after an interval in which no payload was taken, not while one is
    in flight; it stops when the connection closes."""
    upload = os.urandom(1_000_000)

    async def run() -> list[int]:
        front, model = socket.socketpair()
        _, writer = await asyncio.open_unix_connection(sock=front)
        client = remote.ModelClient(
            Runtime(Settings(), Metrics()), channel.Slab(8 * 2**20), cast(Any, None), writer, cast(Any, None), None
        )
        request = client.submit(0, [upload], time.monotonic() + 10)
        releaser = asyncio.create_task(remote.release_idle_slab(client, idle_s=0.001))
        held = []
        for _ in range(20):  # intervals pass with the payload in flight
            await asyncio.sleep(0.002)
        held.append(client.slab.resident_bytes)
        for offset, length in request.blocks:  # its answer arrived
            client.slab.give(offset, length)
        for _ in range(5000):  # a bound, not a timing: it releases at the first idle interval
            if not client.slab.resident_bytes or releaser.done():
                break
            await asyncio.sleep(0.002)
        held.append(client.slab.resident_bytes)
        client.close("test over")
        await asyncio.wait_for(releaser, 10)
        model.close()
        return held

    in_flight, idle = asyncio.run(run())
    assert in_flight >= 1_000_000 and idle == 0


def test_a_front_end_counts_and_warns_when_its_slab_is_full(caplog: pytest.LogCaptureFixture) -> None:
    """Two 1.5 MB uploads through a front end whose slab holds 1 MiB: both reach the model side's reader whole,
    /metrics counts their bytes, and the operator is told once (a minute), not per request."""
    upload = os.urandom(1_500_000)

    async def send_two() -> list[object]:
        front, model = socket.socketpair()
        _, writer = await asyncio.open_unix_connection(sock=front)
        reader, model_writer = await asyncio.open_unix_connection(sock=model)
        client = remote.ModelClient(
            Runtime(Settings(), Metrics()), channel.Slab(1 << 20), cast(Any, None), writer, cast(Any, None), None
        )
        for _ in range(2):
            client.submit(0, [upload], time.monotonic() + 10)
        received = [channel.unpack(*await channel.read_frame(reader)) for _ in range(2)]
        writer.close()
        model_writer.close()
        metrics.append(client.runtime.metrics)
        return received

    metrics: list[Metrics] = []
    with caplog.at_level(logging.WARNING, logger="perceiver.frontend"):
        assert asyncio.run(send_two()) == [[upload], [upload]]
    assert metric(metrics[0].exposition().decode(), "perceiver_channel_overflow_bytes_total") == 3_000_000
    warnings = [r.getMessage() for r in caplog.records if "PERCEIVER_API_SLAB_MB" in r.getMessage()]
    assert len(warnings) == 1 and "PERCEIVER_API_SLAB_MB=1," in warnings[0]


def test_hand_shake_passes_the_shared_memory() -> None:
    left, right = socket.socketpair()
    slab = channel.Slab(4096)
    slab.map[:5] = b"hello"
    channel.send_hello(left, {"pid": os.getpid(), "slab": slab.size}, [slab.fd])
    message, (fd,) = channel.receive_hello(right)
    assert message["slab"] == 4096
    import mmap

    seen = mmap.mmap(fd, 4096, prot=mmap.PROT_READ)
    assert seen[:5] == b"hello"
    slab.map[:5] = b"again"
    assert seen[:5] == b"again"  # one memory, two processes' mappings
    os.close(fd)
    left.close()
    right.close()


def make_batcher(
    clock: list[float], per_unit: dict[int, float] | None = None, max_queue_delay_s: float = 2.0, lanes: int = 1
) -> Batcher[int, int]:
    """Batches of up to 4, at most 6 queued; ``per_unit``: seconds a unit by batch size (0.5 alone, 0.25 in 4);
    ``lanes``: on one executor thread, or on that many lanes."""
    return Batcher(
        lambda payloads, batch: list(payloads),
        __import__("concurrent.futures").futures.ThreadPoolExecutor(1) if lanes == 1 else Lanes(lanes),
        max_batch_size=4,
        max_delay_s=1.0,
        max_queue=6,
        max_queue_delay_s=max_queue_delay_s,
        service_time=ServiceTime(per_unit or {1: 0.5, 4: 0.25}),
        clock=lambda: clock[0],
    )


def test_the_door_decides_as_the_batcher_does() -> None:
    """For queues of every length, a running batch at every point of its course and deadlines near and far,
    the front end's door on the model process's snapshot refuses exactly what Batcher.admit refuses, with the
    same reason and Retry-After; the snapshot is read back through the shared table. Once the batch nears or
    passes its estimate, the model process takes it to run on (``left_s``) and the snapshot, aged, does not: the
    door may then admit what the model process refuses (the record is rewritten every heartbeat), never the
    reverse."""

    async def check() -> None:
        clock = [100.0]
        batcher = make_batcher(clock)
        table = channel.StateTable(1)
        view = channel.StateView(os.dup(table.fd), table.size)
        batcher._running[1] = (100.0, 1.0)  # every lane busy, a batch of 1 s expected, started at t=100
        compared = 0
        for queued in range(7):
            for elapsed in (0.0, 0.4, 0.9, 1.5):
                clock[0] = 100.0
                table.write(0, batcher.admission_state(), clock[0])
                clock[0] = 100.0 + elapsed  # the snapshot ages: the running batch's rest shrinks
                for budget in (0.5, 1.0, 2.0, 4.0, 30.0):
                    deadline = clock[0] + budget
                    try:
                        batcher.admit(deadline)
                        expected = None
                    except QueueFull as exc:
                        expected = (exc.reason, round(exc.retry_after_s, 6))
                    written, state = view.read(0)
                    why = channel.door(state, written, deadline, 6, 2.0, clock=lambda: clock[0])
                    got = None if why is None else (why[2], round(why[1], 6))
                    if elapsed * (1 + OVERRUN_SHARE) <= 1.0:  # the rest of its estimate, on both sides
                        assert got == expected, (queued, elapsed, budget)
                    else:
                        assert got is None or expected is not None, (queued, elapsed, budget)
                    compared += 1
            batcher.submit(queued, deadline=None, admit=False)
        assert compared == 7 * 4 * 5
        await batcher.stop()

    asyncio.run(check())


def test_a_reader_never_sees_half_a_record() -> None:
    table = channel.StateTable(2)
    view = channel.StateView(os.dup(table.fd), table.size)
    for i in range(200):
        state = AdmissionState(i % 2 == 0, i, True, float(i), float(i), float(i), margin=1.2 + i / 100)
        table.write(1, state, float(i))
        written, seen = view.read(1)
        assert seen == state and written == float(i)
    assert table.sequence[1] % 2 == 0


def test_a_record_caught_mid_write_answers_the_last_one_read() -> None:
    """A writer preempted between its two sequence bumps must not fail the door (it did: HTTP 500 under load
    on two cores): the reader answers the record it last read whole."""
    import struct

    table = channel.StateTable(1)
    view = channel.StateView(os.dup(table.fd), table.size)
    written, state = view.read(0)
    assert channel.door(state, written, None, 1, None) is None  # nothing written yet: admitted
    whole = AdmissionState(False, 3, True, 0.5, 1.5, 0.2)
    table.write(0, whole, 7.0)
    assert view.read(0) == (7.0, whole)
    struct.pack_into("<Q", table.map, 0, table.sequence[0] + 1)  # a writer stopped halfway
    assert view.read(0) == (7.0, whole)


def test_a_record_whose_stores_arrived_out_of_order_is_not_read() -> None:
    """On a weakly ordered CPU (ARM) a reader can see a write's sequence bump before its fields, or some fields of
    the next write under the last one's even sequence: no barrier orders Python's stores. Each mix of two whole
    records' bytes is refused by its checksum, and the reader answers the record it last read whole."""
    table = channel.StateTable(1)
    view = channel.StateView(os.dup(table.fd), table.size)
    first, second = AdmissionState(True, 1, True, 0.1, 0.2, 0.3), AdmissionState(False, 5, True, 2.0, 9.0, 1.0)
    table.write(0, first, 1.0)
    assert view.read(0) == (1.0, first)
    before = bytes(table.map[: channel.RECORD_SIZE])
    table.write(0, second, 2.0)
    after = bytes(table.map[: channel.RECORD_SIZE])
    size = channel.RECORD.size + channel.CHECK.size
    mixes = 0
    for cut in range(8, size, 4):  # every prefix of the new record over the old one, and the other way round
        for head, tail in ((after, before), (before, after)):
            torn = head[:cut] + tail[cut:size]
            if torn in (before[:size], after[:size]):
                continue
            table.map[:size] = torn
            assert view.read(0) == (1.0, first), cut
            mixes += 1
    assert mixes > 20
    table.map[: channel.RECORD_SIZE] = after  # the stores all arrived
    assert view.read(0) == (2.0, second)


@pytest.mark.parametrize("lanes", [1, 2])
def test_the_door_counts_every_front_ends_decodes_as_the_batcher_counts_its_own(lanes: int) -> None:
    """Uploads admitted and still decoding are work ahead of a new request: in one process ``Batcher.reserve``
    counts them; with front ends each counts its own in the shared decode counts, and every door adds their sum
    to the model process's record. With the same per-unit time at every batch size (1 s a unit here) the door
    refuses exactly what the batcher refuses, with the same reason and Retry-After, the decodes split between
    two front ends' slots. On two lanes, the decodes that leave a lane free cost no wait at either."""

    async def check() -> None:
        clock = [100.0]
        batcher = make_batcher(clock, per_unit={1: 1.0, 4: 1.0}, max_queue_delay_s=5.0, lanes=lanes)
        table = channel.StateTable(1)
        view = channel.StateView(os.dup(table.fd), table.size)
        counts = channel.Decoding(1, 4)
        fronts = [channel.Decoding(1, 4, os.dup(counts.fd)) for _ in range(2)]  # two front ends' mappings
        compared = refused = 0
        for queued in range(4):
            for decoding in range(5):
                table.write(0, batcher.admission_state(), clock[0])  # the model process decodes nothing
                releases = [batcher.reserve(1) for _ in range(decoding)]
                for unit in range(decoding):
                    fronts[unit % 2].add(0, unit % 2, 1)
                for budget in (0.5, 2.0, 4.0, 7.0, 30.0, None):
                    deadline = None if budget is None else clock[0] + budget
                    try:
                        batcher.admit(deadline)
                        expected = None
                    except QueueFull as exc:
                        expected = (exc.reason, round(exc.retry_after_s, 6), str(exc))
                    written, state = view.read(0)
                    why = channel.door(state, written, deadline, 6, 5.0, lambda: clock[0], fronts[1].total(0))
                    got = None if why is None else (why[2], round(why[1], 6), why[0])
                    assert got == expected, (queued, decoding, budget)
                    compared += 1
                    refused += expected is not None
                for release in releases:
                    release()
                for unit in range(decoding):
                    fronts[unit % 2].add(0, unit % 2, -1)
                assert counts.total(0) == 0
            batcher.submit(queued, deadline=None, admit=False)
        assert compared == 4 * 5 * 6 and 0 < refused < compared  # both answers were compared
        await batcher.stop()

    asyncio.run(check())


def test_an_idle_models_record_decays_with_the_heartbeat() -> None:
    """The records were written only as batches started and ended: an idle model's margin stayed as the last burst
    left it (2.5), and the front ends' doors refused on it where one process, decaying it, admitted on 1.75 after
    half a minute (review). The model process's heartbeat writes them again every second."""
    from app.loading import build_models
    from app.main import _load

    async def check() -> None:
        settings = Settings(demo_tasks=["classify-text"], warmup=False, api_processes=2)
        model_side = Runtime(settings, Metrics())
        await _load(model_side, build_models)
        server = model_process.ModelServer(model_side)
        view = channel.StateView(os.dup(server.table.fd), server.table.size)
        batcher = model_side.engine_for("classify-text").batcher
        clock = [time.monotonic()]  # the batcher's clock: no idle time passes but what the test says
        batcher._clock, batcher._idle_since = lambda: clock[0], clock[0]
        try:
            for _ in range(10):  # the burst before: requests took 2.5x their estimates
                batcher.lateness.observe(0.2, 0.4, 0.5, now=clock[0])
            server.publish()
            assert view.read(0)[1].margin == pytest.approx(2.5)
            clock[0] += 30.0  # idle for one half-life since
            beat = asyncio.create_task(server.beat())
            async with asyncio.timeout(60):  # guards against a hang; bounds nothing asserted
                while view.read(0)[1].margin == pytest.approx(2.5):
                    await asyncio.sleep(0.01)
            beat.cancel()
            assert view.read(0)[1].margin == pytest.approx(1.75, abs=0.01)
        finally:
            for engine in model_side.engines():
                await engine.stop()
            model_side.shutdown_executors()

    asyncio.run(check())


def test_a_front_ends_decodes_count_at_the_other_front_ends_door_until_released_or_gone(tmp_path: Any) -> None:
    """One model process and two front ends joined through the real hand-shake (in this process, over a Unix
    socket): uploads the first front end is decoding fill the model's queue at the second's door; a reservation
    released (once, however often its release is called) no longer counts, nor do those of a front end that has
    gone (its slot is cleared and given to the next one)."""
    from app import model_process
    from app.loading import build_models
    from app.main import _load

    async def eventually(condition: Any, what: str) -> None:
        async with asyncio.timeout(60):  # guards against a hang; bounds nothing asserted
            while not condition():
                await asyncio.sleep(0.01)

    async def check() -> None:
        settings = Settings(demo_tasks=["classify-text"], warmup=False, max_queue_size=2, api_processes=2)
        model_side = Runtime(settings, Metrics())
        await _load(model_side, build_models)
        assert model_side.load_error is None
        server = model_process.ModelServer(model_side)
        path = str(tmp_path / "model.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        listener.setblocking(False)
        acceptor = asyncio.create_task(server.accept(listener))
        fronts = [Runtime(settings, Metrics()) for _ in range(3)]
        joins = [asyncio.create_task(remote.connect(front, path)) for front in fronts[:2]]
        await eventually(lambda: all(front.ready for front in fronts[:2]), "both front ends joined")
        first, second = (front.engine_for("classify-text", None) for front in fronts[:2])
        deadline = time.monotonic() + 600
        try:
            assert second.refusal(deadline) is None  # idle
            release = first.reserve(2)
            refusal = second.refusal(deadline)
            assert refusal is not None and "queue holds 2 requests (max_queue_size 2)" in refusal.message
            assert first.refusal(deadline) is not None
            release()
            release()  # once only: a second call must not count the units out again
            assert second.refusal(deadline) is None and server.decoding.total(0) == 0
            second.reserve(1)
            assert second.refusal(deadline) is None  # one decoding, queue bound 2
            first.reserve(1)
            assert second.refusal(deadline) is not None
            joins[0].cancel()  # the first front end goes with its reservation unreleased
            await eventually(lambda: second.refusal(deadline) is None, "the gone front end's decodes not counted")
            assert server.decoding.total(0) == 1  # the second's own still counts
            joins.append(asyncio.create_task(remote.connect(fronts[2], path)))
            await eventually(lambda: fronts[2].ready, "a third front end joined in the freed slot")
            assert fronts[2].engine_for("classify-text", None).refusal(deadline) is None
        finally:
            for job in [acceptor, *joins, *server.connections]:
                job.cancel()
            await asyncio.gather(acceptor, *joins, *server.connections, return_exceptions=True)
            listener.close()
            for engine in model_side.engines():
                await engine.stop()
            model_side.shutdown_executors()

    asyncio.run(check())


def _model_server() -> model_process.ModelServer:
    return model_process.ModelServer(Runtime(Settings(demo_tasks=["classify-text"]), Metrics()))


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _slab() -> int:
    fd = os.memfd_create("test-slab")
    os.ftruncate(fd, 4096)
    return fd


def test_a_hand_shake_cut_short_by_the_model_process_stopping_leaves_nothing_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model process, stopping, cancels its connections; one in its hand-shake left its socket open (a busy CI
    run caught it), its decode slot taken, the front end's slab mapped; and the thread reading a hello that never
    came held the process's exit for the hello's timeout (30 s), as closing a socket does not wake a thread
    reading it (review)."""
    sending, go = threading.Event(), threading.Event()
    real_send = channel.send_hello

    def send(sock: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
        sending.set()
        go.wait(10)
        real_send(sock, message, fds)

    monkeypatch.setattr(channel, "send_hello", send)

    async def check() -> None:
        loop = asyncio.get_running_loop()
        server = _model_server()
        slots = list(server.free_slots)
        before = _open_fds()
        # cancelled as it answers the hello: its slot taken, the slab mapped
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        slab = _slab()
        real_send(theirs, {"pid": 1, "slab": 4096}, [slab])
        os.close(slab)
        joining = asyncio.create_task(server.front_end(ours))
        await loop.run_in_executor(None, sending.wait, 10)
        joining.cancel()
        with pytest.raises(asyncio.CancelledError):
            await joining
        go.set()
        assert ours.fileno() == -1 and sorted(server.free_slots) == slots
        theirs.close()
        # cancelled while the peer has not sent its hello: the thread reading it ends at once
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        joining = asyncio.create_task(server.front_end(ours))
        await asyncio.sleep(0)  # its first step: waiting, on a thread, for a hello that never comes
        joining.cancel()
        with pytest.raises(asyncio.CancelledError):
            await joining
        async with asyncio.timeout(5):  # guards against a hang (the hello's timeout is 30 s); bounds nothing
            await loop.shutdown_default_executor()
        theirs.close()
        # cancelled before its first step, as ``accept`` hands it over: closed by the task's callback
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        server._unstarted.add(ours)
        joining = asyncio.create_task(server.front_end(ours))
        joining.add_done_callback(functools.partial(server._close_unstarted, ours))
        joining.cancel()
        with pytest.raises(asyncio.CancelledError):
            await joining
        theirs.close()
        assert ours.fileno() == -1 and not server._unstarted
        assert _open_fds() <= before

    asyncio.run(check())


def test_a_hello_received_as_its_hand_shake_is_cancelled_leaves_no_descriptor_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cancelled after the hello had come on its thread, before the hand-shake resumed: the front end's slab
    descriptor that came with it was never closed (review)."""
    received, go = threading.Event(), threading.Event()
    real_receive = channel.receive_hello

    def receive(sock: socket.socket, count: int = 1) -> tuple[dict[str, Any], list[int]]:
        hello = real_receive(sock, count)
        received.set()
        go.wait(10)
        return hello

    monkeypatch.setattr(channel, "receive_hello", receive)

    async def check() -> None:
        loop = asyncio.get_running_loop()
        server = _model_server()
        before = _open_fds()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        slab = _slab()
        channel.send_hello(theirs, {"pid": 1, "slab": 4096}, [slab])
        os.close(slab)
        joining = asyncio.create_task(server.front_end(ours))
        await loop.run_in_executor(None, received.wait, 10)  # the hello and its descriptor are in
        joining.cancel()
        with pytest.raises(asyncio.CancelledError):
            await joining
        go.set()
        await loop.shutdown_default_executor()
        await asyncio.sleep(0)  # the received hello's callback
        theirs.close()
        assert _open_fds() <= before

    asyncio.run(check())


@pytest.mark.parametrize("tail", ["cut short", "not JSON"])
def test_a_broken_hello_leaves_no_descriptor_open(tail: str) -> None:
    """A hello whose header was cut short or whose body was not JSON failed after its descriptor had come, and
    the descriptor stayed open: one a connection, from any local process that can reach the model socket
    (review)."""

    async def check() -> None:
        server = _model_server()
        before = _open_fds()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        slab = _slab()
        body = b"{not json"
        socket.send_fds(theirs, [channel.HELLO.pack(len(body)) + body if tail == "not JSON" else b"\x00"], [slab])
        theirs.shutdown(socket.SHUT_WR)
        os.close(slab)
        await server.front_end(ours)  # fails, logs the failed hand-shake, returns
        theirs.close()
        assert _open_fds() <= before and ours.fileno() == -1

    asyncio.run(check())

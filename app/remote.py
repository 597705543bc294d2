"""A front-end process's engines (PERCEIVER_API_PROCESSES >= 1, docs/front-ends.md): proxies for the model
process's, which routes, /v2, gRPC and the door use as they use a local ``Engine``.

``refusal`` reads the model's record in the admission table (shared memory; no round trip). ``submit`` writes
the payloads into this process's slab and sends one message; ``wait`` awaits the answer, and a request that
ends first (deadline, disconnect) sends a cancel, which the model process turns into ``Ticket.cancel``: its
batcher drops the work or its forward pass skips it. The timings of the answer (queued, forward pass, batch
size) come back with it, so responses, traces and statistics carry the model process's figures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from perceiver_core import PerceiverConfig

from . import channel, memory
from .batching import QueueFull
from .engine import BatchPolicy, Engine, RequestTiming, Statistics
from .errors import DeadlineExceeded, InternalError, NotReady, Overloaded, ServiceError
from .runtime import Runtime
from .tasks import TASKS

log = logging.getLogger("perceiver.frontend")
CONNECT_RETRY_S = 0.05
CONNECT_REFUSED_S = 5.0  # a socket that refuses this long has no model process behind it
OVERFLOW_WARNING_S = 60.0  # at most one "slab full" warning a minute per front end
# A model process whose heartbeat is older than this is stuck: liveness and readiness fail, requests get 503, and
# a question to it (statistics, a description) gives up. The heartbeat comes every second (model_process.py).
MODEL_STALL_S = 10.0


@dataclass(frozen=True)
class ModelInfo:
    """What a front end knows of a model: its config (for decoding) and its device."""

    config: PerceiverConfig
    device: torch.device


@dataclass(eq=False)
class Request:
    client: ModelClient
    rid: int
    future: asyncio.Future[dict[str, Any]]
    payloads: Sequence[Any]
    blocks: list[tuple[int, int]]
    cancelled: bool = False

    def cancel(self) -> None:
        if not self.future.done() and not self.cancelled:
            self.cancelled = True
            self.client.send({"k": "c", "i": self.rid})


@dataclass(eq=False)
class RemoteTicket:
    """What a route sees of one item: Ticket's timings, filled in from the model process's answer."""

    request: Request
    units: int
    enqueued_at: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0
    batch_size: int = 0

    def cancel(self) -> None:
        self.request.cancel()


@dataclass
class ModelClient:
    """This front end's connection to the model process."""

    runtime: Runtime
    slab: channel.Slab
    table: channel.StateView
    writer: asyncio.StreamWriter
    decoding: channel.Decoding
    slot: int | None  # this front end's counts in ``decoding`` (None: every slot was taken, its decodes uncounted)
    requests: dict[int, Request] = field(default_factory=dict)
    queries: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    closed: bool = False
    overflow_warned_at: float | None = None

    def send(self, message: dict[str, Any], values: Any = None) -> None:
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(channel.pack(message, values)[0])

    def submit(self, index: int, payloads: Sequence[Any], deadline: float) -> Request:
        if self.closed:
            raise NotReady("the model process has exited; retry shortly", {"Retry-After": "1"})
        rid = next(self.ids)
        overflowed = self.slab.overflow_bytes
        frame, blocks = channel.pack({"k": "s", "i": rid, "m": index, "d": deadline}, list(payloads), slab=self.slab)
        if self.slab.overflow_bytes > overflowed:
            self.overflowed(self.slab.overflow_bytes - overflowed)
        request = Request(self, rid, asyncio.get_running_loop().create_future(), payloads, blocks)
        self.requests[rid] = request
        self.writer.write(frame)
        return request

    def overflowed(self, nbytes: int) -> None:
        """Payload bytes that found no room in the slab (full, or smaller than the payload) and went through the
        socket: counted, and said at most once a minute (the model process copies them out of its socket buffer
        under its GIL, some copies more each)."""
        self.runtime.metrics.channel_overflow.inc(nbytes)
        now = time.monotonic()
        if self.overflow_warned_at is None or now - self.overflow_warned_at >= OVERFLOW_WARNING_S:
            self.overflow_warned_at = now
            log.warning(
                "a %.1f MiB request found no room in this front end's shared memory (PERCEIVER_API_SLAB_MB=%d, "
                "%d MiB in use): payloads that do not fit go through the socket, which costs the model process "
                "copies; raise PERCEIVER_API_SLAB_MB (perceiver_channel_overflow_bytes_total counts them)",
                nbytes / 2**20,
                self.slab.size >> 20,
                (self.slab.size - self.slab.free_bytes) >> 20,
            )

    async def ask(self, index: int, what: str) -> Any:
        if self.closed:
            raise NotReady("the model process has exited; retry shortly", {"Retry-After": "1"})
        qid = next(self.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queries[qid] = future
        self.send({"k": "q", "i": qid, "m": index, "w": what})
        try:
            async with asyncio.timeout(MODEL_STALL_S):
                answer = await future
        except TimeoutError:
            self.queries.pop(qid, None)
            raise NotReady(
                f"the model process did not answer within {MODEL_STALL_S:g} s; retry shortly", {"Retry-After": "1"}
            ) from None
        if isinstance(answer.get("e"), ServiceError):
            raise answer["e"]
        return answer["r"]

    async def read(self, reader: asyncio.StreamReader) -> None:
        """Answers, until the model process closes the connection."""
        try:
            while True:
                message, tail = await channel.read_frame(reader)
                try:
                    self.answer(message, tail)
                except Exception:  # one answer that cannot be read fails its own request only
                    log.exception("an answer from the model process could not be read")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except ValueError:
            log.exception("the model process sent a broken frame; closing the connection")
        finally:
            self.close("the model process has exited")

    def unresponsive(self) -> str | None:
        """Why the model process looks stuck (its heartbeat is older than MODEL_STALL_S), else None."""
        beat = self.table.heartbeat()
        age = time.monotonic() - beat
        if self.closed or not beat or age <= MODEL_STALL_S:
            return None
        return f"the model process has not run for {age:.0f} s"

    def answer(self, head: dict[str, Any], tail: bytes) -> None:
        if head.get("k") == "q":
            future = self.queries.pop(head["i"], None)
            if future is None or future.done():
                return
            try:
                values = channel.unpack(head, tail)
            except Exception as exc:
                future.set_exception(InternalError(f"the model process's answer could not be read ({exc})"))
                raise
            future.set_result(values)
            return
        request = self.requests.pop(head["i"], None)
        if request is None:
            return
        for offset, length in request.blocks:  # the model process copied them out on receipt
            self.slab.give(offset, length)
        try:
            values = channel.unpack(head, tail, known=list(request.payloads))
        except Exception:
            log.exception("an answer that could not be read")
            values = {"e": InternalError("the model process's answer could not be read")}
        if not request.future.done():
            request.future.set_result(values)

    def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.runtime.ready = False  # every readiness check (/readyz, /v2/health/ready, gRPC health) turns off
        if not self.runtime.draining:
            log.error("%s; failing %d requests in flight", why, len(self.requests))
            self.runtime.load_error = why  # readiness reports it; the supervisor takes the group down
        error = NotReady(f"{why}; retry shortly", {"Retry-After": "1"})
        for request in self.requests.values():
            if not request.future.done():
                request.future.set_result({"e": error})
        self.requests.clear()
        for future in self.queries.values():
            if not future.done():
                future.set_exception(error)
        self.queries.clear()
        self.writer.close()


@dataclass(frozen=True)
class RemoteEngine(Engine):
    """An engine of the model process, as a front end uses it."""

    client: ModelClient | None = None
    index: int = 0
    max_queue: int = 256
    max_queue_delay_s: float | None = None

    def _client(self) -> ModelClient:
        assert self.client is not None
        return self.client

    def reserve(self, units: int) -> Callable[[], None]:
        """As ``Batcher.reserve`` in one process: counted in this front end's slot of the shared decode counts,
        which every front end's door adds to the model process's record (docs/front-ends.md)."""
        client = self._client()
        slot = client.slot
        if slot is None:
            return _nothing
        client.decoding.add(self.index, slot, units)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                client.decoding.add(self.index, slot, -units)

        return release

    def refusal(self, deadline: float) -> Overloaded | None:
        client = self._client()
        written, state = client.table.read(self.index)
        decoding = client.decoding.total(self.index)
        why = channel.door(state, written, deadline, self.max_queue, self.max_queue_delay_s, decoding=decoding)
        return None if why is None else self.overloaded(QueueFull(*why))

    def submit(self, payloads: Sequence[Any], deadline: float) -> list[Any]:
        self.admit(deadline)
        request = self._client().submit(self.index, payloads, deadline)
        return [RemoteTicket(request, self.task.units(p)) for p in payloads]

    async def wait(self, tickets: list[Any], deadline: float) -> list[Any]:
        request: Request = tickets[0].request
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                answer = await asyncio.shield(request.future)
        except TimeoutError as exc:
            raise DeadlineExceeded("the request did not finish before its deadline") from exc
        finally:
            request.cancel()  # no-op once answered
        error = answer.get("e")
        if isinstance(error, ServiceError):
            raise error
        if error is not None:
            raise InternalError("the model process failed this request")
        for ticket, (enqueued_at, queue_s, inference_s, batch_size) in zip(tickets, answer["t"], strict=True):
            ticket.enqueued_at, ticket.queue_s, ticket.inference_s = enqueued_at, queue_s, inference_s
            ticket.batch_size = batch_size
        return cast(list[Any], answer["r"])

    @property
    def idle(self) -> bool:
        return not self._client().requests

    async def stop(self) -> None:
        pass

    def account(self, ok: bool, total_s: float, timing: RequestTiming | None) -> None:
        x = None if timing is None else [timing.input_s, timing.queue_s, timing.infer_s, timing.output_s]
        self._client().send({"k": "a", "m": self.index, "ok": ok, "t": total_s, "x": x})

    async def statistics_now(self) -> Statistics:
        return cast(Statistics, await self._client().ask(self.index, "stats"))

    def describe(self) -> dict[str, Any]:
        raise RuntimeError("a front end describes a model with describe_now() (the model process knows its state)")

    async def describe_now(self) -> dict[str, Any]:
        return cast(dict[str, Any], await self._client().ask(self.index, "describe"))


def _handshake(path: str, slab: channel.Slab) -> tuple[socket.socket, dict[str, Any], list[int]]:
    """Connect (the model process may still be starting), give it the slab, and wait for its hello: sent once
    its models are loaded and warm. A socket that refuses connections belongs to a model process that has
    exited: that is an error after a few tries, not a reason to wait."""
    refused = 0
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            break
        except FileNotFoundError:  # not bound yet
            sock.close()
        except ConnectionRefusedError:
            sock.close()
            refused += 1
            if refused * CONNECT_RETRY_S > CONNECT_REFUSED_S:
                raise
        time.sleep(CONNECT_RETRY_S)
    channel.send_hello(sock, {"pid": os.getpid(), "slab": slab.size}, [slab.fd])
    hello, fds = channel.receive_hello(sock, 2)
    return sock, hello, fds


async def release_idle_slab(client: ModelClient, idle_s: float = memory.IDLE_TRIM_S) -> None:
    """Until the connection closes: each time a whole ``idle_s`` passes with no payload taken, the slab's pages go
    back to the kernel (``Slab.release_pages``), so a burst of large uploads does not keep its memory for the
    life of the pod (docs/front-ends.md)."""
    slab = client.slab
    while not client.closed:
        takes = slab.takes
        await asyncio.sleep(idle_s)
        if slab.takes == takes and (released := slab.release_pages()):
            log.info("this front end's idle shared memory went back to the kernel (%.0f MiB)", released / 2**20)


async def _in_daemon_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a daemon thread: a hand-shake that waits for a model process still loading must not keep
    this process from exiting (an executor's threads are joined at exit)."""
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as exc:  # handed to the awaiting task
            done.set_exception(exc)

    threading.Thread(target=run, name="model-handshake", daemon=True).start()
    return await asyncio.wrap_future(done)


async def connect(runtime: Runtime, path: str) -> None:
    """Join the model process at ``path``, add its engines to ``runtime`` and read its answers until it closes
    the connection (or this task is cancelled, at shutdown)."""
    settings = runtime.settings
    try:  # a failure is the load error /readyz and the supervisor see: a front end never hangs unready, silent
        slab = channel.Slab(settings.api_slab_mb * 2**20)
        sock, hello, (table_fd, decoding_fd) = await _in_daemon_thread(_handshake, path, slab)
    except Exception as exc:
        if runtime.draining:  # stopped before the model process was ready: it stops too, and closed on us
            log.info("stopped before the model process was ready (%s)", type(exc).__name__)
            return
        from .model_process import load_error

        failed = load_error(path)
        if failed is not None:  # it closed on us because its models failed to load: say that, not the reset
            runtime.load_error = f"the model process could not load the models: {failed}"
        else:
            runtime.load_error = f"could not join the model process: {type(exc).__name__}: {exc}"
        log.error("%s", runtime.load_error)
        return
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    engines = hello["engines"]
    decoding = channel.Decoding(len(engines), int(hello["decoding"]["slots"]), decoding_fd)
    table = channel.StateView(table_fd, int(hello["table"]))
    client = ModelClient(runtime, slab, table, writer, decoding, hello["decoding"]["slot"])
    runtime.unresponsive = client.unresponsive
    decoder = channel.Decoder([])
    for index, spec in enumerate(engines):
        task = TASKS[spec["task"]]
        config = decoder.value(spec["config"])
        policy = spec["policy"]
        engine = RemoteEngine(
            task=task,
            variant=spec["variant"],
            model=cast(Any, ModelInfo(config, torch.device(spec["device"]))),
            source=spec["source"],
            weights=spec["weights"],
            dtype=spec["dtype"],
            policy=BatchPolicy(
                policy["max_batch_size"],
                policy["source"],
                policy["max_delay_ms"],
                policy["max_batch_cost"],
                {int(k): v for k, v in policy["per_item_ms"].items()},
            ),
            placement=spec["placement"],
            batcher=cast(Any, None),
            metrics=runtime.metrics,
            load_s=spec["load_s"],
            warmup_s=spec["warmup_s"],
            client=client,
            index=index,
            max_queue=spec["max_queue"],
            max_queue_delay_s=spec["max_queue_delay_s"],
        )
        runtime.add(engine)
    from .main import freeze_startup_heap

    freeze_startup_heap()  # as the model process does after loading: full collections skip the start-up heap
    runtime.ready = True
    log.info("joined the model process: %s", ", ".join(e.name for e in runtime.engines()))
    releaser = asyncio.create_task(release_idle_slab(client))
    try:
        await client.read(reader)
    finally:
        releaser.cancel()
        client.close("the connection to the model process closed")


def _nothing() -> None:
    pass

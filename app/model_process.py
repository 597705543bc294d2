"""The model process of PERCEIVER_API_PROCESSES >= 1 (docs/front-ends.md): every model, its batcher and its
device, without HTTP. Front-end processes connect to its Unix socket, hand it the payloads they decoded, and
send back what it answers; it refuses, batches, runs and times exactly as the single process does
(``Engine.submit`` and ``Engine.wait``), so batches fill from every front end.

After every change of a batcher's state it rewrites that model's record in the admission table (shared
memory, app/channel.py): the front ends' doors refuse from it without asking. SIGTERM (sent by the supervisor
to every process at once) exits once the front ends have drained and gone, within ``drain_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mmap
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import channel, memory
from .engine import Engine, RequestTiming
from .errors import InternalError, ServiceError
from .loading import build_models
from .metrics import Metrics
from .runtime import Runtime
from .settings import Settings
from .tasks.base import Task

# Past the drain timeout, how long the model process still serves the front ends: they cut their requests at the
# drain timeout (a JSON 503 each, within uvicorn's last second) and then close; stopping first turned the answers
# they still waited for into 499s.
FRONT_ENDS_LAST_S = 3.0
HEARTBEAT_S = 1.0  # how often the event loop notes in the admission table that it runs (front ends watch it)

log = logging.getLogger("perceiver.model")
HELLO_TIMEOUT_S = 30.0


def describe_engine(engine: Engine) -> dict[str, Any]:
    """What a front end needs of an engine to build its proxy (JSON, with the config through the codec)."""
    policy = engine.policy
    return {
        "task": engine.task.name,
        "variant": engine.variant,
        "config": channel.Encoder().value(engine.model.config),
        "source": engine.source,
        "weights": engine.weights,
        "dtype": engine.dtype,
        "device": engine.device,
        "policy": {
            "max_batch_size": policy.max_batch_size,
            "source": policy.source,
            "max_delay_ms": policy.max_delay_ms,
            "max_batch_cost": policy.max_batch_cost,
            "per_item_ms": {str(k): v for k, v in policy.per_item_ms.items()},
        },
        "placement": engine.placement,
        "load_s": engine.load_s,
        "warmup_s": engine.warmup_s,
        "max_queue": engine.batcher.max_queue,
        "max_queue_delay_s": engine.batcher.max_queue_delay_s,
    }


@dataclass
class Link:
    """One front end's connection, as the model process keeps it."""

    slab: mmap.mmap
    writer: asyncio.StreamWriter
    tickets: dict[int, list[Any]] = field(default_factory=dict)  # request id → its tickets, until answered
    jobs: set[asyncio.Task[None]] = field(default_factory=set)


def _close_received(received: asyncio.Future[tuple[dict[str, Any], list[int]]]) -> None:
    """A hello received after its hand-shake was cancelled: the descriptors that came with it are nobody's."""
    if not received.cancelled() and received.exception() is None:
        for fd in received.result()[1]:
            os.close(fd)


class ModelServer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.engines = runtime.engines()
        self.table = channel.StateTable(len(self.engines))
        # a slot per front end, twice as many as the supervisor starts: one that restarts may join before the
        # model process has seen its predecessor's connection close
        slots = 2 * max(1, runtime.settings.front_end_processes())
        self.decoding = channel.Decoding(len(self.engines), slots)
        self.free_slots = list(range(slots))
        self.connections: set[asyncio.Task[None]] = set()
        self._unstarted: set[socket.socket] = set()  # accepted, their ``front_end`` not begun
        self.pending = 0  # requests submitted and not yet answered, over every front end
        for engine in self.engines:
            engine.batcher.on_change = self.publish
        self.publish()

    async def beat(self) -> None:
        """The heartbeat the front ends' liveness reads: a model process whose event loop is stuck (a deadlock, a
        SIGSTOP) stops it, and they report it (one process, the same hang stopped /healthz itself)."""
        while True:
            self.table.beat(time.monotonic())
            # The records too: written only as batches start and end, they kept an idle model's estimates and
            # margin as the last burst left them, and the doors refused on a margin one process had decayed (review).
            self.publish()
            await asyncio.sleep(HEARTBEAT_S)

    def publish(self) -> None:
        """Every engine's record: a change of one batcher can change another's (CPU models share the lanes)."""
        now = time.monotonic()
        for index, engine in enumerate(self.engines):
            self.table.write(index, engine.batcher.admission_state(), now)

    def hello(self, slot: int | None) -> dict[str, Any]:
        return {
            "engines": [describe_engine(e) for e in self.engines],
            "table": self.table.size,
            "decoding": {"slots": self.decoding.slots, "slot": slot},
        }

    async def accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            self._unstarted.add(conn)
            task = asyncio.create_task(self.front_end(conn))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)
            task.add_done_callback(functools.partial(self._close_unstarted, conn))

    def _close_unstarted(self, conn: socket.socket, task: asyncio.Task[None]) -> None:
        """A connection whose task was cancelled before its first step: ``front_end`` never ran to close it (it
        closes it otherwise; a socket it handed to a transport is the transport's to close, review)."""
        if conn in self._unstarted:
            self._unstarted.discard(conn)
            conn.close()

    async def front_end(self, conn: socket.socket) -> None:
        """One front end's connection: hand-shake (its slab for ours), then its messages until it closes."""
        self._unstarted.discard(conn)
        loop = asyncio.get_running_loop()
        conn.setblocking(True)
        conn.settimeout(HELLO_TIMEOUT_S)  # a peer that never sends its hello does not hold a thread for ever
        slab: mmap.mmap | None = None
        slot: int | None = None
        try:
            received = loop.run_in_executor(None, channel.receive_hello, conn)
            try:
                hello, (slab_fd,) = await asyncio.shield(received)
            except asyncio.CancelledError:  # the hello may still come, with a descriptor: closed then (review)
                received.add_done_callback(_close_received)
                raise
            try:
                slab = mmap.mmap(slab_fd, int(hello["slab"]), prot=mmap.PROT_READ)
            finally:
                os.close(slab_fd)
            slot = self.free_slots.pop(0) if self.free_slots else None
            if slot is None:
                log.warning(
                    "front end %s joined with every decode slot taken: its decodes go uncounted", hello.get("pid")
                )
            fds = [self.table.fd, self.decoding.fd]
            await loop.run_in_executor(None, channel.send_hello, conn, self.hello(slot), fds)
            conn.settimeout(None)
            conn.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=conn)
        except BaseException as exc:  # failed, or cancelled (the model process stopping): nothing is left open
            if slab is not None:
                slab.close()
            self.release_slot(slot)
            with contextlib.suppress(OSError):  # wakes the thread still reading the hello (close does not; review)
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
            if not isinstance(exc, OSError | ValueError | KeyError):
                raise
            log.warning("a front end's hand-shake failed: %s", exc)
            return
        log.info("front end %s connected", hello.get("pid"))
        link = Link(slab, writer)
        tickets, jobs = link.tickets, link.jobs
        try:
            while True:
                message, tail = await channel.read_frame(reader)
                self.handle(message, tail, link)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except ValueError as exc:  # a frame no front end of ours writes: the stream cannot be trusted
            log.error("front end %s sent a broken frame (%s); closing its connection", hello.get("pid"), exc)
        finally:
            for queued in tickets.values():  # the front end is gone: nobody waits for these
                for ticket in queued:
                    ticket.cancel()
            if jobs:
                await asyncio.gather(*jobs, return_exceptions=True)
            writer.close()
            slab.close()
            self.release_slot(slot)
            log.info("front end %s disconnected", hello.get("pid"))

    def release_slot(self, slot: int | None) -> None:
        """A front end has gone: the uploads it was decoding will never be queued, and its slot is free again."""
        if slot is not None:
            self.decoding.clear(slot)
            self.free_slots.append(slot)

    def handle(self, message: dict[str, Any], tail: bytes, link: Link) -> None:
        """One message. A message that fails is answered (when it asked something) and fails alone: the
        connection, and every other request on it, carries on."""
        kind, rid = message.get("k"), message.get("i")
        try:
            self.dispatch(kind, rid, message, tail, link)
        except Exception:
            log.exception("a front end's %r message failed", kind)
            if kind in ("s", "q") and isinstance(rid, int) and rid not in link.tickets:
                error = InternalError("internal error in the model process")
                link.writer.write(channel.pack({"k": "r" if kind == "s" else "q", "i": rid}, {"e": error})[0])

    def dispatch(self, kind: Any, rid: Any, message: dict[str, Any], tail: bytes, link: Link) -> None:
        writer, tickets = link.writer, link.tickets
        if kind == "c":
            for ticket in tickets.get(rid, ()):
                ticket.cancel()
            return
        values = channel.unpack(message, tail, link.slab)
        if kind == "s":
            engine, deadline = self.engines[message["m"]], float(message["d"])
            try:
                submitted = engine.submit(values, deadline)
            except ServiceError as exc:  # the authoritative admission: the door's snapshot may be a batch old
                writer.write(channel.pack({"k": "r", "i": rid}, {"e": exc})[0])
                return
            tickets[rid] = submitted
            self.pending += 1
            job = asyncio.create_task(self.finish(rid, engine, submitted, deadline, values, link))
            link.jobs.add(job)
            job.add_done_callback(link.jobs.discard)
        elif kind == "a":
            engine = self.engines[message["m"]]
            timing = message.get("x")
            engine.account(bool(message["ok"]), float(message["t"]), RequestTiming(*timing) if timing else None)
        elif kind == "q":
            engine = self.engines[message["m"]]
            answer = engine.statistics if message["w"] == "stats" else engine.describe()
            writer.write(channel.pack({"k": "q", "i": rid}, {"r": answer})[0])

    async def finish(
        self,
        rid: int,
        engine: Engine,
        submitted: list[Any],
        deadline: float,
        payloads: list[Any],
        link: Link,
    ) -> None:
        answer: dict[str, Any]
        try:
            results = await engine.wait(submitted, deadline)
            answer = {
                "r": wire_results(engine.task, results),
                "t": [[t.enqueued_at, t.queue_s, t.inference_s, t.batch_size] for t in submitted],
            }
        except ServiceError as exc:
            answer = {"e": exc}
        except Exception:
            log.exception("request %d failed", rid)
            answer = {"e": InternalError("internal error in the model process")}
        finally:
            link.tickets.pop(rid, None)
            self.pending -= 1
        known = {id(p): i for i, p in enumerate(payloads)}
        try:
            if engine.task.encode_offloaded and "r" in answer:  # flow fields, reconstructions: off the loop
                frame, _ = await asyncio.to_thread(channel.pack, {"k": "r", "i": rid}, answer, known=known)
            else:
                frame, _ = channel.pack({"k": "r", "i": rid}, answer, known=known)
        except Exception:
            log.exception("an answer the channel cannot carry")
            frame, _ = channel.pack({"k": "r", "i": rid}, {"e": InternalError("internal error in the model process")})
        if not link.writer.is_closing():
            link.writer.write(frame)


def wire_results(task: Task[Any, Any, Any], results: list[Any]) -> list[Any]:
    """A task's results as the channel carries them: handed to json whole where the task's are plain JSON (a
    fill-mask answer can be 65,000 small dicts, which walking cost the event loop three times the encoding)."""
    if not task.json_results:
        return results
    return [channel.PlainJson(r) if isinstance(r, (dict, list)) else r for r in results]


def load_error_path(path: str) -> str:
    """Where a model process that could not load its models leaves why, beside its socket ``path``."""
    return path + ".load-error"


def load_error(path: str) -> str | None:
    """What the model process at ``path`` left there when its models failed to load, if it did."""
    try:
        with open(load_error_path(path)) as found:
            return found.read()
    except OSError:
        return None


async def _close(runtime: Runtime, listener: socket.socket, unwatch_gc: Callable[[], None]) -> None:
    """The model process's last steps, whenever it stops: no more front ends, every batcher stopped, the
    executors' threads ended, the collector's watch removed."""
    listener.close()
    for engine in runtime.engines():
        await engine.stop()
    unwatch_gc()
    runtime.shutdown_executors()


async def serve(settings: Settings, path: str) -> int:
    """Load the models, then serve front ends on the Unix socket ``path`` until SIGTERM; the exit code."""
    runtime = Runtime(settings, Metrics())
    unwatch_gc = runtime.metrics.watch_gc()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # before loading: front ends connect at once and wait in the backlog
    listener.listen(256)
    listener.setblocking(False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from .main import _load, keep_memory

    loading = asyncio.create_task(_load(runtime, build_models))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():  # stopped while loading, as one process is: between two steps, not after them all
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
        await _close(runtime, listener, unwatch_gc)
        log.info("model process stopped while loading")
        return 0
    stopping.cancel()
    if runtime.load_error is not None:
        with contextlib.suppress(OSError), open(load_error_path(path), "w") as out:  # for the front ends (their
            out.write(runtime.load_error)  # /readyz) and the supervisor to say
        await _close(runtime, listener, unwatch_gc)
        return 1
    server = ModelServer(runtime)
    acceptor = asyncio.create_task(server.accept(listener))
    beating = asyncio.create_task(server.beat())
    keeper = asyncio.create_task(keep_memory(runtime, memory.MemoryKeeper()))
    log.info("model process %d ready: %d models on %s", os.getpid(), len(server.engines), path)
    await stop.wait()
    runtime.begin_drain()
    started = time.monotonic()
    # The supervisor signals every process at once (as Ctrl-C in a terminal or a whole cgroup would): serve the
    # front ends until they have finished what they accepted and gone, within the one drain timeout.
    while server.pending or server.connections or not runtime.idle():
        if time.monotonic() - started > settings.drain_timeout_s + FRONT_ENDS_LAST_S:
            log.warning("drain timeout with %d requests in flight", server.pending)
            break
        await asyncio.sleep(0.02)
    acceptor.cancel()
    keeper.cancel()
    for job in [acceptor, keeper, beating, *server.connections]:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
    await _close(runtime, listener, unwatch_gc)
    log.info("model process drained in %.2fs; exiting", time.monotonic() - started)
    return 0

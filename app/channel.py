"""The channel between front-end processes and the model process (PERCEIVER_API_PROCESSES, docs/front-ends.md).

Messages are framed on a Unix stream socket: an 8-byte header (the JSON part's length, the inline bytes'
length), a JSON object, then inline bytes. Arrays, tensors and bytes inside a message's values are not put in
its JSON: large ones are written into the sender's shared-memory slab (a memfd each front end creates and
hands to the model process once, with SCM_RIGHTS) and the message names the slot; small ones ride as inline
bytes. Nothing is unpickled: values are JSON, buffers, and instances of this project's own dataclasses and
error kinds, rebuilt field by field from an allow-list (``app.*`` and ``perceiver_core.*`` dataclasses already
imported, ``app.errors`` kinds).

The door's admission snapshot is a small table in shared memory that the model process writes after every
change of a batcher's state, so a front end refuses at the door without a round trip. It is a seqlock (the
sequence number is odd while a record is being written) whose records also carry a CRC-32 of their bytes,
sequence included: Python has no memory barriers, and a weakly ordered CPU (ARM: Graviton, Grace) may make
another core see a record's stores in any order. A reader copies a record once and accepts the copy only when
its sequence is even and its checksum matches, whichever order the stores arrived in.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import socket
import struct
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import errors
from .batching import AdmissionState

HEADER = struct.Struct("<II")
INLINE_MAX = 64 * 1024  # buffers up to this size ride in the message; larger ones go through the slab
MAX_MESSAGE = (1 << 32) - 1  # what the header's two unsigned 32-bit lengths can announce
SLAB_ALIGN = 64

# ---------------------------------------------------------------------------------------------- values


class Unsupported(TypeError):
    """A value the channel does not carry (the model process answers it as an internal error)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Where the classes a message may name live: payloads and results (app.tasks), statistics (app.engine), configs
# and pre-processing layouts (perceiver_core). Anything else (app.runtime's Runtime, a torch class reached
# through a module attribute) is refused.
CARRIED_PACKAGES = ("app.tasks.", "perceiver_core.")


def _allowed_class(path: str) -> type:
    """The dataclass ``module:qualname`` names, if it is one of ours that a message may carry. Looked up in the
    module's own namespace (no module ``__getattr__``, which could import), defined there, and never imported
    here: only classes already loaded."""
    module_name, _, qualname = path.partition(":")
    if not (module_name == "app.engine" or module_name.startswith(CARRIED_PACKAGES)):
        raise Unsupported(f"class {path} is not one the channel carries")
    module = sys.modules.get(module_name)
    if module is None:
        raise Unsupported(f"module {module_name} is not loaded")
    found: Any = vars(module)
    for part in qualname.split("."):
        found = found.get(part) if isinstance(found, dict) else vars(found).get(part)
        if not isinstance(found, type):
            raise Unsupported(f"{path} is not a class")
    cls: type = found
    if cls.__module__ != module_name or cls.__qualname__ != qualname or not dataclasses.is_dataclass(cls):
        raise Unsupported(f"{path} is not a dataclass defined there")
    return cls


@dataclasses.dataclass(frozen=True)
class PlainJson:
    """A value that is JSON as it stands (dicts with string keys, lists, strings, numbers, booleans, None): the
    encoder hands it to ``json`` whole instead of walking it for tensors, and the decoder returns it as read. A
    fill-mask answer of 10,000 masks is 65,000 small dicts: walking them both ways cost the model process's event
    loop three times the encoding itself."""

    value: Any


class Encoder:
    """Values → JSON-able values, buffers set aside (``buffers``) for the frame or the slab.

    ``known`` maps id() of objects the receiver already holds (a request's own payloads, when the model process
    answers) to a reference: the answer names the payload instead of sending it back."""

    def __init__(self, known: dict[int, int] | None = None) -> None:
        self.buffers: list[memoryview] = []
        self.known = known or {}

    def _buffer(self, data: memoryview) -> int:
        self.buffers.append(data)
        return len(self.buffers) - 1

    def value(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if id(obj) in self.known:
            return {"$P": self.known[id(obj)]}
        if isinstance(obj, PlainJson):
            return {"$J": obj.value}
        if isinstance(obj, list):
            return [self.value(v) for v in obj]
        if isinstance(obj, tuple):
            return {"$tu": [self.value(v) for v in obj]}
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in obj):
                return {k: self.value(v) for k, v in obj.items()}
            return {"$m": [[self.value(k), self.value(v)] for k, v in obj.items()]}
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach().cpu().contiguous()
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
            return {"$T": self._buffer(raw.data), "d": _dtype_name(tensor.dtype), "s": list(tensor.shape)}
        if isinstance(obj, np.ndarray):
            array = np.ascontiguousarray(obj)
            if array.dtype.hasobject:
                raise Unsupported("object arrays are not carried")
            flat = array.reshape(-1).view(np.uint8)
            return {"$N": self._buffer(flat.data), "d": array.dtype.str, "s": list(array.shape)}
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return {"$B": self._buffer(memoryview(obj).cast("B"))}
        if isinstance(obj, errors.ServiceError):
            return {"$E": type(obj).__name__, "m": obj.message, "h": dict(obj.headers), "r": obj.reason}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            cls = type(obj)
            path = f"{cls.__module__}:{cls.__qualname__}"
            _allowed_class(path)
            fields = {f.name: self.value(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
            return {"$D": path, "f": fields}
        raise Unsupported(f"the channel does not carry {type(obj).__name__}")


class Decoder:
    def __init__(self, buffers: list[memoryview], known: list[Any] | None = None) -> None:
        self.buffers = buffers
        self.known = known or []

    def value(self, obj: Any) -> Any:
        if isinstance(obj, list):
            return [self.value(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if "$J" in obj:
            return obj["$J"]
        if "$T" in obj:
            dtype = getattr(torch, obj["d"])
            if not isinstance(dtype, torch.dtype):
                raise Unsupported(f"not a dtype: {obj['d']}")
            data = self.buffers[obj["$T"]]
            if not len(data):
                return torch.empty(obj["s"], dtype=dtype)
            return torch.frombuffer(bytearray(data), dtype=dtype).reshape(obj["s"])
        if "$N" in obj:
            dtype = np.dtype(obj["d"])
            if dtype.hasobject:
                raise Unsupported("object arrays are not carried")
            return np.frombuffer(bytearray(self.buffers[obj["$N"]]), dtype=dtype).reshape(obj["s"])
        if "$B" in obj:
            return bytes(self.buffers[obj["$B"]])
        if "$tu" in obj:
            return tuple(self.value(v) for v in obj["$tu"])
        if "$m" in obj:
            return {self.value(k): self.value(v) for k, v in obj["$m"]}
        if "$P" in obj:
            return self.known[obj["$P"]]
        if "$E" in obj:
            cls = getattr(errors, obj["$E"], None)
            if not (isinstance(cls, type) and issubclass(cls, errors.ServiceError)):
                raise Unsupported(f"not an error kind: {obj['$E']}")
            error = cls.__new__(cls)
            errors.ServiceError.__init__(error, obj["m"], obj["h"])
            error.reason = obj["r"]
            return error
        if "$D" in obj:
            cls = _allowed_class(obj["$D"])
            return cls(**{k: self.value(v) for k, v in obj["f"].items()})
        return {k: self.value(v) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------- the slab


class Slab:
    """A front end's shared memory for payloads: a memfd, mapped, cut first-fit into 64-byte aligned blocks.
    Used from the event loop's thread only. ``None`` from ``take`` when no block is free: the payload rides
    inline instead."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("perceiver-slab", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted by offset
        self.overflow_bytes = 0  # slab-sized buffers that found no room and travelled inline instead
        self.takes = 0  # blocks taken so far
        self._takes_released = 0  # ``takes`` when the pages last went back to the kernel

    def take(self, length: int) -> int | None:
        length = -(-max(length, 1) // SLAB_ALIGN) * SLAB_ALIGN
        for i, (offset, free) in enumerate(self.free):
            if free >= length:
                if free == length:
                    del self.free[i]
                else:
                    self.free[i] = (offset + length, free - length)
                self.takes += 1
                return offset
        return None

    @property
    def resident_bytes(self) -> int:
        """The memfd's pages the kernel holds: every page a payload has touched, until ``release_pages``."""
        return os.fstat(self.fd).st_blocks * 512

    def release_pages(self) -> int:
        """A wholly free slab that held payloads since the last call gives its pages back to the kernel
        (``MADV_REMOVE`` punches them out of the memfd; a freed block keeps its pages otherwise); returns the
        bytes it held. The next payloads fault in fresh zeroed pages, so a front end calls this when idle."""
        if self.free != [(0, self.size)] or self.takes == self._takes_released or not hasattr(mmap, "MADV_REMOVE"):
            return 0
        held = self.resident_bytes
        self.map.madvise(mmap.MADV_REMOVE)
        self._takes_released = self.takes
        return held

    def give(self, offset: int, length: int) -> None:
        length = -(-max(length, 1) // SLAB_ALIGN) * SLAB_ALIGN
        blocks = self.free
        i = 0
        while i < len(blocks) and blocks[i][0] < offset:
            i += 1
        blocks.insert(i, (offset, length))
        merged: list[tuple[int, int]] = []
        for start, size in blocks:  # coalesce neighbours
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        self.free = merged

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self.free)


# ---------------------------------------------------------------------------------------------- frames


def pack(
    message: dict[str, Any], values: Any = None, *, slab: Slab | None = None, known: dict[int, int] | None = None
) -> tuple[bytes, list[tuple[int, int]]]:
    """One frame: ``message`` with ``values`` encoded into it as ``"v"``. Large buffers go into ``slab`` (when
    given and it has room); returns the frame and the slab blocks it took (freed when its answer arrives)."""
    encoder = Encoder(known)
    if values is not None:
        message = {**message, "v": encoder.value(values)}
    table: list[list[int]] = []
    inline: list[memoryview] = []
    taken: list[tuple[int, int]] = []
    position = 0
    for data in encoder.buffers:
        length = data.nbytes
        offset = slab.take(length) if slab is not None and length > INLINE_MAX else None
        if offset is not None and slab is not None:
            slab.map[offset : offset + length] = data
            taken.append((offset, length))
            table.append([1, offset, length])
        else:
            if slab is not None and length > INLINE_MAX:
                slab.overflow_bytes += length
            inline.append(data)
            table.append([0, position, length])
            position += length
    if table:
        message["b"] = table
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) + position > MAX_MESSAGE:
        if slab is not None:
            for offset, length in taken:
                slab.give(offset, length)
        raise Unsupported(f"a message of {len(body) + position} bytes is over the channel's {MAX_MESSAGE}")
    return b"".join([HEADER.pack(len(body), position), body, *inline]), taken


def unpack(message: dict[str, Any], tail: bytes, slab: mmap.mmap | None = None, known: list[Any] | None = None) -> Any:
    """A message's decoded values (None when it has none); buffers in the slab are copied out."""
    view = memoryview(tail)
    buffers: list[memoryview] = []
    for where, offset, length in message.get("b", ()):
        if where == 1:
            if slab is None or offset < 0 or offset + length > len(slab):
                raise ValueError("a slab reference outside the slab")
            buffers.append(memoryview(slab)[offset : offset + length])
        else:
            if offset < 0 or offset + length > len(view):
                raise ValueError("an inline reference outside the frame")
            buffers.append(view[offset : offset + length])
    values = Decoder(buffers, known).value(message["v"]) if "v" in message else None
    for buffer in buffers:
        buffer.release()
    return values


async def read_frame(reader: Any) -> tuple[dict[str, Any], bytes]:
    """The next frame's message (its JSON, parsed once here) and inline bytes: asyncio.IncompleteReadError at the
    end of the stream, ValueError for a frame no peer of ours writes (the stream cannot be trusted after it)."""
    header = await reader.readexactly(HEADER.size)
    size, tail = HEADER.unpack(header)
    if size + tail > MAX_MESSAGE:
        raise ValueError(f"a frame of {size + tail} bytes")
    message = json.loads(await reader.readexactly(size))
    if not isinstance(message, dict):
        raise ValueError("a frame whose message is not a JSON object")
    return message, (await reader.readexactly(tail) if tail else b"")


# ---------------------------------------------------------------------------------------------- hand-shake

HELLO = struct.Struct("<I")


def send_hello(sock: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
    """A hand-shake message with its file descriptors (blocking socket)."""
    body = json.dumps(message).encode()
    socket.send_fds(sock, [HELLO.pack(len(body)) + body], fds)


def receive_hello(sock: socket.socket, count: int = 1) -> tuple[dict[str, Any], list[int]]:
    """The peer's hand-shake message and the ``count`` descriptors sent with it (blocking socket)."""
    data, fds, _, _ = socket.recv_fds(sock, 65536, count)
    if len(fds) != count:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("the hand-shake came without its shared memory")
    try:
        while len(data) < HELLO.size:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("the peer closed during the hand-shake")
            data += more
        (size,) = HELLO.unpack(data[: HELLO.size])
        while len(data) < HELLO.size + size:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("the peer closed during the hand-shake")
            data += more
        return json.loads(data[HELLO.size : HELLO.size + size]), fds
    except BaseException:  # cut short, or not JSON: the descriptors that came with it are nobody's (review)
        for fd in fds:
            os.close(fd)
        raise


# ---------------------------------------------------------------------------------------------- admission table

# Per engine: sequence, written-at (monotonic), rest of the running batch, queued work, one item's batch, one
# more queued unit's share, queue length, flags (1: idle admits, 2: estimates known), admission's margin, units that
# would start at once; then the CRC-32 of those.
RECORD = struct.Struct("<QdddddIIdI")
CHECK = struct.Struct("<I")
RECORD_SIZE = 72
# After the engines' records: the model process's heartbeat, when its event loop last ran (monotonic, a double:
# one aligned 8-byte store, whole to every reader).
HEARTBEAT = struct.Struct("<d")


class StateTable:
    """The model process's side: one record per engine, rewritten after every change (seqlock), and its heartbeat."""

    def __init__(self, engines: int) -> None:
        self.size = (engines + 1) * RECORD_SIZE
        self.fd = os.memfd_create("perceiver-admission", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)
        self.sequence = [0] * engines

    def write(self, index: int, state: AdmissionState, now: float) -> None:
        at = index * RECORD_SIZE
        sequence = self.sequence[index] + 1
        struct.pack_into("<Q", self.map, at, sequence)  # odd: being written
        flags = (1 if state.idle else 0) | (2 if state.known else 0)
        record = RECORD.pack(
            sequence + 1,
            now,
            state.rest_s,
            state.queued_s,
            state.batch_s,
            state.unit_s,
            state.queue_len,
            flags,
            state.margin,
            state.free_units,
        )  # as it will read once whole: its checksum covers the even sequence
        self.map[at + 8 : at + RECORD.size] = record[8:]
        CHECK.pack_into(self.map, at + RECORD.size, zlib.crc32(record))
        self.sequence[index] = sequence + 1
        struct.pack_into("<Q", self.map, at, sequence + 1)

    def beat(self, now: float) -> None:
        HEARTBEAT.pack_into(self.map, self.size - RECORD_SIZE, now)


class StateView:
    """A front end's side: reads an engine's record as the model process last wrote it.

    A writer descheduled in the middle of a record (two cores, several processes) leaves its sequence odd for
    as long as it waits for a core. The reader does not wait for it: after a few tries it answers the record it
    last read whole, a few moments older (the model process admits again on submit, with its own state)."""

    TRIES = 8

    def __init__(self, fd: int, size: int) -> None:
        self.map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        os.close(fd)
        self.size = size
        self.last: dict[int, tuple[float, AdmissionState]] = {}

    def heartbeat(self) -> float:
        """When the model process's event loop last ran (monotonic; 0.0 before its first beat)."""
        return float(HEARTBEAT.unpack_from(self.map, self.size - RECORD_SIZE)[0])

    def read(self, index: int) -> tuple[float, AdmissionState]:
        at = index * RECORD_SIZE
        for _ in range(self.TRIES):
            copied = self.map[at : at + RECORD.size + CHECK.size]  # one copy: the checks below are on it alone
            sequence, written, rest, queued, batch, unit, queue_len, flags, margin, free = RECORD.unpack_from(copied)
            if sequence == 0:  # nothing written yet
                break
            if sequence & 1:  # a writer in the middle of it
                continue
            if CHECK.unpack_from(copied, RECORD.size)[0] != zlib.crc32(copied[: RECORD.size]):
                continue  # stores of two writes, or half of one: torn
            state = AdmissionState(bool(flags & 1), queue_len, bool(flags & 2), rest, queued, batch, unit, margin, free)
            self.last[index] = (written, state)
            return written, state
        return self.last.get(index, (0.0, IDLE))


IDLE = AdmissionState(True, 0, False, 0.0, 0.0, 0.0)  # before anything was read: admit, the model process decides


def door(
    state: AdmissionState,
    written: float,
    deadline: float | None,
    max_queue: int,
    max_queue_delay_s: float | None,
    clock: Callable[[], float] = time.monotonic,
    decoding: int = 0,
) -> tuple[str, float, str] | None:
    """Batcher.admit's arithmetic on a snapshot: None (admit), or (message, retry-after seconds, reason). The
    running batch's rest ages as the rest of its estimate: near or past it, the model process takes the batch to
    run on (``batching.left_s``) and may refuse what this lets in, until the record is rewritten (each heartbeat).
    ``decoding``: the units every front end has admitted and is still decoding (``Decoding.total``), ahead of
    this request as ``Batcher.reserve``'s are in one process."""
    now = clock()
    rest = max(0.0, state.rest_s - (now - written))
    return state.with_decoding(decoding).refusal(deadline, now, max_queue, max_queue_delay_s, rest=rest)


# ---------------------------------------------------------------------------------------------- decodes in flight


class Decoding:
    """The units each front end has admitted and is still reading or decoding, per engine: what
    ``Batcher.reserve`` counts in one process, which the model process's table cannot hold (the decodes are the
    front ends'). A memfd of int64 counts, one per (engine, front-end slot). The model process creates it, gives
    each front end a slot at the hand-shake and zeroes the slot of one that has gone; each count is written by its
    front end alone, from its event loop (its routes and its gRPC server run there), and every door sums an
    engine's counts. An aligned 8-byte load or store is single-copy atomic on x86-64 and ARMv8, and memoryview
    reads and writes one element with one of them: a reader sees a count old or new, never torn."""

    def __init__(self, engines: int, slots: int, fd: int | None = None) -> None:
        self.engines, self.slots = engines, slots
        self.size = max(mmap.PAGESIZE, engines * slots * 8)
        created = fd is None
        if fd is None:
            fd = os.memfd_create("perceiver-decoding", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.size)
        self.map = mmap.mmap(fd, self.size)
        if not created:  # a front end's mapping: the descriptor is not needed once mapped
            os.close(fd)
        self.fd = fd if created else -1  # the model process hands its descriptor to each front end
        self.counts = memoryview(self.map).cast("q")

    def add(self, engine: int, slot: int, units: int) -> None:
        self.counts[engine * self.slots + slot] += units

    def total(self, engine: int) -> int:
        """The engine's units decoding in every front end (never below 0: a release after its slot was cleared, by
        a model process that closed on a front end still running, subtracts from nothing)."""
        at = engine * self.slots
        return max(0, sum(self.counts[at : at + self.slots]))

    def clear(self, slot: int) -> None:
        """A front end has gone: what it was decoding will never be queued."""
        for engine in range(self.engines):
            self.counts[engine * self.slots + slot] = 0

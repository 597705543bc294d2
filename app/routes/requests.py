"""Reading a task request: options from the query, the form or a JSON body; uploads from the form or
the raw body. Unknown fields are refused by name; every problem is a 4xx that says what to send."""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO, cast

from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from ..admission import prologue
from ..errors import (
    BadRequest,
    ClientClosedRequest,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMedia,
    join_problems,
    shown,
)
from ..jsonbody import LARGE_BODY, JsonBodyError, parse_json
from ..tasks.base import Task, TaskRequest, Upload, error_location

MAX_FORM_FIELDS = 64  # options are a handful; more is a malformed or hostile form


class Chunks:
    """An uploaded file kept as the chunks it arrived in, joined once when first read or sought from its end.
    (Starlette's SpooledTemporaryFile is a BytesIO: it copies as it grows, and again when read.) Writes append;
    small ones are gathered into a buffer first, so a body that arrives in tiny pieces costs little more than
    its bytes."""

    _rolled = False  # for UploadFile: in memory, so it calls read and seek directly instead of in a thread
    SMALL = 4096  # writes shorter than this are gathered; network-sized chunks are kept as they came

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.tail = bytearray()  # small writes, not yet a chunk
        self.position = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        if len(data) >= self.SMALL:
            self._flush()
            self.chunks.append(data)
        else:
            self.tail += data
            if len(self.tail) >= self.SMALL:
                self._flush()
        return len(data)

    def _flush(self) -> None:
        if self.tail:
            self.chunks.append(bytes(self.tail))
            self.tail.clear()

    def _joined(self) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        self._flush()
        if len(self.chunks) != 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0]

    def read(self, size: int = -1) -> bytes:
        data = self._joined()
        end = len(data) if size < 0 else min(len(data), self.position + size)
        out = data[self.position : end]  # the whole upload: the joined bytes themselves, not a copy
        self.position = max(self.position, end)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            base = 0
        elif whence == 1:
            base = self.position
        elif whence == 2:
            base = len(self._joined())
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        self.chunks, self.tail, self.closed = [], bytearray(), True


class InMemoryMultiPartParser(MultiPartParser):
    """Starlette's parser, but uploads stay in memory (the body-size limit already bounds them), as the
    chunks they arrived in.

    Starlette spools files over 1 MB to disk, one thread-pool hop per 64 KB chunk to write and more to
    read back; for a 2 MB phone photo that cost as much as decoding it at reduced scale. In memory, its
    BytesIO still copied each chunk into a growing buffer through an awaited write.
    """

    ended = False

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        upload = self._current_part.file
        if upload is not None:  # a file part: its chunks go to a Chunks instead of Starlette's spooled file
            self._files_to_close_on_error.pop().close()
            chunks = Chunks()
            upload.file = cast(BinaryIO, chunks)
            self._files_to_close_on_error.append(cast(Any, chunks))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        upload = self._current_part.file
        if upload is None:
            super().on_part_data(data, start, end)
            return
        upload.file.write(data[start:end])  # the whole chunk when it is all file: the same bytes, not a copy
        upload.size = (upload.size or 0) + end - start

    def on_end(self) -> None:
        self.ended = True  # the closing boundary was seen


async def read_multipart(request: Request, max_files: int) -> FormData:
    parser = InMemoryMultiPartParser(request.headers, request.stream(), max_files=max_files, max_fields=MAX_FORM_FIELDS)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart/form-data: {exc.message}") from None
    if not parser.ended:  # a body cut off inside a part: Starlette leaves that part's file open
        await form.close()
        for leftover in parser._files_to_close_on_error:
            leftover.close()
        raise BadRequest("malformed multipart/form-data: the body ends before the closing boundary")
    return form


def what_it_takes(task: Task[Any, Any, Any]) -> str:
    """One sentence on the body an endpoint accepts, for error messages."""
    if not task.uploads:
        return f"{task.path} takes a JSON object (content-type: application/json) with {_names(task)}"
    fields = ", ".join(f"{u.name}{'' if u.required else ' (optional)'}" for u in task.uploads if not u.instead_of)
    text = f"{task.path} takes multipart/form-data with the file field(s) {fields}"
    for upload in task.uploads:
        if upload.instead_of:
            text += f" (or {upload.name} instead of {' and '.join(upload.instead_of)})"
    raw = [u for u in task.uploads if u.raw_types]
    if raw:
        types = " or ".join(t + ("*" if t.endswith("/") else "") for t in raw[0].raw_types)
        text += f", or the {raw[0].name} itself as the body with content-type {types}"
    return text + ", or a JSON object (content-type: application/json) with each file as base64 text or a data: URL"


def _names(task: Task[Any, Any, Any]) -> str:
    return "fields " + ", ".join(task.request_model.model_fields)


async def read_task_request(
    request: Request, task: Task[Any, Any, Any], max_files: int
) -> tuple[TaskRequest, dict[str, list[bytes]]]:
    """The validated request fields and the uploads (name → files in upload order)."""
    refuse_compressed(request)
    fields: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        if not key:  # "?=3": it was reported as an unknown field of the body
            raise InvalidInput("the query string has a parameter without a name (?=...); write it as ?top_k=3")
        _put(fields, key, value)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    files: dict[str, list[bytes]] = {}
    try:
        if task.uploads:
            files = await _read_uploads(request, task, media, fields, max_files)
        else:
            for key, value in (await _read_json(request, task, media)).items():
                _put(fields, key, value)
    except ClientDisconnect as exc:
        raise ClientClosedRequest("the client went away while sending the request") from exc
    return validate(task, fields), files


def _codings(request: Request) -> list[str]:
    """The body's content codings, in the order applied, over every Content-Encoding line (RFC 9110 reads several
    lines as one list: the first alone let ``identity`` then ``gzip`` through as if uncompressed), identity left
    out."""
    parts = (part.strip().lower() for line in request.headers.getlist("content-encoding") for part in line.split(","))
    return [coding for coding in parts if coding not in ("", "identity")]


def refuse_compressed(request: Request) -> None:
    """Bodies are read as sent: a Content-Encoding (gzip, ...) is a 415 that says so, before the body is read. A
    gzipped body read as JSON, an image or multipart was refused for what its bytes looked like instead."""
    codings = _codings(request)
    if codings:
        raise UnsupportedMedia(
            f"Content-Encoding {shown(', '.join(codings))} is not supported; send the request uncompressed"
        )


# zlib's window bits for each content coding: gzip's header and trailer, or zlib's (what "deflate" means in HTTP,
# and what tritonclient's request_compression_algorithm="deflate" sends; a raw deflate stream is read too)
CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def content_coding(request: Request) -> str | None:
    """The body's Content-Encoding when it is one the Open Inference Protocol's clients send (Triton reads gzip
    and deflate bodies): None for none; anything else is a 415 that names those, before the body is read."""
    codings = _codings(request)
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in CODINGS:
        raise UnsupportedMedia(
            f"Content-Encoding {shown(', '.join(codings))} is not supported; send the request as gzip, deflate or "
            "uncompressed (one coding)"
        )
    return codings[0]


# Compressed input is fed to zlib this much at a time: what it leaves after a member's end (``unused_data``) is a
# copy, and a copy of the whole rest of the body per member made a body of empty 20-byte gzip members quadratic
# (6.4 MB: 50 s of CPU in a decode thread, past the request's end).
INFLATE_SLICE = 1 << 16
MAX_MEMBERS = 1000  # gzip members in one body: a writer that appends makes a few; 1.6 million fit in 32 MB


def inflate(body: bytes, coding: str, limit: int) -> bytes:
    """``body`` decompressed, every member of it, to at most ``limit`` bytes: past that a 413 at once (32 MB of
    zeros is a 32 KB gzip body), never the whole output first. A body that is not what its coding says, that ends
    early, or of more than ``MAX_MEMBERS`` gzip members, is a 400. Linear in the body's size."""
    view, out, size, pos, members, wbits = memoryview(body), [], 0, 0, 0, CODINGS[coding]
    try:
        while True:
            start, inflater = pos, zlib.decompressobj(wbits)
            members += 1
            if members > MAX_MEMBERS:
                raise BadRequest(f"the {coding} body has more than {MAX_MEMBERS} members; send it as one")
            try:
                while not inflater.eof and pos < len(view):
                    piece = view[pos : pos + INFLATE_SLICE]
                    pos += len(piece)
                    # Asked for one byte past the limit: reaching it is the 413, so no input is ever left over.
                    chunk = inflater.decompress(piece, limit - size + 1)
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"the request body inflates to more than {limit} bytes (max_body_bytes)")
                    out.append(chunk)
            except zlib.error:
                if wbits != 15 or start or size:
                    raise
                wbits, pos, members = -15, 0, 0  # "deflate" sent as a raw stream, as some clients do: read it as one
                continue
            if not inflater.eof:
                raise BadRequest(f"the {coding} body ends before its compressed stream does")
            pos -= len(inflater.unused_data)  # within the last slice
            # Every member read, or zero padding after them (gzip writers may pad; no member starts with a zero).
            if pos == len(body) or (body[pos] == 0 and body.count(0, pos) == len(body) - pos):
                return b"".join(out)
            if wbits != 31:
                raise BadRequest(f"the {coding} body has {len(body) - pos} bytes after its compressed stream")
    except zlib.error as exc:
        raise BadRequest(f"the body is not the {coding} data its Content-Encoding says ({exc})") from None


def validate(task: Task[Any, Any, Any], fields: Mapping[str, Any]) -> TaskRequest:
    try:
        return task.request_model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidInput(_describe(task, exc)) from None


def _describe(task: Task[Any, Any, Any], exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = error_location(error.get("loc", ())) or "body"
        if error["type"] == "extra_forbidden":
            accepted = ", ".join([*task.request_model.model_fields, *(u.name for u in task.uploads)])
            problems.append(f"{where}: unknown field; {task.path} accepts {accepted}")
        else:
            problems.append(f"{where}: {str(error['msg']).removeprefix('Value error, ')}")
    return join_problems(problems)


def _put(fields: dict[str, Any], key: str, value: Any) -> None:
    if key in fields:
        raise InvalidInput(f"{key}: given more than once (in the query, the form or the body); give it once")
    fields[key] = value


async def _read_uploads(
    request: Request, task: Task[Any, Any, Any], media: str, fields: dict[str, Any], max_files: int
) -> dict[str, list[bytes]]:
    files: dict[str, list[bytes]] = {}
    raw = next((u for u in task.uploads if any(media.startswith(t) for t in u.raw_types)), None) if media else None
    if raw is not None:
        files[raw.name] = [await request.body()]
    elif media in ("multipart/form-data", "application/x-www-form-urlencoded"):
        if media == "multipart/form-data":
            form = await read_multipart(request, max_files)
        else:
            form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS)
        try:
            for key, value in form.multi_items():
                # A file input left empty: a browser's form sends it as a part with filename="" and no bytes,
                # other clients as an empty field. Either is no file, so an optional upload is simply absent.
                if isinstance(value, UploadFile):
                    data = await value.read()
                    if data or value.filename:
                        files.setdefault(key, []).append(data)
                elif any(u.name == key for u in task.uploads):
                    if value:
                        raise InvalidInput(f"{key}: expected a file upload (curl -F {key}=@file), got a text field")
                else:
                    _put(fields, key, value)
        finally:
            await form.close()
    elif media == "application/json" or media.endswith("+json"):
        known = {u.name: u for u in task.uploads}
        for key, value in (await _read_json(request, task, media)).items():
            upload = known.get(key)
            if upload is None:
                _put(fields, key, value)
                continue
            values = value if isinstance(value, list) and upload.repeatable else [value]
            if len(values) > max_files:
                raise InvalidInput(f"{key}: {len(values)} files; at most {max_files} per request")
            files[key] = [_from_base64(key, v, task) for v in values]
    else:
        sent = f"a {media} body" if media else "a body without content-type"
        raise InvalidInput(f"{what_it_takes(task)}; got {sent}")
    _check_uploads(task.uploads, files, task)
    return files


def _from_base64(name: str, value: Any, task: Task[Any, Any, Any]) -> bytes:
    """A file sent in a JSON body: base64 text, or a data: URL as a browser's FileReader gives it."""
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") and ";base64," in value[:200] else value
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise InvalidInput(f"{name}: expected the file as base64 text or a data: URL; {what_it_takes(task)}")


def _check_uploads(uploads: tuple[Upload, ...], files: dict[str, list[bytes]], task: Task[Any, Any, Any]) -> None:
    known = {u.name: u for u in uploads}
    for name in files:
        if name not in known:
            raise InvalidInput(f"{name}: unknown file field; {what_it_takes(task)}")
    replaced: set[str] = set()  # uploads made unnecessary by one sent instead of them
    for upload in uploads:
        if upload.instead_of and upload.name in files:
            both = [name for name in upload.instead_of if name in files]
            if both:
                raise InvalidInput(
                    f"{upload.name}: sent with {' and '.join(both)}; send {upload.name} or "
                    f"{' and '.join(upload.instead_of)}, not both"
                )
            replaced.update(upload.instead_of)
    for upload in uploads:
        count = len(files.get(upload.name, ()))
        if count == 0 and upload.required and upload.name not in replaced:
            raise InvalidInput(f"{upload.name}: file required; {what_it_takes(task)}")
        if count > 1 and not upload.repeatable:
            raise InvalidInput(f"{upload.name}: one file expected, got {count}")


async def _read_json(request: Request, task: Task[Any, Any, Any], media: str) -> dict[str, Any]:
    if media and media != "application/json" and not media.endswith("+json"):
        hint = "with curl, add -H 'content-type: application/json'"
        raise InvalidInput(f"{what_it_takes(task)}; got content-type {media} ({hint})")
    body = await request.body()
    try:
        if len(body) > LARGE_BODY:  # a large parse would hold the event loop (and every other request)
            runtime = request.app.state.runtime
            data = await runtime.offload(prologue(request.scope, runtime).deadline, parse_json, body)
        else:
            data = parse_json(body)
    except JsonBodyError as exc:
        raise InvalidInput(str(exc)) from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{what_it_takes(task)}; got a JSON {type(data).__name__}")
    return data

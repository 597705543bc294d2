"""The multipart reader keeps uploads in memory as the chunks they arrived in: each file comes back whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from starlette.datastructures import Headers, UploadFile

from app.routes.requests import Chunks, InMemoryMultiPartParser

from .conftest import MEDIA

CAT = (MEDIA / "cat.jpg").read_bytes()
COFFEE = (MEDIA / "coffee.jpg").read_bytes()
BOUNDARY = "x7MA4YWxkTrZu0gW"


def form_body() -> bytes:
    parts = [
        (b'name="image"; filename="cat.jpg"', CAT),
        (b'name="top_k"', b"3"),
        (b'name="image"; filename="coffee.jpg"', COFFEE),
    ]
    body = b""
    for disposition, data in parts:
        body += f"--{BOUNDARY}\r\n".encode() + b"Content-Disposition: form-data; " + disposition + b"\r\n\r\n"
        body += data + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize("chunk", [997, 65536, 10**7])
def test_files_and_fields_come_back_whole_however_the_body_is_cut(chunk: int) -> None:
    body = form_body()

    async def stream() -> AsyncGenerator[bytes, None]:
        for start in range(0, len(body), chunk):
            yield body[start : start + chunk]

    async def parse() -> list[tuple[str, object, int | None]]:
        headers = Headers({"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
        parser = InMemoryMultiPartParser(headers, stream(), max_files=4, max_fields=4)
        form = await parser.parse()
        assert parser.ended
        items = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                assert isinstance(value.file, Chunks)
                items.append((key, await value.read(), value.size))
            else:
                items.append((key, value, None))
        await form.close()
        return items

    assert asyncio.run(parse()) == [("image", CAT, len(CAT)), ("top_k", "3", None), ("image", COFFEE, len(COFFEE))]


def test_chunks_read_and_seek_like_a_file() -> None:
    chunks = Chunks()
    for start in range(0, len(CAT), 1000):
        chunks.write(CAT[start : start + 1000])
    assert chunks.seek(0) == 0
    assert chunks.read(10) == CAT[:10] and chunks.tell() == 10
    assert chunks.read() == CAT[10:] and chunks.read() == b""
    assert chunks.seek(-5, 2) == len(CAT) - 5 and chunks.read() == CAT[-5:]
    chunks.seek(0)
    whole = chunks.read()
    assert whole == CAT and chunks.read(1) == b""
    with pytest.raises(ValueError, match="whence"):
        chunks.seek(0, 3)
    chunks.close()
    assert chunks.chunks == []
    with pytest.raises(ValueError, match="closed"):
        chunks.read()


def test_a_body_in_tiny_pieces_is_gathered_not_kept_piece_by_piece() -> None:
    """A client trickling its upload a few bytes per packet must not make each byte cost a Python object."""
    chunks = Chunks()
    for start in range(0, len(CAT), 7):
        chunks.write(CAT[start : start + 7])
    assert len(chunks.chunks) <= len(CAT) // Chunks.SMALL + 1
    chunks.write(COFFEE)  # a large write after small ones keeps the order
    chunks.seek(0)
    assert chunks.read() == CAT + COFFEE

"""Reading request bodies into memory under a size cap and a minimum rate.

Starlette's multipart parser spools files over 1 MB to a temporary file; uploads must never
touch the disk, so the body is streamed into memory (refused past the cap) and multipart is
parsed here from those bytes, in a worker thread: parsing is pure Python, and a body of
many tiny parts would otherwise hold the event loop (and /healthz) for seconds.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Final, TypeVar

import anyio
import anyio.to_thread
from pydantic import BaseModel, ValidationError
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.api.admission import admit, content_coding
from service.config import Settings
from service.errors import (
    BodyTimeout,
    EmptyBody,
    InvalidContentEncoding,
    InvalidInferenceRequest,
    InvalidMultipart,
    PayloadTooLarge,
    UnsupportedMediaType,
)

# A form holds each parameter at most once and one file: far fewer parts than this. Past it
# the body is refused at once instead of parsed to its end.
MAX_PARTS = 64


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body, admitted first (service.api.admission: 413 or 503 from the headers
    alone), then read under the byte cap and the minimum rate.

    Raises:
        PayloadTooLarge: as soon as the body passes ``max_upload_bytes``.
        BodyTimeout: when the body falls behind ``body_min_rate`` after ``body_timeout_s``.
        Overloaded, Draining: see :func:`service.api.admission.admit`.
    """
    admit(request)
    limit = settings.max_upload_bytes
    chunks: list[bytes] = []
    size = 0
    start = anyio.current_time()
    stream = request.stream().__aiter__()
    try:
        while True:
            # The received bytes must stay above body_min_rate * (elapsed - grace).
            deadline = start + settings.body_timeout_s + size / settings.body_min_rate
            with anyio.move_on_after(deadline - anyio.current_time()) as waited:
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    break
            if waited.cancelled_caught:
                raise BodyTimeout(
                    f"the body arrives slower than {settings.body_min_rate} bytes/s "
                    f"({size} bytes in {anyio.current_time() - start:.1f} s)")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise EmptyBody("the client disconnected before sending the whole body") from exc
    return b"".join(chunks)


# Content-Encoding -> zlib's wbits (deflate is the zlib format, RFC 9110 section 8.4.1.2).
_ENCODINGS: Final[dict[str, int]] = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Concatenated gzip files are a few members; a body of a million empty ones would cost seconds.
MAX_MEMBERS: Final[int] = 64


async def read_inflated_body(request: Request, settings: Settings) -> bytes:
    """:func:`read_body`, inflated as its Content-Encoding says, in a worker thread:
    inflating up to the upload limit takes long enough to hold the event loop. Every
    upload route reads its body so (the inference protocols' clients compress requests,
    tritonclient's request_compression_algorithm; so may a proxy or an HTTP library); the
    edge admits a compressed body at the upload limit's worth of bytes, what it may
    inflate to (service.api.admission)."""
    body = await read_body(request, settings)
    encoding = content_coding(request.headers.get("content-encoding"))
    if encoding == "identity":
        # Most uploads: no hop to a worker thread. With one for every upload, 2,000
        # /predict from 16 clients (tests/api/test_load.py) ended at 403-405 MB of RSS
        # against 373-382 without, and grew by up to 8.7 % against 2.6-4.2 % after the
        # warm-up (most likely the worker threads' malloc arenas; not measured apart).
        return body
    return await anyio.to_thread.run_sync(inflate, body, encoding, settings.max_upload_bytes)


def inflate(body: bytes, name: str, limit: int) -> bytes:
    """The body as it was before compression with the content coding ``name`` (as
    :func:`service.api.admission.content_coding` gives it, not "identity"), at most
    ``limit`` bytes: a small compressed body can inflate to any size, so inflating stops
    there. A gzip body may be several members one after another (RFC 1952 section 2.2), as
    concatenated gzip files are; at most MAX_MEMBERS of them.

    Raises:
        UnsupportedMediaType: an encoding other than gzip or deflate.
        InvalidContentEncoding: data that is not what the encoding says, or bytes after it.
        PayloadTooLarge: more than ``limit`` bytes inflated.
    """
    if name not in _ENCODINGS:
        raise UnsupportedMediaType(f"Content-Encoding {name[:20]!r} is not gzip or deflate")
    parts: list[bytes] = []
    size, rest = 0, body
    while len(parts) < MAX_MEMBERS:
        inflater = zlib.decompressobj(_ENCODINGS[name])
        try:
            data = inflater.decompress(rest, limit - size + 1)
        except zlib.error as exc:
            raise InvalidContentEncoding(f"the body is not valid {name} data") from exc
        size += len(data)
        if size > limit or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"the body inflates to more than the limit of {limit} bytes")
        if not inflater.eof:
            raise InvalidContentEncoding(f"the {name} body is truncated")
        parts.append(data)
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)
        if name != "gzip":
            raise InvalidContentEncoding(f"the body holds bytes after its {name} data")
    raise InvalidContentEncoding(f"the gzip body has more than {MAX_MEMBERS} members")


@dataclass
class FilePart:
    data: bytes
    content_type: str | None
    filename: str | None


@dataclass
class Form:
    fields: list[tuple[str, str]] = field(default_factory=list)
    file: FilePart | None = None


def parse_multipart(body: bytes, content_type: str, *, file_field: str = "file") -> Form:
    """Parse multipart/form-data held in memory.

    Raises:
        InvalidMultipart: when the boundary is missing, the body is malformed or ends
            before its closing boundary, or it has no part, or more than one, named
            ``file_field``.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidMultipart("multipart/form-data without a boundary parameter")

    # A part's data as the pieces the parser points at: ranges of ``body`` itself (copied
    # once, at the end), or its own buffer where a boundary-like run proved to be data.
    parts: list[tuple[dict[bytes, bytes], list[tuple[bytes, int, int]]]] = []
    header_field = bytearray()
    header_value = bytearray()
    ended: list[bool] = []

    def on_part_begin() -> None:
        if len(parts) == MAX_PARTS:
            raise InvalidMultipart(f"the multipart body has more than {MAX_PARTS} parts")
        parts.append(({}, []))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1][0][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        pieces = parts[-1][1]
        if pieces and pieces[-1][0] is data is body and pieces[-1][2] == start:
            pieces[-1] = (body, pieces[-1][1], end)  # contiguous in the body: one range
        else:
            pieces.append((data if data is body else bytes(data[start:end]),
                           start if data is body else 0,
                           end if data is body else end - start))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_part_data": on_part_data, "on_end": lambda: ended.append(True),
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidMultipart(f"malformed multipart body: {exc}") from exc
    # The parser accepts a body cut off before its closing boundary; a truncated upload
    # must not be explained as if it were whole.
    if not ended:
        raise InvalidMultipart("the multipart body ends before its closing boundary")

    form = Form()
    for headers, pieces in parts:
        data = _joined(pieces)
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        if name == file_field:
            if form.file is not None:
                raise InvalidMultipart(f"the multipart body has more than one {file_field!r} part")
            part_type = headers.get(b"content-type")
            form.file = FilePart(
                data,
                part_type.decode("latin-1").strip() if part_type else None,
                filename.decode("utf-8", "replace") if filename else None,
            )
        elif name:
            form.fields.append((name, data.decode("utf-8", "replace")))
    if form.file is None:
        raise InvalidMultipart(f"the multipart body has no part named {file_field!r}")
    return form


def _joined(pieces: list[tuple[bytes, int, int]]) -> bytes:
    """A part's bytes: one slice of the body when it is one range (the usual case: a file
    part costs one copy of itself, not two)."""
    if len(pieces) == 1:
        data, start, end = pieces[0]
        return data[start:end]
    return b"".join(memoryview(data)[start:end] for data, start, end in pieces)


async def read_form(body: bytes, content_type: str) -> Form:
    """:func:`parse_multipart` in a worker thread, off the event loop."""
    return await anyio.to_thread.run_sync(parse_multipart, body, content_type)


M = TypeVar("M", bound=BaseModel)


def parse_inference_json(kind: type[M], data: bytes, what: str) -> M:
    """An inference protocol's JSON body as ``kind``.

    Raises:
        InvalidInferenceRequest: "``what``: where: why" for the first problem pydantic
            finds (its message names the place and the rule, never the value sent).
    """
    try:
        return kind.model_validate_json(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        raise InvalidInferenceRequest(f"{what}: {where}: {error['msg']}") from None

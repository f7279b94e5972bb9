"""Reads a classification request off the wire: its id, the body limit, multipart or a raw
image, the fields.

The body is counted as it streams in, so an oversized upload is refused with 413 after at most
``max_body_bytes`` have been read, whatever Content-Length claims.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from ..errors import ApiError

__all__ = ["ParsedRequest", "Upload", "read_request", "request_id"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(given: str) -> str:
    """The client's X-Request-ID when it is a safe token, else a fresh one: 128 random bits
    (unique, not secret) from ``random``, not ``os.urandom``, whose system call releases the GIL
    and then waits up to the switch interval to get it back beside a busy decode or model thread
    (~0.9 ms per request measured, ``python -m loadtests.gil_contention``)."""
    return given if _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"


@dataclass(frozen=True)
class Upload:
    """One uploaded file."""

    data: bytes
    filename: str | None = None


@dataclass(frozen=True)
class ParsedRequest:
    """The files under one field name, and every plain field (form fields, then query)."""

    uploads: list[Upload]
    fields: dict[str, str]
    file_count: int


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"The request body exceeds {limit} bytes.")


async def _limited(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        yield chunk


class _Closing:
    """Watches a multipart stream for its close delimiter (``--boundary--``).

    Starlette's parser silently drops a part the body ends in the middle of, so a body cut
    before its close delimiter would otherwise read as "no image" instead of as broken.
    """

    def __init__(self, content_type: str) -> None:
        # The header parser Starlette's own multipart parser uses.
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary", b"")
        self.delimiter = b"--" + boundary + b"--"
        self.seen = not boundary  # no boundary: the parser reports that itself
        self._tail = b""

    async def watch(self, chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        async for chunk in chunks:
            if not self.seen:
                window = self._tail + chunk
                self.seen = self.delimiter in window
                self._tail = window[-len(self.delimiter) :]
            yield chunk


def _images_word(count: int) -> str:
    return f"{count} image" + ("" if count == 1 else "s")


async def read_request(
    request: Request,
    *,
    file_field: str,
    max_files: int,
    max_body_bytes: int,
) -> ParsedRequest:
    """Parse a multipart form (or a raw ``image/*`` body) within the limits.

    Raises:
        ApiError: 413 for too large a body or too many files, 415 for a content type that is
            neither, 400 for malformed multipart or no file under ``file_field``.
    """
    declared = request.headers.get("content-length")
    # isascii: str.isdigit also accepts digits int() refuses, such as the Latin-1 '²'.
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and int(declared) > max_body_bytes
    ):
        raise _too_large(max_body_bytes)
    fields = {k: v for k, v in request.query_params.items()}
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";")[0].strip().lower()
    try:
        if media_type.startswith("image/") or media_type == "application/octet-stream":
            body = b"".join([chunk async for chunk in _limited(request, max_body_bytes)])
            return ParsedRequest([Upload(body, None)], fields, 1)
        if media_type != "multipart/form-data":
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Send multipart/form-data with the image in field '{file_field}' "
                f"(or a raw image/* body), not {media_type or 'a body without a Content-Type'}.",
            )
        closing = _Closing(content_type)
        parser = MultiPartParser(
            request.headers,
            closing.watch(_limited(request, max_body_bytes)),
            max_files=max_files + 1,
            max_fields=64,
        )
        form = await parser.parse()
        if not closing.seen:
            await form.close()
            raise ApiError(
                400,
                "malformed_multipart",
                "Malformed multipart body: it ends before its closing boundary "
                "(the upload was cut short).",
            )
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise ApiError(
                413, "too_many_images", f"At most {_images_word(max_files)} per request."
            ) from exc
        raise ApiError(
            400, "malformed_multipart", f"Malformed multipart body: {exc.message}"
        ) from exc
    except UnicodeError as exc:
        # Starlette decodes part names and fields with the declared charset and falls back to
        # Latin-1 only on UnicodeDecodeError; codecs such as punycode raise plain UnicodeError.
        raise ApiError(
            400,
            "malformed_multipart",
            f"Malformed multipart body: its parts cannot be decoded in its charset ({exc}).",
        ) from exc
    except ClientDisconnect as exc:
        raise ApiError(400, "client_disconnected", "The client went away mid-upload.") from exc

    try:
        uploads: list[Upload] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key == file_field:
                    uploads.append(Upload(await value.read(), value.filename))
            else:
                fields[key] = value
    finally:
        await form.close()
    if len(uploads) > max_files:
        raise ApiError(413, "too_many_images", f"At most {_images_word(max_files)} per request.")
    if not uploads:
        raise ApiError(
            400,
            "missing_image",
            f"No file in form field '{file_field}': upload the image as multipart/form-data.",
        )
    return ParsedRequest(uploads, fields, len(uploads))

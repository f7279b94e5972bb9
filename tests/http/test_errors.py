"""The error table of /classify and /classify_batch through the app in-process: each refusal has
its status and code, the documented body ``{"error": {"code", "message"}}`` (a message that
says what was wrong) and an ``X-Request-ID``; a bad image in a batch fails only its own slot."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from service.web.schemas import BatchItem
from tests.http.conftest import LIMITS, REQUEST_ID, assert_error, png
from tests.utils import encode

ENDPOINTS = [("/classify", "image"), ("/classify_batch", "images")]  # (path, file field)
MAX_BODY = LIMITS["max_body_bytes"]
MAX_IMAGES = LIMITS["max_images_per_request"]


# --- images that fail to decode or validate --------------------------------------------------


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's shape), tiny on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _photo(fmt: str) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(pixels, fmt)


def _truncated_jpeg() -> bytes:
    data = _photo("JPEG")
    return data[: len(data) // 2]


IMAGE_ERRORS = [
    # (what, upload, status, code, in the message)
    ("empty", b"", 400, "empty_image", "empty (0 bytes)"),
    ("not an image", b"hello world", 415, "unsupported_media_type", "not a recognised image"),
    ("format not accepted", _photo("TIFF"), 415, "unsupported_media_type", "TIFF is not accepted"),
    ("corrupt", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, 400, "corrupt_image", "corrupt"),
    ("truncated", _truncated_jpeg(), 400, "corrupt_image", "truncated"),
    ("too small", png(4, 40), 422, "degenerate_image", "4x40; each side must be at least 8 pixels"),
    ("too elongated", png(200, 8), 422, "degenerate_image", "aspect ratio 25.0:1 exceeds 20:1"),
    ("too many pixels", _header_only_png(2000, 2000), 413, "too_many_pixels", "the limit is 1,000,000 pixels"),
]  # fmt: skip
IMAGE_IDS = [case[0] for case in IMAGE_ERRORS]


@pytest.mark.parametrize(
    ("what", "upload", "status", "code", "fragment"), IMAGE_ERRORS, ids=IMAGE_IDS
)
def test_a_bad_image_is_refused_with_its_code(
    client: TestClient, what: str, upload: bytes, status: int, code: str, fragment: str
) -> None:
    response = client.post("/classify", files={"image": ("upload.bin", upload)})
    assert_error(response, status, code, fragment)


@pytest.mark.parametrize(
    ("what", "upload", "status", "code", "fragment"), IMAGE_ERRORS, ids=IMAGE_IDS
)
def test_a_bad_image_fails_only_its_batch_slot(
    client: TestClient, what: str, upload: bytes, status: int, code: str, fragment: str
) -> None:
    files = [
        ("images", ("first.png", png(seed=1))),
        ("images", ("bad.bin", upload)),
        ("images", ("last.png", png(seed=2))),
    ]
    response = client.post("/classify_batch", files=files, data={"top_k": "2"})
    assert response.status_code == 200, response.text
    assert REQUEST_ID.match(response.headers["x-request-id"])
    items = response.json()
    for item in items:
        BatchItem.model_validate(item)
    assert [(i["index"], i["filename"]) for i in items] == [
        (0, "first.png"),
        (1, "bad.bin"),
        (2, "last.png"),
    ]
    bad = items[1]
    assert set(bad) == {"index", "filename", "status", "error"}
    assert bad["status"] == status and bad["error"]["code"] == code
    assert fragment in bad["error"]["message"]
    for good in (items[0], items[2]):
        assert "error" not in good and "status" not in good
        assert len(good["predictions"]) == 2


def test_a_batch_of_only_bad_images_answers_every_slot(client: TestClient) -> None:
    files = [("images", ("a.txt", b"hello")), ("images", ("b.png", b""))]
    response = client.post("/classify_batch", files=files)
    assert response.status_code == 200, response.text
    assert [
        (i["index"], i["filename"], i["status"], i["error"]["code"]) for i in response.json()
    ] == [
        (0, "a.txt", 415, "unsupported_media_type"),
        (1, "b.png", 400, "empty_image"),
    ]


# --- requests refused before any image is looked at -------------------------------------------

Build = Callable[[str], dict[str, Any]]  # file field -> keyword arguments of client.post


def _chunks(total: int) -> Iterator[bytes]:
    """A body sent without Content-Length (chunked), so only counting it can stop it."""
    for _ in range(total // 4096):
        yield b"\x00" * 4096


_BOUNDARY = {"content-type": "multipart/form-data; boundary=xyz"}


def _unterminated(field: str) -> bytes:
    """A multipart body whose one file part is complete but whose closing boundary never comes."""
    head = f'--xyz\r\nContent-Disposition: form-data; name="{field}"; filename="a.png"\r\n\r\n'
    return head.encode() + png()


REQUEST_ERRORS: list[tuple[str, Build, int, str, tuple[str, ...]]] = [
    # (what, request for the endpoint's file field, status, code, in the message)
    ("file under another field", lambda field: {"files": {"picture": ("a.png", png())}},
     400, "missing_image", ("No file in form field '{field}'",)),
    ("only option fields", lambda field: {"files": {"top_k": (None, b"2")}},
     400, "missing_image", ("No file in form field '{field}'",)),
    ("json", lambda field: {"json": {field: "aGVsbG8="}},
     415, "unsupported_media_type", ("field '{field}'", "not application/json")),
    ("url-encoded form", lambda field: {"data": {field: "x"}},
     415, "unsupported_media_type", ("not application/x-www-form-urlencoded",)),
    ("no content type", lambda field: {"content": png()},
     415, "unsupported_media_type", ("not a body without a Content-Type",)),
    ("declared body too large", lambda field: {"files": {field: ("a.png", b"\x00" * (MAX_BODY + 1))}},
     413, "body_too_large", (f"exceeds {MAX_BODY} bytes",)),
    ("raw image body too large", lambda field: {"content": b"\x00" * (MAX_BODY + 1), "headers": {"content-type": "image/png"}},
     413, "body_too_large", (f"exceeds {MAX_BODY} bytes",)),
    ("chunked body too large", lambda field: {"content": _chunks(2 * MAX_BODY), "headers": {"content-type": "image/png"}},
     413, "body_too_large", (f"exceeds {MAX_BODY} bytes",)),
    ("multipart without boundary", lambda field: {"content": b"--xyz\r\n", "headers": {"content-type": "multipart/form-data"}},
     400, "malformed_multipart", ("Malformed multipart body: Missing boundary",)),
    ("multipart garbage", lambda field: {"content": b"garbage", "headers": _BOUNDARY},
     400, "malformed_multipart", ("Malformed multipart body",)),
    ("multipart part without a name", lambda field: {"content": b"--xyz\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--xyz--\r\n", "headers": _BOUNDARY},
     400, "malformed_multipart", ('"name" must be provided',)),
]  # fmt: skip


# Starlette's parser drops the unfinished part; without the close-delimiter check the answer
# was 400 missing_image, which sends a client that did upload an image the wrong way.
CUT_BEFORE_THE_CLOSING_BOUNDARY = pytest.param(
    "multipart cut before its closing boundary",
    lambda field: {"content": _unterminated(field), "headers": _BOUNDARY},
    400,
    "malformed_multipart",
    ("ends before its closing boundary",),
    id="multipart cut before its closing boundary",
)


@pytest.mark.parametrize(
    ("what", "build", "status", "code", "fragments"),
    [
        *(pytest.param(*case, id=case[0]) for case in REQUEST_ERRORS),
        CUT_BEFORE_THE_CLOSING_BOUNDARY,
    ],
)
@pytest.mark.parametrize(("path", "field"), ENDPOINTS, ids=["classify", "classify_batch"])
def test_a_bad_request_is_refused_with_its_code(
    client: TestClient,
    path: str,
    field: str,
    what: str,
    build: Build,
    status: int,
    code: str,
    fragments: tuple[str, ...],
) -> None:
    response = client.post(path, **build(field))
    assert_error(response, status, code, *(f.format(field=field) for f in fragments))


@pytest.mark.parametrize(
    ("path", "field", "count", "limit"),
    [
        ("/classify", "image", 2, 1),
        ("/classify_batch", "images", MAX_IMAGES + 1, MAX_IMAGES),  # counted after parsing
        ("/classify_batch", "images", MAX_IMAGES + 5, MAX_IMAGES),  # the parser's own file limit
    ],
)
def test_too_many_images(client: TestClient, path: str, field: str, count: int, limit: int) -> None:
    files = [(field, (f"{i}.png", png(seed=i))) for i in range(count)]
    response = client.post(path, files=files)
    word = "image" if limit == 1 else "images"
    assert_error(response, 413, "too_many_images", f"At most {limit} {word} per request")


# --- options -------------------------------------------------------------------------------

OPTION_ERRORS = [
    # (fields, code, in the message)
    ({"top_k": "0"}, "invalid_top_k", "top_k must be an integer from 1 to 7, not '0'"),
    ({"top_k": "8"}, "invalid_top_k", "top_k must be an integer from 1 to 7, not '8'"),  # 7 classes
    ({"top_k": "-1"}, "invalid_top_k", "top_k must be an integer from 1 to 7, not '-1'"),
    ({"top_k": "five"}, "invalid_top_k", "top_k must be an integer from 1 to 7, not 'five'"),
    ({"top_k": "2.0"}, "invalid_top_k", "top_k must be an integer from 1 to 7, not '2.0'"),
    ({"top_k": "0_7"}, "invalid_top_k", "top_k must be an integer from 1 to 7, not '0_7'"),
    ({"top_k": "+3"}, "invalid_top_k", "top_k must be an integer from 1 to 7, not '+3'"),
    ({"attention": "all"}, "invalid_attention", "attention must be one of none, cls, rollout, not 'all'"),
    ({"attention": "CLS"}, "invalid_attention", "attention must be one of none, cls, rollout, not 'CLS'"),
    ({"heatmap": "maybe"}, "invalid_heatmap", "heatmap must be true or false, not 'maybe'"),
    ({"heatmap": "2"}, "invalid_heatmap", "heatmap must be true or false, not '2'"),
    ({"heatmap": "true", "attention": "none"}, "invalid_heatmap", "heatmap needs attention 'cls' or 'rollout', not 'none'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "code", "message"), OPTION_ERRORS, ids=[str(case[0]) for case in OPTION_ERRORS]
)
@pytest.mark.parametrize("sent_as", ["form", "query"])
@pytest.mark.parametrize(("path", "field"), ENDPOINTS, ids=["classify", "classify_batch"])
def test_a_bad_option_is_a_422_naming_it(
    client: TestClient,
    path: str,
    field: str,
    sent_as: str,
    fields: dict[str, str],
    code: str,
    message: str,
) -> None:
    where = {"data": fields} if sent_as == "form" else {"params": fields}
    response = client.post(path, files={field: ("a.png", png())}, **where)
    assert assert_error(response, 422, code) == message + "."


def test_options_are_checked_before_the_image(client: TestClient) -> None:
    response = client.post("/classify", files={"image": ("a.png", b"")}, data={"top_k": "0"})
    assert_error(response, 422, "invalid_top_k")


# --- request ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "echoed"),
    [("abc-123.X_y", True), ("", False), ("has space", False), ("x" * 65, False)],
    ids=["valid", "empty", "space", "too long"],
)
def test_a_valid_request_id_is_echoed_else_one_is_made(
    client: TestClient, given: str, echoed: bool
) -> None:
    response = client.post(
        "/classify", files={"image": ("a.png", b"")}, headers={"x-request-id": given}
    )
    assert response.status_code == 400
    returned = response.headers["x-request-id"]
    if echoed:
        assert returned == given
    else:
        assert REQUEST_ID.match(returned)

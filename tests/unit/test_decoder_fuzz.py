"""Hypothesis fuzzing of the upload path: ``decode_image``, ``inspect_image``, ``read_request``.

Inputs start from the project's sample images and Pillow encodings of every accepted format
(``tests/utils/image_fuzz.py``) and are damaged the ways hostile or broken clients damage them:
flipped, inserted and deleted bytes, truncation, appended junk, declared sizes rewritten in the
header; request bodies are also split into chunks of random sizes, cut off by a disconnect, sent
under lying Content-Lengths and odd content types. For every example:

- only :class:`~service.errors.ApiError` with a 4xx status escapes, never another exception;
- it finishes within ``DEADLINE_S``;
- the peak resident memory it adds stays under a bound set by the pixel limit, so a
  decompression bomb is refused on its header, not decoded.

Short by default (``make test``): ``FUZZ_EXAMPLES`` examples per target (120), derandomized so every
run replays the same inputs. Long (``make fuzz``): ``FUZZ_SECONDS`` seconds shared evenly by the
three targets, in seeded rounds of ``ROUND`` examples (seeds 0, 1, 2, ...). Run with ``-s`` to
see each target's example count, outcomes, slowest example and largest peak.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import os
import string
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.requests import Request

from service.errors import ApiError
from service.model.imaging import ALLOWED_FORMATS, ImageLimits, decode_image, inspect_image
from service.web.reading import read_request
from tests.utils.image_fuzz import PeakRss, damage, image_seeds, set_dimensions, uploads

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
SECONDS = float(os.environ.get("FUZZ_SECONDS", "0"))
ROUND = 500
TARGETS = 3
DEADLINE_S = 2.0

# A 4 MP limit keeps an example that decodes in full (a rewritten header within the limit) to
# tens of milliseconds; the checks are the same at the service's 40 MP (test_bombs_* below).
LIMITS = ImageLimits(max_pixels=4_000_000)
MiB = 1024 * 1024


def memory_bound(limits: ImageLimits) -> int:
    """Most resident memory one decode may add: 24 bytes per allowed pixel (the decoded frame,
    its RGB(A) conversions and the array) plus 64 MiB for the interpreter and libraries."""
    return 64 * MiB + 24 * limits.max_pixels


pytestmark = [
    pytest.mark.timeout(SECONDS + 300 if SECONDS else 300),
    pytest.mark.filterwarnings("ignore"),  # Pillow warns about damaged metadata it skips
]


# --------------------------------------------------------------------------- the runner


@dataclass
class Tally:
    """What one target's run saw: examples, outcomes, slowest example, largest memory peak."""

    name: str
    examples: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0
    peak_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)

    def report(self) -> str:
        top = ", ".join(f"{k}: {n}" for k, n in self.outcomes.most_common())
        return (
            f"{self.name}: {self.examples} examples in {time.perf_counter() - self.started:.1f} s; "
            f"slowest {self.slowest_s * 1e3:.0f} ms, largest peak {self.peak_bytes / MiB:.1f} MiB; "
            f"{top}"
        )


def fuzz(name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], str]) -> Tally:
    """Run ``check`` (which returns an outcome label) on examples of ``strategy`` under the
    deadline and the memory bound; derandomized ``EXAMPLES`` or seeded rounds for the budget."""
    tally = Tally(name)
    bound = memory_bound(LIMITS)

    def one(example: Any) -> None:
        with PeakRss() as rss:
            started = time.perf_counter()
            outcome = check(example)
            elapsed = time.perf_counter() - started
        tally.examples += 1
        tally.outcomes[outcome] += 1
        tally.slowest_s = max(tally.slowest_s, elapsed)
        tally.peak_bytes = max(tally.peak_bytes, rss.peak)
        assert elapsed < DEADLINE_S, f"{outcome} took {elapsed:.2f} s"
        assert rss.peak < bound, f"{outcome} added {rss.peak / MiB:.0f} MiB (bound {bound / MiB})"

    def run(examples: int, round_seed: int | None) -> None:
        test = settings(
            max_examples=examples,
            derandomize=round_seed is None,
            deadline=None,  # ours above times the call alone, not Hypothesis's bookkeeping
            database=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(given(strategy)(one))
        if round_seed is not None:
            test = seed(round_seed)(test)
        test()

    if not SECONDS:
        run(EXAMPLES, None)
        assert tally.examples >= EXAMPLES, tally.report()
    else:
        budget = time.perf_counter() + SECONDS / TARGETS
        for round_seed in itertools.count():
            if time.perf_counter() > budget:
                break
            run(ROUND, round_seed)
    print(tally.report())
    return tally


def refused(exc: ApiError) -> str:
    """Check a refusal is a well-formed client error; its outcome label."""
    assert 400 <= exc.status < 500, repr(exc)
    assert exc.code and isinstance(exc.code, str), repr(exc)
    assert exc.message and isinstance(exc.message, str), repr(exc)
    return f"{exc.status} {exc.code}"


# --------------------------------------------------------------------------- decode / inspect


def check_decode(example: tuple[bytes, int]) -> str:
    data, min_side = example
    try:
        image = decode_image(data, min_short_side=min_side, limits=LIMITS)
    except ApiError as exc:
        return refused(exc)
    pixels = image.pixels
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.flags["C_CONTIGUOUS"]
    assert image.format in ALLOWED_FORMATS
    assert image.sha256 == hashlib.sha256(data).hexdigest()
    assert image.width * image.height <= LIMITS.max_pixels
    assert min(image.width, image.height) >= LIMITS.min_side
    rows, cols = pixels.shape[:2]
    # Reduced, never enlarged, never below the short side asked for (or the image's own).
    assert max(rows, cols) <= max(image.width, image.height)
    assert min(rows, cols) >= min(min_side, image.width, image.height)
    return f"ok {image.format}"


def check_inspect(data: bytes) -> str:
    """The header check agrees with the full decode: same refusal, or same facts (or a 400 when
    the damage is past the header)."""
    try:
        header = inspect_image(data, limits=LIMITS)
    except ApiError as exc:
        outcome = refused(exc)
        with pytest.raises(ApiError) as decoded:
            decode_image(data, min_short_side=32, limits=LIMITS)
        assert (decoded.value.status, decoded.value.code) == (exc.status, exc.code)
        return outcome
    assert header.format in ALLOWED_FORMATS
    assert header.width * header.height <= LIMITS.max_pixels
    try:
        image = decode_image(data, min_short_side=32, limits=LIMITS)
    except ApiError as exc:
        assert (exc.status, exc.code) == (400, "corrupt_image"), repr(exc)
        return f"header ok, {refused(exc)}"
    facts = (image.format, image.mode, image.sha256)
    assert facts == (header.format, header.mode, header.sha256)
    if header.format == "JPEG":  # what inspect_image is for (the device decode)
        assert (image.width, image.height) == (header.width, header.height)
    else:  # a PNG's eXIf chunk may follow its pixels: orientation known only after decoding
        assert {image.width, image.height} == {header.width, header.height}
    return f"ok {header.format}"


def test_decode_image_fuzz() -> None:
    strategy = st.tuples(uploads(), st.sampled_from([1, 8, 32, 224]))
    tally = fuzz("decode_image", strategy, check_decode)
    assert any(k.startswith("ok") for k in tally.outcomes), tally.report()
    assert any(k.startswith("4") for k in tally.outcomes), tally.report()


def test_inspect_image_fuzz() -> None:
    tally = fuzz("inspect_image", uploads(), check_inspect)
    assert any(k.startswith("ok") for k in tally.outcomes), tally.report()


# --------------------------------------------------------------------------- bombs at 40 MP


def _png_bomb(side: int) -> bytes:
    """A real decompression bomb: a side x side greyscale PNG of zeros, ~side²/1000 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _header_bombs() -> list[bytes]:
    """Each accepted format's first seed with its declared size rewritten past the service's
    40 MP, past Pillow's bomb thresholds, or to a 23:1 strip (sides fit WebP's 14-bit fields)."""
    firsts: dict[str, bytes] = {}
    for data in image_seeds():
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format in ALLOWED_FORMATS:
                    firsts.setdefault(img.format, data)
        except Exception:
            continue
    sides = [(6400, 6400), (9460, 9460), (16383, 16383), (16000, 700)]
    return [set_dimensions(data, w, h) for data in firsts.values() for w, h in sides]


@pytest.mark.parametrize("side", [6400, 10000, 14000])
def test_bombs_are_refused_on_the_header(side: int) -> None:
    """At the service's own limits, a real bomb costs neither time nor memory: 413 at once."""
    bomb = _png_bomb(side)
    for check in (
        lambda: decode_image(bomb, min_short_side=224),
        lambda: inspect_image(bomb),
    ):
        with PeakRss() as rss:
            started = time.perf_counter()
            with pytest.raises(ApiError) as info:
                check()
            elapsed = time.perf_counter() - started
        assert (info.value.status, info.value.code) == (413, "too_many_pixels")
        assert elapsed < 0.5 and rss.peak < 16 * MiB, (elapsed, rss.peak)


def test_lying_headers_are_refused_on_the_header() -> None:
    """Every format's header claiming more than 40 MP (or a 23:1 strip): refused, not decoded."""
    bombs = _header_bombs()
    assert len(bombs) == 4 * len(ALLOWED_FORMATS)
    for data in bombs:
        with PeakRss() as rss, pytest.raises(ApiError) as info:
            decode_image(data, min_short_side=224)
        assert info.value.status in (413, 422), repr(info.value)
        assert rss.peak < 16 * MiB, (info.value, rss.peak)


# --------------------------------------------------------------------------- read_request

_SAFE = string.ascii_letters + string.digits
_CHARSETS = ["utf-8", "latin-1", "ascii", "utf-16", "utf-7", "idna", "punycode", "undefined",
             "rot13", "base64", "no-such-charset", ""]  # fmt: skip


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None  # None: a plain field


@dataclass(frozen=True)
class Wire:
    """One request as it arrives: headers, body chunks, how it ends, and what we know of it."""

    content_type: str | None
    content_length: str | None
    query: bytes
    chunks: tuple[bytes, ...]
    disconnect: bool
    max_files: int
    max_body_bytes: int
    file_field: str
    parts: tuple[Part, ...] | None  # the multipart form as built, before any damage
    raw: bool
    clean: bool  # undamaged, honest, complete: the answer is known exactly

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def _multipart(parts: list[Part], boundary: str) -> bytes:
    out = []
    for part in parts:
        disposition = f'form-data; name="{part.name}"'
        if part.filename is not None:
            disposition += f'; filename="{part.filename}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if part.filename is not None:
            head += "Content-Type: application/octet-stream\r\n"
        out.append(head.encode("utf-8") + b"\r\n" + part.data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


@st.composite
def _parts(draw: st.DrawFn, file_field: str, max_files: int) -> tuple[list[Part], bool]:
    """The images under ``file_field`` (sometimes none, sometimes too many) among other parts."""
    weird = draw(st.integers(0, 3)) == 0  # names and filenames outside the oracle
    filenames = st.text(_SAFE, min_size=1, max_size=12)
    if weird:
        filenames = filenames | st.text(max_size=12)
    count = draw(st.integers(1, max_files) | st.integers(0, max_files + 2))
    parts = [Part(file_field, draw(uploads()), draw(filenames)) for _ in range(count)]
    names = st.sampled_from(["image", "images", "top_k", "attention", "heatmap"])
    for _ in range(draw(st.integers(0, 3))):
        name = draw(names | st.text(max_size=12) if weird else names)
        if draw(st.booleans()):
            part = Part(name, draw(uploads()), draw(filenames))
        else:
            part = Part(name, draw(st.text(_SAFE, max_size=8)).encode(), None)
        parts.insert(draw(st.integers(0, len(parts))), part)
    return parts, weird


@st.composite
def wires(draw: st.DrawFn) -> Wire:
    batch = draw(st.booleans())
    file_field, max_files = ("images", draw(st.sampled_from([2, 4]))) if batch else ("image", 1)
    max_body = draw(st.sampled_from([1024 * 1024, 1024 * 1024, 64 * 1024, 512]))
    query = draw(
        st.sampled_from([b"", b"top_k=3", b"attention=rollout&heatmap=1", b"top_k=%ff&&=x"])
        | st.binary(max_size=32)
    )
    kind = draw(st.sampled_from(["multipart"] * 6 + ["raw", "octet", "other", "none"]))
    parts: tuple[Part, ...] | None = None
    content_type: str | None
    clean = True
    if kind == "multipart":
        boundary = draw(st.text(_SAFE, min_size=8, max_size=40))
        built, weird = draw(_parts(file_field, max_files))
        parts = tuple(built)
        body = _multipart(built, boundary)
        clean = not weird and all(boundary.encode() not in p.data for p in built)
        charset = draw(st.sampled_from([None, None, "utf-8", *_CHARSETS]))
        content_type = f"multipart/form-data; boundary={boundary}"
        if charset is not None:
            content_type += f"; charset={charset}"
            clean &= charset in ("utf-8", "ascii")
        if draw(st.integers(0, 9)) == 0:  # no boundary, a quoted one, or junk parameters
            content_type = draw(
                st.sampled_from(
                    ["multipart/form-data", f'multipart/form-data; boundary="{boundary}"']
                )
                | st.text(max_size=40).map(lambda s: f"multipart/form-data; {s}")
            )
            clean = False
    else:
        body = draw(uploads())
        content_type = {
            "raw": draw(st.sampled_from(["image/png", "image/jpeg", "IMAGE/WEBP; q=1"])),
            "octet": "application/octet-stream",
            "other": draw(st.sampled_from(["application/json", "text/plain", "multipart/mixed"])),
            "none": None,
        }[kind]
    for _ in range(draw(st.integers(0, 3)) if draw(st.booleans()) else 0):
        body = draw(damage(body))
        clean = False
    # Cut anywhere, and often within the first bytes where the boundary and part headers are;
    # a repeated cut is an empty chunk.
    cuts = draw(st.lists(st.integers(0, len(body)), max_size=8))
    cuts += draw(st.lists(st.integers(0, min(len(body), 256)), max_size=16))
    edges = [0, *sorted(cuts), len(body)]
    chunks = [body[a:b] for a, b in itertools.pairwise(edges)]
    length = draw(st.sampled_from(["exact", "exact", "absent", "more", "less", "huge", "junk"]))
    content_length = {
        "exact": str(len(body)),
        "absent": None,
        "more": str(len(body) + 100),
        "less": str(max(0, len(body) - 100)),
        "huge": str(2**63),
        # Latin-1 digits other than 0-9 ("\xb2" is ²) pass str.isdigit but not int().
        "junk": draw(st.sampled_from(["-1", "12abc", " 5", "", "\xb2", "1\xb9"])),
    }[length]
    clean &= length in ("exact", "absent")
    disconnect = draw(st.integers(0, 9)) == 0
    clean &= not disconnect
    return Wire(
        content_type,
        content_length,
        query,
        tuple(chunks),
        disconnect,
        max_files,
        max_body,
        file_field,
        parts,
        kind in ("raw", "octet"),
        clean,
    )


def _request(wire: Wire) -> Request:
    headers = []
    if wire.content_type is not None:
        headers.append((b"content-type", wire.content_type.encode("utf-8")))
    if wire.content_length is not None:
        headers.append((b"content-length", wire.content_length.encode("latin-1")))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/classify",
        "query_string": wire.query,
        "headers": headers,
    }
    messages = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in wire.chunks]
    messages.append(
        {"type": "http.disconnect"}
        if wire.disconnect
        else {"type": "http.request", "body": b"", "more_body": False}
    )
    queue = iter(messages)

    async def receive() -> dict[str, Any]:
        return next(queue, {"type": "http.disconnect"})

    return Request(scope, receive)


def _expected(wire: Wire) -> tuple[int, str]:
    """What read_request must answer for a clean request: (status, code) of its refusal, or
    (0, "raw" / "form") for a parse that must equal what was sent."""
    size = len(wire.body)
    if wire.content_length is not None and int(wire.content_length) > wire.max_body_bytes:
        return 413, "body_too_large"
    if wire.raw:
        return (413, "body_too_large") if size > wire.max_body_bytes else (0, "raw")
    if wire.parts is None:
        return 415, "unsupported_media_type"
    if size > wire.max_body_bytes:
        return 413, "body_too_large"
    files = [p for p in wire.parts if p.filename is not None]
    if len(files) > wire.max_files + 1:  # the parser's own file limit counts every field
        return 413, "too_many_images"
    mine = [p for p in files if p.name == wire.file_field]
    if len(mine) > wire.max_files:
        return 413, "too_many_images"
    if not mine:
        return 400, "missing_image"
    return (0, "form")


def check_read(runner: asyncio.Runner, wire: Wire) -> str:
    try:
        parsed = runner.run(
            read_request(
                _request(wire),
                file_field=wire.file_field,
                max_files=wire.max_files,
                max_body_bytes=wire.max_body_bytes,
            )
        )
    except ApiError as exc:
        outcome = refused(exc)
        if wire.clean:
            assert (exc.status, exc.code) == _expected(wire), (repr(exc), wire)
        return outcome
    assert 1 <= len(parsed.uploads) == parsed.file_count <= wire.max_files
    assert sum(len(u.data) for u in parsed.uploads) <= wire.max_body_bytes
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.fields.items())
    if wire.clean:
        expected = _expected(wire)
        assert expected[0] == 0, (expected, wire)
        if wire.raw:
            assert [u.data for u in parsed.uploads] == [wire.body]
        else:
            assert wire.parts is not None
            sent = [p for p in wire.parts if p.filename is not None and p.name == wire.file_field]
            assert [(u.data, u.filename) for u in parsed.uploads] == [
                (p.data, p.filename) for p in sent
            ]
            for part in wire.parts:
                if part.filename is None:
                    last = [p for p in wire.parts if p.name == part.name and p.filename is None][-1]
                    assert parsed.fields[part.name] == last.data.decode()
    return f"ok {len(parsed.uploads)} upload(s)"


def test_read_request_fuzz() -> None:
    with asyncio.Runner() as runner:
        tally = fuzz("read_request", wires(), lambda wire: check_read(runner, wire))
    assert any(k.startswith("ok") for k in tally.outcomes), tally.report()


# --------------------------------------------------------------------------- what it found


def _wire(content_type: str, body: bytes, content_length: str | None) -> Wire:
    return Wire(content_type, content_length, b"", (body,), False, 1, 1024, "image", None, False,
                False)  # fmt: skip


@pytest.mark.parametrize("charset", ["punycode", "undefined"])
def test_multipart_charset_that_cannot_decode_is_400(charset: str) -> None:
    """Starlette decodes part headers in the declared charset and lets these codecs' plain
    UnicodeError out: it was a 500 ``internal_error``."""
    body = _multipart([Part("image", b"abc", "a.png")], "XB")
    wire = _wire(f"multipart/form-data; boundary=XB; charset={charset}", body, None)
    with asyncio.Runner() as runner:
        assert check_read(runner, wire) == "400 malformed_multipart"


@pytest.mark.parametrize("declared", ["\xb2", "1\xb9"])
def test_content_length_of_non_ascii_digits_is_not_a_number(declared: str) -> None:
    """'²'.isdigit() is true but int('²') raises: it was a 500 ``internal_error``."""
    with asyncio.Runner() as runner:
        assert check_read(runner, _wire("image/png", b"png bytes", declared)) == "ok 1 upload(s)"

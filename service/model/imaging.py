"""Decode and validate uploaded images with Pillow and numpy only (no torch).

``decode_image`` turns the bytes of one upload into a size-bounded, C-contiguous
uint8 RGB array, or raises :class:`~service.errors.ApiError` carrying the HTTP status,
an error code and a message for the client. Every 4xx about an image
starts here.

The decoder is written for hostile input: formats are allow-listed before any
pixel is decoded, the pixel count is checked on the header, Pillow's
decompression-bomb warning is an error, truncated files are never accepted, and
any exception Pillow raises while parsing becomes a 400 rather than a 500.

To keep large photos cheap, the returned array may be smaller than the upload:
JPEGs are decoded at a reduced DCT scale (draft mode) and the result is then
box-reduced by an integer factor, never below the short side the caller needs.
``DecodedImage.width``/``height`` always report the original, EXIF-oriented size.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from ..errors import ApiError

__all__ = [
    "ALLOWED_FORMATS",
    "DecodedImage",
    "ImageHeader",
    "ImageLimits",
    "decode_image",
    "inspect_image",
]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})

# Most common first: Image.open tries the plugins in this order.
_OPEN_ORDER = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_ACCEPTED = ", ".join(sorted(ALLOWED_FORMATS))

# Pillow reports multi-picture JPEGs (phone cameras with depth maps, stereo
# shots) as "MPO"; its first frame is an ordinary baseline JPEG, so it is
# allowed and reported as JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}

_WHITE = (255, 255, 255)
_ORIENTATION_TAG = 0x0112
# The table ImageOps.exif_transpose uses. We transpose ourselves because
# exif_transpose copies the whole image when there is nothing to do and
# re-serialises the EXIF block, which can raise on malformed EXIF that we
# otherwise tolerate.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class ImageLimits:
    """Bounds an upload must satisfy before its pixels are decoded."""

    max_pixels: int = 40_000_000
    min_side: int = 8
    max_aspect_ratio: float = 20.0


# eq=False: the generated __eq__/__hash__ would compare or hash an ndarray,
# which raises; identity semantics are the useful ones here.
@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One decoded upload: RGB pixels (possibly reduced) plus facts about the original."""

    pixels: np.ndarray
    width: int
    height: int
    format: str
    mode: str
    sha256: str


def decode_image(
    data: bytes, *, min_short_side: int, limits: ImageLimits = ImageLimits()
) -> DecodedImage:
    """Decode ``data`` into an RGB uint8 array whose short side is >= ``min_short_side``.

    The short side is only ever reduced, never enlarged: an image already smaller
    than ``min_short_side`` keeps its size. Raises :class:`~service.errors.ApiError` for anything
    wrong with the upload, and ``ValueError`` for a bad ``min_short_side``.
    """
    if min_short_side < 1:
        raise ValueError(f"min_short_side must be >= 1, got {min_short_side}")
    return _guarded(data, lambda digest: _decode(data, digest, min_short_side, limits))


def image_from_pixels(
    pixels: np.ndarray, *, min_short_side: int, limits: ImageLimits = ImageLimits()
) -> DecodedImage:
    """RGB pixels a client decoded itself (uint8 HxWx3), checked and reduced as an upload's
    would be: the same size limits, the same whole-factor reduction of the short side."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 HxWx3, not {pixels.dtype} {pixels.shape}")
    h, w = int(pixels.shape[0]), int(pixels.shape[1])
    _check_size(w, h, limits)
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    factor = min(w, h) // min_short_side
    if factor >= 2:
        pixels = np.array(Image.fromarray(pixels, "RGB").reduce(factor), dtype=np.uint8)
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels),
        width=w,
        height=h,
        format="RAW",
        mode="RGB",
        sha256=digest,
    )


@dataclass(frozen=True)
class ImageHeader:
    """What an upload's header says, checked against the limits; no pixel decoded."""

    width: int  # EXIF-oriented
    height: int
    format: str
    mode: str
    sha256: str


def inspect_image(data: bytes, *, limits: ImageLimits = ImageLimits()) -> ImageHeader:
    """Every check ``decode_image`` makes before decoding pixels, for uploads that are decoded
    elsewhere (JPEGs decoded on the GPU): same errors, same statuses."""
    return _guarded(data, lambda digest: _inspect(data, digest, limits))


def _guarded(data: bytes, work: Callable[[str], _T]) -> _T:
    """Run ``work(sha256)`` with every failure of hostile input turned into its ApiError."""
    if not data:
        raise ApiError(400, "empty_image", "The uploaded image is empty (0 bytes).")
    digest = hashlib.sha256(data).hexdigest()

    # Locally, so a bomb between MAX_IMAGE_PIXELS and twice that is refused too
    # rather than logged; the global filters are restored on exit.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return work(digest)
        except ApiError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            logger.debug("decompression bomb refused: %s", exc)
            raise ApiError(
                413,
                "too_many_pixels",
                f"The image is too large to decode safely: {exc}",
            ) from exc
        except Exception as exc:
            # Hostile or damaged input reaches many code paths in the decoders;
            # whatever they raise, the fault is in the upload.
            logger.debug("corrupt image (%s): %s", type(exc).__name__, exc)
            raise ApiError(
                400,
                "corrupt_image",
                f"The image could not be decoded; it is corrupt or truncated ({str(exc)[:200]}).",
            ) from exc


def _inspect(data: bytes, digest: str, limits: ImageLimits) -> ImageHeader:
    with _open(data) as img:
        fmt = img.format or ""
        fmt = _FORMAT_ALIASES.get(fmt, fmt)
        w, h = img.size
        _check_size(w, h, limits)
        if fmt == "JPEG" and not _jpeg_is_whole(data):
            # nvJPEG decodes a truncated file without complaint (the rest grey); Pillow, which
            # decodes everything else, refuses it. The device path must refuse it too.
            raise ApiError(
                400,
                "corrupt_image",
                "The image could not be decoded; it is corrupt or truncated (the JPEG ends "
                "before its end-of-image marker).",
            )
        if _orientation(img) in _SWAPS_AXES:
            w, h = h, w
        return ImageHeader(width=w, height=h, format=fmt, mode=img.mode, sha256=digest)


_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RST0-7: no length


def _jpeg_is_whole(data: bytes) -> bool:
    """Whether a JPEG's image data ends with its end-of-image marker (``FF D9``).

    Walks the marker segments from the start to the first scan (SOS) as libjpeg does (bytes
    between segments that are not a marker are skipped), then looks for EOI after it: inside
    entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so ``FF D9``
    there is the real end, and one in an EXIF thumbnail (before the scan) is not mistaken for
    it. Bytes after EOI are allowed, as Pillow allows them. Only a file with a scan and no end
    is refused: anything stranger is left to the decoder.
    """
    at = 2  # after SOI
    while True:
        at = data.find(b"\xff", at)
        if at < 0 or at + 1 >= len(data):
            return True  # no scan found: not a truncation this check can see
        marker = data[at + 1]
        if marker in (0x00, 0xFF):  # a stuffed zero or a fill byte: not a marker yet
            at += 1
        elif marker in _JPEG_STANDALONE or marker == 0xD9:
            at += 2
        elif marker == 0xDA:  # SOS: the image data follows its header
            length = int.from_bytes(data[at + 2 : at + 4], "big")
            return data.find(b"\xff\xd9", at + 2 + length) >= 0
        else:
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")


def _decode(data: bytes, digest: str, min_short_side: int, limits: ImageLimits) -> DecodedImage:
    img = _open(data)
    with img:
        fmt = img.format or ""
        fmt = _FORMAT_ALIASES.get(fmt, fmt)
        mode = img.mode
        w, h = img.size
        _check_size(w, h, limits)

        if fmt == "JPEG":
            _draft(img, min_short_side)
        img.load()  # first frame only for animations

        orientation = _orientation(img)
        rgb = _to_rgb(img)
        if orientation in _TRANSPOSE:
            rgb = rgb.transpose(_TRANSPOSE[orientation])
        factor = min(rgb.size) // min_short_side
        if factor >= 2:
            rgb = rgb.reduce(factor)
        # Inside the block: closing the file also releases the pixels of
        # ``img``, and ``rgb`` may still be ``img`` itself.
        pixels = np.ascontiguousarray(np.array(rgb, dtype=np.uint8))

    if orientation in _SWAPS_AXES:
        w, h = h, w
    if pixels.ndim != 3 or pixels.shape[2] != 3:  # defensive: _to_rgb always yields RGB
        raise ValueError(f"unexpected decoded shape {pixels.shape}")
    return DecodedImage(pixels=pixels, width=w, height=h, format=fmt, mode=mode, sha256=digest)


def _open(data: bytes) -> Image.Image:
    """Open (header only) an allowed format, or raise the right ApiError."""
    try:
        return Image.open(io.BytesIO(data), formats=_OPEN_ORDER)
    except Image.UnidentifiedImageError:
        pass

    fmt = _identify(bytes(data[:16]))
    if fmt is None:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"The upload is not a recognised image; accepted formats: {_ACCEPTED}.",
        )
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt in ALLOWED_FORMATS:
        # Starts like an allowed format, but its header does not parse.
        raise ApiError(
            400,
            "corrupt_image",
            f"The image looks like {fmt} but its header is corrupt or truncated.",
        )
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Image format {fmt} is not accepted; accepted formats: {_ACCEPTED}.",
    )


def _identify(prefix: bytes) -> str | None:
    """Name the format whose signature ``prefix`` carries, for the error message only.

    Only Pillow's signature tests run, never a plugin's parser: opening some
    formats (ICO, for one) decodes pixels, and none of that code should see
    bytes we are about to refuse. Formats without a signature test (TGA, IM...)
    go unnamed.
    """
    Image.init()
    for fmt in (*_OPEN_ORDER, *Image.ID):
        opener = Image.OPEN.get(fmt)
        accept = opener[1] if opener else None
        if accept is None:
            continue
        try:
            # A string result means "this format, but its codec is missing".
            if accept(prefix):
                return fmt
        except Exception:
            continue
    return None


def _check_size(w: int, h: int, limits: ImageLimits) -> None:
    pixels = w * h
    if pixels > limits.max_pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"The image is {w}x{h} = {pixels:,} pixels; the limit is {limits.max_pixels:,} pixels.",
        )
    short, long = min(w, h), max(w, h)
    if short < max(limits.min_side, 1):  # never divide by a zero side below
        raise ApiError(
            422,
            "degenerate_image",
            f"The image is {w}x{h}; each side must be at least {limits.min_side} pixels.",
        )
    if long / short > limits.max_aspect_ratio:
        raise ApiError(
            422,
            "degenerate_image",
            f"The image is {w}x{h}; its aspect ratio {long / short:.1f}:1 exceeds "
            f"{limits.max_aspect_ratio:g}:1.",
        )


def _draft(img: Image.Image, min_short_side: int) -> None:
    """Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode that keeps the short side big enough."""
    w, h = img.size
    short = min(w, h)
    if short // min_short_side < 2:
        return
    # Pillow picks the largest scale s in {8, 4, 2, 1} with w//need_w >= s and
    # h//need_h >= s, and decodes ceil(w/s) x ceil(h/s), so neither side drops
    # below what we ask for.
    need_w = -(-w * min_short_side // short)
    need_h = -(-h * min_short_side // short)
    img.draft("RGB", (need_w, need_h))


def _orientation(img: Image.Image) -> int:
    """EXIF (or XMP) orientation 1..8; a malformed block counts as upright."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return value if isinstance(value, int) and value in range(1, 9) else 1
    except Exception as exc:
        # A damaged metadata block should not cost the user a readable photo.
        logger.debug("ignoring unreadable EXIF: %s", exc)
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha over white, high bit depths scaled, not clipped."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        # Pillow's own convert clips these to 0..255, which turns a 16-bit
        # gradient white; scale the range instead. Transparency is dropped.
        return Image.fromarray(_high_bit_to_u8(np.asarray(img), mode)).convert("RGB")
    if mode == "La":
        img = img.convert("LA")  # no direct La -> RGBA conversion exists
    if img.has_transparency_data:
        # Covers alpha modes, P with a tRNS/transparency index or RGBA palette,
        # and L/RGB with a colour key: RGBA first, then composite.
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    # 1, L, P, CMYK (Adobe inversion already undone by the decoder), YCbCr,
    # LAB, HSV, RGBX...
    return img.convert("RGB")


def _high_bit_to_u8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16-bit, 32-bit integer or float single-band array to uint8."""
    if mode in _SIXTEEN_BIT_MODES:
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            # Most often 16-bit samples widened to 32 bits by the decoder.
            return (arr >> 8).astype(np.uint8)
        return _min_max(arr.astype(np.float64))
    # "F"
    farr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if farr.min() >= 0.0 and farr.max() <= 255.0:
        return np.rint(farr).astype(np.uint8)
    return _min_max(farr)


def _min_max(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)

"""Unit tests for service.model.imaging: decoding, validation and error mapping of uploads.

Every image is generated in memory with Pillow or numpy; nothing is read from disk.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from service.errors import ApiError
from service.model import imaging
from service.model.imaging import (
    ALLOWED_FORMATS,
    DecodedImage,
    ImageLimits,
    decode_image,
    inspect_image,
)

RED = (220, 20, 30)
GREEN = (20, 200, 40)
BLUE = (30, 40, 210)
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def solid(
    color: tuple[int, ...], size: tuple[int, int] = (64, 48), mode: str = "RGB"
) -> Image.Image:
    return Image.new(mode, size, color)


def mean_rgb(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(pixels, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def assert_close(actual: Any, expected: Any, tol: float) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    assert np.all(np.abs(actual - np.asarray(expected, dtype=np.float64)) <= tol), (
        actual,
        expected,
    )


def assert_well_formed(d: DecodedImage) -> None:
    assert d.pixels.dtype == np.uint8
    assert d.pixels.ndim == 3 and d.pixels.shape[2] == 3
    assert d.pixels.flags["C_CONTIGUOUS"]


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height whose only IDAT is garbage: decoding it would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"junk") + chunk(b"IEND", b"")
    )


def gradient_rgb(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8))


def half_red_half_blue(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    return img


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """A 12 MP (4000x3000) JPEG: red left half, blue right half."""
    return encode(half_red_half_blue(4000, 3000), "JPEG", quality=85)


LoadSpy = list[tuple[str | None, tuple[int, int]]]


@pytest.fixture
def load_spy(monkeypatch: pytest.MonkeyPatch) -> LoadSpy:
    """Records (format, size) of every ImageFile whose pixels get loaded."""
    loaded: LoadSpy = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        loaded.append((self.format, self.size))
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return loaded


# --------------------------------------------------------------------------- errors


def test_errors_are_api_errors_with_status_code_message() -> None:
    with pytest.raises(ApiError) as info:
        decode_image(b"", min_short_side=8)
    assert (info.value.status, info.value.code) == (400, "empty_image")
    assert info.value.body() == {"error": {"code": "empty_image", "message": info.value.message}}


def test_public_api() -> None:
    assert set(imaging.__all__) == {
        "ALLOWED_FORMATS",
        "DecodedImage",
        "ImageHeader",
        "ImageLimits",
        "inspect_image",
        "decode_image",
    }
    assert frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"}) == ALLOWED_FORMATS
    assert ImageLimits() == ImageLimits(max_pixels=40_000_000, min_side=8, max_aspect_ratio=20.0)


# --------------------------------------------------------------------------- allowed formats

# (format, save kwargs, colour tolerance): lossy formats get a looser tolerance;
# GIF goes through a 256-colour palette.
ALLOWED_CASES = [
    ("JPEG", {"quality": 95}, 6),
    ("PNG", {}, 0),
    ("WEBP", {"lossless": True}, 0),
    ("WEBP", {"quality": 90}, 8),
    ("GIF", {}, 8),
    ("BMP", {}, 0),
]


@pytest.mark.parametrize(("fmt", "save", "tol"), ALLOWED_CASES)
def test_allowed_format_decodes(fmt: str, save: dict[str, Any], tol: int) -> None:
    data = encode(solid(GREEN), fmt, **save)
    d = decode_image(data, min_short_side=32)
    assert_well_formed(d)
    assert d.format == fmt
    assert (d.width, d.height) == (64, 48)
    assert d.pixels.shape == (48, 64, 3)
    assert_close(mean_rgb(d.pixels), GREEN, tol)


# (format, save kwargs, expected mode): the mode reported is the upload's own.
MODE_REPORT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("JPEG", {}, "RGB"),
    ("GIF", {}, "P"),
    ("PNG", {}, "RGB"),
]


@pytest.mark.parametrize(("fmt", "save", "mode"), MODE_REPORT_CASES)
def test_mode_reports_upload_mode(fmt: str, save: dict[str, Any], mode: str) -> None:
    assert decode_image(encode(solid(BLUE), fmt, **save), min_short_side=8).mode == mode


# Animated uploads: only the first frame (red) is used.
ANIMATED_CASES = [
    ("GIF", {"duration": 100, "loop": 0}, 8),
    ("WEBP", {"duration": 100, "lossless": True}, 0),
    ("PNG", {"duration": 100}, 0),  # APNG
]


@pytest.mark.parametrize(("fmt", "save", "tol"), ANIMATED_CASES)
def test_animated_uses_first_frame(fmt: str, save: dict[str, Any], tol: int) -> None:
    frames = [solid(c, (32, 32)) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **save)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3  # really animated
    d = decode_image(data, min_short_side=32)
    assert d.format == fmt
    assert_close(mean_rgb(d.pixels), RED, tol)


def test_mpo_is_reported_as_jpeg() -> None:
    # Multi-picture JPEGs (common from phone cameras) open as MPO in Pillow.
    data = encode(solid(RED), "MPO", save_all=True, append_images=[solid(BLUE)])
    d = decode_image(data, min_short_side=8)
    assert d.format == "JPEG"
    assert_close(mean_rgb(d.pixels), RED, 8)


# --------------------------------------------------------------------------- 415 / 400


# (format Pillow can write, name expected in the message): formats Pillow
# recognises but the service refuses. They are named from their signature alone;
# TGA has none of its own (its header happens to match CUR's test), so the
# name in the message is best effort, the status is not.
REFUSED_FORMATS = [
    ("TIFF", "TIFF"),
    ("ICO", "ICO"),  # Pillow's ICO plugin decodes pixels in open(): must not be opened
    ("PPM", "PPM"),
    ("PCX", "PCX"),
    ("SGI", "SGI"),
    ("QOI", "QOI"),
    ("DDS", "DDS"),
    ("JPEG2000", "JPEG2000"),
    ("TGA", None),
]


@pytest.mark.parametrize(("fmt", "named"), REFUSED_FORMATS)
def test_recognised_but_refused_format_is_415(
    fmt: str, named: str | None, load_spy: LoadSpy
) -> None:
    data = encode(solid(RED), fmt)
    with pytest.raises(ApiError) as info:
        decode_image(data, min_short_side=8)
    assert (info.value.code, info.value.status) == ("unsupported_media_type", 415)
    if named is not None:
        assert named in info.value.message
    for allowed in ALLOWED_FORMATS:
        assert allowed in info.value.message
    assert load_spy == []  # never decoded pixels of a refused format


NOT_IMAGES = [
    pytest.param(np.random.default_rng(0).bytes(4096), id="random-bytes"),
    pytest.param(b"hello, this is definitely not an image\n" * 10, id="text"),
    pytest.param(b"<!doctype html><html><body>hi</body></html>", id="html"),
    pytest.param(b'{"image": "base64..."}', id="json"),
    pytest.param(b"\x00" * 512, id="zeros"),
    pytest.param(b"x", id="one-byte"),
]


@pytest.mark.parametrize("data", NOT_IMAGES)
def test_not_an_image_is_415(data: bytes) -> None:
    with pytest.raises(ApiError) as info:
        decode_image(data, min_short_side=8)
    assert (info.value.code, info.value.status) == ("unsupported_media_type", 415)
    assert "JPEG" in info.value.message and "PNG" in info.value.message


@pytest.mark.parametrize("data", [b"", bytearray()])
def test_empty_is_400(data: bytes) -> None:
    with pytest.raises(ApiError) as info:
        decode_image(data, min_short_side=8)
    assert (info.value.code, info.value.status) == ("empty_image", 400)


def _truncated(fmt: str) -> bytes:
    data = encode(gradient_rgb(256, 192), fmt)
    return data[: len(data) // 2]


# (name, bytes): damaged files of an allowed format.
CORRUPT_CASES = [
    pytest.param(_truncated("JPEG"), id="jpeg-cut-in-half"),
    pytest.param(_truncated("PNG"), id="png-cut-in-half"),
    pytest.param(_truncated("GIF"), id="gif-cut-in-half"),
    pytest.param(_truncated("BMP"), id="bmp-cut-in-half"),
    pytest.param(_truncated("WEBP"), id="webp-cut-in-half"),
    pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
    pytest.param(b"\xff\xd8\xff\xe0" + b"\x00" * 40, id="jpeg-signature-garbage"),
    pytest.param(png_header(64, 64), id="png-garbage-idat"),
]


@pytest.mark.parametrize("data", CORRUPT_CASES)
def test_corrupt_or_truncated_is_400(data: bytes) -> None:
    with pytest.raises(ApiError) as info:
        decode_image(data, min_short_side=8)
    assert (info.value.code, info.value.status) == ("corrupt_image", 400)


def test_truncated_images_stay_refused() -> None:
    # The module must never flip Pillow's global switch to accept truncated files.
    with pytest.raises(ApiError):
        decode_image(_truncated("JPEG"), min_short_side=8)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --------------------------------------------------------------------------- 413


# (width, height): headers over the 40 MP default, under Pillow's own bomb limit,
# so the module's own check answers. The IDAT is garbage: decoding would be a 400.
@pytest.mark.parametrize(("width", "height"), [(7000, 7000), (40_001, 1000), (6325, 6325)])
def test_header_over_pixel_limit_is_413_without_decoding(
    width: int, height: int, load_spy: LoadSpy
) -> None:
    with pytest.raises(ApiError) as info:
        decode_image(png_header(width, height), min_short_side=8)
    assert (info.value.code, info.value.status) == ("too_many_pixels", 413)
    assert f"{width * height:,}" in info.value.message
    assert "40,000,000" in info.value.message
    assert load_spy == []


def test_huge_header_hits_pillow_bomb_error() -> None:
    # 100000 x 100000 is over twice Pillow's MAX_IMAGE_PIXELS: it refuses in open().
    with pytest.raises(ApiError) as info:
        decode_image(png_header(100_000, 100_000), min_short_side=8)
    assert (info.value.code, info.value.status) == ("too_many_pixels", 413)


# (side, max_pixels, refused): the limit is "more than", not "at least".
@pytest.mark.parametrize(
    ("side", "max_pixels", "refused"),
    [(100, 9_999, True), (100, 10_000, False), (100, 10_001, False)],
)
def test_custom_pixel_limit(side: int, max_pixels: int, refused: bool) -> None:
    data = encode(solid(RED, (side, side)), "PNG")
    limits = ImageLimits(max_pixels=max_pixels)
    if refused:
        with pytest.raises(ApiError) as info:
            decode_image(data, min_short_side=8, limits=limits)
        assert info.value.status == 413
    else:
        assert decode_image(data, min_short_side=8, limits=limits).width == side


# (side, which Pillow path): with MAX_IMAGE_PIXELS = 1000, 40x40 only warns in
# Pillow (turned into an error here) and 50x50 is over twice the limit (an error).
@pytest.mark.parametrize("side", [40, 50])
def test_decompression_bomb_is_413(monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(solid(RED, (side, side)), "PNG")
    filters_before = list(warnings.filters)
    with pytest.raises(ApiError) as info:
        decode_image(data, min_short_side=8, limits=ImageLimits(max_pixels=10**12))
    assert (info.value.code, info.value.status) == ("too_many_pixels", 413)
    assert list(warnings.filters) == filters_before  # no global warnings state leaked


# --------------------------------------------------------------------------- 422


# (size, limits or None for defaults, refused)
DEGENERATE_CASES = [
    ((4, 100), None, True),  # a side under 8
    ((100, 4), None, True),
    ((7, 7), None, True),
    ((1000, 10), None, True),  # 100:1
    ((10, 1000), None, True),
    ((168, 8), None, True),  # 21:1
    ((8, 8), None, False),  # exactly the minimum side
    ((160, 8), None, False),  # exactly 20:1
    ((4, 100), ImageLimits(min_side=1, max_aspect_ratio=30.0), False),
    ((100, 100), ImageLimits(min_side=101), True),
    ((300, 100), ImageLimits(max_aspect_ratio=2.5), True),
]


@pytest.mark.parametrize(("size", "limits", "refused"), DEGENERATE_CASES)
def test_degenerate_images(
    size: tuple[int, int], limits: ImageLimits | None, refused: bool
) -> None:
    data = encode(solid(RED, size), "PNG")
    kwargs = {"limits": limits} if limits is not None else {}
    if refused:
        with pytest.raises(ApiError) as info:
            decode_image(data, min_short_side=8, **kwargs)
        assert (info.value.code, info.value.status) == ("degenerate_image", 422)
    else:
        d = decode_image(data, min_short_side=8, **kwargs)
        assert (d.width, d.height) == size


# --------------------------------------------------------------------------- EXIF orientation


def _with_red_corner(width: int, height: int) -> Image.Image:
    """Blue image with a red block in the stored top-left corner."""
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 4, height // 4))
    return img


def _corner(pixels: np.ndarray, where: str) -> np.ndarray:
    h, w = pixels.shape[:2]
    k = max(2, min(h, w) // 10)
    rows = slice(0, k) if where[0] == "t" else slice(h - k, h)
    cols = slice(0, k) if where[1] == "l" else slice(w - k, w)
    return mean_rgb(pixels[rows, cols])


# (orientation, where the stored top-left corner is displayed, axes swapped)
ORIENTATION_CASES = [
    (1, "tl", False),
    (2, "tr", False),  # mirrored
    (3, "br", False),  # rotated 180
    (4, "bl", False),  # flipped vertically
    (5, "tl", True),  # transposed
    (6, "tr", True),  # rotated 90 CW to display
    (7, "br", True),  # transversed
    (8, "bl", True),  # rotated 90 CCW to display
]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize(("orientation", "corner", "swapped"), ORIENTATION_CASES)
def test_exif_orientation(fmt: str, orientation: int, corner: str, swapped: bool) -> None:
    img = _with_red_corner(80, 48)
    exif = img.getexif()
    exif[0x0112] = orientation
    data = encode(img, fmt, exif=exif.tobytes(), quality=95)
    d = decode_image(data, min_short_side=48)
    expected = (48, 80) if swapped else (80, 48)
    assert (d.width, d.height) == expected
    assert d.pixels.shape[:2] == (expected[1], expected[0])
    assert_close(_corner(d.pixels, corner), RED, 25)
    for other in {"tl", "tr", "bl", "br"} - {corner}:
        assert_close(_corner(d.pixels, other), BLUE, 25)


def test_exif_orientation_with_draft(big_jpeg: bytes) -> None:
    img = Image.open(io.BytesIO(big_jpeg))
    exif = img.getexif()
    exif[0x0112] = 6
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=85)
    d = decode_image(data, min_short_side=32)
    assert (d.width, d.height) == (3000, 4000)
    h, w = d.pixels.shape[:2]
    assert h > w and 32 <= w < 64
    # Red was the stored left half, so after a 90 degree CW turn it is the top half.
    assert_close(mean_rgb(d.pixels[: h // 3]), RED, 12)
    assert_close(mean_rgb(d.pixels[-(h // 3) :]), BLUE, 12)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_is_ignored() -> None:
    data = encode(solid(RED), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff garbage")
    d = decode_image(data, min_short_side=8)
    assert (d.width, d.height) == (64, 48)


# --------------------------------------------------------------------------- modes -> RGB


def _rgba_png() -> bytes:
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent black
    img.paste((*RED, 255), (0, 0, 16, 32))  # opaque red left half
    return encode(img, "PNG")


def _p_transparent(fmt: str) -> bytes:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * (254 * 3))
    img.paste(1, (0, 0, 16, 32))
    return encode(img, fmt, transparency=0)


def _la_png() -> bytes:
    img = Image.new("LA", (32, 32), (0, 0))
    img.paste((90, 255), (0, 0, 16, 32))
    return encode(img, "PNG")


def _rgb_colour_key_png() -> bytes:
    img = Image.new("RGB", (32, 32), (1, 2, 3))
    img.paste(RED, (0, 0, 16, 32))
    return encode(img, "PNG", transparency=(1, 2, 3))


def _rgba_webp() -> bytes:
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    img.paste((*RED, 255), (0, 0, 16, 32))
    return encode(img, "WEBP", lossless=True)


def _half_alpha_png() -> bytes:
    return encode(Image.new("RGBA", (32, 32), (255, 0, 0, 128)), "PNG")


def _cmyk_jpeg() -> bytes:
    # Pillow writes CMYK JPEGs the Adobe way (inverted, APP14 marker).
    return encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)


def _one_bit_png() -> bytes:
    img = Image.new("1", (32, 32), 0)
    img.paste(1, (0, 0, 16, 32))
    return encode(img, "PNG")


def _grey_jpeg() -> bytes:
    img = Image.new("L", (32, 32), 0)
    img.paste(200, (0, 0, 16, 32))
    return encode(img, "JPEG", quality=95)


def _grey_bmp() -> bytes:
    img = Image.new("L", (32, 32), 0)
    img.paste(200, (0, 0, 16, 32))
    return encode(img, "BMP")


# (name, bytes factory, upload mode, expected left half, expected right half, tolerance)
MODE_CASES = [
    ("rgba-png", _rgba_png, "RGBA", RED, WHITE, 0),
    ("rgba-webp", _rgba_webp, "RGBA", RED, WHITE, 0),
    ("p-trns-png", lambda: _p_transparent("PNG"), "P", RED, WHITE, 0),
    ("p-trns-gif", lambda: _p_transparent("GIF"), "P", RED, WHITE, 0),
    ("la-png", _la_png, "LA", (90, 90, 90), WHITE, 0),
    ("rgb-colour-key", _rgb_colour_key_png, "RGB", RED, WHITE, 0),
    ("half-alpha", _half_alpha_png, "RGBA", (255, 127, 127), (255, 127, 127), 1),
    ("cmyk-jpeg", _cmyk_jpeg, "CMYK", (255, 0, 0), (255, 0, 0), 8),
    ("one-bit", _one_bit_png, "1", WHITE, (0, 0, 0), 0),
    ("grey-jpeg", _grey_jpeg, "L", (200, 200, 200), (0, 0, 0), 6),
    ("grey-bmp", _grey_bmp, "L", (200, 200, 200), (0, 0, 0), 0),
]


@pytest.mark.parametrize(
    ("make", "mode", "left", "right", "tol"),
    [pytest.param(*case[1:], id=case[0]) for case in MODE_CASES],
)
def test_mode_conversion(
    make: Callable[[], bytes],
    mode: str,
    left: tuple[int, int, int],
    right: tuple[int, int, int],
    tol: int,
) -> None:
    d = decode_image(make(), min_short_side=32)
    assert_well_formed(d)
    assert d.mode == mode
    # Sample away from the edge between the halves (JPEG blurs it).
    assert_close(mean_rgb(d.pixels[:, 2:12]), left, tol)
    assert_close(mean_rgb(d.pixels[:, 20:30]), right, tol)


def test_sixteen_bit_png_gradient_is_scaled_not_clipped() -> None:
    row = np.linspace(0, 65535, 256).round().astype(np.uint16)
    data = encode(Image.fromarray(np.tile(row, (16, 1))), "PNG")
    d = decode_image(data, min_short_side=16)
    assert d.mode.startswith("I")
    line = d.pixels[8, :, 0].astype(int)
    assert line[0] == 0 and line[-1] == 255
    assert abs(line[128] - 128) <= 1
    assert np.all(np.diff(line) >= 0)  # still a gradient
    assert np.array_equal(d.pixels[..., 0], d.pixels[..., 1])
    assert np.array_equal(d.pixels[..., 0], d.pixels[..., 2])


def _grey(mode: str, values: np.ndarray) -> Image.Image:
    if mode == "I;16B":
        return Image.fromarray(values.astype(">u2"))
    if mode == "I":
        return Image.fromarray(values.astype(np.int32))
    return Image.fromarray(values.astype(np.float32))


# (mode, input values along a row, expected 8-bit output); exercises modes no
# allowed file format yields directly, through the private converter.
HIGH_BIT_CASES = [
    ("I;16B", [0, 0x8000, 0xFFFF], [0, 128, 255]),
    ("I", [0, 100, 255], [0, 100, 255]),  # already 8-bit range: unchanged
    ("I", [0, 40_000, 65_535], [0, 156, 255]),  # 16-bit range: >> 8
    ("I", [-1000, 0, 1000], [0, 128, 255]),  # anything else: min-max
    ("F", [0.0, 100.4, 255.0], [0, 100, 255]),  # already 0..255: kept
    ("F", [-1.0, 0.0, 1.0], [0, 128, 255]),  # min-max
    ("F", [np.nan, 10.0, 20.0], [0, 10, 20]),  # NaN -> 0
    ("F", [5.0, 5.0, 5.0], [5, 5, 5]),
    ("I", [70_000, 70_000, 70_000], [0, 0, 0]),  # flat out-of-range: no division by zero
]


@pytest.mark.parametrize(("mode", "values", "expected"), HIGH_BIT_CASES)
def test_high_bit_depth_conversion(mode: str, values: list[float], expected: list[int]) -> None:
    img = _grey(mode, np.tile(np.array(values, dtype=np.float64), (2, 1)))
    assert img.mode == mode
    out = np.asarray(imaging._to_rgb(img))
    assert out.shape == (2, 3, 3)
    assert out[0, :, 0].tolist() == expected


def _alpha_mode(mode: str) -> Image.Image:
    if mode == "La":
        return Image.merge("La", (Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0)))
    return Image.new("RGBA", (4, 4), (0, 0, 0, 0)).convert(mode)


# (mode, build, expected colour): colour-space and alpha modes via Pillow's convert.
OTHER_MODE_CASES = [
    ("LAB", lambda: solid(GREEN, (4, 4)).convert("LAB"), GREEN, 12),
    ("HSV", lambda: solid(GREEN, (4, 4)).convert("HSV"), GREEN, 6),
    ("YCbCr", lambda: solid(GREEN, (4, 4)).convert("YCbCr"), GREEN, 6),
    ("RGBX", lambda: solid(GREEN, (4, 4)).convert("RGBX"), GREEN, 0),
    ("RGBa", lambda: _alpha_mode("RGBa"), WHITE, 0),
    ("PA", lambda: _alpha_mode("PA"), WHITE, 0),
    ("La", lambda: _alpha_mode("La"), WHITE, 0),
]


@pytest.mark.parametrize(
    ("build", "expected", "tol"),
    [pytest.param(*case[1:], id=case[0]) for case in OTHER_MODE_CASES],
)
def test_other_modes_convert(
    build: Callable[[], Image.Image], expected: tuple[int, int, int], tol: int
) -> None:
    out = imaging._to_rgb(build())
    assert out.mode == "RGB"
    assert_close(mean_rgb(np.asarray(out)), expected, tol)


# --------------------------------------------------------------------------- size reduction


# (min_short_side, expected short side range [lo, hi)): width/height stay 4000x3000.
DRAFT_CASES = [
    (32, 32, 64),
    (100, 100, 200),
    (248, 248, 496),
    (1500, 1500, 3000),
    (3000, 3000, 3001),  # exactly the original: no reduction
    (5000, 3000, 3001),  # never enlarged
]


@pytest.mark.parametrize(("mss", "lo", "hi"), DRAFT_CASES)
def test_jpeg_draft_and_reduce(big_jpeg: bytes, mss: int, lo: int, hi: int) -> None:
    d = decode_image(big_jpeg, min_short_side=mss)
    assert_well_formed(d)
    assert (d.width, d.height) == (4000, 3000)
    h, w = d.pixels.shape[:2]
    assert lo <= h < hi
    assert abs(w / h - 4 / 3) < 0.05
    assert_close(mean_rgb(d.pixels[:, : w // 3]), RED, 12)
    assert_close(mean_rgb(d.pixels[:, -(w // 3) :]), BLUE, 12)


def test_jpeg_draft_decodes_small(big_jpeg: bytes, load_spy: LoadSpy) -> None:
    # With min_short_side=32 libjpeg decodes at 1/8 scale (500x375) before the box reduce.
    d = decode_image(big_jpeg, min_short_side=32)
    assert set(load_spy) == {("JPEG", (500, 375))}
    assert d.pixels.shape == (35, 46, 3)  # 375 // 32 = 11; ceil(375 / 11), ceil(500 / 11)


# (format, size, min_short_side, expected pixels shape (h, w)): reduce by the
# largest integer factor that keeps the short side >= min_short_side.
REDUCE_CASES = [
    ("PNG", (1000, 800), 100, (100, 125)),  # factor 8
    ("PNG", (1000, 800), 101, (115, 143)),  # factor 7: ceil(800 / 7), ceil(1000 / 7)
    ("PNG", (800, 1000), 400, (500, 400)),  # factor 2, portrait
    ("PNG", (800, 1000), 401, (1000, 800)),  # factor 1: untouched
    ("WEBP", (640, 480), 32, (32, 43)),  # factor 15
    ("PNG", (20, 20), 224, (20, 20)),  # smaller than needed: never enlarged
    ("JPEG", (20, 20), 224, (20, 20)),
]


@pytest.mark.parametrize(("fmt", "size", "mss", "shape"), REDUCE_CASES)
def test_reduce(fmt: str, size: tuple[int, int], mss: int, shape: tuple[int, int]) -> None:
    d = decode_image(encode(gradient_rgb(*size), fmt), min_short_side=mss)
    assert d.pixels.shape == (*shape, 3)
    assert (d.width, d.height) == size
    assert min(shape) >= min(mss, min(size))


@pytest.mark.parametrize("mss", [0, -1])
def test_min_short_side_must_be_positive(mss: int) -> None:
    with pytest.raises(ValueError):
        decode_image(encode(solid(RED), "PNG"), min_short_side=mss)


# --------------------------------------------------------------------------- metadata


def test_sha256_of_bytes_received() -> None:
    data = encode(gradient_rgb(64, 48), "PNG")
    assert decode_image(data, min_short_side=8).sha256 == hashlib.sha256(data).hexdigest()


def test_pixels_match_source_exactly_for_lossless() -> None:
    img = gradient_rgb(64, 48)
    d = decode_image(encode(img, "PNG"), min_short_side=48)
    assert np.array_equal(d.pixels, np.asarray(img))
    d.pixels[0, 0] = 0  # writable (torch.from_numpy warns on read-only arrays)


def test_decoded_image_is_frozen_and_hashable() -> None:
    d = decode_image(encode(solid(RED), "PNG"), min_short_side=8)
    with pytest.raises(AttributeError):
        d.width = 1  # type: ignore[misc]
    assert d == d and hash(d) == hash(d)


# --------------------------------------------------------------------------- fuzz


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:  # flip a few bytes
        for pos in rng.integers(0, len(buf), rng.integers(1, 9)):
            buf[pos] ^= int(rng.integers(1, 256))
    elif kind == 1:  # truncate
        del buf[int(rng.integers(0, len(buf))) :]
    elif kind == 2:  # insert junk
        pos = int(rng.integers(0, len(buf)))
        buf[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
    else:  # overwrite a header byte with an extreme value
        buf[int(rng.integers(0, min(64, len(buf))))] = int(rng.choice([0, 0x7F, 0x80, 0xFF]))
    return bytes(buf)


FUZZ_SEEDS = {"PNG": 1, "JPEG": 2, "GIF": 3, "WEBP": 4, "BMP": 5}


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore")  # Pillow warns about some damaged metadata
@pytest.mark.parametrize("fmt", list(FUZZ_SEEDS))
def test_fuzzed_uploads_only_raise_image_error(fmt: str) -> None:
    base = encode(gradient_rgb(64, 48), fmt)
    rng = np.random.default_rng(FUZZ_SEEDS[fmt])
    for _ in range(200):
        data = _mutate(base, rng)
        try:
            d = decode_image(data, min_short_side=16)
        except ApiError as exc:
            assert exc.status in {400, 413, 415, 422}, exc
        else:
            assert_well_formed(d)


# --------------------------------------------------------------------------- header-only checks


def test_inspect_reports_what_decode_reports_without_decoding(load_spy: LoadSpy) -> None:
    data = encode(gradient_rgb(64, 48), "JPEG")
    header = inspect_image(data)
    assert load_spy == []  # no pixel decoded
    decoded = decode_image(data, min_short_side=8)
    assert (header.width, header.height, header.format, header.mode, header.sha256) == (
        decoded.width,
        decoded.height,
        decoded.format,
        decoded.mode,
        decoded.sha256,
    )


@pytest.mark.parametrize(
    ("data", "limits", "status", "code"),
    [
        (b"", ImageLimits(), 400, "empty_image"),
        (b"not an image at all", ImageLimits(), 415, "unsupported_media_type"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 20, ImageLimits(), 400, "corrupt_image"),
        (None, ImageLimits(max_pixels=100), 413, "too_many_pixels"),
        (None, ImageLimits(min_side=100), 422, "degenerate_image"),
    ],
)
def test_inspect_refuses_like_decode(
    data: bytes | None, limits: ImageLimits, status: int, code: str
) -> None:
    data = encode(gradient_rgb(64, 48), "JPEG") if data is None else data
    for check in (
        lambda: inspect_image(data, limits=limits),
        lambda: decode_image(data, min_short_side=8, limits=limits),
    ):
        with pytest.raises(ApiError) as info:
            check()
        assert (info.value.status, info.value.code) == (status, code)


def _jpeg_variants() -> dict[str, bytes]:
    """A JPEG (baseline, progressive, with an embedded thumbnail that ends in its own EOI)
    whole, cut at several points, and with bytes after its end."""
    base = encode(gradient_rgb(96, 64), "JPEG", quality=90)
    progressive = encode(gradient_rgb(96, 64), "JPEG", progressive=True)
    thumbnail = encode(gradient_rgb(16, 12), "JPEG")
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumbnail) + 8) + b"Exif\0\0" + thumbnail
    with_thumbnail = base[:2] + app1 + base[2:]
    return {
        "whole": base,
        "bytes after EOI": base + b"\0trailer" * 50,
        "progressive": progressive,
        "thumbnail": with_thumbnail,
        "cut: no EOI": base[:-2],
        "cut: half": base[: len(base) // 2],
        "cut: 100 bytes short": base[:-100],
        "cut: progressive, second scan": progressive[: len(progressive) * 3 // 4],
        "cut: thumbnail's EOI kept, image's lost": with_thumbnail[:-2],
    }


@pytest.mark.parametrize("name", list(_jpeg_variants()))
def test_truncated_jpegs_are_refused_by_inspect_as_by_decode(name: str) -> None:
    """A JPEG decoded on the device is only inspected here, and nvJPEG decodes a cut file
    without an error: inspect must refuse what Pillow's decode refuses, and accept the rest."""
    data = _jpeg_variants()[name]
    outcomes = []
    for check in (
        lambda: inspect_image(data),
        lambda: decode_image(data, min_short_side=8),
    ):
        try:
            check()
            outcomes.append("ok")
        except ApiError as exc:
            outcomes.append(f"{exc.status} {exc.code}")
    want = "400 corrupt_image" if name.startswith("cut") else "ok"
    assert outcomes == [want, want]

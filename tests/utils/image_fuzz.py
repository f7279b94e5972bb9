"""Seed uploads and Hypothesis strategies that damage them, for the decoder and API fuzzers.

Seeds are the project's own samples (``harness/samples.py``: held-out digits, the small synthetic
photos, the bad uploads) plus small Pillow encodings of every accepted format in the modes the
decoder converts. Mutations are the ones hostile or broken clients produce: flipped, inserted and
deleted bytes, truncation, appended junk, duplicated spans, and headers whose declared width and
height are rewritten (with the PNG chunk CRC fixed, so the lie reaches the size checks instead of
failing the checksum).
"""

from __future__ import annotations

import functools
import io
import re
import struct
import zlib
from typing import Any

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from harness.samples import bad_samples, digit_samples, photo_samples

__all__ = [
    "MAX_SEED_BYTES",
    "PeakRss",
    "damage",
    "image_seeds",
    "mutated_images",
    "set_dimensions",
    "uploads",
]

# Photos above this are left out: every example copies and mutates its seed.
MAX_SEED_BYTES = 64 * 1024

# Declared sides worth trying: degenerate, the 8 px minimum, around the 40 MP limit (6324² is
# just under it), Pillow's own bomb thresholds (~9459², ~13377²) and the fields' maxima.
_EDGE_SIDES = (0, 1, 7, 8, 9, 255, 256, 6324, 6325, 9459, 9460, 13377, 13378, 65535, 2**31 - 1)


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x * y) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def _pillow_seeds() -> list[bytes]:
    """Every accepted format, in the modes and variants the decoder treats differently."""
    rgb = _gradient(48, 40)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (40, 1))))
    grey = rgb.convert("L")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    sixteen = Image.fromarray((np.arange(48 * 40, dtype=np.uint16) * 30).reshape(40, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the decoder swaps width and height
    frames = [rgb.convert("P"), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return [
        _encode(rgb, "PNG"),
        _encode(rgba, "PNG"),
        _encode(grey, "PNG", optimize=True),
        _encode(palette, "PNG", transparency=0),
        _encode(sixteen, "PNG"),
        _encode(rgb.convert("1"), "PNG"),
        _encode(rgb, "PNG", interlace=1),  # Pillow writes Adam7 only when asked like this
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb, "JPEG", quality=80, progressive=True),
        _encode(grey, "JPEG"),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb, "JPEG", exif=exif.tobytes()),
        _encode(_gradient(640, 480), "JPEG", quality=70),  # big enough for draft + reduce
        _encode(rgb, "WEBP", quality=80),
        _encode(rgb, "WEBP", lossless=True),
        _encode(rgba, "WEBP"),
        _encode(palette, "GIF"),
        _encode(palette, "GIF", transparency=3),
        animated.getvalue(),
        _encode(rgb, "BMP"),
        _encode(palette, "BMP"),
        _encode(grey, "BMP"),
    ]


@functools.cache
def image_seeds() -> tuple[bytes, ...]:
    """The corpus every mutation starts from (built once per process, ~2 s)."""
    samples = [s.data for s in (*digit_samples(), *photo_samples(), *bad_samples())]
    return tuple(d for d in (*samples, *_pillow_seeds()) if len(d) <= MAX_SEED_BYTES)


# --------------------------------------------------------------------------- declared sizes


def _set_png(buf: bytearray, width: int, height: int) -> bool:
    if not buf.startswith(b"\x89PNG\r\n\x1a\n") or len(buf) < 33 or buf[12:16] != b"IHDR":
        return False
    buf[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
    buf[29:33] = struct.pack(">I", zlib.crc32(bytes(buf[12:29])))
    return True


_JPEG_SOF = re.compile(rb"\xff[\xc0-\xc3\xc5-\xc7\xc9-\xcb\xcd-\xcf]")


def _set_jpeg(buf: bytearray, width: int, height: int) -> bool:
    if not buf.startswith(b"\xff\xd8"):
        return False
    found = _JPEG_SOF.search(bytes(buf))
    if found is None or found.start() + 9 > len(buf):
        return False
    at = found.start() + 5  # marker (2), length (2), precision (1), then height, width
    buf[at : at + 4] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    return True


def _set_gif(buf: bytearray, width: int, height: int) -> bool:
    if not buf.startswith(b"GIF8") or len(buf) < 10:
        return False
    size = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    buf[6:10] = size  # the logical screen
    at = buf.find(b"\x2c", 13)  # and the first image descriptor, if one is found
    if at > 0 and at + 9 <= len(buf):
        buf[at + 5 : at + 9] = size
    return True


def _set_bmp(buf: bytearray, width: int, height: int) -> bool:
    if not buf.startswith(b"BM") or len(buf) < 26:
        return False
    # Signed: a negative height is a top-down bitmap, a negative width is nonsense.
    buf[18:26] = struct.pack("<ii", _signed32(width), _signed32(height))
    return True


def _set_webp(buf: bytearray, width: int, height: int) -> bool:
    if not (buf.startswith(b"RIFF") and buf[8:12] == b"WEBP") or len(buf) < 30:
        return False
    kind = bytes(buf[12:16])
    if kind == b"VP8X":  # canvas size minus one, 24 bits each
        buf[24:27] = ((width - 1) & 0xFFFFFF).to_bytes(3, "little")
        buf[27:30] = ((height - 1) & 0xFFFFFF).to_bytes(3, "little")
    elif kind == b"VP8 ":  # 14-bit sides (the top two bits are the scale)
        buf[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    elif kind == b"VP8L" and len(buf) >= 25:  # 14-bit sides minus one, packed after 0x2f
        bits = int.from_bytes(buf[21:25], "little") & ~0x0FFFFFFF
        bits |= ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
        buf[21:25] = bits.to_bytes(4, "little")
    else:
        return False
    return True


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def set_dimensions(data: bytes, width: int, height: int) -> bytes:
    """``data`` with its header's declared width and height rewritten (unchanged if unknown)."""
    buf = bytearray(data)
    for setter in (_set_png, _set_jpeg, _set_gif, _set_bmp, _set_webp):
        if setter(buf, width, height):
            break
    return bytes(buf)


# --------------------------------------------------------------------------- mutations

_sides = st.one_of(
    st.sampled_from(_EDGE_SIDES),
    st.integers(0, 4096),
    st.integers(0, 2**32 - 1),
)


@st.composite
def damage(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with one damage of the kind real uploads (and request bodies) suffer."""
    buf = bytearray(data)
    kind = draw(
        st.sampled_from(
            ["flip", "set", "insert", "delete", "truncate", "append", "duplicate", "dimensions"]
        )
    )
    if kind == "dimensions":
        return set_dimensions(data, draw(_sides), draw(_sides))
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=256))
    if not buf:
        return draw(st.binary(max_size=64))
    # Headers are where parsers branch: aim half the edits at the first 64 bytes.
    pos = draw(st.one_of(st.integers(0, min(63, len(buf) - 1)), st.integers(0, len(buf) - 1)))
    if kind == "flip":
        buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "set":
        buf[pos] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]) | st.integers(0, 255))
    elif kind == "insert":
        buf[pos:pos] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "delete":
        del buf[pos : pos + draw(st.integers(1, 64))]
    elif kind == "truncate":
        del buf[pos:]
    else:  # duplicate a span in place: repeated chunks, markers and rows
        end = pos + draw(st.integers(1, 512))
        buf[pos:pos] = buf[pos:end]
    return bytes(buf)


@st.composite
def mutated_images(draw: st.DrawFn, max_mutations: int = 4) -> bytes:
    """A seed upload with up to ``max_mutations`` damages (sometimes none)."""
    data = draw(st.sampled_from(image_seeds()))
    for _ in range(draw(st.integers(0, max_mutations))):
        data = draw(damage(data))
    return data


def uploads() -> st.SearchStrategy[bytes]:
    """What a client may upload: a seed as is, a damaged seed, or arbitrary bytes."""
    return st.one_of(
        st.sampled_from(image_seeds()),
        mutated_images(),
        st.binary(max_size=512),
    )


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRss:
    """The peak resident memory a block adds to the process, in bytes.

    Pillow allocates pixels with plain ``malloc``, which tracemalloc does not see, so this reads
    the kernel's high-water mark (``VmHWM``) after resetting it through ``/proc/self/clear_refs``.
    Where the reset is not allowed, the mark is the process's lifetime peak, still a valid upper
    bound for a block that does not raise it.
    """

    def __init__(self) -> None:
        self.before = 0
        self.peak = 0

    def __enter__(self) -> PeakRss:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
        except OSError:
            pass
        self.before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = max(0, _status_kib("VmHWM") * 1024 - self.before)

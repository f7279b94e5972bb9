"""Sample uploads made by the project (nothing downloaded), and multipart bodies to carry them.

- Held-out digits (the test split of ``models.digits``) rendered at several sizes, both
  polarities, as PNG/JPEG/WebP: the default model should classify them correctly.
- Synthetic photos (smooth colour fields, edges and sensor-like noise) from a thumbnail up to a
  12-megapixel JPEG at camera-like quality: realistic decode cost and file size.
- Bad uploads with the status the service must answer.
"""

from __future__ import annotations

import functools
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "Sample",
    "bad_samples",
    "digit",
    "digit_samples",
    "multipart",
    "photo",
    "photo_samples",
]


@dataclass(frozen=True)
class Sample:
    """One upload: bytes, a file name, and the HTTP status the service must answer."""

    name: str
    data: bytes
    filename: str
    status: int = 200
    label: str | None = None


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    options = {"JPEG": {"quality": 90}, "WEBP": {"quality": 90}}.get(fmt, {})
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def digit(index: int, size: int, invert: bool, fmt: str = "PNG") -> bytes:
    """Held-out test digit ``index`` rendered at ``size`` px."""
    from models.digits import load_split, render_digit

    return _encode(render_digit(load_split().X_test[index], size, invert), fmt)


@functools.cache
def digit_samples(count: int = 24) -> tuple[Sample, ...]:
    """Held-out digits at 28..400 px, both polarities, PNG/JPEG/WebP, with their labels."""
    from models.digits import load_split, render_digit

    split = load_split()
    sizes, formats = (28, 64, 160, 400), ("PNG", "JPEG", "WEBP")
    samples = []
    for i in range(count):
        size, fmt, invert = sizes[i % 4], formats[i % 3], bool(i % 2)
        data = _encode(render_digit(split.X_test[i], size, invert), fmt)
        samples.append(
            Sample(f"digit {size}px", data, f"digit{i}.{fmt.lower()}", 200, str(split.y_test[i]))
        )
    return tuple(samples)


def photo(width: int, height: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A synthetic photo: smooth colour gradients, some edges and noise (JPEG quality 85)."""
    rng = np.random.default_rng(seed)
    # Build at a coarse grid and upscale: cheap even for 12 MP, and smooth like a real scene.
    small_w, small_h = max(8, width // 16), max(8, height // 16)
    yy, xx = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    base = np.stack(
        [
            255 * xx / small_w,
            255 * yy / small_h,
            128 + 80 * np.sin(xx / 5 + rng.uniform(0, 6)) * np.cos(yy / 7),
        ],
        axis=-1,
    ).clip(0, 255)
    image = Image.fromarray(base.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image).astype(np.int16)
    pixels = pixels + rng.integers(-10, 11, pixels.shape, dtype=np.int16)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    options = {"JPEG": {"quality": 85}, "WEBP": {"quality": 80}}.get(fmt, {})
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@functools.cache
def photo_samples() -> tuple[Sample, ...]:
    """From a thumbnail to a 12 MP camera photo, JPEG/PNG/WebP."""
    sizes = [
        (160, 120, "JPEG"),
        (640, 480, "JPEG"),
        (640, 480, "PNG"),
        (1024, 768, "WEBP"),
        (1920, 1080, "JPEG"),
        (4000, 3000, "JPEG"),
    ]
    return tuple(
        Sample(f"photo {w}x{h} {fmt}", photo(w, h, fmt, seed=i), f"photo{i}.{fmt.lower()}")
        for i, (w, h, fmt) in enumerate(sizes)
    )


@functools.cache
def bad_samples() -> tuple[Sample, ...]:
    """Uploads the service must refuse, with the status it must give."""
    good = digit(0, 200, False, "JPEG")
    tiff = _encode(Image.new("RGB", (64, 64), (10, 20, 30)), "TIFF")
    thin = _encode(Image.new("RGB", (4, 200)), "PNG")
    return (
        Sample("bad: truncated JPEG", good[: len(good) // 2], "truncated.jpg", 400),
        Sample("bad: empty", b"", "empty.png", 400),
        Sample("bad: not an image", b"this is not an image\n" * 20, "notes.txt", 415),
        Sample("bad: TIFF", tiff, "scan.tif", 415),
        Sample("bad: degenerate", thin, "thin.png", 422),
    )


def multipart(fields: dict[str, str], files: Sequence[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body: plain ``fields`` and ``files`` as (field, filename, bytes)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(f"{head}{value}\r\n".encode())
    for field, filename, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"

"""Turns raw model outputs into what a person reads: top-k labels, patch boxes, heatmaps.

Geometry: the model saw the crop window ``crop_window(h, w)`` of the image, resized to the input
size; patch (row, col) covers input pixels [col·pw, (col+1)·pw) × [row·ph, (row+1)·ph). Mapping
those through the crop window gives boxes in the original upload's pixel coordinates.
"""

from __future__ import annotations

import base64
import heapq
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from .imaging import DecodedImage
from .loading import ModelInfo

__all__ = ["crop_window", "heatmap_png", "patch_box", "top_k", "top_patches"]

# A perceptual dark-to-bright ramp (magma-like), 256 entries, made once.
_STOPS = np.array(
    [
        [0, 0, 4],
        [59, 15, 112],
        [140, 41, 129],
        [222, 73, 104],
        [254, 159, 109],
        [252, 253, 191],
    ],
    dtype=np.float32,
)
_LUT = np.stack(
    [
        np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_STOPS)), _STOPS[:, c])
        for c in range(3)
    ],
    axis=1,
).astype(np.uint8)


def crop_window(height: int, width: int, info: ModelInfo) -> tuple[float, float, float, float]:
    """The region (x0, y0, x1, y1) of an image that timm's eval transform turns into the input.

    Center mode: resize so the shorter side is ``input/crop_pct`` (keeping the aspect ratio),
    then take the centered input-sized crop. Squash mode resizes each axis independently.
    """
    in_h, in_w = info.input_size[1], info.input_size[2]
    scale_h = math.floor(in_h / info.crop_pct)
    scale_w = math.floor(in_w / info.crop_pct)
    if info.crop_mode == "squash":
        fy, fx = scale_h / height, scale_w / width
    elif scale_h == scale_w:
        fy = fx = scale_h / min(height, width)
    else:
        fy = fx = max(scale_h / height, scale_w / width)
    crop_h, crop_w = in_h / fy, in_w / fx
    y0 = (height - crop_h) / 2
    x0 = (width - crop_w) / 2
    return (x0, y0, x0 + crop_w, y0 + crop_h)


def top_k(probs: np.ndarray, k: int, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """The k most probable classes, highest first (ties: the lower index first)."""
    values = probs.tolist()
    return [{"index": i, "label": labels[i], "score": values[i]} for i in _largest(values, k)]


def _largest(values: list[float], count: int) -> list[int]:
    """Indices of the ``count`` largest ``values``, largest first, ties in index order.

    In Python on a list, not numpy: this runs on the event loop for every answer, and numpy's
    sorts and partitions release the GIL even for 10 values, so beside a busy decode or model
    thread each call then waits up to the switch interval to get it back: ~0.2-0.9 ms for 10
    classes, ~5 ms for 1,000 (``python -m loadtests.gil_contention``). ``heapq.nlargest`` is
    stable like ``sorted(..., reverse=True)`` and takes ~0.1 ms for 1,000 classes."""
    return heapq.nlargest(count, range(len(values)), key=values.__getitem__)


def patch_box(
    row: int,
    col: int,
    info: ModelInfo,
    width: int,
    height: int,
    crop: tuple[float, float, float, float] | None = None,
) -> list[float]:
    """Patch (row, col) as [x0, y0, x1, y1] in the original image, clipped to it.

    ``crop``: ``crop_window(height, width, info)`` when the caller already has it.
    """
    cx0, cy0, cx1, cy1 = crop or crop_window(height, width, info)
    in_h, in_w = info.input_size[1], info.input_size[2]
    ph, pw = info.patch_size
    sx, sy = (cx1 - cx0) / in_w, (cy1 - cy0) / in_h
    x0, x1 = cx0 + col * pw * sx, cx0 + (col + 1) * pw * sx
    y0, y1 = cy0 + row * ph * sy, cy0 + (row + 1) * ph * sy
    return [
        round(min(max(x0, 0.0), width), 2),
        round(min(max(y0, 0.0), height), 2),
        round(min(max(x1, 0.0), width), 2),
        round(min(max(y1, 0.0), height), 2),
    ]


def top_patches(
    weights: np.ndarray,
    count: int,
    info: ModelInfo,
    width: int,
    height: int,
    crop: tuple[float, float, float, float] | None = None,
) -> list[dict[str, Any]]:
    """The ``count`` most-attended patches with their boxes in original pixels."""
    values = weights.reshape(-1).tolist()
    order = _largest(values, count)
    cols = info.grid[1]
    crop = crop or crop_window(height, width, info)
    return [
        {
            "index": i,
            "row": i // cols,
            "col": i % cols,
            "attention": values[i],
            "box": patch_box(i // cols, i % cols, info, width, height, crop),
        }
        for i in order
    ]


def heatmap_png(image: DecodedImage, weights: np.ndarray, info: ModelInfo) -> str:
    """Base64 PNG of the attention heatmap blended over the image, at the original size."""
    pixels = image.pixels
    h, w = pixels.shape[:2]
    x0, y0, x1, y1 = crop_window(h, w, info)
    rows, cols = weights.shape
    col_of = np.floor((np.arange(w) + 0.5 - x0) * cols / (x1 - x0)).astype(np.int64)
    row_of = np.floor((np.arange(h) + 0.5 - y0) * rows / (y1 - y0)).astype(np.int64)
    inside = (row_of[:, None] >= 0) & (row_of[:, None] < rows)
    inside = inside & (col_of[None, :] >= 0) & (col_of[None, :] < cols)
    peak = float(weights.max()) or 1.0
    level = (weights / peak)[np.clip(row_of, 0, rows - 1)[:, None], np.clip(col_of, 0, cols - 1)]
    level = np.where(inside, level, 0.0)
    color = _LUT[(level * 255).astype(np.uint8)].astype(np.float32)
    # Parts the model never saw stay visible but dimmed; seen parts blend by attention.
    alpha = np.where(inside, 0.35 + 0.4 * level, 0.0)[..., None]
    dim = np.where(inside, 1.0, 0.5)[..., None]
    blended = pixels.astype(np.float32) * dim * (1 - alpha) + color * alpha
    out = Image.fromarray(blended.clip(0, 255).astype(np.uint8), "RGB")
    if (out.width, out.height) != (image.width, image.height):
        out = out.resize((image.width, image.height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")

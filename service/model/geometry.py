"""Where the model looks in an upload: the region timm's eval transform turns into the input, and
each patch's box in the upload's own pixels.

The model saw the crop window ``crop_window(h, w, info)`` of the image, resized to the input
size; patch (row, col) covers input pixels [col·pw, (col+1)·pw) × [row·ph, (row+1)·ph). Mapping
those through the crop window gives boxes in the original upload's pixel coordinates. The engine
samples the window; the answers report it and the patches' boxes; the heatmap paints over it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loading import ModelInfo

__all__ = ["crop_window", "patch_box", "resize_sides"]


def resize_sides(input_size: Sequence[int], crop_pct: float) -> tuple[int, int]:
    """(height, width) the eval transform resizes to before its crop: the input over
    ``crop_pct``, rounded down (``input_size`` is (channels, height, width))."""
    return math.floor(input_size[1] / crop_pct), math.floor(input_size[2] / crop_pct)


def crop_window(height: int, width: int, info: ModelInfo) -> tuple[float, float, float, float]:
    """The region (x0, y0, x1, y1) of an image that timm's eval transform turns into the input.

    Center mode: resize so the shorter side is ``input/crop_pct`` (keeping the aspect ratio),
    then take the centered input-sized crop. Squash mode resizes each axis independently.
    """
    in_h, in_w = info.input_size[1], info.input_size[2]
    scale_h, scale_w = resize_sides(info.input_size, info.crop_pct)
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

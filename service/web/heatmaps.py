"""The attention heatmap: the upload with the model's attention painted over the part it saw.

Each pixel takes the attention of the patch that covers it (through the crop window,
``service/model/geometry.py``); the parts the model never saw stay visible but dimmed.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from ..model.geometry import crop_window
from ..model.imaging import DecodedImage
from ..model.loading import ModelInfo

__all__ = ["heatmap_png"]

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

"""The sklearn digits data set as this project uses it: a fixed split and one way to draw a digit.

The default checkpoint (``models/vit-digits``) is trained, evaluated and load-tested on
``sklearn.datasets.load_digits()``: 1797 grayscale 8×8 images whose 64 values run 0..16 (16 is
ink). Everything that needs those images goes through this module so the held-out test set and
the picture of a digit are the same everywhere: in training, in the tests and in generated
load-test samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

__all__ = [
    "DIGIT_MAX",
    "LABEL_NAMES",
    "POLARITIES",
    "TEST_FRACTION",
    "TEST_RANDOM_STATE",
    "VAL_FRACTION",
    "DigitsSplit",
    "load_split",
    "render_digit",
]

LABEL_NAMES: list[str] = [str(digit) for digit in range(10)]
# Name -> ``invert`` flag of ``render_digit``: sklearn's own light ink on dark, and dark on light.
POLARITIES: dict[str, bool] = {"light_on_dark": False, "dark_on_light": True}
DIGIT_MAX = 16.0
TEST_FRACTION = 0.2
TEST_RANDOM_STATE = 0
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class DigitsSplit:
    """Train, validation and held-out test parts of the digits data.

    Each ``X_*`` is ``(n, 64)`` with raw values 0..16 (row-major 8×8); each ``y_*`` is ``(n,)``
    with labels 0..9.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def load_split(seed: int = 0) -> DigitsSplit:
    """Load the digits and split them into train, validation and held-out test.

    The test set does not depend on ``seed``: it is always
    ``train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)`` on the data in its
    original order, so every accuracy quoted for it is about the same 360 images. Validation is a
    stratified 10 % of the remaining 1437, carved with ``seed``.

    Args:
        seed: Random state for the train/validation split only.

    Returns:
        The six arrays as a frozen ``DigitsSplit``.
    """
    data = load_digits()
    X_rest, X_test, y_rest, y_test = train_test_split(
        data.data,
        data.target,
        test_size=TEST_FRACTION,
        random_state=TEST_RANDOM_STATE,
        stratify=data.target,
    )
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest, y_rest, test_size=VAL_FRACTION, random_state=seed, stratify=y_rest
    )
    return DigitsSplit(X_train, y_train, X_val, y_val, X_test, y_test)


def render_digit(
    x64: np.ndarray, size: int | tuple[int, int] = 32, invert: bool = False
) -> Image.Image:
    """Draw one 8×8 digit as a smooth RGB picture.

    The 8×8 grid is upscaled with bilinear resampling in floating point and rounded to 8 bits
    once, which matches ``F.interpolate(x / 16, mode="bilinear", align_corners=False)`` (the
    batched rendering used in training) to within rounding.

    Args:
        x64: The 64 raw values 0..16 of one digit (any shape with 64 elements).
        size: Output size in pixels: one number for a square, or ``(width, height)`` as PIL
            counts.
        invert: ``False`` draws light ink on a dark background, as sklearn stores it (16 is
            white); ``True`` draws dark ink on light paper.

    Returns:
        An RGB ``PIL.Image.Image`` of the requested size.
    """
    grid = np.asarray(x64, dtype=np.float32).reshape(8, 8) / DIGIT_MAX
    if invert:
        grid = 1.0 - grid
    width, height = (size, size) if isinstance(size, int) else size
    # Mode "F" keeps the interpolation in float so the only rounding is the final one.
    big = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.clip(np.rint(np.asarray(big) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").convert("RGB")

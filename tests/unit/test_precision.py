"""bf16 against fp32 on the default model: the same top-1 class for >= 99 % of the test split."""

from __future__ import annotations

import numpy as np

from models.digits import load_split, render_digit
from service.model.engine import Engine
from service.model.loading import load_model
from tests.conftest import DEFAULT_MODEL_DIR


def _predictions(dtype: str, device: str = "cpu") -> np.ndarray:
    engine = Engine(load_model(f"local-dir:{DEFAULT_MODEL_DIR}", device=device, dtype=dtype))
    split = load_split()
    images = [
        np.asarray(render_digit(x, 32, invert=bool(i % 2))) for i, x in enumerate(split.X_test)
    ]
    probs = []
    for start in range(0, len(images), 64):
        chunk = images[start : start + 64]
        probs += [item.probs for item in engine.run(chunk, ["none"] * len(chunk)).items]
    return np.stack(probs).argmax(axis=1)


def test_bf16_agrees_with_fp32_on_top1() -> None:
    fp32 = _predictions("float32")
    bf16 = _predictions("bfloat16")
    assert len(fp32) == 360
    agreement = float((fp32 == bf16).mean())
    assert agreement >= 0.99, agreement

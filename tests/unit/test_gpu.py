"""CUDA path: the same answers as the CPU, bf16 picked automatically. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.digits import load_split, render_digit
from service.model.engine import Engine
from service.model.loading import load_model
from tests.conftest import DEFAULT_MODEL_DIR

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

SOURCE = f"local-dir:{DEFAULT_MODEL_DIR}"


def _images(count: int = 64) -> list[np.ndarray]:
    split = load_split()
    sizes = (32, 48, 64, 100)
    return [
        np.asarray(render_digit(split.X_test[i], sizes[i % 4], invert=bool(i % 2)))
        for i in range(count)
    ]


def test_auto_picks_cuda_and_bf16() -> None:
    info = load_model(SOURCE).info
    assert info.device.startswith("cuda")
    assert info.dtype == "bfloat16"


def test_cuda_fp32_matches_cpu() -> None:
    images = _images()
    modes = ["none", "cls", "rollout", "cls"] * 16
    cpu = Engine(load_model(SOURCE, device="cpu", dtype="float32")).run(images, modes).items
    gpu = Engine(load_model(SOURCE, device="cuda", dtype="float32")).run(images, modes).items
    for a, b in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=2e-3)
        if a.attention is not None:
            np.testing.assert_allclose(a.attention, b.attention, atol=2e-3)  # type: ignore[arg-type]


def test_cuda_preprocess_matches_cpu() -> None:
    images = _images(16)
    cpu = Engine(load_model(SOURCE, device="cpu", dtype="float32")).preprocess(images)
    gpu = Engine(load_model(SOURCE, device="cuda", dtype="float32")).preprocess(images)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)


def test_cuda_bf16_top1_agrees_with_fp32() -> None:
    split = load_split()
    images = [
        np.asarray(render_digit(x, 32, invert=bool(i % 2))) for i, x in enumerate(split.X_test)
    ]
    fp32 = Engine(load_model(SOURCE, device="cuda", dtype="float32"))
    bf16 = Engine(load_model(SOURCE, device="cuda", dtype="bfloat16"))
    a = np.stack([it.probs for it in fp32.run(images, ["cls"] * len(images)).items]).argmax(1)
    b = np.stack([it.probs for it in bf16.run(images, ["cls"] * len(images)).items]).argmax(1)
    assert (a == b).mean() >= 0.99

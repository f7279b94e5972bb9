"""Test helpers: tiny ViT checkpoints written to a folder, images made in memory."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

__all__ = ["TINY_ARGS", "assert_same_items", "encode", "make_tiny_dir", "tiny_model"]

# Small enough to build in milliseconds; 32 px input, patch 8 -> grid 4x4.
TINY_ARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "num_classes": 7,
}


def tiny_model(architecture: str = "vit_tiny_patch16_224", seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised, small member of the ViT family."""
    torch.manual_seed(seed)
    args = {**TINY_ARGS, **overrides}
    return timm.create_model(architecture, pretrained=False, **args).eval()


def make_tiny_dir(
    folder: Path,
    architecture: str = "vit_tiny_patch16_224",
    seed: int = 0,
    pretrained_cfg: dict[str, Any] | None = None,
    label_names: list[str] | None = None,
    **overrides: Any,
) -> Any:
    """Write a timm hub folder (config.json + model.safetensors); return the model."""
    model = tiny_model(architecture, seed, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    args = {**TINY_ARGS, **overrides}
    cfg = {
        "input_size": [3, args["img_size"], args["img_size"]],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": args["num_classes"],
        **(pretrained_cfg or {}),
    }
    config: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": args["num_classes"],
        "model_args": args,
        "pretrained_cfg": cfg,
    }
    if label_names is not None:
        config["label_names"] = label_names
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return model


def encode(array: np.ndarray, fmt: str = "PNG", **save_args: Any) -> bytes:
    """Encode an RGB uint8 array as image bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def assert_same_answer(one: dict[str, Any], two: dict[str, Any], atol: float = 1e-5) -> None:
    """Two servers' /classify answers for one image: same image, same top class, scores and
    attention weights within ``atol``."""
    assert one["image"]["sha256"] == two["image"]["sha256"]
    assert one["predictions"][0]["index"] == two["predictions"][0]["index"]
    np.testing.assert_allclose(
        [p["score"] for p in one["predictions"]],
        [p["score"] for p in two["predictions"]],
        atol=atol,
    )
    np.testing.assert_allclose(one["attention"]["weights"], two["attention"]["weights"], atol=atol)


def assert_same_items(
    want: Sequence[Any], got: Sequence[Any], atol: float = 1e-5, atol_attention: float | None = None
) -> None:
    """Two runs of the model over the same images (``ItemResult``s or ``Outcome``s): the
    probabilities within ``atol``, the attention maps within ``atol_attention`` (default
    ``atol``), and an attention map exactly where one was asked for."""
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b.probs, a.probs, atol=atol)
        if a.attention is None:
            assert b.attention is None
        else:
            np.testing.assert_allclose(b.attention, a.attention, atol=atol_attention or atol)

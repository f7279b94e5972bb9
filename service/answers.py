"""The JSON answers, built in one place per model: what every answer shares is made once.

The shapes are the pydantic models in ``service/schemas.py`` (the OpenAPI document; the HTTP
tests validate real answers against them); this module fills them as plain dicts and orjson
writes them, which costs a fraction of building and validating model objects per request.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .explain import crop_window, top_k, top_patches
from .imaging import ALLOWED_FORMATS
from .inference import Outcome
from .loading import ModelInfo
from .options import Options
from .settings import Settings

__all__ = ["AnswerBuilder", "ImageFacts", "describe_model"]

TOP_PATCHES = 5


class ImageFacts(Protocol):
    """What an answer says about the upload (``DecodedImage`` or ``ImageHeader``)."""

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def sha256(self) -> str: ...


class AnswerBuilder:
    """Builds ``ClassifyResponse`` dicts for one loaded model."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self._grid = list(info.grid)
        self._patches = {
            "patch_size": list(info.patch_size),
            "grid": self._grid,
            "num_patches": info.num_patches,
            "patch_dim": info.patch_dim,
            "embed_dim": info.embed_dim,
            "num_prefix_tokens": info.num_prefix_tokens,
            "sequence_length": info.sequence_length,
            "position_embedding": {
                "kind": info.position_embedding_kind,
                "shape": list(info.position_embedding_shape or []),
            },
            "input_size": list(info.input_size),
        }
        self._model = {
            "name": info.name,
            "source": info.source,
            "dtype": info.dtype,
            "device": info.device,
        }

    def classify(
        self,
        image: ImageFacts,
        out: Outcome,
        options: Options,
        *,
        heatmap_png: str | None,
        request_id: str,
    ) -> dict[str, Any]:
        """One image's answer (the caller adds ``timing_ms`` once it is done)."""
        info = self.info
        weights = out.attention
        answer: dict[str, Any] = {
            "request_id": request_id,
            "predictions": top_k(out.probs, options.top_k, info.label_names),
        }
        if weights is not None:
            attention: dict[str, Any] = {
                "mode": options.attention,
                "grid": self._grid,
                "weights": np.round(weights.astype(np.float64), 6).tolist(),
            }
            if heatmap_png is not None:
                attention["heatmap_png"] = heatmap_png
            answer["attention"] = attention
        crop = crop_window(image.height, image.width, info)
        answer["patches"] = {
            **self._patches,
            "crop_box": [round(c, 2) for c in crop],
            "top": []
            if weights is None
            else top_patches(weights, TOP_PATCHES, info, image.width, image.height, crop),
        }
        answer["image"] = {
            "width": image.width,
            "height": image.height,
            "format": image.format,
            "mode": image.mode,
            "sha256": image.sha256,
        }
        answer["model"] = self._model
        return answer


def describe_model(
    info: ModelInfo,
    settings: Settings,
    *,
    ready: bool,
    warmup_ms: float,
    runtime: dict[str, Any],
) -> dict[str, Any]:
    """GET /model: metadata, labels, preprocessing, batching, limits and the process layout."""
    return {
        "model": info.as_dict(),
        "labels": list(info.label_names),
        "preprocessing": {
            "input_size": list(info.input_size),
            "resize_shorter_side_to": info.resize_size,
            "crop_pct": info.crop_pct,
            "crop_mode": info.crop_mode,
            "interpolation": info.interpolation,
            "mean": list(info.mean),
            "std": list(info.std),
            "on_device": info.device,
        },
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "max_queue_images": settings.max_queue_images,
            "max_images_per_request": settings.max_images_per_request,
        },
        "limits": {
            "max_body_bytes": settings.max_body_bytes,
            "max_pixels": settings.max_pixels,
            "min_side": settings.min_side,
            "max_aspect_ratio": settings.max_aspect_ratio,
            "allowed_formats": sorted(ALLOWED_FORMATS),
        },
        "defaults": {"top_k": settings.default_top_k, "attention": settings.default_attention},
        "runtime": runtime,
        "ready": ready,
        "warmup_ms": round(warmup_ms, 1),
    }

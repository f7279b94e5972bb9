"""Pydantic models of the API's answers, for the OpenAPI document at ``/docs.json``.

Handlers build plain dicts (cheaper on the hot path); these models describe them, and the HTTP
tests validate real answers against them so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "BatchItem",
    "ClassifyResponse",
    "ErrorBody",
    "ErrorResponse",
    "ModelResponse",
    "classify_request",
]


class Prediction(BaseModel):
    index: int
    label: str
    score: float = Field(description="Softmax probability.")


class Attention(BaseModel):
    mode: Literal["cls", "rollout"]
    grid: list[int] = Field(description="[rows, cols] of patches.")
    weights: list[list[float]] = Field(description="rows×cols, non-negative, sums to 1.")
    heatmap_png: str | None = Field(
        None, description="Base64 PNG of the heatmap over the image, at its original size."
    )


class TopPatch(BaseModel):
    index: int
    row: int
    col: int
    attention: float
    box: list[float] = Field(description="[x0, y0, x1, y1] in the original upload's pixels.")


class PositionEmbedding(BaseModel):
    kind: str
    shape: list[int]


class Patches(BaseModel):
    patch_size: list[int]
    grid: list[int]
    num_patches: int
    patch_dim: int = Field(description="Values per patch: channels × patch height × width.")
    embed_dim: int
    num_prefix_tokens: int = Field(description="CLS, distillation and register tokens.")
    sequence_length: int
    position_embedding: PositionEmbedding
    input_size: list[int]
    crop_box: list[float] = Field(
        description="The region of the original image the model saw, [x0, y0, x1, y1]."
    )
    top: list[TopPatch]


class ImageMeta(BaseModel):
    width: int
    height: int
    format: str
    mode: str
    sha256: str


class ModelMeta(BaseModel):
    name: str
    source: str
    dtype: str
    device: str


class Timing(BaseModel):
    decode: float
    queue: float
    inference: float
    postprocess: float
    total: float
    batch_size: int = Field(description="Images in the forward pass this image rode in.")


class ClassifyResponse(BaseModel):
    request_id: str
    predictions: list[Prediction]
    attention: Attention | None = None
    patches: Patches
    image: ImageMeta
    model: ModelMeta
    timing_ms: Timing


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class BatchItem(BaseModel):
    """A ClassifyResponse, or an error with its status, for one image of a batch."""

    index: int
    filename: str | None = None
    request_id: str | None = None
    predictions: list[Prediction] | None = None
    attention: Attention | None = None
    patches: Patches | None = None
    image: ImageMeta | None = None
    model: ModelMeta | None = None
    timing_ms: Timing | None = None
    error: ErrorBody | None = None
    status: int | None = None


class ModelResponse(BaseModel):
    model: dict[str, Any]
    labels: list[str]
    preprocessing: dict[str, Any]
    batching: dict[str, Any]
    limits: dict[str, Any]
    defaults: dict[str, Any]
    runtime: dict[str, Any] = Field(
        description=(
            "cpus: CPUs this process may use (affinity capped by a cgroup CPU quota); "
            "torch_threads: intra-op threads; decode_threads: the decode/heatmap pool."
        )
    )
    ready: bool
    warmup_ms: float


def classify_request(file_field: str, max_images: int) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` and ``parameters`` of a classification route (the handlers
    read the raw request, so FastAPI cannot infer them): the upload as multipart field
    ``file_field`` (or a raw image body), and the options, which are also accepted as form
    fields. An empty option means its default, as HTML forms send empty fields."""
    binary = {"type": "string", "format": "binary"}
    upload: dict[str, Any] = binary
    if file_field == "images":
        upload = {"type": "array", "items": binary, "minItems": 1, "maxItems": max_images}
    empty = {"type": "string", "maxLength": 0}
    spellings = ["true", "false", "1", "0", "yes", "no", "on", "off", "True", "False"]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [file_field],
                        "properties": {file_field: upload},
                    }
                },
                "application/octet-stream": {"schema": binary},
            },
        },
        "parameters": [
            {"name": "top_k", "in": "query", "description": "Classes to return (1..classes).",
             "schema": {"anyOf": [{"type": "integer", "minimum": 1}, empty]}},
            {"name": "attention", "in": "query", "description": "Attention map to return.",
             "schema": {"type": "string", "enum": ["none", "cls", "rollout", ""]}},
            {"name": "heatmap", "in": "query", "description": "Add a base64 PNG heatmap.",
             "schema": {"type": "string", "enum": [*spellings, ""]}},
        ],
    }  # fmt: skip

"""Pydantic models of the API's answers, for the OpenAPI document at ``/docs.json``.

Handlers build plain dicts (cheaper on the hot path); these models describe them, and the HTTP
tests validate real answers against them so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ..runtime.settings import ATTENTION_MODES

__all__ = [
    "BatchItem",
    "ClassifyResponse",
    "ErrorBody",
    "ErrorResponse",
    "ModelResponse",
    "ModelsResponse",
    "OipError",
    "OipInferResponse",
    "OipLive",
    "OipModelMetadata",
    "OipModelReady",
    "OipReady",
    "OipServerMetadata",
    "classify_request",
    "oip_infer_request",
]

# The option values the routes accept, as documented: an empty value means the default, and
# ``heatmap`` is read case-blind (``service/web/options.py``).
_ATTENTION_VALUES = [*ATTENTION_MODES, ""]
_HEATMAP_VALUES = ["true", "false", "1", "0", "yes", "no", "on", "off", "True", "False", ""]


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
    version: str = Field(description="The version that answered ('1' at start; a load adds one).")


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
    cache: Literal["hit", "miss"] | None = Field(
        None,
        description="With the response cache on: 'hit' (answered from it, no decode, no model) "
        "or 'miss'.",
    )


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
    cache: Literal["hit", "miss"] | None = None
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


class ModelVersion(BaseModel):
    name: str
    version: str
    traffic_percent: int = Field(description="Its share of the model's requests.")


class ModelEntry(BaseModel):
    name: str | None = Field(description="None while a checkpoint-named model loads.")
    default: bool = Field(description="What a request that names no model gets.")
    state: str = Field(description="'ready', 'loading' or 'failed'.")
    versions: list[ModelVersion]
    reason: str | None = Field(None, description="Why it is not ready.")


class ModelsResponse(BaseModel):
    models: list[ModelEntry]


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
             "schema": {"type": "string", "enum": _ATTENTION_VALUES}},
            {"name": "heatmap", "in": "query", "description": "Add a base64 PNG heatmap.",
             "schema": {"type": "string", "enum": _HEATMAP_VALUES}},
            {"name": "model", "in": "query", "description": "The model to ask (GET /models; "
             "or the X-Model header); default: the default model.", "schema": {"type": "string"}},
        ],
    }  # fmt: skip


# --- the Open Inference Protocol (``/v2``), as ``service/web/oip.py`` answers it -----------------
class OipError(BaseModel):
    error: str = Field(description="'<code>: <message>', the code from the error table.")


class OipServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipLive(BaseModel):
    live: bool


class OipReady(BaseModel):
    ready: bool


class OipModelReady(BaseModel):
    name: str
    ready: bool


class OipTensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size.")


class OipModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]
    parameters: dict[str, Any] = Field(
        description="The patch arithmetic (input_size, patch_size, grid, num_patches, ...), "
        "the labels and the checkpoint's source."
    )


class OipOutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="Row-major; absent when sent as binary.")
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: its bytes after the JSON (the binary extension)."
    )


class OipInferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OipOutputTensor]


def oip_infer_request(max_images: int) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of ``POST .../infer`` (the handler reads the raw request):
    one input tensor, ``image`` (encoded images, base64 in JSON) or ``pixels``; the request's
    parameters; the outputs asked for. The binary extension (tensors after the JSON, its length
    in ``Inference-Header-Content-Length``) is not described here."""
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": {"type": "string", "enum": ["image", "pixels"]},
            "datatype": {"type": "string", "enum": ["BYTES", "UINT8"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1,
                      "maxItems": 4},
            "parameters": {"type": "object"},
            "data": {"type": "array", "minItems": 1, "maxItems": max_images,
                     "items": {"type": "string", "format": "byte"}},
        },
    }  # fmt: skip
    output = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string",
                     "enum": ["probabilities", "attention", "crop_box", "heatmap"]},
            "parameters": {"type": "object", "properties": {
                "binary_data": {"type": "boolean"},
                "classification": {"type": "integer", "minimum": 0},
            }},
        },
    }  # fmt: skip
    parameters = {
        "type": "object",
        "properties": {
            "top_k": {"type": "integer", "minimum": 1},
            "attention": {"type": "string", "enum": _ATTENTION_VALUES},
            "heatmap": {
                "anyOf": [{"type": "boolean"}, {"type": "string", "enum": _HEATMAP_VALUES}]
            },
            "binary_data_output": {"type": "boolean"},
        },
    }
    body = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": parameters,
            "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 1},
            "outputs": {"type": "array", "items": output, "minItems": 1},
        },
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}}

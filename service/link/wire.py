"""The model hop's wire format: every message between an HTTP worker and a model process.

A message is a list of ZeroMQ frames: a JSON header, then one frame per buffer. No pickle: a
message from the network is data, never code. This module is the only place that knows the
keys; ``client.py`` and ``server.py`` call its functions, and ``tests/unit/test_wire.py``
round-trips each kind of message.

HTTP worker -> model process:

- ``{"op": "info"}``: ask for the model's metadata (sent once connected).
- ``{"id", "items": [{"mode", "shape": [h, w, 3]} | {"mode", "jpeg": 1}, ...]}``: images to
  classify, then per item its uint8 HWC pixels or its JPEG bytes (``mode``: the attention
  wanted, ``none``/``cls``/``rollout``; ``v``, when set: the version the HTTP worker routed it
  to, while a canary serves).
- ``{"op": "bye"}``: the answer to the model process's farewell: nothing more will come.

Model process -> HTTP worker:

- ``{"op": "info", "info": {...ModelInfo}, "warmup_ms", "decodes_on_device", "runtime",
  "canary": {...ModelInfo} | null, "percent"}``; or ``{"op": "info", "load_error": "..."}`` when
  the model could not load. Sent on request, and unasked to every HTTP worker heard from when
  the versions serving change (before any answer from a new version: ZeroMQ keeps the order).
- ``{"id", "model_s", "queued", "bound", "items": [...]}``: per item either
  ``{"batch", "ms", "q", "att": [rows, cols] | null, "v"}`` (the batch size it rode in, that
  batch's inference milliseconds, its queue seconds, the attention map's shape, the version
  that answered), then its float32
  probabilities frame and, when ``att`` is set, its float32 attention frame; or
  ``{"error": {...}}`` for an image the model refused (a JPEG the device could not decode).
  ``model_s`` is how long the model process held the message.
- ``{"id", "queued", "bound", "error": {...}}``: the whole message failed (503 ``overloaded``:
  the queue bound is counted in the model process, across all HTTP workers; 503
  ``load_failed``).
- ``{"op": "bye"}``: the model process is stopping: send it nothing new.

``queued`` is the model process's queue (images waiting, from every HTTP worker) as the reply
leaves, and ``bound`` its ``VIT_MAX_QUEUE_IMAGES``: HTTP workers refuse at the headers while
that report says the queue is full. An error is ``{"status", "code", "message", "headers"}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..errors import ApiError
from ..model.engine import Outcome, Work
from ..model.loading import ModelInfo
from ..runtime.runfolder import run_folder

__all__ = [
    "BYE",
    "INFO",
    "Info",
    "Reply",
    "decode_info",
    "decode_reply",
    "decode_request",
    "encode_failure",
    "encode_info",
    "encode_load_error",
    "encode_reply",
    "encode_request",
    "ipc_endpoint",
    "read_header",
]

BYE = orjson.dumps({"op": "bye"})
INFO = orjson.dumps({"op": "info"})


def ipc_endpoint(index: int, run_id: int | None = None, folder: Path | None = None) -> str:
    """The private socket of model process ``index`` of this server (in its run folder, or in
    ``folder``: a model's own, ``runfolder.model_folder``)."""
    return f"ipc://{folder or run_folder(run_id)}/model-{index}.sock"


def read_header(frame: bytes) -> dict[str, Any]:
    """A message's first frame."""
    header: dict[str, Any] = orjson.loads(frame)
    return header


# --- images to classify -------------------------------------------------------------------------
def encode_request(message_id: int, works: Sequence[Work]) -> list[Any]:
    """The frames that ask for ``works`` (buffers are sent without copying)."""
    items: list[dict[str, Any]] = []
    frames: list[Any] = []
    for work in works:
        item: dict[str, Any] = {"mode": work.mode}
        if work.version is not None:
            item["v"] = work.version
        if work.jpeg is not None:
            items.append(item | {"jpeg": 1})
            frames.append(work.jpeg)
        else:
            assert work.pixels is not None
            items.append(item | {"shape": list(work.pixels.shape)})
            frames.append(np.ascontiguousarray(work.pixels))
    return [orjson.dumps({"id": message_id, "items": items}), *frames]


def decode_request(header: dict[str, Any], buffers: Sequence[memoryview]) -> list[Work]:
    """The works a request carries (pixels are views of the received frames, not copies)."""
    works = []
    for item, buffer in zip(header["items"], buffers, strict=True):
        version = item.get("v")
        if item.get("jpeg"):
            works.append(Work(mode=item["mode"], jpeg=bytes(buffer), version=version))
        else:
            pixels = np.frombuffer(buffer, dtype=np.uint8).reshape(item["shape"])
            works.append(Work(mode=item["mode"], pixels=pixels, version=version))
    return works


# --- the answers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """A reply to images: each one's result (or the whole message's error), and the queue."""

    message_id: int
    results: list[Outcome | ApiError]
    error: ApiError | None
    model_s: float
    queued: int | None
    bound: int | None


def encode_reply(
    message_id: int,
    results: Sequence[Outcome | ApiError],
    *,
    model_s: float,
    queued: int,
    bound: int,
) -> list[Any]:
    """The frames that answer a request, one result per image."""
    items: list[dict[str, Any]] = []
    frames: list[Any] = []
    for result in results:
        if isinstance(result, ApiError):
            items.append({"error": _error_dict(result)})
            continue
        att = None if result.attention is None else list(result.attention.shape)
        items.append(
            {"batch": result.batch_size, "ms": result.inference_ms, "q": result.queue_s, "att": att,
             "v": None if result.model is None else result.model.version}
        )  # fmt: skip
        frames.append(np.ascontiguousarray(result.probs, dtype=np.float32))
        if result.attention is not None:
            frames.append(np.ascontiguousarray(result.attention, dtype=np.float32))
    header = {
        "id": message_id,
        "items": items,
        "model_s": model_s,
        "queued": queued,
        "bound": bound,
    }
    return [orjson.dumps(header), *frames]


def encode_failure(message_id: int, error: ApiError, *, queued: int, bound: int) -> bytes:
    """The frame that fails a whole request."""
    return orjson.dumps(
        {"id": message_id, "queued": queued, "bound": bound, "error": _error_dict(error)}
    )


def decode_reply(
    header: dict[str, Any],
    buffers: Sequence[memoryview],
    versions: Mapping[str, ModelInfo] | None = None,
) -> Reply:
    """A reply's results (arrays are views of the received frames, not copies), each with
    the ``ModelInfo`` of the version that answered where ``versions`` has it."""
    known = versions or {}
    queued, bound = header.get("queued"), header.get("bound")
    if "error" in header:
        error = _error_from(header["error"])
        return Reply(header["id"], [], error, 0.0, queued, bound)
    results: list[Outcome | ApiError] = []
    frames = iter(buffers)
    for item in header["items"]:
        if "error" in item:
            results.append(_error_from(item["error"]))
            continue
        probs = np.frombuffer(next(frames), dtype=np.float32)
        attention = None
        if item["att"] is not None:
            attention = np.frombuffer(next(frames), dtype=np.float32).reshape(item["att"])
        model = known.get(item.get("v") or "")
        results.append(Outcome(probs, attention, item["batch"], item["ms"], item["q"], model))
    return Reply(header["id"], results, None, header["model_s"], queued, bound)


# --- the model's metadata --------------------------------------------------------------------
@dataclass(frozen=True)
class Info:
    """What a model process says about itself: its model, or why it has none."""

    info: ModelInfo | None
    load_error: str | None
    warmup_ms: float = 0.0
    decodes_on_device: bool = False
    runtime: dict[str, Any] | None = None
    canary: ModelInfo | None = None
    percent: int = 0


def encode_info(
    info: ModelInfo,
    *,
    warmup_ms: float,
    decodes_on_device: bool,
    runtime: dict[str, Any],
    canary: tuple[ModelInfo, int] | None = None,
) -> bytes:
    """The answer to ``INFO`` from a model process whose model is loaded (``canary``: a
    second version serving, and its percent of the requests)."""
    return orjson.dumps(
        {
            "op": "info",
            "info": asdict(info),
            "warmup_ms": warmup_ms,
            "decodes_on_device": decodes_on_device,
            "runtime": runtime,
            "canary": None if canary is None else asdict(canary[0]),
            "percent": 0 if canary is None else canary[1],
        }
    )


def encode_load_error(message: str) -> bytes:
    """The answer to ``INFO`` from a model process whose model failed to load."""
    return orjson.dumps({"op": "info", "load_error": message})


def decode_info(header: dict[str, Any]) -> Info:
    """An ``info`` answer."""
    if "load_error" in header:
        return Info(None, header["load_error"])
    canary = header.get("canary")
    return Info(
        _model_info(header["info"]),
        None,
        header["warmup_ms"],
        header["decodes_on_device"],
        header["runtime"],
        None if canary is None else _model_info(canary),
        int(header.get("percent", 0)),
    )


def _model_info(data: dict[str, Any]) -> ModelInfo:
    values: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in data.items()
        if key in ModelInfo.__dataclass_fields__
    }
    return ModelInfo(**values)


def _error_dict(exc: ApiError) -> dict[str, Any]:
    return {"status": exc.status, "code": exc.code, "message": exc.message, "headers": exc.headers}


def _error_from(data: dict[str, Any]) -> ApiError:
    return ApiError(data["status"], data["code"], data["message"], data.get("headers"))

"""The Open Inference Protocol (KServe v2) over HTTP: a second front door to the same worker.

Served on the API's port beside the native routes, by ``Front.wrap`` for every path under
``/v2`` (not FastAPI routes: a hub model's name has slashes in it, so a path is parsed from its
end: ``.../versions/{v}/infer``):

- ``GET /v2`` (server metadata), ``GET /v2/health/live``, ``GET /v2/health/ready``;
- ``GET /v2/models/{name}[/versions/{v}]`` (model metadata: the tensors, and the patch arithmetic
  and labels as ``parameters``), ``GET .../ready``;
- ``POST /v2/models/{name}[/versions/{v}]/infer``.

The model's name is ``GET /model``'s (``vit-digits`` for the default), its only version ``1``.
An inference request is one of two inputs: ``image`` ``BYTES [N]`` or ``[N,1]`` (encoded images:
the formats, limits and errors of ``/classify``; base64 text in JSON, raw bytes with the binary
extension) or ``pixels`` ``UINT8 [N,H,W,3]`` (RGB a client decoded itself). Request
``parameters``: ``top_k`` (the classification extension's default count), ``attention``
(``none``/``cls``/``rollout``), ``heatmap``, ``binary_data_output``. Outputs: ``probabilities``
``FP32 [N,C]`` (or, with ``classification: k``, ``BYTES [N,k]`` ``"score:index:label"``,
Triton's classification extension), ``attention`` ``FP32 [N,gh,gw]``, ``crop_box`` ``INT32
[N,4]`` (x0, y0, x1, y1 in the original's pixels, rounded), ``heatmap`` ``BYTES [N]`` (a PNG:
base64 text in JSON, raw bytes in binary). Triton's binary tensor extension works both ways
(``Inference-Header-Content-Length``; ``binary_data_size`` on inputs, ``binary_data`` on
outputs).

Everything else is the worker's: the admission gate refuses an ``infer`` before its body is read
(its pre-rendered 503 in this protocol's shape), then ``HttpWorker.admitted`` (deadline, in
flight, ``vit_requests_total{endpoint="oip_infer"}``) and ``Pipeline.run`` (decode, batch,
count). Errors are the protocol's ``{"error": "<code>: <message>"}`` with the status of the
native API's table; a request with several images fails whole, with the first failing image's
status (the protocol has no per-item errors), and a bad tensor is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi.responses import Response
from starlette.requests import ClientDisconnect, Request

from ..backend import version_info
from ..errors import ApiError, body_timeout
from ..model.engine import Outcome
from ..model.geometry import crop_window
from ..model.loading import ModelInfo
from ..runtime.settings import Settings
from .admin import PREFIX as REPOSITORY
from .admin import Admin
from .admission import OIP_INFER, RESERVED
from .answers import oip_error_response as oip_error
from .answers import top_k
from .options import Options, parse_options
from .pipeline import CLIENT_KEY, Pixels, Scored
from .reading import Upload, request_id

if TYPE_CHECKING:
    from ..backend import Backend
    from .worker import HttpWorker

__all__ = [
    "PREFIX",
    "InferCall",
    "Oip",
    "answered_by",
    "infer_call",
    "infer_response",
    "model_metadata",
    "oip_route",
    "output_tensor",
    "parse_infer",
    "served_model",
    "server_metadata",
    "tensor_bytes",
]

PREFIX = "/v2"
HEADER_LENGTH = "inference-header-content-length"
_PROTOCOL = "kserve-v2"
_EXTENSIONS = ["classification", "binary_tensor_data"]
_OUTPUTS = ("probabilities", "attention", "crop_box", "heatmap")
_JSON = "application/json"


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers, media_type=_JSON)


def _bad_tensor(name: str, message: str) -> ApiError:
    return ApiError(400, "invalid_tensor", f"Input tensor '{name}': {message}")


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "invalid_inference_request", message)


@dataclass(frozen=True)
class Requested:
    """One output the client asked for."""

    name: str
    binary: bool
    classification: int  # 0: the tensor itself


@dataclass(frozen=True)
class InferCall:
    """One parsed inference request."""

    id: str | None
    items: list[Upload] | list[Pixels]
    options: Options
    outputs: list[Requested]


class Oip:
    """The protocol's routes for one HTTP worker (attached once BentoML built it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker: HttpWorker | None = None
        self.admin = Admin(settings)

    def attach(self, worker: HttpWorker) -> None:
        self.worker = worker

    async def serve(self, request: Request) -> Response:
        """Any request under ``/v2``: its answer, errors in the protocol's shape."""
        rid = request_id(request.headers.get("x-request-id", ""))
        path, method = request.scope["path"], request.method
        try:
            if path in ("/v2", "/v2/"):
                _allow(method, "GET")
                return _json(server_metadata())
            if path == "/v2/health/live":
                _allow(method, "GET")
                return _json({"live": True})
            if path == "/v2/health/ready":
                _allow(method, "GET")
                ready = await self._worker().is_ready()
                return _json({"ready": ready}, 200 if ready else 400)
            if path.startswith(f"{REPOSITORY}/"):
                return await self.admin.serve(request, self._worker())
            if not path.startswith("/v2/models/"):
                raise ApiError(404, "not_found", f"Nothing at {method} {path}.")
            name, version, action = _model_path(path[len("/v2/models/") :])
            if action == "infer":
                _allow(method, "POST")
                return await self.infer(request, name, version, rid)
            _allow(method, "GET")
            worker = self._worker()
            await worker.models.first_contact()
            _, info = served_model(worker, name, version)
            if action == "ready":
                ready = await worker.is_ready()
                return _json({"name": info.name, "ready": ready}, 200 if ready else 400)
            return _json(model_metadata(info))
        except ApiError as exc:
            return oip_error(exc, rid)

    def _worker(self) -> HttpWorker:
        assert self.worker is not None, "no HTTP worker in this process"
        return self.worker

    # --- inference ---------------------------------------------------------------------------
    async def infer(self, request: Request, name: str, version: str | None, rid: str) -> Response:
        """``POST .../infer``: admitted like ``/classify`` (the gate, or here), then answered."""
        worker = self._worker()
        if not request.scope.pop(RESERVED, False):  # the gate was not asked (pipelined, traced)
            refusal = worker.admission.admit(name)
            if refusal is not None:
                worker.admission.refused(OIP_INFER, refusal)
                return oip_error(refusal, rid)
        async with worker.admitted(OIP_INFER, rid, shape=oip_error) as envelope:
            envelope.response = await self._infer(worker, request, name, version, rid)
        assert envelope.response is not None
        return envelope.response

    async def _infer(
        self, worker: HttpWorker, request: Request, name: str, version: str | None, rid: str
    ) -> Response:
        settings = worker.settings
        count = 1
        try:
            with contextlib.ExitStack() as announced:
                backend, info = served_model(worker, name, version)
                announced.enter_context(backend.arriving(1))
                body = await _read_body(request, settings)
                call = parse_infer(body, request.headers.get(HEADER_LENGTH), info, settings)
                count = len(call.items)
                key = request.headers.get(CLIENT_KEY)
                scored = await worker.pipeline.run(
                    backend, call.items, call.options, announced, key, version or None
                )
        except ApiError as exc:
            worker.pipeline.count([exc] * count)
            return oip_error(exc, rid)
        failed = next((s.result for s in scored if isinstance(s.result, ApiError)), None)
        if failed is not None:
            index = next(i for i, s in enumerate(scored) if s.result is failed)
            where = f"image {index} of {len(scored)}: " if len(scored) > 1 else ""
            return oip_error(
                ApiError(failed.status, failed.code, where + failed.message, failed.headers), rid
            )
        return infer_response(scored, call, info, rid)


def served_model(worker: HttpWorker, name: str, version: str | None) -> tuple[Backend, ModelInfo]:
    """The model ``name`` names and the info of ``version`` of it (None: the stable version's),
    while it serves; else 404."""
    backend = worker.models.get(name)
    info = backend.info if version in (None, "") else version_info(backend, str(version))
    return backend, info


def answered_by(scored: Sequence[Scored], info: ModelInfo) -> ModelInfo:
    """The version that answered a request (one batcher, one version: the first image's),
    ``info`` where none says (an error, or a model process that does not tell)."""
    for each in scored:
        if isinstance(each.result, Outcome) and each.result.model is not None:
            return each.result.model
    return info


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise ApiError(
            405, "method_not_allowed", f"Use {allowed} here, not {method}.", {"Allow": allowed}
        )


_ADMIN = ("load", "traffic", "unload")


def oip_route(path: str) -> str | None:
    """The template of the protocol's route that serves ``path`` (as ``/docs.json`` writes
    it), or None where none does: one metrics label per route, whatever model is named."""
    if path in ("/v2", "/v2/"):
        return "/v2"
    if path in ("/v2/health/live", "/v2/health/ready", f"{REPOSITORY}/index"):
        return path
    if path.startswith(f"{REPOSITORY}/models/"):
        action = path.rpartition("/")[2]
        return f"{REPOSITORY}/models/{{model_name}}/{action}" if action in _ADMIN else None
    if not path.startswith("/v2/models/"):
        return None
    try:
        _name, version, action = _model_path(path[len("/v2/models/") :])
    except ApiError:
        return None
    route = "/v2/models/{model_name}"
    if version is not None:
        route += "/versions/{model_version}"
    return route if action == "metadata" else f"{route}/{action}"


def _model_path(rest: str) -> tuple[str, str | None, str]:
    """``{name}[/versions/{v}][/ready|/infer]`` -> (name, version or None, action)."""
    action = "metadata"
    for suffix in ("/infer", "/ready"):
        if rest.endswith(suffix):
            rest, action = rest[: -len(suffix)], suffix[1:]
            break
    version = None
    name, marker, tail = rest.rpartition("/versions/")
    if marker and tail and "/" not in tail:
        rest, version = name, tail
    if not rest:
        raise ApiError(404, "not_found", "No model name in the path.")
    return rest, version, action


def server_metadata() -> dict[str, Any]:
    """``GET /v2``: the server's name, version and the protocol's extensions it serves."""
    return {"name": "vit-serve", "version": _package_version(), "extensions": _EXTENSIONS}


@functools.lru_cache(maxsize=1)
def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vit-serve")
    except PackageNotFoundError:
        return "0.1.0"


async def _read_body(request: Request, settings: Settings) -> bytes:
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, "body_too_large", f"The request body exceeds {limit} bytes.")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, received = [], 0
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise body_timeout(settings.body_timeout_s) from None
    except ClientDisconnect as exc:
        raise ApiError(400, "client_disconnected", "The client went away mid-upload.") from exc
    return b"".join(chunks)


# --- the request -----------------------------------------------------------------------------
def parse_infer(
    body: bytes, header_length: str | None, info: ModelInfo, settings: Settings
) -> InferCall:
    """An inference request's JSON (and binary tensors, with ``header_length``) into the items
    for the pipeline, the options and the outputs asked for.

    Raises:
        ApiError: 400 for a malformed request or tensor, 413 for too many images or pixels,
            422 for a bad option (the native API's codes).
    """
    binary = b""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()):
            raise _bad_request(
                f"Inference-Header-Content-Length must be a byte count, not {header_length!r}."
            )
        split = int(header_length)
        if split > len(body):
            raise _bad_request(
                f"Inference-Header-Content-Length is {split}, but the body has "
                f"only {len(body)} bytes."
            )
        body, binary = body[:split], body[split:]
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad_request(f"The request is not valid JSON: {exc}.") from None
    if not isinstance(request, dict):
        raise _bad_request("The request must be a JSON object with 'inputs'.")
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _bad_request("'id' must be a string.")
    params = _parameters(request.get("parameters"), "the request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad_request(
            "'inputs' must hold exactly one tensor: 'image' (BYTES, encoded "
            "images) or 'pixels' (UINT8 [N,H,W,3])."
        )
    tensor = inputs[0]
    data, used = _tensor_data(tensor, binary)
    if used != len(binary):
        raise _bad_request(f"The body has {len(binary) - used} bytes after its tensors.")
    return infer_call(rid, params, tensor, data, request.get("outputs"), info, settings)


def infer_call(
    rid: str | None,
    params: dict[str, Any],
    tensor: dict[str, Any],
    data: bytes | list[Any],
    outputs_asked: Any,
    info: ModelInfo,
    settings: Settings,
) -> InferCall:
    """One inference request, whichever transport brought it: its input ``tensor`` (name,
    datatype, shape) with ``data`` (the binary form's bytes, or a list of elements: base64
    text or raw bytes for ``image``, integers for ``pixels``), the request's parameters and the
    outputs asked for (a list of ``{"name", "parameters"}``, or None for the defaults)."""
    name = tensor.get("name")
    items: list[Upload] | list[Pixels]
    if name == "image":
        items = _images(tensor, data, settings)
    elif name == "pixels":
        items = _pixels(tensor, data, settings)
    else:
        raise _bad_request(f"No input tensor '{name}': send 'image' (BYTES) or 'pixels' (UINT8).")
    options, top_k = _options(params, info, settings)
    outputs = _outputs(outputs_asked, params, options, top_k)
    names = {o.name for o in outputs}
    if "heatmap" in names and not options.heatmap:
        options = Options(options.top_k, options.attention, True)
    elif not names & {"attention", "heatmap"} and options.attention != "none":
        # Outputs named without the attention: the model pass skips capturing it.
        options = Options(options.top_k, "none", False)
    return InferCall(rid, items, options, outputs)


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad_request(f"'parameters' of {where} must be an object.")
    return value


def _shape(tensor: dict[str, Any]) -> list[int]:
    name, shape = tensor.get("name"), tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _bad_tensor(str(name), f"'shape' must be a list of sizes, not {shape!r}.")
    return shape


def _tensor_data(tensor: dict[str, Any], binary: bytes) -> tuple[Any, int]:
    """The tensor's elements (a JSON list) or its binary bytes; and the binary bytes used."""
    name = str(tensor.get("name"))
    params = _parameters(tensor.get("parameters"), f"input '{name}'")
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise _bad_tensor(name, "no 'data' and no 'binary_data_size'.")
        return tensor["data"], 0
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad_tensor(name, f"'binary_data_size' must be a byte count, not {size!r}.")
    if "data" in tensor:
        raise _bad_tensor(name, "both 'data' and 'binary_data_size'.")
    if size > len(binary):
        raise _bad_tensor(
            name, f"'binary_data_size' is {size}, but only {len(binary)} bytes follow the JSON."
        )
    return binary[:size], size


def _flat(data: Any) -> list[Any]:
    """Row-major elements of a (possibly nested) JSON list."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for each in stack[-1]:
            if isinstance(each, list):
                stack.append(iter(each))
                break
            out.append(each)
        else:
            stack.pop()
    return out


def _images(tensor: dict[str, Any], data: Any, settings: Settings) -> list[Upload]:
    shape = _shape(tensor)
    if tensor.get("datatype") != "BYTES":
        raise _bad_tensor("image", f"datatype must be BYTES, not {tensor.get('datatype')!r}.")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise _bad_tensor("image", f"shape must be [N] or [N,1], not {shape}.")
    count = shape[0]
    _check_count(count, settings)
    if isinstance(data, bytes):
        blobs = _unpack_bytes(data, count)
    else:
        elements = _flat(data)
        if len(elements) != count:
            raise _bad_tensor(
                "image", f"shape {shape} holds {count} images, 'data' has {len(elements)}."
            )
        blobs = []
        for index, element in enumerate(elements):
            if isinstance(element, bytes):  # gRPC's bytes_contents: the image itself
                blobs.append(element)
                continue
            if not isinstance(element, str):
                raise _bad_tensor(
                    "image",
                    f"element {index} must be a base64 string in JSON "
                    "(or send raw bytes with the binary extension).",
                )
            try:
                blobs.append(base64.b64decode(element, validate=True))
            except (binascii.Error, ValueError):
                raise _bad_tensor("image", f"element {index} is not valid base64.") from None
    return [Upload(blob, None) for blob in blobs]


def _unpack_bytes(data: bytes, count: int) -> list[bytes]:
    """BYTES elements in the binary extension: each a 4-byte little-endian length, then data."""
    blobs: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise _bad_tensor("image", "its binary data ends inside an element's length.")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise _bad_tensor(
                "image",
                f"element {len(blobs)} claims {length} bytes; {len(data) - offset} are left.",
            )
        blobs.append(data[offset : offset + length])
        offset += length
    if len(blobs) != count:
        raise _bad_tensor("image", f"its shape holds {count} images, its binary data {len(blobs)}.")
    return blobs


def _pixels(tensor: dict[str, Any], data: Any, settings: Settings) -> list[Pixels]:
    shape = _shape(tensor)
    if tensor.get("datatype") != "UINT8":
        raise _bad_tensor("pixels", f"datatype must be UINT8, not {tensor.get('datatype')!r}.")
    if len(shape) != 4 or shape[3] != 3:
        raise _bad_tensor("pixels", f"shape must be [N,H,W,3] (RGB), not {shape}.")
    count, height, width = shape[:3]
    _check_count(count, settings)
    if height * width > settings.max_pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"The images are {width}x{height} = "
            f"{height * width:,} pixels; the limit is {settings.max_pixels:,} "
            "pixels.",
        )
    size = count * height * width * 3
    if isinstance(data, bytes):
        if len(data) != size:
            raise _bad_tensor("pixels", f"shape {shape} needs {size} bytes, not {len(data)}.")
        array = np.frombuffer(data, dtype=np.uint8)
    else:
        elements = _flat(data)
        if len(elements) != size:
            raise _bad_tensor("pixels", f"shape {shape} needs {size} values, not {len(elements)}.")
        if not all(type(v) is int and 0 <= v <= 255 for v in elements):
            raise _bad_tensor("pixels", "every value must be an integer from 0 to 255.")
        array = np.asarray(elements, dtype=np.uint8)
    array = array.reshape(count, height, width, 3)
    return [Pixels(array[i]) for i in range(count)]


def _check_count(count: int, settings: Settings) -> None:
    most = settings.max_images_per_request
    if count < 1:
        raise _bad_request("An inference request needs at least one image.")
    if count > most:
        raise ApiError(413, "too_many_images", f"At most {most} images per request, not {count}.")


def _options(
    params: dict[str, Any], info: ModelInfo, settings: Settings
) -> tuple[Options, int | None]:
    """The request's options (the native API's checks and 422s), and ``top_k`` if given."""
    fields: dict[str, str] = {}
    top_k = params.get("top_k")
    if top_k is not None:
        fields["top_k"] = str(top_k) if type(top_k) is int else repr(top_k)
    attention = params.get("attention")
    if attention is not None:
        fields["attention"] = attention if isinstance(attention, str) else repr(attention)
    heatmap = params.get("heatmap")
    if heatmap is not None:
        if isinstance(heatmap, bool):
            fields["heatmap"] = "true" if heatmap else "false"
        else:
            fields["heatmap"] = str(heatmap)
    options = parse_options(
        fields,
        info.num_classes,
        default_top_k=settings.default_top_k,
        default_attention=settings.default_attention,
    )
    return options, options.top_k if top_k is not None else None


def _outputs(
    value: Any, params: dict[str, Any], options: Options, top_k: int | None
) -> list[Requested]:
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _bad_request("'binary_data_output' must be true or false.")
    if value is None:
        names = ["probabilities", "crop_box"]
        if options.attention != "none":
            names.insert(1, "attention")
        if options.heatmap:
            names.append("heatmap")
        count = top_k or 0
        return [Requested(n, binary_default, count if n == "probabilities" else 0) for n in names]
    if not isinstance(value, list) or not value:
        raise _bad_request("'outputs' must be a list of outputs (or left out for all).")
    asked: list[Requested] = []
    for each in value:
        name = each.get("name") if isinstance(each, dict) else None
        if name not in _OUTPUTS:
            raise _bad_request(f"No output '{name}': the outputs are {', '.join(_OUTPUTS)}.")
        if any(a.name == name for a in asked):
            raise _bad_request(f"Output '{name}' is asked for twice.")
        p = _parameters(each.get("parameters"), f"output '{name}'")
        binary = p.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise _bad_request(f"'binary_data' of output '{name}' must be true or false.")
        count = p.get("classification", 0)
        if count is True:
            count = top_k or options.top_k
        if type(count) is not int or count < 0:
            raise _bad_request(f"'classification' of output '{name}' must be a class count.")
        if count and name != "probabilities":
            raise _bad_request(f"'classification' applies to 'probabilities', not '{name}'.")
        if name in ("attention", "heatmap") and options.attention == "none":
            raise ApiError(
                422,
                "invalid_attention",
                f"Output '{name}' needs attention 'cls' or 'rollout', not 'none'.",
            )
        asked.append(Requested(name, binary, count))
    return asked


# --- the answer ------------------------------------------------------------------------------
def infer_response(
    scored: Sequence[Scored], call: InferCall, info: ModelInfo, rid: str
) -> Response:
    """The inference response: JSON, or JSON then binary tensors (the binary extension)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for asked in call.outputs:
        datatype, shape, data = output_tensor(asked, scored, info)
        tensor: dict[str, Any] = {"name": asked.name, "datatype": datatype, "shape": shape}
        if asked.binary:
            blob = tensor_bytes(datatype, data)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = _json_data(datatype, data)
        outputs.append(tensor)
    version = answered_by(scored, info).version
    answer: dict[str, Any] = {"model_name": info.name, "model_version": version, "outputs": outputs}
    if call.id is not None:
        answer["id"] = call.id
    header = orjson.dumps(answer)
    headers = {"X-Request-ID": rid}
    if not blobs:
        return Response(header, 200, headers, media_type=_JSON)
    headers["Inference-Header-Content-Length"] = str(len(header))
    return Response(b"".join([header, *blobs]), 200, headers, media_type="application/octet-stream")


def output_tensor(
    asked: Requested, scored: Sequence[Scored], info: ModelInfo
) -> tuple[str, list[int], Any]:
    outcomes = [s.result for s in scored if not isinstance(s.result, ApiError)]
    n = len(scored)
    if asked.name == "probabilities":
        probs = np.stack([o.probs for o in outcomes]).astype(np.float32)
        if not asked.classification:
            return "FP32", [n, info.num_classes], probs
        k = min(asked.classification, info.num_classes)
        rows = [
            f"{c['score']:f}:{c['index']}:{c['label']}"
            for row in probs
            for c in top_k(row, k, info.label_names)
        ]
        return "BYTES", [n, k], rows
    if asked.name == "attention":
        grid = list(info.grid)
        weights = np.stack([_attention(o) for o in outcomes]).astype(np.float32)
        return "FP32", [n, *grid], weights
    if asked.name == "crop_box":
        boxes = []
        for s in scored:
            assert s.facts is not None
            crop = crop_window(s.facts.height, s.facts.width, info)
            boxes.append([math.floor(c + 0.5) for c in crop])
        return "INT32", [n, 4], np.asarray(boxes, dtype=np.int32)
    return "BYTES", [n], [base64.b64decode(s.heatmap_png or "") for s in scored]


def _attention(outcome: Outcome) -> np.ndarray:
    assert outcome.attention is not None, "attention asked for, none computed"
    return outcome.attention


def _json_data(datatype: str, data: Any) -> list[Any]:
    if datatype == "BYTES":
        return [d if isinstance(d, str) else base64.b64encode(d).decode("ascii") for d in data]
    return list(data.reshape(-1).tolist())


def tensor_bytes(datatype: str, data: Any) -> bytes:
    if datatype == "BYTES":
        parts = []
        for each in data:
            raw = each.encode() if isinstance(each, str) else each
            parts += [struct.pack("<I", len(raw)), raw]
        return b"".join(parts)
    return bytes(np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes())


# --- metadata --------------------------------------------------------------------------------
def model_metadata(info: ModelInfo) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the tensors, and the patch arithmetic and labels."""
    grid = list(info.grid)
    return {
        "name": info.name,
        "versions": [info.version],
        "platform": "pytorch_timm",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, info.num_classes]},
            {"name": "attention", "datatype": "FP32", "shape": [-1, *grid]},
            {"name": "crop_box", "datatype": "INT32", "shape": [-1, 4]},
            {"name": "heatmap", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {
            "protocol": _PROTOCOL,
            "input_size": list(info.input_size),
            "patch_size": list(info.patch_size),
            "grid": grid,
            "num_patches": info.num_patches,
            "patch_dim": info.patch_dim,
            "embed_dim": info.embed_dim,
            "num_prefix_tokens": info.num_prefix_tokens,
            "sequence_length": info.sequence_length,
            "labels": list(info.label_names),
            "source": info.source,
        },
    }

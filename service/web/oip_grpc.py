"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), a third front door
to the same worker, and ``grpc.health.v1`` for Kubernetes' gRPC probes.

Each HTTP worker serves gRPC on ``VIT_GRPC_PORT`` (default 3001; ``0`` turns it off) at the
address its HTTP socket listens on, with ``SO_REUSEPORT`` so that the workers share the port and
the kernel spreads the connections, as it does for HTTP. An asyncio server (``grpc.aio``) on
the worker's own event loop: no thread hop between a call and the batcher.

The messages and the servicer come from ``tritonclient``'s generated ``grpc_service.proto``
(a pinned PyPI dependency): Triton's service, a superset of KServe's ``grpc_predict_v2.proto``
(the same package ``inference``, the same messages and field numbers), so both kinds of
clients call it. Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer (``raw_input_contents`` or typed ``contents``; answers in ``raw_output_contents``, as
Triton's). The rest of Triton's service (streaming, repository, shared memory) is
UNIMPLEMENTED.

A ModelInfer goes where a REST infer goes (``service/web/oip.py``: the same parsing of tensors
and parameters, the same outputs) through ``HttpWorker.admitted`` (admission, deadline,
``vit_requests_total{endpoint="oip_grpc_infer"}``) and ``Pipeline.run``. Errors are status
codes: INVALID_ARGUMENT (a 400, 413, 415 or 422 of the native table), NOT_FOUND (an unknown
model or version), RESOURCE_EXHAUSTED (overloaded), UNAVAILABLE (not ready, load failed,
stopping), DEADLINE_EXCEEDED (the request deadline; a client's own deadline cancels the call,
and its place is given back), INTERNAL; the message is ``"<code>: <message>"``. Message limits
match the HTTP ones (``VIT_MAX_BODY_BYTES`` in). On SIGTERM the server stops with the HTTP
side (``Front.close_doors``): new calls are refused, calls in flight are answered within the
grace period.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import grpc
from fastapi.responses import Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ..errors import ApiError
from ..runtime.settings import Settings
from .admission import GRPC_INFER
from .oip import (
    InferCall,
    answered_by,
    infer_call,
    model_metadata,
    output_tensor,
    served_model,
    server_metadata,
    tensor_bytes,
)
from .pipeline import CLIENT_KEY
from .reading import request_id

if TYPE_CHECKING:
    from .worker import HttpWorker

__all__ = ["GRPC_INFER", "GrpcDoor", "status_code"]

_logger = logging.getLogger(__name__)

_SERVICE = "inference.GRPCInferenceService"
# Larger than any answer: probabilities and attention are small, a heatmap is a PNG per image.
_MAX_SEND_BYTES = 256 * 1024 * 1024


def status_code(error: ApiError) -> grpc.StatusCode:
    """The gRPC status of an error of the native table."""
    if error.status == 404:
        return grpc.StatusCode.NOT_FOUND
    if error.status == 503:
        if error.code == "overloaded":
            return grpc.StatusCode.RESOURCE_EXHAUSTED
        return grpc.StatusCode.UNAVAILABLE
    if error.status in (408, 504):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if 400 <= error.status < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class _Answer(Response):
    """What the request envelope holds for a call: the reply, or the error to abort with."""

    def __init__(self, reply: Any = None, error: ApiError | None = None) -> None:
        super().__init__(status_code=200 if error is None else error.status)
        self.reply = reply
        self.error = error


def _failed(error: ApiError, _rid: str) -> Response:
    return _Answer(error=error)


def _client_key(context: grpc.aio.ServicerContext) -> str | None:
    """The client's key (``x-client-key`` metadata): a canary keeps it with one version."""
    for name, value in context.invocation_metadata() or ():
        if name == CLIENT_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


async def _abort(context: grpc.aio.ServicerContext, error: ApiError) -> None:
    await context.abort(status_code(error), f"{error.code}: {error.message}")


def _parameter(value: pb.InferParameter) -> Any:
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over one HTTP worker."""

    def __init__(self, worker: HttpWorker) -> None:
        self.worker = worker

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=await self.worker.is_ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        meta = server_metadata()
        return pb.ServerMetadataResponse(
            name=meta["name"], version=meta["version"], extensions=meta["extensions"]
        )

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            await self.worker.models.first_contact()
            served_model(self.worker, request.name, request.version)
        except ApiError as exc:
            await _abort(context, exc)
        return pb.ModelReadyResponse(ready=await self.worker.is_ready())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            await self.worker.models.first_contact()
            _, info = served_model(self.worker, request.name, request.version)
        except ApiError as exc:
            await _abort(context, exc)
        meta = model_metadata(info)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        worker = self.worker
        rid = request_id(request.id)
        refusal = worker.admission.admit(request.model_name)
        if refusal is not None:
            worker.admission.refused(GRPC_INFER, refusal)
            await _abort(context, refusal)
        key = _client_key(context)
        async with worker.admitted(GRPC_INFER, rid, shape=_failed) as envelope:
            envelope.response = await self._infer(request, rid, key)
        answer = envelope.response
        assert isinstance(answer, _Answer)
        if answer.error is not None:
            await _abort(context, answer.error)
        return answer.reply

    async def _infer(self, request: Any, rid: str, key: str | None = None) -> _Answer:
        worker = self.worker
        count = 1
        try:
            with contextlib.ExitStack() as announced:
                backend, info = served_model(worker, request.model_name, request.model_version)
                announced.enter_context(backend.arriving(1))
                call = _call(request, info, worker.settings)
                count = len(call.items)
                scored = await worker.pipeline.run(
                    backend, call.items, call.options, announced, key,
                    request.model_version or None,
                )  # fmt: skip
        except ApiError as exc:
            worker.pipeline.count([exc] * count)
            return _Answer(error=exc)
        failed = next((s for s in scored if isinstance(s.result, ApiError)), None)
        if failed is not None:
            assert isinstance(failed.result, ApiError)
            error = failed.result
            if len(scored) > 1:
                where = f"image {scored.index(failed)} of {len(scored)}: "
                error = ApiError(error.status, error.code, where + error.message, error.headers)
            return _Answer(error=error)
        version = answered_by(scored, info).version
        reply = pb.ModelInferResponse(model_name=info.name, model_version=version)
        if request.id:
            reply.id = request.id
        for asked in call.outputs:
            datatype, shape, data = output_tensor(asked, scored, info)
            reply.outputs.add(name=asked.name, datatype=datatype, shape=shape)
            reply.raw_output_contents.append(tensor_bytes(datatype, data))
        return _Answer(reply)


def _call(request: Any, info: Any, settings: Settings) -> InferCall:
    """A ModelInferRequest as the protocol's one shape of request (``oip.infer_call``)."""
    if len(request.inputs) != 1:
        raise ApiError(
            400,
            "invalid_inference_request",
            "'inputs' must hold exactly one tensor: 'image' (BYTES, encoded images) or "
            "'pixels' (UINT8 [N,H,W,3]).",
        )
    given = request.inputs[0]
    tensor = {"name": given.name, "datatype": given.datatype, "shape": list(given.shape)}
    data: bytes | list[Any]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise ApiError(
                400,
                "invalid_inference_request",
                f"{len(request.raw_input_contents)} raw_input_contents for one input.",
            )
        data = request.raw_input_contents[0]
    elif given.datatype == "BYTES":
        data = list(given.contents.bytes_contents)
    else:
        data = list(given.contents.uint_contents)
    params = {key: _parameter(value) for key, value in request.parameters.items()}
    outputs = [
        {"name": o.name, "parameters": {k: _parameter(v) for k, v in o.parameters.items()}}
        for o in request.outputs
    ] or None
    call = infer_call(request.id or None, params, tensor, data, outputs, info, settings)
    return call


class _Health(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health/Check``: SERVING while this worker is ready (the model loaded,
    not stopping), for the server (``""``) and for the inference service."""

    def __init__(self, worker: HttpWorker) -> None:
        self.worker = worker

    async def Check(self, request: Any, context: Any) -> Any:
        if request.service not in ("", _SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        ready = await self.worker.is_ready()
        status = health_pb2.HealthCheckResponse
        return status(status=status.SERVING if ready else status.NOT_SERVING)


class GrpcDoor:
    """This worker's gRPC server: opened once the worker started, closed with the HTTP side."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def open(self, worker: HttpWorker, host: str) -> None:
        """Serve on ``host`` and ``VIT_GRPC_PORT`` (shared with the other workers)."""
        settings = self.settings
        if not settings.grpc_port:
            return
        limit = settings.max_body_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", _MAX_SEND_BYTES),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(worker), server)
        health_pb2_grpc.add_HealthServicer_to_server(_Health(worker), server)
        address = (
            f"[{host}]:{settings.grpc_port}" if ":" in host else f"{host}:{settings.grpc_port}"
        )
        self.port = server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"cannot listen for gRPC on {address}")
        await server.start()
        self.server = server
        _logger.info("Open Inference Protocol over gRPC on %s", address)

    async def close(self, grace_s: float) -> None:
        """Refuse new calls; answer those in flight within ``grace_s``."""
        server, self.server = self.server, None
        if server is not None:
            await server.stop(grace_s)

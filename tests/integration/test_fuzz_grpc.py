"""Hypothesis over the fields of the Open Inference Protocol's gRPC messages, against a real
``bentoml serve`` of the default model (2 HTTP workers sharing the gRPC port).

Every ``ModelInferRequest`` field is drawn: the model's name and version (the served one, or
another), the id, the request's parameters (the known ones with values of every parameter kind,
and unknown ones), the input tensors (the known names and others, every datatype of the
protocol, shapes with zero, negative and huge dimensions, typed ``contents`` of every kind or
``raw_input_contents``), and the outputs asked for with their parameters. The image bytes are
the project's samples, as is or damaged (``tests/utils/image_fuzz.py``), or random bytes; pixels
are drawn to their shape, or not.

Every answer must be a status the error table maps to (``OK``, ``INVALID_ARGUMENT``,
``NOT_FOUND``, ``RESOURCE_EXHAUSTED``): never ``INTERNAL`` or ``UNKNOWN``. An error's details are
``"<code>: <message>"``; an answer has one row per image in every output. The server's log has no
traceback afterwards, and the health service still says ``SERVING``.

``FUZZ_GRPC_CASES`` (default 400) is the number of requests. Derandomized: every run sends the
same requests. Run with ``-s`` for the counts.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from harness.serving import Server
from tests.integration.test_oip import MODEL
from tests.utils.image_fuzz import image_seeds, uploads

CASES = int(os.environ.get("FUZZ_GRPC_CASES", "400"))
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16"]  # fmt: skip
# What the error table maps to (service/web/oip_grpc.py status_code); RESOURCE_EXHAUSTED is
# also gRPC's own refusal of a message over the size limit.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip

pytestmark = pytest.mark.timeout(max(300, CASES // 2))


def _parameter(value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=value)


_VALUES = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1) | st.integers(-2, 12),
    st.floats(allow_nan=True),
    st.sampled_from(["none", "cls", "rollout", "true", "false", "", "3"]) | st.text(max_size=8),
)
_NAMES = {
    "request": ["top_k", "attention", "heatmap", "binary_data_output", "classification", "x"],
    "output": ["classification", "binary_data", "x"],
}
_SMALL = st.integers(-2, 40) | st.sampled_from([0, 2**31, 2**62, 10**6])


def _mostly(
    common: st.SearchStrategy[Any], *others: st.SearchStrategy[Any], tenths: int = 8
) -> Any:
    """``common`` about ``tenths`` times in ten, else one of ``others``: most requests get past
    the first checks, so the later ones are fuzzed too."""
    usual = st.sampled_from([True] * tenths + [False] * (10 - tenths))
    return usual.flatmap(lambda yes: common if yes else st.one_of(*others))


def _parameters(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.sampled_from(_NAMES[kind]) | st.text(max_size=6)
    return st.dictionaries(keys, _VALUES, max_size=3)


@st.composite
def _image_bytes(draw: st.DrawFn) -> bytes:
    return draw(st.sampled_from(image_seeds()) | uploads() | st.binary(max_size=64))


@st.composite
def _tensor(draw: st.DrawFn, request: pb.ModelInferRequest) -> None:
    """One input tensor, with typed contents or a raw blob beside the request."""
    name = draw(_mostly(st.sampled_from(["image", "pixels"]), st.text(max_size=6)))
    usual = {"image": "BYTES", "pixels": "UINT8"}.get(name, "BYTES")
    datatype = draw(_mostly(st.just(usual), st.sampled_from(DATATYPES)))
    images = draw(st.lists(_image_bytes(), min_size=1, max_size=3) | st.just([]))
    if name == "pixels":
        side = draw(st.integers(8, 40))
        right = [len(images) or 1, side, side, 3]
        shape = draw(_mostly(st.just(right), st.lists(_SMALL, max_size=5)))
    else:
        right = [len(images)]
        shape = draw(_mostly(st.sampled_from([right, [*right, 1]]), st.lists(_SMALL, max_size=3)))
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    for key, value in draw(_mostly(st.just({}), _parameters("output"))).items():
        tensor.parameters[key].CopyFrom(_parameter(value))
    form = draw(_mostly(st.sampled_from(["raw", "typed"]), st.just("none")))
    if form == "raw":
        if name == "pixels":
            # the bytes the shape asks for (up to 200 KB), or a few
            count = int(np.prod([max(d, 0) for d in shape])) if len(shape) == 4 else 0
            size = draw(st.sampled_from([min(count, 200_000)]) | st.integers(0, 64))
            blob = b"\x80" * size
        else:
            blob = b"".join(len(i).to_bytes(4, "little") + i for i in images)
            blob = draw(st.sampled_from([blob, blob[:-1], blob + b"\x00"]))
        request.raw_input_contents.append(blob)
    elif form == "typed":
        kind = draw(
            _mostly(st.just("uint" if name == "pixels" else "bytes"),
                    st.sampled_from(["bytes", "uint", "int", "fp32", "bool"]))
        )  # fmt: skip
        contents = tensor.contents
        if kind == "bytes":
            contents.bytes_contents.extend(images)
        elif kind == "uint" and name == "pixels" and len(shape) == 4:
            count = int(np.prod([max(d, 0) for d in shape]))
            size = draw(_mostly(st.just(min(count, 20_000)), st.integers(0, 64)))
            value = draw(_mostly(st.integers(0, 255), st.integers(256, 2**32 - 1)))
            contents.uint_contents.extend([value] * size)
        elif kind == "uint":
            contents.uint_contents.extend(draw(st.lists(st.integers(0, 300), max_size=64)))
        elif kind == "int":
            contents.int_contents.extend(draw(st.lists(st.integers(-5, 5), max_size=8)))
        elif kind == "fp32":
            contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=8)))
        else:
            contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=8)))


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(_mostly(st.just(MODEL), st.just(""), st.text(max_size=8), tenths=9)),
        model_version=draw(
            _mostly(st.sampled_from(["", "1"]), st.sampled_from(["2", "01", "x"]), tenths=9)
        ),
        id=draw(st.text(max_size=8)),
    )
    for key, value in draw(_mostly(st.just({}), _parameters("request"))).items():
        request.parameters[key].CopyFrom(_parameter(value))
    for _ in range(draw(_mostly(st.just(1), st.sampled_from([0, 2]), tenths=9))):
        draw(_tensor(request))
    outputs = st.sampled_from(["probabilities", "attention", "crop_box", "heatmap"]) | st.text(
        max_size=6
    )
    for name in draw(_mostly(st.just([]), st.lists(outputs, max_size=3))):
        asked = request.outputs.add(name=name)
        for key, value in draw(_parameters("output")).items():
            asked.parameters[key].CopyFrom(_parameter(value))
    return request


def _rows(reply: pb.ModelInferResponse) -> set[int]:
    return {int(output.shape[0]) for output in reply.outputs}


def test_fuzz_grpc(server: Server, address: str) -> None:
    logged = len(server.log_text())
    outcomes: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        @settings(
            max_examples=CASES,
            derandomize=True,
            database=None,
            deadline=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(request=infer_requests())
        def send(request: pb.ModelInferRequest) -> None:
            try:
                reply = stub.ModelInfer(request, timeout=60)
            except grpc.RpcError as error:
                status, details = error.code(), str(error.details())
                assert status in ALLOWED, (status, details, request)
                code, colon, message = details.partition(": ")
                native = colon and message and " " not in code
                # gRPC's own refusal of an oversized message is not in our words
                assert native or status is grpc.StatusCode.RESOURCE_EXHAUSTED, (details, request)
                outcomes[f"{status.name} {code if native else details[:40]}"] += 1
                return
            assert reply.model_name == MODEL and reply.outputs, reply
            assert len(_rows(reply)) == 1, reply  # one row per image in every output
            outcomes["OK"] += 1

        send()
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    total = sum(outcomes.values())
    print(f"fuzzed gRPC ModelInfer with {total} requests in {time.perf_counter() - started:.1f} s:")
    print("  " + ", ".join(f"{k}: {v}" for k, v in outcomes.most_common()))
    assert total == CASES and outcomes["OK"] > 0, outcomes
    log = server.log_text()[logged:]
    assert "Traceback" not in log, log[-4000:]

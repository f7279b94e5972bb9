"""The protocol benchmark's requests and load clients (``loadtests/oip_bench.py``) against a real
``bentoml serve``: the binary REST body and the gRPC frame are what the protocol expects (the
server answers them 200 and counts them under their endpoint), and a gRPC call the server
refuses, which h2load counts as a success (HTTP 200 with a ``grpc-status`` trailer), shows up in
the server's counters, which is how the benchmark checks every load. Triton itself is not
started here (``make bench-oip``)."""

from __future__ import annotations

import struct

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from harness.samples import digit
from harness.serving import Server
from loadtests.bench import drive_wrk
from loadtests.oip_bench import (
    GRPC_INFER_PATH,
    drive_h2load,
    grpc_body,
    grpc_request,
    ours_counts,
    rest_body,
)

PNG = digit(0, 64, False)


def test_the_grpc_frame_holds_the_request_tritonclient_would_send(server: Server) -> None:
    frame = grpc_body(PNG)
    assert frame[0] == 0 and struct.unpack(">I", frame[1:5])[0] == len(frame) - 5
    request = pb.ModelInferRequest.FromString(frame[5:])
    assert request == grpc_request(PNG)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert [o.name for o in reply.outputs] == ["probabilities"]


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_load_is_answered_and_counted_by_the_server(server: Server, protocol: str) -> None:
    if protocol == "rest":
        body, headers = rest_body(PNG)
        url = f"{server.url}/v2/models/vit-digits/infer"
        counted = ours_counts(server.url, "oip_infer")
        before = counted()
        load = drive_wrk(url, body, "application/octet-stream", 2, 1, 1, headers)
    else:
        counted = ours_counts(server.url, "oip_grpc_infer")
        before = counted()
        url = f"http://127.0.0.1:{server.grpc_port}{GRPC_INFER_PATH}"
        load = drive_h2load(url, grpc_body(PNG), 2, 1)
    after = counted()
    assert load.requests > 0 and load.errors == 0, load
    assert load.p50_ms > 0 and load.rps > 0, load
    assert after[1] == before[1] and after[2] == before[2] == 0  # nothing failed
    assert load.requests <= after[0] - before[0] <= load.requests + 2  # +2: in flight at the end


def test_a_refused_grpc_call_is_a_success_to_h2load_but_not_to_the_server(server: Server) -> None:
    request = grpc_request(PNG)
    request.model_name = "resnet50"  # NOT_FOUND
    message = request.SerializeToString()
    frame = b"\x00" + struct.pack(">I", len(message)) + message
    counted = ours_counts(server.url, "oip_grpc_infer")
    before = counted()
    load = drive_h2load(f"http://127.0.0.1:{server.grpc_port}{GRPC_INFER_PATH}", frame, 1, 1)
    after = counted()
    assert load.requests > 0 and load.errors == 0  # HTTP 200s, all of them
    assert after[1] - before[1] >= load.requests  # the server refused every one

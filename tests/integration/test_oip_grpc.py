"""The Open Inference Protocol over gRPC with ``tritonclient.grpc`` (PyPI) and the standard
``grpc.health.v1`` client against a real ``bentoml serve`` of the default model (2 HTTP
workers sharing the gRPC port): health, metadata, inference with raw and typed contents, the
classification extension, answers equal to ``/classify``'s, the error table's image rows as
status codes, and a client's deadline."""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from harness.serving import Server, scrape, serve
from tests.integration.test_oip import _IMAGE_ROWS, MODEL, classify
from tests.integration.test_service import _digit_bytes

# The gRPC status each HTTP status of the native table maps to.
_STATUS = {400: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT",
           422: "INVALID_ARGUMENT", 404: "NOT_FOUND"}  # fmt: skip


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(address)
    yield client
    client.close()


def images_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def test_health_and_metadata(client: triton.InferenceServerClient, address: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {
        ("image", "BYTES"),
        ("pixels", "UINT8"),
    }
    assert client.get_server_metadata(as_json=True)["name"] == "vit-serve"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("resnet50")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_infer_equals_classify_image_by_image(
    client: triton.InferenceServerClient, server: Server
) -> None:
    images = [_digit_bytes(i, 28 + 4 * i, i % 2 == 0, "PNG") for i in range(4)]
    result = client.infer(
        MODEL,
        [images_input(images)],
        outputs=[triton.InferRequestedOutput(n) for n in ("probabilities", "attention")],
        request_id="grpc-1",
        parameters={"attention": "cls"},
    )
    assert result.get_response().id == "grpc-1"
    probs, attention = result.as_numpy("probabilities"), result.as_numpy("attention")
    assert probs.shape == (4, 10) and attention.shape == (4, 4, 4)
    for index, image in enumerate(images):
        native = classify(server, image, "cls")
        assert list(np.argsort(-probs[index], kind="stable")) == [
            p["index"] for p in native["predictions"]
        ]
        for prediction in native["predictions"]:
            assert abs(float(probs[index, prediction["index"]]) - prediction["score"]) <= 1e-6
        assert np.allclose(attention[index], native["attention"]["weights"], atol=1e-5)


def test_typed_contents_and_the_classification_extension(address: str, server: Server) -> None:
    """A client that fills ``contents`` instead of ``raw_input_contents`` (the stub, by hand)."""
    image = _digit_bytes(5, 36, False, "PNG")
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.uint8)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(
        name="pixels",
        datatype="UINT8",
        shape=[1, *pixels.shape],
        contents=pb.InferTensorContents(uint_contents=pixels.reshape(-1).tolist()),
    )
    asked = request.outputs.add(name="probabilities")
    asked.parameters["classification"].int64_param = 3
    request.parameters["attention"].string_param = "none"
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    (output,) = reply.outputs
    assert output.datatype == "BYTES" and list(output.shape) == [1, 3]
    raw, entries = reply.raw_output_contents[0], []
    while raw:
        length = int.from_bytes(raw[:4], "little")
        entries.append(raw[4 : 4 + length].decode())
        raw = raw[4 + length :]
    native = classify(server, image, "none")["predictions"][:3]
    assert [int(e.split(":")[1]) for e in entries] == [p["index"] for p in native]


@pytest.mark.parametrize(
    ("what", "image", "status", "code"), _IMAGE_ROWS, ids=[r[0] for r in _IMAGE_ROWS]
)
def test_the_error_table_as_status_codes(
    client: triton.InferenceServerClient, what: str, image: bytes, status: int, code: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [images_input([image])])
    if what == "body too large":  # past the message limit: gRPC's own refusal
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", info.value
        return
    assert info.value.status() == f"StatusCode.{_STATUS[status]}", info.value
    assert str(info.value.message()).startswith(f"{code}: "), info.value


def test_an_unknown_model_and_a_bad_option(client: triton.InferenceServerClient) -> None:
    image = _digit_bytes(0, 32, False, "PNG")
    with pytest.raises(InferenceServerException) as info:
        client.infer("resnet50", [images_input([image])])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [images_input([image])], parameters={"top_k": 0})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert str(info.value.message()).startswith("invalid_top_k: ")


def _counted(server: Server) -> dict[str, float]:
    series = scrape(server.url)
    endpoint = 'endpoint="oip_grpc_infer"'
    return {
        "ok": series.get(f'vit_requests_total{{{endpoint},status="200"}}', 0.0),
        "bad": series.get(f'vit_requests_total{{{endpoint},status="415"}}', 0.0),
        "images": sum(v for k, v in series.items() if k.startswith("vit_images_total{")),
    }


def test_metrics_count_every_call_and_image(
    client: triton.InferenceServerClient, server: Server
) -> None:
    """gRPC calls land in the same ``vit_*`` series as HTTP, under their own endpoint, exactly:
    two answered calls (1 + 3 images) and one refused (415), on either worker."""
    before = _counted(server)
    images = [_digit_bytes(i, 32, False, "PNG") for i in range(4)]
    client.infer(MODEL, [images_input(images[:1])])
    client.infer(MODEL, [images_input(images[1:])])
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [images_input([b"not an image"])])
    after = _counted(server)
    assert after["ok"] - before["ok"] == 2, (before, after)
    assert after["bad"] - before["bad"] == 1, (before, after)
    assert after["images"] - before["images"] == 5, (before, after)  # 4 answered + 1 refused


def test_a_client_deadline_is_honoured(client: triton.InferenceServerClient) -> None:
    """A deadline shorter than any answer: DEADLINE_EXCEEDED, and the server is fine after."""
    images = [_digit_bytes(i % 10, 256, False, "PNG") for i in range(32)]
    with pytest.raises(InferenceServerException) as info:
        client.infer(
            MODEL,
            [images_input(images)],
            client_timeout=0.001,
            parameters={"attention": "rollout", "heatmap": True},
        )
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert client.infer(MODEL, [images_input(images[:1])]).as_numpy("probabilities").shape == (
        1,
        10,
    )


def _until(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s} s"
        time.sleep(0.01)


def _http_closed(url: str) -> bool:
    try:
        httpx.get(f"{url}/livez", timeout=2)
    except httpx.TransportError:
        return True
    return False


def test_sigterm_answers_the_calls_in_flight(tmp_path: Path) -> None:
    """A call the model holds (at the test gate) when SIGTERM comes is still answered after
    the listeners closed; health turns NOT_SERVING at once; the server exits 0."""
    gate = tmp_path / "gate"
    env = {
        "VIT_WORKERS": "1",
        "VIT_ACCESS_LOG": "false",
        "VIT_DRAIN_DELAY_S": "1",
        "VIT_GRACE_PERIOD_S": "20",
        "VIT_TEST_GATE": str(gate),
    }
    image = _digit_bytes(7, 32, False, "PNG")
    with serve(env, tmp_path) as running:
        address = f"127.0.0.1:{running.grpc_port}"
        gate.write_text("")
        answers: list[Any] = []

        def call() -> None:
            with triton.InferenceServerClient(address) as client:
                try:
                    answers.append(client.infer(MODEL, [images_input([image])], client_timeout=60))
                except InferenceServerException as exc:
                    answers.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        _until(lambda: gate.read_text().startswith("held=1"), "held at the gate")
        running.process.send_signal(signal.SIGTERM)
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            _until(
                lambda: (
                    health.Check(check, timeout=5).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                "NOT_SERVING after SIGTERM",
            )
        _until(lambda: _http_closed(running.url), "stopped listening")
        assert caller.is_alive() and not answers  # still held, past the listeners' close
        gate.unlink()
        caller.join(timeout=30)
        assert running.process.wait(timeout=30) == 0
    (answer,) = answers
    assert not isinstance(answer, Exception), (answer.status(), answer.message())
    assert answer.as_numpy("probabilities").shape == (1, 10)

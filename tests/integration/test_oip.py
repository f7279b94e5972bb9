"""The Open Inference Protocol over HTTP with the client people already use (``tritonclient``,
from PyPI) against a real ``bentoml serve`` of the default model: health, metadata, inference
with JSON and binary tensors, several images, the classification extension; answers equal to
``/classify``'s image by image; the native error table's image rows with their statuses."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from harness.serving import Server
from tests.integration.test_service import ERROR_TABLE, _digit_bytes

MODEL = "vit-digits"


@pytest.fixture(scope="module")
def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)


def images_input(images: list[bytes], *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:  # JSON carries text: base64
        encoded = [base64.b64encode(i) for i in images]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    return tensor


def classify(server: Server, image: bytes, attention: str) -> dict[str, Any]:
    response = httpx.post(
        f"{server.url}/classify",
        files={"image": ("a.png", image)},
        data={"top_k": "10", "attention": attention},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "2")
    server = client.get_server_metadata()
    assert server["name"] == "vit-serve" and "classification" in server["extensions"]
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert meta["parameters"]["grid"] == [4, 4] and meta["parameters"]["num_patches"] == 16
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("resnet50")
    assert info.value.status() == "404"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_classify_image_by_image(
    client: triton.InferenceServerClient, server: Server, binary: bool
) -> None:
    images = [_digit_bytes(i, 28 + 4 * i, i % 2 == 1, "PNG") for i in range(5)]
    outputs = [
        triton.InferRequestedOutput(name, binary_data=binary)
        for name in ("probabilities", "attention", "crop_box")
    ]
    result = client.infer(
        MODEL,
        [images_input(images, binary=binary)],
        outputs=outputs,
        request_id="oip-1",
        parameters={"attention": "rollout"},
    )
    answer = result.get_response()
    assert answer["id"] == "oip-1" and answer["model_name"] == MODEL
    probs = result.as_numpy("probabilities")
    attention = result.as_numpy("attention")
    boxes = result.as_numpy("crop_box")
    assert probs.shape == (5, 10) and attention.shape == (5, 4, 4) and boxes.shape == (5, 4)
    for index, image in enumerate(images):
        native = classify(server, image, "rollout")
        order = [p["index"] for p in native["predictions"]]
        assert list(np.argsort(-probs[index], kind="stable")) == order
        for prediction in native["predictions"]:
            assert abs(float(probs[index, prediction["index"]]) - prediction["score"]) <= 1e-6
        assert np.allclose(attention[index], native["attention"]["weights"], atol=1e-5)


def test_the_classification_extension(client: triton.InferenceServerClient, server: Server) -> None:
    images = [_digit_bytes(i, 32, False, "PNG") for i in range(3)]
    result = client.infer(
        MODEL,
        [images_input(images, binary=True)],
        outputs=[triton.InferRequestedOutput("probabilities", class_count=3)],
        parameters={"attention": "none"},
    )
    classes = result.as_numpy("probabilities")
    assert classes.shape == (3, 3)
    for index, image in enumerate(images):
        native = classify(server, image, "none")["predictions"][:3]
        parsed = [entry.decode().split(":") for entry in classes[index]]
        assert [(int(i), label) for _, i, label in parsed] == [
            (p["index"], p["label"]) for p in native
        ]
        assert all(
            abs(float(s) - p["score"]) <= 1e-6 for (s, _, _), p in zip(parsed, native, strict=True)
        )


def test_pixels_a_client_decoded_itself(
    client: triton.InferenceServerClient, server: Server
) -> None:
    image = _digit_bytes(3, 40, False, "PNG")
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), dtype=np.uint8)[None]
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    result = client.infer(MODEL, [tensor], parameters={"attention": "cls"})
    native = classify(server, image, "cls")
    probs = result.as_numpy("probabilities")[0]
    for prediction in native["predictions"]:
        assert abs(float(probs[prediction["index"]]) - prediction["score"]) <= 1e-6


# The native error table's rows that an inference request can carry: the image's bytes.
_IMAGE_ROWS = [
    (what, kwargs["files"]["image"][1], status, code)
    for what, kwargs, status, code in ERROR_TABLE
    if isinstance(kwargs.get("files"), dict) and "image" in kwargs["files"] and "data" not in kwargs
]
_OPTION_ROWS = [
    ("top_k zero", {"top_k": 0}, 422, "invalid_top_k"),
    ("top_k too big", {"top_k": 11}, 422, "invalid_top_k"),
    ("top_k text", {"top_k": "five"}, 422, "invalid_top_k"),
    ("attention", {"attention": "all"}, 422, "invalid_attention"),
    ("heatmap", {"heatmap": "maybe"}, 422, "invalid_heatmap"),
]


@pytest.mark.parametrize(
    ("what", "image", "status", "code"), _IMAGE_ROWS, ids=[r[0] for r in _IMAGE_ROWS]
)
def test_the_error_table_through_the_protocol(
    client: triton.InferenceServerClient, what: str, image: bytes, status: int, code: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [images_input([image], binary=True)])
    assert info.value.status() == str(status), info.value
    assert str(info.value.message()).startswith(f"{code}: "), info.value


@pytest.mark.parametrize(
    ("what", "parameters", "status", "code"), _OPTION_ROWS, ids=[r[0] for r in _OPTION_ROWS]
)
def test_bad_options_through_the_protocol(
    client: triton.InferenceServerClient,
    what: str,
    parameters: dict[str, Any],
    status: int,
    code: str,
) -> None:
    image = _digit_bytes(0, 32, False, "PNG")
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [images_input([image], binary=True)], parameters=parameters)
    assert info.value.status() == str(status), info.value
    assert str(info.value.message()).startswith(f"{code}: "), info.value


def test_the_table_covers_every_image_row() -> None:
    assert {r[0] for r in _IMAGE_ROWS} == {
        "not an image",
        "format not allowed",
        "empty",
        "corrupt",
        "truncated",
        "too many pixels",
        "body too large",
        "degenerate",
    }

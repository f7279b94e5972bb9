"""The Open Inference Protocol (KServe v2) over HTTP, in-process on the tiny model: the routes,
JSON and binary tensors both ways, answers equal to ``/classify``'s, and the error table in the
protocol's shape. Real clients (``tritonclient``) against a real server:
``tests/integration/test_oip.py``."""

from __future__ import annotations

import base64
import io
import math
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image
from starlette.testclient import TestClient

from service.model.loading import load_model
from service.web.oip import parse_infer
from service.web.options import Options
from service.web.schemas import OipError, OipInferResponse, OipModelMetadata, OipServerMetadata
from tests.http.conftest import (
    LIMITS,
    REQUEST_ID,
    TINY_LABELS,
    InProcessApp,
    png,
    settings_for,
)

GRID = [4, 4]


@pytest.fixture(scope="module")
def name(client_module: TestClient) -> str:
    return str(client_module.get("/model").json()["model"]["name"])


@pytest.fixture(scope="module")
def client_module(app: InProcessApp) -> TestClient:
    return app.client


def infer(client: TestClient, name: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return client.post(f"/v2/models/{name}/infer", content=orjson.dumps(body), **kwargs)


def image_input(*images: bytes, shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "name": "image",
        "datatype": "BYTES",
        "shape": shape or [len(images)],
        "data": [base64.b64encode(i).decode() for i in images],
    }


def assert_oip_error(response: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert REQUEST_ID.match(response.headers["x-request-id"])
    body = response.json()
    OipError.model_validate(body)
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert body["error"].startswith(f"{code}: "), body
    for fragment in fragments:
        assert fragment in body["error"], body


def outputs_by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in body["outputs"]}


# --- routes ------------------------------------------------------------------------------------
def test_server_metadata_liveness_and_readiness(client: TestClient) -> None:
    meta = OipServerMetadata.model_validate(client.get("/v2").json()).model_dump()
    assert meta["name"] == "vit-serve" and meta["version"]
    assert set(meta["extensions"]) >= {"classification", "binary_tensor_data"}
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}


def test_model_metadata_names_the_tensors_and_the_patch_arithmetic(
    client: TestClient, name: str
) -> None:
    for path in (f"/v2/models/{name}", f"/v2/models/{name}/versions/1"):
        meta = client.get(path).json()
        OipModelMetadata.model_validate(meta)
        assert meta["name"] == name and meta["versions"] == ["1"]
        assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]} == {
            ("image", "BYTES", (-1,)),
            ("pixels", "UINT8", (-1, -1, -1, 3)),
        }
        assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["outputs"]} == {
            ("probabilities", "FP32", (-1, 7)),
            ("attention", "FP32", (-1, 4, 4)),
            ("crop_box", "INT32", (-1, 4)),
            ("heatmap", "BYTES", (-1,)),
        }
        params = meta["parameters"]
        assert params["patch_size"] == [8, 8] and params["grid"] == GRID
        assert params["num_patches"] == 16 and params["patch_dim"] == 3 * 8 * 8
        assert params["labels"] == TINY_LABELS
    ready = client.get(f"/v2/models/{name}/versions/1/ready")
    assert ready.status_code == 200 and ready.json() == {"name": name, "ready": True}


def test_an_unknown_model_or_version_is_404(client: TestClient, name: str) -> None:
    assert_oip_error(client.get("/v2/models/nope"), 404, "unknown_model", "nope", name)
    assert_oip_error(client.get(f"/v2/models/{name}/versions/7"), 404, "unknown_version", "'1'")
    response = infer(client, "nope", {"inputs": [image_input(png())]})
    assert_oip_error(response, 404, "unknown_model")
    assert_oip_error(client.get("/v2/nothing"), 404, "not_found")


def test_a_wrong_method_is_405_with_allow(client: TestClient, name: str) -> None:
    response = client.get(f"/v2/models/{name}/infer")
    assert_oip_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert_oip_error(client.post("/v2/health/live"), 405, "method_not_allowed")


# --- inference ---------------------------------------------------------------------------------
def classify(client: TestClient, image: bytes, **fields: str) -> dict[str, Any]:
    response = client.post(
        "/classify", files={"image": ("a.png", image, "image/png")}, data={"top_k": "7", **fields}
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_json_answers_equal_classify_image_by_image(client: TestClient, name: str) -> None:
    images = [png(32, 32, seed=1), png(48, 40, seed=2), png(64, 33, seed=3)]
    response = infer(
        client,
        name,
        {"id": "req-1", "inputs": [image_input(*images)], "parameters": {"attention": "cls"}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "req-1" and body["model_name"] == name and body["model_version"] == "1"
    outputs = outputs_by_name(body)
    assert list(outputs) == ["probabilities", "attention", "crop_box"]
    assert outputs["probabilities"]["shape"] == [3, 7]
    assert outputs["attention"]["shape"] == [3, *GRID]
    probs = np.asarray(outputs["probabilities"]["data"]).reshape(3, 7)
    attention = np.asarray(outputs["attention"]["data"]).reshape(3, 4, 4)
    boxes = np.asarray(outputs["crop_box"]["data"]).reshape(3, 4)
    for index, image in enumerate(images):
        native = classify(client, image, attention="cls")
        for prediction in native["predictions"]:
            assert abs(probs[index, prediction["index"]] - prediction["score"]) <= 1e-6
        order = [p["index"] for p in native["predictions"]]
        assert list(np.argsort(-probs[index], kind="stable")) == order
        assert np.allclose(attention[index], native["attention"]["weights"], atol=1e-5)
        assert list(boxes[index]) == [math.floor(c + 0.5) for c in native["patches"]["crop_box"]]


def test_binary_tensors_both_ways(client: TestClient, name: str) -> None:
    images = [png(32, 32, seed=4), png(40, 40, seed=5)]
    blob = b"".join(struct.pack("<I", len(i)) + i for i in images)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [2, 1],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "crop_box"},
            ],
            "parameters": {"attention": "none"},
        }
    )
    response = client.post(
        f"/v2/models/{name}/infer",
        content=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    split = int(response.headers["inference-header-content-length"])
    body = orjson.loads(response.content[:split])
    outputs = outputs_by_name(body)
    size = outputs["probabilities"]["parameters"]["binary_data_size"]
    assert size == 2 * 7 * 4 and len(response.content) == split + size
    probs = np.frombuffer(response.content[split:], dtype="<f4").reshape(2, 7)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    for index, image in enumerate(images):
        native = classify(client, image, attention="none")
        for prediction in native["predictions"]:
            assert abs(float(probs[index, prediction["index"]]) - prediction["score"]) <= 1e-6
    assert outputs["crop_box"]["datatype"] == "INT32" and len(outputs["crop_box"]["data"]) == 8


def test_the_classification_extension(client: TestClient, name: str) -> None:
    image = png(seed=6)
    body = {
        "inputs": [image_input(image)],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    response = infer(client, name, body)
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 3]
    native = classify(client, image)["predictions"][:3]
    parsed = [entry.split(":") for entry in out["data"]]
    assert [(int(i), label) for _, i, label in parsed] == [(p["index"], p["label"]) for p in native]
    assert all(
        abs(float(s) - p["score"]) <= 1e-6 for (s, _, _), p in zip(parsed, native, strict=True)
    )
    # top_k is the count when classification is asked without one.
    body["outputs"] = [{"name": "probabilities", "parameters": {"classification": True}}]
    body["parameters"] = {"top_k": 2}
    (out,) = infer(client, name, body).json()["outputs"]
    assert out["shape"] == [1, 2]


def test_pixels_answer_as_the_same_image_encoded(client: TestClient, name: str) -> None:
    pixels = np.random.default_rng(7).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    tensor = {
        "name": "pixels",
        "datatype": "UINT8",
        "shape": [1, 40, 56, 3],
        "data": pixels.reshape(-1).tolist(),
    }
    response = infer(client, name, {"inputs": [tensor], "parameters": {"attention": "rollout"}})
    assert response.status_code == 200, response.text
    outputs = outputs_by_name(response.json())
    native = classify(client, encoded.getvalue(), attention="rollout")
    probs = outputs["probabilities"]["data"]
    for prediction in native["predictions"]:
        assert abs(probs[prediction["index"]] - prediction["score"]) <= 1e-6
    assert np.allclose(
        np.asarray(outputs["attention"]["data"]).reshape(4, 4),
        native["attention"]["weights"],
        atol=1e-5,
    )


def test_a_heatmap_output_is_a_png_at_the_upload_size(client: TestClient, name: str) -> None:
    body = {
        "inputs": [image_input(png(48, 40, seed=8))],
        "outputs": [{"name": "heatmap", "parameters": {"binary_data": True}}],
        "parameters": {"attention": "cls"},
    }
    response = infer(client, name, body)
    assert response.status_code == 200, response.text
    split = int(response.headers["inference-header-content-length"])
    (length,) = struct.unpack_from("<I", response.content, split)
    heatmap = Image.open(io.BytesIO(response.content[split + 4 : split + 4 + length]))
    assert heatmap.format == "PNG" and heatmap.size == (48, 40)


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        (b"{not json", 400, "invalid_inference_request", "not valid JSON"),
        (b"[]", 400, "invalid_inference_request", "JSON object"),
        (b'{"inputs": []}', 400, "invalid_inference_request", "exactly one tensor"),
        (
            b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]}',
            400,
            "invalid_inference_request",
            "'x'",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}',
            400,
            "invalid_tensor",
            "'image'",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AA=="]}]}',
            400,
            "invalid_tensor",
            "holds 2 images",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]}',
            400,
            "invalid_tensor",
            "base64",
        ),
        (
            b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 8, 8, 3],'
            b' "data": [1, 2]}]}',
            400,
            "invalid_tensor",
            "'pixels'",
        ),
        (
            b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 4, 8, 3],'
            b' "data": [' + b",".join([b"0"] * 96) + b"]}]}",
            422,
            "degenerate_image",
            "4",
        ),
        (
            b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2000, 2000, 3],'
            b' "parameters": {"binary_data_size": 0}}]}',
            413,
            "too_many_pixels",
            "1,000,000",
        ),
    ],
)
def test_a_bad_request_or_tensor_is_a_4xx_naming_it(
    client: TestClient, name: str, body: bytes, status: int, code: str, fragment: str
) -> None:
    response = client.post(f"/v2/models/{name}/infer", content=body)
    assert_oip_error(response, status, code, fragment)


def test_images_fail_with_the_native_tables_codes(client: TestClient, name: str) -> None:
    cases = [
        (b"not an image at all", 415, "unsupported_media_type"),
        (png()[:60], 400, "corrupt_image"),
        (b"", 400, "empty_image"),
        (png(4, 32), 422, "degenerate_image"),
    ]
    for data, status, code in cases:
        native = client.post("/classify", files={"image": ("a", data, "image/png")})
        assert native.status_code == status and native.json()["error"]["code"] == code
        assert_oip_error(infer(client, name, {"inputs": [image_input(data)]}), status, code)
    # One bad image of several fails the request, naming which.
    response = infer(client, name, {"inputs": [image_input(png(), png(4, 32))]})
    assert_oip_error(response, 422, "degenerate_image", "image 1 of 2")


def test_limits_and_options_are_the_native_ones(client: TestClient, name: str) -> None:
    most = LIMITS["max_images_per_request"]
    too_many = image_input(*[png(seed=i) for i in range(most + 1)])
    assert_oip_error(infer(client, name, {"inputs": [too_many]}), 413, "too_many_images")
    big = client.post(f"/v2/models/{name}/infer", content=b"x" * (LIMITS["max_body_bytes"] + 1))
    assert_oip_error(big, 413, "body_too_large")
    one = [image_input(png())]
    for params, code in [
        ({"top_k": 0}, "invalid_top_k"),
        ({"top_k": "2"}, "invalid_top_k"),
        ({"attention": "all"}, "invalid_attention"),
        ({"heatmap": True, "attention": "none"}, "invalid_heatmap"),
    ]:
        response = infer(client, name, {"inputs": one, "parameters": params})
        assert_oip_error(response, 422, code)
    unknown = infer(client, name, {"inputs": one, "outputs": [{"name": "logits"}]})
    assert_oip_error(unknown, 400, "invalid_inference_request", "'logits'")
    none = {"inputs": one, "outputs": [{"name": "attention"}], "parameters": {"attention": "none"}}
    assert_oip_error(infer(client, name, none), 422, "invalid_attention")


def test_infer_is_counted_under_its_own_endpoint(
    app: InProcessApp, client: TestClient, name: str
) -> None:
    before_ok = app.metric("vit_requests_total", endpoint="oip_infer", status="200")
    before_bad = app.metric("vit_requests_total", endpoint="oip_infer", status="400")
    assert infer(client, name, {"inputs": [image_input(png())]}).status_code == 200
    assert infer(client, name, {"inputs": []}).status_code == 400
    assert app.metric("vit_requests_total", endpoint="oip_infer", status="200") == before_ok + 1
    assert app.metric("vit_requests_total", endpoint="oip_infer", status="400") == before_bad + 1


def test_attention_is_computed_only_for_an_output_that_needs_it(tiny_dir: Path) -> None:
    """Outputs named without ``attention`` or ``heatmap``: the model pass skips the attention
    (whatever the default or the ``attention`` parameter); named, or left out, it is computed."""
    info = load_model(f"local-dir:{tiny_dir}", device="cpu", dtype="float32").info
    settings = settings_for(tiny_dir)
    assert settings.default_attention != "none"

    def options(outputs: list[str] | None, **params: Any) -> Options:
        request: dict[str, Any] = {"inputs": [image_input(png())], "parameters": params}
        if outputs is not None:
            request["outputs"] = [{"name": n} for n in outputs]
        return parse_infer(orjson.dumps(request), None, info, settings).options

    assert options(["probabilities"]).attention == "none"
    assert options(["probabilities", "crop_box"], attention="rollout").attention == "none"
    assert not options(["probabilities"], heatmap=True).heatmap
    assert options(["attention"]).attention == settings.default_attention
    assert options(["heatmap"], attention="cls") == Options(LIMITS["default_top_k"], "cls", True)
    assert options(None).attention == settings.default_attention


def test_the_openapi_document_lists_the_protocols_routes(client: TestClient, name: str) -> None:
    """``/docs.json`` documents each route (what schemathesis generates from:
    ``tests/integration/test_fuzz_api.py``), and a real answer fits its documented model."""
    paths = client.get("/docs.json").json()["paths"]
    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        assert {"get"} == set(paths[prefix]) == set(paths[f"{prefix}/ready"])
        operation = paths[f"{prefix}/infer"]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body["required"] == ["inputs"]
        assert body["properties"]["inputs"]["items"]["properties"]["name"]["enum"] == [
            "image",
            "pixels",
        ]
    assert {"/v2", "/v2/health/live", "/v2/health/ready"} <= set(paths)
    answer = infer(client, name, {"inputs": [image_input(png())]})
    OipInferResponse.model_validate(answer.json())

"""Good requests through the app in-process: answers, attention over the tiny model's 4x4 patch
grid, patch metadata, option parsing (settings' defaults, form fields, query), GET /model and
BentoML's probes."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from service.model.engine import Engine
from service.model.imaging import decode_image
from service.model.loading import load_model
from service.web.schemas import BatchItem, ClassifyResponse, ModelResponse
from tests.http.conftest import LIMITS, REQUEST_ID, TINY_LABELS, png

WIDTH, HEIGHT = 48, 40  # landscape: the model sees the centered 40x40 square, x from 4 to 44
PATCH_PX = 10.0  # 8 px patches of the 32 px input, in the upload's pixels

# What the tiny ViT's patch embedding is (tests/utils.TINY_ARGS), as every answer reports it.
TINY_PATCHES = {
    "patch_size": [8, 8],
    "grid": [4, 4],
    "num_patches": 16,
    "patch_dim": 192,  # 3 channels x 8 x 8
    "embed_dim": 32,
    "num_prefix_tokens": 1,
    "sequence_length": 17,
    "position_embedding": {"kind": "learned", "shape": [1, 17, 32]},
    "input_size": [3, 32, 32],
}


@pytest.fixture(scope="module")
def upload() -> bytes:
    return png(WIDTH, HEIGHT, seed=7)


@pytest.mark.parametrize("mode", ["cls", "rollout"])
def test_a_good_image_gets_predictions_attention_and_patches(
    client: TestClient, tiny_dir: Path, upload: bytes, mode: str
) -> None:
    response = client.post(
        "/classify",
        files={"image": ("photo.png", upload)},
        data={"attention": mode, "top_k": "7"},
        headers={"x-request-id": "req-1"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "req-1"
    answer = response.json()
    ClassifyResponse.model_validate(answer)
    assert answer["request_id"] == "req-1"

    predictions = answer["predictions"]
    assert sorted(p["label"] for p in predictions) == TINY_LABELS
    assert all(TINY_LABELS[p["index"]] == p["label"] for p in predictions)
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-4)

    attention = answer["attention"]
    weights = np.array(attention["weights"])
    assert attention["mode"] == mode and attention["grid"] == [4, 4]
    assert "heatmap_png" not in attention
    assert weights.shape == (4, 4) and (weights >= 0).all()
    assert weights.sum() == pytest.approx(1.0, abs=1e-4)

    patches = answer["patches"]
    assert {k: patches[k] for k in TINY_PATCHES} == TINY_PATCHES
    assert patches["crop_box"] == [4.0, 0.0, 44.0, 40.0]
    top = patches["top"]
    assert len(top) == 5
    assert [p["attention"] for p in top] == sorted((p["attention"] for p in top), reverse=True)
    for patch in top:
        row, col = patch["row"], patch["col"]
        assert patch["index"] == row * 4 + col
        assert patch["attention"] == pytest.approx(weights[row, col], abs=1e-5)
        x0, y0 = 4 + PATCH_PX * col, PATCH_PX * row
        assert patch["box"] == pytest.approx([x0, y0, x0 + PATCH_PX, y0 + PATCH_PX])

    assert answer["image"] == {
        "width": WIDTH,
        "height": HEIGHT,
        "format": "PNG",
        "mode": "RGB",
        "sha256": hashlib.sha256(upload).hexdigest(),
    }
    assert answer["model"] == {
        "name": tiny_dir.name,
        "source": f"local-dir:{tiny_dir}",
        "dtype": "float32",
        "device": "cpu",
        "version": "1",
    }
    assert "cache" not in answer  # the cache is off
    assert answer["timing_ms"]["batch_size"] >= 1


def test_the_answer_is_the_model_run_offline(
    client: TestClient, tiny_dir: Path, upload: bytes
) -> None:
    engine = Engine(load_model(f"local-dir:{tiny_dir}", device="cpu", dtype="float32"))
    pixels = decode_image(upload, min_short_side=engine.info.resize_size).pixels
    expected = engine.run([pixels], ["cls"]).items[0]
    answer = client.post(
        "/classify", files={"image": ("a.png", upload)}, data={"top_k": "7", "attention": "cls"}
    ).json()
    served = {p["index"]: p["score"] for p in answer["predictions"]}
    assert [served[i] for i in range(7)] == pytest.approx(expected.probs.tolist(), abs=1e-5)
    assert expected.attention is not None
    weights = np.array(answer["attention"]["weights"])
    assert weights == pytest.approx(expected.attention, abs=1e-5)


def test_attention_none_leaves_out_attention_and_top_patches(
    client: TestClient, upload: bytes
) -> None:
    answer = client.post(
        "/classify", files={"image": ("a.png", upload)}, data={"attention": "none"}
    ).json()
    assert "attention" not in answer
    assert answer["patches"]["top"] == []
    assert answer["patches"]["grid"] == [4, 4]


def test_a_heatmap_is_a_png_at_the_upload_size(client: TestClient, upload: bytes) -> None:
    answer = client.post(
        "/classify", files={"image": ("a.png", upload)}, data={"heatmap": "true"}
    ).json()
    heatmap = Image.open(io.BytesIO(base64.b64decode(answer["attention"]["heatmap_png"])))
    assert heatmap.format == "PNG" and heatmap.size == (WIDTH, HEIGHT)


# --- options -------------------------------------------------------------------------------


def _asked(answer: dict[str, Any]) -> tuple[int, str, bool]:
    """What an answer shows of its options: top_k, attention mode, heatmap."""
    attention = answer.get("attention")
    if attention is None:
        return len(answer["predictions"]), "none", False
    return len(answer["predictions"]), attention["mode"], "heatmap_png" in attention


OPTION_CASES = [
    # (form fields, query parameters, (top_k, attention, heatmap) the answer shows)
    ({}, {}, (LIMITS["default_top_k"], LIMITS["default_attention"], False)),  # from the settings
    ({"top_k": "", "attention": ""}, {}, (3, "rollout", False)),  # empty = not given
    ({"top_k": "1", "attention": "cls"}, {}, (1, "cls", False)),
    ({}, {"top_k": "2", "attention": "none"}, (2, "none", False)),
    ({"top_k": "4"}, {"top_k": "2", "attention": "cls"}, (4, "cls", False)),  # a form field wins
    ({"top_k": " 7 "}, {}, (7, "rollout", False)),  # int() strips blanks
    ({"heatmap": " YES "}, {}, (3, "rollout", True)),
    ({"heatmap": "on", "attention": "cls"}, {}, (3, "cls", True)),
    ({}, {"heatmap": "1"}, (3, "rollout", True)),
    ({"heatmap": "off"}, {}, (3, "rollout", False)),
    ({"heatmap": "0", "attention": "none"}, {}, (3, "none", False)),
]  # fmt: skip


@pytest.mark.parametrize(("form", "query", "shows"), OPTION_CASES)
def test_options_from_form_fields_and_query(
    client: TestClient,
    upload: bytes,
    form: dict[str, str],
    query: dict[str, str],
    shows: tuple[int, str, bool],
) -> None:
    response = client.post("/classify", files={"image": ("a.png", upload)}, data=form, params=query)
    assert response.status_code == 200, response.text
    assert _asked(response.json()) == shows


@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream"])
def test_a_raw_image_body_takes_its_options_from_the_query(
    client: TestClient, upload: bytes, content_type: str
) -> None:
    response = client.post(
        "/classify",
        content=upload,
        params={"top_k": "2", "attention": "cls"},
        headers={"content-type": content_type},
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert _asked(answer) == (2, "cls", False)
    assert answer["image"]["sha256"] == hashlib.sha256(upload).hexdigest()


# --- batches -------------------------------------------------------------------------------


def test_a_batch_answers_in_upload_order_with_the_same_options(client: TestClient) -> None:
    uploads = [png(32 + 8 * i, 32, seed=i) for i in range(LIMITS["max_images_per_request"])]
    files = [("images", (f"{i}.png", data)) for i, data in enumerate(uploads)]
    response = client.post(
        "/classify_batch",
        files=files,
        data={"top_k": "2", "attention": "cls"},
        headers={"x-request-id": "batch-7"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "batch-7"
    items = response.json()
    assert [(i["index"], i["filename"], i["request_id"]) for i in items] == [
        (k, f"{k}.png", f"batch-7-{k}") for k in range(len(uploads))
    ]
    for item, data in zip(items, uploads, strict=True):
        BatchItem.model_validate(item)
        assert item["image"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert _asked(item) == (2, "cls", False)


def test_a_batch_request_id_is_made_when_none_is_given(client: TestClient) -> None:
    files = [("images", ("a.png", png())), ("images", ("b.png", png(seed=1)))]
    response = client.post("/classify_batch", files=files)
    made = response.headers["x-request-id"]
    assert REQUEST_ID.match(made)
    assert [i["request_id"] for i in response.json()] == [f"{made}-0", f"{made}-1"]


# --- the model and BentoML's routes ------------------------------------------------------


def test_get_model_describes_the_tiny_model(client: TestClient, tiny_dir: Path) -> None:
    response = client.get("/model")
    assert response.status_code == 200, response.text
    body = response.json()
    ModelResponse.model_validate(body)
    model = body["model"]
    assert {k: model[k] for k in ("num_patches", "patch_dim", "embed_dim", "sequence_length")} == {
        "num_patches": 16,
        "patch_dim": 192,
        "embed_dim": 32,
        "sequence_length": 17,
    }
    assert model["patch_size"] == [8, 8] and model["grid"] == [4, 4]
    assert model["position_embedding_kind"] == "learned"
    assert model["position_embedding_shape"] == [1, 17, 32]
    assert model["num_classes"] == 7 and model["name"] == tiny_dir.name
    assert body["labels"] == TINY_LABELS
    assert body["ready"] is True
    assert body["batching"]["max_batch_size"] == 4
    assert body["batching"]["max_images_per_request"] == LIMITS["max_images_per_request"]
    limits = {
        k: body["limits"][k]
        for k in ("max_body_bytes", "max_pixels", "min_side", "max_aspect_ratio")
    }
    assert limits == {k: LIMITS[k] for k in limits}
    assert body["defaults"] == {"top_k": 3, "attention": "rollout"}
    runtime = body["runtime"]
    assert (runtime["topology"], runtime["http_workers"], runtime["torch_threads"]) == (
        "replicas",
        1,
        1,
    )


@pytest.mark.parametrize("path", ["/healthz", "/livez", "/readyz"])
def test_probes_answer_once_ready(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_the_openapi_document_lists_the_routes(client: TestClient) -> None:
    paths = client.get("/docs.json").json()["paths"]
    assert {"/classify", "/classify_batch", "/model"} <= set(paths)

"""Several models at once (``VIT_MODELS``), in-process with two tiny models of one architecture
and different weights: each answers by its name, through every door, with its own versions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from service.model.engine import Engine
from service.model.imaging import decode_image
from service.model.loading import load_model
from tests.utils import make_tiny_dir

from .conftest import (
    TINY_LABELS,
    InProcessApp,
    assert_error,
    png,
    serve_in_process,
    settings_for,
    wait_until_ready,
)
from .test_oip import image_input, infer

TOKEN = "m0dels-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's architecture and labels with other weights: its answers differ."""
    folder = tmp_path_factory.mktemp("tiny-other")
    make_tiny_dir(folder, seed=3, label_names=TINY_LABELS)
    return folder


@pytest.fixture(scope="module")
def two(
    tiny_dir: Path, other_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessApp]:
    """``first`` (the default) and ``second``, the admin API on."""
    models = f"first=local-dir:{tiny_dir},second=local-dir:{other_dir}"
    settings = settings_for(tiny_dir, models=models, admin_token=TOKEN)
    with serve_in_process(settings, tmp_path_factory.mktemp("run")) as running:
        wait_until_ready(running)
        yield running


def _offline(model_dir: Path, image: bytes) -> np.ndarray:
    engine = Engine(load_model(f"local-dir:{model_dir}", device="cpu", dtype="float32"))
    pixels = decode_image(image, min_short_side=engine.info.resize_size).pixels
    return engine.run([pixels], ["cls"]).items[0].probs


def _scores(answer: dict) -> np.ndarray:
    by_index = {p["index"]: p["score"] for p in answer["predictions"]}
    return np.array([by_index[i] for i in range(len(TINY_LABELS))])


def _classify(client: TestClient, image: bytes, path: str = "/classify", **kw: object) -> dict:
    response = client.post(path, files={"image": ("a.png", image)}, data={"top_k": "7"}, **kw)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_each_model_the_default_first(two: InProcessApp) -> None:
    listed = two.client.get("/models").json()["models"]
    assert [(m["name"], m["default"], m["state"]) for m in listed] == [
        ("first", True, "ready"),
        ("second", False, "ready"),
    ]
    for model in listed:
        assert model["versions"] == [
            {"name": model["name"], "version": "1", "traffic_percent": 100}
        ]


def test_each_model_answers_by_its_name(two: InProcessApp, tiny_dir: Path, other_dir: Path) -> None:
    client, image = two.client, png(seed=11)
    first, second = _offline(tiny_dir, image), _offline(other_dir, image)
    assert not np.allclose(first, second, atol=1e-3)  # the two models can be told apart
    answers = {
        "default": _classify(client, image),
        "first": _classify(client, image, "/classify?model=first"),
        "second": _classify(client, image, "/classify?model=second"),
        "header": _classify(client, image, headers={"X-Model": "second"}),
    }
    for key, expected, name in (
        ("default", first, "first"),
        ("first", first, "first"),
        ("second", second, "second"),
        ("header", second, "second"),
    ):
        assert answers[key]["model"]["name"] == name, key
        assert np.allclose(_scores(answers[key]), expected, atol=1e-4), key
    batch = client.post(
        "/classify_batch?model=second",
        files=[("images", ("a.png", image)), ("images", ("b.png", image))],
        data={"top_k": "7"},
    )
    assert batch.status_code == 200, batch.text
    for item in batch.json():
        assert item["model"]["name"] == "second"
        assert np.allclose(_scores(item), second, atol=1e-4)
    # Counted under the model that answered.
    assert two.metric("vit_version_images_total", model="second", version="1") >= 4


def test_the_protocol_serves_each_model_by_name(two: InProcessApp, other_dir: Path) -> None:
    client, image = two.client, png(seed=12)
    meta = client.get("/v2/models/second")
    assert meta.status_code == 200, meta.text
    assert meta.json()["name"] == "second"
    assert meta.json()["parameters"]["source"] == f"local-dir:{other_dir}"
    assert client.get("/v2/models/second/ready").json() == {"name": "second", "ready": True}
    answer = infer(client, "second", {"inputs": [image_input(image)]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_name"] == "second"
    assert answer.json()["model_version"] == "1"


def test_a_name_not_served_is_refused_in_every_door(two: InProcessApp) -> None:
    client, image = two.client, png(seed=13)
    refused = client.post("/classify?model=third", files={"image": ("a.png", image)})
    assert_error(refused, 404, "unknown_model", "'third'", "'first'", "'second'")
    by_header = client.post(
        "/classify", files={"image": ("a.png", image)}, headers={"X-Model": "third"}
    )
    assert_error(by_header, 404, "unknown_model", "'third'")
    assert_error(client.get("/model?model=third"), 404, "unknown_model")
    protocol = client.get("/v2/models/third")
    assert protocol.status_code == 404
    assert protocol.json()["error"].startswith("unknown_model:")
    version = client.get("/v2/models/second/versions/9")
    assert version.status_code == 404
    assert version.json()["error"].startswith("unknown_version:")


def test_get_model_describes_the_one_named(two: InProcessApp, other_dir: Path) -> None:
    default = two.client.get("/model").json()
    assert default["model"]["name"] == "first"
    second = two.client.get("/model", params={"model": "second"}).json()
    assert second["model"]["name"] == "second"
    assert second["model"]["source"] == f"local-dir:{other_dir}"


def test_a_version_loads_for_one_model_and_leaves_the_other(
    two: InProcessApp, tiny_dir: Path
) -> None:
    client, image = two.client, png(seed=14)
    index = client.post("/v2/repository/index", headers=AUTH).json()
    assert [(row["name"], row["version"], row["state"]) for row in index] == [
        ("first", "1", "READY"),
        ("second", "1", "READY"),
    ]
    # ``second`` becomes the tiny model's weights, as version 2; ``first`` is untouched.
    loaded = client.post(
        "/v2/repository/models/second/load",
        json={"parameters": {"source": f"local-dir:{tiny_dir}"}},
        headers=AUTH,
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["name"] == "second" and loaded.json()["version"] == "2"
    answer = _classify(client, image, "/classify?model=second")
    assert answer["model"]["version"] == "2"
    assert np.allclose(_scores(answer), _offline(tiny_dir, image), atol=1e-4)
    assert _classify(client, image)["model"] == {
        **_classify(client, image)["model"],
        "name": "first",
        "version": "1",
    }
    listed = {m["name"]: m["versions"] for m in client.get("/models").json()["models"]}
    assert [v["version"] for v in listed["first"]] == ["1"]
    assert [v["version"] for v in listed["second"]] == ["2"]
    unknown = client.post("/v2/repository/models/third/load", json={"parameters": {}}, headers=AUTH)
    assert unknown.status_code == 404
    assert unknown.json()["error"].startswith("unknown_model:")
